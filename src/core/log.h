// Logging: spdlog to stderr with the node's short id as a prefix.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace sn {

// LEVEL: trace|debug|info|warn|error; NAME appears in every line (e.g. "node 3fa2c1").
void init_logging(const std::string& name, const std::string& level = "info");
// Whether init_logging was given debug or trace (safe from any thread, and
// after spdlog is gone at exit).
bool verbose_logging();

}  // namespace sn
