// The job file: what to train, on what data, how to split it, and how to
// optimise. Plain structs with defaults; parse_job validates every field in one
// place and reports `file:line: what is wrong`. No tensors here, so the
// scheduler and CLI can read jobs without LibTorch.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "core/result.h"

namespace sn {

class TomlTable;

struct ModelConfig {
  int64_t layers = 4;
  int64_t d_model = 64;
  int64_t heads = 4;
  int64_t d_ff = 256;
  int64_t vocab = 512;
  int64_t seq_len = 64;

  int64_t parameter_count() const;          // including the tied embedding once
  int64_t layer_parameter_count() const;    // one transformer block
};

struct DataConfig {
  // A text file (relative to the job file), or "fortunes" for the Debian fortunes corpus.
  std::string corpus = "fortunes";
  // Trains the tokenizer instead of the corpus (same forms). Fine-tuning sets it
  // to the pre-training corpus, so token ids mean what the model learnt.
  std::string tokenizer_corpus;             // empty: the corpus itself
  std::string cache_dir;                    // empty: $XDG_CACHE_HOME/solvernet or ~/.cache/solvernet
  double holdout_fraction = 0.05;           // sequences kept out of training for held-out loss
};

struct ParallelConfig {
  int64_t stages = 1;                       // P: pipeline stages
  int64_t replicas = 1;                     // D: data-parallel replicas of each stage
  int64_t micro_batches = 1;                // per replica per step
  std::string schedule = "1f1b";            // "1f1b" or "gpipe"
  int64_t allreduce_chunk_bytes = 1 << 20;  // ring all-reduce message size
};

struct TrainConfig {
  int64_t global_batch = 8;                 // sequences per optimizer step, over all replicas
  int64_t steps = 20;
  uint64_t seed = 1;
  int64_t checkpoint_every = 0;             // 0: no periodic checkpoints
  int64_t checkpoint_keep = 3;              // newest checkpoints a node keeps per member, 1..1000
  double lr = 3e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.01;
  int64_t warmup_steps = 0;
  int64_t eval_every = 0;                   // 0: held-out loss only at the end
};

struct CompressionConfig {
  std::string activations = "none";         // none | fp16 | quant | aqsgd
  int64_t forward_bits = 4;
  int64_t backward_bits = 8;
  std::string gradients = "none";           // none | fp16 | cocktail
  int64_t gradient_bits = 4;
  double random_fraction = 0.1;             // CocktailSGD: random subset kept
  double topk_fraction = 0.2;               // CocktailSGD: top-k of that subset
};

// [verify]: the job is verifiable (docs/verification.md). With the table
// present every member records its evidence and keeps a checkpoint at step 0
// and every segment_steps steps for the challenge window.
struct VerifyConfig {
  bool enabled = false;                     // the table is present
  int64_t segment_steps = 0;                // K; 0 in the file: checkpoint_every, or 10 if that is 0
  int64_t commit_every = 0;                 // steps between interim commits; 0: only at the end
};

// [diloco]: replica groups train apart and meet rarely (docs/diloco.md). Each
// replica group (every stage's replica r: one whole pipeline) takes
// inner_steps local AdamW steps with no all-reduce between groups; then, per
// stage, the groups average their pseudo-gradients θ_start − θ_end (int8 with
// a per-chunk scale, or fp32) and take one outer Nesterov step.
struct DilocoConfig {
  bool enabled = false;                     // the table is present
  int64_t inner_steps = 50;                 // H: local steps between outer steps
  double outer_lr = 0.7;
  double outer_momentum = 0.9;              // Nesterov momentum μ; 0: plain averaging steps
  std::string pseudo_grad = "int8";         // int8 | fp32: what the groups exchange
};

// [privacy]: secure aggregation of a stage's replica gradients and DP-SGD
// (docs/privacy.md). With the table present every member runs the privacy
// hooks (train/aggregation.h) that the node's privacy module provides.
struct PrivacyConfig {
  bool enabled = false;                     // the table is present
  bool secure_aggregation = false;          // replicas learn only the sum of their gradients
  int64_t threshold = 0;                    // t of D survivors needed; 0: ceil(2D/3)
  double fixed_point_range = 4.0;           // gradient values clamped to ±range before fixed point
  bool dp = false;                          // DP-SGD: per-sequence clipping and Gaussian noise
  double clip_norm = 1.0;                   // C: one sequence's whole-model gradient norm bound
  double noise_multiplier = 0;              // sigma (noise std = sigma · C); 0: from target_epsilon
  double target_epsilon = 0;                // 0: noise_multiplier is given
  double delta = 1e-5;
};

struct JobConfig {
  std::string name = "job";
  ModelConfig model;
  DataConfig data;
  ParallelConfig parallel;
  TrainConfig train;
  CompressionConfig compression;
  VerifyConfig verify;
  DilocoConfig diloco;
  PrivacyConfig privacy;
  std::filesystem::path source;             // the file it was read from, for messages

  int64_t sequences_per_micro_batch() const {
    return train.global_batch / (parallel.replicas * parallel.micro_batches);
  }
  // Estimated bytes one process needs to train the whole model on one micro-batch
  // (what --local does and the client's compute measurement builds): 16 per parameter
  // (weights, gradients, two AdamW moments) plus the activations kept for backward.
  // A double, so absurd sizes stay representable.
  double training_memory_bytes() const;
};

// Limits of job fields that other inputs share (docs/inputs.md lists them all).
inline constexpr int64_t kMaxStages = 1024;
inline constexpr int64_t kMaxReplicas = 1024;
inline constexpr int64_t kMaxSteps = int64_t(1) << 40;
inline constexpr size_t kMaxJobNameLength = 64;  // name: A-Z a-z 0-9 . _ -, not starting with '.'


// STAGES pipeline stages of MODEL: 1 ≤ stages ≤ min(kMaxStages, model.layers). The
// job file ([parallel] stages) and `solvernet plan --stages` both use it; WHAT names
// the input in the message (e.g. "parallel.stages", "--stages").
Status check_stages(const ModelConfig& model, int64_t stages, std::string_view what);

Result<JobConfig> parse_job_file(const std::filesystem::path& path);
Result<JobConfig> parse_job_string(std::string_view text, const std::string& display_name);
// Reads a [model] table (also used by `solvernet plan --model FILE`).
ModelConfig read_model_table(TomlTable& table);
// A command-line override (e.g. --steps) of the integer field KEY ("train.steps",
// "train.global_batch", "parallel.stages", ...) under the job file's own rules: the
// job is re-validated whole with VALUE in place. Errors (exit 2) read
// "FLAG VALUE: train.steps must be in [1, 1099511627776], got -3". JOB is unchanged.
Result<JobConfig> override_job_integer(const JobConfig& job, std::string_view key, int64_t value,
                                       std::string_view flag);
// Serialises a job back to TOML (sent to nodes; parse(to_toml(j)) == j).
std::string job_to_toml(const JobConfig& job);

}  // namespace sn
