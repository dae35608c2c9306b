// The iteration simulator: plays every replica's pipeline op by op (GPipe or
// 1F1B order), then each stage's ring all-reduce and the tied-embedding
// exchange between the first and last stage (docs/scheduler.md).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "sched/internal.h"

namespace sn::sched {
namespace detail {
namespace {

// The order stage S of P runs M micro-batches in. GPipe: every forward, then
// every backward. 1F1B: P−S−1 warm-up forwards, then one forward and one
// backward in turn, then the remaining backwards.
std::vector<SimOp> stage_order(const std::string& schedule, int s, int p, int m) {
  std::vector<SimOp> ops;
  if (schedule == "1f1b") {
    const int warmup = std::min(p - s - 1, m);
    for (int i = 0; i < warmup; ++i) ops.push_back({true, i});
    for (int j = 0; j < m - warmup; ++j) {
      ops.push_back({true, warmup + j});
      ops.push_back({false, j});
    }
    for (int i = m - warmup; i < m; ++i) ops.push_back({false, i});
  } else {
    for (int i = 0; i < m; ++i) ops.push_back({true, i});
    for (int i = 0; i < m; ++i) ops.push_back({false, i});
  }
  return ops;
}

}  // namespace

ReplicaSim::ReplicaSim(const LinkMatrix& m, const PlanRequest& r)
    : m_(m), r_(r), p_(r.stages), mb_(r.micro_batches) {
  order_.resize(p_);
  for (int s = 0; s < p_; ++s) order_[s] = stage_order(r.schedule, s, p_, mb_);
  fwd_ = r.compute_seconds_per_microbatch_stage / 3;
  bwd_ = 2 * fwd_;
  host_fwd_ = r.host_seconds(r.activation_bytes);
  host_bwd_ = r.host_seconds(r.backward_bytes());
  act_ready_.resize(static_cast<size_t>(p_) * mb_);
  grad_ready_.resize(static_cast<size_t>(p_) * mb_);
  device_free_.resize(p_);
  down_free_.resize(p_);
  up_free_.resize(p_);
  next_.resize(p_);
}

// Each device runs its ops in order; each directed link carries one message at
// a time, in the order they were produced (bytes/β), then α in flight.
void ReplicaSim::run(const int* devices, double* done) {
  constexpr double kUnknown = -1;
  std::fill(act_ready_.begin(), act_ready_.end(), kUnknown);
  std::fill(grad_ready_.begin(), grad_ready_.end(), kUnknown);
  for (int i = 0; i < mb_; ++i) act_ready_[i] = 0;
  std::fill(device_free_.begin(), device_free_.end(), 0.0);
  std::fill(down_free_.begin(), down_free_.end(), 0.0);
  std::fill(up_free_.begin(), up_free_.end(), 0.0);
  std::fill(next_.begin(), next_.end(), size_t{0});
  const double fwd_bytes = r_.activation_bytes, bwd_bytes = r_.backward_bytes();
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < p_; ++s)
      for (; next_[s] < order_[s].size(); ++next_[s]) {
        const SimOp op = order_[s][next_[s]];
        const size_t at = static_cast<size_t>(s) * mb_ + op.micro_batch;
        const double ready = op.forward ? act_ready_[at] : grad_ready_[at];
        if (ready == kUnknown) break;
        const double end = std::max(device_free_[s], ready) + (op.forward ? fwd_ : bwd_);
        device_free_[s] = end;
        progress = true;
        if (op.forward && s + 1 < p_) {
          const LinkSpec& link = m_.at(devices[s], devices[s + 1]);
          down_free_[s] = std::max(end, down_free_[s]) + fwd_bytes / link.bytes_per_second() + host_fwd_;
          act_ready_[at + mb_] = down_free_[s] + link.latency_ms / 1e3;
        } else if (op.forward) {
          grad_ready_[at] = end;
        } else if (s > 0) {
          const LinkSpec& link = m_.at(devices[s], devices[s - 1]);
          up_free_[s] = std::max(end, up_free_[s]) + bwd_bytes / link.bytes_per_second() + host_bwd_;
          grad_ready_[at - mb_] = up_free_[s] + link.latency_ms / 1e3;
        }
      }
  }
  for (int s = 0; s < p_; ++s) done[s] = device_free_[s];
}

// Ring all-reduce over one stage's replicas in replica order: 2(D−1) steps,
// each moving gradient_bytes/D over the ring's slowest hop.
double ring_allreduce_seconds(const LinkMatrix& m, const PlanRequest& r, const int* devices) {
  const int d = r.replicas;
  if (d <= 1) return 0;
  double step = 0;
  for (int k = 0; k < d; ++k)
    step = std::max(step, m.at(devices[k], devices[(k + 1) % d]).transfer_seconds(r.gradient_bytes / d));
  return 2 * (d - 1) * (step + r.host_seconds(r.gradient_bytes / d));
}

