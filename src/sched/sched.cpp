#include "sched/sched.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <numeric>
#include <random>

#include "core/toml_reader.h"

namespace sn::sched {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

double alpha_s(const LinkMatrix& m, int a, int b) { return m.at(a, b).latency_ms / 1e3; }
double beta_bps(const LinkMatrix& m, int a, int b) { return m.at(a, b).bytes_per_second(); }

// DT-FM: max over d in C of Σ_{d'≠d} 2(α + c_dp/(D·β)).
double group_dp_cost(const LinkMatrix& m, const PlanRequest& r, const std::vector<int>& group) {
  double worst = 0;
  const double share = r.gradient_bytes / std::max(1, r.replicas);
  for (int d : group) {
    double sum = 0;
    for (int e : group)
      if (e != d) sum += 2 * (alpha_s(m, d, e) + share / beta_bps(m, d, e));
    worst = std::max(worst, sum);
  }
  return worst;
}

double pp_edge(const LinkMatrix& m, const PlanRequest& r, int a, int b) {
  return 2 * (alpha_s(m, a, b) + r.activation_bytes / beta_bps(m, a, b));
}

bool augment(int u, const std::vector<std::vector<char>>& ok, std::vector<int>& match_right,
             std::vector<char>& seen) {
  for (size_t v = 0; v < ok[u].size(); ++v) {
    if (!ok[u][v] || seen[v]) continue;
    seen[v] = 1;
    if (match_right[v] < 0 || augment(match_right[v], ok, match_right, seen)) {
      match_right[v] = u;
      return true;
    }
  }
  return false;
}

// Bottleneck perfect matching between groups A and B: the smallest threshold
// admitting a perfect matching. Returns the cost; PAIR_OF_A[i] = index into B.
double bottleneck_matching(const LinkMatrix& m, const PlanRequest& r, const std::vector<int>& a,
                           const std::vector<int>& b, std::vector<int>* pair_of_a) {
  const int n = static_cast<int>(a.size());
  std::vector<double> cost(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) cost[i * n + j] = pp_edge(m, r, a[i], b[j]);
  std::vector<double> sorted = cost;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  auto feasible = [&](double limit, std::vector<int>* out) {
    std::vector<std::vector<char>> ok(n, std::vector<char>(n));
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) ok[i][j] = cost[i * n + j] <= limit;
    std::vector<int> match_right(n, -1);
    for (int i = 0; i < n; ++i) {
      std::vector<char> seen(n, 0);
      if (!augment(i, ok, match_right, seen)) return false;
    }
    if (out) {
      out->assign(n, -1);
      for (int j = 0; j < n; ++j) (*out)[match_right[j]] = j;
    }
    return true;
  };
  // The bottleneck is at least the largest row minimum and column minimum.
  size_t lo = 0, hi = sorted.size() - 1;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (feasible(sorted[mid], nullptr)) hi = mid; else lo = mid + 1;
  }
  if (pair_of_a) feasible(sorted[lo], pair_of_a);
  return sorted[lo];
}

