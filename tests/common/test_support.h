// What tests that start real solvernet processes share: where the binary and
// the sources are (ctest sets SOLVERNET_BIN and SOLVERNET_SOURCE_DIR), fresh
// scratch dirs, running a command to completion, and waiting for a log line.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/fs.h"
#include "core/process.h"

namespace sn::test {

namespace fs = std::filesystem;

inline std::string env_or_throw(const char* name) {
  const char* value = std::getenv(name);
  if (!value) throw std::runtime_error(std::string(name) + " is not set (run the test through ctest)");
  return value;
}

inline std::string solvernet_bin() { return env_or_throw("SOLVERNET_BIN"); }
inline fs::path source_path(const std::string& relative) { return fs::path(env_or_throw("SOLVERNET_SOURCE_DIR")) / relative; }

// A fresh, empty temp dir "sn-PREFIX-NAME-PID".
inline fs::path scratch(const std::string& prefix, const std::string& name) {
  auto dir = fs::temp_directory_path() / ("sn-" + prefix + "-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

struct CommandRun {
  int status = -1;  // exit status; -9 if it outlived LIMIT and was killed; -1 if it did not start
  std::string out;
  std::string err;
};

// Runs ARGV to completion (killed after LIMIT), its output in DIR/out.txt and DIR/err.txt.
inline CommandRun run_command(const std::vector<std::string>& argv, const fs::path& dir, std::chrono::seconds limit) {
  SpawnOptions options;
  options.stdout_path = dir / "out.txt";
  options.stderr_path = dir / "err.txt";
  fs::remove(options.stdout_path);
  fs::remove(options.stderr_path);
  CommandRun r;
  auto child = ChildProcess::spawn(argv, options);
  if (!child.ok()) return r;
  auto status = child->wait_for(limit);
  if (!status) child->kill_now();
  r.status = status.value_or(-9);
  r.out = read_file(options.stdout_path).value_or("");
  r.err = read_file(options.stderr_path).value_or("");
  return r;
}

// Whether FILE contains TEXT within LIMIT.
inline bool wait_for_text(const fs::path& file, const std::string& text, std::chrono::seconds limit) {
  for (auto until = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < until;) {
    if (read_file(file).value_or("").find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

}  // namespace sn::test
