// Signed control requests (docs/wire.md, "Control requests"): a client proves
// with its Ed25519 key that it owns a job. The digest is defined field by
// field, never by re-serialising protobuf, so a client in any language can
// compute it.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/hash.h"
#include "core/keys.h"
#include "proto/solvernet.pb.h"

namespace sn::net {

// The method-specific fields a control signature covers, appended in the
// order docs/wire.md lists them: strings as u64 LE length + bytes, integers
// and booleans as u64 LE.
class ControlBody {
 public:
  ControlBody& add(std::string_view text);
  ControlBody& add(int64_t value);
  ControlBody& add_bool(bool value) { return add(int64_t{value ? 1 : 0}); }
  const std::string& bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

// BLAKE2b-256 of "solvernet-control-v1", METHOD, JOB_ID, the client's public
// key (32 raw bytes), SEQUENCE, TIME_MS, then BODY.
Hash256 control_digest(std::string_view method, std::string_view job_id, const PublicKey& client_key,
                       uint64_t sequence, int64_t time_ms, const ControlBody& body);

// Signs control requests with one key. Sequence numbers start at the current
// time in microseconds and increase by one per request, so they keep
// increasing across restarts of a client that reuses its key. Thread-safe.
class ControlSigner {
 public:
  explicit ControlSigner(const NodeKey& key);
  solvernet::v1::ControlAuth sign(std::string_view method, std::string_view job_id, const ControlBody& body);
  const NodeKey& key() const { return *key_; }

 private:
  const NodeKey* key_;
  std::atomic<uint64_t> next_sequence_;
};

int64_t unix_ms_now();

}  // namespace sn::net
