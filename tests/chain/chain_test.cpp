// The chain client against a real anvil started here, plus offline encodings.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "chain/chain.h"
#include "core/fs.h"
#include "core/merkle.h"
#include "core/process.h"

using namespace sn;
using namespace sn::chain;

namespace {
constexpr Wei kEth = static_cast<Wei>(1000000000000000000ULL);

Hash256 word(uint8_t fill) {
  Hash256 h{};
  h.fill(fill);
  return h;
}

// A fresh key funded with 100 ETH on CHAIN, registered as node WORD(ID) with
// STAKE (not registered if STAKE is 0).
MarketClient funded_client(DevChain& chain, uint8_t id, Wei stake) {
  Key key = Key::generate();
  EXPECT_TRUE(chain.fund(key.address(), 100 * kEth).ok());
  MarketClient client(chain.rpc(), chain.deployment(), key);
  if (stake > 0) {
    auto registered = client.register_node(word(id), stake);
    EXPECT_TRUE(registered.ok()) << registered.message();
  }
  return client;
}

// One anvil for the whole suite: starting it is the slow part.
class ChainTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto chain = DevChain::start();
    ASSERT_TRUE(chain.ok()) << chain.message();
    chain_ = std::move(chain).value().release();
  }
  static void TearDownTestSuite() { delete chain_; }

  MarketClient funded_node(uint8_t id, Wei stake) { return funded_client(*chain_, id, stake); }
  static DevChain* chain_;
};
DevChain* ChainTest::chain_ = nullptr;
}  // namespace

TEST(ChainEncoding, KeccakRlpAbiMatchKnownVectors) {
  EXPECT_EQ(to_hex(keccak256(std::span<const uint8_t>{})), "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
  std::string dog = "dog";
  EXPECT_EQ(to_hex(rlp::encode_bytes(as_bytes(dog))), "83646f67");
  EXPECT_EQ(to_hex(rlp::encode_list({rlp::encode_bytes(as_bytes("cat")), rlp::encode_bytes(as_bytes(dog))})),
            "c88363617483646f67");
  EXPECT_EQ(to_hex(rlp::encode_uint(0)), "80");
  EXPECT_EQ(to_hex(rlp::encode_uint(1024)), "820400");
  EXPECT_EQ(to_hex(chain::abi::selector("transfer(address,uint256)")), "a9059cbb");
  EXPECT_EQ(address_hex(anvil_funded_key().address()), "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266");
  EXPECT_EQ(wei_to_string(*parse_wei("3eth")), "3000000000000000000");
  EXPECT_FALSE(parse_wei("12a").ok());
}

// Issue 15 kind 1: amounts are parsed against the type they end up in; nothing wraps.
TEST(ChainEncoding, AmountsAreCheckedNotWrapped) {
  EXPECT_EQ(wei_to_string(*parse_wei("1000")), "1000");
  EXPECT_EQ(wei_to_string(*parse_wei("1000wei")), "1000");
  EXPECT_EQ(wei_to_string(*parse_wei("2.5gwei")), "2500000000");
  EXPECT_EQ(wei_to_string(*parse_wei("0.1eth")), "100000000000000000");
  EXPECT_EQ(wei_to_string(*parse_wei("1.5 ether")), "1500000000000000000");
  EXPECT_EQ(wei_to_string(*parse_wei("0.000000000000000001eth")), "1");
  EXPECT_EQ(wei_to_string(*parse_wei("1.000000000000000000000eth")), "1000000000000000000");  // zeros below a wei
  EXPECT_EQ(*parse_wei("340282366920938463463374607431768211455"), kMaxWei);
  EXPECT_EQ(wei_to_eth_string(kMaxWei), "340282366920938463463.374607431768211455");
  // The example wrapped modulo 2^128 to 0.625 ETH.
  for (const char* too_large : {"340282366920938463464eth", "340282366920938463463374607431768211456",
                                "99999999999999999999999999999999999999999999999999", "1e40"}) {
    auto parsed = parse_wei(too_large);
    ASSERT_FALSE(parsed.ok()) << too_large;
    EXPECT_EQ(parsed.error().exit_code, 2);
  }
  EXPECT_NE(parse_wei("340282366920938463464eth").message().find("at most 340282366920938463463374607431768211455 wei"),
            std::string::npos);
  EXPECT_NE(parse_wei("-1").message().find("negative"), std::string::npos);
  EXPECT_NE(parse_wei("0.5").message().find("fraction of a wei"), std::string::npos);
  EXPECT_NE(parse_wei("1.0000000001gwei").message().find("fraction of a wei"), std::string::npos);
  for (const char* malformed : {"", "eth", ".", "1.2.3", "+1", "0x10", "1,000", "1 2", "one", "1eth2", "1wei eth"})
    EXPECT_EQ(parse_wei(malformed).error().exit_code, 2) << malformed;
  // A job's price is a uint96 in the contract: the bound is the caller's.
  EXPECT_EQ(*parse_wei("79228162514264337593543950335", kMaxPricePerSolver), kMaxPricePerSolver);
  EXPECT_FALSE(parse_wei("79228162514264337593543950336", kMaxPricePerSolver).ok());
}

TEST(ChainEncoding, KeyFileRoundTripsAndRejectsGarbage) {
  auto dir = std::filesystem::temp_directory_path() / ("sn-chain-key-" + std::to_string(getpid()));
  auto key = Key::load_or_create(dir / "chain.key");
  ASSERT_TRUE(key.ok()) << key.message();
  auto again = Key::load_or_create(dir / "chain.key");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(key->address(), again->address());
  ASSERT_TRUE(write_file_atomic(dir / "bad.key", "not a key\n").ok());
  EXPECT_FALSE(Key::load(dir / "bad.key").ok());
  std::filesystem::remove_all(dir);
}

// A server that answers every request with BODY, to play a hostile RPC endpoint.
static void serve_garbage(int listener, std::string body, std::atomic<bool>* stop) {
  while (!*stop) {
    int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) return;
    char buffer[4096];
    (void)read(fd, buffer, sizeof buffer);
    std::string answer = "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(body.size()) +
                         "\r\nConnection: close\r\n\r\n" + body;
    (void)write(fd, answer.data(), answer.size());
    close(fd);
  }
}

