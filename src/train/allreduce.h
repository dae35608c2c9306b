// The data-parallel collectives of training, as classes over net::Transport:
// the gradient sum across a stage's replicas (dense ring all-reduce, or
// compress → all-gather → sum) and the tied embedding's gradient swap between
// the first and the last stage.
//
// Failure contract (as net/collectives.h): run() returns the first error and
// has then aborted the transport with its message; the buffer or gradient it
// was given holds unspecified values (partly reduced). The compressor's
// error-feedback residual may already hold this step's remainder, so a job
// resumed after a failure must reload it from a checkpoint.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <vector>

#include "compress/compress.h"
#include "core/result.h"
#include "net/collectives.h"
#include "net/transport.h"

namespace sn::train {

using RingOptions = net::CollectiveOptions;

// BUFFER: contiguous fp32 CPU tensor, summed in place across RING (member
// indices in ring order; this node must be in it) by net::RingAllreduce.
Status ring_allreduce(net::Transport& transport, const std::vector<int>& ring, torch::Tensor buffer, int64_t step,
                      const RingOptions& options);

// Data-parallel sum through a gradient compressor (error feedback included):
// every replica compresses its own buffer once, the ring all-gathers the D
// messages, and every replica decompresses all D — its own too — and adds them
// in ring order, so all replicas end with bitwise the same sum.
class CompressedAllreduce {
 public:
  // COMPRESSOR must outlive this object; its numel() is the buffer size.
  CompressedAllreduce(net::Transport& transport, std::vector<int> ring, compress::GradientCompressor& compressor,
                      RingOptions options);
  // Overwrites BUFFER (contiguous f32, compressor.numel() values) with the
  // sum. SHARED_SEED must be the same on every replica for this step.
  Status run(torch::Tensor buffer, int64_t step, uint64_t shared_seed);

 private:
  net::Transport& transport_;
  std::vector<int> ring_;
  compress::GradientCompressor& compressor_;
  RingOptions options_;
};

// The tied embedding lives in the first and the last stage: each sends its
// gradient to the other and both end with the same sum bitwise (two-term
// float addition commutes). Dense, or through a gradient compressor: then both
// sides add D(C(own)) + D(C(peer's)).
class TiedEmbeddingSync {
 public:
  // COMPRESSOR may be null (dense); if given it must outlive this object.
  TiedEmbeddingSync(net::Transport& transport, int peer, compress::GradientCompressor* compressor,
                    std::chrono::milliseconds timeout);
  // Replaces GRAD (f32, any shape) in place with the sum of both sides'.
  Status run(torch::Tensor grad, int64_t step, uint64_t shared_seed);

 private:
  net::Transport& transport_;
  int peer_;
  compress::GradientCompressor* compressor_;
  RingOptions options_;
};

}  // namespace sn::train
