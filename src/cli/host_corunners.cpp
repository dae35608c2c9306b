#include "cli/host_corunners.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include <fmt/format.h>

namespace sn::cli {
namespace {

constexpr std::string_view kReadyPrefix = "solvernet-corun-";

// Ready files that a client killed by an older solvernet (which kept their
// names while the co-runners ran) left: solvernet-corun-<pid>-<i> whose pid is gone.
void remove_orphaned_ready_files() {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(std::filesystem::temp_directory_path(), ec)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with(kReadyPrefix)) continue;
    pid_t pid = 0;
    const char* first = name.data() + kReadyPrefix.size();
    auto [end, parsed] = std::from_chars(first, name.data() + name.size(), pid);
    if (parsed != std::errc() || end == first || *end != '-' || pid <= 0) continue;
    if (::kill(pid, 0) != 0 && errno == ESRCH) std::filesystem::remove(entry.path(), ec);
  }
}

}  // namespace

int corunners_for(int workers, unsigned cores) {
  return std::max(0, std::min(workers, 4 * static_cast<int>(std::max(1u, cores))) - 1);
}

Result<HostCoRunners> HostCoRunners::start(int count, const std::string& job_toml, int max_seconds) {
  remove_orphaned_ready_files();
  HostCoRunners runners;
  const std::string self = self_executable().string();
  for (int i = 0; i < count; ++i) {
    // The co-runner's stdout is a file with no name (O_TMPFILE), which the
    // child opens through this process's descriptor: a client killed with
    // SIGKILL at any moment leaves nothing in /tmp, and the file goes with
    // the last descriptor.
    const auto tmp = std::filesystem::temp_directory_path();
    const int fd = ::open(tmp.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) return make_error("cannot create a co-runner output file in {}: {}", tmp.string(), std::strerror(errno));
    runners.ready_fds_.push_back(fd);
    SpawnOptions options;
    options.extra_env["OPENBLAS_NUM_THREADS"] = "1";
    options.stdout_path = fmt::format("/proc/self/fd/{}", fd);
    options.stderr_path = "/dev/null";
    SN_ASSIGN(auto child, ChildProcess::spawn({self, "corun", "--job-toml", job_toml, "--seconds",
                                               std::to_string(max_seconds)},
                                              options));
    runners.children_.push_back(std::move(child));
  }
  // Measure only once all of them compute: starting (loading LibTorch) is not the load to measure under.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  const auto ready = [](int fd) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 && st.st_size > 0;
  };
  for (size_t i = 0; i < runners.children_.size(); ++i) {
    while (!ready(runners.ready_fds_[i]) && runners.children_[i].running() && !stop_requested() &&
           std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return runners;
}

HostCoRunners::~HostCoRunners() {
  for (auto& child : children_) child.kill_now();
  children_.clear();
  for (int fd : ready_fds_) ::close(fd);
  ready_fds_.clear();
}

}  // namespace sn::cli
