#include "infer/generation.h"

#include <chrono>

#include "infer/span.h"

namespace sn::infer {

Status check_sampling(const SamplingParams& p) {
  if (p.max_tokens < 1) return input_error("max_tokens must be at least 1, got {}", p.max_tokens);
  if (!(p.temperature >= 0 && p.temperature <= 100))
    return input_error("temperature must be in [0, 100], got {}", p.temperature);
  if (!(p.top_p > 0 && p.top_p <= 1)) return input_error("top_p must be in (0, 1], got {}", p.top_p);
  if (p.stop.size() > 4) return input_error("at most 4 stop strings, got {}", p.stop.size());
  for (const auto& s : p.stop) {
    if (s.empty()) return input_error("a stop string is empty");
    if (s.size() > 256) return input_error("a stop string is {} bytes, at most 256", s.size());
  }
  return ok_status();
}

std::vector<int32_t> encode_prompt(const model::Tokenizer& tokenizer, std::string_view text, int64_t context) {
  const size_t limit = tokenizer.max_piece_bytes() * static_cast<size_t>(context + 1);
  if (text.size() <= limit) return tokenizer.encode(text);
  size_t start = text.size() - limit;
  while (start < text.size() && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) ++start;  // a character's start
  return tokenizer.encode(text.substr(start));
}

Result<std::vector<int32_t>> fit_prompt(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                        int64_t context) {
  if (prompt.empty()) return input_error("the prompt is empty (0 tokens)");
  // The last sampled token needs no forward pass, so a prompt may fill the context.
  if (static_cast<int64_t>(prompt.size()) <= context) return prompt;
  // Truncation keeps room for max_tokens (at least one token of prompt).
  const int64_t keep = std::max<int64_t>(1, context - params.max_tokens);
  if (!params.truncate_prompt)
    return input_error("the prompt is longer than the model's context of {} tokens (truncation, e.g. --truncate, keeps "
                       "its last {})",
                       context, keep);
  return std::vector<int32_t>(prompt.end() - keep, prompt.end());
}

namespace {

// Length of the longest suffix of TEXT that is a proper prefix of a stop string:
// text that must be held back until it is known not to start a stop string.
size_t held_back(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const auto& stop : stops)
    for (size_t n = std::min(stop.size() - 1, text.size()); n > hold; --n)
      if (text.compare(text.size() - n, n, stop, 0, n) == 0) {
        hold = n;
        break;
      }
  return hold;
}

int32_t sample_token_logits(const torch::Tensor& logits, const SamplingParams& p, int64_t index) {
  return sample_token(logits.reshape({-1}), p.temperature, p.top_p, p.seed, index);
}

}  // namespace

Result<GenerationStats> run_generation(const model::Tokenizer& tokenizer, int64_t context,
                                       const std::vector<int32_t>& prompt_in, const SamplingParams& params,
                                       const StepFunction& step, const TokenCallback& on_token) {
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  SN_TRY(check_sampling(params));
  SN_ASSIGN(auto prompt, fit_prompt(prompt_in, params, context));
  GenerationStats stats;
  stats.prompt_tokens = static_cast<int>(prompt.size());
  std::vector<int32_t> generated;
  std::string emitted;  // text already given to the callback
  int64_t position = 0;
  std::vector<int32_t> pending = prompt;
  stats.finish_reason = "length";
  while (true) {
    SN_ASSIGN(torch::Tensor logits, step(pending, position));
    position += static_cast<int64_t>(pending.size());
    const int32_t token = sample_token_logits(logits, params, static_cast<int64_t>(generated.size()));
    if (generated.empty()) stats.first_token_s = std::chrono::duration<double>(Clock::now() - started).count();
    generated.push_back(token);
    std::string text = tokenizer.decode(generated);
    size_t stop_at = std::string::npos;
    for (const auto& stop : params.stop) stop_at = std::min(stop_at, text.find(stop));
    const bool stopped = stop_at != std::string::npos;
    if (stopped) text.resize(stop_at);
    const bool last = stopped || static_cast<int>(generated.size()) >= params.max_tokens || position >= context;
    size_t visible = last ? text.size() : text.size() - held_back(text, params.stop);
    TokenEvent event;
    event.id = token;
    event.index = static_cast<int>(generated.size()) - 1;
    if (visible > emitted.size() && text.compare(0, emitted.size(), emitted) == 0) {
      event.text = text.substr(emitted.size(), visible - emitted.size());
      emitted = text.substr(0, visible);
    }
    stats.generated_tokens = static_cast<int>(generated.size());
    stats.text = text.substr(0, std::max(visible, emitted.size()));
    if (!on_token(event)) {
      stats.finish_reason = "cancelled";
      break;
    }
    if (stopped) {
      stats.finish_reason = "stop";
      break;
    }
    if (last) break;
    pending.assign(1, token);
  }
  stats.text = emitted;
  stats.total_s = std::chrono::duration<double>(Clock::now() - started).count();
  return stats;
}

}  // namespace sn::infer
