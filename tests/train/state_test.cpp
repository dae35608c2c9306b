// The training-state hash (train/state.h): deterministic, and every part of
// the state moves it; the AQ-SGD buffer digest and what it costs; the
// checkpoint store: atomic, last N kept, truncated or tampered files refused;
// a Merkle root rebuilt from docs/commitments.md with libsodium directly.
#include <gtest/gtest.h>
#include <sodium.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <filesystem>
#include <fstream>

#include "compress/compress.h"
#include "core/fs.h"
#include "core/merkle.h"
#include "train/state.h"

using namespace sn;
using namespace sn::train;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("sn-state-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A small but complete state: two weights, their moments, a residual, an
// AQ-SGD digest, a cursor and seeds. Tensors are fresh (no sharing between calls).
TrainingState sample_state() {
  TrainingState s;
  auto a = torch::arange(12, torch::kFloat32).view({3, 4}) / 7.0;
  auto b = torch::arange(5, torch::kFloat32) * -0.25;
  s.weights = {{"a", a}, {"b", b}};
  s.optimizer = {{"adam.m.a", a * 0.1}, {"adam.v.a", a * a}, {"adam.m.b", b * 0.1}, {"adam.v.b", b * b},
                 {"adam.step", torch::tensor({int64_t{3}}, torch::kInt64)}};
  s.residuals = {{"compress.replica_residual", torch::full({17}, 0.5f)}};
  Hash256 buffer{};
  buffer[0] = 42;
  s.activation_buffers = {{"fwd-out", buffer}};
  s.cursor = {3, 100, 8, 2};
  s.rng = {7, 1, 0};
  return s;
}

void bump(torch::Tensor t) {
  torch::NoGradGuard no_grad;
  t.view({-1})[0].add_(1e-6);
}

// docs/commitments.md, "Member commitment", written out with libsodium alone.
std::array<unsigned char, 32> blake(const std::vector<unsigned char>& bytes) {
  std::array<unsigned char, 32> out;
  crypto_generichash(out.data(), 32, bytes.data(), bytes.size(), nullptr, 0);
  return out;
}
std::array<unsigned char, 32> doc_root(const std::vector<std::array<unsigned char, 32>>& step_hashes) {
  if (step_hashes.empty()) {
    std::string empty = "solvernet-empty-merkle-tree";
    return blake({empty.begin(), empty.end()});
  }
  std::vector<std::array<unsigned char, 32>> level;
  for (const auto& h : step_hashes) {
    std::vector<unsigned char> leaf{0x00};
    leaf.insert(leaf.end(), h.begin(), h.end());
    level.push_back(blake(leaf));
  }
  while (level.size() > 1) {
    std::vector<std::array<unsigned char, 32>> up;
    for (size_t i = 0; i + 1 < level.size(); i += 2) {
      std::vector<unsigned char> node{0x01};
      node.insert(node.end(), level[i].begin(), level[i].end());
      node.insert(node.end(), level[i + 1].begin(), level[i + 1].end());
      up.push_back(blake(node));
    }
    if (level.size() % 2 == 1) up.push_back(level.back());
    level = up;
  }
  return level[0];
}

}  // namespace

TEST(StateHash, IsDeterministicAndBinary) {
  const StateDigest first = training_state_digest(sample_state());
  const StateDigest second = training_state_digest(sample_state());
  EXPECT_EQ(first.root, second.root);
  EXPECT_EQ(first.parts, second.parts);
  EXPECT_EQ(training_state_hash(sample_state()), first.root);
  EXPECT_EQ(first.root.size(), 32u);
}

