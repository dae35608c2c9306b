#include "train/fleet.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "net/announce.h"
#include "net/failure_cause.h"
#include "net/rpc.h"
#include "train/control.h"

namespace sn::train {
namespace {

using Steady = std::chrono::steady_clock;

double seconds_of(Steady::duration d) { return std::chrono::duration<double>(d).count(); }

// Which failure explains a call best: a member that stopped answering or broke
// the protocol is the cause; one that could not be reached comes next; a
// member whose call was cancelled or aborted because a peer failed, last.
int rank_of(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::DATA_LOSS: return 0;
    case grpc::StatusCode::UNAVAILABLE: return 1;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return 2;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::NOT_FOUND: return 3;
    case grpc::StatusCode::ABORTED: return 5;
    case grpc::StatusCode::CANCELLED: return 6;
    default: return 4;
  }
}

// Whether a client that did not run for a while explains every failure of a
// call: deadlines that ran out and calls cancelled while it was stopped, and
// jobs its nodes dropped when their leases ran out meanwhile. A refused or
// unreachable member, or one silent for a whole window after the client woke,
// is still to blame.
bool suspension_explains(const std::vector<grpc::Status>& statuses, const std::vector<bool>& silent) {
  if (std::find(silent.begin(), silent.end(), true) != silent.end()) return false;
  for (size_t i = 0; i < statuses.size(); ++i) {
    switch (statuses[i].error_code()) {
      case grpc::StatusCode::OK:
      case grpc::StatusCode::DEADLINE_EXCEEDED:
      case grpc::StatusCode::CANCELLED:
      case grpc::StatusCode::ABORTED:
      case grpc::StatusCode::NOT_FOUND: break;
      default: return false;
    }
  }
  return true;
}

// Whether a node refused the call as a request of a client whose job a
// takeover by its key ended (NodeRuntime::taken_over).
bool taken_over(const grpc::Status& status) {
  solvernet::v1::Refusal refusal;
  return status.error_code() == grpc::StatusCode::PERMISSION_DENIED &&
         refusal.ParseFromString(status.error_details()) && refusal.cause() == solvernet::v1::Refusal::TAKEN_OVER;
}

// Whether NODE answers CALL (a Node-service call on the stub, with the
// context) within TIMEOUT, over a channel of its own that checks its node id:
// a shared one in reconnect backoff would miss a node restarted at its
// address just now.
bool node_answers(const net::MemberInfo& node, std::chrono::milliseconds timeout,
                  const std::function<grpc::Status(solvernet::v1::Node::Stub&, grpc::ClientContext&)>& call) {
  auto stub = solvernet::v1::Node::NewStub(net::make_channel(node.address, node.node_id));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  return call(*stub, context).ok();
}

}  // namespace

FleetTimeouts fleet_timeouts(std::chrono::milliseconds peer_timeout, double rtt_ms) {
  FleetTimeouts t;
  const auto rtt = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(std::max(0.0, rtt_ms))));
  t.liveness = std::max<std::chrono::milliseconds>(
      std::clamp<std::chrono::milliseconds>(peer_timeout / 2, std::chrono::seconds(2), std::chrono::seconds(15)), 8 * rtt);
  return t;
}

std::string member_name(const net::MemberInfo& m) {
  return fmt::format("node {} (stage {}, replica {}) at {}", m.node_id.substr(0, 8), m.stage, m.replica, m.address);
}

bool answers_ping(const net::MemberInfo& node, std::chrono::milliseconds timeout) {
  solvernet::v1::PingReply reply;
  return node_answers(node, timeout,
                      [&](auto& stub, auto& context) { return stub.Ping(&context, solvernet::v1::PingRequest{}, &reply); }) &&
         reply.node_id() == node.node_id;
}

bool answers_idle(const net::MemberInfo& node, std::chrono::milliseconds timeout) {
  solvernet::v1::SignedNodeInfo reply;
  if (!node_answers(node, timeout,
                    [&](auto& stub, auto& context) { return stub.GetInfo(&context, solvernet::v1::Empty{}, &reply); }))
    return false;
  auto info = net::verify_node_info(reply);
  // Withdrawn: the node takes no jobs now (its disk is full).
  return info.ok() && info->node_id() == node.node_id && !info->withdrawn() && info->busy_job_id().empty();
}

