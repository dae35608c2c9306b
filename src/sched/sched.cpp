#include "sched/sched.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <limits>
#include <numeric>
#include <random>

#include "core/memory.h"
#include "core/toml_reader.h"
#include "sched/internal.h"

namespace sn::sched {

using detail::EdgeCosts;
using detail::kInf;
using detail::Scorer;

Plan evaluate_groups(const LinkMatrix& m, const PlanRequest& r, const Groups& groups) {
  const EdgeCosts costs(m, r);
  Scorer sc(costs, groups);
  double path_cost = 0;
  const std::vector<int> order = detail::open_path_tsp(sc.pp, &path_cost);
  Plan plan;
  plan.data_parallel_cost_s = *std::max_element(sc.dp.begin(), sc.dp.end());
  plan.pipeline_cost_s = path_cost;
  plan.dtfm_cost_s = plan.data_parallel_cost_s + 2 * path_cost;
  // Replica k of stage s+1 is the partner of replica k of stage s.
  plan.stage_devices.push_back(groups[order[0]]);
  for (size_t s = 1; s < order.size(); ++s) {
    const auto& prev = plan.stage_devices.back();
    std::vector<int> pair;
    detail::bottleneck_matching(costs, prev, groups[order[s]], &pair);
    std::vector<int> next(prev.size());
    for (size_t k = 0; k < prev.size(); ++k) next[k] = groups[order[s]][pair[k]];
    plan.stage_devices.push_back(next);
  }
  return plan;
}

uint64_t plan_memory_bytes(int devices) {
  // The link matrix and the search's two edge-cost matrices (n² doubles each), their
  // sorted copies in the bottleneck matching and the searches' tables: measured at
  // 19 GB for 20,000 devices, i.e. about 48 bytes per device pair.
  const auto n = static_cast<uint64_t>(std::max(devices, 0));
  return 48 * n * n;
}

Status check_plan_size(int devices) {
  if (devices > kMaxDevices) return input_error("{} devices are more than the limit of {}", devices, kMaxDevices);
  return check_memory_for(plan_memory_bytes(devices), fmt::format("a plan on {} devices", devices));
}

Result<Plan> make_plan(const LinkMatrix& links, const PlanRequest& request, const std::string& algo,
                       uint64_t seed) {
  if (request.stages < 1 || request.replicas < 1 || request.micro_batches < 1)
    return input_error("stages, replicas and micro-batches must be >= 1");
  if (request.stages > kMaxStages || request.replicas > kMaxReplicas || request.micro_batches > kMaxMicroBatches)
    return input_error("stages ({}), replicas ({}) and micro-batches ({}) must be at most {}, {} and {}",
                       request.stages, request.replicas, request.micro_batches, kMaxStages, kMaxReplicas,
                       kMaxMicroBatches);
  if (static_cast<int64_t>(request.stages) * request.replicas > links.n)
    return input_error("{} stages x {} replicas need {} devices, the topology has {}", request.stages,
                       request.replicas, static_cast<int64_t>(request.stages) * request.replicas, links.n);
  if (links.links.size() != static_cast<size_t>(links.n) * static_cast<size_t>(links.n) ||
      links.compute_tflops.size() != static_cast<size_t>(links.n) || links.memory_gb.size() != static_cast<size_t>(links.n))
    return make_error("make_plan: a link matrix of {} devices holds {} links", links.n, links.links.size());
  SN_TRY(check_plan_size(links.n));
  // The simulator keeps per stage its op order and, per micro-batch, when its
  // activations and gradients arrive: 32 bytes per stage and micro-batch.
  SN_TRY(check_memory_for(32 * static_cast<uint64_t>(request.stages) * static_cast<uint64_t>(request.micro_batches),
                          fmt::format("simulating {} stages x {} micro-batches", request.stages,
                                      request.micro_batches)));
  // Sizes and times feed sums and divisions: each must be a finite figure.
  for (auto [what, value] : {std::pair<const char*, double>{"activation_bytes", request.activation_bytes},
                             {"gradient_bytes", request.gradient_bytes},
                             {"compute_seconds_per_microbatch_stage", request.compute_seconds_per_microbatch_stage},
                             {"tied_bytes", request.tied_bytes},
                             {"step_overhead_s", request.step_overhead_s},
                             {"message_fixed_s", request.message_fixed_s},
                             {"message_per_byte_s", request.message_per_byte_s},
                             {"max_message_bytes", request.max_message_bytes}})
    if (!std::isfinite(value) || value < 0) return input_error("plan request: {} must be finite and >= 0, got {}", what, value);
  for (int a = 0; a < links.n; ++a)
    for (int b = 0; b < links.n; ++b) {
      if (a == b) continue;
      const LinkSpec& link = links.at(a, b);
      if (!(link.bandwidth_mbps > 0) || !std::isfinite(link.bandwidth_mbps))
        return input_error("link {} -> {} has no positive finite bandwidth", a, b);
      if (!(link.latency_ms >= 0) || !std::isfinite(link.latency_ms))
        return input_error("link {} -> {} has no finite latency >= 0", a, b);
    }
  const auto began = std::chrono::steady_clock::now();
  if (request.schedule != "gpipe" && request.schedule != "1f1b")
    return input_error("unknown schedule '{}' (gpipe, 1f1b)", request.schedule);
  if (request.objective != "time" && request.objective != "dtfm")
    return input_error("unknown objective '{}' (time, dtfm)", request.objective);
  const EdgeCosts costs(links, request);
  Groups groups;
  if (algo == "naive") {
    groups = detail::naive_groups(request);
  } else if (algo == "random") {
    std::mt19937_64 rng(seed);
    double best = kInf;
    for (int i = 0; i < std::max(1, request.search_trials); ++i) {
      Groups g = detail::random_groups(links.n, request, rng);
      const double c = Scorer(costs, g).total();
      if (c < best) { best = c; groups = g; }
    }
  } else if (algo == "ours") {
    groups = detail::search_ours(costs, request, seed);
    if (request.objective == "time") {
      // The proxy's placement, ordered and paired as it would run, seeds the
      // search on the simulated time; the plan reports DT-FM's cost of the
      // partition found and keeps the search's own order and pairing.
      const Plan proxy = evaluate_groups(links, request, groups);
      std::vector<std::vector<int>> placed = detail::search_time(links, costs, request, proxy.stage_devices, seed);
      Plan plan = evaluate_groups(links, request, placed);
      plan.stage_devices = std::move(placed);
      plan.plan_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      simulate(links, request, plan);
      return plan;
    }
  } else if (algo == "dtfm") {
    groups = detail::search_dtfm(costs, request, seed);
  } else {
    return input_error("unknown --algo '{}' (ours, dtfm, random, naive)", algo);
  }
  Plan plan = evaluate_groups(links, request, groups);
  plan.plan_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
  simulate(links, request, plan);
  return plan;
}

namespace {

double ceil_div(double a, double b) { return std::ceil(a / b); }
// docs/compression.md: a quantized block of NUMEL values in rows of ROW_LENGTH.
double quantized_block_bytes(double numel, double row_length, double bits) {
  return 2 * ceil_div(numel, row_length) + std::ceil(numel * bits / 8);
}

}  // namespace

double activation_wire_bytes(const CompressionConfig& config, bool forward, double numel, double row_length,
                             double samples) {
  const double bits = static_cast<double>(forward ? config.forward_bits : config.backward_bits);
  if (config.activations == "fp16") return 2 * numel;
  if (config.activations == "quant" || (config.activations == "aqsgd" && !forward))
    return 1 + quantized_block_bytes(numel, row_length, bits);
  if (config.activations == "aqsgd")  // steady state: every sample sends a delta
    return 1 + 9 * samples + samples * quantized_block_bytes(numel / samples, row_length, bits);
  return 4 * numel;
}

double gradient_message_bytes(const CompressionConfig& config, double numel) {
  if (config.gradients == "fp16") return 2 * numel;
  if (config.gradients == "cocktail") {
    const double subset = std::min(numel, std::round(std::min(config.random_fraction, 1.0) * numel));
    const double kept = subset == 0 ? 0 : std::clamp(std::round(config.topk_fraction * subset), 1.0, subset);
    const double bitmap = kept < subset ? ceil_div(subset, 8) : 0;  // left out when all of the subset is sent
    return 17 + bitmap + quantized_block_bytes(kept, 128, static_cast<double>(config.gradient_bits));
  }
  return 4 * numel;
}

double gradient_ring_equivalent_bytes(const CompressionConfig& config, double numel, int replicas) {
  if (config.gradients != "fp16" && config.gradients != "cocktail") return 4 * numel;
  return std::max(1, replicas) * gradient_message_bytes(config, numel) / 2;
}

PlanRequest request_from_job(const JobConfig& job, double compute_seconds_per_microbatch_stage) {
  PlanRequest r;
  r.stages = static_cast<int>(job.parallel.stages);
  r.replicas = static_cast<int>(job.parallel.replicas);
  r.micro_batches = static_cast<int>(job.parallel.micro_batches);
  r.schedule = job.parallel.schedule;
  const double samples = static_cast<double>(job.sequences_per_micro_batch());
  const double elements = samples * static_cast<double>(job.model.seq_len * job.model.d_model);
  const double row = static_cast<double>(job.model.d_model);
  r.activation_bytes = activation_wire_bytes(job.compression, true, elements, row, samples);
  r.activation_gradient_bytes = activation_wire_bytes(job.compression, false, elements, row, samples);
  // The all-reduce of the largest stage: the first stage holds its blocks, the
  // token and position embeddings; the last its blocks, the final norm and the
  // tied token embedding again (src/model); the largest governs.
  const double layers_per_stage =
      std::ceil(static_cast<double>(job.model.layers) / std::max<int64_t>(1, job.parallel.stages));
  const double embedding = static_cast<double>(job.model.vocab * job.model.d_model);
  const double stage_parameters = layers_per_stage * static_cast<double>(job.model.layer_parameter_count()) +
                                  embedding + static_cast<double>(job.model.seq_len * job.model.d_model);
  r.gradient_bytes = gradient_ring_equivalent_bytes(job.compression, stage_parameters, r.replicas);
  // The GPT ties its token embedding to its head: with P > 1 the first and the
  // last stage swap that gradient every step, through the gradient codec.
  if (r.stages > 1)
    r.tied_bytes = job.compression.gradients == "none" ? 4 * embedding
                                                      : gradient_message_bytes(job.compression, embedding);
  r.compute_seconds_per_microbatch_stage = compute_seconds_per_microbatch_stage;
  r.max_message_bytes = static_cast<double>(job.parallel.allreduce_chunk_bytes);
  r.search_trials = 100;
  return r;
}

Result<PlanRequest> read_plan_spec(const std::filesystem::path& path, int stages, int replicas) {
  SN_ASSIGN(TomlFile file, TomlFile::parse_file(path));
  TomlTable root = file.root();
  TomlTable model_table = root.table("model");
  ModelConfig model = read_model_table(model_table);
  TomlTable w = root.table("workload");
  PlanRequest r;
  r.stages = stages;
  r.replicas = replicas;
  const double parameters = w.number("parameters", static_cast<double>(model.parameter_count()), 1, 1e15);
  const double sequences = w.number("sequences_per_micro_batch", 1, 1e-9, 1e9);
  const double activation_element_bytes = w.number("activation_element_bytes", 4, 0.01, 64);
  const double gradient_element_bytes = w.number("gradient_element_bytes", 4, 0.01, 64);
  const double activation_compression = w.number("activation_compression", 1, 1, 1e6);
  const double gradient_compression = w.number("gradient_compression", 1, 1, 1e6);
  r.micro_batches = static_cast<int>(w.integer("micro_batches", 1, 1, 1 << 20));
  const double device_tflops = w.number("device_tflops", 100, 1e-9, 1e9);
  r.search_trials = static_cast<int>(w.integer("search_trials", 4900, 1, 1 << 24));
  r.schedule = w.choice("schedule", "gpipe", {"gpipe", "1f1b"});
  r.step_overhead_s = w.number("step_overhead_s", 0, 0, 1e9);
  r.activation_bytes = w.number("activation_bytes_per_micro_batch",
                                sequences * static_cast<double>(model.seq_len * model.d_model) *
                                    activation_element_bytes, 1, 1e15) / activation_compression;
  r.gradient_bytes = w.number("gradient_bytes_per_stage", parameters * gradient_element_bytes / std::max(1, stages),
                              1, 1e15) / gradient_compression;
  // Forward + backward ≈ 6 FLOPs per parameter per token.
  const double flops = 6 * parameters / std::max(1, stages) * sequences * static_cast<double>(model.seq_len);
  r.compute_seconds_per_microbatch_stage =
      w.number("compute_seconds_per_microbatch_stage", flops / (device_tflops * 1e12), 0, 1e9);
  w.reject_unknown_keys();
  root.reject_unknown_keys();
  SN_TRY(file.status());
  // The same rule as a job file's [parallel] stages.
  if (auto shape = check_stages(model, stages, "--stages"); !shape.ok())
    return input_error("{}: {}", path.string(), shape.message());
  if (replicas < 1 || replicas > kMaxReplicas)
    return input_error("--replicas must be in [1, {}], got {}", kMaxReplicas, replicas);
  return r;
}

}  // namespace sn::sched
