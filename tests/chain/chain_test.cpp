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

// One anvil for the whole suite: starting it is the slow part.
class ChainTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto chain = DevChain::start();
    ASSERT_TRUE(chain.ok()) << chain.message();
    chain_ = std::move(chain).value().release();
  }
  static void TearDownTestSuite() { delete chain_; }

  MarketClient funded_node(uint8_t id, Wei stake) {
    Key key = Key::generate();
    EXPECT_TRUE(chain_->fund(key.address(), 100 * kEth).ok());
    MarketClient client(chain_->rpc(), chain_->deployment(), key);
    if (stake > 0) {
      auto registered = client.register_node(word(id), stake);
      EXPECT_TRUE(registered.ok()) << registered.message();
    }
    return client;
  }
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

TEST_F(ChainTest, HonestJobPaysSolversAndUnlocksStakes) {
  MarketClient submitter = funded_node(0, 0);
  MarketClient a = funded_node(1, 5 * kEth);
  MarketClient b = funded_node(2, 5 * kEth);
  MarketClient verifier = funded_node(3, 5 * kEth);
  JobTerms terms;
  terms.solver_count = 2;
  terms.verifier_count = 1;
  terms.price_per_solver = 2 * kEth;
  terms.verifier_fee = kEth / 2;
  terms.stake_per_role = kEth;
  terms.challenge_window_blocks = 5;
  terms.referee = submitter.address();
  auto job = submitter.post_job(terms);
  ASSERT_TRUE(job.ok()) << job.message();
  ASSERT_TRUE(verifier.accept(*job).ok());
  ASSERT_TRUE(a.commit(*job, word(0xaa)).ok());
  ASSERT_TRUE(b.commit(*job, word(0xbb)).ok());
  EXPECT_EQ(*a.stake_of(a.address()), 4 * kEth);
  auto early = submitter.finalize(*job);
  ASSERT_FALSE(early.ok());
  EXPECT_NE(early.message().find("challenge window not over"), std::string::npos) << early.message();
  ASSERT_TRUE(chain_->mine(6).ok());
  auto finalized = submitter.finalize(*job);
  ASSERT_TRUE(finalized.ok()) << finalized.message();
  EXPECT_EQ(*a.stake_of(a.address()), 5 * kEth);
  EXPECT_EQ(*a.withdrawable_of(a.address()), 2 * kEth);
  EXPECT_EQ(*a.withdrawable_of(verifier.address()), kEth / 2);
  Wei before = *a.balance_of(a.address());
  ASSERT_TRUE(a.withdraw().ok());
  EXPECT_GT(*a.balance_of(a.address()), before + 2 * kEth - kEth / 100);  // minus gas
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

TEST_F(ChainTest, DisputeNarrowsAndRefereeSlashes) {
  MarketClient referee = funded_node(0, 0);
  MarketClient solver = funded_node(8, 5 * kEth);
  MarketClient verifier = funded_node(9, 5 * kEth);
  JobTerms terms;
  terms.solver_count = 1;
  terms.verifier_count = 1;
  terms.price_per_solver = kEth;
  terms.verifier_fee = kEth / 10;
  terms.stake_per_role = kEth;
  terms.referee = referee.address();
  auto job = referee.post_job(terms);
  ASSERT_TRUE(job.ok()) << job.message();
  ASSERT_TRUE(verifier.accept(*job).ok());
  ASSERT_TRUE(solver.commit(*job, word(1)).ok());
  auto dispute = verifier.challenge(*job, solver.address(), 0, 4, kEth);
  ASSERT_TRUE(dispute.ok()) << dispute.message();
  auto out_of_turn = verifier.bisect(*dispute, true);
  ASSERT_FALSE(out_of_turn.ok());
  EXPECT_NE(out_of_turn.message().find("not the challenger's turn"), std::string::npos);
  ASSERT_TRUE(solver.claim_midpoint(*dispute, word(2)).ok());  // mid 2
  ASSERT_TRUE(verifier.bisect(*dispute, true).ok());           // (2,4]
  ASSERT_TRUE(solver.claim_midpoint(*dispute, word(3)).ok());  // mid 3
  ASSERT_TRUE(verifier.bisect(*dispute, false).ok());          // (2,3]
  auto not_referee = verifier.resolve(*dispute, false);
  ASSERT_FALSE(not_referee.ok());
  EXPECT_NE(not_referee.message().find("only the job's referee"), std::string::npos);
  ASSERT_TRUE(referee.resolve(*dispute, false).ok());
  EXPECT_EQ(*referee.withdrawable_of(verifier.address()), kEth + kEth / 2);
  EXPECT_EQ(*referee.stake_of(solver.address()), 4 * kEth);
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
      Bytes commit_call = chain::abi::selector("commit(uint256,bytes32)");
      chain::abi::put_uint(commit_call, job_ids[i / 3]);
      Hash256 root{};
      root.fill(static_cast<uint8_t>(0x10 + i));
      chain::abi::put_bytes32(commit_call, root);
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
