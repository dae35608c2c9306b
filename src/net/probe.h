// Measured links: a node probes the peers it sees in the DHT for round-trip
// time and throughput, and announces what it measured (NodeInfo.links, signed
// with the rest of its announcement). Probes are cheap (a few small requests
// and one payload of at most 2 MiB per peer and round), repeated (every few
// seconds to minutes, with jitter) and rate-limited by the answering peer.
// docs/discovery.md, "Measured links", gives the method and the limits.
//
// On the devnet both sides pace probe traffic through the same link emulator
// as job traffic (net/link.h): the prober paces its request as the link to the
// peer's announced region, the peer paces its answer as the link back to the
// prober's region, so the estimates reflect the emulated links.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/keys.h"
#include "core/result.h"
#include "net/control.h"
#include "net/link.h"
#include "net/topology.h"
#include "proto/solvernet.grpc.pb.h"

namespace sn::net {

// Largest probe payload a peer accepts (the prober sends at most kMaxProbePayload).
inline constexpr int64_t kMaxProbePayloadAccepted = int64_t{4} << 20;
inline constexpr size_t kMinProbePayload = size_t{256} << 10;
inline constexpr size_t kMaxProbePayload = size_t{2} << 20;

struct ProbeServiceOptions {
  const NodeKey* key = nullptr;           // this node; must outlive the service
  std::string region;                     // this node's region
  std::optional<Topology> topology;       // emulate the answer's link to the prober's region (none: unpaced)
  int per_minute = 120;                   // requests answered per prober per minute; RESOURCE_EXHAUSTED beyond
  std::chrono::milliseconds control_window{60000};  // signed requests older or newer than this are refused
};

// The answering side. A request is answered only if it is signed by the
// prober's key for this node (method "Probe", job id "probe:" + this node's
// id), stamped within the control window, with a sequence above every one
// this prober used before (permission_denied otherwise), its payload at most
// kMaxProbePayloadAccepted and of the size signed (invalid_input), and the
// prober within per_minute requests over the last 60 s (resource_exhausted).
// A refusal changes nothing but the refusal counter.
class ProbeService {
 public:
  explicit ProbeService(ProbeServiceOptions options);
  ~ProbeService();
  grpc::Service* service();
  int64_t answered() const;  // requests answered since the start
  int64_t refused() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// The body a probe's signature covers.
ControlBody probe_body(const std::string& region, int64_t payload_bytes);

// One probe round to one peer: RTT (best of a few small requests) and
// throughput (a payload of BYTES, after a first guess scaled so its transfer
// takes about target_seconds).
struct ProbeSample {
  double rtt_ms = 0;
  double mbps = 0;
  int64_t payload_bytes = 0;
};

struct ProberOptions {
  const NodeKey* key = nullptr;           // must outlive the prober
  std::string region;
  std::optional<Topology> topology;       // emulate links to peers by their announced regions (none: unpaced)
  std::chrono::milliseconds every{30000}; // between rounds, ± jitter
  double jitter = 0.2;                    // fraction of every
  size_t max_peers = 16;                  // the most recently announced peers
  int rtt_probes = 4;                     // small requests per round; the best counts
  double target_seconds = 0.25;           // a payload's transfer is sized to take about this
  int keep_rounds = 5;                    // rounds an estimate is built from (the best RTT and the best throughput)
  std::chrono::milliseconds timeout{5000};  // per request
  // The peers this node may work with (their announcements; self, withdrawn
  // and address-less entries are skipped). Called once per round.
  std::function<std::vector<solvernet::v1::NodeInfo>()> peers;
  // Called after each round with every current estimate (newest peers first).
  std::function<void(const std::vector<solvernet::v1::LinkEstimate>&)> on_update;
  // While this returns true no probe is sent and no peer listed (a node
  // holding a job: probes would spend its link and CPU, and measure its own
  // job's traffic). Asked about every second and between the peers of a
  // round; the probe in flight finishes. Empty: never paused.
  std::function<bool()> paused;
};

// Probes PEER once. PREVIOUS_MBPS (0: unknown) sizes the payload. PACER (may
// be null) paces the requests as the emulated link to the peer. Errors: the
// peer's refusal or an unreachable peer (their kinds follow the gRPC status).
Result<ProbeSample> probe_peer(const solvernet::v1::NodeInfo& peer, const ProberOptions& options,
                               ControlSigner& signer, LinkPacer* pacer, double previous_mbps);

// Runs rounds in a background thread until stop() or destruction: a full
// round at start and every `every` ± jitter, and between them, every 5 s, a
// probe of peers never tried (so a node that just joined is measured within
// seconds). While options.paused() holds it sends nothing; a full round that
// fell due meanwhile runs once it no longer holds. A failed probe is logged
// (debug) and the peer's older estimate kept; an estimate of a peer no longer
// listed is dropped.
class Prober {
 public:
  explicit Prober(ProberOptions options);
  ~Prober();
  Prober(const Prober&) = delete;
  Prober& operator=(const Prober&) = delete;
  void stop();

