#include "train/adamw.h"

#include <cmath>

namespace sn::train {

AdamW::AdamW(NamedTensors parameters, const TrainConfig& config)
    : parameters_(std::move(parameters)), config_(config) {
  for (const auto& [name, p] : parameters_) {
    m_.push_back(torch::zeros_like(p).detach());
    v_.push_back(torch::zeros_like(p).detach());
  }
}

double AdamW::learning_rate(int64_t step) const {
  if (config_.warmup_steps > 0 && step < config_.warmup_steps)
    return config_.lr * static_cast<double>(step + 1) / static_cast<double>(config_.warmup_steps);
  return config_.lr;
}

void AdamW::step(int64_t step) {
  torch::NoGradGuard no_grad;
  ++steps_taken_;
  double lr = learning_rate(step);
  double bias1 = 1.0 - std::pow(config_.beta1, static_cast<double>(steps_taken_));
  double bias2 = 1.0 - std::pow(config_.beta2, static_cast<double>(steps_taken_));
  for (size_t i = 0; i < parameters_.size(); ++i) {
    torch::Tensor p = parameters_[i].second;
    torch::Tensor g = p.grad();
    if (!g.defined()) continue;
    // Decay matrices only: biases, LayerNorm and embeddings of rank 1 keep their scale.
    if (config_.weight_decay > 0 && p.dim() >= 2) p.mul_(1.0 - lr * config_.weight_decay);
    m_[i].mul_(config_.beta1).add_(g, 1.0 - config_.beta1);
    v_[i].mul_(config_.beta2).addcmul_(g, g, 1.0 - config_.beta2);
    torch::Tensor denom = (v_[i] / bias2).sqrt_().add_(config_.eps);
    p.addcdiv_(m_[i], denom, -lr / bias1);
  }
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    out.emplace_back("adam.m." + parameters_[i].first, m_[i]);
    out.emplace_back("adam.v." + parameters_[i].first, v_[i]);
  }
  out.emplace_back("adam.step", torch::tensor({steps_taken_}, torch::kInt64));
  return out;
}

Status AdamW::load_state(const NamedTensors& state) {
  std::map<std::string, torch::Tensor> by_name(state.begin(), state.end());
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    for (auto [prefix, target] : {std::pair{"adam.m.", &m_[i]}, std::pair{"adam.v.", &v_[i]}}) {
      auto it = by_name.find(prefix + parameters_[i].first);
      if (it == by_name.end()) return make_error("checkpoint lacks {}{}", prefix, parameters_[i].first);
      if (!it->second.sizes().equals(target->sizes()))
        return make_error("checkpoint tensor {}{} has the wrong shape", prefix, parameters_[i].first);
      target->copy_(it->second);
    }
  }
  auto step = by_name.find("adam.step");
  if (step == by_name.end() || step->second.numel() != 1) return make_error("checkpoint lacks adam.step");
  steps_taken_ = step->second.item<int64_t>();
  return ok_status();
}

}  // namespace sn::train
