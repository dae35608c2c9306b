#include "model/gpt.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <cmath>
#include <mutex>

#include "core/hash.h"

namespace sn::model {

void init_torch_single_thread() {
  static std::once_flag once;
  std::call_once(once, [] {
    at::set_num_threads(1);
    // OpenBLAS reads OPENBLAS_NUM_THREADS when it is loaded, before main, so
    // setting the variable now is too late; its own call still works. Its
    // idle threads spin, and several node processes on two cores then run
    // about half as fast. Looked up at run time: the BLAS behind LibTorch is
    // chosen by Debian's alternatives and need not be OpenBLAS.
    for (const char* name : {"openblas_set_num_threads", "goto_set_num_threads"})
      if (void* symbol = ::dlsym(RTLD_DEFAULT, name)) {
        reinterpret_cast<void (*)(int)>(symbol)(1);
        break;
      }
    try {
      at::set_num_interop_threads(1);
    } catch (const std::exception&) {
      // Already set (or inter-op work started): intra-op pinning is what matters.
    }
  });
}

static uint64_t seed_for(uint64_t seed, const std::string& name) {
  Hash256 h = Hasher().update_u64(seed).update(name).finish();
  uint64_t out = 0;
  for (int i = 0; i < 8; ++i) out |= static_cast<uint64_t>(h[static_cast<size_t>(i)]) << (8 * i);
  return out;
}

torch::Tensor StageModel::add(const std::string& name, std::vector<int64_t> shape, double init_std, double fill,
                              uint64_t seed) {
  torch::Tensor t = torch::empty(shape, torch::kFloat32);
  {
    torch::NoGradGuard no_grad;
    if (init_std > 0) {
      auto generator = at::detail::createCPUGenerator(seed_for(seed, name));
      t.normal_(0.0, init_std, generator);
    } else {
      t.fill_(fill);
    }
  }
  return adopt(name, t);
}

torch::Tensor StageModel::adopt(const std::string& name, torch::Tensor t) {
  std::string registered = name;
  for (char& c : registered)
    if (c == '.') c = '_';
  t = register_parameter(registered, t);
  parameters_.emplace_back(name, t);
  by_name_[name] = t;
  return t;
}

torch::Tensor StageModel::param(const std::string& name) const { return by_name_.at(name); }

StageModel::StageModel(const ModelConfig& config, int first_layer, int layer_count)
    : config_(config), first_layer_(first_layer), layer_count_(layer_count) {
  // Job files are validated by parse_job; these catch programming errors.
  TORCH_CHECK(config.layers >= 1 && config.d_model >= 1 && config.heads >= 1 && config.d_model % config.heads == 0,
              "StageModel: d_model (", config.d_model, ") must be a positive multiple of heads (", config.heads, ")");
  TORCH_CHECK(first_layer >= 0 && layer_count >= 0 && first_layer + layer_count <= config.layers,
              "StageModel: blocks [", first_layer, ", ", first_layer + layer_count, ") outside the model's ",
              config.layers, " layers");
  causal_mask_ = torch::ones({config.seq_len, config.seq_len}, torch::kBool).triu(1);
}

std::unique_ptr<StageModel> StageModel::with_weights(const ModelConfig& config, int first_layer, int layer_count,
                                                     const NamedTensors& weights) {
  std::unique_ptr<StageModel> model(new StageModel(config, first_layer, layer_count));
  for (const auto& [name, t] : weights) model->adopt(name, t.detach().clone());
  return model;
}

StageModel::StageModel(const ModelConfig& config, int first_layer, int layer_count, uint64_t seed)
    : StageModel(config, first_layer, layer_count) {
  const int64_t d = config.d_model, ff = config.d_ff;
  const double std = 0.02;
  // GPT-2: residual projections scaled down so the residual stream's variance
  // does not grow with depth.
  const double residual_std = 0.02 / std::sqrt(2.0 * static_cast<double>(config.layers));
  if (is_first()) {
    add("wte.weight", {config.vocab, d}, std, 0, seed);
    add("wpe.weight", {config.seq_len, d}, 0.01, 0, seed);
  }
  for (int layer = first_layer; layer < first_layer + layer_count; ++layer) {
    std::string p = "blocks." + std::to_string(layer) + ".";
    add(p + "ln1.weight", {d}, 0, 1.0, seed);
    add(p + "ln1.bias", {d}, 0, 0.0, seed);
    add(p + "attn.qkv.weight", {3 * d, d}, std, 0, seed);
    add(p + "attn.qkv.bias", {3 * d}, 0, 0.0, seed);
    add(p + "attn.proj.weight", {d, d}, residual_std, 0, seed);
    add(p + "attn.proj.bias", {d}, 0, 0.0, seed);
    add(p + "ln2.weight", {d}, 0, 1.0, seed);
    add(p + "ln2.bias", {d}, 0, 0.0, seed);
    add(p + "mlp.fc.weight", {ff, d}, std, 0, seed);
    add(p + "mlp.fc.bias", {ff}, 0, 0.0, seed);
    add(p + "mlp.proj.weight", {d, ff}, residual_std, 0, seed);
    add(p + "mlp.proj.bias", {d}, 0, 0.0, seed);
  }
  if (is_last()) {
    add("ln_f.weight", {d}, 0, 1.0, seed);
    add("ln_f.bias", {d}, 0, 0.0, seed);
    if (!is_first()) add("wte.weight", {config.vocab, d}, std, 0, seed);
  }
}

torch::Tensor StageModel::block(int layer, const torch::Tensor& x) {
  const std::string p = "blocks." + std::to_string(layer) + ".";
  const int64_t batch = x.size(0), seq = x.size(1), d = config_.d_model, heads = config_.heads;
  const int64_t head_dim = d / heads;
  auto h = torch::layer_norm(x, {d}, param(p + "ln1.weight"), param(p + "ln1.bias"), 1e-5);
  auto qkv = torch::linear(h, param(p + "attn.qkv.weight"), param(p + "attn.qkv.bias"));
  auto parts = qkv.split(d, -1);
  auto heads_of = [&](const torch::Tensor& t) { return t.view({batch, seq, heads, head_dim}).transpose(1, 2); };
  auto q = heads_of(parts[0]), k = heads_of(parts[1]), v = heads_of(parts[2]);
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(head_dim));
  auto mask = causal_mask_.slice(0, 0, seq).slice(1, 0, seq);
  scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  auto attention = torch::softmax(scores, -1);
  auto y = torch::matmul(attention, v).transpose(1, 2).contiguous().view({batch, seq, d});
  auto out = x + torch::linear(y, param(p + "attn.proj.weight"), param(p + "attn.proj.bias"));
  auto h2 = torch::layer_norm(out, {d}, param(p + "ln2.weight"), param(p + "ln2.bias"), 1e-5);
  auto mlp = torch::linear(torch::gelu(torch::linear(h2, param(p + "mlp.fc.weight"), param(p + "mlp.fc.bias"))),
                           param(p + "mlp.proj.weight"), param(p + "mlp.proj.bias"));
  return out + mlp;
}

