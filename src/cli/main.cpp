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

}  // namespace sn::cli

int main(int argc, char** argv) {
  sn::pin_blas_kernels();
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
