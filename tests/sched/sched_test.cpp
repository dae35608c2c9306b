// Scheduler: the DT-FM cost checked on paper, our search against exhaustive
// enumeration, the simulator against closed-form GPipe, and `solvernet plan`
// rejecting bad input with `file:line:` and exit code 2.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <tuple>

#include "sched/sched.h"

namespace sn::sched {
namespace {

LinkMatrix uniform_matrix(int n, double latency_ms, double bandwidth_mbps) {
  LinkMatrix m;
  m.n = n;
  m.links.assign(static_cast<size_t>(n) * n, LinkSpec{latency_ms, bandwidth_mbps});
  m.compute_tflops.assign(n, 1.0);
  m.memory_gb.assign(n, 16.0);
  m.region_of.assign(n, 0);
  return m;
}

void set_link(LinkMatrix& m, int a, int b, double latency_ms, double bandwidth_mbps) {
  m.at(a, b) = m.at(b, a) = LinkSpec{latency_ms, bandwidth_mbps};
}

LinkMatrix random_matrix(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> latency(1, 100), bandwidth(300, 2000);
  LinkMatrix m = uniform_matrix(n, 0, 1);
  for (int a = 0; a < n; ++a)
    for (int b = a + 1; b < n; ++b) set_link(m, a, b, latency(rng), bandwidth(rng));
  return m;
}

// Four devices, 2 stages x 2 replicas, 1 ms everywhere, c_dp = c_pp = 1e9 bytes.
// Bandwidths (bytes/s): 0-1 and 2-3 at 1e9, 0-2 and 1-3 at 5e8, 0-3 and 1-2 at 1e8.
// DT-FM's cost: DP = max_d Σ 2(α + c_dp/(D·β)), a stage link α + c_pp/β, score DP + 2·PP.
// On paper:
//   groups {0,1},{2,3}: DP = 2(0.001 + 1e9/(2·1e9)) = 1.002; stage link pairs 0-2, 1-3:
//     0.001 + 1e9/5e8 = 2.001; cost = 1.002 + 2·2.001 = 5.004.
//   groups {0,2},{1,3}: DP = 2(0.001 + 1e9/(2·5e8)) = 2.002; pairs 0-1, 2-3:
//     0.001 + 1 = 1.001; cost = 2.002 + 2·1.001 = 4.004 (the optimum).
//   groups {0,3},{1,2}: DP = 2(0.001 + 5) = 10.002; pairs 0-1, 3-2: 1.001; cost 12.004.
LinkMatrix paper_matrix() {
  LinkMatrix m = uniform_matrix(4, 1, 8000);
  set_link(m, 0, 2, 1, 4000);
  set_link(m, 1, 3, 1, 4000);
  set_link(m, 0, 3, 1, 800);
  set_link(m, 1, 2, 1, 800);
  return m;
}

PlanRequest request(int stages, int replicas, double bytes) {
  PlanRequest r;
  r.stages = stages;
  r.replicas = replicas;
  r.activation_bytes = bytes;
  r.gradient_bytes = bytes;
  r.compute_seconds_per_microbatch_stage = 0.3;
  r.micro_batches = 4;
  r.search_trials = 200;
  return r;
}

TEST(DtfmCost, FourDevicesAsOnPaper) {
  const LinkMatrix m = paper_matrix();
  const PlanRequest r = request(2, 2, 1e9);
  Plan naive = make_plan(m, r, "naive", 1).value();
  EXPECT_NEAR(naive.data_parallel_cost_s, 1.002, 1e-9);
  EXPECT_NEAR(naive.pipeline_cost_s, 2.001, 1e-9);
  EXPECT_NEAR(naive.dtfm_cost_s, 5.004, 1e-9);
  // Replica k of stage 1 is device k's partner on the fast link (0-2, 1-3).
  const std::vector<std::vector<int>> either_order_a{{0, 1}, {2, 3}}, either_order_b{{2, 3}, {0, 1}};
  EXPECT_TRUE(naive.stage_devices == either_order_a || naive.stage_devices == either_order_b);

  PlanRequest on_cost = r;
  on_cost.objective = "dtfm";
  Plan ours = make_plan(m, on_cost, "ours", 1).value();
  EXPECT_NEAR(ours.dtfm_cost_s, 4.004, 1e-9);
  EXPECT_NEAR(evaluate_groups(m, r, {{0, 3}, {1, 2}}).dtfm_cost_s, 10.002 + 2 * 1.001, 1e-9);
}

// The best DT-FM cost over every placement: each permutation's first P·D devices
// cut into consecutive groups (covers every partition and every choice of spares).
double exhaustive_optimum(const LinkMatrix& m, const PlanRequest& r) {
  std::vector<int> ids(m.n);
  std::iota(ids.begin(), ids.end(), 0);
  double best = 1e300;
  do {
    Groups g(r.stages);
    for (int s = 0; s < r.stages; ++s)
      for (int k = 0; k < r.replicas; ++k) g[s].push_back(ids[s * r.replicas + k]);
    // Only canonical forms (sorted inside groups, groups sorted) to save time.
    bool canonical = true;
    for (auto& grp : g) canonical = canonical && std::is_sorted(grp.begin(), grp.end());
    for (int s = 0; s + 1 < r.stages; ++s) canonical = canonical && g[s][0] < g[s + 1][0];
    if (canonical) best = std::min(best, evaluate_groups(m, r, g).dtfm_cost_s);
  } while (std::next_permutation(ids.begin(), ids.end()));
  return best;
}

TEST(OurSearch, FindsTheExhaustiveOptimumOnSmallInstances) {
  for (uint64_t topo = 1; topo <= 5; ++topo) {
    const LinkMatrix m = random_matrix(8, topo);
    for (auto [stages, replicas] : {std::pair{2, 4}, std::pair{3, 2}}) {
      PlanRequest r = request(stages, replicas, 2e8);
      r.objective = "dtfm";
      const double optimum = exhaustive_optimum(m, r);
      Plan ours = make_plan(m, r, "ours", 7).value();
      EXPECT_NEAR(ours.dtfm_cost_s, optimum, 1e-9 * optimum)
          << "topology seed " << topo << ", " << stages << " x " << replicas;
      Plan naive = make_plan(m, r, "naive", 7).value();
      EXPECT_GE(naive.dtfm_cost_s, optimum - 1e-9);
    }
  }
}

// The best simulated iteration over every placement: each permutation's first
// P·D devices read as a [stage][replica] grid (every order, pairing and choice of
// spares; the simulator's ring runs in replica order, so rotations differ only
// in name and are all visited).
double exhaustive_simulated_optimum(const LinkMatrix& m, const PlanRequest& r) {
  std::vector<int> ids(m.n);
  std::iota(ids.begin(), ids.end(), 0);
  double best = 1e300;
  Plan plan;
  plan.stage_devices.assign(r.stages, std::vector<int>(r.replicas));
  do {
    for (int s = 0; s < r.stages; ++s)
      for (int k = 0; k < r.replicas; ++k) plan.stage_devices[s][k] = ids[s * r.replicas + k];
    simulate(m, r, plan);
    best = std::min(best, plan.predicted_iteration_s);
  } while (std::next_permutation(ids.begin(), ids.end()));
  return best;
}

TEST(OurSearch, FindsTheExhaustiveSimulatedOptimumOnSmallInstances) {
  for (uint64_t topo = 1; topo <= 3; ++topo) {
    const LinkMatrix m = random_matrix(8, topo);
    for (auto [stages, replicas] : {std::pair{2, 4}, std::pair{3, 2}}) {
      PlanRequest r = request(stages, replicas, 2e8);
      r.tied_bytes = 5e7;
      r.schedule = topo == 2 ? "1f1b" : "gpipe";
      const double optimum = exhaustive_simulated_optimum(m, r);
      Plan ours = make_plan(m, r, "ours", 7).value();
      EXPECT_NEAR(ours.predicted_iteration_s, optimum, 1e-9 * optimum)
          << "topology seed " << topo << ", " << stages << " x " << replicas;
    }
  }
}

// Devices at 12 sites on a 1 × 1 map: per-pair bandwidth 0.3–2 Gbps, latency
// 1 ms + 100 ms per map unit (the generator of bench_scheduler).
LinkMatrix sites_matrix(int n, int sites, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0, 1), gbps(0.3, 2.0);
  std::vector<std::pair<double, double>> where(sites);
  for (auto& w : where) w = {unit(rng), unit(rng)};
  LinkMatrix m = uniform_matrix(n, 0, 1);
  for (int d = 0; d < n; ++d) m.region_of[d] = static_cast<int>(rng() % sites);
  for (int a = 0; a < n; ++a)
    for (int b = a + 1; b < n; ++b) {
      const auto [xa, ya] = where[m.region_of[a]];
      const auto [xb, yb] = where[m.region_of[b]];
      set_link(m, a, b, 1 + 100 * std::hypot(xa - xb, ya - yb), gbps(rng) * 1000);
    }
  return m;
}

// GPT-3 XL's traffic as examples/models/gpt3-xl.toml pins it, 8 × 8 on 64 devices.
PlanRequest gpt3_xl() {
  PlanRequest r;
  r.stages = 8;
  r.replicas = 8;
  r.activation_bytes = 0.471e9;
  r.gradient_bytes = 0.65e9;
  r.compute_seconds_per_microbatch_stage = 3.25;
  r.micro_batches = 2;
  r.search_trials = 4900;  // the GA as DT-FM runs it
  return r;
}

// The issue's comparison on one generated heterogeneous topology: the GA keeps
// its own objective and is scored on the simulator. Ours on time is faster there;
// ours on DT-FM's cost still beats the GA on that cost; on time it is never
// slower than its own DT-FM-cost plan, which is where it starts.
TEST(OurSearch, TimeObjectiveBeatsTheGeneticSearchOnSimulatedTime) {
  const LinkMatrix m = sites_matrix(64, 12, 100);
  PlanRequest r = gpt3_xl();
  Plan ga = make_plan(m, r, "dtfm", 1).value();
  Plan time = make_plan(m, r, "ours", 1).value();
  r.objective = "dtfm";
  Plan cost = make_plan(m, r, "ours", 1).value();
  EXPECT_LT(time.predicted_iteration_s, ga.predicted_iteration_s);
  EXPECT_LE(time.predicted_iteration_s, cost.predicted_iteration_s);
  EXPECT_LE(cost.dtfm_cost_s, ga.dtfm_cost_s);
  // The plan reports DT-FM's cost of the partition it returns.
  Groups rows = time.stage_devices;
  EXPECT_NEAR(evaluate_groups(m, r, rows).dtfm_cost_s, time.dtfm_cost_s, 1e-9 * time.dtfm_cost_s);
  // Every slot a distinct device.
  std::vector<int> used;
  for (const auto& row : time.stage_devices) used.insert(used.end(), row.begin(), row.end());
  std::sort(used.begin(), used.end());
  EXPECT_EQ(std::adjacent_find(used.begin(), used.end()), used.end());
  EXPECT_EQ(used.size(), 64u);
}

// One stage, one replica, spares or none: every slot holds a distinct device of
// the topology and the plan simulates to what simulate() says of it.
TEST(OurSearch, DegenerateShapesGiveValidPlans) {
  for (auto [n, stages, replicas] : {std::tuple{1, 1, 1}, std::tuple{3, 1, 2}, std::tuple{3, 3, 1},
                                     std::tuple{5, 1, 1}, std::tuple{9, 2, 3}}) {
    const LinkMatrix m = random_matrix(n, 11);
    PlanRequest r = request(stages, replicas, 2e8);
    r.tied_bytes = 1e7;
    Plan plan = make_plan(m, r, "ours", 3).value();
    ASSERT_EQ(plan.stage_devices.size(), static_cast<size_t>(stages));
    std::vector<int> used;
    for (const auto& row : plan.stage_devices) {
      ASSERT_EQ(row.size(), static_cast<size_t>(replicas));
      used.insert(used.end(), row.begin(), row.end());
    }
    std::sort(used.begin(), used.end());
    EXPECT_EQ(std::adjacent_find(used.begin(), used.end()), used.end());
    EXPECT_GE(used.front(), 0);
    EXPECT_LT(used.back(), n);
    Plan again = plan;
    simulate(m, r, again);
    EXPECT_DOUBLE_EQ(again.predicted_iteration_s, plan.predicted_iteration_s);
  }
}

TEST(MakePlan, RejectsAnUnknownObjective) {
  PlanRequest r = request(2, 2, 1e6);
  r.objective = "fastest";
  auto plan = make_plan(uniform_matrix(4, 1, 1000), r, "ours", 1);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.error().exit_code, 2);
  EXPECT_NE(plan.message().find("objective"), std::string::npos) << plan.message();
}

