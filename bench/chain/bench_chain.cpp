// bench_chain: gas per SolverMarket operation and per honest job of N solvers, and
// client transactions per second, against a real anvil. JSON on stdout.
#include <chrono>
#include <iostream>
#include <thread>

#include "chain/chain.h"
#include "core/merkle.h"

using namespace sn;
using namespace sn::chain;

namespace {
constexpr Wei kEth = static_cast<Wei>(1000000000000000000ULL);

#define CHECK_OK(expr)                                                         \
  ({                                                                           \
    auto checked_ = (expr);                                                    \
    if (!checked_.ok()) {                                                      \
      std::cerr << "bench_chain: " #expr ": " << checked_.message() << "\n"; \
      std::exit(1);                                                            \
    }                                                                          \
    std::move(checked_).value();                                               \
  })

Hash256 word(uint64_t value) {
  Hash256 h{};
  for (int i = 0; i < 8; ++i) h[31 - i] = static_cast<uint8_t>(value >> (8 * i));
  return h;
}

uint64_t node_counter = 1;

MarketClient new_node(DevChain& chain, Wei stake, uint64_t* register_gas = nullptr) {
  Key key = Key::generate();
  if (auto funded = chain.fund(key.address(), 50 * kEth); !funded.ok()) {
    std::cerr << "bench_chain: " << funded.message() << "\n";
    std::exit(1);
  }
  MarketClient client(chain.rpc(), chain.deployment(), key);
  if (stake > 0) {
    auto receipt = CHECK_OK(client.register_node(word(node_counter++), stake));
    if (register_gas) *register_gas = receipt.gas_used;
  }
  return client;
}
}  // namespace

