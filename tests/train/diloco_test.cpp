// DiLoCo (docs/diloco.md): the pseudo-gradient codec and the step deadline
// in process, then real `solvernet` processes on 127.0.0.1.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>

#include "core/fs.h"
#include "core/hash.h"
#include "core/process.h"
#include "train/diloco.h"
#include "train/recovery.h"
#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return test::solvernet_bin(); }
fs::path data(const std::string& name) { return test::source_path("tests/train/data") / name; }

nlohmann::json parse(const test::CommandRun& r) {
  try {
    return nlohmann::json::parse(r.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not JSON: " << e.what() << "\nstdout: " << r.out << "\nstderr: " << r.err.substr(0, 4000);
    return {};
  }
}

// The job file with LINES appended to its [diloco] table (it is last), or the
// table removed (every-step all-reduce) when WITHOUT_DILOCO.
fs::path job_variant(const fs::path& dir, const std::string& name, const std::string& lines, bool without_diloco = false) {
  std::string text = read_file(data("diloco.toml")).value();
  if (without_diloco) text = text.substr(0, text.find("[diloco]"));
  // Later keys cannot repeat earlier ones in TOML: drop the ones being replaced.
  for (const char* key : {"pseudo_grad", "inner_steps"})
    if (lines.find(key) != std::string::npos) {
      auto at = text.find(std::string(key) + " =");
      if (at != std::string::npos) text.erase(at, text.find('\n', at) - at + 1);
    }
  text += lines;
  auto path = dir / (name + ".toml");
  std::ofstream(path) << text;
  return path;
}

// A DHT bootstrap and N nodes on 127.0.0.1, half in region "a", half in
// "b", each logging to DIR/n<i>.log; EXTRA(i): more arguments for node i.
struct LocalNet {
  test::Bootstrap dht;
  std::vector<ChildProcess> nodes;
  ChildProcess start_node(const fs::path& dir, int i, const std::string& region,
                          const std::vector<std::string>& extra = {}) {
    SpawnOptions logs;
    logs.stdout_path = logs.stderr_path = dir / ("n" + std::to_string(i) + ".log");
    std::vector<std::string> args{bin(), "node", "--data", (dir / ("n" + std::to_string(i))).string(), "--listen",
                                  "127.0.0.1:0", "--dht-port", "0", "--bootstrap", dht.address, "--region", region};
    args.insert(args.end(), extra.begin(), extra.end());
    auto node = ChildProcess::spawn(args, logs);
    EXPECT_TRUE(node.ok()) << node.message();
    return std::move(node).value();
  }
  ~LocalNet() {
    for (auto& n : nodes) n.terminate();
    dht.process.terminate();
  }
};
std::unique_ptr<LocalNet> start_net(const fs::path& dir, int n,
                                    const std::function<std::vector<std::string>(int)>& extra = {}) {
  auto dht = test::start_dht(dir / "dht.log");
  EXPECT_TRUE(dht.ok()) << dht.message();
  if (!dht.ok()) return nullptr;
  std::unique_ptr<LocalNet> net(new LocalNet{std::move(dht).value(), {}});
  for (int i = 0; i < n; ++i)
    net->nodes.push_back(net->start_node(dir, i, i < n / 2 ? "a" : "b", extra ? extra(i) : std::vector<std::string>{}));
  return net;
}

// start_net's EXTRA: `node --kill-self-at SPEC` for node NODE alone, or
// for every node if NODE < 0.
std::function<std::vector<std::string>(int)> kill_self_at(int node, const std::string& spec) {
  return [node, spec](int i) {
    return node < 0 || i == node ? std::vector<std::string>{"--kill-self-at", spec} : std::vector<std::string>{};
  };
}

// TEXT with the first "KEY = …" line replaced by "KEY = VALUE".
std::string with_key(std::string text, const std::string& key, const std::string& value) {
  const auto at = text.find(key + " = ");
  if (at == std::string::npos) return text + key + " = " + value + "\n";
  return text.replace(at, text.find('\n', at) - at, key + " = " + value);
}

// The summary the client printed to DIR/client.out, or a failure.
nlohmann::json client_summary(const fs::path& dir) {
  const std::string out = read_file(dir / "client.out").value_or("");
  try {
    return nlohmann::json::parse(out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not JSON: " << out << "\n" << read_file(dir / "client.err").value_or("").substr(0, 4000);
    return {};
  }
}

// `solvernet train` of JOB on NET's nodes, in the background, printing to
// DIR/client.out (client_summary) and DIR/client.err; EXTRA: more arguments.
std::optional<ChildProcess> start_client(const fs::path& dir, const LocalNet& net, const fs::path& job,
                                         const std::vector<std::string>& extra = {}) {
  SpawnOptions client_out;
  client_out.stdout_path = dir / "client.out";
  client_out.stderr_path = dir / "client.err";
  std::vector<std::string> args{bin(), "train", "--job", job.string(), "--bootstrap", net.dht.address,
                                "--topology", data("lan.toml").string(), "--peer-timeout-s", "3", "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto client = ChildProcess::spawn(args, client_out);
  EXPECT_TRUE(client.ok()) << client.message();
  if (!client.ok()) return std::nullopt;
  return std::move(client).value();
}

// start_client run to its end within LIMIT: its exit status (none: still
// running, a failure) and DIR/client.err.
std::pair<std::optional<int>, std::string> run_client(const fs::path& dir, const LocalNet& net, const fs::path& job,
                                                      const std::vector<std::string>& extra,
                                                      std::chrono::seconds limit) {
  auto client = start_client(dir, net, job, extra);
  if (!client) return {std::nullopt, ""};
  auto status = client->wait_for(limit);
  EXPECT_TRUE(status.has_value()) << "client still running after " << limit.count() << " s";
  return {status, read_file(dir / "client.err").value_or("")};
}

// The node (of N, logging to DIR/n<i>.log) set up as a member of replica
// group REPLICA within LIMIT, or -1.
int node_of_group(const fs::path& dir, int n, int replica, std::chrono::seconds limit) {
  const std::string role = " replica " + std::to_string(replica) + ", layers";
  for (auto until = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < until;) {
    for (int i = 0; i < n; ++i)
      if (read_file(dir / ("n" + std::to_string(i) + ".log")).value_or("").find(role) != std::string::npos) return i;
    std::this_thread::sleep_for(100ms);
  }
  return -1;
}

double mean(const std::vector<double>& v, size_t from, size_t to) {
  double s = 0;
  for (size_t i = from; i < to; ++i) s += v[i];
  return s / static_cast<double>(to - from);
}

}  // namespace

TEST(DilocoCodec, Int8IsDeterministicCloseAndChunkedPerTensor) {
  torch::manual_seed(5);
  torch::Tensor a = torch::randn({5000}) * 0.01;
  torch::Tensor b = torch::randn({300}) * 3.0;
  torch::Tensor flat = torch::cat({a, b}).contiguous();
  const std::vector<int64_t> sizes{5000, 300};
  const std::string wire = train::encode_int8_chunks(flat, sizes);
  EXPECT_EQ(wire, train::encode_int8_chunks(flat.clone(), sizes));  // same values, same bytes
  // Scales: 2 chunks for the first tensor, 1 for the second; one byte per value.
  EXPECT_EQ(wire.size(), 3 * 4 + 5300u);
  auto decoded = train::decode_int8_chunks(wire, sizes, "test");
  ASSERT_TRUE(decoded.ok()) << decoded.message();
  // Within half a step of each chunk's scale (max|x| / 127).
  for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, 4096}, {4096, 5000}, {5000, 5300}}) {
    auto part = flat.slice(0, begin, end), back = decoded->slice(0, begin, end);
    const double step = part.abs().max().item<double>() / 127.0;
    EXPECT_LE((part - back).abs().max().item<double>(), 0.5 * step * 1.0001);
  }
  // A tensor encodes the same wherever it sits: the small one alone gives
  // the same scale and values as inside the stage's buffer.
  const std::string alone = train::encode_int8_chunks(b.contiguous(), {300});
  EXPECT_EQ(alone.substr(0, 4), wire.substr(8, 4));
  EXPECT_EQ(alone.substr(4), wire.substr(12 + 5000));
  auto bad = train::decode_int8_chunks(wire.substr(1), sizes, "node x");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().kind, ErrorKind::bad_peer);
  EXPECT_NE(bad.message().find("node x"), std::string::npos);
}

