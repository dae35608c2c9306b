// The privacy accountant of DP-SGD: Rényi DP of the sampled Gaussian mechanism
// (Mironov, Talwar, Zhang 2019), composed over steps and converted to (ε, δ).
//
// Sampling assumption: every step draws its batch by Poisson sampling, each
// sequence independently with probability q (the "sample rate"). The analysis
// is the one Opacus's RDP accountant uses, so its figures agree with Opacus's
// (σ = 1.5, q = 0.04, 2,250 steps, δ = 1e-5 → ε = 7.3291).
//
// All functions are pure and thread-safe. Bad arguments are invalid_input
// errors whose message names the argument and its range.
#pragma once

#include <cstdint>
#include <vector>

#include "core/result.h"

namespace sn::privacy {

// The orders α the accountant minimises over: 1.1, 1.2, …, 10.9, then 12 … 63
// (Opacus's default grid). ε cannot go below this grid's floor at a given δ
// (about 0.1 at δ = 1e-5) however large σ is.
const std::vector<double>& default_orders();

struct PrivacySpent {
  double epsilon = 0;
  double best_order = 0;  // the α that gave ε
};

// RDP of one step of the sampled Gaussian mechanism at order ALPHA (> 1), for
// noise multiplier SIGMA (> 0) and sample rate Q in [0, 1]. Integer orders use
// the exact binomial sum, fractional ones the two-sided erfc series.
double sampled_gaussian_rdp(double q, double sigma, double alpha);

// Checks σ > 0, q ∈ (0, 1], steps ≥ 1, δ ∈ (0, 1).
Status check_parameters(double sigma, double q, int64_t steps, double delta);

// ε at DELTA after STEPS steps, minimised over ORDERS, with the RDP → (ε, δ)
// conversion of Balle et al. 2020 ("Hypothesis testing interpretations and
// Rényi DP", Thm 21): ε = RDP(α) + log((α−1)/α) − (log δ + log α)/(α − 1).
Result<PrivacySpent> epsilon_spent(double sigma, double q, int64_t steps, double delta,
                                   const std::vector<double>& orders = default_orders());

// The smallest noise multiplier σ (to a relative 1e-4, rounded up so that the
// returned σ reaches at most TARGET_EPSILON) with epsilon_spent(σ, …) ≤ target.
// invalid_input when the target is ≤ 0 or below what any σ reaches.
Result<double> noise_for_epsilon(double target_epsilon, double q, int64_t steps, double delta,
                                 const std::vector<double>& orders = default_orders());

// Keeps the running RDP sum of a training job so ε can be printed every step
// without recomputing the series (each step costs one add per order).
class Accountant {
 public:
  Accountant(double sigma, double q, std::vector<double> orders = default_orders());
  void step(int64_t count = 1);
  int64_t steps() const { return steps_; }
  // ε at DELTA after the steps so far (0 before the first step).
  double epsilon(double delta) const;

 private:
  std::vector<double> orders_;
  std::vector<double> per_step_;
  int64_t steps_ = 0;
};

}  // namespace sn::privacy
