// Private to sn_train: the client's connection to the members of one job.
// It signs every control request with the client's key, runs a call on every
// member at once under a deadline, pings every member while a call runs (so a
// frozen node is told apart from the peers that time out waiting for it),
// cancels outstanding calls when one fails, renews the job's leases in the
// background, and names the member whose failure ended the call.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/keys.h"
#include "core/result.h"
#include "net/control.h"
#include "net/transport.h"
#include "proto/solvernet.grpc.pb.h"

namespace sn::train {

struct FleetTimeouts {
  std::chrono::milliseconds ping{2000};       // one ping outside a call (recovery, spares)
  std::chrono::milliseconds liveness{5000};   // no answer to pings for this long during a call: the member stopped responding
  std::chrono::milliseconds end{3000};        // EndJob and RenewLease
};

// The timeouts of a job whose nodes wait PEER_TIMEOUT for a peer, over links
// whose slowest measured RTT is RTT_MS: liveness is half the peer timeout (a
// frozen member is named before its peers give up waiting for it), within
// 2..15 s, and never under 8 RTTs.
FleetTimeouts fleet_timeouts(std::chrono::milliseconds peer_timeout, double rtt_ms);

// "node 3fa2c1d0 (stage 1, replica 0) at 127.0.0.1:7001"
std::string member_name(const net::MemberInfo& member);

// Whether NODE answers a Ping within TIMEOUT with its own node id.
bool answers_ping(const net::MemberInfo& node, std::chrono::milliseconds timeout);
// Whether NODE answers within TIMEOUT with its own signed announcement
// (GetInfo, over a channel that checks its node id) and holds no job.
bool answers_idle(const net::MemberInfo& node, std::chrono::milliseconds timeout);

class Fleet {
 public:
  using Call = std::function<grpc::Status(size_t member, grpc::ClientContext& context)>;

  // MEMBERS and CANCEL (may be null; set by a signal handler) must outlive the fleet.
  Fleet(const std::vector<net::MemberInfo>& members, std::string job_id, const NodeKey& client_key,
        FleetTimeouts timeouts, const std::atomic<bool>* cancel);
  ~Fleet();  // stops lease renewal; does not end the job (see JobSession)

  const std::string& job_id() const { return job_id_; }
  solvernet::v1::Train::Stub& stub(size_t member) { return *train_stubs_[member]; }
  net::ControlSigner& signer() { return signer_; }

  // Runs CALL on every member in parallel, each with DEADLINE from now. While
  // the calls run, every member is pinged every liveness / 4 (each ping may
  // take the whole liveness to answer); a member with no answer for
  // timeouts.liveness since its last one (or since the call began) ends the
  // call, named as having stopped responding, within liveness + 0.25 s of
  // that answer. On the first failure (or a user interrupt) the other calls
  // are cancelled and the job is aborted on every member, so no node waits
  // for a peer that will never answer. The error names the member at fault
  // and what the client makes of it; its kind says whether retrying
  // elsewhere may help (unavailable, timeout, resource_exhausted), the node
  // misbehaved (bad_peer) or the input is wrong.
  // A client that did not run itself for a while (SIGSTOP, a suspended
  // machine) blames nobody for the silence: every member's window starts
  // again when it wakes, and a call that then fails by a deadline, a
  // cancellation or a job its node dropped names no member (kind timeout, so
  // a recovery pings every member before replacing any); one that did not run
  // for longer than the lease ends the job (pause_explains: kind aborted).
  Status run_all(const std::string& what, std::chrono::milliseconds deadline, const Call& call);
  // Runs CALL on one member, retrying once if it was unavailable or timed out.
  Status run_one(size_t member, const std::string& what, std::chrono::milliseconds deadline, const Call& call);

  // Recovery: the members that answer no Ping within TIMEOUT, ATTEMPTS times,
  // with their own node id (dead, frozen, or another process on their port).
  // AMONG: the members pinged (indices; empty: every member), in parallel.
  std::vector<size_t> unresponsive(std::chrono::milliseconds timeout, const std::vector<size_t>& among = {},
                                   int attempts = 2);