int main() {
  std::cerr << "bench_chain: starting anvil and deploying\n";
  auto chain = CHECK_OK(DevChain::start());
  nlohmann::json ops;
  uint64_t gas = 0;
  MarketClient submitter = new_node(*chain, 0);
  MarketClient solver = new_node(*chain, 10 * kEth, &gas);
  ops["register_and_stake"] = gas;
  ops["stake"] = CHECK_OK(solver.stake(kEth)).gas_used;
  MarketClient verifier = new_node(*chain, 10 * kEth);

  JobTerms terms;
  terms.solver_count = 1;
  terms.verifier_count = 1;
  terms.price_per_solver = kEth;
  terms.verifier_fee = kEth / 10;
  terms.stake_per_role = kEth;
  terms.challenge_window_blocks = 5;
  terms.referee = submitter.address();
  Receipt receipt;
  // The market's first job also creates the job counter (+17k once); measure a later one.
  CHECK_OK(submitter.post_job(terms, &receipt));
  ops["post_job_first_ever"] = receipt.gas_used;
  uint64_t job = CHECK_OK(submitter.post_job(terms, &receipt));
  ops["post_job_with_verifier_seat"] = receipt.gas_used;
  // A solver's commitment over 1025 step leaves (1024 steps): interim, then final.
  constexpr size_t kLeaves = 1025;
  constexpr uint64_t kOps = 4096;
  std::vector<Hash256> leaves, nodes;
  for (size_t t = 0; t < kLeaves; ++t) leaves.push_back(keccak256(word(1000 + t)));
  for (const auto& leaf : leaves) nodes.push_back(merkle_leaf(leaf, MerkleHash::keccak256));
  std::vector<Hash256> half(nodes.begin(), nodes.begin() + 513);
  ops["commit_first_interim"] =
      CHECK_OK(solver.commit(job, merkle_root(half, MerkleHash::keccak256), half.size(), false)).gas_used;
  ops["commit_final_after_interim"] =
      CHECK_OK(solver.commit(job, merkle_root(nodes, MerkleHash::keccak256), kLeaves, true)).gas_used;
  if (!chain->mine(2).ok()) return 1;  // the seed block and one after it
  ops["accept_verifier"] = CHECK_OK(verifier.accept(job)).gas_used;
  auto proof = [&](size_t index) { return merkle_proof(nodes, index, MerkleHash::keccak256).siblings; };
  uint64_t dispute =
      CHECK_OK(verifier.challenge(job, solver.address(), 0, leaves[0], proof(0), 1024, leaves[1024], proof(1024), kEth,
                                  &receipt));
  ops["challenge"] = receipt.gas_used;
  nlohmann::json step_rounds = nlohmann::json::array(), op_rounds = nlohmann::json::array();
  uint64_t solver_gas = 0, challenger_gas = receipt.gas_used;
  for (int round = 0;; ++round) {  // 1024 steps: 10 rounds to one step
    auto d = CHECK_OK(solver.dispute(dispute));
    if (d.stage != DisputeStage::step_claim) break;
    uint64_t mid = (d.lo + d.hi) / 2;
    auto claim = CHECK_OK(solver.claim_leaf(dispute, leaves[mid], proof(mid))).gas_used;
    auto bisect = CHECK_OK(verifier.bisect(dispute, round % 2 == 0)).gas_used;
    solver_gas += claim;
    challenger_gas += bisect;
    step_rounds.push_back({{"claim_leaf", claim}, {"bisect", bisect}});
  }
  auto posted = CHECK_OK(solver.post_ops(dispute, kOps, word(7), word(8), word(9), word(10))).gas_used;
  solver_gas += posted;
  ops["post_ops"] = posted;
  for (int round = 0;; ++round) {  // 4096 operations: 12 rounds to one operation
    auto d = CHECK_OK(solver.dispute(dispute));
    if (d.stage != DisputeStage::op_claim) break;
    auto claim = CHECK_OK(solver.claim_op(dispute, word(5000 + round))).gas_used;
    auto bisect = CHECK_OK(verifier.bisect(dispute, round % 2 == 1)).gas_used;
    solver_gas += claim;
    challenger_gas += bisect;
    op_rounds.push_back({{"claim_op", claim}, {"bisect", bisect}});
  }
  ops["dispute_step_rounds_1024_steps"] = step_rounds;
  ops["dispute_op_rounds_4096_ops"] = op_rounds;
  ops["resolve"] = CHECK_OK(submitter.resolve(dispute, true)).gas_used;
  ops["dispute_total_solver"] = solver_gas;
  ops["dispute_total_challenger"] = challenger_gas;
  if (!chain->mine(6).ok()) return 1;
  ops["finalize_1_solver_1_verifier"] = CHECK_OK(submitter.finalize(job)).gas_used;
  ops["withdraw"] = CHECK_OK(solver.withdraw()).gas_used;
  ops["unstake"] = CHECK_OK(solver.unstake(kEth)).gas_used;

  // Honest jobs of N = P·D solvers: what settlement costs beyond each solver's commit.
  nlohmann::json jobs = nlohmann::json::array();
  std::vector<MarketClient> solvers;
  for (int i = 0; i < 16; ++i) solvers.push_back(new_node(*chain, 10 * kEth));
  {
    for (uint16_t n : {1, 2, 4, 8, 16}) {
      std::cerr << "bench_chain: honest job with " << n << " solvers\n";
      // The submitter referees and there are no verifier seats: the job is two slots.
      JobTerms honest = terms;
      honest.solver_count = n;
      honest.verifier_count = 0;
      honest.verifier_fee = 0;
      honest.referee = {};
      honest.price_per_solver = kEth / 100;
      uint64_t id = CHECK_OK(submitter.post_job(honest, &receipt));
      uint64_t post = receipt.gas_used;
      uint64_t commits = 0;
      for (uint16_t i = 0; i < n; ++i)
        commits += CHECK_OK(solvers[i].commit(id, keccak256(word(i + 1)), 1025, true)).gas_used;
      if (!chain->mine(6).ok()) return 1;
      uint64_t finalize = CHECK_OK(submitter.finalize(id)).gas_used;
      jobs.push_back({{"solvers", n},
                      {"post", post},
                      {"commit_mean", commits / n},
                      {"finalize", finalize},
                      {"settlement_per_solver_beyond_commit", (post + finalize) / n}});
    }
  }

  // Client throughput: sequential sends, then 8 threads sharing one key.
  MarketClient busy = new_node(*chain, kEth);
  constexpr int kSequential = 100;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kSequential; ++i) CHECK_OK(busy.stake(1));
  double sequential_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  constexpr int kThreads = 8, kPerThread = 25;
  start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&] { for (int i = 0; i < kPerThread; ++i) CHECK_OK(busy.stake(1)); });
  for (auto& thread : threads) thread.join();
  double threaded_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  nlohmann::json out = {
      {"bench", "chain"},
      {"chain", "anvil (automine), SolverMarket compiled by solc 0.8.37 (optimizer 5000 runs, cancun)"},
      {"gas", ops},
      {"honest_jobs", jobs},
      {"targets", {{"commit_max", 60000}, {"dispute_round_max", 80000}, {"settlement_per_solver_beyond_commit_max", 40000}}},
      {"client_tx_per_s",
       {{"sequential", kSequential / sequential_s},
        {"threads_8_one_key", kThreads * kPerThread / threaded_s},
        {"note", "each send = estimateGas + gasPrice + sendRawTransaction + receipt poll"}}}};
  std::cout << out.dump(2) << std::endl;
  return 0;
}
