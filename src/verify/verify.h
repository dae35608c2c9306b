// Verification, the public face (docs/verification.md): what a solver's node
// keeps and serves as evidence of its training, the commitment it puts on
// chain, how a verifier samples what it replays, and the client every
// verifier and referee fetches evidence with. No LibTorch in this header.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/hash.h"
#include "core/keys.h"
#include "core/result.h"
#include "chain/chain.h"
#include "proto/solvernet.pb.h"
#include "train/train.h"


namespace sn::verify {

// ---- sampling (a verifier's plan) ---------------------------------------------

// Probability that replaying a fraction F of N segments catches a solver that
// faked a fraction Q of them: 1 − (1 − Q)^(F·N) (the figure; sampling
// without replacement only does better). Q and F are clamped to [0, 1].
double detection_probability(double q, double f, int64_t segments);

// The smallest fraction f (a whole number of segments over N, at most 1) whose
// detection_probability reaches TARGET against Q. Input errors (exit 2) for Q
// outside (0, 1), TARGET outside (0, 1) or N < 1.
Result<double> fraction_for_target(double target, double q, int64_t segments);

// How many segments a fraction F of N is: ⌈F·N⌉, at least 1, at most N.
int64_t segments_for_fraction(double f, int64_t segments);

// Which COUNT of the N segments a verifier replays for the member (STAGE,
// REPLICA), from the job's verifier SEED: a partial Fisher–Yates shuffle of
// 0 … N−1 driven by x_i = the first 8 bytes (little-endian) of
// BLAKE2b(str("solvernet/segments/v1") ‖ seed ‖ u64(stage) ‖ u64(replica) ‖ u64(i)),
// swap position i with i + x_i mod (N − i). Ascending. Anyone with the seed
// recomputes the same picks; nobody knows them before the seed exists.
std::vector<int64_t> pick_segments(const Hash256& seed, int stage, int replica, int64_t segments, int64_t count);

// ---- evidence on disk ------------------------------------------------------------
// Paths and readers are train/evidence.h's (train writes the evidence).

// A job id usable as one path component: 1..256 bytes, no '/', '\\' or NUL, not "." or "..".
Status check_job_id(const std::string& job_id);

// Leaves from leaves.bin's bytes (32 a leaf) while the job may still be
// appending: a trailing partial leaf is dropped.
std::vector<Hash256> split_leaves(const std::string& bytes);

// ---- the commitment (Keccak Merkle tree, as SolverMarket checks it) -----------

// Root over merkle_leaf(leaf_t, keccak256), t = 0 … N−1.
Hash256 commitment_root(const std::vector<Hash256>& leaves);
// Siblings bottom-up for leaf INDEX (a level where the node is carried up
// contributes none).
std::vector<Hash256> commitment_proof(const std::vector<Hash256>& leaves, uint64_t index);
// Whether SIBLINGS prove LEAF at INDEX of a tree of COUNT leaves with ROOT:
// the sides and carried levels follow from INDEX and COUNT alone, as the
// contract derives them; extra or missing siblings fail.
bool check_commitment_proof(const Hash256& root, uint64_t count, uint64_t index, const Hash256& leaf,
                            const std::vector<Hash256>& siblings);

// ---- the Evidence service (hosted by the node) ---------------------------------

class TraceCache;  // verify/trace_cache.h

struct EvidenceServiceOptions {
  std::filesystem::path data_dir;        // the node's: evidence/ and checkpoints/ under it
  std::string chain_address;             // 0x… the node commits with (empty: no chain)
  // Cheat `withhold` (tests): refuse checkpoints, step evidence and tensors.
  bool withhold = false;
  double requests_per_second = 100;      // per requester key (token bucket)
  double burst = 400;
  std::chrono::milliseconds control_window{60000};  // signed requests older or newer are refused
  // GetOpTrace / GetTensor: the node's traces of its own steps (null: not served).
  std::shared_ptr<TraceCache> traces;
};

// The Evidence gRPC service. Requests are signed by the requester's key
// (checked: key, signature, time within the window); each key is rate limited
// (resource_exhausted beyond it). Files are read per request: nothing is held
// in memory between calls. Thread-safe.
std::unique_ptr<grpc::Service> make_evidence_service(EvidenceServiceOptions options);

// ---- the client verifiers and referees fetch with ------------------------------

struct Member {
  std::string job_id;
  int stage = 0;
  int replica = 0;
};

struct Commitment {
  std::vector<Hash256> leaves;
  Hash256 root{};
  std::string chain_address;
};

class EvidenceClient {
 public:
  // The node NODE_ID at ADDRESS; requests signed with KEY (must outlive the client).
  EvidenceClient(const std::string& address, const std::string& node_id, const NodeKey& key,
                 std::chrono::milliseconds deadline = std::chrono::seconds(30));
  ~EvidenceClient();

