#include "core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <atomic>

namespace sn {
namespace {
std::atomic<bool> verbose{false};
}

void init_logging(const std::string& name, const std::string& level) {
  auto logger = spdlog::stderr_color_mt("solvernet");
  logger->set_pattern(fmt::format("[%H:%M:%S.%e] [{}] [%^%l%$] %v", name));
  logger->set_level(spdlog::level::from_str(level));
  spdlog::set_default_logger(logger);
  verbose = logger->level() <= spdlog::level::debug;
}

bool verbose_logging() { return verbose; }

}  // namespace sn
