#include "net/node_runtime.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <utility>

#include "core/fs.h"
#include "net/control.h"
#include "net/rpc.h"

namespace sn::net {
namespace {

using SteadyClock = std::chrono::steady_clock;
constexpr uint64_t kSequenceWindow = 1024;
constexpr int64_t kMiB = 1 << 20;
constexpr auto kDiskCheckEvery = std::chrono::seconds(2);

// Whether DIR takes a write of 1 MiB now (written whole, then removed).
bool takes_a_write(const std::filesystem::path& dir) {
  const auto path = dir / ".disk-check";
  const bool written = write_file_atomic(path, std::string(kMiB, '\0')).ok();
  std::error_code ignored;
  std::filesystem::remove(path, ignored);
  return written;
}

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int64_t memory_default_limit_bytes() {
  int64_t available = 0;
  std::ifstream meminfo("/proc/meminfo");
  std::string name;
  int64_t value = 0;
  std::string unit;
  while (meminfo >> name >> value >> unit)
    if (name == "MemAvailable:") {
      available = value * 1024;
      break;
    }
  return std::max<int64_t>(256 * kMiB, available - 512 * kMiB);
}

std::string format_bytes(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (bytes >= (int64_t{1} << 30)) return fmt::format("{:.1f} GiB", b / static_cast<double>(int64_t{1} << 30));
  if (bytes >= kMiB) return fmt::format("{:.0f} MiB", b / static_cast<double>(kMiB));
  return fmt::format("{:.0f} KiB", b / 1024.0);
}

class NodeRuntime::NodeServiceImpl final : public solvernet::v1::Node::Service {
 public:
  explicit NodeServiceImpl(const NodeRuntimeOptions& options) : options_(options) {}

  grpc::Status Ping(grpc::ServerContext*, const solvernet::v1::PingRequest*,
                    solvernet::v1::PingReply* reply) override {
    reply->set_node_id(options_.key->node_id());
    reply->set_received_at_us(now_us());
    return grpc::Status::OK;
  }

  grpc::Status GetInfo(grpc::ServerContext*, const solvernet::v1::Empty*,
                       solvernet::v1::SignedNodeInfo* reply) override {
    if (!options_.signed_info) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no node info");
    *reply = options_.signed_info();
    return grpc::Status::OK;
  }

 private:
  const NodeRuntimeOptions& options_;
};

NodeRuntime::NodeRuntime(NodeRuntimeOptions options) : options_(std::move(options)) {
  memory_limit_ = options_.memory_limit_bytes > 0 ? options_.memory_limit_bytes : memory_default_limit_bytes();
  node_service_ = std::make_unique<NodeServiceImpl>(options_);
  services_.push_back(node_service_.get());
}

NodeRuntime::~NodeRuntime() {
  shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

void NodeRuntime::add_service(grpc::Service* service) { services_.push_back(service); }

Status NodeRuntime::start(const std::string& listen) {
  SN_ASSIGN(auto running, start_server(listen, services_, *options_.key));
  server_ = std::move(running.server);
  port_ = running.port;
  reaper_ = std::thread([this] { reaper_loop(); });
  return ok_status();
}

void NodeRuntime::shutdown(std::chrono::system_clock::time_point deadline) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  wake_.notify_all();
  // Handlers blocked on a job (a step waiting for its peers' messages) wake
  // when the job is dropped; Server::Shutdown waits for every handler.
  std::vector<std::pair<std::string, std::function<void(const std::string&)>>> held;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [id, job] : jobs_)
      if (job.held && job.on_expire) held.emplace_back(id, std::exchange(job.on_expire, nullptr));
  }
  for (auto& [id, on_expire] : held) {
    spdlog::info("job {}: dropped, the node is stopping", id);
    on_expire("the node is stopping");
    release(id);
  }
  if (server_) server_->Shutdown(deadline);
  if (reaper_.joinable()) reaper_.join();
}