TEST(ChainRpc, HostileAnswersAreErrorsNotCrashes) {
  EXPECT_FALSE(RpcClient("http://127.0.0.1:1", 1000).chain_id().ok());  // nobody listening
  // The last: a 68-bit quantity is a fine balance but no chain id (64 bits), not truncated.
  for (std::string body : {"{not json", "[]", "{\"result\": 12}", "{\"result\": \"0xzz\"}",
                           "{\"error\": {\"message\": \"boom\", \"data\": \"0x08c379a0\"}}",
                           "{\"result\": \"0x1234567890123456789012345678901234567890\"}",
                           "{\"result\": \"0x100000000000000001\"}"}) {
    const bool fits_a_balance = body.find("0x1000") != std::string::npos;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof addr;
    ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(listen(listener, 8), 0);
    getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &length);
    std::atomic<bool> stop{false};
    std::thread server(serve_garbage, listener, body, &stop);
    RpcClient rpc(fmt::format("http://127.0.0.1:{}", ntohs(addr.sin_port)), 2000);
    EXPECT_FALSE(rpc.chain_id().ok()) << body;
    EXPECT_EQ(rpc.balance(Address{}).ok(), fits_a_balance) << body;
    stop = true;
    shutdown(listener, SHUT_RDWR);
    close(listener);
    server.join();
  }
}

TEST_F(ChainTest, RevertComesBackAsTheContractsReason) {
  MarketClient a = funded_node(4, 5 * kEth);
  auto again = a.register_node(word(5), 0);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.message().find("address already registered"), std::string::npos) << again.message();
  auto unstake = a.unstake(50 * kEth);
  ASSERT_FALSE(unstake.ok());
  EXPECT_NE(unstake.message().find("amount exceeds free stake"), std::string::npos) << unstake.message();
}

