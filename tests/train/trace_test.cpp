// The operation trace of one training step (train/trace.h), taken through the
// StageWorker itself: tracing changes no bit of training, every compute op
// recomputed alone gives its recorded outputs, each op's inputs are the
// latest outputs before it, and the chain is deterministic.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <set>
#include <thread>

#include "chain/chain.h"
#include "core/hash.h"
#include "core/keys.h"
#include "model/tensor_wire.h"
#include "net/delivery.h"
#include "net/rpc.h"
#include "train/stage_worker.h"
#include "train/state.h"
#include "train/trace.h"
#include "train/train.h"

namespace sn::train {
// Readable failures: name and the hash's first bytes.
void PrintTo(const OpValue& v, std::ostream* os) { *os << v.name << "=" << to_hex(v.hash).substr(0, 12); }
}  // namespace sn::train

using namespace sn;
using namespace sn::train;
namespace fs = std::filesystem;

namespace {

JobConfig tiny_job(int64_t micro_batches) {
  JobConfig job;
  job.model.layers = 2;
  job.model.d_model = 16;
  job.model.heads = 2;
  job.model.d_ff = 32;
  job.model.vocab = 32;
  job.model.seq_len = 8;
  job.train.global_batch = 2 * micro_batches;
  job.train.warmup_steps = 2;
  job.train.weight_decay = 0.1;
  job.parallel.micro_batches = micro_batches;
  return job;
}

// One member (one stage, one replica) of a job, in this process: with no
// peers it sends and receives nothing, and the transport stays local.
struct Member {
  NodeKey key = NodeKey::generate();
  net::DeliveryService delivery;
  fs::path dir;
  solvernet::v1::SetupJobRequest setup;
  std::unique_ptr<StageWorker> worker;

  Member(const JobConfig& job, const std::string& name) {
    dir = fs::temp_directory_path() / ("sn-trace-test-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    setup.set_job_id("trace");
    setup.set_job_toml(job_to_toml(job));
    setup.set_first_layer(0);
    setup.set_layer_count(static_cast<int32_t>(job.model.layers));
    auto* m = setup.add_members();
    m->set_node_id(key.node_id());
    m->set_public_key(key.public_key().data(), 32);
    m->set_address("127.0.0.1:1");
    auto created = StageWorker::create(setup, key, dir, std::chrono::milliseconds(2000), delivery);
    EXPECT_TRUE(created.ok()) << created.message();
    if (created.ok()) worker = std::move(created).value();
  }
  ~Member() {
    worker.reset();
    fs::remove_all(dir);
  }
};

solvernet::v1::RunStepRequest step_request(const JobConfig& job, int64_t step) {
  solvernet::v1::RunStepRequest request;
  request.set_job_id("trace");
  request.set_step(step);
  auto generator = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(step));
  const int64_t b = job.sequences_per_micro_batch(), seq = job.model.seq_len;
  for (int64_t m = 0; m < job.parallel.micro_batches; ++m) {
    auto* mb = request.add_micro_batches();
    auto tokens = torch::randint(0, job.model.vocab, {b, seq + 1}, generator, torch::kInt64);
    model::tensor_to_proto(tokens.slice(1, 0, seq).contiguous(), mb->mutable_tokens());
    model::tensor_to_proto(tokens.slice(1, 1, seq + 1).contiguous(), mb->mutable_targets());
    for (int64_t i = 0; i < b; ++i) mb->add_sample_ids(m * b + i);
  }
  return request;
}

void put_string(Hasher& h, std::string_view s) {
  h.update_u64(s.size());
  h.update(s);
}

// The step's digests (docs/verification.md) for a member that exchanges no
// messages: inbound over the request alone, outbound over nothing.
struct Seal {
  Hash256 inbound, outbound, leaf;
};
Seal seal_of(const solvernet::v1::RunStepRequest& request, int64_t t, const Hash256& state) {
  std::string bytes;
  request.SerializeToString(&bytes);
  Hasher r;
  put_string(r, "solvernet/step-request/v1");
  r.update(bytes);
  Hash256 request_digest = r.finish();
  Hasher in;
  put_string(in, "solvernet/inbound/v1");
  in.update(request_digest).update_u64(0);
  Hasher out;
  put_string(out, "solvernet/outbound/v1");
  out.update_u64(0);
  Seal seal{in.finish(), out.finish(), {}};
  Hasher leaf;
  put_string(leaf, "solvernet/leaf/v2");
  leaf.update_u64(static_cast<uint64_t>(t)).update(state).update(seal.inbound).update(seal.outbound);
  seal.leaf = leaf.finish();
  return seal;
}

Hash256 hash_of(const std::string& bytes) {
  Hash256 h{};
  std::copy(bytes.begin(), bytes.end(), h.begin());
  return h;
}

struct Traced {
  Trace trace;
  Hash256 state;
  Seal seal;
};

// Runs step STEP of MEMBER under a tracer (leaf_prev is made up: the chain
// only needs it to be the same across runs).
Traced traced_step(Member& member, const JobConfig& job, int64_t step) {
  auto context = op_context_of(member.setup, step + 1);
  EXPECT_TRUE(context.ok()) << context.message();
  Hash256 leaf_prev = hash_string("leaf before");
  StepTracer tracer(*context, leaf_prev);
  member.worker->set_tracer(&tracer);
  const auto request = step_request(job, step);
  auto reply = member.worker->run_step(request);
  member.worker->set_tracer(nullptr);
  EXPECT_TRUE(reply.ok()) << reply.message();
  Traced out;
  out.state = hash_of(reply->state_hash());
  out.seal = seal_of(request, step + 1, out.state);
  auto trace = tracer.finish(out.seal.inbound, out.seal.outbound, out.seal.leaf);
  EXPECT_TRUE(trace.ok()) << trace.message();
  out.trace = std::move(trace).value();
  return out;
}

Hash256 run_untraced(Member& member, const JobConfig& job, int64_t step) {
  auto reply = member.worker->run_step(step_request(job, step));
  EXPECT_TRUE(reply.ok()) << reply.message();
  return hash_of(reply->state_hash());
}

// Every member of a STAGES × REPLICAS job in this process, each with its own
// key, gRPC server and worker: the real transport between them.
struct Swarm {
  JobConfig job;
  fs::path dir;
  std::vector<std::unique_ptr<NodeKey>> keys;
  std::vector<std::unique_ptr<net::DeliveryService>> services;
  std::vector<net::RunningServer> servers;
  std::vector<solvernet::v1::SetupJobRequest> setups;
  std::vector<std::unique_ptr<StageWorker>> workers;

