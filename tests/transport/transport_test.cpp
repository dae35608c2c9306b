// Two job members in one process, each with a real gRPC server on 127.0.0.1,
// exchanging signed tensor messages over emulated links.
#include <gtest/gtest.h>

#include <thread>

#include "net/collectives.h"
#include "net/local_mesh.h"

using namespace sn;
using namespace sn::net;
using namespace std::chrono_literals;

namespace {

struct Pair {
  Topology topology;
  std::unique_ptr<LocalMesh> mesh;
  JobTransport* a = nullptr;
  JobTransport* b = nullptr;

  explicit Pair(const std::string& topology_text) {
    auto topo = parse_topology_string(topology_text, "t.toml");
    EXPECT_TRUE(topo.ok()) << topo.message();
    topology = *topo;
    mesh = std::move(LocalMesh::create({"west", "east"}, &topology).value());
    a = &mesh->member(0);
    b = &mesh->member(1);
  }
};

const char* kTopology = R"(
[[region]]
name = "west"
nodes = 1
[[region]]
name = "east"
nodes = 1
[[link]]
from = "west"
to = "east"
latency_ms = 20
bandwidth_mbps = 80
)";

solvernet::v1::TensorMessage make_message(const std::string& kind, int micro, size_t bytes) {
  solvernet::v1::TensorMessage m;
  m.set_kind(kind);
  m.set_step(3);
  m.set_micro(micro);
  m.mutable_tensor()->set_dtype("u8");
  m.mutable_tensor()->add_shape(static_cast<int64_t>(bytes));
  m.mutable_tensor()->set_data(std::string(bytes, static_cast<char>(micro)));
  return m;
}

}  // namespace

TEST(Transport, DeliversSignedMessagesInAnyOrderOfReceipt) {
  Pair p(kTopology);
  ASSERT_TRUE(p.a->send(1, make_message("act", 0, 100), Traffic::kPipeline).ok());
  ASSERT_TRUE(p.a->send(1, make_message("act", 1, 200), Traffic::kPipeline).ok());
  auto second = p.b->receive({"act", 3, 1, 0, 0, 0}, 5000ms);
  ASSERT_TRUE(second.ok()) << second.message();
  EXPECT_EQ(second->tensor().data().size(), 200u);
  auto first = p.b->receive({"act", 3, 0, 0, 0, 0}, 5000ms);
  ASSERT_TRUE(first.ok()) << first.message();
  EXPECT_EQ(first->tensor().data(), std::string(100, '\0'));
  ASSERT_TRUE(p.a->flush(5000ms).ok());
  auto counters = p.a->take_counters();
  ASSERT_EQ(counters.size(), 1u);
  EXPECT_EQ(counters[0].link_class, "inter");
  EXPECT_EQ(counters[0].messages, 2);
  EXPECT_GT(counters[0].bytes, 300);
}

TEST(Transport, TransferNeverFasterThanTheEmulatedLink) {
  Pair p(kTopology);
  LinkSpec link = p.a->link_to(1);
  EXPECT_DOUBLE_EQ(link.latency_ms, 20);
  for (size_t bytes : {1000u, 100000u, 1000000u}) {
    auto message = make_message("act", static_cast<int>(bytes % 97), bytes);
    double expected = link.transfer_seconds(static_cast<double>(message.ByteSizeLong()) + 100);
    auto start = Clock::now();
    ASSERT_TRUE(p.a->send(1, message, Traffic::kPipeline).ok());
    auto got = p.b->receive({"act", 3, message.micro(), 0, 0, 0}, 10000ms);
    ASSERT_TRUE(got.ok()) << got.message();
    double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    // The signature and header add ~100 bytes, so the floor uses the payload alone.
    EXPECT_GE(elapsed, link.transfer_seconds(static_cast<double>(bytes))) << bytes;
    (void)expected;
  }
}

TEST(Transport, PipelinedMessagesShareTheLinkRate) {
  Pair p(kTopology);
  LinkSpec link = p.a->link_to(1);
  const size_t bytes = 200000;  // 20 ms each at 80 Mbps
  auto start = Clock::now();
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(p.a->send(1, make_message("act", i, bytes), Traffic::kPipeline).ok());
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(p.b->receive({"act", 3, i, 0, 0, 0}, 10000ms).ok());
  double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_GE(elapsed, 5 * bytes / link.bytes_per_second() + link.latency_ms / 1e3);
}

