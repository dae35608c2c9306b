// Replay of one member's training steps with no peers and no network
// (docs/verification.md): the member's StageWorker is rebuilt from a
// checkpoint and runs each step through the same code as live training, over
// a transport that hands out the recorded, signed inbound messages and
// records the digests of what the honest code sends.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <vector>

#include "core/hash.h"
#include "core/result.h"
#include "proto/solvernet.pb.h"
#include "train/evidence.h"
#include "train/stage_worker.h"
#include "train/train.h"

namespace sn::train {

struct ReplayInputs {
  // The member's setup (setup.pb): job, role, members and their keys; its
  // auth names the job owner, whose key must sign every step request.
  solvernet::v1::SetupJobRequest setup;
  // A directory in CheckpointStore layout holding the checkpoint of step
  // CHECKPOINT_STEP (manifest, tensors and, with AQ-SGD, its buffer files).
  // Step 0 is a checkpoint too (a [verify] job keeps it).
  std::filesystem::path checkpoint_dir;
  int64_t checkpoint_step = 0;
  // Where the replayed worker keeps its AQ-SGD buffers (copied from the
  // checkpoint; a replay never writes into the checkpoint). Empty: a fresh
  // directory under the system temp dir, removed when the session ends.
  std::filesystem::path scratch_dir;
  // Replays as this cheat would (a cheater tracing its own step); none: honest.
  Cheat cheat;
  // For replay_member: the StepEvidence of steps c+1 … e, in order
  // (ReplaySession::open ignores them).
  std::vector<solvernet::v1::StepEvidence> steps;
};

// One replayed step t (1-based: RunStepRequest.step = t − 1).
struct ReplayedStep {
  int64_t step = 0;
  Hash256 state_hash{}, inbound_digest{}, outbound_digest{}, leaf{};
  std::vector<OutboundDigest> outbound;  // every message the step sent, sorted by (to, tag)
};

// The member's worker between replayed steps. Not thread-safe.
class ReplaySession {
 public:
  // Rebuilds the worker from the checkpoint. Errors: the checkpoint's files
  // (missing, altered), a restored state that does not reproduce the
  // manifest's digest, a setup that is not this job's or not signed by its owner.
  static Result<std::unique_ptr<ReplaySession>> open(const ReplayInputs& inputs);
  ~ReplaySession();

  // Runs the step EVIDENCE records, which must be the next one
  // (evidence.step = steps_done() + 1). Its request's auth is checked against
  // the job owner's key and every inbound message's signature against its
  // sender's key before anything runs: an unsigned or forged one is an error
  // (kind bad_peer) naming the tag and sender; so is a message the step needs
  // and the evidence lacks. After an error the session is unusable.
  Result<ReplayedStep> run_step(const solvernet::v1::StepEvidence& evidence);

  int64_t steps_done() const;        // optimizer steps: the checkpoint's step + steps replayed
  Hash256 state_hash() const;        // of the worker's state now (state_{steps_done()})
  StageWorker& worker() { return *worker_; }  // the op tracer hooks in here

 private:
  ReplaySession() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<StageWorker> worker_;
};

struct ReplayResult {
  Hash256 start_state{};            // state_c, as the checkpoint reproduces it
  std::vector<ReplayedStep> steps;  // c+1 … e
};

// Opens a session on INPUTS and runs inputs.steps through it.
Result<ReplayResult> replay_member(const ReplayInputs& inputs);

}  // namespace sn::train
