// The Infer service of a block server. Every request is authorized by the node
// runtime first (signature, owner, replay; renews the session's lease). Handler
// threads only check and queue; one worker thread computes, so the batch of
// decode steps it takes is every single-position step pending at that moment
// (up to max_batch, same span), and a prefill or a spot check runs alone.
#include "infer/server.h"

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include "core/hash.h"
#include "infer/protocol.h"
#include "infer/span.h"
#include "model/tensor_wire.h"
#include "net/rpc.h"

namespace sn::infer {
namespace {

using SteadyClock = std::chrono::steady_clock;
constexpr int64_t kSessionOverheadBytes = 16 << 10;  // bookkeeping and request buffers beside the cache
constexpr auto kLoadWindow = std::chrono::seconds(10);

double seconds_since(SteadyClock::time_point start) {
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

grpc::Status status(grpc::StatusCode code, const std::string& message) { return grpc::Status(code, message); }

bool valid_id(const std::string& id) {
  if (id.empty() || id.size() > 64) return false;
  return std::all_of(id.begin(), id.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_'; });
}

struct Session {
  std::string id;
  PublicKey owner{};
  std::shared_ptr<const SpanModel> span;
  int64_t max_length = 0;
  std::mutex mutex;  // one step at a time; guards cache and closed
  KvCache cache;
  bool closed = false;
};

// A unit of work for the compute thread.
struct Work {
  enum Kind { decode, prefill, recompute } kind = decode;
  std::shared_ptr<Session> session;       // decode / prefill
  std::shared_ptr<const SpanModel> span;  // recompute (and the batching key of decode)
  torch::Tensor input;
  std::promise<Result<torch::Tensor>> done;
};

class BlockServerImpl final : public BlockServer, public solvernet::v1::Infer::Service {
 public:
  explicit BlockServerImpl(BlockServerOptions options) : options_(std::move(options)) {}

  ~BlockServerImpl() override {
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      stopping_ = true;
    }
    queue_wake_.notify_all();
    if (worker_.joinable()) worker_.join();
  }

  Status init() {
    const ModelConfig& config = options_.config;
    if (options_.first_block < 0 || options_.end_block > config.layers || options_.first_block >= options_.end_block)
      return input_error("span [{}, {}) is not a non-empty range of the model's {} blocks", options_.first_block,
                         options_.end_block, config.layers);
    if (options_.max_batch < 1) return input_error("max batch must be ≥ 1, got {}", options_.max_batch);
    SN_ASSIGN(auto whole, span_model(options_.first_block, options_.end_block));
    throughput_ = measure_throughput(*whole);
    worker_ = std::thread([this] { worker_loop(); });
    return ok_status();
  }

  grpc::Service* service() override { return this; }

  solvernet::v1::ServedSpan served_span() const override {
    solvernet::v1::ServedSpan span;
    span.set_model(options_.model_id);
    span.set_first_block(options_.first_block);
    span.set_end_block(options_.end_block);
    span.set_throughput(throughput_);
    std::lock_guard<std::mutex> lock(mutex_);
    span.set_sessions(static_cast<int32_t>(sessions_.size()));
    span.set_load(load_locked());
    return span;
  }

  BlockServerStats stats() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    BlockServerStats out = stats_;
    out.sessions = static_cast<int>(sessions_.size());
    return out;
  }

  // ---- the Infer service ------------------------------------------------------

  grpc::Status OpenSession(grpc::ServerContext*, const solvernet::v1::OpenSessionRequest* request,
                           solvernet::v1::OpenSessionReply* reply) override {
    const std::string& id = request->session_id();
    if (!valid_id(id))
      return status(grpc::StatusCode::INVALID_ARGUMENT, "session_id must be 1..64 letters, digits, '-' or '_'");
    auto owner = options_.runtime->authorize(id, "OpenSession", request->auth(), infer_digest("OpenSession", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    if (auto served = check_span(request->model(), request->first_block(), request->end_block()); !served.ok())
      return net::to_grpc(served.error());
    const int64_t seq_len = options_.config.seq_len;
    const int64_t max_length = request->max_length() == 0 ? seq_len : request->max_length();
    if (max_length < 1 || max_length > seq_len)
      return status(grpc::StatusCode::INVALID_ARGUMENT,
                    fmt::format("max_length {} is outside 1..{} (the model's context)", request->max_length(), seq_len));
    auto span = span_model(request->first_block(), request->end_block());
    if (!span.ok()) return net::to_grpc(span.error());
    const int64_t bytes = session_memory_bytes(options_.config, request->end_block() - request->first_block(), max_length);
    // Opened again (a client starting over under the same id): the old session and its admission go first.
    drop(id, true);
    auto session = std::make_shared<Session>();
    session->id = id;
    session->owner = *owner;
    session->span = *span;
    session->max_length = max_length;
    {
      // Held before admission, so the announcement the admission triggers counts it.
      std::lock_guard<std::mutex> lock(mutex_);
      sessions_[id] = session;
    }
    auto admitted = options_.runtime->admit(
        id, *owner, bytes, fmt::format("inference session ({} positions of blocks [{}, {}))", max_length,
                                       request->first_block(), request->end_block()),
        [this, id](const std::string& why) { expire(id, why); }, options_.session_idle);
    if (!admitted.ok()) {
      std::lock_guard<std::mutex> lock(mutex_);
      sessions_.erase(id);
      return net::to_grpc(admitted.error());
    }
    spdlog::info("session {}: opened by client {}, blocks [{}, {}), up to {} positions, ~{} admitted", id,
                 node_id_of(*owner).substr(0, 8), request->first_block(), request->end_block(), max_length,
                 net::format_bytes(bytes));
    reply->set_memory_bytes(bytes);
    reply->set_lease_ms(options_.session_idle.count());
    return grpc::Status::OK;
  }

  grpc::Status Forward(grpc::ServerContext*, const solvernet::v1::ForwardRequest* request,
                       solvernet::v1::ForwardReply* reply) override {
    const std::string& id = request->session_id();
    auto owner = options_.runtime->authorize(id, "Forward", request->auth(), infer_digest("Forward", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    auto session = find(id);
    if (!session) return no_session(id);
    if (session->owner != *owner)
      return status(grpc::StatusCode::PERMISSION_DENIED, fmt::format("Forward refused: session {} belongs to another client", id));
    std::lock_guard<std::mutex> step_lock(session->mutex);
    if (session->closed) return no_session(id);
    if (request->position() != session->cache.length)
      return status(grpc::StatusCode::FAILED_PRECONDITION,
                    fmt::format("position {} does not match session {}: it holds {} positions (the cache is unchanged)",
                                request->position(), id, session->cache.length));
    auto input = check_input(*session->span, request->input(), session->cache.length, session->max_length);
    if (!input.ok()) return net::to_grpc(input.error());
    const auto started = SteadyClock::now();
    auto work = std::make_unique<Work>();
    work->kind = input->size(0) == 1 ? Work::decode : Work::prefill;
    work->session = session;
    work->span = session->span;
    work->input = *input;
    auto output = submit(std::move(work));
    if (!output.ok()) return net::to_grpc(output.error());
    model::tensor_to_proto(*output, reply->mutable_output());
    reply->set_compute_s(seconds_since(started));
    return grpc::Status::OK;
  }

  grpc::Status CloseSession(grpc::ServerContext*, const solvernet::v1::CloseSessionRequest* request,
                            solvernet::v1::Empty*) override {
    const std::string& id = request->session_id();
    auto owner = options_.runtime->authorize(id, "CloseSession", request->auth(), infer_digest("CloseSession", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    auto session = find(id);
    if (!session) return no_session(id);
    if (session->owner != *owner)
      return status(grpc::StatusCode::PERMISSION_DENIED,
                    fmt::format("CloseSession refused: session {} belongs to another client", id));
    drop(id, true);
    spdlog::info("session {}: closed by its client", id);
    return grpc::Status::OK;
  }

  grpc::Status Recompute(grpc::ServerContext*, const solvernet::v1::RecomputeRequest* request,
                         solvernet::v1::ForwardReply* reply) override {
    const std::string& id = request->check_id();
    if (!valid_id(id))
      return status(grpc::StatusCode::INVALID_ARGUMENT, "check_id must be 1..64 letters, digits, '-' or '_'");
    auto owner = options_.runtime->authorize(id, "Recompute", request->auth(), infer_digest("Recompute", *request));
    if (!owner.ok()) return net::to_grpc(owner.error());
    if (auto served = check_span(request->model(), request->first_block(), request->end_block()); !served.ok())
      return net::to_grpc(served.error());
    auto span = span_model(request->first_block(), request->end_block());
    if (!span.ok()) return net::to_grpc(span.error());
    auto inputs = check_input(**span, request->inputs(), 0, options_.config.seq_len);
    if (!inputs.ok()) return net::to_grpc(inputs.error());
    const int64_t positions = inputs->size(0);
    if (request->rows() < 1 || request->rows() > positions)
      return status(grpc::StatusCode::INVALID_ARGUMENT,
                    fmt::format("rows {} is outside 1..{} (the positions given)", request->rows(), positions));
    const auto started = SteadyClock::now();
    auto work = std::make_unique<Work>();
    work->kind = Work::recompute;
    work->span = *span;
    work->input = *inputs;
    auto output = submit(std::move(work));
    if (!output.ok()) return net::to_grpc(output.error());
    // Hidden states: the last ROWS positions; logits: the last position only, as Forward returns them.
    torch::Tensor rows = (*span)->has_head() ? output->slice(0, positions - 1, positions)
                                              : output->slice(0, positions - request->rows(), positions);
    model::tensor_to_proto(rows.contiguous(), reply->mutable_output());
    reply->set_compute_s(seconds_since(started));
    return grpc::Status::OK;
  }

 private:
  Status check_span(const std::string& model, int first, int end) const {
    if (model != options_.model_id)
      return kind_error(ErrorKind::not_found, "this node serves model {}, not {}", options_.model_id.substr(0, 16),
                        model.substr(0, 16));
    if (first < options_.first_block || end > options_.end_block || first >= end)
      return kind_error(ErrorKind::not_found, "this node serves blocks [{}, {}) of the model, which do not hold [{}, {})",
                        options_.first_block, options_.end_block, first, end);
    return ok_status();
  }

  // The SpanModel of [FIRST, END) (a sub-span of the one served), built once.
  Result<std::shared_ptr<const SpanModel>> span_model(int first, int end) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto key = std::make_pair(first, end);
    if (auto it = spans_.find(key); it != spans_.end()) return it->second;
    SN_ASSIGN(auto span, SpanModel::create(options_.config, first, end, options_.weights));
    auto shared = std::make_shared<const SpanModel>(std::move(span));
    spans_[key] = shared;
    return std::shared_ptr<const SpanModel>(shared);
  }

  // Decodes WIRE and runs SPAN's own input checks with the session's LIMIT
  // before the step is queued, so a bad step never fails a batch.
  Result<torch::Tensor> check_input(const SpanModel& span, const solvernet::v1::Tensor& wire, int64_t cached,
                                    int64_t limit) const {
    SN_ASSIGN(auto input, model::tensor_from_proto(wire, span.embeds() ? torch::kInt64 : torch::kFloat32));
    SN_TRY(span.check_input(input, cached, limit));
    return input;
  }

  std::shared_ptr<Session> find(const std::string& id) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = sessions_.find(id);
    return it == sessions_.end() ? nullptr : it->second;
  }

  static grpc::Status no_session(const std::string& id) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        fmt::format("this node holds no session {} (never opened, closed, or dropped when idle)", id));
  }

  // Forgets session ID and frees its cache (a step in flight finishes first);
  // RELEASE also gives its admission back (the reaper does that on expiry).
  // The runtime's release announces the node again, the session already gone.
  void drop(const std::string& id, bool release) {
    std::shared_ptr<Session> session;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = sessions_.find(id);
      if (it != sessions_.end()) {
        session = std::move(it->second);
        sessions_.erase(it);
      }
    }
    if (session) {
      std::lock_guard<std::mutex> step_lock(session->mutex);
      session->closed = true;
      session->cache = KvCache{};
    }
    if (release) options_.runtime->release(id);
  }

  void expire(const std::string& id, const std::string& why) {
    if (why == net::kLeaseRanOut)
      spdlog::info("session {}: idle for {} s, dropped (its KV cache is freed)", id,
                   std::chrono::duration<double>(options_.session_idle).count());
    else
      spdlog::info("session {}: dropped, {} (its KV cache is freed)", id, why);
    drop(id, false);
  }

  // ---- the compute thread -------------------------------------------------------

  Result<torch::Tensor> submit(std::unique_ptr<Work> work) {
    auto future = work->done.get_future();
    {
      std::lock_guard<std::mutex> lock(queue_mutex_);
      if (stopping_) return kind_error(ErrorKind::unavailable, "the node is stopping");
      queue_.push_back(std::move(work));
    }
    queue_wake_.notify_one();
    return future.get();
  }

  void worker_loop() {
    torch::NoGradGuard no_grad;
    std::unique_lock<std::mutex> lock(queue_mutex_);
    while (true) {
      queue_wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) break;
      std::vector<std::unique_ptr<Work>> batch;
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
      if (batch.front()->kind == Work::decode) {
        // Every other pending decode step on the same span joins; the rest keep their order.
        for (auto it = queue_.begin(); it != queue_.end() && static_cast<int>(batch.size()) < options_.max_batch;) {
          if ((*it)->kind == Work::decode && (*it)->span == batch.front()->span) {
            batch.push_back(std::move(*it));
            it = queue_.erase(it);
          } else {
            ++it;
          }
        }
      }
      lock.unlock();
      const auto started = SteadyClock::now();
      run(batch);
      record(started, batch);
      lock.lock();
    }
    for (auto& work : queue_) work->done.set_value(kind_error(ErrorKind::unavailable, "the node is stopping"));
    queue_.clear();
  }

  void run(std::vector<std::unique_ptr<Work>>& batch) {
    auto finish = [&](Work& work, Result<torch::Tensor> output) {
      if (output.ok() && options_.cheat_garbage_states) output = torch::randn_like(*output);
      if (output.ok() && options_.cheat_malformed_states)
        output = output->slice(-1, 0, output->size(-1) - 1).contiguous();
      work.done.set_value(std::move(output));
    };
    try {
      Work& first = *batch.front();
      if (first.kind == Work::recompute) return finish(first, first.span->forward_full(first.input));
      if (batch.size() == 1) return finish(first, first.span->forward(first.session->cache, first.input));
      std::vector<KvCache*> caches;
      std::vector<torch::Tensor> inputs;
      for (auto& work : batch) {
        caches.push_back(&work->session->cache);
        inputs.push_back(work->input);
      }
      auto outputs = first.span->forward_batch(caches, inputs);
      if (outputs.ok()) {
        for (size_t i = 0; i < batch.size(); ++i) finish(*batch[i], (*outputs)[i]);
        return;
      }
      // The batch was refused before any cache changed: each step alone, so one bad step fails only itself.
      spdlog::warn("decode batch of {} refused ({}); running its steps one by one", batch.size(), outputs.message());
      for (auto& work : batch) finish(*work, work->span->forward(work->session->cache, work->input));
    } catch (const std::exception& e) {
      // LibTorch throws on what the checks above should have caught; the caller gets one line, not a trace.
      const std::string what = e.what();
      for (auto& work : batch) {
        try {
          work->done.set_value(make_error("computing the span failed: {}", what.substr(0, what.find('\n'))));
        } catch (const std::future_error&) {  // already answered
        }
      }
    }
  }

  void record(SteadyClock::time_point started, const std::vector<std::unique_ptr<Work>>& batch) {
    const auto now = SteadyClock::now();
    std::lock_guard<std::mutex> lock(mutex_);
    busy_.emplace_back(started, now);
    while (!busy_.empty() && busy_.front().second < now - kLoadWindow) busy_.pop_front();
    if (batch.front()->kind == Work::recompute) return;
    stats_.steps += static_cast<int64_t>(batch.size());
    if (batch.front()->kind != Work::decode) return;
    ++stats_.decode_batches;
    if (static_cast<int>(batch.size()) > stats_.largest_batch) {
      stats_.largest_batch = static_cast<int>(batch.size());
      if (stats_.largest_batch > 1)
        spdlog::info("decode batch of {} sessions (the largest so far; {} batches)", stats_.largest_batch,
                     stats_.decode_batches);
    }
  }

  double load_locked() const {
    const auto now = SteadyClock::now(), from = now - kLoadWindow;
    double busy = 0;
    for (const auto& [start, end] : busy_)
      if (end > from) busy += std::chrono::duration<double>(end - std::max(start, from)).count();
    return std::clamp(busy / std::chrono::duration<double>(kLoadWindow).count(), 0.0, 1.0);
  }

  // Block·tokens/s of one session's decode steps after a short prefill.
  double measure_throughput(const SpanModel& span) const {
    torch::NoGradGuard no_grad;
    const ModelConfig& config = options_.config;
    auto make_input = [&](int64_t positions) {
      return span.embeds() ? torch::zeros({positions}, torch::kInt64)
                           : torch::zeros({positions, config.d_model}, torch::kFloat32);
    };
    KvCache cache;
    const int64_t prefill = std::min<int64_t>(8, config.seq_len - 1);
    if (!span.forward(cache, make_input(prefill)).ok()) return 0;
    const auto started = SteadyClock::now();
    int64_t steps = 0;
    while (cache.length < config.seq_len && (steps < 4 || seconds_since(started) < 0.2)) {
      if (!span.forward(cache, make_input(1)).ok()) break;
      ++steps;
    }
    const double elapsed = seconds_since(started);
    return elapsed > 0 ? static_cast<double>(steps * (span.end_block() - span.first_block())) / elapsed : 0;
  }

  BlockServerOptions options_;
  double throughput_ = 0;

  mutable std::mutex mutex_;  // sessions_, spans_, stats_, busy_
  std::map<std::string, std::shared_ptr<Session>> sessions_;
  std::map<std::pair<int, int>, std::shared_ptr<const SpanModel>> spans_;
  BlockServerStats stats_;
  std::deque<std::pair<SteadyClock::time_point, SteadyClock::time_point>> busy_;

  std::mutex queue_mutex_;
  std::condition_variable queue_wake_;
  std::deque<std::unique_ptr<Work>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace

int64_t session_memory_bytes(const ModelConfig& config, int64_t layer_count, int64_t max_length) {
  return KvCache::bytes_for(config, layer_count, max_length) + kSessionOverheadBytes;
}

Result<std::unique_ptr<BlockServer>> BlockServer::create(BlockServerOptions options) {
  if (!options.runtime) return make_error("block server without a node runtime");
  auto server = std::make_unique<BlockServerImpl>(std::move(options));
  SN_TRY(server->init());
  return std::unique_ptr<BlockServer>(std::move(server));
}

Result<ServeSpec> parse_serve_spec(const std::string& text) {
  ServeSpec spec;
  spec.model = text;
  const auto colon = text.rfind(':');
  if (colon != std::string::npos) {
    const std::string range = text.substr(colon + 1);
    const auto dash = range.find('-');
    const bool digits = dash != std::string::npos && dash > 0 && dash + 1 < range.size() &&
                        std::all_of(range.begin(), range.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)) || c == '-'; });
    if (digits) {
      try {
        const int first = std::stoi(range.substr(0, dash)), last = std::stoi(range.substr(dash + 1));
        if (last < first)
          return input_error("--serve {}: the span's last block {} is before its first {} (FIRST-LAST, inclusive)", text,
                             last, first);
        spec.model = text.substr(0, colon);
        spec.first_block = first;
        spec.end_block = last + 1;
      } catch (const std::exception&) {
        return input_error("--serve {}: blocks must be small non-negative integers (MODEL[:FIRST-LAST])", text);
      }
    }
  }
  if (spec.model.empty()) return input_error("--serve {}: no model given (MODEL[:FIRST-LAST])", text);
  return spec;
}

std::pair<int, int> choose_span(int layers, int size, const std::vector<int>& coverage) {
  size = std::clamp(size, 1, std::max(layers, 1));
  auto covered = [&](int block) { return block < static_cast<int>(coverage.size()) ? coverage[block] : 0; };
  int best = 0;
  std::pair<int, int64_t> best_score{0, 0};
  for (int first = 0; first + size <= layers; ++first) {
    int least = covered(first);
    int64_t total = 0;
    for (int b = first; b < first + size; ++b) {
      least = std::min(least, covered(b));
      total += covered(b);
    }
    std::pair<int, int64_t> score{least, total};
    if (first == 0 || score < best_score) {
      best = first;
      best_score = score;
    }
  }
  return {best, best + size};
}

std::vector<int> swarm_coverage(const std::vector<solvernet::v1::NodeInfo>& nodes, const std::string& model_id,
                                int layers) {
  std::vector<int> coverage(static_cast<size_t>(std::max(layers, 0)), 0);
  for (const auto& node : nodes)
    for (const auto& span : node.serving())
      if (span.model() == model_id)
        for (int b = std::max(0, span.first_block()); b < std::min(layers, span.end_block()); ++b) ++coverage[b];
  return coverage;
}

}  // namespace sn::infer
