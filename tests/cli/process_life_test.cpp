// Multi-process tests of process lifetimes, on 127.0.0.1 with real solvernet
// processes: a SIGKILLed devnet leaves nothing behind (even with a node frozen
// mid-step), `chain up` refuses a
// port another anvil holds, one node per data dir, a node SIGKILLed and
// started again at once on its address, an unreachable bootstrap is
// reported, a dead node still listed is not placed, and signals give 130/143
// and stop corpus preparation at once.
#include <gtest/gtest.h>
#include <signal.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "../common/process_tree.h"
#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return test::solvernet_bin(); }
fs::path source(const std::string& rel) { return test::source_path(rel); }

fs::path scratch(const std::string& name) { return test::scratch("life", name); }

using test::CommandRun;
CommandRun run(const std::vector<std::string>& argv, const fs::path& dir, std::chrono::seconds limit = 120s) {
  return test::run_command(argv, dir, limit);
}

// Waits until FILE contains TEXT; fails if PROCESS exits first or LIMIT passes.
::testing::AssertionResult wait_for_text(ChildProcess& process, const fs::path& file, const std::string& text,
                                         std::chrono::seconds limit = 60s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (read_file(file).value_or("").find(text) != std::string::npos) return ::testing::AssertionSuccess();
    if (!process.running())
      return ::testing::AssertionFailure() << "exited before \"" << text << "\": " << read_file(file).value_or("");
    std::this_thread::sleep_for(100ms);
  }
  return ::testing::AssertionFailure() << "no \"" << text << "\" within " << limit.count()
                                       << " s: " << read_file(file).value_or("");
}

using test::alive;
using test::cmdline_of;
using test::comm_of;
using test::descendants;
using test::wait_until_gone;


std::string node_id_in(const fs::path& data_dir) {
  auto key = NodeKey::load_or_create(data_dir);
  return key.ok() ? key->node_id() : "";
}

fs::path anvil_binary() {
  return source("contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil");
}

// A small job: one stage per node, a tiny model, the fortunes corpus.
fs::path write_job(const fs::path& dir, int stages, int64_t steps, const std::string& corpus = "/usr/share/games/fortunes/computers") {
  auto path = dir / "job.toml";
  std::ofstream(path) << "name = \"life\"\n[model]\nlayers = 2\nd_model = 32\nheads = 2\nd_ff = 64\nvocab = 128\nseq_len = 16\n"
                      << "[data]\ncorpus = \"" << corpus << "\"\ncache_dir = \"" << (dir / "cache").string() << "\"\n"
                      << "[parallel]\nstages = " << stages << "\nreplicas = 1\nmicro_batches = 1\n"
                      << "[train]\nglobal_batch = 8\nsteps = " << steps << "\n";
  return path;
}

class Life : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(bin())) << bin();
  }
};

}  // namespace

// ---- kind 4: children tied to their parent ----

std::string last_lines(const fs::path& file, size_t n) {
  std::string text = read_file(file).value_or("(no log)");
  size_t at = text.size();
  for (size_t i = 0; i <= n && at != std::string::npos && at > 0; ++i) at = text.rfind('\n', at - 1);
  return at == std::string::npos ? text : text.substr(at + 1);
}

// A devnet of 4 nodes training a long job, killed with SIGKILL by the tests below.
struct RunningDevnet {
  std::optional<ChildProcess> process;
  std::string temp_dir;      // its node and chain keys
  std::set<pid_t> tree;      // dht, nodes, anvil
  std::vector<pid_t> nodes;  // the `solvernet node` processes
};

void start_training_devnet(const fs::path& dir, RunningDevnet& out) {
  SpawnOptions options;
  options.stdout_path = dir / "out.txt";
  options.stderr_path = dir / "err.txt";
  auto devnet = ChildProcess::spawn({bin(), "devnet", "--job", source("tests/train/data/slow.toml").string(),
                                     "--topology", source("tests/train/data/lan.toml").string(), "--out",
                                     (dir / "m.safetensors").string()},
                                    options);
  ASSERT_TRUE(devnet.ok());
  out.process = std::move(devnet).value();
  // The chain is up (anvil, keys in the temp dir) and training has begun.
  ASSERT_TRUE(wait_for_text(*out.process, dir / "err.txt", "step ", 120s));
  std::string err = read_file(dir / "err.txt").value_or("");
  auto at = err.find("logs in ");
  ASSERT_NE(at, std::string::npos) << err;
  out.temp_dir = err.substr(at + 8, err.find('\n', at) - at - 8);
  ASSERT_TRUE(fs::exists(out.temp_dir));
  out.tree = descendants(out.process->pid());
  for (pid_t pid : out.tree)
    if (cmdline_of(pid).find(" node ") != std::string::npos) out.nodes.push_back(pid);
  ASSERT_EQ(out.nodes.size(), 4u);
}

