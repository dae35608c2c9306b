// solvernet devnet: the whole network on this machine — a DHT bootstrap and N
// node processes on 127.0.0.1 over emulated links — running one job end to end.
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <charconv>
#include <cmath>
#include <filesystem>
#include <atomic>
#include <iostream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "chain/chain.h"
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
#include "train/train.h"
#include "verify/verify.h"

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
  // Verification (docs/verification.md): spare staked nodes verify the solvers.
  std::optional<int> verifiers;
  std::string cheater;     // NODE_INDEX:STRATEGY
  bool lying_verifier = false;
  bool silent_cheater = false;  // tests: the cheater's node is stopped (SIGSTOP) once challenged
  // The verifiers and the referee as processes (solvernet verify run / verify
  // referee) instead of threads of the devnet: the same code, as a user runs it.
  bool role_processes = false;
  // Recovery (docs/resilience.md): spare nodes beyond the plan (default 1
  // when the topology has room), how long a recovery waits for one.
  std::optional<int> spares;
  int spare_wait_s = 10;
  // Hidden, for tests, the demo and bench_churn: each kill_at entry
  // S:STAGE.REPLICA kills -9 the node holding role STAGE.REPLICA at step S
  // (after step S's first report, plus kill_delay_ms: so during step S+1);
  // restart each killed node with its data dir after restart_after_s (none:
  // never); start one more node after step join_at_step (none: never).
  std::vector<std::string> kill_at;
  int kill_delay_ms = 0;
  std::optional<double> restart_after_s;
  std::optional<int64_t> join_at_step;
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

// Stops CHILDREN together: SIGTERM to each, up to GRACE for all of them at
// once, then SIGKILL for any still running; every one is reaped before this
// returns. (Stopped one after another, a devnet's Ctrl-C waited for each
// node's shutdown in turn: ~7 s.)
void terminate_together(const std::vector<ChildProcess*>& children, std::chrono::milliseconds grace) {
  for (auto* child : children)
    if (child->pid() > 0 && child->running()) ::kill(child->pid(), SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + grace;
  for (auto* child : children)
    child->wait_for(std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                               deadline - std::chrono::steady_clock::now())));
  for (auto* child : children) child->terminate(std::chrono::milliseconds(0));
}

// Owns the devnet's processes and temp dir; the destructor stops and removes them.
class Devnet {
 public:
  ~Devnet() {
    std::vector<ChildProcess*> all = {&gateway_, &dht_};
    for (auto& server : servers_) all.push_back(&server);
    for (auto& node : nodes_) all.push_back(&node);
    terminate_together(all, std::chrono::milliseconds(3000));
    if (!dir_.empty() && !keep_) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
  }

  // BEFORE_NODES runs once the temp dir and the DHT exist, before any node
  // starts; NODE_ARGS(i) adds flags to node i.
  Status start(const DevnetArgs& args, const Topology& topology, int nodes,
               const std::function<Status()>& before_nodes = {},
               const std::function<std::vector<std::string>(int)>& node_args = {}) {
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
    // Every child dies with us (parent_death_signal, --parent-pid; a node or
    // the DHT whose parent died exits at once). If we die without cleaning up
    // (SIGKILL), the DHT bootstrap removes the temp dir, with its node and
    // chain keys, once the nodes have let go of it (a few seconds at most).
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
    if (before_nodes) SN_TRY(before_nodes());
    auto regions = topology.device_regions();
    for (int i = 0; i < nodes; ++i) {
      SpawnOptions options;
      options.stdout_path = options.stderr_path = dir_ / fmt::format("node{}.log", i);
      // Nodes beyond the topology's places (verifiers) take its places' regions in turn.
      const int region = regions[static_cast<size_t>(i) % regions.size()];
      std::vector<std::string> argv = {self, "node", "--data", (dir_ / fmt::format("node{}", i)).string(),
                                       "--listen", "127.0.0.1:0", "--dht-port", "0",
                                       "--bootstrap", bootstrap(), "--region",
                                       topology.regions[static_cast<size_t>(region)].name,
                                       "--parent-pid", std::to_string(::getpid())};
      // The nodes emulate the file's links for their probes, so their estimates see the same links as the job.
      argv.insert(argv.end(), {"--topology", args.topology, "--probe-every-s",
                               fmt::format("{:g}", args.probe_every_s > 0 ? args.probe_every_s
                                                   : args.plan_from == "probes" ? 3.0 : 30.0)});
      if (net::insecure()) argv.push_back("--insecure");  // the nodes must speak what the client speaks
      if (node_args)
        for (auto& extra : node_args(i)) argv.push_back(std::move(extra));
      SN_ASSIGN(auto child, ChildProcess::spawn(argv, options));
      nodes_.push_back(std::move(child));
      argvs_.push_back(argv);
    }
    return ok_status();
  }

  // Churn (hidden flags): kill -9 node I; start it again with its data dir
  // (same argv, log appended); start one more node like node I in REGION.
  pid_t kill_node(size_t i) {
    const pid_t pid = nodes_.at(i).pid();
    nodes_.at(i).kill_now();
    return pid;
  }
  Status restart_node(size_t i) {
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir_ / fmt::format("node{}-restarted.log", i);
    // Started from a churn thread that ends before the node should: it dies
    // with the devnet through --parent-pid instead.
    options.parent_death_signal = 0;
    SN_ASSIGN(auto child, ChildProcess::spawn(argvs_.at(i), options));
    nodes_.at(i) = std::move(child);
    return ok_status();
  }
  Result<size_t> add_node(const std::string& region) {
    const size_t i = nodes_.size();
    auto argv = argvs_.at(0);
    for (size_t a = 0; a + 1 < argv.size(); ++a) {
      if (argv[a] == "--data") argv[a + 1] = (dir_ / fmt::format("node{}", i)).string();
      if (argv[a] == "--region") argv[a + 1] = region;
    }
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir_ / fmt::format("node{}.log", i);
    SN_ASSIGN(auto child, ChildProcess::spawn(argv, options));
    nodes_.push_back(std::move(child));
    argvs_.push_back(argv);
    return i;
  }
  size_t node_count() const { return nodes_.size(); }

