// train's privacy hooks, implemented: DP-SGD's per-stage clipping bound and
// seeded noise, and secure aggregation in place of the ring all-reduce.
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "privacy/privacy.h"

namespace sn::privacy {
namespace {

class Hooks final : public train::PrivacyHooks {
 public:
  Hooks(train::PrivacyContext context, double sigma) : context_(std::move(context)), sigma_(sigma) {
    const auto& p = context_.job->privacy;
    if (p.dp) clip_ = stage_clip_norm(p.clip_norm, context_.stages);
  }

  double sequence_clip_norm() const override { return clip_; }

  void add_noise(torch::Tensor flat, int64_t, uint64_t seed) override {
    if (!context_.job->privacy.dp || sigma_ <= 0) return;
    // The optimizer takes the mean over the global batch, so the sum's noise
    // σ·C becomes σ·C / B; each of the D replicas adds 1/√D of its variance.
    const auto& job = *context_.job;
    const double std_dev = sigma_ * job.privacy.clip_norm / static_cast<double>(job.train.global_batch) /
                           std::sqrt(static_cast<double>(context_.replicas));
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    torch::NoGradGuard no_grad;
    int64_t offset = 0;
    for (const auto& [name, count] : context_.layout) {
      // The tied embedding's gradient is summed between the first and the
      // last stage afterwards: the first stage alone adds its noise.
      const bool tied_copy = name == "wte.weight" && context_.stages > 1 && context_.stage == context_.stages - 1;
      if (!tied_copy) {
        auto slice = flat.slice(0, offset, offset + count);
        slice.add_(torch::randn({count}, generator, torch::kFloat32) * std_dev);
      }
      offset += count;
    }
  }

  bool aggregates() const override { return context_.job->privacy.secure_aggregation && context_.replicas > 1; }

  Status reduce(torch::Tensor flat, int64_t step) override {
    if (!context_.transport || !context_.key)
      return make_error("secure aggregation cannot run without the network (an offline replay)");
    SecureAllreduceOptions options;
    options.context = fmt::format("{}/stage{}", context_.job_id, context_.stage);
    options.threshold = static_cast<int>(context_.job->privacy.threshold);
    options.range = context_.job->privacy.fixed_point_range;
    options.timeout = context_.timeout;
    options.chunk_bytes = context_.job->parallel.allreduce_chunk_bytes;
    SecureAllreduce collective(*context_.transport, context_.ring, context_.ring_keys, *context_.key, options);
    return collective.run(std::span<float>(flat.data_ptr<float>(), static_cast<size_t>(flat.numel())), step);
  }

 private:
  train::PrivacyContext context_;
  double sigma_ = 0;
  double clip_ = 0;
};

}  // namespace

double stage_clip_norm(double clip_norm, int64_t stages) {
  return stages <= 1 ? clip_norm : clip_norm / std::sqrt(static_cast<double>(stages + 2));
}

Result<DpPlan> plan_dp(const JobConfig& job, int64_t train_sequences) {
  const auto& p = job.privacy;
  if (!p.dp) return input_error("the job does not ask for differential privacy ([privacy] dp = true)");
  if (train_sequences < job.train.global_batch)
    return input_error("DP: the batch ({} sequences) exceeds the training set ({})", job.train.global_batch,
                       train_sequences);
  DpPlan plan;
  plan.sample_rate = static_cast<double>(job.train.global_batch) / static_cast<double>(train_sequences);
  plan.steps = job.train.steps;
  plan.delta = p.delta;
  if (p.noise_multiplier > 0) {
    plan.noise_multiplier = p.noise_multiplier;
  } else {
    auto sigma = noise_for_epsilon(p.target_epsilon, plan.sample_rate, plan.steps, p.delta);
    if (!sigma.ok()) return input_error("privacy.target_epsilon: {}", sigma.message());
    plan.noise_multiplier = *sigma;
  }
  SN_ASSIGN(auto spent, epsilon_spent(plan.noise_multiplier, plan.sample_rate, plan.steps, plan.delta));
  plan.epsilon = spent.epsilon;
  return plan;
}

Result<std::unique_ptr<train::PrivacyHooks>> make_hooks(const train::PrivacyContext& context) {
  if (!context.job) return make_error("privacy hooks without a job");
  const auto& job = *context.job;
  double sigma = 0;
  if (job.privacy.dp) {
    // The node resolves σ exactly as the client does, from the same inputs.
    const int64_t sequences = context.train_sequences;
    SN_ASSIGN(auto plan, plan_dp(job, sequences));
    sigma = plan.noise_multiplier;
  }
  if (job.privacy.secure_aggregation && context.replicas > 1) {
    SecAggParams check{"check", context.replicas, static_cast<int>(job.privacy.threshold), 1,
                       job.privacy.fixed_point_range};
    SN_TRY(check_params(check));
    if (static_cast<int>(context.ring_keys.size()) != context.replicas)
      return make_error("secure aggregation: {} replica keys for {} replicas", context.ring_keys.size(),
                        context.replicas);
  }
  return std::unique_ptr<train::PrivacyHooks>(new Hooks(context, sigma));
}

void install() { train::install_privacy(make_hooks); }

}  // namespace sn::privacy
