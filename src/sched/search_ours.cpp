// Our search: simulated annealing over a P × D grid of devices (row s = stage s's
// replicas, column k = pipeline k), with O(D) incremental cost per move, from a
// few constructed and random starts; each result is refined on the ordered cost
// (exact bottleneck matchings, stage order fixed) by a short annealing and a
// descent, scored exactly (TSP over group order + matchings), and small
// instances get a last descent on the exact cost. docs/scheduler.md explains why.
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "sched/internal.h"

namespace sn::sched::detail {
namespace {

// The grid's cost is an upper bound on DT-FM's cost of its rows as groups: rows
// in grid order with column k as the pairing is one admissible path and matching.
//   C = max_s rowmax(s) + 2 Σ_s max_k pp(cell(s,k), cell(s+1,k))
// where rowmax(s) = max_k Σ_k' dp(cell(s,k), cell(s,k')). The annealing also
// sees a small tie-break on the mean row and mean edge so that the plateaus of
// the two max terms have a slope.
class Grid {
 public:
  Grid(const EdgeCosts& c, int stages, int replicas, std::vector<int> cells, std::vector<int> spares)
      : c_(c), p_(stages), d_(replicas), cell_(std::move(cells)), spare_(std::move(spares)) {
    rowsum_.assign(cell_.size(), 0);
    rowmax_.assign(p_, 0);
    edge_.assign(static_cast<size_t>(std::max(0, p_ - 1)) * d_, 0);
    bmax_.assign(std::max(0, p_ - 1), 0);
    slot_of_.assign(c_.n, -1);
    for (size_t i = 0; i < cell_.size(); ++i) slot_of_[cell_[i]] = static_cast<int>(i);
    for (size_t i = 0; i < spare_.size(); ++i) slot_of_[spare_[i]] = static_cast<int>(cell_.size() + i);
    recompute();
  }

  int stages() const { return p_; }
  int replicas() const { return d_; }
  int spares() const { return static_cast<int>(spare_.size()); }
  const std::vector<int>& cells() const { return cell_; }
  int device_at(int slot) const { return slot < p_ * d_ ? cell_[slot] : spare_[slot - p_ * d_]; }
  int slot_of(int device) const { return slot_of_[device]; }  // −1: outside the pool
  // The column of boundary T's most expensive edge; the row's costliest device.
  int worst_edge_column(int t) const {
    int best = 0;
    for (int k = 1; k < d_; ++k)
      if (edge_[idx(t, k)] > edge_[idx(t, best)]) best = k;
    return best;
  }
  int worst_row() const { return static_cast<int>(std::max_element(rowmax_.begin(), rowmax_.end()) - rowmax_.begin()); }
  int worst_in_row(int s) const {
    int best = 0;
    for (int k = 1; k < d_; ++k)
      if (rowsum_[idx(s, k)] > rowsum_[idx(s, best)]) best = k;
    return best;
  }

  void recompute() {
    for (int s = 0; s < p_; ++s) {
      for (int k = 0; k < d_; ++k) {
        double sum = 0;
        for (int j = 0; j < d_; ++j) sum += c_.dp_at(at(s, k), at(s, j));
        rowsum_[idx(s, k)] = sum;
      }
      refresh_rowmax(s);
    }
    edge_total_ = 0;
    for (int t = 0; t + 1 < p_; ++t) {
      for (int k = 0; k < d_; ++k) edge_total_ += edge_[idx(t, k)] = c_.pp_at(at(t, k), at(t + 1, k));
      refresh_bmax(t);
    }
  }

  // DT-FM's cost of this grid read as a placement (an upper bound, see above).
  double cost() const {
    double pipe = 0;
    for (double b : bmax_) pipe += b;
    return *std::max_element(rowmax_.begin(), rowmax_.end()) + 2 * pipe;
  }
  double objective(double tie) const {
    double rows = 0;
    for (double r : rowmax_) rows += r;
    return cost() + tie * (rows / p_ + 2 * edge_total_ / d_);
  }

  // Slots 0..P·D−1 are grid cells, P·D + i is spare i. Every change is logged
  // so that undo() restores the state exactly.
  void swap_slots(int a, int b) {
    const int cells = p_ * d_;
    if (a >= cells) std::swap(a, b);
    if (a >= cells) return;  // two spares: nothing to do
    int& x = cell_[a];
    int& y = b < cells ? cell_[b] : spare_[b - cells];
    log_swap(a, b);
    const int old_x = x, old_y = y;
    std::swap(x, y);
    slot_of_[old_y] = a;
    slot_of_[old_x] = b;
    const int sa = a / d_;
    if (b < cells && b / d_ == sa) {
      // Same row: the row sums trade places, only the edges change.
      log(rowsum_[a]);
      log(rowsum_[b]);
      std::swap(rowsum_[a], rowsum_[b]);
      touch_edges(sa, a % d_);
      touch_edges(sa, b % d_);
      return;
    }
    replace_in_row(sa, a % d_, old_x, old_y);
    touch_edges(sa, a % d_);
    if (b < cells) {
      replace_in_row(b / d_, b % d_, old_y, old_x);
      touch_edges(b / d_, b % d_);
    }
  }

