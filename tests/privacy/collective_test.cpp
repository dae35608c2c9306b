// Secure aggregation as a collective over the real transport: members are
// JobTransports with their own gRPC servers on 127.0.0.1 (net::LocalMesh),
// each running SecureAllreduce on its own thread, as stage workers do.
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "model/gpt.h"
#include "net/local_mesh.h"
#include "privacy/privacy.h"

namespace sn::privacy {
namespace {

using namespace std::chrono_literals;

struct Mesh {
  std::unique_ptr<net::LocalMesh> mesh;
  std::vector<PublicKey> keys;
  explicit Mesh(int n) {
    std::vector<std::string> regions(static_cast<size_t>(n), "r");
    auto created = net::LocalMesh::create(regions, nullptr);
    EXPECT_TRUE(created.ok()) << created.message();
    mesh = std::move(*created);
    for (int i = 0; i < n; ++i) keys.push_back(mesh->key(static_cast<size_t>(i)).public_key());
  }
};

std::vector<std::vector<float>> gradients(int n, int64_t length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0, 0.02f);
  std::vector<std::vector<float>> out(static_cast<size_t>(n), std::vector<float>(static_cast<size_t>(length)));
  for (auto& v : out)
    for (auto& x : v) x = normal(rng);
  return out;
}

// The exact fixed-point sum of WHO's vectors, dequantized.
std::vector<float> fixed_point_sum(const std::vector<std::vector<float>>& grads, const std::vector<int>& who,
                                   int replicas, double range) {
  const double scale = fixed_point_scale(replicas, range);
  std::vector<uint32_t> sum(grads[0].size(), 0);
  for (int u : who) {
    auto q = quantize(grads[static_cast<size_t>(u)], scale, range);
    for (size_t k = 0; k < sum.size(); ++k) sum[k] += q[k];
  }
  return dequantize(sum, scale);
}

// Runs member I's collective on BUFFERS[I]; STOP[I] makes it quit after that round.
std::vector<Status> run_all(Mesh& m, std::vector<std::vector<float>>& buffers, const std::vector<int>& stop,
                            std::chrono::milliseconds timeout, int64_t chunk_bytes = 1 << 20) {
  const int n = static_cast<int>(buffers.size());
  std::vector<int> ring(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) ring[static_cast<size_t>(i)] = i;
  std::vector<Status> results(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      SecureAllreduceOptions options;
      options.context = "mesh/stage0";
      options.timeout = timeout;
      options.chunk_bytes = chunk_bytes;
      options.stop_after_round = stop[static_cast<size_t>(i)];
      SecureAllreduce collective(m.mesh->member(static_cast<size_t>(i)), ring, m.keys,
                                 m.mesh->key(static_cast<size_t>(i)), options);
      results[static_cast<size_t>(i)] = collective.run(buffers[static_cast<size_t>(i)], 5);
    });
  for (auto& t : threads) t.join();
  return results;
}

TEST(SecureAllreduce, TwoReplicasGetTheExactFixedPointSumBitwiseEqual) {
  Mesh m(2);
  const int64_t n = 50000;  // several chunks of 64 KiB
  auto grads = gradients(2, n, 3);
  auto buffers = grads;
  auto results = run_all(m, buffers, {0, 0}, 10s, 64 << 10);
  for (auto& r : results) ASSERT_TRUE(r.ok()) << r.message();
  const auto expected = fixed_point_sum(grads, {0, 1}, 2, 4.0);
  EXPECT_EQ(buffers[0], expected);
  EXPECT_EQ(buffers[1], expected);
}

