// The Train gRPC service: the stage workers of every job this node holds.
// Each control request is checked against the job's owner key by the node
// runtime before anything else happens; admission and leases are the
// runtime's too, so this file only maps jobs to workers.
#include <spdlog/spdlog.h>

#include <atomic>
#include <csignal>
#include <map>
#include <mutex>
#include <thread>

#include "core/fs.h"
#include "net/failure_cause.h"
#include "net/rpc.h"
#include "train/control.h"
#include "train/evidence.h"
#include "train/state.h"
#include "train/stage_worker.h"
#include "train/train.h"

namespace sn::train {
namespace {

class TrainServiceImpl final : public solvernet::v1::Train::Service {
 public:
  explicit TrainServiceImpl(NodeServiceOptions options) : options_(std::move(options)) {}
  ~TrainServiceImpl() override {
    std::map<std::string, std::shared_ptr<Slot>> jobs;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs.swap(jobs_);
    }
    for (auto& [id, slot] : jobs) slot->worker->abort("the node is stopping");
  }

  grpc::Status SetupJob(grpc::ServerContext* context, const solvernet::v1::SetupJobRequest* request,
                        solvernet::v1::SetupJobReply* reply) override {
    const std::string& job_id = request->job_id();
    auto owner = options_.runtime->authorize(job_id, "SetupJob", request->auth(), request_digest("SetupJob", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    auto job = parse_job_string(request->job_toml(), "job from client");
    if (!job.ok()) return net::to_grpc(job.error());
    test_fault_at("setup");
    // Set up again (the client retries or resumes): the old worker goes first.
    drop(job_id, "job set up again");
    const StageMemory memory = estimate_stage_memory(*job, request->stage(), request->first_layer(),
                                                     request->layer_count(), request->dataset_samples());
    auto admitted = options_.runtime->admit(job_id, *owner, memory.total, fmt::format("stage {}", request->stage()),
                                            [this, job_id](const std::string& why) { drop(job_id, why); });
    if (!admitted.ok()) return net::to_grpc(admitted.error());
    const auto peer_timeout = request->peer_timeout_ms() > 0 ? std::chrono::milliseconds(request->peer_timeout_ms())
                                                             : options_.peer_timeout;
    auto worker = StageWorker::create(*request, options_.runtime->key(), options_.data_dir, peer_timeout,
                                      *options_.delivery, options_.cheat);
    if (!worker.ok()) {
      options_.runtime->release(job_id);
      spdlog::warn("rejected job {}: {}", job_id, worker.message());
      return net::to_grpc(typed(worker.error()));
    }
    reply->set_node_id(options_.runtime->key().node_id());
    reply->set_parameters((*worker)->parameter_count());
    reply->set_lease_ms(options_.runtime->lease().count());
    reply->set_memory_bytes(memory.total);
    reply->set_leaf((*worker)->start_leaf().data(), (*worker)->start_leaf().size());
    auto slot = std::make_shared<Slot>();
    slot->worker = std::shared_ptr<StageWorker>(std::move(worker).value());
    bool kept = false;
    {
      // A set-up the client gave up on (cancelled because a group mate
      // failed, or past its deadline) is not kept: the EndJob that follows
      // may have come while it ran and found nothing to drop, and the worker
      // would stay with no admission and no lease to run out. The cancel
      // reaches the node before that EndJob, on the same connection.
      std::lock_guard<std::mutex> lock(mutex_);
      kept = !context->IsCancelled();
      if (kept) jobs_[job_id] = slot;
    }
    if (kept) {
      spdlog::info("job {}: stage {} replica {}, layers [{}, {}), {} parameters, ~{} admitted", job_id,
                   request->stage(), request->replica(), request->first_layer(),
                   request->first_layer() + request->layer_count(), slot->worker->parameter_count(),
                   net::format_bytes(memory.total));
      return grpc::Status::OK;
    }
    slot->worker->abort("the client cancelled the set-up");
    options_.runtime->release(job_id);
    spdlog::info("job {}: set-up cancelled by the client; not kept", job_id);
    return grpc::Status(grpc::StatusCode::CANCELLED, "the set-up was cancelled");
  }

  grpc::Status RunStep(grpc::ServerContext*, const solvernet::v1::RunStepRequest* request,
                       solvernet::v1::RunStepReply* reply) override {
    auto owner = options_.runtime->authorize(request->job_id(), "RunStep", request->auth(),
                                             request_digest("RunStep", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    auto slot = current(request->job_id());
    if (!slot) return no_job(request->job_id());
    test_fault_at(request->outer_sync() ? "outer" : request->forward_only() ? "eval" : "step");
    std::lock_guard<std::mutex> step_lock(slot->step_mutex);
    auto result = slot->worker->run_step(*request);
    if (!result.ok()) {
      // Steps a user reads are numbered from 1, as the client's progress line numbers them.
      spdlog::warn("job {} step {}: {}", request->job_id(), request->step() + 1, result.message());
      // An outer step that lost a peer is retried among the groups left
      // (docs/diloco.md): the worker's state is as before it and stays usable.
      const ErrorKind kind = result.error().kind;
      const bool retryable = request->outer_sync() && (kind == ErrorKind::timeout || kind == ErrorKind::unavailable);
      if (!retryable) slot->worker->abort(result.message());
      return result.error().kind == ErrorKind::internal ? grpc::Status(grpc::StatusCode::ABORTED, result.message())
                                                        : net::to_grpc(typed(result.error()));
    }
    *reply = std::move(result).value();
    return grpc::Status::OK;
  }

  grpc::Status FetchWeights(grpc::ServerContext*, const solvernet::v1::FetchWeightsRequest* request,
                            solvernet::v1::FetchWeightsReply* reply) override {
    auto owner = options_.runtime->authorize(request->job_id(), "FetchWeights", request->auth(),
                                             request_digest("FetchWeights", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    auto slot = current(request->job_id());
    if (!slot) return no_job(request->job_id());
    std::lock_guard<std::mutex> step_lock(slot->step_mutex);
    reply->set_safetensors(slot->worker->weights_safetensors());
    reply->set_step(slot->worker->steps_done());
    return grpc::Status::OK;
  }

  grpc::Status EndJob(grpc::ServerContext*, const solvernet::v1::EndJobRequest* request,
                      solvernet::v1::Empty*) override {
    // A takeover is not recorded (nor renews the lease) until accepted: the
    // renewal time tells a stopped client from a live one, and a refused
    // takeover must not put the live client's sequence numbers below the window.
    auto owner = options_.runtime->authorize(request->job_id(), "EndJob", request->auth(),
                                             request_digest("EndJob", *request), !request->takeover());
    if (!owner.ok()) return net::to_grpc(owner.error());
    if (request->takeover()) {
      // The client renews every lease / 3 (and with every step): half a
      // lease without a renewal means it stopped.
      const auto renewal = options_.runtime->last_renewal(request->job_id());
      if (renewal && renewal->ago < renewal->lease / 2) {
        solvernet::v1::Refusal refusal;
        refusal.set_cause(solvernet::v1::Refusal::CLIENT_LIVE);
        refusal.set_renewed_ms_ago(renewal->ago.count());
        refusal.set_quiet_ms((renewal->lease / 2).count());
        spdlog::warn("refused a takeover of job {}: its lease was renewed {:.1f} s ago, its client runs",
                     request->job_id(), renewal->ago.count() / 1000.0);
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            fmt::format("job {} is still run by a live client (its lease was renewed {:.1f} s ago)",
                                        request->job_id(), renewal->ago.count() / 1000.0),
                            refusal.SerializeAsString());
      }
      options_.runtime->taken_over(request->job_id(), request->auth().sequence());
    }
    if (request->abort())
      spdlog::warn("job {} aborted: {}", request->job_id(), request->reason());
    else
      spdlog::info("job {} finished", request->job_id());
    drop(request->job_id(), request->abort() ? "job aborted by the client: " + request->reason() : "job ended");
    return grpc::Status::OK;
  }

  grpc::Status RenewLease(grpc::ServerContext*, const solvernet::v1::RenewLeaseRequest* request,
                          solvernet::v1::RenewLeaseReply* reply) override {
    auto owner = options_.runtime->authorize(request->job_id(), "RenewLease", request->auth(),
                                             request_digest("RenewLease", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    if (!current(request->job_id())) return no_job(request->job_id());
    reply->set_lease_ms(options_.runtime->lease().count());
    return grpc::Status::OK;
  }

  // Recovery (docs/resilience.md): the files of one kept
  // checkpoint of a role this node held, checked against their manifest, its
  // labels (the role's) and, while this node holds the role, the state hash
  // it saved, before they leave. Works whether or not the job is still held
  // (a node restarted with its data dir still has them). A copy that fails a
  // check is this node's disk at fault, not a lie: UNAVAILABLE, so the client
  // restores the role from another copy (its mirror) rather than blame it.
  grpc::Status FetchCheckpoint(grpc::ServerContext*, const solvernet::v1::FetchCheckpointRequest* request,
                               solvernet::v1::FetchCheckpointReply* reply) override {
    auto owner = options_.runtime->authorize(request->job_id(), "FetchCheckpoint", request->auth(),
                                             request_digest("FetchCheckpoint", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    if (!valid_job_id(request->job_id()))
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "malformed job id");
    test_fault_at("fetch-checkpoint");
    CheckpointStore store(checkpoint_dir(options_.data_dir, request->job_id(), request->stage(), request->replica()), 1);
    auto loaded = store.load(request->step());
    if (!loaded.ok()) return local_data(request->step(), loaded.message());
    if (auto other = checkpoint_role_mismatch(loaded->manifest, request->job_id(), request->stage(), request->replica()))
      return local_data(request->step(), fmt::format("{}: {}", store.manifest_path(request->step()).string(), *other));
    if (auto slot = current(request->job_id())) {
      std::lock_guard<std::mutex> step_lock(slot->step_mutex);
      const auto& worker = *slot->worker;
      const auto saved = worker.stage() == request->stage() && worker.replica() == request->replica()
                             ? worker.saved_state(request->step())
                             : std::nullopt;
      if (saved && *saved != loaded->manifest.state.root)
        return local_data(request->step(), fmt::format("{}: its state hash is not the one this node saved at that step",
                                                       store.manifest_path(request->step()).string()));
    }
    for (const auto& file : loaded->manifest.files) {
      auto bytes = read_file(store.dir() / file.name);
      if (!bytes.ok()) return net::to_grpc(bytes.error());
      auto* blob = reply->add_files();
      blob->set_name(file.name);
      blob->set_data(std::move(bytes).value());
    }
    auto manifest = read_file(store.manifest_path(request->step()));
    if (!manifest.ok()) return net::to_grpc(manifest.error());
    auto* blob = reply->add_files();
    blob->set_name(store.manifest_path(request->step()).filename().string());
    blob->set_data(std::move(manifest).value());
    reply->set_step(request->step());
    return grpc::Status::OK;
  }

  // A spare taking over a role receives that role's checkpoint here, then
  // SetupJob with start_step. Each file lands through a temp file; the
  // manifest comes last, so a half-received checkpoint is never complete; the
  // whole is then loaded and checked against the manifest, and removed if it
  // does not hold.
  grpc::Status PutCheckpoint(grpc::ServerContext*, const solvernet::v1::PutCheckpointRequest* request,
                             solvernet::v1::Empty*) override {
    auto owner = options_.runtime->authorize(request->job_id(), "PutCheckpoint", request->auth(),
                                             request_digest("PutCheckpoint", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    if (!valid_job_id(request->job_id()) || request->stage() < 0 || request->replica() < 0 || request->step() < 0)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "malformed job id, role or step");
    test_fault_at("put-checkpoint");
    CheckpointStore store(checkpoint_dir(options_.data_dir, request->job_id(), request->stage(), request->replica()), 1);
    const std::string prefix = store.data_path(request->step()).filename().string();
    const std::string stem = prefix.substr(0, prefix.find('.') + 1);  // "step-000000000012."
    const std::string manifest_name = store.manifest_path(request->step()).filename().string();
    int manifests = 0;
    for (const auto& f : request->files()) {
      if (!f.name().starts_with(stem) || f.name().find('/') != std::string::npos || f.name().find("..") != std::string::npos)
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            fmt::format("checkpoint file \"{}\" is not one of step {}", f.name(), request->step()));
      manifests += f.name() == manifest_name;
    }
    if (manifests != 1 || request->files(request->files_size() - 1).name() != manifest_name)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the checkpoint's manifest must come once, last");
    if (auto made = ensure_directory(store.dir()); !made.ok()) return net::to_grpc(typed(made.error()));
    for (const auto& f : request->files())
      if (auto written = write_file_atomic(store.dir() / f.name(), f.data()); !written.ok()) {
        store.remove_step(request->step());
        return net::to_grpc(typed(written.error()));
      }
    if (auto loaded = store.load(request->step()); !loaded.ok()) {
      std::error_code ec;
      std::filesystem::remove(store.manifest_path(request->step()), ec);
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the checkpoint put here does not hold: " + loaded.message());
    }
    spdlog::info("job {}: received the checkpoint of stage {} replica {} at step {}", request->job_id(),
                 request->stage(), request->replica(), request->step());
    return grpc::Status::OK;
  }

 private:
  // Tests (node --kill-self-at CALL:N, --stall-at CALL:N:MS, --disk-full-at
  // CALL:N): dies on, sleeps before, or finds its disk full from the N-th
  // request of kind CALL.
  void test_fault_at(const std::string& call) {
    if (call == options_.disk_full_at_call && ++disk_full_requests_ == options_.disk_full_at_count) {
      spdlog::warn("--disk-full-at {}:{}: this node's disk is full from now on", call, options_.disk_full_at_count);
      simulate_disk_full_for_tests(options_.data_dir, 1);
    }
    if (call == options_.stall_at_call && ++stall_requests_ == options_.stall_at_count) {
      spdlog::warn("--stall-at {}:{}:{}: stalling this request", call, options_.stall_at_count, options_.stall_at_ms);
      std::this_thread::sleep_for(std::chrono::milliseconds(options_.stall_at_ms));
    }
    if (call != options_.kill_self_at_call || ++kill_self_requests_ != options_.kill_self_at_count) return;
    spdlog::warn("--kill-self-at {}:{}: killing this node", call, options_.kill_self_at_count);
    std::raise(SIGKILL);
  }
  static bool valid_job_id(const std::string& id) {
    if (id.empty() || id.size() > 128) return false;
    for (char c : id)
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
    return id != "." && id != "..";
  }

  struct Slot {
    std::shared_ptr<StageWorker> worker;
    std::mutex step_mutex;  // one RunStep / FetchWeights at a time per job
  };

  std::shared_ptr<Slot> current(const std::string& job_id) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = jobs_.find(job_id);
    return it == jobs_.end() ? nullptr : it->second;
  }
  // Aborts JOB_ID's worker (waking its waits) and frees its admission.
  void drop(const std::string& job_id, const std::string& reason) {
    std::shared_ptr<Slot> slot;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = jobs_.find(job_id);
      if (it != jobs_.end()) {
        slot = std::move(it->second);
        jobs_.erase(it);
      }
    }
    if (slot) slot->worker->abort(reason);
    options_.runtime->release(job_id);
  }
  static grpc::Status local_data(int64_t step, const std::string& why) {
    spdlog::warn("this node's checkpoint of step {} is not usable: {}", step, why);
    return net::to_grpc(net::with_failure_cause(
        kind_error(ErrorKind::unavailable,
                   "no usable checkpoint of step {} here (local data: restore the role from another copy): {}", step,
                   why),
        solvernet::v1::FailureCause::LOCAL_DATA));
  }
  // ERROR, a failure of a request of this node's, typed for the client: a
  // write under its data dir that found the disk full (core/fs's ENOSPC and
  // EDQUOT errors, of this very process) is FailureCause DISK_FULL, and the
  // node takes no jobs until its data dir takes a write again.
  Error typed(Error error) const {
    if (error.kind != ErrorKind::resource_exhausted || !says_disk_full(error.message)) return error;
    options_.runtime->report_disk_full();
    return net::with_failure_cause(std::move(error), solvernet::v1::FailureCause::DISK_FULL);
  }
  static grpc::Status no_job(const std::string& job_id) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "this node holds no job " + job_id);
  }

  NodeServiceOptions options_;
  std::mutex mutex_;
  std::atomic<int> kill_self_requests_{0};
  std::atomic<int> stall_requests_{0};  // requests of kind stall_at_call received
  std::atomic<int> disk_full_requests_{0};
  std::map<std::string, std::shared_ptr<Slot>> jobs_;
};

}  // namespace

std::unique_ptr<grpc::Service> make_train_service(NodeServiceOptions options) {
  return std::make_unique<TrainServiceImpl>(std::move(options));
}

}  // namespace sn::train
