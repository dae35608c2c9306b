// Corpus, SentencePiece tokenizer (spm_train / spm_encode, cached) and the
// dataset's deterministic sample order.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <set>
#include <numeric>
#include <thread>

#include "core/fs.h"
#include "core/process.h"
#include "model/data.h"

namespace sn::model {
namespace {

namespace fs = std::filesystem;

// A few KB of varied English, so a 300-piece BPE vocabulary fits.
std::string small_corpus() {
  const char* subjects[] = {"The quick brown fox", "A lazy dog", "My neighbour's cat", "Every programmer",
                            "The old lighthouse keeper", "Seven hungry students", "Our tiny network"};
  const char* verbs[] = {"jumps over", "writes about", "dreams of", "quietly watches", "carefully measures",
                         "never forgets"};
  const char* objects[] = {"the sleeping river.", "a broken compiler!", "twelve yellow umbrellas?",
                           "the distant mountains.", "some forgotten poems.", "its own shadow."};
  std::string text;
  int line = 0;
  for (const char* s : subjects)
    for (const char* v : verbs)
      for (const char* o : objects) {
        text += std::string(s) + " " + v + " " + o;
        text += (++line % 5 == 0) ? "\n\n" : "\n";
        if (line % 7 == 0) text += "\tIndented, with  two spaces: 0123456789\n";
      }
  return text;
}

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/sn-data-test-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    corpus_ = dir_ / "corpus.txt";
    ASSERT_TRUE(write_file_atomic(corpus_, small_corpus()).ok());
    config_.corpus = corpus_.string();
    config_.cache_dir = (dir_ / "cache").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_, corpus_;
  DataConfig config_;
};

TEST_F(DataTest, PreparesEncodesAndDecodesARoundTrip) {
  auto prepared = prepare_corpus(config_, 300);
  ASSERT_TRUE(prepared.ok()) << prepared.message();
  EXPECT_EQ(prepared->vocab_size, 300);
  EXPECT_TRUE(fs::exists(prepared->spm_model));
  EXPECT_TRUE(fs::exists(prepared->vocab_file));
  EXPECT_GT(prepared->tokens.size(), 500u);
  for (int32_t id : prepared->tokens) ASSERT_TRUE(id >= 0 && id < 300) << id;

  auto tokenizer = Tokenizer::load(prepared->vocab_file);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.message();
  EXPECT_EQ(tokenizer->vocab_size(), 300);
  // Decoding spm_encode's ids gives back the corpus exactly, spaces and tabs included.
  EXPECT_EQ(tokenizer->decode(prepared->tokens), small_corpus());
  // Our in-process BPE agrees with spm_encode, token for token.
  EXPECT_EQ(tokenizer->encode(small_corpus()), prepared->tokens);

  // The .model protobuf loads to the same vocabulary.
  auto from_model = Tokenizer::load(prepared->spm_model);
  ASSERT_TRUE(from_model.ok()) << from_model.message();
  ASSERT_EQ(from_model->vocab_size(), 300);
  for (int32_t id = 0; id < 300; ++id) ASSERT_EQ(from_model->piece(id), tokenizer->piece(id)) << id;
  EXPECT_EQ(from_model->encode("The quick brown fox dreams of its own shadow."),
            tokenizer->encode("The quick brown fox dreams of its own shadow."));

  // Text outside the corpus: unseen characters become <unk>, the rest round-trips.
  std::string fresh = "The fox watches twelve students.\nA dog measures poems.";
  EXPECT_EQ(tokenizer->decode(tokenizer->encode(fresh)), fresh);
  auto with_unknown = tokenizer->encode("fox \xe2\x82\xac");  // the euro sign is not in the corpus
  EXPECT_EQ(with_unknown.back(), Tokenizer::kUnknown);
  EXPECT_EQ(tokenizer->decode(with_unknown), "fox ?");
}

TEST_F(DataTest, SecondPreparationReusesTheCache) {
  auto first = prepare_corpus(config_, 300);
  ASSERT_TRUE(first.ok()) << first.message();
  auto model_time = fs::last_write_time(first->spm_model);
  // Poison the spm tools: a cache hit must not run them.
  auto second = [&] {
    const char* old_path = std::getenv("PATH");
    std::string saved = old_path ? old_path : "";
    ::setenv("PATH", "/nonexistent", 1);
    auto r = prepare_corpus(config_, 300);
    ::setenv("PATH", saved.c_str(), 1);
    return r;
  }();
  ASSERT_TRUE(second.ok()) << second.message();
  EXPECT_EQ(second->tokens, first->tokens);
  EXPECT_EQ(second->spm_model, first->spm_model);
  EXPECT_EQ(fs::last_write_time(second->spm_model), model_time);
  // A different vocabulary size is a different cache entry.
  auto other = prepare_corpus(config_, 280);
  ASSERT_TRUE(other.ok()) << other.message();
  EXPECT_NE(other->spm_model, first->spm_model);
  // No temporary files are left in the cache.
  for (const auto& entry : fs::directory_iterator(config_.cache_dir))
    EXPECT_EQ(entry.path().string().find(".tmp-"), std::string::npos) << entry.path();
}

TEST_F(DataTest, AnotherCorpusCanBeEncodedWithThisCorpussTokenizer) {
  auto base = prepare_corpus(config_, 300);
  ASSERT_TRUE(base.ok()) << base.message();
  const std::string small = "A lazy dog never forgets the sleeping river.\nEvery programmer dreams of poems.\n";
  ASSERT_TRUE(write_file_atomic(dir_ / "finetune.txt", small).ok());
  DataConfig finetune = config_;
  finetune.corpus = (dir_ / "finetune.txt").string();
  finetune.tokenizer_corpus = corpus_.string();
  auto encoded = prepare_corpus(finetune, 300);
  ASSERT_TRUE(encoded.ok()) << encoded.message();
  // Same tokenizer files, the small text's own ids.
  EXPECT_EQ(encoded->spm_model, base->spm_model);
  auto tokenizer = Tokenizer::load(base->vocab_file);
  ASSERT_TRUE(tokenizer.ok());
  EXPECT_EQ(encoded->tokens, tokenizer->encode(small));
  EXPECT_EQ(tokenizer->decode(encoded->tokens), small);
  // Without tokenizer_corpus the small text would get a tokenizer of its own (too small for 300).
  DataConfig own = finetune;
  own.tokenizer_corpus.clear();
  EXPECT_FALSE(prepare_corpus(own, 300).ok());
}

// Run only as a child of ConcurrentProcessesShareTheCache.
TEST(DataChild, Prepare) {
  const char* corpus = std::getenv("SN_TEST_CHILD_CORPUS");
  const char* cache = std::getenv("SN_TEST_CHILD_CACHE");
  if (!corpus || !cache) GTEST_SKIP() << "only run as a child process";
  DataConfig config;
  config.corpus = corpus;
  config.cache_dir = cache;
  auto r = prepare_corpus(config, 300);
  ASSERT_TRUE(r.ok()) << r.message();
}

TEST_F(DataTest, ConcurrentProcessesShareTheCache) {
  SpawnOptions options;
  options.extra_env = {{"SN_TEST_CHILD_CORPUS", corpus_.string()}, {"SN_TEST_CHILD_CACHE", config_.cache_dir}};
  std::vector<ChildProcess> children;
  for (int i = 0; i < 3; ++i) {
    auto child = ChildProcess::spawn({self_executable().string(), "--gtest_filter=DataChild.Prepare"}, options);
    ASSERT_TRUE(child.ok()) << child.message();
    children.push_back(std::move(*child));
  }
  for (auto& child : children) EXPECT_EQ(child.wait(), 0);
  auto shared = prepare_corpus(config_, 300);
  ASSERT_TRUE(shared.ok()) << shared.message();
  DataConfig alone = config_;
  alone.cache_dir = (dir_ / "alone").string();
  auto fresh = prepare_corpus(alone, 300);
  ASSERT_TRUE(fresh.ok()) << fresh.message();
  EXPECT_EQ(shared->tokens, fresh->tokens);
  EXPECT_EQ(read_file(shared->vocab_file).value_or("a"), read_file(fresh->vocab_file).value_or("b"));
  for (const auto& entry : fs::directory_iterator(config_.cache_dir))
    EXPECT_EQ(entry.path().string().find(".tmp-"), std::string::npos) << entry.path();
}

TEST_F(DataTest, VocabularyTooLargeIsOneClearLine) {
  auto r = prepare_corpus(config_, 20000);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("too small for a vocabulary of 20000 pieces (at most"), std::string::npos) << r.message();
  EXPECT_EQ(r.message().find('\n'), std::string::npos) << r.message();
  EXPECT_EQ(r.error().exit_code, kExitBadInput);
}

