// The GPT: stage slicing reproduces the whole model, initialisation does not
// depend on the cut, shapes, gradients, and a few AdamW steps lower the loss.
#include <gtest/gtest.h>

#include <set>

#include "model/gpt.h"

namespace sn::model {
namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.layers = 4;
  c.d_model = 32;
  c.heads = 4;
  c.d_ff = 64;
  c.vocab = 50;
  c.seq_len = 16;
  return c;
}

torch::Tensor tokens(int64_t batch, int64_t seq, int64_t vocab, uint64_t seed) {
  auto generator = at::detail::createCPUGenerator(seed);
  return torch::randint(vocab, {batch, seq}, generator, torch::kInt64);
}

bool bitwise_equal(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && torch::equal(a, b);
}

class GptTest : public ::testing::Test {
 protected:
  void SetUp() override { init_torch_single_thread(); }
};

TEST_F(GptTest, InitTorchSingleThreadIsIdempotent) {
  init_torch_single_thread();
  init_torch_single_thread();
  EXPECT_EQ(at::get_num_threads(), 1);
}

TEST_F(GptTest, ParameterNamesFollowTheDocumentedOrder) {
  ModelConfig c = tiny_config();
  c.layers = 2;
  StageModel whole(c, 0, 2, 7);
  std::vector<std::string> names;
  for (const auto& [name, tensor] : whole.named_parameters()) names.push_back(name);
  std::vector<std::string> expected = {"wte.weight", "wpe.weight"};
  for (int layer = 0; layer < 2; ++layer)
    for (const char* suffix : {"ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                               "attn.proj.bias", "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias",
                               "mlp.proj.weight", "mlp.proj.bias"})
      expected.push_back("blocks." + std::to_string(layer) + "." + suffix);
  expected.push_back("ln_f.weight");
  expected.push_back("ln_f.bias");
  EXPECT_EQ(names, expected);
  for (const auto& [name, tensor] : whole.named_parameters()) EXPECT_TRUE(tensor.requires_grad()) << name;

  StageModel last(c, 1, 1, 7);
  names.clear();
  for (const auto& [name, tensor] : last.named_parameters()) names.push_back(name);
  EXPECT_EQ(names.front(), "blocks.1.ln1.weight");
  EXPECT_EQ(names.back(), "wte.weight");  // the tied head's own copy
  EXPECT_FALSE(last.is_first());
  EXPECT_TRUE(last.is_last());
}

TEST_F(GptTest, InitialisationDoesNotDependOnTheCut) {
  const ModelConfig c = tiny_config();
  StageModel whole(c, 0, 4, 11);
  std::map<std::string, torch::Tensor> reference;
  for (const auto& [name, tensor] : whole.named_parameters()) reference[name] = tensor;

  for (auto [first, count] : std::vector<std::pair<int, int>>{{0, 1}, {1, 2}, {2, 2}, {3, 1}, {1, 3}}) {
    StageModel stage(c, first, count, 11);
    for (const auto& [name, tensor] : stage.named_parameters()) {
      ASSERT_TRUE(reference.count(name)) << name;
      EXPECT_TRUE(bitwise_equal(tensor, reference[name])) << name << " differs in stage " << first << "+" << count;
    }
  }
  StageModel other_seed(c, 0, 4, 12);
  EXPECT_FALSE(torch::equal(other_seed.named_parameters()[0].second, whole.named_parameters()[0].second));
}

TEST_F(GptTest, InitialisationFollowsGpt2) {
  ModelConfig c = tiny_config();
  c.d_model = 64;
  c.d_ff = 256;
  c.vocab = 400;
  StageModel whole(c, 0, 4, 3);
  std::map<std::string, torch::Tensor> p;
  for (const auto& [name, tensor] : whole.named_parameters()) p[name] = tensor.detach();
  EXPECT_NEAR(p["wte.weight"].std().item<double>(), 0.02, 0.002);
  EXPECT_NEAR(p["blocks.0.mlp.fc.weight"].std().item<double>(), 0.02, 0.002);
  // Residual output projections: 0.02 / sqrt(2 * layers).
  EXPECT_NEAR(p["blocks.2.mlp.proj.weight"].std().item<double>(), 0.02 / std::sqrt(8.0), 0.001);
  EXPECT_TRUE(torch::equal(p["blocks.1.ln2.weight"], torch::ones({64})));
  EXPECT_TRUE(torch::equal(p["ln_f.bias"], torch::zeros({64})));
  // Different names draw different values.
  EXPECT_FALSE(torch::equal(p["blocks.0.attn.qkv.weight"], p["blocks.1.attn.qkv.weight"]));
}

