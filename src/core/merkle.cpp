#include "core/merkle.h"

namespace sn {

Hash256 merkle_leaf(std::span<const uint8_t> data) {
  Hasher h;
  uint8_t prefix = 0x00;
  h.update(std::span<const uint8_t>(&prefix, 1));
  h.update(data);
  return h.finish();
}

static std::vector<Hash256> next_level(const std::vector<Hash256>& level) {
  std::vector<Hash256> up;
  up.reserve((level.size() + 1) / 2);
  for (size_t i = 0; i + 1 < level.size(); i += 2) up.push_back(hash_pair(level[i], level[i + 1]));
  if (level.size() % 2 == 1) up.push_back(level.back());
  return up;
}

Hash256 merkle_root(const std::vector<Hash256>& leaves) {
  if (leaves.empty()) return hash_string("solvernet-empty-merkle-tree");
  std::vector<Hash256> level = leaves;
  while (level.size() > 1) level = next_level(level);
  return level[0];
}

MerkleProof merkle_proof(const std::vector<Hash256>& leaves, size_t index) {
  MerkleProof proof;
  proof.index = index;
  std::vector<Hash256> level = leaves;
  size_t i = index;
  while (level.size() > 1) {
    size_t sibling = (i % 2 == 0) ? i + 1 : i - 1;
    if (sibling < level.size()) {
      proof.siblings.push_back(level[sibling]);
      proof.sibling_on_left.push_back(sibling < i);
    }
    level = next_level(level);
    i /= 2;
  }
  return proof;
}

bool merkle_verify(const Hash256& root, const Hash256& leaf, const MerkleProof& proof) {
  Hash256 node = leaf;
  for (size_t k = 0; k < proof.siblings.size(); ++k)
    node = proof.sibling_on_left[k] ? hash_pair(proof.siblings[k], node)
                                    : hash_pair(node, proof.siblings[k]);
  return node == root;
}

}  // namespace sn
