#include "train/step_transport.h"

#include <algorithm>

namespace sn::train {

namespace {
net::Tag outgoing_tag(const solvernet::v1::TensorMessage& m, int from) {
  return net::Tag{m.kind(), m.step(), m.micro(), m.round(), m.chunk(), from};
}
}  // namespace

StepRecorder::StepRecorder(std::shared_ptr<net::Transport> link, std::string job_id, std::string self_node_id)
    : link_(std::move(link)), job_id_(std::move(job_id)), self_node_id_(std::move(self_node_id)) {}

Status StepRecorder::send(int to, solvernet::v1::TensorMessage message, net::Traffic traffic) {
  message.set_job_id(job_id_);
  message.set_from_node_id(self_node_id_);
  const Hash256 digest = net::tensor_message_digest(message);
  const net::Tag tag = outgoing_tag(message, link_->self());
  SN_TRY(link_->send(to, std::move(message), traffic));
  std::lock_guard<std::mutex> lock(mutex_);
  outbound_.push_back(OutboundDigest{to, tag, digest});
  return ok_status();
}

Result<solvernet::v1::TensorMessage> StepRecorder::receive(const net::Tag& tag, std::chrono::milliseconds timeout) {
  SN_ASSIGN(auto message, link_->receive(tag, timeout));
  const Hash256 digest = net::tensor_message_digest(message);
  std::lock_guard<std::mutex> lock(mutex_);
  inbound_.push_back(TaggedDigest{tag, digest});
  if (keep_) messages_[tag] = message;
  return message;
}

void StepRecorder::begin_step(bool keep_messages) {
  std::lock_guard<std::mutex> lock(mutex_);
  keep_ = keep_messages;
  inbound_.clear();
  messages_.clear();
  outbound_.clear();
}

StepRecorder::StepTraffic StepRecorder::take_step() {
  std::lock_guard<std::mutex> lock(mutex_);
  StepTraffic out;
  out.inbound = std::move(inbound_);
  std::sort(out.inbound.begin(), out.inbound.end(), [](const auto& a, const auto& b) { return a.tag < b.tag; });
  for (auto& [tag, message] : messages_) out.inbound_messages.push_back(std::move(message));
  out.outbound = std::move(outbound_);
  std::sort(out.outbound.begin(), out.outbound.end());
  inbound_.clear();
  messages_.clear();
  outbound_.clear();
  return out;
}

ReplayTransport::ReplayTransport(std::vector<net::MemberInfo> members, int self)
    : members_(std::move(members)), self_(self) {}

Status ReplayTransport::load_step(const std::string& job_id, const solvernet::v1::StepEvidence& evidence) {
  std::map<net::Tag, solvernet::v1::TensorMessage> inbox;
  for (const auto& m : evidence.inbound()) {
    auto sender = std::find_if(members_.begin(), members_.end(),
                               [&](const net::MemberInfo& info) { return info.node_id == m.from_node_id(); });
    const std::string where = fmt::format("step {}: the {} message (step {}, micro {}, round {}, chunk {}) from node {}",
                                          evidence.step(), m.kind(), m.step(), m.micro(), m.round(), m.chunk(),
                                          m.from_node_id().substr(0, 8));
    if (sender == members_.end()) return kind_error(ErrorKind::bad_peer, "{} is not from a member of the job", where);
    if (m.job_id() != job_id) return kind_error(ErrorKind::bad_peer, "{} is for job {}", where, m.job_id());
    const Hash256 digest = net::tensor_message_digest(m);
    const std::string& sig = m.signature();
    if (sig.empty()) return kind_error(ErrorKind::bad_peer, "{} is unsigned", where);
    if (!verify_signature(sender->public_key, digest,
                          std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(sig.data()), sig.size())))
      return kind_error(ErrorKind::bad_peer, "{} has a forged signature (not its sender's)", where);
    const int from = static_cast<int>(sender - members_.begin());
    if (!inbox.emplace(outgoing_tag(m, from), m).second)
      return kind_error(ErrorKind::bad_peer, "{} appears twice", where);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  inbox_ = std::move(inbox);
  return ok_status();
}

Status ReplayTransport::send(int to, solvernet::v1::TensorMessage, net::Traffic) {
  if (to < 0 || to >= size() || to == self_)
    return kind_error(ErrorKind::invalid_input, "replay: cannot send to member {}", to);
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  return ok_status();
}

Result<solvernet::v1::TensorMessage> ReplayTransport::receive(const net::Tag& tag, std::chrono::milliseconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  auto it = inbox_.find(tag);
  if (it == inbox_.end())
    return kind_error(ErrorKind::bad_peer,
                      "the evidence lacks the {} message (step {}, micro {}, round {}, chunk {}) from {}", tag.kind,
                      tag.step, tag.micro, tag.round, tag.chunk,
                      tag.from >= 0 && tag.from < size() ? describe(tag.from) : std::string("an unknown member"));
  auto message = std::move(it->second);
  inbox_.erase(it);
  return message;
}

Status ReplayTransport::flush(std::chrono::milliseconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  return ok_status();
}

void ReplayTransport::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!aborted_) aborted_ = reason;
}

std::string ReplayTransport::describe(int member) const {
  const auto& m = members_.at(static_cast<size_t>(member));
  return fmt::format("node {} (stage {}, replica {})", m.node_id.substr(0, 8), m.stage, m.replica);
}

}  // namespace sn::train
