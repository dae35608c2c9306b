// Binary Merkle tree over BLAKE2b-256 leaves. An odd node at any level is
// promoted unchanged. Leaves are hashed with a 0x00 prefix, inner nodes with 0x01
// (hash_pair), so a leaf can never pass for an inner node.
#pragma once

#include <vector>

#include "core/hash.h"

namespace sn {

Hash256 merkle_leaf(std::span<const uint8_t> data);
Hash256 merkle_root(const std::vector<Hash256>& leaves);

struct MerkleProof {
  size_t index = 0;
  std::vector<Hash256> siblings;  // bottom-up; a promoted level contributes no sibling
  std::vector<bool> sibling_on_left;
};

MerkleProof merkle_proof(const std::vector<Hash256>& leaves, size_t index);
bool merkle_verify(const Hash256& root, const Hash256& leaf, const MerkleProof& proof);

}  // namespace sn
