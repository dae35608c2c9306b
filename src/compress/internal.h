// Private helpers shared by the codecs: little-endian byte I/O, half and
// bfloat16 conversions done in software (bitwise the same everywhere), and
// checked size arithmetic for validating what a peer sent.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/result.h"

namespace sn::compress::detail {

static_assert(std::endian::native == std::endian::little,
              "the codecs' byte formats are little-endian and written with memcpy");

template <class T>
void append_le(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

// Reads values from the front of a byte span; every read is bounds-checked.
class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  template <class T>
  bool read(T& value) {
    if (bytes_.size() - position_ < sizeof(T)) return false;
    std::memcpy(&value, bytes_.data() + position_, sizeof(T));
    position_ += sizeof(T);
    return true;
  }
  // The next COUNT bytes, or an empty optional if fewer remain.
  std::optional<std::span<const uint8_t>> take(int64_t count) {
    if (count < 0 || static_cast<uint64_t>(count) > bytes_.size() - position_) return {};
    auto part = bytes_.subspan(position_, static_cast<size_t>(count));
    position_ += static_cast<size_t>(count);
    return part;
  }
  std::span<const uint8_t> rest() const { return bytes_.subspan(position_); }
  size_t remaining() const { return bytes_.size() - position_; }

 private:
  std::span<const uint8_t> bytes_;
  size_t position_ = 0;
};

inline std::span<const uint8_t> as_span(const std::string& bytes) {
  return {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()};
}

// IEEE binary16, round to nearest even.
uint16_t float_to_half(float value);
float half_to_float(uint16_t bits);
// bfloat16 of a finite non-negative VALUE, rounded up (toward +inf) so that the
// result is >= VALUE; used for quantization scales.
uint16_t bfloat16_round_up(float value);
inline float bfloat16_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// The product of DIMS, or nullopt if a dimension is negative or it exceeds LIMIT.
std::optional<int64_t> checked_numel(std::span<const int64_t> dims,
                                     int64_t limit = int64_t{1} << 40);

// 64-bit splitmix finaliser: a bijective mixer.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// Element I of the stream keyed by SEED.
inline uint64_t stream_bits(uint64_t key, uint64_t index) {
  return mix64(key + (index + 1) * kGolden);
}
inline uint64_t stream_key(uint64_t seed) { return mix64(seed ^ 0x5D1A2B3C4E5F6071ull); }
// Top 24 bits as a float in [0, 1): exactly representable, never 1.
inline float unit_float(uint64_t bits) {
  return static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);
}

}  // namespace sn::compress::detail
