#include "infer/model_store.h"

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <optional>
#include <set>
#include <thread>

#include "core/fs.h"
#include "core/process.h"
#include "infer/span.h"
#include "model/safetensors.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"

namespace sn::infer {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* const kBlockTensors[] = {"ln1.weight",     "ln1.bias",       "attn.qkv.weight", "attn.qkv.bias",
                                     "attn.proj.weight", "attn.proj.bias", "ln2.weight",      "ln2.bias",
                                     "mlp.fc.weight",  "mlp.fc.bias",    "mlp.proj.weight", "mlp.proj.bias"};

std::vector<std::string> chunk_tensor_names(const ChunkRef& chunk) {
  if (chunk.kind == "embed") return {"wte.weight", "wpe.weight"};
  if (chunk.kind == "head") return {"ln_f.weight", "ln_f.bias"};
  std::vector<std::string> names;
  for (const char* t : kBlockTensors) names.push_back("blocks." + std::to_string(chunk.block) + "." + t);
  return names;
}

bool is_hex_hash(std::string_view text) {
  return text.size() == 64 &&
         std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

std::string hex_hash(std::string_view bytes) { return to_hex(hash_bytes(as_bytes(bytes))); }
std::string short_id(const std::string& id) { return id.substr(0, 12); }

bool valid_name(const std::string& name) {
  return !name.empty() && name.size() <= kMaxJobNameLength && name[0] != '.' &&
         std::all_of(name.begin(), name.end(), [](char c) {
           return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                  c == '-';
         });
}

json chunk_json(const ChunkRef& c) {
  json j = {{"kind", c.kind}, {"hash", c.hash}, {"bytes", c.bytes}};
  if (c.kind == "block") j["block"] = c.block;
  return j;
}

// nlohmann::json keeps object keys in a std::map (sorted by bytes) and dump()
// with no indent writes no whitespace: that is the canonical form.
std::string canonical_bytes(const Manifest& m) {
  json chunks = json::array();
  for (const auto& c : m.chunks) chunks.push_back(chunk_json(c));
  json j = {{"format", kManifestFormat},
            {"name", m.name},
            {"config",
             {{"layers", m.config.layers},
              {"d_model", m.config.d_model},
              {"heads", m.config.heads},
              {"d_ff", m.config.d_ff},
              {"vocab", m.config.vocab},
              {"seq_len", m.config.seq_len}}},
            {"tokenizer", {{"hash", m.tokenizer.hash}, {"bytes", m.tokenizer.bytes}}},
            {"chunks", chunks}};
  return j.dump();
}

Status check_span(const Manifest& m, int first_block, int end_block) {
  if (first_block < 0 || end_block > m.config.layers || first_block >= end_block)
    return input_error("blocks [{}, {}) are not a span of model {} (blocks 0-{})", first_block, end_block,
                       short_id(m.id), m.config.layers - 1);
  return ok_status();
}

int64_t file_size_or(const fs::path& path, int64_t fallback) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  return ec ? fallback : static_cast<int64_t>(size);
}

}  // namespace

std::string ChunkRef::label() const { return kind == "block" ? "block." + std::to_string(block) : kind; }

std::vector<ChunkRef> Manifest::chunks_for(int first_block, int end_block) const {
  std::vector<ChunkRef> out{tokenizer};
  const bool last = end_block == config.layers;
  for (const auto& c : chunks) {
    if (c.kind == "embed" && (first_block == 0 || last)) out.push_back(c);
    if (c.kind == "block" && c.block >= first_block && c.block < end_block) out.push_back(c);
    if (c.kind == "head" && last) out.push_back(c);
  }
  return out;
}

int64_t Manifest::total_bytes() const {
  int64_t total = tokenizer.bytes;
  for (const auto& c : chunks) total += c.bytes;
  return total;
}