TEST(OurSearch, DeterministicForASeed) {
  const LinkMatrix m = random_matrix(16, 3);
  PlanRequest r = request(4, 3, 2e8);
  Plan a = make_plan(m, r, "ours", 5).value();
  Plan b = make_plan(m, r, "ours", 5).value();
  EXPECT_EQ(a.stage_devices, b.stage_devices);
  r.objective = "dtfm";
  Plan c = make_plan(m, r, "ours", 5).value();
  Plan d = make_plan(m, r, "ours", 5).value();
  EXPECT_EQ(c.stage_devices, d.stage_devices);
  Plan g1 = make_plan(m, r, "dtfm", 5).value();
  Plan g2 = make_plan(m, r, "dtfm", 5).value();
  EXPECT_EQ(g1.stage_devices, g2.stage_devices);
}

TEST(Simulator, MatchesClosedFormGpipeOnUniformLinks) {
  // One replica (no data parallel), P stages, M micro-batches, forward f and
  // backward b per micro-batch per stage, every hop t = bytes/β + α with
  // bytes/β ≤ min(f, b): T = (M + P − 1)(f + b) + 2(P − 1)t.
  for (int stages : {2, 4, 6})
    for (int micro_batches : {1, 3, 8}) {
      const LinkMatrix m = uniform_matrix(stages, 20, 800);  // 1e8 B/s, 20 ms
      PlanRequest r = request(stages, 1, 1e6);               // 10 ms serialization
      r.micro_batches = micro_batches;
      r.compute_seconds_per_microbatch_stage = 0.9;          // f = 0.3, b = 0.6
      Plan plan = make_plan(m, r, "naive", 1).value();
      const double hop = 1e6 / 1e8 + 0.020;
      const double expected = (micro_batches + stages - 1) * 0.9 + 2 * (stages - 1) * hop;
      EXPECT_NEAR(plan.predicted_iteration_s, expected, 1e-9) << stages << " stages, " << micro_batches;
      EXPECT_NEAR(plan.data_parallel_s, 0, 1e-12);
    }
}

