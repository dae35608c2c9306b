#include "net/transport.h"

#include <spdlog/spdlog.h>

#include "core/hash.h"
#include "net/rpc.h"

namespace sn::net {

const char* traffic_name(Traffic traffic) {
  return traffic == Traffic::kPipeline ? "pipeline" : "data_parallel";
}

Hash256 tensor_message_digest(const solvernet::v1::TensorMessage& m) {
  Hasher h;
  h.update("solvernet-tensor-message-v1");
  auto field = [&](std::string_view s) {
    h.update_u64(s.size());
    h.update(s);
  };
  field(m.job_id());
  field(m.from_node_id());
  field(m.kind());
  h.update_u64(static_cast<uint64_t>(m.step()));
  h.update_u64(static_cast<uint64_t>(static_cast<int64_t>(m.micro())));
  h.update_u64(static_cast<uint64_t>(static_cast<int64_t>(m.round())));
  h.update_u64(static_cast<uint64_t>(static_cast<int64_t>(m.chunk())));
  if (m.has_tensor()) {
    h.update("tensor");
    field(m.tensor().dtype());
    h.update_u64(static_cast<uint64_t>(m.tensor().shape_size()));
    for (int64_t d : m.tensor().shape()) h.update_u64(static_cast<uint64_t>(d));
    field(m.tensor().data());
  } else if (m.has_compressed()) {
    h.update("compressed");
    field(m.compressed().codec());
    h.update_u64(static_cast<uint64_t>(m.compressed().shape_size()));
    for (int64_t d : m.compressed().shape()) h.update_u64(static_cast<uint64_t>(d));
    field(m.compressed().data());
  } else {
    h.update("empty");
  }
  return h.finish();
}

int64_t step_order(int64_t step) {
  // Evaluation rounds (−1, −2, …) run after every training step.
  constexpr int64_t kEvaluation = int64_t{1} << 62;
  return step >= 0 ? step : kEvaluation - step;
}

Result<std::shared_ptr<JobTransport>> JobTransport::create(std::string job_id, const NodeKey& key,
                                                           std::vector<MemberInfo> members,
                                                           int self, const Topology* topology,
                                                           EmulationScale scale, InboxLimits limits) {
  if (self < 0 || self >= static_cast<int>(members.size()))
    return make_error("transport: self index {} outside {} members", self, members.size());
  if (limits.bytes_per_sender <= 0 || limits.messages_per_sender <= 0)
    return make_error("transport: inbox limits must be > 0, got {} bytes and {} messages",
                      limits.bytes_per_sender, limits.messages_per_sender);
  std::shared_ptr<JobTransport> t(new JobTransport());
  t->job_id_ = std::move(job_id);
  t->limits_ = limits;
  t->use_.resize(members.size());
  t->key_ = &key;
  t->members_ = std::move(members);
  t->self_ = self;
  t->scale_ = scale;
  for (size_t i = 0; i < t->members_.size(); ++i) {
    if (t->index_of_.count(t->members_[i].node_id))
      return make_error("transport: node {} appears twice in the job", t->members_[i].node_id.substr(0, 12));
    t->index_of_[t->members_[i].node_id] = static_cast<int>(i);
  }
  if (topology) {
    t->topology_copy_ = *topology;
    t->topology_ = &*t->topology_copy_;
    for (const auto& m : t->members_)
      if (t->topology_->region_index(m.region) < 0)
        return make_error("transport: node {} is in region \"{}\", which the topology does not define",
                          m.node_id.substr(0, 12), m.region);
  }
  for (size_t i = 0; i < t->members_.size(); ++i) {
    auto link = std::make_unique<PeerLink>();
    if (static_cast<int>(i) != self) {
      if (t->topology_) link->pacer = std::make_unique<LinkPacer>(t->link_to(static_cast<int>(i)));
      link->stub = solvernet::v1::Transport::NewStub(make_channel(t->members_[i].address, t->members_[i].node_id, t->key_));
    }
    t->links_.push_back(std::move(link));
  }
  for (size_t i = 0; i < t->links_.size(); ++i)
    if (static_cast<int>(i) != self)
      t->links_[i]->sender = std::thread([raw = t.get(), i] { raw->sender_loop(static_cast<int>(i)); });
  return t;
}

JobTransport::~JobTransport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    cancel_in_flight_locked();
  }
  changed_.notify_all();
  for (auto& link : links_)
    if (link->sender.joinable()) link->sender.join();
}

LinkSpec JobTransport::link_to(int to) const {
  if (!topology_) return LinkSpec{0, 1e12};
  int a = topology_->region_index(members_[self_].region);
  int b = topology_->region_index(members_[to].region);
  return scale_.apply(topology_->link(a, b));
}

