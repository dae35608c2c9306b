#include "cli/host_corunners.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include <fmt/format.h>

namespace sn::cli {

int corunners_for(int workers, unsigned cores) {
  return std::max(0, std::min(workers, 4 * static_cast<int>(std::max(1u, cores))) - 1);
}

Result<HostCoRunners> HostCoRunners::start(int count, const std::string& job_toml, int max_seconds) {
  HostCoRunners runners;
  const std::string self = self_executable().string();
  for (int i = 0; i < count; ++i) {
    const auto ready = std::filesystem::temp_directory_path() / fmt::format("solvernet-corun-{}-{}", ::getpid(), i);
    std::filesystem::remove(ready);
    SpawnOptions options;
    options.extra_env["OPENBLAS_NUM_THREADS"] = "1";
    options.stdout_path = ready;
    options.stderr_path = "/dev/null";
    SN_ASSIGN(auto child, ChildProcess::spawn({self, "corun", "--job-toml", job_toml, "--seconds",
                                               std::to_string(max_seconds)},
                                              options));
    runners.children_.push_back(std::move(child));
    runners.ready_files_.push_back(ready.string());
  }
  // Measure only once all of them compute: starting (loading LibTorch) is not the load to measure under.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (size_t i = 0; i < runners.children_.size(); ++i) {
    std::error_code ec;
    while (std::filesystem::file_size(runners.ready_files_[i], ec) == 0 && runners.children_[i].running() &&
           !stop_requested() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return runners;
}

HostCoRunners::~HostCoRunners() {
  for (auto& child : children_) child.kill_now();
  children_.clear();
  std::error_code ec;
  for (const auto& file : ready_files_) std::filesystem::remove(file, ec);
}

}  // namespace sn::cli
