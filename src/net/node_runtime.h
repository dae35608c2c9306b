// The node runtime: one gRPC server per node process. It serves the Node
// service itself (Ping, GetInfo), hosts every module's own grpc::Service
// (training now; verification, inference later), admits jobs by memory and
// holds each one under a lease that its owner renews. Modules call it; it
// knows nothing of them.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/hash.h"
#include "core/keys.h"
#include "core/result.h"
#include "proto/solvernet.grpc.pb.h"

namespace sn::net {

struct NodeRuntimeOptions {
  const NodeKey* key = nullptr;                       // this node's identity; must outlive the runtime
  int64_t memory_limit_bytes = 0;                     // budget for admitted jobs (≤ 0: memory_default_limit_bytes())
  std::chrono::milliseconds lease{30000};             // a job not renewed within this is dropped
  std::chrono::milliseconds control_window{60000};    // signed requests older or newer than this are refused
  std::function<solvernet::v1::SignedNodeInfo()> signed_info;  // for GetInfo (empty: UNIMPLEMENTED)
  // Runs (without the runtime's lock) after a job is admitted or released,
  // and when disk_full() changes.
  std::function<void()> on_jobs_change;
  // This node's data dir, where a write is tried every 2 s while its disk is
  // full (report_disk_full). Empty: a full disk is not remembered.
  std::filesystem::path data_dir;
};

// Memory this machine has available now (MemAvailable), less a 512 MiB margin
// for the node process itself, at least 256 MiB.
int64_t memory_default_limit_bytes();
// "1.9 GiB", "512 MiB".
std::string format_bytes(int64_t bytes);

// What the node holds now (for its DHT announcement and tests).
struct HeldJobs {
  std::vector<std::string> job_ids;  // newest admission last
  int64_t memory_admitted_bytes = 0;
  int64_t memory_limit_bytes = 0;
};

// The reason on_expire gets when a job's lease ran out (rather than the node stopping).
inline constexpr const char* kLeaseRanOut = "the client's lease ran out";

class NodeRuntime {
 public:
  explicit NodeRuntime(NodeRuntimeOptions options);
  ~NodeRuntime();  // shuts the server down and stops the lease reaper
  NodeRuntime(const NodeRuntime&) = delete;
  NodeRuntime& operator=(const NodeRuntime&) = delete;

  // Hosts SERVICE (not owned; must outlive the runtime). Only before start().
  void add_service(grpc::Service* service);
  // Listens on LISTEN ("host:port"; port 0 picks one) and starts the lease
  // reaper. Error (invalid_input) if the address is bad or the port taken.
  Status start(const std::string& listen);
  int port() const { return port_; }
  // Stops serving. Every held job is dropped first (its on_expire runs with
  // "the node is stopping"), so handlers blocked on a job's peers return at
  // once rather than at their own timeouts; other in-flight calls get until
  // DEADLINE. Idempotent.
  void shutdown(std::chrono::system_clock::time_point deadline);

  const NodeKey& key() const { return *options_.key; }
  std::chrono::milliseconds lease() const { return options_.lease; }
  int64_t memory_limit_bytes() const { return memory_limit_; }

  // Checks a signed control request for JOB_ID: a 32-byte key and a valid
  // signature over DIGEST, a time within the control window, and, if the job
  // is held (or was recently), the key that owns it and a sequence number not
  // used before (and not more than 1024 below the highest seen). A job id not
  // seen before becomes the signer's. Records the sequence and renews the
  // job's lease, unless RECORD is false (a takeover: checked first, recorded
  // by taken_over once accepted). Error kind permission_denied, saying why;
  // the caller's job is left untouched. Logged at warn. Its details carry a
  // Refusal where the client acts on it: OTHER_CLIENT (the job is another
  // key's), TAKEN_OVER (the request is older than a takeover of the job).
  Result<PublicKey> authorize(const std::string& job_id, const std::string& method,
                              const solvernet::v1::ControlAuth& auth, const Hash256& digest, bool record = true);

  // How long ago JOB_ID's lease was last renewed, and that lease; nullopt if
  // the job is not held.
  struct Renewal {
    std::chrono::milliseconds ago{0}, lease{0};
  };
  std::optional<Renewal> last_renewal(const std::string& job_id) const;
  // A client of JOB_ID's key took it over with the request of SEQUENCE (a
  // resume of its stopped run), authorized without being recorded: records
  // it, and refuses requests below SEQUENCE from now on as TAKEN_OVER, the
  // job's previous client's.
  void taken_over(const std::string& job_id, uint64_t sequence);

  // Reserves MEMORY_BYTES for JOB_ID owned by OWNER, under a lease of lease().
  // If JOB_ID is already held by OWNER, its reservation is replaced. Fails with
  // resource_exhausted naming the estimate and what is left ("job needs ~1.9
  // GiB for WHAT, this node admits 512 MiB"), permission_denied if another key
  // holds JOB_ID. ON_EXPIRE(why) runs on the reaper thread if the lease runs
  // out, or in shutdown() when the node stops; the job is released after it
  // returns. LEASE overrides lease() for this job
  // (zero: lease()); authorize() renews it by the same amount (an inference
  // session's idle timeout differs from a training job's lease).
  Status admit(const std::string& job_id, const PublicKey& owner, int64_t memory_bytes, const std::string& what,
               std::function<void(const std::string& why)> on_expire, std::chrono::milliseconds lease = {});
  // Frees JOB_ID's reservation (no-op if not held). Its owner and last
  // sequence are remembered for control_window, so old requests stay refused.
  void release(const std::string& job_id);
  HeldJobs held() const;

  // A module's write under the data dir failed with ENOSPC or EDQUOT (it
  // logs why): disk_full() is true until a write of 1 MiB there succeeds
  // again (tried every 2 s), so the node does not offer itself for jobs
  // whose checkpoints it cannot write. on_jobs_change runs when it changes.
  void report_disk_full();
  bool disk_full() const;

 private:
  class NodeServiceImpl;
  struct JobRecord {
    PublicKey owner{};
    bool held = false;
    int64_t memory_bytes = 0;
    std::chrono::milliseconds lease{0};  // this job's lease (admit's, else the runtime's)
    int64_t admitted_seq = 0;  // admission order
    std::chrono::steady_clock::time_point lease_until, forget_after;
    uint64_t highest_sequence = 0;
    uint64_t taken_over_sequence = 0;  // requests below it are the previous client's (taken_over)
    std::vector<uint64_t> recent_sequences;  // accepted, within 1024 of highest
    std::function<void(const std::string& why)> on_expire;
  };
  void reaper_loop();
  static void record_sequence(JobRecord& job, uint64_t sequence);  // mutex_ held
  void notify_change();

  NodeRuntimeOptions options_;
  int64_t memory_limit_ = 0;
  std::unique_ptr<NodeServiceImpl> node_service_;
  std::vector<grpc::Service*> services_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  int64_t admissions_ = 0;
  std::map<std::string, JobRecord> jobs_;
  bool disk_full_ = false;
  std::chrono::steady_clock::time_point next_disk_check_;
  std::thread reaper_;
};

}  // namespace sn::net
