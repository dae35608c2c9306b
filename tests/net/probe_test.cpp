// Measured links: a real probe server (gRPC over TLS on 127.0.0.1) answers
// signed probes, paced through the link emulator, refuses forged, replayed and
// too frequent ones; the estimates match the emulated link.
#include <gtest/gtest.h>

#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "core/fs.h"
#include "core/process.h"
#include "net/discovery.h"
#include "net/probe.h"
#include "net/rpc.h"
#include "../common/test_support.h"

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

TEST(Probe, EstimateIsBestRttAndBestThroughput) {
  std::vector<ProbeSample> samples = {{50, 90, 1}, {41, 100, 1}, {45, 10, 1}, {60, 95, 1}};
  auto e = estimate_of("peer", samples, 123);
  EXPECT_EQ(e.rtt_ms(), 41);
  EXPECT_EQ(e.mbps(), 100);
  EXPECT_EQ(e.samples(), 4);
  EXPECT_EQ(e.measured_at_ms(), 123);
}

// A node holding a job pauses its prober (ProberOptions.paused): while the
// predicate holds, no probe reaches the peer and no peer is even listed;
// once it no longer holds, rounds resume.
TEST(Probe, PausedProberSendsNothingUntilResumed) {
  ProbeServiceOptions server_options;
  server_options.per_minute = 100000;
  Server server(server_options);
  NodeKey key = NodeKey::generate();
  std::atomic<bool> paused{true};
  std::atomic<int> listings{0}, rounds{0};
  ProberOptions options;
  options.key = &key;
  options.every = 300ms;
  options.rtt_probes = 1;
  options.peers = [&] {
    listings.fetch_add(1);
    return std::vector<solvernet::v1::NodeInfo>{server.info};
  };
  options.paused = [&] { return paused.load(); };
  // Pausing at the end of a round, in the prober's thread, leaves no probe in flight.
  std::atomic<bool> pause_after_round{false};
  options.on_update = [&](const std::vector<solvernet::v1::LinkEstimate>&) {
    rounds.fetch_add(1);
    if (pause_after_round.exchange(false)) paused = true;
  };
  Prober prober(options);
  prober.start();
  std::this_thread::sleep_for(2500ms);  // the first round would have run at once, and again every 0.3 s
  EXPECT_EQ(server.service->answered(), 0);
  EXPECT_EQ(listings.load(), 0);

  auto wait_for = [](auto done) {
    for (auto until = std::chrono::steady_clock::now() + 20s; !done() && std::chrono::steady_clock::now() < until;)
      std::this_thread::sleep_for(20ms);
    return done();
  };
  paused = false;
  ASSERT_TRUE(wait_for([&] { return rounds.load() >= 2; })) << "no probe round within 20 s of resuming";
  EXPECT_GT(server.service->answered(), 0);

  pause_after_round = true;
  ASSERT_TRUE(wait_for([&] { return paused.load(); }));
  const int64_t answered = server.service->answered();
  const int listed = listings.load();
  std::this_thread::sleep_for(2500ms);
  EXPECT_EQ(server.service->answered(), answered);
  EXPECT_EQ(listings.load(), listed);

  paused = false;
  EXPECT_TRUE(wait_for([&] { return server.service->answered() > answered; })) << "probes did not resume";
  prober.stop();
}

TEST(Probe, LinkMatrixFromEstimatesAveragesBothEndsAndFillsGaps) {
  std::vector<solvernet::v1::NodeInfo> nodes(3);
  for (int i = 0; i < 3; ++i) {
    nodes[static_cast<size_t>(i)].set_node_id(std::string(64, static_cast<char>('a' + i)));
    nodes[static_cast<size_t>(i)].set_region(i < 2 ? "x" : "y");
  }
  auto add = [&](int from, int to, double rtt, double mbps) {
    auto* e = nodes[static_cast<size_t>(from)].add_links();
    e->set_peer_node_id(nodes[static_cast<size_t>(to)].node_id());
    e->set_rtt_ms(rtt);
    e->set_mbps(mbps);
  };
  add(0, 1, 40, 100);
  add(1, 0, 44, 120);  // both ends: averaged
  add(2, 0, 80, 50);   // one end only
  std::vector<std::pair<int, int>> missing;
  auto m = link_matrix_from_estimates(nodes, kUnmeasuredLink, &missing);
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_DOUBLE_EQ(m->at(0, 1).latency_ms, 21);
  EXPECT_DOUBLE_EQ(m->at(1, 0).bandwidth_mbps, 110);
  EXPECT_DOUBLE_EQ(m->at(0, 2).latency_ms, 40);
  EXPECT_DOUBLE_EQ(m->at(2, 0).bandwidth_mbps, 50);
  EXPECT_DOUBLE_EQ(m->at(1, 2).latency_ms, kUnmeasuredLink.latency_ms);
  EXPECT_EQ(missing, (std::vector<std::pair<int, int>>{{1, 2}}));
  EXPECT_EQ(m->region_of, (std::vector<int>{0, 0, 1}));
}

