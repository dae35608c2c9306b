// The pause before retrying something that keeps failing (a DHT put, a
// bootstrap that does not answer, a listing that comes back empty): it
// doubles from FIRST up to CAP, and each pause is spread by ± JITTER of
// itself so that processes retrying the same dead peer drift apart instead
// of retrying in step. Not thread-safe: one per retry loop.
#pragma once

#include <algorithm>
#include <chrono>
#include <random>

namespace sn {

class Backoff {
 public:
  // 0 < FIRST <= CAP; 0 <= JITTER < 1 (a fraction of each pause).
  Backoff(std::chrono::milliseconds first, std::chrono::milliseconds cap, double jitter = 0.2)
      : first_(first), cap_(std::max(first, cap)), jitter_(std::clamp(jitter, 0.0, 0.9)), next_(first) {}

  // The pause before the next retry; the one after is twice as long, up to CAP.
  std::chrono::milliseconds next() {
    std::uniform_real_distribution<double> spread(1.0 - jitter_, 1.0 + jitter_);
    const auto pause = std::chrono::milliseconds(static_cast<int64_t>(static_cast<double>(next_.count()) * spread(random_)));
    next_ = std::min(cap_, next_ * 2);
    ++failures_;
    return pause;
  }
  // After a success: the next failure waits FIRST again.
  void reset() {
    next_ = first_;
    failures_ = 0;
  }
  // Pauses handed out since the last reset (the failures in a row).
  int failures() const { return failures_; }

 private:
  std::chrono::milliseconds first_, cap_;
  double jitter_;
  std::chrono::milliseconds next_;
  int failures_ = 0;
  std::mt19937_64 random_{std::random_device{}()};
};

}  // namespace sn