TEST(DilocoDeadline, FollowsTheStepsOfASlowedLink) {
  train::StepDeadline deadline(60s, 2s);
  EXPECT_EQ(deadline.deadline(), 60s);  // nothing measured yet: the job's initial bound
  for (int i = 0; i < 20; ++i) deadline.record(0.05);
  EXPECT_EQ(deadline.deadline(), 2s);  // fast steps: the floor
  deadline.set_rtt_ms(300);
  EXPECT_GE(deadline.deadline(), 2400ms);  // ≥ 8 × RTT
  for (int i = 0; i < 20; ++i) deadline.record(4.0);  // the link slowed: steps take 4 s
  EXPECT_GE(deadline.deadline(), 12000ms);  // ≥ 3 × p95
}

// Both codecs: replicas bitwise equal after every outer step (the client
// checks each stage's replica hashes and stops the job on a mismatch, and
// the summary lists them), loss goes down, and no token came from the client.
TEST(Diloco, ReplicasStayEqualAndInt8AndFp32BothConverge) {
  auto dir = test::scratch("diloco", "codecs");
  for (const std::string codec : {"int8", "fp32"}) {
    auto job = job_variant(dir, codec, "pseudo_grad = \"" + codec + "\"\n");
    auto r = test::run_command({bin(), "devnet", "--no-chain", "--job", job.string(), "--topology",
                                data("lan.toml").string(), "--peer-timeout-s", "10", "--json"},
                               dir, 120s);
    ASSERT_EQ(r.status, 0) << codec << ": " << r.err.substr(0, 4000);
    auto s = parse(r);
    ASSERT_TRUE(s.contains("diloco")) << s.dump();
    const auto& d = s["diloco"];
    EXPECT_EQ(d["pseudo_grad"], codec);
    EXPECT_EQ(d["outer_steps"], 6);  // 24 steps, an outer step every 4
    ASSERT_EQ(d["outer_hashes"].size(), 6u);
    std::set<std::string> distinct;
    for (const auto& per_stage : d["outer_hashes"]) {
      ASSERT_EQ(per_stage.size(), 2u);
      for (const auto& h : per_stage) {
        EXPECT_EQ(h.get<std::string>().size(), 64u);
        distinct.insert(h.get<std::string>());
      }
    }
    EXPECT_EQ(distinct.size(), 12u) << "every outer step moves every stage";
    EXPECT_TRUE(d["dropped_groups"].empty());
    // The groups trained apart between outer steps (no every-step all-reduce).
    EXPECT_EQ(d["diverged_before_outer"], 6);
    EXPECT_GT(d["bytes_outer"].get<int64_t>(), 0);
    EXPECT_EQ(d["data_bytes_not_sent"].get<int64_t>(), 24 * 2 * 8 * 32 * 8);
    EXPECT_EQ(d["dataset_hash"].get<std::string>().size(), 64u);
    // No every-step all-reduce: besides the outer steps, only the tied embedding's swap.
    EXPECT_LE(d["bytes_outer"].get<int64_t>(), s["bytes_data_parallel"].get<int64_t>());
    auto losses = s["losses"].get<std::vector<double>>();
    ASSERT_EQ(losses.size(), 24u);
    EXPECT_LT(mean(losses, 20, 24), mean(losses, 0, 4) - 0.2) << codec << " did not converge";
    ASSERT_TRUE(s["holdout_loss"].is_number());
    EXPECT_LT(s["holdout_loss"].get<double>(), losses.front());
  }
  fs::remove_all(dir);
}

