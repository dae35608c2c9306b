// Multi-process tests: real `solvernet` processes on 127.0.0.1.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return test::solvernet_bin(); }
fs::path source(const std::string& rel) { return test::source_path(rel); }
fs::path data(const std::string& name) { return source("tests/train/data") / name; }

fs::path scratch(const std::string& name) { return test::scratch("train-net", name); }

using test::CommandRun;
CommandRun run(const std::vector<std::string>& argv, const fs::path& dir) { return test::run_command(argv, dir, 600s); }

// Waits until PROCESS's stderr (in ERR_FILE) shows a training step; fails if it exits first.
::testing::AssertionResult wait_for_training(ChildProcess& process, const fs::path& err_file) {
  for (int i = 0; i < 600; ++i) {
    std::this_thread::sleep_for(100ms);
    std::string err = read_file(err_file).value_or("");
    if (err.find("step ") != std::string::npos) return ::testing::AssertionSuccess();
    if (!process.running()) return ::testing::AssertionFailure() << "exited before training: " << err;
  }
  return ::testing::AssertionFailure() << "no training step within 60 s: " << read_file(err_file).value_or("");
}

nlohmann::json parse(const CommandRun& r) {
  try {
    return nlohmann::json::parse(r.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not JSON: " << e.what() << "\nstdout: " << r.out << "\nstderr: " << r.err;
    return {};
  }
}

}  // namespace

TEST(Training, DistributedMatchesOneProcessAndIsBitwiseReproducible) {
  auto dir = scratch("equal");
  CommandRun local = run({bin(), "train", "--local", "--job", data("equal.toml").string(), "--json", "--out",
                   (dir / "local.safetensors").string()}, dir);
  ASSERT_EQ(local.status, 0) << local.err;
  auto reference = parse(local);

  std::vector<nlohmann::json> distributed;
  for (int i = 0; i < 2; ++i) {
    CommandRun d = run({bin(), "devnet", "--job", data("equal.toml").string(), "--topology", data("lan.toml").string(),
                 "--json", "--out", (dir / ("dist" + std::to_string(i) + ".safetensors")).string()}, dir);
    ASSERT_EQ(d.status, 0) << d.err;
    distributed.push_back(parse(d));
  }
  auto ref_losses = reference["losses"].get<std::vector<double>>();
  ASSERT_EQ(ref_losses.size(), 20u);
  for (const auto& d : distributed) {
    EXPECT_EQ(d["stages"], 2);
    EXPECT_EQ(d["replicas"], 2);
    auto losses = d["losses"].get<std::vector<double>>();
    ASSERT_EQ(losses.size(), ref_losses.size());
    for (size_t s = 0; s < losses.size(); ++s)
      EXPECT_NEAR(losses[s], ref_losses[s], 1e-4 * std::abs(ref_losses[s])) << "step " << s + 1;
    EXPECT_GT(d["bytes_pipeline"].get<int64_t>(), 0);
    EXPECT_GT(d["bytes_data_parallel"].get<int64_t>(), 0);
  }
  EXPECT_LT(ref_losses.back(), ref_losses.front());
  // Same job twice: bitwise identical final weights.
  EXPECT_EQ(distributed[0]["model_hash"], distributed[1]["model_hash"]);
  EXPECT_EQ(distributed[0]["stage_state_hashes"], distributed[1]["stage_state_hashes"]);
  EXPECT_FALSE(distributed[0]["model_hash"].get<std::string>().empty());
  fs::remove_all(dir);
}

TEST(Training, KilledNodeIsReportedAndTheClientExits) {
  auto dir = scratch("kill");
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "procs.log";
  auto dht = test::start_dht(dir / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  std::string bootstrap = dht->address;
  std::vector<ChildProcess> nodes;
  const char* regions[] = {"a", "a", "b", "b"};
  for (int i = 0; i < 4; ++i) {
    auto node = ChildProcess::spawn({bin(), "node", "--data", (dir / ("n" + std::to_string(i))).string(), "--listen",
                                     "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap, "--region", regions[i]},
                                    quiet);
    ASSERT_TRUE(node.ok());
    nodes.push_back(std::move(node).value());
  }
  SpawnOptions client_out;
  client_out.stdout_path = dir / "client.out";
  client_out.stderr_path = dir / "client.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", data("slow.toml").string(), "--bootstrap", bootstrap,
                                     "--topology", data("lan.toml").string()},
                                    client_out);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(wait_for_training(*client, dir / "client.err"));
  ::kill(nodes[3].pid(), SIGKILL);
  auto killed_at = std::chrono::steady_clock::now();
  auto status = client->wait_for(90s);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  ASSERT_TRUE(status.has_value()) << "client still running 90 s after a node died";
  EXPECT_NE(*status, 0);
  EXPECT_LT(seconds, 60.0);
  std::string err = read_file(dir / "client.err").value_or("");
  // The report names the dead node (its id, from its key) and its role.
  auto killed_key = NodeKey::load_or_create(dir / "n3");
  ASSERT_TRUE(killed_key.ok());
  auto named = err.find("node " + killed_key->node_id().substr(0, 8) + " (stage ");
  EXPECT_NE(named, std::string::npos) << err;
  EXPECT_NE(err.find("failed"), std::string::npos) << err;
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(nodes[static_cast<size_t>(i)].running()) << "a surviving node crashed";
  for (auto& n : nodes) n.terminate();
  dht->process.terminate();
  fs::remove_all(dir);
}