Result<Manifest> make_manifest(const ModelFile& file, const ChunkSink& sink) {
  // A file written without a name (an older train) is published as "model".
  const std::string name = file.name.empty() ? "model" : file.name;
  if (!valid_name(name))
    return input_error("model name \"{}\" must be 1-{} characters of A-Z a-z 0-9 . _ -, not starting with '.'",
                       name, kMaxJobNameLength);
  std::map<std::string, torch::Tensor> by_name;
  for (const auto& [name, tensor] : file.tensors) by_name.emplace(name, tensor);
  Manifest m;
  m.name = name;
  m.config = file.config;
  auto add = [&](ChunkRef ref, const std::string& bytes) -> Result<ChunkRef> {
    ref.hash = hex_hash(bytes);
    ref.bytes = static_cast<int64_t>(bytes.size());
    if (sink) SN_TRY(sink(ref, bytes));
    return ref;
  };
  SN_ASSIGN(m.tokenizer, add(ChunkRef{"tokenizer", -1, "", 0}, file.tokenizer_vocab));
  std::vector<ChunkRef> refs{ChunkRef{"embed", -1, "", 0}};
  for (int b = 0; b < file.config.layers; ++b) refs.push_back(ChunkRef{"block", b, "", 0});
  refs.push_back(ChunkRef{"head", -1, "", 0});
  for (auto& ref : refs) {
    model::NamedTensors tensors;
    for (const auto& tensor_name : chunk_tensor_names(ref)) {
      auto it = by_name.find(tensor_name);
      if (it == by_name.end()) return input_error("model {}: tensor {} is missing", m.name, tensor_name);
      tensors.emplace_back(tensor_name, it->second);
    }
    SN_ASSIGN(ChunkRef chunk, add(ref, model::safetensors_bytes(tensors)));
    m.chunks.push_back(std::move(chunk));
  }
  m.bytes = canonical_bytes(m);
  m.id = hex_hash(m.bytes);
  return m;
}

Result<Manifest> parse_manifest(std::string_view bytes) {
  Manifest m;
  try {
    json j = json::parse(bytes);
    if (!j.is_object()) return input_error("manifest: not a JSON object");
    if (j.value("format", "") != kManifestFormat)
      return input_error("manifest: format is not \"{}\"", kManifestFormat);
    m.name = j.at("name").get<std::string>();
    if (!valid_name(m.name)) return input_error("manifest: bad model name");
    const json& c = j.at("config");
    m.config.layers = c.at("layers").get<int64_t>();
    m.config.d_model = c.at("d_model").get<int64_t>();
    m.config.heads = c.at("heads").get<int64_t>();
    m.config.d_ff = c.at("d_ff").get<int64_t>();
    m.config.vocab = c.at("vocab").get<int64_t>();
    m.config.seq_len = c.at("seq_len").get<int64_t>();
    if (m.config.layers < 1 || m.config.layers > 4096 || m.config.d_model < 1 || m.config.d_model > (1 << 16) ||
        m.config.heads < 1 || m.config.d_model % m.config.heads != 0 || m.config.d_ff < 1 ||
        m.config.d_ff > (1 << 20) || m.config.vocab < 1 || m.config.vocab > (1 << 24) || m.config.seq_len < 2 ||
        m.config.seq_len > (1 << 20))
      return input_error("manifest: model config out of range");
    auto read_ref = [](const json& r, ChunkRef& ref) -> Status {
      ref.hash = r.at("hash").get<std::string>();
      ref.bytes = r.at("bytes").get<int64_t>();
      if (!is_hex_hash(ref.hash)) return input_error("manifest: chunk hash \"{}\" is not 64 hex digits", ref.hash);
      if (ref.bytes < 0 || ref.bytes > (int64_t{1} << 40)) return input_error("manifest: chunk size out of range");
      return ok_status();
    };
    m.tokenizer.kind = "tokenizer";
    SN_TRY(read_ref(j.at("tokenizer"), m.tokenizer));
    const json& chunks = j.at("chunks");
    if (!chunks.is_array() || static_cast<int64_t>(chunks.size()) != m.config.layers + 2)
      return input_error("manifest: expected {} chunks (embed, one per block, head)", m.config.layers + 2);
    for (size_t i = 0; i < chunks.size(); ++i) {
      ChunkRef ref;
      ref.kind = chunks[i].at("kind").get<std::string>();
      const std::string want = i == 0 ? "embed" : i + 1 == chunks.size() ? "head" : "block";
      if (ref.kind != want) return input_error("manifest: chunk {} is \"{}\", expected \"{}\"", i, ref.kind, want);
      if (want == "block") {
        ref.block = chunks[i].at("block").get<int>();
        if (ref.block != static_cast<int>(i) - 1) return input_error("manifest: blocks out of order at chunk {}", i);
      }
      SN_TRY(read_ref(chunks[i], ref));
      m.chunks.push_back(ref);
    }
  } catch (const std::exception& e) {
    return input_error("manifest: {}", e.what());
  }
  m.bytes = canonical_bytes(m);
  if (m.bytes != bytes) return input_error("manifest: not in canonical form (docs/inference.md)");
  m.id = hex_hash(m.bytes);
  return m;
}

