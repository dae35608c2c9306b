// Data-parallel gradient compressors with error feedback (compress.h).
#include <torch/types.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <optional>

#include "compress/compress.h"
#include "compress/internal.h"

namespace sn::compress {

using namespace detail;

GradientCompressor::GradientCompressor(int64_t numel, uint64_t replica_salt)
    : numel_(numel), replica_salt_(replica_salt), residual_(static_cast<size_t>(numel), 0.0f) {}

GradientCompressor::~GradientCompressor() = default;

torch::Tensor GradientCompressor::residual() const {
  torch::Tensor out = torch::empty({numel_}, torch::kFloat32);
  std::copy(residual_.begin(), residual_.end(), out.data_ptr<float>());
  return out;
}

Status GradientCompressor::set_residual(const torch::Tensor& residual) {
  if (residual.numel() != numel_)
    return make_error("{}: residual has {} values, expected {}", name(), residual.numel(), numel_);
  const torch::Tensor values = residual.to(torch::kCPU, torch::kFloat32).contiguous();
  const float* data = values.data_ptr<float>();
  for (int64_t i = 0; i < numel_; ++i)
    if (!std::isfinite(data[i])) return make_error("{}: residual value {} is not finite", name(), i);
  std::copy(data, data + numel_, residual_.begin());
  return ok_status();
}

namespace {

constexpr float kHalfMax = 65504.0f;
constexpr uint64_t kSubsetTag = 0xC0C7A11;
constexpr uint64_t kRoundingTag = 0x0D0D;
constexpr size_t kCocktailHeaderBytes = 8 + 4 + 4 + 1;

// Common checks on a gradient handed to compress: its size and finiteness.
// Returns g + residual (the corrected gradient) as fp32.
Result<std::vector<float>> corrected_gradient(std::string_view codec, const torch::Tensor& gradient,
                                              const std::vector<float>& residual) {
  if (gradient.numel() != static_cast<int64_t>(residual.size()))
    return make_error("{}: gradient has {} values, expected {}", codec, gradient.numel(),
                      residual.size());
  const torch::Tensor values = gradient.to(torch::kCPU, torch::kFloat32).contiguous();
  const float* data = values.data_ptr<float>();
  std::vector<float> corrected(residual.size());
  for (size_t i = 0; i < corrected.size(); ++i) {
    if (!std::isfinite(data[i]))
      return kind_error(ErrorKind::diverged, "{}: gradient value {} at index {} is not finite", codec, data[i], i);
    corrected[i] = data[i] + residual[i];
  }
  return corrected;
}

Status check_message(std::string_view codec, const CompressedTensor& message, int64_t numel) {
  if (message.codec() != codec)
    return make_error("{}: got a message encoded with codec '{}'", codec, message.codec());
  if (message.shape_size() != 1 || message.shape(0) != numel)
    return make_error("{}: message is not a flat gradient of {} values", codec, numel);
  return ok_status();
}

CompressedTensor flat_message(std::string_view codec, int64_t numel, std::string data) {
  CompressedTensor message;
  message.set_codec(std::string(codec));
  message.add_shape(numel);
  message.set_data(std::move(data));
  return message;
}

class Fp32Gradient final : public GradientCompressor {
 public:
  explicit Fp32Gradient(int64_t numel) : GradientCompressor(numel, 0) {}
  std::string_view name() const override { return "fp32"; }

  Result<CompressedTensor> compress(const torch::Tensor& flat_gradient, uint64_t) override {
    SN_ASSIGN(auto corrected, corrected_gradient(name(), flat_gradient, residual_));
    std::fill(residual_.begin(), residual_.end(), 0.0f);  // everything is sent
    return flat_message(name(), numel_,
                        std::string(reinterpret_cast<const char*>(corrected.data()),
                                    corrected.size() * sizeof(float)));
  }

