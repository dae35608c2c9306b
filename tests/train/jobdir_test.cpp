// `train --resume JOB_DIR` refuses, with one line and exit 2 before any node
// is looked for, a job dir that another client holds, a job file edited so
// that it no longer matches its mirrored checkpoints and a state.json edited
// by hand (docs/resilience.md, "Resume"); a node tells a checkpoint on its disk
// that is not its role's as its own local data fault. The job dir is written here as the client writes one: job.toml,
// state.json and each role's checkpoint of step 3 (fresh weights, zero moments).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <thread>
#include <string>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "core/hash.h"
#include "core/keys.h"
#include "core/process.h"
#include "model/data.h"
#include "model/gpt.h"
#include "net/control.h"
#include "net/failure_cause.h"
#include "net/rpc.h"
#include "train/control.h"
#include "train/evidence.h"
#include "train/recovery.h"
#include "train/state.h"
#include "../common/test_support.h"

namespace sn {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr int64_t kStep = 3;

JobConfig churn_job() {
  auto job = parse_job_file(test::source_path("tests/train/data/churn.toml"));
  if (!job.ok()) throw std::runtime_error(job.message());
  return *job;
}

// JOB's job dir stopped at its checkpoint of step 3, as the client leaves it.
void write_stopped_job(const fs::path& dir, const JobConfig& job) {
  ASSERT_TRUE(train::write_job_file(dir, job).ok());
  ASSERT_TRUE(train::write_job_state(dir, train::JobDirState{"churn-1", kStep, {5, 5, 5}, "", job_to_toml(job), {}}).ok());
  auto corpus = model::prepare_corpus(job.data, static_cast<int>(job.model.vocab));
  ASSERT_TRUE(corpus.ok()) << corpus.message();
  const int64_t samples = model::Dataset(corpus->tokens, job.model.seq_len, job.data.holdout_fraction).train_samples();
  const auto ranges = train::stage_layer_ranges(job.model.layers, job.parallel.stages);
  train::CheckpointMirror mirror(dir, job.parallel.stages, job.parallel.replicas);
  for (int64_t s = 0; s < job.parallel.stages; ++s) {
    const auto& [first, count] = ranges[static_cast<size_t>(s)];
    const model::StageModel stage(job.model, first, count, job.train.seed);
    for (int64_t r = 0; r < job.parallel.replicas; ++r) {
      train::TrainingState state;
      state.weights = stage.named_parameters();
      for (const auto& [name, p] : state.weights) {
        state.optimizer.emplace_back("adam.m." + name, torch::zeros_like(p));
        state.optimizer.emplace_back("adam.v." + name, torch::zeros_like(p));
      }
      state.optimizer.emplace_back("adam.step", torch::tensor({kStep}, torch::kInt64));
      state.cursor = {kStep, samples, job.train.global_batch, job.parallel.replicas};
      state.rng = {job.train.seed, s, r};
      train::NamedTensors all = state.weights;
      all.insert(all.end(), state.optimizer.begin(), state.optimizer.end());
      train::CheckpointStore store(mirror.role_dir(s, r), 1);
      ASSERT_TRUE(store
                      .save(kStep, all,
                            {{"job_id", "churn-1"}, {"stage", std::to_string(s)}, {"replica", std::to_string(r)}},
                            train::training_state_digest(state))
                      .ok());
    }
  }
}

class JobDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::scratch("jobdir", ::testing::UnitTest::GetInstance()->current_test_info()->name());
    job_dir_ = dir_ / "churn-1";
    write_stopped_job(job_dir_, churn_job());
  }
  void TearDown() override { fs::remove_all(dir_); }

  // `train --resume` of the job dir (nothing answers at the bootstrap).
  test::CommandRun resume() const {
    return test::run_command({test::solvernet_bin(), "train", "--resume", job_dir_.string(), "--bootstrap",
                              "127.0.0.1:1", "--wait-s", "1"},
                             dir_, 60s);
  }
  // The job file edited: EDIT applied to the job the checkpoints are of.
  void edit_job(const std::function<void(JobConfig&)>& edit) const {
    JobConfig job = churn_job();
    edit(job);
    ASSERT_TRUE(train::write_job_file(job_dir_, job).ok());
  }
  // Whether process PID holds the job dir's lock within 30 s (a --resume
  // takes it before it reads the job dir).
  bool holds_the_lock(pid_t pid) const {
    const std::string holder = std::to_string(pid) + "\n";
    for (auto until = std::chrono::steady_clock::now() + 30s;
         read_file(job_dir_ / "lock").value_or("") != holder && std::chrono::steady_clock::now() < until;)
      std::this_thread::sleep_for(50ms);
    return read_file(job_dir_ / "lock").value_or("") == holder;
  }
  void expect_refused(const test::CommandRun& r, const std::string& needle) const {
    EXPECT_EQ(r.status, 2) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "not one line:\n" << r.err;
    EXPECT_NE(r.err.find(job_dir_.string()), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  }

  fs::path dir_, job_dir_;
};

