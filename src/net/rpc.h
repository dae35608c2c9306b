// gRPC plumbing shared by every process: channels and servers with the
// message-size limits tensors need, secured by TLS with node certificates
// (net/tls.h), and status conversion.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "core/keys.h"
#include "core/result.h"
#include "net/tls.h"

namespace sn::net {

// Largest message on the wire (a 64 MB tensor plus headers).
inline constexpr int kMaxMessageBytes = 256 << 20;

// A channel to the node EXPECTED_NODE_ID at ADDRESS (TLS; net/tls.h). Empty
// EXPECTED_NODE_ID accepts any node certificate. IDENTITY: this node's key, to
// present its certificate (node to node); null for clients. Never fails here:
// a refused handshake fails the first call (see from_grpc).
std::shared_ptr<grpc::Channel> make_channel(const std::string& address, const std::string& expected_node_id,
                                            const NodeKey* identity = nullptr);

// Starts SERVICE on LISTEN ("host:port"; port 0 picks a free one), presenting
// IDENTITY's certificate (TLS; plaintext only after use_insecure()). Fails
// with a one-line error if the address is malformed or the port is in use.
struct RunningServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};
Result<RunningServer> start_server(const std::string& listen, grpc::Service* service, const NodeKey& identity);
// The same with several services on one server (the node runtime).
Result<RunningServer> start_server(const std::string& listen, const std::vector<grpc::Service*>& services,
                                   const NodeKey& identity);

// Splits "host:port"; error names the bad value.
Result<std::pair<std::string, int>> split_host_port(const std::string& address);

// The gRPC status code of an error kind, and back (docs/wire.md, "Errors").
grpc::StatusCode grpc_code_of(ErrorKind kind);
ErrorKind error_kind_of(grpc::StatusCode code);

// An error from a failed call; its kind follows the status code. A TLS
// refusal (wrong node at the address, not a node certificate) comes back as
// UNAVAILABLE wrapped in gRPC's connection text; it is cut down to its one
// line, kind unavailable: the node meant is not at that address, which does
// not prove the one that is there misbehaves.
inline Error from_grpc(const grpc::Status& status, const std::string& what) {
  if (auto at = status.error_message().find(kTlsRefusal); at != std::string::npos)
    return Error{fmt::format("{}: {}", what, status.error_message().substr(at)), 1, ErrorKind::unavailable};
  // OpenSSL's words for a peer that answered a TLS hello in plaintext.
  if (status.error_message().find("wrong version number") != std::string::npos)
    return Error{fmt::format("{}: the peer does not speak TLS (is it running with --insecure?)", what), 1,
                 ErrorKind::unavailable};
  // What a plaintext caller sees from a TLS server.
  if (insecure() && status.error_message().find("Socket closed") != std::string::npos)
    return Error{fmt::format("{}: the peer closed the connection (it may require TLS: run without --insecure)", what), 1,
                 ErrorKind::unavailable};
  ErrorKind kind = error_kind_of(status.error_code());
  return Error{fmt::format("{}: {}", what, status.error_message().empty()
                                               ? std::string("gRPC code ") + std::to_string(status.error_code())
                                               : status.error_message()),
               kind == ErrorKind::invalid_input ? kExitBadInput : 1, kind};
}

// The status a handler returns for ERROR: its code follows the error's kind.
inline grpc::Status to_grpc(const Error& error) {
  return grpc::Status(grpc_code_of(error.kind), error.message, error.details);
}
inline grpc::Status to_grpc(const Error& error, grpc::StatusCode code) { return grpc::Status(code, error.message); }

}  // namespace sn::net
