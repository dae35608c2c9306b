// A solver's evidence (docs/verification.md, docs/commitments.md "Step
// leaves"): what every training step of one member leaves on disk so that
// anyone can replay it without peers, and the leaf that commits to it.
//
// Layout under DATA/evidence/<job_id>/stage<s>-replica<r>/:
//   setup.pb               the SetupJobRequest as received
//   step-<12-digit t>.pb   StepEvidence of step t (1-based), as received
//   leaves.bin             leaf_0 … leaf_t, 32 bytes each
// Checkpoints stay in the CheckpointStore at DATA/checkpoints/<job>/stage<s>-replica<r>/.
//
// No LibTorch here: the verify module and the CLI read evidence through it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "core/hash.h"
#include "core/result.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"

namespace sn::train {

// ---- paths ------------------------------------------------------------------
std::filesystem::path evidence_dir(const std::filesystem::path& data_dir, std::string_view job_id, int stage,
                                   int replica);
std::filesystem::path checkpoint_dir(const std::filesystem::path& data_dir, std::string_view job_id, int stage,
                                     int replica);
std::filesystem::path setup_evidence_path(const std::filesystem::path& evidence_dir);
std::filesystem::path step_evidence_path(const std::filesystem::path& evidence_dir, int64_t step);
std::filesystem::path leaves_path(const std::filesystem::path& evidence_dir);

// ---- digests (BLAKE2b-256; byte layouts in docs/commitments.md) -------------

// H(str("solvernet/step-request/v1") ‖ deterministic protobuf serialization
// of REQUEST, auth included).
Hash256 step_request_digest(const solvernet::v1::RunStepRequest& request);

// One message of a step: its tag (Tag.from = the sender's member index) and
// net::tensor_message_digest of it as signed.
struct TaggedDigest {
  net::Tag tag;
  Hash256 digest{};
};
// One message sent: to whom (member index), its tag, its digest as sent.
struct OutboundDigest {
  int to = 0;
  net::Tag tag;
  Hash256 digest{};
  auto operator<=>(const OutboundDigest&) const = default;
};

// inbound_t = H(str("solvernet/inbound/v1") ‖ request_digest ‖ u64(k) ‖ d_1 … d_k),
// d_i sorted by tag. MESSAGES may come in any order.
Hash256 inbound_digest(const Hash256& request_digest, std::vector<TaggedDigest> messages);
// outbound_t = H(str("solvernet/outbound/v1") ‖ u64(k) ‖ (u64(to) ‖ d_i)…), sorted by (to, tag).
Hash256 outbound_digest(std::vector<OutboundDigest> messages);
// leaf_t = H(str("solvernet/leaf/v2") ‖ u64(t) ‖ state ‖ inbound ‖ outbound).
// Leaf 0 has all-zero inbound and outbound digests.
Hash256 step_leaf(int64_t t, const Hash256& state, const Hash256& inbound, const Hash256& outbound);

// The member's commitment: the Keccak-256 Merkle root over merkle_leaf(leaf_t,
// keccak256), t = 0 … n (docs/commitments.md "Commitment v2").
Hash256 leaves_root(const std::vector<Hash256>& leaves);

// ---- writing ----------------------------------------------------------------
// step-<t>.pb through a temp file and a rename (not fsync'd: a lost file
// means the node cannot answer for that step, which the protocol punishes).
Status write_step_evidence(const std::filesystem::path& evidence_dir, const solvernet::v1::StepEvidence& evidence);

// ---- reading ----------------------------------------------------------------
// Each refuses, naming the file, one that is missing or does not parse.
Result<solvernet::v1::SetupJobRequest> read_setup_evidence(const std::filesystem::path& evidence_dir);
Result<solvernet::v1::StepEvidence> read_step_evidence(const std::filesystem::path& evidence_dir, int64_t step);
// leaves.bin whole (its size must be a multiple of 32).
Result<std::vector<Hash256>> read_leaves(const std::filesystem::path& evidence_dir);

}  // namespace sn::train
