#include "cli/settlement.h"

#include <iostream>
#include <map>

#include "chain/chain.h"
#include "core/hash.h"

namespace sn::cli {

namespace {
constexpr chain::Wei kEth = static_cast<chain::Wei>(1000000000000000000ULL);
const chain::Wei kNodeFunds = 100 * kEth;
const chain::Wei kNodeStake = 10 * kEth;
const chain::Wei kPricePerSolver = 1 * kEth;
const chain::Wei kStakePerRole = 1 * kEth;

Result<Hash256> hash_from_hex(const std::string& hex) {
  SN_ASSIGN(std::string raw, from_hex(hex));
  if (raw.size() != 32) return make_error("expected a 32-byte hex hash, got {} bytes", raw.size());
  Hash256 h;
  std::copy(raw.begin(), raw.end(), h.begin());
  return h;
}
}  // namespace

struct DevnetSettlement::Impl {
  std::unique_ptr<chain::DevChain> chain;
  std::unique_ptr<chain::MarketClient> submitter;
  std::map<std::string, std::unique_ptr<chain::MarketClient>> nodes;  // by node id
  uint32_t window_blocks = 5;
};

DevnetSettlement::~DevnetSettlement() = default;

std::string DevnetSettlement::rpc_url() const { return impl_->chain->rpc_url(); }

Result<std::unique_ptr<DevnetSettlement>> DevnetSettlement::start(const std::filesystem::path& dir,
                                                                  const std::vector<SettlementNode>& nodes) {
  std::unique_ptr<DevnetSettlement> s(new DevnetSettlement());
  s->impl_ = std::make_unique<Impl>();
  chain::DevChainOptions options;
  options.log_file = dir / "anvil.log";
  SN_ASSIGN(s->impl_->chain, chain::DevChain::start(options));
  auto& dev = *s->impl_->chain;
  SN_ASSIGN(chain::Key submitter_key, dev.node_key(dir / "submitter", kNodeFunds));
  s->impl_->submitter = std::make_unique<chain::MarketClient>(dev.rpc(), dev.deployment(), submitter_key,
                                                              dir / "submitter" / "chain.journal");
  for (const auto& node : nodes) {
    SN_TRY(dev.node_key(node.data_dir, kNodeFunds));
    SN_ASSIGN(auto client, chain::MarketClient::for_data_dir(dev.rpc(), dev.deployment(), node.data_dir));
    SN_ASSIGN(Hash256 id, hash_from_hex(node.node_id));
    auto registered = client.register_node(id, kNodeStake);
    if (!registered.ok()) return make_error("staking node {}: {}", node.node_id.substr(0, 8), registered.message());
    s->impl_->nodes[node.node_id] = std::make_unique<chain::MarketClient>(std::move(client));
  }
  return s;
}

Result<uint64_t> DevnetSettlement::post_job(int solvers, const std::string& job_name) {
  chain::JobTerms terms;
  terms.solver_count = static_cast<uint16_t>(solvers);
  terms.price_per_solver = kPricePerSolver;
  terms.stake_per_role = kStakePerRole;
  terms.challenge_window_blocks = impl_->window_blocks;
  terms.referee = impl_->submitter->address();
  terms.spec = hash_string(job_name);
  return impl_->submitter->post_job(terms);
}

Status DevnetSettlement::commit_and_finalize(uint64_t job_id, const std::vector<std::string>& solver_node_ids,
                                             const std::vector<std::string>& roots_hex, uint64_t leaf_count) {
  for (size_t i = 0; i < solver_node_ids.size(); ++i) {
    auto it = impl_->nodes.find(solver_node_ids[i]);
    if (it == impl_->nodes.end()) return make_error("node {} is not staked", solver_node_ids[i].substr(0, 8));
    SN_ASSIGN(Hash256 root, hash_from_hex(roots_hex.at(i)));
    auto committed = it->second->commit(job_id, root, leaf_count, true);
    if (!committed.ok()) return make_error("node {} could not commit: {}", solver_node_ids[i].substr(0, 8), committed.message());
  }
  SN_TRY(impl_->chain->mine(impl_->window_blocks + 1));
  auto finalized = impl_->submitter->finalize(job_id);
  if (!finalized.ok()) return make_error("finalize: {}", finalized.message());
  return ok_status();
}

Result<nlohmann::json> DevnetSettlement::balances() const {
  nlohmann::json out = nlohmann::json::object();
  auto entry = [](chain::MarketClient& c) -> Result<nlohmann::json> {
    SN_ASSIGN(chain::Wei balance, c.balance_of(c.address()));
    SN_ASSIGN(chain::Wei staked, c.stake_of(c.address()));
    SN_ASSIGN(chain::Wei withdrawable, c.withdrawable_of(c.address()));
    return nlohmann::json{{"address", chain::address_hex(c.address())},
                          {"balance", chain::wei_to_string(balance)},
                          {"staked", chain::wei_to_string(staked)},
                          {"withdrawable", chain::wei_to_string(withdrawable)}};
  };
  for (auto& [id, client] : impl_->nodes) {
    SN_ASSIGN(out[id], entry(*client));
  }
  SN_ASSIGN(out["submitter"], entry(*impl_->submitter));
  return out;
}

void print_balances(const nlohmann::json& before, const nlohmann::json& after) {
  auto eth = [](const nlohmann::json& wei) {
    // Wei as a decimal string → ETH with 4 decimals, without floating-point loss on the integer part.
    std::string s = wei.get<std::string>();
    while (s.size() < 19) s = "0" + s;
    return s.substr(0, s.size() - 18) + "." + s.substr(s.size() - 18, 4);
  };
  std::cout << "\n  settlement (ETH)       balance before → after   staked   payout due\n";
  for (auto& [who, a] : after.items()) {
    if (!before.contains(who)) continue;
    std::string name = who == "submitter" ? "submitter" : "node " + who.substr(0, 8);
    std::cout << fmt::format("  {:<22} {:>9} → {:<9}   {:>6}   {:>6}\n", name, eth(before[who]["balance"]),
                             eth(a["balance"]), eth(a["staked"]), eth(a["withdrawable"]));
  }
}

}  // namespace sn::cli
