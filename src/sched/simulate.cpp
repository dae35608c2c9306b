// The iteration simulator: plays every replica's pipeline op by op (GPipe or
// 1F1B order), then each stage's ring all-reduce and the tied-embedding
// exchange between the first and last stage (docs/scheduler.md).
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "sched/internal.h"

namespace sn::sched {
namespace {

struct Op {
  bool forward;
  int micro_batch;
};

// The order stage S of P runs M micro-batches in. GPipe: every forward, then
// every backward. 1F1B: P−S−1 warm-up forwards, then one forward and one
// backward in turn, then the remaining backwards.
std::vector<Op> stage_order(const std::string& schedule, int s, int p, int m) {
  std::vector<Op> ops;
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

double PlanRequest::host_seconds(double bytes) const {
  const double messages = max_message_bytes > 0 ? std::max(1.0, std::ceil(bytes / max_message_bytes)) : 1.0;
  return messages * message_fixed_s + bytes * message_per_byte_s;
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
  std::vector<std::vector<Op>> order(p);
  for (int s = 0; s < p; ++s) order[s] = stage_order(r.schedule, s, p, mb);
  std::vector<double> stage_done(p, 0);  // when every replica's last op is over, per stage
  for (int k = 0; k < d; ++k) {
    // Each device runs its ops in order; each directed link carries one message
    // at a time, in the order they were produced (bytes/β), then α in flight.
    constexpr double kUnknown = -1;
    std::vector<std::vector<double>> act_ready(p, std::vector<double>(mb, kUnknown));
    std::vector<std::vector<double>> grad_ready(p, std::vector<double>(mb, kUnknown));
    for (int i = 0; i < mb; ++i) act_ready[0][i] = 0;
    std::vector<double> device_free(p, 0), down_free(p, 0), up_free(p, 0);
    std::vector<size_t> next(p, 0);
    for (bool progress = true; progress;) {
      progress = false;
      for (int s = 0; s < p; ++s)
        for (; next[s] < order[s].size(); ++next[s]) {
          const Op op = order[s][next[s]];
          const double ready = op.forward ? act_ready[s][op.micro_batch] : grad_ready[s][op.micro_batch];
          if (ready == kUnknown) break;
          const double end = std::max(device_free[s], ready) + (op.forward ? fwd : bwd);
          device_free[s] = end;
          progress = true;
          if (op.forward && s + 1 < p) {
            const LinkSpec& link = m.at(plan.stage_devices[s][k], plan.stage_devices[s + 1][k]);
            down_free[s] = std::max(end, down_free[s]) + r.activation_bytes / link.bytes_per_second() +
                           r.host_seconds(r.activation_bytes);
            act_ready[s + 1][op.micro_batch] = down_free[s] + link.latency_ms / 1e3;
          } else if (op.forward) {
            grad_ready[s][op.micro_batch] = end;
          } else if (s > 0) {
            const LinkSpec& link = m.at(plan.stage_devices[s][k], plan.stage_devices[s - 1][k]);
            up_free[s] = std::max(end, up_free[s]) + r.backward_bytes() / link.bytes_per_second() +
                         r.host_seconds(r.backward_bytes());
            grad_ready[s - 1][op.micro_batch] = up_free[s] + link.latency_ms / 1e3;
          }
        }
    }
    for (int s = 0; s < p; ++s) stage_done[s] = std::max(stage_done[s], device_free[s]);
  }
  const double pipeline_end = *std::max_element(stage_done.begin(), stage_done.end());
  // Ring all-reduce per stage over its replicas in replica order: 2(D−1) steps,
  // each moving gradient_bytes/D over the ring's slowest hop.
  std::vector<double> reduced = stage_done;
  for (int s = 0; s < p && d > 1; ++s) {
    double step = 0;
    for (int k = 0; k < d; ++k)
      step = std::max(step, m.at(plan.stage_devices[s][k], plan.stage_devices[s][(k + 1) % d])
                                .transfer_seconds(r.gradient_bytes / d));
    reduced[s] += 2 * (d - 1) * (step + r.host_seconds(r.gradient_bytes / d));
  }
  double iteration = *std::max_element(reduced.begin(), reduced.end());
  // A tied embedding: the first and the last stage of each replica swap their
  // gradients of it once both are reduced (both directions at once).
  if (p > 1 && r.tied_bytes > 0)
    for (int k = 0; k < d; ++k) {
      const int a = plan.stage_devices[0][k], b = plan.stage_devices[p - 1][k];
      const double both = std::max(reduced[0], reduced[p - 1]);
      iteration = std::max(iteration, both + r.host_seconds(r.tied_bytes) +
                                          std::max(m.at(a, b).transfer_seconds(r.tied_bytes),
                                                   m.at(b, a).transfer_seconds(r.tied_bytes)));
    }
  plan.compute_s = (mb + p - 1) * (fwd + bwd);
  plan.pipeline_s = std::max(0.0, pipeline_end - plan.compute_s);
  plan.data_parallel_s = iteration - pipeline_end;
  plan.overhead_s = r.step_overhead_s;
  plan.predicted_iteration_s = iteration + r.step_overhead_s;
}

}  // namespace sn::sched
