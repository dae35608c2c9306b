#include "train/aggregation.h"

#include <mutex>

namespace sn::train {
namespace {

std::mutex& factory_mutex() {
  static std::mutex m;
  return m;
}
PrivacyFactory& factory() {
  static PrivacyFactory f;
  return f;
}

}  // namespace

torch::Tensor sum_clipped_sequence_gradients(const std::vector<std::pair<std::string, torch::Tensor>>& parameters,
                                             int64_t batch, double bound,
                                             const std::function<void(int64_t b, bool keep_graph)>& backward) {
  int64_t total = 0;
  for (const auto& [name, p] : parameters) total += p.numel();
  torch::Tensor sum = torch::zeros({total}, torch::kFloat32);
  for (int64_t b = 0; b < batch; ++b) {
    for (const auto& [name, p] : parameters) {
      auto& g = const_cast<torch::Tensor&>(p).mutable_grad();
      if (g.defined()) g.zero_();
    }
    backward(b, b + 1 < batch);
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> parts;
    for (const auto& [name, p] : parameters) {
      const auto& g = p.grad();
      parts.push_back(g.defined() ? g.reshape({-1}) : torch::zeros({p.numel()}, torch::kFloat32));
    }
    torch::Tensor flat = torch::cat(parts);
    const double norm = flat.norm().item<double>();
    if (norm > bound) flat.mul_(bound / norm);
    sum.add_(flat);
  }
  return sum;
}

void install_privacy(PrivacyFactory f) {
  std::lock_guard<std::mutex> lock(factory_mutex());
  factory() = std::move(f);
}

Result<std::unique_ptr<PrivacyHooks>> make_privacy_hooks(const PrivacyContext& context) {
  PrivacyFactory f;
  {
    std::lock_guard<std::mutex> lock(factory_mutex());
    f = factory();
  }
  if (!f) return make_error("this node has no privacy module: it cannot run a job with a [privacy] table");
  return f(context);
}

}  // namespace sn::train