TEST(Transport, RejectsForgedAndForeignMessages) {
  Pair p(kTopology);
  // A message signed by a key that is not a member.
  NodeKey stranger = NodeKey::generate();
  auto m = make_message("act", 0, 10);
  m.set_job_id("mesh");
  m.set_from_node_id(stranger.node_id());
  auto sig = stranger.sign(tensor_message_digest(m));
  m.set_signature(sig.data(), sig.size());
  auto unknown = p.b->deliver(m);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.message().find("not a member"), std::string::npos);

  // A member's message with its payload altered after signing.
  auto forged = make_message("act", 0, 10);
  forged.set_job_id("mesh");
  forged.set_from_node_id(p.mesh->key(0).node_id());
  auto good_sig = p.mesh->key(0).sign(tensor_message_digest(forged));
  forged.set_signature(good_sig.data(), good_sig.size());
  forged.mutable_tensor()->mutable_data()->at(0) = 'x';
  auto bad = p.b->deliver(forged);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("bad signature"), std::string::npos);

  auto wrong_job = make_message("act", 0, 10);
  wrong_job.set_job_id("other");
  EXPECT_FALSE(p.b->deliver(wrong_job).ok());
}

TEST(Transport, ReceiveTimesOutAndAbortWakesWaiters) {
  Pair p(kTopology);
  auto timed_out = p.b->receive({"grad", 1, 0, 0, 0, 0}, 200ms);
  ASSERT_FALSE(timed_out.ok());
  EXPECT_NE(timed_out.message().find("timed out"), std::string::npos);
  std::thread aborter([&] {
    std::this_thread::sleep_for(100ms);
    p.b->abort("job aborted by client");
  });
  auto aborted = p.b->receive({"grad", 1, 0, 0, 0, 0}, 10000ms);
  aborter.join();
  ASSERT_FALSE(aborted.ok());
  EXPECT_EQ(aborted.message(), "job aborted by client");
}

TEST(Transport, VanishedPeerSurfacesAsSendError) {
  Pair p(kTopology);
  p.mesh->kill(1);
  ASSERT_TRUE(p.a->send(1, make_message("act", 0, 10), Traffic::kPipeline).ok());
  auto flushed = p.a->flush(30000ms);
  ASSERT_FALSE(flushed.ok());
  EXPECT_NE(flushed.message().find("stage 0, replica 1"), std::string::npos);
  EXPECT_FALSE(p.a->send(1, make_message("act", 1, 10), Traffic::kPipeline).ok());
}

namespace {

// A message for job "mesh" signed by KEY, as a member's transport would send it.
solvernet::v1::TensorMessage signed_message(const NodeKey& key, int64_t step, int micro, size_t bytes,
                                            const std::string& job = "mesh") {
  auto m = make_message("act", micro, bytes);
  m.set_step(step);
  m.set_job_id(job);
  m.set_from_node_id(key.node_id());
  auto sig = key.sign(tensor_message_digest(m));
  m.set_signature(sig.data(), sig.size());
  return m;
}

std::unique_ptr<LocalMesh> small_inbox_mesh(InboxLimits limits) {
  return std::move(LocalMesh::create({"", ""}, nullptr, {}, limits).value());
}

}  // namespace

TEST(Inbox, CountBoundRefusesTheSenderAndFreesRoomOnReceive) {
  auto mesh = small_inbox_mesh({1 << 20, 4});
  JobTransport& b = mesh->member(1);
  for (int micro = 0; micro < 4; ++micro) ASSERT_TRUE(b.deliver(signed_message(mesh->key(0), 0, micro, 100)).ok());
  auto full = b.deliver(signed_message(mesh->key(0), 0, 4, 100));
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.error().kind, ErrorKind::resource_exhausted);
  EXPECT_NE(full.message().find("limit of 4 messages"), std::string::npos) << full.message();
  EXPECT_EQ(b.inbox_use().messages, 4);
  // A refused message is not remembered: once there is room it is accepted.
  ASSERT_TRUE(b.receive({"act", 0, 0, 0, 0, 0}, 1000ms).ok());
  EXPECT_TRUE(b.deliver(signed_message(mesh->key(0), 0, 4, 100)).ok());
  EXPECT_EQ(b.inbox_use().messages, 4);
}

TEST(Inbox, ByteBoundHoldsWhateverTheSenderSends) {
  auto mesh = small_inbox_mesh({10000, 1000});
  JobTransport& b = mesh->member(1);
  int accepted = 0, exhausted = 0;
  for (int micro = 0; micro < 200; ++micro) {
    auto status = b.deliver(signed_message(mesh->key(0), 0, micro, 3000));
    if (status.ok()) ++accepted;
    if (!status.ok() && status.error().kind == ErrorKind::resource_exhausted) ++exhausted;
  }
  EXPECT_EQ(accepted, 3);
  EXPECT_EQ(exhausted, 197);
  EXPECT_LE(b.inbox_use().bytes, 10000);
  EXPECT_EQ(b.inbox_use().refused, 197);
}

