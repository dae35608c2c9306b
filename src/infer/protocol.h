// What the control signature of each Infer request covers (docs/wire.md,
// "Control requests"; the job id is the session id), shared by the client
// that signs and the server that checks.
#pragma once

#include "net/control.h"
#include "proto/solvernet.pb.h"

namespace sn::infer {

net::ControlBody control_body(const solvernet::v1::OpenSessionRequest& request);
net::ControlBody control_body(const solvernet::v1::ForwardRequest& request);
net::ControlBody control_body(const solvernet::v1::CloseSessionRequest& request);
net::ControlBody control_body(const solvernet::v1::RecomputeRequest& request);

inline const std::string& session_of(const solvernet::v1::RecomputeRequest& request) { return request.check_id(); }
template <class Request>
const std::string& session_of(const Request& request) {
  return request.session_id();
}

// Fills REQUEST's auth, signed by SIGNER for METHOD ("OpenSession", "Forward",
// "CloseSession", "Recompute").
template <class Request>
void sign_infer(net::ControlSigner& signer, const char* method, Request& request) {
  *request.mutable_auth() = signer.sign(method, session_of(request), control_body(request));
}

// The digest REQUEST's auth claims to sign (a malformed key hashes as zeros,
// so the signature check then fails).
template <class Request>
Hash256 infer_digest(const char* method, const Request& request) {
  PublicKey key{};
  if (request.auth().client_public_key().size() == key.size())
    std::copy(request.auth().client_public_key().begin(), request.auth().client_public_key().end(), key.begin());
  return net::control_digest(method, session_of(request), key, request.auth().sequence(), request.auth().time_ms(),
                             control_body(request));
}

}  // namespace sn::infer