  Result<torch::Tensor> decompress(const CompressedTensor& message) const override {
    SN_TRY(check_message(name(), message, numel_));
    if (static_cast<int64_t>(message.data().size()) != fp32_data_bytes(numel_))
      return make_error("fp32: {} values take {} bytes, got {}", numel_, fp32_data_bytes(numel_),
                        message.data().size());
    torch::Tensor out = torch::empty({numel_}, torch::kFloat32);
    std::memcpy(out.data_ptr(), message.data().data(), message.data().size());
    return out;
  }
};

class Fp16Gradient final : public GradientCompressor {
 public:
  explicit Fp16Gradient(int64_t numel) : GradientCompressor(numel, 0) {}
  std::string_view name() const override { return "fp16"; }

  Result<CompressedTensor> compress(const torch::Tensor& flat_gradient, uint64_t) override {
    SN_ASSIGN(auto corrected, corrected_gradient(name(), flat_gradient, residual_));
    std::string data;
    data.reserve(static_cast<size_t>(fp16_data_bytes(numel_)));
    std::vector<float> new_residual(corrected.size());
    for (size_t i = 0; i < corrected.size(); ++i) {
      if (!(std::fabs(corrected[i]) <= kHalfMax))
        return kind_error(ErrorKind::diverged, "fp16: gradient value {} at index {} overflows half precision",
                          corrected[i], i);
      const uint16_t half = float_to_half(corrected[i]);
      append_le(data, half);
      new_residual[i] = corrected[i] - half_to_float(half);
    }
    residual_ = std::move(new_residual);
    return flat_message(name(), numel_, std::move(data));
  }

  Result<torch::Tensor> decompress(const CompressedTensor& message) const override {
    SN_TRY(check_message(name(), message, numel_));
    if (static_cast<int64_t>(message.data().size()) != fp16_data_bytes(numel_))
      return make_error("fp16: {} values take {} bytes, got {}", numel_, fp16_data_bytes(numel_),
                        message.data().size());
    torch::Tensor out = torch::empty({numel_}, torch::kFloat32);
    float* values = out.data_ptr<float>();
    ByteReader reader(as_span(message.data()));
    for (int64_t i = 0; i < numel_; ++i) {
      uint16_t bits = 0;
      reader.read(bits);
      values[i] = half_to_float(bits);
      if (!std::isfinite(values[i])) return make_error("fp16: non-finite value at index {}", i);
    }
    return out;
  }
};

// CocktailSGD (Wang et al. 2023): random subset → top-k → quantization.
// Layout: docs/compression.md, "cocktail".
class CocktailGradient final : public GradientCompressor {
 public:
  CocktailGradient(int64_t numel, uint64_t replica_salt, double random_fraction,
                   double topk_fraction, int bits)
      : GradientCompressor(numel, replica_salt),
        random_fraction_(random_fraction),
        topk_fraction_(topk_fraction),
        bits_(bits) {}
  std::string_view name() const override { return "cocktail"; }

