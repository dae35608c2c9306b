// bench_infer: serving figures side by side in one run (JSON on stdout).
// One process against 2- and 3-hop chains of real `solvernet node --serve`
// processes, with round trips emulated by the client at 1 ms (data center)
// and 100 ms (world-wide): time to first token and tokens/s at concurrency 1,
// 8 and 32; per-token latency against its floor (Σ hop round trips + the same
// blocks' compute in one process); batching (32 sessions against 1); the
// failover stall after a kill; the cost of 5% spot checks.
//   bench_infer [--quick]
#include <nlohmann/json.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <mutex>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "infer/engine.h"
#include "infer/route.h"
#include "model/gpt.h"
#include "model/safetensors.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

namespace {

// Larger than the tests' model so that compute is not negligible: 6 blocks of d_model 256.
ModelConfig bench_config() {
  ModelConfig c;
  c.layers = 6;
  c.d_model = 256;
  c.heads = 8;
  c.d_ff = 1024;
  c.vocab = 512;
  c.seq_len = 128;
  return c;
}

std::string vocab_text(int64_t vocab) {
  std::string text = "<unk>\t0\n<s>\t0\n</s>\t0\n";
  for (int64_t i = 3; i < vocab; ++i) text += "p" + std::to_string(i) + "\t" + std::to_string(-i) + "\n";
  return text;
}

bool wait_for_text(const fs::path& file, const std::string& text, std::chrono::seconds limit) {
  for (auto until = Clock::now() + limit; Clock::now() < until;) {
    if (read_file(file).value_or("").find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(100ms);
  }
  return false;
}

struct Swarm {
  fs::path dir;
  std::string bootstrap;
  ChildProcess dht;
  std::vector<ChildProcess> nodes;
  std::vector<std::string> ids;

  explicit Swarm(fs::path d) : dir(std::move(d)) {
    fs::create_directories(dir);
    SpawnOptions quiet;
    quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
    int port = free_loopback_port(SOCK_DGRAM).value();
    dht = std::move(ChildProcess::spawn({SOLVERNET_BIN, "dht", "--port", std::to_string(port)}, quiet).value());
    bootstrap = "127.0.0.1:" + std::to_string(port);
  }
  ~Swarm() {
    for (auto& node : nodes) node.terminate();
    dht.terminate();
  }
  size_t serve(const std::string& spec) {
    const size_t i = nodes.size();
    const fs::path data = dir / ("n" + std::to_string(i)), log = dir / ("n" + std::to_string(i) + ".log");
    SpawnOptions options;
    options.stdout_path = options.stderr_path = log;
    nodes.push_back(std::move(ChildProcess::spawn({SOLVERNET_BIN, "node", "--data", data.string(), "--listen",
                                                   "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap,
                                                   "--serve", spec},
                                                  options)
                                  .value()));
    if (!wait_for_text(log, "serving blocks", 90s)) throw std::runtime_error("node did not start: " + log.string());
    ids.push_back(NodeKey::load_or_create(data).value().node_id());
    return i;
  }
};

struct Figures {
  double first_token_s = 0;    // mean over streams
  double tokens_per_s = 0;     // all streams' generated tokens / wall time
  double per_token_s = 0;      // mean decode latency per token per stream
  int errors = 0;
};

// CONCURRENCY streams of TOKENS tokens each after a PROMPT_TOKENS-token prompt.
Figures run(infer::Engine& engine, int concurrency, int tokens, int prompt_tokens) {
  std::vector<int32_t> prompt;
  for (int i = 0; i < prompt_tokens; ++i) prompt.push_back(3 + (i * 7) % 500);
  std::mutex mutex;
  Figures f;
  double ttft_sum = 0, per_token_sum = 0;
  int64_t generated = 0;
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int c = 0; c < concurrency; ++c)
    threads.emplace_back([&, c] {
      infer::SamplingParams params;
      params.max_tokens = tokens;
      params.temperature = 0.8;
      params.seed = static_cast<uint64_t>(c);
      auto stats = engine.generate(prompt, params, [](const infer::TokenEvent&) { return true; });
      std::lock_guard lock(mutex);
      if (!stats.ok()) {
        if (f.errors++ == 0) std::cerr << "bench_infer: " << stats.message() << std::endl;
        return;
      }
      ttft_sum += stats->first_token_s;
      generated += stats->generated_tokens;
      if (stats->generated_tokens > 1)
        per_token_sum += (stats->total_s - stats->first_token_s) / (stats->generated_tokens - 1);
    });
  for (auto& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  const int ok = concurrency - f.errors;
  f.first_token_s = ok ? ttft_sum / ok : 0;
  f.per_token_s = ok ? per_token_sum / ok : 0;
  f.tokens_per_s = wall > 0 ? static_cast<double>(generated) / wall : 0;
  return f;
}

json to_json(const Figures& f) {
  return {{"first_token_ms", f.first_token_s * 1e3},
          {"tokens_per_s", f.tokens_per_s},
          {"per_token_ms", f.per_token_s * 1e3},
          {"errors", f.errors}};
}

std::unique_ptr<infer::RemoteEngine> connect(const Swarm& swarm, const NodeKey& key, double rtt_s, double spot_checks,
                                             std::function<void(const std::string&)> on_event = {}) {
  infer::RemoteEngineOptions options;
  options.on_event = std::move(on_event);
  options.bootstrap = {swarm.bootstrap};
  options.identity = &key;
  options.spot_check_fraction = spot_checks;
  options.step_timeout = 20s;
  if (rtt_s > 0) options.emulated_rtt_s = [rtt_s](const std::string&) { return rtt_s; };
  auto engine = infer::open_remote_engine(options);
  if (!engine.ok()) throw std::runtime_error(engine.message());
  // Wait until every block is covered (announcements take a moment to spread).
  for (int i = 0; i < 120; ++i) {
    infer::SamplingParams p;
    p.max_tokens = 1;
    if ((*engine)->generate({5, 6}, p, [](const infer::TokenEvent&) { return true; }).ok()) return std::move(*engine);
    std::this_thread::sleep_for(500ms);
  }
  throw std::runtime_error("the swarm never covered every block");
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  // stdout carries the JSON only: the engine's log lines go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("bench_infer"));
  model::init_torch_single_thread();
  const fs::path dir = fs::temp_directory_path() / ("sn-bench-infer-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const ModelConfig config = bench_config();
  const fs::path model_path = dir / "bench.safetensors";
  {
    model::StageModel gpt(config, 0, static_cast<int>(config.layers), 11);
    auto saved = model::save_safetensors(model_path, gpt.named_parameters(),
                                         model::model_file_metadata("bench", config, vocab_text(config.vocab)));
    if (!saved.ok()) {
      std::cerr << "bench_infer: " << saved.message() << std::endl;
      return 1;
    }
  }
  const std::vector<int> concurrencies = quick ? std::vector<int>{1, 8} : std::vector<int>{1, 8, 32};
  const int tokens = quick ? 12 : 24, prompt_tokens = 16;
  const NodeKey key = NodeKey::generate();
  json out = {{"model", {{"layers", config.layers}, {"d_model", config.d_model}, {"vocab", config.vocab}}},
              {"prompt_tokens", prompt_tokens},
              {"generated_tokens_per_stream", tokens}};
  try {
    auto local = infer::open_local_engine(model_path);
    if (!local.ok()) throw std::runtime_error(local.message());
    json local_json;
    double local_per_token_s = 0;
    for (int c : concurrencies) {
      Figures f = run(**local, c, tokens, prompt_tokens);
      if (c == 1) local_per_token_s = f.per_token_s;
      local_json["concurrency_" + std::to_string(c)] = to_json(f);
    }
    out["one_process"] = local_json;
    std::cerr << "bench_infer: one process done" << std::endl;

    struct Layout {
      std::string name;
      std::vector<std::string> spans;
    };
    const std::vector<Layout> layouts = {{"2_hops", {"0-2", "3-5"}}, {"3_hops", {"0-1", "2-3", "4-5"}}};
    for (const auto& layout : layouts) {
      Swarm swarm(dir / layout.name);
      for (const auto& span : layout.spans) swarm.serve(model_path.string() + ":" + span);
      const double hops = static_cast<double>(layout.spans.size());
      for (double rtt : {0.001, 0.100}) {
        auto engine = connect(swarm, key, rtt, 0.0);
        json figures;
        Figures one;
        for (int c : concurrencies) {
          // World-wide links: fewer tokens (each costs a round trip per hop).
          Figures f = run(*engine, c, rtt > 0.01 ? tokens / 2 : tokens, prompt_tokens);
          if (c == 1) one = f;
          figures["concurrency_" + std::to_string(c)] = to_json(f);
          if (c == concurrencies.back())
            figures["batching_gain"] = one.tokens_per_s > 0 ? f.tokens_per_s / one.tokens_per_s : 0;
        }
        const double floor_s = hops * rtt + local_per_token_s;
        figures["per_token_floor_ms"] = floor_s * 1e3;
        figures["per_token_over_floor"] = floor_s > 0 ? one.per_token_s / floor_s : 0;
        out[layout.name][rtt > 0.01 ? "rtt_100ms" : "rtt_1ms"] = figures;
        std::cerr << "bench_infer: " << layout.name << " at " << rtt * 1e3 << " ms done" << std::endl;
      }
    }

    // Failover and spot checks: two servers for the first blocks, one for the rest.
    {
      Swarm swarm(dir / "failover");
      const size_t a = swarm.serve(model_path.string() + ":0-2");
      const size_t b = swarm.serve(model_path.string() + ":0-2");
      swarm.serve(model_path.string() + ":3-5");
      auto plain = connect(swarm, key, 0.001, 0.0);
      auto checked = connect(swarm, key, 0.001, 0.05);
      // Alternating rounds, so that the machine's noise hits both alike.
      double without_tokens_per_s = 0, with_tokens_per_s = 0;
      const int rounds = quick ? 2 : 4;
      for (int round = 0; round < rounds; ++round) {
        without_tokens_per_s += run(*plain, 8, tokens, prompt_tokens).tokens_per_s / rounds;
        with_tokens_per_s += run(*checked, 8, tokens, prompt_tokens).tokens_per_s / rounds;
      }
      out["spot_checks"] = {{"fraction", 0.05},
                            {"concurrency", 8},
                            {"tokens_per_s_without", without_tokens_per_s},
                            {"tokens_per_s_with", with_tokens_per_s},
                            {"overhead", without_tokens_per_s > 0 ? 1 - with_tokens_per_s / without_tokens_per_s : 0},
                            {"checks", checked->counters().spot_checks},
                            {"steps", checked->counters().steps},
                            {"mismatches", checked->counters().spot_check_mismatches}};
      // Kill the server of blocks [0, 3) that the route uses, mid-generation:
      // the client replays the session to the other one and goes on.
      std::mutex mutex;
      std::string route;
      auto watched = connect(swarm, key, 0.001, 0.0, [&](const std::string& line) {
        std::lock_guard lock(mutex);
        if (line.rfind("route", 0) == 0) route = line;
      });
      infer::SamplingParams params;
      params.max_tokens = tokens;
      auto stats = watched->generate({5, 6, 7, 8}, params, [&](const infer::TokenEvent& e) {
        if (e.index == tokens / 2) {
          std::lock_guard lock(mutex);
          swarm.nodes[route.find(swarm.ids[a].substr(0, 8)) != std::string::npos ? a : b].kill_now();
        }
        return true;
      });
      if (!stats.ok()) throw std::runtime_error("failover: " + stats.message());
      out["failover"] = {{"stall_s", watched->counters().last_stall_s},
                         {"replacements", watched->counters().replacements},
                         {"tokens_generated", stats->generated_tokens}};
    }
  } catch (const std::exception& e) {
    std::cerr << "bench_infer: " << e.what() << std::endl;
    fs::remove_all(dir);
    return 1;
  }
  fs::remove_all(dir);
  std::cout << out.dump(2) << std::endl;
  return 0;
}
