#include "cli/job_runner.h"

#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "cli/host_corunners.h"
#include "cli/signals.h"
#include "core/backoff.h"
#include "core/fs.h"
#include "core/memory.h"
#include "core/process.h"
#include "model/data.h"
#include "net/discovery.h"
#include "train/inputs.h"
#include "net/rpc.h"
#include "net/local_mesh.h"
#include "net/probe.h"
#include "privacy/privacy.h"
#include "sched/placement.h"
#include "train/train.h"

namespace sn::cli {
namespace {

std::string megabytes(int64_t bytes) { return fmt::format("{:.2f} MB", static_cast<double>(bytes) / 1e6); }

class ProgressLine {
 public:
  ProgressLine(bool quiet, const JobConfig& job) : quiet_(quiet), tty_(::isatty(2)), job_(job) {}
  void operator()(const train::StepReport& r) {
    if (quiet_) return;
    std::string line = fmt::format("step {}/{}  loss {:.4f}  {:.0f} tok/s  {:.2f} s/step", r.step, r.steps,
                                   r.loss, r.tokens_per_s, r.step_seconds);
    // DP: ε spent so far, at the job's δ.
    if (job_.privacy.dp && r.train_sequences > 0)
      if (auto plan = privacy::plan_dp(job_, r.train_sequences); plan.ok())
        if (auto spent = privacy::epsilon_spent(plan->noise_multiplier, plan->sample_rate, r.step, plan->delta);
            spent.ok())
          line += fmt::format("  ε {:.3f}", spent->epsilon);
    for (const auto& [cls, bytes] : r.bytes_by_class) line += fmt::format("  {} {}", cls, megabytes(bytes));
    if (tty_) {
      std::cerr << "\r\033[K" << line << std::flush;
      if (r.step == r.steps) std::cerr << "\n";
    } else if (r.step == 1 || r.step == r.steps || r.step % std::max<int64_t>(1, r.steps / 10) == 0) {
      std::cerr << line << "\n";
    }
  }

 private:
  bool quiet_, tty_;
  const JobConfig& job_;
};

// One status line that stays live while a wait lasts, from its second
// second on (a wait that ends sooner says nothing): redrawn in place on a
// terminal (at most every 0.5 s), printed when it changes otherwise (at most
// every 5 s), ended by done().
class WaitLine {
 public:
  explicit WaitLine(bool show)
      : show_(show), tty_(::isatty(2)), next_(std::chrono::steady_clock::now() + std::chrono::seconds(1)) {}
  void operator()(const std::string& text) {
    if (!show_) return;
    const auto now = std::chrono::steady_clock::now();
    // The seconds left change every look: only a change of the rest is news off a terminal.
    const std::string gist = text.substr(0, text.rfind(';'));
    if (now < next_ || (!tty_ && gist == last_gist_)) return;
    next_ = now + std::chrono::milliseconds(tty_ ? 500 : 5000);
    last_gist_ = gist;
    shown_ = true;
    std::cerr << (tty_ ? "\r\033[K" : "") << "train: " << text << (tty_ ? "" : "\n") << std::flush;
  }
  void done() {
    if (shown_ && tty_) std::cerr << "\n";
    shown_ = false;
  }
  ~WaitLine() { done(); }

