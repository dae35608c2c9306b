// What tests that watch a tree of real processes share: who a process's
// parent is, its name and argv, every live descendant of a pid, and waiting
// until a set of them (and a dir) is gone. Read from /proc (Linux).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/fs.h"

namespace sn::test {

// Field 4 of /proc/PID/stat (the parent pid), or -1 if PID is gone or a zombie.
inline pid_t parent_of(pid_t pid) {
  auto stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  if (!stat.ok()) return -1;
  auto close = stat->rfind(')');
  if (close == std::string::npos) return -1;
  char state = 0;
  int ppid = -1;
  if (std::sscanf(stat->c_str() + close + 1, " %c %d", &state, &ppid) != 2) return -1;
  return state == 'Z' ? -1 : ppid;  // a zombie runs nothing
}

inline bool alive(pid_t pid) { return parent_of(pid) >= 0; }

inline std::string comm_of(pid_t pid) {
  std::string name = read_file("/proc/" + std::to_string(pid) + "/comm").value_or("");
  while (!name.empty() && name.back() == '\n') name.pop_back();
  return name;
}

// argv of PID as one string, arguments joined by spaces.
inline std::string cmdline_of(pid_t pid) {
  std::string line = read_file("/proc/" + std::to_string(pid) + "/cmdline").value_or("");
  std::replace(line.begin(), line.end(), '\0', ' ');
  return line;
}

inline std::vector<pid_t> all_pids() {
  std::vector<pid_t> pids;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (!name.empty() && name.find_first_not_of("0123456789") == std::string::npos) pids.push_back(std::stoi(name));
  }
  return pids;
}

// Every live process below ROOT.
inline std::set<pid_t> descendants(pid_t root) {
  std::set<pid_t> found{root};
  bool grew = true;
  while (grew) {
    grew = false;
    for (pid_t pid : all_pids())
      if (!found.count(pid) && found.count(parent_of(pid))) grew = found.insert(pid).second || grew;
  }
  found.erase(root);
  return found;
}

// Waits up to LIMIT until none of PIDS is alive and (if given) DIR is gone; returns those still alive.
inline std::set<pid_t> wait_until_gone(std::set<pid_t> pids, const std::string& dir, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while ((!pids.empty() || (!dir.empty() && std::filesystem::exists(dir))) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    for (auto it = pids.begin(); it != pids.end();) it = alive(*it) ? std::next(it) : pids.erase(it);
  }
  return pids;
}

}  // namespace sn::test
