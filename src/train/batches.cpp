#include "train/batches.h"

#include <fmt/format.h>

namespace sn::train {

static std::vector<std::vector<MicroBatchData>> split(const JobConfig& job, const model::Dataset& data,
                                                      const std::vector<int64_t>& ids, bool holdout) {
  const int64_t replicas = job.parallel.replicas, micros = job.parallel.micro_batches;
  const int64_t per_micro = job.sequences_per_micro_batch();
  std::vector<std::vector<MicroBatchData>> out(static_cast<size_t>(replicas));
  for (int64_t r = 0; r < replicas; ++r)
    for (int64_t m = 0; m < micros; ++m) {
      MicroBatchData mb;
      auto begin = ids.begin() + (r * micros + m) * per_micro;
      mb.sample_ids.assign(begin, begin + per_micro);
      auto [tokens, targets] = data.batch(mb.sample_ids, holdout);
      mb.tokens = tokens;
      mb.targets = targets;
      out[static_cast<size_t>(r)].push_back(std::move(mb));
    }
  return out;
}

std::vector<std::vector<MicroBatchData>> step_batches(const JobConfig& job, const model::Dataset& data,
                                                      int64_t step) {
  return step_batches(job, data, step, job.parallel.replicas);
}

std::vector<std::vector<MicroBatchData>> step_batches(const JobConfig& job, const model::Dataset& data,
                                                      int64_t step, int64_t sample_shards) {
  return split(job, data, data.samples_for_step(step, job.train.global_batch, job.train.seed, sample_shards), false);
}

int64_t holdout_batch_count(const JobConfig& job, const model::Dataset& data, int64_t wanted) {
  return std::min(wanted, data.holdout_samples() / job.train.global_batch);
}

std::string no_holdout_batches_reason(const JobConfig& job, const model::Dataset& data, int64_t wanted) {
  if (wanted <= 0) return "no held-out evaluation was asked for";
  return fmt::format("the held-out split ({} sequences) is smaller than one global batch ({})", data.holdout_samples(),
                     job.train.global_batch);
}

std::vector<std::vector<MicroBatchData>> holdout_batches(const JobConfig& job, const model::Dataset& data,
                                                         int64_t index) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < job.train.global_batch; ++i) ids.push_back(index * job.train.global_batch + i);
  return split(job, data, ids, true);
}

}  // namespace sn::train
