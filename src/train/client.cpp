// The client side of a distributed job, as a session of named phases:
// prepare the data, set up the members, run the steps, evaluate, fetch the
// model, end. The Fleet (fleet.h) does the calls; this file decides what to
// send and what to make of the replies.
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <set>

#include "core/fs.h"
#include "core/hash.h"
#include "core/merkle.h"
#include "train/evidence.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"
#include "train/adamw.h"
#include "train/batches.h"
#include "train/control.h"
#include "train/fleet.h"
#include "train/inputs.h"
#include "train/train.h"

namespace sn::train {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

void fill_micro_batch(const MicroBatchData& data, bool with_tokens, bool with_targets,
                      solvernet::v1::MicroBatch* out) {
  for (int64_t id : data.sample_ids) out->add_sample_ids(id);
  if (with_tokens) model::tensor_to_proto(data.tokens, out->mutable_tokens());
  if (with_targets) model::tensor_to_proto(data.targets, out->mutable_targets());
}

// Deadlines of one job's calls, from its peer timeout and size (never a fixed
// ten minutes): a healthy step takes its compute plus waits that the nodes
// bound by the peer timeout themselves, so a step call gets two peer timeouts
// plus four times its compute estimated at a slow 1 GFLOP/s.
struct JobDeadlines {
  milliseconds setup, step, fetch;
  FleetTimeouts fleet;
};

JobDeadlines deadlines_for(const JobConfig& job, milliseconds peer_timeout, size_t weights_bytes) {
  const double params = static_cast<double>(job.model.parameter_count());
  const double stages = static_cast<double>(job.parallel.stages);
  const double flops = 6.0 * params / stages * static_cast<double>(tokens_per_step(job)) /
                       static_cast<double>(job.parallel.replicas);
  const auto compute = milliseconds(static_cast<int64_t>(flops / 1e9 * 1000.0));
  const auto transfer = [](double bytes) { return milliseconds(static_cast<int64_t>(bytes / 10e6 * 1000.0)); };
  JobDeadlines d;
  d.setup = peer_timeout + std::chrono::seconds(30) + transfer(static_cast<double>(weights_bytes));
  d.step = 2 * peer_timeout + 4 * compute;
  d.fetch = peer_timeout + transfer(4.0 * params / stages);
  // A member silent for half the peer timeout (3..15 s) has stopped, well
  // before its peers give up waiting for it.
  d.fleet.liveness = std::clamp<milliseconds>(peer_timeout / 2, std::chrono::seconds(3), std::chrono::seconds(15));
  return d;
}

class JobSession {
 public:
  JobSession(const JobConfig& job, const std::vector<net::MemberInfo>& members, const DistributedOptions& options)
      : job_(job), members_(members), options_(options), stages_(job.parallel.stages),
        replicas_(job.parallel.replicas) {}
  // No path out of a session leaves a node holding the job.
  ~JobSession() {
    if (fleet_ && !fleet_->ended()) fleet_->end_all(true, "the client gave up on the job");
  }

  Status check_members();
  Status prepare_data();
  Status set_up_members();
  Status train();
  Status evaluate();
  Status fetch_model();
  void end() { fleet_->end_all(false, ""); }
  TrainResult& result() { return result_; }

 private:
  Result<double> run_step(int64_t step, const std::vector<std::vector<MicroBatchData>>& batches, bool forward_only,
                          const std::string& what);
  void account_traffic(const solvernet::v1::RunStepReply& reply, int64_t step, bool forward_only);

