// solvernet privacy: plan a differentially private job (docs/privacy.md).
// `epsilon` gives the ε a noise multiplier spends; `noise` the noise
// multiplier that reaches a target ε. Both use the RDP accountant of the
// sampled Gaussian mechanism with Poisson sampling at rate q.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/command.h"
#include "privacy/accountant.h"
#include "privacy/privacy.h"

namespace sn::cli {
namespace {

struct PrivacyArgs {
  double sigma = 0;
  double target_epsilon = 0;
  double q = 0;
  int64_t steps = 0;
  double delta = 1e-5;
  bool json = false;
};

int run_epsilon(const PrivacyArgs& args) {
  auto spent = privacy::epsilon_spent(args.sigma, args.q, args.steps, args.delta);
  if (!spent.ok()) return fail("privacy epsilon", spent.message(), spent.error().exit_code);
  if (args.json) {
    std::cout << nlohmann::json{{"epsilon", spent->epsilon}, {"delta", args.delta},
                                {"noise_multiplier", args.sigma}, {"sample_rate", args.q},
                                {"steps", args.steps}, {"best_order", spent->best_order}}
                     .dump(2)
              << std::endl;
  } else {
    std::cout << fmt::format("epsilon = {:.4f} at delta = {} (noise multiplier {}, sample rate {}, {} steps; "
                             "RDP order {})\n",
                             spent->epsilon, args.delta, args.sigma, args.q, args.steps, spent->best_order);
  }
  return 0;
}

int run_noise(const PrivacyArgs& args) {
  auto sigma = privacy::noise_for_epsilon(args.target_epsilon, args.q, args.steps, args.delta);
  if (!sigma.ok()) return fail("privacy noise", sigma.message(), sigma.error().exit_code);
  const double reached = privacy::epsilon_spent(*sigma, args.q, args.steps, args.delta)->epsilon;
  if (args.json) {
    std::cout << nlohmann::json{{"noise_multiplier", *sigma}, {"epsilon", reached},
                                {"target_epsilon", args.target_epsilon}, {"delta", args.delta},
                                {"sample_rate", args.q}, {"steps", args.steps}}
                     .dump(2)
              << std::endl;
  } else {
    std::cout << fmt::format("noise multiplier = {:.4f} reaches epsilon = {:.4f} ≤ {} at delta = {} "
                             "(sample rate {}, {} steps)\n",
                             *sigma, reached, args.target_epsilon, args.delta, args.q, args.steps);
  }
  return 0;
}

CommandRegistration privacy_command(
    "privacy", "Plan a differentially private job: epsilon for a noise multiplier, or the noise for an epsilon",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<PrivacyArgs>();
      app.require_subcommand(1);
      auto* eps = app.add_subcommand("epsilon", "Epsilon spent at delta by DP-SGD (RDP accountant, Poisson sampling)");
      eps->add_option("--noise-multiplier", args->sigma, "Noise std / clip norm (sigma), > 0")->required();
      eps->add_option("--sample-rate", args->q, "Probability a sequence is in a step's batch, in (0, 1]")->required();
      eps->add_option("--steps", args->steps, "Training steps, >= 1")->required();
      eps->add_option("--delta", args->delta, "Delta, in (0, 1)")->capture_default_str();
      eps->add_flag("--json", args->json, "Print JSON");
      auto* noise = app.add_subcommand("noise", "The smallest noise multiplier that keeps epsilon <= a target");
      noise->add_option("--target-epsilon", args->target_epsilon, "Epsilon to reach, > 0")->required();
      noise->add_option("--sample-rate", args->q, "Probability a sequence is in a step's batch, in (0, 1]")->required();
      noise->add_option("--steps", args->steps, "Training steps, >= 1")->required();
      noise->add_option("--delta", args->delta, "Delta, in (0, 1)")->capture_default_str();
      noise->add_flag("--json", args->json, "Print JSON");
      return [args, eps] { return eps->parsed() ? run_epsilon(*args) : run_noise(*args); };
    });

}  // namespace
}  // namespace sn::cli

namespace sn::cli {
namespace {
// Every [privacy] job this process runs (node, devnet, replay) uses the
// privacy module: train calls it through its hooks (train/aggregation.h).
const bool privacy_installed = [] {
  privacy::install();
  return true;
}();
}  // namespace
}  // namespace sn::cli
