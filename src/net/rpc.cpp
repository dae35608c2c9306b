#include "net/rpc.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/cert.h"

namespace sn::net {

grpc::StatusCode grpc_code_of(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::internal: return grpc::StatusCode::INTERNAL;
    case ErrorKind::invalid_input: return grpc::StatusCode::INVALID_ARGUMENT;
    case ErrorKind::not_found: return grpc::StatusCode::NOT_FOUND;
    case ErrorKind::unavailable: return grpc::StatusCode::UNAVAILABLE;
    case ErrorKind::timeout: return grpc::StatusCode::DEADLINE_EXCEEDED;
    case ErrorKind::bad_peer: return grpc::StatusCode::DATA_LOSS;
    case ErrorKind::permission_denied: return grpc::StatusCode::PERMISSION_DENIED;
    case ErrorKind::resource_exhausted: return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case ErrorKind::aborted: return grpc::StatusCode::ABORTED;
    case ErrorKind::diverged: return grpc::StatusCode::OUT_OF_RANGE;
  }
  return grpc::StatusCode::INTERNAL;
}

ErrorKind error_kind_of(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION: return ErrorKind::invalid_input;
    case grpc::StatusCode::OUT_OF_RANGE: return ErrorKind::diverged;
    case grpc::StatusCode::NOT_FOUND: return ErrorKind::not_found;
    case grpc::StatusCode::UNAVAILABLE: return ErrorKind::unavailable;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return ErrorKind::timeout;
    case grpc::StatusCode::DATA_LOSS: return ErrorKind::bad_peer;
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED: return ErrorKind::permission_denied;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return ErrorKind::resource_exhausted;
    case grpc::StatusCode::ABORTED:
    case grpc::StatusCode::CANCELLED: return ErrorKind::aborted;
    default: return ErrorKind::internal;
  }
}

std::shared_ptr<grpc::Channel> make_channel(const std::string& address, const std::string& expected_node_id,
                                            const NodeKey* identity) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  // Fail fast on a dead peer rather than waiting for reconnect back-off.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  // Every node certificate names kNodeCertificateName (core/cert.h): send it as
  // SNI so the server finds its certificate by name, whatever the address.
  if (!insecure()) args.SetSslTargetNameOverride(kNodeCertificateName);
  return grpc::CreateCustomChannel(address, channel_credentials(address, expected_node_id, identity), args);
}

Result<std::pair<std::string, int>> split_host_port(const std::string& address) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0)
    return input_error("bad address \"{}\": expected HOST:PORT", address);
  std::string host = address.substr(0, colon);
  std::string port_text = address.substr(colon + 1);
  try {
    size_t used = 0;
    int port = std::stoi(port_text, &used);
    if (used != port_text.size() || port < 0 || port > 65535) throw std::out_of_range("port");
    return std::make_pair(host, port);
  } catch (const std::exception&) {
    return input_error("bad address \"{}\": port must be a number in 0..65535", address);
  }
}

// gRPC binds with SO_REUSEPORT, so a taken port can look free to it; check
// with a plain socket first so "port in use" is reported as such.
static bool tcp_port_in_use(int port) {
  if (port == 0) return false;
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  // As gRPC binds its listener (SO_REUSEADDR): a port held only by a killed
  // node's connections in TIME-WAIT is free, and a node restarted on its
  // address at once must not be refused for ~60 s.
  const int reuse = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof(reuse));
  bool in_use = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0;
  ::close(fd);
  return in_use;
}

Result<RunningServer> start_server(const std::string& listen, grpc::Service* service, const NodeKey& identity) {
  return start_server(listen, std::vector<grpc::Service*>{service}, identity);
}

Result<RunningServer> start_server(const std::string& listen, const std::vector<grpc::Service*>& services,
                                   const NodeKey& identity) {
  SN_ASSIGN(auto host_port, split_host_port(listen));
  if (tcp_port_in_use(host_port.second))
    return input_error("cannot listen on {}: port {} is in use", listen, host_port.second);
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  RunningServer running;
  SN_ASSIGN(auto credentials, server_credentials(identity));
  builder.AddListeningPort(listen, credentials, &running.port);
  for (auto* service : services) builder.RegisterService(service);
  running.server = builder.BuildAndStart();
  if (!running.server || running.port == 0)
    return input_error("cannot listen on {}: address unavailable or port in use", listen);
  return running;
}

}  // namespace sn::net
