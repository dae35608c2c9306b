// The client side of serving across nodes (after Petals): find the block
// servers of a model in the DHT, route a chain that covers every block by the
// shortest path over measured latency, compute time and load, open a session
// on each hop and stream hidden states hop to hop. A hop that dies, stalls or
// returns malformed states is replaced by servers covering the same blocks,
// which are replayed the session's past inputs; spot checks recompute a
// fraction of steps on a second server. docs/inference.md.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/keys.h"
#include "core/result.h"
#include "infer/engine.h"
#include "proto/solvernet.pb.h"

namespace sn::infer {

// A server's announced span of a model, as the router sees it.
struct ServerSpan {
  std::string node_id;
  std::string address;
  int first_block = 0, end_block = 0;  // [first, end)
  double throughput = 0;                // block·tokens/s
  double load = 0;                      // 0..1
  double rtt_s = 0;                     // measured by the client (0: not yet)
};

// One hop of a chain: blocks [first_block, end_block) on SERVER (a sub-span of what it holds).
struct Hop {
  ServerSpan server;
  int first_block = 0, end_block = 0;
};

// The cheapest chain covering blocks [first, end) of a model, by shortest path:
// a hop costs its server's RTT + (blocks / throughput) · (1 + load). Servers
// whose node id is in AVOID are not used. not_found naming the first block no
// usable server covers.
Result<std::vector<Hop>> route_chain(const std::vector<ServerSpan>& servers, int first, int end,
                                     const std::vector<std::string>& avoid = {});

struct RemoteEngineOptions {
  std::vector<std::string> bootstrap;   // DHT bootstrap "host:port"
  std::string model;                    // model id (manifest hash); empty: the only model served
  const NodeKey* identity = nullptr;    // signs every request (must outlive the engine)
  double spot_check_fraction = 0.05;    // of steps recomputed on a second server
  int max_replacements = 3;             // per generation, before giving up
  std::chrono::milliseconds step_timeout{10000};  // one hop's step (a frozen server is replaced after this)
  std::chrono::milliseconds discovery_timeout{15000};
  // A server that failed is not routed to for this long (one caught lying by
  // a spot check: never again).
  std::chrono::milliseconds avoid_failed_for{60000};
  // Each event the engine reports (route chosen, hop replaced, spot-check
  // mismatch, server dropped), one line, for logs and tests.
  std::function<void(const std::string&)> on_event;
  // Benchmarks: an emulated round trip (seconds) added to every call to a
  // server (node id), so chains over slow links can be measured on one machine.
  std::function<double(const std::string& node_id)> emulated_rtt_s;
};

// Counters of a remote engine's life (tests and the devnet's live line).
struct RemoteEngineCounters {
  int64_t steps = 0, spot_checks = 0, spot_check_mismatches = 0, replacements = 0, dropped_servers = 0;
  double last_stall_s = 0;              // the last failover's stall: failure noticed → step resumed
};

class RemoteEngine : public Engine {
 public:
  virtual RemoteEngineCounters counters() const = 0;
  virtual std::vector<std::string> avoided() const = 0;  // node ids not routed to now
};

// Joins the DHT, waits for servers of the model, fetches its manifest (config
// and tokenizer) from one of them. Errors: unavailable (no bootstrap, no
// servers), not_found (model not served, or blocks not covered).
Result<std::unique_ptr<RemoteEngine>> open_remote_engine(const RemoteEngineOptions& options);

}  // namespace sn::infer