Fleet::Fleet(const std::vector<net::MemberInfo>& members, std::string job_id, const NodeKey& client_key,
             FleetTimeouts timeouts, const std::atomic<bool>* cancel)
    : members_(members), job_id_(std::move(job_id)), signer_(client_key), timeouts_(timeouts), cancel_(cancel) {
  for (const auto& m : members_) {
    auto channel = net::make_channel(m.address, m.node_id);
    train_stubs_.push_back(solvernet::v1::Train::NewStub(channel));
    node_stubs_.push_back(solvernet::v1::Node::NewStub(channel));
  }
  released_.assign(members_.size(), 0);
}

Fleet::~Fleet() {
  stop_background();
  join_background();
}

void Fleet::stop_background() {
  {
    std::lock_guard<std::mutex> lock(renew_mutex_);
    // The gap still open counts once renewal stops (pause_explains).
    if (renewing_ && !renew_stop_) longest_round_gap_ = std::max(longest_round_gap_, round_gap());
    renew_stop_ = true;
    // A frozen member's EndJob would hold its thread until its deadline.
    for (auto& [member, context] : ending_call_) context->TryCancel();
  }
  renew_wake_.notify_all();
}

void Fleet::join_background() {
  if (renewer_.joinable()) renewer_.join();
  for (auto& t : enders_) t.join();
  enders_.clear();
}

