// `solvernet corun` (hidden): one co-runner of cli/host_corunners.h. Computes
// the job's micro-batches in a loop, prints "ready" once the first is done, and
// exits after --seconds (or with its parent: SIGTERM on parent death).
#include <chrono>
#include <iostream>

#include "cli/command.h"
#include "core/job.h"
#include "train/train.h"

namespace sn::cli {
namespace {

CommandRegistration registration{"corun", "", [](CLI::App& app) {
  app.group("");  // internal: started by the placement, not by users
  auto job_toml = std::make_shared<std::string>();
  auto seconds = std::make_shared<int>(60);
  app.add_option("--job-toml", *job_toml, "The job, as TOML text")->required();
  app.add_option("--seconds", *seconds, "Stop after this long")->check(CLI::Range(1, 600));
  return [=]() -> int {
    auto job = parse_job_string(*job_toml, "--job-toml");
    if (!job.ok()) return fail("corun", job.message(), 2);
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(*seconds);
    bool first = true;
    while (std::chrono::steady_clock::now() < end) {
      (void)train::measure_microbatch_seconds(*job);
      if (first) std::cout << "ready" << std::endl;
      first = false;
    }
    return 0;
  };
}};

}  // namespace
}  // namespace sn::cli
