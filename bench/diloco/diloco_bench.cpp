// DiLoCo against every-step all-reduce, side by side at one emulated slow
// link (bench/diloco/slow-link.toml: two sites, 100 Mbps / 25 ms between
// them) and at equal tokens (same steps and global batch): bytes between
// replicas, wall time, training and held-out loss. Each configuration is one
// real devnet run (DHT + 4 node processes, 2 stages × 2 replica groups).
// JSON on stdout; the runs' own output goes to stderr.
//
//   build/bench/bench_diloco [--steps N] [--inner-steps H]
//
// "Bytes between replicas": a DiLoCo run's outer-step traffic
// (diloco.bytes_outer). An every-step run's data-parallel bytes also hold
// the tied embedding's swap between the first and last stage of each group,
// which is not between replicas and is the same in every configuration
// (dense, every step): it is measured in the DiLoCo runs (their data-parallel
// bytes minus their outer bytes) and subtracted.
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <iostream>

#include "core/fs.h"
#include "../common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;
using sn::bench::run_json;

int main(int argc, char** argv) {
  std::string steps = "200", inner = "50";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--steps") steps = argv[i + 1];
    if (std::string(argv[i]) == "--inner-steps") inner = argv[i + 1];
  }
  const std::string bin = SOLVERNET_BIN;
  const fs::path src = SOLVERNET_SOURCE_DIR;
  const fs::path tmp = fs::temp_directory_path() / ("sn-bench-diloco-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  auto fail = [&](const std::string& message) {
    std::cerr << "bench_diloco: " << message << "\n";
    fs::remove_all(tmp);
    return 1;
  };
  auto base = read_file(src / "bench/diloco/diloco.toml");
  if (!base.ok()) return fail(base.message());
  const fs::path topology = src / "bench/diloco/slow-link.toml";

  struct Config {
    std::string name, table;
  };
  const std::vector<Config> configs = {
      {"every_step_allreduce", ""},
      {"diloco_int8", fmt::format("\n[diloco]\ninner_steps = {}\npseudo_grad = \"int8\"\n", inner)},
      {"diloco_fp32", fmt::format("\n[diloco]\ninner_steps = {}\npseudo_grad = \"fp32\"\n", inner)},
  };
  nlohmann::json out;
  out["benchmark"] = "diloco";
  out["topology"] = topology.string();
  out["link"] = "100 Mbps, 25 ms one way between the two replica groups' sites";
  out["steps"] = std::stoll(steps);
  out["inner_steps"] = std::stoll(inner);
  nlohmann::json runs = nlohmann::json::object();
  for (const auto& config : configs) {
    std::cerr << "== " << config.name << "\n";
    const fs::path job = tmp / (config.name + ".toml");
    if (auto written = write_file_atomic(job, *base + config.table); !written.ok()) return fail(written.message());
    auto summary = run_json({bin, "devnet", "--no-chain", "--job", job.string(), "--topology", topology.string(),
                             "--steps", steps, "--json", "--out", (tmp / (config.name + ".safetensors")).string()},
                            tmp / (config.name + ".json"));
    if (!summary.ok()) return fail(config.name + ": " + summary.message());
    const auto& s = *summary;
    nlohmann::json row;
    row["wall_s"] = s["wall_s"];
    row["loss_first"] = s["loss_first"];
    row["loss_last"] = s["loss_last"];
    row["holdout_loss"] = s["holdout_loss"];
    row["bytes_pipeline"] = s["bytes_pipeline"];
    row["bytes_data_parallel"] = s["bytes_data_parallel"];
    row["step_deadline_ms"] = s["step_deadline_ms"];
    if (s.contains("diloco")) {
      row["bytes_between_replicas"] = s["diloco"]["bytes_outer"];
      row["tied_embedding_bytes"] = s["bytes_data_parallel"].get<int64_t>() - s["diloco"]["bytes_outer"].get<int64_t>();
      row["outer_steps"] = s["diloco"]["outer_steps"];
      row["client_data_bytes_not_sent"] = s["diloco"]["data_bytes_not_sent"];
    }
    runs[config.name] = row;
    std::cerr << fmt::format("   wall {:.1f} s, held-out {:.4f}, data-parallel bytes {}\n", s["wall_s"].get<double>(),
                             s["holdout_loss"].is_number() ? s["holdout_loss"].get<double>() : std::nan(""),
                             s["bytes_data_parallel"].get<int64_t>());
  }
  // The tied embedding's swap, as the DiLoCo runs measured it, is not between replicas.
  auto& every = runs["every_step_allreduce"];
  every["tied_embedding_bytes"] = runs["diloco_int8"]["tied_embedding_bytes"];
  every["bytes_between_replicas"] =
      every["bytes_data_parallel"].get<int64_t>() - every["tied_embedding_bytes"].get<int64_t>();
  nlohmann::json ratios;
  const double every_bytes = every["bytes_between_replicas"].get<double>();
  const double every_holdout = every["holdout_loss"].get<double>();
  for (const char* name : {"diloco_int8", "diloco_fp32"}) {
    const auto& r = runs[name];
    ratios[name] = {{"fewer_bytes_between_replicas", every_bytes / std::max(1.0, r["bytes_between_replicas"].get<double>())},
                    {"holdout_loss_ratio", r["holdout_loss"].get<double>() / every_holdout},
                    {"wall_time_ratio", r["wall_s"].get<double>() / every["wall_s"].get<double>()}};
  }
  out["runs"] = runs;
  out["vs_every_step"] = ratios;
  out["targets"] = {{"int8_100x_fewer_bytes", ratios["diloco_int8"]["fewer_bytes_between_replicas"].get<double>() >= 100},
                    {"int8_holdout_within_5pct",
                     std::abs(ratios["diloco_int8"]["holdout_loss_ratio"].get<double>() - 1.0) <= 0.05}};
  std::cout << out.dump(2) << std::endl;
  fs::remove_all(tmp);
  return 0;
}
