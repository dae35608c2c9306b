#include "infer/route.h"

#include <fmt/format.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>

#include "core/backoff.h"
#include "core/hash.h"
#include "infer/generation.h"
#include "infer/model_store.h"
#include "infer/protocol.h"
#include "model/data.h"
#include "model/gpt.h"
#include "model/tensor_wire.h"
#include "net/control.h"
#include "net/discovery.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"

namespace sn::infer {
namespace v1 = solvernet::v1;
using Clock = std::chrono::steady_clock;

Result<std::vector<Hop>> route_chain(const std::vector<ServerSpan>& servers, int first, int end,
                                     const std::vector<std::string>& avoid) {
  if (first >= end) return input_error("empty block range [{}, {})", first, end);
  const std::set<std::string> avoided(avoid.begin(), avoid.end());
  const double inf = std::numeric_limits<double>::infinity();
  // cost[b]: cheapest chain covering [first, b); via[b]: its last hop.
  std::vector<double> cost(static_cast<size_t>(end - first + 1), inf);
  std::vector<std::optional<Hop>> via(cost.size());
  cost[0] = 0;
  for (int b = first; b < end; ++b) {
    const double here = cost[static_cast<size_t>(b - first)];
    if (here == inf) continue;
    for (const auto& s : servers) {
      if (avoided.count(s.node_id) || s.first_block > b || s.end_block <= b || s.throughput <= 0) continue;
      // A server may serve any sub-span of what it holds, starting here.
      for (int e = b + 1; e <= std::min(end, s.end_block); ++e) {
        const double hop_cost = s.rtt_s + (e - b) / s.throughput * (1.0 + std::clamp(s.load, 0.0, 1.0)) + 1e-6;
        double& best = cost[static_cast<size_t>(e - first)];
        if (here + hop_cost < best) {
          best = here + hop_cost;
          via[static_cast<size_t>(e - first)] = Hop{s, b, e};
        }
      }
    }
  }
  if (cost.back() == inf) {
    // Name the first block no usable server covers.
    int uncovered = first;
    for (int b = first; b <= end; ++b)
      if (cost[static_cast<size_t>(b - first)] != inf) uncovered = b;
    return kind_error(ErrorKind::not_found, "no live server covers block {} (of [{}, {}){})", uncovered, first, end,
                      avoided.empty() ? "" : fmt::format(", {} server(s) avoided", avoided.size()));
  }
  std::vector<Hop> chain;
  for (int b = end; b > first;) {
    const Hop& hop = *via[static_cast<size_t>(b - first)];
    chain.insert(chain.begin(), hop);
    b = hop.first_block;
  }
  return chain;
}

namespace {

std::string random_hex(size_t bytes) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string out;
  for (size_t i = 0; i < bytes; ++i) out += fmt::format("{:02x}", static_cast<unsigned>(rng() & 0xff));
  return out;
}

std::string short_id(const std::string& node_id) { return node_id.substr(0, 8); }

// One hop's live session and everything sent to it (replayed to a replacement).
struct HopSession {
  Hop hop;
  std::string session_id;
  std::vector<v1::Tensor> history;  // inputs in order, as sent
  int64_t length = 0;               // positions the server holds
  v1::Tensor last_output;           // of the latest step (spot checks compare it)
};

class RemoteEngineImpl : public RemoteEngine {
 public:
  RemoteEngineImpl(RemoteEngineOptions options, std::unique_ptr<net::Discovery> discovery, std::string model_id,
                   ModelCard card, model::Tokenizer tokenizer)
      : options_(std::move(options)),
        discovery_(std::move(discovery)),
        model_id_(std::move(model_id)),
        card_(std::move(card)),
        tokenizer_(std::move(tokenizer)),
        signer_(*options_.identity) {}

  ~RemoteEngineImpl() override {
    if (discovery_) discovery_->stop();
  }

