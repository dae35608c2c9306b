// The client side of a distributed job, as a session of named phases:
// prepare the data, set up the members, run the steps, evaluate, fetch the
// model, end. The Fleet (fleet.h) does the calls; this file decides what to
// send and what to make of the replies.
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <set>
#include <stop_token>
#include <thread>

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
#include "net/rpc.h"
#include "train/diloco.h"
#include "train/fleet.h"
#include "train/inputs.h"
#include "train/recovery.h"
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
  // A step's deadline adapts (train/diloco.h, StepDeadline): `step` above
  // until the first step, then max(step_floor, 8 × RTT + 3 × recent p95).
  milliseconds step_floor;
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
  // Never below one peer timeout: a node waiting for a peer gives up by
  // then and says which peer, an error worth more than the client's timeout.
  d.step_floor = peer_timeout;
  d.fetch = peer_timeout + transfer(4.0 * params / stages);
  return d;
}

// [diloco] Replica groups that failed, each with what failed it.
using GroupFailures = std::map<int, std::string>;

class JobSession {
 public:
  JobSession(const JobConfig& job, const std::vector<net::MemberInfo>& members, const DistributedOptions& options)
      : job_(job), members_(members), options_(options), stages_(job.parallel.stages),
        planned_replicas_(options.recovery.planned_replicas > 0 ? options.recovery.planned_replicas
                                                                : job.parallel.replicas),
        replicas_(job.parallel.replicas) {}
  // No path out of a session leaves a node holding the job.
  ~JobSession() {
    if (fleet_ && !fleet_->ended()) fleet_->end_all(true, "the client gave up on the job");
  }

  Status check_members();
  Status prepare_data();
  // SetupJob on every member; START_STEP > 0: each first receives its role's
  // checkpoint of that step from the job dir's mirror and resumes from it.
  Status set_up_members(int64_t start_step);
  Status train();
  Status evaluate();
  // [diloco]: inner steps per live replica group, outer steps at every
  // inner_steps-th step and the last; a group that fails is dropped.
  Status train_diloco();
  Status fetch_model();
  Status finish();  // evaluate and fetch, recovering from a member lost meanwhile
  Status train_from(int64_t first_step);
  void end() {
    fleet_->end_all(false, "");
    if (mirror_)
      if (auto written = write_state(mirror_->newest_common_step(), "completed"); !written.ok())
        spdlog::warn("job dir: {}", written.message());
    for (const auto& spare : spares_) result_.idle_spares.push_back(spare.node_id);
    for (const auto& member : members_) result_.member_node_ids.push_back(member.node_id);
  }
  TrainResult& result() { return result_; }
  // The step `train --resume` of the job dir would start from (0: none, or a
  // [diloco] job, whose job dir cannot be resumed).
  int64_t resumable_step() const {
    return mirror_ && !job_.diloco.enabled ? mirror_->newest_common_step() : 0;
  }
  // Whether the client itself did not run for longer than the nodes' lease
  // (Fleet::pause_explains): they dropped the job.
  bool client_paused() const { return fleet_ && fleet_->pause_explains("").has_value(); }

 private:
  // A verifiable job on chain: a member caught lying (diverging replicas, a
  // checkpoint that is not its reported state) is left to the verifiers'
  // replays and the stakes, and the job goes on (docs/verification.md).
  bool left_to_verification() const { return job_.verify.enabled && options_.chain_job_id != 0; }
  // Member I's share of BATCHES: its replica's micro-batches (or replica
  // SHARE's, if >= 0), with tokens for the first stage and targets for the last.
  void add_micro_batches(size_t i, const std::vector<std::vector<MicroBatchData>>& batches,
                         solvernet::v1::RunStepRequest& request, int share = -1) const;
  // Stamps REQUEST with this job, signs it and sends it to member I.
  grpc::Status send_run_step(size_t i, grpc::ClientContext& context, solvernet::v1::RunStepRequest& request,
                             solvernet::v1::RunStepReply* reply);
  Result<double> run_step(int64_t step, const std::vector<std::vector<MicroBatchData>>& batches, bool forward_only,
                          const std::string& what);
  void account_traffic(const solvernet::v1::RunStepReply& reply, int64_t step, bool forward_only);
  // Recovery (docs/resilience.md; train/recovery.h).
  bool recovery_enabled() const { return !options_.recovery.job_dir.empty(); }
  // Every member's checkpoint of STEP (steps done) into the job dir's mirror.
  // [diloco]: the live groups' only; a member that fails to hand its over
  // costs its group (lose_groups), and the error says the mirror is not whole
  // (the job ended only if fleet_->ended()).
  Status mirror_checkpoints(int64_t step);
  // JOB_DIR/state.json for the newest mirrored checkpoint STEP, with the job
  // as it runs now; FINISHED: "" or "completed".
  Status write_state(int64_t step, const std::string& finished);
  // After the mirror built a new layout (re-plan, grow-back): state.json
  // names it, as of the checkpoint of STEP, then the old layout is deleted.
  void switch_layout(int64_t step);
  // After FAILURE during 0-based step FAILED_STEP: replaces the members that
  // stopped answering by spares, restarts every member from the newest
  // mirrored checkpoint, and returns its step (where training goes on). With
  // no spare it re-plans on fewer replicas (replan). An error (no spare and
  // no whole group, too many recoveries, a failure that is not a node gone)
  // stops the job; its message says where the checkpoint is and how to
  // resume.
  Result<int64_t> recover(int64_t failed_step, Error failure);
  // No spare for the members in UNREPLACED (indices): drops every replica
  // group holding one, if at least one group stays whole and the global
  // batch divides over the rest, and renumbers the groups kept. The live
  // members of dropped groups become spares. False: not possible (WHY says
  // so); nothing changed.
  // RESTORE: the checkpoint the members restart from, recorded in state.json
  // as one that predates the re-plan.
  bool replan(const std::vector<size_t>& unreplaced, int64_t restore, std::string& why);
  // --resume with fewer replicas than the job dir's layout holds (too few
  // nodes): the layout keeps the first ones, from the resumed checkpoint,
  // as replan() keeps the groups left whole.
  Status replan_at_resume();
  // At the mirrored checkpoint of STEP of a re-planned job: if idle nodes
  // answer (no waiting) for whole groups, adds groups back towards the
  // planned replicas and sets every member up from that checkpoint (the new
  // groups from replica 0's). Nothing to do or no spares: OK, unchanged.
  Status grow_back(int64_t step);
  // The idle nodes that answer now (no waiting): known spares and those
  // find_spares discovers, none in IN_JOB (node ids). Empties spares_; the
  // caller puts back the ones it does not use.
  std::vector<net::MemberInfo> ready_idle_nodes(const std::set<std::string>& in_job);
  // [diloco], at the outer boundary after STEPS_DONE steps (every live
  // replica of a stage bitwise equal): if idle nodes fill every dropped
  // group's slot whole (one per stage), they take those slots; every member
  // restarts from this boundary's checkpoint, the newcomers from the first
  // live group's (weights, outer state and that group's AdamW moments), and
  // the slots are live again. Needs a job dir: the checkpoints pass through
  // its mirror. Nothing to do or too few idle nodes: OK, unchanged.
  Status diloco_rejoin(int64_t steps_done);
  // An idle node that answers, not one of the LIVE members (a dead member
  // restarted with its data dir has its old node id and is welcome back).
  std::optional<net::MemberInfo> take_spare(const std::set<std::string>& live);
  // A lost member (one of members_ not in LIVE) that answers again, idle, at
  // its last address: restarted with its data dir, it has its old node id.
  // Found without the DHT, which a node restarted while its bootstrap is
  // down cannot join.
  std::optional<net::MemberInfo> lost_member_back(const std::set<std::string>& live);
  Status diloco_outer_step(int64_t steps_done);
  // The held-out batch BATCHES, every group's share of it (a dropped
  // group's too) on a live group: after the last outer step every live
  // replica holds the same weights, so any live group gives the share's loss.
  // A group that fails is dropped and its share goes to another; an error
  // only when no group is left.
  Result<double> diloco_evaluate(const std::vector<std::vector<MicroBatchData>>& batches);
  // FAILED: each group dropped and why (its own cause, never another group's).
  void drop_groups(const GroupFailures& failed, int64_t step);
  // The groups of MEMBERS whose call failed (STATUSES indexed like MEMBERS),
  // each with its first failure, named, that is not a call cancelled only
  // because a group mate failed.
  GroupFailures failed_groups(const std::vector<size_t>& members, const std::vector<grpc::Status>& statuses) const;
  // [diloco] A member loss after STEPS_DONE steps, during WHAT: drops the
  // groups in FAILED (each one's cause led by its members that answer no
  // ping) and goes on. Ends the job with an error when no group is left, or
  // when the client itself did not run for longer than the lease (no node is
  // to blame).
  Status lose_groups(const GroupFailures& failed, int64_t steps_done, const std::string& what);
  // The live members of GROUPS that do not answer one ping within the fleet's
  // ping timeout (pinged in parallel): frozen or gone. Costs that timeout
  // only when one of them is frozen.
  std::vector<size_t> silent_in(const std::set<int>& groups) const;
  // WHY, led by the members in SILENT (indices) if any: the member that
  // stalled a group is its cause, not the peer that timed out waiting for it.
  std::string blame_silent(const std::vector<size_t>& silent, const std::string& why) const;
  // The members in SILENT (indices) of replica group GROUP.
  std::vector<size_t> silent_of(int group, const std::vector<size_t>& silent) const;
  std::vector<size_t> live_members() const;
  int first_live_group() const;

