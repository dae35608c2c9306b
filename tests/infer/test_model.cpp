#include "test_model.h"

#include <stdexcept>

#include "model/gpt.h"
#include "model/safetensors.h"

namespace sn::infer::testing {

ModelConfig tiny_model_config() {
  ModelConfig c;
  c.layers = 4;
  c.d_model = 64;
  c.heads = 4;
  c.d_ff = 256;
  c.vocab = 64;
  c.seq_len = 64;
  return c;
}

std::string tiny_vocab_text() {
  std::string text = "<unk>\t0\n<s>\t0\n</s>\t0\n\xE2\x96\x81\t-1\n";
  const std::string chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'";
  int score = -2;
  for (char ch : chars.substr(0, 60)) text += std::string(1, ch) + "\t" + std::to_string(score--) + "\n";
  return text;
}

std::filesystem::path write_tiny_model(const std::filesystem::path& path, uint64_t seed, const ModelConfig& config) {
  model::init_torch_single_thread();
  model::StageModel gpt(config, 0, static_cast<int>(config.layers), seed);
  auto status = model::save_safetensors(path, gpt.named_parameters(),
                                        model::model_file_metadata("tiny-test", config, tiny_vocab_text()));
  if (!status.ok()) throw std::runtime_error(status.message());
  return path;
}

}  // namespace sn::infer::testing