  const ModelCard& card() const override { return card_; }
  std::vector<int32_t> encode(std::string_view text) const override {
    return encode_prompt(tokenizer_, text, card_.config.seq_len);
  }
  std::string decode(const std::vector<int32_t>& ids) const override { return tokenizer_.decode(ids); }

  RemoteEngineCounters counters() const override {
    std::lock_guard lock(mutex_);
    return counters_;
  }
  std::vector<std::string> avoided() const override { return avoid_list(); }

  Result<GenerationStats> generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                   const TokenCallback& on_token) override;

  // Servers of the model now (from the DHT), with measured RTTs.
  // Servers of the model now (from the DHT, at most every 2 s), with measured
  // RTTs. MAX_AGE: a list this recent will do (a replacement mid-generation
  // uses the last one rather than wait on the DHT: failed servers are avoided anyway).
  Result<std::vector<ServerSpan>> servers(std::chrono::seconds max_age = std::chrono::seconds(2));

 private:
  friend class Generation;
  // ROUTINE events (a route chosen) are logged at debug, the others (a server
  // dropped, a replacement, a spot-check mismatch) at warn; all reach on_event.
  void event(const std::string& line, bool routine = false) {
    if (routine)
      spdlog::debug("infer: {}", line);
    else
      spdlog::warn("infer: {}", line);
    if (options_.on_event) options_.on_event(line);
  }
  // A server that failed (died, froze, refused, sent malformed states) is
  // avoided for options_.avoid_failed_for, then tried again (it may have come
  // back: a long-lived gateway must not lose it for good); one caught lying
  // by a spot check is avoided for as long as this engine lives.
  void avoid(const std::string& node_id, const std::string& why, bool lied = false) {
    {
      std::lock_guard lock(mutex_);
      const auto until = lied ? Clock::time_point::max() : Clock::now() + options_.avoid_failed_for;
      auto [it, inserted] = avoid_.try_emplace(node_id, until);
      if (!inserted) {
        if (it->second > Clock::now() && !lied) return;
        it->second = std::max(it->second, until);
      }
      counters_.dropped_servers++;
    }
    event(fmt::format("dropping server {}{}: {}", node_id, lied ? "" : " for a while", why));
  }
  std::vector<std::string> avoid_list() const {
    std::lock_guard lock(mutex_);
    std::vector<std::string> out;
    for (const auto& [id, until] : avoid_)
      if (until > Clock::now()) out.push_back(id);
    return out;
  }
  v1::Infer::Stub& stub(const ServerSpan& s) {
    std::lock_guard lock(mutex_);
    auto& slot = stubs_[s.node_id + "@" + s.address];
    if (!slot) slot = v1::Infer::NewStub(net::make_channel(s.address, s.node_id, nullptr));
    return *slot;
  }
  double measure_rtt(const ServerSpan& s);
  // Sleeps the emulated round trip to NODE_ID (benchmarks; none by default).
  void emulate_link(const std::string& node_id) const {
    if (!options_.emulated_rtt_s) return;
    const double rtt = options_.emulated_rtt_s(node_id);
    if (rtt > 0) std::this_thread::sleep_for(std::chrono::duration<double>(rtt));
  }

  RemoteEngineOptions options_;
  std::unique_ptr<net::Discovery> discovery_;
  std::string model_id_;
  ModelCard card_;
  model::Tokenizer tokenizer_;
  net::ControlSigner signer_;
  mutable std::mutex mutex_;
  RemoteEngineCounters counters_;
  std::map<std::string, Clock::time_point> avoid_;  // node id → avoided until
  std::map<std::string, std::unique_ptr<v1::Infer::Stub>> stubs_;
  std::map<std::string, double> rtt_;  // node id → seconds
  std::vector<ServerSpan> last_servers_;
  Clock::time_point last_refresh_{};
};

