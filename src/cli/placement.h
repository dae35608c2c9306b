// Placing a job's stages and replicas on discovered nodes, and choosing how
// links are emulated (raw or scaled to the anchor's setting).
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <vector>

#include "cli/job_runner.h"
#include "net/transport.h"

namespace sn::cli {

struct Placement {
  std::vector<net::MemberInfo> members;  // index = stage × replicas + replica
  std::string algo;
  std::string emulate = "raw";
  EmulationScale scale;
  double predicted_iteration_s = 0;      // from the scheduler's simulator (0: none)
  double dtfm_cost_s = 0;
  nlohmann::json prediction;             // the simulator's split and its inputs (docs/scheduler.md)
  nlohmann::json to_json() const;
};

Result<Placement> place_job(const RunSpec& spec, const std::vector<solvernet::v1::NodeInfo>& nodes);
void print_placement(const Placement& placement, std::ostream& out);

// The anchor setting scaled links imitate (DESIGN.md, "Scaled links";
// docs/topology.md): DT-FM's GPT-3 XL on V100s, per micro-batch and stage.
struct AnchorSetting {
  const char* name = "gpt3-xl";
  double activation_bytes = 0.466e9;     // c_pp: one micro-batch's activations
  double gradient_bytes = 0.65e9;        // c_dp: one stage's gradients
  double compute_seconds = 2.96;         // fwd+bwd of one micro-batch on one stage
};
EmulationScale scale_for(const JobConfig& job, double measured_compute_seconds,
                              const AnchorSetting& anchor = {});

}  // namespace sn::cli