// The unedited job dir gets past the check (to the unreachable bootstrap), and
// so does one whose lr changed (lr is not part of the state), with a line that
// says the job differs from the one stopped.
TEST_F(JobDir, AnUneditedJobOrANewLrPassesTheCheck) {
  auto r = resume();
  EXPECT_NE(r.status, 0);
  EXPECT_EQ(r.err.find("the job must stay the one checkpointed"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("127.0.0.1:1"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("differs from the job that stopped"), std::string::npos) << r.err;
  edit_job([](JobConfig& job) { job.train.lr = 0.5; });
  r = resume();
  EXPECT_EQ(r.err.find("the job must stay the one checkpointed"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("/job.toml differs from the job that stopped: train.lr = 0.5 (was 0.003); going on with it"),
            std::string::npos)
      << r.err;
}

TEST_F(JobDir, AJobFileThatNoLongerMatchesItsCheckpointsIsRefusedByTheClient) {
  edit_job([](JobConfig& job) { job.parallel.replicas = 1; });
  expect_refused(resume(), "its checkpoints of step 3 are of 2 stages × 2 replicas, job.toml asks for 2 × 1");
  edit_job([](JobConfig& job) { job.parallel.stages = 1; });
  expect_refused(resume(), "are of 2 stages × 2 replicas, job.toml asks for 1 × 2");
  edit_job([](JobConfig& job) { job.train.seed = 8; });
  expect_refused(resume(), "stage 0 replica 0 at step 3 was not trained with job.toml's train.seed = 8");
  edit_job([](JobConfig& job) { job.model.layers = 4; });
  expect_refused(resume(), "stage 0 replica 0 at step 3 lacks tensor blocks.1.");
  edit_job([](JobConfig& job) {
    job.model.d_model = 64;
    job.model.d_ff = 128;
  });
  expect_refused(resume(), "holds tensor wte.weight of shape [256, 32], job.toml's model needs [256, 64]");
}

// What feeds the data cursor (the samples each step draws) is in the state
// the nodes check: the client, which sees the edit against state.json's
// job_toml, refuses it in one line rather than say "going on with it" and
// have the nodes blame one of them. So is a --steps below the checkpoint,
// with no "going on with it" before the refusal.
TEST_F(JobDir, AnEditOfWhatFeedsTheDataCursorIsRefusedByTheClient) {
  edit_job([](JobConfig& job) { job.train.global_batch = 16; });
  expect_refused(resume(), "job.toml's train.global_batch = 16 (was 8) changes the data cursor its checkpoint of step 3");
  edit_job([](JobConfig& job) { job.data.holdout_fraction = 0.1; });
  expect_refused(resume(), "job.toml's data.holdout_fraction = 0.1 (was 0.05) changes the data cursor");
  edit_job([](JobConfig& job) {
    job.train.lr = 0.5;
    job.train.steps = 2;
  });
  expect_refused(resume(), "the job has 2 steps but its checkpoint is of step 3");
  // A job dir written before state.json recorded the job: the cursor itself is checked.
  edit_job([](JobConfig& job) { job.train.global_batch = 16; });
  ASSERT_TRUE(train::write_job_state(job_dir_, train::JobDirState{"churn-1", kStep, {5, 5, 5}, "", "", {}}).ok());
  expect_refused(resume(), "its checkpoint of step 3 does not hold the data cursor job.toml gives");
}

// Every field of state.json that --resume trusts is covered by the digests
// the client keeps beside them: a re-plan or a planned replica count edited
// (or added, or removed) by hand is refused in one line naming the field,
// before any node is looked for, as is a state.json without its digests.
TEST_F(JobDir, AnEditOfStateJsonIsRefusedNamingTheField) {
  const auto path = job_dir_ / "state.json";
  const std::string written = read_file(path).value_or("");
  const auto edit = [&](const std::function<void(nlohmann::json&)>& change) {
    auto j = nlohmann::json::parse(written);
    change(j);
    ASSERT_TRUE(write_file_atomic(path, j.dump(2)).ok());
  };
  // planned_replicas = 4 fits the 2 replicas and the global batch of 8: only the digest tells.
  edit([](nlohmann::json& j) { j["planned_replicas"] = 4; });
  expect_refused(resume(), "state.json: planned_replicas was edited after the client wrote it");
  edit([](nlohmann::json& j) { j["replanned"] = true; });
  expect_refused(resume(), "state.json: replanned was edited after the client wrote it");
  ASSERT_TRUE(train::write_job_state(job_dir_, train::JobDirState{"churn-1", kStep, {5, 5, 5}, "", job_to_toml(churn_job()),
                                                                 true, 2}).ok());
  const std::string replanned = read_file(path).value_or("");
  auto j = nlohmann::json::parse(replanned);
  j.erase("replanned");
  ASSERT_TRUE(write_file_atomic(path, j.dump(2)).ok());
  expect_refused(resume(), "state.json: replanned was edited after the client wrote it");
  edit([](nlohmann::json& j) { j["losses"][1] = 4.5; });
  expect_refused(resume(), "state.json: losses was edited");
  edit([](nlohmann::json& j) { j.erase("digests"); });
  expect_refused(resume(), "state.json: no \"digests\" of its fields");
  // Rewritten as it was, it passes again.
  ASSERT_TRUE(write_file_atomic(path, written).ok());
  EXPECT_EQ(resume().err.find("state.json"), std::string::npos);
}

// state.json rewritten with CHANGE applied and its digests recomputed as the
// client computes them (docs/resilience.md): an edit the digests let through,
// as a client of another version could have written it.
void rewrite_state(const fs::path& job_dir, const std::function<void(nlohmann::json&)>& change) {
  auto j = nlohmann::json::parse(read_file(job_dir / "state.json").value_or("{}"));
  change(j);
  j.erase("digests");
  nlohmann::json digests = nlohmann::json::object();
  for (const auto& [name, value] : j.items())
    digests[name] = to_hex(hash_string(fmt::format("solvernet/job-state/v1/{}={}", name, value.dump())));
  j["digests"] = digests;
  ASSERT_TRUE(write_file_atomic(job_dir / "state.json", j.dump(2)).ok());
}

// A checkpoint_step the mirror holds no checkpoint of is said as such, with
// the steps it does hold (it was "its checkpoints of step 55 are of 0 stages
// × 0 replicas").
TEST_F(JobDir, ACheckpointStepWithNoCheckpointSaysWhichStepsThereAre) {
  ASSERT_TRUE(train::write_job_state(job_dir_, train::JobDirState{"churn-1", 55, std::vector<double>(55, 5.0), "",
                                                                 job_to_toml(churn_job()), {}}).ok());
  expect_refused(resume(), "there is no checkpoint of step 55 (state.json's checkpoint_step) in " +
                               (job_dir_ / "checkpoints").string() + "; it holds step 3");
  fs::remove_all(job_dir_ / "checkpoints");
  expect_refused(resume(), "there is no checkpoint of step 55 (state.json's checkpoint_step) in " +
                               (job_dir_ / "checkpoints").string() + "; it holds none");
}

// Every field of state.json that --resume reads, of the wrong type (with
// digests that match, so the type check is what answers), missing, or the
// whole file not JSON: one line naming the field and the file, never
// nlohmann's exception text. A NaN loss is what the client itself wrote as
// null (it was "[json.exception.type_error.302] type must be number, but is null").
TEST_F(JobDir, AFieldOfStateJsonOfTheWrongTypeIsNamed) {
  const auto file = (job_dir_ / "state.json").string();
  const auto refused = [&](const std::string& needle) {
    const auto r = resume();
    expect_refused(r, file + ": " + needle);
    EXPECT_EQ(r.err.find("json.exception"), std::string::npos) << r.err;
  };
  ASSERT_TRUE(train::write_job_state(job_dir_, train::JobDirState{"churn-1", kStep, {5, std::nan(""), 5}, "",
                                                                 job_to_toml(churn_job()), {}}).ok());
  refused("losses[1] is null, not a number");
  write_stopped_job(job_dir_, churn_job());
  const std::string written = read_file(job_dir_ / "state.json").value_or("");
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](nlohmann::json& j) { j["checkpoint_step"] = "3"; }, "checkpoint_step is a string, not an integer"},
      {[](nlohmann::json& j) { j["checkpoint_step"] = 3.5; }, "checkpoint_step is a real number, not an integer"},
      {[](nlohmann::json& j) { j["job_id"] = 5; }, "job_id is an integer, not a string"},
      {[](nlohmann::json& j) { j.erase("job_id"); }, "no field \"job_id\""},
      {[](nlohmann::json& j) { j["losses"] = "5 5 5"; }, "losses is a string, not an array"},
      {[](nlohmann::json& j) { j["finished"] = 1; }, "finished is an integer, not a string"},
      {[](nlohmann::json& j) { j["job_toml"] = nullptr; }, "job_toml is null, not a string"},
      {[](nlohmann::json& j) { j["replanned"] = "yes"; }, "replanned is a string, not true or false"},
      {[](nlohmann::json& j) { j["planned_replicas"] = 2.5; }, "planned_replicas is a real number, not an integer"},
      {[](nlohmann::json& j) { j["replicas"] = "2"; }, "replicas is a string, not an integer"},
      {[](nlohmann::json& j) { j["replicas"] = 3; }, "replicas 3 does not fit the 2 planned"},
      {[](nlohmann::json& j) { j["layout"] = 1; }, "layout is an integer, not a string"},
      // Only a layout's own name: the job dir's checkpoints are deleted by what it does not name.
      {[](nlohmann::json& j) { j["layout"] = "../checkpoints"; }, "layout \"../checkpoints\" is not a checkpoint layout's name"},
      {[](nlohmann::json& j) { j["layout"] = "checkpoints-01"; }, "layout \"checkpoints-01\" is not a checkpoint layout's name"},
  };
  for (const auto& [change, needle] : cases) {
    ASSERT_TRUE(write_file_atomic(job_dir_ / "state.json", written).ok());
    rewrite_state(job_dir_, change);
    refused(needle);
  }
  ASSERT_TRUE(write_file_atomic(job_dir_ / "state.json", "[3]").ok());
  refused("not a JSON object");
  ASSERT_TRUE(write_file_atomic(job_dir_ / "state.json", written.substr(0, written.size() / 2)).ok());
  refused("not valid JSON");
}

