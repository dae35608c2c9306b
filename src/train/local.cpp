// The single-process reference run: the whole model, the same data, seed,
// micro-batches and optimizer as a distributed run, so their losses can be
// compared step by step.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <ctime>

#include "core/fs.h"
#include "core/hash.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"
#include "train/adamw.h"
#include "train/batches.h"
#include "train/inputs.h"
#include "train/stage_worker.h"
#include "train/state.h"
#include "train/train.h"

namespace sn::train {

void init_single_threaded() {
  setenv("OPENBLAS_NUM_THREADS", "1", 0);
  setenv("OMP_NUM_THREADS", "1", 0);
  model::init_torch_single_thread();
}

Result<TrainResult> run_local(const JobConfig& job, const LocalOptions& options) {
  init_single_threaded();
  using Clock = std::chrono::steady_clock;
  auto setup_started = Clock::now();
  SN_ASSIGN(auto corpus, model::prepare_corpus(job.data, static_cast<int>(job.model.vocab)));
  model::Dataset dataset(corpus.tokens, job.model.seq_len, job.data.holdout_fraction);
  if (dataset.train_samples() < job.train.global_batch)
    return input_error("{}: the corpus has {} training samples, fewer than train.global_batch = {}",
                       job.source.string(), dataset.train_samples(), job.train.global_batch);
  model::StageModel gpt(job.model, 0, static_cast<int>(job.model.layers), job.train.seed);
  NamedTensors parameters = gpt.named_parameters();
  if (!options.initial_weights.empty()) {
    SN_ASSIGN(auto by_name, load_initial_weights(job, options.initial_weights));
    torch::NoGradGuard no_grad;
    for (auto& [name, p] : parameters) p.copy_(by_name.at(name));
  }
  AdamW optimizer(parameters, job.train);
  const double scale = 1.0 / static_cast<double>(job.parallel.replicas * job.parallel.micro_batches);

  TrainResult result;
  result.setup_seconds = std::chrono::duration<double>(Clock::now() - setup_started).count();
  auto run_started = Clock::now();
  for (int64_t step = 0; step < job.train.steps; ++step) {
    if (options.cancel && options.cancel->load()) return make_error("interrupted at step {} of {}", step + 1, job.train.steps);
    auto step_started = Clock::now();
    for (auto& [name, p] : parameters)
      if (p.grad().defined()) p.mutable_grad().zero_();
    double loss_sum = 0;
    int64_t count = 0;
    for (const auto& replica : step_batches(job, dataset, step))
      for (const auto& mb : replica) {
        torch::Tensor loss = model::lm_loss(gpt.forward(mb.tokens), mb.targets);
        loss_sum += loss.item<double>();
        // As on nodes (the last stage's check): the job's hyper-parameters blew it up.
        if (!std::isfinite(loss_sum))
          return kind_error(ErrorKind::diverged,
                            "the job diverged during step {} (its loss is {}): lower train.lr (now {:g}) or raise "
                            "train.warmup_steps", step + 1, loss_sum, job.train.lr);
        ++count;
        (loss * scale).backward();
      }
    optimizer.step(step);
    result.losses.push_back(loss_sum / static_cast<double>(count));
    if (options.progress) {
      StepReport report;
      report.step = step + 1;
      report.steps = job.train.steps;
      report.loss = result.losses.back();
      report.step_seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
      double elapsed = std::chrono::duration<double>(Clock::now() - run_started).count();
      report.tokens_per_s = static_cast<double>(tokens_per_step(job) * (step + 1)) / elapsed;
      options.progress(report);
    }
  }
  result.wall_seconds = std::chrono::duration<double>(Clock::now() - run_started).count();
  result.tokens_per_s = static_cast<double>(tokens_per_step(job) * job.train.steps) / result.wall_seconds;
  {
    // The same layout a stage worker commits to (one stage, no compression).
    TrainingState state;
    state.weights = parameters;
    state.optimizer = optimizer.state();
    state.cursor = {job.train.steps, dataset.train_samples(), job.train.global_batch, job.parallel.replicas};
    state.rng.job_seed = job.train.seed;
    result.stage_state_hashes = {to_hex(training_state_hash(state))};
  }

  int64_t eval_batches = holdout_batch_count(job, dataset, options.eval_batches);
  double holdout_sum = 0;
  {
    torch::NoGradGuard no_grad;
    for (int64_t i = 0; i < eval_batches; ++i) {
      double sum = 0;
      int64_t count = 0;
      for (const auto& replica : holdout_batches(job, dataset, i))
        for (const auto& mb : replica) {
          sum += model::lm_loss(gpt.forward(mb.tokens), mb.targets).item<double>();
          ++count;
        }
      holdout_sum += sum / static_cast<double>(count);
    }
  }
  result.holdout_loss = eval_batches > 0 ? holdout_sum / static_cast<double>(eval_batches) : std::nan("");
  if (eval_batches == 0) result.holdout_loss_missing = no_holdout_batches_reason(job, dataset, options.eval_batches);
  if (!options.model_out.empty()) {
    SN_ASSIGN(std::string vocab, read_file(corpus.vocab_file));
    auto metadata = model::model_file_metadata(job.name, job.model, vocab);
    metadata["job"] = job.name;
    metadata["steps"] = std::to_string(job.train.steps);
    SN_TRY(model::save_safetensors(options.model_out, parameters, metadata));
    SN_ASSIGN(std::string bytes, read_file(options.model_out));
    result.model_path = options.model_out;
    result.model_hash = to_hex(hash_string(bytes));
  }
  return result;
}

}  // namespace sn::train

