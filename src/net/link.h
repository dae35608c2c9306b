// The emulated WAN link: a sender paces each message as a real link of the
// given latency and bandwidth would — serialization at the link rate, then
// one-way latency — with messages pipelined (a message may start serializing
// while the previous one is still in flight).
#pragma once

#include <chrono>
#include <mutex>

#include "net/topology.h"

namespace sn::net {

using Clock = std::chrono::steady_clock;

class LinkPacer {
 public:
  // An unpaced link delivers at once; a paced one follows SPEC.
  LinkPacer() = default;
  explicit LinkPacer(LinkSpec spec) : spec_(spec), paced_(true) {}

  bool paced() const { return paced_; }
  const LinkSpec& spec() const { return spec_; }

  // Reserves the link for a message of BYTES handed over at NOW and returns the
  // earliest time it may arrive at the receiver. Thread-safe.
  Clock::time_point schedule(size_t bytes, Clock::time_point now = Clock::now());

 private:
  LinkSpec spec_;
  bool paced_ = false;
  std::mutex mutex_;
  Clock::time_point link_free_at_{};
};

}  // namespace sn::net