// Open-path TSP over a symmetric cost matrix: exact bitmask DP up to 13 nodes,
// otherwise nearest neighbour from every start plus 2-opt.
std::vector<int> open_path_tsp(const std::vector<std::vector<double>>& w, double* total) {
  const int n = static_cast<int>(w.size());
  if (n == 1) { *total = 0; return {0}; }
  if (n <= 13) {
    const int full = 1 << n;
    std::vector<double> best(static_cast<size_t>(full) * n, kInf);
    std::vector<int> parent(static_cast<size_t>(full) * n, -1);
    for (int i = 0; i < n; ++i) best[(1 << i) * n + i] = 0;
    for (int mask = 1; mask < full; ++mask)
      for (int last = 0; last < n; ++last) {
        double here = best[static_cast<size_t>(mask) * n + last];
        if (here == kInf) continue;
        for (int next = 0; next < n; ++next) {
          if (mask & (1 << next)) continue;
          size_t k = static_cast<size_t>(mask | (1 << next)) * n + next;
          if (here + w[last][next] < best[k]) { best[k] = here + w[last][next]; parent[k] = last; }
        }
      }
    int end = 0;
    for (int i = 1; i < n; ++i)
      if (best[static_cast<size_t>(full - 1) * n + i] < best[static_cast<size_t>(full - 1) * n + end]) end = i;
    *total = best[static_cast<size_t>(full - 1) * n + end];
    std::vector<int> path;
    int mask = full - 1, node = end;
    while (node >= 0) {
      path.push_back(node);
      int prev = parent[static_cast<size_t>(mask) * n + node];
      mask &= ~(1 << node);
      node = prev;
    }
    std::reverse(path.begin(), path.end());
    return path;
  }
  auto length = [&](const std::vector<int>& p) {
    double s = 0;
    for (int i = 0; i + 1 < n; ++i) s += w[p[i]][p[i + 1]];
    return s;
  };
  std::vector<int> best_path;
  double best_len = kInf;
  for (int start = 0; start < n; ++start) {
    std::vector<int> p{start};
    std::vector<char> used(n, 0);
    used[start] = 1;
    while (static_cast<int>(p.size()) < n) {
      int cur = p.back(), pick = -1;
      for (int j = 0; j < n; ++j)
        if (!used[j] && (pick < 0 || w[cur][j] < w[cur][pick])) pick = j;
      used[pick] = 1;
      p.push_back(pick);
    }
    for (bool improved = true; improved;) {
      improved = false;
      for (int i = 0; i < n - 1; ++i)
        for (int j = i + 1; j < n; ++j) {
          std::vector<int> q = p;
          std::reverse(q.begin() + i, q.begin() + j + 1);
          if (length(q) + 1e-12 < length(p)) { p = q; improved = true; }
        }
    }
    if (length(p) < best_len) { best_len = length(p); best_path = p; }
  }
  *total = best_len;
  return best_path;
}

// Cached scorer for local search: per-group DP costs and pairwise bottleneck costs.
struct Scorer {
  const LinkMatrix& m;
  const PlanRequest& r;
  Groups groups;
  std::vector<double> dp;
  std::vector<std::vector<double>> pp;

  Scorer(const LinkMatrix& links, const PlanRequest& req, Groups g) : m(links), r(req), groups(std::move(g)) {
    const int p = static_cast<int>(groups.size());
    dp.assign(p, 0);
    pp.assign(p, std::vector<double>(p, 0));
    for (int i = 0; i < p; ++i) refresh(i);
  }
  void refresh(int g) {
    dp[g] = group_dp_cost(m, r, groups[g]);
    for (size_t o = 0; o < groups.size(); ++o)
      if (static_cast<int>(o) != g)
        pp[g][o] = pp[o][g] = bottleneck_matching(m, r, groups[g], groups[o], nullptr);
  }
  double total() const {
    double path = 0;
    open_path_tsp(pp, &path);
    return *std::max_element(dp.begin(), dp.end()) + 2 * path;
  }
};

Groups naive_groups(const PlanRequest& r) {
  Groups g(r.stages);
  for (int s = 0; s < r.stages; ++s)
    for (int k = 0; k < r.replicas; ++k) g[s].push_back(s * r.replicas + k);
  return g;
}

Groups random_groups(int n, const PlanRequest& r, std::mt19937_64& rng) {
  std::vector<int> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  Groups g(r.stages);
  for (int s = 0; s < r.stages; ++s)
    for (int k = 0; k < r.replicas; ++k) g[s].push_back(ids[s * r.replicas + k]);
  return g;
}

// Best-improvement swaps of two devices in different groups (or a group device
// with a spare) until no swap lowers the cost.
double local_search(Scorer& sc, std::vector<int>& spares) {
  double current = sc.total();
  const int p = static_cast<int>(sc.groups.size());
  for (bool improved = true; improved;) {
    improved = false;
    for (int ga = 0; ga < p; ++ga)
      for (size_t ia = 0; ia < sc.groups[ga].size(); ++ia) {
        for (int gb = ga + 1; gb <= p; ++gb) {
          const size_t nb = gb < p ? sc.groups[gb].size() : spares.size();
          for (size_t ib = 0; ib < nb; ++ib) {
            int& x = sc.groups[ga][ia];
            int& y = gb < p ? sc.groups[gb][ib] : spares[ib];
            std::swap(x, y);
            auto saved_dp = sc.dp;
            auto saved_pp = sc.pp;
            sc.refresh(ga);
            if (gb < p) sc.refresh(gb);
            double cost = sc.total();
            if (cost + 1e-12 < current) {
              current = cost;
              improved = true;
            } else {
              std::swap(x, y);
              sc.dp = std::move(saved_dp);
              sc.pp = std::move(saved_pp);
            }
          }
        }
      }
  }
  return current;
}

