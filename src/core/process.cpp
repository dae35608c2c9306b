#include "core/process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <thread>

#include "core/fs.h"

extern char** environ;

namespace sn {

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(other.pid_), group_(other.group_), exit_status_(other.exit_status_) {
  other.pid_ = -1;
}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0) terminate();
    pid_ = other.pid_;
    group_ = other.group_;
    exit_status_ = other.exit_status_;
    other.pid_ = -1;
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0) terminate();
}

namespace {

// ARGV0 as execve needs it: itself if it names a path, else the first
// executable of that name in PATH.
Result<std::string> resolve_executable(const std::string& argv0) {
  if (argv0.find('/') != std::string::npos) {
    if (::access(argv0.c_str(), X_OK) != 0)
      return kind_error(ErrorKind::not_found, "cannot start {}: {}", argv0, std::strerror(errno));
    return argv0;
  }
  const char* path_env = std::getenv("PATH");
  std::string path = path_env ? path_env : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find(':', start);
    if (end == std::string::npos) end = path.size();
    std::string dir = path.substr(start, end - start);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + argv0;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate;
    start = end + 1;
  }
  return kind_error(ErrorKind::not_found, "cannot start {}: not found in PATH", argv0);
}

}  // namespace

Result<ChildProcess> ChildProcess::spawn(const std::vector<std::string>& argv,
                                         const SpawnOptions& options) {
  if (argv.empty()) return make_error("spawn: empty command");
  SN_ASSIGN(std::string executable, resolve_executable(argv[0]));
  std::map<std::string, std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string entry(*e);
    auto eq = entry.find('=');
    if (eq != std::string::npos) env[entry.substr(0, eq)] = entry.substr(eq + 1);
  }
  for (const auto& [k, v] : options.extra_env) env[k] = v;
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp, args;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& s : argv_copy) args.push_back(s.data());
  args.push_back(nullptr);

  // Output files are opened here (close-on-exec); the child only dup2()s them.
  int out_fd = -1, err_fd = -1;
  auto close_files = [&] {
    if (out_fd >= 0) ::close(out_fd);
    if (err_fd >= 0 && err_fd != out_fd) ::close(err_fd);
  };
  if (!options.stdout_path.empty()) {
    out_fd = ::open(options.stdout_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (out_fd < 0) return make_error("cannot open {}: {}", options.stdout_path.string(), std::strerror(errno));
  }
  if (!options.stderr_path.empty()) {
    err_fd = options.stderr_path == options.stdout_path
                 ? out_fd
                 : ::open(options.stderr_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (err_fd < 0) {
      int err = errno;
      close_files();
      return make_error("cannot open {}: {}", options.stderr_path.string(), std::strerror(err));
    }
  }

  // vfork: the child borrows our memory until exec, so it only makes
  // async-signal-safe calls, and all signals stay blocked until it has reset
  // their handlers (ours must never run in it).
  const pid_t parent = ::getpid();
  const int death_signal = options.parent_death_signal;
  const bool group = options.new_process_group;
  volatile int child_errno = 0;
  sigset_t all, previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  pid_t pid = ::vfork();
  if (pid == 0) {
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; ++s) ::sigaction(s, &default_action, nullptr);
    if (group) ::setpgid(0, 0);
    if (death_signal > 0) {
      ::prctl(PR_SET_PDEATHSIG, death_signal);
      if (::getppid() != parent) ::_exit(127);  // the parent died before prctl took hold
    }
    if (out_fd >= 0) ::dup2(out_fd, 1);
    if (err_fd >= 0) ::dup2(err_fd, 2);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(executable.c_str(), args.data(), envp.data());
    child_errno = errno;
    ::_exit(127);
  }
  const int vfork_errno = errno;
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  close_files();
  if (pid < 0) return make_error("cannot start {}: {}", argv[0], std::strerror(vfork_errno));
  if (child_errno != 0) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    return make_error("cannot start {}: {}", argv[0], std::strerror(child_errno));
  }
  ChildProcess child;
  child.pid_ = pid;
  child.group_ = group;
  return child;
}

static int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

bool ChildProcess::running() {
  if (pid_ <= 0 || exit_status_) return false;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_status_ = decode_status(status);
    return false;
  }
  return r == 0;
}

std::optional<int> ChildProcess::wait_for(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return exit_status_;
}

int ChildProcess::wait() {
  if (pid_ <= 0) return exit_status_.value_or(-1);
  if (!exit_status_) {
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    exit_status_ = decode_status(status);
  }
  return *exit_status_;
}

void ChildProcess::signal(int signal_number) {
  if (pid_ <= 0) return;
  // A group outlives its leader while members remain (a wrapper's child).
  if (group_) ::kill(-pid_, signal_number);
  if (!exit_status_) ::kill(pid_, signal_number);
}

void ChildProcess::terminate(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return;
  if (running()) {
    signal(SIGTERM);
    if (!wait_for(grace)) signal(SIGKILL);
  }
  wait();
  if (group_) ::kill(-pid_, SIGKILL);  // stragglers of the group, if any
  pid_ = -1;
}

void ChildProcess::kill_now() {
  if (pid_ <= 0) return;
  if (running()) signal(SIGKILL);
  wait();
  if (group_) ::kill(-pid_, SIGKILL);
}

