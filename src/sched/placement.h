// Placing a job's stages and replicas on discovered nodes, and choosing how
// links are emulated (raw or scaled to the anchor's setting): the policy the
// `train` and `devnet` commands apply, as a library so that a client can
// re-plan and tests can reach it. Pure policy over the candidates it is given
// (the caller discovers them and checks they are alive); the measurements it
// needs come in as function objects, so sched stays free of tensors.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "net/local_mesh.h"
#include "net/topology.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"

namespace sn::sched {

struct PlacementRequest {
  JobConfig job;
  std::optional<Topology> topology;  // links to emulate; none: raw loopback, nodes in id order
  std::string emulate;               // "raw" | "scaled"; empty: the topology's own mode
  std::string algo = "ours";         // ours | dtfm | random | naive (sched::make_plan)
  uint64_t seed = 1;
  double time_dilation = 0;          // > 0: this T instead of measuring compute; host costs then count as 0
  unsigned host_cores = 0;           // cores of a host that all nodes share (0: this machine's)
  // Plan from the links the nodes measured and announced (net/probe.h) rather
  // than from the topology (which, if given, still sets the emulation). A pair
  // nobody measured is planned as net::kUnmeasuredLink and named in
  // Placement::unmeasured.
  bool measured_links = false;
};

// What placement measures on this machine, supplied by the caller (the CLI
// passes train's and net's measuring functions; tests pass constants). Each is
// called at most once per place_job, and only when needed.
struct Measurements {
  std::function<double(const JobConfig&)> microbatch_seconds;   // fwd+bwd of one micro-batch on one stage, s
  std::function<double(const JobConfig&)> step_update_seconds;  // the update ending each step, s
  std::function<Result<net::MessageCost>(size_t small_bytes, size_t large_bytes)> message_cost;
};

struct Placement {
  std::vector<net::MemberInfo> members;  // index = stage × replicas + replica
  std::string algo;
  std::string emulate = "raw";
  EmulationScale scale;
  double predicted_iteration_s = 0;      // from the scheduler's simulator (0: none)
  double dtfm_cost_s = 0;
  nlohmann::json prediction;             // the simulator's split and its inputs (docs/scheduler.md)
  std::string links = "none";            // what the plan's links came from: "topology", "measured" or "none"
  std::vector<std::string> unmeasured;   // measured links: pairs "a1b2c3d4-e5f6a7b8" planned with the default
  nlohmann::json to_json() const;
};

// Chooses stages × replicas of NODES (every one assumed alive). Errors: fewer
// nodes than the job needs (unavailable), a node in a region the topology does
// not define (invalid_input), a failed measurement or plan. Nothing is changed
// on failure.
Result<Placement> place_job(const PlacementRequest& request, const std::vector<solvernet::v1::NodeInfo>& nodes,
                            const Measurements& measure);
void print_placement(const Placement& placement, std::ostream& out);

// The anchor setting scaled links imitate (DESIGN.md, "Scaled links";
// docs/topology.md): DT-FM's GPT-3 XL on V100s, per micro-batch and stage.
struct AnchorSetting {
  const char* name = "gpt3-xl";
  double activation_bytes = 0.466e9;     // c_pp: one micro-batch's activations
  double gradient_bytes = 0.65e9;        // c_dp: one stage's gradients
  double compute_seconds = 2.96;         // fwd+bwd of one micro-batch on one stage
};
EmulationScale scale_for(const JobConfig& job, double measured_compute_seconds, const AnchorSetting& anchor = {});

}  // namespace sn::sched
