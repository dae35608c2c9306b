#include "privacy/accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace sn::privacy {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)) without overflow.
double log_add(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double hi = std::max(a, b), lo = std::min(a, b);
  return hi + std::log1p(std::exp(lo - hi));
}

// log(exp(a) − exp(b)) for a ≥ b.
double log_sub(double a, double b) {
  if (b == -kInf) return a;
  if (a <= b) return -kInf;  // rounding: the difference is (numerically) zero
  return a + std::log1p(-std::exp(b - a));
}

// log(erfc(x)); std::erfc underflows past x ≈ 26, so use its asymptotic
// series there (error below 1e-12 for x > 20).
double log_erfc(double x) {
  if (x < 20) return std::log(std::erfc(x));
  const double x2 = x * x;
  const double series = 1 - 1 / (2 * x2) + 3 / (4 * x2 * x2) - 15 / (8 * x2 * x2 * x2);
  return -x2 - std::log(x) - 0.5 * std::log(M_PI) + std::log(series);
}

// log|binom(alpha, i)| and its sign, for real alpha.
double log_abs_binom(double alpha, int64_t i, bool& positive) {
  const double a = std::lgamma(alpha + 1);
  int sign_b = 0, sign_c = 0;
  const double b = lgamma_r(static_cast<double>(i) + 1, &sign_b);
  const double c = lgamma_r(alpha - static_cast<double>(i) + 1, &sign_c);
  positive = sign_c > 0;  // Γ(α+1) and Γ(i+1) are positive
  return a - b - c;
}

// log A_α for integer α: E over the mixture of (1 + q(e^{(2z−1)/2σ²}−1))^α,
// the exact binomial sum (Mironov et al. 2019, Sec. 3.3).
double log_a_int(double q, double sigma, int64_t alpha) {
  double log_a = -kInf;
  for (int64_t i = 0; i <= alpha; ++i) {
    bool positive = true;
    const double log_coef = log_abs_binom(static_cast<double>(alpha), i, positive) + i * std::log(q) +
                            (alpha - i) * std::log1p(-q);
    log_a = log_add(log_a, log_coef + (static_cast<double>(i) * i - i) / (2 * sigma * sigma));
  }
  return log_a;
}

// log A_α for fractional α: the series split at z0 where the two Gaussians'
// densities cross, each half bounded by erfc; terms alternate in sign once
// i > α, and the sum stops when both halves' terms fall below e^-30.
double log_a_frac(double q, double sigma, double alpha) {
  double log_a0 = -kInf, log_a1 = -kInf;
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  const double s2 = 2 * sigma * sigma;
  for (int64_t i = 0; i < 100000; ++i) {
    bool positive = true;
    const double log_coef = log_abs_binom(alpha, i, positive);
    const double j = alpha - static_cast<double>(i);
    const double di = static_cast<double>(i);
    const double log_t0 = log_coef + di * std::log(q) + j * std::log1p(-q);
    const double log_t1 = log_coef + j * std::log(q) + di * std::log1p(-q);
    const double log_e0 = std::log(0.5) + log_erfc((di - z0) / (std::sqrt(2.0) * sigma));
    const double log_e1 = std::log(0.5) + log_erfc((z0 - j) / (std::sqrt(2.0) * sigma));
    const double log_s0 = log_t0 + (di * di - di) / s2 + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / s2 + log_e1;
    if (positive) {
      log_a0 = log_add(log_a0, log_s0);
      log_a1 = log_add(log_a1, log_s1);
    } else {
      log_a0 = log_sub(log_a0, log_s0);
      log_a1 = log_sub(log_a1, log_s1);
    }
    if (std::max(log_s0, log_s1) < -30) break;
  }
  return log_add(log_a0, log_a1);
}

double epsilon_from_rdp(const std::vector<double>& orders, const std::vector<double>& rdp, double delta,
                        double& best_order) {
  double best = kInf;
  best_order = orders.empty() ? 0 : orders.front();
  for (size_t k = 0; k < orders.size(); ++k) {
    const double a = orders[k];
    double eps = rdp[k] - (std::log(delta) + std::log(a)) / (a - 1) + std::log((a - 1) / a);
    if (std::isnan(eps)) eps = kInf;
    if (eps < best) {
      best = eps;
      best_order = a;
    }
  }
  return std::max(0.0, best);
}

}  // namespace

