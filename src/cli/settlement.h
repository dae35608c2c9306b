// The devnet's settlement on a local chain (anvil): nodes register and stake,
// the submitter escrows the job, every solver commits the Merkle root of its
// per-step state hashes, and the job is finalized after the challenge window.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"

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

  // Posts the job with escrow for SOLVERS solvers; returns the job id.
  Result<uint64_t> post_job(int solvers, const std::string& job_name);
  // SOLVERS[i] commits ROOTS[i] (hex) over LEAF_COUNT leaves, final; the window
  // passes, the job is finalized.
  Status commit_and_finalize(uint64_t job_id, const std::vector<std::string>& solver_node_ids,
                             const std::vector<std::string>& roots_hex, uint64_t leaf_count);
  // Balance, free stake and withdrawable payout (wei, as decimal strings) of every node and the submitter.
  Result<nlohmann::json> balances() const;
  std::string rpc_url() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

void print_balances(const nlohmann::json& before, const nlohmann::json& after);

}  // namespace sn::cli
