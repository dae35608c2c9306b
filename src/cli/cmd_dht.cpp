// solvernet dht: a bare DHT node that others bootstrap from.
#include <iostream>

#include "cli/command.h"
#include "cli/signals.h"
#include "core/log.h"
#include "net/discovery.h"

namespace sn::cli {
namespace {

struct DhtArgs {
  int port = 4222;
  std::vector<std::string> bootstrap;
};

int run_dht(const DhtArgs& args) {
  block_stop_signals();
  init_logging("dht", "warn");
  auto discovery = net::Discovery::start(static_cast<uint16_t>(args.port), args.bootstrap);
  if (!discovery.ok()) return fail("dht", discovery.message(), 2);
  std::cout << "dht bootstrap listening on 127.0.0.1:" << (*discovery)->port() << std::endl;
  wait_for_stop_signal();
  (*discovery)->stop();
  return 0;
}

CommandRegistration dht_command("dht", "Run a DHT bootstrap node for others to join",
                                [](CLI::App& app) -> std::function<int()> {
                                  auto args = std::make_shared<DhtArgs>();
                                  app.add_option("--port", args->port, "UDP port")->capture_default_str();
                                  app.add_option("--bootstrap", args->bootstrap, "Another DHT node to join, HOST:PORT");
                                  return [args] { return run_dht(*args); };
                                });

}  // namespace
}  // namespace sn::cli
