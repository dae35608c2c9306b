// Text generation as the CLI and the OpenAI-compatible gateway see it, with no
// LibTorch in sight: an Engine turns a prompt into tokens, one at a time.
// Two engines exist: the whole model in this process (open_local_engine) and a
// chain of block servers across the network (infer/route.h). Both sample the
// same way, so greedy output is the same token for token (docs/inference.md).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/job.h"
#include "core/result.h"

namespace sn::infer {

struct SamplingParams {
  int max_tokens = 64;             // new tokens at most (≥ 1)
  double temperature = 0.0;        // 0: greedy (argmax); else softmax(logits / T)
  double top_p = 1.0;              // nucleus: smallest set of tokens whose probability ≥ top_p, (0, 1]
  uint64_t seed = 0;               // sampling is reproducible per seed
  std::vector<std::string> stop;   // generation ends before the first occurrence of any of these
  bool truncate_prompt = false;    // keep the last tokens of a too-long prompt instead of refusing it
};

// Checks PARAMS (ranges above; at most 4 stop strings, none empty): an
// invalid_input error naming the field.
Status check_sampling(const SamplingParams& params);

struct TokenEvent {
  int32_t id = 0;
  std::string text;                // the text this token adds (may be empty mid-UTF-8 character)
  int index = 0;                   // 0 for the first generated token
};

struct GenerationStats {
  int prompt_tokens = 0;
  int generated_tokens = 0;
  double first_token_s = 0;        // request start → first token sampled (prefill included)
  double total_s = 0;
  std::string finish_reason;       // "length", "stop" or "cancelled"
  std::string text;                // the whole generated text (stop string excluded)
  double prompt_tokens_per_s() const { return first_token_s > 0 ? prompt_tokens / first_token_s : 0; }
  double generated_tokens_per_s() const {
    return total_s > first_token_s && generated_tokens > 1 ? (generated_tokens - 1) / (total_s - first_token_s) : 0;
  }
};

// What a model is: its id (the hash of its manifest, infer/model_store.h, the
// same whether it runs in this process or on block servers), a display name,
// and its shape.
struct ModelCard {
  std::string id;
  std::string name;
  ModelConfig config;
};

// Called with each generated token as soon as it is sampled. Returning false
// cancels the generation (a client went away): the engine frees its sessions
// and returns with finish_reason "cancelled".
using TokenCallback = std::function<bool(const TokenEvent&)>;

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const ModelCard& card() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // Generates after PROMPT. Errors: invalid_input for an empty prompt, a
  // prompt that leaves no room to generate within the context (unless
  // params.truncate_prompt) or bad params, naming the figures; unavailable /
  // timeout / bad_peer from remote engines when no server could continue.
  // Thread-safe: concurrent calls are independent sessions.
  virtual Result<GenerationStats> generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                           const TokenCallback& on_token) = 0;
};

// The whole model of MODEL_FILE (a safetensors file written by solvernet train,
// whose metadata carries the model config and tokenizer) in this process.
Result<std::unique_ptr<Engine>> open_local_engine(const std::filesystem::path& model_file);

}  // namespace sn::infer