Result<std::pair<int, int>> parse_block_range(std::string_view text, int64_t layers, std::string_view flag) {
  auto bad = [&] {
    if (layers <= 0) return input_error("{} {}: expected FIRST-LAST, block indices with FIRST ≤ LAST", flag, text);
    return input_error("{} {}: expected FIRST-LAST, block indices in 0-{} with FIRST ≤ LAST", flag, text, layers - 1);
  };
  auto number = [](std::string_view s, int& out) {
    if (s.empty() || s.size() > 9 || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
      return false;
    out = std::stoi(std::string(s));
    return true;
  };
  int first = 0, last = 0;
  auto dash = text.find('-');
  if (!number(text.substr(0, dash), first)) return bad();
  last = first;
  if (dash != std::string_view::npos && !number(text.substr(dash + 1), last)) return bad();
  if (first > last || (layers > 0 && last >= layers)) return bad();
  return std::make_pair(first, last + 1);
}

std::vector<Provider> providers_of(const std::vector<solvernet::v1::NodeInfo>& nodes, const std::string& model_id) {
  std::vector<Provider> out;
  for (const auto& n : nodes)
    if (std::find(n.models().begin(), n.models().end(), model_id) != n.models().end())
      out.push_back(Provider{n.node_id(), n.address()});
  return out;
}

// ---- the gRPC service ----

class ModelStore::Service final : public solvernet::v1::ModelStore::Service {
 public:
  explicit Service(ModelStore* store) : store_(store) {}

  grpc::Status GetManifest(grpc::ServerContext*, const solvernet::v1::GetManifestRequest* request,
                           solvernet::v1::GetManifestReply* reply) override {
    if (!is_hex_hash(request->model())) return grpc::Status(grpc::NOT_FOUND, "not a model id: " + request->model());
    auto m = store_->manifest(request->model());
    if (!m.ok()) return net::to_grpc(m.error());
    reply->set_manifest(m->bytes);
    return grpc::Status::OK;
  }

  grpc::Status GetChunk(grpc::ServerContext*, const solvernet::v1::GetChunkRequest* request,
                        solvernet::v1::GetChunkReply* reply) override {
    // The hash becomes a file name: only 64 lowercase hex digits ever reach the file system.
    if (!is_hex_hash(request->hash())) return grpc::Status(grpc::NOT_FOUND, "not a chunk hash: " + request->hash());
    if (request->offset() < 0 || request->max_bytes() < 0)
      return grpc::Status(grpc::INVALID_ARGUMENT, "offset and max_bytes must be ≥ 0");
    fs::path path = store_->chunk_path(request->hash());
    int64_t size = file_size_or(path, -1);
    if (size < 0) return grpc::Status(grpc::NOT_FOUND, "no chunk " + request->hash());
    if (request->offset() > size)
      return grpc::Status(grpc::INVALID_ARGUMENT, fmt::format("offset {} is past the chunk's {} bytes", request->offset(), size));
    int64_t want = request->max_bytes() == 0 ? kMaxChunkReplyBytes : std::min(request->max_bytes(), kMaxChunkReplyBytes);
    want = std::min(want, size - request->offset());
    std::string data(static_cast<size_t>(want), '\0');
    std::ifstream in(path, std::ios::binary);
    in.seekg(request->offset());
    if (!in.read(data.data(), want)) return grpc::Status(grpc::INTERNAL, "cannot read chunk " + request->hash());
    reply->set_data(std::move(data));
    reply->set_total_bytes(size);
    return grpc::Status::OK;
  }

 private:
  ModelStore* store_;
};

// ---- the store ----

ModelStore::ModelStore(fs::path dir) : dir_(std::move(dir)) {}
ModelStore::~ModelStore() {
  {
    std::lock_guard<std::mutex> lock(watch_mutex_);
    watch_stopping_ = true;
  }
  watch_wake_.notify_all();
  if (watcher_.joinable()) watcher_.join();
}

void ModelStore::watch_complete_models(std::chrono::milliseconds every,
                                       std::function<void(const std::vector<std::string>&)> on_change) {
  if (watcher_.joinable()) return;
  watcher_ = std::thread([this, every, on_change = std::move(on_change), last = complete_models()]() mutable {
    std::unique_lock<std::mutex> lock(watch_mutex_);
    while (!watch_wake_.wait_for(lock, every, [&] { return watch_stopping_; })) {
      lock.unlock();
      // A directory scan and a stat per chunk: cheap next to announcing.
      auto now = complete_models();
      if (now != last) {
        last = now;
        on_change(now);
      }
      lock.lock();
    }
  });
}

Result<std::unique_ptr<ModelStore>> ModelStore::open(const fs::path& dir) {
  SN_TRY(ensure_directory(dir / "manifests"));
  SN_TRY(ensure_directory(dir / "chunks"));
  return std::unique_ptr<ModelStore>(new ModelStore(dir));
}

fs::path ModelStore::chunk_path(const std::string& hash) const { return dir_ / "chunks" / hash; }
fs::path ModelStore::manifest_path(const std::string& id) const { return dir_ / "manifests" / (id + ".json"); }

grpc::Service* ModelStore::service() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!service_) service_ = std::make_unique<Service>(this);
  return service_.get();
}