double RemoteEngineImpl::measure_rtt(const ServerSpan& s) {
  {
    std::lock_guard lock(mutex_);
    if (auto it = rtt_.find(s.node_id); it != rtt_.end()) return it->second;
  }
  auto node = v1::Node::NewStub(net::make_channel(s.address, s.node_id, nullptr));
  double best = std::numeric_limits<double>::infinity();
  // The first call pays the TLS handshake: take the best of three.
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    v1::PingRequest request;
    v1::PingReply reply;
    auto start = Clock::now();
    if (!node->Ping(&context, request, &reply).ok()) break;
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  if (options_.emulated_rtt_s) best += options_.emulated_rtt_s(s.node_id);
  // A server that did not answer is asked again at the next refresh.
  if (!std::isfinite(best)) return best;
  std::lock_guard lock(mutex_);
  rtt_[s.node_id] = best;
  return best;
}

Result<std::vector<ServerSpan>> RemoteEngineImpl::servers(std::chrono::seconds max_age) {
  {
    std::lock_guard lock(mutex_);
    if (!last_servers_.empty() && Clock::now() - last_refresh_ < max_age) return last_servers_;
  }
  SN_ASSIGN(auto nodes, discovery_->list_nodes(std::chrono::milliseconds(3000)));
  std::vector<ServerSpan> out;
  for (const auto& node : nodes)
    for (const auto& span : node.serving()) {
      if (span.model() != model_id_) continue;
      ServerSpan s{node.node_id(), node.address(), span.first_block(), span.end_block(), span.throughput(),
                   span.load(), 0};
      if (s.first_block < 0 || s.end_block > card_.config.layers || s.first_block >= s.end_block) continue;
      out.push_back(s);
    }
  for (auto& s : out) s.rtt_s = measure_rtt(s);
  // A server that does not answer a ping is not routed to.
  std::erase_if(out, [](const ServerSpan& s) { return !std::isfinite(s.rtt_s); });
  std::lock_guard lock(mutex_);
  last_servers_ = out;
  last_refresh_ = Clock::now();
  return out;
}

// One generation's chain of sessions.
class Generation {
 public:
  Generation(RemoteEngineImpl& engine, int max_length) : e_(engine), max_length_(max_length) {
    rng_.seed(std::random_device{}());
  }
  ~Generation() { close_all(); }

  Status open_chain() {
    SN_ASSIGN(hops_, open_route(0, static_cast<int>(e_.card_.config.layers)));
    return ok_status();
  }

