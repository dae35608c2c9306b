#include "core/cert.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

namespace sn {
namespace {

template <auto Free>
struct Deleter {
  template <class T>
  void operator()(T* p) const { Free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using Cert = std::unique_ptr<X509, Deleter<X509_free>>;
using Bio = std::unique_ptr<BIO, Deleter<BIO_free>>;
using Ext = std::unique_ptr<X509_EXTENSION, Deleter<X509_EXTENSION_free>>;

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  long size = BIO_get_mem_data(bio, &data);
  return size > 0 ? std::string(data, static_cast<size_t>(size)) : std::string();
}

}  // namespace

Result<NodeCertificate> make_node_certificate(const NodeKey& key) {
  // libsodium's secret key is seed ‖ public key; OpenSSL wants the seed.
  Pkey pkey(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, key.secret_key_.data(), 32));
  Cert cert(X509_new());
  if (!pkey || !cert) return make_error("TLS certificate: OpenSSL could not create the key");
  // Fixed serial and validity: the certificate is a function of the key. The
  // identity never expires (RFC 5280's 99991231235959Z); it is revoked by
  // withdrawing the node id, not by dates.
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1);
  ASN1_TIME_set_string(X509_getm_notBefore(cert.get()), "20200101000000Z");
  ASN1_TIME_set_string(X509_getm_notAfter(cert.get()), "99991231235959Z");
  X509_NAME* name = X509_get_subject_name(cert.get());
  const auto* id = reinterpret_cast<const unsigned char*>(key.node_id().c_str());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("solvernet node"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, id, -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_set_pubkey(cert.get(), pkey.get());
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
  std::string san = std::string("DNS:") + kNodeCertificateName;
  Ext ext(X509V3_EXT_conf_nid(nullptr, &ctx, NID_subject_alt_name, san.c_str()));
  if (!ext || !X509_add_ext(cert.get(), ext.get(), -1)) return make_error("TLS certificate: cannot add the subject name");
  // Ed25519 signs the whole message itself: no digest.
  if (X509_sign(cert.get(), pkey.get(), nullptr) <= 0) return make_error("TLS certificate: OpenSSL could not sign");
  NodeCertificate out;
  Bio cert_bio(BIO_new(BIO_s_mem())), key_bio(BIO_new(BIO_s_mem()));
  if (!PEM_write_bio_X509(cert_bio.get(), cert.get()) ||
      !PEM_write_bio_PrivateKey(key_bio.get(), pkey.get(), nullptr, nullptr, 0, nullptr, nullptr))
    return make_error("TLS certificate: OpenSSL could not write PEM");
  out.certificate_pem = bio_text(cert_bio.get());
  out.private_key_pem = bio_text(key_bio.get());
  return out;
}

Result<std::string> node_id_of_certificate(std::string_view pem) {
  Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Cert cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) return kind_error(ErrorKind::bad_peer, "its TLS certificate is not a readable X.509 certificate");
  EVP_PKEY* pkey = X509_get0_pubkey(cert.get());
  if (!pkey || EVP_PKEY_get_id(pkey) != EVP_PKEY_ED25519)
    return kind_error(ErrorKind::bad_peer, "its TLS certificate's key is not Ed25519, so it is not a solvernet node certificate");
  if (X509_verify(cert.get(), pkey) != 1)
    return kind_error(ErrorKind::bad_peer, "its TLS certificate is not self-signed by its key");
  PublicKey public_key{};
  size_t size = public_key.size();
  if (EVP_PKEY_get_raw_public_key(pkey, public_key.data(), &size) != 1 || size != public_key.size())
    return kind_error(ErrorKind::bad_peer, "its TLS certificate's Ed25519 key cannot be read");
  return node_id_of(public_key);
}

}  // namespace sn