TEST(Probe, AnnouncedEstimatesKeepTheAnnouncementWithinTheDhtLimit) {
  NodeKey key = NodeKey::generate();
  solvernet::v1::NodeInfo info;
  info.set_node_id(key.node_id());
  std::vector<solvernet::v1::LinkEstimate> estimates(200);
  for (auto& e : estimates) {
    e.set_peer_node_id(NodeKey::generate().node_id());
    e.set_rtt_ms(40.123);
    e.set_mbps(99.5);
    e.set_samples(5);
    e.set_measured_at_ms(1700000000000);
  }
  const size_t announced = set_link_estimates(info, estimates);
  EXPECT_GE(announced, 16u);  // the default --probe-peers fit
  EXPECT_LT(announced, estimates.size());
  EXPECT_LE(info.ByteSizeLong(), kMaxAnnouncedInfoBytes);
  EXPECT_EQ(info.links(0).peer_node_id(), estimates[0].peer_node_id());  // newest peers first
}

TEST(Probe, AdaptiveTimeoutFollowsRttAndStepHistoryAboveAFloor) {
  EXPECT_EQ(adaptive_timeout(5000ms, 40, 0), 5000ms);          // short links: the floor
  EXPECT_EQ(adaptive_timeout(5000ms, 1000, 0), 8000ms);        // 8 × a 1 s round trip
  EXPECT_EQ(adaptive_timeout(5000ms, 100, 4.0), 12800ms);      // + 3 × the slowest 4 s step
  EXPECT_EQ(adaptive_timeout(1000ms, 1e300, 0), std::chrono::milliseconds(86400000));
  std::vector<solvernet::v1::NodeInfo> nodes(2);
  nodes[0].set_node_id("a");
  nodes[1].set_node_id("b");
  auto* e = nodes[0].add_links();
  e->set_peer_node_id("b");
  e->set_rtt_ms(30);
  e = nodes[1].add_links();
  e->set_peer_node_id("elsewhere");  // not among NODES: ignored
  e->set_rtt_ms(900);
  EXPECT_EQ(slowest_rtt_ms(nodes), 30);
}

// Real node processes on 127.0.0.1, each given the topology and its region:
// the probes go through the link emulator, and the announced estimates match
// the file's latency and bandwidth within 15%.
constexpr char kDevnetTopology[] = R"(
name = "probe-devnet"
[[region]]
name = "west"
nodes = 2
latency_ms = 20
bandwidth_mbps = 50
[[region]]
name = "east"
nodes = 1
latency_ms = 1
bandwidth_mbps = 10000
[[link]]
from = "west"
to = "east"
latency_ms = 40
bandwidth_mbps = 100
)";

