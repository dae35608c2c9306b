// Faults at random moments (issue 13, "Nothing hangs"): over 10 seeds, a
// devnet training a small job with one spare has one fault injected at a
// moment drawn from the seed, anywhere from node start-up to the final fetch:
// a node killed (SIGKILL), frozen for good (SIGSTOP), frozen for a while, two
// nodes killed, or the DHT bootstrap killed. Whatever the fault, every run
// must end within a bound, either completed (a finite loss for every step) or
// with a clean error (exit 1, a line naming the problem, no crash), and
// leave no process and no temp dir behind.
#include <gtest/gtest.h>
#include <signal.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/fs.h"
#include "core/process.h"
#include "../common/process_tree.h"
#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

fs::path data(const std::string& name) { return test::source_path("tests/train/data") / name; }

enum class Fault { kill_node, freeze_node, pause_node, kill_two_nodes, kill_dht };
constexpr const char* kFaultNames[] = {"kill a node", "freeze a node", "pause a node 3 s", "kill two nodes",
                                       "kill the DHT"};
constexpr int64_t kSteps = 24;

// The devnet's children (the `solvernet node` processes, the DHT), found once they all run.
struct Children {
  std::vector<pid_t> nodes;
  pid_t dht = -1;
  std::set<pid_t> all;
};

Children children_of(pid_t devnet, size_t nodes, std::chrono::seconds limit) {
  Children found;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    found = Children{};
    found.all = test::descendants(devnet);
    for (pid_t pid : found.all) {
      const std::string cmd = test::cmdline_of(pid);
      if (cmd.find(" node ") != std::string::npos) found.nodes.push_back(pid);
      if (cmd.find(" dht ") != std::string::npos) found.dht = pid;
    }
    if (found.nodes.size() == nodes && found.dht > 0) break;
    std::this_thread::sleep_for(50ms);
  }
  return found;
}

std::string last_line(const std::string& text) {
  std::string t = text;
  while (!t.empty() && t.back() == '\n') t.pop_back();
  auto at = t.rfind('\n');
  return at == std::string::npos ? t : t.substr(at + 1);
}

}  // namespace

TEST(Faults, EveryRunEndsCompletedOrWithACleanError) {
  int completed = 0, clean_errors = 0;
  for (int seed = 1; seed <= 10; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(static_cast<uint32_t>(seed));
    const auto fault = static_cast<Fault>(std::uniform_int_distribution<int>(0, 4)(rng));
    const int target = std::uniform_int_distribution<int>(0, 4)(rng);
    const int other = (target + 1 + std::uniform_int_distribution<int>(0, 3)(rng)) % 5;
    // From node start-up (setup ~2 s) through the steps and the final fetch (~15 s on 2 busy cores).
    const auto moment = std::chrono::milliseconds(std::uniform_int_distribution<int>(500, 14000)(rng));

    auto dir = test::scratch("faults", "seed" + std::to_string(seed));
    SpawnOptions options;
    options.stdout_path = dir / "out.json";
    options.stderr_path = dir / "err.txt";
    auto devnet = ChildProcess::spawn(
        {test::solvernet_bin(), "devnet", "--job", data("churn.toml").string(), "--topology",
         data("churn-net.toml").string(), "--no-chain", "--json", "--nodes", "5", "--spares", "1", "--peer-timeout-s",
         "4", "--steps", std::to_string(kSteps), "--out", (dir / "model.safetensors").string()},
        options);
    ASSERT_TRUE(devnet.ok()) << devnet.message();
    const auto started = std::chrono::steady_clock::now();
    Children kids = children_of(devnet->pid(), 5, 60s);
    ASSERT_EQ(kids.nodes.size(), 5u) << read_file(dir / "err.txt").value_or("");
    std::this_thread::sleep_until(started + moment);

    std::set<pid_t> frozen;
    switch (fault) {
      case Fault::kill_node: ::kill(kids.nodes[target], SIGKILL); break;
      case Fault::freeze_node:
        ::kill(kids.nodes[target], SIGSTOP);
        frozen.insert(kids.nodes[target]);
        break;
      case Fault::pause_node:
        ::kill(kids.nodes[target], SIGSTOP);
        std::this_thread::sleep_for(3s);
        ::kill(kids.nodes[target], SIGCONT);
        break;
      case Fault::kill_two_nodes:
        ::kill(kids.nodes[target], SIGKILL);
        std::this_thread::sleep_for(1s);
        ::kill(kids.nodes[other], SIGKILL);
        break;
      case Fault::kill_dht: ::kill(kids.dht, SIGKILL); break;
    }

    // Bounded: peer timeouts of 4 s, a recovery or two, 24 tiny steps.
    auto status = devnet->wait_for(150s);
    const std::string err = read_file(dir / "err.txt").value_or("");
    const std::string out = read_file(dir / "out.json").value_or("");
    if (!status) {
      ADD_FAILURE() << kFaultNames[static_cast<int>(fault)] << " at " << moment.count()
                    << " ms: the devnet did not end within 150 s; stderr:\n" << err;
      devnet->terminate();
    }
    std::string outcome;
    if (status && *status == 0) {
      ++completed;
      auto summary = nlohmann::json::parse(out, nullptr, false);
      ASSERT_FALSE(summary.is_discarded()) << out << err;
      auto losses = summary["losses"].get<std::vector<double>>();
      EXPECT_EQ(losses.size(), static_cast<size_t>(kSteps));
      for (double loss : losses) EXPECT_TRUE(std::isfinite(loss));
      EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
      outcome = "completed, " + std::to_string(summary["recovery"]["recoveries"].size()) + " recovery(ies)";
    } else if (status) {
      ++clean_errors;
      EXPECT_EQ(*status, 1) << "a fault in the network is not bad input, nor a crash; stderr:\n" << err;
      // One line names the problem; indented lines below it may add the nodes' last log lines.
      const auto at = err.find("solvernet devnet: ");
      EXPECT_NE(at, std::string::npos) << "no error line naming the problem; stderr:\n" << err;
      const std::string line = at == std::string::npos ? last_line(err) : err.substr(at, err.find('\n', at) - at);
      outcome = "error: " + line.substr(0, 160);
      EXPECT_FALSE(fs::exists(dir / "model.safetensors")) << "a failed run left a model file";
    }
    for (const char* crash : {"terminate called", "Segmentation fault", "what():", "Assertion"})
      EXPECT_EQ(err.find(crash), std::string::npos) << crash << " in stderr:\n" << err;
    std::printf("seed %2d  %-17s node %d  at %5lld ms  →  %s\n", seed, kFaultNames[static_cast<int>(fault)], target,
                static_cast<long long>(moment.count()), outcome.c_str());

    // A frozen node learns of its parent's death when it wakes; then nothing may be left.
    for (pid_t pid : frozen) ::kill(pid, SIGCONT);
    std::string temp_dir;
    if (auto at = err.find("logs in "); at != std::string::npos)
      temp_dir = err.substr(at + 8, err.find('\n', at) - at - 8);
    auto left = test::wait_until_gone(kids.all, temp_dir, 25s);
    if (!temp_dir.empty()) EXPECT_FALSE(fs::exists(temp_dir)) << "the devnet's temp dir is left: " << temp_dir;
    for (pid_t pid : left) {
      ADD_FAILURE() << "left running after the devnet ended: " << pid << " " << test::cmdline_of(pid);
      ::kill(pid, SIGKILL);
    }
    fs::remove_all(dir);
  }
  std::printf("%d completed, %d ended with a clean error, of 10\n", completed, clean_errors);
}
