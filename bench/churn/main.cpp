// bench_churn: what surviving a killed node costs (docs/resilience.md). Side
// by side on the devnet, the same tiny job undisturbed and with one member
// killed with SIGKILL mid-job: a replica whose stage has another (a spare
// takes its role), and the only holder of a stage (the job restarts from the
// mirrored checkpoint). Prints JSON: the training wall time of each run, the
// seconds lost, the recovery's own time, the steps redone, and whether the
// final model and loss equal the undisturbed run's.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;

namespace {

struct Run {
  nlohmann::json summary;
  double process_s = 0;  // the devnet's whole run, start to exit
};

Result<Run> devnet(const std::string& job, int nodes, int64_t steps, const std::vector<std::string>& extra,
                   const fs::path& dir) {
  const std::string source = SOLVERNET_SOURCE_DIR;
  std::vector<std::string> argv = {SOLVERNET_BINARY, "devnet", "--job", source + "/tests/train/data/" + job,
                                   "--topology", source + "/tests/train/data/churn-net.toml", "--no-chain", "--json",
                                   "--nodes", std::to_string(nodes), "--steps", std::to_string(steps),
                                   "--peer-timeout-s", "4", "--out", (dir / "model.safetensors").string()};
  argv.insert(argv.end(), extra.begin(), extra.end());
  const auto started = std::chrono::steady_clock::now();
  SN_ASSIGN(auto summary, bench::run_json(argv, dir / "out.json"));
  Run run;
  run.summary = std::move(summary);
  run.process_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return run;
}

nlohmann::json compare(const Run& ref, const Run& hit) {
  nlohmann::json j;
  j["undisturbed_wall_s"] = ref.summary["wall_s"];
  j["disturbed_wall_s"] = hit.summary["wall_s"];
  j["seconds_lost"] = hit.summary["wall_s"].get<double>() - ref.summary["wall_s"].get<double>();
  j["undisturbed_process_s"] = ref.process_s;
  j["disturbed_process_s"] = hit.process_s;
  j["mirror_s"] = hit.summary["recovery"]["mirror_s"];
  j["mirror_bytes"] = hit.summary["recovery"]["mirror_bytes"];
  const auto& recoveries = hit.summary["recovery"]["recoveries"];
  j["recoveries"] = recoveries.size();
  if (!recoveries.empty()) {
    j["recovery_s"] = recoveries[0]["seconds"];
    j["failed_step"] = recoveries[0]["failed_step"];
    j["restored_step"] = recoveries[0]["restored_step"];
    j["redone_steps"] = recoveries[0]["redone_steps"];
    j["aqsgd_buffers"] = recoveries[0]["aqsgd_buffers"];
  }
  j["loss_last"] = hit.summary["loss_last"];
  j["loss_last_undisturbed"] = ref.summary["loss_last"];
  j["model_hash_equal"] = hit.summary["model_hash"] == ref.summary["model_hash"];
  return j;
}

}  // namespace

int main() {
  auto dir = fs::temp_directory_path() / fmt::format("sn-bench-churn-{}", ::getpid());
  fs::create_directories(dir);
  const int64_t steps = 18;  // checkpoints every 3 steps (the job file)
  nlohmann::json out;
  out["bench"] = "churn";
  out["steps"] = steps;
  out["checkpoint_every"] = 3;
  struct Case {
    const char* name;
    const char* job;
    int nodes;
    const char* kill;  // after this step's report, so during the next
  };
  // Killed during step 8: the newest checkpoint is step 6, so 1 step is redone plus the interrupted one.
  const Case cases[] = {{"replica_replaced", "churn.toml", 5, "7:1.1"},
                        {"checkpoint_restore", "churn-pipeline.toml", 3, "7:1.0"}};
  for (const auto& c : cases) {
    auto ref = devnet(c.job, c.nodes, steps, {"--spares", "1"}, dir);
    if (!ref.ok()) {
      std::cerr << "bench_churn: " << ref.message() << "\n";
      return 1;
    }
    auto hit = devnet(c.job, c.nodes, steps, {"--spares", "1", "--kill-at", c.kill, "--kill-delay-ms", "20"}, dir);
    if (!hit.ok()) {
      std::cerr << "bench_churn: " << hit.message() << "\n";
      return 1;
    }
    out[c.name] = compare(*ref, *hit);
    out[c.name]["job"] = c.job;
    out[c.name]["killed"] = c.kill;
  }
  fs::remove_all(dir);
  std::cout << out.dump(2) << std::endl;
  return 0;
}
