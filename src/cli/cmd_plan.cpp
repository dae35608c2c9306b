// solvernet plan: place a training job's stages and replicas on a topology.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/command.h"
#include "net/topology.h"
#include "sched/sched.h"

namespace sn::cli {
namespace {

struct PlanArgs {
  std::string topology;
  std::string model;
  int stages = 1;
  int replicas = 1;
  std::string algo = "ours";
  std::string objective = "time";
  uint64_t seed = 1;
  bool json = false;
};

int run_plan(const PlanArgs& args) {
  auto topology = parse_topology_file(args.topology);
  if (!topology.ok()) return fail("plan", topology.message(), topology.error().exit_code);
  auto request = sched::read_plan_spec(args.model, args.stages, args.replicas);
  if (!request.ok()) return fail("plan", request.message(), request.error().exit_code);
  request->objective = args.objective;
  // Refused before the n² link matrix is built (sched::check_plan_size).
  if (auto size = sched::check_plan_size(topology->device_count()); !size.ok())
    return fail("plan", fmt::format("{}: {}", args.topology, size.message()), size.error().exit_code);
  auto matrix = to_link_matrix(*topology);
  if (!matrix.ok()) return fail("plan", fmt::format("{}: {}", args.topology, matrix.message()), matrix.error().exit_code);
  const LinkMatrix& links = *matrix;
  auto plan = sched::make_plan(links, *request, args.algo, args.seed);
  if (!plan.ok()) {
    // The topology is what fell short (e.g. P·D > N): point at its first region.
    const int line = topology->regions.empty() ? 1 : topology->regions.front().line;
    return fail("plan", fmt::format("{}:{}: {}", args.topology, line, plan.message()), plan.error().exit_code);
  }
  if (args.json) {
    nlohmann::json out = {{"algo", args.algo},
                          {"objective", args.objective},
                          {"seed", args.seed},
                          {"devices", links.n},
                          {"stages", args.stages},
                          {"replicas", args.replicas},
                          {"assignment", plan->stage_devices},
                          {"dtfm_cost_s", plan->dtfm_cost_s},
                          {"data_parallel_cost_s", plan->data_parallel_cost_s},
                          {"pipeline_cost_s", plan->pipeline_cost_s},
                          {"predicted_iteration_s", plan->predicted_iteration_s},
                          {"compute_s", plan->compute_s},
                          {"pipeline_s", plan->pipeline_s},
                          {"data_parallel_s", plan->data_parallel_s},
                          {"overhead_s", plan->overhead_s},
                          {"schedule", request->schedule},
                          {"slowest_link", plan->slowest_link},
                          {"plan_wall_s", plan->plan_wall_s}};
    std::cout << out.dump(2) << std::endl;
    return 0;
  }
  std::cout << fmt::format("plan ({}{}, seed {}) for {} stages x {} replicas on {} devices\n", args.algo,
                           args.algo == "ours" ? ", objective " + args.objective : "", args.seed, args.stages,
                           args.replicas, links.n);
  for (size_t s = 0; s < plan->stage_devices.size(); ++s)
    std::cout << fmt::format("  stage {:>2}: devices {}\n", s, fmt::join(plan->stage_devices[s], " "));
  std::cout << fmt::format("DT-FM cost {:.3f} s (data parallel {:.3f} s + 2 x pipeline {:.3f} s)\n",
                           plan->dtfm_cost_s, plan->data_parallel_cost_s, plan->pipeline_cost_s);
  std::cout << fmt::format("predicted iteration {:.3f} s: compute {:.3f} s, pipeline traffic {:.3f} s, "
                           "data-parallel traffic {:.3f} s\n",
                           plan->predicted_iteration_s, plan->compute_s, plan->pipeline_s, plan->data_parallel_s);
  std::cout << "slowest pipeline link: " << plan->slowest_link << "\n";
  std::cout << fmt::format("planned in {:.3f} s\n", plan->plan_wall_s);
  return 0;
}

CommandRegistration plan_command("plan", "Place a training job's pipeline stages and replicas on a topology",
                                 [](CLI::App& app) -> std::function<int()> {
                                   auto args = std::make_shared<PlanArgs>();
                                   app.add_option("--topology", args->topology, "Topology TOML file")->required();
                                   app.add_option("--model", args->model, "Model spec TOML (docs/scheduler.md)")->required();
                                   app.add_option("--stages", args->stages, "P: pipeline stages")->required();
                                   app.add_option("--replicas", args->replicas, "D: replicas per stage")->required();
                                   app.add_option("--algo", args->algo, "ours | dtfm | random | naive")
                                       ->check(CLI::IsMember({"ours", "dtfm", "random", "naive"}));
                                   app.add_option("--objective", args->objective,
                                                  "What --algo ours minimises: time (the simulated iteration) | "
                                                  "dtfm (DT-FM's cost)")
                                       ->check(CLI::IsMember({"time", "dtfm"}));
                                   app.add_option("--seed", args->seed, "Search seed");
                                   app.add_flag("--json", args->json, "Print one JSON object");
                                   return [args] { return run_plan(*args); };
                                 });

}  // namespace
}  // namespace sn::cli
