#include <algorithm>
#include <cmath>
#include <numeric>

#include "verify/verify.h"

namespace sn::verify {

double detection_probability(double q, double f, int64_t segments) {
  q = std::clamp(q, 0.0, 1.0);
  f = std::clamp(f, 0.0, 1.0);
  if (segments <= 0) return 0;
  return 1.0 - std::pow(1.0 - q, f * static_cast<double>(segments));
}

int64_t segments_for_fraction(double f, int64_t segments) {
  if (segments <= 0) return 0;
  const double wanted = std::ceil(std::clamp(f, 0.0, 1.0) * static_cast<double>(segments) - 1e-9);
  return std::clamp<int64_t>(static_cast<int64_t>(wanted), 1, segments);
}

Result<double> fraction_for_target(double target, double q, int64_t segments) {
  if (!(q > 0 && q < 1)) return input_error("the faked fraction q must be in (0, 1), got {}", q);
  if (!(target > 0 && target < 1)) return input_error("the target detection probability must be in (0, 1), got {}", target);
  if (segments < 1) return input_error("the job must have at least 1 segment, got {}", segments);
  // f·n ≥ ln(1 − target) / ln(1 − q), in whole segments.
  const double needed = std::ceil(std::log(1.0 - target) / std::log(1.0 - q) - 1e-9);
  const int64_t count = std::clamp<int64_t>(static_cast<int64_t>(needed), 1, segments);
  return static_cast<double>(count) / static_cast<double>(segments);
}

std::vector<int64_t> pick_segments(const Hash256& seed, int stage, int replica, int64_t segments, int64_t count) {
  if (segments <= 0 || count <= 0) return {};
  count = std::min(count, segments);
  std::vector<int64_t> order(static_cast<size_t>(segments));
  std::iota(order.begin(), order.end(), int64_t{0});
  for (int64_t i = 0; i < count; ++i) {
    Hasher h;
    h.update_u64(std::string_view("solvernet/segments/v1").size()).update("solvernet/segments/v1");
    h.update(std::span<const uint8_t>(seed.data(), seed.size()));
    h.update_u64(static_cast<uint64_t>(stage)).update_u64(static_cast<uint64_t>(replica)).update_u64(static_cast<uint64_t>(i));
    const Hash256 d = h.finish();
    uint64_t x = 0;
    for (int b = 7; b >= 0; --b) x = (x << 8) | d[static_cast<size_t>(b)];
    const int64_t j = i + static_cast<int64_t>(x % static_cast<uint64_t>(segments - i));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  std::vector<int64_t> picked(order.begin(), order.begin() + count);
  std::sort(picked.begin(), picked.end());
  return picked;
}

}  // namespace sn::verify
