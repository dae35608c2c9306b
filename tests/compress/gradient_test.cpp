// Gradient compressors: error feedback conserves the gradient, replicas agree
// on the random subset, the sum over a ring is the same everywhere, sizes
// match the formula, and corrupt messages are rejected.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <random>

#include "compress/compress.h"

namespace sn::compress {
namespace {

constexpr int64_t kNumel = 10007;  // odd on purpose: partial buckets and bitmap bytes

class GradientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(1);
    torch::manual_seed(3);
    config_.gradients = "cocktail";
    config_.gradient_bits = 4;
    config_.random_fraction = 0.1;
    config_.topk_fraction = 0.2;
  }
  std::unique_ptr<GradientCompressor> make(uint64_t salt = 0) {
    auto made = make_gradient_compressor(config_, kNumel, salt);
    EXPECT_TRUE(made.ok()) << made.message();
    return made.ok() ? std::move(made).value() : nullptr;
  }
  // The header fields of a cocktail message: subset size and selected count.
  static std::pair<uint32_t, uint32_t> header(const CompressedTensor& message) {
    uint32_t subset = 0, selected = 0;
    std::memcpy(&subset, message.data().data() + 8, 4);
    std::memcpy(&selected, message.data().data() + 12, 4);
    return {subset, selected};
  }
  CompressionConfig config_;
};

TEST_F(GradientTest, ErrorFeedbackConservesTheGradient) {
  for (const std::string kind : {"cocktail", "fp16", "none"}) {
    config_.gradients = kind;
    auto compressor = make(1);
    ASSERT_TRUE(compressor);
    for (int step = 0; step < 20; ++step) {
      const torch::Tensor gradient = torch::randn({kNumel}) * 1e-2;
      const torch::Tensor old_residual = compressor->residual();
      auto message = compressor->compress(gradient, 1000 + step);
      ASSERT_TRUE(message.ok()) << message.message();
      auto sent = compressor->decompress(*message);
      ASSERT_TRUE(sent.ok()) << sent.message();
      const torch::Tensor new_residual = compressor->residual();
      // Element by element: sent + new residual == gradient + old residual,
      // up to the rounding of one fp32 subtraction.
      const torch::Tensor lhs = sent->to(torch::kFloat64) + new_residual.to(torch::kFloat64);
      const torch::Tensor rhs = gradient.to(torch::kFloat64) + old_residual.to(torch::kFloat64);
      const double scale = rhs.abs().max().item<double>();
      EXPECT_LE((lhs - rhs).abs().max().item<double>(), scale * 1.2e-7) << kind << " step " << step;
      EXPECT_NEAR(lhs.sum().item<double>(), rhs.sum().item<double>(), scale * 1e-4) << kind;
      if (kind == "none") EXPECT_EQ(new_residual.abs().max().item<float>(), 0.0f);
    }
  }
}

TEST_F(GradientTest, AConstantGradientIsDeliveredInFullOverTime) {
  auto compressor = make();
  const torch::Tensor gradient = torch::randn({kNumel});
  torch::Tensor delivered = torch::zeros({kNumel}, torch::kFloat64);
  const int steps = 300;
  for (int step = 0; step < steps; ++step) {
    auto message = compressor->compress(gradient, step);
    ASSERT_TRUE(message.ok());
    delivered += compressor->decompress(*message)->to(torch::kFloat64);
  }
  // Σ sent = T·g − residual_T, and the residual stays bounded, so the average
  // sent converges to g even though each step sends 2% of the coordinates.
  const double residual_max = compressor->residual().abs().max().item<double>();
  EXPECT_LT(residual_max, 200.0 * gradient.abs().max().item<double>());
  const torch::Tensor average = delivered / steps;
  const double relative = (average - gradient.to(torch::kFloat64)).norm().item<double>() /
                          gradient.norm().item<double>();
  EXPECT_LT(relative, 0.5);
}