 private:
  bool show_, tty_, shown_ = false;
  std::chrono::steady_clock::time_point next_;
  std::string last_gist_;
};

// NODES: the nodes the job ran on (not those merely discovered).
nlohmann::json summary_of(const RunSpec& spec, const train::TrainResult& result, int nodes) {
  nlohmann::json s;
  s["job"] = spec.job.name;
  s["nodes"] = nodes;
  s["stages"] = spec.job.parallel.stages;
  s["replicas"] = spec.job.parallel.replicas;
  s["micro_batches"] = spec.job.parallel.micro_batches;
  s["steps"] = static_cast<int64_t>(result.losses.size());
  s["parameters"] = spec.job.model.parameter_count();
  s["loss_first"] = result.losses.empty() ? 0.0 : result.losses.front();
  s["loss_last"] = result.losses.empty() ? 0.0 : result.losses.back();
  s["losses"] = result.losses;
  s["holdout_loss"] = std::isnan(result.holdout_loss) ? nlohmann::json(nullptr) : nlohmann::json(result.holdout_loss);
  s["holdout_loss_missing"] =
      result.holdout_loss_missing.empty() ? nlohmann::json(nullptr) : nlohmann::json(result.holdout_loss_missing);
  s["tokens_per_s"] = result.tokens_per_s;
  s["wall_s"] = result.wall_seconds;
  s["setup_s"] = result.setup_seconds;
  s["bytes_pipeline"] = result.bytes_pipeline;
  s["bytes_data_parallel"] = result.bytes_data_parallel;
  s["bytes_sent"] = result.bytes_pipeline + result.bytes_data_parallel;
  s["bytes_by_link_class"] = result.bytes_by_class;
  s["model_path"] = result.model_path.empty() ? "" : std::filesystem::absolute(result.model_path).string();
  s["model_hash"] = result.model_hash;
  s["stage_state_hashes"] = result.stage_state_hashes;
  s["member_commitments"] = result.member_commitments;
  if (!result.replica_divergences.empty()) s["replica_divergences"] = result.replica_divergences;
  if (!result.losses.empty()) {
    const auto steps = static_cast<double>(result.losses.size());
    s["timing"] = {{"step_s", result.step_seconds_total / steps},
                   {"node_compute_s", result.node_compute_seconds_total / steps},
                   {"node_wait_s", result.node_wait_seconds_total / steps}};
  }
  s["steady_state"] = {{"first_step", result.first_steady_step + 1},
                       {"steps", result.steady_steps},
                       {"bytes_pipeline", result.steady_bytes_pipeline},
                       {"bytes_data_parallel", result.steady_bytes_data_parallel}};
  s["step_deadline_ms"] = result.step_deadline_ms;
  s["step_p95_s"] = result.step_p95_seconds;
  s["rtt_ms"] = result.rtt_ms;
  if (spec.job.diloco.enabled) {
    const auto& d = result.diloco;
    s["diloco"] = {{"inner_steps", spec.job.diloco.inner_steps}, {"outer_lr", spec.job.diloco.outer_lr},
                   {"outer_momentum", spec.job.diloco.outer_momentum}, {"pseudo_grad", spec.job.diloco.pseudo_grad},
                   {"outer_steps", d.outer_steps}, {"dropped_groups", d.dropped_groups},
                   {"dropped_at_step", d.dropped_at_step}, {"outer_retries", d.outer_retries},
                   {"rejoined_groups", d.rejoined_groups}, {"rejoined_at_step", d.rejoined_at_step},
                   {"outer_hashes", d.outer_hashes}, {"outer_groups", d.outer_groups},
                   {"bytes_outer", d.bytes_outer}, {"diverged_before_outer", d.diverged_before_outer}, {"data_bytes_not_sent", d.data_bytes_not_sent},
                   {"dataset_hash", d.dataset_hash}};
  }
  const auto& c = spec.job.compression;
  s["compression"] = {{"activations", c.activations}, {"forward_bits", c.forward_bits},
                      {"backward_bits", c.backward_bits}, {"gradients", c.gradients},
                      {"gradient_bits", c.gradient_bits}, {"random_fraction", c.random_fraction},
                      {"topk_fraction", c.topk_fraction}};
  const auto& p = spec.job.privacy;
  if (p.enabled) {
    nlohmann::json privacy{{"secure_aggregation", p.secure_aggregation}, {"dp", p.dp}};
    if (p.secure_aggregation)
      privacy["threshold"] = p.threshold > 0 ? p.threshold : privacy::default_threshold(static_cast<int>(spec.job.parallel.replicas));
    if (p.dp && result.train_sequences > 0) {
      if (auto plan = privacy::plan_dp(spec.job, result.train_sequences); plan.ok()) {
        auto spent = privacy::epsilon_spent(plan->noise_multiplier, plan->sample_rate,
                                            std::max<int64_t>(1, static_cast<int64_t>(result.losses.size())), plan->delta);
        privacy["epsilon"] = spent.ok() ? spent->epsilon : plan->epsilon;
        privacy["delta"] = plan->delta;
        privacy["noise_multiplier"] = plan->noise_multiplier;
        privacy["sample_rate"] = plan->sample_rate;
        privacy["clip_norm"] = p.clip_norm;
      }
    }
    s["privacy"] = privacy;
  }
  return s;
}

}  // namespace

Status check_run_inputs(const RunSpec& spec, bool local) {
  // Every flag here has the same reach as a job file field: refused before any work.
  if (!spec.model_out.empty()) {
    SN_TRY(check_output_file(spec.model_out, "--out"));
    // The weights alone (fp32) need this much room once the job is done.
    const auto dir = spec.model_out.has_parent_path() ? spec.model_out.parent_path() : std::filesystem::path(".");
    const double weights = 4.0 * static_cast<double>(spec.job.model.parameter_count());
    struct statvfs disk {};
    if (::statvfs(dir.c_str(), &disk) == 0 &&
        static_cast<double>(disk.f_bavail) * static_cast<double>(disk.f_frsize) < weights)
      return input_error("--out {}: its disk has {} free, the model's weights need {}", spec.model_out.string(),
                         megabytes(static_cast<int64_t>(disk.f_bavail * disk.f_frsize)),
                         megabytes(static_cast<int64_t>(weights)));
  }
  // Where this process builds the whole model (to train it locally, to check --init,
  // to measure compute for the scheduler or scaled links), a model too large for it
  // is refused here rather than as a bad_alloc. Nodes hold only their stages.
  const bool scaled = spec.emulate == "scaled" || (spec.emulate.empty() && spec.topology && spec.topology->mode == "scaled");
  const bool builds_whole_model = local || !spec.initial_weights.empty() ||
                                  (spec.topology && (spec.algo != "naive" || scaled) && spec.time_dilation == 0);
  if (builds_whole_model) {
    const double bytes = spec.job.training_memory_bytes();
    SN_TRY(check_memory_for(bytes >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(bytes),
                            fmt::format("training the job's model ({} parameters) in one process",
                                        spec.job.model.parameter_count())));
  }
  SN_TRY(model::check_corpus(spec.job.data, static_cast<int>(spec.job.model.vocab)));
  if (local && spec.job.privacy.enabled)
    return input_error("{}: a [privacy] job runs on nodes (devnet, or train --bootstrap), not with --local",
                       spec.job.source.string());
  // Without TLS the Shamir shares travel in cleartext: an eavesdropper holding
  // enough of them rebuilds the seeds and unmasks every replica's gradient.
  if (spec.job.privacy.secure_aggregation && net::insecure())
    return input_error("{}: privacy.secure_aggregation needs TLS between the nodes (drop --insecure): its secret "
                       "shares would travel in cleartext",
                       spec.job.source.string());
  // An ε no noise reaches is refused now (checked at q = 1, the worst case).
  if (spec.job.privacy.dp && spec.job.privacy.target_epsilon > 0)
    if (auto sigma = privacy::noise_for_epsilon(spec.job.privacy.target_epsilon, 1.0, spec.job.train.steps,
                                                spec.job.privacy.delta);
        !sigma.ok())
      return input_error("{}: privacy.target_epsilon: {}", spec.job.source.string(), sigma.message());
  if (!spec.initial_weights.empty()) SN_TRY(train::load_initial_weights(spec.job, spec.initial_weights));
  if (spec.time_dilation != 0 &&
      !(std::isfinite(spec.time_dilation) && spec.time_dilation >= kMinTimeDilation &&
        spec.time_dilation <= kMaxTimeDilation))
    return input_error("--time-dilation must be 0 (measure) or in [{:g}, {:g}], got {:g}", kMinTimeDilation,
                       kMaxTimeDilation, spec.time_dilation);
  const std::vector<std::string> algos = {"ours", "dtfm", "random", "naive"};
  if (std::find(algos.begin(), algos.end(), spec.algo) == algos.end())
    return input_error("--algo must be one of ours, dtfm, random, naive, got \"{}\"", spec.algo);
  if (!spec.emulate.empty() && spec.emulate != "raw" && spec.emulate != "scaled")
    return input_error("--emulate must be raw or scaled, got \"{}\"", spec.emulate);
  if (spec.emulate == "scaled" && !spec.topology) return input_error("--emulate scaled needs a --topology");
  return ok_status();
}

namespace {
// Channels by address and node id, kept between looks: a look that opened
// one per node made a TLS handshake with every idle node of the network
// every 2 s for every running job.
using ChannelCache = std::map<std::pair<std::string, std::string>, std::shared_ptr<grpc::Channel>>;

// Whether each of CANDIDATES answers a Ping within TIMEOUT with its own node
// id. All pings at once: the wait is one timeout, not one per dead node.
// With CHANNELS, a node's channel is reused while it answers, and dropped
// when it does not (a channel in reconnect backoff would fail a restarted
// node's ping), as are those of nodes no longer among CANDIDATES.
std::vector<bool> answering(const std::vector<solvernet::v1::NodeInfo>& candidates, std::chrono::milliseconds timeout,
                            ChannelCache* channels = nullptr) {
  struct Call {
    solvernet::v1::PingReply reply;
    grpc::ClientContext context;
    grpc::Status status;
  };
  grpc::CompletionQueue queue;
  std::vector<std::unique_ptr<Call>> calls;
  std::vector<std::unique_ptr<solvernet::v1::Node::Stub>> stubs;
  ChannelCache used;
  const auto deadline = std::chrono::system_clock::now() + timeout;
  for (size_t i = 0; i < candidates.size(); ++i) {
    // The node the DHT named, proven by its TLS certificate.
    const std::pair<std::string, std::string> key{candidates[i].address(), candidates[i].node_id()};
    std::shared_ptr<grpc::Channel> channel = channels && channels->count(key) ? channels->at(key) : nullptr;
    if (!channel) channel = net::make_channel(key.first, key.second);
    stubs.push_back(solvernet::v1::Node::NewStub(channel));
    used.emplace(key, std::move(channel));
    calls.push_back(std::make_unique<Call>());
    calls[i]->context.set_deadline(deadline);
    solvernet::v1::PingRequest request;
    auto rpc = stubs[i]->AsyncPing(&calls[i]->context, request, &queue);
    rpc->Finish(&calls[i]->reply, &calls[i]->status, reinterpret_cast<void*>(i));
  }
  std::vector<bool> live(candidates.size(), false);
  for (size_t done = 0; done < candidates.size(); ++done) {
    void* tag = nullptr;
    bool ok = false;
    if (!queue.Next(&tag, &ok)) break;
    const auto i = reinterpret_cast<size_t>(tag);
    // Alive, and the node the DHT named (not some other process on a reused port).
    live[i] = ok && calls[i]->status.ok() && calls[i]->reply.node_id() == candidates[i].node_id();
  }
  queue.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (queue.Next(&tag, &ok)) {
  }
  if (channels) {
    channels->clear();
    for (size_t i = 0; i < candidates.size(); ++i)
      if (live[i]) channels->emplace(std::make_pair(candidates[i].address(), candidates[i].node_id()),
                                     used.at({candidates[i].address(), candidates[i].node_id()}));
  }
  return live;
}
}  // namespace

std::vector<solvernet::v1::NodeInfo> live_nodes(const std::vector<solvernet::v1::NodeInfo>& candidates,
                                                std::chrono::milliseconds timeout) {
  const std::vector<bool> live = answering(candidates, timeout);
  std::vector<solvernet::v1::NodeInfo> out;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (live[i])
      out.push_back(candidates[i]);
    else
      spdlog::info("node {} at {} is listed but did not answer a ping; not using it",
                   candidates[i].node_id().substr(0, 8), candidates[i].address());
  }
  return out;
}