  Result<CompressedTensor> compress(const torch::Tensor& flat_gradient,
                                    uint64_t shared_seed) override {
    SN_ASSIGN(auto corrected, corrected_gradient(name(), flat_gradient, residual_));
    const std::vector<int64_t>& subset = random_subset(shared_seed);
    const auto subset_size = static_cast<int64_t>(subset.size());
    const int64_t selected = selected_count(subset_size, topk_fraction_);

    // The SELECTED largest magnitudes; ties go to the lower position so every
    // run picks the same ones. The threshold comes from a selection over the
    // plain magnitudes (an index comparator made this most of a step's cost),
    // then one pass in position order takes what is above it and the first ties.
    std::vector<float> magnitude(subset.size());
    for (size_t p = 0; p < subset.size(); ++p)
      magnitude[p] = std::fabs(corrected[static_cast<size_t>(subset[p])]);
    std::vector<float> order = magnitude;
    std::nth_element(order.begin(), order.begin() + (selected - 1), order.end(), std::greater<float>());
    const float threshold = order[static_cast<size_t>(selected - 1)];
    int64_t above = 0;
    for (float m : magnitude) above += m > threshold ? 1 : 0;
    int64_t ties_left = selected - above;
    std::vector<int64_t> positions;
    positions.reserve(static_cast<size_t>(selected));
    for (size_t p = 0; p < magnitude.size(); ++p)
      if (magnitude[p] > threshold || (magnitude[p] == threshold && ties_left-- > 0))
        positions.push_back(static_cast<int64_t>(p));

    // Everything selected: the bitmap would be all ones, so it is left out.
    const bool with_bitmap = selected < subset_size;
    std::string bitmap(with_bitmap ? static_cast<size_t>((subset_size + 7) / 8) : 0, '\0');
    std::vector<float> values(positions.size());
    for (size_t j = 0; j < positions.size(); ++j) {
      const int64_t p = positions[j];
      if (with_bitmap) bitmap[static_cast<size_t>(p / 8)] |= static_cast<char>(1u << (p % 8));
      values[j] = corrected[static_cast<size_t>(subset[static_cast<size_t>(p)])];
    }

    std::string data;
    append_le(data, shared_seed);
    append_le(data, static_cast<uint32_t>(subset_size));
    append_le(data, static_cast<uint32_t>(selected));
    append_le(data, static_cast<uint8_t>(bits_));
    data += bitmap;
    const size_t block_start = data.size();
    const uint64_t rounding_seed = derive_seed(derive_seed(shared_seed, kRoundingTag), replica_salt_);
    SN_TRY(quantize_rows(values, kGradientBucket, bits_, rounding_seed, data));

    // Error feedback: keep exactly what the receivers will not see.
    std::vector<float> sent(values.size());
    SN_TRY(dequantize_rows(as_span(data).subspan(block_start), kGradientBucket, bits_, sent));
    for (size_t j = 0; j < positions.size(); ++j) {
      const auto i = static_cast<size_t>(subset[static_cast<size_t>(positions[j])]);
      corrected[i] -= sent[j];
    }
    residual_ = std::move(corrected);
    return flat_message(name(), numel_, std::move(data));
  }

  Result<torch::Tensor> decompress(const CompressedTensor& message) const override {
    SN_TRY(check_message(name(), message, numel_));
    ByteReader reader(as_span(message.data()));
    uint64_t shared_seed = 0;
    uint32_t subset_size = 0, selected = 0;
    uint8_t bits = 0;
    if (!reader.read(shared_seed) || !reader.read(subset_size) || !reader.read(selected) ||
        !reader.read(bits))
      return make_error("cocktail: message truncated in its header");
    if (bits != bits_)
      return make_error("cocktail: message quantized at {} bits, this job uses {}", bits, bits_);
    const std::vector<int64_t>& subset = random_subset(shared_seed);
    if (subset_size != subset.size())
      return make_error("cocktail: message claims a random subset of {}, seed {} gives {}",
                        subset_size, shared_seed, subset.size());
    if (selected != selected_count(subset_size, topk_fraction_))
      return make_error("cocktail: message sends {} of {} values, this job sends {}", selected,
                        subset_size, selected_count(subset_size, topk_fraction_));
    const int64_t expected = cocktail_data_bytes(subset_size, selected, bits_);
    if (static_cast<int64_t>(message.data().size()) != expected)
      return make_error("cocktail: {} of {} values take {} bytes, got {}", selected, subset_size,
                        expected, message.data().size());
    const bool with_bitmap = selected < subset_size;
    const auto bitmap = *reader.take(with_bitmap ? (subset_size + 7) / 8 : 0);
    std::vector<float> values(selected);
    SN_TRY(dequantize_rows(reader.rest(), kGradientBucket, bits_, values));

    torch::Tensor out = torch::zeros({numel_}, torch::kFloat32);
    float* dense = out.data_ptr<float>();
    if (!with_bitmap) {
      for (uint32_t p = 0; p < subset_size; ++p) dense[subset[p]] = values[p];
      return out;
    }
    int64_t marked = 0;
    for (uint8_t byte : bitmap) marked += std::popcount(byte);
    if (marked != selected)
      return make_error("cocktail: bitmap marks {} values, header says {}", marked, selected);
    if (subset_size % 8 != 0 && (bitmap.back() >> (subset_size % 8)) != 0)
      return make_error("cocktail: nonzero padding bits in the bitmap");
    size_t j = 0;
    for (uint32_t p = 0; p < subset_size; ++p)
      if ((bitmap[p / 8] >> (p % 8)) & 1u) dense[subset[p]] = values[j++];
    return out;
  }