TEST(Simulator, OneFOneBEqualsGpipeWithoutCommunication) {
  // Equal stages, free links: both orders take (M + P − 1)(f + b).
  for (int stages : {2, 3, 5})
    for (int micro_batches : {1, 4, 9}) {
      const LinkMatrix m = uniform_matrix(stages, 0, 1e12);
      PlanRequest r = request(stages, 1, 1);
      r.micro_batches = micro_batches;
      r.compute_seconds_per_microbatch_stage = 0.9;
      r.schedule = "1f1b";
      Plan one = make_plan(m, r, "naive", 1).value();
      r.schedule = "gpipe";
      Plan gpipe = make_plan(m, r, "naive", 1).value();
      const double expected = (micro_batches + stages - 1) * 0.9;
      EXPECT_NEAR(one.predicted_iteration_s, expected, 1e-6) << stages << " stages, " << micro_batches;
      EXPECT_NEAR(gpipe.predicted_iteration_s, expected, 1e-6) << stages << " stages, " << micro_batches;
    }
}

TEST(Simulator, OneFOneBByHandWithLatency) {
  // P = 2, M = 3, f = 1, b = 2, every hop 0.5 s of latency (bytes negligible).
  // 1F1B, stage 0: F0 F1 B0 F2 B1 B2; stage 1: F0 B0 F1 B1 F2 B2.
  //   s0 F0 [0,1] F1 [1,2]            s1 F0 [1.5,2.5] B0 [2.5,4.5] -> s0 at 5
  //   s0 B0 [5,7] F2 [7,8] -> s1 8.5  s1 F1 [4.5,5.5] B1 [5.5,7.5] -> s0 at 8
  //   s0 B1 [8,10]                    s1 F2 [8.5,9.5] B2 [9.5,11.5] -> s0 at 12
  //   s0 B2 [12,14]: 14 s, where GPipe takes (3 + 1)·3 + 2·0.5 = 13 s.
  const LinkMatrix m = uniform_matrix(2, 500, 1e12);
  PlanRequest r = request(2, 1, 1);
  r.micro_batches = 3;
  r.compute_seconds_per_microbatch_stage = 3;
  r.schedule = "1f1b";
  EXPECT_NEAR(make_plan(m, r, "naive", 1).value().predicted_iteration_s, 14, 1e-6);
  r.schedule = "gpipe";
  EXPECT_NEAR(make_plan(m, r, "naive", 1).value().predicted_iteration_s, 13, 1e-6);
  r.schedule = "interleaved";
  EXPECT_FALSE(make_plan(m, r, "naive", 1).ok());
}

