// The Node gRPC service: hosts at most one job's stage worker at a time.
#include <spdlog/spdlog.h>

#include <mutex>

#include "net/rpc.h"
#include "train/stage_worker.h"
#include "train/train.h"

namespace sn::train {
namespace {

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

class NodeServiceImpl final : public solvernet::v1::Node::Service {
 public:
  explicit NodeServiceImpl(NodeServiceOptions options) : options_(std::move(options)) {}

  grpc::Status Ping(grpc::ServerContext*, const solvernet::v1::PingRequest*,
                    solvernet::v1::PingReply* reply) override {
    reply->set_node_id(options_.key->node_id());
    reply->set_received_at_us(now_us());
    return grpc::Status::OK;
  }

  grpc::Status GetInfo(grpc::ServerContext*, const solvernet::v1::Empty*,
                       solvernet::v1::SignedNodeInfo* reply) override {
    if (!options_.signed_info) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no node info");
    *reply = options_.signed_info();
    return grpc::Status::OK;
  }

  grpc::Status SetupJob(grpc::ServerContext*, const solvernet::v1::SetupJobRequest* request,
                        solvernet::v1::SetupJobReply* reply) override {
    std::shared_ptr<StageWorker> old;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (worker_ && worker_->job_id() != request->job_id()) {
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            "node is busy with job " + worker_->job_id());
      }
      old = std::move(worker_);
    }
    if (old) old->abort("job set up again");
    old.reset();
    auto worker = StageWorker::create(*request, *options_.key, options_.data_dir, options_.peer_timeout,
                                      *options_.delivery);
    if (!worker.ok()) {
      spdlog::warn("rejected job {}: {}", request->job_id(), worker.message());
      return net::to_grpc(worker.error());
    }
    reply->set_node_id(options_.key->node_id());
    reply->set_parameters((*worker)->parameter_count());
    spdlog::info("job {}: stage {} replica {}, layers [{}, {}), {} parameters", request->job_id(),
                 request->stage(), request->replica(), request->first_layer(),
                 request->first_layer() + request->layer_count(), (*worker)->parameter_count());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      worker_ = std::shared_ptr<StageWorker>(std::move(worker).value());
    }
    if (options_.on_job_change) options_.on_job_change(request->job_id());
    return grpc::Status::OK;
  }

  grpc::Status RunStep(grpc::ServerContext*, const solvernet::v1::RunStepRequest* request,
                       solvernet::v1::RunStepReply* reply) override {
    auto worker = current(request->job_id());
    if (!worker) return no_job(request->job_id());
    std::lock_guard<std::mutex> step_lock(step_mutex_);
    auto result = worker->run_step(*request);
    if (!result.ok()) {
      // Steps a user reads are numbered from 1, as the client's progress line numbers them.
      spdlog::warn("job {} step {}: {}", request->job_id(), request->step() + 1, result.message());
      worker->abort(result.message());
      return grpc::Status(grpc::StatusCode::ABORTED, result.message());
    }
    *reply = std::move(result).value();
    return grpc::Status::OK;
  }

  grpc::Status FetchWeights(grpc::ServerContext*, const solvernet::v1::FetchWeightsRequest* request,
                            solvernet::v1::FetchWeightsReply* reply) override {
    auto worker = current(request->job_id());
    if (!worker) return no_job(request->job_id());
    std::lock_guard<std::mutex> step_lock(step_mutex_);
    reply->set_safetensors(worker->weights_safetensors());
    reply->set_step(worker->steps_done());
    return grpc::Status::OK;
  }

  grpc::Status EndJob(grpc::ServerContext*, const solvernet::v1::EndJobRequest* request,
                      solvernet::v1::Empty*) override {
    std::shared_ptr<StageWorker> worker;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!worker_ || worker_->job_id() != request->job_id()) return grpc::Status::OK;
      worker = std::move(worker_);
    }
    if (request->abort()) {
      spdlog::warn("job {} aborted: {}", request->job_id(), request->reason());
      worker->abort("job aborted by the client: " + request->reason());
    } else {
      spdlog::info("job {} finished", request->job_id());
      worker->abort("job ended");
    }
    if (options_.on_job_change) options_.on_job_change("");
    return grpc::Status::OK;
  }

 private:
  std::shared_ptr<StageWorker> current(const std::string& job_id) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (worker_ && worker_->job_id() == job_id) return worker_;
    return nullptr;
  }
  static grpc::Status no_job(const std::string& job_id) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "this node runs no job " + job_id);
  }

  NodeServiceOptions options_;
  std::mutex mutex_;
  std::mutex step_mutex_;
  std::shared_ptr<StageWorker> worker_;
};

}  // namespace

std::unique_ptr<grpc::Service> make_node_service(NodeServiceOptions options) {
  return std::make_unique<NodeServiceImpl>(std::move(options));
}

}  // namespace sn::train
