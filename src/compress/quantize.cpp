// Bit packing and stochastic uniform quantization (compress.h). Plain loops,
// not torch kernels: the results must be bitwise identical on sender and
// receiver whatever their thread counts and vector units.
#include <c10/util/Half.h>
#include <torch/types.h>

#include <cmath>

#include "compress/compress.h"
#include "compress/internal.h"

namespace sn::compress {
namespace detail {

uint16_t float_to_half(float value) { return c10::detail::fp16_ieee_from_fp32_value(value); }
float half_to_float(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }

uint16_t bfloat16_round_up(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  // Positive finite floats order like their bit patterns, so adding one unit of
  // the kept part (after dropping a nonzero tail) is rounding toward +inf.
  if ((bits & 0xFFFFu) != 0) bits += 0x10000u;
  return static_cast<uint16_t>(bits >> 16);
}

std::optional<int64_t> checked_numel(std::span<const int64_t> dims, int64_t limit) {
  int64_t numel = 1;
  for (int64_t d : dims) {
    if (d < 0) return {};
    if (d == 0) numel = 0;
  }
  if (numel == 0) return 0;
  for (int64_t d : dims) {
    if (numel > limit / d) return {};
    numel *= d;
  }
  return numel;
}

}  // namespace detail

using namespace detail;

namespace {

bool valid_bits(int bits) { return bits >= kMinBits && bits <= kMaxBits; }

// The last row may be shorter than the others.
int64_t row_count(int64_t numel, int64_t row_length) {
  return row_length > 0 ? (numel + row_length - 1) / row_length : 0;
}

}  // namespace

float uniform_draw(uint64_t seed, uint64_t index) {
  return unit_float(stream_bits(stream_key(seed), index));
}

uint64_t derive_seed(uint64_t seed, uint64_t tag) {
  return mix64(mix64(seed ^ 0x243F6A8885A308D3ull) + (tag + 1) * kGolden);
}

int64_t packed_size_bytes(int64_t count, int bits) { return (count * bits + 7) / 8; }

std::vector<uint8_t> pack_bits(std::span<const uint8_t> values, int bits) {
  std::vector<uint8_t> out(static_cast<size_t>(packed_size_bytes(static_cast<int64_t>(values.size()), bits)));
  if (bits == 8) {
    std::copy(values.begin(), values.end(), out.begin());
    return out;
  }
  const uint32_t mask = (1u << bits) - 1u;
  uint32_t accumulator = 0;
  int pending = 0;
  size_t position = 0;
  for (uint8_t v : values) {
    accumulator |= (v & mask) << pending;
    pending += bits;
    while (pending >= 8) {
      out[position++] = static_cast<uint8_t>(accumulator & 0xFFu);
      accumulator >>= 8;
      pending -= 8;
    }
  }
  if (pending > 0) out[position++] = static_cast<uint8_t>(accumulator & 0xFFu);
  return out;
}

Result<std::vector<uint8_t>> unpack_bits(std::span<const uint8_t> packed, int bits, int64_t count) {
  if (!valid_bits(bits)) return make_error("unpack_bits: bit width {} is outside [1, 8]", bits);
  if (count < 0) return make_error("unpack_bits: negative count {}", count);
  const int64_t expected = packed_size_bytes(count, bits);
  if (static_cast<int64_t>(packed.size()) != expected)
    return make_error("unpack_bits: {} values at {} bits take {} bytes, got {}", count, bits,
                      expected, packed.size());
  std::vector<uint8_t> values(static_cast<size_t>(count));
  if (bits == 8) {
    std::copy(packed.begin(), packed.end(), values.begin());
    return values;
  }
  const uint32_t mask = (1u << bits) - 1u;
  uint32_t accumulator = 0;
  int available = 0;
  size_t position = 0;
  for (auto& v : values) {
    if (available < bits) {
      accumulator |= static_cast<uint32_t>(packed[position++]) << available;
      available += 8;
    }
    v = static_cast<uint8_t>(accumulator & mask);
    accumulator >>= bits;
    available -= bits;
  }
  if (accumulator != 0) return make_error("unpack_bits: nonzero padding bits in the last byte");
  return values;
}

int64_t quantized_size_bytes(int64_t numel, int64_t row_length, int bits) {
  return 2 * row_count(numel, row_length) + packed_size_bytes(numel, bits);
}

Status quantize_rows(std::span<const float> values, int64_t row_length, int bits, uint64_t seed,
                     std::string& out) {
  if (!valid_bits(bits)) return make_error("quantize: bit width {} is outside [1, 8]", bits);
  const auto numel = static_cast<int64_t>(values.size());
  if (numel > 0 && row_length <= 0)
    return make_error("quantize: row length must be > 0, got {}", row_length);
  const int64_t rows = row_count(numel, row_length);
  const uint32_t max_code = (1u << bits) - 1u;
  const float half_levels = static_cast<float>(max_code) * 0.5f;
  const uint64_t key = stream_key(seed);

  std::vector<uint8_t> codes(static_cast<size_t>(numel));
  out.reserve(out.size() + static_cast<size_t>(quantized_size_bytes(numel, row_length, bits)));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = values.data() + r * row_length;
    const int64_t length = std::min(row_length, numel - r * row_length);
    float max_abs = 0.0f;
    for (int64_t i = 0; i < length; ++i) {
      if (!std::isfinite(row[i]))
        return kind_error(ErrorKind::diverged, "quantize: non-finite value {} at row {}, column {}", row[i], r, i);
      max_abs = std::max(max_abs, std::fabs(row[i]));
    }
    const uint16_t scale_bits = bfloat16_round_up(max_abs);
    const float scale = bfloat16_to_float(scale_bits);
    if (!std::isfinite(scale))
      return kind_error(ErrorKind::diverged, "quantize: row {} has magnitude {} beyond the bfloat16 range", r, max_abs);
    append_le(out, scale_bits);
    uint8_t* row_codes = codes.data() + r * row_length;
    if (scale == 0.0f) continue;  // an all-zero row decodes to zeros whatever the codes
    for (int64_t i = 0; i < length; ++i) {
      // y in [0, max_code]: the value's position on the grid of levels.
      float y = (row[i] / scale + 1.0f) * half_levels;
      y = std::min(std::max(y, 0.0f), static_cast<float>(max_code));
      const float low = std::floor(y);
      const float up_probability = y - low;
      const auto index = static_cast<uint64_t>(r * row_length + i);
      uint32_t code = static_cast<uint32_t>(low);
      if (unit_float(stream_bits(key, index)) < up_probability) ++code;
      row_codes[i] = static_cast<uint8_t>(std::min(code, max_code));
    }
  }
  const auto packed = pack_bits(codes, bits);
  out.append(reinterpret_cast<const char*>(packed.data()), packed.size());
  return ok_status();
}