TEST_F(GptTest, ChainedStagesEqualTheWholeModel) {
  const ModelConfig c = tiny_config();
  StageModel whole(c, 0, 4, 5), first(c, 0, 2, 5), second(c, 2, 2, 5);
  auto input = tokens(3, c.seq_len, c.vocab, 1);
  auto expected = whole.forward(input);
  auto hidden = first.forward(input);
  EXPECT_EQ(hidden.sizes(), (std::vector<int64_t>{3, c.seq_len, c.d_model}));
  auto logits = second.forward(hidden);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{3, c.seq_len, c.vocab}));
  EXPECT_LE((logits - expected).abs().max().item<double>(), 1e-6);

  // Three stages, cut unevenly.
  StageModel a(c, 0, 1, 5), b(c, 1, 2, 5), d(c, 3, 1, 5);
  EXPECT_LE((d.forward(b.forward(a.forward(input))) - expected).abs().max().item<double>(), 1e-6);
}

TEST_F(GptTest, ShorterSequencesAndCausality) {
  const ModelConfig c = tiny_config();
  StageModel whole(c, 0, 4, 5);
  auto input = tokens(2, c.seq_len, c.vocab, 2);
  auto full = whole.forward(input);
  // A prefix sees only itself: its logits equal the full sequence's first positions.
  auto prefix = whole.forward(input.slice(1, 0, 5));
  EXPECT_EQ(prefix.sizes(), (std::vector<int64_t>{2, 5, c.vocab}));
  EXPECT_LE((prefix - full.slice(1, 0, 5)).abs().max().item<double>(), 1e-5);
  // Changing the last token changes nothing before it.
  auto changed = input.clone();
  changed[0][c.seq_len - 1] = (changed[0][c.seq_len - 1].item<int64_t>() + 1) % c.vocab;
  auto after = whole.forward(changed);
  EXPECT_LE((after.slice(1, 0, c.seq_len - 1) - full.slice(1, 0, c.seq_len - 1)).abs().max().item<double>(), 1e-5);
  EXPECT_GT((after.select(1, c.seq_len - 1) - full.select(1, c.seq_len - 1)).abs().max().item<double>(), 0.0);
}

TEST_F(GptTest, BackwardReachesEveryParameterAndTheInput) {
  const ModelConfig c = tiny_config();
  StageModel first(c, 0, 2, 9), second(c, 2, 2, 9);
  auto input = tokens(2, c.seq_len, c.vocab, 3);
  auto targets = tokens(2, c.seq_len, c.vocab, 4);
  auto hidden = first.forward(input);
  auto boundary = hidden.detach().requires_grad_(true);
  auto loss = lm_loss(second.forward(boundary), targets);
  EXPECT_EQ(loss.dim(), 0);
  loss.backward();
  ASSERT_TRUE(boundary.grad().defined());
  EXPECT_EQ(boundary.grad().sizes(), hidden.sizes());
  hidden.backward(boundary.grad());
  for (auto* stage : {&first, &second})
    for (const auto& [name, tensor] : stage->named_parameters()) {
      ASSERT_TRUE(tensor.grad().defined()) << name;
      EXPECT_EQ(tensor.grad().sizes(), tensor.sizes()) << name;
    }
  // Only the rows of tokens that occur receive embedding gradient in stage 0.
  EXPECT_GT(first.named_parameters()[0].second.grad().abs().sum().item<double>(), 0.0);
}

TEST_F(GptTest, LossIsMeanTokenCrossEntropy) {
  auto logits = torch::zeros({2, 3, 10});
  auto targets = torch::zeros({2, 3}, torch::kInt64);
  EXPECT_NEAR(lm_loss(logits, targets).item<double>(), std::log(10.0), 1e-6);
  // Initial loss of a fresh model is near log(vocab).
  const ModelConfig c = tiny_config();
  StageModel whole(c, 0, 4, 1);
  double loss = lm_loss(whole.forward(tokens(4, c.seq_len, c.vocab, 5)), tokens(4, c.seq_len, c.vocab, 6)).item<double>();
  EXPECT_NEAR(loss, std::log(static_cast<double>(c.vocab)), 0.3);
}

TEST_F(GptTest, AdamWLowersTheLossOnATinyBatch) {
  const ModelConfig c = tiny_config();
  StageModel whole(c, 0, 4, 21);
  std::vector<torch::Tensor> params;
  for (const auto& [name, tensor] : whole.named_parameters()) params.push_back(tensor);
  torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  auto input = tokens(4, c.seq_len, c.vocab, 7);
  auto targets = torch::roll(input, -1, 1);  // a learnable pattern: predict the next token
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    optimizer.zero_grad();
    auto loss = lm_loss(whole.forward(input), targets);
    loss.backward();
    optimizer.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, first * 0.7) << "first " << first << " last " << last;
}

TEST_F(GptTest, ForwardIsDeterministic) {
  const ModelConfig c = tiny_config();
  StageModel a(c, 0, 4, 8), b(c, 0, 4, 8);
  auto input = tokens(2, c.seq_len, c.vocab, 9);
  EXPECT_TRUE(bitwise_equal(a.forward(input), b.forward(input)));
}

}  // namespace
}  // namespace sn::model
