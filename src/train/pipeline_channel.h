// The pipeline's links of one stage replica, over net::Transport: activations
// go to the next stage and come from the previous one; their gradients go
// back the other way. Each crossing is dense f32, or through the boundary's
// activation codec (AQ-SGD buffers keyed by sample id).
//
// Failure contract: a failed send or receive returns the error (naming the
// micro-batch and the peer) and aborts the transport with it, so the rest of
// the step fails at once. A codec's buffer may then hold this step's update
// for some samples and not others: resume from a checkpoint, not from memory.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <vector>

#include "compress/compress.h"
#include "core/result.h"
#include "net/transport.h"

namespace sn::train {

// Which way a tensor crosses a stage boundary.
enum class Flow { kActivation, kGradient };

class PipelineChannel {
 public:
  // PREV / NEXT: member indices of the neighbouring stages (-1 at either end).
  // SHAPE: every crossing tensor's shape [batch, seq_len, d_model]. Codecs
  // (each may be null: dense) belong to the caller and must outlive this.
  struct Codecs {
    compress::ActivationCodec* activation_out = nullptr;  // to NEXT
    compress::ActivationCodec* activation_in = nullptr;   // from PREV
    compress::ActivationCodec* gradient_out = nullptr;    // to PREV
    compress::ActivationCodec* gradient_in = nullptr;     // from NEXT
  };
  PipelineChannel(net::Transport& transport, int prev, int next, std::vector<int64_t> shape, Codecs codecs,
                  std::chrono::milliseconds timeout);

  // Sends TENSOR for micro-batch MICRO of STEP: activations to NEXT, gradients
  // to PREV. With SAMPLE_IDS (training) it goes through the codec, if any,
  // under SEED; without (evaluation: held-out ids must not touch the codec's
  // per-sample buffers) it goes dense.
  Status send(Flow flow, int64_t step, int micro, const torch::Tensor& tensor,
              const std::vector<int64_t>* sample_ids, uint64_t seed);
  // Waits for micro-batch MICRO's tensor of STEP and returns it (f32, SHAPE).
  // A compressed message needs SAMPLE_IDS and the codec. Errors: timeout,
  // aborted, bad_peer (malformed or undecodable tensor).
  Result<torch::Tensor> receive(Flow flow, int64_t step, int micro, const std::vector<int64_t>* sample_ids);

  // Seconds spent blocked in receive() since the last call.
  double take_wait_seconds();

 private:
  net::Transport& transport_;
  int prev_, next_;
  std::vector<int64_t> shape_;
  Codecs codecs_;
  std::chrono::milliseconds timeout_;
  double wait_seconds_ = 0;
};

}  // namespace sn::train
