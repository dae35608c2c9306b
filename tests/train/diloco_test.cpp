// DiLoCo (docs/diloco.md): the pseudo-gradient codec and the step deadline
// in process, then real `solvernet` processes on 127.0.0.1.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "core/fs.h"
#include "core/process.h"
#include "train/diloco.h"
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
  auto dht = test::start_dht(dir / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  const std::string bootstrap = dht->address;
  std::vector<ChildProcess> nodes;
  const char* regions[] = {"a", "a", "b", "b"};
  for (int i = 0; i < 4; ++i) {
    SpawnOptions logs;
    logs.stdout_path = logs.stderr_path = dir / ("n" + std::to_string(i) + ".log");
    auto node = ChildProcess::spawn({bin(), "node", "--data", (dir / ("n" + std::to_string(i))).string(), "--listen",
                                     "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap, "--region", regions[i]},
                                    logs);
    ASSERT_TRUE(node.ok());
    nodes.push_back(std::move(node).value());
  }
  auto job = job_variant(dir, "long", "inner_steps = 250\n");
  {
    std::string text = read_file(job).value();
    text.replace(text.find("steps = 24"), 10, "steps = 500");
    std::ofstream(job) << text;
  }
  SpawnOptions client_out;
  client_out.stdout_path = dir / "client.out";
  client_out.stderr_path = dir / "client.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", job.string(), "--bootstrap", bootstrap, "--topology",
                                     data("lan.toml").string(), "--peer-timeout-s", "3", "--json"},
                                    client_out);
  ASSERT_TRUE(client.ok());
  // Node 3 has its role once it logs the job's setup; a moment later it trains.
  ASSERT_TRUE(test::wait_for_text(dir / "n3.log", " replica ", 60s)) << read_file(dir / "client.err").value_or("");
  std::this_thread::sleep_for(1500ms);
  ::kill(nodes[3].pid(), SIGKILL);
  auto status = client->wait_for(90s);
  ASSERT_TRUE(status.has_value()) << "client still running 90 s after a node died";
  const std::string out = read_file(dir / "client.out").value_or(""), err = read_file(dir / "client.err").value_or("");
  EXPECT_EQ(*status, 0) << err.substr(0, 4000);
  nlohmann::json s;
  try {
    s = nlohmann::json::parse(out);
  } catch (const std::exception& e) {
    FAIL() << "not JSON: " << out << "\n" << err.substr(0, 4000);
  }
  const auto& d = s["diloco"];
  ASSERT_EQ(d["dropped_groups"].size(), 1u) << s.dump();
  const int64_t dropped_at = d["dropped_at_step"][0].get<int64_t>();
  EXPECT_GE(dropped_at, 1);
  // The kill lands in the first round's inner steps (a group lost inside an
  // outer step ends the job: docs/diloco.md), and the job outer-steps twice.
  EXPECT_LT(dropped_at, 250) << "the kill came after the first outer step";
  EXPECT_EQ(s["losses"].size(), 500u);
  EXPECT_EQ(d["outer_steps"], 2);
  // After the drop each outer step has one replica per stage, still hashed.
  for (const auto& per_stage : d["outer_hashes"]) EXPECT_EQ(per_stage.size(), 2u);
  EXPECT_TRUE(s["holdout_loss"].is_number());
  EXPECT_NE(err.find("dropped"), std::string::npos) << err.substr(0, 4000);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(nodes[static_cast<size_t>(i)].running()) << "a surviving node crashed";
  for (auto& n : nodes) n.terminate();
  dht->process.terminate();
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