const std::vector<double>& default_orders() {
  static const std::vector<double> orders = [] {
    std::vector<double> out;
    for (int x = 1; x < 100; ++x) out.push_back(1 + x / 10.0);
    for (int a = 12; a < 64; ++a) out.push_back(a);
    return out;
  }();
  return orders;
}

double sampled_gaussian_rdp(double q, double sigma, double alpha) {
  if (q == 0) return 0;
  if (sigma <= 0) return kInf;
  if (q == 1.0) return alpha / (2 * sigma * sigma);
  if (std::isinf(alpha)) return kInf;
  const double log_a = alpha == std::floor(alpha) ? log_a_int(q, sigma, static_cast<int64_t>(alpha))
                                                  : log_a_frac(q, sigma, alpha);
  return log_a / (alpha - 1);
}

Status check_parameters(double sigma, double q, int64_t steps, double delta) {
  if (!(sigma > 0) || !std::isfinite(sigma)) return input_error("noise multiplier must be > 0, got {}", sigma);
  if (!(q > 0 && q <= 1)) return input_error("sample rate must be in (0, 1], got {}", q);
  if (steps < 1) return input_error("steps must be ≥ 1, got {}", steps);
  if (!(delta > 0 && delta < 1)) return input_error("delta must be in (0, 1), got {}", delta);
  return ok_status();
}

Result<PrivacySpent> epsilon_spent(double sigma, double q, int64_t steps, double delta,
                                   const std::vector<double>& orders) {
  if (auto checked = check_parameters(sigma, q, steps, delta); !checked.ok()) return checked.error();
  std::vector<double> rdp(orders.size());
  for (size_t k = 0; k < orders.size(); ++k) rdp[k] = steps * sampled_gaussian_rdp(q, sigma, orders[k]);
  PrivacySpent spent;
  spent.epsilon = epsilon_from_rdp(orders, rdp, delta, spent.best_order);
  return spent;
}

Result<double> noise_for_epsilon(double target_epsilon, double q, int64_t steps, double delta,
                                 const std::vector<double>& orders) {
  if (!(target_epsilon > 0) || !std::isfinite(target_epsilon))
    return input_error("target epsilon must be > 0, got {}", target_epsilon);
  if (auto checked = check_parameters(1.0, q, steps, delta); !checked.ok()) return checked.error();
  auto eps_at = [&](double sigma) { return epsilon_spent(sigma, q, steps, delta, orders)->epsilon; };
  // ε falls with σ towards the order grid's floor; the search goes as far as
  // a job accepts (privacy.noise_multiplier ≤ 1e6).
  constexpr double kMaxSigma = 1e6;
  const double floor = eps_at(kMaxSigma);
  if (floor > target_epsilon)
    return input_error("target epsilon {} is unreachable: at delta {} no noise multiplier up to {:g} gets below "
                       "epsilon {:.4f}",
                       target_epsilon, delta, kMaxSigma, floor);
  double lo = 1e-3, hi = 1.0;
  while (eps_at(hi) > target_epsilon) {
    lo = hi;
    hi *= 2;
    if (hi > kMaxSigma) {
      hi = kMaxSigma;
      break;
    }
  }
  if (eps_at(lo) <= target_epsilon) return lo;  // already tiny noise suffices
  while ((hi - lo) > 1e-4 * hi) {
    const double mid = 0.5 * (lo + hi);
    (eps_at(mid) > target_epsilon ? lo : hi) = mid;
  }
  return hi;
}

Accountant::Accountant(double sigma, double q, std::vector<double> orders) : orders_(std::move(orders)) {
  per_step_.reserve(orders_.size());
  for (double a : orders_) per_step_.push_back(sampled_gaussian_rdp(q, sigma, a));
}

void Accountant::step(int64_t count) { steps_ += count; }

double Accountant::epsilon(double delta) const {
  if (steps_ == 0) return 0;
  std::vector<double> rdp(orders_.size());
  for (size_t k = 0; k < orders_.size(); ++k) rdp[k] = steps_ * per_step_[k];
  double best_order = 0;
  return epsilon_from_rdp(orders_, rdp, delta, best_order);
}

}  // namespace sn::privacy
