// A GPT decoder in LibTorch, sliceable into pipeline stages. Pre-LayerNorm
// blocks, causal self-attention written out with matmuls (no fused kernels
// whose results depend on thread count), GELU MLP, learned positions, token
// embedding tied to the LM head, final LayerNorm. No dropout.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/job.h"

namespace sn::model {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Watches a stage's forward at its part boundaries, for the operation trace
// of verification (train/trace.h). It sees the live tensors, autograd
// attached, and may register gradient hooks on them; it must not change them.
// Called on the forward's thread, in execution order.
class ForwardObserver {
 public:
  enum class Part { embed, block, head };
  virtual ~ForwardObserver() = default;
  // embed: IN tokens, OUT the first block's input; block LAYER: its input and
  // output; head: IN the last block's output, OUT the logits.
  virtual void on_forward(Part part, int layer, const torch::Tensor& in, const torch::Tensor& out) = 0;
};

// Pins LibTorch to one intra-op and one inter-op thread (idempotent):
// results then do not depend on how many cores the machine has.
void init_torch_single_thread();

// One pipeline stage: blocks [first_layer, first_layer + layer_count). The
// stage starting at block 0 also holds "wte.weight" (token embedding) and
// "wpe.weight" (positions); the stage ending at the last block holds
// "ln_f.*" and the LM head, tied to "wte.weight" — a last stage that is not
// also the first keeps its own copy of "wte.weight" (the trainer sums the two
// copies' gradients so they stay equal). StageModel(c, 0, c.layers, s) is the
// whole model.
//
// Every parameter is initialised from a generator seeded by (seed, its name),
// so a stage's parameters equal the whole model's bitwise however it is cut.
class StageModel : public torch::nn::Module {
 public:
  StageModel(const ModelConfig& config, int first_layer, int layer_count, uint64_t seed);

  // A stage [first_layer, first_layer + layer_count) holding exactly WEIGHTS
  // (copied, as fresh parameters; any subset of the stage's names): what a
  // referee needs to rerun one part of it. A part that uses a weight not
  // given throws std::out_of_range (callers check names first).
  static std::unique_ptr<StageModel> with_weights(const ModelConfig& config, int first_layer, int layer_count,
                                                  const NamedTensors& weights);

  // First stage: int64 tokens [B, T]; others: float hidden [B, T, d_model].
  // Last stage returns logits [B, T, vocab]; others hidden [B, T, d_model].
  torch::Tensor forward(const torch::Tensor& input);

  // The parts forward runs, one at a time (the same arithmetic): the token
  // and position embedding [B, T] → [B, T, d]; block LAYER [B, T, d] →
  // [B, T, d]; ln_f and the tied LM head [B, T, d] → logits [B, T, vocab].
  torch::Tensor embed(const torch::Tensor& tokens);
  torch::Tensor block(int layer, const torch::Tensor& x);
  torch::Tensor head(const torch::Tensor& x);

  // Null (the default) in training; it costs one branch per part.
  void set_observer(ForwardObserver* observer) { observer_ = observer; }

  // The wrong-op cheat (tests and the devnet only, never honest training):
  // forward adds DELTA to block LAYER's output until set back to 0; the
  // observer sees the altered output, as the cheater's own trace records it.
  void set_block_offset(int layer, double delta) {
    offset_layer_ = layer;
    offset_ = delta;
  }

  bool is_first() const { return first_layer_ == 0; }
  bool is_last() const { return first_layer_ + layer_count_ == config_.layers; }
  int first_layer() const { return first_layer_; }
  int layer_count() const { return layer_count_; }

  // Whole-model names in a fixed order: wte, wpe (first stage), then each
  // block's ln1, attn.qkv, attn.proj, ln2, mlp.fc, mlp.proj (weight, bias),
  // then ln_f, then wte (a last stage that is not the first). Live tensors.
  NamedTensors named_parameters() const { return parameters_; }

 private:
  StageModel(const ModelConfig& config, int first_layer, int layer_count);
  torch::Tensor add(const std::string& name, std::vector<int64_t> shape, double init_std, double fill,
                    uint64_t seed);
  torch::Tensor adopt(const std::string& name, torch::Tensor t);
  torch::Tensor param(const std::string& name) const;

  ModelConfig config_;
  int first_layer_, layer_count_;
  NamedTensors parameters_;
  std::map<std::string, torch::Tensor> by_name_;
  torch::Tensor causal_mask_;
  ForwardObserver* observer_ = nullptr;
  int offset_layer_ = -1;
  double offset_ = 0;
};

// Mean token cross-entropy of LOGITS [B, T, V] against TARGETS [B, T].
torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& targets);

}  // namespace sn::model
