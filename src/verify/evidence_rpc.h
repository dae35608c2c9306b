// Private to sn_verify: what the control signature of each Evidence request
// covers (docs/verification.md, "Evidence service"), shared by the client that
// signs and the service that checks.
#pragma once

#include "net/control.h"
#include "proto/solvernet.pb.h"

namespace sn::verify {

inline net::ControlBody member_body(const solvernet::v1::EvidenceMember& m) {
  net::ControlBody body;
  body.add(int64_t{m.stage()}).add(int64_t{m.replica()});
  return body;
}
inline net::ControlBody evidence_body(const solvernet::v1::GetCommitmentRequest& r) { return member_body(r.member()); }
inline net::ControlBody evidence_body(const solvernet::v1::GetSetupRequest& r) { return member_body(r.member()); }
inline net::ControlBody evidence_body(const solvernet::v1::GetStepEvidenceRequest& r) {
  return member_body(r.member()).add(r.step());
}
inline net::ControlBody evidence_body(const solvernet::v1::GetCheckpointRequest& r) {
  return member_body(r.member()).add(r.step()).add(r.file()).add(r.offset()).add(r.max_bytes());
}
inline net::ControlBody evidence_body(const solvernet::v1::GetOpTraceRequest& r) {
  return member_body(r.member()).add(r.step());
}
inline net::ControlBody evidence_body(const solvernet::v1::GetTensorRequest& r) {
  return member_body(r.member()).add(r.step()).add(r.hash());
}

// "Evidence.GetCommitment", ...
template <class Request>
void sign_evidence(net::ControlSigner& signer, const char* method, Request& request) {
  *request.mutable_auth() = signer.sign(method, request.member().job_id(), evidence_body(request));
}

template <class Request>
Hash256 evidence_digest(const char* method, const Request& request) {
  PublicKey key{};
  if (request.auth().client_public_key().size() == key.size())
    std::copy(request.auth().client_public_key().begin(), request.auth().client_public_key().end(), key.begin());
  return net::control_digest(method, request.member().job_id(), key, request.auth().sequence(),
                             request.auth().time_ms(), evidence_body(request));
}

inline constexpr int64_t kMaxChunkBytes = 4 << 20;

}  // namespace sn::verify
