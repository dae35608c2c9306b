// A block server: the Infer gRPC service (proto/solvernet.proto) for a span of
// one model's blocks, hosted by the node runtime. Clients open sessions on it
// (each with its own KV cache, admitted by memory and dropped when idle),
// stream steps through it, and ask it to recompute a span for spot checks.
// Decode steps of concurrent sessions run as one batch. A session opening or
// ending is an admission or a release, so the runtime's on_jobs_change runs,
// with served_span() already counting it: that is where a node re-announces.
// docs/inference.md, "Block servers".
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "model/gpt.h"
#include "net/node_runtime.h"
#include "proto/solvernet.pb.h"

namespace sn::infer {

struct BlockServerOptions {
  net::NodeRuntime* runtime = nullptr;  // authorizes, admits, expires sessions; must outlive the server
  std::string model_id;                 // hex BLAKE2b-256 (manifest hash, or the file's until distribution)
  std::string model_name;
  ModelConfig config;
  int first_block = 0, end_block = 0;   // the span served, [first_block, end_block)
  model::NamedTensors weights;          // whole-model names; at least the span's tensors
  std::chrono::milliseconds session_idle{60000};  // a session not used for this long is dropped
  int max_batch = 32;                   // decode steps run together at most
  // Cheat (tests only): every output is replaced by noise of the right shape,
  // so a client's spot checks have something to catch.
  bool cheat_garbage_states = false;
  // Cheat (tests only): every output loses its last column, a mis-shaped
  // answer the client must drop the server for.
  bool cheat_malformed_states = false;
};

// What the server has done since it started (tests and the node's log read it).
struct BlockServerStats {
  int sessions = 0;                     // open now
  int64_t steps = 0;                    // Forward steps computed
  int64_t decode_batches = 0;           // batches of single-position steps
  int largest_batch = 0;                // most decode steps in one batch
};

class BlockServer {
 public:
  // Builds the span (invalid_input if the span is empty, outside the model,
  // or a tensor is missing or mis-shaped), starts the batching thread and
  // measures throughput (one decode step of one session, ~0.2 s).
  static Result<std::unique_ptr<BlockServer>> create(BlockServerOptions options);
  virtual ~BlockServer() = default;

  // The Infer service to register on the runtime before it starts.
  virtual grpc::Service* service() = 0;
  // The announcement: model, span, measured throughput, sessions now, load.
  virtual solvernet::v1::ServedSpan served_span() const = 0;
  virtual BlockServerStats stats() const = 0;
};

// KV-cache admission for one session of MAX_LENGTH positions over
// LAYER_COUNT blocks: the cache plus one prefill's activations.
int64_t session_memory_bytes(const ModelConfig& config, int64_t layer_count, int64_t max_length);

// "MODEL[:FIRST-LAST]" (blocks 0-based, LAST inclusive) → model and span
// [first, last + 1); no span: first = end = -1. invalid_input naming the flag.
struct ServeSpec {
  std::string model;
  int first_block = -1, end_block = -1;
};
Result<ServeSpec> parse_serve_spec(const std::string& text);

// The span of SIZE blocks (1..LAYERS) a new server should take, given how many
// servers already hold each block (COVERAGE, one count per block; shorter
// means zero): the window whose least-covered block is least covered, then
// the one with the least total coverage, then the first — it fills the
// largest gap in the swarm's coverage. Returns [first, end).
std::pair<int, int> choose_span(int layers, int size, const std::vector<int>& coverage);

// Blocks per model already served by the swarm: coverage[b] = servers whose
// announced span of MODEL_ID covers block b.
std::vector<int> swarm_coverage(const std::vector<solvernet::v1::NodeInfo>& nodes, const std::string& model_id,
                                int layers);

}  // namespace sn::infer