TEST(Simulator, TiedEmbeddingSwapAfterTheLastBackward) {
  // P = 2, one replica, one micro-batch, f = 0.3, b = 0.6, hops 20 ms + 1e6 B at 1e8 B/s:
  // s0 F [0, 0.3] -> s1 at 0.33, F [0.33, 0.63], B [0.63, 1.23] -> s0 at 1.26, B [1.26, 1.86];
  // then stages 0 and 1 swap 2e6 bytes of embedding gradient: 0.02 + 0.02 s.
  const LinkMatrix m = uniform_matrix(2, 20, 800);
  PlanRequest r = request(2, 1, 1e6);
  r.micro_batches = 1;
  r.compute_seconds_per_microbatch_stage = 0.9;
  EXPECT_NEAR(make_plan(m, r, "naive", 1).value().predicted_iteration_s, 1.86, 1e-9);
  r.tied_bytes = 2e6;
  r.step_overhead_s = 0.5;
  const Plan plan = make_plan(m, r, "naive", 1).value();
  EXPECT_NEAR(plan.predicted_iteration_s, 1.90 + 0.5, 1e-9);
  EXPECT_NEAR(plan.data_parallel_s, 0.04, 1e-9);
  EXPECT_NEAR(plan.overhead_s, 0.5, 1e-12);
}