Status Fleet::run_all(const std::string& what, std::chrono::milliseconds deadline, const Call& call) {
  forget_culprit();
  const size_t n = members_.size();
  const auto liveness = timeouts_.liveness;
  const auto ping_every = std::max<std::chrono::milliseconds>(liveness / 4, std::chrono::milliseconds(100));
  // A look at the members is due every 0.2 s; one this much later means the
  // client itself did not run (suspended), not that the members fell silent.
  const auto client_stalled = std::max<Steady::duration>(liveness / 2, std::chrono::seconds(1));
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<grpc::Status> statuses(n);
  std::vector<bool> done(n, false);
  std::vector<Steady::time_point> last_answer(n, Steady::now());
  std::vector<grpc::ClientContext*> pinging(n, nullptr);  // each member's ping in flight, cancelled at the end
  bool finished = false;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  for (size_t i = 0; i < n; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(std::chrono::system_clock::now() + deadline);
  }
  std::vector<std::thread> threads;
  for (size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      grpc::Status status = call(i, *contexts[i]);
      std::lock_guard<std::mutex> lock(mutex);
      statuses[i] = status;
      done[i] = true;
      changed.notify_all();
    });
  // Liveness: ping each member whose call is still running, every ping_every.
  // A ping may take the whole liveness window: a slow answer still counts.
  std::vector<std::thread> pingers;
  for (size_t i = 0; i < n; ++i)
    pingers.emplace_back([&, i] {
      std::unique_lock<std::mutex> lock(mutex);
      while (!finished && !done[i]) {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + liveness);
        pinging[i] = &context;
        lock.unlock();
        solvernet::v1::PingRequest request;
        solvernet::v1::PingReply reply;
        grpc::Status status = node_stubs_[i]->Ping(&context, request, &reply);
        lock.lock();
        pinging[i] = nullptr;
        if (status.ok()) last_answer[i] = Steady::now();
        changed.wait_for(lock, ping_every, [&] { return finished || done[i]; });
      }
    });

  std::vector<bool> silent(n, false);
  std::string abort_reason;
  Steady::duration client_gap{0};
  {
    std::unique_lock<std::mutex> lock(mutex);
    auto last_look = Steady::now();
    while (true) {
      const auto now = Steady::now();
      if (now - last_look > client_stalled) {
        client_gap = std::max(client_gap, now - last_look);
        spdlog::warn("the client did not run for {:.1f} s during {}; every member gets {:.0f} s to answer a ping again",
                     seconds_of(now - last_look), what, seconds_of(liveness));
        std::fill(last_answer.begin(), last_answer.end(), now);
      }
      last_look = now;
      bool all_done = true, any_failed = false;
      for (size_t i = 0; i < n; ++i) {
        all_done = all_done && done[i];
        any_failed = any_failed || (done[i] && !statuses[i].ok());
        if (!done[i] && now - last_answer[i] > liveness) silent[i] = true;
      }
      if (all_done) break;
      bool any_silent = std::find(silent.begin(), silent.end(), true) != silent.end();
      bool interrupted = cancel_ && cancel_->load();
      if (any_failed || any_silent || interrupted) {
        abort_reason = interrupted ? "interrupted by the user" : "a member failed during " + what;
        // Cancel what is still outstanding; the threads then return at once.
        for (size_t i = 0; i < n; ++i)
          if (!done[i]) contexts[i]->TryCancel();
        changed.wait(lock, [&] { return std::all_of(done.begin(), done.end(), [](bool d) { return d; }); });
        if (interrupted) abort_reason = "interrupted by the user";
        break;
      }
      changed.wait_for(lock, std::chrono::milliseconds(200));
    }
    finished = true;
    // A frozen member's ping would hold its pinger (and the error) until its deadline.
    for (auto* context : pinging)
      if (context) context->TryCancel();
    // Every call may have ended (some failing) between two looks.
    if (abort_reason.empty() && std::any_of(statuses.begin(), statuses.end(), [](const grpc::Status& s) { return !s.ok(); }))
      abort_reason = "a member failed during " + what;
    // A member whose own call was cancelled while it had not answered pings
    // for half the liveness window (two pings missed) is the one that froze,
    // even if the window had not run out.
    for (size_t i = 0; i < n; ++i)
      if (statuses[i].error_code() == grpc::StatusCode::CANCELLED && Steady::now() - last_answer[i] > liveness / 2)
        silent[i] = true;
  }
  changed.notify_all();
  for (auto& t : threads) t.join();
  for (auto& t : pingers) t.join();
  if (abort_reason.empty()) return ok_status();
  const auto paused = pause_explains(what);
  const bool taken = std::any_of(statuses.begin(), statuses.end(), taken_over);
  Error error = abort_reason == "interrupted by the user" ? kind_error(ErrorKind::aborted, "interrupted during {}", what)
                : taken                                  ? blame(what, statuses, silent)
                : paused                                 ? *paused
                : client_gap.count() > 0 && suspension_explains(statuses, silent)
                    ? kind_error(ErrorKind::timeout,
                                 "the client itself did not run for {:.1f} s during {} (suspended?); no member is "
                                 "blamed, every member is checked again",
                                 seconds_of(client_gap), what)
                    : blame(what, statuses, silent);
  end_all(true, error.message, silent);
  return error;
}

void Fleet::forget_culprit() {
  last_culprit_.clear();
  last_cause_ = solvernet::v1::FailureCause::CAUSE_UNSPECIFIED;
}