// A mirrored checkpoint's manifest with a field of the wrong type is named by
// field and file too (the job dir's other JSON; it was "is malformed:
// [json.exception.type_error.302] …").
TEST_F(JobDir, AManifestFieldOfTheWrongTypeIsNamed) {
  const train::CheckpointMirror mirror(job_dir_, 2, 2);
  const fs::path manifest = train::CheckpointStore(mirror.role_dir(0, 0), 1).manifest_path(kStep);
  const std::string written = read_file(manifest).value_or("");
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](nlohmann::json& j) { j["step"] = nullptr; }, "step is null, not an integer"},
      {[](nlohmann::json& j) { j["labels"]["replica"] = 0; }, "labels.replica is an integer, not a string"},
      {[](nlohmann::json& j) { j["files"][0]["bytes"] = -1; }, "files[0]: bytes is a negative integer, not an integer ≥ 0"},
      {[](nlohmann::json& j) { j["state_parts"].erase("rng"); }, "no field \"state_parts.rng\""},
  };
  for (const auto& [change, needle] : cases) {
    auto j = nlohmann::json::parse(written);
    change(j);
    ASSERT_TRUE(write_file_atomic(manifest, j.dump(2)).ok());
    const auto r = resume();
    expect_refused(r, "the checkpoint of stage 0 replica 0 at step 3 is not usable: checkpoint manifest " +
                          manifest.string() + ": " + needle);
    EXPECT_EQ(r.err.find("json.exception"), std::string::npos) << r.err;
  }
}

