#include "net/local_mesh.h"

#include <algorithm>
#include <chrono>

namespace sn::net {

Result<std::unique_ptr<LocalMesh>> LocalMesh::create(const std::vector<std::string>& regions,
                                                     const Topology* topology, EmulationScale scale,
                                                     InboxLimits limits) {
  std::unique_ptr<LocalMesh> mesh(new LocalMesh());
  std::vector<MemberInfo> members;
  for (size_t i = 0; i < regions.size(); ++i) {
    mesh->keys_.push_back(std::make_unique<NodeKey>(NodeKey::generate()));
    mesh->services_.push_back(std::make_unique<DeliveryService>());
    SN_ASSIGN(auto server, start_server("127.0.0.1:0", mesh->services_.back().get(), *mesh->keys_.back()));
    MemberInfo m;
    m.node_id = mesh->keys_.back()->node_id();
    m.public_key = mesh->keys_.back()->public_key();
    m.address = "127.0.0.1:" + std::to_string(server.port);
    m.region = regions[i];
    m.stage = 0;
    m.replica = static_cast<int>(i);
    members.push_back(m);
    mesh->servers_.push_back(std::move(server));
  }
  for (size_t i = 0; i < regions.size(); ++i) {
    SN_ASSIGN(auto transport,
              JobTransport::create("mesh", *mesh->keys_[i], members, static_cast<int>(i), topology, scale, limits));
    mesh->registrations_.push_back(mesh->services_[i]->add(transport));
    mesh->transports_.push_back(std::move(transport));
  }
  return mesh;
}

void LocalMesh::kill(size_t i) {
  registrations_.at(i) = DeliveryService::Registration();
  if (servers_.at(i).server) servers_[i].server->Shutdown(std::chrono::system_clock::now());
}

LocalMesh::~LocalMesh() {
  for (auto& t : transports_) t->abort("mesh shut down");
  for (auto& s : servers_)
    if (s.server) s.server->Shutdown(std::chrono::system_clock::now());
  registrations_.clear();
  transports_.clear();
}

Result<MessageCost> measure_message_cost(size_t small_bytes, size_t large_bytes) {
  SN_ASSIGN(auto mesh, LocalMesh::create({"", ""}, nullptr));
  int64_t sequence = 0;
  // Fastest of several, after a warm-up: the least disturbed by other work.
  auto fastest = [&](size_t bytes) -> Result<double> {
    double best = 1e9;
    for (int i = 0; i < 8; ++i) {
      solvernet::v1::TensorMessage message;
      message.set_kind("probe");
      message.set_step(++sequence);
      auto* tensor = message.mutable_tensor();
      tensor->set_dtype("uint8");
      tensor->add_shape(static_cast<int64_t>(bytes));
      tensor->set_data(std::string(bytes, '\x5a'));
      auto t0 = std::chrono::steady_clock::now();
      SN_TRY(mesh->member(0).send(1, std::move(message), Traffic::kPipeline));
      SN_TRY(mesh->member(1).receive({"probe", sequence, 0, 0, 0, 0}, std::chrono::seconds(10)));
      if (i >= 2) best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  large_bytes = std::max(large_bytes, small_bytes + 1);
  SN_ASSIGN(double small, fastest(small_bytes));
  SN_ASSIGN(double large, fastest(large_bytes));
  MessageCost cost;
  cost.per_byte_s = std::max(0.0, (large - small) / static_cast<double>(large_bytes - small_bytes));
  cost.fixed_s = std::max(0.0, small - cost.per_byte_s * static_cast<double>(small_bytes));
  return cost;
}

}  // namespace sn::net