TEST_F(DataTest, CorpusResolution) {
  auto plain = resolve_corpus(config_);
  ASSERT_TRUE(plain.ok()) << plain.message();
  EXPECT_EQ(*plain, corpus_);
  EXPECT_FALSE(resolve_corpus((dir_ / "missing.txt").string()).ok());
  ASSERT_TRUE(write_file_atomic(dir_ / "empty.txt", "").ok());
  auto empty = resolve_corpus((dir_ / "empty.txt").string());
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.message().find("empty"), std::string::npos) << empty.message();
}

TEST_F(DataTest, FortunesCorpusIsJoinedOnceIntoTheCache) {
  if (!fs::is_directory("/usr/share/games/fortunes")) GTEST_SKIP() << "the fortunes package is not installed";
  DataConfig fortunes = config_;
  fortunes.corpus = "fortunes";
  auto path = resolve_corpus(fortunes);
  ASSERT_TRUE(path.ok()) << path.message();
  EXPECT_EQ(path->parent_path(), fs::path(config_.cache_dir));
  auto text = read_file(*path);
  ASSERT_TRUE(text.ok());
  EXPECT_GT(text->size(), 100000u);
  EXPECT_EQ(text->find("\n%\n"), std::string::npos) << "separators should be blank lines";
  auto time = fs::last_write_time(*path);
  auto again = resolve_corpus(fortunes);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *path);
  EXPECT_EQ(fs::last_write_time(*again), time);
}