  void commit() { undo_.clear(); swaps_.clear(); }
  void undo() {
    for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) *it->first = it->second;
    for (auto it = swaps_.rbegin(); it != swaps_.rend(); ++it) {
      const int cells = p_ * d_;
      int& x = cell_[it->first];
      int& y = it->second < cells ? cell_[it->second] : spare_[it->second - cells];
      std::swap(x, y);
      slot_of_[x] = it->first;
      slot_of_[y] = it->second;
    }
    commit();
  }

 private:
  size_t idx(int s, int k) const { return static_cast<size_t>(s) * d_ + k; }
  int at(int s, int k) const { return cell_[idx(s, k)]; }
  void log(double& v) { undo_.emplace_back(&v, v); }
  void log_swap(int a, int b) { swaps_.emplace_back(a, b); }

  void refresh_rowmax(int s) {
    double m = 0;
    for (int k = 0; k < d_; ++k) m = std::max(m, rowsum_[idx(s, k)]);
    rowmax_[s] = m;
  }
  void refresh_bmax(int t) {
    double m = 0;
    for (int k = 0; k < d_; ++k) m = std::max(m, edge_[idx(t, k)]);
    bmax_[t] = m;
  }
  // Row S's column K changed from device OLD to NEW (already in place).
  void replace_in_row(int s, int k, int old_device, int new_device) {
    double own = 0;
    for (int j = 0; j < d_; ++j) {
      if (j == k) continue;
      const int e = at(s, j);
      double& sum = rowsum_[idx(s, j)];
      log(sum);
      sum += c_.dp_at(e, new_device) - c_.dp_at(e, old_device);
      own += c_.dp_at(new_device, e);
    }
    log(rowsum_[idx(s, k)]);
    rowsum_[idx(s, k)] = own;
    log(rowmax_[s]);
    refresh_rowmax(s);
  }
  void touch_edges(int s, int k) {
    for (int t : {s - 1, s}) {
      if (t < 0 || t + 1 >= p_) continue;
      double& e = edge_[idx(t, k)];
      log(e);
      log(edge_total_);
      edge_total_ -= e;
      e = c_.pp_at(at(t, k), at(t + 1, k));
      edge_total_ += e;
      log(bmax_[t]);
      refresh_bmax(t);
    }
  }