  // The job as the members run it: a re-plan lowers parallel.replicas.
  JobConfig job_;
  std::vector<net::MemberInfo> members_;  // a recovery puts spares in dead members' places
  const DistributedOptions& options_;
  const int64_t stages_, planned_replicas_;
  int64_t replicas_;  // planned_replicas_ until a re-plan
  // The checkpoint step a re-plan restarted from: members set up from that
  // checkpoint are told it is of the job before the re-plan (-1: none).
  int64_t replanned_at_ = -1;
  int mirrors_ = 0;  // checkpoints mirrored, for --kill-self-at-mirror
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
  std::optional<CheckpointMirror> mirror_;
  std::vector<net::MemberInfo> spares_;
  int recoveries_ = 0;
  std::map<std::string, int> local_data_failures_;  // by node id: its own checkpoint copy was unusable
  // Node ids this job no longer takes, as a spare or a group growing back:
  // their own disk was full, or their checkpoint copy failed again.
  std::set<std::string> unfit_nodes_;
  std::set<int64_t> diverged_stages_;  // [verify] on chain: stages whose replicas' divergence is recorded
  // Per member: the state hash it reported after its newest step (steps done,
  // hash); a checkpoint it hands over for that step must hold that state.
  std::map<size_t, std::pair<int64_t, std::string>> reported_state_;
  int64_t start_step_ = 0;
  std::optional<StepDeadline> step_deadline_;
  std::string dataset_hash_;            // [diloco]: binary, 32 bytes
  std::vector<bool> live_groups_;       // per replica group; all live unless [diloco] dropped some
  // [diloco]: members of dropped groups (the dead too): idle again once they
  // answered their EndJob, candidates for a rejoin without the DHT.
  std::vector<net::MemberInfo> dropped_members_;
  int64_t eval_requests_ = 0;           // [diloco]: held-out requests so far (each its own step number)
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
  // A --resume has it from checking the job dir's data cursor.
  std::shared_ptr<const model::TokenizedCorpus> prepared = options_.recovery.corpus;
  if (!prepared) {
    SN_ASSIGN(auto tokenized, model::prepare_corpus(job_.data, static_cast<int>(job_.model.vocab)));
    prepared = std::make_shared<const model::TokenizedCorpus>(std::move(tokenized));
  }
  const model::TokenizedCorpus& corpus = *prepared;
  SN_ASSIGN(tokenizer_vocab_, read_file(corpus.vocab_file));
  if (job_.diloco.enabled) {
    const Hash256 hash = dataset_hash(corpus.tokens);
    dataset_hash_.assign(reinterpret_cast<const char*>(hash.data()), hash.size());
    result_.diloco.dataset_hash = to_hex(hash);
  }
  live_groups_.assign(static_cast<size_t>(replicas_), true);
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
  deadlines_.fleet = fleet_timeouts(options_.peer_timeout, options_.peer_rtt_ms);
  const auto& recovery = options_.recovery;
  spares_ = recovery.spares;
  start_step_ = recovery.resume_step;
  result_.resumed_from = start_step_;
  result_.losses = recovery.resumed_losses;
  if (static_cast<int64_t>(result_.losses.size()) != start_step_)
    return make_error("resuming at step {} with {} earlier losses", start_step_, result_.losses.size());
  if (recovery_enabled()) {
    result_.job_dir = recovery.job_dir;
    mirror_.emplace(recovery.job_dir, stages_, recovery.layout_replicas > 0 ? recovery.layout_replicas : replicas_,
                    recovery.layout);
    // job.toml keeps the job as planned (state.json has the replicas it runs on).
    JobConfig planned = job_;
    planned.parallel.replicas = planned_replicas_;
    SN_TRY(write_job_file(recovery.job_dir, planned));
    if (start_step_ == 0) SN_TRY(write_state(0, ""));
    // A client killed mid-mirror leaves checkpoints state.json does not name;
    // kept, a recovery would restore the newest, a step this run has not done.
    if (start_step_ > 0) mirror_->prune_all_but(start_step_);
    // The checkpoint resumed from is one a re-plan restarted from: restored the same way.
    if (recovery.resume_replanned && start_step_ > 0) replanned_at_ = start_step_;
    if (start_step_ > 0 && replicas_ < mirror_->replicas()) SN_TRY(replan_at_resume());
  }
  step_deadline_.emplace(deadlines_.step, deadlines_.step_floor);
  return ok_status();
}

