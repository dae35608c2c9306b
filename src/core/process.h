// Child processes, tied to their parent: started with vfork+exec (gRPC does
// not survive fork) and, by default, killed by the kernel when the thread that
// started them dies (PR_SET_PDEATHSIG), so a SIGKILLed parent leaves nothing
// running. Also: the process-wide stop request that SIGINT/SIGTERM set, the
// data-dir lock, and who listens on a local port.
#pragma once

#include <sys/types.h>

#include <atomic>
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
  // The child leads a process group of its own; terminate() and the destructor
  // then signal the whole group (a wrapper script and what it started).
  bool new_process_group = false;
  // Signal the kernel sends the child when the spawning *thread* exits (0: none).
  // SIGTERM lets the child clean up. Spawn from a thread that outlives the child
  // (the main thread, or one that waits for it).
  int parent_death_signal = 15;  // SIGTERM
};

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();  // terminates the child if still running

  // ARGV[0] is looked up in PATH unless it contains a '/'. Errors: not found,
  // not executable, or exec failed (the message names errno); nothing is left running.
  static Result<ChildProcess> spawn(const std::vector<std::string>& argv,
                                    const SpawnOptions& options = {});

  pid_t pid() const { return pid_; }
  bool running();
  // Waits up to TIMEOUT; returns the exit status (128+signal if killed), or nothing on timeout.
  std::optional<int> wait_for(std::chrono::milliseconds timeout);
  int wait();
  // SIGTERM, then SIGKILL after GRACE if still alive; always reaps. With
  // new_process_group the whole group is signalled.
  void terminate(std::chrono::milliseconds grace = std::chrono::milliseconds(3000));
  void kill_now();

 private:
  void signal(int signal_number);
  pid_t pid_ = -1;
  bool group_ = false;
  std::optional<int> exit_status_;
};

// Runs ARGV to completion, capturing stdout+stderr; error if it exits non-zero.
// If a stop is requested meanwhile (stop_requested()), the child is terminated
// at once and the error has kind aborted; the caller removes what it half wrote.
Result<std::string> run_command(const std::vector<std::string>& argv);

// ---- stop requests (SIGINT / SIGTERM) ----
// Set by the CLI's signal handlers (cli/signals.h); long work polls it.
const std::atomic<bool>& stop_flag();
bool stop_requested();
// The signal that asked this process to stop (0: none). Async-signal-safe.
int stop_signal();
void note_stop_signal(int signal_number);

// A port on 127.0.0.1 that is free now (bind to port 0, read it, close), for a
// child process to listen on; SOCKET_TYPE is SOCK_STREAM (TCP) or SOCK_DGRAM (UDP).
Result<uint16_t> free_loopback_port(int socket_type);

// The pid of a process of this user that holds a listening TCP socket on PORT
// (any local address), found through /proc; nothing if none is listening or
// the owner is not visible to us.
std::optional<pid_t> tcp_listener_pid(uint16_t port);
// Whether some process listens on TCP PORT (even one we cannot see).
bool tcp_port_listening(uint16_t port);
// "pid 123 (anvil)": the pid and its command name, for error messages.
std::string describe_pid(pid_t pid);
// Whether PID is CHILD itself or in the process group CHILD leads.
bool is_same_or_group_member(pid_t pid, pid_t child);

// Path of the running executable (/proc/self/exe).
std::filesystem::path self_executable();

// Exits this process when PARENT dies (Linux PR_SET_PDEATHSIG, SIGTERM), so
// children of a killed devnet never linger. Exits at once if PARENT is already gone.
void die_with_parent(pid_t parent);
// Whether PARENT has died or is dying: this process was handed to another, or
// PARENT's main thread is a zombie (the parent-death signal comes when the
// thread that started us exits, while the rest of a killed parent may still
// be going down). Tells a SIGKILLed parent's death signal from a stop request.
bool parent_gone(pid_t parent);

// An exclusive lock on DIR (flock on DIR/lock, which holds the owner's pid),
// held until the object is destroyed or the process dies. The directory is
// created if missing.
class DirLock {
 public:
  DirLock() = default;
  DirLock(DirLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  DirLock& operator=(DirLock&& other) noexcept;
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  ~DirLock();

  // Error (invalid_input, exit 2) naming the pid that holds the lock if another
  // process has it; internal if DIR cannot be created or locked at all.
  static Result<DirLock> acquire(const std::filesystem::path& dir, const std::string& what = "data dir");

 private:
  int fd_ = -1;
};

// Waits up to TIMEOUT for whoever holds DIR's lock to release it (or die);
// true if it is free now (the lock is not kept).
bool wait_until_unlocked(const std::filesystem::path& dir, std::chrono::milliseconds timeout);

}  // namespace sn