// A node killed while the job runs takes its replica group out; the other
// group goes on alone and the job completes.
TEST(Diloco, AGroupKilledMidJobDoesNotStopTheJob) {
  auto dir = test::scratch("diloco", "kill");
  auto net = start_net(dir, 4);
  ASSERT_TRUE(net);
  auto& nodes = net->nodes;
  auto job = job_variant(dir, "long", "inner_steps = 250\n");
  const std::string text = with_key(read_file(job).value(), "steps", "500");
  std::ofstream(job) << text;
  SpawnOptions client_out;
  client_out.stdout_path = dir / "client.out";
  client_out.stderr_path = dir / "client.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", job.string(), "--bootstrap", net->dht.address,
                                     "--topology", data("lan.toml").string(), "--peer-timeout-s", "3", "--json"},
                                    client_out);
  ASSERT_TRUE(client.ok());
  // Node 3 has its role once it logs the job's setup; a moment later it trains.
  ASSERT_TRUE(test::wait_for_text(dir / "n3.log", " replica ", 60s)) << read_file(dir / "client.err").value_or("");
  std::this_thread::sleep_for(1500ms);
  ::kill(nodes[3].pid(), SIGKILL);
  auto status = client->wait_for(90s);
  ASSERT_TRUE(status.has_value()) << "client still running 90 s after a node died";
  const std::string err = read_file(dir / "client.err").value_or("");
  EXPECT_EQ(*status, 0) << err.substr(0, 4000);
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  ASSERT_EQ(d["dropped_groups"].size(), 1u) << s.dump();
  const int64_t dropped_at = d["dropped_at_step"][0].get<int64_t>();
  EXPECT_GE(dropped_at, 1);
  // The kill lands in the first round's inner steps (not in an outer step:
  // AGroupLostDuringTheOuterStepIsDroppedAndTheStepRetried), and the job
  // outer-steps twice.
  EXPECT_LT(dropped_at, 250) << "the kill came after the first outer step";
  EXPECT_EQ(d["outer_retries"], 0);
  EXPECT_EQ(s["losses"].size(), 500u);
  EXPECT_EQ(d["outer_steps"], 2);
  // After the drop each outer step has one replica per stage, still hashed.
  for (const auto& per_stage : d["outer_hashes"]) EXPECT_EQ(per_stage.size(), 2u);
  EXPECT_TRUE(s["holdout_loss"].is_number());
  EXPECT_NE(err.find("dropped"), std::string::npos) << err.substr(0, 4000);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(nodes[static_cast<size_t>(i)].running()) << "a surviving node crashed";
  net.reset();
  fs::remove_all(dir);
}