  const JobConfig& job_;
  const std::vector<net::MemberInfo>& members_;
  const DistributedOptions& options_;
  const int64_t stages_, replicas_;
  std::optional<NodeKey> own_key_;
  std::optional<model::Dataset> dataset_;
  std::string tokenizer_vocab_;  // saved inside the final model file
  std::string job_id_;
  std::vector<std::string> stage_weights_;  // per stage; empty: fresh weights
  JobDeadlines deadlines_{};
  std::unique_ptr<Fleet> fleet_;
  std::vector<std::vector<Hash256>> step_leaves_;  // per member: leaf_0 … leaf_t (docs/commitments.md)
  TrainResult result_;
  Clock::time_point setup_started_ = Clock::now();
};

Status JobSession::check_members() {
  if (static_cast<int64_t>(members_.size()) != stages_ * replicas_)
    return make_error("the job needs {} × {} = {} nodes, {} were assigned", stages_, replicas_, stages_ * replicas_,
                      members_.size());
  for (size_t i = 0; i < members_.size(); ++i)
    if (members_[i].stage * replicas_ + members_[i].replica != static_cast<int64_t>(i))
      return make_error("member {} is out of order (stage {}, replica {})", i, members_[i].stage, members_[i].replica);
  return ok_status();
}

// The corpus and its samples, the job id, and each stage's starting weights.
Status JobSession::prepare_data() {
  SN_ASSIGN(auto corpus, model::prepare_corpus(job_.data, static_cast<int>(job_.model.vocab)));
  SN_ASSIGN(tokenizer_vocab_, read_file(corpus.vocab_file));
  dataset_.emplace(corpus.tokens, job_.model.seq_len, job_.data.holdout_fraction);
  if (dataset_->train_samples() < job_.train.global_batch)
    return input_error("{}: the corpus has {} training samples of {} tokens, fewer than train.global_batch = {}",
                       job_.source.string(), dataset_->train_samples(), job_.model.seq_len + 1, job_.train.global_batch);
  job_id_ = options_.job_id;
  if (job_id_.empty())
    job_id_ = fmt::format("{}-{}", job_.name, std::chrono::duration_cast<milliseconds>(
                                                  std::chrono::system_clock::now().time_since_epoch()).count());
  stage_weights_.assign(static_cast<size_t>(stages_), "");
  size_t weights_bytes = 0;
  // Each stage gets only its own tensors of the starting weights, checked whole first.
  if (!options_.initial_weights.empty()) {
    SN_ASSIGN(stage_weights_, initial_weights_by_stage(job_, options_.initial_weights));
    for (const auto& w : stage_weights_) weights_bytes += w.size();
  }
  deadlines_ = deadlines_for(job_, options_.peer_timeout, weights_bytes);
  return ok_status();
}

// SetupJob on every member; from then on the members' leases are renewed.
Status JobSession::set_up_members() {
  const NodeKey* key = options_.client_key;
  if (!key) key = &own_key_.emplace(NodeKey::generate());
  fleet_ = std::make_unique<Fleet>(members_, job_id_, *key, deadlines_.fleet, options_.cancel);
  const auto ranges = stage_layer_ranges(job_.model.layers, stages_);
  const std::string job_toml = job_to_toml(job_);
  std::vector<int64_t> leases(members_.size(), 0);
  std::vector<std::string> start_leaves(members_.size());
  SN_TRY(fleet_->run_all("job setup", deadlines_.setup, [&](size_t i, grpc::ClientContext& context) {
    const auto& self = members_[i];
    solvernet::v1::SetupJobRequest request;
    request.set_job_id(job_id_);
    request.set_job_toml(job_toml);
    request.set_stage(self.stage);
    request.set_replica(self.replica);
    request.set_first_layer(ranges[static_cast<size_t>(self.stage)].first);
    request.set_layer_count(ranges[static_cast<size_t>(self.stage)].second);
    request.set_chain_job_id(options_.chain_job_id);
    for (const auto& m : members_) {
      auto* member = request.add_members();
      member->set_node_id(m.node_id);
      member->set_public_key(m.public_key.data(), m.public_key.size());
      member->set_address(m.address);
      member->set_region(m.region);
      member->set_stage(m.stage);
      member->set_replica(m.replica);
    }
    request.set_topology_toml(options_.topology_toml);
    request.set_time_dilation(options_.scale.time_dilation);
    request.set_byte_ratio(options_.scale.byte_ratio);
    request.set_gradient_byte_ratio(options_.scale.gradient_byte_ratio);
    request.set_dataset_samples(dataset_->train_samples());
    request.set_peer_timeout_ms(options_.peer_timeout.count());
    request.set_initial_weights(stage_weights_[static_cast<size_t>(self.stage)]);
    sign_request(fleet_->signer(), "SetupJob", request);
    solvernet::v1::SetupJobReply reply;
    grpc::Status status = fleet_->stub(i).SetupJob(&context, request, &reply);
    leases[i] = reply.lease_ms();
    start_leaves[i] = reply.leaf();
    return status;
  }));
  int64_t lease = *std::min_element(leases.begin(), leases.end());
  fleet_->start_lease_renewal(milliseconds(lease > 0 ? lease : 30000));
  result_.setup_seconds = std::chrono::duration<double>(Clock::now() - setup_started_).count();
  result_.stage_state_hashes.assign(static_cast<size_t>(stages_), "");
  step_leaves_.assign(members_.size(), {});
  for (size_t i = 0; i < members_.size(); ++i) {
    if (start_leaves[i].size() != 32) {
      auto error = kind_error(ErrorKind::bad_peer, "{} sent a start leaf of {} bytes, not 32", member_name(members_[i]),
                              start_leaves[i].size());
      fleet_->end_all(true, error.message);
      return error;
    }
    Hash256 leaf;
    std::memcpy(leaf.data(), start_leaves[i].data(), 32);
    step_leaves_[i].push_back(leaf);
  }
  // Steady state begins once every training sample has passed once (an epoch
  // leaves a few out, so that can be later than the second epoch).
  std::vector<bool> seen(static_cast<size_t>(dataset_->train_samples()), false);
  int64_t unseen = dataset_->train_samples(), step = 0;
  for (; unseen > 0 && step < job_.train.steps; ++step)
    for (int64_t id : dataset_->samples_for_step(step, job_.train.global_batch, job_.train.seed, replicas_))
      if (!seen[static_cast<size_t>(id)]) {
        seen[static_cast<size_t>(id)] = true;
        --unseen;
      }
  result_.first_steady_step = unseen == 0 ? step : job_.train.steps;
  return ok_status();
}

void JobSession::account_traffic(const solvernet::v1::RunStepReply& reply, int64_t step, bool forward_only) {
  for (const auto& sent : reply.sent()) {
    const bool pipeline = sent.traffic() == "pipeline";
    result_.bytes_by_class[sent.link_class()] += sent.bytes();
    (pipeline ? result_.bytes_pipeline : result_.bytes_data_parallel) += sent.bytes();
    if (!forward_only && step >= result_.first_steady_step)
      (pipeline ? result_.steady_bytes_pipeline : result_.steady_bytes_data_parallel) += sent.bytes();
  }
}

// One step (or one forward-only evaluation batch) on every member; the mean loss.
Result<double> JobSession::run_step(int64_t step, const std::vector<std::vector<MicroBatchData>>& batches,
                                    bool forward_only, const std::string& what) {
  std::vector<solvernet::v1::RunStepReply> replies(members_.size());
  SN_TRY(fleet_->run_all(what, deadlines_.step, [&](size_t i, grpc::ClientContext& context) {
    const auto& self = members_[i];
    solvernet::v1::RunStepRequest request;
    request.set_job_id(job_id_);
    request.set_step(step);
    request.set_forward_only(forward_only);
    for (const auto& mb : batches[static_cast<size_t>(self.replica)])
      fill_micro_batch(mb, self.stage == 0, self.stage == stages_ - 1, request.add_micro_batches());
    sign_request(fleet_->signer(), "RunStep", request);
    return fleet_->stub(i).RunStep(&context, request, &replies[i]);
  }));
  double loss_sum = 0;
  int64_t loss_count = 0;
  for (size_t i = 0; i < members_.size(); ++i) {
    // State hash and step leaf are 32 binary bytes each (docs/commitments.md).
    // Hex is for display only.
    if (!forward_only && (replies[i].state_hash().size() != 32 || replies[i].replica_hash().size() != 32 ||
                          replies[i].leaf().size() != 32)) {
      auto error = kind_error(ErrorKind::bad_peer,
                              "{} sent a state hash of {} bytes, a replica hash of {} and a leaf of {}, not 32 each",
                              member_name(members_[i]), replies[i].state_hash().size(), replies[i].replica_hash().size(),
                              replies[i].leaf().size());
      fleet_->end_all(true, error.message);
      return error;
    }
    if (!forward_only) {
      Hash256 leaf;
      std::memcpy(leaf.data(), replies[i].leaf().data(), 32);
      step_leaves_[i].push_back(leaf);
    }
    loss_sum += replies[i].loss_sum();
    loss_count += replies[i].loss_count();
    if (members_[i].replica == 0 && !forward_only)
      result_.stage_state_hashes[static_cast<size_t>(members_[i].stage)] = to_hex(as_bytes(replies[i].state_hash()));
    account_traffic(replies[i], step, forward_only);
  }
  // Replicas of a stage must hold bitwise the same weights and optimizer
  // state after every step (their residuals, buffers and seeds differ, so
  // the state hashes do); anything else (a compressor or all-reduce that is
  // not order-exact) is a bug.
  for (size_t i = 0; i < members_.size() && !forward_only; ++i)
    if (replies[i].replica_hash() != replies[static_cast<size_t>(members_[i].stage * replicas_)].replica_hash()) {
      auto error = kind_error(ErrorKind::bad_peer, "{} diverged from replica 0 of its stage after step {}",
                              member_name(members_[i]), step + 1);
      // A verifiable job on chain goes on: every replica committed to its own
      // leaves, and the verifiers' replays (not the client) decide who lied
      // (docs/verification.md, "Replicas that diverge").
      if (job_.verify.enabled && options_.chain_job_id != 0) {
        const std::string who = member_name(members_[i]);
        bool known = false;
        for (const auto& seen : result_.replica_divergences) known |= seen.starts_with(who + " ");
        if (!known) result_.replica_divergences.push_back(error.message);
        continue;
      }
      fleet_->end_all(true, error.message);
      return error;
    }
  if (!forward_only && step >= result_.first_steady_step) ++result_.steady_steps;
  if (!forward_only)
    for (const auto& reply : replies) {
      result_.node_compute_seconds_total += reply.compute_seconds() / static_cast<double>(members_.size());
      result_.node_wait_seconds_total += reply.wait_seconds() / static_cast<double>(members_.size());
    }
  if (loss_count == 0) return make_error("no loss came back from the last stage");
  return loss_sum / static_cast<double>(loss_count);
}

Status JobSession::train() {
  const auto run_started = Clock::now();
  for (int64_t step = 0; step < job_.train.steps; ++step) {
    if (options_.cancel && options_.cancel->load()) {
      fleet_->end_all(true, "interrupted by the user");
      return kind_error(ErrorKind::aborted, "interrupted at step {} of {}", step, job_.train.steps);
    }
    const auto step_started = Clock::now();
    SN_ASSIGN(double loss, run_step(step, step_batches(job_, *dataset_, step), false, fmt::format("step {}", step + 1)));
    result_.losses.push_back(loss);
    result_.step_seconds_total += std::chrono::duration<double>(Clock::now() - step_started).count();
    if (options_.progress) {
      StepReport report;
      report.step = step + 1;
      report.steps = job_.train.steps;
      report.loss = loss;
      report.step_seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
      const double elapsed = std::chrono::duration<double>(Clock::now() - run_started).count();
      report.tokens_per_s = static_cast<double>(tokens_per_step(job_) * (step + 1)) / elapsed;
      report.bytes_by_class = result_.bytes_by_class;
      report.bytes_pipeline = result_.bytes_pipeline;
      report.bytes_data_parallel = result_.bytes_data_parallel;
      options_.progress(report);
    }
  }
  result_.wall_seconds = std::chrono::duration<double>(Clock::now() - run_started).count();
  result_.tokens_per_s = static_cast<double>(tokens_per_step(job_) * job_.train.steps) / result_.wall_seconds;
  for (const auto& leaves : step_leaves_) result_.member_commitments.push_back(to_hex(leaves_root(leaves)));
  return ok_status();
}

Status JobSession::evaluate() {
  const int64_t batches = holdout_batch_count(job_, *dataset_, options_.eval_batches);
  double sum = 0;
  for (int64_t i = 0; i < batches; ++i) {
    SN_ASSIGN(double loss, run_step(-1 - i, holdout_batches(job_, *dataset_, i), true, "held-out evaluation"));
    sum += loss;
  }
  result_.holdout_loss = batches > 0 ? sum / static_cast<double>(batches) : std::nan("");
  return ok_status();
}

// Replica 0 of every stage sends its weights; they are joined into one file.
Status JobSession::fetch_model() {
  if (options_.model_out.empty()) return ok_status();
  NamedTensors whole;
  std::set<std::string> seen;
  for (int64_t s = 0; s < stages_; ++s) {
    const size_t i = static_cast<size_t>(s * replicas_);
    solvernet::v1::FetchWeightsReply reply;
    auto fetched = fleet_->run_one(i, "fetching weights", deadlines_.fetch, [&](size_t m, grpc::ClientContext& context) {
      solvernet::v1::FetchWeightsRequest request;
      request.set_job_id(job_id_);
      sign_request(fleet_->signer(), "FetchWeights", request);
      return fleet_->stub(m).FetchWeights(&context, request, &reply);
    });
    if (!fetched.ok()) {
      fleet_->end_all(true, "could not fetch weights");
      return fetched.error();
    }
    SN_ASSIGN(auto tensors, model::load_safetensors_bytes(reply.safetensors()));
    for (auto& [name, tensor] : tensors)
      if (seen.insert(name).second) whole.emplace_back(name, tensor);
  }
  SN_TRY(ensure_directory(options_.model_out.has_parent_path() ? options_.model_out.parent_path()
                                                                : std::filesystem::path(".")));
  auto metadata = model::model_file_metadata(job_.name, job_.model, tokenizer_vocab_);
  metadata["job"] = job_.name;
  metadata["steps"] = std::to_string(job_.train.steps);
  SN_TRY(model::save_safetensors(options_.model_out, whole, metadata));
  SN_ASSIGN(std::string bytes, read_file(options_.model_out));
  result_.model_path = options_.model_out;
  result_.model_hash = to_hex(hash_string(bytes));
  return ok_status();
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
  JobSession session(job, members, options);
  SN_TRY(session.check_members());
  SN_TRY(session.prepare_data());
  SN_TRY(session.set_up_members());
  SN_TRY(session.train());
  SN_TRY(session.evaluate());
  SN_TRY(session.fetch_model());
  session.end();
  return std::move(session.result());
}

}  // namespace sn::train
