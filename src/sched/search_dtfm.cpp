// The DT-FM baseline: a re-implementation of the genetic search in DT-FM's
// scheduler.py (DS3Lab/DT-FM, scheduler/heuristic_evolutionary_solver), which
// follows GCMA (a genetic algorithm with cyclic multi-way partitioning, a
// Kernighan–Lin-style local search). Written from its description in
// docs/scheduler.md; the same steps, seeded.
#include <algorithm>
#include <numeric>

#include "sched/internal.h"

namespace sn::sched::detail {
namespace {

// A placement as DT-FM codes it: part[device] = group index, P = spare.
using PartString = std::vector<int>;

struct Layout {
  int n, groups, spare;     // spare = the index of the spare "group" (= groups)
  std::vector<int> capacity;  // per group index, spare last
};

PartString string_of(const Layout& l, const std::vector<int>& order) {
  PartString s(l.n);
  for (int i = 0; i < l.n; ++i) s[order[i]] = std::min(i / l.capacity[0], l.spare);
  return s;
}

std::vector<int> order_of(const Layout& l, const PartString& s) {
  std::vector<int> order;
  for (int g = 0; g <= l.spare; ++g)
    for (int d = 0; d < l.n; ++d)
      if (s[d] == g) order.push_back(d);
  return order;
}

Groups groups_of(const Layout& l, const std::vector<int>& order) {
  Groups g(l.groups);
  for (int i = 0; i < l.groups * l.capacity[0]; ++i) g[i / l.capacity[0]].push_back(order[i]);
  return g;
}

// Five devices take parent 1's group; then groups over capacity hand devices
// (in device order) to the first group under capacity.
PartString five_point_crossover(const Layout& l, const PartString& p1, const PartString& p2, std::mt19937_64& rng) {
  PartString child = p2;
  std::vector<int> points(l.n);
  std::iota(points.begin(), points.end(), 0);
  std::shuffle(points.begin(), points.end(), rng);
  for (int i = 0; i < std::min(5, l.n); ++i) child[points[i]] = p1[points[i]];
  std::vector<int> size(l.spare + 1, 0);
  for (int g : child) ++size[g];
  for (int d = 0; d < l.n; ++d) {
    if (size[child[d]] <= l.capacity[child[d]]) continue;
    for (int g = 0; g <= l.spare; ++g)
      if (size[g] < l.capacity[g]) {
        --size[child[d]];
        ++size[g];
        child[d] = g;
        break;
      }
  }
  return child;
}

// GCMA's gain table: for an unlocked device v in group p, gain[v][p] is its
// cheapest pipeline edge inside p, and gain[v][q] (q ≠ p) its mean pipeline
// edge to q. Each group offers the unlocked device with the smallest
// gain[v][p]; its best move is to the q maximizing gain[v][q] − gain[v][p].
struct Gains {
  std::vector<double> g_i;                 // per group: that best move's gain (−inf: none)
  std::vector<std::vector<double>> g_ij;   // per group pair: the gain of moving it there
  std::vector<std::pair<int, int>> trace;  // per group: (device, target) or (−1, −1)
};

Gains calculate_gains(const EdgeCosts& c, const Layout& l, const PartString& s, const std::vector<char>& locked) {
  const int w = l.groups;
  std::vector<int> size(w, 0);
  for (int g : s)
    if (g < w) ++size[g];
  std::vector<double> gain(static_cast<size_t>(l.n) * w, 0);
  for (int v = 0; v < l.n; ++v) {
    if (locked[v] || s[v] >= w) continue;
    double* row = &gain[static_cast<size_t>(v) * w];
    row[s[v]] = kInf;
    for (int t = 0; t < l.n; ++t) {
      if (s[t] >= w) continue;
      const double e = c.pp_at(v, t);
      if (s[t] != s[v]) row[s[t]] += e / size[s[t]];
      else if (t != v) row[s[v]] = std::min(row[s[v]], e);
    }
  }
  Gains out;
  out.g_i.assign(w, -kInf);
  out.g_ij.assign(w, std::vector<double>(w, -kInf));
  out.trace.assign(w, {-1, -1});
  std::vector<double> own(w, kInf);
  for (int v = 0; v < l.n; ++v) {
    if (locked[v] || s[v] >= w) continue;
    const double g = gain[static_cast<size_t>(v) * w + s[v]];
    if (g < own[s[v]]) { own[s[v]] = g; out.trace[s[v]].first = v; }
  }
  for (int p = 0; p < w; ++p) {
    const int v = out.trace[p].first;
    if (v < 0) continue;
    for (int q = 0; q < w; ++q) {
      if (q == p) continue;
      const double g = gain[static_cast<size_t>(v) * w + q] - gain[static_cast<size_t>(v) * w + p];
      out.g_ij[p][q] = std::max(out.g_ij[p][q], g);
      if (g > out.g_i[p]) { out.g_i[p] = g; out.trace[p].second = q; }
    }
  }
  return out;
}

// Up to one cycle per group: starting at the group with the best gain, move its
// offered device to its target, lock it, continue from the target until the
// cycle returns; keep the prefix of the cycle with the best total gain (the
// last kept device closes the cycle back to the start). Then keep the prefix of
// cycles with the best total gain.
PartString cyclic_partitioning(const EdgeCosts& c, const Layout& l, const PartString& start) {
  const int w = l.groups;
  std::vector<char> locked(l.n, 0), group_locked(w, 0);
  std::vector<PartString> states{start};
  std::vector<double> cycle_gain{0};
  for (int cycle = 0; cycle < w; ++cycle) {
    PartString cur = states.back();
    struct Move { int v, from, to; };
    std::vector<Move> moves;
    std::vector<double> epsilon, tau;
    Gains gains = calculate_gains(c, l, cur, locked);
    const int s0 = static_cast<int>(std::max_element(gains.g_i.begin(), gains.g_i.end()) - gains.g_i.begin());
    int si = s0;
    for (int step = 0; step < l.n; ++step) {
      auto [v, to] = gains.trace[si];
      if (v < 0) {
        if (moves.empty()) break;
        v = moves.back().v;
        to = s0;
      }
      if (to < 0) break;
      cur[v] = to;
      locked[v] = 1;
      group_locked[to] = 1;
      moves.push_back({v, si, to});
      epsilon.push_back(gains.g_i[si]);
      tau.push_back(gains.g_ij[si][s0]);
      si = to;
      if (si == s0) break;
      gains = calculate_gains(c, l, cur, locked);
    }
    if (moves.empty()) break;
    double best = 0, prefix = 0;
    size_t keep = 0;
    for (size_t i = 1; i < epsilon.size(); ++i) {
      prefix += epsilon[i - 1];
      if (prefix + tau[i] > best) { best = prefix + tau[i]; keep = i; }
    }
    for (size_t i = moves.size() - 1; i > keep; --i) cur[moves[i].v] = moves[i].from;
    cur[moves[keep].v] = s0;
    states.push_back(cur);
    cycle_gain.push_back(best);
    if (std::all_of(group_locked.begin(), group_locked.end(), [](char x) { return x != 0; })) break;
  }
  double best = 0, prefix = 0;
  size_t pick = 0;
  for (size_t i = 1; i < cycle_gain.size(); ++i) {
    prefix += cycle_gain[i - 1];
    if (prefix > best) { best = prefix; pick = i - 1; }
  }
  return states[pick];
}

}  // namespace

// Population of 100 random orders; each trial picks two parents at random,
// crosses them (five points), runs one cyclic-partitioning pass on the child and
// scores it (DataPCost + 2·PipelinePCost). As in scheduler.py, the child takes
// the worse parent's place when it scores no worse than the first parent, and
// is only archived otherwise; the answer is the best placement ever scored.
Groups search_dtfm(const EdgeCosts& c, const PlanRequest& r, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Layout l{c.n, r.stages, r.stages, {}};
  l.capacity.assign(r.stages, r.replicas);
  l.capacity.push_back(c.n - r.stages * r.replicas);
  const int population_size = 100;
  std::vector<std::vector<int>> population;
  std::vector<double> score;
  Groups best;
  double best_score = kInf;
  auto consider = [&](const std::vector<int>& order) {
    Groups g = groups_of(l, order);
    const double s = Scorer(c, g).total();
    if (s < best_score) { best_score = s; best = std::move(g); }
    return s;
  };
  for (int i = 0; i < population_size; ++i) {
    std::vector<int> order(c.n);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    score.push_back(consider(order));
    population.push_back(std::move(order));
  }
  for (int trial = 0; trial < r.search_trials; ++trial) {
    const int p1 = static_cast<int>(rng() % population_size), p2 = static_cast<int>(rng() % population_size);
    PartString child = five_point_crossover(l, string_of(l, population[p1]), string_of(l, population[p2]), rng);
    child = cyclic_partitioning(c, l, child);
    std::vector<int> order = order_of(l, child);
    const double s = consider(order);
    if (s <= score[p1]) {
      const int replaced = score[p1] > score[p2] ? p1 : p2;
      population[replaced] = std::move(order);
      score[replaced] = s;
    }
  }
  return best;
}

}  // namespace sn::sched::detail