  Swarm(const JobConfig& j, const std::string& name) : job(j) {
    dir = fs::temp_directory_path() / ("sn-trace-swarm-" + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    const int stages = static_cast<int>(job.parallel.stages), replicas = static_cast<int>(job.parallel.replicas);
    const int per_stage = static_cast<int>(job.model.layers) / stages;
    solvernet::v1::SetupJobRequest base;
    base.set_job_id("trace");
    base.set_job_toml(job_to_toml(job));
    base.set_dataset_samples(64);
    for (int i = 0; i < stages * replicas; ++i) {
      keys.push_back(std::make_unique<NodeKey>(NodeKey::generate()));
      services.push_back(std::make_unique<net::DeliveryService>());
      auto server = net::start_server("127.0.0.1:0", services.back().get(), *keys.back());
      EXPECT_TRUE(server.ok()) << server.message();
      auto* m = base.add_members();
      m->set_node_id(keys.back()->node_id());
      m->set_public_key(keys.back()->public_key().data(), 32);
      m->set_address("127.0.0.1:" + std::to_string(server->port));
      m->set_stage(i / replicas);
      m->set_replica(i % replicas);
      servers.push_back(std::move(server).value());
    }
    for (int i = 0; i < stages * replicas; ++i) {
      auto setup = base;
      setup.set_stage(i / replicas);
      setup.set_replica(i % replicas);
      setup.set_first_layer(i / replicas * per_stage);
      setup.set_layer_count(per_stage);
      auto created = StageWorker::create(setup, *keys[static_cast<size_t>(i)], dir / std::to_string(i),
                                         std::chrono::milliseconds(10000), *services[static_cast<size_t>(i)]);
      EXPECT_TRUE(created.ok()) << created.message();
      setups.push_back(setup);
      workers.push_back(std::move(created).value());
    }
  }
  ~Swarm() {
    for (auto& w : workers) w->abort("test over");
    workers.clear();
    for (auto& s : servers) s.server->Shutdown(std::chrono::system_clock::now());
    fs::remove_all(dir);
  }

  // Step STEP on every member at once; with TRACERS (one per member) attached.
  std::vector<Hash256> run(int64_t step, std::vector<std::unique_ptr<StepTracer>>* tracers = nullptr) {
    std::vector<Hash256> states(workers.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < workers.size(); ++i)
      threads.emplace_back([&, i] {
        auto request = step_request(job, step * 10 + setups[i].replica());
        request.set_step(step);
        if (tracers) workers[i]->set_tracer((*tracers)[i].get());
        auto reply = workers[i]->run_step(request);
        workers[i]->set_tracer(nullptr);
        EXPECT_TRUE(reply.ok()) << "member " << i << ": " << reply.message();
        if (reply.ok()) states[i] = hash_of(reply->state_hash());
      });
    for (auto& t : threads) t.join();
    return states;
  }
};

}  // namespace

class TraceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { init_single_threaded(); }
};