TEST_F(Life, SigkillOfTheDevnetLeavesNoProcessAndNoTempDir) {
  auto dir = scratch("sigkill");
  RunningDevnet devnet;
  ASSERT_NO_FATAL_FAILURE(start_training_devnet(dir, devnet));
  std::set<std::string> names;
  for (pid_t pid : devnet.tree) names.insert(comm_of(pid));
  EXPECT_TRUE(names.count("anvil")) << "anvil is not a direct child of the devnet (a wrapper?)";
  EXPECT_FALSE(names.count("node")) << "anvil runs through its Node.js wrapper";
  EXPECT_GE(devnet.tree.size(), 6u);  // dht, 4 nodes, anvil

  ::kill(devnet.process->pid(), SIGKILL);
  devnet.process->wait();
  const auto killed_at = std::chrono::steady_clock::now();
  // An orphaned node or DHT exits at once (measured: about 0.5 s for the
  // whole tree), not after its graceful shutdown (which took 2.5–14 s, gRPC's
  // own shutdown waiting on a poll). 5 s is a generous floor on a loaded machine.
  auto left = wait_until_gone(devnet.tree, devnet.temp_dir, 5s);
  std::printf("%zu processes of the devnet: %zu gone %.1f s after SIGKILL\n", devnet.tree.size(),
              devnet.tree.size() - left.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count());
  for (pid_t pid : left) ADD_FAILURE() << "still running 5 s after the devnet was killed: " << pid << " " << comm_of(pid);
  EXPECT_FALSE(fs::exists(devnet.temp_dir)) << "the devnet's temp dir (node and chain keys) is still there: " << devnet.temp_dir;
  for (pid_t pid : left) ::kill(pid, SIGKILL);
  fs::remove_all(dir);
}

// A node blocked mid-step on a peer that froze must not outlive the devnet by
// its step timeout: a node whose devnet died exits at once.
TEST_F(Life, NodesWaitingOnAFrozenPeerStillDieWithTheDevnet) {
  auto dir = scratch("frozen-peer");
  RunningDevnet devnet;
  ASSERT_NO_FATAL_FAILURE(start_training_devnet(dir, devnet));
  const pid_t frozen = devnet.nodes.front();
  ASSERT_EQ(::kill(frozen, SIGSTOP), 0);
  std::this_thread::sleep_for(2s);  // the other nodes now wait for its messages
  ::kill(devnet.process->pid(), SIGKILL);
  devnet.process->wait();
  std::set<pid_t> others;
  for (pid_t pid : devnet.nodes)
    if (pid != frozen) others.insert(pid);
  auto left = wait_until_gone(others, "", 5s);
  for (pid_t pid : left) {
    std::string data = cmdline_of(pid);
    data = data.substr(data.find("--data ") + 7);
    data = data.substr(0, data.find(' '));
    ADD_FAILURE() << "node " << pid << " still running 5 s after the devnet was killed; its log ends:\n"
                  << last_lines(data + ".log", 8);
    if (std::getenv("LIFE_DEBUG_STACKS"))
      std::system(("gdb -p " + std::to_string(pid) + " -batch -ex 'thread apply all bt' 2>/dev/null | grep -E '^#|^Thread' | grep -v '__' | head -150").c_str());
  }
  // Woken, the frozen node finds its SIGTERM and goes too; then the temp dir is removed.
  ::kill(frozen, SIGCONT);
  auto all_left = wait_until_gone(devnet.tree, devnet.temp_dir, 25s);
  for (pid_t pid : all_left) ADD_FAILURE() << "still running 25 s after SIGCONT: " << pid << " " << cmdline_of(pid);
  EXPECT_FALSE(fs::exists(devnet.temp_dir)) << devnet.temp_dir;
  for (pid_t pid : all_left) ::kill(pid, SIGKILL);
  for (pid_t pid : left) ::kill(pid, SIGKILL);
  fs::remove_all(dir);
}

