#include "net/probe.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "core/memory.h"
#include "net/rpc.h"

namespace sn::net {
namespace {

using SteadyClock = std::chrono::steady_clock;
constexpr auto kRateWindow = std::chrono::seconds(60);
// Probers remembered at once; past this the oldest idle ones are forgotten
// (their sequence floor goes with them, but the control window still bounds replays).
constexpr size_t kMaxProbers = 4096;
constexpr auto kNewPeerCheck = std::chrono::seconds(5);
constexpr auto kPauseCheck = std::chrono::seconds(1);

std::string probe_job_id(const std::string& target_node_id) { return "probe:" + target_node_id; }

// The emulated link to a peer in REGION, if both regions are in the topology.
std::unique_ptr<LinkPacer> pacer_for(const std::optional<Topology>& topology, const std::string& self_region,
                                     const std::string& region) {
  if (!topology) return std::make_unique<LinkPacer>();
  const int a = topology->region_index(self_region), b = topology->region_index(region);
  if (a < 0 || b < 0) return std::make_unique<LinkPacer>();
  return std::make_unique<LinkPacer>(topology->link(a, b));
}

}  // namespace

ControlBody probe_body(const std::string& region, int64_t payload_bytes) {
  ControlBody body;
  body.add(region).add(payload_bytes);
  return body;
}

class ProbeService::Impl final : public solvernet::v1::Probe::Service {
 public:
  explicit Impl(ProbeServiceOptions options) : options_(std::move(options)) {}

  grpc::Status Probe(grpc::ServerContext*, const solvernet::v1::ProbeRequest* request,
                     solvernet::v1::ProbeReply* reply) override {
    auto paced = admit(*request);
    if (!paced.ok()) {
      refused_.fetch_add(1);
      spdlog::debug("refused a probe: {}", paced.message());
      return to_grpc(paced.error());
    }
    answered_.fetch_add(1);
    // The answer travels the emulated link back to the prober.
    std::this_thread::sleep_until((*paced)->schedule(64));
    reply->set_node_id(options_.key->node_id());
    reply->set_payload_bytes(static_cast<int64_t>(request->payload().size()));
    return grpc::Status::OK;
  }

  std::atomic<int64_t> answered_{0}, refused_{0};

 private:
  struct Prober {
    uint64_t highest_sequence = 0;
    std::deque<SteadyClock::time_point> answered;
    std::unique_ptr<LinkPacer> pacer;
    std::string region;
    SteadyClock::time_point last_seen;
  };

  // Checks REQUEST and returns the pacer of the link back to its prober.
  Result<LinkPacer*> admit(const solvernet::v1::ProbeRequest& request) {
    const auto& auth = request.auth();
    if (auth.client_public_key().size() != 32)
      return kind_error(ErrorKind::permission_denied, "probe refused: the prober's key has {} bytes, expected 32",
                        auth.client_public_key().size());
    if (static_cast<int64_t>(request.payload().size()) > kMaxProbePayloadAccepted)
      return kind_error(ErrorKind::invalid_input, "probe refused: payload of {} bytes exceeds the limit of {}",
                        request.payload().size(), kMaxProbePayloadAccepted);
    PublicKey key;
    std::copy(auth.client_public_key().begin(), auth.client_public_key().end(), key.begin());
    const Hash256 digest =
        control_digest("Probe", probe_job_id(options_.key->node_id()), key, auth.sequence(), auth.time_ms(),
                       probe_body(request.region(), static_cast<int64_t>(request.payload().size())));
    if (!verify_signature(key, digest, as_bytes(auth.signature())))
      return kind_error(ErrorKind::permission_denied, "probe refused: bad signature by node {}",
                        node_id_of(key).substr(0, 8));
    const int64_t skew_ms = auth.time_ms() - unix_ms_now();
    if (std::abs(skew_ms) > options_.control_window.count())
      return kind_error(ErrorKind::permission_denied, "probe refused: signed {} ms from this node's clock (window ±{} ms)",
                        skew_ms, options_.control_window.count());
    const std::string id = node_id_of(key);
    const auto now = SteadyClock::now();
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = probers_.find(id);
    if (it == probers_.end()) {
      if (probers_.size() >= kMaxProbers) forget_oldest_locked();
      it = probers_.emplace(id, Prober{}).first;
    }
    Prober& prober = it->second;
    if (auth.sequence() <= prober.highest_sequence)
      return kind_error(ErrorKind::permission_denied, "probe refused: sequence {} of node {} is not above {} (a replay)",
                        auth.sequence(), id.substr(0, 8), prober.highest_sequence);
    while (!prober.answered.empty() && now - prober.answered.front() >= kRateWindow) prober.answered.pop_front();
    if (static_cast<int>(prober.answered.size()) >= options_.per_minute)
      return kind_error(ErrorKind::resource_exhausted, "probe refused: node {} sent {} probes in the last minute, the limit is {}",
                        id.substr(0, 8), prober.answered.size(), options_.per_minute);
    prober.highest_sequence = auth.sequence();
    prober.answered.push_back(now);
    prober.last_seen = now;
    if (!prober.pacer || prober.region != request.region()) {
      prober.region = request.region();
      prober.pacer = pacer_for(options_.topology, options_.region, request.region());
    }
    return prober.pacer.get();
  }