// D = 4, t = 3: replica 3 sends its masked vector and dies (its server
// stopped) before revealing: the three others still get the exact sum of all
// four, and agree bitwise.
TEST(SecureAllreduce, FourReplicasSurviveOneKilledAfterSending) {
  Mesh m(4);
  const int64_t n = 4096;
  auto grads = gradients(4, n, 5);
  auto buffers = grads;
  std::vector<int> ring{0, 1, 2, 3};
  std::vector<Status> results(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      SecureAllreduceOptions options;
      options.context = "mesh/stage0";
      options.timeout = 3s;
      options.stop_after_round = i == 3 ? 3 : 0;
      SecureAllreduce collective(m.mesh->member(i), ring, m.keys, m.mesh->key(i), options);
      results[i] = collective.run(buffers[i], 7);
      if (i == 3) {
        ASSERT_TRUE(m.mesh->member(3).flush(5s).ok());  // its vector is out
        m.mesh->kill(3);
      }
    });
  for (auto& t : threads) t.join();
  const auto expected = fixed_point_sum(grads, {0, 1, 2, 3}, 4, 4.0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(results[i].ok()) << i << ": " << results[i].message();
    EXPECT_EQ(buffers[i], expected) << "replica " << i;
  }
}

// D = 4, t = 3: two replicas gone before sending their vectors: every
// survivor aborts the step cleanly (kind aborted, naming the shortfall).
TEST(SecureAllreduce, FourReplicasAbortWhenTwoDrop) {
  Mesh m(4);
  const int64_t n = 1000;
  auto grads = gradients(4, n, 9);
  auto buffers = grads;
  auto results = run_all(m, buffers, {0, 0, 2, 2}, 2s);
  for (int i = 0; i < 2; ++i) {
    ASSERT_FALSE(results[i].ok());
    EXPECT_EQ(results[i].error().kind, ErrorKind::aborted) << results[i].message();
    EXPECT_NE(results[i].message().find("3 needed"), std::string::npos) << results[i].message();
  }
}

// ---- DP hooks ------------------------------------------------------------

JobConfig dp_job(int64_t stages, int64_t replicas) {
  JobConfig job;
  job.parallel.stages = stages;
  job.parallel.replicas = replicas;
  job.train.global_batch = 8;
  job.train.steps = 100;
  job.privacy.enabled = true;
  job.privacy.dp = true;
  job.privacy.clip_norm = 2.0;
  job.privacy.noise_multiplier = 1.5;
  return job;
}

// Each replica adds N(0, (σC/B)²/D) per coordinate, from its seed alone; the
// sample variance of 200k draws is within 3% (about 7 standard errors) of it.
TEST(DpHooks, NoiseHasTheRightScaleAndIsSeeded) {
  JobConfig job = dp_job(2, 2);
  train::PrivacyContext context;
  context.job = &job;
  context.stages = 2;
  context.stage = 0;
  context.replicas = 2;
  context.train_sequences = 1000;
  context.layout = {{"h.0.weight", 200000}};
  auto hooks = make_hooks(context);
  ASSERT_TRUE(hooks.ok()) << hooks.message();
  EXPECT_DOUBLE_EQ((*hooks)->sequence_clip_norm(), 2.0 / 2.0);  // C / sqrt(P + 2), P = 2
  torch::Tensor a = torch::zeros({200000});
  (*hooks)->add_noise(a, 0, 42);
  const double expected = std::pow(1.5 * 2.0 / 8.0, 2) / 2.0;
  const double variance = a.var().item<double>();
  EXPECT_NEAR(variance / expected, 1.0, 0.03) << variance << " vs " << expected;
  EXPECT_NEAR(a.mean().item<double>(), 0.0, 5 * std::sqrt(expected / 200000));
  torch::Tensor b = torch::zeros({200000});
  (*hooks)->add_noise(b, 0, 42);
  EXPECT_TRUE(torch::equal(a, b));  // a replay adds the same noise
  torch::Tensor c = torch::zeros({200000});
  (*hooks)->add_noise(c, 0, 43);
  EXPECT_FALSE(torch::equal(a, c));
}

