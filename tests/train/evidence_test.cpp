// A verifiable job ([verify]) on a real devnet (4 solvernet nodes, P = 2,
// D = 2, AQ-SGD and CocktailSGD) leaves evidence behind; each member's steps
// are then replayed here with no peers and must reproduce every leaf bitwise,
// from step 0 and from a middle checkpoint. Tampered evidence is refused
// naming what is wrong; a cheat's replay departs from the honest leaves at
// the cheat's step; a replay under another OpenBLAS core type is compared.
#include <gtest/gtest.h>
#include <sodium.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/fs.h"
#include "core/hash.h"
#include "core/kernels.h"
#include "core/merkle.h"
#include "core/process.h"
#include "train/evidence.h"
#include "train/replay.h"
#include "../common/test_support.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

// The nodes pin OpenBLAS to Haswell kernels (the CLI re-executes itself so);
// this process must run the same kernels to reproduce their leaves, and the
// variable is read only when the library loads: re-execute once, as the CLI does.
const bool kPinned = [] {
  pin_blas_kernels();
  return true;
}();

struct Member {
  fs::path evidence, checkpoints;
  std::vector<Hash256> leaves;
  solvernet::v1::SetupJobRequest setup;
};

struct DevnetRun {
  nlohmann::json summary;
  fs::path dir;
  std::vector<Member> members;  // by stage × replicas + replica
};

bool devnet_started = false;

// One devnet run of a 6-step [verify] job (segment_steps = 3), kept; shared by
// the tests and removed when they end.
DevnetRun& devnet() {
  static DevnetRun run = [] {
    devnet_started = true;
    DevnetRun r;
    r.dir = test::scratch("evidence", "devnet");
    std::string job = read_file(test::source_path("tests/train/data/aqsgd.toml")).value();
    job = std::regex_replace(job, std::regex("steps = 20"), "steps = 6");
    job += "\n[verify]\nsegment_steps = 3\n";
    EXPECT_TRUE(write_file_atomic(r.dir / "job.toml", job).ok());
    auto result = test::run_command({test::solvernet_bin(), "devnet", "--job", (r.dir / "job.toml").string(),
                                     "--topology", test::source_path("tests/train/data/lan.toml").string(),
                                     "--no-chain", "--keep", "--json"},
                                    r.dir, 300s);
    if (result.status != 0) {
      ADD_FAILURE() << "devnet failed: " << result.err;
      return r;
    }
    r.summary = nlohmann::json::parse(result.out, nullptr, false);
    if (r.summary.is_discarded()) {
      ADD_FAILURE() << "not JSON: " << result.out;
      return r;
    }
    const fs::path devnet_dir = r.summary.value("devnet_dir", "");
    const int replicas = r.summary["replicas"].get<int>();
    r.members.resize(r.summary["member_commitments"].size());
    const std::regex member_dir(R"(stage(\d+)-replica(\d+))");
    for (const auto& entry : fs::recursive_directory_iterator(devnet_dir)) {
      std::smatch m;
      const std::string name = entry.path().filename().string();
      if (!entry.is_directory() || !std::regex_match(name, m, member_dir)) continue;
      if (entry.path().parent_path().parent_path().filename() != "evidence") continue;
      auto& member = r.members.at(static_cast<size_t>(std::stoi(m[1]) * replicas + std::stoi(m[2])));
      member.evidence = entry.path();
      const fs::path node_dir = entry.path().parent_path().parent_path().parent_path();
      const std::string job_id = entry.path().parent_path().filename().string();
      member.checkpoints = train::checkpoint_dir(node_dir, job_id, std::stoi(m[1]), std::stoi(m[2]));
      member.leaves = train::read_leaves(entry.path()).value();
      member.setup = train::read_setup_evidence(entry.path()).value();
    }
    return r;
  }();
  return run;
}

struct RemoveDevnet : ::testing::Environment {
  void TearDown() override {
    if (!devnet_started) return;
    std::error_code ec;
    if (devnet().summary.is_object()) fs::remove_all(devnet().summary.value("devnet_dir", ""), ec);
    fs::remove_all(devnet().dir, ec);
  }
};
const auto* const kRemoveDevnet = ::testing::AddGlobalTestEnvironment(new RemoveDevnet);

std::vector<solvernet::v1::StepEvidence> steps(const Member& member, int64_t from, int64_t to) {
  std::vector<solvernet::v1::StepEvidence> out;
  for (int64_t t = from; t <= to; ++t) out.push_back(train::read_step_evidence(member.evidence, t).value());
  return out;
}

train::ReplayInputs inputs(const Member& member, int64_t checkpoint, int64_t to) {
  train::ReplayInputs in;
  in.setup = member.setup;
  in.checkpoint_dir = member.checkpoints;
  in.checkpoint_step = checkpoint;
  in.steps = steps(member, checkpoint + 1, to);
  return in;
}

std::string hex(const Hash256& h) { return to_hex(h); }

}  // namespace