TEST_F(GradientTest, ReplicasPickTheSameSubsetAndTheRingSumIsIdenticalEverywhere) {
  const int replicas = 4;
  std::vector<std::unique_ptr<GradientCompressor>> compressors;
  for (int r = 0; r < replicas; ++r) compressors.push_back(make(static_cast<uint64_t>(r)));

  // The subset for this seed: what a compressor that sends all of it touches.
  CompressionConfig everything = config_;
  everything.topk_fraction = 1.0;
  everything.gradient_bits = 8;
  auto probe = make_gradient_compressor(everything, kNumel, 0);
  ASSERT_TRUE(probe.ok());
  const uint64_t seed = 77;
  auto probe_message = (*probe)->compress(torch::randn({kNumel}).abs() + 1.0, seed);
  ASSERT_TRUE(probe_message.ok());
  const torch::Tensor in_subset = *(*probe)->decompress(*probe_message) != 0;
  const int64_t subset_size = in_subset.sum().item<int64_t>();
  EXPECT_NEAR(static_cast<double>(subset_size), 0.1 * kNumel, 5 * std::sqrt(0.1 * 0.9 * kNumel));

  std::vector<CompressedTensor> messages;
  for (int r = 0; r < replicas; ++r) {
    const torch::Tensor gradient = torch::randn({kNumel});
    auto message = compressors[static_cast<size_t>(r)]->compress(gradient, seed);
    ASSERT_TRUE(message.ok());
    EXPECT_EQ(header(*message).first, static_cast<uint32_t>(subset_size));
    const torch::Tensor sent = *compressors[static_cast<size_t>(r)]->decompress(*message);
    EXPECT_TRUE(((sent != 0) & ~in_subset).sum().item<int64_t>() == 0) << "outside the subset";
    // Top-k: every value sent is at least as large as every subset value not sent.
    const torch::Tensor chosen = sent != 0;
    const torch::Tensor left_out = in_subset & ~chosen;
    EXPECT_GE(gradient.index({chosen}).abs().min().item<float>(),
              gradient.index({left_out}).abs().max().item<float>());
    messages.push_back(*message);
  }
  // All-gather then sum in replica order: each replica decodes with its own
  // compressor and gets bitwise the same sum.
  std::vector<torch::Tensor> sums;
  for (int r = 0; r < replicas; ++r) {
    torch::Tensor sum = torch::zeros({kNumel});
    for (const auto& message : messages) {
      auto decoded = compressors[static_cast<size_t>(r)]->decompress(message);
      ASSERT_TRUE(decoded.ok());
      sum += *decoded;
    }
    sums.push_back(sum);
  }
  for (int r = 1; r < replicas; ++r) EXPECT_TRUE(torch::equal(sums[0], sums[static_cast<size_t>(r)]));
}

TEST_F(GradientTest, BytesMatchTheFormulaAndAreOverTwentyTimesSmaller) {
  auto compressor = make();
  for (uint64_t seed = 0; seed < 5; ++seed) {
    auto message = compressor->compress(torch::randn({kNumel}), seed);
    ASSERT_TRUE(message.ok());
    const auto [subset, selected] = header(*message);
    EXPECT_EQ(selected, static_cast<uint32_t>(std::llround(0.2 * subset)));
    EXPECT_EQ(static_cast<int64_t>(message->data().size()), cocktail_data_bytes(subset, selected, 4));
    EXPECT_EQ(cocktail_data_bytes(subset, selected, 4),
              17 + (subset + 7) / 8 + 2 * ((selected + 127) / 128) + (selected * 4 + 7) / 8);
    EXPECT_NEAR(static_cast<double>(message->data().size()),
                static_cast<double>(expected_gradient_bytes(config_, kNumel)),
                0.1 * static_cast<double>(message->data().size()));
    EXPECT_GT(fp32_data_bytes(kNumel), 20 * static_cast<int64_t>(message->data().size()));
  }
  config_.gradients = "fp16";
  auto half = make();
  auto message = half->compress(torch::randn({kNumel}), 0);
  ASSERT_TRUE(message.ok());
  EXPECT_EQ(static_cast<int64_t>(message->data().size()), fp16_data_bytes(kNumel));
  EXPECT_EQ(expected_gradient_bytes(config_, kNumel), fp16_data_bytes(kNumel));
}

