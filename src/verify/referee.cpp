// The referee: rules the one operation a dispute has narrowed to.
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <set>
#include <thread>

#include "core/fs.h"
#include "model/tensor_wire.h"
#include "train/trace.h"
#include "verify/chain_logs.h"
#include "verify/step_trace.h"
#include "verify/verify.h"

namespace sn::verify {

namespace fs = std::filesystem;
namespace pb = solvernet::v1;

namespace {

class Referee {
 public:
  explicit Referee(const RefereeOptions& options) : o_(options) {}

  Result<nlohmann::json> run() {
    nlohmann::json rulings = nlohmann::json::array();
    std::set<uint64_t> ruled;
    std::map<std::string, MemberEndpoint> by_address;  // solver chain address → member
    while (!o_.keep_going || o_.keep_going()) {
      if (by_address.size() < o_.members.size()) learn_addresses(by_address);
      for (const auto& [address, endpoint] : by_address) {
        SN_ASSIGN(chain::Address solver, chain::parse_address(address));
        SN_ASSIGN(uint64_t id, o_.market->dispute_of(o_.chain_job, solver));
        if (id == 0 || ruled.count(id)) continue;
        SN_ASSIGN(chain::DisputeState d, o_.market->dispute(id));
        if (d.stage != chain::DisputeStage::referee) continue;
        auto ruling = rule(endpoint, id, d);
        if (!ruling.ok()) {
          spdlog::warn("dispute {}: {}", id, ruling.message());
          continue;
        }
        ruled.insert(id);
        rulings.push_back(*ruling);
      }
      std::this_thread::sleep_for(o_.poll);
    }
    return rulings;
  }

 private:
  void say(const std::string& line) {
    if (o_.report)
      o_.report(line);
    else
      spdlog::info("{}", line);
  }

  void learn_addresses(std::map<std::string, MemberEndpoint>& by_address) {
    for (const auto& endpoint : o_.members) {
      bool known = false;
      for (const auto& [a, e] : by_address) known |= e.stage == endpoint.stage && e.replica == endpoint.replica;
      if (known) continue;
      EvidenceClient client(endpoint.address, endpoint.node_id, *o_.key);
      auto commitment = client.commitment({o_.job_id, endpoint.stage, endpoint.replica});
      if (commitment.ok() && !commitment->chain_address.empty()) by_address[commitment->chain_address] = endpoint;
    }
  }

  // Operation j of step t: the solver's record against the agreed r_{j−1}
  // and its claim r_j, its inputs against the records before it, then the
  // operation recomputed (or the step re-traced).
  Result<nlohmann::json> rule(const MemberEndpoint& endpoint, uint64_t id, const chain::DisputeState& d) {
    const Member member{o_.job_id, endpoint.stage, endpoint.replica};
    const int64_t t = static_cast<int64_t>(d.step);
    const uint64_t j = d.hi;
    say(fmt::format("dispute {}: referee rules operation {} of step {} (stage {} replica {})", id, j, t,
                    endpoint.stage, endpoint.replica));
    EvidenceClient client(endpoint.address, endpoint.node_id, *o_.key);
    std::string why, kind;
    bool solver_wins = false;
    auto judged = judge(client, member, t, j, d, &why, &kind);
    if (!judged.ok()) {
      why = "the solver did not serve what the ruling needs: " + judged.message();
      solver_wins = false;
    } else {
      solver_wins = *judged;
    }
    say(fmt::format("dispute {}: {} ({})", id, solver_wins ? "the solver's operation is right" : "the solver's operation is wrong", why));
    SN_TRY(o_.market->resolve(id, solver_wins));
    nlohmann::json out = {{"dispute", id}, {"step", t}, {"operation", j}, {"kind", kind}, {"solver_wins", solver_wins}, {"why", why}};
    if (auto outcome = dispute_outcome(*o_.market, id); outcome.ok()) out["outcome"] = *outcome;
    return out;
  }