TEST_F(Life, ChainUpRefusesAPortAnotherAnvilHolds) {
  if (!fs::exists(anvil_binary())) GTEST_SKIP() << "no anvil binary at " << anvil_binary();
  auto dir = scratch("orphan-anvil");
  auto port = free_loopback_port(SOCK_STREAM);
  ASSERT_TRUE(port.ok());
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "orphan.log";
  // Stands for the orphan of an earlier run: an anvil that is not chain up's own.
  auto orphan = ChildProcess::spawn({anvil_binary().string(), "--host", "127.0.0.1", "--port", std::to_string(*port), "--silent"},
                                    quiet);
  ASSERT_TRUE(orphan.ok()) << orphan.message();
  for (int i = 0; i < 300 && !tcp_port_listening(*port); ++i) std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(tcp_port_listening(*port)) << read_file(dir / "orphan.log").value_or("");

  CommandRun up = run({bin(), "chain", "up", "--port", std::to_string(*port), "--deployment", (dir / "d.json").string()},
                      dir, 60s);
  EXPECT_NE(up.status, 0);
  EXPECT_EQ(up.out.find("anvil at"), std::string::npos) << "chain up reported another process's chain as its own";
  EXPECT_NE(up.err.find("port " + std::to_string(*port) + " on 127.0.0.1 is already in use by pid " +
                        std::to_string(orphan->pid()) + " (anvil)"),
            std::string::npos)
      << up.err;
  EXPECT_FALSE(fs::exists(dir / "d.json"));
  EXPECT_TRUE(orphan->running());
  orphan->terminate();
  fs::remove_all(dir);
}

// ---- kind 5: one node per data dir; dead nodes are not placed ----

TEST_F(Life, SecondNodeOnOneDataDirExitsTwoNamingThePid) {
  auto dir = scratch("datadir");
  SpawnOptions options;
  options.stdout_path = options.stderr_path = dir / "first.log";
  auto first = ChildProcess::spawn({bin(), "node", "--data", (dir / "data").string(), "--listen", "127.0.0.1:0",
                                    "--dht-port", "0"},
                                   options);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(wait_for_text(*first, dir / "first.log", "listening on"));
  CommandRun second = run({bin(), "node", "--data", (dir / "data").string(), "--listen", "127.0.0.1:0", "--dht-port", "0"},
                          dir, 30s);
  EXPECT_EQ(second.status, 2);
  EXPECT_NE(second.err.find("in use by another process (pid " + std::to_string(first->pid()) + ")"), std::string::npos)
      << second.err;
  EXPECT_TRUE(first->running());
  // Once the first one has stopped, the dir is free again.
  first->terminate();
  SpawnOptions again;
  again.stdout_path = again.stderr_path = dir / "third.log";
  auto third = ChildProcess::spawn({bin(), "node", "--data", (dir / "data").string(), "--listen", "127.0.0.1:0",
                                    "--dht-port", "0"},
                                   again);
  ASSERT_TRUE(third.ok());
  EXPECT_TRUE(wait_for_text(*third, dir / "third.log", "listening on"));
  third->terminate();
  fs::remove_all(dir);
}

// Whether the loopback TCP connection from local port FROM to port TO has
// been accepted by the process listening on TO (/proc/net/tcp and tcp6, as
// gRPC listens dual-stack: its socket there has an inode once accept() took
// it from the listen queue).
bool accepted(int from, int to) {
  const auto port_of = [](const std::string& address) {
    const auto colon = address.rfind(':');
    return colon == std::string::npos ? -1 : std::stoi(address.substr(colon + 1), nullptr, 16);
  };
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream tcp(table);
    std::string line;
    std::getline(tcp, line);  // the header
    while (std::getline(tcp, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >> inode;
      if (port_of(local) == to && port_of(remote) == from && !inode.empty() && inode != "0") return true;
    }
  }
  return false;
}

// A node killed (SIGKILL) while a connection to it was open, and started
// again at once on its address, is not refused: the killed node's side of
// that connection lingers in TIME-WAIT for ~60 s, and the port check bound
// without SO_REUSEADDR took that for "port N is in use" (exit 2), so a lost
// member could not come back where its client looks for it.
TEST_F(Life, NodeRestartedOnItsAddressRightAfterSigkillIsNotRefused) {
  auto dir = scratch("restart-at-once");
  const fs::path data = dir / "data";
  SpawnOptions first_log;
  first_log.stdout_path = first_log.stderr_path = dir / "first.log";
  auto first = ChildProcess::spawn({bin(), "node", "--data", data.string(), "--listen", "127.0.0.1:0", "--dht-port", "0"},
                                   first_log);
  ASSERT_TRUE(first.ok());
  const std::string address = test::node_address(dir / "first.log", "");
  ASSERT_FALSE(address.empty()) << read_file(dir / "first.log").value_or("");
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  // A client's connection, held open across the kill (as a job's client holds one).
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(port));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof(to)), 0) << std::strerror(errno);
  sockaddr_in from{};
  socklen_t from_size = sizeof(from);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&from), &from_size), 0);
  // Unaccepted, it would be reset at the kill and leave nothing behind.
  bool taken = false;
  for (auto until = std::chrono::steady_clock::now() + 10s; !taken && std::chrono::steady_clock::now() < until;) {
    taken = accepted(ntohs(from.sin_port), port);
    if (!taken) std::this_thread::sleep_for(20ms);
  }
  ASSERT_TRUE(taken) << "the node did not accept the connection";
  ::kill(first->pid(), SIGKILL);
  first->wait();
  ::close(fd);  // the killed node's side closed first: it is the one left in TIME-WAIT
  SpawnOptions again_log;
  again_log.stdout_path = again_log.stderr_path = dir / "again.log";
  auto again = ChildProcess::spawn({bin(), "node", "--data", data.string(), "--listen", address, "--dht-port", "0"},
                                   again_log);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(wait_for_text(*again, dir / "again.log", "listening on " + address));
  EXPECT_EQ(read_file(dir / "again.log").value_or("").find("is in use"), std::string::npos)
      << read_file(dir / "again.log").value_or("");
  again->terminate();
  fs::remove_all(dir);
}