// The in-process BPE against spm_encode on a real corpus: all of fortunes.
TEST_F(DataTest, EncodeMatchesSpmEncodeOnTheFortunesCorpus) {
  if (!fs::is_directory("/usr/share/games/fortunes")) GTEST_SKIP() << "the fortunes package is not installed";
  DataConfig fortunes = config_;
  fortunes.corpus = "fortunes";
  auto prepared = prepare_corpus(fortunes, 512);
  ASSERT_TRUE(prepared.ok()) << prepared.message();
  auto tokenizer = Tokenizer::load(prepared->spm_model);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.message();
  auto text = read_file(*resolve_corpus(fortunes));
  ASSERT_TRUE(text.ok());
  auto ours = tokenizer->encode(*text);
  EXPECT_EQ(ours.size(), prepared->tokens.size());
  EXPECT_TRUE(ours == prepared->tokens) << "in-process encoding differs from spm_encode";
  EXPECT_TRUE(tokenizer->decode(prepared->tokens) == *text) << "decoding does not give the corpus back";
}

TEST(TokenizerLoad, RejectsFilesThatAreNotVocabularies) {
  char dir_template[] = "/tmp/sn-tok-test-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  fs::path dir = dir_template;
  ASSERT_TRUE(write_file_atomic(dir / "bad.vocab", "hello world\n").ok());
  EXPECT_FALSE(Tokenizer::load(dir / "bad.vocab").ok());
  ASSERT_TRUE(write_file_atomic(dir / "bad.model", "\xff\xff\xff").ok());
  EXPECT_FALSE(Tokenizer::load(dir / "bad.model").ok());
  EXPECT_FALSE(Tokenizer::load(dir / "missing.vocab").ok());
  fs::remove_all(dir);
}

// --- Dataset -----------------------------------------------------------------

std::vector<int32_t> counting_tokens(int n) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = i;
  return tokens;
}

TEST(Dataset, SplitsIntoNonOverlappingSamplesWithAHoldout) {
  // 1000 tokens, seq_len 9: 100 samples of 10 tokens, 10 held out.
  Dataset data(counting_tokens(1000), 9, 0.1);
  EXPECT_EQ(data.train_samples(), 90);
  EXPECT_EQ(data.holdout_samples(), 10);
  auto [inputs, targets] = data.batch({0, 89});
  EXPECT_EQ(inputs.sizes(), (std::vector<int64_t>{2, 9}));
  EXPECT_EQ(inputs.scalar_type(), torch::kInt64);
  EXPECT_EQ(inputs[0][0].item<int64_t>(), 0);
  EXPECT_EQ(targets[0][8].item<int64_t>(), 9);
  EXPECT_EQ(inputs[1][0].item<int64_t>(), 890);
  EXPECT_TRUE(torch::equal(targets.slice(1, 0, 8), inputs.slice(1, 1, 9)));
  auto [held_in, held_targets] = data.batch({0, 9}, /*holdout=*/true);
  EXPECT_EQ(held_in[0][0].item<int64_t>(), 900);
  EXPECT_EQ(held_targets[1][8].item<int64_t>(), 999);
  // Held-out tokens are never in a training sample.
  std::set<int64_t> train_tokens;
  for (int64_t id = 0; id < data.train_samples(); ++id) {
    auto [in, out] = data.batch({id});
    for (int64_t t = 0; t < 9; ++t) {
      train_tokens.insert(in[0][t].item<int64_t>());
      train_tokens.insert(out[0][t].item<int64_t>());
    }
  }
  EXPECT_EQ(*train_tokens.rbegin(), 899);
  EXPECT_THROW(data.batch({90}), c10::Error);
  EXPECT_THROW(data.batch({10}, true), c10::Error);
}

