#include "core/hash.h"

#include <cryptopp/keccak.h>
#include <sodium.h>

#include <cstring>

namespace sn {

static_assert(sizeof(crypto_generichash_state) <= 384, "Hasher state buffer too small");

Hash256 hash_bytes(std::span<const uint8_t> data) {
  Hash256 out;
  crypto_generichash(out.data(), out.size(), data.data(), data.size(), nullptr, 0);
  return out;
}

Hash256 hash_string(std::string_view text) { return hash_bytes(as_bytes(text)); }

Hash256 keccak256(std::span<const uint8_t> data) {
  CryptoPP::Keccak_256 hasher;
  hasher.Update(data.data(), data.size());
  Hash256 digest;
  hasher.Final(digest.data());
  return digest;
}

Hash256 hash_pair(const Hash256& left, const Hash256& right) {
  std::array<uint8_t, 65> buffer;
  buffer[0] = 0x01;  // domain-separates inner nodes from leaves
  std::memcpy(buffer.data() + 1, left.data(), 32);
  std::memcpy(buffer.data() + 33, right.data(), 32);
  return hash_bytes(buffer);
}

Hasher::Hasher() {
  crypto_generichash_init(reinterpret_cast<crypto_generichash_state*>(state_), nullptr, 0, 32);
}

Hasher& Hasher::update(std::span<const uint8_t> data) {
  crypto_generichash_update(reinterpret_cast<crypto_generichash_state*>(state_), data.data(),
                            data.size());
  return *this;
}

Hasher& Hasher::update(std::string_view text) { return update(as_bytes(text)); }

Hasher& Hasher::update_u64(uint64_t value) {
  uint8_t le[8];
  for (int i = 0; i < 8; ++i) le[i] = static_cast<uint8_t>(value >> (8 * i));
  return update(std::span<const uint8_t>(le, 8));
}

Hash256 Hasher::finish() {
  Hash256 out;
  crypto_generichash_final(reinterpret_cast<crypto_generichash_state*>(state_), out.data(),
                           out.size());
  return out;
}

std::string to_hex(std::span<const uint8_t> bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 15]);
  }
  return out;
}

Result<std::string> from_hex(std::string_view hex) {
  if (hex.size() % 2 != 0) return make_error("hex string has odd length {}", hex.size());
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(hex.size() / 2);
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return make_error("invalid hex character at offset {}", i);
    out.push_back(static_cast<char>((hi << 4) | lo));
  }
  return out;
}

}  // namespace sn
