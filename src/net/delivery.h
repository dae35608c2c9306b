// The node's Transport gRPC service: routes each incoming TensorMessage by its
// job id to that job's JobTransport, which checks and files it. One per node
// process, hosted on the node's one server next to every module's service.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "net/transport.h"

namespace sn::net {

class DeliveryService final : public solvernet::v1::Transport::Service {
 public:
  // Routes TRANSPORT's job to it until the returned handle is destroyed, or
  // until another transport is added for the same job (the newest wins: a job
  // set up again replaces its transport). The service must outlive the handle.
  class Registration {
   public:
    Registration() = default;
    Registration(Registration&& other) noexcept;
    Registration& operator=(Registration&& other) noexcept;
    ~Registration();

   private:
    friend class DeliveryService;
    DeliveryService* service_ = nullptr;
    std::string job_id_;
    const JobTransport* transport_ = nullptr;
  };
  [[nodiscard]] Registration add(std::shared_ptr<JobTransport> transport);

  // Files MESSAGE with its job's transport. Errors: not_found (no such job
  // here), and those of JobTransport::deliver. Refusals are logged at warn,
  // the first 20 and then every 1000th, so a flood cannot fill the log.
  Status deliver(const solvernet::v1::TensorMessage& message);

  grpc::Status Send(grpc::ServerContext* context, const solvernet::v1::TensorMessage* request,
                    solvernet::v1::Empty* reply) override;

 private:
  void remove(const std::string& job_id, const JobTransport* transport);

  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<JobTransport>> jobs_;
  std::atomic<int64_t> refusals_{0};
};

}  // namespace sn::net
