// The privacy module's face to the rest of the system (docs/privacy.md):
// the implementation of train's privacy hooks (secure aggregation over net's
// signed transport, DP-SGD clipping bound and seeded noise), the noise a job
// resolves to, and secure aggregation as a collective of its own.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/keys.h"
#include "core/result.h"
#include "net/transport.h"
#include "privacy/accountant.h"
#include "privacy/secagg.h"
#include "train/aggregation.h"

namespace sn::privacy {

// Makes every later [privacy] job on this process use this module
// (train::install_privacy). The CLI calls it once at startup.
void install();

// The factory install() registers (exposed for in-process tests).
Result<std::unique_ptr<train::PrivacyHooks>> make_hooks(const train::PrivacyContext& context);

// What a DP job's accounting rests on. Sampling: each step's batch is a
// fixed-size draw of global_batch of the N training sequences (the job's
// sample order); the accountant treats it as Poisson sampling at
// q = global_batch / N, the usual DP-SGD approximation (docs/privacy.md).
struct DpPlan {
  double noise_multiplier = 0;  // sigma
  double sample_rate = 0;       // q
  int64_t steps = 0;
  double delta = 0;
  double epsilon = 0;           // after all steps
};
// From the job's [privacy] (noise_multiplier, or the sigma that reaches
// target_epsilon) and the training set's size. invalid_input if the target
// cannot be reached or the batch exceeds the data.
Result<DpPlan> plan_dp(const JobConfig& job, int64_t train_sequences);

// The per-stage clipping bound: C / sqrt(P + 2) when the tied embedding is
// split between the first and the last of P ≥ 2 stages, C when P = 1 (see
// docs/privacy.md for why the whole sequence gradient then has norm ≤ C).
double stage_clip_norm(double clip_norm, int64_t stages);

struct SecureAllreduceOptions {
  std::string context;                       // binds keys and signatures: "job/stage"
  int threshold = 0;                         // 0: default_threshold(D)
  double range = 4.0;                        // fixed-point clipping range
  std::chrono::milliseconds timeout{60000};  // per round; a replica silent that long has dropped
  int64_t chunk_bytes = 1 << 20;             // masked vectors travel in chunks of this size
  // Tests only: return right after sending round N's messages, as if the
  // process died there (3: after the masked vector). 0: never.
  int stop_after_round = 0;
};

// Secure aggregation of one f32 vector across RING (member indices; this
// member must be in it) over TRANSPORT, in the four rounds of secagg.h. A
// replica that drops after the share round is tolerated while ≥ t remain
// (its masked vector counted if it arrived); with fewer, run() fails with
// kind aborted. Errors abort the transport (as net's collectives do) except
// a clean abort below t, which leaves the transport usable.
class SecureAllreduce {
 public:
  SecureAllreduce(net::Transport& transport, std::vector<int> ring, std::vector<PublicKey> ring_keys,
                  const NodeKey& key, SecureAllreduceOptions options);
  // BUFFER is replaced by the fixed-point sum, dequantized.
  Status run(std::span<float> buffer, int64_t step);
  // How many replicas' vectors the last run() summed.
  int last_survivors() const { return last_survivors_; }

 private:
  net::Transport& transport_;
  std::vector<int> ring_;
  std::vector<PublicKey> ring_keys_;
  const NodeKey& key_;
  SecureAllreduceOptions options_;
  int last_survivors_ = 0;
};

}  // namespace sn::privacy