  // The log tails of processes that have exited, for error messages.
  std::string dead_processes_report() {
    std::string report;
    for (size_t i = 0; i < nodes_.size(); ++i)
      if (!nodes_[i].running())
        report += fmt::format("  node {} exited; last lines of {}:\n{}", i, (dir_ / fmt::format("node{}.log", i)).string(),
                              tail_of(dir_ / fmt::format("node{}.log", i), 5));
    if (!dht_.running()) report += "  the DHT bootstrap exited:\n" + tail_of(dir_ / "dht.log", 5);
    if (!report.empty() && !keep_) report += "  (the logs go with the devnet's temp dir on exit; --keep keeps them)\n";
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
    std::vector<ChildProcess*> serving = {&gateway_};
    for (auto& server : servers_) serving.push_back(&server);
    terminate_together(serving, std::chrono::milliseconds(5000));
  }
  fs::path node_dir(size_t i) const { return dir_ / fmt::format("node{}", i); }
  fs::path node_log(size_t i) const { return dir_ / fmt::format("node{}.log", i); }

 private:
  fs::path dir_;
  bool keep_ = false;
  int dht_port_ = 0;
  ChildProcess dht_;
  std::vector<ChildProcess> nodes_;
  std::vector<std::vector<std::string>> argvs_;
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

// "NODE_INDEX:STRATEGY" of --cheater.
Result<std::pair<int, std::string>> parse_cheater(const std::string& text, int nodes) {
  const auto colon = text.find(':');
  if (colon == std::string::npos || colon == 0)
    return input_error("--cheater {}: expected NODE_INDEX:STRATEGY, e.g. 0:lie-in-leaf", text);
  int index = -1;
  try {
    size_t used = 0;
    index = std::stoi(text.substr(0, colon), &used);
    if (used != colon) index = -1;
  } catch (const std::exception&) {
  }
  if (index < 0 || index >= nodes)
    return input_error("--cheater {}: node index must be in 0..{} (there are {} nodes)", text, nodes - 1, nodes);
  const std::string strategy = text.substr(colon + 1);
  SN_TRY(train::parse_cheat_strategy(strategy));
  return std::make_pair(index, strategy);
}

// After training: the solvers' own commits, the verifiers each seat's seed
// selects, the referee (the submitter) ruling what reaches it, the window,
// finalization. Lines go to stderr as they happen; returns the verification
// report (null when nobody verifies).
Result<nlohmann::json> settle(DevnetSettlement& settlement, Devnet& devnet, uint64_t chain_job,
                              const nlohmann::json& summary, int verifiers, const std::vector<std::string>& node_ids,
                              const DevnetArgs& args, std::optional<int> silent_node) {
  bool stopped = false;
  auto say = [&](const std::string& line) {
    if (!args.json) std::cerr << "devnet: " << line << std::endl;
  };
  SN_TRY(settlement.wait_for_final_commits(chain_job, 120));
  auto market = settlement.submitter();
  std::vector<verify::MemberEndpoint> members;
  int stage = 0;
  for (const auto& replicas : summary["placement"]["stages"]) {
    int replica = 0;
    for (const auto& m : replicas) {
      members.push_back({stage, replica, m.value("node_id", ""), m.value("address", "")});
      ++replica;
    }
    ++stage;
  }
  for (const auto& m : members) {
    auto client = settlement.node_client(m.node_id);
    if (!client.ok()) return client.error();
    SN_ASSIGN(chain::CommitState commit, market->commit_state(chain_job, (*client)->address()));
    say(fmt::format("stage {} replica {}: node {} committed root {}… over {} leaves{}", m.stage, m.replica,
                    m.node_id.substr(0, 8), to_hex(commit.root).substr(0, 16), commit.leaf_count,
                    commit.is_final ? " (final)" : ""));
  }
  if (verifiers == 0) {
    SN_TRY(settlement.finalize(chain_job));
    return nlohmann::json();
  }
  // Replays must compute what the nodes computed: one thread, as they run.
  train::init_single_threaded();
  // Deadlines are in blocks: from now on blocks come with time, not only with transactions.
  settlement.start_block_clock(std::chrono::milliseconds(1000));
  SN_ASSIGN(Hash256 seed, market->verifier_seed(chain_job));
  say(fmt::format("verifier seed {}… (the hash of the block after the last commit)", to_hex(seed).substr(0, 16)));
  // The referee watches the whole time the verifiers work.
  std::atomic<bool> verifying{true};
  Result<nlohmann::json> rulings = nlohmann::json::array();
  auto referee_key = NodeKey::load_or_create(devnet.dir() / "submitter");
  if (!referee_key.ok()) return referee_key.error();
  verify::RefereeOptions referee;
  referee.work_dir = devnet.dir() / "submitter" / "referee";
  referee.key = &*referee_key;
  referee.market = market;
  referee.chain_job = chain_job;
  referee.job_id = summary["job_id"].get<std::string>();
  referee.members = members;
  referee.keep_going = [&] { return verifying.load() && !stop_requested(); };
  referee.report = [&](const std::string& line) { say("referee: " + line); };
  // With --role-processes: `solvernet verify referee` / `verify run`, given
  // the job's summary, the chain and the role's data dir, JSON on stdout.
  const std::string self = self_executable().string();
  const fs::path summary_file = devnet.dir() / "job-summary.json";
  auto role_argv = [&](const std::string& role, const fs::path& data) {
    return std::vector<std::string>{self, "verify", role, "--summary", summary_file.string(), "--chain-rpc",
                                    settlement.rpc_url(), "--chain-job", std::to_string(chain_job), "--data",
                                    data.string(), "--json"};
  };
  auto role_options = [&](const std::string& name) {
    SpawnOptions spawn;
    spawn.stdout_path = devnet.dir() / (name + ".json");
    if (args.json) spawn.stderr_path = devnet.dir() / (name + ".log");  // else its live lines go to our stderr
    return spawn;
  };
  auto role_json = [&](const std::string& name) -> Result<nlohmann::json> {
    SN_ASSIGN(std::string text, read_file(devnet.dir() / (name + ".json")));
    auto parsed = nlohmann::json::parse(text, nullptr, false);
    if (parsed.is_discarded()) return make_error("{} printed no JSON", name);
    return parsed;
  };
  ChildProcess referee_process;
  std::thread referee_thread;
  if (args.role_processes) {
    SN_TRY(write_file_atomic(summary_file, summary.dump(2) + "\n"));
    if (silent_node) return input_error("--silent-cheater needs the in-process roles (drop --role-processes)");
    SN_ASSIGN(referee_process, ChildProcess::spawn(role_argv("referee", devnet.dir() / "submitter"),
                                                   role_options("referee")));
  } else {
    referee_thread = std::thread([&] { rulings = verify::run_referee(referee); });
  }
  nlohmann::json reports = nlohmann::json::array();
  Status outcome = ok_status();
  for (int seat = 0; seat < verifiers && outcome.ok(); ++seat) {
    auto selected = market->selected_verifier(chain_job, static_cast<uint64_t>(seat));
    if (!selected.ok()) {
      outcome = selected.error();
      break;
    }
    const std::string node_id = settlement.node_of_address(chain::address_hex(*selected));
    if (node_id.empty()) {
      outcome = make_error("seat {}: the seed selects {}, not a devnet node", seat, chain::address_hex(*selected));
      break;
    }
    const size_t index = static_cast<size_t>(
        std::find(node_ids.begin(), node_ids.end(), node_id) - node_ids.begin());
    say(fmt::format("seat {}: the seed picks node {} ({}) as verifier", seat, index, node_id.substr(0, 8)));
    auto key = NodeKey::load_or_create(devnet.node_dir(index));
    auto client = settlement.node_client(node_id);
    if (!key.ok() || !client.ok()) {
      outcome = make_error("verifier node {}: {}", index, key.ok() ? client.message() : key.message());
      break;
    }
    if (args.role_processes) {
      auto argv = role_argv("run", devnet.node_dir(index));
      argv.insert(argv.end(), {"--seat", std::to_string(seat)});
      if (args.lying_verifier) argv.push_back("--lie");
      const std::string name = fmt::format("verifier{}", seat);
      auto child = ChildProcess::spawn(argv, role_options(name));
      const int status = child.ok() ? child->wait() : -1;
      auto report = status == 0 ? role_json(name) : Result<nlohmann::json>(make_error(
          "solvernet verify run (seat {}) exited with {}", seat, child.ok() ? std::to_string(status) : child.message()));
      if (!report.ok()) {
        outcome = report.error();
        break;
      }
      (*report)["node"] = static_cast<int>(index);
      (*report)["address"] = chain::address_hex(*selected);
      reports.push_back(*report);
      continue;
    }
    verify::VerifierOptions options;
    options.work_dir = devnet.node_dir(index) / "verify";
    options.key = &*key;
    options.market = *client;
    options.chain_job = chain_job;
    options.job_id = referee.job_id;
    options.members = members;
    options.seat = static_cast<uint64_t>(seat);
    options.lie = args.lying_verifier;
    options.keep_going = [] { return !stop_requested(); };
    options.report = [&](const std::string& line) {
      say("verifier: " + line);
      // --silent-cheater: the cheater stops answering the moment it is challenged.
      if (silent_node && line.find("challenged") != std::string::npos) {
        say(fmt::format("stopping node {} (SIGSTOP): it will miss its turn", *silent_node));
        ::kill(devnet.node(static_cast<size_t>(*silent_node)).pid(), SIGSTOP);
        stopped = true;
      }
    };
    auto report = verify::run_verifier(options);
    if (stopped) ::kill(devnet.node(static_cast<size_t>(*silent_node)).pid(), SIGCONT);
    if (!report.ok()) {
      outcome = report.error();
      break;
    }
    (*report)["node"] = static_cast<int>(index);
    (*report)["address"] = chain::address_hex(*selected);
    reports.push_back(*report);
  }
  verifying = false;
  if (referee_thread.joinable()) referee_thread.join();
  if (args.role_processes) {
    // SIGTERM ends its loop; it prints its rulings and exits 0.
    referee_process.terminate(std::chrono::milliseconds(20000));
    rulings = role_json("referee");
  }
  settlement.stop_block_clock();
  SN_TRY(outcome);
  if (!rulings.ok()) return rulings.error();
  SN_TRY(settlement.finalize(chain_job));
  say("challenge window over: job finalized");
  // The flat view the table and tests read: verdicts per member, disputes with their figures.
  nlohmann::json disputes = nlohmann::json::array();
  int64_t checked = 0, honest = 0, caught = 0, not_checked = 0;
  for (const auto& verifier : reports)
    for (const auto& member : verifier["members"]) {
      if (member.contains("error")) {
        ++not_checked;
        continue;
      }
      ++checked;
      if (member.value("verdict", "") == "honest") ++honest;
      if (!member.contains("dispute")) continue;
      const auto& outcome = member.value("outcome", nlohmann::json::object());
      if (outcome.value("loser", "") == member.value("solver", "")) ++caught;
      nlohmann::json d = {{"dispute", member["dispute"]},
                          {"stage", member["stage"]},
                          {"replica", member["replica"]},
                          {"solver", member["solver"]},
                          {"challenger", verifier.value("address", "")},
                          {"challenged", member.value("challenged", nlohmann::json::array())},
                          {"result", outcome.value("result", "open")},
                          {"by_timeout", outcome.value("by_timeout", false)},
                          {"winner", outcome.value("winner", "")},
                          {"loser", outcome.value("loser", "")},
                          {"slashed_wei", outcome.value("slashed", "0")},
                          {"wall_s", outcome.value("wall_s", 0.0)}};
      if (outcome.contains("figures")) {
        d["step_rounds"] = outcome["figures"]["step_rounds"];
        d["op_rounds"] = outcome["figures"]["op_rounds"];
        d["transactions"] = outcome["figures"]["transactions"];
        d["gas"] = outcome["figures"]["gas"];
      }
      for (const auto& ruling : *rulings)
        if (ruling.value("dispute", uint64_t{0}) == member["dispute"].get<uint64_t>()) {
          d["step"] = ruling["step"];
          d["operation"] = ruling["operation"];
          d["operation_kind"] = ruling.value("kind", "");
          d["referee"] = ruling.value("why", "");
        }
      disputes.push_back(d);
    }
  return nlohmann::json{{"seed", to_hex(seed)},
                        {"verifier_count", reports.size()},
                        {"members_checked", checked},
                        {"members_not_checked", not_checked},
                        {"verdicts", {{"honest", honest}, {"disputed", disputes.size()}, {"slashed", caught}}},
                        {"disputes", disputes},
                        {"verifiers", reports},
                        {"rulings", *rulings}};
}

// The verification section of the table: verdicts, each dispute, the stakes it moved.
void print_verification(const nlohmann::json& summary, const nlohmann::json& v, const nlohmann::json& before,
                        const nlohmann::json& after) {
  auto row = [](const std::string& k, const std::string& value) { std::cout << fmt::format("  {:<22} {}\n", k, value); };
  std::cout << "\n";
  // The client did not stop at these (a [verify] job on chain): verification decides who lied.
  for (const auto& line : summary.value("replica_divergences", nlohmann::json::array()))
    row("replicas differ", line.get<std::string>() + " (left to verification)");
  for (const auto& verifier : v["verifiers"]) {
    std::string members;
    double p = 1;
    for (const auto& m : verifier["members"]) {
      if (!m.contains("replayed")) continue;
      members += fmt::format("{}s{}r{}: {}/{}", members.empty() ? "" : ", ", m["stage"].get<int>(), m["replica"].get<int>(),
                             m["replayed"].size(), m.value("segments", int64_t{0}));
      p = std::min(p, m.value("detection_probability", 1.0));
    }
    row("verifier", fmt::format("{} replayed segments {} (detection ≥ {:.4f} at q = 10%)", verifier.value("address", ""),
                                members.empty() ? "none" : members, p));
  }
  const auto& verdicts = v["verdicts"];
  row("verification", fmt::format("{} members checked: {} honest, {} disputed, {} slashed{}", v.value("members_checked", 0),
                                  verdicts.value("honest", 0), verdicts.value("disputed", 0), verdicts.value("slashed", 0),
                                  v.value("members_not_checked", 0) > 0
                                      ? fmt::format(", {} not checked", v.value("members_not_checked", 0)) : ""));
  for (const auto& d : v["disputes"]) {
    std::string gas;
    if (d.contains("gas"))
      gas = fmt::format(", gas solver {} / challenger {} / referee {}", d["gas"].value("solver", uint64_t{0}),
                        d["gas"].value("challenger", uint64_t{0}), d["gas"].value("referee", uint64_t{0}));
    row(fmt::format("dispute {}", d["dispute"].get<uint64_t>()),
        fmt::format("stage {} replica {}: {}{} after {} step + {} operation rounds{}{}", d["stage"].get<int>(),
                    d["replica"].get<int>(), d.value("result", ""), d.value("by_timeout", false) ? " (by timeout)" : "",
                    d.value("step_rounds", 0), d.value("op_rounds", 0),
                    d.contains("operation") ? fmt::format(", operation {} of step {} ({})", d["operation"].get<uint64_t>(),
                                                          d["step"].get<int64_t>(), d.value("operation_kind", ""))
                                            : "",
                    gas));
  }
  // Stakes that moved (wei → ETH, 4 decimals).
  auto eth = [](const std::string& wei) {
    std::string s = wei;
    while (s.size() < 19) s = "0" + s;
    return s.substr(0, s.size() - 18) + "." + s.substr(s.size() - 18, 4);
  };
  for (auto& [who, a] : after.items()) {
    if (!before.contains(who) || before[who].value("staked", "") == a.value("staked", "")) continue;
    row(who == "submitter" ? "stake of submitter" : "stake of node " + who.substr(0, 8),
        fmt::format("{} → {} ETH", eth(before[who].value("staked", "0")), eth(a.value("staked", "0"))));
  }
}

// A --kill-at entry: kill -9 whichever node holds role STAGE.REPLICA when
// step STEP is first reported (after a recovery that is the replacement).
struct KillPlan {
  std::string text;
  int64_t step = 0;
  int stage = 0, replica = 0;
};

// A whole decimal number in MIN..MAX: no sign, space or trailing text, and
// an overflow is refused like any other value out of range.
template <typename Int>
std::optional<Int> parse_decimal(std::string_view text, Int min, Int max) {
  Int value{};
  if (text.empty() || text.front() < '0' || text.front() > '9') return std::nullopt;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < min || value > max) return std::nullopt;
  return value;
}

