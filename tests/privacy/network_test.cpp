// Multi-process: [privacy] jobs on devnets of real `solvernet` processes on
// 127.0.0.1, and the `solvernet privacy` planning commands.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return test::solvernet_bin(); }
fs::path data(const std::string& name) { return test::source_path("tests/privacy/data") / name; }
fs::path lan() { return test::source_path("tests/train/data/lan.toml"); }
using test::CommandRun;
CommandRun run(const std::vector<std::string>& argv, const fs::path& dir) { return test::run_command(argv, dir, 300s); }

nlohmann::json parse(const CommandRun& r) {
  try {
    return nlohmann::json::parse(r.out);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not JSON: " << e.what() << "\nstdout: " << r.out << "\nstderr: " << r.err;
    return {};
  }
}

CommandRun devnet(const fs::path& job, const fs::path& dir, const std::string& out) {
  return run({bin(), "devnet", "--job", job.string(), "--topology", lan().string(), "--no-chain", "--json", "--out",
              (dir / out).string()},
             dir);
}

// secagg.toml with its "[privacy]" header replaced by REPLACEMENT, written to PATH.
void secagg_variant(const fs::path& path, const std::string& replacement) {
  std::ifstream in(data("secagg.toml"));
  std::string job((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  job.replace(job.find("[privacy]"), 9, replacement);
  std::ofstream(path) << job;
}

}  // namespace

TEST(PrivacyCli, EpsilonAndNoiseMatchOpacus) {
  auto dir = test::scratch("privacy", "cli");
  CommandRun eps = run({bin(), "privacy", "epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps",
                        "2250", "--delta", "1e-5", "--json"}, dir);
  ASSERT_EQ(eps.status, 0) << eps.err;
  EXPECT_NEAR(parse(eps)["epsilon"].get<double>(), 7.32911117143, 1e-7);
  CommandRun noise = run({bin(), "privacy", "noise", "--target-epsilon", "7.32911117143", "--sample-rate", "0.04",
                          "--steps", "2250", "--delta", "1e-5", "--json"}, dir);
  ASSERT_EQ(noise.status, 0) << noise.err;
  EXPECT_NEAR(parse(noise)["noise_multiplier"].get<double>(), 1.5, 1e-3);
  // Bad values: one line, exit 2.
  for (const std::vector<std::string>& bad :
       {std::vector<std::string>{"epsilon", "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "10"},
        {"epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10"},
        {"epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0"},
        {"epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"},
        {"noise", "--target-epsilon", "0.01", "--sample-rate", "0.1", "--steps", "10"}}) {
    std::vector<std::string> argv{bin(), "privacy"};
    argv.insert(argv.end(), bad.begin(), bad.end());
    CommandRun r = run(argv, dir);
    EXPECT_EQ(r.status, 2) << bad[2] << " " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  fs::remove_all(dir);
}

// A replay needs a replica's pairwise secrets, which would unmask its gradient:
// a verifiable job cannot use secure aggregation (DP alone is verifiable).
TEST(PrivacyCli, SecureAggregationWithVerifyIsRefused) {
  auto dir = test::scratch("privacy", "secagg-verify");
  secagg_variant(dir / "verify.toml", "[verify]\nsegment_steps = 2\n\n[privacy]");
  CommandRun r = devnet(dir / "verify.toml", dir, "m.safetensors");
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("cannot be combined with [verify]"), std::string::npos) << r.err;
  fs::remove_all(dir);
}

// DiLoCo groups exchange pseudo-gradients, which neither method protects yet.
TEST(PrivacyCli, PrivacyWithDilocoIsRefused) {
  auto dir = test::scratch("privacy", "diloco");
  secagg_variant(dir / "diloco.toml", "[diloco]\ninner_steps = 2\n\n[privacy]");
  CommandRun r = devnet(dir / "diloco.toml", dir, "m.safetensors");
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("does not combine with [diloco]"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  fs::remove_all(dir);
}

// Without TLS the secret shares would travel in cleartext; a setting whose
// switch is off would be ignored in silence: both refused before any process starts.
TEST(PrivacyCli, InsecureLinksAndSwitchedOffSettingsAreRefused) {
  auto dir = test::scratch("privacy", "insecure");
  CommandRun insecure = run({bin(), "devnet", "--insecure", "--job", data("secagg.toml").string(), "--topology",
                             lan().string(), "--no-chain", "--json", "--out", (dir / "m.safetensors").string()},
                            dir);
  EXPECT_EQ(insecure.status, 2) << insecure.err;
  EXPECT_NE(insecure.err.find("needs TLS"), std::string::npos) << insecure.err;
  secagg_variant(dir / "ignored.toml", "[privacy]\nnoise_multiplier = 1.0");
  CommandRun ignored = devnet(dir / "ignored.toml", dir, "m.safetensors");
  EXPECT_EQ(ignored.status, 2) << ignored.err;
  EXPECT_NE(ignored.err.find("privacy.noise_multiplier is set but privacy.dp is not true"), std::string::npos)
      << ignored.err;
  EXPECT_FALSE(fs::exists(dir / "m.safetensors"));
  fs::remove_all(dir);
}

// Top-k sparsification would tell every replica which coordinates were large:
// refused before any process starts.
TEST(PrivacyCli, SecureAggregationWithTopKIsRefused) {
  auto dir = test::scratch("privacy", "topk");
  secagg_variant(dir / "topk.toml", "[compression]\ngradients = \"cocktail\"\n\n[privacy]");
  CommandRun r = devnet(dir / "topk.toml", dir, "m.safetensors");
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("top-k"), std::string::npos) << r.err;
  fs::remove_all(dir);
}

// A 2 × 2 devnet whose replicas sum their gradients by secure aggregation:
// the client checks every step that the replicas' state hashes are equal, so
// finishing means they stayed bitwise equal; it learns as the plain run does
// (the fixed-point sum differs from the float sum by < 2^-28 per value).
TEST(PrivacyNetwork, SecureAggregationDevnetKeepsReplicasEqual) {
  auto dir = test::scratch("privacy", "secagg");
  CommandRun secure = devnet(data("secagg.toml"), dir, "secagg.safetensors");
  ASSERT_EQ(secure.status, 0) << secure.err;
  auto s = parse(secure);
  EXPECT_EQ(s["privacy"]["secure_aggregation"], true);
  EXPECT_EQ(s["privacy"]["threshold"], 2);
  auto losses = s["losses"].get<std::vector<double>>();
  ASSERT_EQ(losses.size(), 6u);
  EXPECT_LT(losses.back(), losses.front());
  EXPECT_GT(s["bytes_data_parallel"].get<int64_t>(), 0);
  fs::remove_all(dir);
}

// DP-SGD with secure aggregation: per-sequence clipping and seeded noise keep
// the run bitwise reproducible (same job twice, same weights), and the
// summary carries ε at δ.
TEST(PrivacyNetwork, DpRunIsBitwiseReproducibleAndReportsEpsilon) {
  auto dir = test::scratch("privacy", "dp");
  std::vector<nlohmann::json> runs;
  for (int i = 0; i < 2; ++i) {
    CommandRun r = devnet(data("dp.toml"), dir, "dp" + std::to_string(i) + ".safetensors");
    ASSERT_EQ(r.status, 0) << r.err;
    runs.push_back(parse(r));
  }
  EXPECT_EQ(runs[0]["model_hash"], runs[1]["model_hash"]);
  const auto& p = runs[0]["privacy"];
  EXPECT_EQ(p["secure_aggregation"], true);
  EXPECT_DOUBLE_EQ(p["noise_multiplier"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(p["delta"].get<double>(), 1e-5);
  EXPECT_GT(p["epsilon"].get<double>(), 0);
  EXPECT_TRUE(std::isfinite(p["epsilon"].get<double>()));
  for (double l : runs[0]["losses"].get<std::vector<double>>()) EXPECT_TRUE(std::isfinite(l));
  fs::remove_all(dir);
}

// DP-SGD's clipping and seeded noise are part of the step a verifier replays:
// a staked verifier replays every segment of every member of a DP job on
// anvil and finds each one honest (nobody is challenged or slashed).
TEST(PrivacyNetwork, DpJobIsReplayedHonestByAVerifier) {
  auto dir = test::scratch("privacy", "dp-verify");
  std::ifstream in(test::source_path("tests/verify/data/job-replicas.toml"));
  std::string job((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  job += "\n[privacy]\ndp = true\nclip_norm = 1.0\nnoise_multiplier = 1.0\n";
  std::ofstream(dir / "dp-verify.toml") << job;
  CommandRun r = run({bin(), "devnet", "--job", (dir / "dp-verify.toml").string(), "--topology",
                      test::source_path("tests/verify/data/lan.toml").string(), "--nodes", "5", "--verifiers", "1",
                      "--algo", "naive", "--json", "--peer-timeout-s", "20", "--out",
                      (dir / "m.safetensors").string()},
                     dir);
  ASSERT_EQ(r.status, 0) << r.err;
  auto s = parse(r);
  ASSERT_TRUE(s.contains("verification")) << r.out;
  const auto& v = s["verification"];
  EXPECT_EQ(v["members_checked"], 4) << v.dump();
  EXPECT_EQ(v["members_not_checked"], 0) << v.dump();
  EXPECT_EQ(v["verdicts"]["honest"], 4) << v.dump();
  EXPECT_EQ(v["verdicts"]["slashed"], 0) << v.dump();
  EXPECT_GT(s["privacy"]["epsilon"].get<double>(), 0);
  fs::remove_all(dir);
}
