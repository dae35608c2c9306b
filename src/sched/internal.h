// Private to src/sched: the DT-FM cost pieces shared by the searches.
#pragma once

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "sched/sched.h"

namespace sn::sched::detail {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// Edge weights of DT-FM's cost, precomputed for every ordered pair of devices:
//   dp(a, b) = 2(α + c_dp / (D·β))   one device's share of a data-parallel exchange
//   pp(a, b) = α + c_pp / β          one micro-batch's activations across a stage link
// with α in s, β in bytes/s, c_pp the mean of the forward and backward bytes.
struct EdgeCosts {
  int n = 0;
  std::vector<double> dp, pp;  // n × n, row-major; the diagonal is 0
  EdgeCosts(const LinkMatrix& links, const PlanRequest& request);
  double dp_at(int a, int b) const { return dp[static_cast<size_t>(a) * n + b]; }
  double pp_at(int a, int b) const { return pp[static_cast<size_t>(a) * n + b]; }
};

// max over d in GROUP of Σ_{e in GROUP} dp(d, e).
double group_dp_cost(const EdgeCosts& c, const std::vector<int>& group);

// Bottleneck perfect matching between groups A and B on pp: the smallest
// threshold admitting a perfect matching. PAIR_OF_A[i] = index into B.
double bottleneck_matching(const EdgeCosts& c, const std::vector<int>& a, const std::vector<int>& b,
                           std::vector<int>* pair_of_a);

// Open-path TSP over a symmetric matrix: exact (bitmask DP) up to 13 nodes,
// otherwise nearest neighbour from every start + 2-opt. Returns the order.
std::vector<int> open_path_tsp(const std::vector<std::vector<double>>& w, double* total);

// DT-FM's score of a partition, with per-group and per-pair costs cached so a
// search can change two groups and rescore.
struct Scorer {
  const EdgeCosts& c;
  Groups groups;
  std::vector<double> dp;
  std::vector<std::vector<double>> pp;
  Scorer(const EdgeCosts& costs, Groups g);
  void refresh(int g);
  double total() const;  // max dp + 2 · open-path TSP over pp
};

Groups naive_groups(const PlanRequest& r);
Groups random_groups(int n, const PlanRequest& r, std::mt19937_64& rng);
std::vector<int> spares_of(int n, const Groups& g);

// The searches (docs/scheduler.md).
Groups search_dtfm(const EdgeCosts& c, const PlanRequest& r, uint64_t seed);
Groups search_ours(const EdgeCosts& c, const PlanRequest& r, uint64_t seed);
// Ours with objective "time": a placement [stage][replica] (ordered and paired,
// as simulate() plays it) minimising the simulated iteration, no slower than
// START (an ordered placement, e.g. the proxy search's) by that measure.
std::vector<std::vector<int>> search_time(const LinkMatrix& m, const EdgeCosts& c, const PlanRequest& r,
                                          const std::vector<std::vector<int>>& start, uint64_t seed);

// The simulator's pieces, shared by simulate() and the time search so that the
// search ranks placements by exactly the figure simulate() reports.
struct SimOp {
  bool forward;
  int micro_batch;
};

// One replica's pipeline, played op by op. Scratch is kept between runs: one
// object per thread of search.
class ReplicaSim {
 public:
  ReplicaSim(const LinkMatrix& m, const PlanRequest& r);
  // DEVICES[s] runs stage s of this replica; DONE[s] receives when its last op ends (s).
  void run(const int* devices, double* done);

 private:
  const LinkMatrix& m_;
  const PlanRequest& r_;
  int p_, mb_;
  double fwd_ = 0, bwd_ = 0, host_fwd_ = 0, host_bwd_ = 0;
  std::vector<std::vector<SimOp>> order_;
  std::vector<double> act_ready_, grad_ready_, device_free_, down_free_, up_free_;
  std::vector<size_t> next_;
};

// Seconds of one stage's ring all-reduce over DEVICES[0..D) in that order.
double ring_allreduce_seconds(const LinkMatrix& m, const PlanRequest& r, const int* devices);
// Seconds of the tied-embedding swap between a replica's first and last stage.
double tied_swap_seconds(const LinkMatrix& m, const PlanRequest& r, int first, int last);

}  // namespace sn::sched::detail