std::vector<int> spares_of(int n, const Groups& g) {
  std::vector<char> used(n, 0);
  for (auto& grp : g)
    for (int d : grp) used[d] = 1;
  std::vector<int> s;
  for (int i = 0; i < n; ++i)
    if (!used[i]) s.push_back(i);
  return s;
}

// Clusters devices greedily: each group grows from the fastest remaining pair by
// adding the device with the cheapest links to those already in it.
Groups cluster_groups(const LinkMatrix& m, const PlanRequest& r, int seed_device) {
  std::vector<char> used(m.n, 0);
  Groups g;
  int start = seed_device;
  for (int s = 0; s < r.stages; ++s) {
    if (start < 0 || used[start]) {
      start = -1;
      for (int i = 0; i < m.n; ++i)
        if (!used[i]) { start = i; break; }
    }
    std::vector<int> grp{start};
    used[start] = 1;
    while (static_cast<int>(grp.size()) < r.replicas) {
      int pick = -1;
      double pick_cost = kInf;
      for (int i = 0; i < m.n; ++i) {
        if (used[i]) continue;
        double c = 0;
        for (int d : grp) c += alpha_s(m, i, d) + r.gradient_bytes / beta_bps(m, i, d);
        if (c < pick_cost) { pick_cost = c; pick = i; }
      }
      grp.push_back(pick);
      used[pick] = 1;
    }
    g.push_back(grp);
    start = -1;
  }
  return g;
}

Groups search_ours_on(const LinkMatrix& m, const PlanRequest& r, uint64_t seed);
Groups search_dtfm(const LinkMatrix& m, const PlanRequest& r, uint64_t seed);

// On a large network most devices are spares; searching swaps with all of them
// costs O(N) per slot. Keep a pool of 2·P·D devices with the cheapest links
// (each device's D−1 cheapest data-parallel edges plus its cheapest pipeline
// edge), search there, and map back.
Groups search_ours(const LinkMatrix& m, const PlanRequest& r, uint64_t seed) {
  const int pool_size = 2 * r.stages * r.replicas;
  if (m.n <= pool_size) return search_ours_on(m, r, seed);
  std::vector<std::pair<double, int>> score;
  for (int d = 0; d < m.n; ++d) {
    std::vector<double> dp;
    double pp = kInf;
    for (int e = 0; e < m.n; ++e) {
      if (e == d) continue;
      dp.push_back(2 * (alpha_s(m, d, e) + r.gradient_bytes / (r.replicas * beta_bps(m, d, e))));
      pp = std::min(pp, pp_edge(m, r, d, e));
    }
    const int keep = std::min<int>(r.replicas - 1, static_cast<int>(dp.size()));
    std::partial_sort(dp.begin(), dp.begin() + keep, dp.end());
    score.push_back({std::accumulate(dp.begin(), dp.begin() + keep, 0.0) + 2 * pp, d});
  }
  std::sort(score.begin(), score.end());
  std::vector<int> pool;
  for (int i = 0; i < pool_size; ++i) pool.push_back(score[i].second);
  LinkMatrix sub;
  sub.n = pool_size;
  sub.links.resize(static_cast<size_t>(pool_size) * pool_size);
  for (int a = 0; a < pool_size; ++a)
    for (int b = 0; b < pool_size; ++b) sub.at(a, b) = m.at(pool[a], pool[b]);
  Groups groups = search_ours_on(sub, r, seed);
  for (auto& g : groups)
    for (int& d : g) d = pool[d];
  return groups;
}

