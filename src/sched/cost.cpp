// DT-FM's cost: data-parallel cost per group, bottleneck matchings between
// groups, open-path TSP over the group order (ANCHORS.md, docs/scheduler.md).
#include <algorithm>
#include <cstdint>
#include <numeric>

#include "sched/internal.h"

namespace sn::sched::detail {

EdgeCosts::EdgeCosts(const LinkMatrix& m, const PlanRequest& r) : n(m.n) {
  dp.assign(static_cast<size_t>(n) * n, 0);
  pp.assign(static_cast<size_t>(n) * n, 0);
  const double c_dp = r.gradient_bytes / std::max(1, r.replicas);
  const double c_pp = r.pipeline_bytes();
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) {
      if (a == b) continue;
      const double alpha = m.at(a, b).latency_ms / 1e3, beta = m.at(a, b).bytes_per_second();
      dp[static_cast<size_t>(a) * n + b] = 2 * (alpha + c_dp / beta);
      pp[static_cast<size_t>(a) * n + b] = alpha + c_pp / beta;
    }
}

double group_dp_cost(const EdgeCosts& c, const std::vector<int>& group) {
  double worst = 0;
  for (int d : group) {
    double sum = 0;
    for (int e : group) sum += c.dp_at(d, e);
    worst = std::max(worst, sum);
  }
  return worst;
}

namespace {

// Kuhn's augmenting paths over bitmask rows (n ≤ 64).
bool augment(int u, const uint64_t* ok, int* match_right, uint64_t& seen) {
  for (uint64_t free = ok[u] & ~seen; free; free &= free - 1) {
    const int v = __builtin_ctzll(free);
    seen |= uint64_t{1} << v;
    if (match_right[v] < 0 || augment(match_right[v], ok, match_right, seen)) {
      match_right[v] = u;
      return true;
    }
  }
  return false;
}

bool augment_wide(int u, int n, const std::vector<char>& ok, std::vector<int>& match_right, std::vector<char>& seen) {
  for (int v = 0; v < n; ++v) {
    if (!ok[static_cast<size_t>(u) * n + v] || seen[v]) continue;
    seen[v] = 1;
    if (match_right[v] < 0 || augment_wide(match_right[v], n, ok, match_right, seen)) {
      match_right[v] = u;
      return true;
    }
  }
  return false;
}

}  // namespace

// n ≤ 64: start at the floor (the largest row or column minimum, which no
// perfect matching beats), then raise the threshold to the next edge value
// while augmenting the matching kept so far; edges only get added, so the
// matching stays valid and the first perfect one gives the bottleneck.
double bottleneck_small(const EdgeCosts& c, const std::vector<int>& a, const std::vector<int>& b,
                        std::vector<int>* pair_of_a) {
  const int n = static_cast<int>(a.size());
  double cost[64 * 64];
  double floor = 0;
  for (int i = 0; i < n; ++i) {
    const double* row = &c.pp[static_cast<size_t>(a[i]) * c.n];
    double low = kInf;
    for (int j = 0; j < n; ++j) low = std::min(low, cost[i * 64 + j] = row[b[j]]);
    floor = std::max(floor, low);
  }
  for (int j = 0; j < n; ++j) {
    double low = kInf;
    for (int i = 0; i < n; ++i) low = std::min(low, cost[i * 64 + j]);
    floor = std::max(floor, low);
  }
  uint64_t ok[64];
  int match_right[64];
  std::fill(match_right, match_right + n, -1);
  uint64_t matched_rows = 0;
  int matched = 0;
  double limit = floor;
  for (;;) {
    for (int i = 0; i < n; ++i) {
      uint64_t mask = 0;
      for (int j = 0; j < n; ++j)
        if (cost[i * 64 + j] <= limit) mask |= uint64_t{1} << j;
      ok[i] = mask;
    }
    for (int i = 0; i < n && matched < n; ++i) {
      if (matched_rows >> i & 1) continue;
      uint64_t seen = 0;
      if (augment(i, ok, match_right, seen)) { matched_rows |= uint64_t{1} << i; ++matched; }
    }
    if (matched == n) break;
    double next = kInf;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        if (cost[i * 64 + j] > limit) next = std::min(next, cost[i * 64 + j]);
    limit = next;
  }
  if (pair_of_a) {
    pair_of_a->assign(n, -1);
    for (int j = 0; j < n; ++j) (*pair_of_a)[match_right[j]] = j;
  }
  return limit;
}