Result<std::vector<solvernet::v1::NodeInfo>> discover_nodes(const std::vector<std::string>& bootstrap,
                                                            size_t want, std::chrono::milliseconds timeout,
                                                            std::chrono::milliseconds bootstrap_timeout, size_t enough,
                                                            std::chrono::milliseconds grace, bool show_wait) {
  install_stop_handlers();
  SN_ASSIGN(auto discovery, net::Discovery::start(0, bootstrap));
  // An unreachable bootstrap is not an empty network: say so.
  SN_TRY(discovery->wait_for_bootstrap(std::min(timeout, bootstrap_timeout)));
  auto deadline = std::chrono::steady_clock::now() + timeout;
  const size_t floor = enough > 0 && enough < want ? enough : want;
  std::optional<std::chrono::steady_clock::time_point> enough_since;
  std::vector<solvernet::v1::NodeInfo> idle, live;
  // Between looks: 0.2 s, doubling up to 1 s (a listing that answers at once
  // must not become a loop of DHT gets).
  Backoff pause(std::chrono::milliseconds(200), std::chrono::milliseconds(1000));
  WaitLine wait_line(show_wait);
  while (true) {
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    SN_ASSIGN(auto nodes, discovery->list_nodes(std::max(std::chrono::milliseconds(500), std::min(remaining, std::chrono::milliseconds(2000)))));
    idle.clear();
    live.clear();
    for (auto& n : nodes)
      if (n.busy_job_id().empty()) idle.push_back(n);
    // A node killed a moment ago stays listed until its announcement goes
    // stale: only nodes that answer now are placed.
    if (idle.size() >= floor) live = live_nodes(idle, std::chrono::milliseconds(1500));
    if (live.size() >= want) break;
    // Enough to go on with: the rest get GRACE (a node that froze or died at start-up never comes).
    if (live.size() >= floor) {
      if (!enough_since) enough_since = std::chrono::steady_clock::now();
      if (std::chrono::steady_clock::now() - *enough_since >= grace || std::chrono::steady_clock::now() >= deadline)
        break;
    }
    {
      std::set<std::string> holders;
      for (const auto& n : nodes)
        if (!n.busy_job_id().empty()) holders.insert(n.busy_job_id());
      const auto left = std::chrono::duration_cast<std::chrono::seconds>(deadline - std::chrono::steady_clock::now());
      wait_line(fmt::format("waiting for nodes via {}: {} of {} idle and answering{}; at most {} s more",
                            bootstrap.empty() ? std::string("(no bootstrap)") : bootstrap.front(), live.size(), want,
                            holders.empty() ? "" : fmt::format(", {} busy with job {} until it ends or its lease runs out",
                                                               nodes.size() - idle.size(), fmt::join(holders, ", ")),
                            std::max<int64_t>(0, left.count())));
    }
    if (stop_requested())
      return kind_error(ErrorKind::aborted, "interrupted while waiting for nodes via {} ({} of {} idle and answering)",
                        bootstrap.empty() ? std::string("(no bootstrap)") : bootstrap.front(), live.size(), want);
    if (std::chrono::steady_clock::now() >= deadline) {
      // The count named is the one required (the rest were wanted, not needed).
      if (idle.size() >= floor)
        return kind_error(ErrorKind::unavailable, "found {} idle node(s) via {} but only {} answered a ping; the job needs {}",
                          idle.size(), bootstrap.empty() ? std::string("(no bootstrap)") : bootstrap.front(), live.size(),
                          floor);
      return kind_error(ErrorKind::unavailable, "found {} idle node(s) via {}, the job needs {}", idle.size(),
                        bootstrap.empty() ? std::string("(no bootstrap)") : bootstrap.front(), floor);
    }
    std::this_thread::sleep_for(pause.next());
  }
  wait_line.done();
  discovery->stop();
  return live;
}