// Three replica groups; a member kills itself (kill -9) on receiving the
// first outer step. The survivors' all-gather fails; the client drops the
// dead member's group and runs the outer step again between the two groups
// left, each node first restoring its state from before the step (the
// client checks their replica hashes agree, at that step and every later
// one). The job completes.
TEST(Diloco, AGroupLostDuringTheOuterStepIsDroppedAndTheStepRetried) {
  auto dir = test::scratch("diloco", "outer-kill");
  // 2 stages × 3 groups; the last node dies at the first outer step.
  auto net = start_net(dir, 6, kill_self_at(5, "outer:1"));
  ASSERT_TRUE(net);
  std::string text = read_file(job_variant(dir, "three", "")).value();
  for (auto [key, value] : {std::pair{"replicas", "3"}, {"global_batch", "12"}, {"steps", "12"}})
    text = with_key(text, key, value);
  const fs::path job = dir / "three.toml";
  std::ofstream(job) << text;
  const std::string lan = read_file(data("lan.toml")).value();
  std::ofstream(dir / "lan3.toml") << with_key(with_key(lan, "nodes", "3"), "nodes", "3");
  SpawnOptions client_out;
  client_out.stdout_path = dir / "client.out";
  client_out.stderr_path = dir / "client.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", job.string(), "--bootstrap", net->dht.address,
                                     "--topology", (dir / "lan3.toml").string(), "--peer-timeout-s", "3", "--json"},
                                    client_out);
  ASSERT_TRUE(client.ok());
  auto status = client->wait_for(90s);
  ASSERT_TRUE(status.has_value()) << "client still running after 90 s";
  const std::string err = read_file(dir / "client.err").value_or("");
  ASSERT_EQ(*status, 0) << err.substr(0, 4000);
  EXPECT_FALSE(net->nodes[5].running()) << "the hook did not fire";
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  ASSERT_EQ(d["dropped_groups"].size(), 1u) << s.dump();
  EXPECT_EQ(d["dropped_at_step"][0], 4) << "dropped in the outer step after step 4";
  EXPECT_EQ(d["outer_retries"], 1);
  EXPECT_EQ(d["outer_steps"], 3);
  EXPECT_EQ(s["losses"].size(), 12u);
  // Every outer step, the retried one included, has a hash per stage that
  // both surviving replicas reported.
  ASSERT_EQ(d["outer_hashes"].size(), 3u);
  for (const auto& per_stage : d["outer_hashes"]) EXPECT_EQ(per_stage.size(), 2u);
  EXPECT_NE(err.find("running it again"), std::string::npos) << err.substr(0, 4000);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(net->nodes[static_cast<size_t>(i)].running()) << "a surviving node crashed";
  net.reset();
  fs::remove_all(dir);
}

// A group killed in the first round is dropped; a node started mid-job
// (with the dropped group's live member, idle again) fills the slot at a
// later outer boundary, copying group 0's state, and trains its own shard
// from the next step: every outer step after that has both groups, whose
// replica hashes the client checked equal, the last one included.
TEST(Diloco, NodesJoiningFillADroppedGroupAtAnOuterBoundary) {
  auto dir = test::scratch("diloco", "rejoin");
  // An outer step every 4. 160 steps: 24 (1.7 s) could end before the
  // joined node had even announced itself (1.8 s after its start).
  auto job = job_variant(dir, "rejoin", "");
  auto r = test::run_command({bin(), "devnet", "--no-chain", "--job", job.string(), "--steps", "160", "--topology",
                              data("lan.toml").string(), "--peer-timeout-s", "3", "--nodes", "4", "--spares", "0",
                              "--spare-wait-s", "0", "--kill-at", "1:1.1", "--join-at-step", "2", "--json"},
                             dir, 120s);
  ASSERT_EQ(r.status, 0) << r.err.substr(0, 4000);
  auto s = parse(r);
  const auto& d = s["diloco"];
  ASSERT_EQ(d["dropped_groups"], nlohmann::json::array({1})) << d.dump();
  EXPECT_LE(d["dropped_at_step"][0].get<int64_t>(), 4);
  ASSERT_EQ(d["rejoined_groups"], nlohmann::json::array({1})) << d.dump() << r.err.substr(0, 4000);
  const int64_t back = d["rejoined_at_step"][0].get<int64_t>();
  EXPECT_EQ(back % 4, 0);
  EXPECT_LT(back, 160);
  const auto groups = d["outer_groups"].get<std::vector<int64_t>>();
  ASSERT_EQ(groups.size(), 40u);
  for (size_t k = 0; k < groups.size(); ++k)
    EXPECT_EQ(groups[k], static_cast<int64_t>(4 * (k + 1)) <= back ? 1 : 2) << "outer step " << k + 1;
  EXPECT_EQ(s["losses"].size(), 160u);
  EXPECT_TRUE(s["holdout_loss"].is_number());
  fs::remove_all(dir);
}

