#include "infer/span.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "core/fs.h"
#include "core/memory.h"
#include "model/data.h"
#include "model/safetensors.h"

namespace sn::infer {
namespace {

constexpr const char* kModelKey = model::kModelConfigKey;
constexpr const char* kTokenizerKey = model::kTokenizerKey;
constexpr const char* kNameKey = model::kModelNameKey;

// The tensors a span needs, with their shapes (whole-model names, model/gpt.h).
std::vector<std::pair<std::string, std::vector<int64_t>>> span_tensors(const ModelConfig& c, int first, int end) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  const int64_t d = c.d_model, ff = c.d_ff;
  // The LM head is tied to the token embedding, so a span with the head needs it too.
  if (first == 0 || end == c.layers) out.push_back({"wte.weight", {c.vocab, d}});
  if (first == 0) out.push_back({"wpe.weight", {c.seq_len, d}});
  for (int layer = first; layer < end; ++layer) {
    const std::string p = "blocks." + std::to_string(layer) + ".";
    out.push_back({p + "ln1.weight", {d}});
    out.push_back({p + "ln1.bias", {d}});
    out.push_back({p + "attn.qkv.weight", {3 * d, d}});
    out.push_back({p + "attn.qkv.bias", {3 * d}});
    out.push_back({p + "attn.proj.weight", {d, d}});
    out.push_back({p + "attn.proj.bias", {d}});
    out.push_back({p + "ln2.weight", {d}});
    out.push_back({p + "ln2.bias", {d}});
    out.push_back({p + "mlp.fc.weight", {ff, d}});
    out.push_back({p + "mlp.fc.bias", {ff}});
    out.push_back({p + "mlp.proj.weight", {d, ff}});
    out.push_back({p + "mlp.proj.bias", {d}});
  }
  if (end == c.layers) {
    out.push_back({"ln_f.weight", {d}});
    out.push_back({"ln_f.bias", {d}});
  }
  return out;
}

std::string shape_text(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Status check_config(const ModelConfig& c) {
  auto bad = [](int64_t v, int64_t lo, int64_t hi) { return v < lo || v > hi; };
  if (bad(c.layers, 1, 1024) || bad(c.d_model, 1, 65536) || bad(c.heads, 1, 1024) || bad(c.d_ff, 1, 262144) ||
      bad(c.vocab, 3, 1 << 22) || bad(c.seq_len, 1, 1 << 20) || c.d_model % c.heads != 0)
    return input_error("model config out of range (layers {}, d_model {}, heads {}, d_ff {}, vocab {}, seq_len {})",
                       c.layers, c.d_model, c.heads, c.d_ff, c.vocab, c.seq_len);
  return ok_status();
}

}  // namespace

Result<ModelFile> load_model_file(const std::filesystem::path& path) {
  SN_TRY(check_input_file(path, "model"));
  std::error_code size_error;
  const auto size = std::filesystem::file_size(path, size_error);
  if (size_error) return input_error("model {}: {}", path.string(), size_error.message());
  // Read whole, then parsed into tensors of the same size: twice the file in memory.
  SN_TRY(check_memory_for(2 * static_cast<uint64_t>(size), fmt::format("model {}", path.string())));
  SN_ASSIGN(std::string bytes, read_file(path));
  auto metadata = model::safetensors_metadata(bytes);
  if (!metadata.ok()) return input_error("model {}: {}", path.string(), metadata.error().message);
  auto model_it = metadata->find(kModelKey), tokenizer_it = metadata->find(kTokenizerKey);
  if (model_it == metadata->end() || tokenizer_it == metadata->end())
    return input_error(
        "model {}: no solvernet.model / solvernet.tokenizer metadata (written by an older solvernet or another tool; "
        "train it again with this version)",
        path.string());
  ModelFile file;
  try {
    auto j = nlohmann::json::parse(model_it->second);
    file.config.layers = j.at("layers").get<int64_t>();
    file.config.d_model = j.at("d_model").get<int64_t>();
    file.config.heads = j.at("heads").get<int64_t>();
    file.config.d_ff = j.at("d_ff").get<int64_t>();
    file.config.vocab = j.at("vocab").get<int64_t>();
    file.config.seq_len = j.at("seq_len").get<int64_t>();
  } catch (const std::exception& e) {
    return input_error("model {}: bad solvernet.model metadata: {}", path.string(), e.what());
  }
  if (auto checked = check_config(file.config); !checked.ok())
    return input_error("model {}: {}", path.string(), checked.error().message);
  auto tokenizer = model::Tokenizer::parse_vocab(tokenizer_it->second, path.string() + " (tokenizer)");
  if (!tokenizer.ok()) return input_error("{}", tokenizer.error().message);
  if (tokenizer->vocab_size() > file.config.vocab)
    return input_error("model {}: tokenizer has {} pieces, the model's vocab is {}", path.string(),
                       tokenizer->vocab_size(), file.config.vocab);
  file.tokenizer_vocab = tokenizer_it->second;
  if (auto name = metadata->find(kNameKey); name != metadata->end()) file.name = name->second;
  auto tensors = model::load_safetensors_bytes(bytes);
  if (!tensors.ok()) return input_error("model {}: {}", path.string(), tensors.error().message);
  file.tensors = std::move(*tensors);
  // Every tensor of the whole model present with its shape.
  auto whole = SpanModel::create(file.config, 0, static_cast<int>(file.config.layers), file.tensors);
  if (!whole.ok()) return input_error("model {}: {}", path.string(), whole.error().message);
  file.file_hash = hash_string(bytes);
  return file;
}

int64_t KvCache::bytes_for(const ModelConfig& config, int64_t layer_count, int64_t length) {
  return 2 * layer_count * length * config.d_model * static_cast<int64_t>(sizeof(float));
}

Result<SpanModel> SpanModel::create(const ModelConfig& config, int first_block, int end_block,
                                    const model::NamedTensors& weights) {
  SN_TRY(check_config(config));
  if (first_block < 0 || end_block <= first_block || end_block > config.layers)
    return input_error("span [{}, {}) is not a non-empty range of the model's {} blocks", first_block, end_block,
                       config.layers);
  std::map<std::string, torch::Tensor> by_name;
  for (const auto& [name, tensor] : weights) by_name[name] = tensor;
  SpanModel span;
  span.config_ = config;
  span.first_ = first_block;
  span.end_ = end_block;
  for (const auto& [name, shape] : span_tensors(config, first_block, end_block)) {
    auto it = by_name.find(name);
    if (it == by_name.end()) return input_error("tensor {} missing (blocks [{}, {}))", name, first_block, end_block);
    if (it->second.scalar_type() != torch::kFloat32 || it->second.sizes() != c10::IntArrayRef(shape))
      return input_error("tensor {} is {} {}, expected f32 {}", name, std::string(c10::toString(it->second.scalar_type())),
                         shape_text(it->second.sizes()), shape_text(shape));
    if (!torch::isfinite(it->second).all().item<bool>())
      return input_error("tensor {} holds NaN or infinite values", name);
    span.weights_[name] = it->second.detach().contiguous();
  }
  return span;
}

int64_t SpanModel::parameter_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : weights_) bytes += t.numel() * static_cast<int64_t>(sizeof(float));
  return bytes;
}

