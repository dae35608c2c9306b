// One node's part of a job: a pipeline stage replica. It runs the micro-batch
// schedule (1F1B or GPipe) for each step, exchanging activations and their
// gradients with the neighbouring stages, sums gradients with its stage's
// replicas, keeps the tied embedding in sync, and applies AdamW.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/hash.h"
#include "core/job.h"
#include "core/keys.h"
#include "core/result.h"
#include "compress/compress.h"
#include "model/data.h"
#include "model/gpt.h"
#include "net/delivery.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"
#include "train/adamw.h"
#include "train/aggregation.h"
#include "train/pipeline_channel.h"
#include "train/evidence.h"
#include "train/state.h"
#include "train/train.h"

namespace sn::train {

class StepTracer;   // train/trace.h
class DilocoOuter;  // train/diloco.h

// One entry of a stage's schedule: forward or backward of micro-batch `micro`.
struct ScheduleOp {
  bool forward = true;
  int micro = 0;
};
// The order in which stage STAGE of STAGES runs M micro-batches.
std::vector<ScheduleOp> pipeline_schedule(const std::string& kind, int stage, int stages, int micro_batches);

// Flattens the gradients of PARAMETERS (zeros where undefined) into one f32 tensor, and back.
torch::Tensor flatten_gradients(const NamedTensors& parameters);
void unflatten_gradients(const torch::Tensor& flat, const NamedTensors& parameters);
// BLAKE2b-256 over the parameters' names, shapes and bytes, in order (binary).
Hash256 parameters_hash(const NamedTensors& parameters);

// What a job's inbox must hold from one sender: a step's worth of its
// traffic (messages in flight per step) twice over, plus a margin, so that
// legitimate pipeline and all-reduce traffic never reaches the bound.
net::InboxLimits job_inbox_limits(const JobConfig& job, int64_t stage_parameters, bool compressed_gradients);

class StepRecorder;

// What one training step committed to (docs/commitments.md, "Step leaves").
struct StepOutcome {
  int64_t step = 0;  // t, 1-based
  Hash256 state_hash{}, inbound_digest{}, outbound_digest{}, leaf{};
  std::vector<OutboundDigest> outbound;  // sorted by (to, tag)
};

class StageWorker {
 public:
  // Its transport is registered with DELIVERY (which must outlive the worker)
  // for the worker's life, so the node's Transport service routes to it.
  // A job with a [verify] table records its evidence under
  // DATA_DIR/evidence (train/evidence.h) and keeps a checkpoint at step 0 and
  // every segment_steps steps. CHEAT: none for an honest node.
  static Result<std::unique_ptr<StageWorker>> create(const solvernet::v1::SetupJobRequest& request,
                                                     const NodeKey& key,
                                                     const std::filesystem::path& data_dir,
                                                     std::chrono::milliseconds peer_timeout,
                                                     net::DeliveryService& delivery, Cheat cheat = {});
  // A worker with no network (replay): LINK stands in for the peers, the
  // state comes from the checkpoint of CHECKPOINT_STEP in CHECKPOINT_DIR (its
  // AQ-SGD buffer files are copied into SCRATCH_DIR, where the worker keeps
  // its buffers). It records no evidence and writes no checkpoint.
  static Result<std::unique_ptr<StageWorker>> create_offline(const solvernet::v1::SetupJobRequest& request,
                                                             std::shared_ptr<net::Transport> link,
                                                             const std::filesystem::path& checkpoint_dir,
                                                             int64_t checkpoint_step,
                                                             const std::filesystem::path& scratch_dir, Cheat cheat = {});

  const std::string& job_id() const { return job_id_; }
  const JobConfig& job() const { return job_; }
  int stage() const { return stage_; }
  int replica() const { return replica_; }
  model::StageModel& model() { return *model_; }
  const Cheat& cheat() const { return cheat_; }
  // Whether the cheat acts in 0-based step STEP (from its first step on, or
  // only there for the one-step strategies).
  bool cheat_acts(int64_t step) const;
  int64_t parameter_count() const;
  // The state hash now, and the leaf of the state the worker started from
  // (after setup: leaf_0, or the resumed step's state with zero digests).
  Hash256 state_hash() const;
  const Hash256& start_leaf() const { return start_leaf_; }
  // What the last training step committed to (after run_step succeeded).
  const StepOutcome& last_step() const { return last_step_; }

