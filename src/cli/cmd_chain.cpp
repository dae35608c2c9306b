// solvernet chain up | deploy: a local settlement chain (anvil + SolverMarket), or
// the market deployed to any EVM chain.
#include <iostream>

#include "chain/chain.h"
#include "cli/command.h"
#include "cli/signals.h"

namespace sn::cli {
namespace {

struct ChainArgs {
  uint16_t port = 8545;
  std::string state_file;
  std::string deployment_file = "deployment.json";
  std::string rpc_url;
  std::string key_file;
  uint64_t unbonding_blocks = 20;
  uint64_t turn_blocks = 10;
};

int run_up(const ChainArgs& args) {
  block_stop_signals();
  chain::DevChainOptions options;
  options.port = args.port;
  options.state_file = args.state_file;
  options.deploy.unbonding_blocks = args.unbonding_blocks;
  options.deploy.turn_blocks = args.turn_blocks;
  auto dev = chain::DevChain::start(options);
  if (!dev.ok()) return fail("chain up", dev.message(), dev.error().exit_code);
  auto saved = (*dev)->deployment().save(args.deployment_file);
  if (!saved.ok()) return fail("chain up", saved.message());
  const auto& d = (*dev)->deployment();
  std::cout << fmt::format("chain up: anvil at {} (chain id {}), SolverMarket at {}\n", (*dev)->rpc_url(),
                           d.chain_id, chain::address_hex(d.market))
            << fmt::format("deployment written to {}; funded dev account {}\n", args.deployment_file,
                           chain::address_hex(chain::anvil_funded_key().address()))
            << "Ctrl-C stops the chain" << (args.state_file.empty() ? "" : " and saves its state") << std::endl;
  wait_for_stop_signal();
  return 0;
}

int run_deploy(const ChainArgs& args) {
  auto key = chain::Key::load(args.key_file);
  if (!key.ok()) return fail("chain deploy", key.message(), key.error().exit_code);
  auto rpc = std::make_shared<chain::RpcClient>(args.rpc_url);
  chain::DeployOptions options;
  options.unbonding_blocks = args.unbonding_blocks;
  options.turn_blocks = args.turn_blocks;
  auto deployment = chain::deploy_market(rpc, *key, options);
  if (!deployment.ok()) return fail("chain deploy", deployment.message());
  auto saved = deployment->save(args.deployment_file);
  if (!saved.ok()) return fail("chain deploy", saved.message());
  std::cout << deployment->to_json().dump(2) << std::endl;
  return 0;
}

void add_delay_options(CLI::App* sub, ChainArgs& args) {
  sub->add_option("--deployment", args.deployment_file, "Where to write the deployment JSON")->capture_default_str();
  sub->add_option("--unbonding-blocks", args.unbonding_blocks, "Blocks before unstaked value is withdrawable")
      ->capture_default_str();
  sub->add_option("--turn-blocks", args.turn_blocks, "Blocks a dispute party has for its turn")->capture_default_str();
}

CommandRegistration chain_command(
    "chain", "Run a local settlement chain (anvil) or deploy the market to an EVM chain",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<ChainArgs>();
      app.require_subcommand(1);
      auto* up = app.add_subcommand("up", "Start anvil on 127.0.0.1, deploy SolverMarket, run until Ctrl-C");
      up->add_option("--port", args->port, "RPC port")->check(CLI::Range(1, 65535))->capture_default_str();
      up->add_option("--state", args->state_file, "Load the chain from FILE if it exists and save it there on exit");
      add_delay_options(up, *args);
      auto* deploy = app.add_subcommand("deploy", "Deploy SolverMarket to any EVM chain");
      deploy->add_option("--rpc", args->rpc_url, "JSON-RPC URL")->required();
      deploy->add_option("--key", args->key_file, "Deployer key file (hex secret)")->required();
      add_delay_options(deploy, *args);
      return [args, up] { return up->parsed() ? run_up(*args) : run_deploy(*args); };
    });

}  // namespace
}  // namespace sn::cli
