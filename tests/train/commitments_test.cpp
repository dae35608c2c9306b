// Multi-process: a real devnet (4 solvernet nodes, P = 2, D = 2, AQ-SGD and
// CocktailSGD), a verifiable job checkpointing every step. Each member's step
// leaves are rebuilt, with libsodium alone and the rules of
// docs/commitments.md, from the state hashes its node's checkpoint manifests
// recorded and the message digests of its step evidence, and its commitment
// in the client's summary from those leaves with Keccak-256; a second run
// gives bitwise the same state hashes.
#include <gtest/gtest.h>
#include <sodium.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/fs.h"
#include "core/hash.h"
#include "core/process.h"
#include "proto/solvernet.pb.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

using Digest = std::array<unsigned char, 32>;

std::string bin() { return std::getenv("SOLVERNET_BIN"); }
fs::path data(const std::string& name) {
  return fs::path(std::getenv("SOLVERNET_SOURCE_DIR")) / "tests/train/data" / name;
}

Digest blake(const std::string& bytes) {
  Digest out;
  crypto_generichash(out.data(), out.size(), reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(),
                     nullptr, 0);
  return out;
}

std::string keccak(const std::string& bytes) {
  Hash256 h = keccak256(std::string_view(bytes));
  return std::string(h.begin(), h.end());
}

std::string u64(uint64_t n) { return std::string(reinterpret_cast<const char*>(&n), 8); }  // little-endian host
std::string str(const std::string& s) { return u64(s.size()) + s; }

// docs/commitments.md, "Step leaves (v2)".
std::string doc_leaf(uint64_t t, const std::string& state, const std::string& inbound, const std::string& outbound) {
  Digest leaf = blake(str("solvernet/leaf/v2") + u64(t) + state + inbound + outbound);
  return std::string(leaf.begin(), leaf.end());
}

// docs/commitments.md, "Commitment v2": Keccak-256 over the leaves.
std::string doc_root(const std::vector<std::string>& leaves) {
  std::vector<std::string> level;
  for (const auto& leaf : leaves) level.push_back(keccak(std::string(1, '\0') + leaf));
  while (level.size() > 1) {
    std::vector<std::string> up;
    for (size_t i = 0; i + 1 < level.size(); i += 2) up.push_back(keccak(std::string(1, '\x01') + level[i] + level[i + 1]));
    if (level.size() % 2 == 1) up.push_back(level.back());
    level = up;
  }
  return to_hex(as_bytes(level[0]));
}

struct DevnetRun {
  nlohmann::json summary;
  // Per member (stage × replicas + replica): the binary state hash of each
  // step 0 … n, from the manifests, in step order.
  std::vector<std::vector<std::string>> manifest_hashes;
  // Per member: leaves.bin cut into 32-byte leaves, and each step's evidence.
  std::vector<std::vector<std::string>> leaves;
  std::vector<std::vector<solvernet::v1::StepEvidence>> evidence;
};

DevnetRun devnet_run(const fs::path& dir, const fs::path& job, int index) {
  DevnetRun run;
  SpawnOptions options;
  options.stdout_path = dir / fmt::format("out{}.json", index);
  options.stderr_path = dir / fmt::format("err{}.txt", index);
  auto child = ChildProcess::spawn({bin(), "devnet", "--job", job.string(), "--topology", data("lan.toml").string(),
                                    "--no-chain", "--keep", "--json", "--out",
                                    (dir / fmt::format("model{}.safetensors", index)).string()},
                                   options);
  if (!child.ok()) {
    ADD_FAILURE() << child.message();
    return run;
  }
  auto status = child->wait_for(300s);
  if (!status) child->kill_now();
  std::string out = read_file(options.stdout_path).value_or("");
  if (status.value_or(-1) != 0) {
    ADD_FAILURE() << "devnet failed: " << read_file(options.stderr_path).value_or("");
    return run;
  }
  run.summary = nlohmann::json::parse(out, nullptr, false);
  if (run.summary.is_discarded()) {
    ADD_FAILURE() << "not JSON: " << out;
    return run;
  }
  const fs::path devnet_dir = run.summary.value("devnet_dir", "");
  const int replicas = run.summary["replicas"].get<int>();
  run.manifest_hashes.resize(run.summary["member_commitments"].size());
  run.leaves.resize(run.manifest_hashes.size());
  run.evidence.resize(run.manifest_hashes.size());
  const std::regex member_dir(R"(stage(\d+)-replica(\d+))");
  for (const auto& entry : fs::recursive_directory_iterator(devnet_dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !std::regex_match(name, m, member_dir)) continue;
    const size_t member = static_cast<size_t>(std::stoi(m[1]) * replicas + std::stoi(m[2]));
    if (member >= run.leaves.size()) continue;
    if (entry.path().parent_path().parent_path().filename() == "evidence") {
      std::string leaves = read_file(entry.path() / "leaves.bin").value_or("");
      EXPECT_EQ(leaves.size() % 32, 0u);
      for (size_t i = 0; i + 32 <= leaves.size(); i += 32) run.leaves[member].push_back(leaves.substr(i, 32));
      for (size_t t = 1;; ++t) {
        auto bytes = read_file(entry.path() / fmt::format("step-{:012d}.pb", t));
        if (!bytes.ok()) break;
        solvernet::v1::StepEvidence evidence;
        EXPECT_TRUE(evidence.ParseFromString(*bytes));
        run.evidence[member].push_back(std::move(evidence));
      }
      continue;
    }
    std::vector<fs::path> manifests;
    for (const auto& file : fs::directory_iterator(entry.path()))
      if (file.path().string().ends_with(".manifest.json")) manifests.push_back(file.path());
    std::sort(manifests.begin(), manifests.end());  // zero-padded step numbers
    for (const auto& path : manifests) {
      auto manifest = nlohmann::json::parse(read_file(path).value_or(""), nullptr, false);
      EXPECT_FALSE(manifest.is_discarded()) << path;
      if (manifest.is_discarded()) continue;
      auto raw = from_hex(manifest["state_hash"].get<std::string>());
      EXPECT_TRUE(raw.ok() && raw->size() == 32) << path;
      if (member < run.manifest_hashes.size() && raw.ok()) run.manifest_hashes[member].push_back(*raw);
    }
  }
  fs::remove_all(devnet_dir);
  return run;
}

}  // namespace

