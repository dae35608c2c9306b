// Placement policy (sched/placement.h) as a library: candidates in, stages ×
// replicas out, with measurements supplied by the caller (constants here).
#include <gtest/gtest.h>

#include <set>

#include "core/keys.h"
#include "sched/placement.h"

namespace sn::sched {
namespace {

solvernet::v1::NodeInfo node(const std::string& region, const std::string& host, int port) {
  NodeKey key = NodeKey::generate();
  solvernet::v1::NodeInfo info;
  info.set_node_id(key.node_id());
  info.set_public_key(key.public_key().data(), key.public_key().size());
  info.set_address(host + ":" + std::to_string(port));
  info.set_region(region);
  info.set_cores(4);
  return info;
}

JobConfig job(int stages, int replicas) {
  JobConfig j;
  j.model.layers = 4;
  j.model.d_model = 32;
  j.model.heads = 2;
  j.model.d_ff = 64;
  j.model.vocab = 64;
  j.model.seq_len = 16;
  j.parallel.stages = stages;
  j.parallel.replicas = replicas;
  j.parallel.micro_batches = 2;
  j.train.global_batch = 8;
  return j;
}

// Two regions joined by a slow link; fast links inside each.
Topology two_regions() {
  auto topology = parse_topology_string(
      "name = \"two\"\n[[region]]\nname = \"a\"\nnodes = 2\nlatency_ms = 0.5\nbandwidth_mbps = 10000\n"
      "[[region]]\nname = \"b\"\nnodes = 2\nlatency_ms = 0.5\nbandwidth_mbps = 10000\n"
      "[[link]]\nfrom = \"a\"\nto = \"b\"\nlatency_ms = 50\nbandwidth_mbps = 10\n",
      "two.toml");
  EXPECT_TRUE(topology.ok()) << topology.message();
  return *topology;
}

Measurements constants(int* calls) {
  Measurements m;
  m.microbatch_seconds = [calls](const JobConfig&) { ++*calls; return 0.01; };
  m.step_update_seconds = [calls](const JobConfig&) { ++*calls; return 0.002; };
  m.message_cost = [calls](size_t, size_t) -> Result<net::MessageCost> {
    ++*calls;
    return net::MessageCost{1e-4, 1e-9};
  };
  return m;
}

TEST(Placement, ReplicasOfAStageShareARegionAndEveryNodeIsUsedOnce) {
  PlacementRequest request;
  request.job = job(2, 2);
  request.topology = two_regions();
  request.host_cores = 64;  // as if the nodes had a host each
  std::vector<solvernet::v1::NodeInfo> nodes = {node("a", "10.0.0.1", 1), node("b", "10.0.0.2", 1),
                                                node("a", "10.0.0.3", 1), node("b", "10.0.0.4", 1)};
  int calls = 0;
  auto placed = place_job(request, nodes, constants(&calls));
  ASSERT_TRUE(placed.ok()) << placed.message();
  EXPECT_EQ(calls, 3);  // each measurement once
  ASSERT_EQ(placed->members.size(), 4u);
  std::set<std::string> ids;
  for (size_t i = 0; i < placed->members.size(); ++i) {
    const auto& m = placed->members[i];
    ids.insert(m.node_id);
    EXPECT_EQ(static_cast<size_t>(m.stage * 2 + m.replica), i);  // index = stage × replicas + replica
  }
  EXPECT_EQ(ids.size(), 4u);
  // The slow link carries only the pipeline, not the all-reduce: each stage in one region.
  EXPECT_EQ(placed->members[0].region, placed->members[1].region);
  EXPECT_EQ(placed->members[2].region, placed->members[3].region);
  EXPECT_NE(placed->members[0].region, placed->members[2].region);
  EXPECT_GT(placed->predicted_iteration_s, 0);
  EXPECT_EQ(placed->prediction["host_cpu_share"], 1.0);
  EXPECT_EQ(placed->to_json()["stages"].size(), 2u);
}

TEST(Placement, NodesOnOneHostShareItsCores) {
  PlacementRequest request;
  request.job = job(2, 2);
  request.topology = two_regions();
  request.host_cores = 2;
  std::vector<solvernet::v1::NodeInfo> nodes = {node("a", "127.0.0.1", 1), node("a", "127.0.0.1", 2),
                                                node("b", "127.0.0.1", 3), node("b", "127.0.0.1", 4)};
  int calls = 0;
  auto placed = place_job(request, nodes, constants(&calls));
  ASSERT_TRUE(placed.ok()) << placed.message();
  EXPECT_DOUBLE_EQ(placed->prediction["host_cpu_share"].get<double>(), 2.0);  // 4 workers on 2 cores
  EXPECT_GT(placed->predicted_iteration_s, placed->prediction["predicted_dedicated_cores_s"].get<double>());
  // The step reported lies between the time-sharing bounds.
  EXPECT_GE(placed->predicted_iteration_s, placed->prediction["time_shared_lower_s"].get<double>());
  EXPECT_LE(placed->predicted_iteration_s, placed->prediction["time_shared_upper_s"].get<double>());
}

TEST(Placement, WithoutATopologyNodesAreTakenInIdOrderAndNothingIsMeasured) {
  PlacementRequest request;
  request.job = job(2, 1);
  std::vector<solvernet::v1::NodeInfo> nodes = {node("x", "127.0.0.1", 1), node("x", "127.0.0.1", 2),
                                                node("x", "127.0.0.1", 3)};
  int calls = 0;
  auto placed = place_job(request, nodes, constants(&calls));
  ASSERT_TRUE(placed.ok()) << placed.message();
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(placed->algo, "naive");
  ASSERT_EQ(placed->members.size(), 2u);
  std::vector<std::string> sorted = {nodes[0].node_id(), nodes[1].node_id(), nodes[2].node_id()};
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(placed->members[0].node_id, sorted[0]);
  EXPECT_EQ(placed->members[1].node_id, sorted[1]);
}

// No topology: the links the nodes measured and announced (net/probe.h) plan
// the job, as a topology of the same figures would.
TEST(Placement, WithoutATopologyMeasuredLinksPlanTheJob) {
  std::vector<solvernet::v1::NodeInfo> nodes = {node("a", "10.0.0.1", 1), node("b", "10.0.0.2", 1),
                                                node("a", "10.0.0.3", 1), node("b", "10.0.0.4", 1)};
  auto measure = [&](size_t from, size_t to, double rtt_ms, double mbps) {
    auto* e = nodes[from].add_links();
    e->set_peer_node_id(nodes[to].node_id());
    e->set_rtt_ms(rtt_ms);
    e->set_mbps(mbps);
    e->set_samples(5);
  };
  // Fast inside a region, slow between: the two_regions() figures, measured from one end.
  measure(0, 2, 1, 10000);
  measure(1, 3, 1, 10000);
  for (size_t a : {0, 2})
    for (size_t b : {1, 3}) measure(a, b, 100, 10);
  PlacementRequest request;
  request.job = job(2, 2);
  request.host_cores = 64;
  request.measured_links = true;
  int calls = 0;
  auto placed = place_job(request, nodes, constants(&calls));
  ASSERT_TRUE(placed.ok()) << placed.message();
  EXPECT_EQ(placed->links, "measured");
  EXPECT_TRUE(placed->unmeasured.empty());
  EXPECT_EQ(placed->algo, "ours");
  EXPECT_EQ(placed->members[0].region, placed->members[1].region);
  EXPECT_EQ(placed->members[2].region, placed->members[3].region);
  EXPECT_NE(placed->members[0].region, placed->members[2].region);
  EXPECT_EQ(placed->to_json()["links"], "measured");

  // A pair nobody measured is planned with the default and named.
  nodes[1].clear_links();
  placed = place_job(request, nodes, constants(&calls));
  ASSERT_TRUE(placed.ok()) << placed.message();
  ASSERT_EQ(placed->unmeasured.size(), 1u);
  const std::string b1 = nodes[1].node_id().substr(0, 8), b3 = nodes[3].node_id().substr(0, 8);
  EXPECT_TRUE(placed->unmeasured[0] == b1 + "-" + b3 || placed->unmeasured[0] == b3 + "-" + b1) << placed->unmeasured[0];
  EXPECT_EQ(placed->to_json()["unmeasured_links"].size(), 1u);
}

TEST(Placement, TooFewNodesOrAnUnknownRegionIsRefused) {
  PlacementRequest request;
  request.job = job(2, 2);
  request.topology = two_regions();
  int calls = 0;
  auto few = place_job(request, {node("a", "h", 1), node("b", "h", 2)}, constants(&calls));
  ASSERT_FALSE(few.ok());
  EXPECT_EQ(few.error().kind, ErrorKind::unavailable);
  EXPECT_NE(few.message().find("needs 4 nodes"), std::string::npos) << few.message();
  auto stray = place_job(request, {node("a", "h", 1), node("b", "h", 2), node("a", "h", 3), node("mars", "h", 4)},
                         constants(&calls));
  ASSERT_FALSE(stray.ok());
  EXPECT_EQ(stray.error().exit_code, 2);
  EXPECT_NE(stray.message().find("\"mars\""), std::string::npos) << stray.message();
  EXPECT_EQ(calls, 0);  // refused before measuring anything
}

}  // namespace
}  // namespace sn::sched
