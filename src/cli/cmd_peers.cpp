// solvernet peers: list the live nodes of the network.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <iostream>

#include "cli/command.h"
#include "core/log.h"
#include "net/announce.h"
#include "net/discovery.h"

namespace sn::cli {
namespace {

struct PeersArgs {
  std::vector<std::string> bootstrap;
  bool json = false;
  int wait_ms = 3000;
  int expect = 0;
};

int run_peers(const PeersArgs& args) {
  init_logging("peers", "error");
  auto discovery = net::Discovery::start(0, args.bootstrap);
  if (!discovery.ok()) return fail("peers", discovery.message(), discovery.error().exit_code);
  // Nothing at the bootstrap is not an empty network: say which it is.
  if (auto joined = (*discovery)->wait_for_bootstrap(std::chrono::milliseconds(std::clamp(args.wait_ms, 1000, 3000)));
      !joined.ok())
    return fail("peers", joined.message(), joined.error().exit_code);
  // A fresh DHT client needs a moment to fill its routing table, so ask
  // repeatedly: until --expect nodes show up, or for the whole --wait-ms.
  const size_t wanted = args.expect > 0 ? static_cast<size_t>(args.expect) : SIZE_MAX;
  auto listed = (*discovery)->wait_for_nodes(wanted, std::chrono::milliseconds(args.wait_ms));
  if (!listed.ok()) return fail("peers", listed.message());
  const std::vector<solvernet::v1::NodeInfo>& nodes = *listed;
  (*discovery)->stop();
  const int64_t now = net::unix_millis();
  if (args.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& n : nodes)
      out.push_back({{"node_id", n.node_id()}, {"address", n.address()}, {"region", n.region()},
                     {"cores", n.cores()}, {"memory_bytes", n.memory_bytes()},
                     {"compute_gflops", n.compute_gflops()}, {"timestamp_ms", n.timestamp_ms()},
                     {"busy_job_id", n.busy_job_id()}});
    std::cout << out.dump(2) << std::endl;
  } else {
    std::cout << fmt::format("{:<10} {:<22} {:<12} {:>5} {:>8} {:>8} {:>6}  {}\n", "node", "address", "region", "cores",
                             "mem GB", "GFLOP/s", "age s", "job");
    for (const auto& n : nodes)
      std::cout << fmt::format("{:<10} {:<22} {:<12} {:>5} {:>8.1f} {:>8.1f} {:>6.1f}  {}\n", n.node_id().substr(0, 8),
                               n.address(), n.region(), n.cores(), static_cast<double>(n.memory_bytes()) / 1e9,
                               n.compute_gflops(), static_cast<double>(now - n.timestamp_ms()) / 1e3,
                               n.busy_job_id().empty() ? "idle" : n.busy_job_id());
    std::cout << nodes.size() << " node(s)" << std::endl;
  }
  if (args.expect > 0 && nodes.size() < static_cast<size_t>(args.expect))
    return fail("peers", fmt::format("saw {} of the {} expected nodes within {} ms", nodes.size(), args.expect, args.wait_ms));
  return 0;
}

CommandRegistration peers_command("peers", "List the live nodes of the network",
                                  [](CLI::App& app) -> std::function<int()> {
                                    auto args = std::make_shared<PeersArgs>();
                                    app.add_option("--bootstrap", args->bootstrap, "DHT node to ask, HOST:PORT")->required();
                                    app.add_flag("--json", args->json, "Print a JSON array");
                                    app.add_option("--wait-ms", args->wait_ms, "How long to wait for answers")->capture_default_str();
                                    app.add_option("--expect", args->expect, "Stop waiting once this many nodes are seen (exit 1 if fewer)");
                                    return [args] { return run_peers(*args); };
                                  });

}  // namespace
}  // namespace sn::cli
