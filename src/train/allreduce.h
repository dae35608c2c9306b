// Ring all-reduce (reduce-scatter then all-gather) of one flat fp32 buffer
// over the job transport, in fixed-size chunks. The summation order of every
// element is fixed by the ring order, so every replica ends with bitwise the
// same sum, run after run.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <vector>

#include "compress/compress.h"
#include "core/result.h"
#include "net/transport.h"

namespace sn::train {

struct RingOptions {
  int64_t chunk_bytes = 1 << 20;
  std::chrono::milliseconds timeout{60000};
  std::string kind = "allreduce";   // message kind, to keep separate reductions apart
};

// BUFFER: contiguous fp32 CPU tensor, summed in place across RING (member
// indices in ring order; this node must be in it). STEP tags the messages.
Status ring_allreduce(net::JobTransport& transport, const std::vector<int>& ring,
                      torch::Tensor buffer, int64_t step, const RingOptions& options);

// Sends BUFFER to PEER and returns PEER's buffer of the same size (one exchange).
Result<torch::Tensor> exchange_with(net::JobTransport& transport, int peer,
                                    const torch::Tensor& buffer, int64_t step,
                                    const std::string& kind, std::chrono::milliseconds timeout);

// Data-parallel sum through a gradient compressor (error feedback included):
// every replica compresses its own BUFFER once, the ring all-gathers the D
// messages (each hop forwards the message it received last round), and every
// replica decompresses all D — its own too — and adds them in replica order, so
// all replicas end with bitwise the same sum. BUFFER is overwritten with it.
// SHARED_SEED must be the same on every replica for this step.
Status compressed_allreduce(net::JobTransport& transport, const std::vector<int>& ring,
                            compress::GradientCompressor& compressor, torch::Tensor buffer,
                            int64_t step, uint64_t shared_seed, const RingOptions& options);

// Sends C(BUFFER) to PEER and returns D(C(BUFFER)) + D(C(PEER's buffer)): both
// sides compute the same sum bitwise (two-term float addition commutes).
Result<torch::Tensor> compressed_exchange_sum(net::JobTransport& transport, int peer,
                                              compress::GradientCompressor& compressor,
                                              const torch::Tensor& buffer, int64_t step,
                                              uint64_t shared_seed, const std::string& kind,
                                              std::chrono::milliseconds timeout);

}  // namespace sn::train