Status ModelStore::store_chunk(const std::string& hash, const std::string& bytes) {
  if (file_size_or(chunk_path(hash), -1) == static_cast<int64_t>(bytes.size())) return ok_status();
  return write_file_atomic(chunk_path(hash), bytes);
}

Result<std::string> ModelStore::publish(const fs::path& model_file) {
  SN_ASSIGN(ModelFile file, load_model_file(model_file));
  return publish(file);
}

Result<std::string> ModelStore::publish(const ModelFile& file) {
  SN_ASSIGN(Manifest m, make_manifest(file, [&](const ChunkRef& chunk, const std::string& bytes) {
    return store_chunk(chunk.hash, bytes);
  }));
  // The manifest last: a store never lists a model whose chunks it lacks for want of a crash.
  if (read_file(manifest_path(m.id)).value_or("") != m.bytes) SN_TRY(write_file_atomic(manifest_path(m.id), m.bytes));
  std::lock_guard<std::mutex> lock(mutex_);
  manifests_[m.id] = m;
  return m.id;
}

Result<Manifest> ModelStore::manifest(const std::string& id) const {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (auto it = manifests_.find(id); it != manifests_.end()) return it->second;
  }
  if (!is_hex_hash(id)) return input_error("model id \"{}\" is not 64 lowercase hex digits", id);
  fs::path path = manifest_path(id);
  if (!fs::exists(path)) return kind_error(ErrorKind::not_found, "model {} is not in {}", short_id(id), dir_.string());
  SN_ASSIGN(std::string bytes, read_file(path));
  if (hex_hash(bytes) != id)
    return make_error("{}: the manifest's hash is not its id (a damaged file: delete it and fetch the model again)",
                      path.string());
  auto m = parse_manifest(bytes);
  if (!m.ok()) return make_error("{}: {}", path.string(), m.message());
  std::lock_guard<std::mutex> lock(mutex_);
  manifests_[id] = *m;
  return *m;
}