  // Renews every member's lease every LEASE / 3 until the fleet ends. Called
  // again (from any thread) with a shorter LEASE, renews at that from then
  // on; a longer one changes nothing. Call it as each member grants its lease.
  void start_lease_renewal(std::chrono::milliseconds lease);
  // Whether the client itself did not run (SIGSTOP, a suspended machine) for
  // longer than the members' lease since renewal began: no renewal went out
  // for a lease (measured on the steady and the wall clock, the larger), so
  // every member has dropped the job and a failure is no member's fault. The
  // error to end with then (kind aborted, naming that gap and the lease,
  // during WHAT), or none.
  std::optional<Error> pause_explains(const std::string& what) const;
  // The node id of the member the last run_all or run_one blamed (empty:
  // it succeeded, or blamed none), and the cause that member gave, typed
  // (FailureCause in its status's details: LOCAL_DATA, DISK_FULL; else
  // CAUSE_UNSPECIFIED). A recovery replaces such a member although it
  // answers pings; what its message says decides nothing.
  const std::string& last_culprit() const { return last_culprit_; }
  solvernet::v1::FailureCause::Cause last_cause() const { return last_cause_; }
  // MEMBERS (indices) leave the job while the others go on (a dropped DiLoCo
  // group): their leases are no longer renewed, so each node drops the job
  // within one lease of its last renewal even if it hears nothing more, and
  // EndJob (abort, REASON) is sent to each in the background, again every
  // 0.5 s after a call that found no answer (unreachable, deadline of
  // timeouts.end), until the node answers, a lease has passed since this
  // call, or the fleet ends. Returns at once. A member frozen when its group
  // was dropped thus becomes idle as soon as it runs again.
  void release(const std::vector<size_t>& members, const std::string& reason);
  // The node ids of released members whose EndJob has not been answered yet
  // (still retried): not to be taken back into the job until they answer.
  std::set<std::string> still_ending() const;
  // EndJob on every member (abort with REASON, or a normal end); best effort,
  // each call bounded by timeouts.end, or 0.2 s for a member SILENT[i] (it
  // stopped answering: its lease runs out instead). A released member that
  // answered its own EndJob is skipped; one that has not yet gets 0.2 s, as a
  // silent one. Idempotent once it has run.
  void end_all(bool abort, const std::string& reason, const std::vector<bool>& silent = {});
  bool ended() const { return ended_; }

 private:
  Error blame(const std::string& what, const std::vector<grpc::Status>& statuses, const std::vector<bool>& silent);
  // This job's EndJob, unsigned (each attempt signs it afresh).
  solvernet::v1::EndJobRequest end_request(bool abort, const std::string& reason) const;
  void forget_culprit();  // a call begins: no culprit yet
  std::string last_culprit_;  // node id blame() named last
  solvernet::v1::FailureCause::Cause last_cause_ = solvernet::v1::FailureCause::CAUSE_UNSPECIFIED;
  void renew_loop();
  // Since the last renewal round began (renew_mutex_ held).
  std::chrono::milliseconds round_gap() const;
  void end_in_background(size_t member, net::MemberInfo who, std::string reason);
  // Tells lease renewal and the background EndJobs to stop, cancelling the
  // EndJobs in flight; join_background waits for them.
  void stop_background();
  void join_background();

  const std::vector<net::MemberInfo>& members_;
  std::string job_id_;
  net::ControlSigner signer_;
  FleetTimeouts timeouts_;
  const std::atomic<bool>* cancel_;
  std::vector<std::unique_ptr<solvernet::v1::Train::Stub>> train_stubs_;
  std::vector<std::unique_ptr<solvernet::v1::Node::Stub>> node_stubs_;
  std::atomic<bool> ended_{false};

  // Guards the lease renewal and the background EndJobs below.
  mutable std::mutex renew_mutex_;
  std::condition_variable renew_wake_;
  bool renew_stop_ = false;
  std::thread renewer_;
  std::chrono::milliseconds lease_{30000};
  bool renewing_ = false;
  bool lease_shortened_ = false;  // start_lease_renewal got a shorter lease: the renewer re-times its rounds
  // The last renewal round's start, and the longest gap between two round
  // starts so far (a round is due every lease / 3).
  std::chrono::steady_clock::time_point round_steady_;
  std::chrono::system_clock::time_point round_system_;
  std::chrono::milliseconds longest_round_gap_{0};
  std::vector<char> released_;                          // per member: left the job (release)
  std::map<size_t, std::string> ending_;                // released, EndJob not answered yet: node id
  std::map<size_t, grpc::ClientContext*> ending_call_;  // the background EndJob in flight, per member
  std::vector<std::thread> enders_;
};

}  // namespace sn::train
