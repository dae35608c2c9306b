#include "net/link.h"

#include <algorithm>

namespace sn::net {
namespace {
// Seconds → clock ticks. Topology limits keep real figures far below this bound; the
// clamp keeps a link scaled past them (or a NaN) from overflowing the nanosecond
// count into a negative, i.e. instant, delay. A year: a link that slow is stalled.
Clock::duration ticks(double seconds) {
  constexpr double kLongest = 365.0 * 24 * 3600;
  if (!(seconds > 0)) return Clock::duration::zero();
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(std::min(seconds, kLongest)));
}
}  // namespace

Clock::time_point LinkPacer::schedule(size_t bytes, Clock::time_point now) {
  if (!paced_) return now;
  std::lock_guard<std::mutex> lock(mutex_);
  auto start = std::max(now, link_free_at_);
  link_free_at_ = start + ticks(static_cast<double>(bytes) / spec_.bytes_per_second());
  return link_free_at_ + ticks(spec_.latency_ms / 1e3);
}

}  // namespace sn::net