TEST(Evidence, LeavesAreRecordedAndCommitted) {
  DevnetRun& run = devnet();
  ASSERT_EQ(run.members.size(), 4u);
  auto commitments = run.summary["member_commitments"].get<std::vector<std::string>>();
  for (size_t m = 0; m < run.members.size(); ++m) {
    const auto& member = run.members[m];
    ASSERT_EQ(member.leaves.size(), 7u) << "member " << m << ": leaf_0 … leaf_6";
    // The client's commitment is the Keccak Merkle root over leaves.bin (docs/commitments.md).
    std::vector<Hash256> nodes;
    for (const auto& leaf : member.leaves) nodes.push_back(merkle_leaf(leaf, MerkleHash::keccak256));
    EXPECT_EQ(to_hex(merkle_root(nodes, MerkleHash::keccak256)), commitments[m]) << "member " << m;
    // Each step's file holds its leaf, and the leaf is the documented hash of its parts.
    for (int64_t t = 1; t <= 6; ++t) {
      auto evidence = train::read_step_evidence(member.evidence, t);
      ASSERT_TRUE(evidence.ok()) << evidence.message();
      Hash256 leaf;
      std::memcpy(leaf.data(), evidence->leaf().data(), 32);
      EXPECT_EQ(hex(leaf), hex(member.leaves[static_cast<size_t>(t)])) << "member " << m << " step " << t;
      std::string bytes;
      auto str = [&](std::string_view s) {
        uint64_t n = s.size();
        bytes.append(reinterpret_cast<const char*>(&n), 8);
        bytes.append(s);
      };
      str("solvernet/leaf/v2");
      uint64_t t64 = static_cast<uint64_t>(t);
      bytes.append(reinterpret_cast<const char*>(&t64), 8);
      bytes += evidence->state_hash() + evidence->inbound_digest() + evidence->outbound_digest();
      Hash256 doc;
      crypto_generichash(doc.data(), 32, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), nullptr, 0);
      EXPECT_EQ(hex(doc), hex(leaf)) << "member " << m << " step " << t;
      EXPECT_GT(evidence->inbound_size(), 0) << "member " << m << " received nothing in step " << t;
    }
    // Checkpoints at 0, 3 and 6, each with its member's AQ-SGD buffer copies.
    for (int64_t c : {0, 3, 6}) {
      auto manifest = read_file(member.checkpoints / fmt::format("step-{:012d}.manifest.json", c));
      ASSERT_TRUE(manifest.ok()) << "member " << m << " step " << c;
      EXPECT_NE(manifest->find(".buf\""), std::string::npos) << *manifest;
    }
  }
}

TEST(Evidence, ReplayReproducesEveryLeafFromStepZeroAndFromAMiddleCheckpoint) {
  DevnetRun& run = devnet();
  ASSERT_EQ(run.members.size(), 4u);
  for (size_t m = 0; m < run.members.size(); ++m) {
    const auto& member = run.members[m];
    for (int64_t from : {0, 3}) {
      auto replayed = train::replay_member(inputs(member, from, 6));
      ASSERT_TRUE(replayed.ok()) << "member " << m << " from " << from << ": " << replayed.message();
      ASSERT_EQ(replayed->steps.size(), static_cast<size_t>(6 - from));
      for (const auto& step : replayed->steps)
        EXPECT_EQ(hex(step.leaf), hex(member.leaves[static_cast<size_t>(step.step)]))
            << "member " << m << " from " << from << " step " << step.step;
      EXPECT_FALSE(replayed->steps.front().outbound.empty());
    }
  }
}

TEST(Evidence, TamperedEvidenceIsRefusedNamingIt) {
  DevnetRun& run = devnet();
  ASSERT_EQ(run.members.size(), 4u);
  const auto& member = run.members[2];  // stage 1: receives activations and all-reduce chunks
  {
    auto in = inputs(member, 0, 2);
    auto* message = in.steps[1].mutable_inbound(0);
    std::string data = message->has_tensor() ? message->tensor().data() : message->compressed().data();
    data[data.size() / 2] ^= 1;
    if (message->has_tensor())
      message->mutable_tensor()->set_data(data);
    else
      message->mutable_compressed()->set_data(data);
    auto replayed = train::replay_member(in);
    ASSERT_FALSE(replayed.ok());
    EXPECT_EQ(replayed.error().kind, ErrorKind::bad_peer);
    EXPECT_NE(replayed.message().find("forged signature"), std::string::npos) << replayed.message();
    EXPECT_NE(replayed.message().find("step 2: the " + message->kind() + " message"), std::string::npos)
        << replayed.message();
    EXPECT_EQ(replayed.message().find('\n'), std::string::npos);
  }
  {
    auto in = inputs(member, 0, 1);
    in.steps[0].mutable_inbound(0)->clear_signature();
    auto replayed = train::replay_member(in);
    ASSERT_FALSE(replayed.ok());
    EXPECT_NE(replayed.message().find("is unsigned"), std::string::npos) << replayed.message();
  }
  {
    auto in = inputs(member, 0, 1);
    in.steps[0].mutable_inbound()->RemoveLast();
    auto replayed = train::replay_member(in);
    ASSERT_FALSE(replayed.ok());
    EXPECT_NE(replayed.message().find("the evidence lacks the"), std::string::npos) << replayed.message();
  }
  {
    auto in = inputs(member, 0, 1);
    in.steps[0].mutable_request()->mutable_micro_batches(0)->set_sample_ids(0, 12345);
    auto replayed = train::replay_member(in);
    ASSERT_FALSE(replayed.ok());
    EXPECT_NE(replayed.message().find("step request is not signed by the job's owner"), std::string::npos)
        << replayed.message();
  }
}

