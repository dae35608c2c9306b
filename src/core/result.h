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

struct Error {
  std::string message;
  int exit_code = 1;  // what a CLI should exit with if this error ends the program
};

template <class... Args>
Error make_error(fmt::format_string<Args...> format, Args&&... args) {
  return Error{fmt::format(format, std::forward<Args>(args)...), 1};
}

template <class... Args>
Error input_error(fmt::format_string<Args...> format, Args&&... args) {
  return Error{fmt::format(format, std::forward<Args>(args)...), kExitBadInput};
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
