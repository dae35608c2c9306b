// The hooks through which a privacy implementation takes part in training
// (docs/privacy.md). train defines them and calls them; the privacy module
// implements them and the CLI installs that implementation at startup, so
// train never depends on privacy.
//
// A job with a [privacy] table gets one PrivacyHooks per stage worker:
//  - per-sequence clipping (DP-SGD): the worker runs backward one sequence at
//    a time and scales that sequence's gradient of this stage's parameters to
//    norm ≤ sequence_clip_norm(), then sums them;
//  - add_noise() before the replicas' sum (DP-SGD noise, this replica's share);
//  - reduce() instead of the plain ring all-reduce (secure aggregation).
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/job.h"
#include "core/keys.h"
#include "core/result.h"
#include "net/transport.h"

namespace sn::train {

struct PrivacyContext {
  const JobConfig* job = nullptr;
  std::string job_id;
  int stage = 0, stages = 1, replica = 0, replicas = 1;
  // This stage's replicas as member indices, in replica order (this one included).
  std::vector<int> ring;
  std::vector<PublicKey> ring_keys;         // their Ed25519 node keys, same order
  net::Transport* transport = nullptr;      // null in an offline replay
  const NodeKey* key = nullptr;             // this node's key; null in an offline replay
  std::chrono::milliseconds timeout{60000}; // per receive
  int64_t train_sequences = 0;              // training-set size (DP's sample rate is global_batch / it)
  // This stage's parameters in flattening order: (name, values).
  std::vector<std::pair<std::string, int64_t>> layout;
};

class PrivacyHooks {
 public:
  virtual ~PrivacyHooks() = default;
  // Norm bound of one sequence's gradient of this stage's parameters, in loss
  // units (the gradient of that sequence's mean token loss); 0: no clipping.
  virtual double sequence_clip_norm() const = 0;
  // Adds this replica's share of the noise to FLAT (this stage's gradient,
  // already scaled as the optimizer takes it: divided by the global batch).
  // SEED is what the job derives for (step, stage, replica), so a replay adds
  // the same noise.
  virtual void add_noise(torch::Tensor flat, int64_t step, uint64_t seed) = 0;
  // Whether reduce() replaces the ring all-reduce of the stage's replicas.
  virtual bool aggregates() const = 0;
  // Replaces FLAT (contiguous f32) by the sum over the stage's replicas;
  // every replica ends bitwise equal. On error the transport is aborted and
  // FLAT is unspecified.
  virtual Status reduce(torch::Tensor flat, int64_t step) = 0;
};

// DP-SGD's per-sequence clipping, as the stage worker runs it: for each b in
// [0, BATCH), zeroes the gradients of PARAMETERS, calls BACKWARD(b,
// keep_graph) (which must backpropagate sequence b alone), scales the
// resulting flat gradient to norm ≤ BOUND, and returns their sum (flat, in
// PARAMETERS' order). PARAMETERS' gradients are left holding the last one's.
torch::Tensor sum_clipped_sequence_gradients(const std::vector<std::pair<std::string, torch::Tensor>>& parameters,
                                             int64_t batch, double bound,
                                             const std::function<void(int64_t b, bool keep_graph)>& backward);

using PrivacyFactory = std::function<Result<std::unique_ptr<PrivacyHooks>>(const PrivacyContext&)>;

// Installed once, before any job is set up (the CLI does it at startup).
void install_privacy(PrivacyFactory factory);
// The hooks for a job with a [privacy] table; an error if no implementation
// is installed (then the node refuses the job at setup).
Result<std::unique_ptr<PrivacyHooks>> make_privacy_hooks(const PrivacyContext& context);

}  // namespace sn::train
