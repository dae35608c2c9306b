// bench_sched_vs_devnet: the scheduler's predicted step time beside the step time
// the devnet measures, on three topologies. For each it runs
//   solvernet devnet --job JOB --topology T --steps N --no-chain --summary-json F
// and reads the placement's prediction (placement.predicted_iteration_s, the
// simulator on the links as emulated, with our measured compute), the mean step
// (wall_s / steps), the first step and the median of the later steps the
// progress lines report, and the steady step: the summary's unrounded mean step
// over every step but the first (which also opens connections).
// JSON on stdout, progress on stderr.
// Usage: bench_sched_vs_devnet [--steps N] [--repeat K] [--job FILE] [TOPOLOGY.toml ...]
// --repeat K runs the topologies K times over, in turn (the machine's noise
// shows as the spread between rounds).
// It runs the whole network on this machine: it takes every core for minutes.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace {

// Runs COMMAND and returns its standard output (exit status in *STATUS).
std::string run(const std::string& command, int* status) {
  std::string out;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) { *status = -1; return out; }
  char buffer[4096];
  for (size_t n; (n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0;) out.append(buffer, n);
  *status = ::pclose(pipe);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string source = SOLVERNET_SOURCE_DIR;
  std::string job = source + "/examples/jobs/tiny.toml";
  int steps = 20, repeat = 1;
  std::vector<std::string> topologies;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--steps" && i + 1 < argc) steps = std::stoi(argv[++i]);
    else if (arg == "--repeat" && i + 1 < argc) repeat = std::max(1, std::stoi(argv[++i]));
    else if (arg == "--job" && i + 1 < argc) job = argv[++i];
    else if (!arg.empty() && arg[0] == '-') {
      std::cerr << "usage: bench_sched_vs_devnet [--steps N] [--repeat K] [--job FILE] [TOPOLOGY.toml ...]\n";
      return 2;
    } else topologies.push_back(arg);
  }
  if (topologies.empty())
    for (const char* name : {"datacenter", "two-regions", "world"})
      topologies.push_back(source + "/examples/topologies/" + name + ".toml");

  nlohmann::json out = {{"job", job}, {"steps", steps}, {"runs", nlohmann::json::array()}};
  double worst = 0, worst_calibrated = 0;
  std::vector<std::string> rounds;
  for (int k = 0; k < repeat; ++k) rounds.insert(rounds.end(), topologies.begin(), topologies.end());
  for (const auto& topology : rounds) {
    std::cerr << "devnet on " << topology << " ..." << std::flush;
    const std::string summary_path = fmt::format("/tmp/sn-sched-vs-devnet-{}.json", ::getpid());
    const std::string command =
        fmt::format("{} devnet --job {} --topology {} --steps {} --no-chain --summary-json {} 2>&1 >/dev/null",
                    SOLVERNET_BINARY, job, topology, steps, summary_path);
    int status = 0;
    const std::string progress = run(command, &status);
    std::stringstream text;
    text << std::ifstream(summary_path).rdbuf();
    std::remove(summary_path.c_str());
    const auto summary = nlohmann::json::parse(text.str(), nullptr, false);
    if (status != 0 || summary.is_discarded() || !summary.contains("placement")) {
      std::cerr << " failed (status " << status << ")\n" << progress << "\n";
      out["runs"].push_back({{"topology", topology}, {"error", "devnet failed"}, {"status", status}});
      continue;
    }
    // "step K/N  loss …  X s/step" for step 1, every N/10 steps and the last.
    double first_step = 0;
    std::vector<double> later;
    const std::regex line(R"(step (\d+)/\d+ .* ([0-9.]+) s/step)");
    std::istringstream lines(progress);
    for (std::string l; std::getline(lines, l);) {
      std::smatch match;
      if (!std::regex_search(l, match, line)) continue;
      const int step = std::stoi(match[1]);
      const double seconds = std::stod(match[2]);
      if (step == 1) first_step = seconds; else later.push_back(seconds);
    }
    std::sort(later.begin(), later.end());
    const double median_later = later.empty() ? 0 : later[later.size() / 2];
    // Steady state, precisely: the summary's mean step time (timing.step_s, the
    // client's own clock, unrounded) over every step but the first, which also
    // opens connections. The first is read from its progress line (to 0.01 s),
    // so the mean of the rest is off by at most 0.005 / (steps − 1) s.
    const double n = summary["steps"].get<double>();
    const double step_mean = summary.contains("timing") ? summary["timing"].value("step_s", 0.0) : 0.0;
    const double steady = n > 1 && step_mean > 0 ? (step_mean * n - first_step) / (n - 1) : median_later;
    const auto& placement = summary["placement"];
    const double predicted = placement.value("predicted_iteration_s", 0.0);
    const double measured = summary["wall_s"].get<double>() / summary["steps"].get<double>();
    nlohmann::json row = {{"topology", topology},
                          {"emulate", summary.value("emulate", "")},
                          {"placement_algo", placement.value("algo", "")},
                          {"predicted_iteration_s", predicted},
                          {"measured_mean_step_s", measured},
                          {"measured_first_step_s", first_step},
                          {"measured_steady_step_s", steady},
                          {"measured_median_later_step_s", median_later},
                          {"steady_steps_sampled", later.size()},
                          {"predicted_over_steady", steady > 0 ? predicted / steady : 0.0},
                          {"predicted_over_mean", measured > 0 ? predicted / measured : 0.0},
                          {"bytes_pipeline_per_step", summary["bytes_pipeline"].get<double>() / steps},
                          {"bytes_data_parallel_per_step", summary["bytes_data_parallel"].get<double>() / steps}};
    if (placement.contains("prediction")) row["prediction"] = placement["prediction"];
    if (steady > 0) worst = std::max(worst, std::abs(predicted / steady - 1));
    // The first topology (the data center: links ~free) calibrates the devnet's
    // fixed per-step cost the simulator does not model; the others are checked
    // with it added.
    if (out["runs"].empty() || !out.contains("calibrated_overhead_s")) {
      out["calibrated_overhead_s"] = steady - predicted;
      out["calibrated_on"] = topology;
    } else {
      const double with_overhead = predicted + out["calibrated_overhead_s"].get<double>();
      row["predicted_with_overhead_s"] = with_overhead;
      row["predicted_with_overhead_over_steady"] = steady > 0 ? with_overhead / steady : 0.0;
      if (steady > 0) worst_calibrated = std::max(worst_calibrated, std::abs(with_overhead / steady - 1));
    }
    std::cerr << fmt::format(" predicted {:.3f} s; measured {:.3f} s per step (first {:.2f}, steady {:.3f})\n",
                             predicted, measured, first_step, steady);
    out["runs"].push_back(row);
  }
  out["worst_relative_error_steady"] = worst;
  out["worst_relative_error_calibrated"] = worst_calibrated;
  std::cout << out.dump(2) << std::endl;
  return 0;
}