TEST(ProbeDevnet, EstimatesAreWithinFifteenPercentOfTheTopology) {
  const char* bin_env = std::getenv("SOLVERNET_BIN");
  if (!bin_env) GTEST_SKIP() << "SOLVERNET_BIN is not set (ctest sets it)";
  const std::string bin = bin_env;
  ASSERT_TRUE(std::filesystem::exists(bin)) << "SOLVERNET_BIN " << bin << " does not exist: build target solvernet";
  const auto dir = std::filesystem::temp_directory_path() / ("probe-devnet-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "topology.toml") << kDevnetTopology;
  auto topology = parse_topology_file(dir / "topology.toml");
  ASSERT_TRUE(topology.ok()) << topology.message();
  auto port = free_loopback_port(SOCK_DGRAM);
  ASSERT_TRUE(port.ok());
  SpawnOptions spawn;
  spawn.stdout_path = spawn.stderr_path = dir / "dht.log";
  auto dht = ChildProcess::spawn({bin, "dht", "--port", std::to_string(*port)}, spawn);
  ASSERT_TRUE(dht.ok()) << dht.message();
  const std::string bootstrap = "127.0.0.1:" + std::to_string(*port);
  const std::vector<std::string> regions = {"west", "west", "east"};
  std::vector<ChildProcess> nodes;
  for (size_t i = 0; i < regions.size(); ++i) {
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir / ("node" + std::to_string(i) + ".log");
    auto node = ChildProcess::spawn({bin, "node", "--data", (dir / ("n" + std::to_string(i))).string(), "--listen",
                                     "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap, "--region",
                                     regions[i], "--topology", (dir / "topology.toml").string(), "--probe-every-s",
                                     "1", "--probe-limit", "1000"},
                                    options);
    ASSERT_TRUE(node.ok()) << node.message();
    nodes.push_back(std::move(node).value());
  }
  auto discovery = Discovery::start(0, {bootstrap});
  ASSERT_TRUE(discovery.ok()) << discovery.message();
  // Every node has announced estimates of both peers, each from 3 rounds at least.
  std::vector<solvernet::v1::NodeInfo> listed;
  auto complete = [&] {
    if (listed.size() != regions.size()) return false;
    for (const auto& n : listed) {
      if (n.links_size() != static_cast<int>(regions.size()) - 1) return false;
      for (const auto& e : n.links())
        if (e.samples() < 3) return false;
    }
    return true;
  };
  const auto deadline = std::chrono::steady_clock::now() + 50s;
  while (std::chrono::steady_clock::now() < deadline) {
    auto got = (*discovery)->list_nodes(2s);
    if (got.ok()) listed = *got;
    if (complete()) break;
    std::this_thread::sleep_for(500ms);
  }
  ASSERT_TRUE(complete()) << "not every node announced 3 rounds of estimates of both peers within 50 s (" << listed.size()
                          << " nodes listed); logs in " << dir;
  std::map<std::string, std::string> region_of;
  for (const auto& n : listed) region_of[n.node_id()] = n.region();
  for (const auto& n : listed)
    for (const auto& e : n.links()) {
      const LinkSpec link = topology->link(topology->region_index(n.region()), topology->region_index(region_of[e.peer_node_id()]));
      SCOPED_TRACE(n.region() + " -> " + region_of[e.peer_node_id()]);
      EXPECT_NEAR(e.rtt_ms() / 2, link.latency_ms, 0.15 * link.latency_ms) << "rtt " << e.rtt_ms() << " ms";
      EXPECT_NEAR(e.mbps(), link.bandwidth_mbps, 0.15 * link.bandwidth_mbps) << e.mbps() << " Mbps";
      std::printf("%s -> %s: one-way %.2f ms (file %.0f), %.1f Mbps (file %.0f), %d rounds\n", n.region().c_str(),
                  region_of[e.peer_node_id()].c_str(), e.rtt_ms() / 2, link.latency_ms, e.mbps(),
                  link.bandwidth_mbps, e.samples());
    }
  (*discovery)->stop();
  for (auto& node : nodes) node.terminate();
  dht->terminate();
  std::filesystem::remove_all(dir);
}

// The node command pauses its prober while its runtime holds a job (what
// the prober does then is PausedProberSendsNothingUntilResumed's): two node
// processes probing every 0.5 s take a training job, and each logs "probes
// paused" as it holds the job and "probes resumed" once the job is over. The
// job runs 80 steps (seconds): the file's few steps took 0.3 s, less than the
// prober's one-second look, and a node could finish without seeing it.
TEST(ProbeDevnet, NodeHoldingAJobPausesItsProbes) {
  const char* bin_env = std::getenv("SOLVERNET_BIN");
  const char* source_env = std::getenv("SOLVERNET_SOURCE_DIR");
  if (!bin_env || !source_env) GTEST_SKIP() << "SOLVERNET_BIN or SOLVERNET_SOURCE_DIR is not set (ctest sets them)";
  const std::string bin = bin_env;
  const std::filesystem::path data = std::filesystem::path(source_env) / "tests/train/data";
  const auto dir = std::filesystem::temp_directory_path() / ("probe-pause-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  auto dht = test::start_dht(dir / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  const std::string bootstrap = dht->address;
  std::vector<ChildProcess> nodes;
  for (int i = 0; i < 2; ++i) {
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir / ("node" + std::to_string(i) + ".log");
    auto node = ChildProcess::spawn({bin, "node", "--data", (dir / ("n" + std::to_string(i))).string(), "--listen",
                                     "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap, "--region",
                                     i == 0 ? "a" : "b", "--probe-every-s", "0.5", "--probe-limit", "100000"},
                                    options);
    ASSERT_TRUE(node.ok()) << node.message();
    nodes.push_back(std::move(node).value());
  }
  SpawnOptions client;
  client.stdout_path = dir / "train.out";
  client.stderr_path = dir / "train.err";
  auto train = ChildProcess::spawn({bin, "train", "--job", (data / "churn-pipeline.toml").string(), "--steps", "80", "--bootstrap",
                                    bootstrap, "--topology", (data / "churn-net.toml").string(), "--key",
                                    (dir / "client.key").string(), "--wait-s", "30", "--json"},
                                   client);
  ASSERT_TRUE(train.ok()) << train.message();
  ASSERT_EQ(train->wait_for(120s), std::optional<int>(0)) << read_file(dir / "train.err").value_or("");
  for (int i = 0; i < 2; ++i) {
    const auto node_log = dir / ("node" + std::to_string(i) + ".log");
    // The lease ends with the job; the prober looks about every second.
    test::wait_for_text(node_log, "probes resumed", 20s);
    const std::string log = read_file(node_log).value_or("");
    const auto paused = log.find("probes paused"), resumed = log.find("probes resumed");
    ASSERT_NE(paused, std::string::npos) << "node " << i << ":\n" << log;
    ASSERT_NE(resumed, std::string::npos) << "node " << i << ":\n" << log;
    EXPECT_LT(paused, resumed) << log;
  }
  for (auto& node : nodes) node.terminate();
  dht->process.terminate();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace sn::net
