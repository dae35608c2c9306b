#include "cli/settlement.h"

#include <iostream>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "chain/chain.h"
#include "core/hash.h"

namespace sn::cli {

namespace {
constexpr chain::Wei kEth = static_cast<chain::Wei>(1000000000000000000ULL);
const chain::Wei kNodeFunds = 100 * kEth;
const chain::Wei kNodeStake = 10 * kEth;
const chain::Wei kPricePerSolver = 1 * kEth;
const chain::Wei kVerifierFee = kEth / 10;
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
  std::shared_ptr<chain::MarketClient> submitter;
  std::map<std::string, std::shared_ptr<chain::MarketClient>> nodes;  // by node id
  std::map<std::string, std::filesystem::path> dirs;                  // by node id
  // Long enough for a verifier to replay and challenge while the block clock
  // runs (one block a second); the devnet mines the rest at the end.
  uint32_t window_blocks = 300;
  std::thread clock;
  std::mutex clock_mutex;
  std::condition_variable clock_wake;
  bool clock_stopping = false;
  // Waits PERIOD or until stopped; true when stopped.
  bool clock_wait(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds period) {
    return clock_wake.wait_for(lock, period, [&] { return clock_stopping; });
  }
};

DevnetSettlement::~DevnetSettlement() { stop_block_clock(); }

void DevnetSettlement::start_block_clock(std::chrono::milliseconds period) {
  stop_block_clock();
  impl_->clock_stopping = false;
  impl_->clock = std::thread([impl = impl_.get(), period] {
    std::unique_lock<std::mutex> lock(impl->clock_mutex);
    while (!impl->clock_wait(lock, period)) {
      lock.unlock();
      // A failed tick (anvil gone) ends in the caller's own chain errors.
      (void)impl->chain->mine(1);
      lock.lock();
    }
  });
}

void DevnetSettlement::stop_block_clock() {
  if (!impl_ || !impl_->clock.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(impl_->clock_mutex);
    impl_->clock_stopping = true;
  }
  impl_->clock_wake.notify_all();
  impl_->clock.join();
}

std::string DevnetSettlement::rpc_url() const { return impl_->chain->rpc_url(); }
std::shared_ptr<chain::MarketClient> DevnetSettlement::submitter() const { return impl_->submitter; }

Result<std::shared_ptr<chain::MarketClient>> DevnetSettlement::node_client(const std::string& node_id) const {
  auto it = impl_->dirs.find(node_id);
  if (it == impl_->dirs.end()) return make_error("node {} is not staked", node_id.substr(0, 8));
  SN_ASSIGN(chain::Key key, chain::Key::load(it->second / "chain.key"));
  return std::make_shared<chain::MarketClient>(impl_->chain->rpc(), impl_->chain->deployment(), key,
                                               it->second / "verifier.journal");
}

std::string DevnetSettlement::node_of_address(const std::string& address) const {
  for (const auto& [id, client] : impl_->nodes)
    if (chain::address_hex(client->address()) == address) return id;
  return "";
}

Result<std::unique_ptr<DevnetSettlement>> DevnetSettlement::start(const std::filesystem::path& dir,
                                                                  const std::vector<SettlementNode>& nodes) {
  std::unique_ptr<DevnetSettlement> s(new DevnetSettlement());
  s->impl_ = std::make_unique<Impl>();
  chain::DevChainOptions options;
  options.log_file = dir / "anvil.log";
  SN_ASSIGN(s->impl_->chain, chain::DevChain::start(options));
  auto& dev = *s->impl_->chain;
  SN_ASSIGN(chain::Key submitter_key, dev.node_key(dir / "submitter", kNodeFunds));
  s->impl_->submitter = std::make_shared<chain::MarketClient>(dev.rpc(), dev.deployment(), submitter_key,
                                                              dir / "submitter" / "chain.journal");
  for (const auto& node : nodes) {
    SN_TRY(dev.node_key(node.data_dir, kNodeFunds));
    // Registration has a journal of its own: the node process keeps DATA/chain.journal for its commits.
    SN_ASSIGN(chain::Key key, chain::Key::load(node.data_dir / "chain.key"));
    auto client = std::make_shared<chain::MarketClient>(dev.rpc(), dev.deployment(), key,
                                                        node.data_dir / "devnet.journal");
    SN_ASSIGN(Hash256 id, hash_from_hex(node.node_id));
    auto registered = client->register_node(id, kNodeStake);
    if (!registered.ok()) return make_error("staking node {}: {}", node.node_id.substr(0, 8), registered.message());
    s->impl_->nodes[node.node_id] = client;
    s->impl_->dirs[node.node_id] = node.data_dir;
  }
  return s;
}

Result<uint64_t> DevnetSettlement::post_job(int solvers, int verifiers, const std::string& job_name) {
  chain::JobTerms terms;
  terms.solver_count = static_cast<uint16_t>(solvers);
  terms.verifier_count = static_cast<uint16_t>(verifiers);
  terms.price_per_solver = kPricePerSolver;
  terms.verifier_fee = verifiers > 0 ? kVerifierFee : 0;
  terms.stake_per_role = kStakePerRole;
  terms.commit_blocks = 100000;  // commits come when training ends, however long it takes
  terms.challenge_window_blocks = impl_->window_blocks;
  terms.referee = impl_->submitter->address();
  terms.spec = hash_string(job_name);
  return impl_->submitter->post_job(terms);
}

Status DevnetSettlement::wait_for_final_commits(uint64_t job_id, double timeout_s) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    SN_ASSIGN(chain::JobState job, impl_->submitter->job(job_id));
    if (job.all_final) break;
    if (std::chrono::steady_clock::now() >= until)
      return make_error("only {} of {} solvers committed final within {:.0f} s (see the nodes' logs)", job.committed,
                        job.solver_count, timeout_s);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  // The verifier seed is the hash of the block after the last commit.
  return impl_->chain->mine(2);
}

Status DevnetSettlement::finalize(uint64_t job_id) {
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