// STEPS: the job's; a step beyond them is never reported, so its kill would never fire.
Result<KillPlan> parse_kill_plan(const std::string& text, int64_t steps, int64_t stages, int64_t replicas) {
  const auto colon = text.find(':');
  const auto dot = colon == std::string::npos ? std::string::npos : text.find('.', colon);
  const std::string_view all(text);
  std::optional<int64_t> step;
  std::optional<int> stage, replica;
  if (dot != std::string::npos) {
    step = parse_decimal<int64_t>(all.substr(0, colon), 1, steps);
    stage = parse_decimal<int>(all.substr(colon + 1, dot - colon - 1), 0, static_cast<int>(stages) - 1);
    replica = parse_decimal<int>(all.substr(dot + 1), 0, static_cast<int>(replicas) - 1);
  }
  if (!step || !stage || !replica)
    return input_error("--kill-at must be STEP:STAGE.REPLICA with STEP in 1..{} and a role within the job's {} × {}, "
                       "got \"{}\"", steps, stages, replicas, text);
  return KillPlan{text, *step, *stage, *replica};
}

// What the devnet saw of a kill, on the job's clock (seconds since the job was handed to the client).
struct KillRecord {
  bool fired = false;          // its step was reported
  std::optional<size_t> node;  // the devnet node killed (none: no devnet node held the role)
  std::string node_id;
  double at_s = -1;            // just before SIGKILL was sent (<0: never sent)
};
// A step's report, on the same clock: the step started at end_s − seconds.
struct StepMark {
  int64_t step = 0;
  double end_s = 0, seconds = 0;
};

