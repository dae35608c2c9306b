// Model distribution: a model is a manifest plus content-addressed chunks
// (one per block, one for the embeddings, one for the final norm, one for the
// tokenizer). The manifest's BLAKE2b-256 is the model's id, and it names every
// chunk by its BLAKE2b-256, so whoever holds the id can fetch the model from
// any node and check every byte. docs/inference.md, "Model distribution",
// fixes the manifest's canonical form and the directory layout.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/hash.h"
#include "core/job.h"
#include "core/keys.h"
#include "core/result.h"
#include "model/gpt.h"
#include "proto/solvernet.pb.h"

namespace sn::infer {

struct ModelFile;

inline constexpr const char* kManifestFormat = "solvernet-model-v1";
// The most a GetChunk reply carries (and the default when a request asks for 0).
inline constexpr int64_t kMaxChunkReplyBytes = int64_t{4} << 20;

struct ChunkRef {
  std::string kind;    // "tokenizer", "embed", "block" or "head"
  int block = -1;      // the block's index for kind "block", else -1
  std::string hash;    // hex BLAKE2b-256 of the chunk's bytes
  int64_t bytes = 0;
  // "tokenizer", "embed", "block.3", "head": how messages and progress name it.
  std::string label() const;
};

// A parsed manifest. Chunk contents: "tokenizer" is the vocabulary text
// ("piece\tscore" lines); the others are safetensors bytes (no metadata) of
// "embed": wte.weight, wpe.weight; "block.N": blocks.N.* (12 tensors, in
// model/gpt.h's order); "head": ln_f.weight, ln_f.bias. The LM head is tied to
// wte, so a span ending at the last block needs "embed" as well as "head".
struct Manifest {
  std::string name;
  ModelConfig config;
  ChunkRef tokenizer;
  std::vector<ChunkRef> chunks;   // embed, block.0 .. block.L-1, head
  std::string bytes;              // canonical bytes (what the id hashes)
  std::string id;                 // hex BLAKE2b-256 of bytes

  // The chunks a span [first_block, end_block) needs, tokenizer first.
  std::vector<ChunkRef> chunks_for(int first_block, int end_block) const;
  int64_t total_bytes() const;    // every chunk, tokenizer included
};

// Builds the manifest of FILE, handing each chunk's bytes to SINK (if given)
// as soon as they are made, so at most one chunk is held beside the model.
// A SINK error stops it and is returned.
using ChunkSink = std::function<Status(const ChunkRef& chunk, const std::string& bytes)>;
Result<Manifest> make_manifest(const ModelFile& file, const ChunkSink& sink = {});
// Parses canonical manifest bytes. invalid_input if they are not the canonical
// form of a solvernet-model-v1 manifest (unknown format, missing or out-of-range
// fields, chunks out of order, bytes that re-serialise differently).
Result<Manifest> parse_manifest(std::string_view bytes);

// Checks "F-L" or "F" (inclusive block indices) against LAYERS (≤ 0: the
// syntax only); returns [first, end). invalid_input naming FLAG and the
// model's layer count.
Result<std::pair<int, int>> parse_block_range(std::string_view text, int64_t layers, std::string_view flag);

// A node to fetch from: its id (TLS checks it) and gRPC address.
struct Provider {
  std::string node_id;
  std::string address;
};
// The nodes in NODES whose announcement lists MODEL_ID in `models`, in the order given.
std::vector<Provider> providers_of(const std::vector<solvernet::v1::NodeInfo>& nodes, const std::string& model_id);

struct FetchProgress {
  int chunks_total = 0;           // distinct chunks the span needs
  int chunks_done = 0;            // present so far (already held or fetched)
  int64_t bytes_total = 0;        // bytes of the chunks the span needs
  int64_t bytes_done = 0;         // present so far, partial chunks included
  int64_t bytes_fetched = 0;      // received over the network by this call
  std::string chunk;              // label of the chunk in transfer ("" when none)
};

struct FetchOptions {
  std::chrono::milliseconds call_timeout{10000};  // per RPC
  int64_t request_bytes = kMaxChunkReplyBytes;     // per GetChunk request, 1..4 MiB
  double max_rate_bytes_per_s = 0;                 // total receive rate cap (0: none)
  // After each reply (and once at the start); calls are serialised, from the fetching threads.
  std::function<void(const FetchProgress&)> progress;
};

struct FetchReport {
  int chunks_total = 0;
  int chunks_present = 0;         // complete before this call: not fetched again
  int chunks_fetched = 0;
  int64_t bytes_fetched = 0;      // received by this call (resumed .part bytes are not counted)
  int64_t bytes_resumed = 0;      // already in .part files when the call began
  // Chunks refused: "block.2 from <node id>: hash <got> does not match <want>".
  std::vector<std::string> refused;
};

class ModelStore {
 public:
  // Opens (creating if needed) the store at DIR: DIR/manifests/<id>.json and
  // DIR/chunks/<hash> (+ <hash>.part while fetching). internal if DIR cannot
  // be created or written.
  static Result<std::unique_ptr<ModelStore>> open(const std::filesystem::path& dir);
  ~ModelStore();

