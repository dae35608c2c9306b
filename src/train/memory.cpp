// How much memory a node needs to hold one stage of a job, estimated from the
// job alone (before anything is allocated), so admission can refuse early.
#include <algorithm>

#include "train/train.h"

namespace sn::train {

StageMemory estimate_stage_memory(const JobConfig& job, int stage, int first_layer, int layer_count,
                                  int64_t dataset_samples) {
  const auto& m = job.model;
  const int64_t stages = job.parallel.stages;
  const bool first = stage == 0, last = stage == stages - 1;
  (void)first_layer;
  int64_t params = layer_count * m.layer_parameter_count();
  if (first) params += m.vocab * m.d_model + m.seq_len * m.d_model;
  if (last) params += 2 * m.d_model + (first ? 0 : m.vocab * m.d_model);  // final norm, tied head
  StageMemory e;
  e.weights = 4 * params;
  e.gradients = 8 * params;        // the gradients and their flattened copy for the all-reduce
  e.optimizer = 8 * params;        // AdamW's two f32 moments
  // Activations kept for backward, per micro-batch per layer (f32): about
  // 34·d + 5·heads·seq floats per token (attention scores, MLP, norms), plus
  // the logits, their softmax and gradient on the last stage.
  const int64_t tokens = job.sequences_per_micro_batch() * m.seq_len;
  int64_t per_micro = tokens * layer_count * (34 * m.d_model + 5 * m.heads * m.seq_len) * 4;
  if (last) per_micro += 3 * tokens * m.vocab * 4;
  per_micro += 2 * tokens * m.d_model * 4;  // boundary activations in and out
  const int64_t in_flight = job.parallel.schedule == "gpipe"
                                ? job.parallel.micro_batches
                                : std::min<int64_t>(job.parallel.micro_batches, stages - stage);
  e.activations = per_micro * std::max<int64_t>(1, in_flight);
  // AQ-SGD keeps an fp16 activation per training sample at each side of each
  // of the stage's boundaries (memory-mapped, but paged in as used).
  const auto& c = job.compression;
  if (c.activations != "none") {
    const int64_t boundaries = (first ? 0 : 1) + (last ? 0 : 1);
    e.codec_buffers = 2 * boundaries * (c.activations == "aqsgd" ? std::max<int64_t>(1, dataset_samples) : 1) *
                      m.seq_len * m.d_model * 2;
  }
  // Error-feedback residuals of the gradient compressors (f32 per coordinate).
  if (c.gradients != "none") {
    if (job.parallel.replicas > 1) e.residuals += 4 * params;
    if (stages > 1 && (first || last)) e.residuals += 4 * m.vocab * m.d_model;
  }
  e.overhead = 64 << 20;  // LibTorch's allocator slack and the job's threads
  e.total = e.weights + e.gradients + e.optimizer + e.activations + e.codec_buffers + e.residuals + e.overhead;
  return e;
}

}  // namespace sn::train
