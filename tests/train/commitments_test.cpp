// Multi-process: a real devnet (4 solvernet nodes, P = 2, D = 2, AQ-SGD and
// CocktailSGD) checkpointing every step. Each member's commitment in the
// client's summary is rebuilt, with libsodium alone and the rules of
// docs/commitments.md, from the state hashes its node's checkpoint manifests
// recorded; a second run gives bitwise the same hashes and commitments.
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

// docs/commitments.md, "Member commitment".
std::string doc_root(const std::vector<std::string>& step_hashes) {
  if (step_hashes.empty()) return to_hex(blake("solvernet-empty-merkle-tree"));
  std::vector<std::string> level;
  for (const auto& h : step_hashes) {
    Digest leaf = blake(std::string(1, '\0') + h);
    level.emplace_back(leaf.begin(), leaf.end());
  }
  while (level.size() > 1) {
    std::vector<std::string> up;
    for (size_t i = 0; i + 1 < level.size(); i += 2) {
      Digest node = blake(std::string(1, '\x01') + level[i] + level[i + 1]);
      up.emplace_back(node.begin(), node.end());
    }
    if (level.size() % 2 == 1) up.push_back(level.back());
    level = up;
  }
  return to_hex(as_bytes(level[0]));
}

struct DevnetRun {
  nlohmann::json summary;
  // Per member (stage × replicas + replica): the binary state hash of each
  // step, from the manifests, in step order.
  std::vector<std::vector<std::string>> manifest_hashes;
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
  const std::regex member_dir(R"(stage(\d+)-replica(\d+))");
  for (const auto& entry : fs::recursive_directory_iterator(devnet_dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !std::regex_match(name, m, member_dir)) continue;
    const size_t member = static_cast<size_t>(std::stoi(m[1]) * replicas + std::stoi(m[2]));
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
  // The AQ-SGD + CocktailSGD job, 5 steps (an odd tree), a checkpoint every
  // step and all of them kept: the manifests hold every leaf.
  std::string job = read_file(data("aqsgd.toml")).value();
  job = std::regex_replace(job, std::regex("steps = 20"), "steps = 5\ncheckpoint_every = 1\ncheckpoint_keep = 10");
  ASSERT_TRUE(write_file_atomic(dir / "job.toml", job).ok());

  std::vector<DevnetRun> runs;
  for (int i = 0; i < 2; ++i) runs.push_back(devnet_run(dir, dir / "job.toml", i));
  for (const auto& run : runs) {
    ASSERT_FALSE(run.summary.is_null());
    auto commitments = run.summary["member_commitments"].get<std::vector<std::string>>();
    ASSERT_EQ(commitments.size(), 4u);
    auto stage_hashes = run.summary["stage_state_hashes"].get<std::vector<std::string>>();
    for (size_t m = 0; m < commitments.size(); ++m) {
      ASSERT_EQ(run.manifest_hashes[m].size(), 5u) << "member " << m;
      EXPECT_EQ(doc_root(run.manifest_hashes[m]), commitments[m]) << "member " << m;
      // Replicas of a stage hold the same weights but their own residuals,
      // buffers (their own samples) and seeds: their state hashes differ.
      if (m % 2 == 1) EXPECT_NE(run.manifest_hashes[m], run.manifest_hashes[m - 1]) << "member " << m;
      if (m % 2 == 0) EXPECT_EQ(to_hex(as_bytes(run.manifest_hashes[m].back())), stage_hashes[m / 2]);
    }
    // Steps differ from each other: the hash follows the state.
    EXPECT_NE(run.manifest_hashes[0][0], run.manifest_hashes[0][1]);
  }
  EXPECT_EQ(runs[0].summary["member_commitments"], runs[1].summary["member_commitments"]);
  EXPECT_EQ(runs[0].manifest_hashes, runs[1].manifest_hashes);
  EXPECT_EQ(runs[0].summary["model_hash"], runs[1].summary["model_hash"]);
  fs::remove_all(dir);
}
