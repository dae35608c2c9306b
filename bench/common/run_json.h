// What the benchmarks that drive the solvernet command share: run it, wait,
// and read the JSON it printed.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "core/fs.h"
#include "core/process.h"

namespace sn::bench {

// Runs ARGV with stdout into OUT and parses it; an error names the command if
// it exits non-zero or prints no JSON.
inline Result<nlohmann::json> run_json(const std::vector<std::string>& argv, const std::filesystem::path& out) {
  SpawnOptions options;
  options.stdout_path = out;
  std::filesystem::remove(out);
  SN_ASSIGN(auto child, ChildProcess::spawn(argv, options));
  const int status = child.wait();
  SN_ASSIGN(std::string text, read_file(out));
  if (status != 0) return make_error("{} {} exited with {}", argv[0], argv[1], status);
  try {
    return nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    return make_error("{} {} printed no JSON: {}", argv[0], argv[1], e.what());
  }
}

}  // namespace sn::bench