std::string JobTransport::describe(int member) const {
  const auto& m = members_.at(static_cast<size_t>(member));
  return fmt::format("node {} (stage {}, replica {})", m.node_id.substr(0, 8), m.stage, m.replica);
}

Status JobTransport::send(int to, solvernet::v1::TensorMessage message, Traffic traffic) {
  if (to < 0 || to >= static_cast<int>(members_.size()) || to == self_)
    return kind_error(ErrorKind::invalid_input, "transport: cannot send to member {}", to);
  message.set_job_id(job_id_);
  message.set_from_node_id(key_->node_id());
  Hash256 digest = tensor_message_digest(message);
  Signature sig = key_->sign(digest);
  message.set_signature(sig.data(), sig.size());
  size_t bytes = message.ByteSizeLong();
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  PeerLink& link = *links_[static_cast<size_t>(to)];
  if (link.excluded) return kind_error(ErrorKind::unavailable, "{} has left the job", describe(to));
  if (link.failure) return *link.failure;
  auto& counter = link.counters[traffic];
  counter.first += static_cast<int64_t>(bytes);
  counter.second += 1;
  const double weight = scale_.pacing_weight(traffic == Traffic::kDataParallel);
  link.queue.push_back(Outgoing{std::move(message),
                                link.pacer->schedule(static_cast<size_t>(static_cast<double>(bytes) * weight))});
  changed_.notify_all();
  return ok_status();
}

void JobTransport::sender_loop(int to) {
  PeerLink& link = *links_[static_cast<size_t>(to)];
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] { return stopping_ || !link.queue.empty(); });
    // Stopping drops what is queued: flush() is how a caller waits for delivery.
    if (stopping_) return;
    Outgoing next = std::move(link.queue.front());
    link.queue.pop_front();
    link.busy = true;
    // The emulated link's pacing, cut short when the job is aborted or the transport goes.
    if (changed_.wait_until(lock, next.deliver_at, [&] { return stopping_ || aborted_.has_value(); })) {
      link.busy = false;
      changed_.notify_all();
      if (stopping_) return;
      continue;
    }
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    link.in_flight = &context;
    lock.unlock();
    solvernet::v1::Empty reply;
    grpc::Status status = link.stub->Send(&context, next.message, &reply);
    lock.lock();
    link.in_flight = nullptr;
    link.busy = false;
    if (!status.ok() && !link.failure) {
      link.failure = kind_error(error_kind_of(status.error_code()), "{} did not accept a {} message: {}",
                                describe(to), next.message.kind(), status.error_message());
      // A Send we cancelled ourselves (the job aborted, the transport going) is no peer's fault.
      if (!stopping_ && !aborted_) spdlog::warn("{}", link.failure->message);
      link.queue.clear();
    }
    changed_.notify_all();
  }
}

Status JobTransport::flush(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto idle = [&] {
    for (auto& link : links_)
      if (!link->excluded && (!link->queue.empty() || link->busy)) return false;
    return true;
  };
  if (!changed_.wait_for(lock, timeout, [&] { return idle() || aborted_.has_value(); }))
    return kind_error(ErrorKind::timeout, "timed out after {} s sending to peers", timeout.count() / 1000);
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  for (auto& link : links_)
    if (link->failure && !link->excluded) return *link->failure;
  return ok_status();
}

