// Private to sn_train: what the control signature of each Train request
// covers (docs/wire.md, "Control requests"), shared by the client that signs
// and the node that checks.
#pragma once

#include "net/control.h"
#include "proto/solvernet.pb.h"

namespace sn::train {

net::ControlBody control_body(const solvernet::v1::SetupJobRequest& request);
net::ControlBody control_body(const solvernet::v1::RunStepRequest& request);
net::ControlBody control_body(const solvernet::v1::FetchWeightsRequest& request);
net::ControlBody control_body(const solvernet::v1::EndJobRequest& request);
net::ControlBody control_body(const solvernet::v1::RenewLeaseRequest& request);
net::ControlBody control_body(const solvernet::v1::FetchCheckpointRequest& request);
net::ControlBody control_body(const solvernet::v1::PutCheckpointRequest& request);

// Fills REQUEST's auth: signed by SIGNER for METHOD ("SetupJob", ...).
template <class Request>
void sign_request(net::ControlSigner& signer, const char* method, Request& request) {
  *request.mutable_auth() = signer.sign(method, request.job_id(), control_body(request));
}

// The digest REQUEST's auth claims to sign (a malformed key hashes as zeros;
// the signature check then fails).
template <class Request>
Hash256 request_digest(const char* method, const Request& request) {
  PublicKey key{};
  if (request.auth().client_public_key().size() == key.size())
    std::copy(request.auth().client_public_key().begin(), request.auth().client_public_key().end(), key.begin());
  return net::control_digest(method, request.job_id(), key, request.auth().sequence(), request.auth().time_ms(),
                             control_body(request));
}

}  // namespace sn::train