// Splits each recovery that followed a kill into detection (the kill to the
// client noticing the failure), replacement (the client's recovery itself:
// finding who is dead, taking spares, setting every member up from the
// checkpoint; RecoveryReport::seconds) and catch-up (running again the steps
// done since the checkpoint), as detection_s, replacement_s, catch_up_s and
// their sum recover_s on the summary's recovery entries, and lists the kills as
// summary["kills"]. The first step after a recovery starts the moment the
// recovery ends, so its report dates the recovery. A kill belongs to the first
// recovery detected after it; two kills found by one recovery both belong to it.
void split_recoveries(nlohmann::json& summary, const std::vector<KillPlan>& plans,
                      const std::vector<KillRecord>& kills, const std::vector<StepMark>& marks) {
  constexpr double kNever = std::numeric_limits<double>::infinity();
  std::vector<int> recovery_of(kills.size(), -1);
  if (summary.contains("recovery")) {
    auto& recoveries = summary["recovery"]["recoveries"];
    size_t cursor = 0;
    for (size_t r = 0; r < recoveries.size(); ++r) {
      auto& rec = recoveries[r];
      if (rec["dead"].empty()) continue;  // a grow-back: nobody died
      const int64_t restored = rec["restored_step"].get<int64_t>();
      const auto redone = static_cast<int64_t>(std::llround(rec["redone_steps"].get<double>()));
      const double replacement = rec["seconds"].get<double>();
      double first_kill = kNever;
      for (size_t k = 0; k < kills.size(); ++k)
        if (recovery_of[k] < 0 && kills[k].at_s >= 0) first_kill = std::min(first_kill, kills[k].at_s);
      size_t a = cursor;
      while (a < marks.size() && !(marks[a].step == restored + 1 && marks[a].end_s - marks[a].seconds >= first_kill)) ++a;
      if (a == marks.size()) continue;
      const double resumed = marks[a].end_s - marks[a].seconds, detected = resumed - replacement;
      double earliest = kNever;
      for (size_t k = 0; k < kills.size(); ++k)
        if (recovery_of[k] < 0 && kills[k].at_s >= 0 && kills[k].at_s <= detected) {
          recovery_of[k] = static_cast<int>(r);
          earliest = std::min(earliest, kills[k].at_s);
        }
      if (earliest == kNever) continue;  // not a kill's (a link or a peer wait failed)
      size_t c = a;
      while (redone > 0 && c < marks.size() && marks[c].step != restored + redone) ++c;
      rec["detection_s"] = detected - earliest;
      rec["replacement_s"] = replacement;
      if (c < marks.size()) {
        const double catch_up = redone > 0 ? marks[c].end_s - resumed : 0.0;
        rec["catch_up_s"] = catch_up;
        rec["recover_s"] = detected - earliest + replacement + catch_up;
      }
      cursor = std::min(c, marks.size() - 1) + 1;
    }
  }
  nlohmann::json out = nlohmann::json::array();
  for (size_t k = 0; k < kills.size(); ++k)
    out.push_back({{"kill", plans[k].text},
                   {"after_step", plans[k].step},
                   {"stage", plans[k].stage},
                   {"replica", plans[k].replica},
                   {"node", kills[k].node ? nlohmann::json(*kills[k].node) : nlohmann::json()},
                   {"node_id", kills[k].node_id},
                   {"at_s", kills[k].at_s >= 0 ? nlohmann::json(kills[k].at_s) : nlohmann::json()},
                   {"recovery", recovery_of[k] >= 0 ? nlohmann::json(recovery_of[k]) : nlohmann::json()}});
  summary["kills"] = out;
}