 private:
  static int64_t selected_count(int64_t subset_size, double topk_fraction) {
    if (subset_size == 0) return 0;
    const auto k = static_cast<int64_t>(std::llround(topk_fraction * static_cast<double>(subset_size)));
    return std::clamp<int64_t>(k, 1, subset_size);
  }

  // Coordinate i is in the subset iff its draw from the seed's stream is below
  // random_fraction·2^64: integers only, so every replica agrees exactly.
  const std::vector<int64_t>& random_subset(uint64_t shared_seed) const {
    const bool everything = random_fraction_ >= 1.0;
    if (cached_seed_ && (everything || *cached_seed_ == shared_seed)) return cached_subset_;
    cached_subset_.clear();
    const uint64_t key = stream_key(derive_seed(shared_seed, kSubsetTag));
    const auto threshold = everything ? 0 : static_cast<uint64_t>(std::ldexp(random_fraction_, 64));
    for (int64_t i = 0; i < numel_; ++i)
      if (everything || stream_bits(key, static_cast<uint64_t>(i)) < threshold)
        cached_subset_.push_back(i);
    cached_seed_ = shared_seed;
    return cached_subset_;
  }

  double random_fraction_;
  double topk_fraction_;
  int bits_;
  mutable std::optional<uint64_t> cached_seed_;
  mutable std::vector<int64_t> cached_subset_;
};

}  // namespace

Result<std::unique_ptr<GradientCompressor>> make_gradient_compressor(
    const CompressionConfig& config, int64_t numel, uint64_t replica_salt) {
  if (numel < 0 || numel > (int64_t{1} << 32) - 1)
    return make_error("gradient compression: {} values is outside [0, 2^32)", numel);
  if (config.gradients == "none") return std::unique_ptr<GradientCompressor>(new Fp32Gradient(numel));
  if (config.gradients == "fp16") return std::unique_ptr<GradientCompressor>(new Fp16Gradient(numel));
  if (config.gradients == "cocktail") {
    if (config.gradient_bits < kMinBits || config.gradient_bits > kMaxBits)
      return input_error("compression.gradient_bits must be in [{}, {}], got {}", kMinBits,
                         kMaxBits, config.gradient_bits);
    if (!(config.random_fraction > 0.0 && config.random_fraction <= 1.0))
      return input_error("compression.random_fraction must be in (0, 1], got {}",
                         config.random_fraction);
    if (!(config.topk_fraction > 0.0 && config.topk_fraction <= 1.0))
      return input_error("compression.topk_fraction must be in (0, 1], got {}",
                         config.topk_fraction);
    return std::unique_ptr<GradientCompressor>(
        new CocktailGradient(numel, replica_salt, config.random_fraction, config.topk_fraction,
                             static_cast<int>(config.gradient_bits)));
  }
  return input_error("compression.gradients must be none, fp16 or cocktail, got '{}'",
                     config.gradients);
}

int64_t cocktail_data_bytes(int64_t subset_size, int64_t selected, int bits) {
  const int64_t bitmap_bytes = selected < subset_size ? (subset_size + 7) / 8 : 0;
  return static_cast<int64_t>(kCocktailHeaderBytes) + bitmap_bytes +
         quantized_size_bytes(selected, kGradientBucket, bits);
}

int64_t expected_gradient_bytes(const CompressionConfig& config, int64_t numel) {
  if (config.gradients == "fp16") return fp16_data_bytes(numel);
  if (config.gradients == "cocktail") {
    const auto subset = std::min<int64_t>(
        numel, std::llround(std::min(config.random_fraction, 1.0) * static_cast<double>(numel)));
    const int64_t selected =
        subset == 0 ? 0
                    : std::clamp<int64_t>(std::llround(config.topk_fraction * static_cast<double>(subset)),
                                          1, subset);
    return cocktail_data_bytes(subset, selected, static_cast<int>(config.gradient_bits));
  }
  return fp32_data_bytes(numel);
}

}  // namespace sn::compress
