// What verification costs, as ratios measured in one run (docs/verification.md):
//  - solver overhead: the same 2×2 devnet job with and without [verify]
//    (evidence recording, message digests, step-0 and every-K checkpoints),
//    alternating, per-step client time;
//  - verifier compute: every member's segments replayed from the kept
//    evidence (each must reproduce its leaves bitwise), replay seconds per
//    member-step against the nodes' own compute per step, and what fraction
//    of the job a verifier spends for 99% detection of a solver faking ≥ 10%
//    of its segments, at this job's size and at larger ones;
//  - referee compute: one operation recomputed against one traced step;
//  - a dispute end to end (devnet --cheater, on anvil): wall time, rounds,
//    transactions and gas per party, from the devnet's summary.
// JSON on stdout; the commands' own output on stderr.
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <regex>

#include "core/fs.h"
#include "core/process.h"
#include "train/evidence.h"
#include "train/replay.h"
#include "train/trace.h"
#include "train/train.h"
#include "../common/run_json.h"

namespace fs = std::filesystem;
using namespace sn;
using sn::bench::run_json;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int fail(const std::string& message) {
  std::cerr << "bench_verify: " << message << "\n";
  return 1;
}

// Segments a verifier must replay to catch, with probability P, a solver that
// fakes a fraction Q of its segments: the smallest s with 1 − (1 − q)^s ≥ p.
double segments_for(double p, double q) { return std::ceil(std::log(1 - p) / std::log(1 - q)); }

struct Member {
  int stage = 0, replica = 0;
  fs::path evidence, checkpoints;
};

std::vector<Member> find_members(const fs::path& devnet_dir) {
  std::vector<Member> members;
  const std::regex member_dir(R"(stage(\d+)-replica(\d+))");
  for (const auto& entry : fs::recursive_directory_iterator(devnet_dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !std::regex_match(name, m, member_dir)) continue;
    if (entry.path().parent_path().parent_path().filename() != "evidence") continue;
    Member member{std::stoi(m[1]), std::stoi(m[2]), entry.path(), {}};
    const fs::path node_dir = entry.path().parent_path().parent_path().parent_path();
    member.checkpoints = train::checkpoint_dir(node_dir, entry.path().parent_path().filename().string(),
                                               member.stage, member.replica);
    members.push_back(member);
  }
  std::sort(members.begin(), members.end(),
            [](const Member& a, const Member& b) { return std::tie(a.stage, a.replica) < std::tie(b.stage, b.replica); });
  return members;
}

struct ReplayFigures {
  int64_t member_steps = 0;
  double seconds = 0;
  bool leaves_match = true;
};

// Replays every segment of every member from its starting checkpoint.
Result<ReplayFigures> replay_all(const std::vector<Member>& members, int64_t steps, int64_t segment) {
  ReplayFigures out;
  for (const auto& member : members) {
    SN_ASSIGN(auto leaves, train::read_leaves(member.evidence));
    SN_ASSIGN(auto setup, train::read_setup_evidence(member.evidence));
    for (int64_t start = 0; start < steps; start += segment) {
      train::ReplayInputs inputs;
      inputs.setup = setup;
      inputs.checkpoint_dir = member.checkpoints;
      inputs.checkpoint_step = start;
      const int64_t end = std::min(steps, start + segment);
      for (int64_t t = start + 1; t <= end; ++t) {
        SN_ASSIGN(auto evidence, train::read_step_evidence(member.evidence, t));
        inputs.steps.push_back(std::move(evidence));
      }
      const auto t0 = Clock::now();
      SN_ASSIGN(auto replayed, train::replay_member(inputs));
      out.seconds += seconds_since(t0);
      for (const auto& step : replayed.steps) {
        ++out.member_steps;
        if (static_cast<size_t>(step.step) >= leaves.size() || leaves[static_cast<size_t>(step.step)] != step.leaf)
          out.leaves_match = false;
      }
    }
  }
  return out;
}

struct RefereeFigures {
  double step_s = 0;                       // one untraced replayed step
  double traced_step_s = 0;                // the same step under the tracer
  size_t operations = 0;                   // m
  std::map<std::string, double> op_s;      // slowest recompute per kind
  std::map<std::string, int> op_count;
  bool all_match = true;                   // every recomputed op gave its recorded outputs
};