std::vector<std::string> ModelStore::models() const {
  std::vector<std::string> ids;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir_ / "manifests", ec)) {
    std::string name = entry.path().filename().string();
    if (name.size() == 69 && name.ends_with(".json") && is_hex_hash(name.substr(0, 64))) ids.push_back(name.substr(0, 64));
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

bool ModelStore::chunk_present(const ChunkRef& chunk) const {
  return file_size_or(chunk_path(chunk.hash), -1) == chunk.bytes;
}

bool ModelStore::has_chunks(const std::string& id, int first_block, int end_block) const {
  auto m = manifest(id);
  if (!m.ok() || !check_span(*m, first_block, end_block).ok()) return false;
  for (const auto& c : m->chunks_for(first_block, end_block))
    if (!chunk_present(c)) return false;
  return true;
}

std::vector<std::string> ModelStore::complete_models() const {
  std::vector<std::string> out;
  for (const auto& id : models()) {
    auto m = manifest(id);
    if (m.ok() && has_chunks(id, 0, static_cast<int>(m->config.layers))) out.push_back(id);
  }
  return out;
}

Result<std::string> ModelStore::read_chunk(const std::string& id, const ChunkRef& chunk) const {
  fs::path path = chunk_path(chunk.hash);
  if (!fs::exists(path))
    return kind_error(ErrorKind::not_found, "model {}: chunk {} is not in {} (fetch it: solvernet model fetch)",
                      short_id(id), chunk.label(), (dir_ / "chunks").string());
  SN_ASSIGN(std::string bytes, read_file(path));
  if (std::string got = hex_hash(bytes); got != chunk.hash)
    return make_error("model {}: chunk {} ({}) does not match the manifest (its hash is {}, expected {}): "
                      "refusing to load it; delete the file and fetch it again",
                      short_id(id), chunk.label(), path.string(), got.substr(0, 16), chunk.hash.substr(0, 16));
  return bytes;
}

Result<model::NamedTensors> ModelStore::load_span(const std::string& id, int first_block, int end_block) const {
  SN_ASSIGN(Manifest m, manifest(id));
  SN_TRY(check_span(m, first_block, end_block));
  model::NamedTensors out;
  for (const auto& chunk : m.chunks_for(first_block, end_block)) {
    if (chunk.kind == "tokenizer") continue;
    SN_ASSIGN(std::string bytes, read_chunk(id, chunk));
    auto tensors = model::load_safetensors_bytes(bytes);
    if (!tensors.ok()) return make_error("model {}: chunk {}: {}", short_id(id), chunk.label(), tensors.message());
    for (auto& t : *tensors) out.push_back(std::move(t));
  }
  return out;
}

Result<std::string> ModelStore::tokenizer_vocab(const std::string& id) const {
  SN_ASSIGN(Manifest m, manifest(id));
  return read_chunk(id, m.tokenizer);
}

Result<ModelConfig> ModelStore::config(const std::string& id) const {
  SN_ASSIGN(Manifest m, manifest(id));
  return m.config;
}

// ---- fetching ----

namespace {

struct Peer {
  Provider provider;
  std::unique_ptr<solvernet::v1::ModelStore::Stub> stub;
};

}  // namespace

Result<Manifest> ModelStore::fetch_manifest(const std::string& id, const std::vector<Provider>& providers,
                                           const NodeKey* identity, const FetchOptions& options,
                                           std::vector<std::string>* refused) {
  if (!is_hex_hash(id)) return input_error("model id \"{}\" is not 64 lowercase hex digits", id);
  std::lock_guard<std::mutex> fetching(fetch_mutex_);
  return fetch_manifest_locked(id, providers, identity, options, refused);
}

Result<Manifest> ModelStore::fetch_manifest_locked(const std::string& id, const std::vector<Provider>& providers,
                                                  const NodeKey* identity, const FetchOptions& options,
                                                  std::vector<std::string>* refused) {
  auto held = manifest(id);
  if (held.ok() || held.error().kind != ErrorKind::not_found) return held;
  if (providers.empty()) return kind_error(ErrorKind::unavailable, "no node announces model {}", short_id(id));
  std::string last_error;
  for (const auto& provider : providers) {
    auto stub = solvernet::v1::ModelStore::NewStub(net::make_channel(provider.address, provider.node_id, identity));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + options.call_timeout);
    solvernet::v1::GetManifestRequest request;
    request.set_model(id);
    solvernet::v1::GetManifestReply reply;
    grpc::Status status = stub->GetManifest(&context, request, &reply);
    if (!status.ok()) {
      last_error = net::from_grpc(status, "node " + provider.node_id.substr(0, 8)).message;
      continue;
    }
    if (std::string got = hex_hash(reply.manifest()); got != id) {
      last_error = fmt::format("manifest from {}: hash {} is not the model id", provider.node_id, got);
      spdlog::warn("refused {}", last_error);
      if (refused) refused->push_back(last_error);
      continue;
    }
    auto parsed = parse_manifest(reply.manifest());
    if (!parsed.ok()) {
      last_error = fmt::format("manifest from {}: {}", provider.node_id.substr(0, 8), parsed.message());
      continue;
    }
    SN_TRY(write_file_atomic(manifest_path(id), reply.manifest()));
    std::lock_guard<std::mutex> lock(mutex_);
    manifests_[id] = *parsed;
    return *parsed;
  }
  return kind_error(ErrorKind::unavailable, "no provider sent the manifest of model {}: {}", short_id(id), last_error);
}

