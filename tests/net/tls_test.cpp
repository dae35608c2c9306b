// TLS with node certificates: certificates bound to node ids, the error-kind
// and gRPC-code mapping, handshakes in one process, and a real node process
// refusing a wrong node id and plaintext, reached by a Python grpcio client.
#include <gtest/gtest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/cert.h"
#include "core/fs.h"
#include "core/process.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"
#include "net/tls.h"

namespace sn::net {
namespace {

using namespace std::chrono_literals;
namespace pb = solvernet::v1;

std::string prefix(const std::string& id) { return id.substr(0, 12); }

TEST(NodeCertificate, IsAFunctionOfTheKeyAndProvesItsId) {
  NodeKey key = NodeKey::generate(), other = NodeKey::generate();
  auto a = make_node_certificate(key), b = make_node_certificate(key), c = make_node_certificate(other);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->certificate_pem, b->certificate_pem);
  EXPECT_NE(a->certificate_pem, c->certificate_pem);
  auto id = node_id_of_certificate(a->certificate_pem);
  ASSERT_TRUE(id.ok()) << id.message();
  EXPECT_EQ(*id, key.node_id());
  EXPECT_EQ(*node_id_of_certificate(c->certificate_pem), other.node_id());
}

// A perfectly good certificate whose key is not Ed25519 proves no node id.
TEST(NodeCertificate, OtherKeyTypesAndGarbageAreRefused) {
  EVP_PKEY* pkey = EVP_EC_gen("P-256");
  X509* cert = X509_new();
  ASSERT_TRUE(pkey && cert);
  X509_set_version(cert, 2);
  X509_gmtime_adj(X509_getm_notBefore(cert), 0);
  X509_gmtime_adj(X509_getm_notAfter(cert), 3600);
  X509_set_pubkey(cert, pkey);
  ASSERT_GT(X509_sign(cert, pkey, EVP_sha256()), 0);
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(bio, cert);
  char* data = nullptr;
  long size = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(size));
  BIO_free(bio);
  X509_free(cert);
  EVP_PKEY_free(pkey);
  auto refused = node_id_of_certificate(pem);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().kind, ErrorKind::bad_peer);
  EXPECT_NE(refused.message().find("not Ed25519"), std::string::npos) << refused.message();
  EXPECT_FALSE(node_id_of_certificate("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n").ok());
  EXPECT_FALSE(node_id_of_certificate("").ok());
}

TEST(ErrorKinds, RoundTripThroughGrpcStatusCodes) {
  for (ErrorKind kind : {ErrorKind::internal, ErrorKind::invalid_input, ErrorKind::not_found, ErrorKind::unavailable,
                         ErrorKind::timeout, ErrorKind::bad_peer, ErrorKind::permission_denied,
                         ErrorKind::resource_exhausted, ErrorKind::aborted}) {
    EXPECT_EQ(error_kind_of(grpc_code_of(kind)), kind) << error_kind_name(kind);
    Error back = from_grpc(to_grpc(kind_error(kind, "went wrong")), "call");
    EXPECT_EQ(back.kind, kind) << error_kind_name(kind);
    EXPECT_EQ(back.message, "call: went wrong");
    EXPECT_EQ(back.exit_code, kind == ErrorKind::invalid_input ? kExitBadInput : 1);
  }
  // Codes no kind maps to land on the nearest kind.
  EXPECT_EQ(error_kind_of(grpc::StatusCode::UNAUTHENTICATED), ErrorKind::permission_denied);
  EXPECT_EQ(error_kind_of(grpc::StatusCode::CANCELLED), ErrorKind::aborted);
  EXPECT_EQ(error_kind_of(grpc::StatusCode::UNKNOWN), ErrorKind::internal);
}

// Ping answers with the node id.
class TestNode final : public pb::Node::Service {
 public:
  explicit TestNode(std::string id) : id_(std::move(id)) {}
  grpc::Status Ping(grpc::ServerContext*, const pb::PingRequest*, pb::PingReply* reply) override {
    reply->set_node_id(id_);
    return grpc::Status::OK;
  }

 private:
  std::string id_;
};

// Send applies only the node-to-node rule.
class TestTransport final : public pb::Transport::Service {
 public:
  grpc::Status Send(grpc::ServerContext* context, const pb::TensorMessage* request, pb::Empty*) override {
    auto peer = check_peer_is(*context, request->from_node_id());
    return peer.ok() ? grpc::Status::OK : to_grpc(peer.error());
  }
};

Result<std::string> ping(const std::string& address, const std::string& expected, const NodeKey* identity = nullptr,
                         std::chrono::milliseconds timeout = 5000ms) {
  auto stub = pb::Node::NewStub(make_channel(address, expected, identity));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  pb::PingRequest request;
  pb::PingReply reply;
  auto status = stub->Ping(&context, request, &reply);
  if (!status.ok()) return from_grpc(status, "ping " + address);
  return reply.node_id();
}

