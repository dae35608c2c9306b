// solvernet generate: complete a prompt with a model in this process (KV cache,
// tokens printed as they come, then a timing line).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/command.h"
#include "cli/signals.h"
#include "infer/engine.h"

namespace sn::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  infer::SamplingParams sampling;
  bool json = false;
};

int run_generate(GenerateArgs& args) {
  install_stop_handlers();
  if (auto checked = infer::check_sampling(args.sampling); !checked.ok()) return fail("generate", checked.message(), 2);
  auto engine = infer::open_local_engine(args.model);
  if (!engine.ok()) return fail("generate", engine.message(), engine.error().exit_code);
  auto prompt = (*engine)->encode(args.prompt);
  auto stats = (*engine)->generate(prompt, args.sampling, [&](const infer::TokenEvent& event) {
    if (!args.json) std::cout << event.text << std::flush;
    return !stop_requested();
  });
  if (!args.json) std::cout << std::endl;
  if (!stats.ok()) return fail("generate", stats.message(), stats.error().exit_code);
  if (args.json) {
    nlohmann::json out = {{"model", (*engine)->card().name},
                          {"model_id", (*engine)->card().id},
                          {"text", stats->text},
                          {"finish_reason", stats->finish_reason},
                          {"prompt_tokens", stats->prompt_tokens},
                          {"generated_tokens", stats->generated_tokens},
                          {"first_token_s", stats->first_token_s},
                          {"total_s", stats->total_s},
                          {"prompt_tokens_per_s", stats->prompt_tokens_per_s()},
                          {"generated_tokens_per_s", stats->generated_tokens_per_s()}};
    std::cout << out.dump(2) << std::endl;
  } else {
    std::cerr << fmt::format("prompt {} tokens at {:.0f} tok/s · generated {} tokens at {:.0f} tok/s · first token {:.1f} ms · {}",
                             stats->prompt_tokens, stats->prompt_tokens_per_s(), stats->generated_tokens,
                             stats->generated_tokens_per_s(), stats->first_token_s * 1e3, stats->finish_reason)
              << std::endl;
  }
  return 0;
}

const CommandRegistration registration{
    "generate", "Complete a prompt with a model in this process (KV cache, streamed tokens, timing)",
    [](CLI::App& app) {
      auto args = std::make_shared<GenerateArgs>();
      app.add_option("--model", args->model, "model file (safetensors written by solvernet train)")->required();
      app.add_option("--prompt", args->prompt, "text to complete")->required();
      app.add_option("--max-tokens", args->sampling.max_tokens, "new tokens at most (default 64)");
      app.add_option("--temperature", args->sampling.temperature, "0 = greedy (default), else sampling temperature");
      app.add_option("--top-p", args->sampling.top_p, "nucleus sampling mass, (0, 1] (default 1)");
      app.add_option("--seed", args->sampling.seed, "sampling seed (default 0)");
      app.add_option("--stop", args->sampling.stop, "stop before this text (repeatable, at most 4)");
      app.add_flag("--truncate", args->sampling.truncate_prompt,
                   "keep the last tokens of a prompt longer than the context instead of refusing it");
      app.add_flag("--json", args->json, "print one JSON object at the end instead of streaming");
      return [args] { return run_generate(*args); };
    }};

}  // namespace
}  // namespace sn::cli