// A node asked for its own kept checkpoint of a role whose dir holds another
// role's (copied over it) says its local data is at fault (UNAVAILABLE: the
// client restores the role from its mirror), rather than hand it over for the
// client to find that it is not the state the node reported, and blame the
// node for lying. The copy that is its role's own is handed over as before.
TEST_F(JobDir, ANodeRefusesItsCopyOfAnotherRolesCheckpointAsItsOwnLocalData) {
  const fs::path data = dir_ / "node";
  const train::CheckpointMirror mirror(job_dir_, 2, 2);
  for (int to : {0, 1}) {  // replica 1's checkpoint in the dirs of replicas 0 and 1 of stage 0
    const auto role_dir = train::checkpoint_dir(data, "churn-1", 0, to);
    fs::create_directories(role_dir);
    for (const auto& entry : fs::directory_iterator(mirror.role_dir(0, 1)))
      fs::copy_file(entry.path(), role_dir / entry.path().filename(), fs::copy_options::overwrite_existing);
  }
  auto dht = test::start_dht(dir_ / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  SpawnOptions options;
  options.stdout_path = options.stderr_path = dir_ / "node.log";
  auto node = ChildProcess::spawn({test::solvernet_bin(), "node", "--data", data.string(), "--listen", "127.0.0.1:0",
                                   "--dht-port", "0", "--bootstrap", dht->address},
                                  options);
  ASSERT_TRUE(node.ok()) << node.message();
  ASSERT_TRUE(test::wait_for_text(dir_ / "node.log", " listening on ", 30s)) << read_file(dir_ / "node.log").value_or("");
  const std::string log = read_file(dir_ / "node.log").value_or("");
  const auto at = log.find(" listening on ") + std::string(" listening on ").size();
  const std::string address = log.substr(at, log.find(' ', at) - at);
  auto node_key = NodeKey::load_or_create(data);
  ASSERT_TRUE(node_key.ok()) << node_key.message();
  auto stub = solvernet::v1::Train::NewStub(net::make_channel(address, node_key->node_id()));
  const NodeKey client = NodeKey::generate();
  net::ControlSigner signer(client);
  const auto fetch = [&](int replica) {
    solvernet::v1::FetchCheckpointRequest request;
    request.set_job_id("churn-1");
    request.set_stage(0);
    request.set_replica(replica);
    request.set_step(kStep);
    train::sign_request(signer, "FetchCheckpoint", request);
    solvernet::v1::FetchCheckpointReply reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    return stub->FetchCheckpoint(&context, request, &reply);
  };
  const auto own = fetch(1);
  EXPECT_TRUE(own.ok()) << own.error_message();
  const auto other = fetch(0);
  EXPECT_EQ(other.error_code(), grpc::StatusCode::UNAVAILABLE) << other.error_message();
  EXPECT_NE(other.error_message().find("local data"), std::string::npos) << other.error_message();
  EXPECT_EQ(net::failure_cause_of(other), solvernet::v1::FailureCause::LOCAL_DATA) << other.error_message();
  EXPECT_NE(other.error_message().find("labelled job churn-1 stage 0 replica 1, not job churn-1 stage 0 replica 0"),
            std::string::npos)
      << other.error_message();
}

// Two clients of one job dir: the first holds it while it waits for nodes
// (none come), the second is refused before it looks for any, naming the
// first's pid. The lock goes with its holder.
TEST_F(JobDir, ASecondResumeOfAJobDirInUseIsRefusedNamingTheFirst) {
  auto dht = test::start_dht(dir_ / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  SpawnOptions options;
  options.stdout_path = options.stderr_path = dir_ / "first.log";
  auto first = ChildProcess::spawn({test::solvernet_bin(), "train", "--resume", job_dir_.string(), "--bootstrap",
                                    dht->address, "--wait-s", "60"},
                                   options);
  ASSERT_TRUE(first.ok()) << first.message();
  ASSERT_TRUE(holds_the_lock(first->pid())) << read_file(dir_ / "first.log").value_or("");
  expect_refused(resume(), fmt::format("job dir {} is in use by another process (pid {})", job_dir_.string(),
                                       first->pid()));
  first->kill_now();
  ASSERT_TRUE(first->wait_for(10s).has_value());
  auto r = resume();
  EXPECT_EQ(r.err.find("in use"), std::string::npos) << r.err;
}

// A job stopped by Ctrl-C after a checkpoint was mirrored (step 30's
// progress line comes after its checkpoint is) says how to resume it, as a
// stop for want of a spare does; the devnet keeps the job dir the advice names.
TEST(Interrupt, CtrlCWithACheckpointGivesResumeAdvice) {
  const auto dir = test::scratch("jobdir", "interrupt");
  SpawnOptions options;
  options.stdout_path = dir / "out.txt";
  options.stderr_path = dir / "err.txt";
  auto devnet = ChildProcess::spawn(
      {test::solvernet_bin(), "devnet", "--job", test::source_path("tests/train/data/churn-pipeline.toml").string(),
       "--topology", test::source_path("tests/train/data/churn-net.toml").string(), "--no-chain", "--nodes", "2",
       "--spares", "0", "--steps", "300", "--peer-timeout-s", "4", "--out", (dir / "model.safetensors").string()},
      options);
  ASSERT_TRUE(devnet.ok()) << devnet.message();
  ASSERT_TRUE(test::wait_for_text(dir / "err.txt", "step 30/300", 90s)) << read_file(dir / "err.txt").value_or("");
  ::kill(devnet->pid(), SIGINT);
  const auto status = devnet->wait_for(60s);
  const std::string err = read_file(dir / "err.txt").value_or("");
  ASSERT_TRUE(status.has_value()) << err;
  EXPECT_EQ(*status, 130) << err;
  EXPECT_NE(err.find("interrupted"), std::string::npos) << err;
  const auto at = err.find("solvernet train --resume ");
  ASSERT_NE(at, std::string::npos) << err;
  const auto start = at + std::string("solvernet train --resume ").size();
  const fs::path job_dir = err.substr(start, err.find(' ', start) - start);
  EXPECT_TRUE(fs::exists(job_dir / "state.json")) << err;
  fs::remove_all(dir);
}

// churn-pipeline.toml (AQ-SGD activations, 2 stages) with EDITS applied as
// "key = value" lines replaced, in DIR/job.toml.
fs::path pipeline_job(const fs::path& dir, const std::vector<std::pair<std::string, std::string>>& edits) {
  std::string text = read_file(test::source_path("tests/train/data/churn-pipeline.toml")).value_or("");
  for (const auto& [from, to] : edits) {
    const auto at = text.find(from + "\n");
    if (at == std::string::npos) throw std::runtime_error("no line " + from);
    text.replace(at, from.size(), to);
  }
  if (!write_file_atomic(dir / "job.toml", text).ok()) throw std::runtime_error("cannot write job.toml");
  return dir / "job.toml";
}

// A job whose lr blows it up ends with one error of kind diverged (its own
// line, exit 1) that blames no node and says to lower the lr: AQ-SGD's fp16
// activations overflow at step 2 with lr = 10 (it was "node de2cdf80 (stage
// 0, replica 0) … failed during step 2: aqsgd: …"). The checkpoint of the
// step before holds the weights that overflowed (a resume from it with a
// lower lr overflows the same): no resume advice then. With lr = 1 the
// overflow comes at step 10 and the checkpoint of step 8 is named for
// --resume (the devnet moves the job dir out of its temp dir). Without
// compression a blow-up reaches the loss, which the last stage finds not
// finite; `train --local` says so too.
TEST(Divergence, ABlownUpJobBlamesNoNodeAndSaysToLowerTheLr) {
  const auto dir = test::scratch("jobdir", "diverged");
  const auto devnet = [&](const fs::path& job) {
    return test::run_command({test::solvernet_bin(), "devnet", "--job", job.string(), "--topology",
                              test::source_path("tests/train/data/churn-net.toml").string(), "--no-chain", "--nodes",
                              "2", "--spares", "0", "--out", (dir / "model.safetensors").string()},
                             dir, 180s);
  };
  const auto expect_diverged = [](const test::CommandRun& r, const std::string& command, const std::string& cause,
                                  const std::string& lr) {
    EXPECT_EQ(r.status, 1) << r.err;
    const auto at = r.err.find("solvernet " + command + ": the job diverged during step ");
    ASSERT_NE(at, std::string::npos) << r.err;
    const std::string line = r.err.substr(at, r.err.find('\n', at) - at);
    EXPECT_NE(line.find(cause), std::string::npos) << line;
    EXPECT_NE(line.find("lower train.lr (now " + lr + ")"), std::string::npos) << line;
    if (command == "devnet") EXPECT_NE(line.find("no node is at fault"), std::string::npos) << line;
    EXPECT_EQ(line.find(", replica "), std::string::npos) << line;  // no member named: "node … (stage 0, replica 0)"
    EXPECT_EQ(r.err.find("failed during"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find("misbehaved"), std::string::npos) << r.err;
  };
  auto r = devnet(pipeline_job(dir, {{"lr = 3e-3", "lr = 10"}, {"checkpoint_every = 3", "checkpoint_every = 1"}}));
  expect_diverged(r, "devnet", "during step 2 (stage 0: aqsgd: activation ", "10");
  EXPECT_NE(r.err.find("and start the job again (its checkpoint of step 1 holds the weights that blew up)"),
            std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("--resume"), std::string::npos) << r.err;

  r = devnet(pipeline_job(dir, {{"lr = 3e-3", "lr = 1"}, {"checkpoint_every = 3", "checkpoint_every = 4"},
                                {"steps = 9", "steps = 12"}}));
  expect_diverged(r, "devnet", "during step 10 (stage 0: aqsgd: activation ", "1");
  const auto advice = r.err.find("the job stopped at its checkpoint of step 8 in ");
  ASSERT_NE(advice, std::string::npos) << r.err;
  const auto at = r.err.find("solvernet train --resume ", advice);
  ASSERT_NE(at, std::string::npos) << r.err;
  const auto start = at + std::string("solvernet train --resume ").size();
  const fs::path job_dir = r.err.substr(start, r.err.find(' ', start) - start);
  EXPECT_EQ(job_dir.parent_path(), dir) << r.err;
  EXPECT_TRUE(fs::exists(job_dir / "state.json")) << r.err;
  EXPECT_NE(r.err.find("after lowering train.lr in " + (job_dir / "job.toml").string()), std::string::npos) << r.err;

  // Decoupled weight decay of lr × 10 per step flips and grows the weights
  // until the loss is NaN (step 6); lr = 10 alone stays finite without compression.
  const auto plain = pipeline_job(dir, {{"lr = 3e-3", "lr = 10"}, {"seed = 7", "seed = 7\nweight_decay = 10"},
                                        {"activations = \"aqsgd\"", "activations = \"none\""},
                                        {"gradients = \"cocktail\"", "gradients = \"none\""}});
  expect_diverged(devnet(plain), "devnet", "(stage 1: the loss of micro-batch ", "10");
  expect_diverged(test::run_command({test::solvernet_bin(), "train", "--local", "--job", plain.string()}, dir, 120s),
                  "train", "(its loss is ", "10");
  fs::remove_all(dir);
}

// A client killed right between two steps of the job dir's update at a
// mirrored checkpoint (--kill-self-at-mirror 2: the checkpoint of step 6 is
// whole for every role; the state.json write and the deletion of the step 3
// one are the two steps) leaves a job dir --resume takes, and the resumed job
// ends bitwise as the undisturbed run does.
TEST(KilledMidMirror, TheJobDirResumesToTheUndisturbedModel) {
  auto dir = test::scratch("jobdir", "killed-mid-mirror");
  const std::string job = test::source_path("tests/train/data/churn-pipeline.toml").string();
  const std::string topology = test::source_path("tests/train/data/churn-net.toml").string();
  const auto ref = test::run_command({test::solvernet_bin(), "devnet", "--job", job, "--topology", topology, "--no-chain",
                                      "--json", "--peer-timeout-s", "4", "--nodes", "2", "--spares", "0", "--steps",
                                      "30"},
                                     dir, 120s);
  ASSERT_EQ(ref.status, 0) << ref.err;
  const auto want = nlohmann::json::parse(ref.out);
  auto net = test::own_network(dir, 2);
  ASSERT_TRUE(net.ok()) << net.message();
  const std::vector<std::string> common = {"--bootstrap", net->dht.address, "--topology", topology, "--peer-timeout-s", "4",
                                           "--key", (dir / "client.key").string(), "--wait-s", "30"};
  std::vector<std::string> first = {test::solvernet_bin(), "train", "--job", job, "--steps", "30", "--job-dir",
                                    (dir / "jobs").string(), "--kill-self-at-mirror", "2"};
  first.insert(first.end(), common.begin(), common.end());
  const auto killed = test::run_command(first, dir, 120s);
  ASSERT_EQ(killed.status, 128 + SIGKILL) << killed.err;
  const fs::path job_dir = test::only_job_dir(dir / "jobs");
  ASSERT_FALSE(job_dir.empty());
  std::vector<std::string> resume = {test::solvernet_bin(), "train", "--resume", job_dir.string(), "--json", "--out",
                                     (dir / "model.safetensors").string()};
  resume.insert(resume.end(), common.begin(), common.end());
  const auto resumed = test::run_command(resume, dir, 120s);
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  const auto summary = nlohmann::json::parse(resumed.out);
  EXPECT_EQ(summary["recovery"]["resumed_from"], 6);
  EXPECT_EQ(summary["losses"], want["losses"]);
  EXPECT_EQ(summary["model_hash"], want["model_hash"]);
  net = Error{};  // the nodes stop
  fs::remove_all(dir);
}

// The job dir as a re-plan onto replica group 0 of 2 leaves it at its
// checkpoint of step 3: the roles in checkpoints-1, state.json naming that
// layout, 1 replica of the 2 planned, and the job as it ran (1 replica).
void replan_stopped_job(const fs::path& job_dir) {
  train::CheckpointMirror mirror(job_dir, 2, 2);
  ASSERT_TRUE(mirror.renumber_replicas({0}).ok());
  JobConfig ran = churn_job();
  ran.parallel.replicas = 1;
  rewrite_state(job_dir, [&](nlohmann::json& j) {
    j["replicas"] = 1;
    j["planned_replicas"] = 2;
    j["replanned"] = true;
    j["layout"] = mirror.layout();
    j["job_toml"] = job_to_toml(ran);
  });
  mirror.remove_retired_layout();
}

// After a re-plan --resume checks the roles against state.json's replicas
// (job.toml keeps the planned ones), and its refusal names what it checked:
// it said "are of 2 stages × 2 replicas, job.toml asks for 2 × 2".
TEST_F(JobDir, AfterAReplanTheRefusalNamesTheReplicasItChecked) {
  rewrite_state(job_dir_, [](nlohmann::json& j) {
    j["replicas"] = 1;
    j["planned_replicas"] = 2;
    j["replanned"] = true;
  });
  expect_refused(resume(), "its checkpoints of step 3 are of 2 stages × 2 replicas, the job runs on 2 × 1 (job.toml's "
                           "stages, state.json's replicas: re-planned from 2)");
}

// Ctrl-C of a --resume --json before any node came (stdout stays for the
// summary; no wait line on stderr) ends it, exit 130, with one line on
// stderr: the interruption and the advice, naming the directory that holds
// the checkpoints after a re-plan (it named JOB_DIR/checkpoints, which the
// re-plan deleted).
TEST_F(JobDir, CtrlCOfAResumeSaysSoInOneLineNamingTheReplannedLayout) {
  replan_stopped_job(job_dir_);
  ASSERT_FALSE(fs::exists(job_dir_ / "checkpoints"));
  auto dht = test::start_dht(dir_ / "dht.log");
  ASSERT_TRUE(dht.ok()) << dht.message();
  SpawnOptions options;
  options.stdout_path = dir_ / "out.txt";
  options.stderr_path = dir_ / "err.txt";
  auto resume = ChildProcess::spawn({test::solvernet_bin(), "train", "--resume", job_dir_.string(), "--bootstrap",
                                     dht->address, "--wait-s", "60", "--json"},
                                    options);
  ASSERT_TRUE(resume.ok()) << resume.message();
  ASSERT_TRUE(holds_the_lock(resume->pid())) << read_file(dir_ / "err.txt").value_or("");
  ::kill(resume->pid(), SIGINT);
  const auto status = resume->wait_for(30s);
  const std::string err = read_file(dir_ / "err.txt").value_or("");
  ASSERT_TRUE(status.has_value()) << err;
  EXPECT_EQ(*status, 130) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << "not one line:\n" << err;
  EXPECT_NE(err.find("solvernet train: interrupted while "), std::string::npos) << err;
  EXPECT_NE(err.find("the job stopped at its checkpoint of step 3 in " + (job_dir_ / "checkpoints-1").string() +
                     "; continue it with: solvernet train --resume " + job_dir_.string()),
            std::string::npos)
      << err;
  EXPECT_EQ(read_file(dir_ / "out.txt").value_or(""), "");
}

}  // namespace
}  // namespace sn
