// Tokens/s of one tiny-GPT job run (a) in one process, (b) on the devnet over
// a data-center topology and (c) over a world-wide one, both with links scaled
// to DT-FM's GPT-3 XL setting (docs/topology.md), side by side in one run.
// Each devnet runs twice, over TLS (the default) and with --insecure, to show
// what encryption and node-id checks cost. JSON on stdout; the real commands'
// progress on stderr.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <iostream>

#include "core/fs.h"
#include "core/process.h"
#include "../common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;
using sn::bench::run_json;


int main(int argc, char** argv) {
  const std::string steps = argc > 1 ? argv[1] : "40";
  const std::string bin = SOLVERNET_BIN;
  const fs::path src = SOLVERNET_SOURCE_DIR;
  const std::string job = (src / "examples/jobs/tiny.toml").string();
  const fs::path tmp = fs::temp_directory_path() / ("sn-bench-throughput-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  struct Case {
    std::string name;
    std::vector<std::string> argv;
  };
  std::vector<Case> cases = {
      {"one_process", {bin, "train", "--local", "--job", job, "--steps", steps, "--json"}},
      {"datacenter", {bin, "devnet", "--job", job, "--steps", steps, "--json", "--topology",
                      (src / "examples/topologies/datacenter.toml").string(), "--emulate", "scaled", "--out",
                      (tmp / "dc.safetensors").string()}},
      {"world", {bin, "devnet", "--job", job, "--steps", steps, "--json", "--topology",
                 (src / "examples/topologies/world.toml").string(), "--emulate", "scaled", "--out",
                 (tmp / "world.safetensors").string()}},
  };
  // The insecure twin of each devnet run, right after it.
  for (size_t i = cases.size(); i-- > 1;) {
    Case twin = cases[i];
    twin.name += "_insecure";
    twin.argv.push_back("--insecure");
    cases.insert(cases.begin() + static_cast<std::ptrdiff_t>(i) + 1, twin);
  }
  nlohmann::json out;
  out["benchmark"] = "train_throughput";
  out["job"] = job;
  out["steps"] = std::stoi(steps);
  out["anchor"] = "DT-FM GPT-3 XL (world-wide 1.7-2.3x slower than data center)";
  std::map<std::string, double> tps;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    std::cerr << "== " << c.name << "\n";
    auto summary = run_json(c.argv, tmp / (c.name + ".json"));
    if (!summary.ok()) {
      std::cerr << "bench_train_throughput: " << summary.message() << "\n";
      fs::remove_all(tmp);
      return 1;
    }
    tps[c.name] = (*summary)["tokens_per_s"].get<double>();
    // Both scaled runs use the time dilation measured by the first, so they
    // emulate exactly the same anchor setting.
    if (c.name == "datacenter")
      for (size_t j = i + 1; j < cases.size(); ++j)
        cases[j].argv.insert(cases[j].argv.end(), {"--time-dilation", fmt::format("{:.9g}", (*summary)["time_dilation"].get<double>())});
    out["runs"][c.name] = {{"tokens_per_s", tps[c.name]},
                           {"loss_last", (*summary)["loss_last"]},
                           {"wall_s", (*summary)["wall_s"]},
                           {"bytes_sent", (*summary)["bytes_sent"]},
                           {"emulate", summary->value("emulate", "none")},
                           {"time_dilation", summary->value("time_dilation", 1.0)},
                           {"byte_ratio", summary->value("byte_ratio", 1.0)},
                           {"gradient_byte_ratio", summary->value("gradient_byte_ratio", 0.0)}};
  }
  out["datacenter_over_one_process"] = tps["datacenter"] / tps["one_process"];
  out["world_slowdown_vs_datacenter"] = tps["datacenter"] / tps["world"];
  out["tls_over_insecure"] = {{"datacenter", tps["datacenter"] / tps["datacenter_insecure"]},
                              {"world", tps["world"] / tps["world_insecure"]}};
  out["target"] = "TLS keeps >= 0.95 of the insecure devnet tokens/s";
  std::cerr << fmt::format("tokens/s TLS/insecure: datacenter {:.3f}, world {:.3f}\n",
                           tps["datacenter"] / tps["datacenter_insecure"], tps["world"] / tps["world_insecure"]);
  std::cout << out.dump(2) << std::endl;
  fs::remove_all(tmp);
  return 0;
}