TEST(StateHash, EveryPartMovesItsOwnDigestAndTheRoot) {
  const StateDigest base = training_state_digest(sample_state());
  struct Change {
    const char* what;
    StatePart part;
    std::function<void(TrainingState&)> apply;
  };
  std::vector<Change> changes = {
      {"a weight", StatePart::weights, [](TrainingState& s) { bump(s.weights[1].second); }},
      {"a weight's name", StatePart::weights, [](TrainingState& s) { s.weights[0].first = "c"; }},
      {"a weight's shape", StatePart::weights,
       [](TrainingState& s) { s.weights[0].second = s.weights[0].second.view({4, 3}); }},
      {"a first moment", StatePart::optimizer, [](TrainingState& s) { bump(s.optimizer[0].second); }},
      {"a second moment", StatePart::optimizer, [](TrainingState& s) { bump(s.optimizer[3].second); }},
      {"the optimizer's step count", StatePart::optimizer,
       [](TrainingState& s) { s.optimizer[4].second = torch::tensor({int64_t{4}}, torch::kInt64); }},
      {"a residual", StatePart::residuals, [](TrainingState& s) { bump(s.residuals[0].second); }},
      {"a residual gone", StatePart::residuals, [](TrainingState& s) { s.residuals.clear(); }},
      {"the AQ-SGD buffer", StatePart::activation_buffers,
       [](TrainingState& s) { s.activation_buffers[0].second[31] ^= 1; }},
      {"the cursor's step", StatePart::cursor, [](TrainingState& s) { s.cursor.next_step = 4; }},
      {"the dataset size", StatePart::cursor, [](TrainingState& s) { s.cursor.dataset_samples = 101; }},
      {"the job seed", StatePart::rng, [](TrainingState& s) { s.rng.job_seed = 8; }},
      {"the replica", StatePart::rng, [](TrainingState& s) { s.rng.replica = 1; }},
  };
  for (const auto& change : changes) {
    TrainingState s = sample_state();
    change.apply(s);
    const StateDigest d = training_state_digest(s);
    EXPECT_NE(d.root, base.root) << change.what;
    for (size_t p = 0; p < kStateParts; ++p) {
      if (p == static_cast<size_t>(change.part))
        EXPECT_NE(d.parts[p], base.parts[p]) << change.what;
      else
        EXPECT_EQ(d.parts[p], base.parts[p]) << change.what << " moved " << state_part_name(static_cast<StatePart>(p));
    }
  }
}

TEST(StateHash, AqsgdBufferDigestFollowsTheBufferAndIsCheap) {
  auto dir = scratch("aqsgd");
  CompressionConfig config;
  config.activations = "aqsgd";
  config.forward_bits = 4;
  auto make = [&](const std::string& file, int64_t samples) {
    compress::ActivationBufferOptions options{dir / file, samples, {4, 8}};
    auto codec = compress::make_activation_codec(config, true, options);
    EXPECT_TRUE(codec.ok()) << codec.message();
    return std::move(codec).value();
  };
  auto sender = make("send.buf", 16), receiver = make("recv.buf", 16);
  ASSERT_TRUE(sender->buffer_digest().has_value());
  const auto empty = *sender->buffer_digest();
  EXPECT_EQ(empty, *receiver->buffer_digest());
  torch::manual_seed(3);
  auto x = torch::randn({2, 4, 8});
  auto message = sender->encode(x, {3, 9}, 11);
  ASSERT_TRUE(message.ok()) << message.message();
  EXPECT_NE(*sender->buffer_digest(), empty);
  ASSERT_TRUE(receiver->decode(*message, {3, 9}).ok());
  // Both ends of a boundary evolve their buffers identically, digests included.
  EXPECT_EQ(*sender->buffer_digest(), *receiver->buffer_digest());
  auto before = *sender->buffer_digest();
  ASSERT_TRUE(sender->encode(x * 1.01, {3, 9}, 12).ok());
  EXPECT_NE(*sender->buffer_digest(), before);
  ASSERT_TRUE(sender->forget({3}).ok());
  EXPECT_NE(*sender->buffer_digest(), before);

  // Cost: the digest reads the header and slot table (16 bytes a sample), not
  // the fp16 values. 200k samples of 4 × 8 here; the table is 3.2 MB whatever
  // the sample shape.
  auto big = make("big.buf", 200000);
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 10; ++i) (void)big->buffer_digest();
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 10;
  std::printf("aqsgd buffer digest: %.2f ms for 200000 samples (%.1f ns per sample)\n", ms, ms * 1e6 / 200000);
  fs::remove_all(dir);
}

TEST(Commitments, RootFromTheDocumentedRulesMatchesMerkleRoot) {
  // The client's member_commitments are to_hex(merkle_root(merkle_leaf(h_s)...));
  // the multi-process test compares them with this same rebuild end to end.
  for (size_t n : {0u, 1u, 2u, 3u, 5u, 8u, 13u}) {
    std::vector<Hash256> leaves;
    std::vector<std::array<unsigned char, 32>> hashes;
    for (size_t s = 0; s < n; ++s) {
      TrainingState state = sample_state();
      state.cursor.next_step = static_cast<int64_t>(s + 1);
      Hash256 h = training_state_hash(state);
      leaves.push_back(merkle_leaf(h));
      hashes.push_back(h);
    }
    EXPECT_EQ(to_hex(merkle_root(leaves)), to_hex(doc_root(hashes))) << n << " steps";
  }
}