Result<FetchReport> ModelStore::fetch(const std::string& id, int first_block, int end_block,
                                      const std::vector<Provider>& providers, const NodeKey* identity,
                                      const FetchOptions& options) {
  if (!is_hex_hash(id)) return input_error("model id \"{}\" is not 64 lowercase hex digits", id);
  if (options.request_bytes < 1 || options.request_bytes > kMaxChunkReplyBytes)
    return input_error("request size {} is not in 1..{}", options.request_bytes, kMaxChunkReplyBytes);
  // One fetcher per store: two would append to the same .part files.
  std::lock_guard<std::mutex> fetching(fetch_mutex_);
  SN_ASSIGN(DirLock lock, DirLock::acquire(dir_ / "fetching", "model store " + dir_.string()));

  FetchReport report;
  SN_ASSIGN(const Manifest m, fetch_manifest_locked(id, providers, identity, options, &report.refused));
  std::vector<Peer> peers;
  for (const auto& p : providers)
    peers.push_back(Peer{p, solvernet::v1::ModelStore::NewStub(net::make_channel(p.address, p.node_id, identity))});
  auto context_for = [&](grpc::ClientContext& context) {
    context.set_deadline(std::chrono::system_clock::now() + options.call_timeout);
  };
  SN_TRY(check_span(m, first_block, end_block));

  // Distinct chunks: two blocks with the same bytes are one chunk on disk and on the wire.
  std::vector<ChunkRef> needed;
  std::set<std::string> seen;
  for (auto& c : m.chunks_for(first_block, end_block))
    if (seen.insert(c.hash).second) needed.push_back(std::move(c));
  FetchProgress progress;
  progress.chunks_total = report.chunks_total = static_cast<int>(needed.size());
  std::vector<const ChunkRef*> missing;
  for (const auto& c : needed) {
    progress.bytes_total += c.bytes;
    if (chunk_present(c)) {
      ++report.chunks_present;
      progress.bytes_done += c.bytes;
    } else {
      int64_t part = file_size_or(chunk_path(c.hash).string() + ".part", 0);
      if (part > c.bytes) part = 0;
      report.bytes_resumed += part;
      progress.bytes_done += part;
      missing.push_back(&c);
    }
  }
  progress.chunks_done = report.chunks_present;
  if (options.progress) options.progress(progress);
  if (!missing.empty() && peers.empty())
    return kind_error(ErrorKind::unavailable, "no node announces model {}", short_id(id));

  // Under a rate cap, ask for about a tenth of a second's worth at a time so
  // the pace is smooth rather than a burst and a long pause per chunk.
  int64_t request_bytes = options.request_bytes;
  if (options.max_rate_bytes_per_s > 0)
    request_bytes = std::min(request_bytes, std::max(static_cast<int64_t>(options.max_rate_bytes_per_s / 10), int64_t{4096}));
  const auto started = std::chrono::steady_clock::now();
  std::mutex state_mutex;  // guards report, progress and the progress callback
  // Sleeps until the bytes received so far fit under the rate cap.
  auto pace = [&] {
    if (options.max_rate_bytes_per_s <= 0) return;
    int64_t fetched = 0;
    {
      std::lock_guard<std::mutex> lock(state_mutex);
      fetched = report.bytes_fetched;
    }
    std::this_thread::sleep_until(started + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                std::chrono::duration<double>(static_cast<double>(fetched) /
                                                                              options.max_rate_bytes_per_s)));
  };
  auto refuse = [&](const std::string& why) {
    spdlog::warn("refused {}", why);
    std::lock_guard<std::mutex> lock(state_mutex);
    report.refused.push_back(why);
  };

  // Chunk I of MISSING, trying provider i mod n first, then the others.
  auto fetch_chunk = [&](size_t i) -> Status {
    const ChunkRef& chunk = *missing[i];
    const fs::path final_path = chunk_path(chunk.hash);
    const fs::path part_path = final_path.string() + ".part";
    std::string last_error;
    for (size_t attempt = 0; attempt < peers.size(); ++attempt) {
      Peer& peer = peers[(i + attempt) % peers.size()];
      const std::string who = peer.provider.node_id;
      int64_t offset = file_size_or(part_path, 0);
      if (offset > chunk.bytes) {  // not this chunk's bytes (never counted as done): start over
        fs::remove(part_path);
        offset = 0;
      }
      bool failed = false;
      while (offset < chunk.bytes) {
        grpc::ClientContext context;
        context_for(context);
        solvernet::v1::GetChunkRequest request;
        request.set_hash(chunk.hash);
        request.set_offset(offset);
        request.set_max_bytes(std::min(request_bytes, chunk.bytes - offset));
        solvernet::v1::GetChunkReply reply;
        grpc::Status status = peer.stub->GetChunk(&context, request, &reply);
        if (!status.ok()) {
          last_error = net::from_grpc(status, "chunk " + chunk.label() + " from node " + who.substr(0, 8)).message;
          failed = true;
          break;
        }
        const int64_t got = static_cast<int64_t>(reply.data().size());
        if (reply.total_bytes() != chunk.bytes || got == 0 || offset + got > chunk.bytes) {
          last_error = fmt::format("chunk {} from node {}: it says the chunk has {} bytes and sent {} at offset {}, "
                                   "the manifest says {}",
                                   chunk.label(), who.substr(0, 8), reply.total_bytes(), got, offset, chunk.bytes);
          refuse(last_error);
          failed = true;
          break;
        }
        SN_TRY(append_file(part_path, reply.data()));
        offset += got;
        {
          std::lock_guard<std::mutex> lock(state_mutex);
          report.bytes_fetched += got;
          progress.bytes_fetched = report.bytes_fetched;
          progress.bytes_done += got;
          progress.chunk = chunk.label();
          if (options.progress) options.progress(progress);
        }
        pace();
      }
      if (failed) continue;
      SN_ASSIGN(std::string bytes, read_file(part_path));
      if (std::string got = hex_hash(bytes); got != chunk.hash) {
        // The bytes may have come from several providers (a resumed .part); the
        // one that completed it is named, and every byte is fetched again.
        last_error = fmt::format("chunk {} from {}: hash {} does not match the manifest's {}", chunk.label(), who, got,
                                 chunk.hash);
        refuse(last_error);
        fs::remove(part_path);
        std::lock_guard<std::mutex> lock(state_mutex);
        progress.bytes_done -= chunk.bytes;
        continue;
      }
      SN_TRY(rename_durable(part_path, final_path));
      std::lock_guard<std::mutex> lock(state_mutex);
      ++report.chunks_fetched;
      ++progress.chunks_done;
      progress.chunk.clear();
      if (options.progress) options.progress(progress);
      return ok_status();
    }
    return kind_error(ErrorKind::unavailable, "model {}: no provider sent chunk {} intact (tried {}): {}", short_id(id),
                      chunk.label(), peers.size(), last_error);
  };

  // Up to one worker per provider (at most 4) take chunks in order; after an
  // error the others finish the chunk in hand and stop.
  size_t next = 0;
  std::optional<Error> first_error;
  auto worker = [&] {
    for (;;) {
      size_t i = 0;
      {
        std::lock_guard<std::mutex> lock(state_mutex);
        if (first_error || next >= missing.size()) return;
        i = next++;
      }
      if (auto status = fetch_chunk(i); !status.ok()) {
        std::lock_guard<std::mutex> lock(state_mutex);
        if (!first_error) first_error = status.error();
        return;
      }
    }
  };
  const size_t workers = std::min({missing.size(), peers.size(), size_t{4}});
  std::vector<std::thread> threads;
  for (size_t w = 1; w < workers; ++w) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
  if (first_error) return *first_error;
  return report;
}

}  // namespace sn::infer
