// The verifier: takes a seat the seed gives it, replays what the seed picks,
// challenges the first leaf that differs and plays the challenger.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <map>
#include <thread>

#include "core/fs.h"
#include "core/job.h"
#include "train/evidence.h"
#include "train/replay.h"
#include "verify/chain_logs.h"
#include "verify/step_trace.h"
#include "verify/verify.h"

namespace sn::verify {

namespace fs = std::filesystem;
namespace pb = solvernet::v1;
using namespace std::chrono;

namespace {

int64_t segment_steps_of(const JobConfig& job) {
  if (job.verify.segment_steps > 0) return job.verify.segment_steps;
  return job.train.checkpoint_every > 0 ? job.train.checkpoint_every : 10;
}

// What the verifier knows of one member after its replays.
struct MemberCheck {
  MemberEndpoint endpoint;
  Member member;
  Commitment commitment;
  pb::SetupJobRequest setup;
  chain::Address solver{};
  std::map<int64_t, Hash256> replayed;  // leaf t as this verifier computed it
  // Where the evidence of the disputed range came from (to trace a step).
  fs::path checkpoint_dir;
  int64_t checkpoint_step = 0;
  std::vector<pb::StepEvidence> evidence;  // checkpoint_step+1 …
  bool data_missing = false;               // the solver did not serve what the replay needs
};

class Verifier {
 public:
  explicit Verifier(const VerifierOptions& options) : o_(options) {}

  Result<nlohmann::json> run() {
    nlohmann::json out;
    SN_ASSIGN(Hash256 seed, wait_for_seed());
    out["seed"] = to_hex(seed);
    SN_ASSIGN(chain::Address selected, o_.market->selected_verifier(o_.chain_job, o_.seat));
    if (selected != o_.market->address())
      return kind_error(ErrorKind::permission_denied, "the seed selects {} for seat {} of chain job {}, not this key {}",
                        chain::address_hex(selected), o_.seat, o_.chain_job, chain::address_hex(o_.market->address()));
    SN_ASSIGN(bool already, o_.market->is_verifier(o_.chain_job, o_.market->address()));
    if (!already) SN_TRY(o_.market->accept(o_.chain_job, fmt::format("verify/accept/{}", o_.chain_job)));
    say(fmt::format("verifier {} selected by seed {}… and seated on chain job {}", chain::address_hex(selected),
                    to_hex(seed).substr(0, 16), o_.chain_job));
    SN_ASSIGN(chain::JobState job_state, o_.market->job(o_.chain_job));
    out["members"] = nlohmann::json::array();
    for (const auto& endpoint : o_.members) {
      // A liar lies about the first member only (one dispute to watch).
      lying_ = o_.lie && &endpoint == &o_.members.front();
      auto checked = check_member(endpoint, seed, job_state);
      // Interrupted: the run ends here, nothing after it (finalizing) may act as if it had finished.
      if (!checked.ok() && checked.error().kind == ErrorKind::aborted) return checked.error();
      if (!checked.ok()) {
        say(fmt::format("member stage {} replica {}: {}", endpoint.stage, endpoint.replica, checked.message()));
        out["members"].push_back({{"stage", endpoint.stage}, {"replica", endpoint.replica}, {"error", checked.message()}});
        continue;
      }
      out["members"].push_back(*checked);
    }
    return out;
  }

 private:
  void say(const std::string& line) {
    if (o_.report)
      o_.report(line);
    else
      spdlog::info("{}", line);
  }

  // Ctrl-C (or the caller's stop) ends the run between two polls.
  Status check_going() const {
    if (o_.keep_going && !o_.keep_going())
      return kind_error(ErrorKind::aborted, "chain job {}: verification interrupted", o_.chain_job);
    return ok_status();
  }

