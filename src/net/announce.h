// What a node says about itself, signed with its node key so nobody can
// announce in its name, and the rules the DHT applies before it stores or
// replaces an announcement (docs/discovery.md).
#pragma once

#include <string_view>

#include "core/hash.h"
#include "core/keys.h"
#include "core/result.h"
#include "proto/solvernet.pb.h"

namespace sn::net {

solvernet::v1::SignedNodeInfo sign_node_info(const solvernet::v1::NodeInfo& info, const NodeKey& key);

// A withdrawal: node id, key, TIMESTAMP_MS and withdrawn = true, signed like an
// announcement, so only the node's own key can withdraw it.
solvernet::v1::SignedNodeInfo sign_tombstone(const NodeKey& key, int64_t timestamp_ms);
// The same unsigned, for Discovery::update_announcement (which stamps and signs it).
solvernet::v1::NodeInfo tombstone_info(const NodeKey& key, int64_t timestamp_ms);

// Checks the encoding, the key size, that node_id is the hash of public_key,
// and the signature. The error names what is wrong.
Result<solvernet::v1::NodeInfo> verify_node_info(const solvernet::v1::SignedNodeInfo& signed_info);

// The DHT value id of NODE_ID's announcement: its first 16 hex digits as a
// uint64. One fixed id per node makes a re-publication replace the old value.
uint64_t announcement_value_id(const std::string& node_id);

// Store policy: BYTES (a serialized SignedNodeInfo, announcement or tombstone)
// verifies and sits under its signer's value id. Returns the verified info;
// the error (bad_peer) names what is wrong.
Result<solvernet::v1::NodeInfo> check_announcement(std::string_view bytes, uint64_t value_id);
// Edit policy: REPLACEMENT passes check_announcement, comes from the node that
// signed CURRENT, and is strictly newer (timestamp_ms), so a forged value, a
// replay of an older announcement or another node's value cannot replace it.
// A CURRENT that does not verify (stored before the policy) may be replaced by
// any valid value.
Status check_replacement(std::string_view current, std::string_view replacement, uint64_t value_id);

// This machine: node id and key, region, cores, memory, measured compute
// speed, the current time. The address is left for the caller.
solvernet::v1::NodeInfo local_node_info(const NodeKey& key, const std::string& region);

// A ~0.2 s single-thread fp32 multiply-add loop: GFLOP/s of this core.
double measure_compute_gflops();

int64_t unix_millis();

}  // namespace sn::net