TEST(Cli, BadInputGivesOneLineErrorAndExitTwo) {
  auto dir = scratch("bad");
  std::ofstream(dir / "bad.toml") << "[model]\nlayers = 2\n\n[parallel]\nstages = 3\n";
  CommandRun bad = run({bin(), "train", "--local", "--job", (dir / "bad.toml").string()}, dir);
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("bad.toml:5: parallel.stages (3) exceeds model.layers (2)"), std::string::npos) << bad.err;

  std::ofstream(dir / "topo.toml") << "[[region]]\nname = 'x'\nnodes = 2\nlatency_ms = 1\nbandwidth_mbps = 0\n";
  CommandRun topo = run({bin(), "devnet", "--topology", (dir / "topo.toml").string()}, dir);
  EXPECT_EQ(topo.status, 2);
  EXPECT_NE(topo.err.find("topo.toml:5: region[0].bandwidth_mbps must be in [0.001, 1000000000], got 0"), std::string::npos) << topo.err;

  CommandRun unreadable = run({bin(), "node", "--data", "/proc/solvernet-cannot-exist"}, dir);
  EXPECT_EQ(unreadable.status, 2);
  EXPECT_NE(unreadable.err.find("/proc/solvernet-cannot-exist"), std::string::npos) << unreadable.err;
  fs::remove_all(dir);
}

TEST(Cli, PortInUseIsReported) {
  auto dir = scratch("port");
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "first.log";
  int port = 30000 + (::getpid() % 20000);
  auto first = ChildProcess::spawn({bin(), "node", "--data", (dir / "a").string(), "--listen",
                                    "127.0.0.1:" + std::to_string(port), "--dht-port", "0"}, quiet);
  ASSERT_TRUE(first.ok());
  for (int i = 0; i < 100 && read_file(dir / "first.log").value_or("").find("listening") == std::string::npos; ++i)
    std::this_thread::sleep_for(100ms);
  CommandRun second = run({bin(), "node", "--data", (dir / "b").string(), "--listen", "127.0.0.1:" + std::to_string(port),
                    "--dht-port", "0"}, dir);
  EXPECT_EQ(second.status, 2);
  EXPECT_NE(second.err.find("port " + std::to_string(port) + " is in use"), std::string::npos) << second.err;
  first->terminate();
  fs::remove_all(dir);
}

TEST(Devnet, InterruptStopsEveryChildAndRemovesItsTempDir) {
  auto dir = scratch("sigint");
  SpawnOptions options;
  options.stdout_path = dir / "out.txt";
  options.stderr_path = dir / "err.txt";
  auto devnet = ChildProcess::spawn({bin(), "devnet", "--job", data("slow.toml").string(), "--topology",
                                     data("lan.toml").string(), "--out", (dir / "m.safetensors").string()},
                                    options);
  ASSERT_TRUE(devnet.ok());
  ASSERT_TRUE(wait_for_training(*devnet, dir / "err.txt"));
  std::string err = read_file(dir / "err.txt").value_or("");
  auto at = err.find("logs in ");
  ASSERT_NE(at, std::string::npos) << err;
  std::string temp_dir = err.substr(at + 8, err.find('\n', at) - at - 8);
  ASSERT_TRUE(fs::exists(temp_dir));
  ::kill(devnet->pid(), SIGINT);
  auto status = devnet->wait_for(60s);
  ASSERT_TRUE(status.has_value()) << "devnet did not stop after SIGINT";
  EXPECT_NE(*status, 0);
  EXPECT_FALSE(fs::exists(temp_dir)) << temp_dir;
  // No process still runs with the devnet's temp dir on its command line.
  std::this_thread::sleep_for(500ms);
  for (const auto& entry : fs::directory_iterator("/proc")) {
    auto cmdline = read_file(entry.path() / "cmdline");
    if (!cmdline.ok()) continue;
    EXPECT_EQ(cmdline->find(temp_dir), std::string::npos) << "orphan: " << entry.path();
  }
  EXPECT_FALSE(fs::exists(dir / "m.safetensors"));
  fs::remove_all(dir);
}

// Every replica of a stage must end each step bitwise equal (the client checks
// the state hashes and fails the run otherwise), compressed gradients included.
TEST(Training, CompressedPipelineAndAllReduceSendFewerBytesAndStillLearn) {
  auto dir = scratch("aqsgd");
  auto run_devnet = [&](const std::string& job) {
    CommandRun r = run({bin(), "devnet", "--job", data(job).string(), "--topology", data("lan.toml").string(),
                        "--no-chain", "--json", "--out", (dir / (job + ".safetensors")).string()}, dir);
    EXPECT_EQ(r.status, 0) << r.err;
    return parse(r);
  };
  auto plain = run_devnet("equal.toml");
  auto compressed = run_devnet("aqsgd.toml");
  ASSERT_TRUE(compressed.contains("losses"));
  auto losses = compressed["losses"].get<std::vector<double>>();
  ASSERT_EQ(losses.size(), 20u);
  for (double l : losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_LT(losses.back(), losses.front());
  // The first pass of each sample goes at fp16, later ones as 4-bit deltas.
  EXPECT_LT(compressed["bytes_pipeline"].get<int64_t>(), plain["bytes_pipeline"].get<int64_t>() / 2);
  // CocktailSGD sends 2% of the coordinates at 4 bits (error feedback keeps the rest).
  EXPECT_LT(compressed["bytes_data_parallel"].get<int64_t>(), plain["bytes_data_parallel"].get<int64_t>() / 20);
  EXPECT_EQ(compressed["compression"]["activations"], "aqsgd");
  EXPECT_EQ(compressed["compression"]["gradients"], "cocktail");
  fs::remove_all(dir);
}
