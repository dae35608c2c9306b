// Subcommands register themselves: each cmd_*.cpp defines one static
// CommandRegistration, so adding a command touches no shared file.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace sn::cli {

// SETUP adds the subcommand's options to APP and returns the function that runs
// it (after parsing), which returns the process exit code.
using CommandSetup = std::function<std::function<int()>(CLI::App& app)>;

struct CommandRegistration {
  CommandRegistration(std::string name, std::string description, CommandSetup setup);
};

struct RegisteredCommand {
  std::string name;
  std::string description;
  CommandSetup setup;
};

std::vector<RegisteredCommand>& registered_commands();

// Adds --insecure to a command that opens gRPC channels or servers: when given,
// net::use_insecure() runs while parsing, before the command does anything.
void add_insecure_flag(CLI::App& app);

// Prints "solvernet <command>: <message>" to stderr (one line) and returns CODE.
int fail(const std::string& command, const std::string& message, int code = 1);

}  // namespace sn::cli