TEST_F(GradientTest, SendingTheWholeSubsetLeavesTheBitmapOut) {
  config_.random_fraction = 0.25;
  config_.topk_fraction = 1.0;
  config_.gradient_bits = 2;
  auto compressor = make();
  torch::Tensor gradient = torch::randn({kNumel});
  auto message = compressor->compress(gradient, 9);
  ASSERT_TRUE(message.ok()) << message.message();
  const auto [subset, selected] = header(*message);
  EXPECT_EQ(selected, subset);
  EXPECT_EQ(static_cast<int64_t>(message->data().size()), 17 + 2 * ((subset + 127) / 128) + (subset * 2 + 7) / 8);
  EXPECT_EQ(static_cast<int64_t>(message->data().size()), cocktail_data_bytes(subset, selected, 2));
  auto dense = compressor->decompress(*message);
  ASSERT_TRUE(dense.ok()) << dense.message();
  // Only the subset's coordinates arrive; what did not arrive stays in the residual.
  EXPECT_LE(dense->ne(0).sum().item<int64_t>(), static_cast<int64_t>(subset));
  EXPECT_TRUE(torch::allclose(*dense + compressor->residual(), gradient, 1e-5, 1e-5));
  // One byte short is a clean error.
  auto truncated = *message;
  truncated.mutable_data()->pop_back();
  EXPECT_FALSE(compressor->decompress(truncated).ok());
}

TEST_F(GradientTest, SendsExactlyTheLargestMagnitudesWithTiesToTheLowerPosition) {
  // Whole vector, top 25%, 8 bits; magnitudes with many ties (integers 0..99,
  // random signs), so the cut falls inside a run of equal values.
  config_.random_fraction = 1.0;
  config_.topk_fraction = 0.25;
  config_.gradient_bits = 8;
  auto compressor = make();
  std::mt19937 rng(11);
  torch::Tensor gradient = torch::empty({kNumel});
  for (int64_t i = 0; i < kNumel; ++i)
    gradient[i] = static_cast<float>(rng() % 100) * ((rng() & 1) ? 1.0f : -1.0f);
  auto message = compressor->compress(gradient, 4);
  ASSERT_TRUE(message.ok()) << message.message();
  const auto selected = static_cast<int64_t>(header(*message).second);
  ASSERT_EQ(selected, std::llround(0.25 * kNumel));
  std::vector<int64_t> expected(kNumel);
  for (int64_t i = 0; i < kNumel; ++i) expected[static_cast<size_t>(i)] = i;
  auto magnitude = gradient.abs();
  std::stable_sort(expected.begin(), expected.end(), [&](int64_t a, int64_t b) {
    return magnitude[a].item<float>() > magnitude[b].item<float>();
  });
  expected.resize(static_cast<size_t>(selected));
  std::sort(expected.begin(), expected.end());
  // What was sent is what left the residual (the gradient minus the residual).
  auto sent = (gradient - compressor->residual()).abs();
  auto dense = compressor->decompress(*message);
  ASSERT_TRUE(dense.ok()) << dense.message();
  std::vector<int64_t> got;
  for (int64_t i = 0; i < kNumel; ++i)
    if (sent[i].item<float>() > 0 || (*dense)[i].item<float>() != 0) got.push_back(i);
  // Zero-valued picks send nothing; the expected set's nonzero members must all be there.
  std::vector<int64_t> expected_nonzero;
  for (int64_t i : expected)
    if (magnitude[i].item<float>() > 0) expected_nonzero.push_back(i);
  EXPECT_EQ(got, expected_nonzero);
}

TEST_F(GradientTest, DeterministicAndResumableFromTheResidual) {
  auto first = make(5);
  auto second = make(5);
  std::vector<torch::Tensor> gradients;
  for (int step = 0; step < 4; ++step) gradients.push_back(torch::randn({kNumel}));
  for (int step = 0; step < 3; ++step) {
    auto a = first->compress(gradients[static_cast<size_t>(step)], step);
    auto b = second->compress(gradients[static_cast<size_t>(step)], step);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->data(), b->data());
  }
  auto resumed = make(5);
  ASSERT_TRUE(resumed->set_residual(first->residual()).ok());
  auto a = first->compress(gradients[3], 3);
  auto b = resumed->compress(gradients[3], 3);
  EXPECT_EQ(a->data(), b->data());
  // Another replica's salt: the same subset, independent rounding.
  auto other_salt = make(6);
  ASSERT_TRUE(other_salt->set_residual(second->residual()).ok());
  auto c = other_salt->compress(gradients[3], 3);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(header(*c), header(*b));
  EXPECT_NE(c->data(), b->data());
  EXPECT_FALSE(resumed->set_residual(torch::zeros({kNumel + 1})).ok());
}