Status SpanModel::check_input(const torch::Tensor& input, int64_t cached, int64_t limit) const {
  if (!input.defined()) return input_error("no input tensor");
  int64_t t = 0;
  if (embeds()) {
    if (input.dim() != 1 || input.scalar_type() != torch::kInt64)
      return input_error("blocks [{}, {}) take int64 token ids [T], got {} {}", first_, end_,
                         std::string(c10::toString(input.scalar_type())), shape_text(input.sizes()));
    t = input.size(0);
    if (t > 0) {
      const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();
      if (lo < 0 || hi >= config_.vocab)
        return input_error("token id {} outside the vocabulary [0, {})", lo < 0 ? lo : hi, config_.vocab);
    }
  } else {
    if (input.dim() != 2 || input.scalar_type() != torch::kFloat32 || input.size(1) != config_.d_model)
      return input_error("blocks [{}, {}) take f32 hidden states [T, {}], got {} {}", first_, end_, config_.d_model,
                         std::string(c10::toString(input.scalar_type())), shape_text(input.sizes()));
    t = input.size(0);
    if (t > 0 && !torch::isfinite(input).all().item<bool>()) return input_error("hidden states are not finite");
  }
  if (t < 1) return input_error("an empty step (0 positions)");
  if (limit <= 0 || limit >= config_.seq_len) {
    if (cached + t > config_.seq_len)
      return input_error("{} cached + {} new positions exceed the model's context of {} tokens", cached, t,
                         config_.seq_len);
  } else if (cached + t > limit) {
    return input_error("{} cached + {} new positions exceed the session's {} (the model's context is {} tokens)", cached,
                       t, limit, config_.seq_len);
  }
  return ok_status();
}