  const EdgeCosts& c_;
  int p_, d_;
  std::vector<int> cell_, spare_, slot_of_;
  std::vector<double> rowsum_, rowmax_, edge_, bmax_;
  double edge_total_ = 0;
  std::vector<std::pair<double*, double>> undo_;
  std::vector<std::pair<int, int>> swaps_;
};

// Per pool device, the pool devices with its K cheapest pipeline and
// data-parallel edges: where a move finds a device likely to fit a slot.
struct Neighbours {
  std::vector<std::vector<int>> pp, dp;  // indexed by device id
};

Neighbours nearest(const EdgeCosts& c, const std::vector<int>& pool, int k) {
  Neighbours out;
  out.pp.resize(c.n);
  out.dp.resize(c.n);
  std::vector<int> others;
  for (int a : pool) {
    for (auto [list, pp] : {std::pair{&out.pp[a], true}, std::pair{&out.dp[a], false}}) {
      others.clear();
      for (int b : pool)
        if (b != a) others.push_back(b);
      const int keep = std::min<int>(k, static_cast<int>(others.size()));
      auto w = [&](int b) { return pp ? c.pp_at(a, b) : c.dp_at(a, b); };
      std::partial_sort(others.begin(), others.begin() + keep, others.end(),
                        [&](int x, int y) { return w(x) < w(y) || (w(x) == w(y) && x < y); });
      list->assign(others.begin(), others.begin() + keep);
    }
  }
  return out;
}

// One random move, as a sequence of slot swaps: a swap across rows (changes two
// groups), within a row (re-pairs two pipelines), with a spare, two whole rows
// (re-orders stages), or the tails of two columns below a row (re-matches one
// stage boundary).
template <class G>
void random_move(G& g, const Neighbours& near, std::mt19937_64& rng) {
  const int p = g.stages(), d = g.replicas(), cells = p * d;
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  if (pick(100) < 40) {
    // A slot takes a device close to one of its neighbours: the stage above or
    // below in its pipeline (pipeline edges), or a replica of its stage.
    const int a = pick(cells), s = a / d, k = a % d;
    int ref = -1;
    bool by_pp = p > 1 && (d == 1 || pick(3) != 0);
    if (by_pp) {
      const int t = s == 0 ? 1 : s == p - 1 ? p - 2 : (pick(2) ? s - 1 : s + 1);
      ref = g.device_at(t * d + k);
    } else if (d > 1) {
      int j = pick(d - 1);
      if (j >= k) ++j;
      ref = g.device_at(s * d + j);
    } else {
      return;
    }
    const auto& list = by_pp ? near.pp[ref] : near.dp[ref];
    if (list.empty()) return;
    const int b = g.slot_of(list[pick(static_cast<int>(list.size()))]);
    if (b >= 0 && b != a) g.swap_slots(a, b);
    return;
  }
  const int kind = pick(100);
  if (pick(100) < 30) {
    // A device on a bottleneck: the costliest edge of a random stage boundary,
    // or the costliest device of the costliest group, goes somewhere else.
    int from;
    if (p > 1 && pick(2) == 0) {
      const int t = pick(p - 1);
      from = (t + pick(2)) * d + g.worst_edge_column(t);
    } else {
      const int s = g.worst_row();
      from = s * d + g.worst_in_row(s);
    }
    const int to = pick(cells + g.spares());
    if (to != from) g.swap_slots(from, to);
    return;
  }
  if (kind < 15 && g.spares() > 0) {
    g.swap_slots(pick(cells), cells + pick(g.spares()));
  } else if (kind < 25 && p > 2) {
    const int s1 = pick(p), s2 = pick(p);
    if (s1 != s2)
      for (int k = 0; k < d; ++k) g.swap_slots(s1 * d + k, s2 * d + k);
  } else if (kind < 40 && d > 1 && p > 1) {
    const int t = 1 + pick(p - 1), k1 = pick(d), k2 = pick(d);
    if (k1 != k2)
      for (int s = t; s < p; ++s) g.swap_slots(s * d + k1, s * d + k2);
  } else if (kind < 55 && d > 1) {
    const int s = pick(p), k1 = pick(d), k2 = pick(d);
    if (k1 != k2) g.swap_slots(s * d + k1, s * d + k2);
  } else if (p > 1) {
    const int a = pick(cells), b = pick(cells);
    if (a / d != b / d) g.swap_slots(a, b);
  } else if (g.spares() > 0) {
    g.swap_slots(pick(cells), cells + pick(g.spares()));
  }
}

struct Annealed {
  std::vector<int> cells;
  double cost = kInf;
};

Annealed anneal(Grid g, const Neighbours& near, int moves, std::mt19937_64& rng) {
  constexpr double kTie = 0.2;
  std::uniform_real_distribution<double> unit(0, 1);
  Annealed best{g.cells(), g.cost()};
  // Start where a typical worsening move is taken one time in ten (e^{−ln 2 / 0.3}).
  double current = g.objective(kTie), worse_sum = 0;
  int worse = 0;
  for (int i = 0; i < 200; ++i) {
    random_move(g, near, rng);
    const double delta = g.objective(kTie) - current;
    if (delta > 0) { worse_sum += delta; ++worse; }
    g.undo();
  }
  const double t0 = 0.3 * (worse ? worse_sum / worse / std::log(2.0) : 1e-3);
  const double t_end = t0 * 1e-2;
  const double cool = std::pow(t_end / t0, 1.0 / std::max(1, moves));
  double t = t0;
  for (int i = 0; i < moves; ++i, t *= cool) {
    random_move(g, near, rng);
    const double next = g.objective(kTie);
    if (next <= current || unit(rng) < std::exp((current - next) / t)) {
      current = next;
      g.commit();
      const double c = g.cost();
      if (c < best.cost) { best.cost = c; best.cells = g.cells(); }
    } else {
      g.undo();
    }
    if ((i & 4095) == 4095) { g.recompute(); current = g.objective(kTie); }
  }
  return best;
}

// Greedy clusters of SIZE over POOL: each grows from the first free device by
// adding the device with the smallest summed WEIGHT to those already in it.
std::vector<std::vector<int>> clusters(const std::vector<int>& pool, int count, int size,
                                       const std::function<double(int, int)>& weight) {
  std::vector<char> used(pool.size(), 0);
  std::vector<std::vector<int>> out;
  for (int c = 0; c < count; ++c) {
    std::vector<int> members;
    for (size_t i = 0; i < pool.size(); ++i)
      if (!used[i]) { used[i] = 1; members.push_back(pool[i]); break; }
    while (static_cast<int>(members.size()) < size) {
      size_t pick = pool.size();
      double pick_cost = kInf;
      for (size_t i = 0; i < pool.size(); ++i) {
        if (used[i]) continue;
        double w = 0;
        for (int m : members) w += weight(m, pool[i]);
        if (w < pick_cost) { pick_cost = w; pick = i; }
      }
      used[pick] = 1;
      members.push_back(pool[pick]);
    }
    out.push_back(members);
  }
  return out;
}

// Descent on DT-FM's cost with the stage order fixed, which needs no TSP:
//   max_s dp(group s) + 2 Σ_t bottleneck matching(group t, group t+1).
// A swap of two devices (between groups, or with a spare) or of two groups'
// places rescores at most two groups and four boundaries. Equal-cost moves are
// taken when they lower Σ dp + 2 Σ bottlenecks, so plateaus still descend.
Groups ordered_descent(const EdgeCosts& c, Groups groups, std::vector<int> spares, long evaluations) {
  const int p = static_cast<int>(groups.size());
  std::vector<double> dp(p), bm(std::max(0, p - 1));
  for (int s = 0; s < p; ++s) dp[s] = group_dp_cost(c, groups[s]);
  for (int t = 0; t + 1 < p; ++t) bm[t] = bottleneck_matching(c, groups[t], groups[t + 1], nullptr);
  auto score = [&] {
    double pipe = 0, rows = 0;
    for (double b : bm) pipe += b;
    for (double d : dp) rows += d;
    return std::pair{*std::max_element(dp.begin(), dp.end()) + 2 * pipe, rows + 2 * pipe};
  };
  auto current = score();
  std::vector<int> touched;
  auto rescore = [&](int ga, int gb) {
    touched.clear();
    for (int g : {ga, gb}) {
      if (g < 0 || g >= p) continue;
      dp[g] = group_dp_cost(c, groups[g]);
      for (int t : {g - 1, g})
        if (t >= 0 && t + 1 < p && std::find(touched.begin(), touched.end(), t) == touched.end()) touched.push_back(t);
    }
    for (int t : touched) bm[t] = bottleneck_matching(c, groups[t], groups[t + 1], nullptr);
  };
  auto better = [](std::pair<double, double> a, std::pair<double, double> b) {
    return a.first < b.first - 1e-12 || (a.first <= b.first + 1e-12 && a.second < b.second - 1e-12);
  };
  for (bool improved = true; improved && evaluations > 0;) {
    improved = false;
    for (int ga = 0; ga < p; ++ga)
      for (int gb = ga + 1; gb <= p; ++gb) {
        if (gb < p && evaluations > 0) {
          // The two groups trade places in the stage order.
          --evaluations;
          const auto saved_dp = dp;
          const auto saved_bm = bm;
          std::swap(groups[ga], groups[gb]);
          std::swap(dp[ga], dp[gb]);
          for (int t : {ga - 1, ga, gb - 1, gb})
            if (t >= 0 && t + 1 < p) bm[t] = bottleneck_matching(c, groups[t], groups[t + 1], nullptr);
          const auto next = score();
          if (better(next, current)) {
            current = next;
            improved = true;
          } else {
            std::swap(groups[ga], groups[gb]);
            dp = saved_dp;
            bm = saved_bm;
          }
        }
        for (size_t ia = 0; ia < groups[ga].size(); ++ia) {
          const size_t nb = gb < p ? groups[gb].size() : spares.size();
          for (size_t ib = 0; ib < nb && evaluations > 0; ++ib, --evaluations) {
            int& x = groups[ga][ia];
            int& y = gb < p ? groups[gb][ib] : spares[ib];
            const auto saved_dp = dp;
            const auto saved_bm = bm;
            std::swap(x, y);
            rescore(ga, gb < p ? gb : -1);
            const auto next = score();
            if (better(next, current)) {
              current = next;
              improved = true;
            } else {
              std::swap(x, y);
              dp = saved_dp;
              bm = saved_bm;
            }
          }
        }
      }
  }
  return groups;
}

// Annealing on the same ordered cost: random swaps between groups, with a
// spare, or of two groups' places; cooler than the grid's (it starts from a
// good placement and only needs to leave shallow minima).
Groups ordered_anneal(const EdgeCosts& c, Groups groups, std::vector<int> spares, long moves, std::mt19937_64& rng) {
  const int p = static_cast<int>(groups.size()), d = static_cast<int>(groups[0].size());
  std::vector<double> dp(p), bm(std::max(0, p - 1));
  for (int s = 0; s < p; ++s) dp[s] = group_dp_cost(c, groups[s]);
  for (int t = 0; t + 1 < p; ++t) bm[t] = bottleneck_matching(c, groups[t], groups[t + 1], nullptr);
  constexpr double tie = 0.2;
  auto cost = [&] {
    double pipe = 0;
    for (double b : bm) pipe += b;
    return *std::max_element(dp.begin(), dp.end()) + 2 * pipe;
  };
  auto objective = [&] {
    double rows = 0;
    for (double x : dp) rows += x;
    return cost() * (1 + tie) + tie * (rows / p - *std::max_element(dp.begin(), dp.end()));
  };
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  std::uniform_real_distribution<double> unit(0, 1);
  Groups best = groups;
  double best_cost = cost(), current = objective();
  const double t0 = 0.01 * best_cost / p, t_end = t0 * 1e-3;
  const double cool = std::pow(t_end / t0, 1.0 / std::max<long>(1, moves));
  double t = t0;
  const int spare_count = static_cast<int>(spares.size());
  for (long i = 0; i < moves; ++i, t *= cool) {
    const auto saved_dp = dp;
    const auto saved_bm = bm;
    int ga = pick(p), gb = p > 1 ? pick(p - 1) : 0;
    if (gb >= ga) ++gb;
    const int kind = pick(100);
    int ia = pick(d), ib = 0;
    bool order_move = false, spare_move = false;
    if (kind < 10 && p > 2) {
      order_move = true;
      std::swap(groups[ga], groups[gb]);
      std::swap(dp[ga], dp[gb]);
      for (int b : {ga - 1, ga, gb - 1, gb})
        if (b >= 0 && b + 1 < p) bm[b] = bottleneck_matching(c, groups[b], groups[b + 1], nullptr);
    } else if ((kind < 25 && spare_count > 0) || (p == 1 && spare_count > 0)) {
      spare_move = true;
      ib = pick(spare_count);
      std::swap(groups[ga][ia], spares[ib]);
      dp[ga] = group_dp_cost(c, groups[ga]);
      for (int b : {ga - 1, ga})
        if (b >= 0 && b + 1 < p) bm[b] = bottleneck_matching(c, groups[b], groups[b + 1], nullptr);
    } else if (p > 1) {
      ib = pick(d);
      std::swap(groups[ga][ia], groups[gb][ib]);
      dp[ga] = group_dp_cost(c, groups[ga]);
      dp[gb] = group_dp_cost(c, groups[gb]);
      for (int b : {ga - 1, ga, gb - 1, gb})
        if (b >= 0 && b + 1 < p) bm[b] = bottleneck_matching(c, groups[b], groups[b + 1], nullptr);
    } else {
      continue;
    }
    const double next = objective();
    if (next <= current || unit(rng) < std::exp((current - next) / t)) {
      current = next;
      const double now = cost();
      if (now < best_cost) { best_cost = now; best = groups; }
    } else {
      if (order_move) std::swap(groups[ga], groups[gb]);
      else if (spare_move) std::swap(groups[ga][ia], spares[ib]);
      else std::swap(groups[ga][ia], groups[gb][ib]);
      dp = saved_dp;
      bm = saved_bm;
    }
  }
  return best;
}

// Best-improvement swaps on the exact DT-FM cost, within EVALUATIONS scorings.
Groups polish(const EdgeCosts& c, Groups groups, std::vector<int> spares, long evaluations) {
  Scorer sc(c, std::move(groups));
  double current = sc.total();
  const int p = static_cast<int>(sc.groups.size());
  for (bool improved = true; improved && evaluations > 0;) {
    improved = false;
    for (int ga = 0; ga < p; ++ga)
      for (size_t ia = 0; ia < sc.groups[ga].size(); ++ia)
        for (int gb = ga + 1; gb <= p; ++gb) {
          const size_t nb = gb < p ? sc.groups[gb].size() : spares.size();
          for (size_t ib = 0; ib < nb && evaluations > 0; ++ib, --evaluations) {
            int& x = sc.groups[ga][ia];
            int& y = gb < p ? sc.groups[gb][ib] : spares[ib];
            std::swap(x, y);
            const auto saved_dp = sc.dp;
            const auto saved_pp = sc.pp;
            sc.refresh(ga);
            if (gb < p) sc.refresh(gb);
            const double cost = sc.total();
            if (cost + 1e-12 < current) {
              current = cost;
              improved = true;
            } else {
              std::swap(x, y);
              sc.dp = saved_dp;
              sc.pp = saved_pp;
            }
          }
        }
  }
  return sc.groups;
}

// On a large network most devices are spares. Keep a pool of 2·P·D devices with
// the cheapest links (each device's D−1 cheapest data-parallel edges plus twice
// its cheapest pipeline edge); the annealing swaps spares within it.
std::vector<int> candidate_pool(const EdgeCosts& c, const PlanRequest& r) {
  std::vector<int> all(c.n);
  std::iota(all.begin(), all.end(), 0);
  const int size = 2 * r.stages * r.replicas;
  if (c.n <= size) return all;
  std::vector<std::pair<double, int>> score;
  std::vector<double> dp;
  for (int d = 0; d < c.n; ++d) {
    dp.clear();
    double pp = kInf;
    for (int e = 0; e < c.n; ++e) {
      if (e == d) continue;
      dp.push_back(c.dp_at(d, e));
      pp = std::min(pp, c.pp_at(d, e));
    }
    const int keep = std::min<int>(r.replicas - 1, static_cast<int>(dp.size()));
    std::nth_element(dp.begin(), dp.begin() + keep, dp.end());
    double sum = 0;
    for (int i = 0; i < keep; ++i) sum += dp[i];
    score.push_back({sum + 2 * pp, d});
  }
  std::sort(score.begin(), score.end());
  std::vector<int> pool;
  for (int i = 0; i < size; ++i) pool.push_back(score[i].second);
  std::sort(pool.begin(), pool.end());
  return pool;
}


// The same P × D grid, scored by the simulator instead of DT-FM's proxy: column
// k is replica k's pipeline (played by ReplicaSim), row s is stage s's ring in
// column order. Per column the stage finish times, per row the all-reduce and
// per column the tied swap are cached; a swap dirties at most two columns and
// two rows, which evaluate() replays before it takes the maxima (O(P·D)).
class TimeGrid {
 public:
  TimeGrid(const LinkMatrix& m, const PlanRequest& r, std::vector<int> cells, std::vector<int> spares)
      : m_(m), r_(r), sim_(m, r), p_(r.stages), d_(r.replicas), cell_(std::move(cells)), spare_(std::move(spares)) {
    slot_of_.assign(m.n, -1);
    for (size_t i = 0; i < cell_.size(); ++i) slot_of_[cell_[i]] = static_cast<int>(i);
    for (size_t i = 0; i < spare_.size(); ++i) slot_of_[spare_[i]] = static_cast<int>(cell_.size() + i);
    col_done_.assign(static_cast<size_t>(p_) * d_, 0);
    col_end_.assign(d_, 0);
    tied_.assign(d_, 0);
    ring_.assign(p_, 0);
    reduced_.assign(p_, 0);
    column_.resize(p_);
    row_.resize(d_);
    dirty_col_.assign(d_, 1);
    dirty_row_.assign(p_, 1);
    evaluate();
    commit();
  }

