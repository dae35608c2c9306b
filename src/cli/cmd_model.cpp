// solvernet model: put a model file into a node's store (publish), fetch a
// model by id from the nodes that announce it (fetch), list a store (ls).
// The store is DATA/models (infer/model_store.h, docs/inference.md).
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <iostream>
#include <thread>

#include "cli/command.h"
#include "core/backoff.h"
#include "core/fs.h"
#include "core/log.h"
#include "infer/model_store.h"
#include "net/discovery.h"
#include "net/node_runtime.h"

namespace sn::cli {
namespace {

struct ModelArgs {
  std::string data_dir;
  std::string file;
  std::string id;
  std::vector<std::string> bootstrap;
  std::string blocks;
  bool json = false;
  int wait_ms = 5000;
  double timeout_s = 10;
  double max_rate_kbps = 0;
  std::string log_level = "warn";
};

std::filesystem::path store_dir(const ModelArgs& args) { return std::filesystem::path(args.data_dir) / "models"; }

int run_publish(const ModelArgs& args) {
  init_logging("model", args.log_level);
  if (auto ok = check_input_file(args.file, "FILE"); !ok.ok()) return fail("model publish", ok.message(), 2);
  auto store = infer::ModelStore::open(store_dir(args));
  if (!store.ok()) return fail("model publish", store.message(), store.error().exit_code);
  auto id = (*store)->publish(args.file);
  if (!id.ok()) return fail("model publish", id.message(), id.error().exit_code);
  auto m = (*store)->manifest(*id);
  if (!m.ok()) return fail("model publish", m.message());
  if (args.json) {
    std::cout << nlohmann::json{{"id", *id}, {"name", m->name}, {"chunks", m->chunks.size() + 1},
                                {"bytes", m->total_bytes()}, {"store", store_dir(args).string()}}
                     .dump()
              << std::endl;
  } else {
    std::cerr << fmt::format("published {} ({} layers, {} chunks, {}) into {}", m->name, m->config.layers,
                             m->chunks.size() + 1, net::format_bytes(m->total_bytes()), store_dir(args).string())
              << std::endl;
    std::cout << *id << std::endl;
  }
  return 0;
}

bool hex_id(const std::string& id) {
  return id.size() == 64 && std::all_of(id.begin(), id.end(), [](char c) { return std::isxdigit(c) && !std::isupper(c); });
}

int run_fetch(const ModelArgs& args) {
  init_logging("model", args.log_level);
  const char* cmd = "model fetch";
  if (!hex_id(args.id)) return fail(cmd, "ID \"" + args.id + "\" is not a model id (64 lowercase hex digits)", 2);
  if (!(args.timeout_s > 0 && args.timeout_s <= 3600)) return fail(cmd, "--timeout-s must be in (0, 3600]", 2);
  if (!(args.max_rate_kbps >= 0 && args.max_rate_kbps <= 1e9)) return fail(cmd, "--max-rate-kbps must be in 0..1e9", 2);
  if (args.wait_ms < 0 || args.wait_ms > 600000) return fail(cmd, "--wait-ms must be in 0..600000", 2);
  // The span's syntax now; its range once the manifest (the layer count) is known.
  if (!args.blocks.empty())
    if (auto syntax = infer::parse_block_range(args.blocks, 0, "--blocks"); !syntax.ok())
      return fail(cmd, syntax.message(), 2);
  auto store = infer::ModelStore::open(store_dir(args));
  if (!store.ok()) return fail(cmd, store.message(), store.error().exit_code);
  auto span_of = [&](int64_t layers) -> Result<std::pair<int, int>> {
    if (args.blocks.empty()) return std::make_pair(0, static_cast<int>(layers));
    return infer::parse_block_range(args.blocks, layers, "--blocks");
  };
  if (auto held = (*store)->manifest(args.id); held.ok())
    if (auto span = span_of(held->config.layers); !span.ok()) return fail(cmd, span.message(), 2);

  auto discovery = net::Discovery::start(0, args.bootstrap);
  if (!discovery.ok()) return fail(cmd, discovery.message(), discovery.error().exit_code);
  if (auto joined = (*discovery)->wait_for_bootstrap(std::chrono::milliseconds(std::clamp(args.wait_ms, 1000, 3000)));
      !joined.ok())
    return fail(cmd, joined.message(), joined.error().exit_code);
  // A fresh DHT client needs a moment to see everyone: ask until some node announces the model.
  std::vector<infer::Provider> providers;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(args.wait_ms);
  Backoff pause(std::chrono::milliseconds(200), std::chrono::milliseconds(1000));
  do {
    auto nodes = (*discovery)->list_nodes(std::chrono::milliseconds(1000));
    if (nodes.ok()) {
      providers = infer::providers_of(*nodes, args.id);
      spdlog::debug("{} node(s) listed, {} announce the model", nodes->size(), providers.size());
    }
    if (!providers.empty()) break;
    std::this_thread::sleep_for(pause.next());
  } while (std::chrono::steady_clock::now() < give_up);
  (*discovery)->stop();
  if (providers.empty() && !(*store)->manifest(args.id).ok())
    return fail(cmd, fmt::format("no node announces model {} (waited {} ms)", args.id.substr(0, 12), args.wait_ms));

  infer::FetchOptions options;
  options.call_timeout = std::chrono::milliseconds(static_cast<int64_t>(args.timeout_s * 1000));
  options.max_rate_bytes_per_s = args.max_rate_kbps * 1024;
  auto manifest = (*store)->fetch_manifest(args.id, providers, nullptr, options);
  if (!manifest.ok()) return fail(cmd, manifest.message(), manifest.error().exit_code);
  // The manifest first (its layer count bounds --blocks), then the chunks.
  auto span = span_of(manifest->config.layers);
  if (!span.ok()) return fail(cmd, span.message(), 2);

  const bool tty = ::isatty(STDERR_FILENO);
  auto last_line = std::chrono::steady_clock::now() - std::chrono::seconds(10);
  const auto started = std::chrono::steady_clock::now();
  options.progress = [&](const infer::FetchProgress& p) {
    auto now = std::chrono::steady_clock::now();
    const bool finished = p.chunks_done == p.chunks_total;
    // A terminal gets a line redrawn in place; a log file a line a second.
    if (!finished && now - last_line < std::chrono::milliseconds(tty ? 100 : 1000)) return;
    last_line = now;
    double seconds = std::chrono::duration<double>(now - started).count();
    std::string line = fmt::format("model {}: {}/{} chunks, {} of {}, {}/s{}", args.id.substr(0, 12), p.chunks_done,
                                   p.chunks_total, net::format_bytes(p.bytes_done), net::format_bytes(p.bytes_total),
                                   net::format_bytes(seconds > 0 ? static_cast<int64_t>(p.bytes_fetched / seconds) : 0),
                                   p.chunk.empty() ? "" : " (" + p.chunk + ")");
    if (tty)
      std::cerr << "\r\033[K" << line << std::flush;
    else
      std::cerr << line << std::endl;
  };
  auto report = (*store)->fetch(args.id, span->first, span->second, providers, nullptr, options);
  if (tty) std::cerr << std::endl;
  if (!report.ok()) return fail(cmd, report.message(), report.error().exit_code);
  for (const auto& why : report->refused) std::cerr << "refused " << why << std::endl;
  if (args.json) {
    std::cout << nlohmann::json{{"id", args.id},
                                {"name", manifest->name},
                                {"first_block", span->first},
                                {"end_block", span->second},
                                {"chunks_total", report->chunks_total},
                                {"chunks_present", report->chunks_present},
                                {"chunks_fetched", report->chunks_fetched},
                                {"bytes_fetched", report->bytes_fetched},
                                {"bytes_resumed", report->bytes_resumed},
                                {"providers", providers.size()},
                                {"refused", report->refused}}
                     .dump()
              << std::endl;
  } else {
    std::cout << fmt::format("model {} ({}) blocks {}-{}: {} chunks fetched ({}), {} already held, {} refused",
                             args.id.substr(0, 12), manifest->name, span->first, span->second - 1,
                             report->chunks_fetched, net::format_bytes(report->bytes_fetched), report->chunks_present,
                             report->refused.size())
              << std::endl;
  }
  return 0;
}

int run_ls(const ModelArgs& args) {
  init_logging("model", args.log_level);
  auto store = infer::ModelStore::open(store_dir(args));
  if (!store.ok()) return fail("model ls", store.message(), store.error().exit_code);
  nlohmann::json out = nlohmann::json::array();
  auto complete = (*store)->complete_models();
  if (!args.json)
    std::cout << fmt::format("{:<64}  {:<20} {:>6} {:>10} {:>7}\n", "id", "name", "layers", "size", "chunks");
  for (const auto& id : (*store)->models()) {
    auto m = (*store)->manifest(id);
    if (!m.ok()) {
      std::cerr << "solvernet model ls: " << m.message() << std::endl;
      continue;
    }
    int held = 0, total = static_cast<int>(m->chunks.size()) + 1;
    for (int b = 0; b < m->config.layers; ++b) held += (*store)->has_chunks(id, b, b + 1) ? 1 : 0;
    const bool whole = std::find(complete.begin(), complete.end(), id) != complete.end();
    if (args.json) {
      std::vector<int> blocks;
      for (int b = 0; b < m->config.layers; ++b)
        if ((*store)->has_chunks(id, b, b + 1)) blocks.push_back(b);
      out.push_back({{"id", id}, {"name", m->name}, {"layers", m->config.layers}, {"bytes", m->total_bytes()},
                     {"complete", whole}, {"blocks_held", blocks}});
    } else {
      std::cout << fmt::format("{:<64}  {:<20} {:>6} {:>10} {:>7}\n", id, m->name, m->config.layers,
                               net::format_bytes(m->total_bytes()),
                               whole ? "all" : fmt::format("{}/{}", held, m->config.layers) + " bl");
    }
    (void)total;
  }
  if (args.json) std::cout << out.dump() << std::endl;
  return 0;
}

CommandRegistration model_command(
    "model", "Model distribution: publish a model file into a node's store, fetch a model by id, list a store",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<ModelArgs>();
      app.require_subcommand(1);
      auto* publish = app.add_subcommand("publish", "Split a model file into chunks in DATA/models; prints the model id");
      publish->add_option("FILE", args->file, "Model file written by `solvernet train --out`")->required();
      auto* fetch = app.add_subcommand("fetch", "Fetch a model (or a span of its blocks) from the nodes that announce it");
      fetch->add_option("ID", args->id, "Model id (64 hex digits)")->required();
      fetch->add_option("--bootstrap", args->bootstrap, "DHT node to join, HOST:PORT (repeatable)")->required();
      fetch->add_option("--blocks", args->blocks, "Only the chunks blocks FIRST-LAST need (inclusive; default: all)");
      fetch->add_option("--wait-ms", args->wait_ms, "How long to look for nodes that announce the model")->capture_default_str();
      fetch->add_option("--timeout-s", args->timeout_s, "Deadline of each request to a provider")->capture_default_str();
      fetch->add_option("--max-rate-kbps", args->max_rate_kbps, "Receive at most this many KiB/s (0: no limit)")->capture_default_str();
      add_insecure_flag(*fetch);
      auto* ls = app.add_subcommand("ls", "List the models in DATA/models and which blocks are held");
      for (auto* sub : {publish, fetch, ls}) {
        sub->add_option("--data", args->data_dir, "Node data dir (the store is DATA/models)")->required();
        sub->add_flag("--json", args->json, "Print JSON");
        sub->add_option("--log-level", args->log_level, "trace|debug|info|warn|error")->capture_default_str();
      }
      return [args, publish, fetch, ls] {
        if (publish->parsed()) return run_publish(*args);
        if (fetch->parsed()) return run_fetch(*args);
        if (ls->parsed()) return run_ls(*args);
        return fail("model", "no subcommand", 2);
      };
    });

}  // namespace
}  // namespace sn::cli
