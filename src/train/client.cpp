// The client side of a distributed job: assigns roles, feeds data, drives
// steps, gathers losses and traffic, evaluates, and fetches the final model.
#include <spdlog/spdlog.h>

#include <condition_variable>
#include <cstring>
#include <thread>

#include "core/fs.h"
#include "core/hash.h"
#include "core/merkle.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"
#include "net/rpc.h"
#include "train/adamw.h"
#include "train/batches.h"
#include "train/inputs.h"
#include "train/train.h"

namespace sn::train {
namespace {

using Clock = std::chrono::steady_clock;
using Stub = solvernet::v1::Node::Stub;

std::string member_name(const net::MemberInfo& m) {
  return fmt::format("node {} (stage {}, replica {}) at {}", m.node_id.substr(0, 8), m.stage, m.replica,
                     m.address);
}

// Runs CALL(i) for every member in parallel. On the first failure the others
// are told to abort (so none waits for a peer that will never answer). The
// error reported prefers a node that could not be reached at all: when a node
// dies, its peers fail too, but the dead one is the cause.
class Fleet {
 public:
  Fleet(const std::vector<net::MemberInfo>& members, std::string job_id,
        std::chrono::milliseconds rpc_timeout)
      : members_(members), job_id_(std::move(job_id)), rpc_timeout_(rpc_timeout) {
    for (const auto& m : members_) stubs_.push_back(solvernet::v1::Node::NewStub(net::make_channel(m.address, m.node_id)));
  }

  Stub& stub(size_t i) { return *stubs_[i]; }
  std::chrono::system_clock::time_point deadline() const { return std::chrono::system_clock::now() + rpc_timeout_; }

  Status run_all(const std::string& what, const std::function<grpc::Status(size_t, grpc::ClientContext&)>& call) {
    const size_t n = members_.size();
    std::vector<grpc::Status> statuses(n);
    std::vector<bool> done(n, false);
    std::mutex mutex;
    std::condition_variable changed;
    std::vector<std::thread> threads;
    for (size_t i = 0; i < n; ++i)
      threads.emplace_back([&, i] {
        grpc::ClientContext context;
        context.set_deadline(deadline());
        grpc::Status status = call(i, context);
        std::lock_guard<std::mutex> lock(mutex);
        statuses[i] = status;
        done[i] = true;
        changed.notify_all();
      });
    bool aborted = false;
    {
      std::unique_lock<std::mutex> lock(mutex);
      while (true) {
        bool all_done = true, any_failed = false;
        for (size_t i = 0; i < n; ++i) {
          all_done = all_done && done[i];
          any_failed = any_failed || (done[i] && !statuses[i].ok());
        }
        if (all_done) break;
        if (any_failed && !aborted) {
          aborted = true;
          lock.unlock();
          abort_all("a peer failed during " + what);
          lock.lock();
          continue;
        }
        changed.wait_for(lock, std::chrono::milliseconds(200));
      }
    }
    for (auto& t : threads) t.join();
    int culprit = -1;
    for (auto code : {grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::DEADLINE_EXCEEDED}) {
      for (size_t i = 0; i < n && culprit < 0; ++i)
        if (statuses[i].error_code() == code) culprit = static_cast<int>(i);
    }
    for (size_t i = 0; i < n && culprit < 0; ++i)
      if (!statuses[i].ok()) culprit = static_cast<int>(i);
    if (culprit < 0) return ok_status();
    const auto& status = statuses[static_cast<size_t>(culprit)];
    const auto& member = members_[static_cast<size_t>(culprit)];
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE)
      return make_error("{} failed during {}: node unreachable ({})", member_name(member), what, status.error_message());
    return make_error("{} failed during {}: {}", member_name(member), what, status.error_message());
  }

  void abort_all(const std::string& reason) { end_job(true, reason, std::chrono::seconds(5)); }
  void end_all() { end_job(false, "", std::chrono::seconds(10)); }

