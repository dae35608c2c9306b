// Inference arithmetic: the KV cache gives the no-cache model's tokens, spans
// chained give the whole model's bits, batched decode steps match single ones,
// bad inputs are refused with the cache untouched, sampling is reproducible,
// and model files carry what serving needs.
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>

#include "infer/engine.h"
#include "infer/span.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "test_model.h"

namespace sn::infer {
namespace {

namespace fs = std::filesystem;

class SpanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("sn-span-test-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    path_ = testing::write_tiny_model(dir_ / "tiny.safetensors");
    auto file = load_model_file(path_);
    ASSERT_TRUE(file.ok()) << file.message();
    file_ = std::move(*file);
  }
  void TearDown() override { fs::remove_all(dir_); }

  SpanModel span(int first, int end) {
    auto s = SpanModel::create(file_.config, first, end, file_.tensors);
    EXPECT_TRUE(s.ok()) << s.message();
    return std::move(*s);
  }
  static torch::Tensor tokens(std::vector<int64_t> ids) { return torch::tensor(ids, torch::kInt64); }

  fs::path dir_, path_;
  ModelFile file_;
};

TEST_F(SpanTest, ModelFileCarriesConfigAndTokenizer) {
  // A device is not a model file (it would be read without end).
  auto device = load_model_file("/dev/zero");
  ASSERT_FALSE(device.ok());
  EXPECT_NE(device.message().find("not a regular file"), std::string::npos) << device.message();
  EXPECT_EQ(file_.name, "tiny-test");
  EXPECT_EQ(file_.config.layers, 4);
  EXPECT_EQ(file_.config.d_model, 64);
  EXPECT_EQ(file_.tokenizer_vocab, testing::tiny_vocab_text());
  // A file without the metadata (an older model) is refused, naming the key.
  model::StageModel gpt(file_.config, 0, 4, 1);
  ASSERT_TRUE(model::save_safetensors(dir_ / "bare.safetensors", gpt.named_parameters()).ok());
  auto bare = load_model_file(dir_ / "bare.safetensors");
  ASSERT_FALSE(bare.ok());
  EXPECT_EQ(bare.error().kind, ErrorKind::invalid_input);
  EXPECT_NE(bare.message().find("solvernet.model"), std::string::npos) << bare.message();
  // A missing block tensor is named.
  auto tensors = gpt.named_parameters();
  tensors.erase(tensors.begin() + 5);
  ASSERT_TRUE(model::save_safetensors(dir_ / "short.safetensors", tensors,
                                      model::model_file_metadata("x", file_.config, testing::tiny_vocab_text()))
                  .ok());
  auto short_file = load_model_file(dir_ / "short.safetensors");
  ASSERT_FALSE(short_file.ok());
  EXPECT_NE(short_file.message().find("missing"), std::string::npos) << short_file.message();
  // Weights holding a NaN are refused, naming the tensor.
  auto poisoned = gpt.named_parameters();
  {
    torch::NoGradGuard no_grad;
    poisoned[3].second.view(-1)[0] = std::nanf("");
  }
  ASSERT_TRUE(model::save_safetensors(dir_ / "nan.safetensors", poisoned,
                                      model::model_file_metadata("x", file_.config, testing::tiny_vocab_text()))
                  .ok());
  auto nan_file = load_model_file(dir_ / "nan.safetensors");
  ASSERT_FALSE(nan_file.ok());
  EXPECT_NE(nan_file.message().find("NaN"), std::string::npos) << nan_file.message();
  auto none = load_model_file(dir_ / "absent.safetensors");
  EXPECT_FALSE(none.ok());
}

TEST_F(SpanTest, FullForwardEqualsTrainingModel) {
  model::StageModel gpt(file_.config, 0, 4, 7);
  auto ids = tokens({5, 9, 17, 3, 40, 41, 12, 8});
  torch::NoGradGuard no_grad;
  auto expected = gpt.forward(ids.unsqueeze(0))[0];
  auto got = span(0, 4).forward_full(ids);
  ASSERT_TRUE(got.ok()) << got.message();
  EXPECT_TRUE(torch::allclose(*got, expected, 1e-5, 1e-5));
}

// Greedy decoding with the cache against recomputing the whole prefix each step.
TEST_F(SpanTest, CachedGreedyEqualsUncachedGreedy) {
  SpanModel whole = span(0, 4);
  std::vector<int64_t> prompt = {10, 11, 12, 4, 20, 21};
  std::vector<int64_t> uncached = prompt, cached = prompt;
  for (int i = 0; i < 40; ++i) {
    auto logits = whole.forward_full(tokens(uncached));
    ASSERT_TRUE(logits.ok()) << logits.message();
    uncached.push_back(sample_token((*logits)[-1], 0, 1, 0, i));
  }
  KvCache cache;
  auto logits = whole.forward(cache, tokens(prompt));
  ASSERT_TRUE(logits.ok());
  for (int i = 0; i < 40; ++i) {
    int32_t next = sample_token((*logits)[0], 0, 1, 0, i);
    cached.push_back(next);
    if (i + 1 < 40) {
      logits = whole.forward(cache, tokens({next}));
      ASSERT_TRUE(logits.ok()) << logits.message();
    }
  }
  EXPECT_EQ(cached, uncached);
  EXPECT_EQ(cache.length, static_cast<int64_t>(prompt.size()) + 39);
}

// Spans chained hop to hop compute the same bits as one span over every block.
TEST_F(SpanTest, ChainedSpansEqualWholeModelBitwise) {
  SpanModel whole = span(0, 4), a = span(0, 1), b = span(1, 3), c = span(3, 4);
  EXPECT_TRUE(a.embeds() && !a.has_head() && c.has_head() && !c.embeds());
  KvCache w, ca, cb, cc;
  std::vector<torch::Tensor> inputs = {tokens({1, 2, 3, 4, 5}), tokens({6}), tokens({7}), tokens({8})};
  for (const auto& input : inputs) {
    auto expected = whole.forward(w, input);
    auto h1 = a.forward(ca, input);
    ASSERT_TRUE(h1.ok());
    EXPECT_EQ(h1->sizes(), (std::vector<int64_t>{input.size(0), 64}));
    auto h2 = b.forward(cb, *h1);
    ASSERT_TRUE(h2.ok());
    auto out = c.forward(cc, *h2);
    ASSERT_TRUE(out.ok() && expected.ok());
    EXPECT_EQ(out->sizes(), (std::vector<int64_t>{1, 64}));
    EXPECT_TRUE(torch::equal(*out, *expected));
  }
}

TEST_F(SpanTest, BatchedDecodeMatchesSingleSteps) {
  SpanModel s = span(0, 2);
  std::vector<KvCache> single(3), batched(3);
  std::vector<std::vector<int64_t>> prompts = {{1, 2, 3}, {4, 5, 6, 7, 8, 9}, {10}};
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(s.forward(single[i], tokens(prompts[i])).ok());
    ASSERT_TRUE(s.forward(batched[i], tokens(prompts[i])).ok());
  }
  std::vector<torch::Tensor> step = {tokens({30}), tokens({31}), tokens({32})};
  auto outs = s.forward_batch({&batched[0], &batched[1], &batched[2]}, step);
  ASSERT_TRUE(outs.ok()) << outs.message();
  for (size_t i = 0; i < 3; ++i) {
    auto one = s.forward(single[i], step[i]);
    ASSERT_TRUE(one.ok());
    EXPECT_TRUE(torch::allclose((*outs)[i], *one, 1e-5, 1e-6)) << "session " << i;
    EXPECT_EQ(batched[i].length, single[i].length);
  }
  // A batched step of more than one position per session is refused, caches untouched.
  auto bad = s.forward_batch({&batched[0], &batched[1]}, {tokens({1, 2}), tokens({3})});
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(batched[0].length, 4);
}

