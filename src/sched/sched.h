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
  double activation_bytes = 0;                     // c_pp: one micro-batch's activations between stages
  double gradient_bytes = 0;                       // c_dp: one stage's gradients
  double compute_seconds_per_microbatch_stage = 0; // forward+backward of one micro-batch on one stage
  int micro_batches = 1;                           // per replica per iteration
  std::string schedule = "gpipe";                  // simulator order: "gpipe" or "1f1b"
  int search_trials = 4900;                        // dtfm: GA trials; random: placements tried
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

// algo: "ours" (local search with restarts), "dtfm" (genetic search after DT-FM),
// "random" (best of search_trials random partitions), "naive" (devices in id order).
// Errors (exit code 2): P·D > N, non-positive sizes, unknown algo.
Result<Plan> make_plan(const LinkMatrix& links, const PlanRequest& request,
                       const std::string& algo, uint64_t seed);

// A request for the devnet's GPT: fp32 activations (sequences per micro-batch ×
// seq_len × d_model × 4 bytes), gradients (parameters of one stage × 4 bytes).
PlanRequest request_from_job(const JobConfig& job, double compute_seconds_per_microbatch_stage);

// Reads a model spec (docs/scheduler.md): a [model] table and a [workload] table
// with micro-batch size, element bytes, compression factors and device FLOP/s.
// Errors read `file:line: what is wrong` with exit code 2.
Result<PlanRequest> read_plan_spec(const std::filesystem::path& path, int stages, int replicas);

}  // namespace sn::sched
