// Private to sn_verify (and the node that creates one): traces of this node's
// own steps (verify/step_trace.h), bounded to the few newest.
#pragma once

#include <filesystem>
#include <memory>
#include <mutex>
#include <vector>

#include "train/trace.h"
#include "train/train.h"
#include "verify/verify.h"

namespace sn::verify {

class TraceCache {
 public:
  TraceCache(std::filesystem::path data_dir, train::Cheat cheat);
  // Step STEP (1-based) of MEMBER, traced from the node's own evidence
  // (newest checkpoint before it, the step evidence, leaf STEP−1).
  Result<std::shared_ptr<const train::Trace>> get(const Member& member, int64_t step);
  StepOpsSource step_ops();  // valid while the cache lives

 private:
  struct Entry {
    std::string job_id;
    int stage = 0, replica = 0;
    int64_t step = 0;
    std::shared_ptr<const train::Trace> trace;
  };
  std::filesystem::path data_dir_;
  train::Cheat cheat_;
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

}  // namespace sn::verify