TEST(Inbox, SendersOverTheBoundGetResourceExhaustedOverGrpc) {
  auto mesh = small_inbox_mesh({1 << 20, 3});
  for (int micro = 0; micro < 5; ++micro)
    ASSERT_TRUE(mesh->member(0).send(1, make_message("act", micro, 10), Traffic::kPipeline).ok());
  auto flushed = mesh->member(0).flush(10000ms);
  ASSERT_FALSE(flushed.ok());
  EXPECT_EQ(flushed.error().kind, ErrorKind::resource_exhausted) << flushed.message();
  EXPECT_EQ(mesh->member(1).inbox_use().messages, 3);
}

TEST(Inbox, NonMembersAndForgeriesNeverReachTheInbox) {
  auto mesh = small_inbox_mesh({1 << 20, 4});
  NodeKey stranger = NodeKey::generate();
  for (int micro = 0; micro < 50; ++micro) {
    auto status = mesh->member(1).deliver(signed_message(stranger, 0, micro, 1000));
    ASSERT_FALSE(status.ok());
    EXPECT_EQ(status.error().kind, ErrorKind::permission_denied);
  }
  auto other_job = mesh->member(1).deliver(signed_message(mesh->key(0), 0, 0, 10, "other"));
  EXPECT_EQ(other_job.error().kind, ErrorKind::not_found);
  EXPECT_EQ(mesh->member(1).inbox_use().messages, 0);
  EXPECT_EQ(mesh->member(1).inbox_use().refused, 50);
}

TEST(Replay, AMessageAcceptedOnceIsRefusedEvenAfterItWasReceived) {
  auto mesh = small_inbox_mesh({1 << 20, 64});
  JobTransport& b = mesh->member(1);
  auto message = signed_message(mesh->key(0), 3, 0, 100);
  ASSERT_TRUE(b.deliver(message).ok());
  auto again = b.deliver(message);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().kind, ErrorKind::permission_denied);
  ASSERT_TRUE(b.receive({"act", 3, 0, 0, 0, 0}, 1000ms).ok());
  auto after_receive = b.deliver(message);
  ASSERT_FALSE(after_receive.ok());
  EXPECT_EQ(after_receive.error().kind, ErrorKind::permission_denied);
  EXPECT_NE(after_receive.message().find("replayed"), std::string::npos) << after_receive.message();
  // The same tag with another payload is the same message to the replay check.
  auto altered = signed_message(mesh->key(0), 3, 0, 7);
  EXPECT_FALSE(b.deliver(altered).ok());
}

TEST(Replay, FinishedStepsAreClosedAndTheirRecordPruned) {
  auto mesh = small_inbox_mesh({1 << 20, 64});
  JobTransport& b = mesh->member(1);
  ASSERT_TRUE(b.deliver(signed_message(mesh->key(0), 0, 0, 10)).ok());
  ASSERT_TRUE(b.deliver(signed_message(mesh->key(0), 0, 1, 10)).ok());  // never received: dropped at finish
  ASSERT_TRUE(b.deliver(signed_message(mesh->key(0), 1, 0, 10)).ok());
  ASSERT_TRUE(b.receive({"act", 0, 0, 0, 0, 0}, 1000ms).ok());
  EXPECT_EQ(b.inbox_use().replay_records, 3);
  b.finish_step(0);
  EXPECT_EQ(b.inbox_use().replay_records, 1);
  EXPECT_EQ(b.inbox_use().messages, 1);
  auto late = b.deliver(signed_message(mesh->key(0), 0, 5, 10));
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().kind, ErrorKind::permission_denied);
  EXPECT_NE(late.message().find("finished"), std::string::npos) << late.message();
  EXPECT_TRUE(b.receive({"act", 1, 0, 0, 0, 0}, 1000ms).ok());
  // Evaluation rounds (−1, −2, …) come after every training step.
  b.finish_step(1);
  ASSERT_TRUE(b.deliver(signed_message(mesh->key(0), -1, 0, 10)).ok());
  b.finish_step(-1);
  EXPECT_FALSE(b.deliver(signed_message(mesh->key(0), -1, 1, 10)).ok());
  EXPECT_FALSE(b.deliver(signed_message(mesh->key(0), 7, 0, 10)).ok());
  EXPECT_TRUE(b.deliver(signed_message(mesh->key(0), -2, 0, 10)).ok());
  EXPECT_EQ(b.inbox_use().replay_records, 1);
}

namespace {

// Runs BODY(transport, member index) on every member of a fresh mesh at once.
template <typename Body>
void on_every_member(size_t members, Body body) {
  auto mesh = LocalMesh::create(std::vector<std::string>(members, ""), nullptr);
  ASSERT_TRUE(mesh.ok()) << mesh.message();
  std::vector<std::thread> threads;
  for (size_t i = 0; i < members; ++i) threads.emplace_back([&, i] { body((*mesh)->member(i), i); });
  for (auto& t : threads) t.join();
}

std::vector<float> ramp(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(i % 101) * 0.37f + 1.0f / (1.0f + static_cast<float>(i));
  return v;
}

}  // namespace