TEST(Simulator, HostMessageCostAddsToEveryHopAndAllReduceChunk) {
  // The GPipe closed form with each hop also paying the hosts' own cost
  // (fixed 5 ms + 1e6 B × 1e-8 s/B = 15 ms); then D = 2 replicas reduce 4e6 B of
  // gradients: 2(D − 1) = 2 ring steps of 2e6 B, each 2e6/1e8 + 20 ms on the link
  // plus, cut into 1e6-byte messages, 2 × 5 ms + 2e6 × 1e-8 s on the hosts.
  const LinkMatrix m = uniform_matrix(4, 20, 800);
  PlanRequest r = request(2, 2, 1e6);
  r.micro_batches = 3;
  r.compute_seconds_per_microbatch_stage = 0.9;
  r.gradient_bytes = 4e6;
  r.message_fixed_s = 0.005;
  r.message_per_byte_s = 1e-8;
  r.max_message_bytes = 1e6;
  const Plan plan = make_plan(m, r, "naive", 1).value();
  const double hop = 1e6 / 1e8 + 0.020 + 0.015;
  const double ring_step = 2e6 / 1e8 + 0.020 + 2 * 0.005 + 2e6 * 1e-8;
  EXPECT_NEAR(plan.predicted_iteration_s, (3 + 2 - 1) * 0.9 + 2 * hop + 2 * ring_step, 1e-9);
  EXPECT_NEAR(plan.data_parallel_s, 2 * ring_step, 1e-9);
}