  // Runs TOKENS through the chain; the last position's logits [vocab].
  Result<torch::Tensor> step(const std::vector<int32_t>& tokens, int64_t position) {
    v1::Tensor input;
    model::tensor_to_proto(torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.end()), torch::kInt64), &input);
    const int64_t rows = static_cast<int64_t>(tokens.size());
    for (size_t i = 0; i < hops_.size(); ++i) {
      Result<v1::Tensor> out = forward(hops_[i], input, position, rows);
      while (!out.ok()) {
        const auto stalled = Clock::now();
        if (++replacements_ > e_.options_.max_replacements)
          return kind_error(ErrorKind::unavailable, "blocks [{}, {}): {} (gave up after {} replacements)",
                            hops_[i].hop.first_block, hops_[i].hop.end_block, out.message(),
                            e_.options_.max_replacements);
        e_.avoid(hops_[i].hop.server.node_id, out.message());
        // The failed step is not in the history yet: replay the past, then retry it.
        auto replaced = replace(i, i + 1);
        if (!replaced.ok()) return replaced.error();
        out = forward(hops_[i], input, position, rows);
        std::lock_guard lock(e_.mutex_);
        e_.counters_.replacements++;
        e_.counters_.last_stall_s = std::chrono::duration<double>(Clock::now() - stalled).count();
      }
      input = std::move(*out);
    }
    {
      std::lock_guard lock(e_.mutex_);
      e_.counters_.steps++;
    }
    SN_TRY(maybe_spot_check(position, rows));
    SN_ASSIGN(auto logits, model::tensor_from_proto(last_output_, torch::kFloat32));
    return logits.reshape({-1});
  }

 private:
  Result<HopSession> open(const Hop& hop) {
    HopSession session{hop, random_hex(16), {}, 0};
    v1::OpenSessionRequest request;
    request.set_session_id(session.session_id);
    request.set_model(e_.model_id_);
    request.set_first_block(hop.first_block);
    request.set_end_block(hop.end_block);
    request.set_max_length(max_length_);
    sign_infer(e_.signer_, "OpenSession", request);
    v1::OpenSessionReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + e_.options_.step_timeout);
    e_.emulate_link(hop.server.node_id);
    auto status = e_.stub(hop.server).OpenSession(&context, request, &reply);
    if (!status.ok())
      return net::from_grpc(status, fmt::format("opening a session on {} (blocks [{}, {}))",
                                                short_id(hop.server.node_id), hop.first_block, hop.end_block));
    return session;
  }

  // Sessions on a fresh route over blocks [FIRST, END). A server that refuses
  // or does not answer the opening is avoided and the route drawn again.
  Result<std::vector<HopSession>> open_route(int first, int end, bool replacing = false) {
    Error last = make_error("no route");
    for (int attempt = 0; attempt < 8; ++attempt) {
      // A replacement first tries the servers already known; then the DHT's latest.
      SN_ASSIGN(auto servers, e_.servers(replacing && attempt == 0 ? std::chrono::seconds(30) : std::chrono::seconds(2)));
      auto chain = route_chain(servers, first, end, e_.avoid_list());
      if (!chain.ok()) {
        if (replacing && attempt == 0) continue;  // the DHT may know servers the last list did not
        return chain.error();
      }
      std::vector<HopSession> sessions;
      std::vector<std::string> names;
      bool failed = false;
      for (const auto& hop : *chain) {
        auto session = open(hop);
        if (!session.ok()) {
          last = session.error();
          // A full server is busy, not faulty: it stays usable for later generations.
          if (last.kind == ErrorKind::resource_exhausted) return last;
          e_.avoid(hop.server.node_id, last.message);
          failed = true;
          break;
        }
        sessions.push_back(std::move(*session));
        names.push_back(fmt::format("{}[{},{})", short_id(hop.server.node_id), hop.first_block, hop.end_block));
      }
      if (!failed) {
        e_.event(fmt::format("route for blocks [{}, {}): {}", first, end, fmt::join(names, " → ")), true);
        return sessions;
      }
      for (auto& session : sessions) close(session);
    }
    return last;
  }

  void close(HopSession& session) {
    v1::CloseSessionRequest request;
    request.set_session_id(session.session_id);
    sign_infer(e_.signer_, "CloseSession", request);
    v1::Empty reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    (void)e_.stub(session.hop.server).CloseSession(&context, request, &reply);
  }

  void close_all() {
    for (auto& hop : hops_) close(hop);
    hops_.clear();
  }

  // One step on one hop; the output checked for dtype, shape and finiteness
  // (a server that returns anything else is treated as failed: bad_peer).
  Result<v1::Tensor> forward(HopSession& session, const v1::Tensor& input, int64_t position, int64_t rows) {
    v1::ForwardRequest request;
    request.set_session_id(session.session_id);
    request.set_position(position);
    *request.mutable_input() = input;
    sign_infer(e_.signer_, "Forward", request);
    v1::ForwardReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + e_.options_.step_timeout);
    const auto& hop = session.hop;
    e_.emulate_link(hop.server.node_id);
    auto status = e_.stub(hop.server).Forward(&context, request, &reply);
    if (!status.ok())
      return net::from_grpc(status, fmt::format("server {} (blocks [{}, {}))", short_id(hop.server.node_id),
                                                hop.first_block, hop.end_block));
    const bool head = hop.end_block == e_.card_.config.layers;
    std::vector<int64_t> shape = head ? std::vector<int64_t>{1, e_.card_.config.vocab}
                                      : std::vector<int64_t>{rows, e_.card_.config.d_model};
    auto tensor = model::tensor_from_proto(reply.output(), torch::kFloat32, shape);
    if (!tensor.ok() || !torch::isfinite(*tensor).all().item<bool>())
      return kind_error(ErrorKind::bad_peer, "server {} (blocks [{}, {})) returned malformed states: {}",
                        short_id(hop.server.node_id), hop.first_block, hop.end_block,
                        tensor.ok() ? "not finite" : tensor.message());
    session.history.push_back(input);
    session.length = position + rows;
    if (head) last_output_ = reply.output();
    session.last_output = reply.output();
    return std::move(*reply.mutable_output());
  }

  // Replaces hops [I, J) by a fresh route over the same blocks and replays
  // the first replaced hop's input history through it, step by step (the same
  // shapes, so the same bits as before).
  Status replace(size_t i, size_t j) {
    const int first = hops_[i].hop.first_block, end = hops_[j - 1].hop.end_block;
    std::vector<v1::Tensor> history = hops_[i].history;
    for (size_t k = i; k < j; ++k) close(hops_[k]);
    SN_ASSIGN(auto fresh, open_route(first, end, /*replacing=*/true));
    std::vector<std::string> names;
    for (const auto& session : fresh)
      names.push_back(fmt::format("{}[{},{})", short_id(session.hop.server.node_id), session.hop.first_block,
                                  session.hop.end_block));
    int64_t position = 0;
    for (const auto& past : history) {
      const int64_t rows = past.shape_size() > 0 ? past.shape(0) : 0;
      v1::Tensor input = past;
      for (auto& session : fresh) {
        SN_ASSIGN(input, forward(session, input, position, rows));
      }
      position += rows;
    }
    e_.event(fmt::format("blocks [{}, {}) moved to {} (replayed {} steps)", first, end, fmt::join(names, " → "),
                         history.size()));
    hops_.erase(hops_.begin() + static_cast<std::ptrdiff_t>(i), hops_.begin() + static_cast<std::ptrdiff_t>(j));
    hops_.insert(hops_.begin() + static_cast<std::ptrdiff_t>(i), std::make_move_iterator(fresh.begin()),
                 std::make_move_iterator(fresh.end()));
    return ok_status();
  }

  // With probability spot_check_fraction, a random hop's step is recomputed by
  // another server holding those blocks, from the hop's whole input history.
  Status maybe_spot_check(int64_t position, int64_t rows);

  RemoteEngineImpl& e_;
  int max_length_;
  std::vector<HopSession> hops_;
  v1::Tensor last_output_;
  int replacements_ = 0;
  std::mt19937_64 rng_;
};