TEST(Evidence, ACheatDepartsFromTheHonestLeavesAtItsStep) {
  DevnetRun& run = devnet();
  ASSERT_EQ(run.members.size(), 4u);
  using S = train::Cheat::Strategy;
  for (S strategy : {S::skip_steps, S::perturb, S::less_data, S::lie_in_leaf, S::wrong_op, S::equivocate}) {
    for (size_t m : {size_t{0}, size_t{3}}) {
      const auto& member = run.members[m];
      auto in = inputs(member, 0, 6);
      in.cheat.strategy = strategy;
      in.cheat.from_step = 4;
      // Equivocation shows in what the stage sends on: the last stage sends no activations.
      if (strategy == S::equivocate && m == 3) continue;
      auto replayed = train::replay_member(in);
      ASSERT_TRUE(replayed.ok()) << train::cheat_name(strategy) << ": " << replayed.message();
      for (const auto& step : replayed->steps) {
        const bool honest = hex(step.leaf) == hex(member.leaves[static_cast<size_t>(step.step)]);
        // A lie in one leaf leaves the training, and so the later leaves, honest.
        const bool expect_honest = strategy == S::lie_in_leaf ? step.step != 4 : step.step < 4;
        EXPECT_EQ(honest, expect_honest) << train::cheat_name(strategy) << " member " << m << " step " << step.step;
      }
    }
  }
}

// Replays member 0 in a child process of this test under CORETYPE and returns its leaves (hex, one a line).
std::string replay_under(const std::string& coretype, const fs::path& out) {
  pid_t pid = fork();
  if (pid == 0) {
    setenv("OPENBLAS_CORETYPE", coretype.c_str(), 1);
    setenv("SOLVERNET_BLAS_CORETYPE", coretype.c_str(), 1);
    setenv("SN_EVIDENCE_REPLAY_OUT", out.c_str(), 1);
    setenv("SN_EVIDENCE_DIR", devnet().members[0].evidence.c_str(), 1);
    setenv("SN_CHECKPOINT_DIR", devnet().members[0].checkpoints.c_str(), 1);
    execl("/proc/self/exe", "evidence_test", "--gtest_filter=EvidenceHelper.ReplayToFile", nullptr);
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return read_file(out).value_or("");
}

TEST(EvidenceHelper, ReplayToFile) {
  const char* out = std::getenv("SN_EVIDENCE_REPLAY_OUT");
  if (!out) GTEST_SKIP() << "runs as a child of OtherCoreTypeIsComparedWithThePinnedOne";
  Member member;
  member.evidence = std::getenv("SN_EVIDENCE_DIR");
  member.checkpoints = std::getenv("SN_CHECKPOINT_DIR");
  member.setup = train::read_setup_evidence(member.evidence).value();
  auto replayed = train::replay_member(inputs(member, 0, 6));
  ASSERT_TRUE(replayed.ok()) << replayed.message();
  std::string text;
  for (const auto& step : replayed->steps) text += hex(step.leaf) + "\n";
  ASSERT_TRUE(write_file_atomic(out, text).ok());
}

TEST(Evidence, OtherCoreTypeIsComparedWithThePinnedOne) {
  DevnetRun& run = devnet();
  ASSERT_EQ(run.members.size(), 4u);
  std::string recorded;
  for (size_t t = 1; t < run.members[0].leaves.size(); ++t) recorded += hex(run.members[0].leaves[t]) + "\n";
  const std::string haswell = replay_under("Haswell", run.dir / "haswell.txt");
  EXPECT_EQ(haswell, recorded) << "the pinned kernels must reproduce the nodes' leaves";
  const std::string sandybridge = replay_under("Sandybridge", run.dir / "sandybridge.txt");
  ASSERT_FALSE(sandybridge.empty());
  // Not an assertion either way: what the pin protects against (docs/verification.md).
  RecordProperty("sandybridge_matches_haswell", sandybridge == haswell ? "yes" : "no");
  std::cout << "replay under Sandybridge kernels " << (sandybridge == haswell ? "matches" : "DIFFERS FROM")
            << " the Haswell one\n";
}
