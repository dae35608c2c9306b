// solvernet devnet: the whole network on this machine — a DHT bootstrap and N
// node processes on 127.0.0.1 over emulated links — running one job end to end.
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <optional>
#include <thread>

#include "cli/command.h"
#include "cli/job_runner.h"
#include "cli/settlement.h"
#include "cli/signals.h"
#include "core/fs.h"
#include "core/keys.h"
#include "core/log.h"
#include "core/process.h"
#include "infer/span.h"
#include "net/tls.h"

namespace sn::cli {
namespace {

namespace fs = std::filesystem;

struct DevnetArgs {
  std::optional<int> nodes;
  std::string topology = std::string(SOLVERNET_SOURCE_DIR) + "/examples/topologies/two-regions.toml";
  std::string job = std::string(SOLVERNET_SOURCE_DIR) + "/examples/jobs/tiny.toml";
  std::optional<int64_t> steps;
  std::string summary_json;
  std::string out;
  std::string emulate;
  std::string algo = "ours";
  std::string init;
  bool keep = false;
  bool no_chain = false;
  bool json = false;
  double time_dilation = 0;
  std::string key;
  int peer_timeout_s = 60;
  std::string plan_from = "topology";  // or "probes": the links the nodes measured (net/probe.h)
  double probe_every_s = 0;            // the nodes' --probe-every-s (0: 3 s when planning from probes, else 30 s)
  // Serving (docs/inference.md): after training (or straight from --init), the
  // model's blocks spread over block servers and an OpenAI-compatible gateway.
  bool serve = false;
  int serve_nodes = 4;
  std::string gateway_listen = "127.0.0.1:0";
  double serve_for_s = 0;  // 0: until Ctrl-C
};

std::string tail_of(const fs::path& log, size_t lines) {
  auto text = read_file(log);
  if (!text.ok()) return "";
  std::vector<std::string> all;
  size_t start = 0;
  for (size_t i = 0; i <= text->size(); ++i)
    if (i == text->size() || (*text)[i] == '\n') {
      if (i > start) all.push_back(text->substr(start, i - start));
      start = i + 1;
    }
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) out += "    " + all[i] + "\n";
  return out;
}

// Owns the devnet's processes and temp dir; the destructor stops and removes them.
class Devnet {
 public:
  ~Devnet() {
    stop_serving();
    for (auto& child : nodes_) child.terminate(std::chrono::milliseconds(3000));
    dht_.terminate(std::chrono::milliseconds(2000));
    if (!dir_.empty() && !keep_) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  Status start(const DevnetArgs& args, const Topology& topology, int nodes) {
    keep_ = args.keep;
    char tmpl[] = "/tmp/solvernet-devnet-XXXXXX";
    if (!::mkdtemp(tmpl)) return make_error("cannot create a temp dir in /tmp");
    dir_ = tmpl;
    std::string self = self_executable().string();
    auto dht_port = free_loopback_port(SOCK_DGRAM);
    if (!dht_port.ok()) return make_error("no free UDP port for the DHT bootstrap: {}", dht_port.message());
    dht_port_ = *dht_port;
    SpawnOptions dht_options;
    dht_options.stdout_path = dht_options.stderr_path = dir_ / "dht.log";
    // Every child dies with us (parent_death_signal, --parent-pid). If we die
    // without cleaning up (SIGKILL), the DHT bootstrap removes the temp dir,
    // with its node and chain keys, once the nodes have let go of it.
    std::vector<std::string> dht_argv = {self, "dht", "--port", std::to_string(dht_port_), "--parent-pid",
                                         std::to_string(::getpid())};
    if (!keep_) {
      dht_argv.push_back("--orphan-cleanup-dir");
      dht_argv.push_back(dir_.string());
    }
    SN_ASSIGN(dht_, ChildProcess::spawn(dht_argv, dht_options));
    // Our own DHT must hold the port before anyone bootstraps from it: had
    // another process taken it since we picked it, nodes would join that one.
    const std::string listening = fmt::format("dht bootstrap listening on 127.0.0.1:{}", dht_port_);
    for (int i = 0; read_file(dir_ / "dht.log").value_or("").find(listening) == std::string::npos; ++i) {
      if (!dht_.running() || i >= 600 || stop_requested())
        return make_error("the devnet's DHT bootstrap did not start on UDP port {}:\n{}", dht_port_,
                          tail_of(dir_ / "dht.log", 5));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    auto regions = topology.device_regions();
    for (int i = 0; i < nodes; ++i) {
      SpawnOptions options;
      options.stdout_path = options.stderr_path = dir_ / fmt::format("node{}.log", i);
      std::vector<std::string> argv = {self, "node", "--data", (dir_ / fmt::format("node{}", i)).string(),
                                       "--listen", "127.0.0.1:0", "--dht-port", "0",
                                       "--bootstrap", bootstrap(), "--region",
                                       topology.regions[static_cast<size_t>(regions[static_cast<size_t>(i)])].name,
                                       "--parent-pid", std::to_string(::getpid())};
      // The nodes emulate the file's links for their probes, so their estimates see the same links as the job.
      argv.insert(argv.end(), {"--topology", args.topology, "--probe-every-s",
                               fmt::format("{:g}", args.probe_every_s > 0 ? args.probe_every_s
                                                   : args.plan_from == "probes" ? 3.0 : 30.0)});
      if (net::insecure()) argv.push_back("--insecure");  // the nodes must speak what the client speaks
      SN_ASSIGN(auto child, ChildProcess::spawn(argv, options));
      nodes_.push_back(std::move(child));
    }
    return ok_status();
  }

  // The log tails of processes that have exited, for error messages.
  std::string dead_processes_report() {
    std::string report;
    for (size_t i = 0; i < nodes_.size(); ++i)
      if (!nodes_[i].running())
        report += fmt::format("  node {} exited; last lines of {}:\n{}", i, (dir_ / fmt::format("node{}.log", i)).string(),
                              tail_of(dir_ / fmt::format("node{}.log", i), 5));
    if (!dht_.running()) report += "  the DHT bootstrap exited:\n" + tail_of(dir_ / "dht.log", 5);
    return report;
  }

  std::string bootstrap() const { return "127.0.0.1:" + std::to_string(dht_port_); }
  const fs::path& dir() const { return dir_; }
  ChildProcess& node(size_t i) { return nodes_.at(i); }

  // Block servers for MODEL: COUNT nodes, the model's blocks cut in two
  // halves, each half held by every other server (so a killed server has a
  // replacement), then the gateway, whose output (its curl line and live
  // line) goes to our terminal.
  Status start_serving(const fs::path& model, int64_t layers, int count, const std::string& listen) {
    const std::string self = self_executable().string();
    const int64_t half = std::max<int64_t>(1, layers / 2);
    for (int i = 0; i < count; ++i) {
      const bool second = layers > 1 && i % 2 == 1;
      const std::string span = second ? fmt::format("{}-{}", half, layers - 1) : fmt::format("0-{}", (layers > 1 ? half : layers) - 1);
      const fs::path log = dir_ / fmt::format("server{}.log", i);
      SpawnOptions options;
      options.stdout_path = options.stderr_path = log;
      std::vector<std::string> argv = {self, "node", "--data", (dir_ / fmt::format("server{}", i)).string(),
                                       "--listen", "127.0.0.1:0", "--dht-port", "0", "--bootstrap", bootstrap(),
                                       "--serve", model.string() + ":" + span, "--parent-pid", std::to_string(::getpid())};
      if (net::insecure()) argv.push_back("--insecure");
      SN_ASSIGN(auto child, ChildProcess::spawn(argv, options));
      servers_.push_back(std::move(child));
    }
    for (int i = 0; i < count; ++i) {
      const fs::path log = dir_ / fmt::format("server{}.log", i);
      for (int t = 0; read_file(log).value_or("").find("serving blocks") == std::string::npos; ++t) {
        if (!servers_[static_cast<size_t>(i)].running() || t >= 1200 || stop_requested())
          return make_error("block server {} did not start:\n{}", i, tail_of(log, 5));
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    std::vector<std::string> argv = {self, "gateway", "--listen", listen, "--bootstrap", bootstrap()};
    if (net::insecure()) argv.push_back("--insecure");
    SN_ASSIGN(gateway_, ChildProcess::spawn(argv, SpawnOptions{}));
    return ok_status();
  }
  bool gateway_running() { return gateway_.running(); }
  void stop_serving() {
    gateway_.terminate(std::chrono::milliseconds(5000));
    for (auto& server : servers_) server.terminate(std::chrono::milliseconds(3000));
  }
  fs::path node_dir(size_t i) const { return dir_ / fmt::format("node{}", i); }

 private:
  fs::path dir_;
  bool keep_ = false;
  int dht_port_ = 0;
  ChildProcess dht_;
  std::vector<ChildProcess> nodes_;
  std::vector<ChildProcess> servers_;
  ChildProcess gateway_;
};

// Serves MODEL until Ctrl-C (or --serve-for): block servers and the gateway.
int serve_model(Devnet& devnet, const fs::path& model, const DevnetArgs& args) {
  auto file = infer::load_model_file(model);
  if (!file.ok()) return fail("devnet", file.message(), file.error().exit_code);
  std::cerr << fmt::format("devnet: serving {} ({} blocks) on {} block servers; the gateway follows\n",
                           model.string(), file->config.layers, args.serve_nodes);
  if (auto started = devnet.start_serving(model, file->config.layers, args.serve_nodes, args.gateway_listen);
      !started.ok())
    return fail("devnet", started.message(), stop_requested() ? stop_exit_code() : 1);
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(args.serve_for_s);
  while (!stop_requested()) {
    if (!devnet.gateway_running()) return fail("devnet", "the gateway exited (see its lines above)");
    if (args.serve_for_s > 0 && std::chrono::steady_clock::now() >= until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  devnet.stop_serving();
  return stop_requested() ? stop_exit_code() : 0;
}

int run_devnet(const DevnetArgs& args) {
  init_logging("devnet", "warn");
  install_stop_handlers();
  auto job = parse_job_file(args.job);
  if (!job.ok()) return fail("devnet", job.message(), job.error().exit_code);
  if (args.serve_nodes < 1 || args.serve_nodes > 32)
    return fail("devnet", fmt::format("--serve-nodes must be in 1..32, got {}", args.serve_nodes), 2);
  if (!(args.serve_for_s >= 0 && args.serve_for_s <= 1e7))
    return fail("devnet", fmt::format("--serve-for must be ≥ 0 seconds, got {}", args.serve_for_s), 2);
  if (args.serve && !args.init.empty())
    if (auto model = infer::load_model_file(args.init); !model.ok())
      return fail("devnet", model.message() + " (--serve --init serves a model written by solvernet train)", 2);
  auto topology = parse_topology_file(args.topology);
  if (!topology.ok()) return fail("devnet", topology.message(), 2);
  if (args.serve && !args.init.empty()) {
    // Serving the given weights: no training, so no job checks and no training nodes.
    Devnet devnet;
    if (auto started = devnet.start(args, *topology, 0); !started.ok()) return fail("devnet", started.message());
    return serve_model(devnet, args.init, args);
  }
  RunSpec spec;
  spec.job = *job;
  if (args.steps) {
    auto overridden = override_job_integer(spec.job, "train.steps", *args.steps, "--steps");
    if (!overridden.ok()) return fail("devnet", overridden.message(), 2);
    spec.job = *overridden;
  }
  spec.topology = *topology;
  spec.emulate = args.emulate;
  spec.algo = args.algo;
  spec.quiet = args.json;
  spec.time_dilation = args.time_dilation;
  if (args.peer_timeout_s < 1 || args.peer_timeout_s > 86400)
    return fail("devnet", fmt::format("--peer-timeout-s must be in 1..86400, got {}", args.peer_timeout_s), 2);
  if (!(args.probe_every_s == 0 || (args.probe_every_s >= 0.5 && args.probe_every_s <= 86400)))
    return fail("devnet", fmt::format("--probe-every-s must be 0 (the default) or in 0.5..86400, got {:g}", args.probe_every_s), 2);
  spec.initial_weights = args.init;
  const int needed = static_cast<int>(spec.job.parallel.stages * spec.job.parallel.replicas);
  const int nodes = args.nodes ? *args.nodes : std::max(needed, topology->device_count());
  if (args.nodes && nodes < 1) return fail("devnet", fmt::format("--nodes must be at least 1, got {}", nodes), 2);
  if (nodes < needed)
    return fail("devnet", fmt::format("--nodes {} is fewer than the job's {} stages × {} replicas", nodes,
                                      spec.job.parallel.stages, spec.job.parallel.replicas), 2);
  if (nodes > topology->device_count())
    return fail("devnet", args.nodes ? fmt::format("{}: the topology has places for {} nodes, --nodes asks for {}",
                                                   args.topology, topology->device_count(), nodes)
                                     : fmt::format("{}: the topology has places for {} nodes, the job needs {} "
                                                   "({} stages × {} replicas)", args.topology,
                                                   topology->device_count(), nodes, spec.job.parallel.stages,
                                                   spec.job.parallel.replicas), 2);
  fs::path model_out = args.out;
  if (model_out.empty())
    model_out = args.summary_json.empty() ? fs::path("devnet-model.safetensors")
                                          : fs::path(args.summary_json).parent_path() / "devnet-model.safetensors";
  spec.model_out = model_out;
  // Every output and input file is checked before a process starts (nothing is lost later).
  if (!args.summary_json.empty())
    if (auto writable = check_output_file(args.summary_json, "--summary-json"); !writable.ok())
      return fail("devnet", writable.message(), 2);
  if (auto checked = check_run_inputs(spec, false); !checked.ok()) return fail("devnet", checked.message(), 2);

  Devnet devnet;
  if (auto started = devnet.start(args, *topology, nodes); !started.ok()) return fail("devnet", started.message());
  if (!args.json)
    std::cerr << fmt::format("devnet: {} nodes on topology \"{}\", DHT bootstrap {}, logs in {}\n", nodes,
                             topology->name, devnet.bootstrap(), devnet.dir().string());
  // The bootstrap is our own child, still starting: give it the whole minute.
  auto found = discover_nodes({devnet.bootstrap()}, static_cast<size_t>(nodes), std::chrono::seconds(60),
                              std::chrono::seconds(60));
  if (stop_requested()) return fail("devnet", "interrupted", stop_exit_code());
  if (!found.ok()) return fail("devnet", found.message() + "\n" + devnet.dead_processes_report());
  if (!args.json) std::cerr << fmt::format("devnet: all {} nodes discovered\n", found->size());
  if (args.plan_from == "probes") {
    // Plan from what the nodes measured: wait (bounded) until each announces every peer.
    found = wait_for_link_estimates({devnet.bootstrap()}, std::move(found).value(), std::chrono::seconds(60));
    if (stop_requested()) return fail("devnet", "interrupted", stop_exit_code());
    if (!found.ok()) return fail("devnet", found.message() + "\n" + devnet.dead_processes_report());
    spec.plan_from_probes = true;
  }

  // Settlement: a local chain, every node funded and staked, the job escrowed.
  std::unique_ptr<DevnetSettlement> settlement;
  nlohmann::json balances_before;
  uint64_t chain_job = 0;
  if (!args.no_chain) {
    std::vector<SettlementNode> staked;
    for (int i = 0; i < nodes; ++i) {
      auto key = NodeKey::load_or_create(devnet.node_dir(static_cast<size_t>(i)));
      if (!key.ok()) return fail("devnet", key.message());
      staked.push_back({key->node_id(), devnet.node_dir(static_cast<size_t>(i))});
    }
    auto started = DevnetSettlement::start(devnet.dir(), staked);
    if (!started.ok()) return fail("devnet", "chain: " + started.message());
    settlement = std::move(started).value();
    auto before = settlement->balances();
    if (!before.ok()) return fail("devnet", "chain: " + before.message());
    balances_before = *before;
    auto posted = settlement->post_job(needed, spec.job.name);
    if (!posted.ok()) return fail("devnet", "chain: posting the job: " + posted.message());
    chain_job = *posted;
    if (!args.json)
      std::cerr << fmt::format("devnet: chain at {}, {} nodes staked, job {} escrowed\n", settlement->rpc_url(), nodes,
                               chain_job);
  }

  // The client's key lives with the devnet unless --key names one.
  spec.client_key = args.key.empty() ? devnet.dir() / "client.key" : fs::path(args.key);
  spec.peer_timeout_s = args.peer_timeout_s;
  auto summary = run_job_on_nodes(spec, *found);
  if (!summary.ok()) {
    std::string report = devnet.dead_processes_report();
    return fail("devnet", summary.message() + (report.empty() ? "" : "\n" + report),
                stop_requested() ? stop_exit_code() : summary.error().exit_code);
  }
  if (settlement) {
    std::vector<std::string> solvers;
    for (const auto& stage : (*summary)["placement"]["stages"])
      for (const auto& member : stage) solvers.push_back(member["node_id"].get<std::string>());
    auto roots = (*summary)["member_commitments"].get<std::vector<std::string>>();
    auto settled = settlement->commit_and_finalize(chain_job, solvers, roots, std::max<uint64_t>(1, spec.job.train.steps));
    if (!settled.ok()) return fail("devnet", "chain: " + settled.message());
    auto after = settlement->balances();
    if (!after.ok()) return fail("devnet", "chain: " + after.message());
    (*summary)["chain"] = {{"job_id", chain_job}, {"balances_before", balances_before}, {"balances_after", *after}};
  }
  (*summary)["devnet_dir"] = args.keep ? devnet.dir().string() : "";
  if (!args.summary_json.empty()) {
    auto written = write_file_atomic(args.summary_json, summary->dump(2) + "\n");
    if (!written.ok()) return fail("devnet", written.message());
  }
  if (args.json)
    std::cout << summary->dump(2) << std::endl;
  else {
    print_summary_table(*summary);
    if (summary->contains("chain"))
      print_balances((*summary)["chain"]["balances_before"], (*summary)["chain"]["balances_after"]);
    if (!args.summary_json.empty()) std::cout << "  summary                " << args.summary_json << "\n";
  }
  if (args.serve) return serve_model(devnet, model_out, args);
  return 0;
}

CommandRegistration devnet_command(
    "devnet", "Run the whole network on this machine and train one job end to end",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<DevnetArgs>();
      app.add_option("--nodes", args->nodes, "Node processes (default: the topology's node count)");
      app.add_option("--topology", args->topology, "Topology file")->capture_default_str();
      app.add_option("--job", args->job, "Job file")->capture_default_str();
      app.add_option("--steps", args->steps, "Override train.steps (1 .. 2^40, as in a job file)");
      app.add_option("--summary-json", args->summary_json, "Write the summary JSON here");
      app.add_option("--out", args->out, "Write the final model here (default: beside the summary, or ./)");
      app.add_option("--emulate", args->emulate, "raw | scaled (default: the topology's mode)")
          ->check(CLI::IsMember({"raw", "scaled"}));
      app.add_option("--algo", args->algo, "Placement: ours | dtfm | random | naive")->capture_default_str();
      app.add_option("--plan-from", args->plan_from, "Links the placement plans from: topology | probes (measured by the nodes)")
          ->check(CLI::IsMember({"topology", "probes"}))
          ->capture_default_str();
      app.add_option("--probe-every-s", args->probe_every_s,
                     "The nodes' probe interval (default: 3 s with --plan-from probes, else 30 s)");
      app.add_option("--init", args->init, "Start from these weights (safetensors)");
      app.add_flag("--no-chain", args->no_chain, "Skip settlement (no anvil, no stakes or escrow)");
      app.add_flag("--keep", args->keep, "Keep the temp dir (logs, node data) afterwards");
      app.add_option("--time-dilation", args->time_dilation,
                     "Scaled links: use this T (1e-4 .. 1e4) instead of measuring compute");
      app.add_option("--key", args->key, "Client key file (default: one made in the devnet's temp dir)");
      app.add_option("--peer-timeout-s", args->peer_timeout_s, "How long a node waits for a peer")->capture_default_str();
      app.add_flag("--json", args->json, "Print the summary as JSON (no progress line)");
      app.add_flag("--serve", args->serve,
                   "Then serve the model (--init: serve it without training): block servers and an OpenAI-compatible "
                   "gateway, until Ctrl-C");
      app.add_option("--serve-nodes", args->serve_nodes, "Block servers for --serve (default 4)");
      app.add_option("--gateway-listen", args->gateway_listen, "Gateway HOST:PORT for --serve (default 127.0.0.1:0)");
      app.add_option("--serve-for", args->serve_for_s, "Stop serving after this many seconds (default: until Ctrl-C)");
      add_insecure_flag(app);
      return [args] { return run_devnet(*args); };
    });

}  // namespace
}  // namespace sn::cli
