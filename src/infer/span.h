// A span of a GPT's blocks for inference, with per-session KV caches. The
// arithmetic is the training model's (model/gpt.h) written for incremental
// decoding: a step appends T positions to a session's cache and attends over
// everything cached so far. docs/inference.md.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/hash.h"
#include "core/job.h"
#include "core/result.h"
#include "model/gpt.h"

namespace sn::infer {

// A model file as `solvernet train --out` writes it: weights plus metadata
// "solvernet.model" (the [model] table as JSON) and "solvernet.tokenizer" (the
// SentencePiece vocabulary, "piece\tscore" lines) — a model file alone is
// enough to serve it.
struct ModelFile {
  std::string name;                // the job's name
  ModelConfig config;
  std::string tokenizer_vocab;
  model::NamedTensors tensors;     // whole model, training names (model/gpt.h)
  Hash256 file_hash{};             // BLAKE2b-256 of the file's bytes
};

// (train writes the metadata with model::model_file_metadata, model/safetensors.h.)
// Errors (invalid_input, naming the file): unreadable, not safetensors, no
// solvernet metadata (an older file: retrain, or it was not written by
// solvernet), a config that fails job validation, missing or mis-shaped tensors.
Result<ModelFile> load_model_file(const std::filesystem::path& path);

// One session's cached keys and values for a span: per block, [heads, t, head_dim].
struct KvCache {
  std::vector<torch::Tensor> keys, values;
  int64_t length = 0;              // positions cached
  // Memory a cache of LENGTH positions takes for LAYER_COUNT blocks (fp32 K and V).
  static int64_t bytes_for(const ModelConfig& config, int64_t layer_count, int64_t length);
};

// Blocks [first_block, end_block) of a model. A span starting at block 0 also
// embeds tokens; one ending at the last block also applies ln_f and the LM head.
class SpanModel {
 public:
  // Picks the span's tensors out of WEIGHTS (whole-model names; others are
  // ignored). invalid_input if one is missing or has the wrong shape.
  static Result<SpanModel> create(const ModelConfig& config, int first_block, int end_block,
                                  const model::NamedTensors& weights);

  // One step of one session: INPUT is int64 tokens [T] (span at block 0) or
  // float hidden [T, d_model]. Appends T positions to CACHE. Returns hidden
  // [T, d_model], or for a span ending at the last block the logits of the last
  // position [1, vocab]. invalid_input (cache untouched) if the input has the
  // wrong dtype/shape, a token id is out of range, or cache.length + T exceeds
  // seq_len.
  Result<torch::Tensor> forward(KvCache& cache, const torch::Tensor& input) const;

  // Single-position steps of several sessions at once (a server batches its
  // sessions' decode steps): INPUTS[i] is [1] or [1, d_model] for CACHES[i].
  // The linear layers run on all rows stacked; attention runs per session.
  // Same checks as forward, all before any cache changes.
  Result<std::vector<torch::Tensor>> forward_batch(const std::vector<KvCache*>& caches,
                                                   const std::vector<torch::Tensor>& inputs) const;

  // Without a cache: outputs for every position of INPUT ([T] or [T, d]),
  // hidden [T, d] or logits [T, vocab] (spot checks; the no-cache reference).
  Result<torch::Tensor> forward_full(const torch::Tensor& input) const;

  const ModelConfig& config() const { return config_; }
  int first_block() const { return first_; }
  int end_block() const { return end_; }
  bool embeds() const { return first_ == 0; }
  bool has_head() const { return end_ == config_.layers; }
  int64_t parameter_bytes() const;

  // The checks every step runs first (invalid_input naming what is wrong): the
  // dtype and shape above, token ids in the vocabulary, finite hidden states,
  // at least one position, and CACHED + T ≤ LIMIT (0: the model's seq_len; a
  // server passes a session's own, smaller, limit).
  Status check_input(const torch::Tensor& input, int64_t cached, int64_t limit = 0) const;

 private:
  SpanModel() = default;
  std::vector<torch::Tensor> forward_batch_unchecked(const std::vector<KvCache*>& caches,
                                                     const std::vector<torch::Tensor>& inputs, bool all_rows) const;

  ModelConfig config_;
  int first_ = 0, end_ = 0;
  std::map<std::string, torch::Tensor> weights_;
};

// Samples the next token from LOGITS [vocab] (float): argmax when
// temperature is 0 (lowest id on ties), else top-p over softmax(logits / T)
// with a generator seeded by (seed, index) so a replayed step samples the same.
int32_t sample_token(const torch::Tensor& logits, double temperature, double top_p, uint64_t seed, int64_t index);

}  // namespace sn::infer
