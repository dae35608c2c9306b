// The node's traces of its own steps, taken on demand and kept for the
// dispute that asked (the solver's dispute player and the Evidence service
// share them: the referee fetches tensors out of the very trace posted).
#include <spdlog/spdlog.h>

#include <deque>
#include <mutex>

#include "core/fs.h"
#include "train/evidence.h"
#include "verify/step_trace.h"
#include "verify/trace_cache.h"

namespace sn::verify {

namespace fs = std::filesystem;

TraceCache::TraceCache(fs::path data_dir, train::Cheat cheat) : data_dir_(std::move(data_dir)), cheat_(cheat) {}

Result<std::shared_ptr<const train::Trace>> TraceCache::get(const Member& member, int64_t step) {
  std::lock_guard<std::mutex> lock(mutex_);  // one trace at a time: each is a step of compute
  for (const auto& entry : entries_)
    if (entry.job_id == member.job_id && entry.stage == member.stage && entry.replica == member.replica &&
        entry.step == step)
      return entry.trace;
  if (step < 1) return input_error("trace: step {} < 1 (steps are 1-based)", step);
  const fs::path dir = train::evidence_dir(data_dir_, member.job_id, member.stage, member.replica);
  TraceInputs inputs;
  SN_ASSIGN(inputs.setup, train::read_setup_evidence(dir));
  inputs.checkpoint_dir = train::checkpoint_dir(data_dir_, member.job_id, member.stage, member.replica);
  SN_ASSIGN(inputs.checkpoint_step, checkpoint_at_or_before(inputs.checkpoint_dir, step - 1));
  for (int64_t t = inputs.checkpoint_step + 1; t <= step; ++t) {
    SN_ASSIGN(auto evidence, train::read_step_evidence(dir, t));
    inputs.steps.push_back(std::move(evidence));
  }
  SN_ASSIGN(auto leaves, train::read_leaves(dir));
  if (static_cast<int64_t>(leaves.size()) <= step)
    return kind_error(ErrorKind::not_found, "trace: no leaf {} on disk", step);
  inputs.leaf_prev = leaves[static_cast<size_t>(step - 1)];
  inputs.cheat = cheat_;
  spdlog::info("tracing job {} stage {} replica {} step {} (from checkpoint {})", member.job_id, member.stage,
               member.replica, step, inputs.checkpoint_step);
  SN_ASSIGN(train::Trace trace, trace_member_step(inputs));
  auto shared = std::make_shared<const train::Trace>(std::move(trace));
  entries_.push_back({member.job_id, member.stage, member.replica, step, shared});
  if (entries_.size() > 4) entries_.erase(entries_.begin());
  return shared;
}

StepOpsSource TraceCache::step_ops() {
  return [this](const Member& member, int64_t step) -> Result<StepOps> {
    SN_ASSIGN(auto trace, get(member, step));
    return step_ops_of(*trace);
  };
}

}  // namespace sn::verify
