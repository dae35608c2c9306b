// Private to sn_verify: how a closed dispute ended, read from the market's
// events (DisputeResolved / DisputeCancelled).
#pragma once

#include <nlohmann/json.hpp>

#include "chain/chain.h"
#include "core/result.h"

namespace sn::verify {

// {"result": "solver wins" | "challenger wins" | "cancelled", "winner", "loser",
//  "slashed" (wei, decimal), "by_timeout"}; error not_found if the dispute has not closed.
Result<nlohmann::json> dispute_outcome(const chain::MarketClient& market, uint64_t dispute_id);

// What a dispute cost, from the market's logs: the transactions that moved it
// (challenge, claims, bisections, posts, the ruling or timeout), their gas by
// sender ({"solver", "challenger", "referee", "other"}: anyone who called
// timeout), and the rounds played in each phase (one claim per round).
Result<nlohmann::json> dispute_figures(const chain::MarketClient& market, uint64_t dispute_id);

}  // namespace sn::verify
