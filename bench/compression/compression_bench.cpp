// Fine-tuning through the devnet pipeline (2 stages × 2 replicas) with and
// without compression, side by side in one run, as in the AQ-SGD paper: a
// small GPT is pre-trained once on the fortunes corpus (cached), then each
// configuration fine-tunes it for several epochs on a small text
// (examples/jobs/finetune-fp32.toml) over links scaled to the anchor's setting
// (docs/topology.md). JSON on stdout; the real commands' progress on stderr.
//
// Time dilation: T = (our time per micro-batch per stage) / the anchor's. The
// devnet's default measures our pure compute, but a devnet step on 2 shared
// cores also spends time in gRPC, signing and scheduling that a GPU cluster's
// step does not have in the same proportion, which would make every link look
// fast. So a calibration run (fp32, 10 Gbps) measures the real time of one
// pipeline slot, step time / (M + P − 1), and every run then uses that T.
//
//   build/bench/bench_compression [--steps N]
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "core/fs.h"
#include "core/hash.h"
#include "core/process.h"
#include "../common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;
using sn::bench::run_json;

namespace {


fs::path cache_dir() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return fs::path(xdg) / "solvernet" / "bench";
  if (const char* home = std::getenv("HOME"); home && *home) return fs::path(home) / ".cache" / "solvernet" / "bench";
  return fs::temp_directory_path() / "solvernet-bench-cache";
}

// Pre-trains once per pre-training job text; later runs reuse the weights.
Result<fs::path> pretrained_weights(const std::string& bin, const fs::path& job, const fs::path& tmp) {
  SN_ASSIGN(std::string text, read_file(job));
  const fs::path dir = cache_dir();
  SN_TRY(ensure_directory(dir));
  const fs::path weights = dir / fmt::format("pretrained-{}.safetensors", to_hex(hash_string(text)).substr(0, 16));
  if (fs::exists(weights)) {
    std::cerr << "== pre-trained weights (cached): " << weights.string() << "\n";
    return weights;
  }
  std::cerr << "== pre-training " << job.string() << " (once; cached in " << dir.string() << ")\n";
  const fs::path partial = tmp / "pretrained.safetensors";
  SN_ASSIGN(auto summary, run_json({bin, "train", "--local", "--job", job.string(), "--out", partial.string(), "--json"},
                                   tmp / "pretrain.json"));
  std::cerr << fmt::format("   loss {:.3f} -> {:.3f}, held-out {:.3f}\n", summary["loss_first"].get<double>(),
                           summary["loss_last"].get<double>(), summary["holdout_loss"].get<double>());
  std::error_code ec;
  fs::rename(partial, weights, ec);
  if (ec) {  // another file system: copy, then rename within the cache
    fs::copy_file(partial, weights.string() + ".tmp", fs::copy_options::overwrite_existing, ec);
    if (!ec) fs::rename(weights.string() + ".tmp", weights, ec);
    if (ec) return make_error("{}: cannot store the pre-trained weights: {}", weights.string(), ec.message());
  }
  return weights;
}

Result<fs::path> write_topology(const fs::path& tmp, int mbps) {
  const fs::path path = tmp / fmt::format("uniform-{}mbps.toml", mbps);
  SN_TRY(write_file_atomic(path, fmt::format("# Four nodes, every pair {} Mbps / 1 ms apart.\n"
                                             "name = \"uniform-{}mbps\"\n\n[emulate]\nmode = \"scaled\"\n\n"
                                             "[[region]]\nname = \"site\"\nnodes = 4\nlatency_ms = 1\n"
                                             "bandwidth_mbps = {}\n",
                                             mbps, mbps, mbps)));
  return path;
}

struct Config {
  std::string name;
  int mbps;
  std::string compression;  // the [compression] table's body
};

double mean_of_last(const std::vector<double>& values, size_t count) {
  count = std::min(count, values.size());
  if (count == 0) return std::nan("");
  double sum = 0;
  for (size_t i = values.size() - count; i < values.size(); ++i) sum += values[i];
  return sum / static_cast<double>(count);
}

}  // namespace

