// What tests that start real solvernet processes share: where the binary and
// the sources are (ctest sets SOLVERNET_BIN and SOLVERNET_SOURCE_DIR), fresh
// scratch dirs, running a command to completion, and waiting for a log line.
#pragma once

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
#include "core/process.h"

namespace sn::test {

namespace fs = std::filesystem;

inline std::string env_or_throw(const char* name) {
  const char* value = std::getenv(name);
  if (!value) throw std::runtime_error(std::string(name) + " is not set (run the test through ctest)");
  return value;
}

inline std::string solvernet_bin() { return env_or_throw("SOLVERNET_BIN"); }
inline fs::path source_path(const std::string& relative) { return fs::path(env_or_throw("SOLVERNET_SOURCE_DIR")) / relative; }

// A fresh, empty temp dir "sn-PREFIX-NAME-PID".
inline fs::path scratch(const std::string& prefix, const std::string& name) {
  auto dir = fs::temp_directory_path() / ("sn-" + prefix + "-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

struct CommandRun {
  int status = -1;  // exit status; -9 if it outlived LIMIT and was killed; -1 if it did not start
  std::string out;
  std::string err;
};

// Runs ARGV to completion (killed after LIMIT), its output in DIR/out.txt and DIR/err.txt.
inline CommandRun run_command(const std::vector<std::string>& argv, const fs::path& dir, std::chrono::seconds limit) {
  SpawnOptions options;
  options.stdout_path = dir / "out.txt";
  options.stderr_path = dir / "err.txt";
  fs::remove(options.stdout_path);
  fs::remove(options.stderr_path);
  CommandRun r;
  auto child = ChildProcess::spawn(argv, options);
  if (!child.ok()) return r;
  auto status = child->wait_for(limit);
  if (!status) child->kill_now();
  r.status = status.value_or(-9);
  r.out = read_file(options.stdout_path).value_or("");
  r.err = read_file(options.stderr_path).value_or("");
  return r;
}

// Whether FILE contains TEXT within LIMIT.
inline bool wait_for_text(const fs::path& file, const std::string& text, std::chrono::seconds limit) {
  for (auto until = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < until;) {
    if (read_file(file).value_or("").find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// The job dir a `train --job-dir JOBS_DIR` made (its one entry; empty: none).
inline fs::path only_job_dir(const fs::path& jobs_dir) {
  fs::path out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(jobs_dir, ec)) out = entry.path();
  return out;
}

// A `solvernet dht` bootstrap listening on a free UDP port of 127.0.0.1
// (ADDRESS is "127.0.0.1:PORT"). Waits for its "listening" line, so nodes and
// clients started next find it; a port another process took between the pick
// and the bind is retried with another.
struct Bootstrap {
  ChildProcess process;
  std::string address;
};
inline Result<Bootstrap> start_dht(const fs::path& log) {
  std::string why;
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto port = free_loopback_port(SOCK_DGRAM);
    if (!port.ok()) return port.error();
    SpawnOptions options;
    options.stdout_path = options.stderr_path = log;
    auto dht = ChildProcess::spawn({solvernet_bin(), "dht", "--port", std::to_string(*port)}, options);
    if (!dht.ok()) return dht.error();
    const std::string address = "127.0.0.1:" + std::to_string(*port);
    for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
         std::chrono::steady_clock::now() < until && dht->running();) {
      if (read_file(log).value_or("").find("dht bootstrap listening on " + address) != std::string::npos)
        return Bootstrap{std::move(dht).value(), address};
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    why = read_file(log).value_or("");
  }
  return make_error("no DHT bootstrap started on 127.0.0.1: {}", why);
}

// A node of one's own (not a devnet's) in REGION (of tests/train/data/churn-net.toml), its
// data dir DIR/n<I>; EXTRA adds flags.
inline Result<ChildProcess> own_node(const fs::path& dir, int i, const std::string& region, const std::string& bootstrap,
                                     const SpawnOptions& quiet, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {solvernet_bin(), "node", "--data", (dir / ("n" + std::to_string(i))).string(),
                                   "--listen", "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap, "--region",
                                   region};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return ChildProcess::spawn(argv, quiet);
}

// The address the node NODE_ID (empty: any) printed in LOG as it started
// ("node ID listening on ADDRESS (…"), waiting up to LIMIT; empty if none.
inline std::string node_address(const fs::path& log, const std::string& node_id,
                                std::chrono::seconds limit = std::chrono::seconds(30)) {
  const std::string line = node_id.empty() ? " listening on " : "node " + node_id + " listening on ";
  if (!wait_for_text(log, line, limit)) return "";
  const std::string text = read_file(log).value_or("");
  const auto at = text.find(line) + line.size();
  return text.substr(at, text.find(' ', at) - at);
}

// A DHT bootstrap and COUNT nodes of one's own (own_node: the first half in
// region a, the rest in b), their output in DIR/procs.log; LAST_FLAGS are added
// to the last node's, EVERY_FLAGS to each node's. The processes stop when it goes.
struct OwnNetwork {
  Bootstrap dht;
  std::vector<ChildProcess> nodes;
};
inline Result<OwnNetwork> own_network(const fs::path& dir, int count, const std::vector<std::string>& last_flags = {},
                                      const std::vector<std::string>& every_flags = {}) {
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "procs.log";
  SN_ASSIGN(auto dht, start_dht(dir / "dht.log"));
  OwnNetwork net{std::move(dht), {}};
  for (int i = 0; i < count; ++i) {
    std::vector<std::string> flags = every_flags;
    if (i == count - 1) flags.insert(flags.end(), last_flags.begin(), last_flags.end());
    SN_ASSIGN(auto node, own_node(dir, i, i < count / 2 ? "a" : "b", net.dht.address, quiet, flags));
    net.nodes.push_back(std::move(node));
  }
  return net;
}

}  // namespace sn::test
