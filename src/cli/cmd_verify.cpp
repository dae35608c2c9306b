// solvernet verify: check a solver's training (docs/verification.md). `odds`
// plans a verifier's sample; `fetch` pulls a member's commitment and checks it;
// `run` is a verifier (takes the seat the seed gives it, replays, challenges);
// `referee` rules the disputes of a job that reach the referee.
#include <nlohmann/json.hpp>

#include <iostream>

#include "chain/chain.h"
#include "cli/command.h"
#include "cli/signals.h"
#include "core/fs.h"
#include "core/keys.h"
#include "core/log.h"
#include "train/train.h"
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

struct ChainRoleArgs {
  std::string summary;       // the job's summary JSON (job id, placement)
  std::string chain_rpc;
  std::string deployment;
  uint64_t chain_job = 0;
  std::string data_dir;
  double q = 0.1, target = 0.99, fraction = 0;
  uint64_t seat = 0;
  double seed_timeout_s = 120;
  double for_s = 0;          // referee: stop after this long (0: until Ctrl-C)
  bool lie = false;
  bool json = false;
};

struct JobView {
  std::string job_id;
  std::vector<verify::MemberEndpoint> members;
};

Result<JobView> read_summary(const std::string& path) {
  auto read = read_file(path);
  if (!read.ok()) return input_error("--summary {}: {}", path, read.message());
  const std::string& text = *read;
  nlohmann::json summary;
  try {
    summary = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    return input_error("--summary {}: not JSON ({})", path, e.what());
  }
  JobView view;
  if (!summary.is_object() || !summary.contains("job_id") || !summary["job_id"].is_string())
    return input_error("--summary {}: no job_id (written by solvernet train/devnet --summary-json)", path);
  view.job_id = summary["job_id"].get<std::string>();
  if (auto checked = verify::check_job_id(view.job_id); !checked.ok())
    return input_error("--summary {}: {}", path, checked.message());
  if (!summary.contains("placement") || !summary["placement"].is_object() ||
      !summary["placement"].contains("stages") || !summary["placement"]["stages"].is_array())
    return input_error("--summary {}: no placement.stages", path);
  int stage = 0;
  for (const auto& replicas : summary["placement"]["stages"]) {
    int replica = 0;
    if (!replicas.is_array()) return input_error("--summary {}: placement.stages[{}] is not a list", path, stage);
    for (const auto& m : replicas) {
      if (!m.is_object() || !m.contains("node_id") || !m["node_id"].is_string() || !m.contains("address") ||
          !m["address"].is_string())
        return input_error("--summary {}: stage {} replica {} has no node_id and address", path, stage, replica);
      view.members.push_back({stage, replica, m["node_id"].get<std::string>(), m["address"].get<std::string>()});
      ++replica;
    }
    ++stage;
  }
  if (view.members.empty()) return input_error("--summary {}: no members in placement.stages", path);
  return view;
}

Result<std::shared_ptr<chain::MarketClient>> open_market(const ChainRoleArgs& args) {
  auto rpc = std::make_shared<chain::RpcClient>(args.chain_rpc);
  Result<chain::Deployment> deployment =
      args.deployment.empty() ? chain::find_dev_deployment(rpc) : chain::Deployment::load(args.deployment);
  if (!deployment.ok()) {
    if (!args.deployment.empty()) return input_error("--deployment {}: {}", args.deployment, deployment.message());
    // No answer, or no market deployed there: the chain is not usable now (exit 1), not a typo.
    return kind_error(ErrorKind::unavailable, "--chain-rpc {}: {}", args.chain_rpc, deployment.message());
  }
  // Only now, with the chain answering, does the data dir get keys.
  if (auto made = ensure_directory(args.data_dir); !made.ok()) return input_error("--data {}: {}", args.data_dir, made.message());
  // The node's chain key; a journal of its own (the node process keeps DATA/chain.journal).
  auto key = chain::Key::load_or_create(std::filesystem::path(args.data_dir) / "chain.key");
  if (!key.ok()) return input_error("--data {}: {}", args.data_dir, key.message());
  return std::make_shared<chain::MarketClient>(rpc, *deployment, *key,
                                               std::filesystem::path(args.data_dir) / "verify.journal");
}

// Checks shared by run and referee, before anything starts (exit 2, one line).
Status check_role_args(const ChainRoleArgs& args) {
  if (args.chain_job < 1) return input_error("--chain-job must be ≥ 1 (a job id on the market), got {}", args.chain_job);
  if (args.data_dir.empty()) return input_error("--data must name a directory");
  std::error_code ec;
  if (std::filesystem::exists(args.data_dir, ec) && !std::filesystem::is_directory(args.data_dir, ec))
    return input_error("--data {}: not a directory", args.data_dir);
  return ok_status();
}

