// solvernet train: run a training job on the network (or, with --local, in
// this process as the reference).
#include <fmt/ranges.h>

#include <iostream>
#include <optional>

#include "cli/command.h"
#include "cli/job_runner.h"
#include "cli/signals.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/process.h"
#include "train/train.h"

namespace sn::cli {
namespace {

struct TrainArgs {
  std::string job_file;
  std::vector<std::string> bootstrap;
  bool local = false;
  std::string topology_file;
  std::string emulate;
  std::string algo = "ours";
  std::string out;
  std::string init;
  std::optional<int64_t> steps;
  bool json = false;
  double time_dilation = 0;
  int wait_s = 60;
  std::string key;
  int peer_timeout_s = 60;
  std::string plan_from;  // "topology" | "probes"; empty: the topology if given, else probes
  // Recovery (docs/resilience.md).
  int spares = 0;
  std::string job_dir;
  std::string resume;
  int spare_wait_s = 0;
  int kill_self_at_mirror = 0;  // test only
  std::string kill_self_at_relayout;  // test only
  int job_dir_full_at_mirror = 0;  // test only
  bool out_disk_full = false;  // test only
};

int run_train(const TrainArgs& args) {
  init_logging("train", "warn");
  // From the start: a Ctrl-C before the first wait (reading the job dir,
  // checking the corpus) would otherwise end the process with no word.
  install_stop_handlers();
  if (args.job_file.empty() == args.resume.empty())
    return fail("train", "give --job FILE, or --resume JOB_DIR to continue a stopped job", 2);
  if (!args.resume.empty() && args.local) return fail("train", "--resume continues a job on nodes, not --local", 2);
  // Taken silently, either would look obeyed: the resumed run starts from
  // the job dir's checkpoint and mirrors into that same dir.
  if (!args.resume.empty() && !args.init.empty())
    return fail("train", "--init sets a new job's first weights; --resume continues from its job dir's checkpoint", 2);
  if (!args.resume.empty() && !args.job_dir.empty())
    return fail("train", "--resume JOB_DIR mirrors into that job dir; drop --job-dir", 2);
  if (args.spares < 0 || args.spares > 64) return fail("train", fmt::format("--spares must be in 0..64, got {}", args.spares), 2);
  if (args.spare_wait_s < 0 || args.spare_wait_s > 86400)
    return fail("train", fmt::format("--spare-wait-s must be in 0..86400, got {}", args.spare_wait_s), 2);
  const std::string job_file = args.resume.empty() ? args.job_file : args.resume + "/job.toml";
  auto job = parse_job_file(job_file);
  if (!job.ok())
    return fail("train", args.resume.empty() ? job.message() : args.resume + " is not a job dir: " + job.message(),
                job.error().exit_code);
  // One client per job dir, for the client's whole life (the kernel drops the
  // lock if it is killed): two clients would drive the same job on the same
  // nodes, and the nodes' replay protection would fail one of them late.
  std::optional<DirLock> job_dir_lock;
  if (!args.resume.empty()) {
    auto locked = DirLock::acquire(args.resume, "job dir");
    if (!locked.ok()) return fail("train", locked.message(), locked.error().exit_code);
    job_dir_lock = std::move(*locked);
  }
  if (!args.kill_self_at_relayout.empty() && args.kill_self_at_relayout != "built" &&
      args.kill_self_at_relayout != "switched")
    return fail("train", fmt::format("--kill-self-at-relayout must be built or switched, got \"{}\"",
                                     args.kill_self_at_relayout), 2);
  if (args.kill_self_at_mirror < 0)
    return fail("train", fmt::format("--kill-self-at-mirror must be >= 1 (0: never), got {}", args.kill_self_at_mirror), 2);
  RunSpec spec;
  spec.job = *job;
  spec.kill_self_at_mirror = args.kill_self_at_mirror;
  spec.kill_self_at_relayout = args.kill_self_at_relayout;
  if (args.job_dir_full_at_mirror < 0)
    return fail("train", fmt::format("--job-dir-full-at-mirror must be >= 1 (0: never), got {}", args.job_dir_full_at_mirror),
                2);
  spec.job_dir_full_at_mirror = args.job_dir_full_at_mirror;
  spec.spares = args.spares;
  spec.spare_wait_s = args.spare_wait_s;
  spec.bootstrap = args.bootstrap;
  if (!args.job_dir.empty()) {
    if (auto made = ensure_directory(args.job_dir); !made.ok()) return fail("train", "--job-dir: " + made.message(), 2);
    spec.job_dir = args.job_dir;
  }
  std::vector<std::string> changed;  // --resume: fields of job.toml edited since the job stopped
  if (!args.resume.empty()) {
    // Its nodes keep checkpoints at outer boundaries, but the job dir does
    // not mirror them nor a dropped group's end (docs/diloco.md).
    if (spec.job.diloco.enabled)
      return fail("train", fmt::format("{}: resuming a [diloco] job is not supported yet; start it again", args.resume), 2);
    auto state = train::read_job_dir(args.resume, spec.job);
    if (stop_requested())
      return fail("train", "interrupted while reading the job dir; " +
                               (state.ok() ? train::resume_advice(args.resume, state->checkpoint_step)
                                           : fmt::format("it is as it was: {}", args.resume)));
    if (!state.ok()) return fail("train", state.message(), 2);
    if (state->finished == "completed")
      return fail("train", fmt::format("{}: the job {} has completed; nothing to resume", args.resume, state->job_id), 2);
    spec.job_dir = args.resume;
    spec.resume = true;
    spec.job_id = state->job_id;
    spec.resume_step = state->checkpoint_step;
    spec.resumed_losses = state->losses;
    spec.resume_replanned = state->replanned;
    spec.planned_replicas = state->planned_replicas;
    spec.job.parallel.replicas = state->replicas;  // job.toml keeps the planned ones
    spec.layout_replicas = state->replicas;
    if (spec.planned_replicas == 0) spec.planned_replicas = job->parallel.replicas;
    spec.resume_layout = state->layout;
    spec.resumed_corpus = state->corpus;
    changed = state->changed;
  }
  if (args.steps) {
    auto overridden = override_job_integer(spec.job, "train.steps", *args.steps, "--steps");
    if (!overridden.ok()) return fail("train", overridden.message(), 2);
    spec.job = *overridden;
  }
  if (spec.resume && spec.job.train.steps < spec.resume_step)
    return fail("train", fmt::format("{}: the job has {} steps but its checkpoint is of step {}; give --steps {} or more",
                                     args.resume, spec.job.train.steps, spec.resume_step, spec.resume_step), 2);
  if (args.wait_s < 1 || args.wait_s > 86400)
    return fail("train", fmt::format("--wait-s must be in [1, 86400], got {}", args.wait_s), 2);
  spec.model_out = args.out;
  spec.initial_weights = args.init;
  spec.quiet = args.json;
  spec.time_dilation = args.time_dilation;
  spec.algo = args.algo;
  spec.emulate = args.emulate;
  spec.client_key = args.key;
  if (args.peer_timeout_s < 1 || args.peer_timeout_s > 86400)
    return fail("train", fmt::format("--peer-timeout-s must be in 1..86400, got {}", args.peer_timeout_s), 2);
  spec.peer_timeout_s = args.peer_timeout_s;
  if (!args.topology_file.empty()) {
    auto topology = parse_topology_file(args.topology_file);
    if (!topology.ok()) return fail("train", topology.message(), 2);
    spec.topology = *topology;
  }
  if (args.plan_from == "topology" && !spec.topology) return fail("train", "--plan-from topology needs a --topology", 2);
  spec.plan_from_probes = args.plan_from == "probes";
  if (auto checked = check_run_inputs(spec, args.local); !checked.ok()) return fail("train", checked.message(), 2);
  if (stop_requested())
    return fail("train", "interrupted while checking the job's inputs, before any node was contacted" +
                             (spec.resume ? "; " + train::resume_advice(spec.job_dir, spec.resume_step) : ""));
  if (args.out_disk_full && !spec.model_out.empty())
    simulate_disk_full_for_tests(spec.model_out.has_parent_path() ? spec.model_out.parent_path() : ".", 0);
  Result<nlohmann::json> summary = Error{};
  if (args.local) {
    summary = run_job_locally(spec);
  } else {
    if (args.bootstrap.empty()) return fail("train", "give --bootstrap HOST:PORT (or --local)", 2);
    size_t want = static_cast<size_t>(spec.job.parallel.stages * spec.job.parallel.replicas);
    if (spec.spares > 0 && spec.job_dir.empty())
      return fail("train", "--spares needs --job-dir (where the checkpoints a spare restarts from are mirrored)", 2);
    // Hyper-parameters outside the state may change (said once every refusal is
    // past): the run differs from the one stopped.
    if (!changed.empty())
      std::cerr << fmt::format("train: {}/job.toml differs from the job that stopped: {}; going on with it\n",
                               args.resume, fmt::join(changed, ", "));
    // A stopped run whose client was killed left its nodes holding the job
    // until their leases run out; its owner (this key) ends it at once.
    if (spec.resume) {
      auto ended =
          end_stopped_run(args.bootstrap, spec.job_id, spec.client_key, std::chrono::seconds(args.wait_s), !args.json);
      if (!ended.ok())
        return fail("train",
                    ended.error().kind == ErrorKind::aborted
                        ? ended.message() + "; " + train::resume_advice(spec.job_dir, spec.resume_step)
                        : ended.message(),
                    ended.error().exit_code);
      if (*ended > 0 && !args.json)
        std::cerr << fmt::format("train: {} node(s) still held job {} for its stopped client; ended it there\n",
                                 *ended, spec.job_id);
    }
    // Spares are asked for, not required: with too few nodes the job runs without them.
    const bool show_wait = !args.json;
    // A resumed job that finds fewer nodes than its replicas need, once the
    // whole wait is over, starts on the whole replicas they fill, as a job
    // that loses a replica group re-plans (and grows back the same way).
    const size_t enough = spec.resume && spec.resume_step > 0 && train::replannable(spec.job)
                              ? static_cast<size_t>(spec.job.parallel.stages)
                              : want;
    const auto wait = std::chrono::seconds(spec.spares > 0 ? std::max(1, args.wait_s / 2) : args.wait_s);
    auto nodes = spec.spares > 0 ? discover_nodes(args.bootstrap, want + static_cast<size_t>(spec.spares), wait,
                                                  std::chrono::milliseconds(5000), 0, std::chrono::milliseconds(0),
                                                  show_wait)
                                 : discover_nodes(args.bootstrap, want, wait, std::chrono::milliseconds(5000), enough,
                                                  wait, show_wait);
    if (!nodes.ok() && spec.spares > 0 && nodes.error().kind != ErrorKind::aborted) {
      std::cerr << "train: " << nodes.message() << "; running without all the spares\n";
      nodes = discover_nodes(args.bootstrap, want, wait, std::chrono::milliseconds(5000), enough, wait, show_wait);
    }
    if (nodes.ok() && nodes->size() < want) {
      const int64_t stages = spec.job.parallel.stages, replicas = spec.job.parallel.replicas;
      const int64_t fit = train::replicas_that_fit(spec.job, static_cast<int64_t>(nodes->size()));
      if (fit < 1)
        return fail("train", fmt::format("found {} idle node(s), the job needs {}; {}", nodes->size(), want,
                                         train::resume_advice(spec.job_dir, spec.resume_step)));
      std::cerr << fmt::format("train: found {} idle node(s) of the {} that {} stages × {} replicas need; resuming on "
                               "{} replica(s) from its checkpoint of step {}, re-planned as a job that loses a replica "
                               "group is (it grows back once idle nodes fill whole replicas)\n",
                               nodes->size(), want, stages, replicas, fit, spec.resume_step);
      spec.job.parallel.replicas = fit;
    }
    if (!nodes.ok()) {
      // Interrupted before any node took the job: the job dir is as it was.
      if (spec.resume && nodes.error().kind == ErrorKind::aborted)
        return fail("train", nodes.message() + "; " + train::resume_advice(spec.job_dir, spec.resume_step),
                    nodes.error().exit_code);
      return fail("train", nodes.message(), nodes.error().exit_code);
    }
    summary = run_job_on_nodes(spec, *nodes);
  }
  if (!summary.ok()) return fail("train", summary.message(), summary.error().exit_code);
  if (args.json)
    std::cout << summary->dump(2) << std::endl;
  else
    print_summary_table(*summary);
  return 0;
}

CommandRegistration train_command(
    "train", "Train a model: on discovered nodes (--bootstrap) or in this process (--local)",
    [](CLI::App& app) -> std::function<int()> {
      auto args = std::make_shared<TrainArgs>();
      app.add_option("--job", args->job_file, "Job file (TOML; see examples/jobs)");
      app.add_option("--resume", args->resume,
                     "Continue a stopped job from the newest checkpoint in its job dir (with the same --key)");
      app.add_option("--job-dir", args->job_dir,
                     "Keep the job here (JOB_DIR/<job id>: job file, state, mirrored checkpoints) and replace a "
                     "member that dies by a spare");
      app.add_option("--spares", args->spares, "Idle nodes to keep for replacements (needs --job-dir)")
          ->capture_default_str();
      app.add_option("--spare-wait-s", args->spare_wait_s,
                     "How long a recovery waits for a spare to appear (nodes that join mid-job)")
          ->capture_default_str();
      app.add_option("--bootstrap", args->bootstrap, "DHT node to discover nodes through, HOST:PORT");
      app.add_flag("--local", args->local, "Train the whole model in this process (the reference run)");
      app.add_option("--topology", args->topology_file,
                     "Topology file: links to emulate between the nodes (none: plan from the links the nodes measured)");
      app.add_option("--plan-from", args->plan_from,
                     "Links the placement plans from: topology | probes (default: the topology if given, else probes)")
          ->check(CLI::IsMember({"topology", "probes"}));
      app.add_option("--emulate", args->emulate, "raw | scaled (default: the topology's mode)")
          ->check(CLI::IsMember({"raw", "scaled"}));
      app.add_option("--algo", args->algo, "Placement: ours | dtfm | random | naive")->capture_default_str();
      app.add_option("--out", args->out, "Write the final model here (safetensors)");
      app.add_option("--init", args->init, "Start from these weights (safetensors), e.g. to fine-tune");
      app.add_option("--steps", args->steps, "Override train.steps (1 .. 2^40, as in a job file)");
      app.add_option("--wait-s", args->wait_s, "How long to wait for enough nodes (1 .. 86400)")->capture_default_str();
      app.add_option("--time-dilation", args->time_dilation,
                     "Scaled links: use this T (1e-4 .. 1e4) instead of measuring compute");
      app.add_option("--key", args->key, "Client key file (Ed25519, created on first use; default ~/.solvernet/client.key)");
      app.add_option("--peer-timeout-s", args->peer_timeout_s,
                     "How long a node waits for a peer; the client's deadlines follow")->capture_default_str();
      app.add_flag("--json", args->json, "Print the summary as JSON (no progress line)");
      app.add_option("--kill-self-at-mirror", args->kill_self_at_mirror,
                     "Test: N, kill -9 this client at its N-th mirrored checkpoint, between the job dir's state.json "
                     "and the deletion of the older checkpoints")->group("");
      app.add_option("--kill-self-at-relayout", args->kill_self_at_relayout,
                     "Test: built|switched, kill -9 this client at its first re-plan or grow-back once the new "
                     "checkpoint layout is built, or once state.json names it")->group("");
      app.add_option("--job-dir-full-at-mirror", args->job_dir_full_at_mirror,
                     "Test: N, from the N-th mirrored checkpoint on, the job dir is a full disk: one more file is "
                     "written, then every write fails with ENOSPC")->group("");
      app.add_flag("--out-disk-full", args->out_disk_full,
                   "Test: --out's directory is a full disk: writing the model there fails with ENOSPC")->group("");
      add_insecure_flag(app);
      return [args] { return run_train(*args); };
    });

}  // namespace
}  // namespace sn::cli