 private:
  void end_job(bool abort, const std::string& reason, std::chrono::seconds timeout) {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < members_.size(); ++i)
      threads.emplace_back([&, i] {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + timeout);
        solvernet::v1::EndJobRequest request;
        request.set_job_id(job_id_);
        request.set_abort(abort);
        request.set_reason(reason);
        solvernet::v1::Empty reply;
        stubs_[i]->EndJob(&context, request, &reply);
      });
    for (auto& t : threads) t.join();
  }

  const std::vector<net::MemberInfo>& members_;
  std::string job_id_;
  std::chrono::milliseconds rpc_timeout_;
  std::vector<std::unique_ptr<Stub>> stubs_;
};

void fill_micro_batch(const MicroBatchData& data, bool with_tokens, bool with_targets,
                      solvernet::v1::MicroBatch* out) {
  for (int64_t id : data.sample_ids) out->add_sample_ids(id);
  if (with_tokens) model::tensor_to_proto(data.tokens, out->mutable_tokens());
  if (with_targets) model::tensor_to_proto(data.targets, out->mutable_targets());
}

}  // namespace

std::vector<std::pair<int, int>> stage_layer_ranges(int64_t layers, int64_t stages) {
  std::vector<std::pair<int, int>> ranges;
  int64_t first = 0;
  for (int64_t s = 0; s < stages; ++s) {
    int64_t count = layers / stages + (s < layers % stages ? 1 : 0);
    ranges.emplace_back(static_cast<int>(first), static_cast<int>(count));
    first += count;
  }
  return ranges;
}

