// Measured links: a real probe server (gRPC over TLS on 127.0.0.1) answers
// signed probes, paced through the link emulator, refuses forged, replayed and
// too frequent ones; the estimates match the emulated link.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "net/probe.h"
#include "net/rpc.h"

namespace sn::net {
namespace {

using namespace std::chrono_literals;

constexpr char kTopology[] = R"(
name = "probe-test"
[[region]]
name = "a"
nodes = 1
latency_ms = 1
bandwidth_mbps = 10000
[[region]]
name = "b"
nodes = 1
latency_ms = 1
bandwidth_mbps = 10000
[[link]]
from = "a"
to = "b"
latency_ms = 20
bandwidth_mbps = 80
)";

struct Server {
  NodeKey key = NodeKey::generate();
  std::unique_ptr<ProbeService> service;
  RunningServer running;
  solvernet::v1::NodeInfo info;

  explicit Server(ProbeServiceOptions options) {
    options.key = &key;
    service = std::make_unique<ProbeService>(std::move(options));
    auto started = start_server("127.0.0.1:0", service->service(), key);
    EXPECT_TRUE(started.ok()) << started.message();
    running = std::move(started).value();
    info.set_node_id(key.node_id());
    info.set_public_key(key.public_key().data(), key.public_key().size());
    info.set_address("127.0.0.1:" + std::to_string(running.port));
    info.set_region("b");
  }
  ~Server() { running.server->Shutdown(std::chrono::system_clock::now() + 1s); }
};

Topology topology() {
  auto parsed = parse_topology_string(kTopology, "probe-test");
  EXPECT_TRUE(parsed.ok()) << parsed.message();
  return *parsed;
}

TEST(Probe, EstimatesMatchTheEmulatedLink) {
  ProbeServiceOptions server_options;
  server_options.region = "b";
  server_options.topology = topology();
  Server server(server_options);
  NodeKey key = NodeKey::generate();
  ProberOptions options;
  options.key = &key;
  options.region = "a";
  options.topology = topology();
  options.peers = [&] { return std::vector<solvernet::v1::NodeInfo>{server.info}; };
  Prober prober(options);
  for (int i = 0; i < 3; ++i) prober.round();
  auto estimates = prober.estimates();
  ASSERT_EQ(estimates.size(), 1u);
  const auto& e = estimates[0];
  EXPECT_EQ(e.peer_node_id(), server.key.node_id());
  EXPECT_EQ(e.samples(), 3);
  // One-way latency 20 ms each way; the payload sized to about target_seconds at 80 Mbps.
  EXPECT_NEAR(e.rtt_ms() / 2, 20.0, 20.0 * 0.15) << e.rtt_ms();
  EXPECT_NEAR(e.mbps(), 80.0, 80.0 * 0.15) << e.mbps();
  EXPECT_GT(e.measured_at_ms(), 0);
}

TEST(Probe, UnpacedLinkIsFast) {
  Server server(ProbeServiceOptions{});
  NodeKey key = NodeKey::generate();
  ProberOptions options;
  options.key = &key;
  ControlSigner signer(key);
  auto sample = probe_peer(server.info, options, signer, nullptr, 0);
  ASSERT_TRUE(sample.ok()) << sample.message();
  EXPECT_LT(sample->rtt_ms, 1000.0);  // loopback, no emulated latency
  EXPECT_GT(sample->mbps, 0.0);
  EXPECT_GE(sample->payload_bytes, static_cast<int64_t>(kMinProbePayload));
  EXPECT_LE(sample->payload_bytes, static_cast<int64_t>(kMaxProbePayload));
}

TEST(Probe, PeerAnswersAtMostKPerMinutePerProber) {
  ProbeServiceOptions server_options;
  server_options.per_minute = 3;
  Server server(server_options);
  NodeKey key = NodeKey::generate(), other = NodeKey::generate();
  ProberOptions options;
  options.key = &key;
  options.rtt_probes = 5;
  ControlSigner signer(key);
  auto sample = probe_peer(server.info, options, signer, nullptr, 0);
  ASSERT_FALSE(sample.ok());
  EXPECT_EQ(sample.error().kind, ErrorKind::resource_exhausted) << sample.message();
  EXPECT_NE(sample.message().find("limit is 3"), std::string::npos) << sample.message();
  EXPECT_EQ(server.service->refused(), 1);
  // Another prober has its own budget.
  ProberOptions other_options;
  other_options.key = &other;
  other_options.rtt_probes = 1;
  ControlSigner other_signer(other);
  auto fits = probe_peer(server.info, other_options, other_signer, nullptr, 0);
  EXPECT_TRUE(fits.ok()) << "1 RTT probe and at most 2 payloads fit a limit of 3: " << fits.message();
}

TEST(Probe, ForgedAndReplayedProbesAreRefused) {
  Server server(ProbeServiceOptions{});
  NodeKey key = NodeKey::generate();
  ControlSigner signer(key);
  auto stub = solvernet::v1::Probe::NewStub(make_channel(server.info.address(), server.info.node_id()));
  auto call = [&](const solvernet::v1::ProbeRequest& request) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 5s);
    solvernet::v1::ProbeReply reply;
    return stub->Probe(&context, request, &reply);
  };
  solvernet::v1::ProbeRequest request;
  request.set_region("a");
  *request.mutable_auth() = signer.sign("Probe", "probe:" + server.info.node_id(), probe_body("a", 0));
  ASSERT_TRUE(call(request).ok());
  // The same request again: a replay.
  auto replay = call(request);
  EXPECT_EQ(replay.error_code(), grpc::StatusCode::PERMISSION_DENIED) << replay.error_message();
  EXPECT_NE(replay.error_message().find("replay"), std::string::npos) << replay.error_message();
  // Signed for region "a" and no payload, sent with a payload: the signature no longer holds.
  *request.mutable_auth() = signer.sign("Probe", "probe:" + server.info.node_id(), probe_body("a", 0));
  request.set_payload(std::string(1000, 'x'));
  auto forged = call(request);
  EXPECT_EQ(forged.error_code(), grpc::StatusCode::PERMISSION_DENIED) << forged.error_message();
  EXPECT_NE(forged.error_message().find("bad signature"), std::string::npos) << forged.error_message();
  // Signed for another node: refused here.
  request.clear_payload();
  *request.mutable_auth() = signer.sign("Probe", "probe:" + key.node_id(), probe_body("a", 0));
  EXPECT_EQ(call(request).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  // Over the payload limit.
  const int64_t big = kMaxProbePayloadAccepted + 1;
  request.set_payload(std::string(static_cast<size_t>(big), '\0'));
  *request.mutable_auth() = signer.sign("Probe", "probe:" + server.info.node_id(), probe_body("a", big));
  auto oversized = call(request);
  EXPECT_EQ(oversized.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << oversized.error_message();
  EXPECT_EQ(server.service->refused(), 4);
}

TEST(Probe, EstimateIsBestRttAndMedianThroughput) {
  std::vector<ProbeSample> samples = {{50, 90, 1}, {41, 100, 1}, {45, 10, 1}, {60, 95, 1}};
  auto e = estimate_of("peer", samples, 123);
  EXPECT_EQ(e.rtt_ms(), 41);
  EXPECT_EQ(e.mbps(), 92.5);
  EXPECT_EQ(e.samples(), 4);
  EXPECT_EQ(e.measured_at_ms(), 123);
}

}  // namespace
}  // namespace sn::net
