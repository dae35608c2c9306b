// solvernet verify: check a solver's training (docs/verification.md). `odds`
// plans a verifier's sample; `fetch` pulls a member's commitment and checks it.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/command.h"
#include "core/keys.h"
#include "core/log.h"
#include "verify/verify.h"

namespace sn::cli {
namespace {

struct VerifyArgs {
  // odds
  int64_t segments = 0;
  double q = 0.1;
  double target = 0.99;
  double fraction = 0;  // 0: choose it for --target
  // fetch
  std::string node;     // NODE_ID@HOST:PORT
  std::string job_id;
  int stage = 0, replica = 0;
  std::string data_dir;
  bool json = false;
};

int run_odds(const VerifyArgs& args) {
  if (args.segments < 1) return fail("verify odds", fmt::format("--segments must be ≥ 1, got {}", args.segments), 2);
  if (!(args.fraction >= 0 && args.fraction <= 1))
    return fail("verify odds", fmt::format("--fraction must be in [0, 1], got {}", args.fraction), 2);
  double f = args.fraction;
  if (f == 0) {
    auto chosen = verify::fraction_for_target(args.target, args.q, args.segments);
    if (!chosen.ok()) return fail("verify odds", chosen.message(), chosen.error().exit_code);
    f = *chosen;
  } else if (!(args.q > 0 && args.q < 1)) {
    return fail("verify odds", fmt::format("--q must be in (0, 1), got {}", args.q), 2);
  }
  const int64_t count = verify::segments_for_fraction(f, args.segments);
  const double p = verify::detection_probability(args.q, f, args.segments);
  if (args.json) {
    std::cout << nlohmann::json{{"segments", args.segments}, {"q", args.q}, {"fraction", f},
                                {"replayed_segments", count}, {"detection_probability", p}}
                     .dump(2)
              << std::endl;
  } else {
    std::cout << fmt::format("replay {} of {} segments (f = {:.4f}): a solver faking {:.1f}% of them is caught with "
                             "probability 1 − (1 − {})^({:.4f}·{}) = {:.4f}\n",
                             count, args.segments, f, 100 * args.q, args.q, f, args.segments, p);
  }
  return 0;
}

// NODE_ID@HOST:PORT
Result<std::pair<std::string, std::string>> parse_node(const std::string& text) {
  const auto at = text.find('@');
  if (at == std::string::npos || at == 0 || at + 1 == text.size())
    return input_error("--node {}: expected NODE_ID@HOST:PORT", text);
  return std::make_pair(text.substr(0, at), text.substr(at + 1));
}

int run_fetch(const VerifyArgs& args) {
  init_logging("verify", "warn");
  auto node = parse_node(args.node);
  if (!node.ok()) return fail("verify fetch", node.message(), 2);
  if (auto checked = verify::check_job_id(args.job_id); !checked.ok())
    return fail("verify fetch", checked.message(), 2);
  auto key = NodeKey::load_or_create(args.data_dir);
  if (!key.ok()) return fail("verify fetch", key.message(), 2);
  verify::EvidenceClient client(node->second, node->first, *key);
  const verify::Member member{args.job_id, args.stage, args.replica};
  auto commitment = client.commitment(member);
  if (!commitment.ok()) return fail("verify fetch", commitment.message(), commitment.error().exit_code);
  if (args.json) {
    std::cout << nlohmann::json{{"root", to_hex(commitment->root)},
                                {"leaf_count", commitment->leaves.size()},
                                {"chain_address", commitment->chain_address}}
                     .dump(2)
              << std::endl;
  } else {
    std::cout << fmt::format("job {} stage {} replica {}: {} leaves, root {}{}\n", args.job_id, args.stage,
                             args.replica, commitment->leaves.size(), to_hex(commitment->root),
                             commitment->chain_address.empty() ? "" : ", commits as " + commitment->chain_address);
  }
  return 0;
}

CommandRegistration verify_command(
    "verify", "Verify training: plan a verifier's sample, fetch and check a solver's evidence",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<VerifyArgs>();
      app.require_subcommand(1);
      auto* odds = app.add_subcommand("odds", "How many segments to replay to catch a solver that fakes a fraction q");
      odds->add_option("--segments", args->segments, "Segments of the job (steps / segment_steps, per member)")->required();
      odds->add_option("--q", args->q, "Fraction of segments the solver fakes")->capture_default_str();
      odds->add_option("--target", args->target, "Detection probability wanted")->capture_default_str();
      odds->add_option("--fraction", args->fraction, "Replay this fraction instead of choosing one for --target");
      odds->add_flag("--json", args->json, "Print JSON");
      auto* fetch = app.add_subcommand("fetch", "Fetch a member's step commitment from its node and check its root");
      fetch->add_option("--node", args->node, "The solver's node: NODE_ID@HOST:PORT")->required();
      fetch->add_option("--job", args->job_id, "Job id (as the nodes know it)")->required();
      fetch->add_option("--stage", args->stage, "Stage")->capture_default_str();
      fetch->add_option("--replica", args->replica, "Replica")->capture_default_str();
      fetch->add_option("--data", args->data_dir, "Data dir holding this verifier's node key")->required();
      fetch->add_flag("--json", args->json, "Print JSON");
      add_insecure_flag(app);
      return [args, odds] { return odds->parsed() ? run_odds(*args) : run_fetch(*args); };
    });

}  // namespace
}  // namespace sn::cli
