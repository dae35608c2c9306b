#include <grpc/support/log.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <new>
#include <string>

#include "cli/command.h"
#include "cli/signals.h"
#include "core/kernels.h"
#include "core/log.h"
#include "core/process.h"
#include "net/tls.h"

namespace sn::cli {

std::vector<RegisteredCommand>& registered_commands() {
  static std::vector<RegisteredCommand> commands;
  return commands;
}

CommandRegistration::CommandRegistration(std::string name, std::string description,
                                         CommandSetup setup) {
  registered_commands().push_back({std::move(name), std::move(description), std::move(setup)});
}

void add_insecure_flag(CLI::App& app) {
  app.add_flag_callback("--insecure", [] { sn::net::use_insecure(); },
                        "DEBUGGING ONLY: plaintext, unauthenticated gRPC (no TLS, no node-id checks)");
}

int fail(const std::string& command, const std::string& message, int code) {
  std::cerr << "solvernet " << command << ": " << message << std::endl;
  return code;
}

// gRPC's own log lines (`E1201 … tls_security_connector.cc:382] …` when a
// frozen node is pinged) say in gRPC's words what our errors already say:
// shown at --log-level debug only, but for a failed assertion (the process
// aborts next). GRPC_VERBOSITY set leaves gRPC's logging as is.
static void grpc_log_when_verbose(gpr_log_func_args* args) {
  if (sn::verbose_logging() || std::strncmp(args->message, "assertion failed", 16) == 0)
    std::fprintf(stderr, "grpc %s:%d] %s\n", args->file, args->line, args->message);
}

// Set across pin_blas_kernels' re-execution of this program, while the stop
// signals are blocked (see main()).
constexpr const char* kStopsBlockedForExec = "SOLVERNET_STOPS_BLOCKED_FOR_EXEC";

// Runs before any shared library's initializers (LibTorch's take seconds on
// a loaded machine, twice: pin_blas_kernels starts the program again): a
// Ctrl-C in that time is noted for the command to report, rather than end
// the process with no word.
static struct sigaction inherited_sigint, inherited_sigterm;
static void note_stop_signals_from_the_start(int, char**, char** env) {
  struct sigaction action {};
  action.sa_handler = [](int signal_number) { sn::note_stop_signal(signal_number); };
  sigemptyset(&action.sa_mask);
  // A signal inherited as ignored (a background job of a script) stays ignored.
  sigaction(SIGINT, nullptr, &inherited_sigint);
  sigaction(SIGTERM, nullptr, &inherited_sigterm);
  if (inherited_sigint.sa_handler != SIG_IGN) sigaction(SIGINT, &action, nullptr);
  if (inherited_sigterm.sa_handler != SIG_IGN) sigaction(SIGTERM, &action, nullptr);
  // Started again by main(): the stop signals it blocked (one may be pending) come here now.
  // Plain C: libstdc++'s own initializers have not run yet.
  const size_t length = std::strlen(kStopsBlockedForExec);
  for (char** e = env; e && *e; ++e)
    if (std::strncmp(*e, kStopsBlockedForExec, length) == 0 && (*e)[length] == '=') {
      sigset_t stops;
      sigemptyset(&stops);
      sigaddset(&stops, SIGINT);
      sigaddset(&stops, SIGTERM);
      sigprocmask(SIG_UNBLOCK, &stops, nullptr);
    }
}
__attribute__((section(".preinit_array"), used)) static void (*const note_stop_signals_early)(int, char**, char**) =
    note_stop_signals_from_the_start;

}  // namespace sn::cli

int main(int argc, char** argv) {
  // The inherited actions again, until a command installs its own handling
  // (cli/signals.h). pin_blas_kernels may start this program again: the stop
  // signals stay blocked across that exec, and one that came is left pending
  // for the new start's handler. A stop is said once the command is known.
  sigset_t stops;
  sigemptyset(&stops);
  sigaddset(&stops, SIGINT);
  sigaddset(&stops, SIGTERM);
  sigprocmask(SIG_BLOCK, &stops, nullptr);
  sigaction(SIGINT, &sn::cli::inherited_sigint, nullptr);
  sigaction(SIGTERM, &sn::cli::inherited_sigterm, nullptr);
  const bool stopped = sn::stop_requested();
  if (stopped) raise(sn::stop_signal());
  setenv(sn::cli::kStopsBlockedForExec, "1", 1);
  sn::pin_blas_kernels();
  unsetenv(sn::cli::kStopsBlockedForExec);
  if (stopped) sn::cli::note_stop_signals_from_the_start(argc, argv, nullptr);
  sigprocmask(SIG_UNBLOCK, &stops, nullptr);
  if (!std::getenv("GRPC_VERBOSITY")) gpr_set_log_function(sn::cli::grpc_log_when_verbose);
  // A peer that vanishes mid-write must surface as an error, not kill us.
  signal(SIGPIPE, SIG_IGN);
  CLI::App app{"solvernet: a decentralized compute network for AI (train, plan, serve, settle)",
               "solvernet"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "solvernet 0.1.0");
  auto& commands = sn::cli::registered_commands();
  std::sort(commands.begin(), commands.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  std::vector<std::pair<CLI::App*, std::function<int()>>> runners;
  for (auto& command : commands) {
    CLI::App* sub = app.add_subcommand(command.name, command.description);
    runners.emplace_back(sub, command.setup(*sub));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    // Bad flags are bad input like any other: one line, exit 2.
    std::cerr << "solvernet: " << e.what() << " (see --help)" << std::endl;
    return 2;
  }
  for (auto& [sub, run] : runners)
    if (sub->parsed()) {
      if (sn::stop_requested()) {
        sn::cli::fail(sub->get_name(), "interrupted as it started; nothing was done");
        return sn::cli::stop_exit_code();
      }
      // Errors are values; these catch what escaped a library anyway. A user sees one
      // line: LibTorch's what() carries a stack trace after its first line.
      int code = 1;
      try {
        code = run();
      } catch (const std::bad_alloc&) {
        code = sn::cli::fail(sub->get_name(), "out of memory (an input is too large for this machine?)", 1);
      } catch (const std::exception& e) {
        std::string message = e.what();
        message = message.substr(0, message.find('\n'));
        code = sn::cli::fail(sub->get_name(), "internal error: " + (message.empty() ? "unknown" : message), 1);
      } catch (...) {
        code = sn::cli::fail(sub->get_name(), "internal error: unknown exception", 1);
      }
      // Stopped by SIGINT/SIGTERM: exit as the signal would have (130, 143),
      // whatever the command made of the interruption.
      if (int stopped = sn::cli::stop_exit_code()) return stopped;
      return code;
    }
  return 2;
}