Result<std::vector<solvernet::v1::NodeInfo>> wait_for_link_estimates(const std::vector<std::string>& bootstrap,
                                                                     std::vector<solvernet::v1::NodeInfo> nodes,
                                                                     std::chrono::milliseconds timeout) {
  SN_ASSIGN(auto discovery, net::Discovery::start(0, bootstrap));
  SN_TRY(discovery->wait_for_bootstrap(std::min(timeout, std::chrono::milliseconds(5000))));
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < nodes.size(); ++i) index[nodes[i].node_id()] = i;
  auto complete = [&] {
    for (const auto& n : nodes) {
      size_t peers = 0;
      for (const auto& e : n.links()) peers += index.count(e.peer_node_id()) && e.peer_node_id() != n.node_id();
      if (peers + 1 < nodes.size()) return false;
    }
    return true;
  };
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  Backoff pause(std::chrono::milliseconds(500), std::chrono::milliseconds(2000));
  while (!complete() && std::chrono::steady_clock::now() < deadline && !stop_requested()) {
    if (auto listed = discovery->list_nodes(std::chrono::milliseconds(2000)); listed.ok())
      for (auto& n : *listed)
        if (auto it = index.find(n.node_id()); it != index.end()) nodes[it->second] = std::move(n);
    if (!complete()) std::this_thread::sleep_for(pause.next());
  }
  discovery->stop();
  return nodes;
}

namespace {
net::MemberInfo member_of_node(const solvernet::v1::NodeInfo& node) {
  net::MemberInfo m;
  m.node_id = node.node_id();
  if (node.public_key().size() == m.public_key.size())
    std::copy(node.public_key().begin(), node.public_key().end(), m.public_key.begin());
  m.address = node.address();
  m.region = node.region();
  return m;
}

// The node holding each role when the job ended, stages[s][r] = node id: the
// placement after every recovery, re-plan and grow-back (members are in
// stage-major order; the last recovery says how many replicas remained).
nlohmann::json placement_at_end(const train::TrainResult& result, int64_t stages) {
  nlohmann::json out = nlohmann::json::array();
  if (stages <= 0 || result.member_node_ids.size() % static_cast<size_t>(stages) != 0) return out;
  const size_t replicas = result.member_node_ids.size() / static_cast<size_t>(stages);
  for (size_t s = 0; s < static_cast<size_t>(stages); ++s) {
    nlohmann::json row = nlohmann::json::array();
    for (size_t r = 0; r < replicas; ++r) row.push_back(result.member_node_ids[s * replicas + r]);
    out.push_back(std::move(row));
  }
  return out;
}

// The idle nodes the DHT lists that answer a ping, kept fresh by a thread of
// its own: the training loop asks at every mirrored checkpoint of a
// re-planned job and at every DiLoCo boundary while a group is dropped, and
// must not wait for the DHT there (with the bootstrap dead, one look took
// ~2 s: an every-step job ran ~5x slower after a re-plan, DiLoCo ~30x after
// a drop). A look lists the DHT (at most kListWait) and pings the idle nodes
// listed (at most kPingWait, all at once, over channels kept between
// looks); looks come kEvery apart while latest() was asked within
// kAskedLately (a re-planned job asks at every mirrored checkpoint), else
// kEveryUnasked apart (every running job pinged every idle node every 2 s),
// and kSoonest after the last once latest() asks (a recovery waiting for a
// spare polls it). While the DHT does not answer (not joined, or
// an empty listing: a job's own members are always listed), the last list's
// nodes are pinged again instead, and the DHT is asked again at doubling
// pauses. The first "last list" is the idle nodes the client found before
// the job: its own DHT node joins through the bootstrap alone, and a
// bootstrap that died as the job began left it with none for the job's life.
class IdleNodeWatch {
 public:
  static constexpr auto kEvery = std::chrono::milliseconds(2000);
  static constexpr auto kEveryUnasked = std::chrono::milliseconds(10000);
  static constexpr auto kAskedLately = std::chrono::milliseconds(30000);
  static constexpr auto kSoonest = std::chrono::milliseconds(200);
  static constexpr auto kListWait = std::chrono::milliseconds(1500);
  static constexpr auto kPingWait = std::chrono::milliseconds(1000);

  // Starts the first look at once, in the background. FOUND: the idle nodes
  // the client found before the job, pinged while the DHT does not answer.
  IdleNodeWatch(std::vector<std::string> bootstrap, std::vector<solvernet::v1::NodeInfo> found)
      : bootstrap_(std::move(bootstrap)), found_(std::move(found)) {
    thread_ = std::thread([this] { run(); });
  }
  ~IdleNodeWatch() { stop(); }
  IdleNodeWatch(const IdleNodeWatch&) = delete;
  IdleNodeWatch& operator=(const IdleNodeWatch&) = delete;