TEST(Checkpoints, SaveLoadKeepsTheLastNAndCleansUp) {
  auto dir = scratch("keep");
  CheckpointStore store(dir, 3);
  TrainingState state = sample_state();
  for (int64_t step = 1; step <= 5; ++step) {
    state.cursor.next_step = step;
    NamedTensors tensors = state.weights;
    ASSERT_TRUE(store.save(step, tensors, {{"job_id", "j"}}, training_state_digest(state)).ok());
  }
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{3, 4, 5}));
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(entry.path().string().find(".tmp"), std::string::npos) << entry.path();
  }
  EXPECT_EQ(files, 6u);  // three data files, three manifests
  auto loaded = store.load(5);
  ASSERT_TRUE(loaded.ok()) << loaded.message();
  EXPECT_EQ(loaded->manifest.step, 5);
  state.cursor.next_step = 5;
  EXPECT_EQ(loaded->manifest.state.root, training_state_hash(state));
  EXPECT_EQ(loaded->manifest.labels.at("job_id"), "j");
  ASSERT_EQ(loaded->tensors.size(), 2u);
  EXPECT_TRUE(torch::equal(loaded->tensors[0].second, state.weights[0].second));
  auto gone = store.load(1);
  ASSERT_FALSE(gone.ok());
  EXPECT_NE(gone.message().find("3, 4, 5"), std::string::npos) << gone.message();
  fs::remove_all(dir);
}

// A role restored to an earlier step (a recovery, or `train --resume` on
// nodes that ran the job further): the checkpoints it saves from there on
// replace the rolled-back run's later ones instead of being pruned by them.
TEST(Checkpoints, ASaveBeforeNewerOnesDropsTheRolledBackRunsCheckpoints) {
  auto dir = scratch("rollback");
  CheckpointStore store(dir, 2);
  TrainingState state = sample_state();
  auto save = [&](int64_t step) {
    state.cursor.next_step = step;
    return store.save(step, state.weights, {{"job_id", "j"}}, training_state_digest(state));
  };
  for (int64_t step : {36, 39}) ASSERT_TRUE(save(step).ok());
  ASSERT_TRUE(save(3).ok());
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{3}));
  ASSERT_TRUE(save(6).ok());
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{3, 6}));
  ASSERT_TRUE(store.load(6).ok());
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(entry.path().filename().string().find("step-000000000036"), std::string::npos) << entry.path();
  }
  EXPECT_EQ(files, 4u);  // 3 and 6: a data file and a manifest each
  fs::remove_all(dir);
}

TEST(Checkpoints, AWriterKilledMidwayLeavesThePreviousOneLoadable) {
  auto dir = scratch("killed");
  CheckpointStore store(dir, 3);
  TrainingState state = sample_state();
  ASSERT_TRUE(store.save(1, state.weights, {}, training_state_digest(state)).ok());
  // Killed while writing step 2's data (a temp file never renamed), and killed
  // between step 2's data and its manifest (data without a manifest).
  ASSERT_TRUE(write_file_atomic(dir / "unrelated", "x").ok());
  { std::ofstream(store.data_path(2).string() + ".tmp-12345") << "partial"; }
  { std::ofstream(store.data_path(2)) << "truncated safetensors"; }
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{1}));
  auto loaded = store.load(1);
  ASSERT_TRUE(loaded.ok()) << loaded.message();
  EXPECT_EQ(loaded->manifest.state.root, training_state_hash(state));
  // The next save replaces the orphans.
  state.cursor.next_step = 2;
  ASSERT_TRUE(store.save(2, state.weights, {}, training_state_digest(state)).ok());
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{1, 2}));
  EXPECT_FALSE(fs::exists(store.data_path(2).string() + ".tmp-12345"));
  ASSERT_TRUE(store.load(2).ok());
  fs::remove_all(dir);
}