  // Leaves, root and count; the root is recomputed from the leaves and must match
  // (bad_peer otherwise).
  Result<Commitment> commitment(const Member& member);
  Result<solvernet::v1::SetupJobRequest> setup(const Member& member);
  // The serialized StepEvidence of step T.
  Result<std::string> step_evidence(const Member& member, int64_t step);
  // Every file of the checkpoint of STEP into DEST (created), in ≤ 4 MiB
  // chunks; returns DEST. A file whose size changes mid-way is bad_peer.
  Result<std::filesystem::path> fetch_checkpoint(const Member& member, int64_t step,
                                                 const std::filesystem::path& dest);
  Result<solvernet::v1::GetOpTraceReply> op_trace(const Member& member, int64_t step);
  Result<solvernet::v1::Tensor> tensor(const Member& member, int64_t step, const Hash256& hash);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- a solver's node on chain --------------------------------------------------

// What a node needs to answer for the operations of one of its steps: its
// trace, as train/trace.h records it (records, chain r_0 … r_m). Implemented
// by trace_own_step (the node replays its own step from its evidence).
struct StepOps {
  std::vector<solvernet::v1::OpRecord> records;  // j = 1 … m
  std::vector<Hash256> chain;                    // r_0 … r_m
  Hash256 state{}, inbound{}, outbound{};        // the commit record's inputs
};
using StepOpsSource = std::function<Result<StepOps>(const Member& member, int64_t step)>;

struct SolverAgentOptions {
  std::filesystem::path data_dir;
  std::shared_ptr<chain::MarketClient> market;  // the node's own chain key
  std::chrono::milliseconds poll{300};
  StepOpsSource step_ops;                       // null: the operation phase is not answered (the node loses it)
  // Progress lines ("committed …", "dispute 3: claimed leaf 5") go here (null: the log).
  std::function<void(const std::string&)> report;
};

// The node's solver role on chain, one background thread: for every member it
// runs whose setup names a chain job (SetupJobRequest.chain_job_id), it
// commits (root, leaf count) every verify.commit_every steps and finally at
// leaf n (the job's last step), and answers every dispute over its commit:
// leaves with Merkle proofs at the step phase, the operation count and chain
// hashes at the operation phase. Errors of one job are logged and retried at
// the next poll; they never stop the others. Stops (joins) on destruction.
class SolverAgent {
 public:
  static std::unique_ptr<SolverAgent> start(SolverAgentOptions options);
  ~SolverAgent();

 private:
  SolverAgent() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- the verifier --------------------------------------------------------------

// One member of the job and the node that ran it.
struct MemberEndpoint {
  int stage = 0, replica = 0;
  std::string node_id, address;
};

struct VerifierOptions {
  std::filesystem::path work_dir;        // fetched checkpoints and evidence go here
  const NodeKey* key = nullptr;          // signs evidence requests
  std::shared_ptr<chain::MarketClient> market;
  uint64_t chain_job = 0;
  std::string job_id;                    // as the nodes know it
  std::vector<MemberEndpoint> members;
  uint64_t seat = 0;                     // the verifier seat to take
  double q = 0.1;                        // the faked fraction to catch …
  double target = 0.99;                  // … with this probability
  double fraction = 0;                   // > 0: replay this fraction instead
  std::chrono::milliseconds poll{300};
  std::chrono::seconds seed_timeout{120};      // waiting for the commits and the seed
  std::chrono::seconds dispute_timeout{600};   // a dispute still open after this is left
  // Tests: a verifier that lies challenges honest work (its last leaf) and
  // disagrees with every claim.
  bool lie = false;
  std::function<void(const std::string&)> report;  // live lines (null: the log)
  // Polled while it waits (the seed, each turn); false ends the run with an
  // aborted error at once, its open disputes left to their deadlines (null: never).
  std::function<bool()> keep_going;
};

// Takes the job's verifier seat if the seed selects this key, replays a
// fraction of every member's segments (picked with the seed), challenges the
// first leaf that differs and plays the challenger to the end of each
// dispute. Returns a JSON report: seed, fraction, detection probability, per
// member the segments replayed, any dispute and its outcome. Errors: not
// selected (permission_denied), the seed never came (timeout), chain errors.
Result<nlohmann::json> run_verifier(const VerifierOptions& options);

// ---- the referee ---------------------------------------------------------------

struct RefereeOptions {
  std::filesystem::path work_dir;
  const NodeKey* key = nullptr;
  std::shared_ptr<chain::MarketClient> market;  // the job's referee key
  uint64_t chain_job = 0;
  std::string job_id;
  std::vector<MemberEndpoint> members;
  std::chrono::milliseconds poll{300};
  std::function<bool()> keep_going;             // polled; false ends the loop
  std::function<void(const std::string&)> report;
};

// Rules every dispute of the job that reaches the referee's turn: fetches the
// disputed operation's record and input tensors from the solver, checks the
// record against the agreed chain hash r_{j−1} and the solver's claim r_j and
// its inputs against the records before it, recomputes the operation (or
// re-traces the step, for kinds that need it) and resolves on chain. What it
// cannot get from the solver rules against the solver. Returns the rulings.
Result<nlohmann::json> run_referee(const RefereeOptions& options);

}  // namespace sn::verify
