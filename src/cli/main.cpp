#include <signal.h>

#include <algorithm>
#include <iostream>

#include "cli/command.h"

namespace sn::cli {

std::vector<RegisteredCommand>& registered_commands() {
  static std::vector<RegisteredCommand> commands;
  return commands;
}

CommandRegistration::CommandRegistration(std::string name, std::string description,
                                         CommandSetup setup) {
  registered_commands().push_back({std::move(name), std::move(description), std::move(setup)});
}

int fail(const std::string& command, const std::string& message, int code) {
  std::cerr << "solvernet " << command << ": " << message << std::endl;
  return code;
}

}  // namespace sn::cli

int main(int argc, char** argv) {
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
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  for (auto& [sub, run] : runners)
    if (sub->parsed()) {
      try {
        return run();
      } catch (const std::exception& e) {
        return sn::cli::fail(sub->get_name(), e.what(), 1);
      }
    }
  return 2;
}