  // One optimizer step (or, forward_only, one evaluation round), in phases:
  // run the schedule (per op: receive input, forward, send output; receive
  // output gradient, backward, send input gradient), reduce gradients across
  // replicas, sync the tied embedding, update and checkpoint, report. On error
  // the transport is aborted and the worker's weights, optimizer and codec
  // state are unspecified: the job must be set up again (from a checkpoint).
  Result<solvernet::v1::RunStepReply> run_step(const solvernet::v1::RunStepRequest& request);
  // This stage's weights as safetensors (whole-model names).
  std::string weights_safetensors() const;
  int64_t steps_done() const { return steps_done_; }
  // The state hash of the checkpoint this worker saved after STEP steps
  // (nullopt: it saved none then, or too long ago).
  std::optional<Hash256> saved_state(int64_t step) const;
  void abort(const std::string& reason);
  ~StageWorker();
  // Verification (train/trace.h): TRACER (not owned; null to detach) sees
  // every operation of the training steps that follow. Null in training.
  void set_tracer(StepTracer* tracer);

 private:
  StageWorker() = default;
  // Everything but the transport: role, model, optimizer, codecs. RESTORE
  // (if set) is the checkpoint to start from; its buffer files are put in
  // place before the codecs open them. OFFLINE: a replay's worker.
  static Result<std::unique_ptr<StageWorker>> build(const solvernet::v1::SetupJobRequest& request,
                                                    const std::filesystem::path& data_dir,
                                                    std::chrono::milliseconds peer_timeout,
                                                    const CheckpointStore* restore_from, int64_t restore_step,
                                                    std::optional<LoadedCheckpoint>& restored, bool offline);
  std::vector<net::MemberInfo> members_of(const solvernet::v1::SetupJobRequest& request) const;
  Status attach(std::shared_ptr<net::Transport> link, const std::string& self_node_id);
  // Records a training step: digests, leaf (with the cheat), evidence files.
  Status commit_step(const solvernet::v1::RunStepRequest& request, solvernet::v1::RunStepReply& reply);
  Status start_evidence(const solvernet::v1::SetupJobRequest& request);
  void apply_weight_cheat(int64_t step);
  int member(int stage, int replica) const { return stage * replicas_ + replica; }

  // The working state of one step, handed from phase to phase.
  struct StepState;
  Status check_step(const solvernet::v1::RunStepRequest& request) const;
  Status forward_micro(StepState& state, int micro);
  Status backward_micro(StepState& state, int micro);
  // DP-SGD: backward of one micro-batch one sequence at a time, each
  // sequence's parameter gradient clipped (train/aggregation.h), into dp_sum_.
  Status backward_clipped(StepState& state, int micro);
  // A [privacy] job's hooks from the installed privacy module (LINK: null offline).
  Status attach_privacy(net::Transport* link, const NodeKey* key, const solvernet::v1::SetupJobRequest& request);
  Status reduce_replica_gradients(int64_t step);
  Status sync_tied_embedding(int64_t step);
  Status update_weights(int64_t step, solvernet::v1::RunStepReply& reply);
  // [diloco]: the outer step among the request's live replica groups
  // (train/diloco.h); steps_done_ is unchanged. The reply's replica_hash is
  // the outer state every live replica must share (weights and momentum).
  // Retryable: attempt 0 keeps the state it starts from; a later attempt of
  // the same step (a group was lost during it) restores that state first,
  // whether or not an earlier attempt completed here, and leaves the
  // transport links to the groups no longer listed.
  Result<solvernet::v1::RunStepReply> run_outer_sync(const solvernet::v1::RunStepRequest& request);
  Status report(StepState& state, solvernet::v1::RunStepReply& reply);
  // Everything the next step depends on, as a view (docs/commitments.md).
  TrainingState training_state() const;
  // Checkpoints of this member go through checkpoints_ (train/state.h): save
  // writes the state after steps_done_ steps with its digest; load restores
  // STEP's checkpoint and fails (naming the file) unless the restored state
  // reproduces the manifest's digest. On failure the worker is unusable.
  Status save_checkpoint(const StateDigest& digest);
  // REPLANNED (SetupJobRequest.replanned): only the weights, optimizer state
  // and AQ-SGD buffers must reproduce the manifest; the rest is this role's.
  Status apply_checkpoint(LoadedCheckpoint loaded, const std::string& where, bool replanned);
  // The AQ-SGD buffer file paths by boundary name ("fwd-out", …): where the
  // codecs keep them if they have one (only AQ-SGD's forward codecs do).
  std::vector<std::pair<std::string, std::filesystem::path>> buffer_files() const;