TEST_F(SpanTest, BadInputsAreRefusedAndTheCacheIsUntouched) {
  SpanModel first = span(0, 2), second = span(2, 4);
  KvCache cache;
  ASSERT_TRUE(first.forward(cache, tokens({1, 2, 3})).ok());
  struct Case {
    const SpanModel* span;
    torch::Tensor input;
    const char* says;
  };
  std::vector<int64_t> long_prompt(62, 5);
  std::vector<Case> cases = {
      {&first, tokens({64}), "outside the vocabulary"},
      {&first, tokens({-1}), "outside the vocabulary"},
      {&first, torch::zeros({1, 64}), "int64 token ids"},
      {&first, tokens(long_prompt), "context of 64"},
      {&first, torch::zeros({0}, torch::kInt64), "empty step"},
  };
  for (const auto& c : cases) {
    auto out = c.span->forward(cache, c.input);
    ASSERT_FALSE(out.ok()) << c.says;
    EXPECT_EQ(out.error().kind, ErrorKind::invalid_input);
    EXPECT_NE(out.message().find(c.says), std::string::npos) << out.message();
    EXPECT_EQ(cache.length, 3);
  }
  KvCache hidden_cache;
  auto wrong_width = second.forward(hidden_cache, torch::zeros({2, 32}));
  EXPECT_FALSE(wrong_width.ok());
  auto nan = second.forward(hidden_cache, torch::full({2, 64}, std::nan("")));
  ASSERT_FALSE(nan.ok());
  EXPECT_NE(nan.message().find("not finite"), std::string::npos);
  EXPECT_EQ(hidden_cache.length, 0);
  EXPECT_EQ(KvCache::bytes_for(file_.config, 2, 64), 2 * 2 * 64 * 64 * 4);
}