TEST_F(Life, DeadNodeStillListedIsNotPlaced) {
  auto dir = scratch("dead-node");
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
  auto dht_port = free_loopback_port(SOCK_DGRAM);
  ASSERT_TRUE(dht_port.ok());
  const std::string bootstrap = "127.0.0.1:" + std::to_string(*dht_port);
  auto dht = ChildProcess::spawn({bin(), "dht", "--port", std::to_string(*dht_port)}, quiet);
  ASSERT_TRUE(dht.ok());
  ASSERT_TRUE(wait_for_text(*dht, dir / "dht.log", "listening"));
  std::vector<ChildProcess> nodes;
  for (int i = 0; i < 3; ++i) {
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir / ("node" + std::to_string(i) + ".log");
    auto node = ChildProcess::spawn({bin(), "node", "--data", (dir / ("n" + std::to_string(i))).string(), "--listen",
                                     "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap},
                                    options);
    ASSERT_TRUE(node.ok());
    nodes.push_back(std::move(node).value());
  }
  CommandRun peers = run({bin(), "peers", "--bootstrap", bootstrap, "--expect", "3", "--wait-ms", "30000"}, dir, 60s);
  ASSERT_EQ(peers.status, 0) << peers.err;
  // SIGKILL: no withdrawal, so the DHT lists it until its announcement goes stale.
  const std::string dead = node_id_in(dir / "n0");
  ::kill(nodes[0].pid(), SIGKILL);
  nodes[0].wait();
  auto job = write_job(dir, 2, 2);
  CommandRun train = run({bin(), "train", "--job", job.string(), "--bootstrap", bootstrap, "--json", "--wait-s", "30"},
                         dir, 120s);
  ASSERT_EQ(train.status, 0) << train.err;
  auto summary = nlohmann::json::parse(train.out.substr(train.out.find('{')));
  std::set<std::string> placed;
  for (const auto& stage : summary["placement"]["stages"])
    for (const auto& member : stage) placed.insert(member["node_id"].get<std::string>());
  EXPECT_EQ(placed.size(), 2u);
  EXPECT_FALSE(placed.count(dead)) << "the SIGKILLed node was placed";
  EXPECT_EQ(placed, (std::set<std::string>{node_id_in(dir / "n1"), node_id_in(dir / "n2")}));
  for (auto& n : nodes) n.terminate();
  dht->terminate();
  fs::remove_all(dir);
}

// ---- kind 6: an unreachable bootstrap is not an empty network ----

TEST_F(Life, UnreachableBootstrapIsReported) {
  auto dir = scratch("bootstrap");
  auto port = free_loopback_port(SOCK_DGRAM);  // nothing listens there
  ASSERT_TRUE(port.ok());
  const std::string nowhere = "127.0.0.1:" + std::to_string(*port);
  CommandRun peers = run({bin(), "peers", "--bootstrap", nowhere, "--wait-ms", "1500"}, dir, 30s);
  EXPECT_EQ(peers.status, 1);
  EXPECT_NE(peers.err.find("the bootstrap " + nowhere + " did not answer"), std::string::npos) << peers.err;
  EXPECT_EQ(peers.out.find("0 node(s)"), std::string::npos) << peers.out;

  CommandRun unresolved = run({bin(), "peers", "--bootstrap", "no-such-host.invalid:4222", "--wait-ms", "1000"}, dir, 30s);
  EXPECT_EQ(unresolved.status, 2);
  EXPECT_NE(unresolved.err.find("no-such-host.invalid:4222 does not resolve"), std::string::npos) << unresolved.err;

  auto job = write_job(dir, 1, 1);
  CommandRun train = run({bin(), "train", "--job", job.string(), "--bootstrap", nowhere, "--wait-s", "3"}, dir, 30s);
  EXPECT_EQ(train.status, 1);
  EXPECT_NE(train.err.find("did not answer"), std::string::npos) << train.err;

  // A node warns, keeps running (and retrying), and stops on SIGTERM with 143.
  SpawnOptions options;
  options.stdout_path = options.stderr_path = dir / "node.log";
  auto node = ChildProcess::spawn({bin(), "node", "--data", (dir / "n").string(), "--listen", "127.0.0.1:0",
                                   "--dht-port", "0", "--bootstrap", nowhere},
                                  options);
  ASSERT_TRUE(node.ok());
  EXPECT_TRUE(wait_for_text(*node, dir / "node.log", "no DHT node has answered yet (bootstrap " + nowhere + ")", 30s));
  EXPECT_TRUE(node->running());
  ::kill(node->pid(), SIGTERM);
  EXPECT_EQ(node->wait_for(20s), std::optional<int>(143));
  fs::remove_all(dir);
}

// ---- kind 8: signals ----

TEST_F(Life, SignalsExitWith130And143) {
  auto dir = scratch("signals");
  auto job = write_job(dir, 1, 100000);
  for (int signal_number : {SIGINT, SIGTERM}) {
    SpawnOptions options;
    options.stdout_path = dir / "out.txt";
    options.stderr_path = dir / ("err" + std::to_string(signal_number) + ".txt");
    auto train = ChildProcess::spawn({bin(), "train", "--local", "--job", job.string()}, options);
    ASSERT_TRUE(train.ok());
    ASSERT_TRUE(wait_for_text(*train, options.stderr_path, "step ", 60s));
    ::kill(train->pid(), signal_number);
    EXPECT_EQ(train->wait_for(30s), std::optional<int>(128 + signal_number))
        << read_file(options.stderr_path).value_or("");
  }
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
  auto dht = ChildProcess::spawn({bin(), "dht", "--port", "0"}, quiet);
  ASSERT_TRUE(dht.ok());
  ASSERT_TRUE(wait_for_text(*dht, dir / "dht.log", "listening"));
  ::kill(dht->pid(), SIGTERM);
  EXPECT_EQ(dht->wait_for(20s), std::optional<int>(143));
  fs::remove_all(dir);
}

TEST_F(Life, InterruptDuringCorpusPreparationStopsTheTokenizerAtOnce) {
  auto dir = scratch("prep");
  // A corpus spm_train needs many seconds for: random "words" over a wide alphabet.
  {
    std::ofstream corpus(dir / "big.txt");
    std::mt19937 rng(7);
    for (int line = 0; line < 300000; ++line) {
      for (int w = 0; w < 12; ++w) {
        int length = 2 + static_cast<int>(rng() % 8);
        for (int c = 0; c < length; ++c) corpus << static_cast<char>('a' + rng() % 26);
        corpus << ' ';
      }
      corpus << '\n';
    }
  }
  auto job = write_job(dir, 1, 10, (dir / "big.txt").string());
  SpawnOptions options;
  options.stdout_path = dir / "out.txt";
  options.stderr_path = dir / "err.txt";
  auto train = ChildProcess::spawn({bin(), "train", "--local", "--job", job.string()}, options);
  ASSERT_TRUE(train.ok());
  pid_t tokenizer = -1;
  for (int i = 0; i < 600 && tokenizer < 0 && train->running(); ++i) {
    for (pid_t pid : descendants(train->pid()))
      if (comm_of(pid) == "spm_train") tokenizer = pid;
    if (tokenizer < 0) std::this_thread::sleep_for(50ms);
  }
  ASSERT_GT(tokenizer, 0) << "spm_train never ran: " << read_file(dir / "err.txt").value_or("");
  // Only the parent is signalled (as `kill -INT` would): it must stop its child.
  ::kill(train->pid(), SIGINT);
  auto status = train->wait_for(10s);
  ASSERT_TRUE(status.has_value()) << "train --local still running 10 s after SIGINT during corpus preparation";
  EXPECT_EQ(*status, 130) << read_file(dir / "err.txt").value_or("");
  EXPECT_FALSE(alive(tokenizer)) << "spm_train still runs";
  for (const auto& entry : fs::directory_iterator(dir / "cache"))
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos)
        << "half-written file left: " << entry.path();
  fs::remove_all(dir);
}