  // The idle nodes that answered at the newest look (none before the first
  // ends), at once, each once per look: the client keeps those it is given,
  // and one that has died since would only be pinged again and again until
  // the next look. Asks for a fresh look (unless the DHT does not answer).
  std::vector<net::MemberInfo> latest() {
    std::lock_guard<std::mutex> lock(mutex_);
    fresh_wanted_ = true;
    asked_at_ = std::chrono::steady_clock::now();
    wake_.notify_all();
    std::vector<net::MemberInfo> out;
    for (const auto& node : idle_)
      if (handed_out_.insert(node.node_id).second) out.push_back(node);
    return out;
  }

  // Waits for a look in flight (at most kListWait + kPingWait) and stops the
  // thread and the DHT node. Idempotent.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    Backoff dht_silent(std::chrono::milliseconds(1000), std::chrono::milliseconds(15000));
    std::unique_ptr<net::Discovery> dht;
    std::vector<solvernet::v1::NodeInfo> known = found_;  // the newest look's idle nodes that answered
    ChannelCache channels;
    std::set<std::string> reported_silent;
    bool dht_answered = true;
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (stopping_) break;
        fresh_wanted_ = false;
      }
      if (!dht)
        if (auto started = net::Discovery::start(0, bootstrap_); started.ok()) dht = std::move(started).value();
      std::optional<std::vector<solvernet::v1::NodeInfo>> listed;
      if (dht && dht->wait_for_bootstrap(kListWait).ok())
        if (auto got = dht->list_nodes(kListWait); got.ok() && !got->empty()) listed = std::move(got).value();
      std::vector<solvernet::v1::NodeInfo> candidates;
      if (listed) {
        for (auto& n : *listed)
          if (n.busy_job_id().empty()) candidates.push_back(std::move(n));
      } else {
        candidates = known;
      }
      const std::vector<bool> answers = answering(candidates, kPingWait, &channels);
      known.clear();
      std::vector<net::MemberInfo> idle;
      for (size_t i = 0; i < candidates.size(); ++i) {
        const auto& n = candidates[i];
        if (answers[i]) {
          reported_silent.erase(n.node_id());
          known.push_back(n);
          idle.push_back(member_of_node(n));
        } else if (reported_silent.insert(n.node_id()).second) {
          spdlog::info("node {} at {} is listed idle but did not answer a ping; not a spare while it does not",
                       n.node_id().substr(0, 8), n.address());
        }
      }
      if (listed.has_value() != dht_answered) {
        dht_answered = listed.has_value();
        if (dht_answered)
          spdlog::info("looking for spares: the DHT answers again");
        else
          spdlog::warn("looking for spares: the DHT does not answer (bootstrap {}); the spares are the {} idle node(s) "
                       "of its last list that still answer a ping; asking it again, at most 15 s apart",
                       fmt::join(bootstrap_, ", "), idle.size());
      }
      if (listed) dht_silent.reset();
      const auto looked = std::chrono::steady_clock::now();
      std::unique_lock<std::mutex> lock(mutex_);
      const bool asked_lately = asked_at_ && looked - *asked_at_ < kAskedLately;
      const auto pause = !listed ? dht_silent.next() : asked_lately ? kEvery : kEveryUnasked;
      idle_ = std::move(idle);
      handed_out_.clear();
      if (wake_.wait_until(lock, looked + kSoonest, [&] { return stopping_; })) break;
      // Asked for a fresh look: only while the DHT answers (else it waits out its pause).
      wake_.wait_until(lock, looked + pause, [&] { return stopping_ || (fresh_wanted_ && dht_answered); });
    }
    if (dht) dht->stop();
  }

  const std::vector<std::string> bootstrap_;
  const std::vector<solvernet::v1::NodeInfo> found_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false, fresh_wanted_ = false;
  std::optional<std::chrono::steady_clock::time_point> asked_at_;  // latest() last called
  std::vector<net::MemberInfo> idle_;
  std::set<std::string> handed_out_;  // node ids latest() returned since the newest look
  std::thread thread_;
};
}  // namespace

