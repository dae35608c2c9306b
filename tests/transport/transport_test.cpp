// Two job members in one process, each with a real gRPC server on 127.0.0.1,
// exchanging signed tensor messages over emulated links.
#include <gtest/gtest.h>


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

TEST(Topology, BadFilesNameLine) {
  auto missing_pair = parse_topology_string("[[region]]\nname='a'\nnodes=1\n[[region]]\nname='b'\nnodes=1\n", "t.toml");
  ASSERT_FALSE(missing_pair.ok());
  EXPECT_NE(missing_pair.message().find("no link between regions \"a\" and \"b\""), std::string::npos);
  auto negative = parse_topology_string(
      "[[region]]\nname='a'\nnodes=2\nlatency_ms=1\nbandwidth_mbps=-5\n", "t.toml");
  ASSERT_FALSE(negative.ok());
  EXPECT_EQ(negative.message(), "t.toml:5: region[0].bandwidth_mbps must be > 0, got -5");
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
