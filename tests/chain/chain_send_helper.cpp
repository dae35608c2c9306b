// chain_send_helper: a node-like process for chain_test's kill test. It performs a fixed
// sequence of named actions from the key and journal in DATA_DIR, each through the
// journal's exactly-once, and exits 0 when all are done:
//   register (stake 1000 wei), then for i in 0..ACTIONS-1:
//     i % 3 == 0  stake 1000+i wei                    "stake-i"
//     i % 3 == 1  send 1000+i wei to SINK              "send-i"
//     i % 3 == 2  commit to JOBS[i/3] the root word(i) "commit-i"
// With KILL_AT = STEP:ACTION (STEP journaled | sent | mined) it SIGKILLs itself at that
// step of that action, as a node killed mid-send would die.
//
// usage: chain_send_helper DEPLOYMENT_JSON DATA_DIR SINK ACTIONS JOBS(comma-separated) [KILL_AT]
#include <signal.h>

#include <iostream>
#include <sstream>

#include "chain/chain.h"

using namespace sn;
using namespace sn::chain;

static int die(const std::string& message) {
  std::cerr << "chain_send_helper: " << message << "\n";
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 6) return die("usage: DEPLOYMENT_JSON DATA_DIR SINK ACTIONS JOBS [KILL_AT]");
  auto deployment = Deployment::load(argv[1]);
  if (!deployment.ok()) return die(deployment.message());
  std::filesystem::path data_dir = argv[2];
  auto sink = parse_address(argv[3]);
  if (!sink.ok()) return die(sink.message());
  int actions = std::stoi(argv[4]);
  std::vector<uint64_t> jobs;
  std::stringstream list(argv[5]);
  for (std::string item; std::getline(list, item, ',');)
    if (!item.empty()) jobs.push_back(std::stoull(item));
  std::string kill_at = argc > 6 ? argv[6] : "";

  auto rpc = std::make_shared<RpcClient>(deployment->rpc_url);
  auto market = MarketClient::for_data_dir(rpc, *deployment, data_dir);
  if (!market.ok()) return die(market.message());
  market->wallet().set_step_hook([&](Wallet::Step step, std::string_view action) {
    const char* name = step == Wallet::Step::journaled ? "journaled" : step == Wallet::Step::sent ? "sent" : "mined";
    if (kill_at == std::string(name) + ":" + std::string(action)) raise(SIGKILL);
  });

  Hash256 node_id{};
  std::copy(market->address().begin(), market->address().end(), node_id.begin() + 12);
  if (auto done = market->register_node(node_id, 1000, "register"); !done.ok()) return die("register: " + done.message());
  for (int i = 0; i < actions; ++i) {
    std::string name;
    Result<Receipt> done = make_error("no action");
    if (i % 3 == 0) {
      name = "stake-" + std::to_string(i);
      done = market->stake(1000 + static_cast<Wei>(i), name);
    } else if (i % 3 == 1) {
      name = "send-" + std::to_string(i);
      done = market->wallet().send(*sink, 1000 + static_cast<Wei>(i), {}, name);
    } else {
      name = "commit-" + std::to_string(i);
      if (static_cast<size_t>(i / 3) >= jobs.size()) return die("too few jobs for " + name);
      Hash256 root{};
      root.fill(static_cast<uint8_t>(0x10 + i));
      done = market->commit(jobs[static_cast<size_t>(i / 3)], root, 1, true, name);
    }
    if (!done.ok()) return die(name + ": " + done.message());
  }
  return 0;
}
