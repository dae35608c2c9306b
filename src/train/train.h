// Training, the public face: the node-side gRPC service that runs pipeline
// stages, the client that drives a distributed job, and the single-process
// reference run. No LibTorch in this header, so the CLI compiles quickly.
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "core/job.h"
#include "core/keys.h"
#include "core/result.h"
#include "net/node_runtime.h"
#include "net/topology.h"
#include "net/delivery.h"

namespace sn::model {
struct TokenizedCorpus;
}

namespace sn::train {

// Pins LibTorch and OpenBLAS to one thread (determinism; many nodes share a machine).
void init_single_threaded();

// ---- the node side ----------------------------------------------------------

// A solver that cheats, for tests and the devnet (docs/verification.md,
// "Cheats"). Train-side strategies change what the worker computes, sends or
// reports; withhold is the Evidence service's (it refuses to serve).
struct Cheat {
  enum class Strategy {
    none,
    skip_steps,      // from from_step on: no optimizer update (state and leaves honest to that)
    less_data,       // from from_step on: half of each micro-batch's sequences left out of the loss
    perturb,         // at from_step: noise added to the weights after the update
    random_weights,  // never trains: random weights, leaves made up from random bytes
    lie_in_leaf,     // correct training; leaf of from_step altered
    wrong_op,        // at from_step: the stage's first block's forward output (micro-batch 0) offset by 1e-3
    equivocate,      // from from_step on: the activations sent are perturbed after computing
    withhold,        // the Evidence service refuses to serve (nothing changes here)
  };
  Strategy strategy = Strategy::none;
  // The first step it affects, 1-based (= the leaf index); 0: three quarters
  // into the job (at least step 1).
  int64_t from_step = 0;