Error Fleet::blame(const std::string& what, const std::vector<grpc::Status>& statuses,
                   const std::vector<bool>& silent) {
  // A member that found the training blown up (a loss, activation or gradient
  // not finite or out of range) is not at fault, nor are the peers aborted
  // after it: the job's hyper-parameters are.
  for (size_t i = 0; i < members_.size(); ++i)
    if (net::error_kind_of(statuses[i].error_code()) == ErrorKind::diverged)
      return kind_error(ErrorKind::diverged, "the job diverged during {} (stage {}: {})", what, members_[i].stage,
                        statuses[i].error_message());
  // The job is this key's, and another client of it took it over (a resume
  // run while this client was stopped, or of a copy of its job dir).
  if (std::any_of(statuses.begin(), statuses.end(), taken_over))
    return kind_error(ErrorKind::aborted,
                      "another client with this client's key took job {} over during {} (a `train --resume` of its "
                      "job dir while this client did not renew its lease); this client stops, no node is at fault",
                      job_id_, what);
  for (size_t i = 0; i < members_.size(); ++i)
    if (silent[i])
      return kind_error(ErrorKind::timeout,
                        "{} stopped responding during {} (no answer to pings for {:.0f} s); the job needs another "
                        "node in its place",
                        member_name(members_[i]), what, seconds_of(timeouts_.liveness));
  // A member whose own disk is full cannot go on (its checkpoints are what a
  // recovery restores from), nor is it otherwise at fault; the peers aborted
  // after it are not at all. Kind unavailable: it is replaced like a dead one.
  for (size_t i = 0; i < members_.size(); ++i)
    if (net::failure_cause_of(statuses[i]) == solvernet::v1::FailureCause::DISK_FULL) {
      last_culprit_ = members_[i].node_id;
      last_cause_ = solvernet::v1::FailureCause::DISK_FULL;
      return kind_error(ErrorKind::unavailable, "{} ran out of disk during {} ({}); the job needs another node in its place",
                        member_name(members_[i]), what, statuses[i].error_message());
    }
  int culprit = -1;
  for (size_t i = 0; i < members_.size(); ++i)
    if (!statuses[i].ok() && (culprit < 0 || rank_of(statuses[i].error_code()) <
                                                 rank_of(statuses[static_cast<size_t>(culprit)].error_code())))
      culprit = static_cast<int>(i);
  if (culprit < 0) return make_error("{} failed with no member to blame", what);
  const auto& status = statuses[static_cast<size_t>(culprit)];
  const auto& member = members_[static_cast<size_t>(culprit)];
  last_culprit_ = member.node_id;
  last_cause_ = net::failure_cause_of(status);
  const ErrorKind kind = net::error_kind_of(status.error_code());
  switch (kind) {
    case ErrorKind::unavailable:
      return kind_error(kind, "{} failed during {}: node unreachable ({}); the job needs another node in its place",
                        member_name(member), what, status.error_message());
    case ErrorKind::timeout:
      return kind_error(kind, "{} failed during {}: no answer before the deadline; the job needs another node in its place",
                        member_name(member), what);
    case ErrorKind::bad_peer:
      return kind_error(kind, "{} misbehaved during {}: {}", member_name(member), what, status.error_message());
    case ErrorKind::resource_exhausted:
    case ErrorKind::permission_denied:
      return kind_error(kind, "{} refused {}: {}", member_name(member), what, status.error_message());
    default:
      return Error{fmt::format("{} failed during {}: {}", member_name(member), what, status.error_message()), 1, kind};
  }
}

Status Fleet::run_one(size_t member, const std::string& what, std::chrono::milliseconds deadline, const Call& call) {
  forget_culprit();
  grpc::Status status;
  for (int attempt = 0; attempt < 2; ++attempt) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + deadline);
    status = call(member, context);
    const auto code = status.error_code();
    if (status.ok() || (code != grpc::StatusCode::UNAVAILABLE && code != grpc::StatusCode::DEADLINE_EXCEEDED)) break;
    spdlog::info("{}: {} failed ({}), retrying once", member_name(members_[member]), what, status.error_message());
  }
  if (status.ok()) return ok_status();
  std::vector<grpc::Status> statuses(members_.size());
  statuses[member] = status;
  return blame(what, statuses, std::vector<bool>(members_.size(), false));
}

std::vector<size_t> Fleet::unresponsive(std::chrono::milliseconds timeout, const std::vector<size_t>& among,
                                        int attempts) {
  std::vector<size_t> pinged = among;
  if (among.empty())
    for (size_t i = 0; i < members_.size(); ++i) pinged.push_back(i);
  std::vector<char> alive(members_.size(), 0);
  for (int attempt = 0; attempt < attempts; ++attempt) {
    std::vector<std::thread> threads;
    for (size_t i : pinged)
      if (!alive[i])
        threads.emplace_back([&, i] {
          grpc::ClientContext context;
          context.set_deadline(std::chrono::system_clock::now() + timeout);
          solvernet::v1::PingRequest request;
          solvernet::v1::PingReply reply;
          grpc::Status status = node_stubs_[i]->Ping(&context, request, &reply);
          alive[i] = status.ok() && reply.node_id() == members_[i].node_id;
        });
    for (auto& t : threads) t.join();
  }
  std::vector<size_t> out;
  for (size_t i : pinged)
    if (!alive[i]) out.push_back(i);
  return out;
}