  std::string job_id_;
  JobConfig job_;
  int stage_ = 0, replica_ = 0, stages_ = 1, replicas_ = 1;
  std::filesystem::path data_dir_;
  std::chrono::milliseconds peer_timeout_{60000};
  std::unique_ptr<model::StageModel> model_;
  NamedTensors parameters_;
  std::unique_ptr<AdamW> optimizer_;
  std::shared_ptr<net::JobTransport> live_;   // null offline
  std::shared_ptr<StepRecorder> transport_;    // over live_ or the offline link
  net::DeliveryService::Registration registration_;
  std::vector<std::string> member_node_ids_;
  Cheat cheat_;
  int64_t cheat_first_ = 0;  // resolved 1-based first step
  bool offline_ = false;
  bool record_ = false;      // writes evidence ([verify] job, live)
  std::filesystem::path evidence_dir_;
  std::filesystem::path buffer_dir_;
  Hash256 start_leaf_{};
  StepOutcome last_step_;
  std::unique_ptr<PipelineChannel> pipeline_;
  // Activation codecs at this stage's boundaries (none when compression is off):
  // forward to the next stage / from the previous, backward to the previous / from the next.
  std::unique_ptr<compress::ActivationCodec> forward_out_, forward_in_, backward_out_, backward_in_;
  // Gradient compressors (none when compression.gradients is "none"): the sum
  // over this stage's replicas, and the tied embedding's sum between the first
  // and last stage. Their error-feedback residuals are saved in checkpoints.
  std::unique_ptr<compress::GradientCompressor> replica_compressor_, tied_compressor_;
  // A seed every member agrees on for (step, purpose), from the job's seed.
  uint64_t shared_seed(int64_t step, std::string_view purpose, int64_t a = 0, int64_t b = 0) const;
  int64_t steps_done_ = 0;
  int64_t dataset_samples_ = 0;
  std::unique_ptr<CheckpointStore> checkpoints_;
  std::map<int64_t, Hash256> saved_states_;  // the newest checkpoints saved: step → state hash
  StepTracer* tracer_ = nullptr;  // trace hooks: null except when verifying
  // [diloco] jobs: the outer state, and the dataset this node reads its own
  // micro-batches from (null when the client sends tokens).
  std::unique_ptr<DilocoOuter> diloco_;
  std::unique_ptr<model::Dataset> dataset_;
  // The parameters and outer state before the first attempt of the outer
  // step after OUTER_UNDO_STEP steps (-1: none yet), for its retries.
  int64_t outer_undo_step_ = -1;
  std::vector<torch::Tensor> outer_undo_parameters_;
  std::map<std::string, torch::Tensor> outer_undo_state_;
  // [privacy] jobs only: clipping bound, noise and secure aggregation, and
  // the step's sum of clipped per-sequence gradients (flat, as flatten_gradients).
  std::unique_ptr<PrivacyHooks> privacy_;
  torch::Tensor dp_sum_;
};

}  // namespace sn::train
