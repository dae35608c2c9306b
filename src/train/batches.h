// Which samples each replica and micro-batch get at a step: shared by the
// distributed client and the single-process run so both see the same data.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/job.h"
#include "model/data.h"

namespace sn::train {

struct MicroBatchData {
  std::vector<int64_t> sample_ids;
  torch::Tensor tokens;   // i64 [b, seq_len]
  torch::Tensor targets;  // i64 [b, seq_len]
};

// [replica][micro] for optimizer step STEP (training split).
std::vector<std::vector<MicroBatchData>> step_batches(const JobConfig& job, const model::Dataset& data,
                                                      int64_t step);
// The same samples as a job of SAMPLE_SHARDS replicas draws at STEP, split
// over JOB's replicas instead: a job re-planned on fewer replicas trains on
// the global batches it was planned with (docs/resilience.md).
std::vector<std::vector<MicroBatchData>> step_batches(const JobConfig& job, const model::Dataset& data,
                                                      int64_t step, int64_t sample_shards);
// [replica][micro] for held-out batch INDEX; empty if the held-out split is too small.
std::vector<std::vector<MicroBatchData>> holdout_batches(const JobConfig& job, const model::Dataset& data,
                                                         int64_t index);
// How many held-out batches of the global batch size exist (capped at WANTED).
int64_t holdout_batch_count(const JobConfig& job, const model::Dataset& data, int64_t wanted);
// Why holdout_batch_count is 0: the summary's holdout_loss_missing.
std::string no_holdout_batches_reason(const JobConfig& job, const model::Dataset& data, int64_t wanted);

}  // namespace sn::train