void Fleet::start_lease_renewal(std::chrono::milliseconds lease) {
  std::lock_guard<std::mutex> lock(renew_mutex_);
  if (renewer_.joinable()) {
    // A member set up later (a spare, a rejoined group) may have granted a
    // shorter lease than the first ones: from now on renew at the shortest.
    if (lease < lease_) {
      lease_ = lease;
      lease_shortened_ = true;
      renew_wake_.notify_all();
    }
    return;
  }
  lease_ = lease;
  renewing_ = true;
  round_steady_ = Steady::now();
  round_system_ = std::chrono::system_clock::now();
  renewer_ = std::thread([this] { renew_loop(); });
}

void Fleet::renew_loop() {
  std::unique_lock<std::mutex> lock(renew_mutex_);
  auto period = [&] { return std::max<std::chrono::milliseconds>(std::chrono::milliseconds(200), lease_ / 3); };
  // Rounds start every period from the previous round's start, not a period
  // after it ended: a frozen member holds its renewal for a whole period, and
  // waiting a period more after it would stretch every other member's
  // renewals to 2 × lease / 3, close enough to the lease to lose it under load.
  auto next_round = std::chrono::steady_clock::now() + period();
  while (true) {
    renew_wake_.wait_until(lock, next_round, [&] { return renew_stop_ || lease_shortened_; });
    if (renew_stop_) break;
    if (lease_shortened_) {
      lease_shortened_ = false;
      next_round = std::min(next_round, round_steady_ + period());
      if (std::chrono::steady_clock::now() < next_round) continue;
    }
    const auto this_period = period();
    next_round = std::chrono::steady_clock::now() + this_period;
    longest_round_gap_ = std::max(longest_round_gap_, round_gap());
    round_steady_ = Steady::now();
    round_system_ = std::chrono::system_clock::now();
    // A released member's lease is left to run out: renewing it would keep
    // the node holding a job that no longer calls on it (never idle again).
    std::vector<size_t> renewed;
    for (size_t i = 0; i < members_.size(); ++i)
      if (!released_[i]) renewed.push_back(i);
    lock.unlock();
    std::vector<std::thread> threads;
    for (size_t i : renewed)
      threads.emplace_back([&, i] {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::min(this_period, timeouts_.end));
        solvernet::v1::RenewLeaseRequest request;
        request.set_job_id(job_id_);
        sign_request(signer_, "RenewLease", request);
        solvernet::v1::RenewLeaseReply reply;
        grpc::Status status = train_stubs_[i]->RenewLease(&context, request, &reply);
        if (!status.ok())
          spdlog::debug("{}: lease renewal failed: {}", member_name(members_[i]), status.error_message());
      });
    for (auto& t : threads) t.join();
    lock.lock();
  }
}

std::chrono::milliseconds Fleet::round_gap() const {
  using std::chrono::duration_cast;
  using std::chrono::milliseconds;
  // A suspended machine stops the steady clock but not the nodes' clocks: the
  // wall clock sees that gap; a SIGSTOP shows on both.
  return std::max(duration_cast<milliseconds>(Steady::now() - round_steady_),
                  duration_cast<milliseconds>(std::chrono::system_clock::now() - round_system_));
}

std::optional<Error> Fleet::pause_explains(const std::string& what) const {
  std::lock_guard<std::mutex> lock(renew_mutex_);
  if (!renewing_) return std::nullopt;
  // The renewer may not have run yet since the client woke: the gap still open counts.
  const auto gap = renew_stop_ ? longest_round_gap_ : std::max(longest_round_gap_, round_gap());
  if (gap <= lease_) return std::nullopt;
  return kind_error(ErrorKind::aborted,
                    "the client itself did not run for {:.1f} s (stopped or suspended?), longer than the nodes' lease "
                    "of {:.1f} s, so they dropped the job; {} failed through no node's fault",
                    seconds_of(gap), seconds_of(lease_), what);
}