Groups search_ours_on(const LinkMatrix& m, const PlanRequest& r, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Groups> starts{naive_groups(r), cluster_groups(m, r, 0)};
  for (int k = 0; k < 2; ++k) starts.push_back(cluster_groups(m, r, static_cast<int>(rng() % m.n)));
  // The genetic search's best member as one more start: on structured networks
  // (DT-FM cases 3, 4) swaps alone stall where it does not, so ours never ends worse.
  starts.push_back(search_dtfm(m, r, seed));
  // Small instances are cheap to search, so give them more random restarts.
  const int random_starts = std::max(1, 64 / (r.stages * r.replicas));
  for (int k = 0; k < random_starts; ++k) starts.push_back(random_groups(m.n, r, rng));
  Groups best;
  double best_cost = kInf;
  for (auto& g : starts) {
    Scorer sc(m, r, g);
    auto spares = spares_of(m.n, g);
    double c = local_search(sc, spares);
    if (c < best_cost) { best_cost = c; best = sc.groups; }
  }
  return best;
}

// After DT-FM's heuristic evolutionary solver: a population of partitions;
// each trial crosses two parents (keep a random subset of one parent's groups,
// fill the rest in the other parent's device order), mutates by a random swap,
// and replaces the worst member when better.
Groups search_dtfm(const LinkMatrix& m, const PlanRequest& r, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int population_size = 100;
  std::vector<Groups> population;
  std::vector<double> costs;
  for (int i = 0; i < population_size; ++i) {
    population.push_back(random_groups(m.n, r, rng));
    costs.push_back(Scorer(m, r, population.back()).total());
  }
  for (int trial = 0; trial < r.search_trials; ++trial) {
    const Groups& a = population[rng() % population_size];
    const Groups& b = population[rng() % population_size];
    Groups child;
    std::vector<char> used(m.n, 0);
    for (auto& grp : a)
      if (rng() % 2) {
        child.push_back(grp);
        for (int d : grp) used[d] = 1;
      }
    std::vector<int> rest;
    for (auto& grp : b)
      for (int d : grp)
        if (!used[d]) rest.push_back(d);
    for (int d : spares_of(m.n, b))
      if (!used[d]) rest.push_back(d);
    size_t next = 0;
    while (static_cast<int>(child.size()) < r.stages) {
      std::vector<int> grp(rest.begin() + next, rest.begin() + next + r.replicas);
      next += r.replicas;
      child.push_back(grp);
    }
    if (r.stages > 1) {
      int ga = rng() % r.stages, gb = rng() % r.stages;
      if (ga != gb) std::swap(child[ga][rng() % r.replicas], child[gb][rng() % r.replicas]);
    }
    double c = Scorer(m, r, child).total();
    size_t worst = std::max_element(costs.begin(), costs.end()) - costs.begin();
    if (c < costs[worst]) { population[worst] = child; costs[worst] = c; }
  }
  return population[std::min_element(costs.begin(), costs.end()) - costs.begin()];
}

}  // namespace

Plan evaluate_groups(const LinkMatrix& m, const PlanRequest& r, const Groups& groups) {
  Scorer sc(m, r, groups);
  double path_cost = 0;
  std::vector<int> order = open_path_tsp(sc.pp, &path_cost);
  Plan plan;
  plan.data_parallel_cost_s = *std::max_element(sc.dp.begin(), sc.dp.end());
  plan.pipeline_cost_s = path_cost;
  plan.dtfm_cost_s = plan.data_parallel_cost_s + 2 * path_cost;
  // Replica k of stage s+1 is the partner of replica k of stage s.
  plan.stage_devices.push_back(groups[order[0]]);
  for (size_t s = 1; s < order.size(); ++s) {
    const auto& prev = plan.stage_devices.back();
    std::vector<int> pair;
    bottleneck_matching(m, r, prev, groups[order[s]], &pair);
    std::vector<int> next(prev.size());
    for (size_t k = 0; k < prev.size(); ++k) next[k] = groups[order[s]][pair[k]];
    plan.stage_devices.push_back(next);
  }
  return plan;
}

