#include "net/link.h"

#include <algorithm>

namespace sn::net {

Clock::time_point LinkPacer::schedule(size_t bytes, Clock::time_point now) {
  if (!paced_) return now;
  std::lock_guard<std::mutex> lock(mutex_);
  auto start = std::max(now, link_free_at_);
  auto serialization = std::chrono::duration<double>(static_cast<double>(bytes) / spec_.bytes_per_second());
  link_free_at_ = start + std::chrono::duration_cast<Clock::duration>(serialization);
  auto latency = std::chrono::duration<double>(spec_.latency_ms / 1e3);
  return link_free_at_ + std::chrono::duration_cast<Clock::duration>(latency);
}

}  // namespace sn::net