TEST_F(TraceTest, TracedStepEndsInTheUntracedStateAndLeafAndIsDeterministic) {
  const JobConfig job = tiny_job(2);
  Member plain(job, "plain"), traced(job, "traced"), again(job, "again");
  // Step 1 (t = 1) traced from fresh gradients, then step 2 from used ones.
  for (int64_t step = 0; step < 2; ++step) {
    const Hash256 expected = run_untraced(plain, job, step);
    Traced a = traced_step(traced, job, step);
    Traced b = traced_step(again, job, step);
    EXPECT_EQ(a.state, expected) << "step " << step;
    // The trace's own seal: hash_state's output is the reply's state, commit's the leaf.
    const OpRecord& commit = a.trace.records.back();
    ASSERT_EQ(commit.kind, "commit");
    EXPECT_EQ(commit.outputs.at(0).hash, a.seal.leaf);
    EXPECT_EQ(commit.inputs.at(0).hash, expected);
    // Deterministic: the same step traced twice gives the same ops and chain.
    ASSERT_EQ(a.trace.records.size(), b.trace.records.size());
    EXPECT_EQ(a.trace.root(), b.trace.root()) << "step " << step;
    EXPECT_EQ(a.trace.chain, b.trace.chain);
  }
  EXPECT_EQ(plain.worker->weights_safetensors(), traced.worker->weights_safetensors());
}

TEST_F(TraceTest, EveryOpHasItsInputsFromThePrefixAndTheChainHolds) {
  const JobConfig job = tiny_job(2);
  Member member(job, "prefix");
  run_untraced(member, job, 0);
  Traced t = traced_step(member, job, 1);
  const Trace& trace = t.trace;
  ASSERT_GT(trace.records.size(), 10u);
  EXPECT_EQ(trace.records.front().kind, "start");
  for (size_t j = 0; j < trace.records.size(); ++j) {
    auto status = check_inputs_from_prefix(trace, j);
    EXPECT_TRUE(status.ok()) << status.message();
  }
  EXPECT_TRUE(check_chain(trace).ok());
  // The contract's own rebuild of r_0 and of the commit record (chain/chain.h)
  // agrees with the trace's: it can close the chain from the posted digests.
  const OpRecord& commit = trace.records.back();
  EXPECT_EQ(chain::ops_start(trace.leaf_prev), trace.chain.front());
  EXPECT_EQ(chain::commit_record_hash(commit.inputs[0].hash, commit.inputs[1].hash, commit.inputs[2].hash,
                                     commit.outputs[0].hash),
            record_hash(commit));
  EXPECT_EQ(chain::ops_link(trace.chain[trace.chain.size() - 2], record_hash(commit)), trace.root());
  // m for this job: start, per micro-batch batch + embed + 2 blocks + head
  // forward and head + 2 blocks + embed backward, an adam per tensor, hash_state, commit.
  const size_t tensors = 2 + 12 * 2 + 2;
  EXPECT_EQ(trace.records.size(), 1 + 2 * (5 + 4) + tensors + 2);

  // An altered record breaks the chain at it; a stale input fails the prefix check.
  Trace tampered = trace;
  tampered.records[5].outputs[0].hash[0] ^= 1;
  EXPECT_FALSE(check_chain(tampered).ok());
  Trace stale = trace;
  size_t adam = 0;
  while (stale.records[adam].kind != "adam") ++adam;
  stale.records[adam].inputs[1].hash = stale.records[0].outputs.back().hash;
  auto status = check_inputs_from_prefix(stale, adam);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("not the latest"), std::string::npos) << status.message();
}

