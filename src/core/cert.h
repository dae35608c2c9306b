// A node's TLS certificate: self-signed X.509 whose key IS the node's Ed25519
// identity key, so a completed TLS handshake proves the node id (the peer
// signed the handshake with the key whose hash is the id). docs/wire.md, "TLS".
#pragma once

#include <string>
#include <string_view>

#include "core/keys.h"

namespace sn {

struct NodeCertificate {
  std::string certificate_pem;  // subject and issuer CN = node id; SAN DNS kNodeCertificateName
  std::string private_key_pem;  // PKCS#8 Ed25519: secret, for the TLS stack only
};

// The name every node certificate carries, which TLS clients send as SNI and,
// where a library insists on checking a host name, expect (its trust is pinned
// to the certificate itself, not to the name).
inline constexpr const char* kNodeCertificateName = "node.solvernet";

// The same key always yields the same certificate, byte for byte (fixed serial
// and validity, deterministic Ed25519 signature), so nothing is stored. Fails
// only if OpenSSL does (internal error).
Result<NodeCertificate> make_node_certificate(const NodeKey& key);

// The node id that a certificate (PEM) proves, once the peer completed a TLS
// handshake with it. Fails (bad_peer) if the text is not one X.509 certificate,
// its key is not Ed25519, or its self-signature does not verify.
Result<std::string> node_id_of_certificate(std::string_view pem);

}  // namespace sn
