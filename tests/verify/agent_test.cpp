// The solver's node on chain, against anvil: the agent commits a member's
// leaves itself once the last one is on disk, and answers a challenge with
// the leaf at the midpoint and a proof the contract accepts.
#include <gtest/gtest.h>

#include <thread>

#include "chain/chain.h"
#include "core/fs.h"
#include "train/evidence.h"
#include "verify/verify.h"

namespace sn::verify {
namespace {

namespace fs = std::filesystem;
using chain::Wei;
constexpr Wei kEth = static_cast<Wei>(1000000000000000000ULL);

template <class F>
bool eventually(F done, std::chrono::seconds limit = std::chrono::seconds(30)) {
  for (auto until = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < until;) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

TEST(SolverAgent, CommitsItsLeavesAndClaimsTheMidpointOfAChallenge) {
  const fs::path dir = fs::temp_directory_path() / ("sn-verify-agent-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  auto chain = chain::DevChain::start();
  ASSERT_TRUE(chain.ok()) << chain.message();
  auto& dev = **chain;

  // A solver node's data dir and a verifier, both registered and staked.
  const fs::path solver_dir = dir / "solver";
  ASSERT_TRUE(dev.node_key(solver_dir, 100 * kEth).ok());
  auto solver = chain::MarketClient::for_data_dir(dev.rpc(), dev.deployment(), solver_dir);
  ASSERT_TRUE(solver.ok()) << solver.message();
  ASSERT_TRUE(solver->register_node(hash_string("solver"), 10 * kEth).ok());
  auto verifier_key = dev.node_key(dir / "verifier", 100 * kEth);
  ASSERT_TRUE(verifier_key.ok());
  chain::MarketClient verifier(dev.rpc(), dev.deployment(), *verifier_key);
  ASSERT_TRUE(verifier.register_node(hash_string("verifier"), 10 * kEth).ok());
  auto submitter_key = dev.node_key(dir / "submitter", 100 * kEth);
  ASSERT_TRUE(submitter_key.ok());
  chain::MarketClient submitter(dev.rpc(), dev.deployment(), *submitter_key);
  chain::JobTerms terms;
  terms.solver_count = 1;
  terms.verifier_count = 1;
  terms.price_per_solver = kEth;
  terms.verifier_fee = kEth / 10;
  terms.stake_per_role = kEth;
  terms.challenge_window_blocks = 50;
  auto job = submitter.post_job(terms);
  ASSERT_TRUE(job.ok()) << job.message();

  // The member's evidence as train writes it: its setup, then leaves 0 … 6 of a 6-step job.
  const fs::path ev = train::evidence_dir(solver_dir, "job-a", 1, 0);
  fs::create_directories(ev);
  solvernet::v1::SetupJobRequest setup;
  setup.set_job_id("job-a");
  setup.set_stage(1);
  setup.set_chain_job_id(*job);
  setup.set_job_toml("name = \"t\"\n[model]\nlayers = 2\nd_model = 32\nheads = 2\nd_ff = 64\nvocab = 256\nseq_len = 16\n"
                     "[parallel]\nstages = 2\nmicro_batches = 1\n[train]\nglobal_batch = 2\nsteps = 6\n");
  ASSERT_TRUE(write_file_atomic(ev / "setup.pb", setup.SerializeAsString()).ok());
  std::vector<Hash256> leaves;
  for (int t = 0; t <= 6; ++t) leaves.push_back(hash_string("leaf " + std::to_string(t)));
  auto leaves_bytes = [&](size_t count) {
    std::string bytes;
    for (size_t t = 0; t < count; ++t) bytes.append(reinterpret_cast<const char*>(leaves[t].data()), 32);
    return bytes;
  };
  ASSERT_TRUE(write_file_atomic(ev / "leaves.bin", leaves_bytes(4)).ok());

  SolverAgentOptions options;
  options.data_dir = solver_dir;
  options.market = std::make_shared<chain::MarketClient>(std::move(solver).value());
  options.poll = std::chrono::milliseconds(100);
  std::vector<std::string> lines;
  std::mutex lines_mutex;
  options.report = [&](const std::string& line) {
    std::lock_guard<std::mutex> lock(lines_mutex);
    lines.push_back(line);
  };
  const chain::Address solver_address = options.market->address();
  auto agent = SolverAgent::start(options);

  // Not final yet: leaf 6 is missing, nothing is committed.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_EQ(submitter.commit_state(*job, solver_address)->leaf_count, 0u);
  ASSERT_TRUE(write_file_atomic(ev / "leaves.bin", leaves_bytes(7)).ok());
  ASSERT_TRUE(eventually([&] {
    auto state = submitter.commit_state(*job, solver_address);
    return state.ok() && state->is_final;
  }));
  auto state = submitter.commit_state(*job, solver_address);
  EXPECT_EQ(state->root, commitment_root(leaves));
  EXPECT_EQ(state->leaf_count, 7u);

  // The verifier the seed selects challenges leaves (0, 6]; the agent claims leaf 3 with its proof.
  ASSERT_TRUE(dev.mine(2).ok());
  auto selected = verifier.selected_verifier(*job, 0);
  ASSERT_TRUE(selected.ok()) << selected.message();
  ASSERT_EQ(*selected, verifier.address());
  ASSERT_TRUE(verifier.accept(*job).ok());
  auto dispute = verifier.challenge(*job, solver_address, 0, leaves[0], commitment_proof(leaves, 0), 6, leaves[6],
                                    commitment_proof(leaves, 6), kEth);
  ASSERT_TRUE(dispute.ok()) << dispute.message();
  ASSERT_TRUE(eventually([&] {
    auto d = verifier.dispute(*dispute);
    return d.ok() && d->stage == chain::DisputeStage::step_bisect;
  })) << "the agent did not claim the midpoint";
  auto d = verifier.dispute(*dispute);
  EXPECT_EQ(d->mid_hash, leaves[3]);
  // Agreeing moves the dispute to (3, 6]; the agent claims leaf 4 next.
  ASSERT_TRUE(verifier.bisect(*dispute, true).ok());
  ASSERT_TRUE(eventually([&] {
    auto next = verifier.dispute(*dispute);
    return next.ok() && next->stage == chain::DisputeStage::step_bisect && next->lo == 3;
  }));
  EXPECT_EQ(verifier.dispute(*dispute)->mid_hash, leaves[4]);
  agent.reset();
  std::lock_guard<std::mutex> lock(lines_mutex);
  ASSERT_GE(lines.size(), 3u);
  EXPECT_NE(lines[0].find("committed final"), std::string::npos) << lines[0];
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sn::verify
