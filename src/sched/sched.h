// Placement of a training job's pipeline stages and data-parallel replicas on
// devices joined by uneven links (after DT-FM, see ANCHORS.md and docs/scheduler.md).
// Pure functions over a LinkMatrix; no threads, no tensors. Deterministic for a seed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "net/topology.h"

namespace sn::sched {

struct PlanRequest {
  int stages = 1;                                  // P
  int replicas = 1;                                // D; P·D must be ≤ the device count
  double activation_bytes = 0;                     // one micro-batch's activations, stage s → s+1, on the wire
  double activation_gradient_bytes = -1;           // their gradients, s+1 → s (< 0: same as activation_bytes)
  double gradient_bytes = 0;                       // c_dp: one stage's gradients, as a dense ring would move them
  double compute_seconds_per_microbatch_stage = 0; // forward+backward of one micro-batch on one stage
  double tied_bytes = 0;                           // simulator: bytes stage 0 and stage P−1 of a replica
                                                   // exchange after the all-reduce (tied embedding; 0: none)
  double step_overhead_s = 0;                      // simulator: fixed cost per iteration (optimizer, sync, ...)
  double message_fixed_s = 0;                      // simulator: the hosts' own cost of each message beyond
  double message_per_byte_s = 0;                   //   its link (serialize, sign, verify): fixed + bytes·per_byte
  double max_message_bytes = 0;                    // simulator: all-reduce messages are cut to this size (0: whole)
  double host_cpu_floor_s = 0;                     // simulator: the least an iteration takes when every device
                                                   //   shares one host's cores (its CPU work / cores; 0: none)
  int micro_batches = 1;                           // per replica per iteration
  std::string schedule = "gpipe";                  // simulator order: "gpipe" or "1f1b"
  int search_trials = 4900;                        // dtfm: GA trials; random: placements tried
  std::string objective = "time";                  // ours: "time" (the simulator's iteration) or
                                                   //   "dtfm" (DT-FM's cost alone); other searches ignore it

