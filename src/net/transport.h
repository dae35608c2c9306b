// Delivery between the members of a job: send and receive signed tensor
// messages by (job, tag). `Transport` is the interface that every collective
// and the pipeline are written against (like Gloo's transport::Pair); they
// never know whether, or how, a link is emulated. `JobTransport` is the one
// implementation: gRPC between nodes, paced by the link emulator, with a
// bounded inbox and replay protection over the job's whole life
// (docs/wire.md, "Delivery rules").
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
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

// Names one message within a job. from is the sender's member index.
struct Tag {
  std::string kind;
  int64_t step = 0;
  int32_t micro = 0;
  int32_t round = 0;
  int32_t chunk = 0;
  int from = 0;
  auto operator<=>(const Tag&) const = default;
};

// The order in which a job's steps run: training steps 0, 1, 2, … and then
// held-out evaluation rounds −1, −2, … (docs/wire.md). finish_step() closes
// steps in this order.
int64_t step_order(int64_t step);

// How much one sender may have accepted but not yet received at this member.
// A job sizes it from its own traffic (messages in flight per step, with a
// margin); a message that would exceed it is refused with resource_exhausted
// and not stored, so memory stays bounded whatever a member sends.
struct InboxLimits {
  int64_t bytes_per_sender = int64_t{1} << 30;
  int64_t messages_per_sender = 1 << 16;
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

// What collectives and the pipeline need from delivery. Thread-safe.
// After abort() every call fails at once with the abort's reason (kind
// aborted); an aborted transport is never usable again.
class Transport {
 public:
  virtual ~Transport() = default;
  virtual int self() const = 0;   // this member's index
  virtual int size() const = 0;   // members in the job
  // Queues MESSAGE (its tag fields set by the caller; job and sender filled
  // in) for member TO and returns at once. A delivery failure surfaces from
  // flush() and from every later send to that member.
  virtual Status send(int to, solvernet::v1::TensorMessage message, Traffic traffic) = 0;
  // Waits for the message TAG and hands it over (it is removed from the
  // inbox). Errors: timeout (naming the tag and sender), aborted.
  virtual Result<solvernet::v1::TensorMessage> receive(const Tag& tag, std::chrono::milliseconds timeout) = 0;
  // Waits until every queued message has been delivered or has failed.
  virtual Status flush(std::chrono::milliseconds timeout) = 0;
  // Fails every current and future call with REASON (the first reason wins).
  virtual void abort(const std::string& reason) = 0;
  // "node 3fa2c1 (stage 1, replica 0)", for error messages.
  virtual std::string describe(int member) const = 0;
};

class JobTransport final : public Transport {
 public:
  // TOPOLOGY may be null (links not emulated). Members are indexed as given;
  // SELF is this node's index. Region names must exist in TOPOLOGY if given.
  static Result<std::shared_ptr<JobTransport>> create(std::string job_id, const NodeKey& key,
                                                      std::vector<MemberInfo> members, int self,
                                                      const Topology* topology, EmulationScale scale,
                                                      InboxLimits limits = {});
  ~JobTransport() override;  // drops what is still queued; call flush() first to deliver it

  const std::string& job_id() const { return job_id_; }
  int self() const override { return self_; }
  int size() const override { return static_cast<int>(members_.size()); }
  const std::vector<MemberInfo>& members() const { return members_; }
  const InboxLimits& limits() const { return limits_; }
  // The emulated link to member TO (unpaced if links are not emulated).
  LinkSpec link_to(int to) const;
  bool link_emulated() const { return topology_ != nullptr; }

  Status send(int to, solvernet::v1::TensorMessage message, Traffic traffic) override;
  Status flush(std::chrono::milliseconds timeout) override;
  Result<solvernet::v1::TensorMessage> receive(const Tag& tag, std::chrono::milliseconds timeout) override;
  void abort(const std::string& reason) override;
  std::string describe(int member) const override;
  // MEMBER has left the job (a DiLoCo replica group dropped): what is queued
  // for it goes, a Send under way is cancelled, flush() no longer waits for
  // it nor reports its link's failure, and a later send() to it fails
  // (unavailable). Idempotent; there is no way back for this transport.
  void exclude(int member);

  // An incoming message (the Transport service calls this). Accepted only if
  // it is for this job (else not_found), from a member with a valid signature
  // (else permission_denied), for a step not yet finished and with a tag never
  // accepted before in this job (else permission_denied: a replay), and if it
  // fits the sender's inbox limits (else resource_exhausted). A refused
  // message leaves no trace but a counter; the error names the check.
  Status deliver(solvernet::v1::TensorMessage message);
  // This member will receive nothing more for STEP or any step before it in
  // step_order(): their unreceived messages are dropped, their replay record
  // is pruned, and later messages for them are refused.
  void finish_step(int64_t step);

  // Bytes sent since the last call, per member and traffic class.
  std::vector<LinkCounter> take_counters();
  // What the inbox holds now (for tests and logs).
  struct InboxUse {
    int64_t messages = 0;
    int64_t bytes = 0;
    int64_t replay_records = 0;  // accepted tags still remembered
    int64_t refused = 0;         // messages refused since creation
  };
  InboxUse inbox_use() const;

 private:
  JobTransport() = default;
  struct Outgoing {
    solvernet::v1::TensorMessage message;
    Clock::time_point deliver_at;
  };
  struct PeerLink {
    std::unique_ptr<LinkPacer> pacer = std::make_unique<LinkPacer>();
    std::unique_ptr<solvernet::v1::Transport::Stub> stub;
    std::deque<Outgoing> queue;
    std::optional<Error> failure;
    bool excluded = false;  // exclude(): the member has left the job
    bool busy = false;
    grpc::ClientContext* in_flight = nullptr;  // the Send under way (cancelled by abort and destruction)
    std::thread sender;
    std::map<Traffic, std::pair<int64_t, int64_t>> counters;  // bytes, messages
  };
  struct Held {
    solvernet::v1::TensorMessage message;
    int64_t bytes = 0;
  };
  struct SenderUse {
    int64_t messages = 0;
    int64_t bytes = 0;
  };
  void sender_loop(int to);
  void drop_locked(std::map<Tag, Held>::iterator it);
  Error refuse_locked(Error error);
  void cancel_in_flight_locked();

  std::string job_id_;
  const NodeKey* key_ = nullptr;
  std::vector<MemberInfo> members_;
  std::map<std::string, int> index_of_;
  int self_ = 0;
  const Topology* topology_ = nullptr;
  std::optional<Topology> topology_copy_;
  EmulationScale scale_;
  InboxLimits limits_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  bool stopping_ = false;
  std::optional<std::string> aborted_;
  std::vector<std::unique_ptr<PeerLink>> links_;
  std::map<Tag, Held> inbox_;
  std::vector<SenderUse> use_;                    // per sender
  // Every tag accepted for a step not yet finished, by step_order: a tag is
  // refused while it is here or once its step is below closed_below_.
  std::map<int64_t, std::set<Tag>> accepted_;
  int64_t replay_records_ = 0;
  int64_t closed_below_ = 0;                      // in step_order
  int64_t refused_ = 0;
};

}  // namespace sn::net