  Result<Hash256> wait_for_seed() {
    const auto until = steady_clock::now() + o_.seed_timeout;
    std::string last;
    while (true) {
      auto seed = o_.market->verifier_seed(o_.chain_job);
      if (seed.ok()) return *seed;
      last = seed.message();
      if (steady_clock::now() >= until)
        return kind_error(ErrorKind::timeout, "chain job {}: no verifier seed within {} s ({})", o_.chain_job,
                          o_.seed_timeout.count(), last);
      SN_TRY(check_going());
      std::this_thread::sleep_for(o_.poll);
    }
  }

  Result<nlohmann::json> check_member(const MemberEndpoint& endpoint, const Hash256& seed, const chain::JobState& job_state) {
    MemberCheck m;
    m.endpoint = endpoint;
    m.member = {o_.job_id, endpoint.stage, endpoint.replica};
    EvidenceClient client(endpoint.address, endpoint.node_id, *o_.key);
    SN_ASSIGN(m.commitment, client.commitment(m.member));
    SN_ASSIGN(m.solver, chain::parse_address(m.commitment.chain_address));
    SN_ASSIGN(chain::CommitState on_chain, o_.market->commit_state(o_.chain_job, m.solver));
    if (on_chain.root != m.commitment.root || on_chain.leaf_count != m.commitment.leaves.size())
      return kind_error(ErrorKind::bad_peer, "node {} serves a commitment ({} leaves) that is not its commit on chain ({} leaves)",
                        endpoint.node_id.substr(0, 8), m.commitment.leaves.size(), on_chain.leaf_count);
    SN_ASSIGN(m.setup, client.setup(m.member));
    SN_ASSIGN(JobConfig job, parse_job_string(m.setup.job_toml(), "the member's setup"));
    const int64_t n = static_cast<int64_t>(m.commitment.leaves.size()) - 1;
    const int64_t k = segment_steps_of(job);
    const int64_t segments = std::max<int64_t>(1, (n + k - 1) / k);
    double f = o_.fraction;
    if (f <= 0) {
      SN_ASSIGN(f, fraction_for_target(o_.target, o_.q, segments));
    }
    const int64_t count = segments_for_fraction(f, segments);
    const auto picks = pick_segments(seed, endpoint.stage, endpoint.replica, segments, count);
    const double p = detection_probability(o_.q, f, segments);
    say(fmt::format("stage {} replica {} ({}): {} steps in {} segments of {}; replaying {} (f = {:.3f}): a solver "
                    "faking {:.0f}% of segments is caught with probability {:.4f}",
                    endpoint.stage, endpoint.replica, chain::address_hex(m.solver), n, segments, k, count, f,
                    100 * o_.q, p));
    nlohmann::json report = {{"stage", endpoint.stage}, {"replica", endpoint.replica},
                             {"solver", chain::address_hex(m.solver)}, {"segments", segments},
                             {"segment_steps", k}, {"fraction", f}, {"replayed", picks},
                             {"detection_probability", p}};
    ops_.clear();
    std::optional<std::pair<int64_t, int64_t>> disputed;  // (lo, hi)
    if (lying_) {
      disputed = std::make_pair(int64_t{0}, n);
      say(fmt::format("LIAR: challenging the honest leaf {}", n));
    }
    for (int64_t segment : lying_ ? std::vector<int64_t>{} : picks) {
      const int64_t c = segment * k, e = std::min(c + k, n);
      auto mismatch = replay_segment(client, m, c, e);
      if (!mismatch.ok()) return mismatch.error();
      if (*mismatch) {
        disputed = std::make_pair(**mismatch - 1, **mismatch);
        break;
      }
      say(fmt::format("  segment {} (steps {}..{}) replayed: every leaf matches", segment, c + 1, e));
    }
    if (!disputed) {
      report["verdict"] = "honest";
      return report;
    }
    const auto [lo, hi] = *disputed;
    const auto& leaves = m.commitment.leaves;
    uint64_t dispute_id = 0;
    SN_ASSIGN(dispute_id, o_.market->challenge(o_.chain_job, m.solver, lo, leaves[lo], commitment_proof(leaves, lo), hi,
                                               leaves[hi], commitment_proof(leaves, hi), job_state.stake_per_role));
    say(fmt::format("dispute {}: challenged {} agreeing with leaf {} and disputing leaf {} (bond {} ETH)", dispute_id,
                    chain::address_hex(m.solver), lo, hi, chain::wei_to_eth_string(job_state.stake_per_role)));
    report["dispute"] = dispute_id;
    report["challenged"] = {lo, hi};
    SN_ASSIGN(nlohmann::json outcome, play(m, dispute_id));
    report["outcome"] = outcome;
    return report;
  }

