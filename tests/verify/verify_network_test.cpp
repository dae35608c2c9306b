// Multi-process, on anvil: a devnet whose solver nodes commit for themselves,
// a spare staked node verifies them (replaying every segment: the job has 3),
// the submitter referees. Each cheat is caught and its node slashed; honest
// solvers are never blamed; a verifier that challenges honest work loses its
// bond; a solver that stops answering loses on its deadline. One devnet per
// case: 2 stages × 1 replica, 6 steps, segments of 2; the cheater is node 0,
// which --algo naive on lan.toml puts on stage 0.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "../common/test_support.h"

namespace sn::test {
namespace {

using namespace std::chrono_literals;

fs::path data(const std::string& name) { return source_path("tests/verify/data/" + name); }

struct DevnetRun {
  int status = -1;
  nlohmann::json summary;
  std::string err;
};

DevnetRun devnet(const std::string& name, const std::vector<std::string>& extra, const std::string& job = "job.toml",
                 int nodes = 3) {
  const fs::path dir = scratch("verify", name);
  std::vector<std::string> argv = {solvernet_bin(), "devnet", "--job", data(job).string(), "--topology",
                                   data("lan.toml").string(), "--nodes", std::to_string(nodes), "--algo", "naive",
                                   "--json", "--peer-timeout-s", "20", "--out", (dir / "model.safetensors").string()};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto r = run_command(argv, dir, 240s);
  DevnetRun run{r.status, nlohmann::json::parse(r.out, nullptr, false), r.err};
  if (run.status != 0 || run.summary.is_discarded() || !run.summary.contains("verification")) {
    ADD_FAILURE() << name << ": devnet exited " << r.status << " (output kept in " << dir.string() << "):\n"
                  << r.err.substr(r.err.size() > 4000 ? r.err.size() - 4000 : 0);
    return run;
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);  // the model and logs of a run that worked
  return run;
}

const nlohmann::json& disputes(const DevnetRun& run) { return run.summary["verification"]["disputes"]; }

std::string stake(const nlohmann::json& summary, const std::string& when, const std::string& address) {
  for (const auto& [who, entry] : summary["chain"][when].items())
    if (entry.value("address", "") == address) return entry.value("staked", "");
  return "";
}

// A dispute over a job of n = 6 steps and a step of m operations takes at
// most ⌈log2 n⌉ step rounds and ⌈log2 m⌉ operation rounds.
void expect_logarithmic_rounds(const nlohmann::json& d) {
  EXPECT_LE(d.value("step_rounds", 99), 3) << d.dump(2);
  EXPECT_LE(d.value("op_rounds", 99), 10) << d.dump(2);  // m ≤ 1024 for this 1-layer stage
}

TEST(VerifyNetwork, HonestSolversAreNotBlamedAndALyingVerifierLosesItsBond) {
  // The liar challenges the first member's honest last leaf; the second member
  // it verifies honestly. The verifier and the referee run as processes
  // (solvernet verify run --lie, verify referee).
  DevnetRun run = devnet("honest-liar", {"--verifiers", "1", "--lying-verifier", "--role-processes"});
  if (run.status != 0) return;
  const auto& v = run.summary["verification"];
  EXPECT_EQ(v["members_checked"], 2) << v.dump(2);
  EXPECT_EQ(v["verdicts"]["honest"], 1) << v.dump(2);
  ASSERT_EQ(disputes(run).size(), 1u) << v.dump(2);
  const auto& d = disputes(run)[0];
  EXPECT_EQ(d["result"], "solver wins") << d.dump(2);
  EXPECT_FALSE(d.value("by_timeout", true));
  EXPECT_EQ(d["loser"], d["challenger"]);
  EXPECT_EQ(v["verdicts"]["slashed"], 0);
  expect_logarithmic_rounds(d);
  EXPECT_GE(d.value("step_rounds", 0), 1) << "the liar's (0, n) challenge bisects over steps first";
  // Nobody's stake moved: the liar lost its bond (posted with the challenge), not its stake.
  for (const auto& [who, entry] : run.summary["chain"]["balances_after"].items())
    EXPECT_EQ(entry.value("staked", ""), run.summary["chain"]["balances_before"][who].value("staked", "")) << who;
  EXPECT_GT(d["gas"].value("challenger", 0), 0);
  EXPECT_GT(d["gas"].value("solver", 0), 0);
  EXPECT_GT(d["gas"].value("referee", 0), 0);
}

class CheatTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CheatTest, IsCaughtAndSlashed) {
  DevnetRun run = devnet(GetParam(), {"--cheater", "0:" + GetParam()});
  if (run.status != 0) return;
  ASSERT_EQ(disputes(run).size(), 1u) << run.summary["verification"].dump(2);
  const auto& d = disputes(run)[0];
  EXPECT_EQ(d["result"], "challenger wins") << d.dump(2);
  EXPECT_EQ(d["loser"], d["solver"]);
  EXPECT_EQ(run.summary["verification"]["verdicts"]["slashed"], 1);
  expect_logarithmic_rounds(d);
  // The cheater's locked stake is gone; the verifier's is whole.
  const std::string cheater = d["solver"], verifier = d["challenger"];
  EXPECT_NE(stake(run.summary, "balances_before", cheater), stake(run.summary, "balances_after", cheater));
  EXPECT_EQ(stake(run.summary, "balances_before", verifier), stake(run.summary, "balances_after", verifier));
}

INSTANTIATE_TEST_SUITE_P(Cheats, CheatTest,
                         ::testing::Values("skip-steps", "less-data", "perturb", "random-weights", "lie-in-leaf",
                                           "withhold", "wrong-op", "equivocate"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// A cheat on one replica of a replicated stage: the client does not stop the
// job at the divergence (it records it), and the verifier catches the cheater.
TEST(VerifyNetwork, ACheatingReplicaIsCaughtNotStoppedByTheClient) {
  DevnetRun run = devnet("replica", {"--cheater", "0:skip-steps"}, "job-replicas.toml", 5);
  if (run.status != 0) return;
  ASSERT_TRUE(run.summary.contains("replica_divergences")) << run.summary.dump(2).substr(0, 2000);
  EXPECT_EQ(run.summary["replica_divergences"].size(), 1u);
  EXPECT_EQ(run.summary["verification"]["members_checked"], 4);
  ASSERT_EQ(disputes(run).size(), 1u) << run.summary["verification"].dump(2);
  const auto& d = disputes(run)[0];
  EXPECT_EQ(d["result"], "challenger wins") << d.dump(2);
  EXPECT_EQ(d["loser"], d["solver"]);
  EXPECT_EQ(d["stage"], 0);
}

TEST(VerifyNetwork, ASolverThatStopsAnsweringLosesOnItsDeadline) {
  DevnetRun run = devnet("silent", {"--cheater", "0:lie-in-leaf", "--silent-cheater"});
  if (run.status != 0) return;
  ASSERT_EQ(disputes(run).size(), 1u) << run.summary["verification"].dump(2);
  const auto& d = disputes(run)[0];
  EXPECT_EQ(d["result"], "challenger wins") << d.dump(2);
  EXPECT_TRUE(d.value("by_timeout", false)) << d.dump(2);
  EXPECT_EQ(d["loser"], d["solver"]);
}

// verify run / verify referee refuse bad input with one line and exit 2,
// before touching the chain; a chain that does not answer is not bad input
// (exit 1). None of them leaves a data dir or key behind.
TEST(VerifyNetwork, RoleCommandsRefuseBadInput) {
  const fs::path dir = scratch("verify", "bad-input");
  ASSERT_TRUE(write_file_atomic(dir / "summary.json", R"({"job_id": "j", "placement": {"stages": [[{"node_id": "ab", "address": "127.0.0.1:1"}]]}})").ok());
  ASSERT_TRUE(write_file_atomic(dir / "garbage.json", "not json").ok());
  const std::string summary = (dir / "summary.json").string(), data_dir = (dir / "data").string();
  struct Case {
    std::vector<std::string> args;
    std::string says;
    int status = 2;
  };
  const std::vector<Case> cases = {
      {{"run", "--summary", summary, "--chain-rpc", "http://127.0.0.1:1", "--chain-job", "0", "--data", data_dir}, "--chain-job"},
      {{"run", "--summary", (dir / "garbage.json").string(), "--chain-rpc", "http://127.0.0.1:1", "--chain-job", "1", "--data", data_dir}, "not JSON"},
      {{"run", "--summary", (dir / "missing.json").string(), "--chain-rpc", "http://127.0.0.1:1", "--chain-job", "1", "--data", data_dir}, "--summary"},
      {{"run", "--summary", summary, "--chain-rpc", "http://127.0.0.1:1", "--chain-job", "1", "--data", data_dir, "--fraction", "2"}, "--fraction"},
      {{"run", "--summary", summary, "--chain-rpc", "http://127.0.0.1:1", "--chain-job", "1", "--data", data_dir}, "--chain-rpc", 1},
      {{"referee", "--summary", summary, "--chain-rpc", "http://127.0.0.1:1", "--chain-job", "1", "--data", data_dir, "--for", "-1"}, "--for"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {solvernet_bin(), "verify"};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    auto r = run_command(argv, dir, 30s);
    EXPECT_EQ(r.status, c.status) << c.says << ": " << r.err;
    EXPECT_NE(r.err.find(c.says), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_FALSE(fs::exists(data_dir)) << "a failed role command created its data dir";
  if (!HasFailure()) fs::remove_all(dir);
}

}  // namespace
}  // namespace sn::test
