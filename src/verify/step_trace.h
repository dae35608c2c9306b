// Private to sn_verify: the operation trace of one step of a member, taken by
// replaying it from a checkpoint and the recorded evidence (train/replay.h)
// with a tracer attached (train/trace.h). The solver traces its own steps so,
// the challenger the solver's, the referee re-traces for kinds it cannot
// recompute alone.
#pragma once

#include <filesystem>
#include <vector>

#include "core/result.h"
#include "proto/solvernet.pb.h"
#include "train/trace.h"
#include "train/train.h"
#include "verify/verify.h"

namespace sn::verify {

struct TraceInputs {
  solvernet::v1::SetupJobRequest setup;
  std::filesystem::path checkpoint_dir;  // CheckpointStore layout, holding the checkpoint of CHECKPOINT_STEP
  int64_t checkpoint_step = 0;
  std::vector<solvernet::v1::StepEvidence> steps;  // c+1 … t; the last one is traced
  Hash256 leaf_prev{};                   // the committed leaf t−1 (r_0 starts from it)
  train::Cheat cheat;                    // a cheater traces as it cheated
};

Result<train::Trace> trace_member_step(const TraceInputs& inputs);

// The trace as the chain and the wire see it.
StepOps step_ops_of(const train::Trace& trace);
solvernet::v1::OpRecord record_to_proto(const train::OpRecord& record);
Result<train::OpRecord> record_from_proto(const solvernet::v1::OpRecord& record);

// The newest complete checkpoint of DIR at or before STEP (error not_found if none).
Result<int64_t> checkpoint_at_or_before(const std::filesystem::path& dir, int64_t step);

}  // namespace sn::verify