// The span's arithmetic for B sessions, each adding T positions (B > 1 only
// with T == 1). Mirrors StageModel::block op for op so that a one-process run
// and a chain of servers compute the same bits for the same step shapes.
static torch::Tensor run_blocks(const ModelConfig& c, int first, int end,
                                const std::map<std::string, torch::Tensor>& w, torch::Tensor x,
                                const std::vector<KvCache*>& caches, std::vector<KvCache>* updated) {
  const int64_t batch = x.size(0), seq = x.size(1), d = c.d_model, heads = c.heads, head_dim = d / heads;
  auto param = [&](const std::string& name) -> const torch::Tensor& { return w.at(name); };
  updated->assign(caches.size(), KvCache{});
  for (size_t b = 0; b < caches.size(); ++b) updated->at(b).length = caches[b]->length + seq;
  for (int layer = first; layer < end; ++layer) {
    const std::string p = "blocks." + std::to_string(layer) + ".";
    const size_t li = static_cast<size_t>(layer - first);
    auto h = torch::layer_norm(x, {d}, param(p + "ln1.weight"), param(p + "ln1.bias"), 1e-5);
    auto qkv = torch::linear(h, param(p + "attn.qkv.weight"), param(p + "attn.qkv.bias"));
    auto parts = qkv.split(d, -1);
    auto heads_of = [&](const torch::Tensor& t) { return t.view({batch, seq, heads, head_dim}).transpose(1, 2); };
    auto q = heads_of(parts[0]), k = heads_of(parts[1]), v = heads_of(parts[2]);
    std::vector<torch::Tensor> ys;
    for (size_t b = 0; b < caches.size(); ++b) {
      KvCache& cache = *caches[b];
      const int64_t past = cache.length;
      auto qb = q.slice(0, static_cast<int64_t>(b), static_cast<int64_t>(b) + 1);
      auto kb = k.slice(0, static_cast<int64_t>(b), static_cast<int64_t>(b) + 1);
      auto vb = v.slice(0, static_cast<int64_t>(b), static_cast<int64_t>(b) + 1);
      torch::Tensor keys = past > 0 ? torch::cat({cache.keys[li], kb}, 2) : kb.contiguous();
      torch::Tensor values = past > 0 ? torch::cat({cache.values[li], vb}, 2) : vb.contiguous();
      auto scores = torch::matmul(qb, keys.transpose(-2, -1)) / std::sqrt(static_cast<double>(head_dim));
      // Position past + i sees keys 0 .. past + i.
      auto mask = torch::ones({seq, past + seq}, torch::kBool).triu(past + 1);
      scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
      auto attention = torch::softmax(scores, -1);
      ys.push_back(torch::matmul(attention, values));
      updated->at(b).keys.push_back(keys);
      updated->at(b).values.push_back(values);
    }
    auto y = (ys.size() == 1 ? ys[0] : torch::cat(ys, 0)).transpose(1, 2).contiguous().view({batch, seq, d});
    auto out = x + torch::linear(y, param(p + "attn.proj.weight"), param(p + "attn.proj.bias"));
    auto h2 = torch::layer_norm(out, {d}, param(p + "ln2.weight"), param(p + "ln2.bias"), 1e-5);
    auto mlp = torch::linear(torch::gelu(torch::linear(h2, param(p + "mlp.fc.weight"), param(p + "mlp.fc.bias"))),
                             param(p + "mlp.proj.weight"), param(p + "mlp.proj.bias"));
    x = out + mlp;
  }
  return x;
}

Result<torch::Tensor> SpanModel::forward(KvCache& cache, const torch::Tensor& input) const {
  SN_TRY(check_input(input, cache.length));
  auto outputs = forward_batch_unchecked({&cache}, {input}, /*all_rows=*/false);
  return outputs[0];
}