  // Runs one round now, in the caller's thread (tests; the background thread
  // is not started by this). Nothing while paused.
  void round();
  void start();
  std::vector<solvernet::v1::LinkEstimate> estimates() const;

 private:
  struct PeerRecord {
    std::deque<ProbeSample> samples;
    int64_t measured_at_ms = 0;
    std::unique_ptr<LinkPacer> pacer;
    std::string region;
    bool attempted = false;  // probed (or tried) at least once
  };
  void loop();
  bool paused() const { return options_.paused && options_.paused(); }
  // ONLY_NEW: probe only peers never tried (the checks between full rounds).
  void round(bool only_new);

  ProberOptions options_;
  ControlSigner signer_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::map<std::string, PeerRecord> peers_;
  std::vector<std::string> order_;  // newest announced first
  std::thread thread_;
};

// The estimate from a peer's samples: best RTT, best throughput.
solvernet::v1::LinkEstimate estimate_of(const std::string& peer_node_id, const std::vector<ProbeSample>& samples,
                                        int64_t measured_at_ms);

// The scheduler's view of NODES' links from their announced estimates:
// device i is NODES[i]. A pair's latency is half the RTT and its bandwidth the
// throughput, averaged over both ends' estimates when both measured it. A pair
// neither end measured gets FALLBACK and is listed in MISSING (if not null) as
// (i, j), i < j. Compute and memory per device are the topology defaults
// (1 TFLOP/s, 16 GB): announcements do not calibrate them. Errors as
// link_matrix_for (too many devices for memory).
inline constexpr LinkSpec kUnmeasuredLink{100.0, 10.0};  // 100 ms one-way, 10 Mbps: a poor WAN link
Result<LinkMatrix> link_matrix_from_estimates(const std::vector<solvernet::v1::NodeInfo>& nodes,
                                              LinkSpec fallback = kUnmeasuredLink,
                                              std::vector<std::pair<int, int>>* missing = nullptr);
// Replaces INFO's links with ESTIMATES, in order, as many as keep the
// serialized NodeInfo within MAX_BYTES (the DHT stores announcements of at
// most 4096 bytes, signature and framing included). Returns how many fit.
inline constexpr size_t kMaxAnnouncedInfoBytes = 3900;
size_t set_link_estimates(solvernet::v1::NodeInfo& info, const std::vector<solvernet::v1::LinkEstimate>& estimates,
                          size_t max_bytes = kMaxAnnouncedInfoBytes);

// Timeouts from measurements rather than a hand-tuned constant. The slowest
// round trip NODES announce between one another (ms; 0: none measured), and a
// wait derived from it: max(FLOOR, K × RTT_MS + HISTORY × SLOWEST_STEP_S),
// where SLOWEST_STEP_S is the slowest step seen so far (0 before the first).
// The training client does not use it yet (docs/discovery.md, "Measured links").
double slowest_rtt_ms(const std::vector<solvernet::v1::NodeInfo>& nodes);
std::chrono::milliseconds adaptive_timeout(std::chrono::milliseconds floor, double rtt_ms, double slowest_step_s,
                                           double k = 8, double history = 3);

// Whether any of NODES announces a measured link.
bool any_link_estimates(const std::vector<solvernet::v1::NodeInfo>& nodes);

}  // namespace sn::net