void simulate(const LinkMatrix& m, const PlanRequest& r, Plan& plan) {
  const int p = r.stages, d = r.replicas, mb = r.micro_batches;
  const double fwd = r.compute_seconds_per_microbatch_stage / 3, bwd = 2 * fwd;
  double worst_link = -1;
  auto note_link = [&](int a, int b) {
    double t = m.at(a, b).transfer_seconds(r.activation_bytes);
    if (t > worst_link) {
      worst_link = t;
      plan.slowest_link = fmt::format("device {} -> device {} ({:.3g} ms, {:.4g} Mbps)", a, b,
                                      m.at(a, b).latency_ms, m.at(a, b).bandwidth_mbps);
    }
  };
  std::vector<double> stage_done(p, 0);  // when every replica's backward is over, per stage
  for (int k = 0; k < d; ++k) {
    // GPipe: all forwards, then all backwards; each device and each directed link
    // serves one thing at a time, in micro-batch order.
    std::vector<double> device_free(p, 0), link_free(p, 0);
    std::vector<std::vector<double>> ready(p, std::vector<double>(mb, 0));
    for (int s = 0; s < p; ++s)
      for (int i = 0; i < mb; ++i) {
        double start = std::max(device_free[s], ready[s][i]);
        device_free[s] = start + fwd;
        if (s + 1 < p) {
          int a = plan.stage_devices[s][k], b = plan.stage_devices[s + 1][k];
          note_link(a, b);
          double send = std::max(device_free[s], link_free[s]);
          link_free[s] = send + r.activation_bytes / m.at(a, b).bytes_per_second();
          ready[s + 1][i] = link_free[s] + m.at(a, b).latency_ms / 1e3;
        }
      }
    std::vector<double> back_link_free(p, 0);
    std::vector<std::vector<double>> grad_ready(p, std::vector<double>(mb, 0));
    for (int i = 0; i < mb; ++i) grad_ready[p - 1][i] = device_free[p - 1];
    for (int s = p - 1; s >= 0; --s)
      for (int i = 0; i < mb; ++i) {
        double start = std::max(device_free[s], grad_ready[s][i]);
        device_free[s] = start + bwd;
        if (s > 0) {
          int a = plan.stage_devices[s][k], b = plan.stage_devices[s - 1][k];
          double send = std::max(device_free[s], back_link_free[s]);
          back_link_free[s] = send + r.activation_bytes / m.at(a, b).bytes_per_second();
          grad_ready[s - 1][i] = back_link_free[s] + m.at(a, b).latency_ms / 1e3;
        }
      }
    for (int s = 0; s < p; ++s) stage_done[s] = std::max(stage_done[s], device_free[s]);
  }
  double pipeline_end = *std::max_element(stage_done.begin(), stage_done.end());
  // Ring all-reduce per stage over its replicas in replica order: 2(D-1) steps,
  // each moving gradient_bytes/D over the ring's slowest hop.
  double iteration = 0;
  double worst_allreduce = 0;
  for (int s = 0; s < p; ++s) {
    double allreduce = 0;
    if (d > 1) {
      double step = 0;
      for (int k = 0; k < d; ++k)
        step = std::max(step, m.at(plan.stage_devices[s][k], plan.stage_devices[s][(k + 1) % d])
                                  .transfer_seconds(r.gradient_bytes / d));
      allreduce = 2 * (d - 1) * step;
    }
    worst_allreduce = std::max(worst_allreduce, allreduce);
    iteration = std::max(iteration, stage_done[s] + allreduce);
  }
  plan.predicted_iteration_s = iteration;
  plan.compute_s = (mb + p - 1) * (fwd + bwd);
  plan.pipeline_s = std::max(0.0, pipeline_end - plan.compute_s);
  plan.data_parallel_s = iteration - pipeline_end;
  (void)worst_allreduce;
}