torch::Tensor StageModel::embed(const torch::Tensor& tokens) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kInt64, "first stage takes int64 tokens [B, T]");
  const int64_t seq = tokens.size(1);
  TORCH_CHECK(seq <= config_.seq_len, "sequence longer than model.seq_len");
  auto positions = torch::arange(seq, torch::kInt64);
  return torch::embedding(param("wte.weight"), tokens) + torch::embedding(param("wpe.weight"), positions);
}

torch::Tensor StageModel::head(const torch::Tensor& x) {
  auto normed = torch::layer_norm(x, {config_.d_model}, param("ln_f.weight"), param("ln_f.bias"), 1e-5);
  return torch::matmul(normed, param("wte.weight").t());
}

torch::Tensor StageModel::forward(const torch::Tensor& input) {
  using Part = ForwardObserver::Part;
  torch::Tensor x;
  if (is_first()) {
    x = embed(input);
    if (observer_) observer_->on_forward(Part::embed, 0, input, x);
  } else {
    TORCH_CHECK(input.dim() == 3 && input.size(2) == config_.d_model, "stage takes hidden [B, T, d_model]");
    x = input;
  }
  for (int layer = first_layer_; layer < first_layer_ + layer_count_; ++layer) {
    torch::Tensor y = block(layer, x);
    if (offset_ != 0 && layer == offset_layer_) y = y + offset_;
    if (observer_) observer_->on_forward(Part::block, layer, x, y);
    x = y;
  }
  if (!is_last()) return x;
  torch::Tensor logits = head(x);
  if (observer_) observer_->on_forward(Part::head, 0, x, logits);
  return logits;
}

torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}));
}

}  // namespace sn::model
