// The one transport of a job: signed tensor messages between the members of a
// job, over gRPC, paced by the link emulator. Pipeline and all-reduce code use
// only send / receive and never know whether (or how) a link is emulated.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/hash.h"
#include "core/keys.h"
#include "core/result.h"
#include "net/link.h"
#include "net/topology.h"
#include "proto/solvernet.grpc.pb.h"

namespace sn::net {

struct MemberInfo {
  std::string node_id;
  PublicKey public_key{};
  std::string address;
  std::string region;
  int stage = 0;
  int replica = 0;
};

enum class Traffic { kPipeline = 0, kDataParallel = 1 };
const char* traffic_name(Traffic traffic);

// Identifies one expected message. from is the sender's member index.
struct MessageKey {
  std::string kind;
  int64_t step = 0;
  int32_t micro = 0;
  int32_t round = 0;
  int32_t chunk = 0;
  int from = 0;
  auto operator<=>(const MessageKey&) const = default;
};

struct LinkCounter {
  int to = 0;                 // member index
  std::string link_class;     // "intra" or "inter" region
  Traffic traffic = Traffic::kPipeline;
  int64_t bytes = 0;
  int64_t messages = 0;
};

// The hash that a TensorMessage's signature covers (docs/wire.md).
Hash256 tensor_message_digest(const solvernet::v1::TensorMessage& message);

class JobTransport {
 public:
  // TOPOLOGY may be null (links not emulated). Members are indexed as given;
  // SELF is this node's index. Region names must exist in TOPOLOGY if given.
  static Result<std::unique_ptr<JobTransport>> create(std::string job_id, const NodeKey& key,
                                                      std::vector<MemberInfo> members, int self,
                                                      const Topology* topology,
                                                      EmulationScale scale);
  ~JobTransport();

  int self() const { return self_; }
  const std::vector<MemberInfo>& members() const { return members_; }
  // The emulated link to member TO (unpaced if links are not emulated).
  LinkSpec link_to(int to) const;
  bool link_emulated() const { return topology_ != nullptr; }

  // Signs MESSAGE (job id and sender are filled in) and queues it for member
  // TO; returns at once. A delivery failure surfaces from flush() and from
  // every later send to that member.
  Status send(int to, solvernet::v1::TensorMessage message, Traffic traffic);
  // Waits until every queued message has been delivered or failed.
  Status flush(std::chrono::milliseconds timeout);

  // For the gRPC Send handler: checks the sender is a member and the signature
  // is valid, then files the message. Errors name the problem.
  Status deliver(solvernet::v1::TensorMessage message);
  // Waits for the message KEY; error on timeout or abort.
  Result<solvernet::v1::TensorMessage> receive(const MessageKey& key,
                                               std::chrono::milliseconds timeout);
  // Fails every current and future receive/send with REASON.
  void abort(const std::string& reason);

  // Bytes sent since the last call, per member and traffic class.
  std::vector<LinkCounter> take_counters();
  std::string describe(int member) const;  // "node 3fa2c1 (stage 1, replica 0)"

 private:
  JobTransport() = default;
  struct Outgoing {
    solvernet::v1::TensorMessage message;
    Clock::time_point deliver_at;
  };
  struct PeerLink {
    std::unique_ptr<LinkPacer> pacer = std::make_unique<LinkPacer>();
    std::unique_ptr<solvernet::v1::Node::Stub> stub;
    std::deque<Outgoing> queue;
    std::optional<Error> failure;
    bool busy = false;
    std::thread sender;
    std::map<Traffic, std::pair<int64_t, int64_t>> counters;  // bytes, messages
  };
  void sender_loop(int to);

  std::string job_id_;
  const NodeKey* key_ = nullptr;
  std::vector<MemberInfo> members_;
  std::map<std::string, int> index_of_;
  int self_ = 0;
  const Topology* topology_ = nullptr;
  std::optional<Topology> topology_copy_;
  EmulationScale scale_;

  std::mutex mutex_;
  std::condition_variable changed_;
  bool stopping_ = false;
  std::optional<std::string> aborted_;
  std::vector<std::unique_ptr<PeerLink>> links_;
  std::map<MessageKey, solvernet::v1::TensorMessage> inbox_;
};

}  // namespace sn::net
