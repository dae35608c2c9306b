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

Result<std::unique_ptr<JobTransport>> JobTransport::create(std::string job_id, const NodeKey& key,
                                                           std::vector<MemberInfo> members,
                                                           int self, const Topology* topology,
                                                           EmulationScale scale) {
  if (self < 0 || self >= static_cast<int>(members.size()))
    return make_error("transport: self index {} outside {} members", self, members.size());
  std::unique_ptr<JobTransport> t(new JobTransport());
  t->job_id_ = std::move(job_id);
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
      link->stub = solvernet::v1::Node::NewStub(make_channel(t->members_[i].address));
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
    return make_error("transport: cannot send to member {}", to);
  message.set_job_id(job_id_);
  message.set_from_node_id(key_->node_id());
  Hash256 digest = tensor_message_digest(message);
  Signature sig = key_->sign(digest);
  message.set_signature(sig.data(), sig.size());
  size_t bytes = message.ByteSizeLong();
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return make_error("{}", *aborted_);
  PeerLink& link = *links_[static_cast<size_t>(to)];
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
    lock.unlock();
    std::this_thread::sleep_until(next.deliver_at);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    solvernet::v1::Empty reply;
    grpc::Status status = link.stub->Send(&context, next.message, &reply);
    lock.lock();
    link.busy = false;
    if (!status.ok() && !link.failure) {
      link.failure = make_error("{} did not accept a {} message: {}", describe(to),
                                next.message.kind(), status.error_message());
      spdlog::warn("{}", link.failure->message);
      link.queue.clear();
    }
    changed_.notify_all();
  }
}

Status JobTransport::flush(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto idle = [&] {
    for (auto& link : links_)
      if (!link->queue.empty() || link->busy) return false;
    return true;
  };
  if (!changed_.wait_for(lock, timeout, [&] { return idle() || aborted_.has_value(); }))
    return make_error("timed out after {} s sending to peers", timeout.count() / 1000);
  if (aborted_) return make_error("{}", *aborted_);
  for (auto& link : links_)
    if (link->failure) return *link->failure;
  return ok_status();
}

Status JobTransport::deliver(solvernet::v1::TensorMessage message) {
  if (message.job_id() != job_id_)
    return make_error("message for job {} but this node runs job {}", message.job_id(), job_id_);
  auto it = index_of_.find(message.from_node_id());
  if (it == index_of_.end())
    return make_error("message from node {}, which is not a member of job {}",
                      message.from_node_id().substr(0, 16), job_id_);
  int from = it->second;
  const std::string& sig = message.signature();
  Hash256 digest = tensor_message_digest(message);
  if (!verify_signature(members_[static_cast<size_t>(from)].public_key, digest,
                        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(sig.data()), sig.size())))
    return make_error("bad signature on a {} message from {}", message.kind(), describe(from));
  MessageKey key{message.kind(), message.step(), message.micro(), message.round(), message.chunk(), from};
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) return make_error("{}", *aborted_);
  if (inbox_.count(key))
    return make_error("duplicate {} message (step {}, micro {}, round {}, chunk {}) from {}",
                      key.kind, key.step, key.micro, key.round, key.chunk, describe(from));
  inbox_.emplace(key, std::move(message));
  changed_.notify_all();
  return ok_status();
}

Result<solvernet::v1::TensorMessage> JobTransport::receive(const MessageKey& key,
                                                          std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto ready = [&] { return aborted_.has_value() || inbox_.count(key) > 0; };
  if (!changed_.wait_for(lock, timeout, ready))
    return make_error("timed out after {} s waiting for the {} message of step {} (micro {}) from {}",
                      timeout.count() / 1000, key.kind, key.step, key.micro, describe(key.from));
  if (aborted_) return make_error("{}", *aborted_);
  auto it = inbox_.find(key);
  solvernet::v1::TensorMessage message = std::move(it->second);
  inbox_.erase(it);
  return message;
}

void JobTransport::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!aborted_) aborted_ = reason;
  for (auto& link : links_) link->queue.clear();
  changed_.notify_all();
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