  int stages() const { return p_; }
  int replicas() const { return d_; }
  int spares() const { return static_cast<int>(spare_.size()); }
  const std::vector<int>& cells() const { return cell_; }
  int device_at(int slot) const { return slot < p_ * d_ ? cell_[slot] : spare_[slot - p_ * d_]; }
  int slot_of(int device) const { return slot_of_[device]; }
  // Boundary T's slowest activation hop; the stage finishing last; the device
  // at the slower end of the stage's slowest ring hop.
  int worst_edge_column(int t) const {
    int best = 0;
    double worst = -1;
    for (int k = 0; k < d_; ++k) {
      const double x = m_.at(at(t, k), at(t + 1, k)).transfer_seconds(r_.activation_bytes);
      if (x > worst) { worst = x; best = k; }
    }
    return best;
  }
  int worst_row() const { return static_cast<int>(std::max_element(reduced_.begin(), reduced_.end()) - reduced_.begin()); }
  int worst_in_row(int s) const {
    int best = 0;
    double worst = -1;
    for (int k = 0; k < d_; ++k) {
      const double x = m_.at(at(s, k), at(s, (k + 1) % d_)).transfer_seconds(1);
      if (x > worst) { worst = x; best = k; }
    }
    return best;
  }

  void swap_slots(int a, int b) {
    const int cells = p_ * d_;
    if (a >= cells) std::swap(a, b);
    if (a >= cells) return;
    int& x = cell_[a];
    int& y = b < cells ? cell_[b] : spare_[b - cells];
    swaps_.emplace_back(a, b);
    std::swap(x, y);
    slot_of_[x] = a;
    slot_of_[y] = b;
    mark(a);
    if (b < cells) mark(b);
  }

