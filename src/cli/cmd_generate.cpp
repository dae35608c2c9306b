// solvernet generate: complete a prompt with a model in this process (KV cache,
// tokens printed as they come, then a timing line).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <iostream>
#include <optional>

#include "cli/command.h"
#include "cli/signals.h"
#include "core/keys.h"
#include "infer/engine.h"
#include "infer/route.h"

namespace sn::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  infer::SamplingParams sampling;
  bool json = false;
  std::vector<std::string> bootstrap;
  std::string key;
  double spot_check = 0.05;
  double step_timeout_s = 10;
};

// The model in this process, or (with --bootstrap) a chain of block servers.
Result<std::unique_ptr<infer::Engine>> open_engine(const GenerateArgs& args, std::optional<NodeKey>& key) {
  if (args.bootstrap.empty()) return infer::open_local_engine(args.model);
  if (!(args.spot_check >= 0 && args.spot_check <= 1))
    return input_error("--spot-check must be in [0, 1], got {}", args.spot_check);
  if (!(args.step_timeout_s > 0 && args.step_timeout_s <= 3600))
    return input_error("--step-timeout-s must be in (0, 3600], got {}", args.step_timeout_s);
  if (!args.model.empty() && (args.model.size() != 64 || args.model.find_first_not_of("0123456789abcdef") != std::string::npos))
    return input_error("--model {}: with --bootstrap, a model id (64 lowercase hex digits; `solvernet model ls`)", args.model);
  if (args.key.empty()) {
    key = NodeKey::generate();
  } else {
    SN_ASSIGN(auto loaded, NodeKey::load_or_create_file(args.key));
    key = std::move(loaded);
  }
  infer::RemoteEngineOptions options;
  options.bootstrap = args.bootstrap;
  options.model = args.model;
  options.identity = &*key;
  options.spot_check_fraction = args.spot_check;
  options.step_timeout = std::chrono::milliseconds(static_cast<int64_t>(args.step_timeout_s * 1000));
  options.on_event = [](const std::string& line) { std::cerr << "solvernet generate: " << line << std::endl; };
  SN_ASSIGN(auto engine, infer::open_remote_engine(options));
  return std::unique_ptr<infer::Engine>(std::move(engine));
}

int run_generate(GenerateArgs& args) {
  install_stop_handlers();
  if (auto checked = infer::check_sampling(args.sampling); !checked.ok()) return fail("generate", checked.message(), 2);
  std::optional<NodeKey> key;
  auto engine = open_engine(args, key);
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
      app.add_option("--model", args->model,
                     "model file (safetensors written by solvernet train); with --bootstrap, a model id (optional when "
                     "the swarm serves one model)");
      app.add_option("--bootstrap", args->bootstrap, "run on the block servers of this DHT (HOST:PORT) instead");
      app.add_option("--key", args->key, "client key file signing requests (default: a fresh key)");
      app.add_option("--spot-check", args->spot_check, "fraction of steps recomputed on a second server (default 0.05)");
      app.add_option("--step-timeout-s", args->step_timeout_s, "a hop slower than this is replaced (default 10)");
      app.add_option("--prompt", args->prompt, "text to complete")->required();
      app.add_option("--max-tokens", args->sampling.max_tokens, "new tokens at most (default 64)");
      app.add_option("--temperature", args->sampling.temperature, "0 = greedy (default), else sampling temperature");
      app.add_option("--top-p", args->sampling.top_p, "nucleus sampling mass, (0, 1] (default 1)");
      app.add_option("--seed", args->sampling.seed, "sampling seed (default 0)");
      app.add_option("--stop", args->sampling.stop, "stop before this text (repeatable, at most 4)");
      app.add_flag("--truncate", args->sampling.truncate_prompt,
                   "keep the last tokens of a prompt longer than the context instead of refusing it");
      app.add_flag("--json", args->json, "print one JSON object at the end instead of streaming");
      add_insecure_flag(app);
      return [args] {
        if (args->bootstrap.empty() && args->model.empty())
          return fail("generate", "--model FILE is required (or --bootstrap HOST:PORT to use block servers)", 2);
        return run_generate(*args);
      };
    }};

}  // namespace
}  // namespace sn::cli
