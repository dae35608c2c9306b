// A member's training state: everything the next step depends on, the hash
// that commits to it after every step, and the store that checkpoints it.
//
// The hash layout is versioned (kStateLayoutVersion) and specified byte for
// byte in docs/commitments.md, so that a verifier in another language can
// recompute it from a checkpoint; the checkpoint format is in
// docs/checkpoints.md.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/hash.h"
#include "core/result.h"
#include "train/adamw.h"

namespace sn::train {

inline constexpr uint64_t kStateLayoutVersion = 1;

// Where the data order stands. The order itself is a pure function of these
// and the job's seed (train/batches.h), so they pin the samples of every
// later step.
struct DataCursor {
  int64_t next_step = 0;        // optimizer steps done = the 0-based step that runs next
  int64_t dataset_samples = 0;  // training samples (the shard order is drawn over these)
  int64_t global_batch = 0;
  int64_t replicas = 1;
};

// What seeds a step. Every random draw of step s (stochastic rounding, the
// gradient compressor's subset) comes from a seed derived from
// (job_seed, s, purpose, stage, replica), and s is the cursor's next_step; no
// step draws from torch's global generator (the model has no dropout).
struct RngState {
  uint64_t job_seed = 0;
  int64_t stage = 0;
  int64_t replica = 0;
};

// A view of one member's state: tensors share storage with the live ones (no
// copies), so build it, hash it, drop it. Tensors must be on the CPU.
struct TrainingState {
  NamedTensors weights;    // the stage's parameters, in model order
  NamedTensors optimizer;  // AdamW::state(): adam.m.<p>, adam.v.<p> per parameter, then adam.step
  NamedTensors residuals;  // error-feedback residuals present, by name, in a fixed order
  // AQ-SGD buffer digests (compress::ActivationCodec::buffer_digest) by
  // boundary name, in a fixed order; codecs without a buffer are left out.
  std::vector<std::pair<std::string, Hash256>> activation_buffers;
  DataCursor cursor;
  RngState rng;
};

// The six parts, in the order their digests enter the root.
enum class StatePart : size_t { weights, optimizer, residuals, activation_buffers, cursor, rng };
inline constexpr size_t kStateParts = 6;
const char* state_part_name(StatePart part);  // "weights", "optimizer", ...

struct StateDigest {
  std::array<Hash256, kStateParts> parts{};
  Hash256 root{};  // the state hash: what RunStepReply.state_hash carries
  // Over the parts every replica of a stage holds bitwise alike (weights,
  // optimizer, cursor; residuals, buffers and seeds are per replica): what
  // the client compares to catch diverged replicas (RunStepReply.replica_hash).
  Hash256 replica{};
  const Hash256& part(StatePart p) const { return parts[static_cast<size_t>(p)]; }
};

// BLAKE2b-256 digests of each part and of the whole (docs/commitments.md).
// Cost: one pass over weights and both moments (3 × the parameter bytes) plus
// 32 bytes per AQ-SGD buffer, whose digest the codec keeps.
StateDigest training_state_digest(const TrainingState& state);
inline Hash256 training_state_hash(const TrainingState& state) { return training_state_digest(state).root; }

// ---------------------------------------------------------------------------
// Checkpoints of one member: DIR/step-<12-digit step>.safetensors holds the
// tensors, DIR/step-<step>.manifest.json names the files with their sizes and
// BLAKE2b-256 and the state digest the checkpoint must reproduce. A manifest
// is written only once its data file is durable, so a checkpoint is complete
// exactly when its manifest exists. Format: docs/checkpoints.md.

struct CheckpointFile {
  std::string name;  // relative to the store's directory
  uint64_t bytes = 0;
  Hash256 blake2b{};
};

struct CheckpointManifest {
  int64_t step = 0;
  std::map<std::string, std::string> labels;  // job_id, stage, replica: the role that wrote it
  StateDigest state;
  std::vector<CheckpointFile> files;
};

// How MANIFEST is not the checkpoint of job JOB_ID's stage STAGE replica
// REPLICA by its labels ("it is labelled job j stage 1 replica 0, not …"), or
// nullopt. ANY_REPLICA: a checkpoint that a re-plan, grow-back or rejoin
// copied from another replica of the stage (it keeps that replica's labels).
std::optional<std::string> checkpoint_role_mismatch(const CheckpointManifest& manifest, const std::string& job_id,
                                                    int64_t stage, int64_t replica, bool any_replica = false);

struct LoadedCheckpoint {
  CheckpointManifest manifest;
  NamedTensors tensors;
};

class CheckpointStore {
 public:
  // KEEP ≥ 1: how many of the newest checkpoints save() leaves on disk.
  CheckpointStore(std::filesystem::path dir, int64_t keep);

  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path data_path(int64_t step) const;
  std::filesystem::path manifest_path(int64_t step) const;

  // Writes TENSORS as the checkpoint of STEP: the data file, copies of
  // EXTRA_FILES (name → source; stored as step-<step>.<name>, listed in the
  // manifest with their BLAKE2b: AQ-SGD buffers), then its manifest, each through a temp file, fsync, rename and fsync of the
  // directory; then deletes all but the KEEP newest complete checkpoints up
  // to STEP, every checkpoint of a later step (a rolled-back run's), and any
  // temp file a killed writer left. On failure (a full disk) no file of
  // STEP is left, not even of an earlier save of STEP, whose files it may
  // have replaced in part; the checkpoints of other steps are untouched.
  Status save(int64_t step, const NamedTensors& tensors, const std::map<std::string, std::string>& labels,
              const StateDigest& state,
              const std::vector<std::pair<std::string, std::filesystem::path>>& extra_files = {});

  // Steps of the complete checkpoints (those with a manifest), ascending.
  std::vector<int64_t> steps() const;

  // Reads STEP's manifest and every file it names, checks each file's size
  // and BLAKE2b against it and parses the tensors. Refuses, naming the file, a
  // missing, truncated, altered or unparsable one. The caller restores the
  // tensors and compares the state it rebuilt with manifest.state.
  Result<LoadedCheckpoint> load(int64_t step) const;
  // Deletes STEP's manifest, then every file of STEP (best effort).
  void remove_step(int64_t step) const;

 private:
  std::filesystem::path dir_;
  int64_t keep_;
};

}  // namespace sn::train
