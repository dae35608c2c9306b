#include <fmt/format.h>

#include "core/fs.h"
#include "core/merkle.h"
#include "verify/verify.h"

namespace sn::verify {

namespace fs = std::filesystem;

Status check_job_id(const std::string& job_id) {
  // It names a directory under DATA/evidence: one path component, nothing more.
  if (job_id.empty() || job_id.size() > 256 || job_id == "." || job_id == ".." ||
      job_id.find_first_of(std::string("/\\\0", 3)) != std::string::npos)
    return input_error("job id \"{}\" must be 1..256 characters, no '/' or NUL, not \".\" or \"..\"",
                       job_id.substr(0, 80));
  return ok_status();
}

std::vector<Hash256> split_leaves(const std::string& bytes) {
  std::vector<Hash256> leaves(bytes.size() / 32);
  for (size_t i = 0; i < leaves.size(); ++i) std::copy_n(bytes.data() + 32 * i, 32, leaves[i].begin());
  return leaves;
}

namespace {
std::vector<Hash256> leaf_nodes(const std::vector<Hash256>& leaves) {
  std::vector<Hash256> nodes;
  nodes.reserve(leaves.size());
  for (const auto& leaf : leaves) nodes.push_back(merkle_leaf(leaf, MerkleHash::keccak256));
  return nodes;
}

Hash256 inner(const Hash256& left, const Hash256& right) {
  uint8_t buffer[65];
  buffer[0] = 0x01;
  std::copy(left.begin(), left.end(), buffer + 1);
  std::copy(right.begin(), right.end(), buffer + 33);
  return keccak256(std::span<const uint8_t>(buffer, sizeof buffer));
}
}  // namespace

Hash256 commitment_root(const std::vector<Hash256>& leaves) {
  return merkle_root(leaf_nodes(leaves), MerkleHash::keccak256);
}

std::vector<Hash256> commitment_proof(const std::vector<Hash256>& leaves, uint64_t index) {
  return merkle_proof(leaf_nodes(leaves), index, MerkleHash::keccak256).siblings;
}

bool check_commitment_proof(const Hash256& root, uint64_t count, uint64_t index, const Hash256& leaf,
                            const std::vector<Hash256>& siblings) {
  if (index >= count) return false;
  Hash256 node = merkle_leaf(leaf, MerkleHash::keccak256);
  size_t used = 0;
  for (uint64_t width = count; width > 1; width = (width + 1) / 2, index /= 2) {
    if (index % 2 == 1) {
      if (used >= siblings.size()) return false;
      node = inner(siblings[used++], node);
    } else if (index + 1 < width) {
      if (used >= siblings.size()) return false;
      node = inner(node, siblings[used++]);
    }  // else: the last node of an odd level is carried up
  }
  return used == siblings.size() && node == root;
}

}  // namespace sn::verify