Result<std::string> run_command(const std::vector<std::string>& argv) {
  char tmpl[] = "/tmp/solvernet-cmd-XXXXXX";
  int fd = ::mkstemp(tmpl);
  if (fd < 0) return make_error("cannot create temp file: {}", std::strerror(errno));
  ::close(fd);
  std::filesystem::path out_path(tmpl);
  SpawnOptions options;
  options.stdout_path = out_path;
  options.stderr_path = out_path;
  auto child = ChildProcess::spawn(argv, options);
  if (!child.ok()) {
    std::filesystem::remove(out_path);
    return child.error();
  }
  int status = 0;
  while (true) {
    if (auto done = child->wait_for(std::chrono::milliseconds(50))) {
      status = *done;
      break;
    }
    if (stop_requested()) {
      child->terminate(std::chrono::milliseconds(1000));
      std::filesystem::remove(out_path);
      return kind_error(ErrorKind::aborted, "{} was interrupted", argv[0]);
    }
  }
  auto output = read_file(out_path);
  std::filesystem::remove(out_path);
  std::string text = output.ok() ? *output : "";
  if (status != 0) {
    std::string tail = text.size() > 400 ? text.substr(text.size() - 400) : text;
    while (!tail.empty() && tail.back() == '\n') tail.pop_back();
    return make_error("{} exited with status {}: {}", argv[0], status, tail);
  }
  return text;
}

Result<uint16_t> free_loopback_port(int socket_type) {
  int fd = ::socket(AF_INET, socket_type, 0);
  if (fd < 0) return make_error("socket: {}", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t length = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) != 0) {
    int err = errno;
    ::close(fd);
    return make_error("cannot reserve a port: {}", std::strerror(err));
  }
  ::close(fd);
  return static_cast<uint16_t>(ntohs(addr.sin_port));
}

std::filesystem::path self_executable() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::filesystem::path() : p;
}

void die_with_parent(pid_t parent) {
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() != parent) ::_exit(1);
}

bool parent_gone(pid_t parent) {
  if (::getppid() != parent) return true;
  std::ifstream in("/proc/" + std::to_string(parent) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = stat.rfind(')');
  if (close == std::string::npos || close + 2 >= stat.size()) return true;
  const char state = stat[close + 2];
  return state == 'Z' || state == 'X';
}

// ------------------------------------------------------------ stop requests

namespace {
std::atomic<bool> g_stop{false};
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<bool>::is_always_lock_free,
              "set from signal handlers");
}  // namespace

const std::atomic<bool>& stop_flag() { return g_stop; }
bool stop_requested() { return g_stop.load(); }
int stop_signal() { return g_stop_signal.load(); }
void note_stop_signal(int signal_number) {
  int none = 0;
  g_stop_signal.compare_exchange_strong(none, signal_number);  // the first signal decides
  g_stop.store(true);
}

// ------------------------------------------------------------ local ports

namespace {

// Inodes of the TCP sockets listening on PORT, from /proc/net/tcp{,6}.
std::set<std::string> listening_inodes(uint16_t port) {
  std::set<std::string> inodes;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >> inode;
      auto colon = local.rfind(':');
      if (colon == std::string::npos || state != "0A") continue;  // 0A: LISTEN
      if (std::strtoul(local.c_str() + colon + 1, nullptr, 16) == port) inodes.insert(inode);
    }
  }
  return inodes;
}

}  // namespace

bool tcp_port_listening(uint16_t port) { return !listening_inodes(port).empty(); }

std::optional<pid_t> tcp_listener_pid(uint16_t port) {
  auto inodes = listening_inodes(port);
  if (inodes.empty()) return std::nullopt;
  std::error_code ec;
  for (const auto& proc : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = proc.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::error_code fd_ec;
    for (const auto& fd : std::filesystem::directory_iterator(proc.path() / "fd", fd_ec)) {
      std::error_code link_ec;
      std::string target = std::filesystem::read_symlink(fd.path(), link_ec).string();
      if (link_ec || target.rfind("socket:[", 0) != 0) continue;
      if (inodes.count(target.substr(8, target.size() - 9))) return static_cast<pid_t>(std::stol(name));
    }
  }
  return std::nullopt;
}

std::string describe_pid(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/comm");
  std::string comm;
  std::getline(in, comm);
  return comm.empty() ? fmt::format("pid {}", pid) : fmt::format("pid {} ({})", pid, comm);
}

bool is_same_or_group_member(pid_t pid, pid_t child) { return pid == child || ::getpgid(pid) == child; }

// ------------------------------------------------------------ directory lock

DirLock& DirLock::operator=(DirLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
}

Result<DirLock> DirLock::acquire(const std::filesystem::path& dir, const std::string& what) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return input_error("cannot create {} {}: {}", what, dir.string(), ec.message());
  const auto path = dir / "lock";
  // Close-on-exec: a child we start must not inherit (and so keep) the lock.
  // O_NOFOLLOW: else a planted symlink would have the pid written over its target.
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0 && errno == ELOOP) return input_error("{} is a symbolic link; the lock file must be a plain file", path.string());
  if (fd < 0) return make_error("cannot open {}: {}", path.string(), std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    char buffer[32] = {};
    ssize_t n = ::pread(fd, buffer, sizeof buffer - 1, 0);
    ::close(fd);
    if (err != EWOULDBLOCK) return make_error("cannot lock {}: {}", path.string(), std::strerror(err));
    std::string holder = n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string();
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    return input_error("{} {} is in use by another process (pid {}); stop it or use another dir", what, dir.string(),
                       holder.empty() ? std::string("unknown") : holder);
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    int err = errno;
    ::close(fd);
    return make_error("cannot write {}: {}", path.string(), std::strerror(err));
  }
  DirLock lock;
  lock.fd_ = fd;
  return lock;
}

bool wait_until_unlocked(const std::filesystem::path& dir, std::chrono::milliseconds timeout) {
  int fd = ::open((dir / "lock").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return true;  // never locked
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool free = false;
  while (!(free = ::flock(fd, LOCK_EX | LOCK_NB) == 0) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ::close(fd);
  return free;
}

}  // namespace sn
