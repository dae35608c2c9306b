// What `solvernet train` and `solvernet devnet` share: finding nodes, placing
// the job on them, driving it with a live progress line, and summarising.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "net/topology.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"
#include "train/train.h"

namespace sn::cli {

struct RunSpec {
  JobConfig job;
  std::optional<Topology> topology;   // links to emulate (none: raw loopback)
  std::string emulate = "";            // "raw" | "scaled"; empty: the topology's own mode
  std::string algo = "ours";           // placement: ours | dtfm | random | naive
  uint64_t plan_seed = 1;
  std::filesystem::path model_out;
  std::filesystem::path initial_weights;
  bool quiet = false;                  // no progress line (e.g. --json)
  double time_dilation = 0;            // scaled links: use this T instead of measuring it
  // The client's Ed25519 key file (created on first use); it signs every
  // control request. Empty: ~/.solvernet/client.key.
  std::filesystem::path client_key;
  int peer_timeout_s = 60;             // how long nodes wait for a peer; the client's deadlines follow
  // Plan from the links the nodes measured (NodeInfo.links) even with a
  // topology (which then only sets the emulation). With no topology, measured
  // links are used whenever a node announces some.
  bool plan_from_probes = false;
  uint64_t chain_job_id = 0;           // the job on SolverMarket (0: none): the nodes commit there themselves
  // Recovery (docs/resilience.md). With a job dir the client
  // mirrors checkpoints there and replaces a member that dies by a spare.
  std::filesystem::path job_dir;       // empty: no recovery; a failure ends the job
  int spares = 0;                      // idle nodes kept beyond the plan (asked for, not required)
  std::vector<std::string> bootstrap;  // where to look for more spares mid-job (nodes that joined)
  int spare_wait_s = 0;                // how long a recovery waits for a spare to appear
  std::string job_id;                  // empty: name-<ms>; --resume: the stopped job's
  bool resume = false;                 // job_dir is a stopped job's own dir (--resume), not a parent
  int64_t resume_step = 0;             // --resume: the job dir's checkpoint step
  std::vector<double> resumed_losses;
  bool resume_replanned = false;       // --resume: the checkpoint predates a re-plan (state.json)
  int64_t planned_replicas = 0;        // --resume: the replicas the job was planned with (0: the job's)
  std::shared_ptr<const model::TokenizedCorpus> resumed_corpus;  // --resume: as read_job_dir prepared it
  int kill_self_at_mirror = 0;         // test: see RecoveryOptions::kill_self_at_mirror
  std::string kill_self_at_relayout;   // test: see RecoveryOptions::kill_self_at_relayout
  std::string resume_layout = "checkpoints";  // --resume: the job dir's checkpoint layout
  int64_t layout_replicas = 0;         // --resume: the replicas that layout holds (job.parallel.replicas may be fewer)
  int job_dir_full_at_mirror = 0;      // test: see RecoveryOptions::job_dir_full_at_mirror
  // Called after every step with the job's current members (the devnet's hidden kill switch).
  std::function<void(const train::StepReport&)> on_step;
};

// Limits of --time-dilation (0: measure it); T stretches every emulated time.
inline constexpr double kMinTimeDilation = 1e-4;
inline constexpr double kMaxTimeDilation = 1e4;

// Checks every input of SPEC that the job file does not (--out's directory, the
// --init weights against the job's model, the corpus, --time-dilation, --algo,
// --emulate) and, where this process builds the whole model (LOCAL, --init, compute
// measurement), that it fits in memory; a mistake is an input error (exit 2) before
// any node is started or contacted.
Status check_run_inputs(const RunSpec& spec, bool local);

// The client key file used when none is given: ~/.solvernet/client.key (the
// current directory's .solvernet if HOME is unset).
std::filesystem::path default_client_key_path();

// Waits until at least WANT idle nodes are visible via BOOTSTRAP and answer a
// ping (or TIMEOUT): listed nodes that do not answer are left out. With ENOUGH
// (0 < ENOUGH < WANT), once ENOUGH live nodes are found it waits at most GRACE
// more for the rest, then returns those (ENOUGH or more). SHOW_WAIT: while too
// few are idle, a live line on stderr says how many are, which jobs hold the
// busy ones, and how long the wait lasts at most. Errors: unavailable if no
// bootstrap answered within BOOTSTRAP_TIMEOUT (capped by TIMEOUT) or too few
// nodes are live, invalid_input if the bootstrap host does not resolve.
Result<std::vector<solvernet::v1::NodeInfo>> discover_nodes(
    const std::vector<std::string>& bootstrap, size_t want, std::chrono::milliseconds timeout,
    std::chrono::milliseconds bootstrap_timeout = std::chrono::milliseconds(5000), size_t enough = 0,
    std::chrono::milliseconds grace = std::chrono::milliseconds(0), bool show_wait = false);

// --resume (docs/resilience.md): the nodes listed via BOOTSTRAP that still
// hold JOB_ID (the leases of a client that was killed) are sent a takeover
// EndJob, signed with the key in CLIENT_KEY (the job's owner), so that
// discovery need not wait for those leases to run out. A node whose lease
// was renewed within half a lease is asked again once that renewal is older
// (SHOW_WAIT: a live line says so). Returns how many ended it. Errors
// (invalid_input, exit 2): the nodes hold the job for another key; its
// client still renews the lease (a live client); else the key cannot be read,
// no bootstrap answered within TIMEOUT (as discover_nodes), or aborted on a
// stop signal.
Result<size_t> end_stopped_run(const std::vector<std::string>& bootstrap, const std::string& job_id,
                               const std::filesystem::path& client_key, std::chrono::milliseconds timeout,
                               bool show_wait = false);

// Waits until each of NODES announces a measured link (NodeInfo.links) to
// every other one, or TIMEOUT passes, and returns their newest announcements
// (a node no longer listed keeps the one given). Pairs still unmeasured are
// left to the planner (net::kUnmeasuredLink, with a warning). Errors: the DHT
// cannot be joined (as discover_nodes).
Result<std::vector<solvernet::v1::NodeInfo>> wait_for_link_estimates(const std::vector<std::string>& bootstrap,
                                                                     std::vector<solvernet::v1::NodeInfo> nodes,
                                                                     std::chrono::milliseconds timeout);

// The CANDIDATES that answer a Ping within TIMEOUT with their own node id.
std::vector<solvernet::v1::NodeInfo> live_nodes(const std::vector<solvernet::v1::NodeInfo>& candidates,
                                                std::chrono::milliseconds timeout);

// Places the job on NODES and runs it; returns the summary JSON (docs/cli.md).
// Nodes beyond the plan, up to SPEC.spares, are the job's spares.
Result<nlohmann::json> run_job_on_nodes(const RunSpec& spec, const std::vector<solvernet::v1::NodeInfo>& nodes);
// The same job in this process (the reference).
Result<nlohmann::json> run_job_locally(const RunSpec& spec);

// Prints the closing table of a summary to stdout.
void print_summary_table(const nlohmann::json& summary);

}  // namespace sn::cli
