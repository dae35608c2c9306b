// DiLoCo inside sn_train (docs/diloco.md): replica groups train apart for
// inner_steps local AdamW steps and meet at outer steps, where each stage's
// replicas average their pseudo-gradients θ_start − θ_end and take one outer
// Nesterov step. Private to sn_train: the node's outer state and exchange,
// the content-addressed dataset nodes read their shards from, and the
// client's group-tolerant calls and adaptive deadlines.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "core/hash.h"
#include "core/job.h"
#include "core/result.h"
#include "model/data.h"
#include "net/transport.h"
#include "proto/solvernet.pb.h"
#include "train/state.h"

namespace sn::train {

// ---- the pseudo-gradient on the wire ---------------------------------------

// Values per int8 chunk; chunks restart at every tensor, so a tensor's
// encoding does not depend on where it sits in its stage (the tied embedding
// is in the first and the last stage, and must stay equal in both).
inline constexpr int64_t kDilocoChunk = 4096;

// int8 with one f32 scale per chunk: scale = max|x| / 127 (0 for an all-zero
// chunk), q = clamp(nearbyint(x / scale), −127, 127). Scalar IEEE arithmetic in
// round-to-nearest-even, so every replica that encodes the same values gets
// the same bytes. SIZES: the tensors' element counts, in order, summing to
// FLAT's numel (contiguous f32). Layout: all chunk scales (f32 LE), then all
// int8 values (docs/diloco.md, "Wire").
std::string encode_int8_chunks(const torch::Tensor& flat, const std::vector<int64_t>& sizes);
// Back to f32 (q × scale). Errors (bad_peer, naming FROM) if DATA's size does
// not match SIZES.
Result<torch::Tensor> decode_int8_chunks(std::string_view data, const std::vector<int64_t>& sizes,
                                         const std::string& from);

// ---- the node's outer state -------------------------------------------------

// θ_start (the weights every replica of the stage agreed on at the last
// outer step, or at setup) and the outer momentum v, both flat f32 over the
// stage's parameters in order. Kept in the training state (so in the state
// hash and in checkpoints) as "diloco.theta_start" and "diloco.outer_momentum".
class DilocoOuter {
 public:
  DilocoOuter(DilocoConfig config, const NamedTensors& parameters);

  // The outer step among RING (member indices of this stage's live replicas,
  // in ascending replica order; this member is in it), messages tagged STEP:
  //   Δ_r = θ_start − θ_r          (each replica's pseudo-gradient)
  //   Δ̄  = (Σ_r D(E(Δ_r))) / n     (E/D: int8 chunks or f32; summed in ring order)
  //   v  ← μ·v + Δ̄
  //   θ  ← θ_start − lr·(Δ̄ + μ·v)   (= θ_start − lr·(Δ̄ + μ·(μ·v_old + Δ̄)), Nesterov)
  //   θ_start ← θ
  // Every replica decodes every message, its own included, and sums in the
  // same order, so all end bitwise equal. ATTEMPT (0, 1, …) keeps a retry's
  // messages apart from the failed attempt's (kind "outer", then
  // "outer-retry-N"). On error PARAMETERS and the outer state are unchanged
  // (the update runs only once every message is in); a bad message aborts
  // the transport, a lost peer (timeout, failed send) leaves it usable for a
  // retry among fewer replicas.
  Status step(net::Transport& transport, const std::vector<int>& ring, int64_t step, int attempt,
              std::chrono::milliseconds timeout, const NamedTensors& parameters);
  // What every replica of the stage must hold alike after an outer step:
  // BLAKE2b-256 over the parameters (as parameters_hash) and v.
  Hash256 replica_hash(const NamedTensors& parameters) const;
  // The outer state as named tensors (for TrainingState::residuals), and back.
  NamedTensors state() const;
  Status load_state(const std::map<std::string, torch::Tensor>& tensors);
  int64_t outer_steps() const { return outer_steps_; }

 private:
  DilocoConfig config_;
  std::vector<int64_t> sizes_;
  torch::Tensor theta_start_, momentum_;
  int64_t outer_steps_ = 0;
};

// ---- data the nodes read themselves ----------------------------------------

// BLAKE2b-256 of TOKENS as little-endian int32: the dataset's name.
Hash256 dataset_hash(const std::vector<int32_t>& tokens);
// The dataset named HASH from DATA_DIR/datasets/<hex>.ids (checked against
// HASH on every read). If it is not there, the node tokenizes the job's
// [data] corpus itself (model::prepare_corpus) and keeps the result there if,
// and only if, it has that hash. Errors: not_found (naming the hash and what
// the node's own corpus hashes to), or the corpus preparation's.
Result<model::Dataset> open_dataset(const std::filesystem::path& data_dir, const JobConfig& job,
                                    std::string_view hash);
// The training step request with this replica's micro-batches filled in
// from DATASET by the rule the client would use (train/batches.h: step
// STEP's global batch, split by replica; tokens at stage 0, targets at the
// last stage, sample ids everywhere).
solvernet::v1::RunStepRequest with_own_micro_batches(const solvernet::v1::RunStepRequest& request,
                                                     const JobConfig& job, const model::Dataset& dataset, int stage,
                                                     int replica);

// ---- the client side ---------------------------------------------------------

// Runs CALL on MEMBERS (indices into the fleet) in parallel, each with
// DEADLINE. Unlike Fleet::run_all, a failure ends nothing: the statuses come
// back (indexed like MEMBERS) for the caller to drop whole replica groups.
// When a member fails, the calls of members with the same GROUP value are
// cancelled (their group cannot finish the step).
std::vector<grpc::Status> run_members(const std::vector<size_t>& members, const std::vector<int>& group,
                                      std::chrono::milliseconds deadline,
                                      const std::function<grpc::Status(size_t, grpc::ClientContext&)>& call);

// A step's deadline from measurements, not a constant (docs/diloco.md,
// "Deadlines"): before any step, INITIAL; after, net::adaptive_timeout(FLOOR,
// rtt, p95 of the last WINDOW steps) = max(FLOOR, 8 × rtt + 3 × p95). A link
// that slows makes steps slower and the deadline follows within a window.
class StepDeadline {
 public:
  StepDeadline(std::chrono::milliseconds initial, std::chrono::milliseconds floor, size_t window = 20)
      : initial_(initial), floor_(floor), window_(window) {}
  void set_rtt_ms(double rtt_ms) { rtt_ms_ = rtt_ms; }
  void record(double step_seconds);
  double p95_seconds() const;  // 0 before the first step
  double rtt_ms() const { return rtt_ms_; }
  std::chrono::milliseconds deadline() const;

 private:
  std::chrono::milliseconds initial_, floor_;
  size_t window_;
  double rtt_ms_ = 0;
  std::deque<double> recent_;
};

// The slowest round trip from this process to ADDRESSES (Node.Ping, best of
// three each; ms). Unreachable members are skipped; 0 if none answered.
double measure_client_rtt_ms(const std::vector<std::pair<std::string, std::string>>& address_and_node_id);

}  // namespace sn::train