TEST(Simulator, OneHostIterationTakesAtLeastItsCpuOverTheFreeCores) {
  // P = 2, D = 2, 3 micro-batches of 0.1 s per stage, an update of 0.05 s:
  // 4 × (3 × 0.1 + 0.05) = 1.4 s of compute. Messages (1 ms + 1e-9 s/B, both
  // ends): 2 × 1 × 3 hops each way of 1e6 B, 2 × 2 × 2 ring pieces of 2e6 B
  // cut into 1e6-byte messages, 2 × 2 tied swaps of 5e5 B and 2 × 4 RunStep
  // requests and replies.
  PlanRequest r = request(2, 2, 1e6);
  r.micro_batches = 3;
  r.compute_seconds_per_microbatch_stage = 0.1;
  r.gradient_bytes = 4e6;
  r.tied_bytes = 5e5;
  r.max_message_bytes = 1e6;
  const double fixed = 1e-3, per_byte = 1e-9;
  const double messages = 12 * (fixed + 1e6 * per_byte) + 8 * (2 * fixed + 2e6 * per_byte) +
                          4 * (fixed + 5e5 * per_byte) + 8 * fixed;
  const double cpu = iteration_cpu_seconds(r, 0.05, fixed, per_byte);
  EXPECT_NEAR(cpu, 1.4 + messages, 1e-12);
  EXPECT_NEAR(iteration_cpu_seconds(r, 0.05, 0, 0), 1.4, 1e-12);

  // On fast links the pipeline alone is far shorter than the CPU over one
  // free core: the floor decides; with no floor the simulated time stands.
  const LinkMatrix m = uniform_matrix(4, 0.01, 1e5);
  Plan alone = make_plan(m, r, "naive", 1).value();
  ASSERT_LT(alone.predicted_iteration_s, cpu);
  r.host_cpu_floor_s = cpu / 1.0;
  Plan shared = make_plan(m, r, "naive", 1).value();
  EXPECT_DOUBLE_EQ(shared.predicted_iteration_s, cpu);
  r.host_cpu_floor_s = alone.predicted_iteration_s / 2;
  EXPECT_DOUBLE_EQ(make_plan(m, r, "naive", 1).value().predicted_iteration_s, alone.predicted_iteration_s);
}

TEST(Simulator, TimeSharingBoundsBracketTheStepAndMeetWhenOneSideDominates) {
  // Dedicated cores: a 0.04 s iteration whose path computes 0.02 s, plus a
  // 0.005 s update; 0.12 s of CPU over 2 cores is a 0.06 s floor.
  Plan dedicated;
  dedicated.predicted_iteration_s = 0.04;
  dedicated.compute_s = 0.02;
  const auto cpu_bound = time_shared_iteration(dedicated, 0.06, 0.005, 2);
  EXPECT_DOUBLE_EQ(cpu_bound.lower_s, 0.06);                   // the floor
  EXPECT_NEAR(cpu_bound.upper_s, 0.06 + 0.04 - 0.025 / 2, 1e-12);  // the path's waits for a core on top
  EXPECT_GT(cpu_bound.expected_s(), cpu_bound.lower_s);
  EXPECT_LT(cpu_bound.expected_s(), cpu_bound.upper_s);

  // A path held up by slow links (0.8 s) barely shares a core: the bounds
  // differ by at most the floor.
  dedicated.predicted_iteration_s = 0.8;
  const auto link_bound = time_shared_iteration(dedicated, 0.06, 0.005, 2);
  EXPECT_DOUBLE_EQ(link_bound.lower_s, 0.8);
  EXPECT_LE(link_bound.upper_s - link_bound.lower_s, 0.06);
  EXPECT_GE(link_bound.upper_s, link_bound.lower_s);
}