Result<size_t> end_stopped_run(const std::vector<std::string>& bootstrap, const std::string& job_id,
                               const std::filesystem::path& client_key, std::chrono::milliseconds timeout,
                               bool show_wait) {
  using Steady = std::chrono::steady_clock;
  const auto key_path = client_key.empty() ? default_client_key_path() : client_key;
  auto key = NodeKey::load_or_create_file(key_path);
  if (!key.ok()) return input_error("client key: {}", key.message());
  install_stop_handlers();
  SN_ASSIGN(auto discovery, net::Discovery::start(0, bootstrap));
  SN_TRY(discovery->wait_for_bootstrap(std::min(timeout, std::chrono::milliseconds(5000))));
  // A fresh DHT node's first listing may miss nodes: look again until a look
  // finds no holder not yet ended (at most ~3 s).
  std::set<std::string> ended;
  // Nodes whose job's client renewed its lease recently: maybe it was killed
  // a moment ago, maybe it runs. Each is asked again once that renewal is
  // QUIET old; refused again, a renewal came since, so the client runs.
  std::map<std::string, Steady::time_point> ask_again;
  std::chrono::milliseconds renewed_ago{0};
  WaitLine wait_line(show_wait);
  const auto looks_until = Steady::now() + std::min(timeout, std::chrono::milliseconds(3000));
  for (int look = 0;; ++look) {
    if (stop_requested())
      return kind_error(ErrorKind::aborted, "interrupted while ending job {}'s stopped run on its nodes", job_id);
    SN_ASSIGN(auto nodes, discovery->list_nodes(std::chrono::milliseconds(1000)));
    std::vector<net::MemberInfo> holders;
    std::map<std::string, Steady::time_point> still_asked;
    for (const auto& n : nodes) {
      if (n.busy_job_id() != job_id || ended.count(n.node_id())) continue;
      auto again = ask_again.find(n.node_id());
      if (again == ask_again.end() || Steady::now() >= again->second)
        holders.push_back(member_of_node(n));
      else
        still_asked.insert(*again);
    }
    if (holders.empty() && still_asked.empty() && (look > 0 || Steady::now() >= looks_until)) break;
    for (const auto& answer : train::end_stopped_run(holders, job_id, *key, std::chrono::milliseconds(5000))) {
      using Outcome = train::TakeoverAnswer::Outcome;
      switch (answer.outcome) {
        case Outcome::ended: ended.insert(answer.node_id); break;
        case Outcome::other_client:
          return input_error("job {}: its nodes hold it for another client key than {} (client {}); resume with the "
                             "key that started it (--key)",
                             job_id, key_path.string(), key->node_id().substr(0, 8));
        case Outcome::client_live:
          if (ask_again.count(answer.node_id))
            return input_error("job {} is still run by a live client (its lease was renewed {:.1f} s ago); stop "
                               "that client first",
                               job_id, answer.renewed_ago.count() / 1000.0);
          renewed_ago = answer.renewed_ago;
          still_asked[answer.node_id] =
              Steady::now() + answer.quiet - answer.renewed_ago + std::chrono::milliseconds(300);
          break;
        case Outcome::kept: break;
      }
    }
    // A node that left the job (its lease ran out) or the listing is not asked again.
    ask_again = std::move(still_asked);
    if (ask_again.empty()) {
      if (Steady::now() >= looks_until) break;
      continue;
    }
    auto next = std::min_element(ask_again.begin(), ask_again.end(),
                                 [](const auto& a, const auto& b) { return a.second < b.second; })->second;
    wait_line(fmt::format("job {}'s client renewed its lease {:.1f} s ago: was it stopped, or does it still run? "
                          "asking its nodes again; at most {} s more",
                          job_id, renewed_ago.count() / 1000.0,
                          std::chrono::ceil<std::chrono::seconds>(next - Steady::now()).count()));
    while (Steady::now() < next && !stop_requested()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  discovery->stop();
  return ended.size();
}

// Whether every node listens on this machine's loopback (the devnet, tests).
static bool all_on_this_host(const std::vector<solvernet::v1::NodeInfo>& nodes) {
  for (const auto& n : nodes) {
    const std::string host = n.address().substr(0, n.address().rfind(':'));
    if (host != "127.0.0.1" && host != "localhost" && host != "[::1]") return false;
  }
  return !nodes.empty();
}

std::filesystem::path default_client_key_path() {
  const char* home = std::getenv("HOME");
  return std::filesystem::path(home && *home ? home : ".") / ".solvernet" / "client.key";
}

Result<nlohmann::json> run_job_on_nodes(const RunSpec& spec, const std::vector<solvernet::v1::NodeInfo>& nodes) {
  const auto& job = spec.job;
  auto key = NodeKey::load_or_create_file(spec.client_key.empty() ? default_client_key_path() : spec.client_key);
  if (!key.ok()) return input_error("client key: {}", key.message());
  sched::PlacementRequest request;
  request.job = job;
  request.topology = spec.topology;
  request.emulate = spec.emulate;
  request.algo = spec.algo;
  request.seed = spec.plan_seed;
  request.time_dilation = spec.time_dilation;
  // No topology: plan from the links the nodes measured, if they announce any.
  request.measured_links = spec.algo != "naive" && (spec.plan_from_probes || (!spec.topology && net::any_link_estimates(nodes)));
  if (request.measured_links && !spec.topology) {
    // Planning measures compute on the whole model here (check_run_inputs checks it only with a topology).
    const double bytes = job.training_memory_bytes();
    if (auto fits = check_memory_for(bytes >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(bytes), "planning the job");
        !fits.ok()) {
      spdlog::warn("not planning from measured links ({}); placing nodes in id order", fits.message());
      request.measured_links = false;
    }
  }
  if (spec.plan_from_probes && !net::any_link_estimates(nodes))
    spdlog::warn("no node announces measured links yet: every pair is planned as {:g} ms / {:g} Mbps",
                 net::kUnmeasuredLink.latency_ms, net::kUnmeasuredLink.bandwidth_mbps);
  // Nodes that all run on this host share its cores: compute is measured with
  // as many processes competing as will compete in the job (host_corunners.h),
  // started at the first measurement and stopped once the placement is made.
  std::optional<HostCoRunners> corunners;
  bool placing = true;
  const int workers = static_cast<int>(job.parallel.stages * job.parallel.replicas);
  auto share_the_host = [&] {
    if (corunners || !placing || !all_on_this_host(nodes)) return;
    auto started = HostCoRunners::start(corunners_for(workers, std::thread::hardware_concurrency()),
                                        job_to_toml(job), 60);
    if (!started.ok()) spdlog::warn("measuring compute without co-runners: {}", started.message());
    else corunners = std::move(started).value();
  };
  sched::Measurements measure;
  measure.microbatch_seconds = [&](const JobConfig& j) { share_the_host(); return train::measure_microbatch_seconds(j); };
  measure.step_update_seconds = [&](const JobConfig& j) { share_the_host(); return train::measure_step_update_seconds(j); };
  measure.message_cost = [&](size_t small, size_t large) { share_the_host(); return net::measure_message_cost(small, large); };
  // Spares: the placement chooses the nodes it needs; the others found are
  // kept idle for replacements (pinged when taken, not leased).
  SN_ASSIGN(sched::Placement placement, sched::place_job(request, nodes, measure));
  placing = false;
  corunners.reset();
  if (!spec.quiet) sched::print_placement(placement, std::cerr);
  if (!placement.unmeasured.empty())
    spdlog::warn("{} node pair(s) announce no measured link and were planned as {:g} ms / {:g} Mbps: {}",
                 placement.unmeasured.size(), net::kUnmeasuredLink.latency_ms, net::kUnmeasuredLink.bandwidth_mbps,
                 fmt::join(placement.unmeasured, ", "));

  train::DistributedOptions options;
  if (spec.topology) {
    options.topology_toml = topology_to_toml(*spec.topology);
    options.scale = placement.scale;
  }
  options.model_out = spec.model_out;
  options.initial_weights = spec.initial_weights;
  options.cancel = &install_stop_handlers();
  options.client_key = &*key;
  options.peer_timeout = std::chrono::seconds(spec.peer_timeout_s);
  options.chain_job_id = spec.chain_job_id;
  {
    std::vector<solvernet::v1::NodeInfo> member_infos;
    for (const auto& node : nodes)
      if (std::any_of(placement.members.begin(), placement.members.end(),
                      [&](const net::MemberInfo& m) { return m.node_id == node.node_id(); }))
        member_infos.push_back(node);
    options.peer_rtt_ms = net::slowest_rtt_ms(member_infos);
  }
  // The job id is chosen here so the summary can name it (verifiers ask the nodes for it).
  options.job_id = !spec.job_id.empty()
                       ? spec.job_id
                       : fmt::format("{}-{}", job.name, std::chrono::duration_cast<std::chrono::milliseconds>(
                                                            std::chrono::system_clock::now().time_since_epoch()).count());
  std::set<std::string> placed;
  for (const auto& member : placement.members) placed.insert(member.node_id);
  std::shared_ptr<IdleNodeWatch> idle_watch;  // stopped as the job ends
  DirLock job_dir_lock;  // held until the job ends (a --resume's is held by the train command)
  if (!spec.job_dir.empty()) {
    options.recovery.job_dir = spec.job_dir / options.job_id;
    if (spec.resume) {
      options.recovery.job_dir = spec.job_dir;  // --resume names the job's own dir
    } else {
      SN_ASSIGN(job_dir_lock, DirLock::acquire(options.recovery.job_dir, "job dir"));
    }
    for (const auto& node : nodes)
      if (!placed.count(node.node_id()) && options.recovery.spares.size() < static_cast<size_t>(spec.spares))
        options.recovery.spares.push_back(member_of_node(node));
    options.recovery.spare_wait = std::chrono::seconds(spec.spare_wait_s);
    options.recovery.resume_step = spec.resume_step;
    options.recovery.resumed_losses = spec.resumed_losses;
    options.recovery.resume_replanned = spec.resume_replanned;
    options.recovery.corpus = spec.resumed_corpus;
    options.recovery.planned_replicas = spec.planned_replicas;
    options.recovery.kill_self_at_mirror = spec.kill_self_at_mirror;
    options.recovery.kill_self_at_relayout = spec.kill_self_at_relayout;
    options.recovery.layout = spec.resume_layout;
    options.recovery.layout_replicas = spec.layout_replicas;
    options.recovery.job_dir_full_at_mirror = spec.job_dir_full_at_mirror;
    // Nodes that joined (or came back) since the job began are found through the DHT.
    // (A member that died and came back with its data dir is one of them; the
    // client leaves out its current members itself.)
    // One DHT node for the whole job (joining anew at every look cost 1–2 s
    // of each poll), looked through by a thread of its own from the job's
    // start: the training loop takes its newest list at once.
    if (!spec.bootstrap.empty()) {
      std::vector<solvernet::v1::NodeInfo> unplaced;
      for (const auto& node : nodes)
        if (!placed.count(node.node_id())) unplaced.push_back(node);
      idle_watch = std::make_shared<IdleNodeWatch>(spec.bootstrap, std::move(unplaced));
      options.recovery.find_spares = [idle_watch] { return idle_watch->latest(); };
    }
  }
  ProgressLine progress(spec.quiet, spec.job);
  // A step run again after a recovery keeps its last run's time.
  std::vector<double> step_seconds(static_cast<size_t>(std::max<int64_t>(0, job.train.steps)), std::nan(""));
  options.progress = [&](const train::StepReport& r) {
    progress(r);
    if (r.step >= 1 && r.step <= static_cast<int64_t>(step_seconds.size()))
      step_seconds[static_cast<size_t>(r.step - 1)] = r.step_seconds;
    if (spec.on_step) spec.on_step(r);
  };
  auto ran = train::run_distributed(job, placement.members, options);
  if (idle_watch) idle_watch->stop();
  SN_ASSIGN(auto result, std::move(ran));
  // "nodes" counts the nodes the job ran on; the others seen (perhaps dead) are "nodes_seen".
  std::set<std::string> used;
  for (const auto& member : placement.members) used.insert(member.node_id);
  for (const auto& id : result.member_node_ids) used.insert(id);
  nlohmann::json summary = summary_of(spec, result, static_cast<int>(used.size()));
  summary["job_id"] = options.job_id;
  summary["step_seconds"] = step_seconds;
  summary["nodes_seen"] = nodes.size();
  summary["placement"] = placement.to_json();
  // After a recovery the roles are held by the final members (settlement pays them).
  // (Not after a re-plan: the roles were renumbered; member_node_ids lists the final members.)
  const bool replanned = std::any_of(result.recoveries.begin(), result.recoveries.end(),
                                     [](const auto& r) { return r.replicas_after != r.replicas_before; });
  if (!result.recoveries.empty() && !replanned && summary["placement"].contains("stages"))
    for (size_t i = 0; i < placement.members.size() && i < result.member_node_ids.size(); ++i) {
      auto& stages = summary["placement"]["stages"];
      const auto s = static_cast<size_t>(placement.members[i].stage), r = static_cast<size_t>(placement.members[i].replica);
      if (s < stages.size() && r < stages[s].size()) stages[s][r]["node_id"] = result.member_node_ids[i];
    }
  summary["emulate"] = placement.emulate;
  summary["time_dilation"] = placement.scale.time_dilation;
  summary["byte_ratio"] = placement.scale.byte_ratio;
  summary["gradient_byte_ratio"] = placement.scale.gradient_byte_ratio;
  summary["topology"] = spec.topology ? spec.topology->name : "";
  if (!options.recovery.job_dir.empty()) {
    nlohmann::json recoveries = nlohmann::json::array();
    for (const auto& r : result.recoveries)
      recoveries.push_back({{"kind", r.replicas_after > r.replicas_before   ? "grow-back"
                                     : r.replicas_after < r.replicas_before ? "re-plan"
                                                                            : "replacement"},
                            {"failed_step", r.failed_step}, {"restored_step", r.restored_step}, {"dead", r.dead},
                            {"replacements", r.replacements}, {"seconds", r.seconds},
                            {"redone_steps", r.redone_steps}, {"aqsgd_buffers", r.aqsgd},
                            {"replicas_before", r.replicas_before}, {"replicas_after", r.replicas_after},
                            {"replanned", r.replicas_after == r.replicas_before
                                              ? ""
                                              : fmt::format("re-planned from {} to {} replicas", r.replicas_before,
                                                            r.replicas_after)}});
    summary["recovery"] = {{"job_dir", std::filesystem::absolute(result.job_dir).string()},
                           {"spares_asked", spec.spares},
                           {"spares_at_start", options.recovery.spares.size()},
                           {"idle_spares", result.idle_spares},
                           {"recoveries", recoveries},
                           {"replicas_at_end", result.recoveries.empty() ? spec.job.parallel.replicas
                                                                         : result.recoveries.back().replicas_after},
                           {"placement_at_end", placement_at_end(result, spec.job.parallel.stages)},
                           {"resumed_from", result.resumed_from},
                           {"mirror_s", result.mirror_seconds},
                           {"mirror_bytes", result.mirror_bytes}};
  }
  return summary;
}

Result<nlohmann::json> run_job_locally(const RunSpec& spec) {
  train::LocalOptions options;
  options.model_out = spec.model_out;
  options.initial_weights = spec.initial_weights;
  options.cancel = &install_stop_handlers();
  ProgressLine progress(spec.quiet, spec.job);
  options.progress = [&](const train::StepReport& r) { progress(r); };
  SN_ASSIGN(auto result, train::run_local(spec.job, options));
  nlohmann::json summary = summary_of(spec, result, 1);
  summary["stages"] = 1;
  summary["replicas"] = 1;
  return summary;
}

void print_summary_table(const nlohmann::json& s) {
  auto row = [](const std::string& k, const std::string& v) { std::cout << fmt::format("  {:<22} {}\n", k, v); };
  std::cout << "\n";
  row("job", s.value("job", ""));
  row("nodes", fmt::format("{} ({} stages × {} replicas)", s.value("nodes", 0), s.value("stages", 0), s.value("replicas", 0)));
  row("steps", std::to_string(s.value("steps", 0)));
  row("loss", fmt::format("{:.4f} → {:.4f}", s.value("loss_first", 0.0), s.value("loss_last", 0.0)));
  if (s.contains("holdout_loss") && s["holdout_loss"].is_number())
    row("held-out loss", fmt::format("{:.4f}", s["holdout_loss"].get<double>()));
  row("tokens/s", fmt::format("{:.0f}", s.value("tokens_per_s", 0.0)));
  row("wall time", fmt::format("{:.1f} s (+{:.1f} s setup)", s.value("wall_s", 0.0), s.value("setup_s", 0.0)));
  row("bytes between stages", megabytes(s.value("bytes_pipeline", int64_t{0})));
  row("bytes between replicas", megabytes(s.value("bytes_data_parallel", int64_t{0})));
  if (s.contains("compression")) {
    const auto& c = s["compression"];
    std::string activations = c.value("activations", "none");
    if (activations == "quant" || activations == "aqsgd")
      activations += fmt::format(" fw{}/bw{}", c.value("forward_bits", 0), c.value("backward_bits", 0));
    std::string gradients = c.value("gradients", "none");
    if (gradients == "cocktail")
      gradients += fmt::format(" {} bits, {:g} × {:g}", c.value("gradient_bits", 0), c.value("random_fraction", 0.0),
                               c.value("topk_fraction", 0.0));
    row("compression", fmt::format("activations {}, gradients {}", activations, gradients));
  }
  if (s.contains("steady_state") && s["steady_state"].value("steps", int64_t{0}) > 0) {
    const auto& st = s["steady_state"];
    const auto steps = static_cast<double>(st["steps"].get<int64_t>());
    row("steady state", fmt::format("from step {}: {} between stages, {} between replicas per step",
                                    st["first_step"].get<int64_t>(),
                                    megabytes(static_cast<int64_t>(st["bytes_pipeline"].get<double>() / steps)),
                                    megabytes(static_cast<int64_t>(st["bytes_data_parallel"].get<double>() / steps))));
  }
  if (s.contains("bytes_by_link_class"))
    for (auto& [cls, bytes] : s["bytes_by_link_class"].items())
      row("bytes on " + cls + " links", megabytes(bytes.get<int64_t>()));
  if (s.contains("emulate") && !s["emulate"].get<std::string>().empty()) {
    const std::string emulate = s["emulate"].get<std::string>(), topology = s.value("topology", "");
    if (emulate == "none")
      row("links", "not emulated (loopback)");
    else
      row("links", fmt::format("{}{} (T = {:.3g}, R = {:.3g})", topology.empty() ? "" : topology + " ", emulate,
                               s.value("time_dilation", 1.0), s.value("byte_ratio", 1.0)));
  }
  if (s.contains("recovery")) {
    const auto& r = s["recovery"];
    row("spares", fmt::format("{} at start, {} idle at the end", r.value("spares_at_start", 0),
                              r["idle_spares"].size()));
    for (const auto& rec : r["recoveries"]) {
      const std::string replanned = rec.value("replanned", "");
      row("recovery", fmt::format("{} at step {}: {} dead, {} replaced{}, restarted from step {} in {:.1f} s (AQ-SGD buffers: {})",
                                  rec.value("kind", "recovery"), rec["failed_step"].get<int64_t>(), rec["dead"].size(), rec["replacements"].size(),
                                  replanned.empty() ? "" : ", " + replanned, rec["restored_step"].get<int64_t>(),
                                  rec["seconds"].get<double>(), rec["aqsgd_buffers"].get<std::string>()));
    }
    if (r.value("resumed_from", int64_t{0}) > 0) row("resumed from", fmt::format("step {}", r["resumed_from"].get<int64_t>()));
    const std::string job_dir = r.value("job_dir", "");
    row("job dir", job_dir.empty() ? "not kept (it was in the devnet's temp dir; --keep keeps it)" : job_dir);
  }
  if (s.contains("privacy")) {
    const auto& p = s["privacy"];
    std::string text;
    if (p.value("secure_aggregation", false))
      text += fmt::format("secure aggregation (t = {})", p.value("threshold", 0));
    if (p.contains("epsilon"))
      text += fmt::format("{}DP-SGD ε = {:.3f} at δ = {:g} (σ = {:.4g}, C = {:g}, q = {:.4g})", text.empty() ? "" : ", ",
                          p["epsilon"].get<double>(), p.value("delta", 0.0), p.value("noise_multiplier", 0.0),
                          p.value("clip_norm", 0.0), p.value("sample_rate", 0.0));
    row("privacy", text);
  }
  if (!s.value("model_path", std::string()).empty()) row("model", s["model_path"].get<std::string>());
  std::cout << std::flush;
}

}  // namespace sn::cli