TEST_F(ChainTest, EightThreadsShareOneKeyWithoutNonceErrors) {
  MarketClient node = funded_node(6, kEth);
  constexpr int kThreads = 8, kPerThread = 4;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        auto staked = node.stake(1000);
        if (!staked.ok()) {
          ++failures;
          ADD_FAILURE() << staked.message();
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(*node.stake_of(node.address()), kEth + kThreads * kPerThread * 1000);
}

// The same through a node's journal, half the sends named: each named action once, the
// journal left holding exactly the named ones, done.
TEST_F(ChainTest, EightThreadsShareOneJournal) {
  auto dir = std::filesystem::temp_directory_path() / ("sn-chain-threads-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  auto node = MarketClient::for_data_dir(chain_->rpc(), chain_->deployment(), dir);
  ASSERT_TRUE(node.ok()) << node.message();
  ASSERT_TRUE(chain_->fund(node->address(), 10 * kEth).ok());
  ASSERT_TRUE(node->register_node(word(11), kEth).ok());
  constexpr int kThreads = 8, kPerThread = 4;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        std::string name = i % 2 == 0 ? fmt::format("stake-{}-{}", t, i) : "";
        auto staked = node->stake(1000, name);
        EXPECT_TRUE(staked.ok()) << staked.message();
        if (!name.empty()) {  // asked again: the same receipt, no second stake
          auto again = node->stake(1000, name);
          ASSERT_TRUE(again.ok()) << again.message();
          EXPECT_EQ(again->tx_hash, staked->tx_hash);
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(*node->stake_of(node->address()), kEth + kThreads * kPerThread * 1000);
  auto journal = nlohmann::json::parse(*read_file(dir / "chain.journal"));
  EXPECT_EQ(journal.size(), static_cast<size_t>(kThreads * kPerThread / 2));
  for (const auto& [key, entry] : journal.items()) {
    EXPECT_TRUE(key.starts_with("action:stake-")) << key;
    EXPECT_TRUE(entry.value("done", false)) << key;
  }
  std::filesystem::remove_all(dir);
}

TEST_F(ChainTest, RestartedWalletPicksUpTheChainsNonce) {
  Key key = Key::generate();
  ASSERT_TRUE(chain_->fund(key.address(), 10 * kEth).ok());
  {
    MarketClient first(chain_->rpc(), chain_->deployment(), key);
    ASSERT_TRUE(first.register_node(word(7), kEth).ok());
    ASSERT_TRUE(first.stake(1).ok());
  }
  MarketClient restarted(chain_->rpc(), chain_->deployment(), key);  // as after a crash
  ASSERT_TRUE(restarted.stake(2).ok());
  EXPECT_EQ(*restarted.stake_of(key.address()), kEth + 3);
  // A repeated action after a restart is refused by the contract, not applied twice.
  auto again = restarted.register_node(word(7), 0);
  EXPECT_FALSE(again.ok());
}

// The same fixed vector as contracts/test/SolverMarket.t.sol (and js-sha3): C++'s Keccak
// Merkle tree, proofs and operation-chain hashes are the ones the contract checks.
TEST(ChainEncoding, MerkleVectorMatchesTheContracts) {
  auto word_of = [](uint64_t t) {
    Hash256 w{};
    for (int i = 0; i < 8; ++i) w[31 - i] = static_cast<uint8_t>(t >> (8 * i));
    return w;
  };
  std::vector<Hash256> leaves, nodes;
  for (uint64_t t = 0; t < 5; ++t) leaves.push_back(keccak256(word_of(t)));
  for (const auto& leaf : leaves) nodes.push_back(merkle_leaf(leaf, MerkleHash::keccak256));
  EXPECT_EQ(to_hex(merkle_root(nodes, MerkleHash::keccak256)),
            "e9f03fd6cde449589c5ae1a7372890d88446d3dbcd1b5301da3ea99f6920d219");
  auto proof3 = merkle_proof(nodes, 3, MerkleHash::keccak256).siblings;
  ASSERT_EQ(proof3.size(), 3u);
  EXPECT_EQ(to_hex(proof3[0]), "210a0ee75c46d1c8fb508605584c276bec6f4735d7ce19240d7d496ce976e0ca");
  EXPECT_EQ(to_hex(proof3[1]), "61c40257bd5978001c0f6f1747fbccdffcfe3609e95e369bfa67c33f50a508ac");
  EXPECT_EQ(to_hex(proof3[2]), "786148dd307b9413b66143d77f7b9467c8988b949ad78f00f204904a1aee5916");
  auto proof4 = merkle_proof(nodes, 4, MerkleHash::keccak256).siblings;  // carried up twice
  ASSERT_EQ(proof4.size(), 1u);
  EXPECT_EQ(to_hex(proof4[0]), "25a6df6fcae202696e784a1594551a6683a440d438b785b11a59d653cf1dfa3a");
  EXPECT_EQ(to_hex(ops_start(leaves[3])), "28ee525e00f5646fd7bcba5c1cddf5d4ee32ced88cbb56d9951da2e6a8a5b3cf");
  EXPECT_EQ(to_hex(commit_record_hash(keccak256(as_bytes("state-x")), keccak256(as_bytes("inbound-x")),
                                      keccak256(as_bytes("outbound-x")), leaves[4])),
            "215943cf19c03771fa1a75e6491a179852c9135ed0ad31cd0c6fc29900464362");
}

namespace {
// A fresh chain per test: the verifier is drawn from every staked node, so nodes left
// by other tests must not be in the pool.
class DisputeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DevChainOptions options;
    options.deploy.turn_blocks = 4;
    auto chain = DevChain::start(options);
    ASSERT_TRUE(chain.ok()) << chain.message();
    chain_ = std::move(chain).value();
  }

  MarketClient node(uint8_t id, Wei stake) { return funded_client(*chain_, id, stake); }

  // A solver's step leaves: K(tag ‖ t); DIVERGE_AT on, another tag (what the other
  // side computes).
  static std::vector<Hash256> leaves(uint64_t n, uint8_t tag, uint64_t diverge_at = ~0ULL) {
    std::vector<Hash256> out;
    for (uint64_t t = 0; t < n; ++t) {
      Hash256 w = word(t >= diverge_at ? tag + 1 : tag);
      w[0] = static_cast<uint8_t>(t);
      out.push_back(keccak256(w));
    }
    return out;
  }
  static std::vector<Hash256> nodes_of(const std::vector<Hash256>& leaves) {
    std::vector<Hash256> out;
    for (const auto& leaf : leaves) out.push_back(merkle_leaf(leaf, MerkleHash::keccak256));
    return out;
  }
  static std::vector<Hash256> proof(const std::vector<Hash256>& leaves, uint64_t index) {
    return merkle_proof(nodes_of(leaves), index, MerkleHash::keccak256).siblings;
  }
  static Hash256 root(const std::vector<Hash256>& leaves) { return merkle_root(nodes_of(leaves), MerkleHash::keccak256); }

  // Mines until the dispute's deadline has passed.
  void pass_deadline(const MarketClient& client, uint64_t dispute) {
    auto d = client.dispute(dispute);
    ASSERT_TRUE(d.ok()) << d.message();
    auto now = client.rpc().block_number();
    ASSERT_TRUE(now.ok());
    if (*now <= d->deadline) ASSERT_TRUE(chain_->mine(d->deadline + 1 - *now).ok());
  }

  // The selected verifier among CANDIDATES takes the job's next seat.
  MarketClient* accept_selected(uint64_t job, std::vector<MarketClient*> candidates) {
    auto state = candidates[0]->job(job);
    EXPECT_TRUE(state.ok()) << state.message();
    if (!state.ok()) return nullptr;
    auto chosen = candidates[0]->selected_verifier(job, state->verifiers_accepted);
    EXPECT_TRUE(chosen.ok()) << chosen.message();
    if (!chosen.ok()) return nullptr;
    for (auto* candidate : candidates) {
      if (candidate->address() != *chosen) continue;
      auto accepted = candidate->accept(job);
      EXPECT_TRUE(accepted.ok()) << accepted.message();
      return accepted.ok() ? candidate : nullptr;
    }
    ADD_FAILURE() << "selected " << address_hex(*chosen) << " is none of the candidates";
    return nullptr;
  }

  std::unique_ptr<DevChain> chain_;
};
}  // namespace

TEST_F(DisputeTest, HonestJobPaysSolversAndUnlocksStakes) {
  MarketClient submitter = node(0, 0);
  MarketClient a = node(1, 5 * kEth);
  MarketClient b = node(2, 5 * kEth);
  MarketClient verifier = node(3, 5 * kEth);
  JobTerms terms;
  terms.solver_count = 2;
  terms.verifier_count = 1;
  terms.price_per_solver = 2 * kEth;
  terms.verifier_fee = kEth / 2;
  terms.stake_per_role = kEth;
  terms.challenge_window_blocks = 8;
  terms.referee = submitter.address();
  auto job = submitter.post_job(terms);
  ASSERT_TRUE(job.ok()) << job.message();
  auto early = verifier.accept(*job);
  ASSERT_FALSE(early.ok());
  EXPECT_NE(early.message().find("commits not final yet"), std::string::npos) << early.message();
  ASSERT_TRUE(a.commit(*job, word(0xaa), 4, false).ok());  // interim
  ASSERT_TRUE(a.commit(*job, word(0xab), 8, true).ok());
  auto state = a.commit_state(*job, a.address());
  ASSERT_TRUE(state.ok()) << state.message();
  EXPECT_EQ(state->root, word(0xab));
  EXPECT_EQ(state->leaf_count, 8u);
  EXPECT_TRUE(state->is_final);
  ASSERT_TRUE(b.commit(*job, word(0xbb), 8, true).ok());
  EXPECT_TRUE(a.job(*job)->all_final);
  ASSERT_TRUE(chain_->mine(2).ok());  // the seed block and one after it
  auto seed = a.verifier_seed(*job);
  ASSERT_TRUE(seed.ok()) << seed.message();
  ASSERT_EQ(accept_selected(*job, {&a, &b, &verifier}), &verifier) << "solvers are never selected";
  EXPECT_EQ(*a.stake_of(a.address()), 4 * kEth);
  auto too_early = submitter.finalize(*job);
  ASSERT_FALSE(too_early.ok());
  EXPECT_NE(too_early.message().find("challenge window not over"), std::string::npos) << too_early.message();
  ASSERT_TRUE(chain_->mine(9).ok());
  auto finalized = submitter.finalize(*job);
  ASSERT_TRUE(finalized.ok()) << finalized.message();
  EXPECT_EQ(*a.stake_of(a.address()), 5 * kEth);
  EXPECT_EQ(*a.withdrawable_of(a.address()), 2 * kEth);
  EXPECT_EQ(*a.withdrawable_of(verifier.address()), kEth / 2);
  Wei before = *a.balance_of(a.address());
  ASSERT_TRUE(a.withdraw().ok());
  EXPECT_GT(*a.balance_of(a.address()), before + 2 * kEth - kEth / 100);  // minus gas
}

// A whole dispute through MarketClient, each side playing from its own leaves and
// operation chain: bisection over steps to the first differing step, over that step's
// operations to the first differing one, and the referee's ruling.
TEST_F(DisputeTest, BothPhasesToTheRefereesRuling) {
  MarketClient referee = node(0, 0);
  MarketClient solver = node(8, 5 * kEth);
  MarketClient verifier = node(9, 5 * kEth);
  JobTerms terms;
  terms.solver_count = 1;
  terms.verifier_count = 1;
  terms.price_per_solver = kEth;
  terms.verifier_fee = kEth / 10;
  terms.stake_per_role = kEth;
  terms.challenge_window_blocks = 20;
  terms.referee = referee.address();
  auto job = referee.post_job(terms);
  ASSERT_TRUE(job.ok()) << job.message();
  constexpr uint64_t kLeaves = 13, kFirstBad = 6, kOps = 20, kFirstBadOp = 13;
  auto solver_leaves = leaves(kLeaves, 1, kFirstBad);  // the solver's work goes wrong at step 6
  auto honest_leaves = leaves(kLeaves, 1);
  ASSERT_TRUE(solver.commit(*job, root(solver_leaves), kLeaves, true).ok());
  ASSERT_TRUE(chain_->mine(2).ok());
  ASSERT_EQ(accept_selected(*job, {&solver, &verifier}), &verifier);

  // The verifier replayed and disagrees with the last leaf; leaf 0 is agreed.
  const uint64_t hi = kLeaves - 1;
  auto forged = verifier.challenge(*job, solver.address(), 0, honest_leaves[0], proof(solver_leaves, 0), hi,
                                   solver_leaves[hi], proof(solver_leaves, hi - 1), kEth);
  ASSERT_FALSE(forged.ok());
  EXPECT_NE(forged.message().find("bad Merkle proof"), std::string::npos) << forged.message();
  Receipt receipt;
  auto dispute = verifier.challenge(*job, solver.address(), 0, solver_leaves[0], proof(solver_leaves, 0), hi,
                                    solver_leaves[hi], proof(solver_leaves, hi), kEth, &receipt);
  ASSERT_TRUE(dispute.ok()) << dispute.message();
  uint64_t challenger_gas = receipt.gas_used, solver_gas = 0;
  EXPECT_EQ(*solver.dispute_of(*job, solver.address()), *dispute);

  int step_rounds = 0;
  for (;;) {
    auto d = solver.dispute(*dispute);
    ASSERT_TRUE(d.ok()) << d.message();
    if (d->stage != DisputeStage::step_claim) break;
    EXPECT_EQ(d->phase, DisputePhase::steps);
    EXPECT_EQ(d->turn, DisputeTurn::solver);
    uint64_t mid = (d->lo + d->hi) / 2;
    auto claimed = solver.claim_leaf(*dispute, solver_leaves[mid], proof(solver_leaves, mid));
    ASSERT_TRUE(claimed.ok()) << claimed.message();
    solver_gas += claimed->gas_used;
    d = verifier.dispute(*dispute);
    ASSERT_EQ(d->turn, DisputeTurn::challenger);
    auto bisected = verifier.bisect(*dispute, d->mid_hash == honest_leaves[mid]);
    ASSERT_TRUE(bisected.ok()) << bisected.message();
    challenger_gas += bisected->gas_used;
    ++step_rounds;
  }
  auto d = solver.dispute(*dispute);
  ASSERT_EQ(d->stage, DisputeStage::ops_post);
  EXPECT_EQ(d->step, kFirstBad);
  EXPECT_EQ(d->lo_hash, honest_leaves[kFirstBad - 1]);
  EXPECT_EQ(d->hi_hash, solver_leaves[kFirstBad]);
  EXPECT_LE(step_rounds, 4) << "⌈log2 12⌉";

  // Operation chains of step 6: record j = K(tag ‖ j); the solver's differs from op 13.
  auto chain_of = [&](uint8_t tag, uint64_t diverge_at) {
    std::vector<Hash256> r{ops_start(d->lo_hash)};
    for (uint64_t j = 1; j < kOps; ++j) {
      Hash256 w = word(j >= diverge_at ? tag + 1 : tag);
      w[0] = static_cast<uint8_t>(j);
      r.push_back(ops_link(r.back(), keccak256(w)));
    }
    return r;  // r_0 … r_{m-1}; the contract adds r_m from the commit record
  };
  auto solver_ops = chain_of(5, kFirstBadOp), honest_ops = chain_of(5, ~0ULL);
  const Hash256 state = word(0x51), inbound = word(0x52), outbound = word(0x53);
  auto posted = solver.post_ops(*dispute, kOps, solver_ops[kOps - 1], state, inbound, outbound);
  ASSERT_TRUE(posted.ok()) << posted.message();
  solver_gas += posted->gas_used;
  d = solver.dispute(*dispute);
  EXPECT_EQ(d->stage, DisputeStage::op_claim);
  EXPECT_EQ(d->lo_hash, honest_ops[0]) << "r_0 from the agreed leaf";
  EXPECT_EQ(d->hi_hash,
            ops_link(solver_ops[kOps - 1], commit_record_hash(state, inbound, outbound, solver_leaves[kFirstBad])))
      << "r_m: the commit record over the solver's leaf, built by the contract as in C++";
  EXPECT_EQ(d->op_count, kOps);
  int op_rounds = 0;
  for (;;) {
    d = solver.dispute(*dispute);
    ASSERT_TRUE(d.ok()) << d.message();
    if (d->stage != DisputeStage::op_claim) break;
    uint64_t mid = (d->lo + d->hi) / 2;
    auto claimed = solver.claim_op(*dispute, solver_ops[mid]);
    ASSERT_TRUE(claimed.ok()) << claimed.message();
    solver_gas += claimed->gas_used;
    auto bisected = verifier.bisect(*dispute, solver_ops[mid] == honest_ops[mid]);
    ASSERT_TRUE(bisected.ok()) << bisected.message();
    challenger_gas += bisected->gas_used;
    ++op_rounds;
  }
  EXPECT_LE(op_rounds, 5) << "⌈log2 20⌉";
  d = solver.dispute(*dispute);
  ASSERT_EQ(d->stage, DisputeStage::referee);
  EXPECT_EQ(d->hi, kFirstBadOp);
  EXPECT_EQ(d->lo_hash, honest_ops[kFirstBadOp - 1]);
  EXPECT_EQ(d->hi_hash, solver_ops[kFirstBadOp]);
  auto not_referee = verifier.resolve(*dispute, false);
  ASSERT_FALSE(not_referee.ok());
  EXPECT_NE(not_referee.message().find("only the job's referee"), std::string::npos) << not_referee.message();
  auto ruled = referee.resolve(*dispute, false);
  ASSERT_TRUE(ruled.ok()) << ruled.message();
  EXPECT_EQ(solver.dispute(*dispute)->stage, DisputeStage::closed);
  EXPECT_EQ(*referee.withdrawable_of(verifier.address()), kEth + kEth / 2);
  EXPECT_EQ(*referee.stake_of(solver.address()), 4 * kEth);
  EXPECT_EQ(*referee.commit_of(*job, solver.address()), Hash256{}) << "the slashed commit is removed";
  EXPECT_GT(solver_gas, 0u);
  EXPECT_GT(challenger_gas, 0u);
  std::cerr << "dispute gas: solver " << solver_gas << ", challenger " << challenger_gas << ", referee "
            << ruled->gas_used << " (" << step_rounds << " step rounds, " << op_rounds << " operation rounds)\n";
}

// A solver that stops answering loses on its deadline; a referee that never rules lets
// anyone cancel: the bond returns and nobody is slashed.
TEST_F(DisputeTest, SilentSolverLosesAndSilentRefereeCancels) {
  MarketClient referee = node(0, 0);
  MarketClient a = node(1, 5 * kEth);
  MarketClient b = node(2, 5 * kEth);
  MarketClient verifier = node(3, 5 * kEth);
  JobTerms terms;
  terms.solver_count = 2;
  terms.verifier_count = 1;
  terms.price_per_solver = kEth;
  terms.stake_per_role = kEth;
  terms.challenge_window_blocks = 20;
  terms.referee = referee.address();
  auto job = referee.post_job(terms);
  ASSERT_TRUE(job.ok()) << job.message();
  auto la = leaves(9, 3), lb = leaves(9, 7);
  ASSERT_TRUE(a.commit(*job, root(la), 9, true).ok());
  ASSERT_TRUE(b.commit(*job, root(lb), 9, true).ok());
  ASSERT_TRUE(chain_->mine(2).ok());
  ASSERT_EQ(accept_selected(*job, {&a, &b, &verifier}), &verifier);

  auto silent = verifier.challenge(*job, a.address(), 0, la[0], proof(la, 0), 8, la[8], proof(la, 8), kEth);
  ASSERT_TRUE(silent.ok()) << silent.message();
  auto early = verifier.timeout(*silent);
  ASSERT_FALSE(early.ok());
  EXPECT_NE(early.message().find("turn deadline not passed"), std::string::npos) << early.message();
  pass_deadline(verifier, *silent);
  auto late = a.claim_leaf(*silent, la[4], proof(la, 4));
  ASSERT_FALSE(late.ok());
  EXPECT_NE(late.message().find("turn deadline passed"), std::string::npos) << late.message();
  ASSERT_TRUE(referee.timeout(*silent).ok());
  EXPECT_EQ(*a.commit_of(*job, a.address()), Hash256{}) << "the silent solver is slashed";
  EXPECT_EQ(*a.withdrawable_of(verifier.address()), kEth + kEth / 2);

  // b: one step apart at once, two operations, then a referee that never rules.
  auto dispute = verifier.challenge(*job, b.address(), 3, lb[3], proof(lb, 3), 4, lb[4], proof(lb, 4), kEth);
  ASSERT_TRUE(dispute.ok()) << dispute.message();
  EXPECT_EQ(b.dispute(*dispute)->stage, DisputeStage::ops_post);
  ASSERT_TRUE(b.post_ops(*dispute, 2, word(0x21), word(0x22), word(0x23), word(0x24)).ok());
  ASSERT_TRUE(b.claim_op(*dispute, word(0x25)).ok());
  ASSERT_TRUE(verifier.bisect(*dispute, false).ok());
  auto d = b.dispute(*dispute);
  ASSERT_EQ(d->stage, DisputeStage::referee);
  EXPECT_EQ(d->hi, 1u);
  EXPECT_EQ(d->lo_hash, ops_start(lb[3]));
  EXPECT_EQ(d->hi_hash, word(0x25));
  pass_deadline(b, *dispute);
  auto ruling = referee.resolve(*dispute, true);
  ASSERT_FALSE(ruling.ok());
  EXPECT_NE(ruling.message().find("referee deadline passed"), std::string::npos) << ruling.message();
  Wei before = *b.withdrawable_of(verifier.address());
  ASSERT_TRUE(a.timeout(*dispute).ok());
  EXPECT_EQ(b.dispute(*dispute)->stage, DisputeStage::closed);
  EXPECT_EQ(*b.withdrawable_of(verifier.address()), before + kEth) << "bond back";
  EXPECT_EQ(*b.withdrawable_of(b.address()), 0u) << "nobody slashed, nobody rewarded";
  EXPECT_EQ(*b.commit_of(*job, b.address()), root(lb)) << "the commit stands";
}

// Every transaction ADDRESS sent in blocks FROM_BLOCK.., in block order, as
// "nonce to value input" (lowercase hex).
static std::vector<std::pair<uint64_t, std::string>> transactions_from(const RpcClient& rpc, const Address& address,
                                                                       uint64_t from_block) {
  std::vector<std::pair<uint64_t, std::string>> out;
  uint64_t latest = *rpc.block_number();
  for (uint64_t n = from_block; n <= latest; ++n) {
    auto block = rpc.call("eth_getBlockByNumber", {fmt::format("0x{:x}", n), true});
    EXPECT_TRUE(block.ok()) << block.message();
    if (!block.ok()) break;
    for (const auto& tx : (*block)["transactions"]) {
      if (tx["from"].get<std::string>() != address_hex(address)) continue;
      uint64_t nonce = std::stoull(tx["nonce"].get<std::string>(), nullptr, 16);
      Wei value = std::stoull(tx["value"].get<std::string>(), nullptr, 16);
      out.emplace_back(nonce, tx["to"].get<std::string>() + " " + wei_to_string(value) + " " +
                                  tx["input"].get<std::string>());
    }
  }
  return out;
}

// A real node process (chain_send_helper) sends a sequence of named actions: register,
// stakes, plain transfers and commits, and is killed with SIGKILL at each of KILL_POINTS
// (STEP:ACTION) and then RANDOM_KILLS times at random moments, restarted each time on the
// same data dir, and finally run to the end. Checks on chain that every action happened
// exactly once, with consecutive nonces and nothing left pending. With INTERLOPER, after
// the kill points another program sends 777 wei to the sink from the same key without the
// journal, taking the nonce of whatever the journal holds unsent.
static void kill_and_restart(DevChain& chain, MarketClient& submitter, const std::string& name,
                             const std::vector<std::string>& kill_points, int random_kills,
                             bool interloper = false) {
  auto dir = std::filesystem::temp_directory_path() / ("sn-chain-kill-" + name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  auto key = Key::load_or_create(dir / "chain.key");
  ASSERT_TRUE(key.ok()) << key.message();
  ASSERT_TRUE(chain.fund(key->address(), 10 * kEth).ok());
  ASSERT_TRUE(chain.deployment().save(dir / "deployment.json").ok());
  const Address sink = Key::generate().address();
  constexpr int kActions = 12;  // i % 3: stake, send, commit
  constexpr Wei kStakePerRole = 500;
  std::string jobs;
  std::vector<uint64_t> job_ids;
  for (int j = 0; j < kActions / 3; ++j) {
    JobTerms terms;
    terms.stake_per_role = kStakePerRole;
    terms.commit_blocks = 100000;
    auto job = submitter.post_job(terms);
    ASSERT_TRUE(job.ok()) << job.message();
    job_ids.push_back(*job);
    jobs += std::to_string(*job) + ",";
  }
  const uint64_t first_block = *chain.rpc()->block_number() + 1;

  auto spawn = [&](const std::string& kill_at) {
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir / "helper.log";
    return ChildProcess::spawn({CHAIN_SEND_HELPER, (dir / "deployment.json").string(), dir.string(), address_hex(sink),
                                std::to_string(kActions), jobs, kill_at},
                               options);
  };
  auto run = [&](const std::string& kill_at) {
    auto child = spawn(kill_at);
    EXPECT_TRUE(child.ok()) << child.message();
    return child.ok() ? child->wait_for(std::chrono::seconds(120)).value_or(-1) : -1;
  };
  for (const auto& kill_at : kill_points)
    EXPECT_EQ(run(kill_at), 128 + SIGKILL) << "the helper was to die at " << kill_at;
  if (interloper) {
    Wallet other(chain.rpc(), *key, chain.deployment().chain_id);
    auto sent = other.send(sink, 777, {});
    ASSERT_TRUE(sent.ok()) << sent.message();
  }
  std::mt19937 rng(6);
  for (int attempt = 0; attempt < random_kills; ++attempt) {
    auto child = spawn("");
    ASSERT_TRUE(child.ok()) << child.message();
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(20, 250)(rng)));
    child->kill_now();
  }
  EXPECT_EQ(run(""), 0) << *read_file(dir / "helper.log");
  EXPECT_EQ(run(""), 0) << *read_file(dir / "helper.log");  // nothing left to do

  // Exactly the expected transactions, each once, nonces 0.. with no gap.
  std::vector<std::string> expected;
  auto market = address_hex(chain.deployment().market);
  Hash256 node_id{};
  std::copy(key->address().begin(), key->address().end(), node_id.begin() + 12);
  Bytes register_call = chain::abi::selector("register(bytes32)");
  chain::abi::put_bytes32(register_call, node_id);
  expected.push_back(market + " 1000 " + hex0x(register_call));
  Wei staked = 1000, sent = 0;
  if (interloper) {
    expected.push_back(address_hex(sink) + " 777 0x");
    sent += 777;
  }
  for (int i = 0; i < kActions; ++i) {
    if (i % 3 == 0) {
      expected.push_back(market + " " + std::to_string(1000 + i) + " " + hex0x(chain::abi::selector("stake()")));
      staked += 1000 + i;
    } else if (i % 3 == 1) {
      expected.push_back(address_hex(sink) + " " + std::to_string(1000 + i) + " 0x");
      sent += 1000 + i;
    } else {
      Bytes commit_call = chain::abi::selector("commit(uint256,bytes32,uint48,bool)");
      chain::abi::put_uint(commit_call, job_ids[i / 3]);
      Hash256 root{};
      root.fill(static_cast<uint8_t>(0x10 + i));
      chain::abi::put_bytes32(commit_call, root);
      chain::abi::put_uint(commit_call, 1);
      chain::abi::put_uint(commit_call, 1);
      expected.push_back(market + " 0 " + hex0x(commit_call));
      staked -= kStakePerRole;
      auto committed = submitter.commit_of(job_ids[i / 3], key->address());
      ASSERT_TRUE(committed.ok());
      EXPECT_EQ(*committed, root) << "commit-" << i;
    }
  }
  auto txs = transactions_from(*chain.rpc(), key->address(), first_block);
  std::vector<std::string> actual;
  for (size_t n = 0; n < txs.size(); ++n) {
    EXPECT_EQ(txs[n].first, n) << "nonces are consecutive from 0";
    actual.push_back(txs[n].second);
  }
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  EXPECT_EQ(sorted(actual), sorted(expected)) << "every action exactly once";
  auto nonce = [&](const char* tag) {
    return chain.rpc()->call("eth_getTransactionCount", {address_hex(key->address()), tag})->get<std::string>();
  };
  EXPECT_EQ(nonce("latest"), fmt::format("0x{:x}", expected.size()));
  EXPECT_EQ(nonce("pending"), nonce("latest")) << "nothing left pending";
  EXPECT_EQ(*submitter.stake_of(key->address()), staked);
  EXPECT_EQ(*chain.rpc()->balance(sink), sent);
  std::filesystem::remove_all(dir);
}

