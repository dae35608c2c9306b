// Private to sn_train: the transports a StageWorker runs over.
//
// StepRecorder wraps the worker's link (live JobTransport, or ReplayTransport)
// and sees every message the step's code sends and receives: it computes the
// digests a step leaf commits to and, when the job records evidence, keeps the
// inbound messages as received. Live and replayed steps go through this same
// code, so both compute their digests the same way.
//
// ReplayTransport stands in for the network in a replay: receive() hands out
// the recorded message for the tag, send() goes nowhere.
#pragma once

#include <map>
#include <mutex>
#include <optional>

#include "core/keys.h"
#include "net/transport.h"
#include "train/evidence.h"

namespace sn::train {

class StepRecorder final : public net::Transport {
 public:
  // SELF_NODE_ID and JOB_ID are set in every outgoing message before its
  // digest is taken (the link sets the same values before signing).
  StepRecorder(std::shared_ptr<net::Transport> link, std::string job_id, std::string self_node_id);

  int self() const override { return link_->self(); }
  int size() const override { return link_->size(); }
  Status send(int to, solvernet::v1::TensorMessage message, net::Traffic traffic) override;
  Result<solvernet::v1::TensorMessage> receive(const net::Tag& tag, std::chrono::milliseconds timeout) override;
  Status flush(std::chrono::milliseconds timeout) override { return link_->flush(timeout); }
  void abort(const std::string& reason) override { link_->abort(reason); }
  std::string describe(int member) const override { return link_->describe(member); }

  // Starts a step's record; KEEP_MESSAGES: keep the inbound messages themselves.
  void begin_step(bool keep_messages);
  struct StepTraffic {
    std::vector<TaggedDigest> inbound;
    std::vector<solvernet::v1::TensorMessage> inbound_messages;  // in tag order (if kept)
    std::vector<OutboundDigest> outbound;                        // sorted by (to, tag)
  };
  // The step's record so far (sorted), and a fresh one begins.
  StepTraffic take_step();

 private:
  std::shared_ptr<net::Transport> link_;
  std::string job_id_, self_node_id_;
  std::mutex mutex_;
  bool keep_ = false;
  std::vector<TaggedDigest> inbound_;
  std::map<net::Tag, solvernet::v1::TensorMessage> messages_;
  std::vector<OutboundDigest> outbound_;
};

class ReplayTransport final : public net::Transport {
 public:
  ReplayTransport(std::vector<net::MemberInfo> members, int self);

  // Files the step's recorded inbound messages, each checked: from a member,
  // for this job, signed by that member (else bad_peer naming tag and sender).
  Status load_step(const std::string& job_id, const solvernet::v1::StepEvidence& evidence);

  int self() const override { return self_; }
  int size() const override { return static_cast<int>(members_.size()); }
  Status send(int, solvernet::v1::TensorMessage, net::Traffic) override;
  Result<solvernet::v1::TensorMessage> receive(const net::Tag& tag, std::chrono::milliseconds timeout) override;
  Status flush(std::chrono::milliseconds) override;
  void abort(const std::string& reason) override;
  std::string describe(int member) const override;

 private:
  std::vector<net::MemberInfo> members_;
  int self_ = 0;
  std::mutex mutex_;
  std::map<net::Tag, solvernet::v1::TensorMessage> inbox_;
  std::optional<std::string> aborted_;
};

}  // namespace sn::train