TEST_F(GradientTest, CorruptOrTruncatedMessagesAreRejected) {
  auto compressor = make();
  auto message = compressor->compress(torch::randn({kNumel}), 9);
  ASSERT_TRUE(message.ok());
  const std::string& data = message->data();
  for (size_t cut = 0; cut < data.size(); cut += (cut < 40 ? 1 : 17)) {
    CompressedTensor truncated = *message;
    truncated.set_data(data.substr(0, cut));
    EXPECT_FALSE(compressor->decompress(truncated).ok()) << "cut at " << cut;
  }
  CompressedTensor longer = *message;
  longer.mutable_data()->push_back('\0');
  EXPECT_FALSE(compressor->decompress(longer).ok());

  // Header fields: seed (its subset has another size), counts, bits.
  for (size_t position : {0, 8, 12, 16}) {
    CompressedTensor corrupt = *message;
    corrupt.mutable_data()->at(position) ^= 0x01;
    EXPECT_FALSE(compressor->decompress(corrupt).ok()) << "header byte " << position;
  }
  // A bitmap that marks one coordinate too many or too few.
  const auto [subset, selected] = header(*message);
  for (size_t position = 17; position < 17 + (subset + 7) / 8; position += 7) {
    CompressedTensor corrupt = *message;
    corrupt.mutable_data()->at(position) ^= 0x01;
    EXPECT_FALSE(compressor->decompress(corrupt).ok()) << "bitmap byte " << position;
  }
  // Any other flip may only change values, never crash or escape the tensor.
  for (size_t position = 0; position < data.size(); ++position) {
    CompressedTensor corrupt = *message;
    corrupt.mutable_data()->at(position) ^= static_cast<char>(0xA5);
    auto out = compressor->decompress(corrupt);
    if (out.ok()) {
      EXPECT_EQ(out->numel(), kNumel);
      EXPECT_TRUE(torch::isfinite(*out).all().item<bool>());
    }
  }
  CompressedTensor renamed = *message;
  renamed.set_codec("fp16");
  EXPECT_FALSE(compressor->decompress(renamed).ok());
  CompressedTensor reshaped = *message;
  reshaped.set_shape(0, kNumel - 1);
  EXPECT_FALSE(compressor->decompress(reshaped).ok());

  config_.gradients = "fp16";
  auto half = make();
  auto half_message = half->compress(torch::randn({kNumel}), 0);
  ASSERT_TRUE(half_message.ok());
  CompressedTensor short_half = *half_message;
  short_half.mutable_data()->pop_back();
  EXPECT_FALSE(half->decompress(short_half).ok());
  CompressedTensor infinite = *half_message;
  infinite.mutable_data()->at(0) = 0x00;
  infinite.mutable_data()->at(1) = 0x7C;  // +inf in binary16
  EXPECT_FALSE(half->decompress(infinite).ok());
}

TEST_F(GradientTest, RejectsBadConfigsAndInputs) {
  CompressionConfig bad = config_;
  bad.gradients = "zip";
  EXPECT_FALSE(make_gradient_compressor(bad, kNumel, 0).ok());
  bad = config_;
  bad.random_fraction = 0;
  EXPECT_FALSE(make_gradient_compressor(bad, kNumel, 0).ok());
  bad = config_;
  bad.topk_fraction = 1.5;
  EXPECT_FALSE(make_gradient_compressor(bad, kNumel, 0).ok());
  bad = config_;
  bad.gradient_bits = 9;
  EXPECT_FALSE(make_gradient_compressor(bad, kNumel, 0).ok());

  auto compressor = make();
  EXPECT_FALSE(compressor->compress(torch::randn({kNumel - 1}), 0).ok());
  torch::Tensor nan = torch::randn({kNumel});
  nan[17] = NAN;
  EXPECT_FALSE(compressor->compress(nan, 0).ok());
  EXPECT_EQ(compressor->residual().abs().max().item<float>(), 0.0f) << "a rejected step keeps nothing";
}

}  // namespace
}  // namespace sn::compress