// A member of group 1 frozen (SIGSTOP) past the step deadline: its group is
// dropped. Thawed, it answers the EndJob the client kept sending (its lease
// no longer renewed), is idle again, and with its group mate refills group 1
// at a later outer boundary; the job completes with both groups, whose
// replica hashes the client checked equal at the last outer step. The DHT
// bootstrap is gone before the thaw: the client knows the dropped group's
// members itself.
TEST(Diloco, AMemberFrozenAndThawedGetsItsGroupBack) {
  auto dir = test::scratch("diloco", "thaw");
  auto net = start_net(dir, 4);
  ASSERT_TRUE(net);
  // Long enough to outlast the freeze and the drop with outer boundaries to spare.
  const fs::path job = dir / "thaw.toml";
  std::ofstream(job) << with_key(read_file(job_variant(dir, "base", "")).value(), "steps", "600");
  SpawnOptions client_out;
  client_out.stdout_path = dir / "client.out";
  client_out.stderr_path = dir / "client.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", job.string(), "--bootstrap", net->dht.address,
                                     "--topology", data("lan.toml").string(), "--peer-timeout-s", "3", "--job-dir",
                                     (dir / "jobs").string(), "--json"},
                                    client_out);
  ASSERT_TRUE(client.ok());
  // The frozen member: a node of group 1 once it has checkpointed the first
  // outer step (so it trains, past setup).
  int frozen = -1;
  for (auto until = std::chrono::steady_clock::now() + 60s; frozen < 0 && std::chrono::steady_clock::now() < until;) {
    for (int i = 0; i < 4 && frozen < 0; ++i) {
      std::error_code ec;
      for (fs::recursive_directory_iterator it(dir / ("n" + std::to_string(i)), ec), end; !ec && it != end; it.increment(ec))
        if (it->path().filename() == "step-000000000004.manifest.json" &&
            it->path().parent_path().filename().string().ends_with("-replica1"))
          frozen = i;
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_GE(frozen, 0) << "no member of group 1 checkpointed step 4\n" << read_file(dir / "client.err").value_or("");
  auto& node = net->nodes[static_cast<size_t>(frozen)];
  ::kill(node.pid(), SIGSTOP);
  struct Thaw {  // on every path out, so the node can be stopped
    pid_t pid;
    ~Thaw() { ::kill(pid, SIGCONT); }
  } thaw{node.pid()};
  const bool dropped = test::wait_for_text(dir / "client.err", "replica group 1 dropped", 60s);
  net->dht.process.kill_now();
  ::kill(node.pid(), SIGCONT);
  ASSERT_TRUE(dropped) << read_file(dir / "client.err").value_or("").substr(0, 4000);
  // The drop names the frozen node (it answers no ping), not a peer that
  // timed out waiting for it.
  const std::string log_name = "n" + std::to_string(frozen) + ".log";
  const std::string first_line = read_file(dir / log_name).value_or("").substr(0, 13);  // "node " + 8 hex
  ASSERT_EQ(first_line.substr(0, 5), "node ");
  const std::string dropped_line = read_file(dir / "client.err").value_or("");
  const auto at = dropped_line.find("replica group 1 dropped");
  EXPECT_NE(dropped_line.find(": " + first_line + " (", at), std::string::npos) << dropped_line.substr(at, 400);
  EXPECT_NE(dropped_line.find("stopped answering pings", at), std::string::npos) << dropped_line.substr(at, 400);
  auto status = client->wait_for(90s);
  ASSERT_TRUE(status.has_value()) << "client still running 90 s after the thaw";
  const std::string err = read_file(dir / "client.err").value_or("");
  ASSERT_EQ(*status, 0) << err.substr(0, 4000);
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  ASSERT_EQ(d["dropped_groups"], nlohmann::json::array({1})) << d.dump();
  ASSERT_EQ(d["rejoined_groups"], nlohmann::json::array({1})) << d.dump() << err.substr(0, 4000);
  const int64_t back = d["rejoined_at_step"][0].get<int64_t>();
  EXPECT_GT(back, d["dropped_at_step"][0].get<int64_t>());
  // Every outer step from the rejoin on has both groups, the last included:
  // their replica hashes were checked equal there.
  const auto groups = d["outer_groups"].get<std::vector<int64_t>>();
  ASSERT_EQ(groups.size(), 150u);
  for (size_t k = static_cast<size_t>(back / 4); k < groups.size(); ++k) EXPECT_EQ(groups[k], 2) << "outer step " << k + 1;
  for (const auto& per_stage : d["outer_hashes"]) EXPECT_EQ(per_stage.size(), 2u);
  EXPECT_EQ(s["losses"].size(), 600u);
  // The thawed node heard the drop (not only its lease running out), then
  // took a role again; its step cut short by the abort left no temp files.
  const std::string log = read_file(dir / log_name).value_or("");
  EXPECT_NE(log.find("aborted: replica group dropped"), std::string::npos) << log.substr(0, 4000);
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir / ("n" + std::to_string(frozen)), ec), end; !ec && it != end; it.increment(ec))
    EXPECT_EQ(it->path().string().find(".tmp"), std::string::npos) << it->path();
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(net->nodes[static_cast<size_t>(i)].running()) << "node " << i << " crashed";
  net.reset();
  fs::remove_all(dir);
}