TEST_F(SpanTest, SamplingIsReproducibleAndGreedyTakesTheLowestTie) {
  auto logits = torch::tensor({1.0f, 3.0f, 3.0f, 0.5f});
  EXPECT_EQ(sample_token(logits, 0, 1, 0, 0), 1);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 400; ++i) {
    int32_t a = sample_token(logits, 1.0, 1.0, 42, i);
    EXPECT_EQ(a, sample_token(logits, 1.0, 1.0, 42, i));
    counts[a]++;
  }
  EXPECT_GT(counts[0], 0);  // every token with mass is drawn sometimes
  EXPECT_GT(counts[1] + counts[2], counts[0] + counts[3]);
  // A small nucleus keeps only the top tokens.
  for (int i = 0; i < 100; ++i) {
    int32_t t = sample_token(logits, 1.0, 0.5, 3, i);
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
}

TEST_F(SpanTest, LocalEngineGeneratesAndRefusesBadPrompts) {
  auto engine = open_local_engine(path_);
  ASSERT_TRUE(engine.ok()) << engine.message();
  auto prompt = (*engine)->encode("hello world");
  ASSERT_FALSE(prompt.empty());
  EXPECT_EQ((*engine)->decode(prompt), "hello world");
  SamplingParams params;
  params.max_tokens = 12;
  std::string streamed;
  int events = 0;
  auto stats = (*engine)->generate(prompt, params, [&](const TokenEvent& e) {
    streamed += e.text;
    EXPECT_EQ(e.index, events++);
    return true;
  });
  ASSERT_TRUE(stats.ok()) << stats.message();
  EXPECT_EQ(stats->generated_tokens, 12);
  EXPECT_EQ(events, 12);
  EXPECT_EQ(stats->text, streamed);
  EXPECT_EQ(stats->finish_reason, "length");
  EXPECT_EQ(stats->prompt_tokens, static_cast<int>(prompt.size()));

  // The same greedy generation, stopped by a string from its own output.
  if (streamed.size() > 4) {
    SamplingParams stop = params;
    stop.stop = {streamed.substr(2, 2)};
    auto stopped = (*engine)->generate(prompt, stop, [](const TokenEvent&) { return true; });
    ASSERT_TRUE(stopped.ok());
    EXPECT_EQ(stopped->finish_reason, "stop");
    EXPECT_EQ(stopped->text, streamed.substr(0, streamed.find(stop.stop[0])));
  }
  // Cancelled by the callback.
  auto cancelled = (*engine)->generate(prompt, params, [](const TokenEvent& e) { return e.index < 2; });
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->finish_reason, "cancelled");
  EXPECT_EQ(cancelled->generated_tokens, 3);

  auto empty = (*engine)->generate({}, params, [](const TokenEvent&) { return true; });
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.error().kind, ErrorKind::invalid_input);
  std::vector<int32_t> too_long(65, 5);
  auto long_result = (*engine)->generate(too_long, params, [](const TokenEvent&) { return true; });
  ASSERT_FALSE(long_result.ok());
  EXPECT_NE(long_result.message().find("context of 64 tokens"), std::string::npos) << long_result.message();
  params.truncate_prompt = true;
  auto truncated = (*engine)->generate(too_long, params, [](const TokenEvent&) { return true; });
  ASSERT_TRUE(truncated.ok()) << truncated.message();
  EXPECT_EQ(truncated->prompt_tokens, 64 - 12);  // room kept for max_tokens
  EXPECT_EQ(truncated->generated_tokens, 12);
  // A prompt far longer than the context is encoded by its tail only (BPE is
  // quadratic), and is still too long.
  std::string huge;
  for (int i = 0; i < 200000; ++i) huge += "ab ";
  auto huge_ids = (*engine)->encode(huge);
  EXPECT_GT(huge_ids.size(), 64u);
  EXPECT_LT(huge_ids.size(), 2000u);
  params.truncate_prompt = false;
  EXPECT_FALSE((*engine)->generate(huge_ids, params, [](const TokenEvent&) { return true; }).ok());
  SamplingParams bad;
  bad.top_p = 0;
  EXPECT_FALSE((*engine)->generate(prompt, bad, [](const TokenEvent&) { return true; }).ok());
}

}  // namespace
}  // namespace sn::infer