  // Replays what the swaps since the last commit() or undo() changed.
  void evaluate() {
    for (int k = 0; k < d_; ++k) {
      if (!dirty_col_[k]) continue;
      dirty_col_[k] = 0;
      saved_cols_.emplace_back(k, saved_.size());
      double* done = &col_done_[static_cast<size_t>(k) * p_];
      saved_.insert(saved_.end(), done, done + p_);
      saved_.push_back(tied_[k]);
      for (int s = 0; s < p_; ++s) column_[s] = at(s, k);
      sim_.run(column_.data(), done);
      tied_[k] = p_ > 1 && r_.tied_bytes > 0 ? tied_swap_seconds(m_, r_, at(0, k), at(p_ - 1, k)) : 0;
    }
    for (int s = 0; s < p_; ++s) {
      if (!dirty_row_[s]) continue;
      dirty_row_[s] = 0;
      saved_rows_.emplace_back(s, saved_.size());
      saved_.push_back(ring_[s]);
      for (int k = 0; k < d_; ++k) row_[k] = at(s, k);
      ring_[s] = ring_allreduce_seconds(m_, r_, row_.data());
    }
    totals();
  }

  double cost() const { return total_; }
  // The simulated iteration, plus a small slope for the plateaus of its maxima:
  // the mean over stages of their reduced time and over replicas of their
  // pipeline's end.
  double objective(double tie) const { return total_ + tie * (sum_reduced_ / p_ + sum_col_end_ / d_); }