Result<PublicKey> NodeRuntime::authorize(const std::string& job_id, const std::string& method,
                                         const solvernet::v1::ControlAuth& auth, const Hash256& digest,
                                         bool record) {
  auto refuse = [&](const std::string& why, solvernet::v1::Refusal::Cause cause = {}) -> Error {
    spdlog::warn("refused {} for job {}: {}", method, job_id, why);
    Error error = kind_error(ErrorKind::permission_denied, "{} refused: {}", method, why);
    if (cause != solvernet::v1::Refusal::CAUSE_UNSPECIFIED) {
      solvernet::v1::Refusal refusal;
      refusal.set_cause(cause);
      error.details = refusal.SerializeAsString();
    }
    return error;
  };
  if (auth.client_public_key().empty() && auth.signature().empty())
    return refuse("the request is unsigned (no ControlAuth)");
  if (auth.client_public_key().size() != 32)
    return refuse(fmt::format("client_public_key has {} bytes, expected 32", auth.client_public_key().size()));
  PublicKey key;
  std::copy(auth.client_public_key().begin(), auth.client_public_key().end(), key.begin());
  if (!verify_signature(key, digest, as_bytes(auth.signature())))
    return refuse(fmt::format("bad signature by client {}", node_id_of(key).substr(0, 8)));
  const int64_t skew_ms = auth.time_ms() - unix_ms_now();
  if (std::abs(skew_ms) > options_.control_window.count())
    return refuse(fmt::format("stale request: signed {:.0f} s {} this node's clock (window ±{} s)",
                              std::abs(static_cast<double>(skew_ms)) / 1000.0, skew_ms < 0 ? "behind" : "ahead of",
                              options_.control_window.count() / 1000));
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) {
    // A job id this node has not seen: it belongs to the first key that signs for it.
    it = jobs_.emplace(job_id, JobRecord{}).first;
    it->second.owner = key;
  }
  JobRecord& job = it->second;
  if (job.owner != key)
    return refuse(fmt::format("job {} belongs to client {}, not to client {}", job_id,
                              node_id_of(job.owner).substr(0, 8), node_id_of(key).substr(0, 8)),
                  solvernet::v1::Refusal::OTHER_CLIENT);
  const uint64_t sequence = auth.sequence();
  if (sequence < job.taken_over_sequence)
    return refuse(fmt::format("job {} was taken over by another client with its key (a resume of its stopped run)",
                              job_id),
                  solvernet::v1::Refusal::TAKEN_OVER);
  const bool seen = std::find(job.recent_sequences.begin(), job.recent_sequences.end(), sequence) !=
                    job.recent_sequences.end();
  if (seen || sequence + kSequenceWindow <= job.highest_sequence)
    return refuse(fmt::format("replayed request: sequence {} was used before (highest so far {})", sequence,
                              job.highest_sequence));
  if (!record) return key;
  record_sequence(job, sequence);
  const auto lease = job.lease.count() > 0 ? job.lease : options_.lease;
  if (job.held) job.lease_until = SteadyClock::now() + lease;
  job.forget_after = SteadyClock::now() + lease + 2 * options_.control_window;
  return key;
}

std::optional<NodeRuntime::Renewal> NodeRuntime::last_renewal(const std::string& job_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || !it->second.held) return std::nullopt;
  const JobRecord& job = it->second;
  return Renewal{std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - (job.lease_until - job.lease)),
                 job.lease};
}

void NodeRuntime::taken_over(const std::string& job_id, uint64_t sequence) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  record_sequence(it->second, sequence);
  it->second.taken_over_sequence = std::max(it->second.taken_over_sequence, sequence);
}

void NodeRuntime::record_sequence(JobRecord& job, uint64_t sequence) {
  job.highest_sequence = std::max(job.highest_sequence, sequence);
  job.recent_sequences.push_back(sequence);
  std::erase_if(job.recent_sequences, [&](uint64_t s) { return s + kSequenceWindow <= job.highest_sequence; });
}

