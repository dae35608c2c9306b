// What the multi-process inference tests share (beyond tests/common): waiting
// for a node's address, and a swarm of a DHT bootstrap and nodes on
// 127.0.0.1 that is stopped when it goes out of scope.
#pragma once

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "../common/test_support.h"

namespace sn::infer::testing {

namespace fs = std::filesystem;

using test::scratch;
using test::solvernet_bin;
using test::wait_for_text;

// Waits until LOG shows "listening on ADDRESS"; returns ADDRESS ("" if not within 60 s).
inline std::string wait_for_address(const fs::path& log) {
  if (!wait_for_text(log, "listening on ", std::chrono::seconds(60))) return "";
  std::string text = read_file(log).value_or("");
  auto at = text.find("listening on ") + 13;
  return text.substr(at, text.find(' ', at) - at);
}

// A DHT bootstrap and nodes; every process is stopped when it goes out of scope.
struct Swarm {
  fs::path dir;
  std::string bootstrap;
  ChildProcess dht;
  std::vector<ChildProcess> nodes;

  explicit Swarm(const fs::path& d) : dir(d) {
    fs::create_directories(dir);
    SpawnOptions quiet;
    quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
    int port = free_loopback_port(SOCK_DGRAM).value();
    dht = std::move(ChildProcess::spawn({solvernet_bin(), "dht", "--port", std::to_string(port)}, quiet).value());
    bootstrap = "127.0.0.1:" + std::to_string(port);
  }
  ~Swarm() {
    for (auto& node : nodes) node.terminate();
    dht.terminate();
  }
  // Starts `solvernet node` with FLAGS; returns its index.
  int start(const std::vector<std::string>& flags) {
    const int i = static_cast<int>(nodes.size());
    SpawnOptions options;
    options.stdout_path = options.stderr_path = log(i);
    std::vector<std::string> argv = {solvernet_bin(), "node",        "--data",    node_dir(i).string(),
                                     "--listen",      "127.0.0.1:0", "--dht-port", "0",
                                     "--bootstrap",   bootstrap};
    argv.insert(argv.end(), flags.begin(), flags.end());
    nodes.push_back(std::move(ChildProcess::spawn(argv, options).value()));
    return i;
  }
  // A block server of SPEC ("MODEL[:FIRST-LAST]"), once it says it is serving.
  int serve(const std::string& spec, std::vector<std::string> flags = {}) {
    flags.insert(flags.begin(), {"--serve", spec});
    const int i = start(flags);
    EXPECT_TRUE(wait_for_text(log(i), "serving blocks", std::chrono::seconds(60))) << read_file(log(i)).value_or("");
    return i;
  }
  fs::path node_dir(int i) const { return dir / ("n" + std::to_string(i)); }
  fs::path log(int i) const { return dir / ("n" + std::to_string(i) + ".log"); }
  std::string node_id(int i) const { return NodeKey::load_or_create(node_dir(i)).value().node_id(); }

  // Whether `solvernet peers` lists node I yet (its announcement is in the DHT).
  bool listed(int i) const {
    SpawnOptions options;
    options.stdout_path = dir / "peers.out";
    options.stderr_path = dir / "peers.err";
    fs::remove(options.stdout_path);
    auto child = ChildProcess::spawn({solvernet_bin(), "peers", "--bootstrap", bootstrap, "--json"}, options);
    if (!child.ok() || child->wait_for(std::chrono::seconds(30)) != 0) return false;
    return read_file(options.stdout_path).value_or("").find(node_id(i)) != std::string::npos;
  }
};

}  // namespace sn::infer::testing