  bool active() const { return strategy != Strategy::none; }
  // The resolved first step for a job of STEPS steps.
  int64_t first_step(int64_t steps) const;
};
// "skip-steps", "less-data", … and back; an unknown name is an input error
// listing the valid ones.
const char* cheat_name(Cheat::Strategy strategy);
Result<Cheat::Strategy> parse_cheat_strategy(std::string_view name);

struct NodeServiceOptions {
  net::NodeRuntime* runtime = nullptr;             // admission, leases, control auth; must outlive the service
  std::filesystem::path data_dir;                  // checkpoints go to data_dir/checkpoints/<job>
  std::chrono::milliseconds peer_timeout{60000};   // waiting for a peer's tensor, unless the job says
  net::DeliveryService* delivery = nullptr;        // routes the jobs' messages; must outlive the service
  Cheat cheat;                                     // none: an honest node
  // Tests only (node --kill-self-at CALL:N): N > 0, the node kills itself
  // (SIGKILL) on receiving its N-th request of kind CALL, so a member dies
  // exactly there. CALL: step (a training step), outer (a DiLoCo outer
  // step), eval (a forward-only step), setup, put-checkpoint, fetch-checkpoint.
  std::string kill_self_at_call;
  int kill_self_at_count = 0;
  // Tests only (node --stall-at CALL:N:MS): the node sleeps MS before
  // handling its N-th request of kind CALL (same kinds), as a slow or
  // overloaded member would, so a test can hold one member's call exactly there.
  std::string stall_at_call;
  int stall_at_count = 0;
  int64_t stall_at_ms = 0;
  // Tests only (node --disk-full-at CALL:N): from its N-th request of kind
  // CALL on, the node's data dir behaves as a full disk (one more file is
  // written whole, then writes fail with ENOSPC; core/fs.h).
  std::string disk_full_at_call;
  int disk_full_at_count = 0;
};

// The Train gRPC service: SetupJob, RunStep, FetchWeights, EndJob, RenewLease,
// each signed by the job's owner (net::NodeRuntime::authorize). A node holds
// any number of jobs that fit its memory budget, each under a lease; a job
// whose lease runs out is aborted and dropped (its checkpoints stay).
std::unique_ptr<grpc::Service> make_train_service(NodeServiceOptions options);

// Memory a node needs for one stage of a job, by part (bytes). An estimate
// from the job alone, made before anything is allocated.
struct StageMemory {
  int64_t weights = 0, gradients = 0, optimizer = 0, activations = 0, codec_buffers = 0, residuals = 0,
          overhead = 0;
  int64_t total = 0;
};
StageMemory estimate_stage_memory(const JobConfig& job, int stage, int first_layer, int layer_count,
                                  int64_t dataset_samples);

// ---- the client side --------------------------------------------------------

struct StepReport {
  int64_t step = 0;          // 1-based for display
  // The job's members as they stand (a recovery replaces some); valid during the callback.
  const std::vector<net::MemberInfo>* members = nullptr;
  int64_t steps = 0;
  double loss = 0;
  double step_seconds = 0;
  double tokens_per_s = 0;   // over the run so far
  std::map<std::string, int64_t> bytes_by_class;  // "intra"/"inter" → bytes, cumulative
  int64_t bytes_pipeline = 0;                     // cumulative
  int64_t bytes_data_parallel = 0;
  int64_t train_sequences = 0;                    // training-set size (DP's sample rate)
};

// One recovery from a member's failure (docs/resilience.md).
struct RecoveryReport {
  int64_t failed_step = 0;              // 1-based: the step that was running
  int64_t restored_step = 0;            // the checkpoint every member restarted from (steps done)
  std::vector<std::string> dead;        // member_name() of each member that stopped answering
  // The spare that took each dead member's role, same order; shorter than
  // dead when no spare was left and the job re-planned on fewer replicas.
  std::vector<std::string> replacements;
  // Replica groups before and after this recovery: equal unless it re-planned
  // (dropped the groups of the dead members it found no spare for). An entry
  // with no dead member grew a re-planned job back at the checkpoint of
  // failed_step = restored_step; replacements are the new groups' members.
  int64_t replicas_before = 0, replicas_after = 0;
  double seconds = 0;                   // detection to the first step after it, wall
  double redone_steps = 0;              // steps run again: failed_step - 1 - restored_step
  // AQ-SGD buffers of the pairs a replacement belongs to: "restored from the
  // checkpoint" (sender and receiver both roll back to the checkpoint's
  // buffers) or "none" (the job keeps none).
  std::string aqsgd;
};

struct TrainResult {
  std::vector<double> losses;          // per step
  int64_t train_sequences = 0;         // training-set size (DP's sample rate)
  double holdout_loss = 0;
  std::string holdout_loss_missing;    // why holdout_loss is NaN (not measured); empty if it was
  double tokens_per_s = 0;
  double wall_seconds = 0;             // the training steps alone
  double setup_seconds = 0;
  int64_t bytes_pipeline = 0;
  int64_t bytes_data_parallel = 0;
  std::map<std::string, int64_t> bytes_by_class;
  // Steady state: the training steps after every sample has passed once
  // (AQ-SGD sends a sample's first pass in full).
  int64_t first_steady_step = 0;       // 0-based; ≥ steps if the run never got there
  int64_t steady_steps = 0;
  int64_t steady_bytes_pipeline = 0;
  int64_t steady_bytes_data_parallel = 0;
  // Where a training step's time goes, summed over steps: the client's wall
  // time per step, and the nodes' own accounts (mean over members) of time
  // spent computing and waiting for peers inside RunStep.
  double step_seconds_total = 0;
  double node_compute_seconds_total = 0;
  double node_wait_seconds_total = 0;
  std::filesystem::path model_path;
  std::string model_hash;              // hex BLAKE2b of the saved weights file
  std::vector<std::string> stage_state_hashes;  // per stage: hex of replica 0's state hash after the last step
  // Per member (stage × replicas + replica): hex Keccak-256 Merkle root over
  // its step leaves 0 … n (docs/commitments.md, "Step leaves"): what a solver
  // commits on chain.
  std::vector<std::string> member_commitments;
  // A [verify] job on chain does not stop when a replica's weights differ from
  // replica 0's: each such member, once, "<member> diverged … after step t".
  std::vector<std::string> replica_divergences;
  // Recovery: what happened, the spares left idle at the end (node ids), the
  // job dir and, for a resumed job, the step it resumed from.
  std::vector<RecoveryReport> recoveries;
  std::vector<std::string> idle_spares;
  std::vector<std::string> member_node_ids;  // per member at the end (a recovery replaces some)
  std::filesystem::path job_dir;
  int64_t resumed_from = 0;
  double mirror_seconds = 0;           // spent fetching checkpoints into the job dir, wall
  int64_t mirror_bytes = 0;
  // The step deadline the client used last (ms), and what it came from: the
  // 95th percentile of recent step times (s) and the slowest measured round
  // trip between the members, or from the client to them (ms; 0: none).
  double step_deadline_ms = 0;
  double step_p95_seconds = 0;
  double rtt_ms = 0;
  // [diloco] jobs (docs/diloco.md).
  struct Diloco {
    int64_t outer_steps = 0;
    std::vector<int> dropped_groups;          // replica groups dropped, in the order they failed
    std::vector<int64_t> dropped_at_step;     // 1-based step each was dropped in
    // Outer steps run again among fewer groups after a group was lost during one.
    int64_t outer_retries = 0;
    // Dropped group slots that idle nodes filled again at an outer boundary,
    // and the steps done when each came back (it trains from the next one).
    std::vector<int> rejoined_groups;
    std::vector<int64_t> rejoined_at_step;
    // Per outer step, per stage: the hex replica hash every live replica of
    // the stage reported (the client checked they were equal).
    std::vector<std::vector<std::string>> outer_hashes;
    std::vector<int64_t> outer_groups;        // per outer step: the replica groups that took part
    // Outer steps before which the live replicas of some stage held different
    // states (the groups trained apart, as they should: no all-reduce).
    int64_t diverged_before_outer = 0;
    int64_t bytes_outer = 0;                  // pseudo-gradient traffic between replicas
    int64_t data_bytes_not_sent = 0;          // tokens and targets the client did not send (nodes read them)
    std::string dataset_hash;                 // hex
  } diloco;
};

// How a distributed job survives its members (docs/resilience.md).
// With a job dir, the client mirrors every member's checkpoint into it each
// time the members write one (train.checkpoint_every), and a member that
// stops answering is replaced by a spare that loads its mirrored checkpoint;
// every member restarts from that checkpoint and the steps since are run
// again (bitwise as before). With no spare, the replica groups of the dead
// members are dropped if one group stays whole (fewer replicas, the same
// global batch, no longer bitwise; it grows back at a later checkpoint once
// idle nodes fill whole groups); else the job stops with --resume advice.
// Without a job dir a failure ends the job.
struct RecoveryOptions {
  std::filesystem::path job_dir;        // empty: no recovery
  std::vector<net::MemberInfo> spares;  // idle nodes kept for replacements (their stage/replica are ignored)
  // More idle nodes (e.g. the DHT's: nodes that joined mid-job or came back), asked when the pool is empty: nodes
  // that answer a ping and are not members (may be none). Called on the training path (re-planned jobs' checkpoints,
  // DiLoCo boundaries after a drop, spare waits), so it returns at once: a list kept fresh elsewhere, no DHT wait.
  std::function<std::vector<net::MemberInfo>()> find_spares;
  // How long to keep asking find_spares before stopping the job cleanly.
  std::chrono::milliseconds spare_wait{0};
  int max_recoveries = 3;               // then the job stops with its checkpoint and --resume advice
  // --resume: every member starts from the job dir's mirrored checkpoint of
  // this step (0: a fresh start).
  int64_t resume_step = 0;
  std::vector<double> resumed_losses;   // the losses of the steps before resume_step (for the summary)
  // --resume of a checkpoint a re-plan restarted from (JobDirState::replanned):
  // its members restore it as the re-plan did (SetupJobRequest.replanned).
  bool resume_replanned = false;
  // The replicas the job was planned with (JobDirState::planned_replicas;
  // 0: the job's own): each step's samples are drawn over that many shards,
  // and a job re-planned on fewer grows back towards it.
  int64_t planned_replicas = 0;
  // --resume: the corpus read_job_dir prepared to check the data cursor
  // (null: none; the job prepares it itself).
  std::shared_ptr<const model::TokenizedCorpus> corpus;
  // Test (train --kill-self-at-mirror): SIGKILL the client at its N-th
  // mirrored checkpoint, between the job dir's state.json write and the prune
  // of the older checkpoints (0: never).
  int kill_self_at_mirror = 0;
  // --resume: the job dir's checkpoint layout (JobDirState::layout), and
  // the replicas it holds (JobDirState::replicas; 0: the job's). The job's
  // replicas may be fewer (too few nodes came): it re-plans on the first
  // ones at resume_step before the members are set up, as a job that lost
  // the other groups there would have.
  std::string layout = "checkpoints";
  int64_t layout_replicas = 0;
  // Test (train --kill-self-at-relayout): SIGKILL the client at its first
  // re-plan or grow-back once the new checkpoint layout is "built" (state.json
  // still names the old one) or "switched" (state.json names the new one, the
  // old one is not deleted yet); "": never.
  std::string kill_self_at_relayout;
  // Test (train --job-dir-full-at-mirror): from its N-th mirrored checkpoint
  // on, the job dir behaves as a full disk (core/fs.h; 0: never).
  int job_dir_full_at_mirror = 0;
};

// What a job dir holds besides the checkpoints (JOB_DIR/state.json).
struct JobDirState {
  std::string job_id;
  int64_t checkpoint_step = 0;          // the newest step mirrored for every member (0: none)
  std::vector<double> losses;           // per step up to checkpoint_step
  std::string finished;                 // "" while running or stopped, else "completed"
  // The job (job_to_toml) as it ran when state.json was written; "" in a job
  // dir written before it was recorded.
  std::string job_toml;
  // The checkpoint of checkpoint_step was saved before a re-plan changed the
  // replica count: its cursor and seeds are of the old roles, so it is
  // restored as the re-plan restores it.
  bool replanned = false;
  // The replicas the job was planned with (0: job.toml's): after a re-plan
  // each step's samples are still drawn over that many shards.
  int64_t planned_replicas = 0;
  // The replicas the job runs on from checkpoint_step (0: job.toml's). A
  // re-plan or grow-back changes them here, not in job.toml, which keeps the
  // job as planned: state.json is the one file that moves atomically.
  int64_t replicas = 0;
  // The directory under the job dir that holds the checkpoints
  // (CheckpointMirror's layout).
  std::string layout = "checkpoints";
  // Filled by read_job_dir: the fields of the job it was given that differ
  // from job_toml, as "train.lr = 0.5 (was 0.003)".
  std::vector<std::string> changed;
  // The corpus prepared (tokenized) to check the checkpoint's data cursor,
  // for the resumed run to use rather than prepare it again (null: the
  // cursor was not checked, a re-planned checkpoint's).
  std::shared_ptr<const model::TokenizedCorpus> corpus;
};
// Reads JOB_DIR/state.json and checks that the mirror holds checkpoint_step
// for every member of JOB (the job in JOB_DIR/job.toml), and that those
// checkpoints are of JOB: its stages × replicas, each stage's parameter names
// and shapes, the seeds of train.seed, the job id. Reads every checkpoint
// whole. Error: invalid_input, one line naming the job dir and what is
// missing or differs. Fields outside the state (lr, …) may differ: they are
// listed in `changed`.
Result<JobDirState> read_job_dir(const std::filesystem::path& job_dir, const JobConfig& job);

// Whether JOB may go on with fewer replica groups than planned (a re-plan):
// not a [verify] job (its evidence is per planned role) nor a [privacy] one
// (pair keys, threshold and noise are per planned replica).
bool replannable(const JobConfig& job);
// The most replicas of JOB, at most its own, that NODES fill whole (one node
// per stage each) and its global batch splits over (0: none).
int64_t replicas_that_fit(const JobConfig& job, int64_t nodes);

// The advice printed when a job stops with a checkpoint it can resume from;
// NOTE (e.g. "before the divergence") follows the step it names.
std::string resume_advice(const std::filesystem::path& job_dir, int64_t step, const std::string& note = "");

// One node's answer to end_stopped_run.
struct TakeoverAnswer {
  enum class Outcome {
    ended,         // the node dropped the job (it is idle now)
    other_client,  // the job is another client key's
    client_live,   // the job's lease was renewed RENEWED_AGO ago, under QUIET: its client runs
    kept,          // no answer, or refused otherwise: the node keeps it until its lease runs out
  };
  Outcome outcome = Outcome::kept;
  std::string node_id;
  std::chrono::milliseconds renewed_ago{0}, quiet{0};
};
// --resume after the stopped run's client was killed: its nodes still hold
// job JOB_ID under leases nobody renews. Sends each of NODES (in parallel) a
// takeover EndJob for JOB_ID, abort, signed with CLIENT_KEY (the job's
// owner), each call within TIMEOUT; a node ends the job only if its lease
// went unrenewed for QUIET (half the lease). One answer per node, in order.
std::vector<TakeoverAnswer> end_stopped_run(const std::vector<net::MemberInfo>& nodes, const std::string& job_id,
                                            const NodeKey& client_key, std::chrono::milliseconds timeout);

struct DistributedOptions {
  std::string job_id;                  // empty: derived from job name + time
  std::string topology_toml;           // empty: links are not emulated
  EmulationScale scale;
  std::filesystem::path model_out;     // where the final model is written (empty: not fetched)
  std::filesystem::path initial_weights;  // optional safetensors to start from
  std::function<void(const StepReport&)> progress;
  const std::atomic<bool>* cancel = nullptr;  // set by a signal handler: abort cleanly
  int64_t eval_batches = 4;            // held-out batches evaluated at the end
  // The client's identity: it signs every control request, and only it can
  // drive or end the job (null: a fresh key for this run only).
  const NodeKey* client_key = nullptr;
  // How long a node waits for a peer's tensor; sent to every member, and the
  // client's deadlines derive from it and the job's step size.
  std::chrono::milliseconds peer_timeout{60000};
  // The job's id on SolverMarket (0: none): every member commits its step
  // leaves there itself (docs/verification.md).
  uint64_t chain_job_id = 0;
  RecoveryOptions recovery;
  // The slowest round trip the members announce between one another (ms,
  // net::slowest_rtt_ms; 0: none measured): step deadlines derive from it.
  double peer_rtt_ms = 0;
};

// Runs JOB on MEMBERS (one per stage × replica; member.stage/.replica say the role).
// Every member holds the job under a lease that a background thread renews.
// A member that stops answering during a step is replaced per
// options.recovery (above) if it has a job dir; otherwise, and on any other
// failure, every member's job is aborted and outstanding calls are
// cancelled before this returns: no error leaves a node busy. The error names
// the member at fault; its kind says what the client made of it (unavailable
// or timeout: the node stopped or is unreachable and needs replacing;
// resource_exhausted: it refused the job; bad_peer: it misbehaved).
Result<TrainResult> run_distributed(const JobConfig& job, const std::vector<net::MemberInfo>& members,
                                    const DistributedOptions& options);

struct LocalOptions {
  std::filesystem::path model_out;
  std::filesystem::path initial_weights;
  std::function<void(const StepReport&)> progress;
  const std::atomic<bool>* cancel = nullptr;
  int64_t eval_batches = 4;
};

// The same job in one process: the whole model, the same data order, seed and
// global batch (split into the same micro-batches), the same optimizer.
Result<TrainResult> run_local(const JobConfig& job, const LocalOptions& options);

// Layers [first, first + count) of each stage: as equal as possible, extras to early stages.
std::vector<std::pair<int, int>> stage_layer_ranges(int64_t layers, int64_t stages);

// Seconds of one forward + backward of one micro-batch through the whole model
// (fastest of 10), divided by the stages: the compute per micro-batch per
// stage, measured here, for scaling emulated links.
double measure_microbatch_seconds(const JobConfig& job);

// Seconds of the work a stage does once per step after its micro-batches
// (flatten and unflatten its gradients, the optimizer's update, the state
// hash), on the largest stage (fastest of 6): the simulator's per-step overhead.
double measure_step_update_seconds(const JobConfig& job);

// Tokens processed per step (global batch × sequence length).
inline int64_t tokens_per_step(const JobConfig& job) { return job.train.global_batch * job.model.seq_len; }

}  // namespace sn::train
