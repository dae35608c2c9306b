// The chain client against a real anvil started here, plus offline encodings.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "chain/chain.h"
#include "core/fs.h"

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
  EXPECT_EQ(to_hex(keccak256({})), "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
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
  for (std::string body : {"{not json", "[]", "{\"result\": 12}", "{\"result\": \"0xzz\"}",
                           "{\"error\": {\"message\": \"boom\", \"data\": \"0x08c379a0\"}}",
                           "{\"result\": \"0x1234567890123456789012345678901234567890\"}"}) {
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
    EXPECT_FALSE(rpc.balance(Address{}).ok()) << body;
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

// A node killed after signing (journal written) but before or after sending: the
// restarted node finishes that very transaction and does not repeat it.
TEST_F(ChainTest, KilledMidSendNeitherLosesNorRepeatsAnAction) {
  auto dir = std::filesystem::temp_directory_path() / ("sn-chain-journal-" + std::to_string(getpid()));
  auto first = MarketClient::for_data_dir(chain_->rpc(), chain_->deployment(), dir);
  ASSERT_TRUE(first.ok()) << first.message();
  ASSERT_TRUE(chain_->fund(first->address(), 10 * kEth).ok());
  ASSERT_TRUE(first->register_node(word(10), kEth).ok());
  Bytes stake_call = chain::abi::selector("stake()");
  // Killed before sending: the signed stake of 5 wei sits in the journal only.
  ASSERT_TRUE(first->wallet().journal_without_sending(chain_->deployment().market, 5, stake_call).ok());
  EXPECT_EQ(*first->stake_of(first->address()), kEth);
  {
    auto restarted = MarketClient::for_data_dir(chain_->rpc(), chain_->deployment(), dir);
    ASSERT_TRUE(restarted.ok());
    auto finished = restarted->wallet().finish_pending();
    ASSERT_TRUE(finished.ok()) << finished.message();
    EXPECT_EQ(*finished, 1u);
    EXPECT_EQ(*restarted->stake_of(first->address()), kEth + 5);  // not lost
  }
  // Killed after sending: the journal still names a mined transaction; re-sending it is a no-op.
  auto third = MarketClient::for_data_dir(chain_->rpc(), chain_->deployment(), dir);
  ASSERT_TRUE(third->wallet().journal_without_sending(chain_->deployment().market, 7, stake_call).ok());
  auto journal_text = read_file(dir / "chain.journal");
  ASSERT_TRUE(journal_text.ok());
  auto entries = nlohmann::json::parse(*journal_text);
  ASSERT_EQ(entries.size(), 1u);
  ASSERT_TRUE(chain_->rpc()->call("eth_sendRawTransaction", {entries.begin().value()}).ok());
  auto fourth = MarketClient::for_data_dir(chain_->rpc(), chain_->deployment(), dir);
  ASSERT_TRUE(fourth->stake(1).ok());  // finishes the journal first, then a new action
  EXPECT_EQ(*fourth->stake_of(first->address()), kEth + 5 + 7 + 1);  // 7 applied once
  std::filesystem::remove_all(dir);
}