// A failed run's resume advice names its job dir inside the devnet's temp dir
// (JOBS/<job id>), which is removed on exit: moves the job dir to DEST_PARENT
// and returns MESSAGE naming it there, or, if it cannot, MESSAGE saying that
// --keep is needed.
std::string keep_job_dir(const fs::path& jobs, const fs::path& dest_parent, std::string message) {
  std::error_code ec;
  fs::path job_dir;
  for (const auto& entry : fs::directory_iterator(jobs, ec))
    if (entry.is_directory()) job_dir = entry.path();
  const fs::path dest = dest_parent / job_dir.filename();
  const Status moved = [&]() -> Status {
    if (job_dir.empty()) return make_error("no job dir in {}", jobs.string());
    if (fs::exists(dest, ec)) return make_error("{} exists already", dest.string());
    fs::rename(job_dir, dest, ec);
    if (!ec) return ok_status();
    // Another file system: copy (the temp dir, original included, goes on exit).
    ec.clear();
    fs::copy(job_dir, dest, fs::copy_options::recursive, ec);
    if (!ec) return ok_status();
    std::error_code ignored;
    fs::remove_all(dest, ignored);
    return make_error("cannot copy it to {}: {}", dest.string(), ec.message());
  }();
  if (!moved.ok())
    return message + fmt::format("\n  the job dir is in the devnet's temp dir, which is removed on exit ({}): run "
                                 "the devnet with --keep to keep it",
                                 moved.message());
  for (size_t at = 0; (at = message.find(job_dir.string(), at)) != std::string::npos; at += dest.string().size())
    message.replace(at, job_dir.string().size(), dest.string());
  return message + fmt::format("\n  the job dir was moved out of the devnet's temp dir (removed on exit) to {}; the "
                               "devnet's nodes are gone with it, so resume on nodes of your own",
                               dest.string());
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
  // Verifiers are nodes beyond the job's: they train nothing, so they may be
  // more than the topology has places for (they sit in its regions in turn).
  const bool verify_asked = !args.cheater.empty() || args.verifiers || args.lying_verifier;
  if (args.verifiers && (*args.verifiers < 0 || *args.verifiers > 255))
    return fail("devnet", fmt::format("--verifiers must be in 0..255, got {}", *args.verifiers), 2);
  const int extra_verifiers = args.verifiers ? *args.verifiers : verify_asked ? 1 : 0;
  if (args.spares && (*args.spares < 0 || *args.spares > 64))
    return fail("devnet", fmt::format("--spares must be in 0..64, got {}", *args.spares), 2);
  if (args.spare_wait_s < 0 || args.spare_wait_s > 86400)
    return fail("devnet", fmt::format("--spare-wait-s must be in 0..86400, got {}", args.spare_wait_s), 2);
  const int nodes = args.nodes ? *args.nodes
                              : std::max(needed + extra_verifiers + args.spares.value_or(0), topology->device_count());
  if (args.nodes && nodes < 1) return fail("devnet", fmt::format("--nodes must be at least 1, got {}", nodes), 2);
  if (nodes < needed)
    return fail("devnet", fmt::format("--nodes {} is fewer than the job's {} stages × {} replicas", nodes,
                                      spec.job.parallel.stages, spec.job.parallel.replicas), 2);
  // Only verifiers may sit beyond the topology's places: the job's own members need one each.
  if (needed > topology->device_count())
    return fail("devnet", fmt::format("{}: the topology has places for {} nodes, the job needs {} ({} stages × {} replicas)",
                                      args.topology, topology->device_count(), needed, spec.job.parallel.stages,
                                      spec.job.parallel.replicas), 2);
  if (nodes > std::max(topology->device_count(), needed + extra_verifiers))
    return fail("devnet", args.nodes ? fmt::format("{}: the topology has places for {} nodes, --nodes asks for {}",
                                                   args.topology, topology->device_count(), nodes)
                                     : fmt::format("{}: the topology has places for {} nodes, the job needs {} "
                                                   "({} stages × {} replicas)", args.topology,
                                                   topology->device_count(), nodes, spec.job.parallel.stages,
                                                   spec.job.parallel.replicas), 2);
  if (args.spares && nodes < needed + *args.spares)
    return fail("devnet", fmt::format("--spares {} needs {} nodes ({} for the job), the devnet has {}", *args.spares,
                                      needed + *args.spares, needed, nodes), 2);
  // Spares: asked for, or one when the devnet has a node beyond the plan.
  spec.spares = args.spares.value_or(std::min(1, nodes - needed));
  spec.spare_wait_s = args.spare_wait_s;
  std::vector<KillPlan> kill_plans;
  for (const auto& text : args.kill_at) {
    auto plan = parse_kill_plan(text, spec.job.train.steps, spec.job.parallel.stages, spec.job.parallel.replicas);
    if (!plan.ok()) return fail("devnet", plan.message(), 2);
    // One node holds a role at a step: a second kill of it there would kill nothing.
    for (const auto& earlier : kill_plans)
      if (earlier.step == plan->step && earlier.stage == plan->stage && earlier.replica == plan->replica)
        return fail("devnet", fmt::format("--kill-at {} is given twice (one node holds a role at a step)", text), 2);
    kill_plans.push_back(*plan);
  }
  if (args.kill_delay_ms < 0 || args.kill_delay_ms > 600000)
    return fail("devnet", fmt::format("--kill-delay-ms must be in 0..600000, got {}", args.kill_delay_ms), 2);
  if (args.restart_after_s && !(*args.restart_after_s >= 0 && *args.restart_after_s <= 86400))
    return fail("devnet", fmt::format("--restart-after-s must be in 0..86400, got {:g}", *args.restart_after_s), 2);
  if (args.join_at_step && (*args.join_at_step < 1 || *args.join_at_step > spec.job.train.steps))
    return fail("devnet", fmt::format("--join-at-step must be in 1..{} (the job's steps), got {}", spec.job.train.steps,
                                      *args.join_at_step), 2);
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

  // Verification: spare staked nodes verify, the submitter referees, a
  // --cheater node cheats. On whenever asked for or the job has [verify].
  std::optional<std::pair<int, std::string>> cheater;
  if (!args.cheater.empty()) {
    auto parsed = parse_cheater(args.cheater, nodes);
    if (!parsed.ok()) return fail("devnet", parsed.message(), 2);
    cheater = *parsed;
  }
  if ((cheater || (args.verifiers && *args.verifiers > 0) || args.lying_verifier) && args.no_chain)
    return fail("devnet", "--cheater, --verifiers and --lying-verifier need the chain (drop --no-chain)", 2);
  // On the chain every solver's node commits its own step leaves, so the job
  // records evidence; spare nodes (or --verifiers of them) verify it.
  if (!args.no_chain && !spec.job.verify.enabled) {
    // As a [verify] table with no keys would read (core/job.h).
    spec.job.verify.enabled = true;
    spec.job.verify.segment_steps = spec.job.train.checkpoint_every > 0 ? spec.job.train.checkpoint_every : 10;
  }
  int verifiers = 0;
  if (!args.no_chain) {
    const int spare = nodes - needed;
    const bool asked = cheater || args.lying_verifier || (args.verifiers && *args.verifiers > 0);
    verifiers = args.verifiers ? *args.verifiers : spare;
    if ((asked && verifiers < 1) || verifiers > spare || verifiers < 0)
      return fail("devnet",
                  fmt::format("{} verifier(s) need as many spare nodes: {} nodes, the job takes {} (give --nodes {})",
                              std::max(1, verifiers), nodes, needed, needed + std::max(1, verifiers)),
                  2);
  }
  const bool verifying = verifiers > 0;

  Devnet devnet;
  // Settlement: a local chain, every node funded and staked before it starts
  // (so it commits for itself from its first step), the job escrowed.
  std::unique_ptr<DevnetSettlement> settlement;
  nlohmann::json balances_before;
  uint64_t chain_job = 0;
  auto start_chain = [&]() -> Status {
    if (args.no_chain) return ok_status();
    std::vector<SettlementNode> staked;
    for (int i = 0; i < nodes; ++i) {
      SN_ASSIGN(auto key, NodeKey::load_or_create(devnet.node_dir(static_cast<size_t>(i))));
      staked.push_back({key.node_id(), devnet.node_dir(static_cast<size_t>(i))});
    }
    auto started = DevnetSettlement::start(devnet.dir(), staked);
    if (!started.ok()) return make_error("chain: {}", started.message());
    settlement = std::move(started).value();
    SN_ASSIGN(balances_before, settlement->balances());
    auto posted = settlement->post_job(needed, verifiers, spec.job.name);
    if (!posted.ok()) return make_error("chain: posting the job: {}", posted.message());
    chain_job = *posted;
    return ok_status();
  };
  auto node_args = [&](int i) {
    std::vector<std::string> extra;
    if (settlement) extra = {"--chain-rpc", settlement->rpc_url()};
    if (cheater && cheater->first == i) {
      extra.push_back("--cheat");
      extra.push_back(cheater->second);
    }
    return extra;
  };
  if (auto started = devnet.start(args, *topology, nodes, start_chain, node_args); !started.ok())
    return fail("devnet", started.message());
  if (!args.json)
    std::cerr << fmt::format("devnet: {} nodes on topology \"{}\", DHT bootstrap {}, logs in {}\n", nodes,
                             topology->name, devnet.bootstrap(), devnet.dir().string());
  if (settlement && !args.json)
    std::cerr << fmt::format("devnet: chain at {}, {} nodes staked, job {} escrowed for {} solvers{}\n",
                             settlement->rpc_url(), nodes, chain_job, needed,
                             verifiers > 0 ? fmt::format(" and {} verifier(s)", verifiers) : "");
  if (cheater && !args.json)
    std::cerr << fmt::format("devnet: node {} cheats: {}\n", cheater->first, cheater->second);
  // The bootstrap is our own child, still starting: give it the whole minute.
  // The job's members (and verifiers) are required; spares are not: a node
  // that froze or died at start-up gets 10 s more, then the job starts with
  // fewer spares.
  const int required = verifying ? nodes : needed;
  auto found = discover_nodes({devnet.bootstrap()}, static_cast<size_t>(nodes), std::chrono::seconds(60),
                              std::chrono::seconds(60), static_cast<size_t>(required), std::chrono::seconds(10));
  if (stop_requested()) return fail("devnet", "interrupted", stop_exit_code());
  if (!found.ok()) return fail("devnet", found.message() + "\n" + devnet.dead_processes_report());
  if (static_cast<int>(found->size()) < nodes) {
    const int spares_left = std::min(spec.spares, static_cast<int>(found->size()) - needed);
    std::cerr << fmt::format("devnet: warning: only {} of {} nodes answered; the job starts with {} spare(s) instead "
                             "of {}\n{}",
                             found->size(), nodes, spares_left, spec.spares, devnet.dead_processes_report());
  } else if (!args.json) {
    std::cerr << fmt::format("devnet: all {} nodes discovered\n", found->size());
  }
  if (args.plan_from == "probes") {
    // Plan from what the nodes measured: wait (bounded) until each announces every peer.
    found = wait_for_link_estimates({devnet.bootstrap()}, std::move(found).value(), std::chrono::seconds(60));
    if (stop_requested()) return fail("devnet", "interrupted", stop_exit_code());
    if (!found.ok()) return fail("devnet", found.message() + "\n" + devnet.dead_processes_report());
    spec.plan_from_probes = true;
  }

  // Only the job's members are placed; the spare nodes stay free to verify.
  std::vector<solvernet::v1::NodeInfo> candidates = *found;
  if (verifying && static_cast<int>(candidates.size()) > needed) {
    // Keep the cheater among the solvers: it is what the run is about.
    std::stable_partition(candidates.begin(), candidates.end(), [&](const solvernet::v1::NodeInfo& n) {
      if (!cheater) return false;
      auto key = NodeKey::load_or_create(devnet.node_dir(static_cast<size_t>(cheater->first)));
      return key.ok() && key->node_id() == n.node_id();
    });
    candidates.resize(static_cast<size_t>(needed));
  }

  // The client's key lives with the devnet unless --key names one.
  spec.client_key = args.key.empty() ? devnet.dir() / "client.key" : fs::path(args.key);
  spec.peer_timeout_s = args.peer_timeout_s;
  spec.chain_job_id = chain_job;
  // The job dir (mirrored checkpoints) lives with the devnet.
  spec.job_dir = devnet.dir() / "jobs";
  // Spares found mid-job through the DHT, unless idle nodes are there to verify.
  if (!verifying) spec.bootstrap = {devnet.bootstrap()};
  // Churn for tests, the demo and bench_churn (hidden flags): the devnet's node index of each node id.
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < static_cast<size_t>(nodes); ++i)
    if (auto key = NodeKey::load_or_create(devnet.node_dir(i)); key.ok()) index_of[key->node_id()] = i;
  std::vector<std::thread> churn;
  bool joined = false;
  std::mutex churn_mutex;  // the devnet's process list and the kill records change under the churn threads
  std::vector<KillRecord> kills(kill_plans.size());
  std::vector<StepMark> marks;
  const auto regions = topology->device_regions();
  const auto job_started = std::chrono::steady_clock::now();
  auto now_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - job_started).count(); };
  spec.on_step = [&](const train::StepReport& report) {
    marks.push_back({report.step, now_s(), report.step_seconds});
    for (size_t k = 0; k < kill_plans.size(); ++k) {
      const KillPlan& plan = kill_plans[k];
      // Once: the steps after a recovery's checkpoint are reported again.
      if (kills[k].fired || report.step != plan.step || !report.members) continue;
      kills[k].fired = true;
      for (const auto& m : *report.members) {
        if (m.stage != plan.stage || m.replica != plan.replica) continue;
        // A node that joined mid-job has its key only once it runs: look it up now.
        if (!index_of.count(m.node_id)) {
          std::lock_guard<std::mutex> lock(churn_mutex);
          for (size_t i = 0; i < devnet.node_count(); ++i)
            if (fs::exists(devnet.node_dir(i)))
              if (auto key = NodeKey::load_or_create(devnet.node_dir(i)); key.ok()) index_of[key->node_id()] = i;
        }
        if (!index_of.count(m.node_id)) continue;
        const size_t i = index_of[m.node_id];
        kills[k].node = i;
        kills[k].node_id = m.node_id;
        churn.emplace_back([&, i, k, plan, delay = args.kill_delay_ms, step = report.step] {
          std::this_thread::sleep_for(std::chrono::milliseconds(delay));
          {
            std::lock_guard<std::mutex> lock(churn_mutex);
            kills[k].at_s = now_s();  // before: the client may notice the death before kill_node returns
            const pid_t pid = devnet.kill_node(i);
            std::cerr << fmt::format("devnet: killed node {} (pid {}, stage {} replica {}) after step {}\n", i, pid,
                                     plan.stage, plan.replica, step);
          }
          if (!args.restart_after_s) return;
          std::this_thread::sleep_for(std::chrono::duration<double>(*args.restart_after_s));
          std::lock_guard<std::mutex> lock(churn_mutex);
          if (auto restarted = devnet.restart_node(i); restarted.ok())
            std::cerr << fmt::format("devnet: restarted node {} with its data dir\n", i);
          else
            std::cerr << "devnet: restarting node " << i << ": " << restarted.message() << "\n";
        });
      }
      if (!kills[k].node)
        std::cerr << fmt::format("devnet: --kill-at {}: no devnet node holds stage {} replica {} at step {}\n",
                                 plan.text, plan.stage, plan.replica, plan.step);
    }
    if (args.join_at_step && !joined && report.step == *args.join_at_step) {
      joined = true;
      std::lock_guard<std::mutex> lock(churn_mutex);
      const size_t place = std::min(devnet.node_count(), regions.size() - 1);
      auto added = devnet.add_node(topology->regions[static_cast<size_t>(regions[place])].name);
      if (added.ok())
        std::cerr << fmt::format("devnet: node {} joined after step {}\n", *added, report.step);
      else
        std::cerr << "devnet: starting a node mid-job: " << added.message() << "\n";
    }
  };
  auto summary = run_job_on_nodes(spec, candidates);
  for (auto& t : churn) t.join();
  if (!summary.ok()) {
    std::string report = devnet.dead_processes_report();
    std::string message = summary.message();
    // The resume advice names the job dir; the devnet's temp dir goes on exit, so the job dir is moved out.
    if (!args.keep && message.find("--resume ") != std::string::npos)
      message = keep_job_dir(devnet.dir() / "jobs", fs::absolute(model_out).parent_path(), message);
    else if (!args.keep && message.find(devnet.dir().string()) != std::string::npos)
      message += fmt::format("\n  ({} is removed on exit; --keep keeps it)", devnet.dir().string());
    return fail("devnet", message + (report.empty() ? "" : "\n" + report),
                stop_requested() ? stop_exit_code() : summary.error().exit_code);
  }
  if (!kill_plans.empty()) split_recoveries(*summary, kill_plans, kills, marks);
  if (settlement) {
    std::vector<std::string> node_ids;
    for (int i = 0; i < nodes; ++i)
      node_ids.push_back(NodeKey::load_or_create(devnet.node_dir(static_cast<size_t>(i))).value_or(NodeKey::generate()).node_id());
    std::optional<int> silent_node;
    if (args.silent_cheater && cheater) silent_node = cheater->first;
    auto verified = settle(*settlement, devnet, chain_job, *summary, verifiers, node_ids, args, silent_node);
    if (!verified.ok()) return fail("devnet", "chain: " + verified.message() + "\n" + devnet.dead_processes_report());
    auto after = settlement->balances();
    if (!after.ok()) return fail("devnet", "chain: " + after.message());
    (*summary)["chain"] = {{"job_id", chain_job}, {"balances_before", balances_before}, {"balances_after", *after}};
    if (!verified->is_null()) (*summary)["verification"] = *verified;
  }
  (*summary)["devnet_dir"] = args.keep ? devnet.dir().string() : "";
  // The job dir is in the temp dir, which goes on exit: name no path that will not be there.
  if (!args.keep && summary->contains("recovery")) (*summary)["recovery"]["job_dir"] = "";
  if (!args.summary_json.empty()) {
    auto written = write_file_atomic(args.summary_json, summary->dump(2) + "\n");
    if (!written.ok()) return fail("devnet", written.message());
  }
  if (args.json)
    std::cout << summary->dump(2) << std::endl;
  else {
    print_summary_table(*summary);
    if (summary->contains("verification"))
      print_verification(*summary, (*summary)["verification"], (*summary)["chain"]["balances_before"],
                         (*summary)["chain"]["balances_after"]);
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
      app.add_option("--verifiers", args->verifiers,
                     "Staked spare nodes that verify the solvers (default: every spare node, at least 1, when verifying)");
      app.add_option("--cheater", args->cheater,
                     "NODE_INDEX:STRATEGY: that node cheats (skip-steps, less-data, perturb, random-weights, lie-in-leaf, "
                     "withhold, wrong-op, equivocate); turns verification on");
      app.add_flag("--lying-verifier", args->lying_verifier, "The verifier challenges honest work (tests)")->group("");
      app.add_flag("--role-processes", args->role_processes,
                   "Run the verifiers and the referee as solvernet verify run / verify referee processes")->group("");
      app.add_flag("--silent-cheater", args->silent_cheater,
                   "The cheater's node is stopped once challenged: it loses on its deadline (tests)")->group("");
      app.add_option("--spares", args->spares,
                     "Idle nodes kept to replace a member that dies (default: 1 when the devnet has a node to spare)");
      app.add_option("--spare-wait-s", args->spare_wait_s, "How long a recovery waits for a spare")
          ->capture_default_str();
      app.add_option("--kill-at", args->kill_at,
                     "Test: kill -9 the member holding a role at a step, STEP:STAGE.REPLICA (repeatable)")
          ->group("");
      app.add_option("--kill-delay-ms", args->kill_delay_ms, "Test: delay of --kill-at after the step")->group("");
      app.add_option("--restart-after-s", args->restart_after_s, "Test: restart the killed node after this")->group("");
      app.add_option("--join-at-step", args->join_at_step, "Test: start one more node after this step")->group("");
      add_insecure_flag(app);
      return [args] { return run_devnet(*args); };
    });

}  // namespace
}  // namespace sn::cli