Result<TrainResult> run_distributed(const JobConfig& job, const std::vector<net::MemberInfo>& members,
                                    const DistributedOptions& options) {
  init_single_threaded();
  const int64_t stages = job.parallel.stages, replicas = job.parallel.replicas;
  if (static_cast<int64_t>(members.size()) != stages * replicas)
    return make_error("the job needs {} × {} = {} nodes, {} were assigned", stages, replicas,
                      stages * replicas, members.size());
  for (size_t i = 0; i < members.size(); ++i)
    if (members[i].stage * replicas + members[i].replica != static_cast<int64_t>(i))
      return make_error("member {} is out of order (stage {}, replica {})", i, members[i].stage, members[i].replica);

  auto setup_started = Clock::now();
  SN_ASSIGN(auto corpus, model::prepare_corpus(job.data, static_cast<int>(job.model.vocab)));
  model::Dataset dataset(corpus.tokens, job.model.seq_len, job.data.holdout_fraction);
  if (dataset.train_samples() < job.train.global_batch)
    return input_error("{}: the corpus has {} training samples of {} tokens, fewer than train.global_batch = {}",
                       job.source.string(), dataset.train_samples(), job.model.seq_len + 1, job.train.global_batch);

  std::string job_id = options.job_id;
  if (job_id.empty())
    job_id = fmt::format("{}-{}", job.name, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                std::chrono::system_clock::now().time_since_epoch()).count());
  // Each stage gets only its own tensors of the starting weights, checked whole first.
  std::vector<std::string> stage_weights(static_cast<size_t>(stages));
  if (!options.initial_weights.empty()) { SN_ASSIGN(stage_weights, initial_weights_by_stage(job, options.initial_weights)); }
  Fleet fleet(members, job_id, options.rpc_timeout);
  auto ranges = stage_layer_ranges(job.model.layers, stages);
  const std::string job_toml = job_to_toml(job);

  SN_TRY(fleet.run_all("job setup", [&](size_t i, grpc::ClientContext& context) {
    const auto& self = members[i];
    solvernet::v1::SetupJobRequest request;
    request.set_job_id(job_id);
    request.set_job_toml(job_toml);
    request.set_stage(self.stage);
    request.set_replica(self.replica);
    request.set_first_layer(ranges[static_cast<size_t>(self.stage)].first);
    request.set_layer_count(ranges[static_cast<size_t>(self.stage)].second);
    for (const auto& m : members) {
      auto* member = request.add_members();
      member->set_node_id(m.node_id);
      member->set_public_key(m.public_key.data(), m.public_key.size());
      member->set_address(m.address);
      member->set_region(m.region);
      member->set_stage(m.stage);
      member->set_replica(m.replica);
    }
    request.set_topology_toml(options.topology_toml);
    request.set_time_dilation(options.scale.time_dilation);
    request.set_byte_ratio(options.scale.byte_ratio);
    request.set_gradient_byte_ratio(options.scale.gradient_byte_ratio);
    request.set_dataset_samples(dataset.train_samples());
    if (!options.initial_weights.empty()) request.set_initial_weights(stage_weights[static_cast<size_t>(self.stage)]);
    solvernet::v1::SetupJobReply reply;
    return fleet.stub(i).SetupJob(&context, request, &reply);
  }));

  TrainResult result;
  result.setup_seconds = std::chrono::duration<double>(Clock::now() - setup_started).count();
  result.stage_state_hashes.assign(static_cast<size_t>(stages), "");
  // Steady state begins once every training sample has passed once (an epoch
  // leaves a few out, so that can be later than the second epoch).
  {
    std::vector<bool> seen(static_cast<size_t>(dataset.train_samples()), false);
    int64_t unseen = dataset.train_samples(), step = 0;
    for (; unseen > 0 && step < job.train.steps; ++step)
      for (int64_t id : dataset.samples_for_step(step, job.train.global_batch, job.train.seed, replicas))
        if (!seen[static_cast<size_t>(id)]) {
          seen[static_cast<size_t>(id)] = true;
          --unseen;
        }
    result.first_steady_step = unseen == 0 ? step : job.train.steps;
  }
  std::vector<std::vector<Hash256>> state_leaves(members.size());
  auto run_started = Clock::now();

  auto run_step = [&](int64_t step, const std::vector<std::vector<MicroBatchData>>& batches,
                      bool forward_only, const std::string& what) -> Result<double> {
    std::vector<solvernet::v1::RunStepReply> replies(members.size());
    SN_TRY(fleet.run_all(what, [&](size_t i, grpc::ClientContext& context) {
      const auto& self = members[i];
      solvernet::v1::RunStepRequest request;
      request.set_job_id(job_id);
      request.set_step(step);
      request.set_forward_only(forward_only);
      for (const auto& mb : batches[static_cast<size_t>(self.replica)])
        fill_micro_batch(mb, self.stage == 0, self.stage == stages - 1, request.add_micro_batches());
      return fleet.stub(i).RunStep(&context, request, &replies[i]);
    }));
    double loss_sum = 0;
    int64_t loss_count = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      // The state hash is 32 binary bytes; a leaf is merkle_leaf of exactly
      // those bytes (docs/commitments.md). Hex is for display only.
      if (!forward_only && (replies[i].state_hash().size() != 32 || replies[i].replica_hash().size() != 32))
        return make_error("{} sent a state hash of {} bytes and a replica hash of {}, not 32 each",
                          member_name(members[i]), replies[i].state_hash().size(), replies[i].replica_hash().size());
      if (!forward_only) state_leaves[i].push_back(merkle_leaf(as_bytes(replies[i].state_hash())));
      loss_sum += replies[i].loss_sum();
      loss_count += replies[i].loss_count();
      if (members[i].replica == 0 && !forward_only)
        result.stage_state_hashes[static_cast<size_t>(members[i].stage)] = to_hex(as_bytes(replies[i].state_hash()));
      for (const auto& sent : replies[i].sent()) {
        const bool pipeline = sent.traffic() == "pipeline";
        result.bytes_by_class[sent.link_class()] += sent.bytes();
        (pipeline ? result.bytes_pipeline : result.bytes_data_parallel) += sent.bytes();
        if (!forward_only && step >= result.first_steady_step)
          (pipeline ? result.steady_bytes_pipeline : result.steady_bytes_data_parallel) += sent.bytes();
      }
    }
    // Replicas of a stage must hold bitwise the same weights and optimizer
    // state after every step (their residuals, buffers and seeds differ, so
    // the state hashes do); anything else (a compressor or all-reduce that is
    // not order-exact) is a bug.
    for (size_t i = 0; i < members.size() && !forward_only; ++i)
      if (replies[i].replica_hash() != replies[static_cast<size_t>(members[i].stage * replicas)].replica_hash())
        return make_error("{} diverged from replica 0 of its stage after step {}", member_name(members[i]), step + 1);
    if (!forward_only && step >= result.first_steady_step) ++result.steady_steps;
    if (!forward_only)
      for (const auto& reply : replies) {
        result.node_compute_seconds_total += reply.compute_seconds() / static_cast<double>(members.size());
        result.node_wait_seconds_total += reply.wait_seconds() / static_cast<double>(members.size());
      }
    if (loss_count == 0) return make_error("no loss came back from the last stage");
    return loss_sum / static_cast<double>(loss_count);
  };

  for (int64_t step = 0; step < job.train.steps; ++step) {
    if (options.cancel && options.cancel->load()) {
      fleet.abort_all("interrupted by the user");
      return make_error("interrupted at step {} of {}", step, job.train.steps);
    }
    auto step_started = Clock::now();
    auto loss = run_step(step, step_batches(job, dataset, step), false, fmt::format("step {}", step + 1));
    if (!loss.ok()) {
      fleet.abort_all(loss.message());
      return loss.error();
    }
    result.losses.push_back(*loss);
    result.step_seconds_total += std::chrono::duration<double>(Clock::now() - step_started).count();
    if (options.progress) {
      StepReport report;
      report.step = step + 1;
      report.steps = job.train.steps;
      report.loss = *loss;
      report.step_seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
      double elapsed = std::chrono::duration<double>(Clock::now() - run_started).count();
      report.tokens_per_s = static_cast<double>(tokens_per_step(job) * (step + 1)) / elapsed;
      report.bytes_by_class = result.bytes_by_class;
      report.bytes_pipeline = result.bytes_pipeline;
      report.bytes_data_parallel = result.bytes_data_parallel;
      options.progress(report);
    }
  }
  result.wall_seconds = std::chrono::duration<double>(Clock::now() - run_started).count();
  result.tokens_per_s = static_cast<double>(tokens_per_step(job) * job.train.steps) / result.wall_seconds;
  for (const auto& leaves : state_leaves) result.member_commitments.push_back(to_hex(merkle_root(leaves)));

  int64_t eval_batches = holdout_batch_count(job, dataset, options.eval_batches);
  double holdout_sum = 0;
  for (int64_t i = 0; i < eval_batches; ++i) {
    auto loss = run_step(-1 - i, holdout_batches(job, dataset, i), true, "held-out evaluation");
    if (!loss.ok()) {
      fleet.abort_all(loss.message());
      return loss.error();
    }
    holdout_sum += *loss;
  }
  result.holdout_loss = eval_batches > 0 ? holdout_sum / static_cast<double>(eval_batches) : std::nan("");

  if (!options.model_out.empty()) {
    NamedTensors whole;
    std::set<std::string> seen;
    for (int64_t s = 0; s < stages; ++s) {
      size_t i = static_cast<size_t>(s * replicas);
      grpc::ClientContext context;
      context.set_deadline(fleet.deadline());
      solvernet::v1::FetchWeightsRequest request;
      request.set_job_id(job_id);
      solvernet::v1::FetchWeightsReply reply;
      grpc::Status status = fleet.stub(i).FetchWeights(&context, request, &reply);
      if (!status.ok()) {
        fleet.abort_all("could not fetch weights");
        return make_error("{} failed to send its weights: {}", member_name(members[i]), status.error_message());
      }
      SN_ASSIGN(auto tensors, model::load_safetensors_bytes(reply.safetensors()));
      for (auto& [name, tensor] : tensors)
        if (seen.insert(name).second) whole.emplace_back(name, tensor);
    }
    SN_TRY(ensure_directory(options.model_out.has_parent_path() ? options.model_out.parent_path()
                                                                 : std::filesystem::path(".")));
    SN_TRY(model::save_safetensors(options.model_out, whole,
                                   {{"job", job.name}, {"steps", std::to_string(job.train.steps)}}));
    SN_ASSIGN(std::string bytes, read_file(options.model_out));
    result.model_path = options.model_out;
    result.model_hash = to_hex(hash_string(bytes));
  }
  fleet.end_all();
  return result;
}

}  // namespace sn::train