Result<int64_t> dequantize_rows(std::span<const uint8_t> in, int64_t row_length, int bits,
                                std::span<float> out) {
  if (!valid_bits(bits)) return make_error("dequantize: bit width {} is outside [1, 8]", bits);
  const auto numel = static_cast<int64_t>(out.size());
  if (numel > 0 && row_length <= 0)
    return make_error("dequantize: row length must be > 0, got {}", row_length);
  const int64_t rows = row_count(numel, row_length);
  const int64_t needed = quantized_size_bytes(numel, row_length, bits);
  if (static_cast<int64_t>(in.size()) < needed)
    return make_error("dequantize: block of {} values at {} bits needs {} bytes, only {} left",
                      numel, bits, needed, in.size());
  ByteReader reader(in);
  std::vector<float> scales(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t scale_bits = 0;
    reader.read(scale_bits);
    const float scale = bfloat16_to_float(scale_bits);
    if (!std::isfinite(scale) || std::signbit(scale))
      return make_error("dequantize: row {} has an invalid scale {}", r, scale);
    scales[static_cast<size_t>(r)] = scale;
  }
  SN_ASSIGN(auto codes, unpack_bits(*reader.take(packed_size_bytes(numel, bits)), bits, numel));
  const uint32_t max_code = (1u << bits) - 1u;
  const float step = 2.0f / static_cast<float>(max_code);
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = scales[static_cast<size_t>(r)];
    const int64_t length = std::min(row_length, numel - r * row_length);
    for (int64_t i = 0; i < length; ++i) {
      const int64_t k = r * row_length + i;
      out[static_cast<size_t>(k)] =
          scale * (static_cast<float>(codes[static_cast<size_t>(k)]) * step - 1.0f);
    }
  }
  return needed;
}

Result<std::string> quantize(const torch::Tensor& x, int bits, uint64_t seed) {
  const torch::Tensor values = x.to(torch::kCPU, torch::kFloat32).contiguous();
  const int64_t row_length = values.dim() == 0 ? 1 : values.size(-1);
  std::string out;
  SN_TRY(quantize_rows({values.data_ptr<float>(), static_cast<size_t>(values.numel())}, row_length,
                       bits, seed, out));
  return out;
}

Result<torch::Tensor> dequantize(std::string_view block, const std::vector<int64_t>& shape,
                                 int bits) {
  const auto numel = checked_numel(shape);
  if (!numel) return make_error("dequantize: invalid shape");
  const int64_t row_length = shape.empty() ? 1 : shape.back();
  const int64_t expected = quantized_size_bytes(*numel, row_length, bits);
  if (static_cast<int64_t>(block.size()) != expected)
    return make_error("dequantize: expected {} bytes for {} values at {} bits, got {}", expected,
                      *numel, bits, block.size());
  torch::Tensor out = torch::empty(shape, torch::kFloat32);
  SN_TRY(dequantize_rows({reinterpret_cast<const uint8_t*>(block.data()), block.size()}, row_length,
                         bits, {out.data_ptr<float>(), static_cast<size_t>(*numel)}));
  return out;
}

}  // namespace sn::compress