Result<std::vector<torch::Tensor>> SpanModel::forward_batch(const std::vector<KvCache*>& caches,
                                                            const std::vector<torch::Tensor>& inputs) const {
  if (caches.size() != inputs.size() || caches.empty())
    return input_error("{} caches for {} inputs", caches.size(), inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    SN_TRY(check_input(inputs[i], caches[i]->length));
    if (inputs[i].size(0) != 1 && inputs.size() > 1)
      return input_error("a batched step adds one position per session, session {} has {}", i, inputs[i].size(0));
  }
  return forward_batch_unchecked(caches, inputs, false);
}

Result<torch::Tensor> SpanModel::forward_full(const torch::Tensor& input) const {
  SN_TRY(check_input(input, 0));
  KvCache scratch;
  return forward_batch_unchecked({&scratch}, {input}, /*all_rows=*/true)[0];
}

std::vector<torch::Tensor> SpanModel::forward_batch_unchecked(const std::vector<KvCache*>& caches,
                                                              const std::vector<torch::Tensor>& inputs,
                                                              bool all_rows) const {
  torch::NoGradGuard no_grad;
  const int64_t d = config_.d_model;
  torch::Tensor x;
  if (embeds()) {
    std::vector<torch::Tensor> rows;
    for (size_t b = 0; b < inputs.size(); ++b) {
      const int64_t t = inputs[b].size(0), past = caches[b]->length;
      auto positions = torch::arange(past, past + t, torch::kInt64);
      rows.push_back((torch::embedding(weights_.at("wte.weight"), inputs[b]) +
                      torch::embedding(weights_.at("wpe.weight"), positions))
                         .unsqueeze(0));
    }
    x = rows.size() == 1 ? rows[0] : torch::cat(rows, 0);
  } else {
    std::vector<torch::Tensor> rows;
    for (const auto& input : inputs) rows.push_back(input.unsqueeze(0));
    x = rows.size() == 1 ? rows[0] : torch::cat(rows, 0);
  }
  std::vector<KvCache> updated;
  x = run_blocks(config_, first_, end_, weights_, x, caches, &updated);
  for (size_t b = 0; b < caches.size(); ++b) *caches[b] = std::move(updated[b]);
  std::vector<torch::Tensor> outputs;
  for (int64_t b = 0; b < x.size(0); ++b) {
    torch::Tensor rows = x[b];  // [T, d]
    if (has_head()) {
      if (!all_rows) rows = rows.slice(0, rows.size(0) - 1);
      rows = torch::layer_norm(rows, {d}, weights_.at("ln_f.weight"), weights_.at("ln_f.bias"), 1e-5);
      rows = torch::matmul(rows, weights_.at("wte.weight").t());
    }
    outputs.push_back(rows.contiguous());
  }
  return outputs;
}

int32_t sample_token(const torch::Tensor& logits, double temperature, double top_p, uint64_t seed, int64_t index) {
  auto values = logits.to(torch::kFloat64).contiguous();
  const double* v = values.data_ptr<double>();
  const int64_t n = values.numel();
  if (temperature <= 0) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (v[i] > v[best]) best = i;
    return static_cast<int32_t>(best);
  }
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, v[i]);
  std::vector<std::pair<double, int32_t>> probs;
  probs.reserve(static_cast<size_t>(n));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    double p = std::exp((v[i] - top) / temperature);
    sum += p;
    probs.emplace_back(p, static_cast<int32_t>(i));
  }
  std::stable_sort(probs.begin(), probs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  double kept = 0;
  size_t count = 0;
  while (count < probs.size() && (count == 0 || kept < top_p * sum)) kept += probs[count++].first;
  Hash256 h = Hasher().update("solvernet-sample").update_u64(seed).update_u64(static_cast<uint64_t>(index)).finish();
  uint64_t word = 0;
  for (int i = 0; i < 8; ++i) word |= static_cast<uint64_t>(h[static_cast<size_t>(i)]) << (8 * i);
  std::mt19937_64 rng(word);
  double u = std::uniform_real_distribution<double>(0.0, kept)(rng);
  for (size_t i = 0; i < count; ++i) {
    u -= probs[i].first;
    if (u <= 0) return probs[i].second;
  }
  return probs[count - 1].second;
}

}  // namespace sn::infer