  const std::filesystem::path& dir() const { return dir_; }

  // Splits the model file at PATH into chunks, stores them and the manifest,
  // and returns the model's id. Publishing the same file again returns the
  // same id and writes nothing new. Errors from load_model_file (invalid_input).
  Result<std::string> publish(const std::filesystem::path& model_file);
  Result<std::string> publish(const ModelFile& file);

  // The manifest of ID if this store has it (not_found otherwise; internal if
  // the stored bytes no longer hash to ID).
  Result<Manifest> manifest(const std::string& id) const;
  // Ids of the models this store has every chunk of (present, right size),
  // sorted. Hashes are checked when chunks arrive and again when loaded.
  std::vector<std::string> complete_models() const;
  // Ids of every manifest held, complete or not, sorted.
  std::vector<std::string> models() const;
  // Whether every chunk span [FIRST, END) of ID needs is present.
  bool has_chunks(const std::string& id, int first_block, int end_block) const;

  // Fetches the manifest of ID (if not held) and every chunk span [FIRST, END)
  // needs that is not held, from PROVIDERS: chunk i starts with provider
  // i mod n and moves on to the next when one fails; up to one chunk per
  // provider (at most 4) is in transfer at a time. A chunk is received into
  // chunks/<hash>.part, resumed from that file's size (a killed fetch loses
  // nothing it wrote), hash-checked and renamed into place; a wrong hash
  // deletes the .part, logs the provider (warn) and tries the next one. A
  // manifest whose hash is not ID is refused likewise. IDENTITY (may be null)
  // is presented to providers. Errors: invalid_input (ID not 64 hex digits, a
  // span outside the model), unavailable (no provider, or every provider
  // failed for some chunk, naming the chunk and the last error), and
  // invalid_input if another process is fetching into this store; chunks
  // fetched before the error stay.
  Result<FetchReport> fetch(const std::string& id, int first_block, int end_block,
                            const std::vector<Provider>& providers, const NodeKey* identity,
                            const FetchOptions& options = {});

  // Only the manifest of ID (held, or fetched as fetch() does). Refusals are
  // appended to REFUSED if given. Errors as fetch().
  Result<Manifest> fetch_manifest(const std::string& id, const std::vector<Provider>& providers,
                                  const NodeKey* identity, const FetchOptions& options = {},
                                  std::vector<std::string>* refused = nullptr);

  // The tensors of span [FIRST, END) of ID (whole-model names), read from the
  // chunks with each one's hash checked again: a chunk whose bytes no longer
  // match the manifest is never loaded (internal, naming the chunk and the
  // file). not_found if a chunk is missing.
  Result<model::NamedTensors> load_span(const std::string& id, int first_block, int end_block) const;
  Result<std::string> tokenizer_vocab(const std::string& id) const;  // hash-checked likewise
  Result<ModelConfig> config(const std::string& id) const;

  // Calls ON_CHANGE with complete_models() whenever that list changes (a
  // model published or fetched into this directory by another process while
  // a node serves it), checked every EVERY on a thread of the store's, until
  // the store is destroyed. The list at the time of this call is the baseline:
  // no call until something changes. Only once per store.
  void watch_complete_models(std::chrono::milliseconds every,
                             std::function<void(const std::vector<std::string>&)> on_change);

  // The gRPC ModelStore service over this store (owned by it): GetManifest
  // (not_found for an unknown id) and GetChunk (not_found for an unknown or
  // malformed hash, invalid_input for a negative offset or max_bytes, or an
  // offset past the end; max_bytes 0 or above 4 MiB is served as 4 MiB).
  grpc::Service* service();

 private:
  class Service;
  explicit ModelStore(std::filesystem::path dir);
  std::filesystem::path chunk_path(const std::string& hash) const;
  std::filesystem::path manifest_path(const std::string& id) const;
  Status store_chunk(const std::string& hash, const std::string& bytes);
  Result<std::string> read_chunk(const std::string& id, const ChunkRef& chunk) const;
  bool chunk_present(const ChunkRef& chunk) const;
  Result<Manifest> fetch_manifest_locked(const std::string& id, const std::vector<Provider>& providers,
                                         const NodeKey* identity, const FetchOptions& options,
                                         std::vector<std::string>* refused);

  std::filesystem::path dir_;
  std::unique_ptr<Service> service_;
  mutable std::mutex mutex_;  // guards the manifest cache and service_
  std::mutex fetch_mutex_;    // one fetch at a time (DIR/fetching/lock: one process at a time)
  std::mutex watch_mutex_;
  std::condition_variable watch_wake_;
  bool watch_stopping_ = false;
  std::thread watcher_;
  mutable std::map<std::string, Manifest> manifests_;
};

}  // namespace sn::infer