// SetupJob on every member; from then on the members' leases are renewed.
Status JobSession::set_up_members(int64_t start_step) {
  const NodeKey* key = options_.client_key;
  if (!key) key = own_key_ ? &*own_key_ : &own_key_.emplace(NodeKey::generate());
  fleet_.reset();  // a recovery's new fleet: the old one has ended the job on every member
  fleet_ = std::make_unique<Fleet>(members_, job_id_, *key, deadlines_.fleet, options_.cancel);
  const auto ranges = stage_layer_ranges(job_.model.layers, stages_);
  const std::string job_toml = job_to_toml(job_);
  std::vector<std::string> start_leaves(members_.size());
  // The state each member must restart from, bitwise: the mirrored
  // manifest's state hash, which its start leaf commits to.
  std::vector<Hash256> expected_state(members_.size());
  // In a [diloco] job a member that fails here costs its group, not the
  // job, at the job's first set-up as at a rejoin: the groups that set up go
  // on (at a rejoin from the boundary, where they already are), and a group
  // dropped now may rejoin at an outer boundary like any other.
  const bool per_group = job_.diloco.enabled;
  const std::string group_what =
      start_step > 0 ? fmt::format("the rejoin after step {}", start_step) : std::string("job setup");
  const auto run = [&](const std::string& what, const Fleet::Call& call) -> Status {
    if (!per_group) return fleet_->run_all(what, deadlines_.setup, call);
    const auto members = live_members();
    std::vector<int> groups;
    for (size_t i : members) groups.push_back(members_[i].replica);
    const auto failed = failed_groups(members, run_members(members, groups, deadlines_.setup, call));
    return failed.empty() ? ok_status() : lose_groups(failed, start_step, group_what);
  };
  if (start_step > 0) {
    if (!mirror_) return make_error("resuming at step {} needs a job dir", start_step);
    std::vector<std::vector<solvernet::v1::CheckpointBlob>> files(members_.size());
    for (size_t i = 0; i < members_.size(); ++i) {
      SN_ASSIGN(files[i], mirror_->files(members_[i].stage, members_[i].replica, start_step));
      SN_ASSIGN(auto manifest, mirror_->manifest(members_[i].stage, members_[i].replica, start_step));
      expected_state[i] = manifest.state.root;
    }
    // Every member gets its role's files, not only a replacement: a member
    // that kept only newer checkpoints (checkpoint_keep) rolls back as well.
    SN_TRY(run("restoring checkpoints", [&](size_t i, grpc::ClientContext& context) {
      solvernet::v1::PutCheckpointRequest request;
      request.set_job_id(job_id_);
      request.set_stage(members_[i].stage);
      request.set_replica(members_[i].replica);
      request.set_step(start_step);
      for (const auto& f : files[i]) *request.add_files() = f;
      sign_request(fleet_->signer(), "PutCheckpoint", request);
      solvernet::v1::Empty reply;
      return fleet_->stub(i).PutCheckpoint(&context, request, &reply);
    }));
  }
  SN_TRY(run("job setup", [&](size_t i, grpc::ClientContext& context) {
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
    request.set_start_step(start_step);
    request.set_dataset_hash(dataset_hash_);
    request.set_replanned(start_step > 0 && start_step == replanned_at_);
    sign_request(fleet_->signer(), "SetupJob", request);
    solvernet::v1::SetupJobReply reply;
    grpc::Status status = fleet_->stub(i).SetupJob(&context, request, &reply);
    // A member's lease runs from its set-up, not from the slowest member's:
    // renewals start (or speed up) as each one grants its lease, else a spare
    // with a short lease drops the job while a slower member still sets up.
    if (status.ok() && reply.lease_ms() > 0) fleet_->start_lease_renewal(milliseconds(reply.lease_ms()));
    start_leaves[i] = reply.leaf();
    return status;
  }));
  // The slowest round trip among the members (their probes) or to them from
  // here: part of every step deadline from now on.
  {
    std::vector<std::pair<std::string, std::string>> addresses;
    for (size_t i : live_members()) addresses.emplace_back(members_[i].address, members_[i].node_id);
    result_.rtt_ms = std::max(options_.peer_rtt_ms, measure_client_rtt_ms(addresses));
    step_deadline_->set_rtt_ms(result_.rtt_ms);
  }
  fleet_->start_lease_renewal(milliseconds(30000));  // no member said its lease: the nodes' default
  const bool first_setup = step_leaves_.empty();
  if (first_setup) {
    result_.setup_seconds = std::chrono::duration<double>(Clock::now() - setup_started_).count();
    result_.stage_state_hashes.assign(static_cast<size_t>(stages_), "");
    step_leaves_.assign(members_.size(), {});
  }
  GroupFailures bad_groups;
  for (size_t i : live_members()) {
    if (start_leaves[i].size() != 32) {
      auto error = kind_error(ErrorKind::bad_peer, "{} sent a start leaf of {} bytes, not 32", member_name(members_[i]),
                              start_leaves[i].size());
      if (per_group) {
        bad_groups.emplace(members_[i].replica, error.message);
        continue;
      }
      fleet_->end_all(true, error.message);
      return error;
    }
    Hash256 leaf;
    std::memcpy(leaf.data(), start_leaves[i].data(), 32);
    // A member restarted from a checkpoint commits to the restored state in
    // its start leaf: it must be the mirrored one, bitwise.
    // After a re-plan the node checks the parts that must still hold (weights,
    // optimizer, buffers); the root differs by design (new cursor and seeds).
    if (start_step > 0 && start_step != replanned_at_ &&
        leaf != step_leaf(start_step, expected_state[i], Hash256{}, Hash256{})) {
      auto error = kind_error(ErrorKind::bad_peer,
                              "{} restored a state at step {} that differs from its checkpoint's state hash",
                              member_name(members_[i]), start_step);
      fleet_->end_all(true, error.message);
      return error;
    }
    // Rolled back: the leaves after the checkpoint go (they are run again);
    // the leaves up to it stay. A job resumed in a new client starts its
    // list at the checkpoint.
    auto& leaves = step_leaves_[i];
    if (static_cast<int64_t>(leaves.size()) > start_step)
      leaves.resize(static_cast<size_t>(start_step) + 1);
    else
      leaves.assign(1, leaf);
  }
  if (!bad_groups.empty()) SN_TRY(lose_groups(bad_groups, start_step, group_what));
  if (!first_setup) return ok_status();
  // Steady state begins once every training sample has passed once (an epoch
  // leaves a few out, so that can be later than the second epoch).
  std::vector<bool> seen(static_cast<size_t>(dataset_->train_samples()), false);
  int64_t unseen = dataset_->train_samples(), step = 0;
  for (; unseen > 0 && step < job_.train.steps; ++step)
    for (int64_t id : dataset_->samples_for_step(step, job_.train.global_batch, job_.train.seed, planned_replicas_))
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

Status JobSession::mirror_checkpoints(int64_t step) {
  const auto started = Clock::now();
  // Mirrors are stored in order, state.json moving to each once it is whole:
  // the newest whole one is the checkpoint it names.
  const int64_t recorded = mirror_->newest_common_step();
  // The client's own disk: no node is at fault, and no recovery can help.
  const auto job_dir_full = [&](const Error& full) -> Error {
    mirror_->prune_all_but(recorded);
    Error error = kind_error(ErrorKind::resource_exhausted, "the job dir's disk is full ({}); no node is at fault; {} once "
                             "the disk has room", full.message, resume_advice(options_.recovery.job_dir, recorded));
    fleet_->end_all(true, error.message);
    return error;
  };
  if (mirrors_ + 1 == options_.recovery.job_dir_full_at_mirror) {
    spdlog::warn("--job-dir-full-at-mirror {}: the job dir's disk is full from now on", mirrors_ + 1);
    simulate_disk_full_for_tests(options_.recovery.job_dir, 1);
  }
  std::vector<solvernet::v1::FetchCheckpointReply> replies(members_.size());
  const auto fetch = [&](size_t i, grpc::ClientContext& context) {
    solvernet::v1::FetchCheckpointRequest request;
    request.set_job_id(job_id_);
    request.set_stage(members_[i].stage);
    request.set_replica(members_[i].replica);
    request.set_step(step);
    sign_request(fleet_->signer(), "FetchCheckpoint", request);
    return fleet_->stub(i).FetchCheckpoint(&context, request, &replies[i]);
  };
  // A [diloco] job's dropped groups have no checkpoint to give, and a live
  // member that fails to give its own costs its group, not the job.
  const auto live = live_members();
  GroupFailures failed;
  const auto lost = [&](size_t i, const Error& error) -> Status {
    if (!job_.diloco.enabled) {
      fleet_->end_all(true, error.message);
      return error;
    }
    failed.emplace(members_[i].replica, error.message);
    return ok_status();
  };
  if (!job_.diloco.enabled) {
    SN_TRY(fleet_->run_all("mirroring checkpoints", deadlines_.fetch + deadlines_.setup, fetch));
  } else {
    std::vector<int> groups;
    for (size_t i : live) groups.push_back(members_[i].replica);
    failed = failed_groups(live, run_members(live, groups, deadlines_.fetch + deadlines_.setup, fetch));
  }
  for (size_t i : live) {
    if (failed.count(members_[i].replica)) continue;
    std::vector<solvernet::v1::CheckpointBlob> files(replies[i].files().begin(), replies[i].files().end());
    for (const auto& f : files) result_.mirror_bytes += static_cast<int64_t>(f.data().size());
    if (auto stored = mirror_->store(members_[i].stage, members_[i].replica, step, files); !stored.ok()) {
      if (says_disk_full(stored.message())) return job_dir_full(stored.error());
      Error error = stored.error();
      error.message = member_name(members_[i]) + ": " + error.message;
      SN_TRY(lost(i, error));
      continue;
    }
    // The manifest is checked against its files by store(); here against what
    // the member reported after that step, so a forged checkpoint is not
    // what a later recovery or resume restores everyone from.
    const auto reported = reported_state_.find(i);
    if (reported != reported_state_.end() && reported->second.first == step) {
      SN_ASSIGN(auto manifest, mirror_->manifest(members_[i].stage, members_[i].replica, step));
      if (reported->second.second.size() != manifest.state.root.size() ||
          std::memcmp(reported->second.second.data(), manifest.state.root.data(), manifest.state.root.size()) != 0) {
        auto error = kind_error(ErrorKind::bad_peer,
                                "{} handed over a checkpoint of step {} whose state is not the one it reported after "
                                "that step", member_name(members_[i]), step);
        if (left_to_verification()) {
          spdlog::warn("{} (left to verification)", error.message);
          continue;
        }
        SN_TRY(lost(i, error));
      }
    }
  }
  if (!failed.empty()) {
    const std::string what = fmt::format("mirroring the checkpoints of step {}", step);
    SN_TRY(lose_groups(failed, step, what));
    return kind_error(ErrorKind::unavailable, "{}: {}", what, failed.begin()->second);
  }
  // This checkpoint is whole for every member: state.json (written
  // atomically) moves to it, and only then does the previous one go. A crash
  // at any point leaves state.json naming a whole checkpoint; the one it no
  // longer names is deleted by the next mirror or --resume. A failed write
  // keeps the previous one, which state.json still names.
  if (auto written = write_state(step, ""); !written.ok())
    return says_disk_full(written.message()) ? job_dir_full(written.error()) : written.error();
  if (++mirrors_ == options_.recovery.kill_self_at_mirror) {
    spdlog::warn("--kill-self-at-mirror {}: killing this client", mirrors_);
    std::raise(SIGKILL);
  }
  mirror_->remove_retired_layout();  // state.json names the new one now, if a failed write had kept the old
  mirror_->prune_before(step);
  result_.mirror_seconds += std::chrono::duration<double>(Clock::now() - started).count();
  return ok_status();
}

Status JobSession::write_state(int64_t step, const std::string& finished) {
  JobDirState state{job_id_, step, result_.losses, finished, job_to_toml(job_), {}};
  // A re-plan (or a grow-back) restarted from this very checkpoint: its
  // cursor and seeds are of the roles before it, so --resume must restore it
  // as the re-plan did, and go on drawing samples as planned.
  state.replanned = step > 0 && step == replanned_at_;
  state.planned_replicas = planned_replicas_;
  state.replicas = replicas_;
  state.layout = mirror_->layout();
  return write_job_state(options_.recovery.job_dir, state);
}

void JobSession::switch_layout(int64_t step) {
  const auto kill_self_at = [this](const char* phase) {
    if (options_.recovery.kill_self_at_relayout != phase) return;
    spdlog::warn("--kill-self-at-relayout {}: killing this client", phase);
    std::raise(SIGKILL);
  };
  kill_self_at("built");
  // A failed write keeps the old layout, which state.json still names; the
  // next mirrored checkpoint's write moves to the new one.
  if (auto written = write_state(step, ""); !written.ok()) {
    spdlog::warn("job dir: {}", written.message());
    return;
  }
  kill_self_at("switched");
  mirror_->remove_retired_layout();
}

std::optional<net::MemberInfo> JobSession::take_spare(const std::set<std::string>& members) {
  const auto& recovery = options_.recovery;
  auto deadline = Clock::now() + recovery.spare_wait;
  // A client that did not run for a while (SIGSTOP, a suspended machine) may
  // pass the deadline in the middle of a look, whose listing and pings then
  // time out: its own pause, not the spares' silence. A ticker sees the pause
  // as a gap between its ticks; the wait does not count it, and looks again.
  std::atomic<int64_t> paused_ms{0}, pauses{0};
  std::atomic<Clock::time_point> last_tick{Clock::now()};
  std::jthread ticker([&paused_ms, &pauses, &last_tick](std::stop_token stop) {
    std::mutex mutex;
    std::condition_variable_any tick;
    auto last = Clock::now();
    std::unique_lock<std::mutex> lock(mutex);
    while (!stop.stop_requested()) {
      tick.wait_for(lock, stop, milliseconds(100), [] { return false; });
      const auto now = Clock::now();
      if (now - last > milliseconds(1000)) {
        paused_ms += std::chrono::duration_cast<milliseconds>(now - last).count();
        ++pauses;
      }
      last = now;
      last_tick = now;
    }
  });
  // Between looks: 0.1 s, doubling up to 0.5 s. The first listing after a
  // failure may be the client's DHT node's cached one (its search refreshes
  // as it answers), so the next look comes soon.
  auto pause = milliseconds(100);
  while (true) {
    while (!spares_.empty()) {
      net::MemberInfo spare = spares_.front();
      spares_.erase(spares_.begin());
      // Spares are idle, not leased: the one taken must still answer (a
      // ping that timed out across the client's own pause is asked again).
      if (members.count(spare.node_id)) continue;
      const int64_t pauses_before = pauses.load();
      if (answers_ping(spare, deadlines_.fleet.ping) ||
          (pauses.load() != pauses_before && answers_ping(spare, deadlines_.fleet.ping)))
        return spare;
      spdlog::warn("spare node {} at {} does not answer; not using it", spare.node_id.substr(0, 8), spare.address);
    }
    if (recovery.find_spares)
      for (auto& found : recovery.find_spares())
        if (!members.count(found.node_id)) spares_.push_back(std::move(found));
    if (!spares_.empty()) continue;
    if (auto back = lost_member_back(members)) return back;
    if (options_.cancel && options_.cancel->load()) return std::nullopt;
    if (const int64_t paused = paused_ms.exchange(0); paused > 0) {
      deadline += milliseconds(paused);
      spdlog::warn("the client did not run for {:.1f} s while it waited for a spare; the wait goes on that much longer",
                   static_cast<double>(paused) / 1000.0);
      continue;
    }
    if (const auto now = Clock::now(); now >= deadline) {
      // Woken from a pause, this thread may reach the deadline before the
      // ticker has run and counted the pause: the wait ends only once the
      // ticker has seen this moment and found no pause in it.
      for (int i = 0; i < 100 && last_tick.load() < now; ++i) std::this_thread::sleep_for(milliseconds(10));
      if (paused_ms.load() == 0) return std::nullopt;
      continue;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(2 * pause, milliseconds(500));
  }
}

std::optional<net::MemberInfo> JobSession::lost_member_back(const std::set<std::string>& live) {
  for (const auto& m : members_)
    if (!live.count(m.node_id) && answers_idle(m, deadlines_.fleet.ping)) {
      spdlog::info("{} answers again, idle: taken back as a spare", member_name(m));
      return m;
    }
  return std::nullopt;
}

Result<int64_t> JobSession::recover(int64_t failed_step, Error failure) {
  const auto started = Clock::now();
  const int64_t restore = mirror_->newest_common_step();
  auto stop = [&](const std::string& why) {
    return Error{fmt::format("{}; {}", why, resume_advice(options_.recovery.job_dir, restore)), 1, failure.kind};
  };
  RecoveryReport report;
  report.replicas_before = report.replicas_after = replicas_;
  report.failed_step = failed_step + 1;
  report.restored_step = restore;
  report.aqsgd = job_.compression.activations == "aqsgd" ? "restored from the checkpoint" : "none";
  while (true) {
    const bool node_gone = failure.kind == ErrorKind::unavailable || failure.kind == ErrorKind::timeout;
    if (!node_gone) return failure;
    if (recoveries_ >= options_.recovery.max_recoveries)
      return stop(fmt::format("{} (after {} recoveries, giving up)", failure.message, recoveries_));
    ++recoveries_;
    spdlog::warn("{}", failure.message);
    auto dead = fleet_->unresponsive(deadlines_.fleet.ping);
    std::set<std::string> live;
    for (size_t i = 0; i < members_.size(); ++i)
      if (std::find(dead.begin(), dead.end(), i) == dead.end()) live.insert(members_[i].node_id);
    // A member that says its own checkpoint copy is unusable (FailureCause
    // LOCAL_DATA) is restored from the mirror once; said again, it is
    // taken as gone, a bad disk or a node stalling the job with a claim no
    // one can check (it stays out of the spares: it is in LIVE).
    // A member replaced though it answers pings: counted dead, and never taken back by this job.
    const auto replace_unfit = [&](const std::string& who, const std::function<void(const net::MemberInfo&)>& say) {
      for (size_t i = 0; i < members_.size(); ++i)
        if (members_[i].node_id == who && std::find(dead.begin(), dead.end(), i) == dead.end()) {
          if (say) say(members_[i]);
          dead.push_back(i);
          unfit_nodes_.insert(who);
        }
    };
    const std::string culprit = fleet_->last_culprit();
    const auto cause = fleet_->last_cause();
    if (!culprit.empty() && cause == solvernet::v1::FailureCause::LOCAL_DATA && ++local_data_failures_[culprit] >= 2)
      replace_unfit(culprit, [&](const net::MemberInfo& m) {
        spdlog::warn("{} said its own checkpoint was unusable {} times; it is replaced", member_name(m),
                     local_data_failures_[culprit]);
      });
    // A member whose own disk is full (FailureCause DISK_FULL) answers pings but
    // cannot write the checkpoints a recovery restores from: it is replaced at once.
    if (!culprit.empty() && cause == solvernet::v1::FailureCause::DISK_FULL) replace_unfit(culprit, nullptr);
    live.insert(unfit_nodes_.begin(), unfit_nodes_.end());  // take_spare skips these too
    std::vector<size_t> unreplaced;
    for (size_t i : dead) {
      // Once one member finds no spare, the others are not replaced either:
      // the job re-plans around them all.
      auto spare = unreplaced.empty() ? take_spare(live) : std::nullopt;
      report.dead.push_back(member_name(members_[i]));
      if (!spare) {
        unreplaced.push_back(i);
        continue;
      }
      spare->stage = members_[i].stage;
      spare->replica = members_[i].replica;
      members_[i] = *spare;
      live.insert(spare->node_id);
      report.replacements.push_back(member_name(members_[i]));
      spdlog::warn("recovery: {} takes the place of {}", report.replacements.back(), report.dead.back());
    }
    // Ctrl-C while waiting for a spare stops the job as it is: the user's
    // stop is no reason to re-plan it on fewer replicas.
    if (!unreplaced.empty() && options_.cancel && options_.cancel->load())
      return kind_error(ErrorKind::aborted, "{}; interrupted while the recovery waited for a spare", failure.message);
    if (!unreplaced.empty()) {
      const int64_t before = replicas_;
      std::string why;
      if (!replan(unreplaced, restore, why))
        return stop(fmt::format("{}; {} is gone and no spare node is available to take its place ({})",
                                failure.message, member_name(members_[unreplaced.front()]), why));
      report.replicas_before = before;
      report.replicas_after = replicas_;
      if (job_.compression.activations == "aqsgd")
        report.aqsgd = "restored from the checkpoint; samples new to a pair are sent in full once";
      spdlog::warn("recovery: no spare; re-planned from {} to {} replicas", before, replicas_);
    }
    // No member gone (a link or a peer wait failed): the same members restart.
    auto set_up = set_up_members(restore);
    if (set_up.ok()) break;
    failure = set_up.error();
  }
  result_.losses.resize(static_cast<size_t>(restore));  // the steps after the checkpoint run again
  result_.steady_steps = std::max<int64_t>(0, restore - std::max(result_.first_steady_step, start_step_));
  report.redone_steps = static_cast<double>(failed_step - restore);
  report.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  result_.recoveries.push_back(report);
  return restore;
}

bool JobSession::replan(const std::vector<size_t>& unreplaced, int64_t restore, std::string& why) {
  std::set<int64_t> dropped;
  for (size_t i : unreplaced) dropped.insert(members_[i].replica);
  std::vector<int64_t> kept;
  for (int64_t r = 0; r < replicas_; ++r)
    if (!dropped.count(r)) kept.push_back(r);
  const auto replicas = static_cast<int64_t>(kept.size());
  if (replicas == 0) {
    why = "no replica group is left whole to re-plan on";
    return false;
  }
  // The global batch stays: fewer replicas each take more of it. It must
  // still split evenly into their micro-batches.
  if (job_.train.global_batch % (replicas * job_.parallel.micro_batches) != 0) {
    why = fmt::format("train.global_batch = {} does not split over {} replicas × {} micro-batches", job_.train.global_batch,
                      replicas, job_.parallel.micro_batches);
    return false;
  }
  // A verifiable job's evidence and commitments are per planned role; a
  // [privacy] job's pair keys, threshold and noise split are per planned
  // replica (docs/privacy.md).
  if (job_.verify.enabled || job_.privacy.enabled) {
    why = fmt::format("a [{}] job is not re-planned", job_.verify.enabled ? "verify" : "privacy");
    return false;
  }
  if (mirror_) {
    if (auto renumbered = mirror_->renumber_replicas(kept); !renumbered.ok()) {
      why = renumbered.message();
      return false;
    }
  }
  std::vector<net::MemberInfo> members;
  std::vector<std::vector<Hash256>> leaves;
  const std::set<size_t> gone(unreplaced.begin(), unreplaced.end());
  for (int64_t s = 0; s < stages_; ++s)
    for (int64_t r = 0; r < replicas_; ++r) {
      const auto i = static_cast<size_t>(s * replicas_ + r);
      const auto to = std::find(kept.begin(), kept.end(), r);
      if (to == kept.end()) {
        // Alive but in a dropped group: its job was ended with the failed
        // step's; it is idle, a spare for a later recovery.
        if (!gone.count(i)) spares_.insert(spares_.begin(), members_[i]);
        continue;
      }
      members.push_back(members_[i]);
      members.back().replica = static_cast<int>(to - kept.begin());
      if (i < step_leaves_.size()) leaves.push_back(std::move(step_leaves_[i]));
    }
  members_ = std::move(members);
  step_leaves_ = std::move(leaves);
  replicas_ = replicas;
  job_.parallel.replicas = replicas;
  live_groups_.assign(static_cast<size_t>(replicas_), true);
  replanned_at_ = restore;
  // state.json moves to the renumbered layout, and says its checkpoint predates the re-plan.
  if (mirror_) switch_layout(restore);
  return true;
}

Status JobSession::replan_at_resume() {
  RecoveryReport report;
  report.failed_step = report.restored_step = start_step_;
  report.replicas_before = mirror_->replicas();
  report.replicas_after = replicas_;
  report.aqsgd = job_.compression.activations == "aqsgd"
                     ? "restored from the checkpoint; samples new to a pair are sent in full once"
                     : "none";
  std::vector<int64_t> kept(static_cast<size_t>(replicas_));
  std::iota(kept.begin(), kept.end(), int64_t{0});
  if (auto renumbered = mirror_->renumber_replicas(kept); !renumbered.ok())
    return Error{fmt::format("cannot re-plan the job on {} replicas: {}; {}", replicas_, renumbered.message(),
                             resume_advice(options_.recovery.job_dir, start_step_)),
                 1, renumbered.error().kind};
  replanned_at_ = start_step_;
  switch_layout(start_step_);
  spdlog::info("re-planned from {} to {} replicas at step {}: too few nodes", report.replicas_before, replicas_,
               start_step_);
  result_.recoveries.push_back(report);
  return ok_status();
}

std::vector<net::MemberInfo> JobSession::ready_idle_nodes(const std::set<std::string>& in_job) {
  std::set<std::string> known = in_job;
  for (const auto& m : spares_) known.insert(m.node_id);
  // A dropped group's own members: the client knows their addresses, so they
  // count even when the DHT cannot be reached.
  for (const auto& m : dropped_members_)
    if (known.insert(m.node_id).second) spares_.push_back(m);
  if (options_.recovery.find_spares)
    for (auto& found : options_.recovery.find_spares())
      if (known.insert(found.node_id).second) spares_.push_back(std::move(found));
  // Spares are idle, not leased: only those that answer now count.
  std::vector<net::MemberInfo> ready;
  for (const auto& spare : spares_)
    if (!in_job.count(spare.node_id) && !unfit_nodes_.count(spare.node_id) && answers_ping(spare, deadlines_.fleet.ping))
      ready.push_back(spare);
  spares_.clear();
  return ready;
}

Status JobSession::grow_back(int64_t step) {
  if (replicas_ >= planned_replicas_ || !mirror_) return ok_status();
  const auto started = Clock::now();
  std::set<std::string> in_job;
  for (const auto& m : members_) in_job.insert(m.node_id);
  const auto ready = ready_idle_nodes(in_job);
  // The most replicas the idle nodes fill whole and the global batch divides over.
  int64_t grown = replicas_;
  for (int64_t d = planned_replicas_; d > replicas_; --d)
    if ((d - replicas_) * stages_ <= static_cast<int64_t>(ready.size()) &&
        job_.train.global_batch % (d * job_.parallel.micro_batches) == 0) {
      grown = d;
      break;
    }
  if (grown == replicas_) {
    spares_.insert(spares_.end(), ready.begin(), ready.end());
    return ok_status();
  }
  // Growing back is optional: a job dir that cannot hold the new layout keeps the job on its replicas.
  if (auto added = mirror_->add_replicas(grown); !added.ok()) {
    spdlog::warn("not growing back to {} replicas: job dir: {}", grown, added.message());
    spares_.insert(spares_.end(), ready.begin(), ready.end());
    return ok_status();
  }
  RecoveryReport report;
  report.failed_step = step;
  report.restored_step = step;
  report.replicas_before = replicas_;
  report.replicas_after = grown;
  report.aqsgd = job_.compression.activations == "aqsgd" ? "new groups copy replica 0's from the checkpoint" : "none";
  std::vector<net::MemberInfo> members;
  std::vector<std::vector<Hash256>> leaves;
  size_t next = 0;
  for (int64_t s = 0; s < stages_; ++s)
    for (int64_t r = 0; r < grown; ++r) {
      if (r < replicas_) {
        const auto i = static_cast<size_t>(s * replicas_ + r);
        members.push_back(members_[i]);
        leaves.push_back(std::move(step_leaves_[i]));
        continue;
      }
      members.push_back(ready[next++]);
      members.back().stage = static_cast<int>(s);
      members.back().replica = static_cast<int>(r);
      leaves.emplace_back();
      report.replacements.push_back(member_name(members.back()));
    }
  spares_.insert(spares_.end(), ready.begin() + static_cast<std::ptrdiff_t>(next), ready.end());
  members_ = std::move(members);
  step_leaves_ = std::move(leaves);
  replicas_ = grown;
  job_.parallel.replicas = grown;
  live_groups_.assign(static_cast<size_t>(replicas_), true);
  replanned_at_ = step;
  // The new roles' checkpoints of STEP are replica 0's: --resume restores them as the grow-back does.
  switch_layout(step);
  spdlog::warn("re-planned from {} to {} replicas at step {}: idle nodes joined", report.replicas_before, grown, step);
  SN_TRY(set_up_members(step));
  report.seconds = std::chrono::duration<double>(Clock::now() - started).count();
  result_.recoveries.push_back(report);
  return ok_status();
}

void JobSession::add_micro_batches(size_t i, const std::vector<std::vector<MicroBatchData>>& batches,
                                   solvernet::v1::RunStepRequest& request, int share) const {
  const auto& self = members_[i];
  for (const auto& mb : batches[static_cast<size_t>(share >= 0 ? share : self.replica)])
    fill_micro_batch(mb, self.stage == 0, self.stage == stages_ - 1, request.add_micro_batches());
}

grpc::Status JobSession::send_run_step(size_t i, grpc::ClientContext& context, solvernet::v1::RunStepRequest& request,
                                       solvernet::v1::RunStepReply* reply) {
  request.set_job_id(job_id_);
  sign_request(fleet_->signer(), "RunStep", request);
  return fleet_->stub(i).RunStep(&context, request, reply);
}

// One step (or one forward-only evaluation batch) on every member; the mean loss.
Result<double> JobSession::run_step(int64_t step, const std::vector<std::vector<MicroBatchData>>& batches,
                                    bool forward_only, const std::string& what) {
  std::vector<solvernet::v1::RunStepReply> replies(members_.size());
  SN_TRY(fleet_->run_all(what, deadlines_.step, [&](size_t i, grpc::ClientContext& context) {
    solvernet::v1::RunStepRequest request;
    request.set_step(step);
    request.set_forward_only(forward_only);
    add_micro_batches(i, batches, request);
    return send_run_step(i, context, request, &replies[i]);
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
    if (!forward_only) reported_state_[i] = {step + 1, replies[i].state_hash()};
    account_traffic(replies[i], step, forward_only);
  }
  // Replicas of a stage must hold bitwise the same weights and optimizer
  // state after every step (their residuals, buffers and seeds differ, so
  // the state hashes do); anything else (a compressor or all-reduce that is
  // not order-exact) is a bug.
  for (int64_t stage = 0; stage < stages_ && !forward_only; ++stage) {
    std::vector<std::string> names, hashes;
    for (int64_t r = 0; r < replicas_; ++r) {
      const auto i = static_cast<size_t>(stage * replicas_ + r);
      names.push_back(member_name(members_[i]));
      hashes.push_back(replies[i].replica_hash());
    }
    auto disagreement = replica_disagreement(names, hashes, stage, fmt::format("after step {}", step + 1));
    if (!disagreement) continue;
    auto error = disagreement->error();
    // Every replica committed to its own leaves; the replays decide who lied
    // (docs/verification.md, "Replicas that diverge").
    if (left_to_verification()) {
      if (diverged_stages_.insert(stage).second) result_.replica_divergences.push_back(error.message);
      continue;
    }
    fleet_->end_all(true, error.message);
    // The checkpoints mirrored so far were taken when the replicas still
    // agreed: the job can go on from the newest (on other nodes).
    if (const int64_t resumable = resumable_step(); resumable > 0)
      error.message += "; " + resume_advice(options_.recovery.job_dir, resumable, "before the divergence");
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

// A member lost after the last step (the held-out evaluation, the final
// fetch) is recovered from as one lost during the steps: from the newest
// mirrored checkpoint, with the steps since run again, then the evaluation
// and the fetch once more. Without a job dir it ends the job as before;
// recover() itself stops with the --resume advice when it cannot go on.
// [diloco] (no recovery: a lost member costs its group): the model is
// fetched and written first, then evaluated, so a training that finished is
// not lost with every group during the held-out evaluation: the run then
// ends with the model and no held-out loss (NaN, null in the summary), and
// says why.
Status JobSession::finish() {
  if (job_.diloco.enabled) {
    SN_TRY(fetch_model());
    Status evaluated = evaluate();
    if (evaluated.ok() || first_live_group() >= 0) return evaluated;
    result_.holdout_loss = std::nan("");
    result_.holdout_loss_missing = evaluated.message();
    spdlog::warn("held-out loss could not be measured: {}; training completed{}", evaluated.message(),
                 options_.model_out.empty() ? ""
                                            : fmt::format(" and the model was written to {}", options_.model_out.string()));
    return ok_status();
  }
  while (true) {
    Status done = evaluate();
    if (done.ok()) done = fetch_model();
    if (done.ok() || !mirror_ || (options_.cancel && options_.cancel->load())) return done;
    SN_ASSIGN(int64_t restart, recover(job_.train.steps - 1, done.error()));
    SN_TRY(train_from(restart));
  }
}

Status JobSession::train() { return train_from(start_step_); }

Status JobSession::train_from(int64_t first_step) {
  if (job_.diloco.enabled) return train_diloco();
  const auto run_started = Clock::now();
  const int64_t every = job_.train.checkpoint_every;
  for (int64_t step = first_step; step < job_.train.steps;) {
    if (options_.cancel && options_.cancel->load()) {
      fleet_->end_all(true, "interrupted by the user");
      return kind_error(ErrorKind::aborted, "interrupted at step {} of {}", step, job_.train.steps);
    }
    const auto step_started = Clock::now();
    deadlines_.step = step_deadline_->deadline();
    auto loss = run_step(step, step_batches(job_, *dataset_, step, planned_replicas_), false,
                         fmt::format("step {}", step + 1));
    if (loss.ok() && !std::isfinite(*loss))
      loss = kind_error(ErrorKind::diverged, "the job diverged during step {} (its loss is {})", step + 1, *loss);
    if (!loss.ok() && loss.error().kind == ErrorKind::diverged) {
      // The job's hyper-parameters, not a node: a recovery would replay the
      // same steps into the same overflow. A checkpoint whose weights then
      // ran a step without blowing up can go on with a lower lr (job.toml's
      // lr may change); the one of the step just before holds the weights that
      // blew up (what overflowed is computed from the weights, whatever the lr).
      Error error = loss.error();
      error.message += fmt::format("; no node is at fault: lower train.lr (now {:g}) or raise train.warmup_steps",
                                   job_.train.lr);
      if (const int64_t newest = resumable_step(); newest > 0 && newest < step)
        error.message += fmt::format("; {} after lowering train.lr in {}",
                                     resume_advice(options_.recovery.job_dir, newest),
                                     (options_.recovery.job_dir / "job.toml").string());
      else if (newest > 0)
        error.message += fmt::format(" and start the job again (its checkpoint of step {} holds the weights that blew up)",
                                     newest);
      fleet_->end_all(true, error.message);
      return error;
    }
    if (loss.ok()) {
      result_.losses.push_back(*loss);
      step_deadline_->record(std::chrono::duration<double>(Clock::now() - step_started).count());
    }
    Status advanced = loss.ok() ? ok_status() : Status(loss.error());
    // The members wrote a checkpoint in this step: mirror it before going on.
    if (advanced.ok() && mirror_ && every > 0 && (step + 1) % every == 0 && step + 1 < job_.train.steps) {
      advanced = mirror_checkpoints(step + 1);
      if (advanced.ok()) advanced = grow_back(step + 1);
    }
    if (!advanced.ok()) {
      if (!mirror_) return advanced.error();
      SN_ASSIGN(step, recover(step, advanced.error()));
      continue;
    }
    result_.step_seconds_total += std::chrono::duration<double>(Clock::now() - step_started).count();
    if (options_.progress) {
      StepReport report;
      report.members = &members_;
      report.step = step + 1;
      report.steps = job_.train.steps;
      report.loss = *loss;
      report.step_seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
      const double elapsed = std::chrono::duration<double>(Clock::now() - run_started).count();
      report.tokens_per_s = static_cast<double>(tokens_per_step(job_) * (step + 1 - start_step_)) / elapsed;
      report.bytes_by_class = result_.bytes_by_class;
      report.bytes_pipeline = result_.bytes_pipeline;
      report.bytes_data_parallel = result_.bytes_data_parallel;
      report.train_sequences = dataset_->train_samples();
      options_.progress(report);
    }
    ++step;
  }
  result_.wall_seconds = std::chrono::duration<double>(Clock::now() - run_started).count();
  result_.tokens_per_s =
      static_cast<double>(tokens_per_step(job_) * (job_.train.steps - start_step_)) / result_.wall_seconds;
  result_.train_sequences = dataset_->train_samples();
  for (const auto& leaves : step_leaves_) result_.member_commitments.push_back(to_hex(leaves_root(leaves)));
  result_.step_deadline_ms = static_cast<double>(step_deadline_->deadline().count());
  result_.step_p95_seconds = step_deadline_->p95_seconds();
  return ok_status();
}

std::vector<size_t> JobSession::live_members() const {
  std::vector<size_t> out;
  for (size_t i = 0; i < members_.size(); ++i)
    if (live_groups_[static_cast<size_t>(members_[i].replica)]) out.push_back(i);
  return out;
}

int JobSession::first_live_group() const {
  for (int r = 0; r < static_cast<int>(replicas_); ++r)
    if (live_groups_[static_cast<size_t>(r)]) return r;
  return -1;
}

// The groups in FAILED leave the job: their members are told to abort (a
// member still alive stops waiting for its dead peer; a frozen one is told
// again until it answers, and its lease is no longer renewed), and from now
// on no call goes to them. Their samples of this round are simply not
// trained on. Their live nodes, idle again, may refill the group later
// (diloco_rejoin).
void JobSession::drop_groups(const GroupFailures& failed, int64_t step) {
  for (const auto& [r, why] : failed) {
    live_groups_[static_cast<size_t>(r)] = false;
    result_.diloco.dropped_groups.push_back(r);
    result_.diloco.dropped_at_step.push_back(step + 1);
    spdlog::warn("replica group {} dropped at step {}: {}", r, step + 1, why);
    std::vector<size_t> ending;
    for (int64_t s = 0; s < stages_; ++s) ending.push_back(static_cast<size_t>(s * replicas_ + r));
    for (size_t i : ending)
      if (std::none_of(dropped_members_.begin(), dropped_members_.end(),
                       [&](const net::MemberInfo& m) { return m.node_id == members_[i].node_id; }))
        dropped_members_.push_back(members_[i]);
    fleet_->release(ending, "replica group dropped: " + why);
  }
}

std::vector<size_t> JobSession::silent_in(const std::set<int>& groups) const {
  std::vector<size_t> members;
  for (size_t i : live_members())
    if (groups.count(members_[i].replica)) members.push_back(i);
  if (members.empty()) return {};
  return fleet_->unresponsive(deadlines_.fleet.ping, members, 1);
}

std::vector<size_t> JobSession::silent_of(int group, const std::vector<size_t>& silent) const {
  std::vector<size_t> out;
  for (size_t i : silent)
    if (members_[i].replica == group) out.push_back(i);
  return out;
}

std::string JobSession::blame_silent(const std::vector<size_t>& silent, const std::string& why) const {
  if (silent.empty()) return why;
  std::vector<std::string> names;
  for (size_t i : silent) names.push_back(member_name(members_[i]));
  // "node A …: Deadline Exceeded" about the one silent node A need not name it twice.
  const std::string own = names.size() == 1 && why.starts_with(names[0] + ": ") ? why.substr(names[0].size() + 2) : why;
  return fmt::format("{} stopped answering pings ({})", fmt::join(names, ", "), own);
}

GroupFailures JobSession::failed_groups(const std::vector<size_t>& members,
                                        const std::vector<grpc::Status>& statuses) const {
  GroupFailures failed, cancelled;
  for (size_t k = 0; k < members.size(); ++k) {
    if (statuses[k].ok()) continue;
    const auto& member = members_[members[k]];
    auto& first = statuses[k].error_code() == grpc::StatusCode::CANCELLED ? cancelled : failed;
    first.emplace(member.replica, fmt::format("{}: {}", member_name(member), statuses[k].error_message()));
  }
  // A group none of whose calls failed but by a cancellation: its first one.
  failed.merge(cancelled);
  return failed;
}

Status JobSession::lose_groups(const GroupFailures& failed, int64_t steps_done, const std::string& what) {
  if (auto paused = fleet_->pause_explains(what)) {
    fleet_->end_all(true, paused->message);
    return *paused;
  }
  std::set<int> groups;
  for (const auto& [r, why] : failed) groups.insert(r);
  const auto silent = silent_in(groups);
  GroupFailures blamed;
  std::vector<std::string> causes;
  for (const auto& [r, why] : failed) {
    blamed[r] = blame_silent(silent_of(r, silent), why);
    causes.push_back(failed.size() == 1 ? blamed[r] : fmt::format("group {}: {}", r, blamed[r]));
  }
  drop_groups(blamed, steps_done - 1);
  if (first_live_group() >= 0) return ok_status();
  auto error = kind_error(ErrorKind::unavailable, "every replica group failed, the last during {}: {}", what,
                          fmt::join(causes, "; "));
  fleet_->end_all(true, error.message);
  return error;
}

Status JobSession::diloco_rejoin(int64_t steps_done) {
  if (!mirror_ || steps_done >= job_.train.steps) return ok_status();
  std::vector<int> dropped;
  for (int r = 0; r < static_cast<int>(replicas_); ++r)
    if (!live_groups_[static_cast<size_t>(r)]) dropped.push_back(r);
  if (dropped.empty()) return ok_status();
  // A dropped group's members that are still alive are idle again: welcome.
  std::set<std::string> in_job;
  for (size_t i : live_members()) in_job.insert(members_[i].node_id);
  // A dropped member that has not answered its EndJob yet may still act on
  // it: set up again now, it could drop the job right after.
  for (const auto& node_id : fleet_->still_ending()) in_job.insert(node_id);
  const auto ready = ready_idle_nodes(in_job);
  const size_t needed = dropped.size() * static_cast<size_t>(stages_);
  if (ready.size() < needed) {
    spares_ = ready;
    return ok_status();
  }
  const auto started = Clock::now();
  // No node has changed yet: a live member that fails to hand over its
  // checkpoint costs its group, and a copy that fails here (the job dir) puts
  // the rejoin off to a later boundary; the job goes on either way.
  Status copied = mirror_checkpoints(steps_done);
  const int source = first_live_group();
  for (size_t k = 0; copied.ok() && k < dropped.size() * static_cast<size_t>(stages_); ++k) {
    const int r = dropped[k / static_cast<size_t>(stages_)];
    const auto s = static_cast<int64_t>(k % static_cast<size_t>(stages_));
    auto files = mirror_->files(s, source, steps_done);
    copied = files.ok() ? mirror_->store(s, r, steps_done, *files) : Status(files.error());
  }
  if (!copied.ok()) {
    spares_ = ready;
    if (fleet_->ended()) return copied;
    spdlog::warn("rejoin after step {} put off: {}", steps_done, copied.message());
    return ok_status();
  }
  size_t next = 0;
  for (int r : dropped) {
    for (int64_t s = 0; s < stages_; ++s) {
      const auto i = static_cast<size_t>(s * replicas_ + r);
      members_[i] = ready[next++];
      members_[i].stage = static_cast<int>(s);
      members_[i].replica = r;
      step_leaves_[i].clear();
    }
    live_groups_[static_cast<size_t>(r)] = true;
  }
  spares_.insert(spares_.end(), ready.begin() + static_cast<std::ptrdiff_t>(next), ready.end());
  // The newcomers' state roots are group SOURCE's, not their own role's.
  replanned_at_ = steps_done;
  // A member that fails from here on costs its group (set_up_members).
  SN_TRY(set_up_members(steps_done));
  for (int r : dropped) {
    if (!live_groups_[static_cast<size_t>(r)]) {
      spdlog::warn("replica group {} did not rejoin after step {}: a member failed during the set-up", r, steps_done);
      continue;
    }
    result_.diloco.rejoined_groups.push_back(r);
    result_.diloco.rejoined_at_step.push_back(steps_done);
    spdlog::warn("replica group {} rejoined after step {}: idle nodes copy group {}'s state", r, steps_done, source);
  }
  spdlog::warn("rejoin after step {}: {:.1f} s", steps_done, std::chrono::duration<double>(Clock::now() - started).count());
  return ok_status();
}

// The outer step on every live member; the replicas of each stage must then
// report the same replica hash (weights and outer momentum, bitwise). A group
// lost during it fails the survivors' all-gather: the groups whose members no
// longer answer are dropped and the step runs again among the others, each
// node first restoring its state from before the step. Every retry drops at
// least one group, so there are fewer retries than groups.
Status JobSession::diloco_outer_step(int64_t steps_done) {
  std::vector<solvernet::v1::RunStepReply> replies;
  for (int attempt = 0;; ++attempt) {
    replies.assign(members_.size(), {});
    const auto members = live_members();
    std::vector<int> groups;
    for (size_t i : members) groups.push_back(members_[i].replica);
    // A retry may wait for the failed attempt's calls still running on the
    // nodes (each gives up within a peer timeout) before its own begins.
    const auto deadline = step_deadline_->deadline() * (attempt == 0 ? 1 : 2);
    const auto statuses = run_members(members, groups, deadline, [&](size_t i, grpc::ClientContext& context) {
      solvernet::v1::RunStepRequest request;
      request.set_step(steps_done);
      request.set_outer_sync(true);
      request.set_outer_attempt(attempt);
      for (int r = 0; r < static_cast<int>(replicas_); ++r)
        if (live_groups_[static_cast<size_t>(r)]) request.add_outer_replicas(r);
      return send_run_step(i, context, request, &replies[i]);
    });
    // The first failure that is not a call cancelled because a group mate failed.
    std::optional<Error> failure;
    bool failure_cancelled = false;
    for (size_t k = 0; k < members.size(); ++k) {
      if (statuses[k].ok()) continue;
      const bool cancelled = statuses[k].error_code() == grpc::StatusCode::CANCELLED;
      if (failure && (cancelled || !failure_cancelled)) continue;
      failure = kind_error(net::error_kind_of(statuses[k].error_code()), "{} failed during the outer step after step {}: {}",
                           member_name(members_[members[k]]), steps_done, statuses[k].error_message());
      failure_cancelled = cancelled;
    }
    if (!failure) break;
    if (auto paused = fleet_->pause_explains(fmt::format("the outer step after step {}", steps_done))) {
      fleet_->end_all(true, paused->message);
      return *paused;
    }
    std::set<int> lost;
    std::vector<size_t> silent;
    if (!(options_.cancel && options_.cancel->load()))
      for (size_t i : fleet_->unresponsive(deadlines_.fleet.ping))
        if (live_groups_[static_cast<size_t>(members_[i].replica)]) {
          lost.insert(members_[i].replica);
          silent.push_back(i);
        }
    // Every member still answers: not a group gone (a bad message, a link
    // down); retrying among the same groups would fail alike.
    if (lost.empty()) {
      fleet_->end_all(true, failure->message);
      return *failure;
    }
    // Each group dropped for its own members: its silent ones, led by the
    // group's own failure when one of its calls failed.
    const auto own = failed_groups(members, statuses);
    GroupFailures blamed;
    for (int r : lost)
      blamed[r] = blame_silent(silent_of(r, silent), own.count(r) ? own.at(r) : failure->message);
    drop_groups(blamed, steps_done - 1);
    if (first_live_group() < 0) {
      auto error = kind_error(ErrorKind::unavailable, "every replica group failed by the outer step after step {} "
                              "(last: {})", steps_done, failure->message);
      fleet_->end_all(true, error.message);
      return error;
    }
    ++result_.diloco.outer_retries;
    spdlog::warn("outer step after step {}: running it again among {} group(s)", steps_done, live_members().size() /
                 static_cast<size_t>(stages_));
  }
  const auto members = live_members();
  std::vector<std::string> hashes(static_cast<size_t>(stages_));
  for (size_t i : members)
    if (replies[i].replica_hash().size() != 32 || replies[i].state_hash().size() != 32) {
      auto error = kind_error(ErrorKind::bad_peer, "{} sent outer-step hashes of {} and {} bytes, not 32",
                              member_name(members_[i]), replies[i].replica_hash().size(), replies[i].state_hash().size());
      fleet_->end_all(true, error.message);
      return error;
    }
  for (int64_t stage = 0; stage < stages_; ++stage) {
    std::vector<std::string> names, stage_hashes;
    for (size_t i : members)
      if (members_[i].stage == stage) {
        names.push_back(member_name(members_[i]));
        stage_hashes.push_back(replies[i].replica_hash());
      }
    if (auto disagreement = replica_disagreement(names, stage_hashes, stage,
                                                 fmt::format("at the outer step after step {}", steps_done))) {
      auto error = disagreement->error();
      fleet_->end_all(true, error.message);
      return error;
    }
    if (!stage_hashes.empty()) hashes[static_cast<size_t>(stage)] = stage_hashes.front();
  }
  for (size_t i : members) {
    const auto& reply = replies[i];
    for (const auto& sent : reply.sent()) result_.diloco.bytes_outer += sent.bytes();
    account_traffic(reply, steps_done, false);
    if (members_[i].replica == first_live_group())
      result_.stage_state_hashes[static_cast<size_t>(members_[i].stage)] = to_hex(as_bytes(reply.state_hash()));
    reported_state_[i] = {steps_done, reply.state_hash()};
  }
  for (auto& h : hashes) h = to_hex(as_bytes(h));
  result_.diloco.outer_hashes.push_back(std::move(hashes));
  result_.diloco.outer_groups.push_back(static_cast<int64_t>(members.size()) / stages_);
  ++result_.diloco.outer_steps;
  return ok_status();
}

Result<double> JobSession::diloco_evaluate(const std::vector<std::vector<MicroBatchData>>& batches) {
  std::set<int> pending;  // the shares (by replica) not evaluated yet
  for (int r = 0; r < static_cast<int>(replicas_); ++r) pending.insert(r);
  double loss_sum = 0;
  int64_t loss_count = 0;
  while (!pending.empty()) {
    // One share per live group per round, its own first.
    std::map<int, int> share_of;  // group → share
    std::vector<int> left;
    for (int r : pending)
      if (live_groups_[static_cast<size_t>(r)])
        share_of[r] = r;
      else
        left.push_back(r);
    for (int r = 0; r < static_cast<int>(replicas_) && !left.empty(); ++r)
      if (live_groups_[static_cast<size_t>(r)] && !share_of.count(r)) {
        share_of[r] = left.front();
        left.erase(left.begin());
      }
    std::vector<size_t> members;
    std::vector<int> groups;
    for (size_t i : live_members())
      if (share_of.count(members_[i].replica)) {
        members.push_back(i);
        groups.push_back(members_[i].replica);
      }
    // A group taking a second share must not reuse a step number: its
    // stages' messages are tagged with it.
    const int64_t step = -1 - eval_requests_++;
    std::vector<solvernet::v1::RunStepReply> replies(members_.size());
    const auto statuses = run_members(members, groups, step_deadline_->deadline(), [&](size_t i, grpc::ClientContext& context) {
      solvernet::v1::RunStepRequest request;
      request.set_step(step);
      request.set_forward_only(true);
      add_micro_batches(i, batches, request, share_of.at(members_[i].replica));
      return send_run_step(i, context, request, &replies[i]);
    });
    const auto failed = failed_groups(members, statuses);
    for (size_t i : members)
      if (!failed.count(members_[i].replica)) {
        loss_sum += replies[i].loss_sum();
        loss_count += replies[i].loss_count();
      }
    for (const auto& [group, share] : share_of)
      if (!failed.count(group)) pending.erase(share);
    if (options_.cancel && options_.cancel->load()) {
      fleet_->end_all(true, "interrupted by the user");
      return kind_error(ErrorKind::aborted, "interrupted during held-out evaluation");
    }
    if (!failed.empty()) SN_TRY(lose_groups(failed, job_.train.steps, "held-out evaluation"));
  }
  if (loss_count == 0) return make_error("no loss came back from the last stage");
  return loss_sum / static_cast<double>(loss_count);
}

Status JobSession::train_diloco() {
  const auto run_started = Clock::now();
  const int64_t steps = job_.train.steps, inner = job_.diloco.inner_steps;
  // What the client no longer sends: each step's tokens (stage 0) and targets
  // (last stage) as i64, every replica's share of the global batch.
  const int64_t data_bytes_per_step = 2 * tokens_per_step(job_) * 8;
  for (int64_t step = 0; step < steps; ++step) {
    if (options_.cancel && options_.cancel->load()) {
      fleet_->end_all(true, "interrupted by the user");
      return kind_error(ErrorKind::aborted, "interrupted at step {} of {}", step, steps);
    }
    const auto step_started = Clock::now();
    const auto members = live_members();
    std::vector<int> groups;
    for (size_t i : members) groups.push_back(members_[i].replica);
    std::vector<solvernet::v1::RunStepReply> replies(members_.size());
    const auto statuses = run_members(members, groups, step_deadline_->deadline(), [&](size_t i, grpc::ClientContext& context) {
      solvernet::v1::RunStepRequest request;
      request.set_step(step);
      return send_run_step(i, context, request, &replies[i]);
    });
    const auto failed = failed_groups(members, statuses);
    if (options_.cancel && options_.cancel->load()) {
      fleet_->end_all(true, "interrupted by the user");
      return kind_error(ErrorKind::aborted, "interrupted at step {} of {}", step + 1, steps);
    }
    // Every call of a group that stalls fails; the first may be a member
    // that only waited for the stalled one (lose_groups names the silent).
    if (!failed.empty()) SN_TRY(lose_groups(failed, step + 1, fmt::format("step {}", step + 1)));
    double loss_sum = 0;
    int64_t loss_count = 0;
    for (size_t i : live_members()) {
      const auto& reply = replies[i];
      if (reply.leaf().size() == 32) {
        Hash256 leaf;
        std::memcpy(leaf.data(), reply.leaf().data(), 32);
        step_leaves_[i].push_back(leaf);
      }
      loss_sum += reply.loss_sum();
      loss_count += reply.loss_count();
      account_traffic(reply, step, false);
      result_.node_compute_seconds_total += reply.compute_seconds() / static_cast<double>(members.size());
      result_.node_wait_seconds_total += reply.wait_seconds() / static_cast<double>(members.size());
    }
    result_.diloco.data_bytes_not_sent += data_bytes_per_step;
    if (loss_count == 0) return make_error("no loss came back from the last stage at step {}", step + 1);
    if ((step + 1) % inner == 0 || step + 1 == steps) {
      // Before the outer step the groups should differ (each trained on its own shard).
      std::map<int64_t, std::set<std::string>> states;
      for (size_t i : live_members()) states[members_[i].stage].insert(replies[i].replica_hash());
      if (std::any_of(states.begin(), states.end(), [](const auto& s) { return s.second.size() > 1; }))
        ++result_.diloco.diverged_before_outer;
      SN_TRY(diloco_outer_step(step + 1));
    }
    const double loss = loss_sum / static_cast<double>(loss_count);
    result_.losses.push_back(loss);
    if ((step + 1) % inner == 0) SN_TRY(diloco_rejoin(step + 1));
    if (step >= result_.first_steady_step) ++result_.steady_steps;
    const double seconds = std::chrono::duration<double>(Clock::now() - step_started).count();
    step_deadline_->record(seconds);
    result_.step_seconds_total += seconds;
    if (options_.progress) {
      StepReport report;
      report.members = &members_;
      report.step = step + 1;
      report.steps = steps;
      report.loss = loss;
      report.step_seconds = seconds;
      const double elapsed = std::chrono::duration<double>(Clock::now() - run_started).count();
      report.tokens_per_s = static_cast<double>(tokens_per_step(job_) * (step + 1)) / elapsed;
      report.bytes_by_class = result_.bytes_by_class;
      report.bytes_pipeline = result_.bytes_pipeline;
      report.bytes_data_parallel = result_.bytes_data_parallel;
      options_.progress(report);
    }
  }
  result_.wall_seconds = std::chrono::duration<double>(Clock::now() - run_started).count();
  result_.tokens_per_s = static_cast<double>(tokens_per_step(job_) * steps) / result_.wall_seconds;
  for (const auto& leaves : step_leaves_) result_.member_commitments.push_back(to_hex(leaves_root(leaves)));
  result_.step_deadline_ms = static_cast<double>(step_deadline_->deadline().count());
  result_.step_p95_seconds = step_deadline_->p95_seconds();
  return ok_status();
}

Status JobSession::evaluate() {
  const int64_t batches = holdout_batch_count(job_, *dataset_, options_.eval_batches);
  double sum = 0;
  for (int64_t i = 0; i < batches; ++i) {
    if (job_.diloco.enabled) {
      SN_ASSIGN(double loss, diloco_evaluate(holdout_batches(job_, *dataset_, i)));
      sum += loss;
      continue;
    }
    SN_ASSIGN(double loss, run_step(-1 - i, holdout_batches(job_, *dataset_, i), true, "held-out evaluation"));
    sum += loss;
  }
  result_.holdout_loss = batches > 0 ? sum / static_cast<double>(batches) : std::nan("");
  if (batches == 0) result_.holdout_loss_missing = no_holdout_batches_reason(job_, *dataset_, options_.eval_batches);
  return ok_status();
}

// Replica 0 of every stage sends its weights; they are joined into one file.
Status JobSession::fetch_model() {
  if (options_.model_out.empty()) return ok_status();
  NamedTensors whole;
  std::set<std::string> seen;
  for (int64_t s = 0; s < stages_; ++s) {
    // Every live replica holds the same weights after the last step (or
    // outer step): a [diloco] group that fails to hand them over is dropped
    // and the next live group asked.
    solvernet::v1::FetchWeightsReply reply;
    while (true) {
      const int group = first_live_group();
      const size_t i = static_cast<size_t>(s * replicas_ + group);
      auto fetched = fleet_->run_one(i, "fetching weights", deadlines_.fetch, [&](size_t m, grpc::ClientContext& context) {
        solvernet::v1::FetchWeightsRequest request;
        request.set_job_id(job_id_);
        sign_request(fleet_->signer(), "FetchWeights", request);
        return fleet_->stub(m).FetchWeights(&context, request, &reply);
      });
      if (fetched.ok()) break;
      if (!job_.diloco.enabled) {
        fleet_->end_all(true, "could not fetch weights");
        return fetched.error();
      }
      SN_TRY(lose_groups({{group, fetched.message()}}, job_.train.steps, "fetching the weights"));
    }
    SN_ASSIGN(auto tensors, model::load_safetensors_bytes(reply.safetensors()));
    for (auto& [name, tensor] : tensors)
      if (seen.insert(name).second) whole.emplace_back(name, tensor);
  }
  auto metadata = model::model_file_metadata(job_.name, job_.model, tokenizer_vocab_);
  metadata["job"] = job_.name;
  metadata["steps"] = std::to_string(job_.train.steps);
  Status saved = ensure_directory(options_.model_out.has_parent_path() ? options_.model_out.parent_path()
                                                                        : std::filesystem::path("."));
  if (saved.ok()) saved = model::save_safetensors(options_.model_out, whole, metadata);  // atomic: nothing half-written
  if (!saved.ok()) {
    // The training is not lost with the file: the job dir keeps its newest
    // checkpoint (state.json is not marked completed), and a resume from it
    // runs the steps after it again, to the same weights.
    const int64_t kept = resumable_step();
    const std::string what = fmt::format("--out {}: {}", options_.model_out.string(), saved.message());
    if (kept <= 0)
      return Error{fmt::format("{}; the trained model is lost (no job dir kept a checkpoint of it: give --job-dir)",
                               what),
                   1, saved.error().kind};
    return Error{fmt::format("{}; the trained model is not lost: the job dir {} keeps its checkpoint of step {}, and "
                             "solvernet train --resume {} --bootstrap HOST:PORT --out OTHER_PATH runs the {} step(s) "
                             "after it again and writes the model there",
                             what, options_.recovery.job_dir.string(), kept, options_.recovery.job_dir.string(),
                             job_.train.steps - kept),
                 1, saved.error().kind};
  }
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
  // Stopped by the user (Ctrl-C), or the client itself stopped past the
  // nodes' lease: say how to go on, as a stop for want of a spare does.
  const auto stopped = [&](Error error) {
    if (error.kind == ErrorKind::aborted && ((options.cancel && options.cancel->load()) || session.client_paused()))
      if (const int64_t step = session.resumable_step(); step > 0)
        error.message += "; " + resume_advice(options.recovery.job_dir, step);
    return error;
  };
  Status done = session.set_up_members(options.recovery.resume_step);
  if (done.ok()) done = session.train();
  if (done.ok()) done = session.finish();
  if (!done.ok()) return stopped(done.error());
  session.end();
  return std::move(session.result());
}

}  // namespace sn::train