// Step T of MEMBER (its checkpoint at or before T − 1, then the steps up to
// T − 1): once untraced, once traced, then every operation the referee can
// recompute alone, each timed.
Result<RefereeFigures> referee_figures(const Member& member, int64_t t, int64_t segment) {
  SN_ASSIGN(auto setup, train::read_setup_evidence(member.evidence));
  SN_ASSIGN(auto leaves, train::read_leaves(member.evidence));
  train::ReplayInputs inputs;
  inputs.setup = setup;
  inputs.checkpoint_dir = member.checkpoints;
  inputs.checkpoint_step = ((t - 1) / segment) * segment;
  auto open_at_step_before = [&]() -> Result<std::unique_ptr<train::ReplaySession>> {
    SN_ASSIGN(auto session, train::ReplaySession::open(inputs));
    for (int64_t s = inputs.checkpoint_step + 1; s < t; ++s) {
      SN_ASSIGN(auto evidence, train::read_step_evidence(member.evidence, s));
      SN_TRY(session->run_step(evidence));
    }
    return session;
  };
  SN_ASSIGN(auto evidence, train::read_step_evidence(member.evidence, t));
  RefereeFigures out;
  {
    SN_ASSIGN(auto session, open_at_step_before());
    const auto t0 = Clock::now();
    SN_TRY(session->run_step(evidence));
    out.step_s = seconds_since(t0);
  }
  SN_ASSIGN(auto session, open_at_step_before());
  SN_ASSIGN(auto context, train::op_context_of(setup, t));
  train::StepTracer tracer(context, leaves.at(static_cast<size_t>(t - 1)));
  session->worker().set_tracer(&tracer);
  const auto t0 = Clock::now();
  auto step = session->run_step(evidence);
  out.traced_step_s = seconds_since(t0);
  session->worker().set_tracer(nullptr);
  if (!step.ok()) return step.error();
  SN_ASSIGN(auto trace, tracer.finish(step->inbound_digest, step->outbound_digest, step->leaf));
  out.operations = trace.records.size();
  for (size_t j = 0; j < trace.records.size(); ++j) {
    const auto& record = trace.records[j];
    if (!train::recomputable(record.kind)) continue;
    SN_ASSIGN(auto op_inputs, train::op_inputs(trace, j));
    const auto r0 = Clock::now();
    SN_ASSIGN(auto outputs, train::recompute_op(context, record, op_inputs));
    const double seconds = seconds_since(r0);
    if (outputs != record.outputs) out.all_match = false;
    out.op_s[record.kind] = std::max(out.op_s[record.kind], seconds);
    ++out.op_count[record.kind];
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // The nodes pin OpenBLAS's kernels (the CLI re-executes itself so): replay
  // here must run the same kernels to reproduce their leaves.
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    setenv("OPENBLAS_CORETYPE", "Haswell", 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    execv("/proc/self/exe", argv);
  }
  spdlog::set_default_logger(spdlog::stderr_color_mt("bench"));
  train::init_single_threaded();
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const int64_t steps = quick ? 6 : 12, segment = 3;
  const int rounds = quick ? 1 : 2;
  const std::string bin = SOLVERNET_BIN;
  const fs::path src = SOLVERNET_SOURCE_DIR;
  const fs::path tmp = fs::temp_directory_path() / ("sn-bench-verify-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  struct Cleanup {
    fs::path dir;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } cleanup{tmp};

  // The job: tests/train/data/aqsgd.toml (P = 2, D = 2, AQ-SGD + CocktailSGD).
  auto base = read_file(src / "tests/train/data/aqsgd.toml");
  if (!base.ok()) return fail(base.message());
  const std::string plain_job = std::regex_replace(*base, std::regex("steps = 20"), fmt::format("steps = {}", steps));
  const std::string verify_job = plain_job + fmt::format("\n[verify]\nsegment_steps = {}\n", segment);
  if (!write_file_atomic(tmp / "plain.toml", plain_job).ok() || !write_file_atomic(tmp / "verify.toml", verify_job).ok())
    return fail("cannot write job files in " + tmp.string());
  const std::string topology = (src / "tests/train/data/lan.toml").string();

  nlohmann::json out;
  out["benchmark"] = "verify";
  out["job"] = {{"file", "tests/train/data/aqsgd.toml"}, {"steps", steps}, {"segment_steps", segment}};

  // ---- solver overhead: alternating runs, per-step client time ------------
  std::vector<double> plain_step, verify_step;
  nlohmann::json kept;
  for (int round = 0; round < rounds; ++round) {
    for (const bool verify : {false, true}) {
      std::vector<std::string> cmd = {bin, "devnet", "--job", (tmp / (verify ? "verify.toml" : "plain.toml")).string(),
                                      "--topology", topology, "--no-chain", "--json"};
      const bool keep = verify && round == rounds - 1;
      if (keep) cmd.push_back("--keep");
      std::cerr << fmt::format("== devnet {} (round {})\n", verify ? "[verify]" : "plain", round + 1);
      auto summary = run_json(cmd, tmp / "summary.json");
      if (!summary.ok()) return fail(summary.message());
      (verify ? verify_step : plain_step).push_back((*summary)["timing"]["step_s"].get<double>());
      if (keep) kept = *summary;
    }
  }
  auto mean = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size()); };
  out["solver_overhead"] = {{"plain_step_s", plain_step},
                            {"verify_step_s", verify_step},
                            {"ratio", mean(verify_step) / mean(plain_step)},
                            {"target_ratio", 1.03}};

  // ---- verifier compute: replay every member's segments -------------------
  const fs::path devnet_dir = kept.value("devnet_dir", "");
  struct RemoveDevnet {
    fs::path dir;
    ~RemoveDevnet() {
      std::error_code ec;
      if (!dir.empty()) fs::remove_all(dir, ec);
    }
  } remove_devnet{devnet_dir};
  const auto members = find_members(devnet_dir);
  if (members.size() != kept["member_commitments"].size())
    return fail(fmt::format("found evidence of {} members in {}, the job has {}", members.size(), devnet_dir.string(),
                            kept["member_commitments"].size()));
  auto replay = replay_all(members, steps, segment);
  if (!replay.ok()) return fail("replay: " + replay.message());
  const double replay_per_member_step = replay->seconds / static_cast<double>(replay->member_steps);
  const double compute_per_member_step = kept["timing"]["node_compute_s"].get<double>();
  const double ratio = replay_per_member_step / compute_per_member_step;
  const double needed = segments_for(0.99, 0.10);
  nlohmann::json at_size = nlohmann::json::array();
  const int64_t job_segments = (steps + segment - 1) / segment;
  for (int64_t n : {job_segments, int64_t{100}, int64_t{1000}, int64_t{10000}}) {
    const double f = std::min(1.0, needed / static_cast<double>(n));
    at_size.push_back({{"segments_per_solver", n}, {"fraction_replayed", f}, {"verifier_compute_fraction", f * ratio},
                       {"detection_probability", 1 - std::pow(0.9, f * static_cast<double>(n))}});
  }
  out["verifier"] = {{"replayed_member_steps", replay->member_steps},
                     {"leaves_match", replay->leaves_match},
                     {"replay_s_per_member_step", replay_per_member_step},
                     {"node_compute_s_per_member_step", compute_per_member_step},
                     {"replay_over_compute", ratio},
                     {"segments_needed_99pct_q10pct", needed},
                     {"by_job_size", at_size},
                     {"segments_per_solver_for_5pct", std::ceil(needed * ratio / 0.05)},
                     {"target_fraction", 0.05}};

  // ---- referee compute: one operation against one step --------------------
  // The last stage's last replica has the most kinds (head, blocks, adam).
  auto referee = referee_figures(members.back(), steps, segment);
  if (!referee.ok()) return fail("referee: " + referee.message());
  double slowest = 0;
  std::string slowest_kind;
  nlohmann::json by_kind;
  for (const auto& [kind, seconds] : referee->op_s) {
    by_kind[kind] = {{"slowest_s", seconds}, {"count", referee->op_count[kind]}, {"over_step", seconds / referee->step_s}};
    if (seconds > slowest) slowest = seconds, slowest_kind = kind;
  }
  out["referee"] = {{"member", fmt::format("stage {} replica {}", members.back().stage, members.back().replica)},
                    {"step", steps},
                    {"operations", referee->operations},
                    {"step_s", referee->step_s},
                    {"traced_step_s", referee->traced_step_s},
                    {"recomputed_match_trace", referee->all_match},
                    {"by_kind", by_kind},
                    {"slowest_kind", slowest_kind},
                    {"slowest_op_over_step", slowest / referee->step_s},
                    {"target_ratio", 0.01}};
  // ---- disputes end to end: devnet --cheater, each played to its slash ------
  // (tests/verify/data: 2 stages × 1 replica, 6 steps; one spare node verifies.)
  nlohmann::json dispute_runs = nlohmann::json::array();
  bool all_caught = true;
  for (const std::string cheat : quick ? std::vector<std::string>{"perturb"}
                                       : std::vector<std::string>{"perturb", "lie-in-leaf", "withhold"}) {
    std::cerr << fmt::format("== devnet --cheater 0:{}\n", cheat);
    const auto t0 = Clock::now();
    auto summary = run_json({bin, "devnet", "--job", (src / "tests/verify/data/job.toml").string(), "--topology",
                             (src / "tests/verify/data/lan.toml").string(), "--nodes", "3", "--cheater", "0:" + cheat,
                             "--json", "--out", (tmp / "cheat-model.safetensors").string()},
                            tmp / "cheat-summary.json");
    if (!summary.ok()) return fail("devnet --cheater: " + summary.message());
    const auto& disputes = (*summary)["verification"]["disputes"];
    nlohmann::json run = {{"cheat", cheat}, {"devnet_wall_s", seconds_since(t0)}, {"disputes", disputes}};
    all_caught &= disputes.size() == 1 && disputes[0].value("result", "") == "challenger wins";
    dispute_runs.push_back(run);
  }
  out["disputes"] = dispute_runs;
  std::cout << out.dump(2) << std::endl;
  return replay->leaves_match && referee->all_match && all_caught ? 0 : 1;
}