  void commit() {
    swaps_.clear();
    saved_.clear();
    saved_cols_.clear();
    saved_rows_.clear();
  }
  void undo() {
    for (auto it = swaps_.rbegin(); it != swaps_.rend(); ++it) {
      const int cells = p_ * d_;
      int& x = cell_[it->first];
      int& y = it->second < cells ? cell_[it->second] : spare_[it->second - cells];
      std::swap(x, y);
      slot_of_[x] = it->first;
      slot_of_[y] = it->second;
    }
    // Newest first, so that a figure saved twice ends at its oldest value.
    for (auto it = saved_rows_.rbegin(); it != saved_rows_.rend(); ++it) ring_[it->first] = saved_[it->second];
    for (auto it = saved_cols_.rbegin(); it != saved_cols_.rend(); ++it) {
      const auto from = saved_.begin() + static_cast<std::ptrdiff_t>(it->second);
      std::copy(from, from + p_, col_done_.begin() + static_cast<std::ptrdiff_t>(it->first) * p_);
      tied_[it->first] = saved_[it->second + p_];
    }
    std::fill(dirty_col_.begin(), dirty_col_.end(), 0);
    std::fill(dirty_row_.begin(), dirty_row_.end(), 0);
    if (!saved_cols_.empty() || !saved_rows_.empty()) totals();
    commit();
  }