grpc::Status plaintext_ping(const std::string& address) {
  auto stub = pb::Node::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 5s);
  pb::PingRequest request;
  pb::PingReply reply;
  return stub->Ping(&context, request, &reply);
}

struct InProcessNode {
  NodeKey key = NodeKey::generate();
  TestNode service{key.node_id()};
  TestTransport transport;
  RunningServer server = std::move(start_server("127.0.0.1:0", {&service, &transport}, key).value());
  std::string address = "127.0.0.1:" + std::to_string(server.port);
  ~InProcessNode() { server.server->Shutdown(std::chrono::system_clock::now()); }
};

TEST(Tls, ChannelReachesOnlyTheNodeItExpects) {
  InProcessNode node;
  auto ok = ping(node.address, node.key.node_id());
  ASSERT_TRUE(ok.ok()) << ok.message();
  EXPECT_EQ(*ok, node.key.node_id());
  auto any = ping(node.address, "");
  ASSERT_TRUE(any.ok()) << any.message();

  NodeKey meant = NodeKey::generate();
  auto wrong = ping(node.address, meant.node_id());
  ASSERT_FALSE(wrong.ok());
  const std::string& message = wrong.message();
  EXPECT_NE(message.find("expected node " + prefix(meant.node_id())), std::string::npos) << message;
  EXPECT_NE(message.find("its certificate is for node " + prefix(node.key.node_id())), std::string::npos) << message;
  EXPECT_NE(message.find(node.address), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  EXPECT_EQ(wrong.error().kind, ErrorKind::unavailable);
}

TEST(Tls, SenderMustBeTheNodeItsCertificateProves) {
  InProcessNode node;
  NodeKey sender = NodeKey::generate(), someone = NodeKey::generate();
  auto send = [&](const NodeKey* identity, const std::string& claimed) {
    auto stub = pb::Transport::NewStub(make_channel(node.address, node.key.node_id(), identity));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 5s);
    pb::TensorMessage message;
    message.set_from_node_id(claimed);
    pb::Empty reply;
    return stub->Send(&context, message, &reply);
  };
  EXPECT_TRUE(send(&sender, sender.node_id()).ok());
  auto spoofed = send(&sender, someone.node_id());
  EXPECT_EQ(spoofed.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(spoofed.error_message().find(prefix(someone.node_id())), std::string::npos) << spoofed.error_message();
  EXPECT_NE(spoofed.error_message().find(prefix(sender.node_id())), std::string::npos) << spoofed.error_message();
  auto anonymous = send(nullptr, sender.node_id());
  EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_NE(anonymous.error_message().find("no node certificate"), std::string::npos) << anonymous.error_message();
}

TEST(Tls, PlaintextCallerIsRefused) {
  InProcessNode node;
  auto status = plaintext_ping(node.address);
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
}

// A real `solvernet node` process, its key made here first so the test knows its id.
struct NodeProcess {
  std::filesystem::path dir;
  std::string id;
  std::string address;
  ChildProcess child;
};

class TlsNodeProcess : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* bin = std::getenv("SOLVERNET_BIN");
    if (!bin || !*bin) GTEST_SKIP() << "SOLVERNET_BIN is not set (ctest sets it)";
    ASSERT_TRUE(std::filesystem::exists(bin)) << "SOLVERNET_BIN " << bin << " does not exist: build target solvernet";
    node_.dir = std::filesystem::temp_directory_path() / ("sn-tls-test-" + std::to_string(::getpid()));
    std::filesystem::remove_all(node_.dir);
    auto key = NodeKey::load_or_create(node_.dir / "data");
    ASSERT_TRUE(key.ok()) << key.message();
    node_.id = key->node_id();
    auto port = free_loopback_port(SOCK_STREAM);
    ASSERT_TRUE(port.ok()) << port.message();
    node_.address = "127.0.0.1:" + std::to_string(*port);
    SpawnOptions spawn;
    spawn.stdout_path = node_.dir / "node.out";
    spawn.stderr_path = node_.dir / "node.err";
    auto child = ChildProcess::spawn({bin, "node", "--data", (node_.dir / "data").string(), "--listen", node_.address,
                                      "--dht-port", "0", "--log-level", "warn"},
                                     spawn);
    ASSERT_TRUE(child.ok()) << child.message();
    node_.child = std::move(child).value();
    // Up when it answers over TLS as itself.
    for (int i = 0; i < 200 && !ping(node_.address, node_.id, nullptr, 500ms).ok(); ++i) {
      ASSERT_TRUE(node_.child.running()) << "node exited: " << read_file(node_.dir / "node.err").value_or("");
      std::this_thread::sleep_for(100ms);
    }
    ASSERT_TRUE(ping(node_.address, node_.id).ok()) << "node never answered";
  }
  void TearDown() override {
    node_.child.terminate();
    std::filesystem::remove_all(node_.dir);
  }
  NodeProcess node_;
};

