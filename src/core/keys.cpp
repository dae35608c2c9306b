#include "core/keys.h"

#include <sodium.h>

#include <fstream>

#include "core/fs.h"
#include "core/hash.h"

namespace sn {
namespace {
struct SodiumInit {
  SodiumInit() {
    if (sodium_init() < 0) throw std::runtime_error("libsodium failed to initialise");
  }
};
void ensure_sodium() { static SodiumInit once; }
constexpr const char* kKeyFile = "node.key";
constexpr const char* kKeyMagic = "solvernet-ed25519-v1\n";
}  // namespace

std::string node_id_of(const PublicKey& public_key) { return to_hex(hash_bytes(public_key)); }

NodeKey NodeKey::generate() {
  ensure_sodium();
  NodeKey key;
  crypto_sign_keypair(key.public_key_.data(), key.secret_key_.data());
  key.node_id_ = node_id_of(key.public_key_);
  return key;
}

Result<NodeKey> NodeKey::load_or_create(const std::filesystem::path& dir) {
  return load_or_create_file(dir / kKeyFile);
}

Result<NodeKey> NodeKey::load_or_create_file(const std::filesystem::path& path) {
  ensure_sodium();
  SN_TRY(ensure_directory(path.has_parent_path() ? path.parent_path() : std::filesystem::path(".")));
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    NodeKey key = generate();
    std::string body = kKeyMagic + to_hex(key.secret_key_) + "\n";
    SN_TRY(write_file_atomic(path, body, 0600));
    return key;
  }
  SN_ASSIGN(std::string body, read_file(path));
  std::string magic = kKeyMagic;
  if (body.rfind(magic, 0) != 0) return make_error("{}: not a solvernet key file", path.string());
  std::string hex = body.substr(magic.size());
  while (!hex.empty() && (hex.back() == '\n' || hex.back() == '\r')) hex.pop_back();
  auto raw = from_hex(hex);
  if (!raw.ok() || raw->size() != 64) return make_error("{}: corrupt key (expected 64 hex bytes)", path.string());
  NodeKey key;
  std::copy(raw->begin(), raw->end(), key.secret_key_.begin());
  crypto_sign_ed25519_sk_to_pk(key.public_key_.data(), key.secret_key_.data());
  key.node_id_ = node_id_of(key.public_key_);
  return key;
}

Signature NodeKey::sign(std::span<const uint8_t> message) const {
  Signature sig;
  crypto_sign_detached(sig.data(), nullptr, message.data(), message.size(), secret_key_.data());
  return sig;
}

bool verify_signature(const PublicKey& public_key, std::span<const uint8_t> message,
                      std::span<const uint8_t> signature) {
  ensure_sodium();
  if (signature.size() != crypto_sign_BYTES) return false;
  return crypto_sign_verify_detached(signature.data(), message.data(), message.size(),
                                     public_key.data()) == 0;
}

}  // namespace sn
