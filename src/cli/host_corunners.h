// Co-runners for measuring compute on a host that the job's nodes will share.
//
// When every node of a job runs on one host (the devnet), each computes while
// the others run on the same cores, and the switches between processes cost
// each of them its caches and TLB: measured here, 4 processes on 2 cores spend
// ~25% more CPU per micro-batch than one process alone (threads of one process
// do not show it: they share an address space). The placement measures compute
// in this process; with the co-runners started first, it measures it as the
// nodes will spend it. A co-runner is `solvernet corun` (a hidden command)
// doing the same micro-batch work in a loop; it dies with this thread (SIGTERM
// on parent death) or after a time bound, whichever comes first, and leaves no
// file behind.
#pragma once

#include <string>
#include <vector>

#include "core/process.h"
#include "core/result.h"

namespace sn::cli {

class HostCoRunners {
 public:
  // COUNT processes, each computing the job JOB_TOML (job_to_toml) for at most
  // MAX_SECONDS; returns once each has finished its first micro-batch (or
  // after 20 s: a co-runner that has not started yet only makes the
  // measurement lower, as before). Errors: the binary cannot be started.
  static Result<HostCoRunners> start(int count, const std::string& job_toml, int max_seconds);
  HostCoRunners() = default;
  HostCoRunners(HostCoRunners&&) = default;
  HostCoRunners& operator=(HostCoRunners&&) = default;
  ~HostCoRunners();  // kills them

 private:
  std::vector<ChildProcess> children_;
  // Per co-runner: its stdout, a file with no name read through this
  // descriptor (nothing is left in /tmp if this process is killed).
  std::vector<int> ready_fds_;
};

// How many co-runners a measurement on this host takes for a job of WORKERS
// nodes all on it: the other nodes, at most 4 processes per core in all.
int corunners_for(int workers, unsigned cores);

}  // namespace sn::cli
