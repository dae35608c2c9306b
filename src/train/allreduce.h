// Ring all-reduce (reduce-scatter then all-gather) of one flat fp32 buffer
// over the job transport, in fixed-size chunks. The summation order of every
// element is fixed by the ring order, so every replica ends with bitwise the
// same sum, run after run.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <vector>

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

}  // namespace sn::train
