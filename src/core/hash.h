// Hashing (BLAKE2b-256 from libsodium) and hex encoding.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "core/result.h"

namespace sn {

using Hash256 = std::array<uint8_t, 32>;

Hash256 hash_bytes(std::span<const uint8_t> data);
Hash256 hash_string(std::string_view text);
// Hash of the concatenation of two hashes: the inner node of a Merkle tree.
Hash256 hash_pair(const Hash256& left, const Hash256& right);

// Keccak-256 as Ethereum uses it (the original Keccak padding, not SHA3-256):
// what a contract computes with keccak256(...), so anything a contract checks
// (commitment Merkle proofs, operation chains) is hashed with it.
Hash256 keccak256(std::span<const uint8_t> data);
inline Hash256 keccak256(std::string_view text) {
  return keccak256(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

// Incremental hashing for data that arrives in pieces.
class Hasher {
 public:
  Hasher();
  Hasher& update(std::span<const uint8_t> data);
  Hasher& update(std::string_view text);
  Hasher& update_u64(uint64_t value);
  Hash256 finish();

 private:
  alignas(64) unsigned char state_[384];
};

std::string to_hex(std::span<const uint8_t> bytes);
Result<std::string> from_hex(std::string_view hex);

inline std::span<const uint8_t> as_bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

}  // namespace sn