TEST_F(ChainTest, NodeKilledMidSendNeitherLosesNorRepeatsAnAction) {
  MarketClient submitter = funded_node(0, 0);
  kill_and_restart(*chain_, submitter, "points",
                   {"journaled:register", "sent:stake-0", "mined:send-1", "journaled:commit-2", "sent:commit-5",
                    "mined:stake-6", "sent:send-7", "journaled:send-10", "mined:commit-11"},
                   0);
}

// Killed with a signed but unsent transaction in its journal whose nonce another program
// then uses: the restarted node drops the dead transaction and does its action anew.
TEST_F(ChainTest, JournaledTransactionWhoseNonceWasTakenIsRedoneOnce) {
  MarketClient submitter = funded_node(0, 0);
  kill_and_restart(*chain_, submitter, "taken", {"journaled:stake-3"}, 0, /*interloper=*/true);
}

TEST_F(ChainTest, NodeKilledAtRandomMomentsNeitherLosesNorRepeatsAnAction) {
  MarketClient submitter = funded_node(0, 0);
  kill_and_restart(*chain_, submitter, "random", {}, 8);
}

// `solvernet chain up` and the `solvernet wallet` commands, run as a user runs them.
TEST(ChainCli, WalletCommandsAgainstChainUp) {
  const char* bin_env = std::getenv("SOLVERNET_BIN");
  if (!bin_env) GTEST_SKIP() << "SOLVERNET_BIN is not set (ctest sets it)";
  const std::string bin = bin_env;
  ASSERT_TRUE(std::filesystem::exists(bin)) << "SOLVERNET_BIN " << bin << " does not exist: build target solvernet";
  auto dir = std::filesystem::temp_directory_path() / ("sn-chain-cli-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  auto port = free_loopback_port(SOCK_STREAM);
  ASSERT_TRUE(port.ok());
  const std::string rpc = fmt::format("http://127.0.0.1:{}", *port);
  const std::string deployment = (dir / "deployment.json").string();
  SpawnOptions options;
  options.stdout_path = options.stderr_path = dir / "chain.log";
  auto up = ChildProcess::spawn({bin, "chain", "up", "--port", std::to_string(*port), "--deployment", deployment}, options);
  ASSERT_TRUE(up.ok()) << up.message();
  for (int i = 0; i < 600 && !Deployment::load(deployment).ok() && up->running(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(Deployment::load(deployment).ok()) << *read_file(dir / "chain.log");

  auto wallet = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {bin, "wallet"});
    return run_command(args);
  };
  auto last_line = [](std::string text) {
    while (!text.empty() && text.back() == '\n') text.pop_back();
    return text.substr(text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1);
  };
  const std::string alice_key = (dir / "alice.key").string();
  auto created = wallet({"new", "--out", alice_key});
  ASSERT_TRUE(created.ok()) << created.message();
  auto alice = Key::load(alice_key);
  ASSERT_TRUE(alice.ok());
  EXPECT_EQ(last_line(*created), address_hex(alice->address()));
  EXPECT_FALSE(wallet({"new", "--out", alice_key}).ok()) << "an existing key is never overwritten";

  // --rpc alone finds the market `chain up` deployed.
  auto funded = wallet({"fund", "--rpc", rpc, "--deployment", (dir / "absent.json").string(), "--to",
                        address_hex(alice->address()), "--amount", "2eth"});
  ASSERT_TRUE(funded.ok()) << funded.message();
  auto staked = wallet({"stake", "--deployment", deployment, "--key", alice_key, "--amount", "1eth"});
  ASSERT_TRUE(staked.ok()) << staked.message();
  const std::string bob = address_hex(Key::generate().address());
  ASSERT_TRUE(wallet({"send", "--deployment", deployment, "--key", alice_key, "--to", bob, "--amount", "12345"}).ok());
  ASSERT_TRUE(wallet({"unstake", "--deployment", deployment, "--key", alice_key, "--amount", "1000"}).ok());
  auto too_much = wallet({"unstake", "--deployment", deployment, "--key", alice_key, "--amount", "5eth"});
  ASSERT_FALSE(too_much.ok());
  EXPECT_NE(too_much.message().find("amount exceeds free stake"), std::string::npos) << too_much.message();

  auto balance = wallet({"balance", "--deployment", deployment, "--key", alice_key, "--json"});
  ASSERT_TRUE(balance.ok()) << balance.message();
  auto json = nlohmann::json::parse(last_line(*balance));
  EXPECT_EQ(json["address"], address_hex(alice->address()));
  EXPECT_EQ(json["staked"], "999999999999999000");
  Wei left = *parse_wei(json["balance"].get<std::string>());
  EXPECT_LT(left, kEth - 12345);
  EXPECT_GT(left, kEth - 12345 - kEth / 100) << "only gas beyond the stake and the transfer";
  auto bob_balance = wallet({"balance", "--rpc", rpc, "--deployment", deployment, "--address", bob, "--json"});
  ASSERT_TRUE(bob_balance.ok()) << bob_balance.message();
  EXPECT_EQ(nlohmann::json::parse(last_line(*bob_balance))["balance"], "12345");

  auto history = wallet({"history", "--deployment", deployment, "--key", alice_key, "--json"});
  ASSERT_TRUE(history.ok()) << history.message();
  std::vector<std::string> events;
  for (const auto& entry : nlohmann::json::parse(*history)) events.push_back(entry["event"]);
  EXPECT_EQ(events, (std::vector<std::string>{"NodeRegistered", "Staked", "UnstakeRequested"}));
  up->terminate();
  std::filesystem::remove_all(dir);
}

// market_events() names every event of the deployed contract's ABI, so log readers
// (wallet history, finalize) cannot drift from the contract.
TEST_F(DisputeTest, EventSignaturesMatchTheContractsAbi) {
  auto artifact = read_file(default_contracts_dir() / "out" / "SolverMarket.sol" / "SolverMarket.json");
  ASSERT_TRUE(artifact.ok()) << artifact.message();
  std::vector<std::string> from_abi, ours;
  const auto json = nlohmann::json::parse(*artifact);  // kept: a range over a temporary's member dangles
  for (const auto& entry : json["abi"]) {
    if (entry["type"] != "event") continue;
    std::string signature = entry["name"].get<std::string>() + "(";
    for (const auto& input : entry["inputs"]) signature += input["type"].get<std::string>() + ",";
    if (signature.back() == ',') signature.pop_back();
    from_abi.push_back(signature + ")");
  }
  for (auto event : market_events()) ours.emplace_back(event);
  std::sort(from_abi.begin(), from_abi.end());
  std::sort(ours.begin(), ours.end());
  EXPECT_EQ(ours, from_abi);
}
