// A tiny model file for inference tests: random weights (model/gpt.h's
// seeded initialisation) and a hand-written character vocabulary, saved with
// the metadata train writes, so every infer test serves the same kind of file.
#pragma once

#include <filesystem>
#include <string>

#include "core/job.h"

namespace sn::infer::testing {

// d_model 64, 4 blocks, 4 heads, d_ff 256, vocab 64, seq_len 64.
ModelConfig tiny_model_config();
// "<unk>", "<s>", "</s>", "▁" and the printable ASCII letters, digits and
// punctuation, one piece each.
std::string tiny_vocab_text();
// Writes the model (weights from SEED) to PATH; returns PATH.
std::filesystem::path write_tiny_model(const std::filesystem::path& path, uint64_t seed = 7,
                                       const ModelConfig& config = tiny_model_config());

}  // namespace sn::infer::testing