// A member of group 1 is killed and its group dropped; a node started then
// dies as the rejoin hands it its checkpoint (node --kill-self-at
// put-checkpoint:1). That costs group 1 again, not the job: group 0 trains
// on alone to the last step, and the job completes.
TEST(Diloco, AMemberLostDuringARejoinCostsOnlyItsGroup) {
  auto dir = test::scratch("diloco", "rejoin-loss");
  auto net = start_net(dir, 4);
  ASSERT_TRUE(net);
  const fs::path job = dir / "long.toml";
  std::ofstream(job) << with_key(read_file(job_variant(dir, "base", "")).value(), "steps", "400");
  auto client = start_client(dir, *net, job, {"--job-dir", (dir / "jobs").string()});
  ASSERT_TRUE(client);
  const int victim = node_of_group(dir, 4, 1, 60s);
  ASSERT_GE(victim, 0) << read_file(dir / "client.err").value_or("");
  std::this_thread::sleep_for(1500ms);
  ::kill(net->nodes[static_cast<size_t>(victim)].pid(), SIGKILL);
  net->nodes.push_back(net->start_node(dir, 4, "b", {"--kill-self-at", "put-checkpoint:1"}));
  auto status = client->wait_for(120s);
  ASSERT_TRUE(status.has_value()) << "client still running after 120 s";
  const std::string err = read_file(dir / "client.err").value_or("");
  ASSERT_EQ(*status, 0) << err.substr(0, 4000);
  EXPECT_FALSE(net->nodes[4].running()) << "the joining node was never handed a checkpoint\n" << err.substr(0, 4000);
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  EXPECT_EQ(d["dropped_groups"], nlohmann::json::array({1, 1})) << d.dump();
  EXPECT_TRUE(d["rejoined_groups"].empty()) << d.dump();
  EXPECT_NE(err.find("replica group 1 did not rejoin"), std::string::npos) << err.substr(0, 4000);
  EXPECT_EQ(s["losses"].size(), 400u);
  for (const auto& per_stage : d["outer_hashes"]) EXPECT_EQ(per_stage.size(), 2u);
  for (int i = 0; i < 4; ++i)
    if (i != victim) EXPECT_TRUE(net->nodes[static_cast<size_t>(i)].running()) << "node " << i << " crashed";
  net.reset();
  fs::remove_all(dir);
}

// A member killed as the held-out evaluation reaches it (node
// --kill-self-at eval:1): its group is dropped, the other group evaluates
// the dropped group's share too, and the job completes with a held-out loss
// and the model.
TEST(Diloco, AMemberKilledDuringTheHeldOutEvaluationCostsOnlyItsGroup) {
  auto dir = test::scratch("diloco", "eval-kill");
  auto net = start_net(dir, 4, kill_self_at(3, "eval:1"));
  ASSERT_TRUE(net);
  const fs::path model = dir / "model.safetensors";
  const auto [status, err] = run_client(dir, *net, job_variant(dir, "base", ""), {"--out", model.string()}, 90s);
  ASSERT_EQ(status, 0) << err.substr(0, 4000);
  EXPECT_FALSE(net->nodes[3].running()) << "the hook did not fire";
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  ASSERT_EQ(d["dropped_groups"].size(), 1u) << d.dump();
  EXPECT_EQ(d["dropped_at_step"][0], 24) << "dropped after the last step";
  EXPECT_EQ(s["losses"].size(), 24u);
  ASSERT_TRUE(s["holdout_loss"].is_number()) << s.dump();
  EXPECT_TRUE(s["holdout_loss_missing"].is_null()) << s.dump();
  EXPECT_LT(s["holdout_loss"].get<double>(), s["losses"][0].get<double>());
  EXPECT_TRUE(fs::exists(model));
  net.reset();
  fs::remove_all(dir);
}

// Every member of both groups dies as the held-out evaluation reaches it
// (node --kill-self-at eval:1). Training had finished: the model was fetched
// and written before the evaluation, so the run still ends with it (exit 0),
// its held-out loss null and a warning that it could not be measured. Each
// group's drop names its own members only, not the other group's.
TEST(Diloco, EveryGroupLostDuringTheHeldOutEvaluationStillWritesTheModel) {
  auto dir = test::scratch("diloco", "eval-kill-all");
  auto net = start_net(dir, 4, kill_self_at(-1, "eval:1"));
  ASSERT_TRUE(net);
  const fs::path model = dir / "model.safetensors";
  const auto [status, err] = run_client(dir, *net, job_variant(dir, "base", ""), {"--out", model.string()}, 90s);
  ASSERT_EQ(status, 0) << err.substr(0, 4000);
  EXPECT_NE(err.find("held-out loss could not be measured"), std::string::npos) << err.substr(0, 4000);
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  EXPECT_EQ(d["dropped_groups"].size(), 2u) << d.dump();
  EXPECT_EQ(d["dropped_at_step"], nlohmann::json::array({24, 24})) << d.dump();
  EXPECT_EQ(s["losses"].size(), 24u);
  EXPECT_TRUE(s["holdout_loss"].is_null()) << s.dump();
  // The summary says why, not only the warning on stderr.
  ASSERT_TRUE(s["holdout_loss_missing"].is_string()) << s.dump();
  EXPECT_NE(s["holdout_loss_missing"].get<std::string>().find("held-out evaluation"), std::string::npos) << s.dump();
  ASSERT_TRUE(fs::exists(model));
  EXPECT_EQ(s["model_hash"].get<std::string>(), to_hex(hash_string(read_file(model).value())));
  for (const int group : {0, 1}) {
    const std::string head = "replica group " + std::to_string(group) + " dropped at step 24: ";
    const auto at = err.find(head);
    ASSERT_NE(at, std::string::npos) << err.substr(0, 4000);
    const std::string line = err.substr(at, err.find('\n', at) - at);
    EXPECT_NE(line.find("replica " + std::to_string(group) + ")"), std::string::npos) << line;
    EXPECT_EQ(line.find("replica " + std::to_string(1 - group) + ")"), std::string::npos)
        << "group " << group << "'s drop names a member of the other group: " << line;
  }
  net.reset();
  fs::remove_all(dir);
}

