// Child processes started with posix_spawn (gRPC does not survive fork), each
// in the caller's process group so one signal reaches them all.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/result.h"

namespace sn {

struct SpawnOptions {
  std::map<std::string, std::string> extra_env;     // added to (or replacing in) the environment
  std::filesystem::path stdout_path;                // empty: inherit
  std::filesystem::path stderr_path;                // empty: inherit; may equal stdout_path
  bool new_process_group = false;
};

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();  // terminates the child if still running

  static Result<ChildProcess> spawn(const std::vector<std::string>& argv,
                                    const SpawnOptions& options = {});

  pid_t pid() const { return pid_; }
  bool running();
  // Waits up to TIMEOUT; returns the exit status (128+signal if killed), or nothing on timeout.
  std::optional<int> wait_for(std::chrono::milliseconds timeout);
  int wait();
  // SIGTERM, then SIGKILL after GRACE if still alive; always reaps.
  void terminate(std::chrono::milliseconds grace = std::chrono::milliseconds(3000));
  void kill_now();

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_status_;
};

// Runs ARGV to completion, capturing stdout+stderr; error if it exits non-zero.
Result<std::string> run_command(const std::vector<std::string>& argv);

// A port on 127.0.0.1 that is free now (bind to port 0, read it, close), for a
// child process to listen on; SOCKET_TYPE is SOCK_STREAM (TCP) or SOCK_DGRAM (UDP).
Result<uint16_t> free_loopback_port(int socket_type);

// Path of the running executable (/proc/self/exe).
std::filesystem::path self_executable();

// Exits this process when PARENT dies (Linux PR_SET_PDEATHSIG), so children of a
// killed devnet never linger.
void die_with_parent(pid_t parent);

}  // namespace sn