 private:
  int at(int s, int k) const { return cell_[static_cast<size_t>(s) * d_ + k]; }
  void mark(int slot) {
    dirty_col_[slot % d_] = 1;
    dirty_row_[slot / d_] = 1;
  }
  // As simulate(): per stage the last replica's finish plus its all-reduce,
  // then the tied swap once the first and last stage are reduced.
  void totals() {
    sum_col_end_ = 0;
    for (int k = 0; k < d_; ++k) {
      const double* done = &col_done_[static_cast<size_t>(k) * p_];
      col_end_[k] = *std::max_element(done, done + p_);
      sum_col_end_ += col_end_[k];
    }
    double t = 0;
    sum_reduced_ = 0;
    for (int s = 0; s < p_; ++s) {
      double stage = 0;
      for (int k = 0; k < d_; ++k) stage = std::max(stage, col_done_[static_cast<size_t>(k) * p_ + s]);
      reduced_[s] = stage + ring_[s];
      sum_reduced_ += reduced_[s];
      t = std::max(t, reduced_[s]);
    }
    if (p_ > 1 && r_.tied_bytes > 0) {
      const double both = std::max(reduced_[0], reduced_[p_ - 1]);
      for (int k = 0; k < d_; ++k) t = std::max(t, both + tied_[k]);
    }
    total_ = t;
  }

  const LinkMatrix& m_;
  const PlanRequest& r_;
  ReplicaSim sim_;
  int p_, d_;
  std::vector<int> cell_, spare_, slot_of_, column_, row_;
  std::vector<double> col_done_, col_end_, tied_, ring_, reduced_;
  std::vector<char> dirty_col_, dirty_row_;
  double total_ = 0, sum_reduced_ = 0, sum_col_end_ = 0;
  std::vector<std::pair<int, int>> swaps_;
  std::vector<double> saved_;
  std::vector<std::pair<int, size_t>> saved_cols_, saved_rows_;  // (column or row, offset in saved_)
};

struct TimeAnnealed {
  std::vector<int> cells;
  double cost = kInf;
};

// A simulated time counts as faster only beyond rounding: the same schedule
// summed in another order differs in the last bits, and a tie keeps the plan
// found first (the proxy plan, whose DT-FM cost is the lower one).
bool faster(double a, double b) { return a < b - 1e-9 * b; }

// Annealing on the simulated iteration; the same moves as the proxy's grid.
TimeAnnealed anneal_time(TimeGrid g, const Neighbours& near, long moves, std::mt19937_64& rng) {
  constexpr double kTie = 0.05;
  std::uniform_real_distribution<double> unit(0, 1);
  TimeAnnealed best{g.cells(), g.cost()};
  double current = g.objective(kTie), worse_sum = 0;
  int worse = 0;
  for (int i = 0; i < 200; ++i) {
    random_move(g, near, rng);
    g.evaluate();
    const double delta = g.objective(kTie) - current;
    if (delta > 0) { worse_sum += delta; ++worse; }
    g.undo();
  }
  const double t0 = 0.3 * (worse ? worse_sum / worse / std::log(2.0) : 1e-3);
  const double t_end = t0 * 1e-2;
  const double cool = std::pow(t_end / t0, 1.0 / static_cast<double>(std::max<long>(1, moves)));
  double t = t0;
  for (long i = 0; i < moves; ++i, t *= cool) {
    random_move(g, near, rng);
    g.evaluate();
    const double next = g.objective(kTie);
    if (next <= current || unit(rng) < std::exp((current - next) / t)) {
      current = next;
      g.commit();
      if (faster(g.cost(), best.cost)) { best.cost = g.cost(); best.cells = g.cells(); }
    } else {
      g.undo();
    }
  }
  return best;
}

// First-improvement swaps of any cell with any other cell or pool spare on the
// exact simulated time (ties broken by the slope), within EVALUATIONS replays.
TimeAnnealed descend_time(TimeGrid g, long evaluations) {
  constexpr double kTie = 0.05;
  const int cells = g.stages() * g.replicas(), slots = cells + g.spares();
  double current = g.objective(kTie);
  for (bool improved = true; improved && evaluations > 0;) {
    improved = false;
    for (int a = 0; a < cells; ++a)
      for (int b = a + 1; b < slots && evaluations > 0; ++b, --evaluations) {
        g.swap_slots(a, b);
        g.evaluate();
        const double next = g.objective(kTie);
        if (next < current - 1e-12) {
          current = next;
          improved = true;
          g.commit();
        } else {
          g.undo();
        }
      }
  }
  return {g.cells(), g.cost()};
}

}  // namespace

