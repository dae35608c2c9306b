// solvernet node: contribute this machine — serve jobs over gRPC and announce
// itself in the DHT until stopped.
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <iostream>
#include <algorithm>
#include <filesystem>
#include <mutex>
#include <optional>
#include <set>

#include "cli/command.h"
#include "cli/signals.h"
#include "core/hash.h"
#include "core/keys.h"
#include "core/log.h"
#include "core/process.h"
#include "infer/model_store.h"
#include "infer/server.h"
#include "infer/span.h"
#include "net/announce.h"
#include "net/discovery.h"
#include "net/node_runtime.h"
#include "net/probe.h"
#include "net/rpc.h"
#include "net/topology.h"
#include "train/train.h"
#include "chain/chain.h"
#include "verify/trace_cache.h"
#include "verify/verify.h"

namespace sn::cli {
namespace {

struct NodeArgs {
  std::string data_dir;
  std::string listen = "127.0.0.1:7000";
  std::string advertise;
  int dht_port = 4222;
  std::vector<std::string> bootstrap;
  std::string region = "default";
  std::string topology;
  int parent_pid = 0;
  std::string log_level = "info";
  int peer_timeout_s = 60;
  int64_t memory_limit_mb = 0;
  double lease_s = 30;
  std::string serve;              // MODEL[:FIRST-LAST]
  double session_idle_s = 60;
  int max_batch = 32;
  std::string cheat;
  std::string kill_self_at;       // tests: CALL:N, SIGKILL itself on its N-th request of kind CALL
  std::string stall_at;           // tests: CALL:N:MS, sleep MS before handling its N-th request of kind CALL
  std::string disk_full_at;       // tests: CALL:N, its data dir's disk is full from its N-th request of kind CALL on
  std::string chain_rpc;          // settlement: the node commits its step leaves and answers disputes
  std::string deployment;         // the market's deployment JSON (default: the dev market at --chain-rpc)
  double probe_every_s = 30;      // 0: no probes
  int probe_peers = 16;
  int probe_limit = 120;          // probe requests answered per prober per minute
};

// Cheats of a block server (inference) and of a training solver (verification).
bool is_serving_cheat(const std::string& cheat) { return cheat == "garbage-states" || cheat == "malformed-states"; }
bool is_training_cheat(const std::string& cheat) { return train::parse_cheat_strategy(cheat).ok(); }

// What --serve names: a model file (published into the node's store) or a
// model id (fetched from the nodes that announce it), and the span to hold
// (-1: choose one from the swarm's coverage).
struct ServePlan {
  infer::ServeSpec spec;
  std::optional<infer::ModelFile> file;
  std::string model_id;
};

bool is_model_id(const std::string& text) {
  return text.size() == 64 && std::all_of(text.begin(), text.end(), [](char c) {
           return std::isdigit(static_cast<unsigned char>(c)) || (c >= 'a' && c <= 'f');
         });
}

Status check_span_in_model(const NodeArgs& args, const infer::ServeSpec& spec, int64_t layers) {
  if (spec.first_block >= 0 && spec.end_block > layers)
    return input_error("--serve {}: block {} is past the model's last block {} (blocks are 0-based, LAST inclusive)",
                       args.serve, spec.end_block - 1, layers - 1);
  return ok_status();
}

// Checks --serve before the node starts: the spec's syntax, and a file's
// contents and span.
Result<ServePlan> plan_serving(const NodeArgs& args) {
  ServePlan plan;
  SN_ASSIGN(plan.spec, infer::parse_serve_spec(args.serve));
  std::error_code error;
  if (std::filesystem::is_regular_file(plan.spec.model, error)) {
    SN_ASSIGN(plan.file, infer::load_model_file(plan.spec.model));
    SN_TRY(check_span_in_model(args, plan.spec, plan.file->config.layers));
  } else if (is_model_id(plan.spec.model)) {
    plan.model_id = plan.spec.model;
  } else {
    // "FILE:junk": the model is there, the span is what is wrong.
    const auto colon = args.serve.rfind(':');
    if (plan.spec.first_block < 0 && colon != std::string::npos) {
      const std::string prefix = args.serve.substr(0, colon);
      if (std::filesystem::exists(prefix, error) || is_model_id(prefix))
        return input_error("--serve {}: bad span \"{}\" (FIRST-LAST: 0-based blocks, LAST inclusive, e.g. {}:0-1)",
                           args.serve, args.serve.substr(colon + 1), prefix);
    }
    if (std::filesystem::is_directory(plan.spec.model, error))
      return input_error("--serve {}: is a directory, not a model file", plan.spec.model);
    return input_error("--serve {}: no such model file, nor a model id (64 lowercase hex digits)", plan.spec.model);
  }
  return plan;
}

// With no span given: as many blocks as fit in half the memory limit (at most
// all), placed over the least-covered blocks NODES announce.
std::pair<int, int> pick_span(const std::string& model_id, const ModelConfig& config,
                              const std::vector<solvernet::v1::NodeInfo>& nodes, int64_t memory_limit) {
  const int layers = static_cast<int>(config.layers);
  const int64_t block_bytes = std::max<int64_t>(1, config.layer_parameter_count() * 4);
  const int size = static_cast<int>(std::clamp<int64_t>(memory_limit / 2 / block_bytes, 1, layers));
  const std::vector<int> coverage = infer::swarm_coverage(nodes, model_id, layers);
  auto span = infer::choose_span(layers, size, coverage);
  spdlog::info("swarm coverage of model {} per block: [{}]; taking blocks [{}, {})", model_id.substr(0, 16),
               fmt::join(coverage, ", "), span.first, span.second);
  return span;
}

// The model's id, config and the span's weights: a file is published into
// STORE; an id is fetched (manifest, then the span's chunks) from the nodes
// announcing it. Weights are read back from STORE's chunks, each hash-checked
// against the manifest, so a block that does not match is never loaded.
struct ServedModel {
  std::string id, name;
  ModelConfig config;
  int first_block = 0, end_block = 0;
  model::NamedTensors weights;
};

Result<ServedModel> prepare_serving(const NodeArgs& args, ServePlan& plan, infer::ModelStore& store,
                                    net::Discovery& discovery, const NodeKey& key, int64_t memory_limit) {
  ServedModel out;
  std::vector<solvernet::v1::NodeInfo> nodes;
  const bool needs_swarm = plan.spec.first_block < 0 || !plan.file;
  if (needs_swarm) {
    if (auto joined = discovery.wait_for_bootstrap(std::chrono::seconds(10)); !joined.ok())
      spdlog::warn("reading the swarm's announcements: {}", joined.message());
    auto listed = discovery.list_nodes(std::chrono::seconds(3));
    if (listed.ok())
      nodes = std::move(listed).value();
    else
      spdlog::warn("could not read the swarm's announcements ({}); assuming none", listed.message());
  }
  std::vector<infer::Provider> providers;
  if (plan.file) {
    SN_ASSIGN(out.id, store.publish(*plan.file));
    out.name = plan.file->name;
    out.config = plan.file->config;
    plan.file.reset();  // the store's chunks are what gets loaded
  } else {
    out.id = plan.model_id;
    providers = infer::providers_of(nodes, out.id);
    SN_ASSIGN(auto manifest, store.fetch_manifest(out.id, providers, &key));
    out.name = manifest.name;
    out.config = manifest.config;
    SN_TRY(check_span_in_model(args, plan.spec, out.config.layers));
  }
  std::tie(out.first_block, out.end_block) =
      plan.spec.first_block >= 0 ? std::make_pair(plan.spec.first_block, plan.spec.end_block)
                                 : pick_span(out.id, out.config, nodes, memory_limit);
  if (!store.has_chunks(out.id, out.first_block, out.end_block)) {
    infer::FetchOptions fetch_options;
    SN_ASSIGN(auto report, store.fetch(out.id, out.first_block, out.end_block, providers, &key, fetch_options));
    spdlog::info("fetched {} chunk(s), {} of blocks [{}, {}) of model {} from {} node(s){}", report.chunks_fetched,
                 net::format_bytes(report.bytes_fetched), out.first_block, out.end_block, out.id.substr(0, 16),
                 providers.size(), report.refused.empty() ? "" : fmt::format(" ({} refused)", report.refused.size()));
  }
  SN_ASSIGN(out.weights, store.load_span(out.id, out.first_block, out.end_block));
  return out;
}

int run_node(const NodeArgs& args) {
  block_stop_signals();
  if (args.parent_pid > 0) die_with_parent(args.parent_pid);
  auto data_lock = DirLock::acquire(args.data_dir);  // one node per data dir (one identity, one address)
  if (!data_lock.ok()) return fail("node", data_lock.message(), data_lock.error().exit_code);
  auto key = NodeKey::load_or_create(args.data_dir);
  if (!key.ok()) return fail("node", key.message(), 2);
  init_logging("node " + key->node_id().substr(0, 8), args.log_level);
  train::init_single_threaded();

  // With a topology, probe traffic is paced as the links to peers' regions (the devnet).
  std::optional<Topology> topology;
  if (!args.topology.empty()) {
    auto parsed = parse_topology_file(args.topology);
    if (!parsed.ok()) return fail("node", parsed.message(), 2);
    if (parsed->region_index(args.region) < 0)
      return fail("node", "region \"" + args.region + "\" is not in " + args.topology, 2);
    topology = std::move(parsed).value();
  }
  if (!(args.probe_every_s == 0 || (args.probe_every_s >= 0.5 && args.probe_every_s <= 86400)))
    return fail("node", fmt::format("--probe-every-s must be 0 (no probes) or in 0.5..86400, got {:g}", args.probe_every_s), 2);
  if (args.probe_peers < 1 || args.probe_peers > 256)
    return fail("node", fmt::format("--probe-peers must be in 1..256, got {}", args.probe_peers), 2);
  if (args.probe_limit < 1 || args.probe_limit > 100000)
    return fail("node", fmt::format("--probe-limit must be in 1..100000, got {}", args.probe_limit), 2);
  // Test-only fault points: CALL:N (--kill-self-at, --disk-full-at) and CALL:N:MS (--stall-at).
  const auto parse_fault_point = [](const std::string& flag, const std::string& text, int fields, std::string& call,
                                    int& count, int64_t& ms) -> bool {
    static const std::set<std::string> calls{"step", "outer", "eval", "setup", "put-checkpoint", "fetch-checkpoint"};
    std::vector<std::string> parts;
    for (size_t start = 0;;) {
      const auto colon = text.find(':', start);
      parts.push_back(text.substr(start, colon == std::string::npos ? std::string::npos : colon - start));
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
    const auto number = [](const std::string& digits, int64_t low, int64_t high) -> int64_t {
      if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
      const int64_t value = std::stoll(digits);
      return value >= low && value <= high ? value : -1;
    };
    if (static_cast<int>(parts.size()) == fields && calls.count(parts[0])) {
      call = parts[0];
      count = static_cast<int>(number(parts[1], 1, 1000000));
      ms = fields == 3 ? number(parts[2], 0, 600000) : 0;
      if (count > 0 && ms >= 0) return true;
    }
    fail("node", fmt::format("{} must be {} with CALL one of {}{}, got \"{}\"", flag, fields == 3 ? "CALL:N:MS" : "CALL:N",
                             fmt::join(calls, ", "), fields == 3 ? ", N >= 1 and MS in 0..600000" : " and N >= 1", text),
         2);
    return false;
  };
  std::string kill_self_call, stall_call, disk_full_call;
  int kill_self_count = 0, stall_count = 0, disk_full_count = 0;
  int64_t unused_ms = 0, stall_ms = 0;
  if (!args.kill_self_at.empty() &&
      !parse_fault_point("--kill-self-at", args.kill_self_at, 2, kill_self_call, kill_self_count, unused_ms))
    return 2;
  if (!args.stall_at.empty() && !parse_fault_point("--stall-at", args.stall_at, 3, stall_call, stall_count, stall_ms))
    return 2;
  if (!args.disk_full_at.empty() &&
      !parse_fault_point("--disk-full-at", args.disk_full_at, 2, disk_full_call, disk_full_count, unused_ms))
    return 2;

  if (args.memory_limit_mb < 0 || args.memory_limit_mb > (int64_t{1} << 30))
    return fail("node", "--memory-limit-mb must be in 0..1073741824 (0: what the machine has available)", 2);
  if (!(args.lease_s >= 0.1 && args.lease_s <= 86400)) return fail("node", "--lease-s must be in 0.1..86400", 2);
  if (!(args.session_idle_s >= 0.1 && args.session_idle_s <= 86400))
    return fail("node", "--session-idle-s must be in 0.1..86400", 2);
  if (args.max_batch < 1 || args.max_batch > 1024) return fail("node", "--max-batch must be in 1..1024", 2);
  train::Cheat cheat;
  if (!args.cheat.empty() && !is_serving_cheat(args.cheat)) {
    auto strategy = train::parse_cheat_strategy(args.cheat);
    if (!strategy.ok())
      return fail("node", "--cheat must be garbage-states or malformed-states (serving), or a training cheat: " +
                              strategy.message(), 2);
    cheat.strategy = *strategy;
  }
  // Settlement: the node commits its step leaves with its own chain key
  // (DATA/chain.key) and answers the disputes over them.
  std::shared_ptr<chain::MarketClient> market;
  if (!args.chain_rpc.empty()) {
    auto rpc = std::make_shared<chain::RpcClient>(args.chain_rpc);
    auto deployment = args.deployment.empty() ? chain::find_dev_deployment(rpc) : chain::Deployment::load(args.deployment);
    if (!deployment.ok()) return fail("node", "--chain-rpc " + args.chain_rpc + ": " + deployment.message(), 2);
    auto client = chain::MarketClient::for_data_dir(rpc, *deployment, args.data_dir);
    if (!client.ok()) return fail("node", client.message(), client.error().exit_code);
    market = std::make_shared<chain::MarketClient>(std::move(client).value());
  } else if (!args.deployment.empty()) {
    return fail("node", "--deployment needs --chain-rpc", 2);
  }
  if (is_serving_cheat(args.cheat) && args.serve.empty()) return fail("node", "--cheat " + args.cheat + " needs --serve", 2);
  std::optional<ServePlan> serve_plan;
  if (!args.serve.empty()) {
    auto plan = plan_serving(args);
    if (!plan.ok()) return fail("node", plan.message(), plan.error().exit_code);
    serve_plan = std::move(plan).value();
  }

  std::mutex info_mutex;
  solvernet::v1::NodeInfo info = net::local_node_info(*key, args.region);
  std::unique_ptr<net::Discovery> discovery;
  net::DeliveryService delivery;  // routes tensor messages to each job's transport; outlives the jobs
  std::unique_ptr<grpc::Service> train_service;
  std::unique_ptr<grpc::Service> evidence_service;  // outlives the runtime that calls it
  std::unique_ptr<infer::BlockServer> block_server;  // outlives the runtime that calls it
  std::unique_ptr<net::ProbeService> probe_service;  // likewise

  // The runtime owns the server, admission and leases; each module only
  // registers its service on it.
  net::NodeRuntimeOptions runtime_options;
  runtime_options.key = &*key;
  runtime_options.memory_limit_bytes = args.memory_limit_mb << 20;
  runtime_options.lease = std::chrono::milliseconds(static_cast<int64_t>(args.lease_s * 1000));
  net::NodeRuntime* runtime_ptr = nullptr;
  // A node whose disk is full withdraws its announcement (a signed
  // tombstone; its GetInfo says the same) until its data dir takes a write
  // again: listed idle, it would be given jobs whose checkpoints it cannot write.
  bool withdrawn = false;
  const auto announcement = [&] {  // info_mutex held
    const bool full = runtime_ptr && runtime_ptr->disk_full();
    if (full && !withdrawn)
      spdlog::warn("this node's disk is full: it withdraws its announcement and takes no jobs until its data dir {} "
                   "takes a write again (tried every 2 s)",
                   args.data_dir);
    else if (!full && withdrawn)
      spdlog::info("this node's data dir {} takes writes again: it announces itself again", args.data_dir);
    withdrawn = full;
    return full ? net::tombstone_info(*key, info.timestamp_ms()) : info;
  };
  runtime_options.signed_info = [&] {
    std::lock_guard<std::mutex> lock(info_mutex);
    return net::sign_node_info(announcement(), *key);
  };
  runtime_options.data_dir = args.data_dir;
  runtime_options.on_jobs_change = [&] {
    if (!runtime_ptr) return;
    net::HeldJobs held = runtime_ptr->held();
    std::optional<solvernet::v1::ServedSpan> served;
    if (block_server) served = block_server->served_span();
    std::lock_guard<std::mutex> lock(info_mutex);
    info.set_busy_job_id(held.job_ids.empty() ? "" : held.job_ids.back());
    info.set_jobs(static_cast<int32_t>(held.job_ids.size()));
    info.set_memory_admitted_bytes(held.memory_admitted_bytes);
    if (served) {
      info.clear_serving();
      *info.add_serving() = *served;
    }
    if (discovery) discovery->update_announcement(announcement());
  };
  // Model distribution: the chunks of DATA/models are served (the store
  // outlives the runtime that serves it), and the models held whole announced.
  auto model_store = infer::ModelStore::open(std::filesystem::path(args.data_dir) / "models");
  if (!model_store.ok()) return fail("node", model_store.message(), model_store.error().exit_code);
  for (const auto& id : (*model_store)->complete_models()) info.add_models(id);
  if (info.models_size() > 0) spdlog::info("announcing {} model(s) held in {}", info.models_size(), (*model_store)->dir().string());
  (*model_store)->watch_complete_models(std::chrono::seconds(2), [&](const std::vector<std::string>& ids) {
    std::lock_guard<std::mutex> lock(info_mutex);
    info.clear_models();
    for (const auto& id : ids) info.add_models(id);
    spdlog::info("announcing {} model(s) held in {}", ids.size(), (*model_store)->dir().string());
    if (discovery) discovery->update_announcement(announcement());
  });

  // The DHT first: a node choosing its span reads the swarm's before it serves.
  auto dht = net::Discovery::start(static_cast<uint16_t>(args.dht_port), args.bootstrap);
  if (!dht.ok()) return fail("node", dht.message(), 2);
  std::optional<ServedModel> served_model;
  if (serve_plan) {
    const int64_t memory_limit = args.memory_limit_mb > 0 ? args.memory_limit_mb << 20 : net::memory_default_limit_bytes();
    auto prepared = prepare_serving(args, *serve_plan, **model_store, **dht, *key, memory_limit);
    if (!prepared.ok()) return fail("node", prepared.message(), prepared.error().exit_code);
    served_model = std::move(prepared).value();
    // The span's weights stay for the node's life: jobs and sessions are admitted into what is left.
    int64_t weight_bytes = 0;
    for (const auto& [name, tensor] : served_model->weights) weight_bytes += static_cast<int64_t>(tensor.nbytes());
    if (weight_bytes >= memory_limit)
      return fail("node",
                  fmt::format("--serve {}: the weights of blocks [{}, {}) take {}, the memory limit is {} (serve fewer "
                              "blocks or raise --memory-limit-mb)",
                              args.serve, served_model->first_block, served_model->end_block,
                              net::format_bytes(weight_bytes), net::format_bytes(memory_limit)),
                  2);
    runtime_options.memory_limit_bytes = memory_limit - weight_bytes;
    spdlog::info("the served blocks' weights take {}; {} left for sessions and jobs", net::format_bytes(weight_bytes),
                 net::format_bytes(runtime_options.memory_limit_bytes));
  }
  net::NodeRuntime runtime(runtime_options);
  runtime_ptr = &runtime;
  info.set_memory_limit_bytes(runtime.memory_limit_bytes());

  train::NodeServiceOptions train_options;
  train_options.runtime = &runtime;
  train_options.delivery = &delivery;
  train_options.data_dir = args.data_dir;
  train_options.peer_timeout = std::chrono::seconds(args.peer_timeout_s);
  train_options.cheat = cheat;
  train_options.kill_self_at_call = kill_self_call;
  train_options.kill_self_at_count = kill_self_count;
  train_options.stall_at_call = stall_call;
  train_options.stall_at_count = stall_count;
  train_options.stall_at_ms = stall_ms;
  train_options.disk_full_at_call = disk_full_call;
  train_options.disk_full_at_count = disk_full_count;
  if (cheat.active()) spdlog::warn("CHEAT --cheat {}: this node trains dishonestly", args.cheat);
  train_service = train::make_train_service(train_options);
  runtime.add_service(train_service.get());
  runtime.add_service(&delivery);
  runtime.add_service((*model_store)->service());
  net::ProbeServiceOptions probe_service_options;
  probe_service_options.key = &*key;
  probe_service_options.region = args.region;
  probe_service_options.topology = topology;
  probe_service_options.per_minute = args.probe_limit;
  probe_service = std::make_unique<net::ProbeService>(probe_service_options);
  runtime.add_service(probe_service->service());
  // Verification: what this node kept of its training, served to verifiers and referees.
  verify::EvidenceServiceOptions evidence_options;
  evidence_options.data_dir = args.data_dir;
  evidence_options.withhold = cheat.strategy == train::Cheat::Strategy::withhold;
  auto traces = std::make_shared<verify::TraceCache>(args.data_dir, cheat);
  evidence_options.traces = traces;
  if (market) evidence_options.chain_address = chain::address_hex(market->address());
  if (evidence_options.withhold) spdlog::warn("CHEAT --cheat withhold: checkpoints, step evidence and tensors are refused");
  evidence_service = verify::make_evidence_service(evidence_options);
  runtime.add_service(evidence_service.get());

  if (served_model) {
    const auto span = std::make_pair(served_model->first_block, served_model->end_block);
    // A published model is announced from the first announcement on (the store's watcher would within seconds).
    if ((*model_store)->has_chunks(served_model->id, 0, static_cast<int>(served_model->config.layers))) {
      std::lock_guard<std::mutex> lock(info_mutex);
      if (std::find(info.models().begin(), info.models().end(), served_model->id) == info.models().end())
        info.add_models(served_model->id);
    }
    infer::BlockServerOptions serve_options;
    serve_options.runtime = &runtime;
    serve_options.model_id = served_model->id;
    serve_options.model_name = served_model->name;
    serve_options.config = served_model->config;
    serve_options.first_block = span.first;
    serve_options.end_block = span.second;
    serve_options.weights = std::move(served_model->weights);
    serve_options.session_idle = std::chrono::milliseconds(static_cast<int64_t>(args.session_idle_s * 1000));
    serve_options.max_batch = args.max_batch;
    serve_options.cheat_garbage_states = args.cheat == "garbage-states";
    serve_options.cheat_malformed_states = args.cheat == "malformed-states";
    auto server = infer::BlockServer::create(std::move(serve_options));
    if (!server.ok()) return fail("node", server.message(), server.error().exit_code);
    block_server = std::move(server).value();
    runtime.add_service(block_server->service());
    const auto served = block_server->served_span();
    {
      std::lock_guard<std::mutex> lock(info_mutex);
      *info.add_serving() = served;
    }
    if (is_serving_cheat(args.cheat))
      spdlog::warn("CHEAT --cheat {}: this node answers every step with {} instead of its blocks' output", args.cheat,
                   args.cheat == "garbage-states" ? "noise" : "a mis-shaped tensor");
    std::cout << "serving blocks [" << span.first << ", " << span.second << ") of model " << served_model->name
              << " (id " << served_model->id << ", " << served_model->config.layers << " blocks), "
              << fmt::format("{:.0f}", served.throughput()) << " block·tokens/s, sessions idle out after "
              << args.session_idle_s << " s" << (!is_serving_cheat(args.cheat) ? "" : " [CHEAT: " + args.cheat + "]") << std::endl;
  }

  if (auto started = runtime.start(args.listen); !started.ok()) return fail("node", started.message(), 2);
  auto host = net::split_host_port(args.advertise.empty() ? args.listen : args.advertise);
  if (!host.ok()) return fail("node", host.message(), 2);
  std::string address = host->first + ":" + std::to_string(args.advertise.empty() ? runtime.port() : host->second);
  if (host->first == "0.0.0.0") return fail("node", "listening on 0.0.0.0: give --advertise HOST:PORT that peers can reach", 2);
  {
    std::lock_guard<std::mutex> lock(info_mutex);
    info.set_address(address);
  }

  {
    std::lock_guard<std::mutex> lock(info_mutex);
    discovery = std::move(dht).value();
    discovery->announce(announcement(), *key);
  }
  std::cout << "node " << key->node_id() << " listening on " << address << " (dht port "
            << discovery->port() << ", region " << args.region << ", "
            << static_cast<int>(info.compute_gflops()) << " GFLOP/s, admits "
            << net::format_bytes(runtime.memory_limit_bytes()) << ", lease " << args.lease_s << " s)" << std::endl;

  // Measured links: probe the peers the DHT lists and announce the estimates.
  std::unique_ptr<net::Prober> prober;
  if (args.probe_every_s > 0) {
    net::ProberOptions probe_options;
    probe_options.key = &*key;
    probe_options.region = args.region;
    probe_options.topology = topology;
    probe_options.every = std::chrono::milliseconds(static_cast<int64_t>(args.probe_every_s * 1000));
    probe_options.max_peers = static_cast<size_t>(args.probe_peers);
    probe_options.peers = [&] {
      auto listed = discovery->list_nodes(std::chrono::seconds(2));
      if (!listed.ok()) spdlog::debug("probes: listing peers: {}", listed.message());
      return listed.ok() ? std::move(listed).value() : std::vector<solvernet::v1::NodeInfo>{};
    };
    probe_options.on_update = [&](const std::vector<solvernet::v1::LinkEstimate>& estimates) {
      std::lock_guard<std::mutex> lock(info_mutex);
      if (const size_t announced = net::set_link_estimates(info, estimates); announced < estimates.size())
        spdlog::debug("announcing {} of {} link estimates (the DHT's 4 KiB value limit)", announced, estimates.size());
      discovery->update_announcement(announcement());
    };
    // A node holding a job (training, or an inference session) sends no probes: they would
    // take its link and CPU from the job, and measure the job's own traffic.
    probe_options.paused = [&runtime] { return !runtime.held().job_ids.empty(); };
    prober = std::make_unique<net::Prober>(probe_options);
    prober->start();
  }

  std::unique_ptr<verify::SolverAgent> solver_agent;
  if (market) {
    verify::SolverAgentOptions agent_options;
    agent_options.data_dir = args.data_dir;
    agent_options.market = market;
    agent_options.step_ops = traces->step_ops();
    solver_agent = verify::SolverAgent::start(std::move(agent_options));
    std::cout << "committing as " << chain::address_hex(market->address()) << " on " << args.chain_rpc << std::endl;
  }

  int signal_number = wait_for_stop_signal();
  // The devnet that started us was killed: its client, DHT and chain are gone
  // with it, so a goodbye reaches no one, and gRPC's own shutdown can take
  // seconds (measured: 9 s in its executor's poll). Exit as a node killed
  // mid-job would (checkpoints are written atomically); the kernel releases
  // the data-dir lock, which the devnet's DHT waits for to remove its temp dir.
  if (args.parent_pid > 0 && parent_gone(args.parent_pid)) {
    spdlog::info("stopping on signal {}: the devnet (pid {}) is gone; exiting at once", signal_number, args.parent_pid);
    spdlog::default_logger()->flush();
    std::cout << std::flush;
    ::_exit(128 + signal_number);
  }
  solver_agent.reset();
  spdlog::info("stopping on signal {}", signal_number);
  if (prober) prober->stop();
  discovery->stop();
  runtime.shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

CommandRegistration node_command(
    "node", "Run a node: serve training work (and model blocks) and announce it in the DHT",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<NodeArgs>();
      app.add_option("--data", args->data_dir, "Data dir: node key, checkpoints")->required();
      app.add_option("--listen", args->listen, "gRPC address HOST:PORT (port 0: any free)")->capture_default_str();
      app.add_option("--advertise", args->advertise, "Address peers should use, if not --listen");
      app.add_option("--dht-port", args->dht_port, "UDP port of the DHT (0: any free)")
          ->check(CLI::Range(0, 65535))
          ->capture_default_str();
      app.add_option("--bootstrap", args->bootstrap, "DHT node to join, HOST:PORT (repeatable)");
      app.add_option("--region", args->region, "Region name (as in the topology file)")->capture_default_str();
      app.add_option("--topology", args->topology, "Topology file: checks --region; probes are paced as its links to peers' regions");
      app.add_option("--peer-timeout-s", args->peer_timeout_s, "How long to wait for a peer's tensor (unless the job says)")
          ->check(CLI::Range(1, 86400))->capture_default_str();
      app.add_option("--memory-limit-mb", args->memory_limit_mb,
                     "Memory budget for jobs, MiB (0: what the machine has available, less 512 MiB)")->capture_default_str();
      app.add_option("--lease-s", args->lease_s, "A job whose client stops renewing it is dropped after this")->capture_default_str();
      app.add_option("--serve", args->serve,
                     "Serve blocks of a model: MODEL[:FIRST-LAST] (a model file, or a model id fetched from peers; "
                     "blocks 0-based, LAST inclusive; "
                     "no span: fill the largest gap in the swarm's coverage)");
      app.add_option("--session-idle-s", args->session_idle_s, "An inference session unused for this long is dropped")
          ->capture_default_str();
      app.add_option("--max-batch", args->max_batch, "Decode steps of concurrent sessions computed together, at most")
          ->capture_default_str();
      app.add_option("--cheat", args->cheat, "Misbehave on purpose, for tests: garbage-states (noise instead of outputs) or "
                     "malformed-states (outputs one column short) when serving; withhold (refuse to serve evidence) "
                     "when training");
      app.add_option("--kill-self-at", args->kill_self_at,
                     "Test: CALL:N, kill -9 this node on its N-th request of kind CALL (step, outer, eval, setup, "
                     "put-checkpoint, fetch-checkpoint)")->group("");
      app.add_option("--stall-at", args->stall_at,
                     "Test: CALL:N:MS, sleep MS milliseconds before handling the N-th request of kind CALL")->group("");
      app.add_option("--disk-full-at", args->disk_full_at,
                     "Test: CALL:N, from the N-th request of kind CALL on, this node's data dir is a full disk: "
                     "one more file is written, then every write fails with ENOSPC")->group("");
      app.add_option("--probe-every-s", args->probe_every_s,
                     "Measure RTT and throughput to peers this often, ±20% (0: never)")->capture_default_str();
      app.add_option("--probe-peers", args->probe_peers, "Peers probed: the most recently announced")->capture_default_str();
      app.add_option("--probe-limit", args->probe_limit, "Probe requests answered per prober per minute")->capture_default_str();
      app.add_option("--chain-rpc", args->chain_rpc,
                     "Settlement chain JSON-RPC URL: commit step leaves with DATA/chain.key and answer disputes");
      app.add_option("--deployment", args->deployment, "The market's deployment JSON (default: the dev market at --chain-rpc)");
      app.add_option("--log-level", args->log_level, "trace|debug|info|warn|error")->capture_default_str();
      add_insecure_flag(app);
      app.add_option("--parent-pid", args->parent_pid, "Exit when this process dies (used by devnet)")->group("");
      return [args] { return run_node(*args); };
    });

}  // namespace
}  // namespace sn::cli
