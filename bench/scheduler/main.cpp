// bench_scheduler: naive, random best-of-100, DT-FM's genetic search, ours on
// DT-FM's cost (--objective dtfm) and ours on the simulated time (the default) on
// the five DT-FM topologies, 10 generated heterogeneous 64-device topologies,
// and ours alone on 256 and 1,000 devices. JSON on stdout, progress on stderr.
// Usage: bench_scheduler [--quick]   (--quick: 500 GA trials, 3 generated topologies)
// Costs are DT-FM's (DataPCost + 2·PipelinePCost, docs/scheduler.md) on GPT-3 XL
// (examples/models/gpt3-xl.toml, 8 stages × 8 replicas); predicted_iteration_s is
// the simulator's GPipe iteration of each plan as it would run (the GA's too:
// it optimises its own cost and is scored on the simulator).
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <random>

#include "sched/sched.h"

namespace {

using sn::LinkMatrix;
using sn::LinkSpec;
using sn::sched::Plan;
using sn::sched::PlanRequest;

// A DT-FM cost no placement can beat: DataPCost ≥ the (P·D)-th smallest per-device
// sum of its D−1 cheapest data-parallel edges; each of the P−1 stage links ≥ the
// 2D-th smallest per-device cheapest pipeline edge (2D distinct devices meet there).
double lower_bound(const LinkMatrix& m, const PlanRequest& r) {
  std::vector<double> dp_floor, pp_floor;
  for (int d = 0; d < m.n; ++d) {
    std::vector<double> dp, pp;
    for (int e = 0; e < m.n; ++e) {
      if (e == d) continue;
      const double alpha = m.at(d, e).latency_ms / 1e3, beta = m.at(d, e).bytes_per_second();
      dp.push_back(2 * (alpha + r.gradient_bytes / (r.replicas * beta)));
      pp.push_back(alpha + r.pipeline_bytes() / beta);
    }
    std::sort(dp.begin(), dp.end());
    double sum = 0;
    for (int k = 0; k < r.replicas - 1; ++k) sum += dp[k];
    dp_floor.push_back(sum);
    pp_floor.push_back(*std::min_element(pp.begin(), pp.end()));
  }
  std::sort(dp_floor.begin(), dp_floor.end());
  std::sort(pp_floor.begin(), pp_floor.end());
  const double dp_bound = dp_floor[r.stages * r.replicas - 1];
  const double pp_bound = r.stages > 1 ? (r.stages - 1) * pp_floor[std::min(m.n, 2 * r.replicas) - 1] : 0;
  return dp_bound + 2 * pp_bound;
}

// Devices scattered over SITES sites on a 1×1 map (≈ 10,000 km across); per-pair
// bandwidth uniform in 0.3–2 Gbps, latency 1 ms + 100 ms per map unit.
LinkMatrix generated(int devices, int sites, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0, 1), gbps(0.3, 2.0);
  std::vector<std::pair<double, double>> where(sites);
  for (auto& w : where) w = {unit(rng), unit(rng)};
  LinkMatrix m;
  m.n = devices;
  m.links.assign(static_cast<size_t>(devices) * devices, LinkSpec{});
  m.compute_tflops.assign(devices, 1.0);
  m.memory_gb.assign(devices, 16.0);
  for (int d = 0; d < devices; ++d) m.region_of.push_back(static_cast<int>(rng() % sites));
  for (int a = 0; a < devices; ++a)
    for (int b = a + 1; b < devices; ++b) {
      const auto [xa, ya] = where[m.region_of[a]];
      const auto [xb, yb] = where[m.region_of[b]];
      const LinkSpec link{1 + 100 * std::hypot(xa - xb, ya - yb), gbps(rng) * 1000};
      m.at(a, b) = m.at(b, a) = link;
    }
  return m;
}

nlohmann::json row(const std::string& algo, const Plan& p) {
  return {{"algo", algo},
          {"dtfm_cost_s", p.dtfm_cost_s},
          {"data_parallel_cost_s", p.data_parallel_cost_s},
          {"pipeline_cost_s", p.pipeline_cost_s},
          {"predicted_iteration_s", p.predicted_iteration_s},
          {"plan_wall_s", p.plan_wall_s}};
}

