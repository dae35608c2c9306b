// Routing a chain over block servers: the cheapest cover by latency, compute
// and load; sub-spans; avoided servers; a gap named.
#include <gtest/gtest.h>

#include "infer/route.h"

namespace sn::infer {
namespace {

ServerSpan server(const std::string& id, int first, int end, double throughput, double rtt_s, double load = 0) {
  return ServerSpan{id, id + ":1", first, end, throughput, load, rtt_s};
}

std::string describe(const std::vector<Hop>& chain) {
  std::string out;
  for (const auto& hop : chain)
    out += hop.server.node_id + "[" + std::to_string(hop.first_block) + "," + std::to_string(hop.end_block) + ")";
  return out;
}

TEST(RouteChain, PrefersFewerHopsWhenLatencyDominates) {
  // One server holding everything 50 ms away against four 10 ms hops: 4 × 10 < 50.
  std::vector<ServerSpan> servers = {server("far", 0, 4, 1000, 0.050), server("a", 0, 1, 1000, 0.010),
                                     server("b", 1, 2, 1000, 0.010), server("c", 2, 3, 1000, 0.010),
                                     server("d", 3, 4, 1000, 0.010)};
  auto chain = route_chain(servers, 0, 4);
  ASSERT_TRUE(chain.ok()) << chain.message();
  EXPECT_EQ(describe(*chain), "a[0,1)b[1,2)c[2,3)d[3,4)");
  servers[0].rtt_s = 0.030;  // now one 30 ms hop beats four 10 ms ones
  chain = route_chain(servers, 0, 4);
  ASSERT_TRUE(chain.ok());
  EXPECT_EQ(describe(*chain), "far[0,4)");
}

TEST(RouteChain, WeighsComputeAndLoad) {
  // Same latency; "slow" computes 10 blocks/s, "fast" 1000 blocks/s.
  std::vector<ServerSpan> servers = {server("slow", 0, 2, 10, 0.001), server("fast", 0, 2, 1000, 0.001)};
  EXPECT_EQ(describe(*route_chain(servers, 0, 2)), "fast[0,2)");
  // Fully loaded, "fast" at 15 blocks/s counts as half that: 2 / 15 · 2 = 0.27 s against 2 / 10 = 0.2 s.
  servers[1].throughput = 15;
  servers[1].load = 1.0;
  EXPECT_EQ(describe(*route_chain(servers, 0, 2)), "slow[0,2)");
}

TEST(RouteChain, UsesSubSpansAndAvoidsServers) {
  // [0, 3) and [2, 4) overlap: the chain takes [0, 3) then [3, 4) of the second.
  std::vector<ServerSpan> servers = {server("x", 0, 3, 1000, 0.01), server("y", 2, 4, 1000, 0.01)};
  auto chain = route_chain(servers, 0, 4);
  ASSERT_TRUE(chain.ok()) << chain.message();
  ASSERT_EQ(chain->size(), 2u);
  EXPECT_EQ(chain->back().first_block, chain->front().end_block);
  EXPECT_EQ(chain->back().server.node_id, "y");
  // Replacing one hop's blocks only.
  auto part = route_chain(servers, 2, 3, {"x"});
  ASSERT_TRUE(part.ok());
  EXPECT_EQ(describe(*part), "y[2,3)");
  auto gap = route_chain(servers, 0, 4, {"x"});
  ASSERT_FALSE(gap.ok());
  EXPECT_EQ(gap.error().kind, ErrorKind::not_found);
  EXPECT_NE(gap.message().find("block 0"), std::string::npos) << gap.message();
  // A server announcing no throughput (not measured) is not used.
  servers[1].throughput = 0;
  auto none = route_chain(servers, 0, 4);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.message().find("block 3"), std::string::npos) << none.message();
}

}  // namespace
}  // namespace sn::infer