double tied_swap_seconds(const LinkMatrix& m, const PlanRequest& r, int first, int last) {
  return r.host_seconds(r.tied_bytes) +
         std::max(m.at(first, last).transfer_seconds(r.tied_bytes), m.at(last, first).transfer_seconds(r.tied_bytes));
}

}  // namespace detail

double PlanRequest::host_seconds(double bytes) const {
  const double messages = max_message_bytes > 0 ? std::max(1.0, std::ceil(bytes / max_message_bytes)) : 1.0;
  return messages * message_fixed_s + bytes * message_per_byte_s;
}

double iteration_cpu_seconds(const PlanRequest& r, double update_s, double cpu_fixed_s, double cpu_per_byte_s) {
  const double p = r.stages, d = r.replicas, mb = r.micro_batches;
  auto messages = [&](double count, double bytes) {
    const double pieces = r.max_message_bytes > 0 ? std::max(1.0, std::ceil(bytes / r.max_message_bytes)) : 1.0;
    return count * (pieces * cpu_fixed_s + bytes * cpu_per_byte_s);
  };
  double cpu = p * d * (mb * r.compute_seconds_per_microbatch_stage + update_s);
  cpu += messages(d * (p - 1) * mb, r.activation_bytes) + messages(d * (p - 1) * mb, r.backward_bytes());
  if (d > 1) cpu += messages(p * d * 2 * (d - 1), r.gradient_bytes / d);
  if (p > 1 && r.tied_bytes > 0) cpu += messages(2 * d, r.tied_bytes);
  cpu += messages(2 * p * d, 0);
  return cpu;
}

TimeSharedIteration time_shared_iteration(const Plan& dedicated, double cpu_floor_s, double update_s, double cores) {
  const double path_s = dedicated.predicted_iteration_s;
  const double path_cpu_s = std::min(path_s, dedicated.compute_s + update_s);
  return {std::max(cpu_floor_s, path_s), cpu_floor_s + path_s - path_cpu_s / std::max(1.0, cores)};
}

void simulate(const LinkMatrix& m, const PlanRequest& r, Plan& plan) {
  const int p = r.stages, d = r.replicas, mb = r.micro_batches;
  const double fwd = r.compute_seconds_per_microbatch_stage / 3, bwd = 2 * fwd;
  double worst_link = -1;
  for (int k = 0; k < d; ++k)
    for (int s = 0; s + 1 < p; ++s) {
      const int a = plan.stage_devices[s][k], b = plan.stage_devices[s + 1][k];
      const double t = m.at(a, b).transfer_seconds(r.activation_bytes);
      if (t > worst_link) {
        worst_link = t;
        plan.slowest_link = fmt::format("device {} -> device {} ({:.3g} ms, {:.4g} Mbps)", a, b,
                                        m.at(a, b).latency_ms, m.at(a, b).bandwidth_mbps);
      }
    }
  detail::ReplicaSim replica(m, r);
  std::vector<double> stage_done(p, 0), done(p);  // when every replica's last op is over, per stage
  std::vector<int> column(p);
  for (int k = 0; k < d; ++k) {
    for (int s = 0; s < p; ++s) column[s] = plan.stage_devices[s][k];
    replica.run(column.data(), done.data());
    for (int s = 0; s < p; ++s) stage_done[s] = std::max(stage_done[s], done[s]);
  }
  const double pipeline_end = *std::max_element(stage_done.begin(), stage_done.end());
  std::vector<double> reduced = stage_done;
  for (int s = 0; s < p; ++s) reduced[s] += detail::ring_allreduce_seconds(m, r, plan.stage_devices[s].data());
  double iteration = *std::max_element(reduced.begin(), reduced.end());
  // A tied embedding: the first and the last stage of each replica swap their
  // gradients of it once both are reduced (both directions at once).
  if (p > 1 && r.tied_bytes > 0)
    for (int k = 0; k < d; ++k)
      iteration = std::max(iteration, std::max(reduced[0], reduced[p - 1]) +
                                          detail::tied_swap_seconds(m, r, plan.stage_devices[0][k],
                                                                    plan.stage_devices[p - 1][k]));
  plan.compute_s = (mb + p - 1) * (fwd + bwd);
  plan.pipeline_s = std::max(0.0, pipeline_end - plan.compute_s);
  plan.data_parallel_s = iteration - pipeline_end;
  plan.overhead_s = r.step_overhead_s;
  plan.predicted_iteration_s = std::max(iteration + r.step_overhead_s, r.host_cpu_floor_s);
}

}  // namespace sn::sched