// The last stage leaves the tied embedding's noise to the first stage (the
// two sides' gradients are summed afterwards).
TEST(DpHooks, TiedEmbeddingNoisedOnce) {
  JobConfig job = dp_job(2, 1);
  train::PrivacyContext context;
  context.job = &job;
  context.stages = 2;
  context.stage = 1;
  context.replicas = 1;
  context.train_sequences = 1000;
  context.layout = {{"h.1.weight", 100}, {"wte.weight", 100}};
  auto hooks = make_hooks(context);
  ASSERT_TRUE(hooks.ok());
  torch::Tensor flat = torch::zeros({200});
  (*hooks)->add_noise(flat, 0, 1);
  EXPECT_GT(flat.slice(0, 0, 100).abs().sum().item<double>(), 0);
  EXPECT_EQ(flat.slice(0, 100, 200).abs().sum().item<double>(), 0);
}

TEST(DpHooks, TargetEpsilonResolvesToNoiseThatMeetsIt) {
  JobConfig job = dp_job(1, 1);
  job.privacy.noise_multiplier = 0;
  job.privacy.target_epsilon = 3.0;
  auto plan = plan_dp(job, 1000);
  ASSERT_TRUE(plan.ok()) << plan.message();
  EXPECT_DOUBLE_EQ(plan->sample_rate, 8.0 / 1000);
  EXPECT_LE(plan->epsilon, 3.0);
  EXPECT_GT(plan->epsilon, 2.9);
  job.privacy.target_epsilon = 0.01;
  auto unreachable = plan_dp(job, 1000);
  ASSERT_FALSE(unreachable.ok());
  EXPECT_EQ(unreachable.error().kind, ErrorKind::invalid_input);
}

// Per-sequence clipping on a real stage (a middle stage of a GPT: hidden in,
// hidden out): sequence 3's output gradient is 10^4 times the others', an
// outlier. Clipped, its contribution to the sum (the sum with it minus the
// sum without it) has norm ≤ the bound, while unclipped it dominates.
TEST(DpClipping, BoundsAnOutlierSequencesContribution) {
  ModelConfig config;
  config.layers = 3;
  config.d_model = 16;
  config.heads = 2;
  config.d_ff = 32;
  config.vocab = 32;
  config.seq_len = 8;
  model::StageModel stage(config, 1, 1, 3);
  auto parameters = stage.named_parameters();
  auto generator = at::detail::createCPUGenerator(11);
  const int64_t batch = 4;
  torch::Tensor input = torch::randn({batch, config.seq_len, config.d_model}, generator);
  torch::Tensor grad = torch::randn({batch, config.seq_len, config.d_model}, generator);
  torch::Tensor outlier_grad = grad.clone();
  outlier_grad[3].mul_(1e4);
  auto sum_with = [&](const torch::Tensor& g, int64_t sequences, double bound) {
    torch::Tensor output = stage.forward(input.slice(0, 0, sequences));
    return train::sum_clipped_sequence_gradients(parameters, sequences, bound, [&](int64_t b, bool keep) {
      torch::autograd::backward({output.slice(0, b, b + 1)}, {g.slice(0, b, b + 1)}, keep);
    });
  };
  const double bound = 0.5;
  torch::Tensor without = sum_with(grad, 3, bound);
  torch::Tensor with = sum_with(outlier_grad, 4, bound);
  const double contribution = (with - without).norm().item<double>();
  EXPECT_LE(contribution, bound * (1 + 1e-5));
  EXPECT_GT(contribution, 0.5 * bound);  // it was clipped to the bound, not dropped
  // Each of the four sequences contributes at most the bound.
  EXPECT_LE(with.norm().item<double>(), 4 * bound * (1 + 1e-5));
  // Unclipped (an infinite bound) the outlier dominates the sum.
  torch::Tensor raw_without = sum_with(grad, 3, INFINITY);
  torch::Tensor raw_with = sum_with(outlier_grad, 4, INFINITY);
  EXPECT_GT((raw_with - raw_without).norm().item<double>(), 1000 * bound);
}

}  // namespace
}  // namespace sn::privacy
