#include "net/local_mesh.h"

#include <algorithm>
#include <chrono>
#include <ctime>

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
  auto process_cpu_seconds = [] {
    timespec t{};
    ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
  };
  // Wall time: the fastest of several, one at a time after a warm-up (the
  // least disturbed by other work). CPU time: the mean over a burst sent both
  // ways at once, as a step sends them, counting both ends and every gRPC
  // thread of this process (what other processes do is not counted).
  struct Timing {
    double fastest_wall_s = 1e9;
    double mean_cpu_s = 0;
  };
  auto time_messages = [&](size_t bytes) -> Result<Timing> {
    Timing timing;
    constexpr int kWarmUp = 2, kTimed = 8;
    auto message_of = [&](int64_t step) {
      solvernet::v1::TensorMessage message;
      message.set_kind("probe");
      message.set_step(step);
      auto* tensor = message.mutable_tensor();
      tensor->set_dtype("uint8");
      tensor->add_shape(static_cast<int64_t>(bytes));
      tensor->set_data(std::string(bytes, '\x5a'));
      return message;
    };
    for (int i = 0; i < kWarmUp + kTimed; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      SN_TRY(mesh->member(0).send(1, message_of(++sequence), Traffic::kPipeline));
      SN_TRY(mesh->member(1).receive({"probe", sequence, 0, 0, 0, 0}, std::chrono::seconds(10)));
      if (i >= kWarmUp)
        timing.fastest_wall_s =
            std::min(timing.fastest_wall_s, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    // CPU as a step spends it: a burst both ways at once.
    const double cpu_start = process_cpu_seconds();
    const int64_t first = sequence + 1;
    for (int i = 0; i < kTimed; ++i) {
      SN_TRY(mesh->member(0).send(1, message_of(++sequence), Traffic::kPipeline));
      SN_TRY(mesh->member(1).send(0, message_of(sequence), Traffic::kPipeline));
    }
    for (int64_t k = first; k <= sequence; ++k) {
      SN_TRY(mesh->member(1).receive({"probe", k, 0, 0, 0, 0}, std::chrono::seconds(10)));
      SN_TRY(mesh->member(0).receive({"probe", k, 0, 0, 0, 1}, std::chrono::seconds(10)));
    }
    timing.mean_cpu_s = (process_cpu_seconds() - cpu_start) / (2 * kTimed);
    return timing;
  };
  large_bytes = std::max(large_bytes, small_bytes + 1);
  SN_ASSIGN(Timing small, time_messages(small_bytes));
  SN_ASSIGN(Timing large, time_messages(large_bytes));
  const double extra_bytes = static_cast<double>(large_bytes - small_bytes);
  MessageCost cost;
  cost.per_byte_s = std::max(0.0, (large.fastest_wall_s - small.fastest_wall_s) / extra_bytes);
  cost.fixed_s = std::max(0.0, small.fastest_wall_s - cost.per_byte_s * static_cast<double>(small_bytes));
  cost.cpu_per_byte_s = std::max(0.0, (large.mean_cpu_s - small.mean_cpu_s) / extra_bytes);
  cost.cpu_fixed_s = std::max(0.0, small.mean_cpu_s - cost.cpu_per_byte_s * static_cast<double>(small_bytes));
  return cost;
}

}  // namespace sn::net