TEST_F(TraceTest, EveryComputeOpRecomputesToItsRecordedOutputs) {
  const JobConfig job = tiny_job(2);
  Member member(job, "recompute");
  run_untraced(member, job, 0);
  Traced t = traced_step(member, job, 1);
  auto context = op_context_of(member.setup, 2);
  ASSERT_TRUE(context.ok());
  std::map<std::string, int> checked;
  for (size_t j = 0; j < t.trace.records.size(); ++j) {
    const OpRecord& r = t.trace.records[j];
    auto inputs = op_inputs(t.trace, j);
    ASSERT_TRUE(inputs.ok()) << inputs.message();
    ASSERT_TRUE(check_inputs(r, *inputs).ok()) << r.kind;
    auto outputs = recompute_op(*context, r, *inputs);
    if (!recomputable(r.kind)) {
      ASSERT_FALSE(outputs.ok()) << r.kind;
      EXPECT_EQ(outputs.error().kind, ErrorKind::unavailable) << r.kind;
      EXPECT_NE(outputs.message().find("needs a step replay"), std::string::npos);
      continue;
    }
    ASSERT_TRUE(outputs.ok()) << r.kind << ": " << outputs.message();
    EXPECT_EQ(*outputs, r.outputs) << "op " << j + 1 << " " << r.kind << " layer " << r.layer << " micro " << r.micro;
    ++checked[r.kind];
  }
  for (const char* kind : {"embed.fwd", "block.fwd", "head.fwd", "head.bwd", "block.bwd", "embed.bwd", "adam", "commit"})
    EXPECT_GT(checked[kind], 0) << kind;
  EXPECT_EQ(checked["block.bwd"], 4);
  EXPECT_EQ(checked["adam"], 28);
}

TEST_F(TraceTest, APerturbedInputChangesTheRecomputedOutputs) {
  const JobConfig job = tiny_job(1);
  Member member(job, "perturb");
  Traced t = traced_step(member, job, 0);
  auto context = op_context_of(member.setup, 1);
  ASSERT_TRUE(context.ok());
  std::set<std::string> done;
  for (size_t j = 0; j < t.trace.records.size(); ++j) {
    const OpRecord& r = t.trace.records[j];
    if (!recomputable(r.kind) || done.count(r.kind)) continue;
    done.insert(r.kind);
    for (const OpValue& in : r.inputs) {
      auto inputs = op_inputs(t.trace, j);
      ASSERT_TRUE(inputs.ok());
      torch::Tensor changed = (*inputs)[in.name].clone();
      if (changed.scalar_type() == torch::kFloat32)
        changed.view({-1})[0] += 0.5f;
      else if (changed.scalar_type() == torch::kInt64 && in.name.starts_with("tokens"))
        changed.view({-1})[0] = (changed.view({-1})[0] + 1) % job.model.vocab;
      else if (changed.scalar_type() == torch::kUInt8)
        changed.data_ptr<uint8_t>()[0] ^= 1;
      else
        continue;
      (*inputs)[in.name] = changed;
      EXPECT_FALSE(check_inputs(r, *inputs).ok()) << r.kind << " " << in.name;
      auto outputs = recompute_op(*context, r, *inputs);
      ASSERT_TRUE(outputs.ok()) << r.kind << " " << in.name << ": " << outputs.message();
      // The one input a backward does not read: the block's last bias only
      // shifts its output, so no gradient depends on it.
      if (r.kind == "block.bwd" && in.name.starts_with("blocks.") && in.name.ends_with("mlp.proj.bias"))
        EXPECT_EQ(*outputs, r.outputs) << in.name;
      else
        EXPECT_NE(*outputs, r.outputs) << r.kind << " with " << in.name << " perturbed";
    }
  }
  EXPECT_EQ(done.size(), 8u);
}

