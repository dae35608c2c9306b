// A node's identity: one Ed25519 key pair (libsodium) kept in its data dir.
// The node id is the hex BLAKE2b-256 of the public key, so an id cannot be
// claimed without the matching secret key.
#pragma once

#include <array>
#include <filesystem>
#include <span>
#include <string>

#include "core/result.h"

namespace sn {

using PublicKey = std::array<uint8_t, 32>;
using Signature = std::array<uint8_t, 64>;
class NodeKey;
struct NodeCertificate;
Result<NodeCertificate> make_node_certificate(const NodeKey& key);  // core/cert.h

// Node id (64 hex chars) derived from a public key.
std::string node_id_of(const PublicKey& public_key);

class NodeKey {
 public:
  // Reads DIR/node.key, or creates it (mode 0600, written atomically) if absent.
  static Result<NodeKey> load_or_create(const std::filesystem::path& dir);
  // The same for a key file at PATH (a client's --key); its directory is created.
  static Result<NodeKey> load_or_create_file(const std::filesystem::path& path);
  // A fresh key that lives only in memory (clients and tests).
  static NodeKey generate();

  const PublicKey& public_key() const { return public_key_; }
  const std::string& node_id() const { return node_id_; }
  Signature sign(std::span<const uint8_t> message) const;

 private:
  // The TLS certificate's private key is this very key (core/cert.h).
  friend Result<NodeCertificate> make_node_certificate(const NodeKey& key);
  NodeKey() = default;
  PublicKey public_key_{};
  std::array<uint8_t, 64> secret_key_{};
  std::string node_id_;
};

bool verify_signature(const PublicKey& public_key, std::span<const uint8_t> message,
                      std::span<const uint8_t> signature);

}  // namespace sn
