// Errors are values: every call that can fail returns Result<T>, whose message
// names what failed and where, in words a user can act on.
#pragma once

#include <fmt/format.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>

namespace sn {

// Exit code for bad user input (malformed files, bad flags), per the CLI contract.
inline constexpr int kExitBadInput = 2;

// What kind of failure an error is: callers decide from it whether to retry
// (unavailable, timeout, resource_exhausted), replace the peer (unavailable,
// timeout), blame it (bad_peer) or report to the user (invalid_input,
// permission_denied, not_found, diverged). Mapped to and from gRPC status codes in
// net/rpc.h (docs/wire.md lists the mapping).
enum class ErrorKind {
  internal = 0,        // a bug or an unexpected state of this process
  invalid_input,       // the caller's input is malformed or out of range
  not_found,           // a named thing (job, file, tensor) does not exist
  unavailable,         // a peer or service could not be reached; retrying may help
  timeout,             // a deadline passed before the work finished
  bad_peer,            // a peer answered but broke the protocol (bad signature, wrong shape, lies)
  permission_denied,   // not allowed: unsigned, foreign key, replayed or stale request
  resource_exhausted,  // memory, inbox or capacity limit reached
  aborted,             // the work was cancelled (job aborted, user interrupt)
  diverged,            // training blew up (a loss, activation or gradient not finite or out of range): the
                       // job's hyper-parameters, not a node, are at fault
};

const char* error_kind_name(ErrorKind kind);

struct Error {
  std::string message;
  int exit_code = 1;  // what a CLI should exit with if this error ends the program
  ErrorKind kind = ErrorKind::internal;
  // A typed cause for the wire (a serialized proto; empty: none), which
  // net::to_grpc sends as the status's details: the peer acts on it.
  std::string details;
};

template <class... Args>
Error make_error(fmt::format_string<Args...> format, Args&&... args) {
  return Error{fmt::format(format, std::forward<Args>(args)...), 1, ErrorKind::internal};
}

// An error of a given kind (exit code 2 for invalid_input, 1 otherwise).
template <class... Args>
Error kind_error(ErrorKind kind, fmt::format_string<Args...> format, Args&&... args) {
  return Error{fmt::format(format, std::forward<Args>(args)...),
               kind == ErrorKind::invalid_input ? kExitBadInput : 1, kind};
}

template <class... Args>
Error input_error(fmt::format_string<Args...> format, Args&&... args) {
  return Error{fmt::format(format, std::forward<Args>(args)...), kExitBadInput, ErrorKind::invalid_input};
}

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : state_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : state_(std::move(error)) {}  // NOLINT

  bool ok() const { return state_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { check(); return std::get<0>(state_); }
  const T& value() const& { check(); return std::get<0>(state_); }
  T&& value() && { check(); return std::get<0>(std::move(state_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  T value_or(T fallback) const& { return ok() ? std::get<0>(state_) : std::move(fallback); }

  const Error& error() const { return std::get<1>(state_); }
  const std::string& message() const { return error().message; }

 private:
  void check() const {
    if (!ok()) throw std::logic_error("Result::value() on error: " + std::get<1>(state_).message);
  }
  std::variant<T, Error> state_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)) {}  // NOLINT

  bool ok() const { return !error_.has_value(); }
  explicit operator bool() const { return ok(); }
  const Error& error() const { return *error_; }
  const std::string& message() const { return error_->message; }

 private:
  std::optional<Error> error_;
};

using Status = Result<void>;

inline Status ok_status() { return Status(); }

inline const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::internal: return "internal";
    case ErrorKind::invalid_input: return "invalid_input";
    case ErrorKind::not_found: return "not_found";
    case ErrorKind::unavailable: return "unavailable";
    case ErrorKind::timeout: return "timeout";
    case ErrorKind::bad_peer: return "bad_peer";
    case ErrorKind::permission_denied: return "permission_denied";
    case ErrorKind::resource_exhausted: return "resource_exhausted";
    case ErrorKind::aborted: return "aborted";
    case ErrorKind::diverged: return "diverged";
  }
  return "internal";
}

}  // namespace sn

// Propagates an error from an expression returning Result<...>.
#define SN_TRY(expr)                                  \
  do {                                                \
    auto sn_try_result_ = (expr);                     \
    if (!sn_try_result_.ok()) return sn_try_result_.error(); \
  } while (0)

#define SN_CONCAT_INNER(a, b) a##b
#define SN_CONCAT(a, b) SN_CONCAT_INNER(a, b)
// SN_ASSIGN(auto x, expr): x = value of expr, or return its error.
#define SN_ASSIGN(decl, expr)                                      \
  auto SN_CONCAT(sn_assign_, __LINE__) = (expr);                   \
  if (!SN_CONCAT(sn_assign_, __LINE__).ok())                       \
    return SN_CONCAT(sn_assign_, __LINE__).error();                \
  decl = std::move(SN_CONCAT(sn_assign_, __LINE__)).value()