namespace sn::train {
namespace {

// The mean CPU time of RUNS calls after two warm-ups, on this thread: what
// the work costs whoever runs it, as the machine is now (its caches shared
// with whatever else runs), without the time it waits for a core.
template <typename Work>
double mean_cpu_seconds(int runs, Work&& work) {
  auto thread_cpu_seconds = [] {
    timespec t{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
  };
  for (int i = 0; i < 2; ++i) work();
  const double start = thread_cpu_seconds();
  for (int i = 0; i < runs; ++i) work();
  return (thread_cpu_seconds() - start) / runs;
}

}  // namespace

double measure_microbatch_seconds(const JobConfig& job) {
  init_single_threaded();
  // Each stage as its node runs a micro-batch: its own blocks (the first with
  // the embeddings, the last with the head and the loss), an input taken from
  // the wire and an output put on it at each boundary, forward then backward.
  // Per-call costs matter at these sizes, so the stages are timed apart rather
  // than the whole model divided by the stage count. The mean over stages.
  const int64_t b = job.sequences_per_micro_batch(), t = job.model.seq_len, d = job.model.d_model;
  const auto ranges = stage_layer_ranges(job.model.layers, job.parallel.stages);
  torch::Tensor tokens = torch::randint(0, job.model.vocab, {b, t}, torch::kInt64);
  torch::Tensor targets = torch::randint(0, job.model.vocab, {b, t}, torch::kInt64);
  solvernet::v1::Tensor wire;
  model::tensor_to_proto(torch::randn({b, t, d}), &wire);
  // 30 runs: with co-runners sharing the cores (host_corunners.h), 10 runs
  // (~40 ms, a few time slices) gave figures ±15% apart from one start to the next.
  double total = 0;
  for (size_t s = 0; s < ranges.size(); ++s) {
    const bool first = s == 0, last = s + 1 == ranges.size();
    model::StageModel stage(job.model, ranges[s].first, ranges[s].second, job.train.seed);
    total += mean_cpu_seconds(30, [&] {
      torch::Tensor input = first ? tokens : model::tensor_from_proto(wire).value().requires_grad_(true);
      torch::Tensor output = stage.forward(input);
      solvernet::v1::Tensor sent;
      if (last) {
        model::lm_loss(output, targets).backward();
      } else {
        model::tensor_to_proto(output, &sent);
        output.backward(model::tensor_from_proto(wire).value());
      }
      if (!first) model::tensor_to_proto(input.grad(), &sent);
    });
  }
  return total / static_cast<double>(ranges.size());
}

double measure_step_update_seconds(const JobConfig& job) {
  init_single_threaded();
  // The first stage: the most blocks (extras go to early stages) plus both embeddings.
  auto range = stage_layer_ranges(job.model.layers, job.parallel.stages).front();
  model::StageModel stage(job.model, range.first, range.second, job.train.seed);
  NamedTensors parameters = stage.named_parameters();
  for (auto& [name, p] : parameters) p.mutable_grad() = torch::full_like(p, 1e-3);
  AdamW optimizer(parameters, job.train);
  int64_t step = 0;
  // As a stage worker ends every step: gradients flattened for the all-reduce
  // and back, the optimizer's update, the state hash sent to the client.
  return mean_cpu_seconds(12, [&] {
    unflatten_gradients(flatten_gradients(parameters), parameters);
    optimizer.step(step++);
    TrainingState state;
    state.weights = parameters;
    state.optimizer = optimizer.state();
    (void)training_state_hash(state);
  });
}

}  // namespace sn::train