Status NodeRuntime::admit(const std::string& job_id, const PublicKey& owner, int64_t memory_bytes,
                          const std::string& what, std::function<void(const std::string& why)> on_expire,
                          std::chrono::milliseconds lease) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t admitted = 0;
    for (const auto& [id, job] : jobs_)
      if (job.held && id != job_id) admitted += job.memory_bytes;
    auto it = jobs_.find(job_id);
    if (it != jobs_.end() && it->second.owner != owner)
      return kind_error(ErrorKind::permission_denied, "job {} belongs to another client", job_id);
    const int64_t free_bytes = std::max<int64_t>(0, memory_limit_ - admitted);
    if (memory_bytes > free_bytes) {
      std::string held = admitted > 0 ? fmt::format(" ({} of its {} are held by other jobs)", format_bytes(admitted),
                                                    format_bytes(memory_limit_))
                                      : "";
      spdlog::warn("refused job {}: needs ~{} for {}, {} free", job_id, format_bytes(memory_bytes), what,
                   format_bytes(free_bytes));
      return kind_error(ErrorKind::resource_exhausted, "job needs ~{} for {}, this node admits {}{}",
                        format_bytes(memory_bytes), what, format_bytes(free_bytes), held);
    }
    JobRecord& job = jobs_[job_id];
    job.owner = owner;
    job.held = true;
    job.memory_bytes = memory_bytes;
    job.admitted_seq = ++admissions_;
    job.lease = lease.count() > 0 ? lease : options_.lease;
    job.lease_until = SteadyClock::now() + job.lease;
    job.forget_after = job.lease_until + 2 * options_.control_window;
    job.on_expire = std::move(on_expire);
  }
  wake_.notify_all();
  notify_change();
  return ok_status();
}

void NodeRuntime::release(const std::string& job_id) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || !it->second.held) return;
    it->second.held = false;
    it->second.memory_bytes = 0;
    it->second.on_expire = nullptr;
    it->second.forget_after = SteadyClock::now() + 2 * options_.control_window;
  }
  notify_change();
}

HeldJobs NodeRuntime::held() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<int64_t, std::string>> order;
  HeldJobs out;
  out.memory_limit_bytes = memory_limit_;
  for (const auto& [id, job] : jobs_)
    if (job.held) {
      order.emplace_back(job.admitted_seq, id);
      out.memory_admitted_bytes += job.memory_bytes;
    }
  std::sort(order.begin(), order.end());
  for (auto& [seq, id] : order) out.job_ids.push_back(id);
  return out;
}

void NodeRuntime::report_disk_full() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (options_.data_dir.empty() || disk_full_) return;
    disk_full_ = true;
    next_disk_check_ = SteadyClock::now() + kDiskCheckEvery;
  }
  wake_.notify_all();
  notify_change();
}

bool NodeRuntime::disk_full() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return disk_full_;
}

void NodeRuntime::notify_change() {
  if (options_.on_jobs_change) options_.on_jobs_change();
}

void NodeRuntime::reaper_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (disk_full_ && next_disk_check_ <= SteadyClock::now()) {
      lock.unlock();
      const bool writable = takes_a_write(options_.data_dir);
      lock.lock();
      next_disk_check_ = SteadyClock::now() + kDiskCheckEvery;
      if (writable && disk_full_) {
        disk_full_ = false;
        lock.unlock();
        notify_change();
        lock.lock();
      }
      continue;
    }
    auto now = SteadyClock::now();
    auto next = disk_full_ ? std::min(now + std::chrono::seconds(1), next_disk_check_) : now + std::chrono::seconds(1);
    struct Expired {
      std::string id;
      std::function<void(const std::string& why)> on_expire;
      std::chrono::milliseconds lease;
    };
    std::vector<Expired> expired;
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      JobRecord& job = it->second;
      if (job.held && job.lease_until <= now) {
        expired.push_back({it->first, std::move(job.on_expire), job.lease});
        job.on_expire = nullptr;
      } else if (job.held) {
        next = std::min(next, job.lease_until);
      } else if (job.forget_after <= now) {
        it = jobs_.erase(it);
        continue;
      }
      ++it;
    }
    if (!expired.empty()) {
      lock.unlock();
      for (auto& [id, on_expire, lease] : expired) {
        spdlog::warn("job {}: lease of {} s ran out (the client stopped renewing it); dropping the job", id,
                     std::chrono::duration<double>(lease).count());
        if (on_expire) on_expire(kLeaseRanOut);
        release(id);
      }
      lock.lock();
      continue;
    }
    wake_.wait_until(lock, next);
  }
}

}  // namespace sn::net
