#include "net/delivery.h"

#include <spdlog/spdlog.h>

#include "net/rpc.h"

namespace sn::net {

DeliveryService::Registration::Registration(Registration&& other) noexcept { *this = std::move(other); }

DeliveryService::Registration& DeliveryService::Registration::operator=(Registration&& other) noexcept {
  if (this != &other) {
    if (service_) service_->remove(job_id_, transport_);
    service_ = std::exchange(other.service_, nullptr);
    job_id_ = std::move(other.job_id_);
    transport_ = std::exchange(other.transport_, nullptr);
  }
  return *this;
}

DeliveryService::Registration::~Registration() {
  if (service_) service_->remove(job_id_, transport_);
}

DeliveryService::Registration DeliveryService::add(std::shared_ptr<JobTransport> transport) {
  Registration registration;
  registration.service_ = this;
  registration.job_id_ = transport->job_id();
  registration.transport_ = transport.get();
  std::lock_guard<std::mutex> lock(mutex_);
  jobs_[transport->job_id()] = std::move(transport);
  return registration;
}

void DeliveryService::remove(const std::string& job_id, const JobTransport* transport) {
  std::shared_ptr<JobTransport> released;  // destroyed outside the lock: it joins its sender threads
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(job_id);
  if (it != jobs_.end() && it->second.get() == transport) {
    released = std::move(it->second);
    jobs_.erase(it);
  }
}

Status DeliveryService::deliver(const solvernet::v1::TensorMessage& message) {
  std::shared_ptr<JobTransport> transport;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = jobs_.find(message.job_id());
    if (it != jobs_.end()) transport = it->second;
  }
  Status status = transport ? transport->deliver(message)
                            : Status(kind_error(ErrorKind::not_found, "this node runs no job {}",
                                                message.job_id().substr(0, 128)));
  if (!status.ok()) {
    const int64_t n = ++refusals_;
    if (n <= 20 || n % 1000 == 0) spdlog::warn("refused message ({} so far): {}", n, status.message());
  }
  return status;
}

grpc::Status DeliveryService::Send(grpc::ServerContext* context, const solvernet::v1::TensorMessage* request,
                                   solvernet::v1::Empty*) {
  if (auto peer = check_peer_is(*context, request->from_node_id()); !peer.ok()) return to_grpc(peer.error());
  auto status = deliver(*request);
  return status.ok() ? grpc::Status::OK : to_grpc(status.error());
}

}  // namespace sn::net
