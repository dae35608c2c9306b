// DiLoCo against every-step all-reduce, side by side at one emulated slow
// link (bench/diloco/slow-link.toml: two sites, 100 Mbps / 25 ms between
// them) and at equal tokens (same steps and global batch; each of the two
// replica groups trains on its half of every step's batch): bytes between
// replicas, wall time, training and held-out loss. Each configuration is one
// real devnet run (DHT + 4 node processes, 2 stages × 2 replica groups).
// JSON on stdout; the runs' own output goes to stderr.
//
//   build/bench/bench_diloco [--steps N] [--inner-steps H] [--outer-lr LR] [--outer-momentum MU]
//
// Runs: every-step all-reduce (the default gradient encoding, f32), DiLoCo
// with int8 and with fp32 pseudo-gradients at the given outer optimizer, and
// DiLoCo int8 with the [diloco] defaults (the paper's outer lr 0.7, μ 0.9),
// so a reader sees what the tuning is worth (docs/diloco.md, "Figures").
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

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "core/fs.h"
#include "core/job.h"
#include "../common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;
using sn::bench::run_json;

int main(int argc, char** argv) {
  // The bench's tuned outer optimizer: with tens of outer steps, not the
  // paper's hundreds, μ = 0.9 carries stale pseudo-gradients for about ten
  // of them (half this run); μ = 0.5 remembers two (docs/diloco.md).
  double steps = 1000, inner = 50, outer_lr = 0.7, outer_momentum = 0.5;
  struct Flag {
    const char* name;
    double *value, low, high;
    bool whole;
  };
  const Flag flags[] = {{"--steps", &steps, 1, 1e6, true},
                        {"--inner-steps", &inner, 1, 1e6, true},
                        {"--outer-lr", &outer_lr, 1e-6, 10, false},
                        {"--outer-momentum", &outer_momentum, 0, 0.999999, false}};
  for (int i = 1; i < argc; i += 2) {
    const Flag* flag = nullptr;
    for (const auto& f : flags)
      if (argv[i] == std::string(f.name)) flag = &f;
    if (flag == nullptr || i + 1 >= argc) {
      std::cerr << "bench_diloco: " << (flag ? "no value for " : "unknown argument ") << argv[i]
                << " (usage: bench_diloco [--steps N] [--inner-steps H] [--outer-lr LR] [--outer-momentum MU])\n";
      return 2;
    }
    char* end = nullptr;
    errno = 0;
    const double value = std::strtod(argv[i + 1], &end);
    if (errno != 0 || end == argv[i + 1] || *end != '\0' || !(value >= flag->low && value <= flag->high) ||
        (flag->whole && value != std::floor(value))) {
      std::cerr << fmt::format("bench_diloco: {} must be {} in [{}, {}], got '{}'\n", flag->name,
                               flag->whole ? "a whole number" : "a number", flag->low, flag->high, argv[i + 1]);
      return 2;
    }
    *flag->value = value;
  }
  const auto steps_count = static_cast<int64_t>(steps), inner_steps = static_cast<int64_t>(inner);
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
  auto diloco_table = [&](const char* pseudo_grad, bool tuned) {
    std::string table = fmt::format("\n[diloco]\ninner_steps = {}\npseudo_grad = \"{}\"\n", inner_steps, pseudo_grad);
    if (tuned) table += fmt::format("outer_lr = {}\nouter_momentum = {}\n", outer_lr, outer_momentum);
    return table;
  };
  const std::vector<Config> configs = {
      {"every_step_allreduce", ""},
      {"diloco_int8", diloco_table("int8", true)},
      {"diloco_fp32", diloco_table("fp32", true)},
      {"diloco_int8_default_outer", diloco_table("int8", false)},
  };
  nlohmann::json out;
  out["benchmark"] = "diloco";
  out["topology"] = topology.string();
  out["link"] = "100 Mbps, 25 ms one way between the two replica groups' sites";
  out["every_step_encoding"] = "f32 ring all-reduce of every step's gradients (compression.gradients = none, the default)";
  out["steps"] = steps_count;
  out["inner_steps"] = inner_steps;
  out["outer_lr"] = outer_lr;
  out["outer_momentum"] = outer_momentum;
  out["default_outer"] = {{"outer_lr", DilocoConfig{}.outer_lr}, {"outer_momentum", DilocoConfig{}.outer_momentum}};
  nlohmann::json runs = nlohmann::json::object();
  for (const auto& config : configs) {
    std::cerr << "== " << config.name << "\n";
    const fs::path job = tmp / (config.name + ".toml");
    if (auto written = write_file_atomic(job, *base + config.table); !written.ok()) return fail(written.message());
    auto summary = run_json({bin, "devnet", "--no-chain", "--job", job.string(), "--topology", topology.string(),
                             "--steps", std::to_string(steps_count), "--json", "--out", (tmp / (config.name + ".safetensors")).string()},
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
  for (const char* name : {"diloco_int8", "diloco_fp32", "diloco_int8_default_outer"}) {
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
