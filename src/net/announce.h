// What a node says about itself, signed with its node key so nobody can
// announce in its name (docs/discovery.md).
#pragma once

#include "core/hash.h"
#include "core/keys.h"
#include "core/result.h"
#include "proto/solvernet.pb.h"

namespace sn::net {

solvernet::v1::SignedNodeInfo sign_node_info(const solvernet::v1::NodeInfo& info, const NodeKey& key);

// Checks the encoding, the key size, that node_id is the hash of public_key,
// and the signature. The error names what is wrong.
Result<solvernet::v1::NodeInfo> verify_node_info(const solvernet::v1::SignedNodeInfo& signed_info);

// This machine: node id and key, region, cores, memory, measured compute
// speed, the current time. The address is left for the caller.
solvernet::v1::NodeInfo local_node_info(const NodeKey& key, const std::string& region);

// A ~0.2 s single-thread fp32 multiply-add loop: GFLOP/s of this core.
double measure_compute_gflops();

int64_t unix_millis();

}  // namespace sn::net