Groups search_ours(const EdgeCosts& c, const PlanRequest& r, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int p = r.stages, d = r.replicas, cells = p * d;
  const std::vector<int> pool = candidate_pool(c, r);
  const Neighbours near = nearest(c, pool, 12);
  auto outside = [&](const Groups& groups) {  // the pool's devices not in GROUPS
    std::vector<char> in(c.n, 0);
    for (const auto& g : groups)
      for (int x : g) in[x] = 1;
    std::vector<int> spares;
    for (int x : pool)
      if (!in[x]) spares.push_back(x);
    return spares;
  };
  // Starts: stage groups as data-parallel clusters; pipelines as pipeline
  // clusters; random grids.
  std::vector<std::vector<int>> starts;
  {
    std::vector<int> placed;
    for (auto& row : clusters(pool, p, d, [&](int a, int b) { return c.dp_at(a, b); }))
      placed.insert(placed.end(), row.begin(), row.end());
    starts.push_back(placed);
    auto columns = clusters(pool, d, p, [&](int a, int b) { return c.pp_at(a, b); });
    placed.assign(cells, 0);
    for (int k = 0; k < d; ++k)
      for (int s = 0; s < p; ++s) placed[static_cast<size_t>(s) * d + k] = columns[k][s];
    starts.push_back(placed);
  }
  const int random_starts = 2;
  for (int i = 0; i < random_starts; ++i) {
    std::vector<int> shuffled = pool;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    shuffled.resize(cells);
    starts.push_back(shuffled);
  }
  // Moves per start grow with the grid; small grids get a floor.
  const int moves = std::max(20000, 2500 * cells);
  const long ordered_moves = std::max(5000, 300 * cells);
  Groups best;
  double best_cost = kInf;
  for (auto& start : starts) {
    Annealed a = anneal(Grid(c, p, d, start, outside({start})), near, moves, rng);
    // The grid's rows in order, then the exact matchings on the ordered cost.
    Groups groups(p);
    for (int s = 0; s < p; ++s) groups[s].assign(a.cells.begin() + s * d, a.cells.begin() + (s + 1) * d);
    std::vector<int> spares = outside(groups);
    groups = ordered_anneal(c, groups, spares, ordered_moves, rng);
    groups = ordered_descent(c, groups, outside(groups), 100000);
    const double exact = Scorer(c, groups).total();
    if (exact < best_cost) { best_cost = exact; best = std::move(groups); }
  }
  // Exact swaps: affordable on small grids, where they close the last gap.
  if (cells <= 32) best = polish(c, best, outside(best), 200000);
  return best;
}

}  // namespace sn::sched::detail

namespace sn::sched::detail {

std::vector<std::vector<int>> search_time(const LinkMatrix& m, const EdgeCosts& c, const PlanRequest& r,
                                          const std::vector<std::vector<int>>& start, uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x7157u);
  const int p = r.stages, d = r.replicas, cells = p * d;
  std::vector<int> pool = candidate_pool(c, r);
  std::vector<int> first(cells);
  for (int s = 0; s < p; ++s)
    for (int k = 0; k < d; ++k) first[static_cast<size_t>(s) * d + k] = start[s][k];
  // The start's devices stay in the pool, whichever the pool's rule picked.
  for (int x : first)
    if (std::find(pool.begin(), pool.end(), x) == pool.end()) pool.push_back(x);
  std::sort(pool.begin(), pool.end());
  const Neighbours near = nearest(c, pool, 12);
  auto outside = [&](const std::vector<int>& placed) {
    std::vector<char> in(c.n, 0);
    for (int x : placed) in[x] = 1;
    std::vector<int> spares;
    for (int x : pool)
      if (!in[x]) spares.push_back(x);
    return spares;
  };
  std::vector<std::vector<int>> starts{first};
  {
    std::vector<int> placed(cells);
    auto columns = clusters(pool, d, p, [&](int a, int b) { return c.pp_at(a, b); });
    for (int k = 0; k < d; ++k)
      for (int s = 0; s < p; ++s) placed[static_cast<size_t>(s) * d + k] = columns[k][s];
    starts.push_back(placed);
  }
  const long moves = std::max(20000L, 1500L * cells);
  TimeAnnealed best{first, TimeGrid(m, r, first, outside(first)).cost()};
  for (const auto& from : starts) {
    TimeAnnealed a = anneal_time(TimeGrid(m, r, from, outside(from)), near, moves, rng);
    a = descend_time(TimeGrid(m, r, a.cells, outside(a.cells)), 200000);
    if (faster(a.cost, best.cost)) best = std::move(a);
  }
  std::vector<std::vector<int>> out(p);
  for (int s = 0; s < p; ++s)
    out[s].assign(best.cells.begin() + static_cast<std::ptrdiff_t>(s) * d,
                  best.cells.begin() + static_cast<std::ptrdiff_t>(s + 1) * d);
  return out;
}

}  // namespace sn::sched::detail
