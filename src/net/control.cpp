#include "net/control.h"

#include <chrono>

namespace sn::net {
namespace {
void append_u64(std::string& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}
}  // namespace

int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

ControlBody& ControlBody::add(std::string_view text) {
  append_u64(bytes_, text.size());
  bytes_.append(text);
  return *this;
}

ControlBody& ControlBody::add(int64_t value) {
  append_u64(bytes_, static_cast<uint64_t>(value));
  return *this;
}

Hash256 control_digest(std::string_view method, std::string_view job_id, const PublicKey& client_key,
                       uint64_t sequence, int64_t time_ms, const ControlBody& body) {
  ControlBody head;
  head.add(method).add(job_id);
  std::string message = "solvernet-control-v1" + head.bytes();
  message.append(reinterpret_cast<const char*>(client_key.data()), client_key.size());
  append_u64(message, sequence);
  append_u64(message, static_cast<uint64_t>(time_ms));
  message += body.bytes();
  return hash_string(message);
}

ControlSigner::ControlSigner(const NodeKey& key)
    : key_(&key),
      next_sequence_(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                               std::chrono::system_clock::now().time_since_epoch())
                                               .count())) {}

solvernet::v1::ControlAuth ControlSigner::sign(std::string_view method, std::string_view job_id,
                                               const ControlBody& body) {
  solvernet::v1::ControlAuth auth;
  const uint64_t sequence = next_sequence_.fetch_add(1);
  const int64_t time_ms = unix_ms_now();
  auth.set_client_public_key(key_->public_key().data(), key_->public_key().size());
  auth.set_sequence(sequence);
  auth.set_time_ms(time_ms);
  Hash256 digest = control_digest(method, job_id, key_->public_key(), sequence, time_ms, body);
  Signature signature = key_->sign(digest);
  auth.set_signature(signature.data(), signature.size());
  return auth;
}

}  // namespace sn::net
