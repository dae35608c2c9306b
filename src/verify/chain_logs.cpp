#include "verify/chain_logs.h"

#include <algorithm>
#include <map>
#include <set>

namespace sn::verify {

namespace {
std::string word_hex(uint64_t value) {
  Hash256 word{};
  for (int i = 0; i < 8; ++i) word[31 - i] = static_cast<uint8_t>(value >> (8 * i));
  return chain::hex0x(word);
}
// The market's logs of EVENT whose indexed argument number POSITION (1-based topic) is ID.
Result<std::vector<nlohmann::json>> logs(const chain::MarketClient& market, const std::string& event, uint64_t id,
                                         int position = 1) {
  const Hash256 topic = keccak256(event);
  nlohmann::json topics = nlohmann::json::array({chain::hex0x(topic)});
  for (int i = 1; i < position; ++i) topics.push_back(nullptr);
  topics.push_back(word_hex(id));
  SN_ASSIGN(nlohmann::json found,
            market.rpc().call("eth_getLogs", nlohmann::json::array({nlohmann::json{
                                                 {"address", chain::address_hex(market.deployment().market)},
                                                 {"fromBlock", "0x0"},
                                                 {"toBlock", "latest"},
                                                 {"topics", topics}}})));
  if (!found.is_array()) return kind_error(ErrorKind::bad_peer, "eth_getLogs: not a list");
  return std::vector<nlohmann::json>(found.begin(), found.end());
}
std::string address_of_topic(const nlohmann::json& topic) {
  const std::string text = topic.get<std::string>();
  return "0x" + text.substr(text.size() - 40);
}
}  // namespace

Result<nlohmann::json> dispute_outcome(const chain::MarketClient& market, uint64_t dispute_id) {
  SN_ASSIGN(auto resolved, logs(market, "DisputeResolved(uint256,address,address,uint256,uint256,bool)", dispute_id));
  for (const auto& log : resolved) {
    const auto& topics = log.at("topics");
    if (topics.size() < 4) continue;
    SN_ASSIGN(chain::Bytes data, chain::parse_hex0x(log.at("data").get<std::string>()));
    chain::Wei slashed = 0;
    for (size_t i = 16; i < 32 && i < data.size(); ++i) slashed = (slashed << 8) | data[i];
    const bool by_timeout = data.size() >= 96 && data[95] != 0;
    SN_ASSIGN(chain::DisputeState d, market.dispute(dispute_id));
    const std::string winner = address_of_topic(topics[2]);
    return nlohmann::json{{"result", winner == chain::address_hex(d.solver) ? "solver wins" : "challenger wins"},
                          {"winner", winner},
                          {"loser", address_of_topic(topics[3])},
                          {"slashed", chain::wei_to_string(slashed)},
                          {"by_timeout", by_timeout}};
  }
  SN_ASSIGN(auto cancelled, logs(market, "DisputeCancelled(uint256)", dispute_id));
  if (!cancelled.empty()) return nlohmann::json{{"result", "cancelled"}, {"by_timeout", true}};
  return kind_error(ErrorKind::not_found, "dispute {} has not closed", dispute_id);
}

Result<nlohmann::json> dispute_figures(const chain::MarketClient& market, uint64_t dispute_id) {
  SN_ASSIGN(chain::DisputeState d, market.dispute(dispute_id));
  SN_ASSIGN(chain::JobState job, market.job(d.job));
  const std::string solver = chain::address_hex(d.solver), challenger = chain::address_hex(d.challenger),
                    referee = chain::address_hex(job.referee);
  // Every move of the dispute emits one of these, naming the dispute.
  std::vector<nlohmann::json> moves;
  SN_ASSIGN(auto challenged,
            logs(market, "Challenged(uint256,uint256,address,address,uint48,uint48,bytes32,bytes32,uint256,uint32)",
                 dispute_id, 2));
  moves.insert(moves.end(), challenged.begin(), challenged.end());
  int64_t step_rounds = 0, op_rounds = 0;
  for (const char* event : {"LeafClaimed(uint256,uint48,bytes32,uint32)",
                            "OpsPosted(uint256,uint48,uint48,bytes32,bytes32,bytes32,bytes32,bytes32,uint32)",
                            "OpClaimed(uint256,uint48,bytes32,uint32)", "Bisected(uint256,uint8,uint48,uint48,uint32)",
                            "RefereeTurn(uint256,uint48,uint48,bytes32,bytes32,uint32)",
                            "DisputeResolved(uint256,address,address,uint256,uint256,bool)", "DisputeCancelled(uint256)"}) {
    SN_ASSIGN(auto found, logs(market, event, dispute_id));
    if (std::string_view(event).starts_with("LeafClaimed")) step_rounds = static_cast<int64_t>(found.size());
    if (std::string_view(event).starts_with("OpClaimed")) op_rounds = static_cast<int64_t>(found.size());
    moves.insert(moves.end(), found.begin(), found.end());
  }
  std::set<std::string> transactions;
  for (const auto& log : moves) transactions.insert(log.value("transactionHash", ""));
  std::map<std::string, uint64_t> gas{{"solver", 0}, {"challenger", 0}, {"referee", 0}, {"other", 0}};
  for (const auto& hash : transactions) {
    if (hash.empty()) continue;
    SN_ASSIGN(nlohmann::json receipt, market.rpc().call("eth_getTransactionReceipt", nlohmann::json::array({hash})));
    if (!receipt.is_object()) return kind_error(ErrorKind::bad_peer, "no receipt for transaction {}", hash);
    std::string from = receipt.value("from", "");
    std::transform(from.begin(), from.end(), from.begin(), [](unsigned char c) { return std::tolower(c); });
    const uint64_t used = std::stoull(receipt.value("gasUsed", "0x0"), nullptr, 16);
    const std::string who = from == solver ? "solver" : from == challenger ? "challenger" : from == referee ? "referee" : "other";
    gas[who] += used;
  }
  nlohmann::json by_party = nlohmann::json::object();
  for (const auto& [who, used] : gas) by_party[who] = used;
  return nlohmann::json{{"transactions", transactions.size()},
                        {"step_rounds", step_rounds},
                        {"op_rounds", op_rounds},
                        {"gas", by_party}};
}

}  // namespace sn::verify
