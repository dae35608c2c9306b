// Transport security of every gRPC link: TLS 1.3 through gRPC's own TLS
// credentials, each node proving its node id with its certificate
// (core/cert.h). docs/security.md says what this protects against.
//
// - A node's server presents its certificate and asks, without requiring, for
//   the caller's: nodes present theirs (mutual TLS), clients present none and
//   prove who they are by signing requests.
// - A channel checks that the server's certificate is for the node id it meant
//   to reach (as announced in the DHT) before any request is sent.
// - A plaintext caller cannot talk to a TLS server at all.
//
// The one process-wide switch is use_insecure(): every command calls it once
// at start when given --insecure, so no call site threads a mode through.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "core/keys.h"
#include "core/result.h"

namespace sn::net {

// Plaintext, unauthenticated links for this whole process, for debugging:
// prints a loud warning on stderr (once). Call before the first channel or
// server; it cannot be undone. Peers must be insecure too: TLS and plaintext
// ends cannot talk to each other.
void use_insecure();
bool insecure();

// Credentials for a channel to ADDRESS. A non-empty EXPECTED_NODE_ID is
// checked against the server's certificate; empty accepts any valid node
// certificate (e.g. a first contact by address). IDENTITY, if given, is
// presented as this end's certificate (node to node). A refused handshake
// fails the call with UNAVAILABLE, and from_grpc() (net/rpc.h) turns it into
// one line: "expected node ab12… at 127.0.0.1:7001, its certificate is for
// node cd34…".
std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const std::string& address,
                                                              const std::string& expected_node_id,
                                                              const NodeKey* identity);

// Server credentials presenting IDENTITY's certificate. Fails (internal) only
// if the certificate cannot be made.
Result<std::shared_ptr<grpc::ServerCredentials>> server_credentials(const NodeKey& identity);

// The node id proven by the caller's TLS certificate, or "" if the caller
// presented none (a client) or the process is insecure.
std::string peer_node_id(const grpc::ServerContext& context);

// OK if the caller proved CLAIMED_NODE_ID with its certificate (always OK when
// insecure); otherwise permission_denied naming both ids. For handlers of
// node-to-node messages, whose sender field must match the link.
Status check_peer_is(const grpc::ServerContext& context, const std::string& claimed_node_id);

// The marker that starts a refused handshake's message, for from_grpc().
inline constexpr const char* kTlsRefusal = "TLS refused: ";

}  // namespace sn::net