// A member dies on its first SetupJob (node --kill-self-at setup:1): its
// group is dropped at step 0, its group mate, set up or not, is released,
// and the other group trains. A node started after the drop fills the
// group's slot with that mate at an outer boundary (the rejoin), and the job
// completes with both groups.
TEST(Diloco, AMemberLostAtTheJobsSetupCostsOnlyItsGroup) {
  auto dir = test::scratch("diloco", "setup-kill");
  auto net = start_net(dir, 4, kill_self_at(3, "setup:1"));
  ASSERT_TRUE(net);
  const fs::path job = dir / "long.toml";
  std::ofstream(job) << with_key(read_file(job_variant(dir, "base", "")).value(), "steps", "400");
  auto client = start_client(dir, *net, job, {"--job-dir", (dir / "jobs").string()});
  ASSERT_TRUE(client);
  const auto until = std::chrono::steady_clock::now() + 60s;
  std::string err;
  for (; std::chrono::steady_clock::now() < until && client->running(); std::this_thread::sleep_for(100ms)) {
    err = read_file(dir / "client.err").value_or("");
    if (err.find(" dropped at step 0: ") != std::string::npos) break;
  }
  const auto at = err.find(" dropped at step 0: ");
  ASSERT_NE(at, std::string::npos) << read_file(dir / "client.err").value_or("").substr(0, 4000);
  const int group = err[err.rfind("replica group ", at) + 14] - '0';
  // The drop names the node that died.
  const std::string killed = read_file(dir / "n3.log").value_or("").substr(0, 13);  // "node " + 8 hex
  ASSERT_EQ(killed.substr(0, 5), "node ");
  EXPECT_NE(err.find(killed + " (", at), std::string::npos) << err.substr(at, 400);
  net->nodes.push_back(net->start_node(dir, 4, "b"));
  auto status = client->wait_for(120s);
  ASSERT_TRUE(status.has_value()) << "client still running after 120 s";
  err = read_file(dir / "client.err").value_or("");
  ASSERT_EQ(*status, 0) << err.substr(0, 4000);
  EXPECT_FALSE(net->nodes[3].running()) << "the hook did not fire";
  const auto s = client_summary(dir);
  const auto& d = s["diloco"];
  EXPECT_EQ(d["dropped_groups"], nlohmann::json::array({group})) << d.dump();
  EXPECT_EQ(d["dropped_at_step"], nlohmann::json::array({0})) << d.dump();
  ASSERT_EQ(d["rejoined_groups"], nlohmann::json::array({group})) << d.dump() << err.substr(0, 4000);
  const int64_t back = d["rejoined_at_step"][0].get<int64_t>();
  EXPECT_EQ(back % 4, 0);
  const auto groups = d["outer_groups"].get<std::vector<int64_t>>();
  ASSERT_EQ(groups.size(), 100u);
  for (size_t k = 0; k < groups.size(); ++k)
    EXPECT_EQ(groups[k], static_cast<int64_t>(4 * (k + 1)) <= back ? 1 : 2) << "outer step " << k + 1;
  for (const auto& per_stage : d["outer_hashes"]) EXPECT_EQ(per_stage.size(), 2u);
  EXPECT_EQ(s["losses"].size(), 400u);
  EXPECT_TRUE(s["holdout_loss"].is_number());
  for (int i : {0, 1, 2, 4}) EXPECT_TRUE(net->nodes[static_cast<size_t>(i)].running()) << "node " << i << " crashed";
  net.reset();
  fs::remove_all(dir);
}

// Every member dies on its first SetupJob: no group is left, and the job
// ends with one line saying so.
TEST(Diloco, EveryGroupLostAtTheJobsSetupEndsTheJobWithOneLine) {
  auto dir = test::scratch("diloco", "setup-kill-all");
  auto net = start_net(dir, 4, kill_self_at(-1, "setup:1"));
  ASSERT_TRUE(net);
  const auto [status, err] = run_client(dir, *net, job_variant(dir, "base", ""), {}, 90s);
  EXPECT_EQ(status, 1) << err.substr(0, 4000);
  EXPECT_NE(err.find("every replica group failed, the last during job setup: "), std::string::npos)
      << err.substr(0, 4000);
  net.reset();
  fs::remove_all(dir);
}