  Result<bool> judge(EvidenceClient& client, const Member& member, int64_t t, uint64_t j,
                     const chain::DisputeState& d, std::string* why, std::string* kind) {
    SN_ASSIGN(auto served, client.op_trace(member, t));
    SN_ASSIGN(auto commitment, client.commitment(member));
    if (t < 1 || static_cast<size_t>(t) >= commitment.leaves.size())
      return kind_error(ErrorKind::bad_peer, "no leaf {} in the solver's commitment", t);
    if (j < 1 || j > static_cast<uint64_t>(served.records_size())) {
      *why = fmt::format("the solver's trace has {} operations, not {}", served.records_size(), j);
      return false;
    }
    train::Trace trace;
    trace.step = t;
    trace.leaf_prev = commitment.leaves[static_cast<size_t>(t - 1)];
    trace.chain.push_back(train::chain_start(trace.leaf_prev));
    for (uint64_t i = 0; i < j; ++i) {
      SN_ASSIGN(train::OpRecord record, record_from_proto(served.records(static_cast<int>(i))));
      trace.chain.push_back(train::chain_next(trace.chain.back(), train::record_hash(record)));
      trace.records.push_back(std::move(record));
    }
    if (trace.chain[j - 1] != d.lo_hash) {
      *why = fmt::format("the solver's records 1..{} do not chain to the agreed r_{}", j - 1, j - 1);
      return false;
    }
    if (trace.chain[j] != d.hi_hash) {
      *why = fmt::format("the solver's record {} does not chain to its own claim r_{}", j, j);
      return false;
    }
    if (auto prefix = train::check_inputs_from_prefix(trace, j - 1); !prefix.ok()) {
      *why = prefix.message();
      return false;
    }
    const train::OpRecord& record = trace.records[j - 1];
    *kind = record.kind;
    SN_ASSIGN(auto setup, client.setup(member));
    if (train::recomputable(record.kind)) {
      std::map<std::string, torch::Tensor> inputs;
      for (const auto& input : record.inputs) {
        SN_ASSIGN(pb::Tensor wire, client.tensor(member, t, input.hash));
        SN_ASSIGN(torch::Tensor tensor, model::tensor_from_proto(wire));
        inputs[input.name] = tensor;
      }
      if (auto checked = train::check_inputs(record, inputs); !checked.ok()) {
        *why = checked.message();
        return false;
      }
      SN_ASSIGN(train::OpContext context, train::op_context_of(setup, t));
      SN_ASSIGN(auto outputs, train::recompute_op(context, record, inputs));
      *why = fmt::format("{} recomputed from its {} inputs", record.kind, inputs.size());
      return outputs == record.outputs;
    }
    // Kinds that need the step: re-trace it from the solver's evidence.
    SN_ASSIGN(int64_t c, find_checkpoint(client, member, t - 1));
    const fs::path dir = o_.work_dir / fmt::format("referee-{}-s{}r{}-{}", o_.chain_job, member.stage, member.replica, c);
    fs::remove_all(dir);
    SN_TRY(client.fetch_checkpoint(member, c, dir));
    TraceInputs inputs;
    inputs.setup = setup;
    inputs.checkpoint_dir = dir;
    inputs.checkpoint_step = c;
    inputs.leaf_prev = trace.leaf_prev;
    for (int64_t s = c + 1; s <= t; ++s) {
      SN_ASSIGN(std::string bytes, client.step_evidence(member, s));
      pb::StepEvidence evidence;
      if (!evidence.ParseFromString(bytes)) return kind_error(ErrorKind::bad_peer, "step {}'s evidence does not parse", s);
      inputs.steps.push_back(std::move(evidence));
    }
    SN_ASSIGN(train::Trace own, trace_member_step(inputs));
    *why = fmt::format("{} checked by re-tracing step {}", record.kind, t);
    return own.chain.size() > j && own.chain[j] == d.hi_hash;
  }

  // The newest checkpoint the solver serves at or before STEP: the segment
  // boundaries are multiples of K, tried downwards.
  Result<int64_t> find_checkpoint(EvidenceClient& client, const Member& member, int64_t step) {
    SN_ASSIGN(auto setup, client.setup(member));
    SN_ASSIGN(JobConfig job, parse_job_string(setup.job_toml(), "the member's setup"));
    int64_t k = job.verify.segment_steps > 0 ? job.verify.segment_steps
                                             : (job.train.checkpoint_every > 0 ? job.train.checkpoint_every : 10);
    for (int64_t c = step / k * k; c >= 0; c -= k) {
      const fs::path probe = o_.work_dir / "probe";
      auto listed = client.fetch_checkpoint(member, c, probe);
      fs::remove_all(probe);
      if (listed.ok()) return c;
      if (listed.error().kind != ErrorKind::not_found) return listed.error();
    }
    return kind_error(ErrorKind::not_found, "no checkpoint at or before step {}", step);
  }

  const RefereeOptions& o_;
};

}  // namespace

Result<nlohmann::json> run_referee(const RefereeOptions& options) {
  if (!options.key || !options.market) return make_error("run_referee: key and market are required");
  SN_TRY(check_job_id(options.job_id));
  SN_TRY(ensure_directory(options.work_dir));
  return Referee(options).run();
}

}  // namespace sn::verify