TEST(Dataset, SampleOrderIsSeededPerEpochAndDeterministic) {
  Dataset data(counting_tokens(1000), 9, 0.1);  // 90 training samples
  Dataset twin(counting_tokens(1000), 9, 0.1);
  const int64_t batch = 30;  // three steps per epoch
  std::vector<int64_t> epoch0, epoch1;
  for (int64_t step = 0; step < 3; ++step) {
    auto ids = data.samples_for_step(step, batch, 42);
    EXPECT_EQ(ids, twin.samples_for_step(step, batch, 42));
    epoch0.insert(epoch0.end(), ids.begin(), ids.end());
    ids = data.samples_for_step(step + 3, batch, 42);
    epoch1.insert(epoch1.end(), ids.begin(), ids.end());
  }
  // Each epoch visits every training sample once, in a different order.
  auto sorted0 = epoch0, sorted1 = epoch1;
  std::sort(sorted0.begin(), sorted0.end());
  std::sort(sorted1.begin(), sorted1.end());
  std::vector<int64_t> all(90);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(sorted0, all);
  EXPECT_EQ(sorted1, all);
  EXPECT_NE(epoch0, epoch1);
  EXPECT_NE(epoch0, all);
  EXPECT_EQ(epoch0, data.epoch_order(0, 42));
  // Another seed, another order.
  EXPECT_NE(data.samples_for_step(0, batch, 43), data.samples_for_step(0, batch, 42));
  // A batch never straddles two epochs: with 60 a step, an epoch is one step
  // and its last 30 ids sit it out, so no step holds a sample twice.
  EXPECT_EQ(data.steps_per_epoch(60), 1);
  EXPECT_EQ(data.samples_for_step(0, 60, 42), std::vector<int64_t>(epoch0.begin(), epoch0.begin() + 60));
  EXPECT_EQ(data.samples_for_step(1, 60, 42), std::vector<int64_t>(epoch1.begin(), epoch1.begin() + 60));
  for (int64_t step = 0; step < 20; ++step) {
    auto ids = data.samples_for_step(step, 40, 42);
    EXPECT_EQ(std::set<int64_t>(ids.begin(), ids.end()).size(), ids.size()) << step;
  }
  // Pinned values: the order must never change silently (replays depend on it).
  // (Reproduced by a separate program from docs/data.md's description.)
  EXPECT_EQ(Dataset(counting_tokens(110), 9, 0.0).samples_for_step(0, 11, 1),
            (std::vector<int64_t>{5, 4, 2, 8, 6, 1, 3, 10, 7, 9, 0}));
}

TEST(Dataset, ShardedOrderKeepsEverySampleOnItsReplica) {
  Dataset data(counting_tokens(1000), 9, 0.1);  // 90 training samples
  const int64_t shards = 2, batch = 10;        // 5 per shard a step; shard r holds ids ≡ r (mod 2)
  EXPECT_EQ(data.shard_size(0, shards), 45);
  EXPECT_EQ(data.shard_size(1, shards), 45);
  EXPECT_EQ(data.steps_per_epoch(batch, shards), 9);
  std::vector<std::vector<int64_t>> epochs(2);
  for (int64_t step = 0; step < 18; ++step) {
    auto ids = data.samples_for_step(step, batch, 42, shards);
    ASSERT_EQ(ids.size(), 10u);
    for (int64_t k = 0; k < batch; ++k) EXPECT_EQ(ids[static_cast<size_t>(k)] % shards, k / 5) << step;
    auto& epoch = epochs[static_cast<size_t>(step / 9)];
    epoch.insert(epoch.end(), ids.begin(), ids.end());
  }
  // After 9 steps every sample has passed once; the next 9 pass them again, reshuffled.
  for (auto& epoch : epochs) {
    auto sorted = epoch;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> all(90);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_EQ(data.epoch_order(0, 42, 1, 2).size(), 45u);
  // A batch the shards cannot split evenly is refused (empty).
  EXPECT_TRUE(data.samples_for_step(0, 9, 42, 2).empty());
  // One shard is the plain order.
  EXPECT_EQ(data.samples_for_step(2, batch, 42, 1), data.samples_for_step(2, batch, 42));
}

TEST(Dataset, ConcurrentCallsAgree) {
  Dataset data(counting_tokens(5000), 9, 0.05);
  std::vector<std::vector<int64_t>> seen(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      for (int64_t step = 0; step < 50; ++step) {
        auto ids = data.samples_for_step(step, 16, 7);
        seen[static_cast<size_t>(i)].insert(seen[static_cast<size_t>(i)].end(), ids.begin(), ids.end());
      }
    });
  for (auto& t : threads) t.join();
  for (int i = 1; i < 4; ++i) EXPECT_EQ(seen[static_cast<size_t>(i)], seen[0]);
}

TEST(Dataset, TooFewTokensGiveNoSamples) {
  Dataset data(counting_tokens(5), 9, 0.1);
  EXPECT_EQ(data.train_samples(), 0);
  EXPECT_TRUE(data.samples_for_step(0, 4, 1).empty());
}

}  // namespace
}  // namespace sn::model