TEST(Commitments, RebuiltFromCheckpointManifestsAndBitwiseReproducible) {
  ASSERT_GE(sodium_init(), 0);
  auto dir = fs::temp_directory_path() / ("sn-commitments-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  // The AQ-SGD + CocktailSGD job, 5 steps (6 leaves: an uneven tree), made
  // verifiable with a segment of one step: a checkpoint at every step from 0,
  // all kept, so the manifests hold every state hash.
  std::string job = read_file(data("aqsgd.toml")).value();
  job = std::regex_replace(job, std::regex("steps = 20"), "steps = 5");
  job += "\n[verify]\nsegment_steps = 1\n";
  ASSERT_TRUE(write_file_atomic(dir / "job.toml", job).ok());

  std::vector<DevnetRun> runs;
  for (int i = 0; i < 2; ++i) runs.push_back(devnet_run(dir, dir / "job.toml", i));
  for (const auto& run : runs) {
    ASSERT_FALSE(run.summary.is_null());
    auto commitments = run.summary["member_commitments"].get<std::vector<std::string>>();
    ASSERT_EQ(commitments.size(), 4u);
    auto stage_hashes = run.summary["stage_state_hashes"].get<std::vector<std::string>>();
    for (size_t m = 0; m < commitments.size(); ++m) {
      ASSERT_EQ(run.manifest_hashes[m].size(), 6u) << "member " << m;
      ASSERT_EQ(run.leaves[m].size(), 6u) << "member " << m;
      ASSERT_EQ(run.evidence[m].size(), 5u) << "member " << m;
      // Leaf 0: the state as set up, no traffic; leaf t: the manifest's state
      // after step t with the step's message digests.
      EXPECT_EQ(to_hex(as_bytes(doc_leaf(0, run.manifest_hashes[m][0], std::string(32, '\0'), std::string(32, '\0')))),
                to_hex(as_bytes(run.leaves[m][0])));
      for (size_t t = 1; t <= 5; ++t) {
        const auto& e = run.evidence[m][t - 1];
        EXPECT_EQ(e.step(), static_cast<int64_t>(t));
        EXPECT_EQ(to_hex(as_bytes(doc_leaf(t, run.manifest_hashes[m][t], e.inbound_digest(), e.outbound_digest()))),
                  to_hex(as_bytes(run.leaves[m][t])))
            << "member " << m << " step " << t;
      }
      EXPECT_EQ(doc_root(run.leaves[m]), commitments[m]) << "member " << m;
      // Replicas of a stage hold the same weights but their own residuals,
      // buffers (their own samples) and seeds: their state hashes differ.
      if (m % 2 == 1) EXPECT_NE(run.manifest_hashes[m], run.manifest_hashes[m - 1]) << "member " << m;
      if (m % 2 == 0) EXPECT_EQ(to_hex(as_bytes(run.manifest_hashes[m].back())), stage_hashes[m / 2]);
    }
    // Steps differ from each other: the hash follows the state.
    EXPECT_NE(run.manifest_hashes[0][1], run.manifest_hashes[0][2]);
  }
  // The state hashes repeat bitwise; the leaves and commitments do not: each
  // binds the step requests as signed, and a run's client signs with its own
  // key and clock.
  EXPECT_EQ(runs[0].manifest_hashes, runs[1].manifest_hashes);
  EXPECT_NE(runs[0].summary["member_commitments"], runs[1].summary["member_commitments"]);
  EXPECT_EQ(runs[0].summary["model_hash"], runs[1].summary["model_hash"]);
  fs::remove_all(dir);
}
