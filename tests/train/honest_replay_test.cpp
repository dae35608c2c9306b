// An honest solver is never blamed: 20 honest jobs (seeds 1–20) run on real
// node processes, half of them started with OPENBLAS_CORETYPE=Sandybridge and
// half with SkylakeX in their environment, and every member of every job is
// replayed here from its step-0 checkpoint and its evidence, as a verifier
// does. Every leaf must match the one the member recorded (and so committed):
// a verifier has nothing to challenge. The kernel pin (core/kernels.h) is what
// makes the environments not matter; evidence_test shows that unpinned
// kernels do change the leaves.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "core/fs.h"
#include "core/hash.h"
#include "core/kernels.h"
#include "core/process.h"
#include "train/evidence.h"
#include "train/replay.h"
#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

// This process replays, so it runs the kernels the nodes are pinned to.
const bool kPinned = [] {
  pin_blas_kernels();
  return true;
}();

constexpr int kSeeds = 20;

struct Cluster {
  fs::path dir;
  std::string bootstrap;
  std::optional<ChildProcess> dht;
  std::vector<ChildProcess> nodes;
  std::vector<fs::path> data_dirs;

  ~Cluster() {
    for (auto& n : nodes) n.terminate();
    if (dht) dht->terminate();
  }
};

// Every member directory DATA/evidence/<job>/stage<s>-replica<r>/ of JOB_ID on the nodes.
std::vector<std::pair<fs::path, fs::path>> member_dirs(const Cluster& cluster, const std::string& job_id) {
  std::vector<std::pair<fs::path, fs::path>> out;  // (evidence dir, checkpoint dir)
  const std::regex member(R"(stage(\d+)-replica(\d+))");
  for (const auto& data : cluster.data_dirs) {
    const fs::path job_dir = data / "evidence" / job_id;
    if (!fs::exists(job_dir)) continue;
    for (const auto& entry : fs::directory_iterator(job_dir)) {
      std::smatch m;
      const std::string name = entry.path().filename().string();
      if (!std::regex_match(name, m, member)) continue;
      out.emplace_back(entry.path(), train::checkpoint_dir(data, job_id, std::stoi(m[1]), std::stoi(m[2])));
    }
  }
  return out;
}

TEST(HonestReplay, EveryLeafOfTwentyHonestJobsReplaysBitwise) {
  Cluster cluster;
  cluster.dir = test::scratch("honest", "replay");
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = cluster.dir / "procs.log";
  auto dht = test::start_dht(cluster.dir / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  cluster.dht = std::move(dht->process);
  cluster.bootstrap = dht->address;
  const char* coretypes[] = {"Sandybridge", "SkylakeX", "Sandybridge", "SkylakeX"};
  for (int i = 0; i < 4; ++i) {
    SpawnOptions options = quiet;
    options.extra_env["OPENBLAS_CORETYPE"] = coretypes[i];
    cluster.data_dirs.push_back(cluster.dir / ("n" + std::to_string(i)));
    auto node = ChildProcess::spawn({test::solvernet_bin(), "node", "--data", cluster.data_dirs.back().string(),
                                     "--listen", "127.0.0.1:0", "--dht-port", "0", "--bootstrap", cluster.bootstrap,
                                     "--region", i < 2 ? "a" : "b"},
                                    options);
    ASSERT_TRUE(node.ok()) << node.message();
    cluster.nodes.push_back(std::move(node).value());
  }

  std::string base = read_file(test::source_path("tests/train/data/aqsgd.toml")).value();
  base = std::regex_replace(base, std::regex("steps = 20"), "steps = 2");
  base += "\n[verify]\nsegment_steps = 2\n";
  int64_t leaves_checked = 0;
  std::set<std::string> model_hashes;  // one entry per distinct final state
  for (int seed = 1; seed <= kSeeds; ++seed) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    const fs::path run_dir = cluster.dir / ("seed" + std::to_string(seed));
    fs::create_directories(run_dir);
    const std::string job = std::regex_replace(base, std::regex("seed = 7"), "seed = " + std::to_string(seed));
    ASSERT_TRUE(write_file_atomic(run_dir / "job.toml", job).ok());
    auto run = test::run_command({test::solvernet_bin(), "train", "--job", (run_dir / "job.toml").string(),
                                  "--bootstrap", cluster.bootstrap, "--topology",
                                  test::source_path("tests/train/data/lan.toml").string(), "--json",
                                  "--peer-timeout-s", "20"},
                                 run_dir, 120s);
    ASSERT_EQ(run.status, 0) << run.err;
    auto summary = nlohmann::json::parse(run.out, nullptr, false);
    ASSERT_FALSE(summary.is_discarded()) << run.out;
    const std::string job_id = summary.value("job_id", "");
    ASSERT_FALSE(job_id.empty()) << run.out;
    model_hashes.insert(summary["stage_state_hashes"].dump());
    const auto members = member_dirs(cluster, job_id);
    ASSERT_EQ(members.size(), 4u) << "a 2 × 2 job has four members";
    for (const auto& [evidence, checkpoints] : members) {
      auto leaves = train::read_leaves(evidence);
      ASSERT_TRUE(leaves.ok()) << leaves.message();
      ASSERT_EQ(leaves->size(), 3u) << evidence;
      train::ReplayInputs in;
      in.setup = train::read_setup_evidence(evidence).value();
      in.checkpoint_dir = checkpoints;
      in.checkpoint_step = 0;
      for (int64_t t = 1; t <= 2; ++t) in.steps.push_back(train::read_step_evidence(evidence, t).value());
      auto replayed = train::replay_member(in);
      ASSERT_TRUE(replayed.ok()) << evidence << ": " << replayed.message();
      ASSERT_EQ(replayed->steps.size(), 2u);
      for (const auto& step : replayed->steps) {
        EXPECT_EQ(to_hex(step.leaf), to_hex((*leaves)[static_cast<size_t>(step.step)]))
            << evidence << " step " << step.step;
        ++leaves_checked;
      }
    }
  }
  EXPECT_EQ(leaves_checked, int64_t{kSeeds} * 4 * 2);
  // Twenty seeds are twenty different trainings, not one repeated.
  EXPECT_EQ(model_hashes.size(), static_cast<size_t>(kSeeds));
  // The nodes were told another kernel set and overrode it (the pin's warning).
  EXPECT_NE(read_file(cluster.dir / "procs.log").value_or("").find("OPENBLAS_CORETYPE=Sandybridge overridden"),
            std::string::npos);
  fs::remove_all(cluster.dir);
}

}  // namespace
