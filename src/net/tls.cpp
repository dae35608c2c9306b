#include "net/tls.h"

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <iostream>
#include <map>
#include <mutex>
#include <unordered_map>

#include "core/cert.h"

namespace sn::net {
namespace {

namespace gx = grpc::experimental;

std::atomic<bool> g_insecure{false};

std::string short_id(const std::string& id) { return id.size() > 12 ? id.substr(0, 12) + "…" : id; }

// Certificates are a pure function of the key; make each once.
Result<NodeCertificate> certificate_of(const NodeKey& key) {
  static std::mutex mutex;
  static std::map<std::string, NodeCertificate> made;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = made.find(key.node_id());
  if (it != made.end()) return it->second;
  SN_ASSIGN(auto cert, make_node_certificate(key));
  made.emplace(key.node_id(), cert);
  return cert;
}

// Runs in gRPC's handshake, after OpenSSL checked that the peer holds the key
// of the certificate it presented (TLS 1.3 CertificateVerify); chain checks
// are off because node certificates are self-signed. What is left is ours:
// the certificate is a node certificate, and for the node we meant.
class NodeIdVerifier final : public gx::ExternalCertificateVerifier {
 public:
  // SERVER_SIDE: the peer is a caller, who may present no certificate.
  NodeIdVerifier(bool server_side, std::string address, std::string expected)
      : server_side_(server_side), address_(std::move(address)), expected_(std::move(expected)) {}

  bool Verify(gx::TlsCustomVerificationCheckRequest* request, std::function<void(grpc::Status)>,
              grpc::Status* sync_status) override {
    *sync_status = check(std::string(request->peer_cert().data(), request->peer_cert().size()));
    if (!sync_status->ok()) spdlog::warn("{}", sync_status->error_message());
    return true;
  }
  void Cancel(gx::TlsCustomVerificationCheckRequest*) override {}

 private:
  grpc::Status refuse(const std::string& why) const {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, kTlsRefusal + why);
  }
  grpc::Status check(const std::string& pem) const {
    if (pem.empty())
      return server_side_ ? grpc::Status::OK : refuse(fmt::format("the server at {} presented no certificate", address_));
    auto id = node_id_of_certificate(pem);
    if (!id.ok())
      return refuse(server_side_ ? "a caller: " + id.message() : fmt::format("the server at {}: {}", address_, id.message()));
    if (!expected_.empty() && *id != expected_)
      return refuse(fmt::format("expected node {} at {}, its certificate is for node {}", short_id(expected_), address_,
                                short_id(*id)));
    return grpc::Status::OK;
  }

  bool server_side_;
  std::string address_;
  std::string expected_;
};

std::shared_ptr<gx::CertificateProviderInterface> provider_of(const NodeCertificate& cert) {
  return std::make_shared<gx::StaticDataCertificateProvider>(
      std::vector<gx::IdentityKeyCertPair>{{cert.private_key_pem, cert.certificate_pem}});
}

}  // namespace

void use_insecure() {
  if (g_insecure.exchange(true)) return;
  std::cerr << "\n"
               "  *** WARNING: --insecure: gRPC links are PLAINTEXT and UNAUTHENTICATED. ***\n"
               "  Anyone on the network path can read, change or impersonate this traffic,\n"
               "  and nothing checks that a peer is the node the DHT announces.\n"
               "  For debugging only. TLS nodes and clients will not talk to this process.\n\n";
}

bool insecure() { return g_insecure.load(); }

std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const std::string& address,
                                                              const std::string& expected_node_id,
                                                              const NodeKey* identity) {
  if (insecure()) return grpc::InsecureChannelCredentials();
  gx::TlsChannelCredentialsOptions options;
  // No CA: the verifier below checks the node id instead of a chain or a host name.
  options.set_verify_server_certs(false);
  options.set_check_call_host(false);
  options.set_certificate_verifier(gx::ExternalCertificateVerifier::Create<NodeIdVerifier>(false, address, expected_node_id));
  if (identity) {
    auto cert = certificate_of(*identity);
    if (cert.ok()) {
      options.set_certificate_provider(provider_of(*cert));
      options.watch_identity_key_cert_pairs();
    } else {
      // The peer will refuse node-to-node messages and say why.
      spdlog::error("cannot present a TLS certificate: {}", cert.message());
    }
  }
  return gx::TlsCredentials(options);
}

Result<std::shared_ptr<grpc::ServerCredentials>> server_credentials(const NodeKey& identity) {
  if (insecure()) return grpc::InsecureServerCredentials();
  SN_ASSIGN(auto cert, certificate_of(identity));
  gx::TlsServerCredentialsOptions options(provider_of(cert));
  options.watch_identity_key_cert_pairs();
  // Ask every caller for a certificate but let gRPC accept any: clients have
  // none, and the verifier checks the nodes' ones.
  options.set_cert_request_type(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_BUT_DONT_VERIFY);
  options.set_check_call_host(false);
  options.set_certificate_verifier(gx::ExternalCertificateVerifier::Create<NodeIdVerifier>(true, "", ""));
  return gx::TlsServerCredentials(options);
}

std::string peer_node_id(const grpc::ServerContext& context) {
  if (insecure()) return "";
  auto auth = context.auth_context();
  if (!auth) return "";
  auto values = auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME);
  if (values.empty()) return "";
  std::string pem(values.front().data(), values.front().size());
  // Every message of a link carries the same certificate: parse it once.
  static std::mutex mutex;
  static std::unordered_map<std::string, std::string> ids;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = ids.find(pem);
  if (it != ids.end()) return it->second;
  auto id = node_id_of_certificate(pem);
  if (!id.ok()) return "";  // the handshake's verifier refused such certificates already
  if (ids.size() > 4096) ids.clear();
  ids.emplace(pem, *id);
  return *id;
}

Status check_peer_is(const grpc::ServerContext& context, const std::string& claimed_node_id) {
  if (insecure()) return {};
  std::string peer = peer_node_id(context);
  if (peer.empty())
    return kind_error(ErrorKind::permission_denied, "message claims to come from node {}, but the caller presented no node certificate",
                      short_id(claimed_node_id));
  if (peer != claimed_node_id)
    return kind_error(ErrorKind::permission_denied, "message claims to come from node {}, but the caller's certificate is for node {}",
                      short_id(claimed_node_id), short_id(peer));
  return {};
}

}  // namespace sn::net
