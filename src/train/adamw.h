// AdamW over a fixed, ordered list of named parameters. Written out (rather
// than torch::optim) so its state is plain named tensors that checkpoint as
// safetensors, and so the single-process and distributed runs share it exactly.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "core/job.h"
#include "core/result.h"

namespace sn::train {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

class AdamW {
 public:
  AdamW(NamedTensors parameters, const TrainConfig& config);

  // Learning rate at STEP (0-based): linear warm-up, then constant.
  double learning_rate(int64_t step) const;
  // Applies one update with the gradients currently in .grad(); STEP is 0-based.
  void step(int64_t step);

  // Optimizer state under names "adam.m.<param>", "adam.v.<param>", plus "adam.step".
  NamedTensors state() const;
  Status load_state(const NamedTensors& state);
  int64_t steps_taken() const { return steps_taken_; }

 private:
  NamedTensors parameters_;
  std::vector<torch::Tensor> m_, v_;
  TrainConfig config_;
  int64_t steps_taken_ = 0;
};

}  // namespace sn::train