Result<Plan> make_plan(const LinkMatrix& links, const PlanRequest& request, const std::string& algo,
                       uint64_t seed) {
  if (request.stages < 1 || request.replicas < 1 || request.micro_batches < 1)
    return input_error("stages, replicas and micro-batches must be >= 1");
  if (static_cast<int64_t>(request.stages) * request.replicas > links.n)
    return input_error("{} stages x {} replicas need {} devices, the topology has {}", request.stages,
                       request.replicas, request.stages * request.replicas, links.n);
  for (int a = 0; a < links.n; ++a)
    for (int b = 0; b < links.n; ++b)
      if (a != b && !(links.at(a, b).bandwidth_mbps > 0))
        return input_error("link {} -> {} has no positive bandwidth", a, b);
  const auto began = std::chrono::steady_clock::now();
  Groups groups;
  if (algo == "naive") {
    groups = naive_groups(request);
  } else if (algo == "random") {
    std::mt19937_64 rng(seed);
    double best = kInf;
    for (int i = 0; i < std::max(1, request.search_trials); ++i) {
      Groups g = random_groups(links.n, request, rng);
      double c = Scorer(links, request, g).total();
      if (c < best) { best = c; groups = g; }
    }
  } else if (algo == "ours") {
    groups = search_ours(links, request, seed);
  } else if (algo == "dtfm") {
    groups = search_dtfm(links, request, seed);
  } else {
    return input_error("unknown --algo '{}' (ours, dtfm, random, naive)", algo);
  }
  Plan plan = evaluate_groups(links, request, groups);
  plan.plan_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  simulate(links, request, plan);
  return plan;
}

PlanRequest request_from_job(const JobConfig& job, double compute_seconds_per_microbatch_stage) {
  PlanRequest r;
  r.stages = static_cast<int>(job.parallel.stages);
  r.replicas = static_cast<int>(job.parallel.replicas);
  r.micro_batches = static_cast<int>(job.parallel.micro_batches);
  r.schedule = job.parallel.schedule;
  r.activation_bytes = static_cast<double>(job.sequences_per_micro_batch()) * job.model.seq_len *
                       job.model.d_model * 4.0;
  const double layers_per_stage = static_cast<double>(job.model.layers) / std::max<int64_t>(1, job.parallel.stages);
  r.gradient_bytes = layers_per_stage * static_cast<double>(job.model.layer_parameter_count()) * 4.0;
  r.compute_seconds_per_microbatch_stage = compute_seconds_per_microbatch_stage;
  r.search_trials = 100;
  return r;
}

Result<PlanRequest> read_plan_spec(const std::filesystem::path& path, int stages, int replicas) {
  SN_ASSIGN(TomlFile file, TomlFile::parse_file(path));
  TomlTable root = file.root();
  TomlTable model_table = root.table("model");
  ModelConfig model = read_model_table(model_table);
  TomlTable w = root.table("workload");
  PlanRequest r;
  r.stages = stages;
  r.replicas = replicas;
  const double parameters = w.number("parameters", static_cast<double>(model.parameter_count()), 1, 1e15);
  const double sequences = w.number("sequences_per_micro_batch", 1, 1e-9, 1e9);
  const double activation_element_bytes = w.number("activation_element_bytes", 4, 0.01, 64);
  const double gradient_element_bytes = w.number("gradient_element_bytes", 4, 0.01, 64);
  const double activation_compression = w.number("activation_compression", 1, 1, 1e6);
  const double gradient_compression = w.number("gradient_compression", 1, 1, 1e6);
  r.micro_batches = static_cast<int>(w.integer("micro_batches", 1, 1, 1 << 20));
  const double device_tflops = w.number("device_tflops", 100, 1e-9, 1e9);
  r.search_trials = static_cast<int>(w.integer("search_trials", 4900, 1, 1 << 24));
  r.activation_bytes = w.number("activation_bytes_per_micro_batch",
                                sequences * static_cast<double>(model.seq_len * model.d_model) *
                                    activation_element_bytes, 1, 1e15) / activation_compression;
  r.gradient_bytes = w.number("gradient_bytes_per_stage", parameters * gradient_element_bytes / std::max(1, stages),
                              1, 1e15) / gradient_compression;
  // Forward + backward ≈ 6 FLOPs per parameter per token.
  const double flops = 6 * parameters / std::max(1, stages) * sequences * static_cast<double>(model.seq_len);
  r.compute_seconds_per_microbatch_stage =
      w.number("compute_seconds_per_microbatch_stage", flops / (device_tflops * 1e12), 0, 1e9);
  w.reject_unknown_keys();
  root.reject_unknown_keys();
  SN_TRY(file.status());
  return r;
}

}  // namespace sn::sched
