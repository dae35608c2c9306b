// Bit packing and stochastic quantization: exact round trips, unbiasedness,
// the error bound, determinism and the sizes on the wire.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <random>

#include "compress/compress.h"

namespace sn::compress {
namespace {

class QuantizeTest : public ::testing::Test {
 protected:
  void SetUp() override { at::set_num_threads(1); }
};

// One quantization step of a row whose max-abs is MAX_ABS, with the scale
// rounded up to bfloat16 exactly as the quantizer does.
float step_for(float max_abs, int bits) {
  uint32_t raw = 0;
  std::memcpy(&raw, &max_abs, 4);
  if (raw & 0xFFFFu) raw += 0x10000u;
  raw &= 0xFFFF0000u;
  float scale = 0;
  std::memcpy(&scale, &raw, 4);
  return 2.0f * scale / static_cast<float>((1 << bits) - 1);
}

TEST_F(QuantizeTest, PackUnpackRoundTripsEveryWidthAndOddSizes) {
  std::mt19937 rng(7);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int64_t count : {0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 33, 63, 100, 1001}) {
      std::vector<uint8_t> values(static_cast<size_t>(count));
      for (auto& v : values) v = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
      const auto packed = pack_bits(values, bits);
      ASSERT_EQ(static_cast<int64_t>(packed.size()), (count * bits + 7) / 8)
          << bits << " bits, " << count << " values";
      auto unpacked = unpack_bits(packed, bits, count);
      ASSERT_TRUE(unpacked.ok()) << unpacked.message();
      EXPECT_EQ(*unpacked, values) << bits << " bits, " << count << " values";
    }
  }
}

TEST_F(QuantizeTest, PackedBitsAreLeastSignificantFirst) {
  const std::vector<uint8_t> values{1, 2, 3, 0, 3};
  const auto packed = pack_bits(values, 2);
  ASSERT_EQ(packed.size(), 2u);
  EXPECT_EQ(packed[0], 0b00111001);  // 1 | 2<<2 | 3<<4 | 0<<6
  EXPECT_EQ(packed[1], 0b00000011);
  EXPECT_EQ(pack_bits(std::vector<uint8_t>{5, 1}, 3)[0], 0b00001101);
}

TEST_F(QuantizeTest, UnpackRejectsWrongLengthsPaddingAndWidths) {
  const std::vector<uint8_t> values{1, 2, 3};
  auto packed = pack_bits(values, 3);  // 9 bits → 2 bytes, 7 padding bits
  EXPECT_FALSE(unpack_bits(std::span(packed).first(1), 3, 3).ok());
  auto longer = packed;
  longer.push_back(0);
  EXPECT_FALSE(unpack_bits(longer, 3, 3).ok());
  auto dirty = packed;
  dirty[1] |= 0x80;
  EXPECT_FALSE(unpack_bits(dirty, 3, 3).ok());
  EXPECT_FALSE(unpack_bits(packed, 0, 3).ok());
  EXPECT_FALSE(unpack_bits(packed, 9, 3).ok());
  EXPECT_FALSE(unpack_bits(packed, 3, -1).ok());
}

TEST_F(QuantizeTest, MeanOfManySeededQuantizationsIsTheInput) {
  torch::manual_seed(1);
  // Three rows with very different magnitudes: scales are per row.
  torch::Tensor x = torch::randn({3, 64});
  x[1] *= 100.0;
  x[2] *= 0.001;
  const int trials = 2000;
  for (int bits : {1, 2, 4, 8}) {
    torch::Tensor sum = torch::zeros_like(x, torch::kFloat64);
    for (int t = 0; t < trials; ++t) {
      auto block = quantize(x, bits, static_cast<uint64_t>(t) + 1000 * bits);
      ASSERT_TRUE(block.ok()) << block.message();
      auto decoded = dequantize(*block, {3, 64}, bits);
      ASSERT_TRUE(decoded.ok()) << decoded.message();
      sum += decoded->to(torch::kFloat64);
    }
    const torch::Tensor mean = sum / trials;
    for (int64_t r = 0; r < 3; ++r) {
      // Each draw lies within one step of x, so by Hoeffding the mean of N
      // draws strays more than 6·step/(2√N) with probability < 2e-15.
      const float step = step_for(x[r].abs().max().item<float>(), bits);
      const double bound = 6.0 * step / (2.0 * std::sqrt(trials)) + 1e-6 * step;
      const double worst = (mean[r] - x[r].to(torch::kFloat64)).abs().max().item<double>();
      EXPECT_LE(worst, bound) << bits << " bits, row " << r;
    }
  }
}

TEST_F(QuantizeTest, EveryValueLandsWithinOneStep) {
  torch::manual_seed(2);
  torch::Tensor x = torch::randn({16, 37}) * torch::logspace(-3, 3, 16).unsqueeze(1);
  for (int bits = 1; bits <= 8; ++bits) {
    auto block = quantize(x, bits, 99);
    ASSERT_TRUE(block.ok());
    auto decoded = dequantize(*block, {16, 37}, bits);
    ASSERT_TRUE(decoded.ok());
    for (int64_t r = 0; r < 16; ++r) {
      const float step = step_for(x[r].abs().max().item<float>(), bits);
      const float worst = (*decoded - x)[r].abs().max().item<float>();
      EXPECT_LE(worst, step * (1.0f + 1e-5f)) << bits << " bits, row " << r;
    }
  }
}

