// solvernet dht: a bare DHT node that others bootstrap from.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>

#include "cli/command.h"
#include "cli/signals.h"
#include "core/log.h"
#include "core/process.h"
#include "net/discovery.h"

namespace sn::cli {
namespace {

struct DhtArgs {
  int port = 4222;
  std::vector<std::string> bootstrap;
  int parent_pid = 0;
  std::string orphan_cleanup_dir;
};

// The devnet's temp dir (node keys, chain keys, logs) when the devnet died
// without cleaning up (SIGKILL): wait (a few seconds at most) for its nodes to
// release their data dirs (they exit at once when the devnet dies), then remove it.
void remove_orphaned_dir(const std::filesystem::path& dir) {
  std::cerr << "dht: the devnet died; removing " << dir.string() << " once its nodes have stopped" << std::endl;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
    if (entry.is_directory())
      wait_until_unlocked(entry.path(), std::max(std::chrono::milliseconds(0),
                                                 std::chrono::duration_cast<std::chrono::milliseconds>(
                                                     deadline - std::chrono::steady_clock::now())));
  std::filesystem::remove_all(dir, ec);
  if (ec) std::cerr << "dht: cannot remove " << dir.string() << ": " << ec.message() << std::endl;
}

int run_dht(const DhtArgs& args) {
  block_stop_signals();
  if (args.parent_pid > 0) die_with_parent(args.parent_pid);
  init_logging("dht", "warn");
  auto discovery = net::Discovery::start(static_cast<uint16_t>(args.port), args.bootstrap);
  if (!discovery.ok()) return fail("dht", discovery.message(), 2);
  std::cout << "dht bootstrap listening on 127.0.0.1:" << (*discovery)->port() << std::endl;
  const int signal_number = wait_for_stop_signal();
  // A parent that stopped us itself is alive and cleans up; one that died
  // does not, and nothing is left to say goodbye to: its nodes go with it.
  if (args.parent_pid > 0 && parent_gone(args.parent_pid)) {
    if (!args.orphan_cleanup_dir.empty()) remove_orphaned_dir(args.orphan_cleanup_dir);
    std::cout << std::flush;
    ::_exit(128 + signal_number);
  }
  (*discovery)->stop();
  return 0;
}

CommandRegistration dht_command("dht", "Run a DHT bootstrap node for others to join",
                                [](CLI::App& app) -> std::function<int()> {
                                  auto args = std::make_shared<DhtArgs>();
                                  app.add_option("--port", args->port, "UDP port")->check(CLI::Range(0, 65535))->capture_default_str();
                                  app.add_option("--bootstrap", args->bootstrap, "Another DHT node to join, HOST:PORT");
                                  app.add_option("--parent-pid", args->parent_pid, "Exit when this process dies (used by devnet)")
                                      ->group("");
                                  app.add_option("--orphan-cleanup-dir", args->orphan_cleanup_dir,
                                                 "With --parent-pid: remove this dir if the parent died")
                                      ->group("");
                                  return [args] { return run_dht(*args); };
                                });

}  // namespace
}  // namespace sn::cli