  void forget_oldest_locked() {
    auto oldest = probers_.begin();
    for (auto it = probers_.begin(); it != probers_.end(); ++it)
      if (it->second.last_seen < oldest->second.last_seen) oldest = it;
    probers_.erase(oldest);
  }

  ProbeServiceOptions options_;
  std::mutex mutex_;
  std::map<std::string, Prober> probers_;
};

ProbeService::ProbeService(ProbeServiceOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
ProbeService::~ProbeService() = default;
grpc::Service* ProbeService::service() { return impl_.get(); }
int64_t ProbeService::answered() const { return impl_->answered_.load(); }
int64_t ProbeService::refused() const { return impl_->refused_.load(); }

namespace {

// One signed probe carrying PAYLOAD_BYTES of filler; returns its round trip in
// seconds, the pacing of the request included.
Result<double> probe_once(solvernet::v1::Probe::Stub& stub, const solvernet::v1::NodeInfo& peer,
                          const ProberOptions& options, ControlSigner& signer, LinkPacer* pacer,
                          int64_t payload_bytes) {
  solvernet::v1::ProbeRequest request;
  request.set_region(options.region);
  request.set_payload(std::string(static_cast<size_t>(payload_bytes), '\0'));
  *request.mutable_auth() = signer.sign("Probe", probe_job_id(peer.node_id()), probe_body(options.region, payload_bytes));
  const auto start = SteadyClock::now();
  if (pacer) std::this_thread::sleep_until(pacer->schedule(request.ByteSizeLong(), start));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + options.timeout);
  solvernet::v1::ProbeReply reply;
  grpc::Status status = stub.Probe(&context, request, &reply);
  if (!status.ok()) return from_grpc(status, fmt::format("probe of node {}", peer.node_id().substr(0, 8)));
  if (reply.node_id() != peer.node_id())
    return kind_error(ErrorKind::bad_peer, "probe of node {} was answered by node {}", peer.node_id().substr(0, 8),
                      reply.node_id().substr(0, 8));
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

}  // namespace

Result<ProbeSample> probe_peer(const solvernet::v1::NodeInfo& peer, const ProberOptions& options,
                               ControlSigner& signer, LinkPacer* pacer, double previous_mbps) {
  auto stub = solvernet::v1::Probe::NewStub(make_channel(peer.address(), peer.node_id(), options.key));
  double best = 0;
  for (int i = 0; i < std::max(1, options.rtt_probes); ++i) {
    SN_ASSIGN(double seconds, probe_once(*stub, peer, options, signer, pacer, 0));
    best = i == 0 ? seconds : std::min(best, seconds);
  }
  ProbeSample sample;
  sample.rtt_ms = best * 1e3;
  // Throughput: the payload's time beyond a small probe's round trip. A first
  // guess too small to measure well is followed by one sized from it.
  auto size_for = [&](double mbps) {
    if (!(mbps > 0)) return kMinProbePayload;
    const double bytes = mbps * 1e6 / 8.0 * options.target_seconds;
    return static_cast<size_t>(std::clamp(bytes, double(kMinProbePayload), double(kMaxProbePayload)));
  };
  size_t bytes = size_for(previous_mbps);
  for (int attempt = 0; attempt < 2; ++attempt) {
    SN_ASSIGN(double seconds, probe_once(*stub, peer, options, signer, pacer, static_cast<int64_t>(bytes)));
    const double transfer = std::max(seconds - best, 1e-6);
    sample.mbps = static_cast<double>(bytes) * 8.0 / transfer / 1e6;
    sample.payload_bytes = static_cast<int64_t>(bytes);
    if (transfer >= options.target_seconds / 2 || bytes >= kMaxProbePayload) break;
    bytes = size_for(sample.mbps);
  }
  return sample;
}

solvernet::v1::LinkEstimate estimate_of(const std::string& peer_node_id, const std::vector<ProbeSample>& samples,
                                        int64_t measured_at_ms) {
  solvernet::v1::LinkEstimate estimate;
  estimate.set_peer_node_id(peer_node_id);
  estimate.set_samples(static_cast<int32_t>(samples.size()));
  estimate.set_measured_at_ms(measured_at_ms);
  if (samples.empty()) return estimate;
  // Both from the best round: queueing only ever adds to an RTT, and a busy
  // host (or other traffic) only ever lowers a paced transfer's rate, while a
  // round cannot beat the link's own rate. The median throughput read 15% low
  // on a 2-core host with a dozen busy processes.
  double rtt = samples.front().rtt_ms, mbps = samples.front().mbps;
  for (const auto& s : samples) {
    rtt = std::min(rtt, s.rtt_ms);
    mbps = std::max(mbps, s.mbps);
  }
  estimate.set_rtt_ms(rtt);
  estimate.set_mbps(mbps);
  return estimate;
}

Prober::Prober(ProberOptions options) : options_(std::move(options)), signer_(*options_.key) {}

Prober::~Prober() { stop(); }

void Prober::start() {
  thread_ = std::thread([this] { loop(); });
}

void Prober::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Prober::loop() {
  std::mt19937_64 random(std::random_device{}());
  std::uniform_real_distribution<double> spread(1.0 - options_.jitter, 1.0 + options_.jitter);
  auto next_round = [&] {
    return SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(
                                    std::chrono::duration<double, std::milli>(static_cast<double>(options_.every.count()) * spread(random)));
  };
  auto next_full = SteadyClock::now();
  auto next_new = next_full + kNewPeerCheck;
  bool was_paused = false;
  while (true) {
    const bool pause = paused();
    if (pause != was_paused) spdlog::info(pause ? "probes paused" : "probes resumed");
    was_paused = pause;
    if (!pause) {
      // Between full rounds, a look every kNewPeerCheck for peers never probed
      // (a node that just joined is measured within seconds, not a whole interval).
      if (SteadyClock::now() >= next_full) {
        round(false);
        next_full = next_round();
        next_new = SteadyClock::now() + kNewPeerCheck;
      } else if (SteadyClock::now() >= next_new) {
        round(true);
        next_new = SteadyClock::now() + kNewPeerCheck;
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    const auto until = std::min({next_full, next_new, SteadyClock::now() + kPauseCheck});
    wake_.wait_until(lock, until, [&] { return stopping_; });
    if (stopping_) return;
  }
}

void Prober::round() { round(false); }

void Prober::round(bool only_new) {
  if (paused()) return;
  std::vector<solvernet::v1::NodeInfo> listed = options_.peers ? options_.peers() : std::vector<solvernet::v1::NodeInfo>{};
  std::erase_if(listed, [&](const solvernet::v1::NodeInfo& n) {
    return n.node_id() == options_.key->node_id() || n.withdrawn() || n.address().empty();
  });
  std::sort(listed.begin(), listed.end(),
            [](const auto& a, const auto& b) { return a.timestamp_ms() > b.timestamp_ms(); });
  if (listed.size() > options_.max_peers) listed.resize(options_.max_peers);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::set<std::string> keep;
    order_.clear();
    for (const auto& n : listed) {
      keep.insert(n.node_id());
      order_.push_back(n.node_id());
      PeerRecord& record = peers_[n.node_id()];
      if (!record.pacer || record.region != n.region()) {
        record.region = n.region();
        record.pacer = pacer_for(options_.topology, options_.region, n.region());
        record.samples.clear();  // figures of another emulated link
        record.attempted = false;
      }
    }
    std::erase_if(peers_, [&](const auto& entry) { return !keep.count(entry.first); });
  }
  // One peer at a time: probes of two links never share this node's uplink.
  bool probed = false;
  for (const auto& peer : listed) {
    LinkPacer* pacer = nullptr;
    double previous = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      PeerRecord& record = peers_[peer.node_id()];
      if (only_new && record.attempted) continue;
      if (paused()) break;
      record.attempted = true;
      pacer = record.pacer.get();
      if (!record.samples.empty()) previous = record.samples.back().mbps;
    }
    probed = true;
    auto sample = probe_peer(peer, options_, signer_, pacer, previous);
    if (!sample.ok()) {
      spdlog::debug("probe of node {} at {}: {}", peer.node_id().substr(0, 8), peer.address(), sample.message());
      continue;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    PeerRecord& record = peers_[peer.node_id()];
    record.samples.push_back(*sample);
    while (static_cast<int>(record.samples.size()) > std::max(1, options_.keep_rounds)) record.samples.pop_front();
    record.measured_at_ms = unix_ms_now();
  }
  if (options_.on_update && (probed || !only_new)) options_.on_update(estimates());
}

std::vector<solvernet::v1::LinkEstimate> Prober::estimates() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<solvernet::v1::LinkEstimate> out;
  for (const auto& id : order_) {
    auto it = peers_.find(id);
    if (it == peers_.end() || it->second.samples.empty()) continue;
    out.push_back(estimate_of(id, {it->second.samples.begin(), it->second.samples.end()}, it->second.measured_at_ms));
  }
  return out;
}

size_t set_link_estimates(solvernet::v1::NodeInfo& info, const std::vector<solvernet::v1::LinkEstimate>& estimates,
                          size_t max_bytes) {
  info.clear_links();
  for (const auto& e : estimates) {
    *info.add_links() = e;
    if (info.ByteSizeLong() > max_bytes) {
      info.mutable_links()->RemoveLast();
      break;
    }
  }
  return static_cast<size_t>(info.links_size());
}

double slowest_rtt_ms(const std::vector<solvernet::v1::NodeInfo>& nodes) {
  std::set<std::string> ids;
  for (const auto& n : nodes) ids.insert(n.node_id());
  double slowest = 0;
  for (const auto& n : nodes)
    for (const auto& e : n.links())
      if (ids.count(e.peer_node_id()) && std::isfinite(e.rtt_ms())) slowest = std::max(slowest, e.rtt_ms());
  return slowest;
}

std::chrono::milliseconds adaptive_timeout(std::chrono::milliseconds floor, double rtt_ms, double slowest_step_s,
                                           double k, double history) {
  const double ms = k * std::max(0.0, rtt_ms) + history * std::max(0.0, slowest_step_s) * 1e3;
  // Capped at a day: a figure past it is a broken measurement, not a link.
  const double capped = std::min(ms, 86400e3);
  return std::max(floor, std::chrono::milliseconds(static_cast<int64_t>(std::isfinite(capped) ? capped : 0)));
}

bool any_link_estimates(const std::vector<solvernet::v1::NodeInfo>& nodes) {
  return std::any_of(nodes.begin(), nodes.end(), [](const auto& n) { return n.links_size() > 0; });
}

Result<LinkMatrix> link_matrix_from_estimates(const std::vector<solvernet::v1::NodeInfo>& nodes, LinkSpec fallback,
                                              std::vector<std::pair<int, int>>* missing) {
  const int n = static_cast<int>(nodes.size());
  if (n > kMaxDevices) return input_error("{} nodes exceed the limit of {} devices", n, kMaxDevices);
  SN_TRY(check_memory_for(link_matrix_bytes(n), fmt::format("the link matrix of {} nodes", n)));
  std::map<std::string, int> index;
  for (int i = 0; i < n; ++i) index[nodes[static_cast<size_t>(i)].node_id()] = i;
  // (i, j) → the estimates either end made of the pair.
  std::map<std::pair<int, int>, std::vector<const solvernet::v1::LinkEstimate*>> measured;
  for (int i = 0; i < n; ++i)
    for (const auto& e : nodes[static_cast<size_t>(i)].links()) {
      auto it = index.find(e.peer_node_id());
      if (it == index.end() || it->second == i || !(e.rtt_ms() >= 0) || !(e.mbps() > 0) || !std::isfinite(e.mbps()))
        continue;
      measured[{std::min(i, it->second), std::max(i, it->second)}].push_back(&e);
    }
  LinkMatrix m;
  m.n = n;
  m.links.assign(static_cast<size_t>(n) * static_cast<size_t>(n), LinkSpec{});
  m.compute_tflops.assign(static_cast<size_t>(n), 1.0);
  m.memory_gb.assign(static_cast<size_t>(n), 16.0);
  std::map<std::string, int> regions;
  for (const auto& node : nodes) m.region_of.push_back(regions.emplace(node.region(), static_cast<int>(regions.size())).first->second);
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) {
      LinkSpec link = fallback;
      auto it = measured.find({i, j});
      if (it == measured.end()) {
        if (missing) missing->emplace_back(i, j);
      } else {
        double rtt = 0, mbps = 0;
        for (const auto* e : it->second) {
          rtt += e->rtt_ms();
          mbps += e->mbps();
        }
        const double count = static_cast<double>(it->second.size());
        link.latency_ms = std::min(rtt / count / 2, kMaxLatencyMs);
        link.bandwidth_mbps = std::clamp(mbps / count, kMinBandwidthMbps, kMaxBandwidthMbps);
      }
      m.at(i, j) = m.at(j, i) = link;
    }
  return m;
}

}  // namespace sn::net