TEST(Collectives, RingAllreduceSumsBitwiseEquallyOnEveryMember) {
  const size_t n = 4, values = 5003;  // not a multiple of the ring or of the chunk
  std::vector<std::vector<float>> buffers(n);
  CollectiveOptions options;
  options.chunk_bytes = 1000;
  on_every_member(n, [&](JobTransport& t, size_t i) {
    buffers[i] = ramp(values, static_cast<float>(i + 1));
    auto status = RingAllreduce(t, {0, 1, 2, 3}, options).run(buffers[i], 0);
    EXPECT_TRUE(status.ok()) << status.message();
    t.finish_step(0);
    EXPECT_EQ(t.inbox_use().messages, 0);
  });
  for (size_t i = 1; i < n; ++i) EXPECT_EQ(buffers[i], buffers[0]);
  for (size_t k : {size_t{0}, size_t{1234}, values - 1}) {
    float expected = 0;
    for (size_t i = 0; i < n; ++i) expected += ramp(values, static_cast<float>(i + 1))[k];
    EXPECT_NEAR(buffers[0][k], expected, 1e-3);
  }
  EXPECT_EQ(RingAllreduce::messages_per_member(values, 4, 1000), 2 * 3 * 6);
}

TEST(Collectives, AllgatherAndPairExchangeHandEveryoneEveryMessage) {
  const size_t n = 3;
  std::vector<std::vector<std::string>> gathered(n);
  std::vector<std::string> swapped(n);
  on_every_member(n, [&](JobTransport& t, size_t i) {
    auto own = make_message("", 0, 10 + i);
    auto all = RingAllgather(t, {0, 1, 2}, {}).run(own, 5);
    ASSERT_TRUE(all.ok()) << all.message();
    for (const auto& m : *all) gathered[i].push_back(m.tensor().data());
    if (i < 2) {
      auto other = PairExchange(t, 1 - static_cast<int>(i), {.kind = "tied"}).run(make_message("", 0, 40 + i), 5);
      ASSERT_TRUE(other.ok()) << other.message();
      swapped[i] = other->tensor().data();
    }
  });
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(gathered[i].size(), n);
    for (size_t j = 0; j < n; ++j) EXPECT_EQ(gathered[i][j].size(), 10 + j);
  }
  EXPECT_EQ(swapped[0].size(), 41u);
  EXPECT_EQ(swapped[1].size(), 40u);
}

TEST(Collectives, AFailedCollectiveAbortsTheTransport) {
  auto mesh = small_inbox_mesh({1 << 20, 64});
  std::vector<float> buffer(100, 1.0f);
  CollectiveOptions options;
  options.timeout = 300ms;
  // Member 1 never takes part: member 0 times out, and its transport is aborted.
  auto status = RingAllreduce(mesh->member(0), {0, 1}, options).run(buffer, 0);
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.error().kind, ErrorKind::timeout);
  auto after = mesh->member(0).send(1, make_message("act", 0, 10), Traffic::kPipeline);
  ASSERT_FALSE(after.ok());
  EXPECT_EQ(after.error().kind, ErrorKind::aborted);
  EXPECT_EQ(after.message(), status.message());
}

TEST(Topology, BadFilesNameLine) {
  auto missing_pair = parse_topology_string("[[region]]\nname='a'\nnodes=1\n[[region]]\nname='b'\nnodes=1\n", "t.toml");
  ASSERT_FALSE(missing_pair.ok());
  EXPECT_NE(missing_pair.message().find("no link between regions \"a\" and \"b\""), std::string::npos);
  auto negative = parse_topology_string(
      "[[region]]\nname='a'\nnodes=2\nlatency_ms=1\nbandwidth_mbps=-5\n", "t.toml");
  ASSERT_FALSE(negative.ok());
  EXPECT_EQ(negative.message(), "t.toml:5: region[0].bandwidth_mbps must be in [0.001, 1000000000], got -5");
  auto unknown = parse_topology_string(
      "[[region]]\nname='a'\nnodes=1\n[[link]]\nfrom='a'\nto='zz'\nlatency_ms=1\nbandwidth_mbps=5\n", "t.toml");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.message(), "t.toml:6: unknown region \"zz\"");
}

TEST(Topology, ScaledLinksStretchLatencyAndBandwidth) {
  EmulationScale scale{4.0, 0.5};
  LinkSpec scaled = scale.apply(LinkSpec{10, 1000});
  EXPECT_DOUBLE_EQ(scaled.latency_ms, 40);
  EXPECT_DOUBLE_EQ(scaled.bandwidth_mbps, 125);
}