// The client stopped (SIGSTOP) for longer than the nodes' 2 s lease: they
// drop the job, rightly. Thawed, the client says that it was itself stopped
// past the lease and blames no node, for a [diloco] job as for an every-step
// one, which also says how to resume from its job dir.
TEST(Diloco, AClientStoppedPastTheLeaseBlamesNoNode) {
  for (const bool diloco : {true, false}) {
    SCOPED_TRACE(diloco ? "[diloco]" : "every step");
    auto dir = test::scratch("diloco", diloco ? "pause" : "pause-everystep");
    auto net = start_net(dir, 4, [](int) { return std::vector<std::string>{"--lease-s", "2"}; });
    ASSERT_TRUE(net);
    std::string text = with_key(read_file(job_variant(dir, "base", "", !diloco)).value(), "steps", "5000");
    if (!diloco) text = with_key(text, "checkpoint_every", "10");
    const fs::path job = dir / "long.toml";
    std::ofstream(job) << text;
    auto client = start_client(dir, *net, job, {"--job-dir", (dir / "jobs").string()});
    ASSERT_TRUE(client);
    ASSERT_TRUE(test::wait_for_text(dir / "n3.log", " replica ", 60s)) << read_file(dir / "client.err").value_or("");
    std::this_thread::sleep_for(2s);
    ::kill(client->pid(), SIGSTOP);
    std::this_thread::sleep_for(5s);
    ::kill(client->pid(), SIGCONT);
    auto status = client->wait_for(60s);
    ASSERT_TRUE(status.has_value()) << "client still running 60 s after the thaw";
    const std::string err = read_file(dir / "client.err").value_or("");
    EXPECT_NE(*status, 0) << err.substr(0, 4000);
    EXPECT_NE(err.find("the client itself did not run for"), std::string::npos) << err.substr(0, 4000);
    EXPECT_NE(err.find("no node's fault"), std::string::npos) << err.substr(0, 4000);
    EXPECT_EQ(err.find("dropped at step"), std::string::npos) << "a group was blamed\n" << err.substr(0, 4000);
    EXPECT_EQ(err.find("takes the place of"), std::string::npos) << "a node was replaced\n" << err.substr(0, 4000);
    if (!diloco) EXPECT_NE(err.find("solvernet train --resume"), std::string::npos) << err.substr(0, 4000);
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(net->nodes[static_cast<size_t>(i)].running()) << "node " << i << " crashed";
    net.reset();
    fs::remove_all(dir);
  }
}

// `train --resume` of a [diloco] job is refused with one line, before any
// node is looked for.
TEST(Diloco, ResumeIsRefusedWithOneLine) {
  auto dir = test::scratch("diloco", "resume");
  auto job = parse_job_file(data("diloco.toml"));
  ASSERT_TRUE(job.ok()) << job.message();
  ASSERT_TRUE(train::write_job_file(dir, *job).ok());
  ASSERT_TRUE(train::write_job_state(dir, train::JobDirState{"diloco-1", 4, {5, 5, 5, 5}, ""}).ok());
  auto r = test::run_command({bin(), "train", "--resume", dir.string(), "--bootstrap", "127.0.0.1:1"}, dir, 30s);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("resuming a [diloco] job is not supported yet"), std::string::npos) << r.err;
  fs::remove_all(dir);
}

// Every-step all-reduce over a 300 ms link with a 1 s peer timeout: the
// steps take longer than the floor's third, and the client's deadline rose
// above the floor (one peer timeout) to three times their p95.
TEST(Diloco, StepDeadlineFollowsASlowLink) {
  auto dir = test::scratch("diloco", "deadline");
  auto job = job_variant(dir, "everystep", "", true);
  auto r = test::run_command({bin(), "devnet", "--no-chain", "--job", job.string(), "--topology",
                              data("wan.toml").string(), "--peer-timeout-s", "1", "--steps", "8", "--json"},
                             dir, 120s);
  ASSERT_EQ(r.status, 0) << r.err.substr(0, 4000);
  auto s = parse(r);
  const double p95 = s["step_p95_s"].get<double>(), deadline_ms = s["step_deadline_ms"].get<double>();
  EXPECT_GE(p95, 0.3) << "every step crosses the 300 ms link";
  EXPECT_GE(deadline_ms, 3000.0 * p95 - 1.0);
  EXPECT_GT(deadline_ms, 1000.0) << "the deadline stayed at the floor";
  fs::remove_all(dir);
}

// Who the client blames when replicas of a stage disagree (train/recovery.h):
// the replicas outside a strict majority, and nobody when there is none.
TEST(ReplicaDisagreement, BlamesOnlyAMinorityAndNamesEveryoneWithoutOne) {
  using train::replica_disagreement;
  EXPECT_FALSE(replica_disagreement({"a", "b", "c"}, {"h", "h", "h"}, 1, "after step 3").has_value());
  auto two = replica_disagreement({"a", "b"}, {"h", "x"}, 1, "after step 30");
  ASSERT_TRUE(two.has_value());
  EXPECT_TRUE(two->blamed.empty());
  EXPECT_EQ(two->message, "the replicas of stage 1 disagree after step 30: a, b (no majority, so none of them can be "
                          "blamed)");
  auto three = replica_disagreement({"a", "b", "c"}, {"x", "h", "h"}, 0, "after step 7");
  ASSERT_TRUE(three.has_value());
  EXPECT_EQ(three->blamed, (std::vector<size_t>{0}));
  EXPECT_EQ(three->message, "a diverged from the other replicas of stage 0 (2 of 3 agree) after step 7");
  auto split = replica_disagreement({"a", "b", "c", "d"}, {"x", "x", "h", "h"}, 0, "after step 7");
  ASSERT_TRUE(split.has_value());
  EXPECT_TRUE(split->blamed.empty());
}
