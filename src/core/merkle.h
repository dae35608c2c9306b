// Binary Merkle tree over 32-byte leaves. An odd node at any level is
// promoted unchanged. Leaves are hashed with a 0x00 prefix, inner nodes with 0x01
// (hash_pair), so a leaf can never pass for an inner node.
//
// Two hash functions, one shape: BLAKE2b-256 (the default; v1 state
// commitments, docs/commitments.md) and Keccak-256, which SolverMarket can
// recompute on chain (v2 step commitments, docs/verification.md).
#pragma once

#include <vector>

#include "core/hash.h"

namespace sn {

enum class MerkleHash { blake2b, keccak256 };

// H(0x00 ‖ data): the tree's leaf node for DATA.
Hash256 merkle_leaf(std::span<const uint8_t> data, MerkleHash kind = MerkleHash::blake2b);
// LEAVES are leaf nodes (merkle_leaf of the data). No leaves: H("solvernet-empty-merkle-tree").
Hash256 merkle_root(const std::vector<Hash256>& leaves, MerkleHash kind = MerkleHash::blake2b);

struct MerkleProof {
  size_t index = 0;
  std::vector<Hash256> siblings;  // bottom-up; a promoted level contributes no sibling
  std::vector<bool> sibling_on_left;
};

MerkleProof merkle_proof(const std::vector<Hash256>& leaves, size_t index, MerkleHash kind = MerkleHash::blake2b);
// LEAF is the leaf node. Checks the path only: a verifier that also needs the
// position checks proof.index and the sibling sides against the tree's size.
bool merkle_verify(const Hash256& root, const Hash256& leaf, const MerkleProof& proof,
                   MerkleHash kind = MerkleHash::blake2b);

}  // namespace sn