int main(int argc, char** argv) {
  std::string steps;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--steps") steps = argv[i + 1];
  const std::string bin = SOLVERNET_BIN;
  const fs::path src = SOLVERNET_SOURCE_DIR;
  const fs::path tmp = fs::temp_directory_path() / ("sn-bench-compression-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  auto fail = [&](const std::string& message) {
    std::cerr << "bench_compression: " << message << "\n";
    fs::remove_all(tmp);
    return 1;
  };

  auto weights = pretrained_weights(bin, src / "examples/jobs/pretrain-fortunes.toml", tmp);
  if (!weights.ok()) return fail(weights.message());
  auto base_text = read_file(src / "examples/jobs/finetune-fp32.toml");
  if (!base_text.ok()) return fail(base_text.message());
  const auto table = base_text->rfind("[compression]");
  if (table == std::string::npos) return fail("finetune-fp32.toml has no [compression] table");
  const std::string base = base_text->substr(0, table);

  const std::string aqsgd = "activations = \"aqsgd\"\nforward_bits = {}\nbackward_bits = {}\n";
  const std::string cocktail = "gradients = \"cocktail\"\ngradient_bits = 4\nrandom_fraction = 1.0\ntopk_fraction = 0.1\n";
  const std::vector<Config> configs = {
      {"fp32_10gbps", 10000, ""},
      {"fp32_500mbps", 500, ""},
      {"quant_fw4_bw8_500mbps", 500, "activations = \"quant\"\nforward_bits = 4\nbackward_bits = 8\n"},
      {"quant_fw2_bw4_500mbps", 500, "activations = \"quant\"\nforward_bits = 2\nbackward_bits = 4\n"},
      {"aqsgd_fw2_bw4_500mbps", 500, fmt::format(fmt::runtime(aqsgd), 2, 4)},
      {"aqsgd_fw3_bw6_500mbps", 500, fmt::format(fmt::runtime(aqsgd), 3, 6)},
      {"aqsgd_fw4_bw8_500mbps", 500, fmt::format(fmt::runtime(aqsgd), 4, 8)},
      {"aqsgd_fw4_bw8_cocktail_500mbps", 500, fmt::format(fmt::runtime(aqsgd), 4, 8) + cocktail},
      {"aqsgd_fw4_bw8_cocktail_100mbps", 100, fmt::format(fmt::runtime(aqsgd), 4, 8) + cocktail},
  };

  nlohmann::json out;
  out["benchmark"] = "compression";
  out["job"] = (src / "examples/jobs/finetune-fp32.toml").string();
  out["pretrained"] = weights->string();
  out["anchor"] = "AQ-SGD: fw4/bw8 at 500 Mbps is 1.31x the wall time of fp32 at 10 Gbps; links scaled to DT-FM's GPT-3 XL setting";
  out["cocktail"] = "random_fraction 1.0, topk_fraction 0.1, 4 bits";
  constexpr double kAnchorComputeSeconds = 2.96;  // sched::AnchorSetting, docs/topology.md
  std::string time_dilation;
  {
    std::cerr << "== calibration: fp32 at 10 Gbps, 20 steps\n";
    const fs::path job = tmp / "calibration.toml";
    auto topology = write_topology(tmp, 10000);
    if (!topology.ok()) return fail(topology.message());
    if (auto written = write_file_atomic(job, base + "[compression]\n"); !written.ok()) return fail(written.message());
    auto summary = run_json({bin, "devnet", "--job", job.string(), "--topology", topology->string(), "--emulate",
                             "scaled", "--init", weights->string(), "--no-chain", "--json", "--steps", "20", "--out",
                             (tmp / "calibration.safetensors").string()},
                            tmp / "calibration.json");
    if (!summary.ok()) return fail("calibration: " + summary.message());
    const auto& s = *summary;
    const double slots = static_cast<double>(s["micro_batches"].get<int64_t>() + s["stages"].get<int64_t>() - 1);
    const double slot_seconds = s["wall_s"].get<double>() / static_cast<double>(s["steps"].get<int64_t>()) / slots;
    time_dilation = fmt::format("{:.9g}", slot_seconds / kAnchorComputeSeconds);
    out["calibration"] = {{"slot_seconds", slot_seconds},
                          {"compute_time_dilation", s["time_dilation"]},
                          {"time_dilation", std::stod(time_dilation)}};
    std::cerr << fmt::format("   one pipeline slot {:.4f} s: T = {} (pure compute gave {:.3g})\n", slot_seconds,
                             time_dilation, s["time_dilation"].get<double>());
  }
  nlohmann::json reference;
  for (const Config& config : configs) {
    std::cerr << "== " << config.name << "\n";
    const fs::path job = tmp / (config.name + ".toml");
    if (auto written = write_file_atomic(job, base + "[compression]\n" + config.compression); !written.ok())
      return fail(written.message());
    auto topology = write_topology(tmp, config.mbps);
    if (!topology.ok()) return fail(topology.message());
    std::vector<std::string> argv = {bin, "devnet", "--job", job.string(), "--topology", topology->string(),
                                     "--emulate", "scaled", "--init", weights->string(), "--no-chain", "--json",
                                     "--out", (tmp / (config.name + ".safetensors")).string()};
    if (!steps.empty()) argv.insert(argv.end(), {"--steps", steps});
    argv.insert(argv.end(), {"--time-dilation", time_dilation});
    auto summary = run_json(argv, tmp / (config.name + ".json"));
    if (!summary.ok()) return fail(config.name + ": " + summary.message());
    const auto& s = *summary;

    const auto losses = s["losses"].get<std::vector<double>>();
    const auto& steady = s["steady_state"];
    const int64_t steady_steps = steady["steps"].get<int64_t>();
    const auto epoch_steps = static_cast<size_t>(steady["first_step"].get<int64_t>() - 1);
    auto per_step = [&](const char* field) {
      return steady_steps > 0 ? static_cast<double>(steady[field].get<int64_t>()) / static_cast<double>(steady_steps)
                              : std::nan("");
    };
    nlohmann::json run = {{"link_mbps", config.mbps},
                          {"activations", s["compression"]["activations"]},
                          {"forward_bits", s["compression"]["forward_bits"]},
                          {"backward_bits", s["compression"]["backward_bits"]},
                          {"gradients", s["compression"]["gradients"]},
                          {"steps", losses.size()},
                          {"bytes_pipeline", s["bytes_pipeline"]},
                          {"bytes_data_parallel", s["bytes_data_parallel"]},
                          {"steady_from_step", steady["first_step"]},
                          {"steady_bytes_pipeline_per_step", per_step("bytes_pipeline")},
                          {"steady_bytes_data_parallel_per_step", per_step("bytes_data_parallel")},
                          {"train_loss_last_epoch", mean_of_last(losses, epoch_steps)},
                          {"holdout_loss", s["holdout_loss"]},
                          {"wall_s", s["wall_s"]},
                          {"tokens_per_s", s["tokens_per_s"]}};
    if (reference.is_null()) reference = run;
    auto ratio = [&](const char* field) {
      const double ours = run[field].get<double>(), theirs = reference[field].get<double>();
      return ours > 0 ? theirs / ours : std::nan("");
    };
    run["vs_fp32_10gbps"] = {
        {"pipeline_bytes_smaller", ratio("bytes_pipeline")},
        {"data_parallel_bytes_smaller", ratio("bytes_data_parallel")},
        {"steady_pipeline_bytes_smaller", ratio("steady_bytes_pipeline_per_step")},
        {"steady_data_parallel_bytes_smaller", ratio("steady_bytes_data_parallel_per_step")},
        {"train_loss_ratio", run["train_loss_last_epoch"].get<double>() / reference["train_loss_last_epoch"].get<double>()},
        {"holdout_loss_ratio", run["holdout_loss"].is_number() && reference["holdout_loss"].is_number()
                                   ? nlohmann::json(run["holdout_loss"].get<double>() / reference["holdout_loss"].get<double>())
                                   : nlohmann::json(nullptr)},
        {"wall_time_ratio", run["wall_s"].get<double>() / reference["wall_s"].get<double>()}};
    out["runs"][config.name] = run;
    out["emulate"] = {{"mode", "scaled"},
                      {"time_dilation", s["time_dilation"]},
                      {"byte_ratio", s["byte_ratio"]},
                      {"gradient_byte_ratio", s["gradient_byte_ratio"]}};
    std::cerr << fmt::format("   train loss {:.4f}  held-out {}  wall {:.1f} s  steady pipeline {:.0f} B/step  "
                             "data-parallel {:.0f} B/step\n",
                             run["train_loss_last_epoch"].get<double>(), s["holdout_loss"].dump(),
                             run["wall_s"].get<double>(), run["steady_bytes_pipeline_per_step"].get<double>(),
                             run["steady_bytes_data_parallel_per_step"].get<double>());
  }
  std::cout << out.dump(2) << "\n";
  fs::remove_all(tmp);
  return 0;
}
