// The solver's node on chain: it commits its own step leaves and answers the
// disputes over them (docs/verification.md, "The node commits itself",
// "Dispute").
#include <spdlog/spdlog.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "chain/chain.h"
#include "core/fs.h"
#include "core/job.h"
#include "train/evidence.h"
#include "verify/verify.h"

namespace sn::verify {

namespace fs = std::filesystem;

namespace {

struct MemberJob {
  Member member;
  fs::path dir;
  uint64_t chain_job = 0;
  int64_t steps = 0;         // n: the final commit is at N = n + 1 leaves
  int64_t commit_every = 0;  // interim commits every this many steps (0: only the final one)
  uint64_t committed_count = 0;
  bool final_committed = false;
  bool settled = false;      // dispute lost or won: nothing more to do
};

}  // namespace

struct SolverAgent::Impl {
  SolverAgentOptions options;
  std::map<std::string, MemberJob> jobs;  // by evidence dir
  std::set<std::string> ignored;          // dirs without a chain job
  std::mutex mutex;
  std::condition_variable wake;
  bool stopping = false;
  std::thread thread;

  void report(const std::string& line) {
    if (options.report)
      options.report(line);
    else
      spdlog::info("{}", line);
  }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex);
    while (!stopping) {
      lock.unlock();
      scan();
      for (auto& [dir, job] : jobs) {
        if (job.settled) continue;
        if (auto s = commit_if_due(job); !s.ok()) spdlog::warn("job {} (chain job {}): commit: {}", job.member.job_id, job.chain_job, s.message());
        if (job.committed_count > 0)
          if (auto s = play(job); !s.ok()) spdlog::warn("chain job {}: dispute: {}", job.chain_job, s.message());
      }
      lock.lock();
      wake.wait_for(lock, options.poll, [&] { return stopping; });
    }
  }

  // New member directories under DATA/evidence whose setup names a chain job.
  void scan() {
    std::error_code error;
    const fs::path root = options.data_dir / "evidence";
    if (!fs::is_directory(root, error)) return;
    for (const auto& job_dir : fs::directory_iterator(root, error)) {
      for (const auto& member_dir : fs::directory_iterator(job_dir.path(), error)) {
        const std::string key = member_dir.path().string();
        if (jobs.count(key) || ignored.count(key)) continue;
        auto bytes = read_file(member_dir.path() / "setup.pb");
        if (!bytes.ok()) continue;  // not written yet
        solvernet::v1::SetupJobRequest setup;
        if (!setup.ParseFromString(*bytes) || setup.chain_job_id() == 0) {
          ignored.insert(key);
          continue;
        }
        auto job = parse_job_string(setup.job_toml(), "setup.pb");
        if (!job.ok()) {
          spdlog::warn("{}: {}", key, job.message());
          ignored.insert(key);
          continue;
        }
        MemberJob m;
        m.member = {setup.job_id(), setup.stage(), setup.replica()};
        m.dir = member_dir.path();
        m.chain_job = setup.chain_job_id();
        m.steps = job->train.steps;
        m.commit_every = job->verify.commit_every;
        jobs.emplace(key, std::move(m));
      }
    }
  }

  Status commit_if_due(MemberJob& job) {
    if (job.final_committed) return ok_status();
    // leaves.bin grows while the job runs: a leaf half-appended is left for the next poll.
    auto bytes = read_file(job.dir / "leaves.bin");
    if (!bytes.ok()) return ok_status();
    const std::vector<Hash256> all = split_leaves(*bytes);
    const std::vector<Hash256>* leaves = &all;
    const uint64_t count = leaves->size();
    const bool is_final = static_cast<int64_t>(count) >= job.steps + 1;
    const int64_t committed_steps = job.committed_count == 0 ? 0 : static_cast<int64_t>(job.committed_count) - 1;
    const bool interim = job.commit_every > 0 && static_cast<int64_t>(count) - 1 >= committed_steps + job.commit_every;
    if (!is_final && !interim) return ok_status();
    const Hash256 root = commitment_root(*leaves);
    // The journal makes each commit exactly-once across restarts of the node.
    const std::string action = fmt::format("verify/commit/{}/{}/{}", job.chain_job, count, is_final ? "final" : "interim");
    SN_TRY(options.market->commit(job.chain_job, root, count, is_final, action));
    job.committed_count = count;
    job.final_committed = is_final;
    report(fmt::format("chain job {}: committed {} root {}… over {} leaves (stage {} replica {})", job.chain_job,
                       is_final ? "final" : "interim", to_hex(root).substr(0, 16), count, job.member.stage,
                       job.member.replica));
    return ok_status();
  }

  Status play(MemberJob& job) {
    SN_ASSIGN(uint64_t id, options.market->dispute_of(job.chain_job, options.market->address()));
    if (id == 0) return ok_status();
    SN_ASSIGN(chain::DisputeState d, options.market->dispute(id));
    if (d.stage == chain::DisputeStage::closed) {
      job.settled = true;
      return ok_status();
    }
    if (chain::turn_of(d.stage) != chain::DisputeTurn::solver) return ok_status();
    if (d.stage == chain::DisputeStage::step_claim) {
      SN_ASSIGN(auto leaves, train::read_leaves(job.dir));
      const uint64_t mid = (d.lo + d.hi) / 2;
      if (mid >= leaves.size()) return make_error("dispute {}: no leaf {} on disk", id, mid);
      SN_TRY(options.market->claim_leaf(id, leaves[mid], commitment_proof(leaves, mid)));
      report(fmt::format("dispute {}: solver claims leaf {} in ({}, {}]", id, mid, d.lo, d.hi));
      return ok_status();
    }
    if (!options.step_ops) return ok_status();  // cannot answer: the deadline will decide
    const int64_t step = static_cast<int64_t>(d.step != 0 ? d.step : d.hi);
    auto ops = cached_ops(job.member, step);
    if (!ops.ok()) return ops.error();
    const uint64_t m = ops->records.size();
    if (d.stage == chain::DisputeStage::ops_post) {
      if (m < 1) return make_error("dispute {}: step {} traced to no operations", id, step);
      SN_TRY(options.market->post_ops(id, m, ops->chain[m - 1], ops->state, ops->inbound, ops->outbound));
      report(fmt::format("dispute {}: solver posts step {}: {} operations", id, step, m));
      return ok_status();
    }
    if (d.stage == chain::DisputeStage::op_claim) {
      const uint64_t mid = (d.lo + d.hi) / 2;
      if (mid >= ops->chain.size()) return make_error("dispute {}: no operation {} in step {}", id, mid, step);
      SN_TRY(options.market->claim_op(id, ops->chain[mid]));
      report(fmt::format("dispute {}: solver claims operation {} in ({}, {}]", id, mid, d.lo, d.hi));
    }
    return ok_status();
  }

  std::map<std::pair<std::string, int64_t>, StepOps> ops_cache;
  Result<StepOps> cached_ops(const Member& member, int64_t step) {
    const auto key = std::make_pair(fmt::format("{}/{}/{}", member.job_id, member.stage, member.replica), step);
    if (auto it = ops_cache.find(key); it != ops_cache.end()) return it->second;
    SN_ASSIGN(StepOps ops, options.step_ops(member, step));
    ops_cache[key] = ops;
    return ops;
  }
};

std::unique_ptr<SolverAgent> SolverAgent::start(SolverAgentOptions options) {
  std::unique_ptr<SolverAgent> agent(new SolverAgent());
  agent->impl_ = std::make_unique<Impl>();
  agent->impl_->options = std::move(options);
  agent->impl_->thread = std::thread([impl = agent->impl_.get()] { impl->loop(); });
  return agent;
}

SolverAgent::~SolverAgent() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace sn::verify