TEST_F(QuantizeTest, SameSeedSameBytesWhateverTheThreadCount) {
  torch::manual_seed(3);
  torch::Tensor x = torch::randn({32, 64});
  auto first = quantize(x, 3, 42);
  at::set_num_threads(2);
  auto second = quantize(x, 3, 42);
  at::set_num_threads(1);
  auto other_seed = quantize(x, 3, 43);
  ASSERT_TRUE(first.ok() && second.ok() && other_seed.ok());
  EXPECT_EQ(*first, *second);
  EXPECT_NE(*first, *other_seed);
  // The draws themselves are a fixed function of (seed, index).
  EXPECT_EQ(uniform_draw(42, 7), uniform_draw(42, 7));
  EXPECT_NE(uniform_draw(42, 7), uniform_draw(43, 7));
}

TEST_F(QuantizeTest, SizeMatchesTheFormula) {
  for (int bits = 1; bits <= 8; ++bits) {
    for (auto shape : std::vector<std::vector<int64_t>>{{5, 7}, {2, 3, 64}, {1}, {0, 4}, {3, 1}}) {
      torch::Tensor x = torch::randn(shape);
      auto block = quantize(x, bits, 1);
      ASSERT_TRUE(block.ok());
      const int64_t rows = shape.back() == 0 ? 0 : x.numel() / shape.back();
      EXPECT_EQ(static_cast<int64_t>(block->size()), 2 * rows + (x.numel() * bits + 7) / 8);
      EXPECT_EQ(static_cast<int64_t>(block->size()),
                quantized_size_bytes(x.numel(), shape.back(), bits));
    }
  }
}

TEST_F(QuantizeTest, RaggedLastRowRoundTrips) {
  std::vector<float> values(300);
  for (size_t i = 0; i < values.size(); ++i) values[i] = std::sin(static_cast<float>(i)) * (i < 256 ? 1.0f : 50.0f);
  std::string block;
  ASSERT_TRUE(quantize_rows(values, 128, 8, 5, block).ok());
  EXPECT_EQ(static_cast<int64_t>(block.size()), quantized_size_bytes(300, 128, 8));
  EXPECT_EQ(block.size(), 3u * 2 + 300);
  std::vector<float> decoded(300);
  auto used = dequantize_rows({reinterpret_cast<const uint8_t*>(block.data()), block.size()}, 128,
                              8, decoded);
  ASSERT_TRUE(used.ok()) << used.message();
  EXPECT_EQ(*used, static_cast<int64_t>(block.size()));
  for (size_t i = 0; i < values.size(); ++i)
    EXPECT_NEAR(decoded[i], values[i], step_for(i < 256 ? 1.0f : 50.0f, 8)) << i;
}

TEST_F(QuantizeTest, ZeroRowsDecodeToExactZerosAndHugeValuesKeepTheirScale) {
  torch::Tensor x = torch::zeros({2, 9});
  x[1] = 1e30;
  auto block = quantize(x, 2, 1);
  ASSERT_TRUE(block.ok()) << block.message();
  auto decoded = dequantize(*block, {2, 9}, 2);
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(torch::equal((*decoded)[0], torch::zeros({9})));
  EXPECT_TRUE(torch::allclose((*decoded)[1], x[1], 1e-2));  // 1e30 is the max: always the top level
}

TEST_F(QuantizeTest, RejectsNonFiniteInputsBadWidthsAndBadBlocks) {
  torch::Tensor x = torch::randn({2, 4});
  x[1][2] = std::nanf("");
  EXPECT_FALSE(quantize(x, 4, 1).ok());
  x[1][2] = INFINITY;
  EXPECT_FALSE(quantize(x, 4, 1).ok());
  torch::Tensor y = torch::randn({2, 4});
  EXPECT_FALSE(quantize(y, 0, 1).ok());
  EXPECT_FALSE(quantize(y, 9, 1).ok());

  auto block = quantize(y, 4, 1);
  ASSERT_TRUE(block.ok());
  EXPECT_FALSE(dequantize(block->substr(0, block->size() - 1), {2, 4}, 4).ok());
  EXPECT_FALSE(dequantize(*block + "x", {2, 4}, 4).ok());
  EXPECT_FALSE(dequantize(*block, {2, 5}, 4).ok());
  EXPECT_FALSE(dequantize(*block, {-2, 4}, 4).ok());
  std::string bad_scale = *block;
  bad_scale[1] = static_cast<char>(0xFF);  // row 0's bf16 scale: negative NaN
  bad_scale[0] = static_cast<char>(0xC0);
  EXPECT_FALSE(dequantize(bad_scale, {2, 4}, 4).ok());
}

}  // namespace
}  // namespace sn::compress
