#include "sched/placement.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "net/probe.h"
#include "sched/sched.h"

namespace sn::sched {

EmulationScale scale_for(const JobConfig& job, double measured_compute_seconds, const AnchorSetting& anchor) {
  double activation_bytes = static_cast<double>(job.sequences_per_micro_batch() * job.model.seq_len *
                                                job.model.d_model * 4);
  EmulationScale scale;
  scale.time_dilation = measured_compute_seconds / anchor.compute_seconds;
  scale.byte_ratio = activation_bytes / anchor.activation_bytes;
  // The last stage holds layers / stages layers (train gives the remainder to
  // the first stages).
  const int64_t last_stage_layers = job.model.layers / std::max<int64_t>(1, job.parallel.stages);
  double gradient_bytes = static_cast<double>(job.model.layer_parameter_count() * last_stage_layers * 4);
  scale.gradient_byte_ratio = gradient_bytes / anchor.gradient_bytes;
  return scale;
}

// Whether every node listens on the same host (the devnet: all on 127.0.0.1).
static bool one_host(const std::vector<solvernet::v1::NodeInfo>& nodes) {
  auto host = [](const std::string& address) { return address.substr(0, address.rfind(':')); };
  for (const auto& n : nodes)
    if (host(n.address()) != host(nodes.front().address())) return false;
  return !nodes.empty();
}

static net::MemberInfo member_of(const solvernet::v1::NodeInfo& node, int stage, int replica) {
  net::MemberInfo m;
  m.node_id = node.node_id();
  std::memcpy(m.public_key.data(), node.public_key().data(), std::min<size_t>(32, node.public_key().size()));
  m.address = node.address();
  m.region = node.region();
  m.stage = stage;
  m.replica = replica;
  return m;
}

Result<Placement> place_job(const PlacementRequest& spec, const std::vector<solvernet::v1::NodeInfo>& all_nodes,
                            const Measurements& measure) {
  const auto& job = spec.job;
  const size_t needed = static_cast<size_t>(job.parallel.stages * job.parallel.replicas);
  if (all_nodes.size() < needed)
    return kind_error(ErrorKind::unavailable, "the job needs {} nodes ({} stages × {} replicas), {} are available", needed,
                      job.parallel.stages, job.parallel.replicas, all_nodes.size());
  std::vector<solvernet::v1::NodeInfo> nodes = all_nodes;
  // Devices in a stable order: by region as the topology lists them, then id.
  auto region_rank = [&](const std::string& region) {
    int i = spec.topology ? spec.topology->region_index(region) : -1;
    return i < 0 ? 1 << 20 : i;
  };
  std::sort(nodes.begin(), nodes.end(), [&](const auto& a, const auto& b) {
    return std::make_pair(region_rank(a.region()), a.node_id()) < std::make_pair(region_rank(b.region()), b.node_id());
  });
  if (spec.topology)
    for (const auto& n : nodes)
      if (spec.topology->region_index(n.region()) < 0)
        return input_error("node {} is in region \"{}\", which topology \"{}\" does not define",
                          n.node_id().substr(0, 8), n.region(), spec.topology->name);

  Placement placement;
  placement.emulate = spec.topology ? (spec.emulate.empty() ? spec.topology->mode : spec.emulate) : "none";
  const bool use_scheduler = (spec.topology || spec.measured_links) && spec.algo != "naive";
  AnchorSetting anchor;
  // Our compute per micro-batch and stage: needed to scale links and to plan.
  double compute = 0;
  if (placement.emulate == "scaled" || use_scheduler)
    compute = spec.time_dilation > 0 ? spec.time_dilation * anchor.compute_seconds
                                     : (measure.microbatch_seconds ? measure.microbatch_seconds(job) : 0.0);
  if (placement.emulate == "scaled") placement.scale = scale_for(job, compute, anchor);

  std::vector<std::vector<int>> stage_devices;
  if (use_scheduler) {
    // Devices as the scheduler sees them: the nodes' links as they will be emulated.
    LinkMatrix links;
    if (spec.measured_links) {
      std::vector<std::pair<int, int>> missing;
      SN_ASSIGN(links, net::link_matrix_from_estimates(nodes, net::kUnmeasuredLink, &missing));
      for (int a = 0; a < links.n; ++a)
        for (int b = 0; b < links.n; ++b)
          if (a != b) links.at(a, b) = placement.scale.apply(links.at(a, b));
      for (const auto& [a, b] : missing)
        placement.unmeasured.push_back(nodes[static_cast<size_t>(a)].node_id().substr(0, 8) + "-" +
                                       nodes[static_cast<size_t>(b)].node_id().substr(0, 8));
      placement.links = "measured";
    } else {
      std::vector<int> region_of;
      for (const auto& n : nodes) region_of.push_back(spec.topology->region_index(n.region()));
      SN_ASSIGN(links, link_matrix_for(*spec.topology, region_of, placement.scale));
      placement.links = "topology";
    }
    PlanRequest request = request_from_job(job, compute);
    request.gradient_bytes *= placement.scale.pacing_weight(true);
    request.tied_bytes *= placement.scale.pacing_weight(true);
    // Nodes on one host share its cores: with more busy workers than cores each
    // computes at cores/workers of its own speed (all busy at once: pessimistic
    // in the pipeline's bubbles). Real deployments give every node its cores.
    const double workers = static_cast<double>(needed);
    const double cores = std::max(1u, spec.host_cores > 0 ? spec.host_cores : std::thread::hardware_concurrency());
    const double host_share = one_host(nodes) ? std::max(1.0, workers / cores) : 1.0;
    // What the micro-batch timing leaves out, measured here unless T is given:
    // the update that ends every step on every stage (optimizer, state hash)
    // with the client's RunStep request and reply, and each message's cost to
    // the hosts themselves (serialize, sign, gRPC, verify) beyond its link.
    double update = 0;
    net::MessageCost message_cost;
    if (spec.time_dilation <= 0) {
      if (measure.step_update_seconds) update = measure.step_update_seconds(job);
      if (measure.message_cost) {
        auto measured = measure.message_cost(static_cast<size_t>(request.activation_bytes),
                                             static_cast<size_t>(std::max(request.max_message_bytes, request.activation_bytes)));
        if (!measured.ok()) return make_error("measuring the transport: {}", measured.message());
        message_cost = *measured;
      }
    }
    request.step_overhead_s = update + 2 * message_cost.fixed_s;
    request.message_fixed_s = message_cost.fixed_s;
    request.message_per_byte_s = message_cost.per_byte_s;
    PlanRequest dedicated = request;
    // Nodes on one host also take CPU from one another while they wait (the
    // other end of each message, gRPC's threads): with more nodes than cores
    // the step is at least the CPU all of them spend, over the cores.
    const double cpu_s = iteration_cpu_seconds(request, update, message_cost.cpu_fixed_s, message_cost.cpu_per_byte_s);
    if (one_host(nodes)) request.host_cpu_floor_s = cpu_s / cores;
    request.compute_seconds_per_microbatch_stage *= host_share;
    request.step_overhead_s *= host_share;
    request.message_fixed_s *= host_share;
    request.message_per_byte_s *= host_share;
    SN_ASSIGN(Plan plan, make_plan(links, request, spec.algo, spec.seed));
    stage_devices = plan.stage_devices;
    placement.algo = spec.algo;
    placement.predicted_iteration_s = plan.predicted_iteration_s;
    placement.dtfm_cost_s = plan.dtfm_cost_s;
    Plan alone = plan;
    simulate(links, dedicated, alone);
    // The search above compares placements as if all nodes computed at once at
    // cores/workers of their speed; the step it will take is reported from the
    // time-sharing bounds instead, which the devnet's steps follow.
    std::optional<TimeSharedIteration> time_shared;
    if (host_share > 1) {
      time_shared = time_shared_iteration(alone, request.host_cpu_floor_s, update, cores);
      placement.predicted_iteration_s = time_shared->expected_s();
    }
    placement.prediction = {{"schedule", request.schedule},
                            {"compute_per_microbatch_stage_s", compute},
                            {"step_update_s", update},
                            {"message_fixed_s", message_cost.fixed_s},
                            {"message_per_byte_s", message_cost.per_byte_s},
                            {"message_cpu_fixed_s", message_cost.cpu_fixed_s},
                            {"message_cpu_per_byte_s", message_cost.cpu_per_byte_s},
                            {"iteration_cpu_s", cpu_s},
                            {"host_cpu_floor_s", request.host_cpu_floor_s},
                            {"host_cpu_share", host_share},
                            {"compute_s", plan.compute_s},
                            {"pipeline_s", plan.pipeline_s},
                            {"data_parallel_s", plan.data_parallel_s},
                            {"overhead_s", plan.overhead_s},
                            {"activation_bytes", request.activation_bytes},
                            {"activation_gradient_bytes", request.backward_bytes()},
                            {"gradient_bytes", request.gradient_bytes},
                            {"tied_bytes", request.tied_bytes},
                            {"predicted_dedicated_cores_s", alone.predicted_iteration_s}};
    if (time_shared) {
      placement.prediction["time_shared_lower_s"] = time_shared->lower_s;
      placement.prediction["time_shared_upper_s"] = time_shared->upper_s;
    }
  } else {
    placement.algo = "naive";
    for (int64_t s = 0; s < job.parallel.stages; ++s) {
      stage_devices.emplace_back();
      for (int64_t r = 0; r < job.parallel.replicas; ++r)
        stage_devices.back().push_back(static_cast<int>(s * job.parallel.replicas + r));
    }
  }
  for (size_t s = 0; s < stage_devices.size(); ++s)
    for (size_t r = 0; r < stage_devices[s].size(); ++r)
      placement.members.push_back(member_of(nodes[static_cast<size_t>(stage_devices[s][r])], static_cast<int>(s),
                                            static_cast<int>(r)));
  return placement;
}

nlohmann::json Placement::to_json() const {
  nlohmann::json j;
  j["algo"] = algo;
  nlohmann::json stages = nlohmann::json::array();
  for (const auto& m : members) {
    if (static_cast<size_t>(m.stage) >= stages.size()) stages.push_back(nlohmann::json::array());
    stages[static_cast<size_t>(m.stage)].push_back({{"node_id", m.node_id}, {"address", m.address}, {"region", m.region}});
  }
  j["stages"] = stages;
  if (predicted_iteration_s > 0) j["predicted_iteration_s"] = predicted_iteration_s;
  if (dtfm_cost_s > 0) j["dtfm_cost_s"] = dtfm_cost_s;
  if (!prediction.is_null()) j["prediction"] = prediction;
  j["links"] = links;
  if (!unmeasured.empty()) j["unmeasured_links"] = unmeasured;
  return j;
}

void print_placement(const Placement& p, std::ostream& out) {
  out << fmt::format("placement ({}):\n", p.algo);
  for (const auto& m : p.members)
    out << fmt::format("  stage {} replica {}  node {}  {}  [{}]\n", m.stage, m.replica, m.node_id.substr(0, 8),
                       m.address, m.region);
  if (p.predicted_iteration_s > 0) out << fmt::format("  predicted step time {:.3f} s\n", p.predicted_iteration_s);
  if (p.links == "measured")
    out << fmt::format("  planned from measured links{}\n",
                       p.unmeasured.empty() ? std::string()
                                            : fmt::format("; {} pair(s) unmeasured, planned as {:g} ms / {:g} Mbps: {}",
                                                          p.unmeasured.size(), net::kUnmeasuredLink.latency_ms,
                                                          net::kUnmeasuredLink.bandwidth_mbps, fmt::join(p.unmeasured, ", ")));
  if (p.emulate == "scaled")
    out << fmt::format("  links scaled to {}: time dilation T = {:.4g}, byte ratio R = {:.4g} (gradients {:.4g})\n",
                       AnchorSetting{}.name, p.scale.time_dilation, p.scale.byte_ratio, p.scale.gradient_byte_ratio);
}

}  // namespace sn::sched