TEST_F(TlsNodeProcess, WrongNodeIdPlaintextAndPythonClient) {
  // A channel that meant another node is refused, and the error names both.
  NodeKey meant = NodeKey::generate();
  auto wrong = ping(node_.address, meant.node_id());
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.message().find("expected node " + prefix(meant.node_id()) + "… at " + node_.address +
                                 ", its certificate is for node " + prefix(node_.id)),
            std::string::npos)
      << wrong.message();

  // Plaintext gets nothing from a TLS node.
  auto plain = plaintext_ping(node_.address);
  EXPECT_EQ(plain.error_code(), grpc::StatusCode::UNAVAILABLE) << plain.error_message();

  // --insecure says so loudly, and a TLS caller is told why it cannot talk to it.
  {
    auto key = NodeKey::load_or_create(node_.dir / "insecure");
    ASSERT_TRUE(key.ok()) << key.message();
    auto port = free_loopback_port(SOCK_STREAM);
    ASSERT_TRUE(port.ok()) << port.message();
    std::string address = "127.0.0.1:" + std::to_string(*port);
    SpawnOptions spawn;
    spawn.stdout_path = spawn.stderr_path = node_.dir / "insecure.log";
    auto insecure = ChildProcess::spawn({std::getenv("SOLVERNET_BIN"), "node", "--data", (node_.dir / "insecure").string(),
                                         "--listen", address, "--dht-port", "0", "--insecure"},
                                        spawn);
    ASSERT_TRUE(insecure.ok()) << insecure.message();
    for (int i = 0; i < 200 && !plaintext_ping(address).ok(); ++i) {
      ASSERT_TRUE(insecure->running()) << read_file(node_.dir / "insecure.log").value_or("");
      std::this_thread::sleep_for(100ms);
    }
    auto refused = ping(address, key->node_id());
    insecure->terminate();
    ASSERT_FALSE(refused.ok());
    EXPECT_NE(refused.message().find("does not speak TLS"), std::string::npos) << refused.message();
    EXPECT_NE(read_file(node_.dir / "insecure.log").value_or("").find("WARNING: --insecure"), std::string::npos);
  }

  // Another language, TLS and Ed25519 only: Python's grpcio.
  if (std::system("/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null") != 0)
    GTEST_SKIP() << "python3-grpcio is not installed (scripts/install-deps installs it)";
  const char* source = std::getenv("SOLVERNET_SOURCE_DIR");
  ASSERT_TRUE(source) << "SOLVERNET_SOURCE_DIR is not set (ctest sets it)";
  std::filesystem::path src = source, generated = node_.dir / "py";
  std::filesystem::create_directories(generated);
  auto protoc = run_command({"protoc", "-I", (src / "proto").string(), "--python_out=" + generated.string(),
                             (src / "proto/solvernet.proto").string()});
  ASSERT_TRUE(protoc.ok()) << protoc.message();
  auto python = [&](const std::string& expected, bool plaintext) {
    std::vector<std::string> argv = {"/usr/bin/python3", (src / "tests/net/tls_client.py").string(), generated.string(),
                                     node_.address, expected};
    if (plaintext) argv.push_back("--plaintext");
    SpawnOptions spawn;
    spawn.stdout_path = node_.dir / "py.out";
    spawn.stderr_path = node_.dir / "py.err";
    auto child = ChildProcess::spawn(argv, spawn);
    EXPECT_TRUE(child.ok()) << child.message();
    int status = child.ok() ? child->wait() : -1;
    std::string out = read_file(node_.dir / "py.out").value_or("");
    nlohmann::json json = nlohmann::json::parse(out, nullptr, false);
    return std::make_pair(status, json.is_discarded() ? nlohmann::json{{"raw", out + read_file(node_.dir / "py.err").value_or("")}} : json);
  };
  auto [status, reply] = python(node_.id, false);
  ASSERT_EQ(status, 0) << reply.dump();
  EXPECT_EQ(reply["ping_node_id"], node_.id);
  EXPECT_EQ(reply["info_node_id"], node_.id);
  auto [wrong_status, wrong_reply] = python(meant.node_id(), false);
  EXPECT_EQ(wrong_status, 3) << wrong_reply.dump();
  auto [plain_status, plain_reply] = python(node_.id, true);
  EXPECT_EQ(plain_status, 4) << plain_reply.dump();
}

}  // namespace
}  // namespace sn::net