JobConfig tiny_job(const std::string& compression) {
  const std::string text = R"([model]
layers = 4
d_model = 64
heads = 4
d_ff = 256
vocab = 512
seq_len = 64

[parallel]
stages = 2
replicas = 4
micro_batches = 2

[train]
global_batch = 16

[compression]
)" + compression;
  return parse_job_string(text, "job.toml").value();
}

TEST(RequestFromJob, CountsTheBytesTheCodecsPutOnTheWire) {
  // 16 sequences / (4 replicas × 2 micro-batches) = 2 per micro-batch:
  // n = 2 × 64 × 64 = 8192 activations in rows of 64 (docs/compression.md).
  const JobConfig plain = tiny_job("");
  // The largest stage's gradients: stage 0's two blocks, token and position embeddings.
  const double stage_params = 2.0 * static_cast<double>(plain.model.layer_parameter_count()) + 512 * 64 + 64 * 64;
  PlanRequest r = request_from_job(plain, 0.1);
  EXPECT_DOUBLE_EQ(r.activation_bytes, 4 * 8192.0);
  EXPECT_DOUBLE_EQ(r.backward_bytes(), 4 * 8192.0);
  EXPECT_DOUBLE_EQ(r.gradient_bytes, 4 * stage_params);
  EXPECT_DOUBLE_EQ(r.tied_bytes, 4 * 512 * 64.0);  // the embedding's gradient, vocab × d_model

  r = request_from_job(tiny_job("activations = \"fp16\"\ngradients = \"fp16\"\n"), 0.1);
  EXPECT_DOUBLE_EQ(r.activation_bytes, 2 * 8192.0);
  // An all-gather of 2-byte messages: (D − 1)·2n per replica = a ring over D·2n/2.
  EXPECT_DOUBLE_EQ(r.gradient_bytes, 4 * 2 * stage_params / 2);

  // quant 4 / 8 bits: 1 + 2·ceil(8192/64) + 8192·b/8.
  r = request_from_job(tiny_job("activations = \"quant\"\nforward_bits = 4\nbackward_bits = 8\n"), 0.1);
  EXPECT_DOUBLE_EQ(r.activation_bytes, 1 + 256 + 4096);
  EXPECT_DOUBLE_EQ(r.backward_bytes(), 1 + 256 + 8192);
  EXPECT_DOUBLE_EQ(r.pipeline_bytes(), (4353.0 + 8449.0) / 2);

  // AQ-SGD in steady state, B = 2 samples of 4096: 1 + 9B + B(2·64 + 4096·4/8); backward quant.
  r = request_from_job(tiny_job("activations = \"aqsgd\"\nforward_bits = 4\nbackward_bits = 8\n"), 0.1);
  EXPECT_DOUBLE_EQ(r.activation_bytes, 1 + 18 + 2 * (128 + 2048));
  EXPECT_DOUBLE_EQ(r.backward_bytes(), 1 + 256 + 8192);

  // CocktailSGD: M = round(0.1·numel) coordinates, K = round(0.2·M) sent at 4 bits:
  // 17 + ceil(M/8) + 2·ceil(K/128) + ceil(K·4/8); then the ring equivalent D·message/2.
  r = request_from_job(tiny_job("gradients = \"cocktail\"\nrandom_fraction = 0.1\ntopk_fraction = 0.2\n"
                                "gradient_bits = 4\n"), 0.1);
  const double subset = std::round(0.1 * stage_params), kept = std::round(0.2 * subset);
  const double message = 17 + std::ceil(subset / 8) + 2 * std::ceil(kept / 128) + std::ceil(kept * 4 / 8);
  EXPECT_DOUBLE_EQ(r.gradient_bytes, 4 * message / 2);
  EXPECT_LT(r.gradient_bytes, plain.model.layer_parameter_count() * 2 * 4 / 20.0);

  // Every value of the subset sent: no bitmap.
  r = request_from_job(tiny_job("gradients = \"cocktail\"\nrandom_fraction = 0.1\ntopk_fraction = 1\n"
                                "gradient_bits = 4\n"), 0.1);
  EXPECT_DOUBLE_EQ(r.gradient_bytes, 4 * (17 + 2 * std::ceil(subset / 128) + std::ceil(subset * 4 / 8)) / 2);
}

