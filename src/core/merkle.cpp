#include "core/merkle.h"

namespace sn {

namespace {

Hash256 hash_with(MerkleHash kind, std::span<const uint8_t> data) {
  return kind == MerkleHash::keccak256 ? keccak256(data) : hash_bytes(data);
}

Hash256 inner(MerkleHash kind, const Hash256& left, const Hash256& right) {
  if (kind == MerkleHash::blake2b) return hash_pair(left, right);
  std::array<uint8_t, 65> buffer;
  buffer[0] = 0x01;
  std::copy(left.begin(), left.end(), buffer.begin() + 1);
  std::copy(right.begin(), right.end(), buffer.begin() + 33);
  return keccak256(buffer);
}

std::vector<Hash256> next_level(const std::vector<Hash256>& level, MerkleHash kind) {
  std::vector<Hash256> up;
  up.reserve((level.size() + 1) / 2);
  for (size_t i = 0; i + 1 < level.size(); i += 2) up.push_back(inner(kind, level[i], level[i + 1]));
  if (level.size() % 2 == 1) up.push_back(level.back());
  return up;
}

}  // namespace

Hash256 merkle_leaf(std::span<const uint8_t> data, MerkleHash kind) {
  std::vector<uint8_t> buffer(data.size() + 1);
  buffer[0] = 0x00;
  std::copy(data.begin(), data.end(), buffer.begin() + 1);
  return hash_with(kind, buffer);
}

Hash256 merkle_root(const std::vector<Hash256>& leaves, MerkleHash kind) {
  if (leaves.empty()) return hash_with(kind, as_bytes("solvernet-empty-merkle-tree"));
  std::vector<Hash256> level = leaves;
  while (level.size() > 1) level = next_level(level, kind);
  return level[0];
}

MerkleProof merkle_proof(const std::vector<Hash256>& leaves, size_t index, MerkleHash kind) {
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
    level = next_level(level, kind);
    i /= 2;
  }
  return proof;
}

bool merkle_verify(const Hash256& root, const Hash256& leaf, const MerkleProof& proof, MerkleHash kind) {
  if (proof.sibling_on_left.size() != proof.siblings.size()) return false;
  Hash256 node = leaf;
  for (size_t k = 0; k < proof.siblings.size(); ++k)
    node = proof.sibling_on_left[k] ? inner(kind, proof.siblings[k], node)
                                    : inner(kind, node, proof.siblings[k]);
  return node == root;
}

}  // namespace sn