  // The hosts' cost of moving BYTES as messages of at most max_message_bytes.
  double host_seconds(double bytes) const;
  double backward_bytes() const { return activation_gradient_bytes < 0 ? activation_bytes : activation_gradient_bytes; }
  // c_pp of DT-FM's cost: the mean of the two directions, since the score
  // counts the pipeline cost twice (forward and backward).
  double pipeline_bytes() const { return (activation_bytes + backward_bytes()) / 2; }
};

struct Plan {
  std::vector<std::vector<int>> stage_devices;  // [stage][replica] = device index
  double dtfm_cost_s = 0;                       // DataPCost + 2·PipelinePCost (DT-FM's score)
  double data_parallel_cost_s = 0;              // DT-FM DataPCost
  double pipeline_cost_s = 0;                   // DT-FM PipelinePCost
  double predicted_iteration_s = 0;             // the simulator
  double compute_s = 0;                         // simulator: pure compute on the critical path
  double pipeline_s = 0;                        // simulator: pipeline time beyond compute
  double data_parallel_s = 0;                   // simulator: all-reduce after the pipeline
  double overhead_s = 0;                        // simulator: the request's fixed per-step cost
  std::string slowest_link;                     // "dev a -> dev b (lat ms, Mbps)"
  double plan_wall_s = 0;                       // wall time of the search
};

// Groups: a partition of devices into P groups of D (group order irrelevant).
using Groups = std::vector<std::vector<int>>;

// DT-FM's cost of a partition: groups are ordered by an open-path TSP and paired by
// bottleneck perfect matchings. Fills stage_devices (ordered, paired) and the costs.
Plan evaluate_groups(const LinkMatrix& links, const PlanRequest& request, const Groups& groups);

// Plays one iteration event by event on the placement in PLAN.stage_devices and
// fills predicted_iteration_s, compute_s, pipeline_s, data_parallel_s, slowest_link.
void simulate(const LinkMatrix& links, const PlanRequest& request, Plan& plan);

// The CPU one iteration takes from every device together, in seconds, as if
// each had its own core: every device's micro-batches (forward and backward)
// and its UPDATE_S, and every message's cost to both its ends, CPU_FIXED_S +
// bytes · CPU_PER_BYTE_S: the pipeline hops, the ring all-reduce's chunks, the
// tied swap and the client's RunStep request and reply to each device. When
// all devices share one host, an iteration takes at least this / its cores
// (PlanRequest::host_cpu_floor_s), however the pipeline overlaps.
double iteration_cpu_seconds(const PlanRequest& request, double update_s, double cpu_fixed_s, double cpu_per_byte_s);

// An iteration of devices time-sharing one host's CORES (more devices than
// cores), in seconds. DEDICATED is the plan simulated as if each device had
// its own core, CPU_FLOOR_S the host's floor (iteration_cpu_seconds / cores),
// UPDATE_S each device's end-of-step update. With work W = floor · C, the
// dedicated critical path D and its CPU part D_cpu (the pipeline's compute
// plus the update; links need no core), any schedule takes at least
// max(W/C, D), and the OS scheduler, which keeps every core busy while a
// process can run, at most W/C + D − D_cpu/C (Graham's bound for greedy list
// scheduling, 1969). Where in between depends on how often a process woken by
// a message waits for a core; the expected figure is the midpoint, which kept
// 18 devnet runs within 21% while the bounds held 15 of them
// (docs/scheduler.md).
struct TimeSharedIteration {
  double lower_s = 0, upper_s = 0;
  double expected_s() const { return (lower_s + upper_s) / 2; }
};
TimeSharedIteration time_shared_iteration(const Plan& dedicated, double cpu_floor_s, double update_s, double cores);

// Input limits beyond the job's (core/job.h) and the topology's (net/topology.h).
inline constexpr int kMaxMicroBatches = 1 << 20;

// Estimated peak memory of planning on DEVICES devices, the link matrix included
// (about 48 bytes per device pair).
uint64_t plan_memory_bytes(int devices);
// An input error (exit 2, nothing allocated) if planning on DEVICES devices exceeds
// kMaxDevices or half of this machine's memory; the message names the estimate and
// the memory. make_plan checks it too; callers building a LinkMatrix call it first.
Status check_plan_size(int devices);

// algo: "ours" (local search with restarts), "dtfm" (genetic search after DT-FM),
// "random" (best of search_trials random partitions), "naive" (devices in id order).
// "ours" minimises request.objective: "time", the simulated iteration (simulate();
// it starts from its own DT-FM-cost search and never returns a slower placement
// than that one), or "dtfm", DT-FM's cost alone. The other searches minimise DT-FM's
// cost whatever the objective. Errors (exit code 2): P·D > N, sizes out of range,
// non-finite links or request figures, a plan too large for this machine's memory
// (check_plan_size, or the simulator's 32 bytes per stage and micro-batch), unknown
// algo, schedule or objective.
Result<Plan> make_plan(const LinkMatrix& links, const PlanRequest& request,
                       const std::string& algo, uint64_t seed);

// A request for the devnet's GPT: activations of sequences per micro-batch ×
// seq_len × d_model elements and the gradients of one stage's parameters, sized
// as the job's [compression] puts them on the wire (docs/scheduler.md).
PlanRequest request_from_job(const JobConfig& job, double compute_seconds_per_microbatch_stage);

// Bytes on the wire (docs/compression.md) for NUMEL elements in rows of ROW_LENGTH.
// activations: per direction; gradients: one replica's message, then the dense
// ring volume with the same cost (a compressed all-gather moves (D−1)·message
// per replica, a ring 2(D−1)/D·c, so c = D·message/2; "none" stays 4·numel).
double activation_wire_bytes(const CompressionConfig& config, bool forward, double numel, double row_length,
                             double samples);
double gradient_message_bytes(const CompressionConfig& config, double numel);
double gradient_ring_equivalent_bytes(const CompressionConfig& config, double numel, int replicas);

// Reads a model spec (docs/scheduler.md): a [model] table and a [workload] table
// with micro-batch size, element bytes, compression factors and device FLOP/s.
// Errors read `file:line: what is wrong` with exit code 2.
Result<PlanRequest> read_plan_spec(const std::filesystem::path& path, int stages, int replicas);

}  // namespace sn::sched
