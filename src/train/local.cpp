// The single-process reference run: the whole model, the same data, seed,
// micro-batches and optimizer as a distributed run, so their losses can be
// compared step by step.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <limits>

#include "core/fs.h"
#include "core/hash.h"
#include "model/gpt.h"
#include "model/safetensors.h"
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

// The fastest of RUNS timed calls after two untimed warm-ups: the least
// disturbed by whatever else shares the cores.
template <typename Work>
double fastest_seconds(int runs, Work&& work) {
  for (int i = 0; i < 2; ++i) work();
  double best = std::numeric_limits<double>::infinity();
  for (int i = 0; i < runs; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    work();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

double measure_microbatch_seconds(const JobConfig& job) {
  init_single_threaded();
  // The whole model on one micro-batch (embedding, blocks, head and loss), as
  // training runs it, divided by the number of stages.
  model::StageModel gpt(job.model, 0, static_cast<int>(job.model.layers), job.train.seed);
  const int64_t b = job.sequences_per_micro_batch();
  torch::Tensor tokens = torch::randint(0, job.model.vocab, {b, job.model.seq_len}, torch::kInt64);
  torch::Tensor targets = torch::randint(0, job.model.vocab, {b, job.model.seq_len}, torch::kInt64);
  return fastest_seconds(10, [&] { model::lm_loss(gpt.forward(tokens), targets).backward(); }) /
         static_cast<double>(job.parallel.stages);
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
  return fastest_seconds(6, [&] {
    unflatten_gradients(flatten_gradients(parameters), parameters);
    optimizer.step(step++);
    TrainingState state;
    state.weights = parameters;
    state.optimizer = optimizer.state();
    (void)training_state_hash(state);
  });
}

}  // namespace sn::train