Status JobTransport::deliver(solvernet::v1::TensorMessage message) {
  if (message.job_id() != job_id_)
    return kind_error(ErrorKind::not_found, "message for job {} but this transport is job {}", message.job_id(), job_id_);
  auto refuse = [&](Error error) {
    std::lock_guard<std::mutex> lock(mutex_);
    return refuse_locked(std::move(error));
  };
  auto it = index_of_.find(message.from_node_id());
  if (it == index_of_.end())
    return refuse(kind_error(ErrorKind::permission_denied, "message from node {}, which is not a member of job {}",
                             message.from_node_id().substr(0, 16), job_id_));
  const int from = it->second;
  const std::string& sig = message.signature();
  Hash256 digest = tensor_message_digest(message);
  if (!verify_signature(members_[static_cast<size_t>(from)].public_key, digest,
                        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(sig.data()), sig.size())))
    return refuse(kind_error(ErrorKind::permission_denied, "bad signature on a {} message from {}", message.kind(),
                             describe(from)));
  Tag tag{message.kind(), message.step(), message.micro(), message.round(), message.chunk(), from};
  const auto bytes = static_cast<int64_t>(message.ByteSizeLong());
  const int64_t order = step_order(tag.step);
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  if (order < closed_below_)
    return refuse_locked(kind_error(ErrorKind::permission_denied,
                                    "{} message for step {} from {}: that step is finished here (a replay?)",
                                    tag.kind, tag.step, describe(from)));
  auto& step_tags = accepted_[order];
  if (step_tags.count(tag)) {
    return refuse_locked(kind_error(ErrorKind::permission_denied,
                                    "replayed {} message (step {}, micro {}, round {}, chunk {}) from {}: "
                                    "that tag was accepted before",
                                    tag.kind, tag.step, tag.micro, tag.round, tag.chunk, describe(from)));
  }
  SenderUse& use = use_[static_cast<size_t>(from)];
  if (use.messages + 1 > limits_.messages_per_sender || use.bytes + bytes > limits_.bytes_per_sender) {
    if (step_tags.empty()) accepted_.erase(order);
    return refuse_locked(kind_error(ErrorKind::resource_exhausted,
                                    "inbox for {} is full: {} messages and {} bytes waiting, a {}-byte {} message "
                                    "would pass the limit of {} messages or {} bytes per sender",
                                    describe(from), use.messages, use.bytes, bytes, tag.kind,
                                    limits_.messages_per_sender, limits_.bytes_per_sender));
  }
  step_tags.insert(tag);
  ++replay_records_;
  use.messages += 1;
  use.bytes += bytes;
  inbox_.emplace(std::move(tag), Held{std::move(message), bytes});
  changed_.notify_all();
  return ok_status();
}

Error JobTransport::refuse_locked(Error error) {
  ++refused_;
  return error;
}

void JobTransport::drop_locked(std::map<Tag, Held>::iterator it) {
  SenderUse& use = use_[static_cast<size_t>(it->first.from)];
  use.messages -= 1;
  use.bytes -= it->second.bytes;
  inbox_.erase(it);
}

Result<solvernet::v1::TensorMessage> JobTransport::receive(const Tag& tag, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto ready = [&] { return aborted_.has_value() || inbox_.count(tag) > 0; };
  if (!changed_.wait_for(lock, timeout, ready))
    return kind_error(ErrorKind::timeout, "timed out after {} s waiting for the {} message of step {} (micro {}) from {}",
                      timeout.count() / 1000, tag.kind, tag.step, tag.micro, describe(tag.from));
  if (aborted_) return kind_error(ErrorKind::aborted, "{}", *aborted_);
  auto it = inbox_.find(tag);
  solvernet::v1::TensorMessage message = std::move(it->second.message);
  drop_locked(it);
  return message;
}

void JobTransport::finish_step(int64_t step) {
  std::lock_guard<std::mutex> lock(mutex_);
  closed_below_ = std::max(closed_below_, step_order(step) + 1);
  for (auto it = inbox_.begin(); it != inbox_.end();)
    if (step_order(it->first.step) < closed_below_)
      drop_locked(it++);
    else
      ++it;
  for (auto it = accepted_.begin(); it != accepted_.end() && it->first < closed_below_;) {
    replay_records_ -= static_cast<int64_t>(it->second.size());
    it = accepted_.erase(it);
  }
}

JobTransport::InboxUse JobTransport::inbox_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  InboxUse out;
  for (const auto& use : use_) {
    out.messages += use.messages;
    out.bytes += use.bytes;
  }
  out.replay_records = replay_records_;
  out.refused = refused_;
  return out;
}

void JobTransport::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!aborted_) aborted_ = reason;
  for (auto& link : links_) link->queue.clear();
  cancel_in_flight_locked();
  changed_.notify_all();
}

void JobTransport::exclude(int member) {
  if (member < 0 || member >= static_cast<int>(links_.size()) || member == self_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  PeerLink& link = *links_[static_cast<size_t>(member)];
  link.excluded = true;
  link.queue.clear();
  if (link.in_flight) link.in_flight->TryCancel();
  changed_.notify_all();
}

void JobTransport::cancel_in_flight_locked() {
  // A peer that froze holds a Send until its deadline; nobody waits for it now.
  for (auto& link : links_)
    if (link->in_flight) link->in_flight->TryCancel();
}

std::vector<LinkCounter> JobTransport::take_counters() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<LinkCounter> out;
  for (size_t i = 0; i < links_.size(); ++i) {
    for (auto& [traffic, counts] : links_[i]->counters) {
      if (counts.first == 0) continue;
      LinkCounter c;
      c.to = static_cast<int>(i);
      c.link_class = members_[i].region == members_[static_cast<size_t>(self_)].region ? "intra" : "inter";
      c.traffic = traffic;
      c.bytes = counts.first;
      c.messages = counts.second;
      out.push_back(c);
      counts = {0, 0};
    }
  }
  return out;
}

}  // namespace sn::net