TEST_F(TraceTest, RecomputeRefusesMissingOrMisshapenInputs) {
  const JobConfig job = tiny_job(1);
  Member member(job, "refuse");
  Traced t = traced_step(member, job, 0);
  auto context = op_context_of(member.setup, 1);
  ASSERT_TRUE(context.ok());
  size_t j = 0;
  while (t.trace.records[j].kind != "block.bwd") ++j;
  auto inputs = op_inputs(t.trace, j);
  ASSERT_TRUE(inputs.ok());
  auto missing = *inputs;
  missing.erase(t.trace.records[j].inputs[0].name);
  auto r1 = recompute_op(*context, t.trace.records[j], missing);
  ASSERT_FALSE(r1.ok());
  EXPECT_NE(r1.message().find("missing"), std::string::npos) << r1.message();
  EXPECT_EQ(r1.error().kind, ErrorKind::bad_peer);
  OpRecord renamed = t.trace.records[j];
  renamed.outputs[0].name = "hidden.0.7";
  auto r3 = recompute_op(*context, renamed, *inputs);
  ASSERT_FALSE(r3.ok());
  EXPECT_EQ(r3.error().kind, ErrorKind::bad_peer) << r3.message();
  auto misshapen = *inputs;
  misshapen[t.trace.records[j].inputs[2].name] = torch::zeros({3, 5});
  auto r2 = recompute_op(*context, t.trace.records[j], misshapen);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().kind, ErrorKind::bad_peer) << r2.message();
}

// What a referee pays: one block.bwd against the step it is part of.
TEST_F(TraceTest, CostOfOneBlockBackwardAgainstOneStep) {
  JobConfig job = tiny_job(2);
  job.model.layers = 4;
  job.model.d_model = 64;
  job.model.heads = 4;
  job.model.d_ff = 256;
  job.model.vocab = 256;
  job.model.seq_len = 32;
  job.train.global_batch = 8;
  Member member(job, "cost");
  using Clock = std::chrono::steady_clock;
  run_untraced(member, job, 0);
  auto t0 = Clock::now();
  run_untraced(member, job, 1);
  const double step_s = std::chrono::duration<double>(Clock::now() - t0).count();
  t0 = Clock::now();
  Traced t = traced_step(member, job, 2);
  const double traced_s = std::chrono::duration<double>(Clock::now() - t0).count();
  auto context = op_context_of(member.setup, 3);
  ASSERT_TRUE(context.ok());
  size_t j = 0;
  while (t.trace.records[j].kind != "block.bwd") ++j;
  auto inputs = op_inputs(t.trace, j);
  ASSERT_TRUE(inputs.ok());
  double best = 1e9;
  for (int i = 0; i < 5; ++i) {
    t0 = Clock::now();
    auto outputs = recompute_op(*context, t.trace.records[j], *inputs);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    ASSERT_TRUE(outputs.ok());
    EXPECT_EQ(*outputs, t.trace.records[j].outputs);
  }
  std::printf("trace cost: step %.2f ms, traced step %.2f ms (%zu ops), one block.bwd recompute %.3f ms = %.2f%% of a step\n",
              step_s * 1e3, traced_s * 1e3, t.trace.records.size(), best * 1e3, 100.0 * best / step_s);
}

// A pipeline of two stages, each with two replicas: the ops that cross members
// (recv, send, reduce, tied) are traced too, and every member's compute ops
// (a first stage that is not the last, a last that is not the first) recompute.
TEST_F(TraceTest, EveryMemberOfATwoByTwoJobTracesAndRecomputes) {
  JobConfig job = tiny_job(2);
  job.parallel.stages = 2;
  job.parallel.replicas = 2;
  job.train.global_batch = 8;
  Swarm plain(job, "plain"), traced(job, "traced");
  plain.run(0);
  traced.run(0);
  const std::vector<Hash256> expected = plain.run(1);
  std::vector<std::unique_ptr<StepTracer>> tracers;
  std::vector<OpContext> contexts;
  for (const auto& setup : traced.setups) {
    auto context = op_context_of(setup, 2);
    ASSERT_TRUE(context.ok()) << context.message();
    contexts.push_back(*context);
    tracers.push_back(std::make_unique<StepTracer>(*context, hash_string("leaf before")));
  }
  const std::vector<Hash256> states = traced.run(1, &tracers);
  EXPECT_EQ(states, expected);
  for (size_t i = 0; i < tracers.size(); ++i) {
    auto trace = tracers[i]->finish(hash_string("inbound"), hash_string("outbound"), hash_string("leaf"));
    ASSERT_TRUE(trace.ok()) << trace.message();
    std::map<std::string, int> kinds;
    for (size_t j = 0; j < trace->records.size(); ++j) {
      const OpRecord& r = trace->records[j];
      ++kinds[r.kind];
      auto status = check_inputs_from_prefix(*trace, j);
      EXPECT_TRUE(status.ok()) << "member " << i << ": " << status.message();
      if (!recomputable(r.kind) || r.kind == "commit") continue;
      auto inputs = op_inputs(*trace, j);
      ASSERT_TRUE(inputs.ok()) << inputs.message();
      auto outputs = recompute_op(contexts[i], r, *inputs);
      ASSERT_TRUE(outputs.ok()) << r.kind << ": " << outputs.message();
      EXPECT_EQ(*outputs, r.outputs) << "member " << i << " op " << j + 1 << " " << r.kind << " layer " << r.layer;
    }
    const bool first = traced.setups[i].stage() == 0;
    EXPECT_EQ(kinds["recv"], 2) << i;
    EXPECT_EQ(kinds["send"], 2) << i;
    EXPECT_EQ(kinds["reduce"], 1) << i;
    EXPECT_EQ(kinds["tied"], 1) << i;
    EXPECT_EQ(kinds["block.bwd"], 2) << i;
    EXPECT_EQ(kinds[first ? "embed.bwd" : "head.bwd"], 2) << i;
    EXPECT_EQ(kinds[first ? "head.bwd" : "embed.bwd"], 0) << i;
  }
}

