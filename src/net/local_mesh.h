// N job members in one process, each with its own gRPC server on 127.0.0.1
// and its own JobTransport: the real transport, for benchmarks and tests that
// do not need separate processes.
#pragma once

#include <atomic>
#include <memory>
#include <vector>

#include "net/delivery.h"
#include "net/rpc.h"
#include "net/transport.h"

namespace sn::net {

class LocalMesh {
 public:
  // REGIONS[i] is member i's region in TOPOLOGY (null: links not emulated).
  // The job id is "mesh"; every member's inbox has LIMITS.
  static Result<std::unique_ptr<LocalMesh>> create(const std::vector<std::string>& regions,
                                                   const Topology* topology, EmulationScale scale = {},
                                                   InboxLimits limits = {});
  ~LocalMesh();

  size_t size() const { return transports_.size(); }
  JobTransport& member(size_t i) { return *transports_.at(i); }
  const NodeKey& key(size_t i) const { return *keys_.at(i); }
  // Member I's gRPC port (its Transport service).
  int port(size_t i) const { return servers_.at(i).port; }
  // Stops member I's server, as if its process died.
  void kill(size_t i);

 private:
  std::vector<std::unique_ptr<NodeKey>> keys_;
  std::vector<std::unique_ptr<DeliveryService>> services_;
  std::vector<RunningServer> servers_;
  std::vector<std::shared_ptr<JobTransport>> transports_;
  std::vector<DeliveryService::Registration> registrations_;
};

// What one message costs the hosts themselves, beyond any link: serialize,
// sign, gRPC over loopback, verify, file. Fitted as fixed + bytes · per_byte
// from messages of two sizes sent through a two-member LocalMesh.
// Also the CPU the hosts spend on it, both ends together (process CPU time, a
// mean): on one host shared by many nodes, that and not the latency is what
// the nodes take from one another.
struct MessageCost {
  double fixed_s = 0;        // wall: from send to delivered, the fastest seen
  double per_byte_s = 0;
  double cpu_fixed_s = 0;    // CPU: sender, receiver and their gRPC threads
  double cpu_per_byte_s = 0;
};
Result<MessageCost> measure_message_cost(size_t small_bytes, size_t large_bytes);

}  // namespace sn::net
