// solvernet wallet: keys, balances, transfers and stakes on the settlement chain.
#include <iostream>

#include "chain/chain.h"
#include "cli/command.h"

namespace sn::cli {
namespace {

struct WalletArgs {
  std::string rpc_url;
  std::string deployment_file = "deployment.json";
  std::string key_file;
  std::string out_file;
  std::string address;
  std::string to;
  std::string amount;
  bool json = false;
};

// The deployment (from --deployment) with the RPC URL from --rpc if given; with --rpc
// and no deployment file, the market `chain up` deployed on that dev chain.
Result<chain::Deployment> load_deployment(const WalletArgs& args) {
  if (!args.rpc_url.empty() && !std::filesystem::exists(args.deployment_file))
    return chain::find_dev_deployment(std::make_shared<chain::RpcClient>(args.rpc_url));
  auto deployment = chain::Deployment::load(args.deployment_file);
  if (!deployment.ok())
    return input_error("{} (start a chain with `solvernet chain up` or pass --deployment)", deployment.message());
  if (!args.rpc_url.empty()) deployment->rpc_url = args.rpc_url;
  if (deployment->rpc_url.empty()) return input_error("no RPC URL: pass --rpc");
  return deployment;
}

Result<chain::MarketClient> client_for(const WalletArgs& args, const chain::Key& key) {
  SN_ASSIGN(auto deployment, load_deployment(args));
  auto rpc = std::make_shared<chain::RpcClient>(deployment.rpc_url);
  return chain::MarketClient(rpc, deployment, key);
}

int run_new(const WalletArgs& args) {
  if (std::filesystem::exists(args.out_file)) return fail("wallet new", args.out_file + " exists; not overwriting", 2);
  auto key = chain::Key::generate();
  auto saved = key.save(args.out_file);
  if (!saved.ok()) return fail("wallet new", saved.message());
  std::cout << chain::address_hex(key.address()) << std::endl;
  return 0;
}

int run_balance(const WalletArgs& args) {
  chain::Address address{};
  if (!args.key_file.empty()) {
    auto key = chain::Key::load(args.key_file);
    if (!key.ok()) return fail("wallet balance", key.message(), 2);
    address = key->address();
  } else {
    if (args.address.empty()) return fail("wallet balance", "pass --key KEY or --address A", 2);
    auto parsed = chain::parse_address(args.address);
    if (!parsed.ok()) return fail("wallet balance", parsed.message(), 2);
    address = *parsed;
  }
  auto market = client_for(args, chain::Key::generate());
  if (!market.ok()) return fail("wallet balance", market.message(), market.error().exit_code);
  auto balance = market->balance_of(address);
  auto staked = market->stake_of(address);
  auto withdrawable = market->withdrawable_of(address);
  if (!balance.ok() || !staked.ok() || !withdrawable.ok())
    return fail("wallet balance", !balance.ok() ? balance.message() : !staked.ok() ? staked.message() : withdrawable.message());
  if (args.json) {
    std::cout << nlohmann::json{{"address", chain::address_hex(address)},
                                {"balance", chain::wei_to_string(*balance)},
                                {"staked", chain::wei_to_string(*staked)},
                                {"withdrawable", chain::wei_to_string(*withdrawable)}}
                     .dump()
              << std::endl;
  } else {
    std::cout << fmt::format("{}\n  balance      {} wei\n  staked       {} wei (free, not locked in a job)\n"
                             "  withdrawable {} wei\n",
                             chain::address_hex(address), chain::wei_to_string(*balance),
                             chain::wei_to_string(*staked), chain::wei_to_string(*withdrawable));
  }
  return 0;
}

// fund | send | stake | unstake: one transaction from a key.
int run_transaction(const std::string& verb, const WalletArgs& args) {
  const std::string command = "wallet " + verb;
  // Every argument is checked before the chain is contacted: a bad one sends nothing.
  // Amounts go out as uint128 (msg.value, unstake(uint128)), so parse_wei's default bound.
  Result<chain::Wei> amount = chain::Wei{0};
  if (verb != "withdraw") amount = chain::parse_wei(args.amount);
  if (!amount.ok()) return fail(command, "--amount: " + amount.message(), 2);
  Result<chain::Address> to = chain::Address{};
  if (verb == "fund" || verb == "send") to = chain::parse_address(args.to);
  if (!to.ok()) return fail(command, "--to: " + to.message(), 2);
  chain::Key key = chain::anvil_funded_key();
  if (verb != "fund") {
    auto loaded = chain::Key::load(args.key_file);
    if (!loaded.ok()) return fail(command, loaded.message(), 2);
    key = *loaded;
  }
  auto market = client_for(args, key);
  if (!market.ok()) return fail(command, market.message(), market.error().exit_code);
  Result<chain::Receipt> receipt = make_error("unknown verb");
  if (verb == "fund" || verb == "send") {
    if (verb == "fund" && market->deployment().chain_id != 31337)
      return fail(command, "fund works on dev chains only (chain id 31337)", 2);
    receipt = market->wallet().send(*to, *amount, {});
  } else if (verb == "stake") {
    auto registered = market->is_registered(key.address());
    if (!registered.ok()) return fail(command, registered.message());
    // The first stake binds the address to itself as node id; `solvernet node` binds its own.
    Hash256 node_id{};
    std::copy(key.address().begin(), key.address().end(), node_id.begin() + 12);
    receipt = *registered ? market->stake(*amount) : market->register_node(node_id, *amount);
  } else if (verb == "unstake") {
    receipt = market->unstake(*amount);
  } else if (verb == "withdraw") {
    receipt = market->withdraw();
  }
  if (!receipt.ok()) return fail(command, receipt.message());
  if (args.json)
    std::cout << nlohmann::json{{"tx", receipt->tx_hash}, {"block", receipt->block}, {"gas_used", receipt->gas_used}}.dump()
              << std::endl;
  else
    std::cout << fmt::format("{} in block {} ({} gas)", receipt->tx_hash, receipt->block, receipt->gas_used) << std::endl;
  return 0;
}

// Market events that name the address, oldest first.
int run_history(const WalletArgs& args) {
  chain::Address address{};
  if (!args.key_file.empty()) {
    auto key = chain::Key::load(args.key_file);
    if (!key.ok()) return fail("wallet history", key.message(), 2);
    address = key->address();
  } else {
    if (args.address.empty()) return fail("wallet history", "pass --key KEY or --address A", 2);
    auto parsed = chain::parse_address(args.address);
    if (!parsed.ok()) return fail("wallet history", parsed.message(), 2);
    address = *parsed;
  }
  auto deployment = load_deployment(args);
  if (!deployment.ok()) return fail("wallet history", deployment.message(), deployment.error().exit_code);
  chain::RpcClient rpc(deployment->rpc_url);
  auto logs = rpc.call("eth_getLogs", {{{"address", chain::address_hex(deployment->market)},
                                        {"fromBlock", fmt::format("0x{:x}", deployment->deploy_block)},
                                        {"toBlock", "latest"}}});
  if (!logs.ok()) return fail("wallet history", logs.message());
  std::map<std::string, std::string> names;
  for (std::string_view event : chain::market_events())
    names[chain::hex0x(chain::keccak256(as_bytes(event)))] = std::string(event.substr(0, event.find('(')));
  std::string padded = "0x000000000000000000000000" + chain::address_hex(address).substr(2);
  nlohmann::json out = nlohmann::json::array();
  if (!logs->is_array()) return fail("wallet history", "RPC answer: eth_getLogs result is not an array");
  for (const auto& log : *logs) {
    if (!log.is_object() || !log.contains("topics") || !log["topics"].is_array() || log["topics"].empty()) continue;
    bool mentions = false;
    for (const auto& topic : log["topics"]) mentions |= topic.is_string() && topic.get<std::string>() == padded;
    std::string data = log.value("data", "");
    mentions |= data.find(padded.substr(2)) != std::string::npos;
    if (!mentions) continue;
    std::string topic0 = log["topics"][0].is_string() ? log["topics"][0].get<std::string>() : "";
    auto name = names.count(topic0) ? names[topic0] : topic0;
    out.push_back({{"event", name}, {"block", log.value("blockNumber", "")}, {"tx", log.value("transactionHash", "")}});
  }
  if (args.json) {
    std::cout << out.dump(2) << std::endl;
  } else {
    for (const auto& entry : out)
      std::cout << fmt::format("{:<10} {:<18} {}\n", entry["block"].get<std::string>(), entry["event"].get<std::string>(),
                               entry["tx"].get<std::string>());
    std::cout << out.size() << " event(s)" << std::endl;
  }
  return 0;
}

CommandRegistration wallet_command(
    "wallet", "Keys, balances, transfers and stakes on the settlement chain (amounts in wei, gwei or eth)",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<WalletArgs>();
      app.require_subcommand(1);
      auto common = [&](CLI::App* sub) {
        sub->add_option("--rpc", args->rpc_url, "JSON-RPC URL (default: the deployment's)");
        sub->add_option("--deployment", args->deployment_file,
                        "Deployment JSON from `chain up`/`chain deploy`; if it does not exist and --rpc is given, "
                        "the market `chain up` deployed on that dev chain")
            ->capture_default_str();
        sub->add_flag("--json", args->json, "Print JSON");
      };
      auto* create = app.add_subcommand("new", "Create a key file; prints the address as its last line");
      create->add_option("--out", args->out_file, "Key file to write (mode 0600)")->required();
      auto* balance = app.add_subcommand("balance", "Balance, free stake and withdrawable payouts");
      auto* history = app.add_subcommand("history", "Market events that name an address");
      for (auto* sub : {balance, history}) {
        common(sub);
        auto* key = sub->add_option("--key", args->key_file, "Key file");
        auto* address = sub->add_option("--address", args->address, "Address 0x...");
        key->excludes(address);
      }
      std::vector<std::pair<std::string, CLI::App*>> transactions;
      for (std::string verb : {"fund", "send", "stake", "unstake", "withdraw"}) {
        const char* what = verb == "fund"      ? "Send from anvil's funded account (dev chains only)"
                           : verb == "send"    ? "Send wei to an address"
                           : verb == "stake"   ? "Stake (registering the key as a node on first use)"
                           : verb == "unstake" ? "Start unbonding part of the free stake"
                                               : "Withdraw payouts and unbonded stake";
        auto* sub = app.add_subcommand(verb, what);
        common(sub);
        if (verb != "fund") sub->add_option("--key", args->key_file, "Key file")->required();
        if (verb == "fund" || verb == "send") sub->add_option("--to", args->to, "Recipient address")->required();
        if (verb != "withdraw") sub->add_option("--amount", args->amount, "Amount: N wei, or with a unit: 2.5gwei, 0.1eth (at most 2^128 − 1 wei)")->required();
        transactions.emplace_back(verb, sub);
      }
      return [args, create, balance, history, transactions] {
        if (create->parsed()) return run_new(*args);
        if (balance->parsed()) return run_balance(*args);
        if (history->parsed()) return run_history(*args);
        for (const auto& [verb, sub] : transactions)
          if (sub->parsed()) return run_transaction(verb, *args);
        return fail("wallet", "no subcommand", 2);
      };
    });

}  // namespace
}  // namespace sn::cli
