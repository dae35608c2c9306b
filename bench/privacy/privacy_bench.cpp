// Privacy side by side in one run: the default 2 × 2 job (examples/jobs/
// tiny.toml) on a devnet whose every link is 500 Mbps / 1 ms (raw emulation),
// plain, with secure aggregation, with DP-SGD, and with both; then DP at three
// noise levels for held-out loss against ε. JSON on stdout, a table and a PNG
// plot (gnuplot, if installed) of held-out loss against ε beside the JSON.
//
//   build/bench/bench_privacy [--steps N] [--plot FILE.png]
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "core/fs.h"
#include "core/process.h"
#include "../common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;
using sn::bench::run_json;

namespace {

struct Config {
  std::string name;
  std::string privacy;  // the [privacy] table's body; empty: no table
};

}  // namespace

int main(int argc, char** argv) {
  std::string steps = "60";
  fs::path plot = "bench_privacy.png";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--steps") steps = argv[i + 1];
    if (std::string(argv[i]) == "--plot") plot = argv[i + 1];
  }
  const std::string bin = SOLVERNET_BIN;
  const fs::path src = SOLVERNET_SOURCE_DIR;
  const fs::path tmp = fs::temp_directory_path() / ("sn-bench-privacy-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  auto fail = [&](const std::string& message) {
    std::cerr << "bench_privacy: " << message << "\n";
    fs::remove_all(tmp);
    return 1;
  };
  auto base = read_file(src / "examples/jobs/tiny.toml");
  if (!base.ok()) return fail(base.message());
  const fs::path topology = tmp / "uniform-500mbps.toml";
  if (auto w = write_file_atomic(topology, "name = \"uniform-500mbps\"\n\n[[region]]\nname = \"site\"\nnodes = 4\n"
                                           "latency_ms = 1\nbandwidth_mbps = 500\n");
      !w.ok())
    return fail(w.message());

  const std::string dp = "dp = true\nclip_norm = 1.0\nnoise_multiplier = {}\ndelta = 1e-5\n";
  const std::vector<Config> configs = {
      {"plain", ""},
      {"secagg", "secure_aggregation = true\n"},
      {"dp_sigma1", fmt::format(fmt::runtime(dp), 1.0)},
      {"secagg_dp_sigma1", "secure_aggregation = true\n" + fmt::format(fmt::runtime(dp), 1.0)},
      {"dp_sigma0.5", fmt::format(fmt::runtime(dp), 0.5)},
      {"dp_sigma2", fmt::format(fmt::runtime(dp), 2.0)},
  };
  nlohmann::json out;
  out["benchmark"] = "privacy";
  out["job"] = (src / "examples/jobs/tiny.toml").string();
  out["links"] = "every pair 500 Mbps / 1 ms, raw emulation";
  out["steps"] = std::stoll(steps);
  nlohmann::json runs;
  for (const Config& config : configs) {
    std::cerr << "== " << config.name << "\n";
    const fs::path job = tmp / (config.name + ".toml");
    std::string text = *base;
    if (!config.privacy.empty()) text += "\n[privacy]\n" + config.privacy;
    if (auto w = write_file_atomic(job, text); !w.ok()) return fail(w.message());
    auto summary = run_json({bin, "devnet", "--job", job.string(), "--topology", topology.string(), "--emulate", "raw",
                             "--no-chain", "--json", "--steps", steps, "--out",
                             (tmp / (config.name + ".safetensors")).string()},
                            tmp / (config.name + ".json"));
    if (!summary.ok()) return fail(config.name + ": " + summary.message());
    const auto& s = *summary;
    const double step_s = s.contains("timing") ? s["timing"]["step_s"].get<double>() : std::nan("");
    nlohmann::json run = {{"bytes_data_parallel", s["bytes_data_parallel"]},
                          {"bytes_pipeline", s["bytes_pipeline"]},
                          {"step_s", step_s},
                          {"holdout_loss", s["holdout_loss"]},
                          {"loss_last", s["loss_last"]},
                          {"model_hash", s["model_hash"]}};
    if (s.contains("privacy")) run["privacy"] = s["privacy"];
    run["epsilon"] = s.contains("privacy") && s["privacy"].contains("epsilon") ? s["privacy"]["epsilon"]
                                                                               : nlohmann::json(nullptr);
    runs[config.name] = run;
  }
  out["runs"] = runs;
  const auto& plain = runs["plain"];
  const auto& secagg = runs["secagg"];
  const double bytes_ratio = secagg["bytes_data_parallel"].get<double>() / plain["bytes_data_parallel"].get<double>();
  const double time_ratio = secagg["step_s"].get<double>() / plain["step_s"].get<double>();
  out["secagg_vs_plain"] = {{"bytes_ratio", bytes_ratio},
                            {"step_time_ratio", time_ratio},
                            {"bytes_target_1_3x", bytes_ratio <= 1.3},
                            {"step_time_target_1_5x", time_ratio <= 1.5}};
  // Held-out loss against ε, three noise levels.
  nlohmann::json curve = nlohmann::json::array();
  std::string table = "sigma  epsilon  holdout_loss\n";
  std::string points;
  for (const auto& [name, sigma] : std::vector<std::pair<std::string, double>>{
           {"dp_sigma0.5", 0.5}, {"dp_sigma1", 1.0}, {"dp_sigma2", 2.0}}) {
    const auto& r = runs[name];
    curve.push_back({{"noise_multiplier", sigma}, {"epsilon", r["epsilon"]}, {"holdout_loss", r["holdout_loss"]}});
    table += fmt::format("{:<6} {:<8.3f} {:.4f}\n", sigma, r["epsilon"].get<double>(), r["holdout_loss"].get<double>());
    points += fmt::format("{} {} {}\n", r["epsilon"].get<double>(), r["holdout_loss"].get<double>(), sigma);
  }
  out["dp_curve"] = curve;
  out["dp_table"] = table;
  std::cerr << "\n" << table;
  // The plot: gnuplot (Debian's gnuplot-nox) if present.
  const fs::path data = tmp / "curve.dat";
  const fs::path script = tmp / "curve.gp";
  (void)write_file_atomic(data, points);
  (void)write_file_atomic(
      script, fmt::format("set terminal png size 800,500\nset output '{}'\nset xlabel 'epsilon at delta = 1e-5'\n"
                          "set ylabel 'held-out loss'\nset title 'DP-SGD on the 2x2 tiny job, {} steps (plain: {:.4f})'\n"
                          "set logscale x\nset grid\n"
                          "plot '{}' using 1:2 with linespoints pt 7 title 'DP-SGD (sigma 2, 1, 0.5)', "
                          "{:.6f} with lines dt 2 title 'no DP'\n",
                          fs::absolute(plot).string(), steps, plain["holdout_loss"].get<double>(), data.string(),
                          plain["holdout_loss"].get<double>()));
  SpawnOptions quiet;
  quiet.stdout_path = tmp / "gnuplot.out";
  quiet.stderr_path = tmp / "gnuplot.err";
  auto gnuplot = ChildProcess::spawn({"gnuplot", script.string()}, quiet);
  if (gnuplot.ok() && gnuplot->wait() == 0)
    out["plot"] = fs::absolute(plot).string();
  else
    out["plot"] = nullptr;  // gnuplot missing: the table above has the figures
  std::cout << out.dump(2) << std::endl;
  fs::remove_all(tmp);
  return 0;
}