int run_verifier_command(const ChainRoleArgs& args) {
  init_logging("verify", "warn");
  install_stop_handlers();
  if (auto checked = check_role_args(args); !checked.ok()) return fail("verify run", checked.message(), 2);
  if (!(args.seed_timeout_s >= 1 && args.seed_timeout_s <= 86400))
    return fail("verify run", fmt::format("--seed-timeout-s must be in 1..86400, got {:g}", args.seed_timeout_s), 2);
  if (args.seat > 254) return fail("verify run", fmt::format("--seat must be in 0..254, got {}", args.seat), 2);
  auto view = read_summary(args.summary);
  if (!view.ok()) return fail("verify run", view.message(), 2);
  if (!(args.q > 0 && args.q < 1)) return fail("verify run", fmt::format("--q must be in (0, 1), got {}", args.q), 2);
  if (!(args.target > 0 && args.target < 1))
    return fail("verify run", fmt::format("--target must be in (0, 1), got {}", args.target), 2);
  if (!(args.fraction >= 0 && args.fraction <= 1))
    return fail("verify run", fmt::format("--fraction must be in [0, 1], got {}", args.fraction), 2);
  auto market = open_market(args);
  if (!market.ok()) return fail("verify run", market.message(), market.error().exit_code);
  auto key = NodeKey::load_or_create(args.data_dir);
  if (!key.ok()) return fail("verify run", key.message(), 2);
  train::init_single_threaded();  // replays compute what the nodes computed: one thread, as they run
  verify::VerifierOptions options;
  options.work_dir = std::filesystem::path(args.data_dir) / "verify";
  options.key = &*key;
  options.market = *market;
  options.chain_job = args.chain_job;
  options.job_id = view->job_id;
  options.members = view->members;
  options.seat = args.seat;
  options.q = args.q;
  options.target = args.target;
  options.fraction = args.fraction;
  options.lie = args.lie;
  options.keep_going = [] { return !stop_requested(); };
  options.seed_timeout = std::chrono::seconds(static_cast<int64_t>(args.seed_timeout_s));
  // Live lines: stdout, or stderr under --json (stdout then holds the JSON alone).
  options.report = [&](const std::string& line) { (args.json ? std::cerr : std::cout) << line << std::endl; };
  auto report = verify::run_verifier(options);
  if (!report.ok()) return fail("verify run", report.message(), report.error().exit_code);
  if (args.json) std::cout << report->dump(2) << std::endl;
  return 0;
}

int run_referee_command(const ChainRoleArgs& args) {
  init_logging("referee", "warn");
  install_stop_handlers();
  if (auto checked = check_role_args(args); !checked.ok()) return fail("verify referee", checked.message(), 2);
  if (!(args.for_s >= 0 && args.for_s <= 1e7))
    return fail("verify referee", fmt::format("--for must be ≥ 0 seconds, got {:g}", args.for_s), 2);
  auto view = read_summary(args.summary);
  if (!view.ok()) return fail("verify referee", view.message(), 2);
  auto market = open_market(args);
  if (!market.ok()) return fail("verify referee", market.message(), market.error().exit_code);
  auto key = NodeKey::load_or_create(args.data_dir);
  if (!key.ok()) return fail("verify referee", key.message(), 2);
  train::init_single_threaded();
  verify::RefereeOptions options;
  options.work_dir = std::filesystem::path(args.data_dir) / "referee";
  options.key = &*key;
  options.market = *market;
  options.chain_job = args.chain_job;
  options.job_id = view->job_id;
  options.members = view->members;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(args.for_s);
  options.keep_going = [&] {
    return !stop_requested() && (args.for_s <= 0 || std::chrono::steady_clock::now() < until);
  };
  // Live lines: stdout, or stderr under --json (stdout then holds the JSON alone).
  options.report = [&](const std::string& line) { (args.json ? std::cerr : std::cout) << line << std::endl; };
  auto rulings = verify::run_referee(options);
  if (!rulings.ok()) return fail("verify referee", rulings.message(), rulings.error().exit_code);
  if (args.json) std::cout << rulings->dump(2) << std::endl;
  return 0;
}

void add_chain_role_options(CLI::App* sub, ChainRoleArgs& args) {
  sub->add_option("--summary", args.summary, "The job's summary JSON (solvernet train/devnet --summary-json)")->required();
  sub->add_option("--chain-rpc", args.chain_rpc, "JSON-RPC URL of the settlement chain")->required();
  sub->add_option("--deployment", args.deployment, "The market's deployment JSON (default: the dev market at --chain-rpc)");
  sub->add_option("--chain-job", args.chain_job, "The job's id on the market")->required();
  sub->add_option("--data", args.data_dir, "Data dir: node key (signs evidence requests), chain key")->required();
  sub->add_flag("--json", args.json, "Print the report as JSON (no progress lines)");
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
      auto roles = std::make_shared<ChainRoleArgs>();
      auto* run = app.add_subcommand("run", "Be a job's verifier: take the seat the seed gives this key, replay the "
                                            "sampled segments, challenge a mismatch and play the dispute");
      add_chain_role_options(run, *roles);
      run->add_option("--q", roles->q, "Fraction of segments a cheater fakes, to catch …")->capture_default_str();
      run->add_option("--target", roles->target, "… with this probability")->capture_default_str();
      run->add_option("--fraction", roles->fraction, "Replay this fraction of segments instead (0: from --target)");
      run->add_option("--seat", roles->seat, "Verifier seat to take")->capture_default_str();
      run->add_option("--seed-timeout-s", roles->seed_timeout_s, "Wait this long for the commits and the seed")
          ->capture_default_str();
      run->add_flag("--lie", roles->lie, "Challenge honest work (tests)")->group("");
      auto* referee = app.add_subcommand("referee", "Be a job's referee: rule every dispute that reaches the referee's turn");
      add_chain_role_options(referee, *roles);
      referee->add_option("--for", roles->for_s, "Stop after this many seconds (default: until Ctrl-C)");
      add_insecure_flag(app);
      return [args, roles, odds, fetch, run] {
        if (odds->parsed()) return run_odds(*args);
        if (fetch->parsed()) return run_fetch(*args);
        if (run->parsed()) return run_verifier_command(*roles);
        return run_referee_command(*roles);
      };
    });

}  // namespace
}  // namespace sn::cli
