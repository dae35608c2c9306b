// The devnet's settlement on a local chain (anvil): nodes register and stake,
// the submitter escrows the job, every solver's node commits the Merkle root
// of its step leaves itself, verifiers (spare staked nodes) check them, the
// submitter referees disputes, and the job is finalized after the challenge
// window.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"

namespace sn::chain {
class MarketClient;
}

namespace sn::cli {

struct SettlementNode {
  std::string node_id;                 // hex
  std::filesystem::path data_dir;      // holds its chain key (chain.key)
};

class DevnetSettlement {
 public:
  // Starts anvil, deploys the market, funds and stakes every node.
  static Result<std::unique_ptr<DevnetSettlement>> start(const std::filesystem::path& dir,
                                                         const std::vector<SettlementNode>& nodes);
  ~DevnetSettlement();

  // Posts the job with escrow for SOLVERS solvers and VERIFIERS verifiers; returns the job id.
  Result<uint64_t> post_job(int solvers, int verifiers, const std::string& job_name);
  // Waits (up to TIMEOUT_S) until every solver has committed final, then mines
  // the block the verifier seed comes from.
  Status wait_for_final_commits(uint64_t job_id, double timeout_s);
  // The window passes (mined), the job is finalized.
  Status finalize(uint64_t job_id);
  // Balance, free stake and withdrawable payout (wei, as decimal strings) of every node and the submitter.
  Result<nlohmann::json> balances() const;
  std::string rpc_url() const;
  // The submitter's client (the job's referee) and a node's (by node id; a
  // journal of its own, so it never shares one with the node process).
  std::shared_ptr<chain::MarketClient> submitter() const;
  Result<std::shared_ptr<chain::MarketClient>> node_client(const std::string& node_id) const;
  // The node id whose chain address is ADDRESS ("0x…"), empty if none.
  std::string node_of_address(const std::string& address) const;
  // Anvil mines a block per transaction only; disputes count their deadlines
  // in blocks, so while a dispute may run a clock mines one every PERIOD (a
  // silent party's deadline then passes as on a real chain). Stopped by
  // stop_block_clock or the destructor.
  void start_block_clock(std::chrono::milliseconds period);
  void stop_block_clock();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

void print_balances(const nlohmann::json& before, const nlohmann::json& after);

}  // namespace sn::cli