void Fleet::release(const std::vector<size_t>& members, const std::string& reason) {
  std::lock_guard<std::mutex> lock(renew_mutex_);
  if (renew_stop_) return;
  for (size_t i : members) {
    if (i >= members_.size() || released_[i]) continue;
    released_[i] = 1;
    ending_[i] = members_[i].node_id;
    // A copy: the caller may put another node in slot I while this runs.
    enders_.emplace_back([this, i, who = members_[i], reason] { end_in_background(i, who, reason); });
  }
}

void Fleet::end_in_background(size_t member, net::MemberInfo who, std::string reason) {
  using namespace std::chrono_literals;
  std::unique_lock<std::mutex> lock(renew_mutex_);
  // After one lease with no renewal the node has dropped the job by itself.
  const auto give_up = Steady::now() + lease_;
  auto request = end_request(true, reason);
  for (int attempt = 1; !renew_stop_; ++attempt) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + timeouts_.end);
    ending_call_[member] = &context;
    sign_request(signer_, "EndJob", request);  // each attempt afresh: a new sequence number and time
    lock.unlock();
    solvernet::v1::Empty reply;
    const grpc::Status status = train_stubs_[member]->EndJob(&context, request, &reply);
    lock.lock();
    ending_call_.erase(member);
    const auto code = status.error_code();
    // Any answer (even "refused") means the node runs and heard us; only
    // silence is worth another try.
    if (code != grpc::StatusCode::UNAVAILABLE && code != grpc::StatusCode::DEADLINE_EXCEEDED &&
        code != grpc::StatusCode::CANCELLED) {
      if (attempt > 1) spdlog::info("{} answered its EndJob at attempt {}: it is free of the job", member_name(who), attempt);
      ending_.erase(member);
      return;
    }
    if (Steady::now() >= give_up) {
      spdlog::info("{}: no answer to EndJob for a lease; its lease has run out", member_name(who));
      ending_.erase(member);
      return;
    }
    renew_wake_.wait_for(lock, 500ms, [&] { return renew_stop_; });
  }
}

solvernet::v1::EndJobRequest Fleet::end_request(bool abort, const std::string& reason) const {
  solvernet::v1::EndJobRequest request;
  request.set_job_id(job_id_);
  request.set_abort(abort);
  request.set_reason(reason);
  return request;
}

std::set<std::string> Fleet::still_ending() const {
  std::lock_guard<std::mutex> lock(renew_mutex_);
  std::set<std::string> out;
  for (const auto& [member, node_id] : ending_) out.insert(node_id);
  return out;
}

void Fleet::end_all(bool abort, const std::string& reason, const std::vector<bool>& silent) {
  if (ended_.exchange(true)) return;
  std::vector<char> released;
  std::map<size_t, std::string> unanswered;
  {
    std::lock_guard<std::mutex> lock(renew_mutex_);
    released = released_;
    unanswered = ending_;
  }
  stop_background();
  // After Ctrl-C the user waits on this: a member frozen unnoticed would hold
  // it for a whole EndJob deadline. A live member answers within a second.
  const bool interrupted = cancel_ && cancel_->load();
  std::vector<std::thread> threads;
  for (size_t i = 0; i < members_.size(); ++i)
    threads.emplace_back([&, i] {
      // A released member that answered has left already.
      if (released[i] && !unanswered.count(i)) return;
      auto request = end_request(abort || released[i], released[i] ? "replica group dropped" : reason);
      const bool frozen = (i < silent.size() && silent[i]) || unanswered.count(i);
      for (int attempt = 0; attempt < (frozen || interrupted ? 1 : 2); ++attempt) {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() +
                             (frozen        ? std::chrono::milliseconds(200)
                              : interrupted ? std::min<std::chrono::milliseconds>(timeouts_.end, std::chrono::seconds(1))
                                            : timeouts_.end));
        sign_request(signer_, "EndJob", request);
        solvernet::v1::Empty reply;
        grpc::Status status = train_stubs_[i]->EndJob(&context, request, &reply);
        if (status.error_code() != grpc::StatusCode::UNAVAILABLE) break;
      }
    });
  for (auto& t : threads) t.join();
  join_background();
}

}  // namespace sn::train
