// solvernet gateway: an OpenAI-compatible HTTP API over a model, in this
// process (--model) or across the network's block servers (--bootstrap).
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>

#include "cli/command.h"
#include "cli/signals.h"
#include "core/keys.h"
#include "core/log.h"
#include "core/process.h"
#include "infer/engine.h"
#include "infer/gateway.h"
#include "infer/route.h"
#include "net/rpc.h"

namespace sn::cli {
namespace {

struct GatewayArgs {
  std::string listen = "127.0.0.1:8000";
  std::string model;
  std::vector<std::string> bootstrap;
  int max_concurrency = 16;
  std::string api_key_file;
  bool json_log = false;
  int token_delay_ms = 0;
  std::string model_id;     // with --bootstrap: which model (optional when the swarm serves one)
  std::string key;          // with --bootstrap: the client key signing requests to block servers
  double spot_check = 0.05; // with --bootstrap: fraction of steps recomputed on a second server
};

// One key per line; blank lines and lines starting with '#' are skipped.
Result<std::vector<std::string>> read_api_keys(const std::string& path) {
  std::ifstream in(path);
  if (!in) return input_error("--api-key-file {}: cannot be read", path);
  std::vector<std::string> keys;
  std::string line;
  while (std::getline(in, line)) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    const size_t start = line.find_first_not_of(" \t");
    if (start == std::string::npos || line[start] == '#') continue;
    keys.push_back(line.substr(start));
  }
  if (keys.empty()) return input_error("--api-key-file {}: holds no key (one key a line)", path);
  return keys;
}

std::string live_line(const infer::GatewayMetrics& m) {
  return fmt::format("gateway: {} session(s) open, {:.1f} tok/s, per-token p50 {:.1f} ms p95 {:.1f} ms, first token "
                     "p50 {:.0f} ms, {} request(s), {} rejected",
                     m.sessions_open, m.tokens_per_s, m.token_latency_p50_ms, m.token_latency_p95_ms,
                     m.first_token_p50_ms, m.requests, m.rejected);
}

int run_gateway(const GatewayArgs& args) {
  block_stop_signals();
  init_logging("gateway", "warn");
  auto host_port = net::split_host_port(args.listen);
  if (!host_port.ok()) return fail("gateway", "--listen: " + host_port.message(), 2);
  if (args.max_concurrency < 1 || args.max_concurrency > 1024)
    return fail("gateway", fmt::format("--max-concurrency must be in 1..1024, got {}", args.max_concurrency), 2);
  if (args.token_delay_ms < 0 || args.token_delay_ms > 10000)
    return fail("gateway", fmt::format("--token-delay-ms must be in 0..10000, got {}", args.token_delay_ms), 2);
  // A port already taken is found now, not after the model has loaded or the
  // block servers have been found.
  if (host_port->second != 0 && tcp_port_listening(static_cast<uint16_t>(host_port->second))) {
    const auto holder = tcp_listener_pid(static_cast<uint16_t>(host_port->second));
    return fail("gateway", fmt::format("--listen {}: port {} is in use{}", args.listen, host_port->second,
                                       holder ? " by " + describe_pid(*holder) : std::string()),
                2);
  }
  infer::GatewayOptions options;
  options.host = host_port->first;
  options.port = host_port->second;
  options.max_concurrency = args.max_concurrency;
  options.token_delay = std::chrono::milliseconds(args.token_delay_ms);
  if (!args.api_key_file.empty()) {
    auto keys = read_api_keys(args.api_key_file);
    if (!keys.ok()) return fail("gateway", keys.message(), 2);
    options.api_keys = std::move(*keys);
  }

  std::optional<NodeKey> client_key;  // outlives the engine that signs with it
  std::shared_ptr<infer::Engine> engine;
  if (!args.model.empty()) {
    auto local = infer::open_local_engine(args.model);
    if (!local.ok()) return fail("gateway", local.message(), local.error().exit_code);
    engine = std::move(*local);
  } else {
    if (!args.model_id.empty() &&
        (args.model_id.size() != 64 || args.model_id.find_first_not_of("0123456789abcdef") != std::string::npos))
      return fail("gateway", "--model-id " + args.model_id + ": not a model id (64 lowercase hex digits)", 2);
    if (!(args.spot_check >= 0 && args.spot_check <= 1))
      return fail("gateway", fmt::format("--spot-check must be in [0, 1], got {}", args.spot_check), 2);
    auto key = args.key.empty() ? Result<NodeKey>(NodeKey::generate()) : NodeKey::load_or_create_file(args.key);
    if (!key.ok()) return fail("gateway", key.message(), 2);
    client_key = std::move(*key);
    infer::RemoteEngineOptions remote;
    remote.bootstrap = args.bootstrap;
    remote.model = args.model_id;
    remote.identity = &*client_key;
    remote.spot_check_fraction = args.spot_check;
    // The engine logs what matters itself (a server dropped, replaced or caught by a spot check).
    auto opened = infer::open_remote_engine(remote);
    if (!opened.ok()) return fail("gateway", opened.message(), opened.error().exit_code);
    infer::RemoteEngine* route = opened->get();
    options.engine_metrics = [route] {
      const infer::RemoteEngineCounters c = route->counters();
      return std::map<std::string, double>{{"steps", static_cast<double>(c.steps)},
                                           {"spot_checks", static_cast<double>(c.spot_checks)},
                                           {"spot_check_mismatches", static_cast<double>(c.spot_check_mismatches)},
                                           {"replacements", static_cast<double>(c.replacements)},
                                           {"dropped_servers", static_cast<double>(c.dropped_servers)},
                                           {"last_stall_s", c.last_stall_s}};
    };
    engine = std::move(*opened);
  }

  std::mutex out_mutex;
  const bool tty = ::isatty(2);
  if (args.json_log)
    options.on_request = [&out_mutex](const infer::GatewayRequestLog& r) {
      nlohmann::json line = {{"method", r.method},
                             {"path", r.path},
                             {"status", r.status},
                             {"stream", r.stream},
                             {"prompt_tokens", r.prompt_tokens},
                             {"completion_tokens", r.completion_tokens},
                             {"finish_reason", r.finish_reason},
                             {"first_token_ms", r.first_token_s * 1e3},
                             {"total_ms", r.total_s * 1e3}};
      if (!r.error.empty()) line["error"] = r.error;
      std::lock_guard lock(out_mutex);
      std::cerr << line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
    };

  auto gateway = infer::Gateway::start(engine, options);
  if (!gateway.ok()) return fail("gateway", gateway.message(), gateway.error().exit_code);
  const std::string url = fmt::format("http://{}:{}", options.host, (*gateway)->port());
  const infer::ModelCard& card = engine->card();
  std::cout << fmt::format("gateway: serving model {} ({}, context {} tokens) at {}/v1, at most {} generation(s) at once{}",
                           card.id, card.name, card.config.seq_len, url, options.max_concurrency,
                           options.api_keys.empty() ? "" : ", API key required")
            << std::endl;
  std::cout << fmt::format("try: curl -N {}/v1/completions -H 'Content-Type: application/json' -d "
                           "'{{\"prompt\": \"Hello\", \"max_tokens\": 20, \"stream\": true}}'",
                           url)
            << std::endl;

  // The live line: rewritten in place on a terminal, else a line whenever the
  // figures change (at most every 5 s) so logs stay readable.
  std::atomic<bool> done{false};
  std::mutex live_mutex;
  std::condition_variable live_wake;
  std::thread live([&] {
    std::string last;
    auto last_print = std::chrono::steady_clock::now() - std::chrono::hours(1);
    std::unique_lock lock(live_mutex);
    while (!live_wake.wait_for(lock, std::chrono::seconds(1), [&] { return done.load(); })) {
      if (args.json_log) continue;
      const infer::GatewayMetrics m = (*gateway)->metrics();
      const std::string line = live_line(m);
      const std::string key = fmt::format("{} {} {}", m.sessions_open, m.requests, m.tokens);
      std::lock_guard out(out_mutex);
      if (tty) {
        std::cerr << "\r\033[K" << line << std::flush;
      } else if (key != last && std::chrono::steady_clock::now() - last_print >= std::chrono::seconds(5)) {
        std::cerr << line << std::endl;
        last = key;
        last_print = std::chrono::steady_clock::now();
      }
    }
  });

  const int signal_number = wait_for_stop_signal();
  {
    std::lock_guard lock(live_mutex);
    done = true;
  }
  live_wake.notify_all();
  live.join();
  if (tty && !args.json_log) std::cerr << "\n";
  std::cerr << fmt::format("gateway: stopping on signal {}; {}", signal_number, live_line((*gateway)->metrics()))
            << std::endl;
  (*gateway)->stop();
  return 0;
}

CommandRegistration gateway_command(
    "gateway", "Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming)",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<GatewayArgs>();
      app.add_option("--listen", args->listen, "HOST:PORT to serve HTTP on (port 0: any free port)")
          ->capture_default_str();
      auto* model = app.add_option("--model", args->model, "Serve this model file (safetensors from solvernet train) "
                                                           "in this process");
      auto* bootstrap = app.add_option("--bootstrap", args->bootstrap,
                                       "Serve through the network's block servers, found via this DHT node HOST:PORT");
      model->excludes(bootstrap);
      bootstrap->excludes(model);
      app.add_option("--model-id", args->model_id,
                     "With --bootstrap: the model to serve (its id; default: the only model the swarm serves)");
      app.add_option("--key", args->key, "With --bootstrap: client key file signing requests (default: a fresh key)");
      app.add_option("--spot-check", args->spot_check,
                     "With --bootstrap: fraction of steps recomputed on a second server (default 0.05)");
      app.add_option("--max-concurrency", args->max_concurrency,
                     "Generations at once (1..1024); one more is answered 429 with Retry-After")
          ->capture_default_str();
      app.add_option("--api-key-file", args->api_key_file,
                     "Require 'Authorization: Bearer KEY' with one of the keys in FILE (one a line)");
      app.add_flag("--json-log", args->json_log, "One JSON line per request on stderr instead of the live line");
      app.add_option("--token-delay-ms", args->token_delay_ms,
                     "TESTING ONLY: sleep this long after each token (to disconnect mid-stream on a tiny model)");
      add_insecure_flag(app);
      app.callback([model, bootstrap] {
        if (model->count() == 0 && bootstrap->count() == 0)
          throw CLI::RequiredError("--model or --bootstrap");
      });
      return [args] { return run_gateway(*args); };
    });

}  // namespace
}  // namespace sn::cli