// Outputs of an honest server recomputing a step from the whole history differ
// from the incremental ones only by float rounding (the shapes differ); a
// garbage server's differ by the states' own scale.
bool states_agree(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = std::max(1.0, b.abs().max().item<double>());
  return (a - b).abs().max().item<double>() <= 1e-3 * scale;
}

Status Generation::maybe_spot_check(int64_t position, int64_t rows) {
  if (hops_.empty() || std::uniform_real_distribution<double>(0, 1)(rng_) >= e_.options_.spot_check_fraction)
    return ok_status();
  const size_t i = std::uniform_int_distribution<size_t>(0, hops_.size() - 1)(rng_);
  HopSession& checked = hops_[i];
  SN_ASSIGN(auto servers, e_.servers());
  const auto avoided = e_.avoid_list();
  std::vector<ServerSpan> checkers;
  for (const auto& s : servers)
    if (s.node_id != checked.hop.server.node_id && s.first_block <= checked.hop.first_block &&
        s.end_block >= checked.hop.end_block && std::find(avoided.begin(), avoided.end(), s.node_id) == avoided.end())
      checkers.push_back(s);
  if (checkers.empty()) return ok_status();  // nobody else holds these blocks
  std::shuffle(checkers.begin(), checkers.end(), rng_);
  // The whole input history of the hop as one tensor.
  std::vector<torch::Tensor> parts;
  for (const auto& past : checked.history) {
    SN_ASSIGN(auto t, model::tensor_from_proto(past));
    parts.push_back(t);
  }
  auto history = torch::cat(parts, 0);
  SN_ASSIGN(auto claimed, model::tensor_from_proto(checked.last_output, torch::kFloat32));
  auto recompute = [&](const ServerSpan& checker) -> Result<torch::Tensor> {
    v1::RecomputeRequest request;
    request.set_check_id(random_hex(16));
    request.set_model(e_.model_id_);
    request.set_first_block(checked.hop.first_block);
    request.set_end_block(checked.hop.end_block);
    model::tensor_to_proto(history, request.mutable_inputs());
    request.set_rows(static_cast<int32_t>(rows));
    sign_infer(e_.signer_, "Recompute", request);
    v1::ForwardReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + e_.options_.step_timeout);
    e_.emulate_link(checker.node_id);
    auto status = e_.stub(checker).Recompute(&context, request, &reply);
    if (!status.ok()) return net::from_grpc(status, fmt::format("spot check on {}", short_id(checker.node_id)));
    return model::tensor_from_proto(reply.output(), torch::kFloat32, claimed.sizes().vec());
  };
  auto hash_of = [](const torch::Tensor& t) {
    auto c = t.contiguous();
    return to_hex(hash_string(std::string_view(static_cast<const char*>(c.data_ptr()), c.nbytes()))).substr(0, 16);
  };
  {
    std::lock_guard lock(e_.mutex_);
    e_.counters_.spot_checks++;
  }
  auto first = recompute(checkers[0]);
  if (!first.ok()) return ok_status();  // the checker's failure says nothing about the hop
  if (states_agree(claimed, *first)) return ok_status();
  const double delta = (claimed - *first).abs().max().item<double>();
  e_.event(fmt::format("spot check mismatch on blocks [{}, {}) at position {}: server {} says {}, server {} says {} "
                       "(max |Δ| {:.3g})",
                       checked.hop.first_block, checked.hop.end_block, position, checked.hop.server.node_id,
                       hash_of(claimed), checkers[0].node_id, hash_of(*first), delta));
  {
    std::lock_guard lock(e_.mutex_);
    e_.counters_.spot_check_mismatches++;
  }
  // A third server settles who is wrong; without one, the checked hop is
  // replaced (the route, not the checker, chose it, so it is the one whose
  // output this generation depends on).
  std::string faulty = checked.hop.server.node_id;
  for (size_t k = 1; k < checkers.size(); ++k) {
    auto third = recompute(checkers[k]);
    if (!third.ok()) continue;
    if (states_agree(claimed, *third)) faulty = checkers[0].node_id;
    break;
  }
  e_.avoid(faulty, fmt::format("failed a spot check on blocks [{}, {})", checked.hop.first_block,
                               checked.hop.end_block),
           /*lied=*/true);
  if (faulty != checked.hop.server.node_id) return ok_status();
  // Every hop from the faulty one on consumed its states: rebuild them all
  // and recompute this step's logits through the new chain.
  if (++replacements_ > e_.options_.max_replacements)
    return kind_error(ErrorKind::bad_peer, "server {} returned wrong states and no replacement is left",
                      checked.hop.server.node_id);
  SN_TRY(replace(i, hops_.size()));
  return ok_status();
}