nlohmann::json compare(const std::string& name, const LinkMatrix& m, PlanRequest r, int ga_trials) {
  std::cerr << name << ":";
  nlohmann::json out = {{"topology", name}, {"devices", m.n}};
  r.search_trials = 100;
  Plan naive = sn::sched::make_plan(m, r, "naive", 1).value();
  Plan random = sn::sched::make_plan(m, r, "random", 1).value();
  std::cerr << " naive random" << std::flush;
  r.search_trials = ga_trials;
  Plan ga = sn::sched::make_plan(m, r, "dtfm", 1).value();
  std::cerr << " dtfm" << std::flush;
  r.objective = "dtfm";
  Plan ours_dtfm = sn::sched::make_plan(m, r, "ours", 1).value();
  std::cerr << " ours-dtfm" << std::flush;
  r.objective = "time";
  Plan ours = sn::sched::make_plan(m, r, "ours", 1).value();
  std::cerr << " ours\n";
  out["results"] = {row("naive", naive), row("random100", random), row("dtfm_ga", ga), row("ours_dtfm", ours_dtfm),
                    row("ours", ours)};
  out["lower_bound_s"] = lower_bound(m, r);
  // ours (objective time) against the GA on the simulated iteration; ours with
  // --objective dtfm against the GA on DT-FM's cost, the GA's own objective.
  out["ours_over_dtfm_ga_simulated"] = ours.predicted_iteration_s / ga.predicted_iteration_s;
  out["ours_dtfm_over_dtfm_ga_cost"] = ours_dtfm.dtfm_cost_s / ga.dtfm_cost_s;
  out["ours_over_dtfm_ga_cost"] = ours.dtfm_cost_s / ga.dtfm_cost_s;
  out["ours_wall_over_dtfm_ga_wall"] = ours.plan_wall_s / ga.plan_wall_s;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int ga_trials = quick ? 500 : 4900;
  nlohmann::json out;
  out["emulation"] = "raw (the scheduler's cost model; no links are emulated)";
  out["ga_trials"] = ga_trials;
  const std::string source = SOLVERNET_SOURCE_DIR;
  auto spec = sn::sched::read_plan_spec(source + "/examples/models/gpt3-xl.toml", 8, 8);
  if (!spec.ok()) {
    std::cerr << spec.message() << "\n";
    return 1;
  }
  for (int c = 1; c <= 5; ++c) {
    const std::string file = source + "/examples/topologies/dtfm-case" + std::to_string(c) + ".toml";
    auto topology = sn::parse_topology_file(file);
    if (!topology.ok()) {
      std::cerr << topology.message() << "\n";
      return 1;
    }
    auto result = compare("dtfm-case" + std::to_string(c), sn::to_link_matrix(*topology).value(), *spec, ga_trials);
    // scheduler.py's own figures (the issue; its GA timed on this 2-core machine).
    if (c == 4) result["scheduler_py"] = {{"naive_s", 39.24}, {"dtfm_ga_s", 34.80}, {"dtfm_ga_wall_s", 243}};
    if (c == 5) result["scheduler_py"] = {{"naive_s", 59.44}, {"dtfm_ga_s", 49.22}, {"dtfm_ga_wall_s", 192}};
    if (result.contains("scheduler_py")) {
      const double ours_wall = result["results"][4]["plan_wall_s"].get<double>();
      result["ours_wall_over_scheduler_py_wall"] = ours_wall / result["scheduler_py"]["dtfm_ga_wall_s"].get<double>();
    }
    out["dtfm_cases"].push_back(result);
  }
  // The targets, as ratios in this one run.
  double cases_max = 0, cost_max = 0, wall_64 = 0;
  for (const auto& c : out["dtfm_cases"]) cases_max = std::max(cases_max, c["ours_over_dtfm_ga_simulated"].get<double>());
  double ratio_sum = 0, ratio_max = 0;
  const int generated_count = quick ? 3 : 10;
  for (int g = 0; g < generated_count; ++g) {
    auto result = compare("generated64-" + std::to_string(g), generated(64, 12, 100 + g), *spec, ga_trials);
    ratio_sum += result["ours_over_dtfm_ga_simulated"].get<double>();
    ratio_max = std::max(ratio_max, result["ours_over_dtfm_ga_simulated"].get<double>());
    out["generated"].push_back(result);
  }
  for (const char* set : {"dtfm_cases", "generated"})
    for (const auto& c : out[set]) {
      cost_max = std::max(cost_max, c["ours_dtfm_over_dtfm_ga_cost"].get<double>());
      wall_64 = std::max(wall_64, c["results"][4]["plan_wall_s"].get<double>());
    }
  out["generated_mean_ours_over_dtfm_ga_simulated"] = ratio_sum / generated_count;
  out["generated_max_ours_over_dtfm_ga_simulated"] = ratio_max;
  out["dtfm_cases_max_ours_over_dtfm_ga_simulated"] = cases_max;
  out["max_ours_dtfm_over_dtfm_ga_cost"] = cost_max;
  out["max_ours_plan_wall_s_64"] = wall_64;
  double wall_1000 = 0;
  for (int devices : {256, 1000}) {
    std::cerr << "generated" << devices << ": ours\n";
    const LinkMatrix m = generated(devices, 12, devices);
    Plan ours = sn::sched::make_plan(m, *spec, "ours", 1).value();
    if (devices == 1000) wall_1000 = ours.plan_wall_s;
    out["large"].push_back({{"devices", devices}, {"ours", row("ours", ours)}, {"lower_bound_s", lower_bound(m, *spec)}});
  }
  const double eps = 1e-9;  // ratios of equal plans are 1 up to rounding
  out["targets_met"] = {
      {"generated_mean_simulated_le_0_9", ratio_sum / generated_count <= 0.9},
      {"generated_every_simulated_lt_1", ratio_max < 1},
      {"dtfm_cases_simulated_le_1", cases_max <= 1 + eps},
      {"objective_dtfm_cost_le_1", cost_max <= 1 + eps},
      {"plan_wall_64_lt_2s", wall_64 < 2},
      {"plan_wall_1000_lt_10s", wall_1000 < 10}};
  std::cout << out.dump(2) << std::endl;
  return 0;
}
