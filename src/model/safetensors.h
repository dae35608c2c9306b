// Weights as safetensors (docs/safetensors.md): an 8-byte little-endian header
// length, a JSON header naming each tensor's dtype, shape and byte range, then
// the raw bytes. Files are written atomically (temp file + rename).
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <string_view>

#include "core/result.h"
#include "model/gpt.h"

namespace sn::model {

std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata = {});
Status save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                        const std::map<std::string, std::string>& metadata = {});

// Tensors in file order. Rejects a short file, a header that is not JSON or
// not an object, unknown dtypes, shapes that disagree with byte ranges,
// ranges outside the data or overlapping.
Result<NamedTensors> load_safetensors_bytes(std::string_view bytes);
Result<NamedTensors> load_safetensors(const std::filesystem::path& path);
Result<std::map<std::string, std::string>> safetensors_metadata(std::string_view bytes);

// A model file's metadata (docs/inference.md): the job's name, the [model]
// table as JSON and the SentencePiece vocabulary ("piece\tscore" lines), so that
// the file alone is enough to serve the model (infer::load_model_file reads it).
inline constexpr const char* kModelNameKey = "solvernet.name";
inline constexpr const char* kModelConfigKey = "solvernet.model";
inline constexpr const char* kTokenizerKey = "solvernet.tokenizer";
std::map<std::string, std::string> model_file_metadata(const std::string& name, const ModelConfig& config,
                                                       const std::string& tokenizer_vocab);

}  // namespace sn::model