TEST(MakePlan, RejectsMoreSlotsThanDevices) {
  auto plan = make_plan(uniform_matrix(4, 1, 1000), request(3, 2, 1e6), "ours", 1);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.error().exit_code, 2);
}

struct CliRun {
  int exit_code;
  std::string err;
};

CliRun run_plan(const std::string& topology_text, const std::string& flags) {
  const char* bin = std::getenv("SOLVERNET_BIN");
  const char* source = std::getenv("SOLVERNET_SOURCE_DIR");
  if (!bin || !source) return {-1, "SOLVERNET_BIN / SOLVERNET_SOURCE_DIR not set"};
  const auto dir = std::filesystem::temp_directory_path() / ("sn-sched-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "topo.toml") << topology_text;
  const std::string cmd = std::string(bin) + " plan --topology " + (dir / "topo.toml").string() + " --model " +
                          source + "/examples/models/gpt3-xl.toml " + flags + " >/dev/null 2>" +
                          (dir / "err.txt").string();
  const int status = std::system(cmd.c_str());
  std::stringstream err;
  err << std::ifstream(dir / "err.txt").rdbuf();
  std::filesystem::remove_all(dir);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, err.str()};
}

const char* kTwoRegions = R"([[region]]
name = "a"
nodes = 4
latency_ms = 1
bandwidth_mbps = 1000

[[region]]
name = "b"
nodes = 4
latency_ms = 1
bandwidth_mbps = BW
)";

std::string two_regions(const std::string& inside_b, bool with_link) {
  std::string text = kTwoRegions;
  text.replace(text.find("BW"), 2, inside_b);
  if (with_link) text += "\n[[link]]\nfrom = \"a\"\nto = \"b\"\nlatency_ms = 30\nbandwidth_mbps = 500\n";
  return text;
}

TEST(PlanCommand, BadTopologiesFailWithFileLineAndExitTwo) {
  CliRun good = run_plan(two_regions("1000", true), "--stages 2 --replicas 4");
  EXPECT_EQ(good.exit_code, 0) << good.err;

  CliRun missing = run_plan(two_regions("1000", false), "--stages 2 --replicas 4");
  EXPECT_EQ(missing.exit_code, 2) << missing.err;
  EXPECT_NE(missing.err.find("topo.toml:"), std::string::npos) << missing.err;

  CliRun negative = run_plan(two_regions("-5", true), "--stages 2 --replicas 4");
  EXPECT_EQ(negative.exit_code, 2) << negative.err;
  EXPECT_NE(negative.err.find("topo.toml:11:"), std::string::npos) << negative.err;

  CliRun on_cost = run_plan(two_regions("1000", true), "--stages 2 --replicas 4 --objective dtfm");
  EXPECT_EQ(on_cost.exit_code, 0) << on_cost.err;
  CliRun bad_objective = run_plan(two_regions("1000", true), "--stages 2 --replicas 4 --objective fastest");
  EXPECT_EQ(bad_objective.exit_code, 2) << bad_objective.err;
  EXPECT_NE(bad_objective.err.find("--objective"), std::string::npos) << bad_objective.err;

  CliRun too_many = run_plan(two_regions("1000", true), "--stages 3 --replicas 3");
  EXPECT_EQ(too_many.exit_code, 2) << too_many.err;
  EXPECT_NE(too_many.err.find("topo.toml:1:"), std::string::npos) << too_many.err;
}

}  // namespace
}  // namespace sn::sched