// The wrong-op cheat as the model carries it out (StageModel::set_block_offset):
// the observer, and so the cheater's own trace, sees the altered output of
// that block, and that block's forward alone fails its recompute.
TEST_F(TraceTest, AnAlteredBlockOutputFailsItsRecomputeAndOnlyIt) {
  const JobConfig job = tiny_job(1);
  struct Seen : model::ForwardObserver {
    std::map<int, std::pair<torch::Tensor, torch::Tensor>> blocks;
    void on_forward(Part part, int layer, const torch::Tensor& in, const torch::Tensor& out) override {
      if (part == Part::block) blocks[layer] = {in.detach().clone(), out.detach().clone()};
    }
  } seen;
  model::StageModel gpt(job.model, 0, static_cast<int>(job.model.layers), 7);
  gpt.set_observer(&seen);
  gpt.set_block_offset(1, 1e-3);
  auto tokens = torch::randint(0, job.model.vocab, {2, job.model.seq_len}, torch::kInt64);
  gpt.forward(tokens);
  OpContext context;
  context.job = job;
  context.layer_count = static_cast<int>(job.model.layers);
  for (int layer : {0, 1}) {
    OpRecord r{"block.fwd", static_cast<uint32_t>(layer), 0, {}, {}};
    std::map<std::string, torch::Tensor> inputs;
    for (const auto& [name, p] : gpt.named_parameters())
      if (name.starts_with("blocks." + std::to_string(layer) + ".")) {
        inputs[name] = p;
        r.inputs.push_back({name, tensor_hash(p)});
      }
    const std::string in = "hidden.0." + std::to_string(layer), out = "hidden.0." + std::to_string(layer + 1);
    inputs[in] = seen.blocks[layer].first;
    r.inputs.push_back({in, tensor_hash(inputs[in])});
    r.outputs.push_back({out, tensor_hash(seen.blocks[layer].second)});
    auto outputs = recompute_op(context, r, inputs);
    ASSERT_TRUE(outputs.ok()) << outputs.message();
    if (layer == 1)
      EXPECT_NE(*outputs, r.outputs);
    else
      EXPECT_EQ(*outputs, r.outputs);
  }
}

// An evaluation round run with a tracer attached records nothing, and a
// tracer that saw no training step refuses to make a trace of it.
TEST_F(TraceTest, AnEvaluationRoundIsNotTraced) {
  const JobConfig job = tiny_job(1);
  Member member(job, "eval");
  auto context = op_context_of(member.setup, 1);
  ASSERT_TRUE(context.ok());
  StepTracer tracer(*context, hash_string("leaf before"));
  member.worker->set_tracer(&tracer);
  auto request = step_request(job, 0);
  request.set_forward_only(true);
  auto reply = member.worker->run_step(request);
  member.worker->set_tracer(nullptr);
  ASSERT_TRUE(reply.ok()) << reply.message();
  auto trace = tracer.finish(hash_string("in"), hash_string("out"), hash_string("leaf"));
  ASSERT_FALSE(trace.ok());
  EXPECT_NE(trace.message().find("did not run"), std::string::npos) << trace.message();
}