  // Replays steps c+1 … e from checkpoint c; the first leaf that differs
  // from the solver's (nullopt: all match). Evidence the solver does not
  // serve counts as a difference at c+1: its dispute ends at the referee,
  // who cannot get the data either.
  Result<std::optional<int64_t>> replay_segment(EvidenceClient& client, MemberCheck& m, int64_t c, int64_t e) {
    const fs::path dir = o_.work_dir / fmt::format("{}-s{}r{}", o_.chain_job, m.member.stage, m.member.replica) /
                         fmt::format("checkpoint-{}", c);
    auto fail = [&](const Error& error) -> Result<std::optional<int64_t>> {
      if (error.kind == ErrorKind::internal || error.kind == ErrorKind::invalid_input) return error;
      say(fmt::format("  segment from step {}: {} — disputing step {}", c, error.message, c + 1));
      m.data_missing = true;
      return std::optional<int64_t>(c + 1);
    };
    fs::remove_all(dir);
    if (auto fetched = client.fetch_checkpoint(m.member, c, dir); !fetched.ok()) return fail(fetched.error());
    train::ReplayInputs inputs;
    inputs.setup = m.setup;
    inputs.checkpoint_dir = dir;
    inputs.checkpoint_step = c;
    for (int64_t t = c + 1; t <= e; ++t) {
      auto bytes = client.step_evidence(m.member, t);
      if (!bytes.ok()) return fail(bytes.error());
      pb::StepEvidence evidence;
      if (!evidence.ParseFromString(*bytes))
        return fail(kind_error(ErrorKind::bad_peer, "step {}'s evidence does not parse", t));
      inputs.steps.push_back(std::move(evidence));
    }
    m.checkpoint_dir = dir;
    m.checkpoint_step = c;
    m.evidence = inputs.steps;
    auto replayed = train::replay_member(inputs);
    if (!replayed.ok()) return fail(replayed.error());
    for (const auto& step : replayed->steps) {
      m.replayed[step.step] = step.leaf;
      if (step.leaf != m.commitment.leaves[static_cast<size_t>(step.step)]) {
        say(fmt::format("  step {}: leaf {}… committed, {}… replayed", step.step,
                        to_hex(m.commitment.leaves[static_cast<size_t>(step.step)]).substr(0, 12),
                        to_hex(step.leaf).substr(0, 12)));
        return std::optional<int64_t>(step.step);
      }
    }
    return std::optional<int64_t>();
  }

  // This verifier's own trace of step T (from the solver's evidence).
  Result<StepOps> own_ops(MemberCheck& m, int64_t t) {
    if (auto it = ops_.find(t); it != ops_.end()) return it->second;
    if (m.data_missing || t <= m.checkpoint_step ||
        t > m.checkpoint_step + static_cast<int64_t>(m.evidence.size()))
      return kind_error(ErrorKind::not_found, "no evidence to trace step {}", t);
    TraceInputs inputs;
    inputs.setup = m.setup;
    inputs.checkpoint_dir = m.checkpoint_dir;
    inputs.checkpoint_step = m.checkpoint_step;
    inputs.steps.assign(m.evidence.begin(), m.evidence.begin() + (t - m.checkpoint_step));
    inputs.leaf_prev = m.commitment.leaves[static_cast<size_t>(t - 1)];
    SN_ASSIGN(train::Trace trace, trace_member_step(inputs));
    ops_[t] = step_ops_of(trace);
    return ops_[t];
  }