Result<GenerationStats> RemoteEngineImpl::generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                                   const TokenCallback& on_token) {
  SN_TRY(check_sampling(params));
  SN_ASSIGN(auto fitted, fit_prompt(prompt, params, card_.config.seq_len));
  const int max_length = static_cast<int>(
      std::min<int64_t>(card_.config.seq_len, static_cast<int64_t>(fitted.size()) + params.max_tokens));
  Generation generation(*this, max_length);
  SN_TRY(generation.open_chain());
  auto step = [&](const std::vector<int32_t>& tokens, int64_t position) { return generation.step(tokens, position); };
  return run_generation(tokenizer_, card_.config.seq_len, fitted, params, step, on_token);
}

}  // namespace

Result<std::unique_ptr<RemoteEngine>> open_remote_engine(const RemoteEngineOptions& options) {
  if (!options.identity) return make_error("open_remote_engine: no identity");
  model::init_torch_single_thread();
  SN_ASSIGN(auto discovery, net::Discovery::start(0, options.bootstrap));
  SN_TRY(discovery->wait_for_bootstrap(options.discovery_timeout));
  // Wait for a server of the model (or of any model, if none is named).
  const auto deadline = Clock::now() + options.discovery_timeout;
  std::string model_id = options.model;
  std::vector<v1::NodeInfo> holders;
  Backoff pause(std::chrono::milliseconds(500), std::chrono::milliseconds(2000));
  while (true) {
    SN_ASSIGN(auto nodes, discovery->list_nodes(std::chrono::milliseconds(2000)));
    std::set<std::string> served;
    holders.clear();
    for (const auto& node : nodes)
      for (const auto& span : node.serving()) {
        served.insert(span.model());
        if (model_id.empty() || span.model() == model_id) holders.push_back(node);
      }
    if (model_id.empty() && served.size() > 1)
      return input_error("{} models are served; name one (ids: {})", served.size(), fmt::join(served, ", "));
    if (model_id.empty() && served.size() == 1) model_id = *served.begin();
    if (!holders.empty()) break;
    if (Clock::now() > deadline)
      return kind_error(ErrorKind::not_found, "no server of {} found within {} ms",
                        model_id.empty() ? std::string("any model") : "model " + model_id,
                        options.discovery_timeout.count());
    std::this_thread::sleep_for(pause.next());
  }
  // The manifest (config, tokenizer) from a server of the model, every byte checked against the id.
  std::optional<Manifest> manifest;
  std::string vocab;
  std::string last_error = "no server answered";
  for (const auto& node : holders) {
    auto store = v1::ModelStore::NewStub(net::make_channel(node.address(), node.node_id(), nullptr));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::GetManifestRequest request;
    request.set_model(model_id);
    v1::GetManifestReply reply;
    auto status = store->GetManifest(&context, request, &reply);
    if (!status.ok()) {
      last_error = net::from_grpc(status, "manifest from " + short_id(node.node_id())).message;
      continue;
    }
    if (to_hex(hash_string(reply.manifest())) != model_id) {
      last_error = "manifest from " + short_id(node.node_id()) + " does not hash to the model id";
      continue;
    }
    auto parsed = parse_manifest(reply.manifest());
    if (!parsed.ok()) {
      last_error = parsed.message();
      continue;
    }
    grpc::ClientContext chunk_context;
    chunk_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::GetChunkRequest chunk_request;
    chunk_request.set_hash(parsed->tokenizer.hash);
    v1::GetChunkReply chunk;
    status = store->GetChunk(&chunk_context, chunk_request, &chunk);
    if (!status.ok() || to_hex(hash_string(chunk.data())) != parsed->tokenizer.hash) {
      last_error = "tokenizer from " + short_id(node.node_id()) + " missing or does not match the manifest";
      continue;
    }
    manifest = std::move(*parsed);
    vocab = chunk.data();
    break;
  }
  if (!manifest) return kind_error(ErrorKind::unavailable, "model {}: {}", model_id, last_error);
  auto tokenizer = model::Tokenizer::parse_vocab(vocab, "model " + model_id + " tokenizer");
  if (!tokenizer.ok()) return kind_error(ErrorKind::bad_peer, "{}", tokenizer.message());
  ModelCard card{model_id, manifest->name.empty() ? model_id.substr(0, 12) : manifest->name, manifest->config};
  return std::unique_ptr<RemoteEngine>(
      new RemoteEngineImpl(options, std::move(discovery), model_id, std::move(card), std::move(*tokenizer)));
}

}  // namespace sn::infer
