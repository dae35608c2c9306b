// The whole model in this process: one span over every block, one KV cache per
// generation.
#include <fmt/format.h>

#include "core/hash.h"
#include "infer/engine.h"
#include "infer/generation.h"
#include "infer/model_store.h"
#include "infer/span.h"
#include "model/gpt.h"

namespace sn::infer {
namespace {

class LocalEngine : public Engine {
 public:
  LocalEngine(ModelCard card, SpanModel span, model::Tokenizer tokenizer)
      : card_(std::move(card)), span_(std::move(span)), tokenizer_(std::move(tokenizer)) {}

  const ModelCard& card() const override { return card_; }
  std::vector<int32_t> encode(std::string_view text) const override {
    return encode_prompt(tokenizer_, text, card_.config.seq_len);
  }
  std::string decode(const std::vector<int32_t>& ids) const override { return tokenizer_.decode(ids); }

  Result<GenerationStats> generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                   const TokenCallback& on_token) override {
    KvCache cache;
    auto step = [&](const std::vector<int32_t>& tokens, int64_t position) -> Result<torch::Tensor> {
      if (position != cache.length) return make_error("step at {} but {} cached", position, cache.length);
      auto input = torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.end()), torch::kInt64);
      SN_ASSIGN(auto logits, span_.forward(cache, input));
      return logits[0];
    };
    return run_generation(tokenizer_, card_.config.seq_len, prompt, params, step, on_token);
  }

 private:
  ModelCard card_;
  SpanModel span_;
  model::Tokenizer tokenizer_;
};

}  // namespace

Result<std::unique_ptr<Engine>> open_local_engine(const std::filesystem::path& model_file) {
  model::init_torch_single_thread();
  SN_ASSIGN(auto file, load_model_file(model_file));
  SN_ASSIGN(auto span, SpanModel::create(file.config, 0, static_cast<int>(file.config.layers), file.tensors));
  auto tokenizer = model::Tokenizer::parse_vocab(file.tokenizer_vocab, model_file.string());
  if (!tokenizer.ok()) return input_error("{}", tokenizer.error().message);
  ModelCard card;
  // The manifest's hash, as block servers announce the same model (infer/model_store.h).
  SN_ASSIGN(auto manifest, make_manifest(file));
  card.id = manifest.id;
  card.name = file.name.empty() ? model_file.stem().string() : file.name;
  card.config = file.config;
  return std::unique_ptr<Engine>(new LocalEngine(std::move(card), std::move(span), std::move(*tokenizer)));
}

}  // namespace sn::infer
