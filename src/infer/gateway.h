// An OpenAI-compatible HTTP front for an Engine (docs/inference.md, "Gateway"):
// GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed as
// Server-Sent Events or answered whole), GET /metrics. It knows nothing of
// where the model runs: a local engine and a chain of block servers look the
// same through engine.h.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/result.h"
#include "infer/engine.h"

namespace sn::infer {

// One finished request, for an access log.
struct GatewayRequestLog {
  std::string method, path;
  int status = 0;
  bool stream = false;
  int prompt_tokens = 0, completion_tokens = 0;
  std::string finish_reason;       // "stop", "length", "cancelled" (client went away); empty if refused
  double first_token_s = 0, total_s = 0;
  std::string error;               // the error message sent, if any
};

struct GatewayOptions {
  std::string host = "127.0.0.1";
  int port = 0;                    // 0: any free port (Gateway::port() tells which)
  int max_concurrency = 16;        // generations at once; one more is answered 429 (1..1024)
  size_t max_body_bytes = 1 << 20; // larger request bodies get 413
  std::vector<std::string> api_keys;  // empty: no authentication; else "Authorization: Bearer KEY" with one of them
  // Sleeps this long after each generated token: lets tests disconnect while a
  // stream is still running on a model that is otherwise too fast. 0 in real use.
  std::chrono::milliseconds token_delay{0};
  // Called once per finished request, from a server thread (keep it short).
  std::function<void(const GatewayRequestLog&)> on_request;
  // Figures of the engine itself (a remote engine's spot checks, replacements,
  // last failover stall), added under "engine" to GET /metrics. Called from
  // server threads.
  std::function<std::map<std::string, double>()> engine_metrics;
};

// What the gateway has done, for the live line and GET /metrics. Latencies
// are over the most recent tokens (a window of 4096), rates over the last 5 s.
struct GatewayMetrics {
  int sessions_open = 0;           // generations running now
  int max_concurrency = 0;
  uint64_t requests = 0;           // every request that reached a handler
  uint64_t completions = 0;        // generations that finished (stop or length)
  uint64_t cancelled = 0;          // generations cancelled because the client went away
  uint64_t rejected = 0;           // answered 429 (at max_concurrency)
  uint64_t errors = 0;             // answered with another 4xx/5xx
  uint64_t tokens = 0;             // tokens generated in all
  double tokens_per_s = 0;         // generated tokens over the last 5 s
  double token_latency_p50_ms = 0; // time between consecutive tokens of one stream
  double token_latency_p95_ms = 0;
  double first_token_p50_ms = 0;   // request start → first token
  double uptime_s = 0;
};

// The text a list of chat messages becomes before it is encoded
// (docs/inference.md gives the template): one "Role: content" line per
// message (System, User, Assistant), then "Assistant:" for the reply.
struct ChatMessage {
  std::string role;                // "system", "user" or "assistant"
  std::string content;
};
std::string render_chat(const std::vector<ChatMessage>& messages);
// Generation of a chat reply stops before the model starts the next turn.
inline const std::vector<std::string>& chat_stop_strings() {
  static const std::vector<std::string> stops = {"\nUser:", "\nSystem:"};
  return stops;
}

class Gateway {
 public:
  // Binds HOST:PORT and starts serving on a pool of max_concurrency + 8
  // threads (the spare ones answer models, metrics and 429s while every slot
  // generates). Errors: invalid_input for options out of range, unavailable
  // if the address cannot be bound (in use, not local). ENGINE must outlive
  // the gateway.
  static Result<std::unique_ptr<Gateway>> start(std::shared_ptr<Engine> engine, const GatewayOptions& options);
  ~Gateway();  // stop()
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  int port() const;
  GatewayMetrics metrics() const;
  // Stops accepting, cancels running generations (their streams end) and
  // waits for them. Idempotent.
  void stop();

  struct Impl;

 private:
  explicit Gateway(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sn::infer
