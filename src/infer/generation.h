// Private to sn_infer: the generation loop every engine shares (prompt checks,
// sampling, stop strings, streaming text, timing), over a step function that
// runs the model on new tokens and returns the last position's logits.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <vector>

#include "infer/engine.h"
#include "model/data.h"

namespace sn::infer {

// Runs TOKENS (the prompt, then one sampled token at a time) at POSITION (the
// session's length before them); returns logits [vocab] of the last one.
using StepFunction = std::function<Result<torch::Tensor>(const std::vector<int32_t>& tokens, int64_t position)>;

// The prompt after the context check: PROMPT unchanged, or its last tokens when
// truncation is asked; invalid_input for 0 tokens or no room to generate.
Result<std::vector<int32_t>> fit_prompt(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                        int64_t context);

// TEXT's tokens, or, when TEXT has more bytes than CONTEXT + 1 tokens can
// cover, the tokens of its tail only (still more than CONTEXT): BPE encoding is
// quadratic in the text's length, and a prompt that long is refused or
// truncated to its end anyway.
std::vector<int32_t> encode_prompt(const model::Tokenizer& tokenizer, std::string_view text, int64_t context);

Result<GenerationStats> run_generation(const model::Tokenizer& tokenizer, int64_t context,
                                       const std::vector<int32_t>& prompt, const SamplingParams& params,
                                       const StepFunction& step, const TokenCallback& on_token);

}  // namespace sn::infer