double bottleneck_matching(const EdgeCosts& c, const std::vector<int>& a, const std::vector<int>& b,
                           std::vector<int>* pair_of_a) {
  const int n = static_cast<int>(a.size());
  if (n <= 64) return bottleneck_small(c, a, b, pair_of_a);
  std::vector<double> cost(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) cost[static_cast<size_t>(i) * n + j] = c.pp_at(a[i], b[j]);
  std::vector<double> sorted = cost;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::vector<int> match_right(n, -1);
  std::vector<char> ok(cost.size()), seen(n);
  auto feasible = [&](double limit) {
    for (size_t k = 0; k < cost.size(); ++k) ok[k] = cost[k] <= limit;
    std::fill(match_right.begin(), match_right.end(), -1);
    for (int i = 0; i < n; ++i) {
      std::fill(seen.begin(), seen.end(), 0);
      if (!augment_wide(i, n, ok, match_right, seen)) return false;
    }
    return true;
  };
  size_t lo = 0, hi = sorted.size() - 1;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (feasible(sorted[mid])) hi = mid; else lo = mid + 1;
  }
  if (pair_of_a) {
    feasible(sorted[lo]);
    pair_of_a->assign(n, -1);
    for (int j = 0; j < n; ++j) (*pair_of_a)[match_right[j]] = j;
  }
  return sorted[lo];
}

std::vector<int> open_path_tsp(const std::vector<std::vector<double>>& w, double* total) {
  const int n = static_cast<int>(w.size());
  if (n == 1) { *total = 0; return {0}; }
  if (n <= 13) {
    const int full = 1 << n;
    std::vector<double> best(static_cast<size_t>(full) * n, kInf);
    std::vector<int> parent(static_cast<size_t>(full) * n, -1);
    for (int i = 0; i < n; ++i) best[static_cast<size_t>(1 << i) * n + i] = 0;
    for (int mask = 1; mask < full; ++mask)
      for (int last = 0; last < n; ++last) {
        const double here = best[static_cast<size_t>(mask) * n + last];
        if (here == kInf) continue;
        for (int next = 0; next < n; ++next) {
          if (mask & (1 << next)) continue;
          const size_t k = static_cast<size_t>(mask | (1 << next)) * n + next;
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
      const int prev = parent[static_cast<size_t>(mask) * n + node];
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
      int pick = -1;
      for (int j = 0; j < n; ++j)
        if (!used[j] && (pick < 0 || w[p.back()][j] < w[p.back()][pick])) pick = j;
      used[pick] = 1;
      p.push_back(pick);
    }
    // 2-opt on an open path: reversing p[i..j] changes only the edges at its ends.
    for (bool improved = true; improved;) {
      improved = false;
      for (int i = 0; i < n - 1; ++i)
        for (int j = i + 1; j < n; ++j) {
          double before = 0, after = 0;
          if (i > 0) { before += w[p[i - 1]][p[i]]; after += w[p[i - 1]][p[j]]; }
          if (j + 1 < n) { before += w[p[j]][p[j + 1]]; after += w[p[i]][p[j + 1]]; }
          if (after + 1e-12 < before) {
            std::reverse(p.begin() + i, p.begin() + j + 1);
            improved = true;
          }
        }
    }
    if (length(p) < best_len) { best_len = length(p); best_path = p; }
  }
  *total = best_len;
  return best_path;
}

Scorer::Scorer(const EdgeCosts& costs, Groups g) : c(costs), groups(std::move(g)) {
  const size_t p = groups.size();
  dp.assign(p, 0);
  pp.assign(p, std::vector<double>(p, 0));
  for (size_t i = 0; i < p; ++i) dp[i] = group_dp_cost(c, groups[i]);
  for (size_t i = 0; i < p; ++i)
    for (size_t o = i + 1; o < p; ++o) pp[i][o] = pp[o][i] = bottleneck_matching(c, groups[i], groups[o], nullptr);
}

void Scorer::refresh(int g) {
  dp[g] = group_dp_cost(c, groups[g]);
  for (size_t o = 0; o < groups.size(); ++o)
    if (static_cast<int>(o) != g) pp[g][o] = pp[o][g] = bottleneck_matching(c, groups[g], groups[o], nullptr);
}

double Scorer::total() const {
  double path = 0;
  open_path_tsp(pp, &path);
  return *std::max_element(dp.begin(), dp.end()) + 2 * path;
}

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

std::vector<int> spares_of(int n, const Groups& g) {
  std::vector<char> used(n, 0);
  for (const auto& grp : g)
    for (int d : grp) used[d] = 1;
  std::vector<int> s;
  for (int i = 0; i < n; ++i)
    if (!used[i]) s.push_back(i);
  return s;
}

}  // namespace sn::sched::detail