TEST(Checkpoints, TruncatedTamperedOrBrokenFilesAreRefusedByName) {
  auto dir = scratch("tamper");
  CheckpointStore store(dir, 3);
  TrainingState state = sample_state();
  ASSERT_TRUE(store.save(1, state.weights, {}, training_state_digest(state)).ok());
  const std::string data = read_file(store.data_path(1)).value();
  const std::string manifest = read_file(store.manifest_path(1)).value();
  auto refused = [&](const std::string& expect_in_message, const fs::path& names) {
    auto loaded = store.load(1);
    if (loaded.ok()) return ::testing::AssertionFailure() << "loaded";
    if (loaded.message().find(expect_in_message) == std::string::npos ||
        loaded.message().find(names.filename().string()) == std::string::npos)
      return ::testing::AssertionFailure() << loaded.message();
    return ::testing::AssertionSuccess();
  };

  ASSERT_TRUE(write_file_atomic(store.data_path(1), data.substr(0, data.size() - 10)).ok());
  EXPECT_TRUE(refused("truncated", store.data_path(1)));
  std::string flipped = data;
  flipped[flipped.size() - 1] ^= 0x01;  // a weight's last byte
  ASSERT_TRUE(write_file_atomic(store.data_path(1), flipped).ok());
  EXPECT_TRUE(refused("BLAKE2b", store.data_path(1)));
  ASSERT_TRUE(write_file_atomic(store.data_path(1), data).ok());
  ASSERT_TRUE(store.load(1).ok());

  ASSERT_TRUE(write_file_atomic(store.manifest_path(1), manifest.substr(0, manifest.size() / 2)).ok());
  EXPECT_TRUE(refused("not valid JSON", store.manifest_path(1)));
  // A manifest edited to claim another state hash loads (the files match it),
  // but the caller's comparison with the restored state must then fail.
  std::string other = manifest;
  auto at = other.find("\"state_hash\": \"") + 15;
  other[at] = other[at] == '0' ? '1' : '0';
  ASSERT_TRUE(write_file_atomic(store.manifest_path(1), other).ok());
  auto loaded = store.load(1);
  ASSERT_TRUE(loaded.ok()) << loaded.message();
  EXPECT_NE(loaded->manifest.state.root, training_state_hash(state));
  fs::remove(store.data_path(1));
  EXPECT_TRUE(refused("missing", store.data_path(1)));
  fs::remove_all(dir);
}

// A save that finds the disk full (simulated: the data file is written
// whole, the AQ-SGD buffer copy only in half) fails as resource_exhausted and
// leaves no file of its step, not even the earlier save of that step whose
// files it began to replace; the checkpoint before stays loadable.
TEST(Checkpoints, ASaveThatFindsTheDiskFullLeavesNoFileOfItsStep) {
  auto dir = scratch("disk-full");
  CheckpointStore store(dir, 3);
  TrainingState state = sample_state();
  ASSERT_TRUE(write_file_atomic(dir.parent_path() / (dir.filename().string() + ".buf"), std::string(4096, 'b')).ok());
  const std::vector<std::pair<std::string, fs::path>> extra{{"fwd-out.buf", dir.parent_path() / (dir.filename().string() + ".buf")}};
  auto save = [&](int64_t step) {
    state.cursor.next_step = step;
    return store.save(step, state.weights, {{"job_id", "j"}}, training_state_digest(state), extra);
  };
  ASSERT_TRUE(save(1).ok());
  ASSERT_TRUE(save(2).ok());
  simulate_disk_full_for_tests(dir, 1);
  const Status full = save(2);
  simulate_disk_full_for_tests("", 0);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.error().kind, ErrorKind::resource_exhausted) << full.message();
  EXPECT_TRUE(says_disk_full(full.message())) << full.message();
  EXPECT_NE(full.message().find("step-000000000002.fwd-out.buf"), std::string::npos) << full.message();
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{1}));
  for (const auto& entry : fs::directory_iterator(dir))
    EXPECT_FALSE(entry.path().filename().string().starts_with("step-000000000002")) << entry.path() << " was left";
  EXPECT_TRUE(store.load(1).ok());
  ASSERT_TRUE(save(2).ok());
  EXPECT_TRUE(store.load(2).ok());
  fs::remove(dir.parent_path() / (dir.filename().string() + ".buf"));
  fs::remove_all(dir);
}

TEST(StateHash, CostIsOnePassOverWeightsAndMoments) {
  // 2M parameters: weights and both moments are 24 MB to hash.
  TrainingState s;
  auto w = torch::ones({2000, 1000});
  s.weights = {{"w", w}};
  s.optimizer = {{"adam.m.w", w * 0.5}, {"adam.v.w", w * 0.25}, {"adam.step", torch::tensor({int64_t{1}})}};
  (void)training_state_hash(s);
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) (void)training_state_hash(s);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3;
  std::printf("state hash: %.1f ms for 2M parameters (%.0f MB/s over weights and moments)\n", seconds * 1e3,
              24.0 / seconds);
  EXPECT_GT(seconds, 0.0);
}