  Result<nlohmann::json> play(MemberCheck& m, uint64_t id) {
    const auto started = steady_clock::now();
    const auto until = started + o_.dispute_timeout;
    int64_t last_round = -1;
    int rounds = 0;
    while (steady_clock::now() < until) {
      SN_TRY(check_going());
      SN_ASSIGN(chain::DisputeState d, o_.market->dispute(id));
      const int64_t round_key = static_cast<int64_t>(d.stage) * 1000003 + static_cast<int64_t>(d.lo * 1009 + d.hi);
      if (round_key != last_round) {
        last_round = round_key;
        if (d.stage != chain::DisputeStage::closed)
          say(fmt::format("dispute {}: {} [{}, {}]{} — {}'s turn until block {}", id, chain::stage_name(d.stage), d.lo,
                          d.hi, d.phase == chain::DisputePhase::ops || d.phase == chain::DisputePhase::referee
                                    ? fmt::format(" of step {}", d.step) : "",
                          d.turn == chain::DisputeTurn::solver ? "solver" : d.turn == chain::DisputeTurn::challenger ? "challenger" : "referee",
                          d.deadline));
      }
      if (d.stage == chain::DisputeStage::closed) {
        SN_ASSIGN(auto outcome, dispute_outcome(*o_.market, id));
        outcome["rounds"] = rounds;
        outcome["wall_s"] = duration<double>(steady_clock::now() - started).count();
        if (auto figures = dispute_figures(*o_.market, id); figures.ok())
          outcome["figures"] = *figures;
        else
          say(fmt::format("dispute {}: its gas figures could not be read: {}", id, figures.message()));
        const bool won = outcome.value("winner", "") == chain::address_hex(o_.market->address());
        say(fmt::format("dispute {}: {} after {} rounds: {}", id, outcome.value("result", "closed"), rounds,
                        won                                         ? "the solver is slashed"
                        : outcome.value("result", "") == "cancelled" ? "nobody is slashed, the bond is returned"
                                                                     : "the challenger loses its bond"));
        return outcome;
      }
      SN_ASSIGN(uint64_t block, o_.market->rpc().block_number());
      if (d.turn != chain::DisputeTurn::challenger) {
        if (block > d.deadline) {
          say(fmt::format("dispute {}: the {} missed its turn (deadline block {}): timing out", id,
                          d.turn == chain::DisputeTurn::solver ? "solver" : "referee", d.deadline));
          SN_TRY(o_.market->timeout(id));
        }
        std::this_thread::sleep_for(o_.poll);
        continue;
      }
      const uint64_t mid = (d.lo + d.hi) / 2;
      bool agree = false;
      if (lying_) {
        agree = false;
      } else if (d.stage == chain::DisputeStage::step_bisect) {
        auto it = m.replayed.find(static_cast<int64_t>(mid));
        agree = it != m.replayed.end() && it->second == d.mid_hash;
      } else {
        auto ops = own_ops(m, static_cast<int64_t>(d.step));
        if (!ops.ok()) say(fmt::format("dispute {}: cannot trace step {} ({}): disagreeing", id, d.step, ops.message()));
        agree = ops.ok() && mid < ops->chain.size() && ops->chain[mid] == d.mid_hash;
      }
      SN_TRY(o_.market->bisect(id, agree));
      ++rounds;
      say(fmt::format("dispute {}: round {}: challenger {} at {} {}", id, rounds, agree ? "agrees" : "disagrees",
                      d.stage == chain::DisputeStage::step_bisect ? "leaf" : "operation", mid));
    }
    return kind_error(ErrorKind::timeout, "dispute {} still open after {} s", id, o_.dispute_timeout.count());
  }

  const VerifierOptions& o_;
  std::map<int64_t, StepOps> ops_;  // this member's traced steps
  bool lying_ = false;
};

}  // namespace

Result<nlohmann::json> run_verifier(const VerifierOptions& options) {
  if (!options.key || !options.market) return make_error("run_verifier: key and market are required");
  SN_TRY(check_job_id(options.job_id));
  SN_TRY(ensure_directory(options.work_dir));
  return Verifier(options).run();
}

}  // namespace sn::verify
