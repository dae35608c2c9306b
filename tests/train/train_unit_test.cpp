// In-process tests of the training pieces: schedules, the node service's
// input checks, gradient flattening, the all-reduces over a real transport.
#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"
#include "net/local_mesh.h"
#include "net/failure_cause.h"
#include "net/rpc.h"
#include "train/allreduce.h"
#include "train/stage_worker.h"
#include "train/control.h"
#include "train/fleet.h"
#include "train/train.h"

using namespace sn;
using namespace sn::train;

TEST(Schedule, EveryMicroBatchForwardBeforeBackwardAndOneFOneBBounded) {
  for (int stages : {1, 2, 4})
    for (int stage = 0; stage < stages; ++stage)
      for (int micro : {1, 3, 8}) {
        auto ops = pipeline_schedule("1f1b", stage, stages, micro);
        ASSERT_EQ(ops.size(), static_cast<size_t>(2 * micro));
        std::vector<int> forward_at(micro, -1), backward_at(micro, -1);
        int in_flight = 0, max_in_flight = 0;
        for (size_t i = 0; i < ops.size(); ++i) {
          (ops[i].forward ? forward_at : backward_at)[ops[i].micro] = static_cast<int>(i);
          in_flight += ops[i].forward ? 1 : -1;
          max_in_flight = std::max(max_in_flight, in_flight);
        }
        for (int m = 0; m < micro; ++m) {
          EXPECT_GE(forward_at[m], 0);
          EXPECT_GT(backward_at[m], forward_at[m]);
        }
        EXPECT_LE(max_in_flight, std::min(micro, stages - stage));
        auto gpipe = pipeline_schedule("gpipe", stage, stages, micro);
        EXPECT_TRUE(gpipe.front().forward);
        EXPECT_FALSE(gpipe.back().forward);
      }
}

namespace {

// Runs BODY(member index) on every member of a fresh 3-member mesh at once.
template <typename Body>
void on_every_member(size_t members, Body body) {
  auto mesh = net::LocalMesh::create(std::vector<std::string>(members, "lan"), nullptr);
  ASSERT_TRUE(mesh.ok()) << mesh.message();
  std::vector<std::thread> threads;
  for (size_t i = 0; i < members; ++i) threads.emplace_back([&, i] { body((*mesh)->member(i), i); });
  for (auto& t : threads) t.join();
}

// Its own generator: the members run on threads at once, and the global one is shared.
torch::Tensor replica_gradient(size_t replica, int64_t step, int64_t numel) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(1000 * step + static_cast<int64_t>(replica)));
  return torch::randn({numel}, generator) * (1.0 + static_cast<double>(replica));
}

}  // namespace

TEST(AllReduce, RingSumsExactlyTheSameOnEveryReplica) {
  const size_t n = 3;
  const int64_t numel = 10007;  // not a multiple of the ring or the chunk
  std::vector<torch::Tensor> results(n);
  RingOptions options;
  options.chunk_bytes = 4096;
  on_every_member(n, [&](net::JobTransport& transport, size_t i) {
    torch::Tensor buffer = replica_gradient(i, 0, numel);
    auto status = ring_allreduce(transport, {0, 1, 2}, buffer, 0, options);
    EXPECT_TRUE(status.ok()) << status.message();
    results[i] = buffer;
  });
  torch::Tensor expected = replica_gradient(0, 0, numel) + replica_gradient(1, 0, numel) + replica_gradient(2, 0, numel);
  EXPECT_TRUE(torch::allclose(results[0], expected, 1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(results[0], results[1]));
  EXPECT_TRUE(torch::equal(results[0], results[2]));
}

TEST(AllReduce, CompressedSumIsBitwiseEqualAcrossReplicasAndConservesMass) {
  const size_t n = 3;
  const int64_t numel = 5000, steps = 6;
  CompressionConfig config;
  config.gradients = "cocktail";
  config.random_fraction = 0.5;
  config.topk_fraction = 0.2;
  std::vector<torch::Tensor> delivered(n), residuals(n);
  for (auto& d : delivered) d = torch::zeros({numel});
  on_every_member(n, [&](net::JobTransport& transport, size_t i) {
    auto compressor = compress::make_gradient_compressor(config, numel, i);
    ASSERT_TRUE(compressor.ok()) << compressor.message();
    for (int64_t step = 0; step < steps; ++step) {
      torch::Tensor buffer = replica_gradient(i, step, numel);
      auto status = CompressedAllreduce(transport, {0, 1, 2}, **compressor, {}).run(buffer, step, 77 + step);
      ASSERT_TRUE(status.ok()) << status.message();
      delivered[i] += buffer;
    }
    residuals[i] = (*compressor)->residual();
  });
  EXPECT_TRUE(torch::equal(delivered[0], delivered[1]));
  EXPECT_TRUE(torch::equal(delivered[0], delivered[2]));
  // Error feedback: what was summed plus what every replica still holds back is
  // the true sum of all gradients; nothing is lost, only delayed.
  torch::Tensor truth = torch::zeros({numel});
  for (int64_t step = 0; step < steps; ++step)
    for (size_t i = 0; i < n; ++i) truth += replica_gradient(i, step, numel);
  torch::Tensor accounted = delivered[0] + residuals[0] + residuals[1] + residuals[2];
  EXPECT_LT((accounted - truth).abs().max().item<double>(), 1e-3);
  // And it is a compressor: most of the mass is still held back after few steps.
  EXPECT_GT((truth - delivered[0]).abs().sum().item<double>(), 0.1 * truth.abs().sum().item<double>());
}

TEST(AllReduce, CompressedTiedExchangeGivesBothSidesTheSameSum) {
  CompressionConfig config;
  config.gradients = "fp16";
  std::vector<torch::Tensor> sums(2);
  on_every_member(2, [&](net::JobTransport& transport, size_t i) {
    auto compressor = compress::make_gradient_compressor(config, 300, i);
    ASSERT_TRUE(compressor.ok());
    torch::Tensor grad = replica_gradient(i, 0, 300).view({30, 10});
    auto status = TiedEmbeddingSync(transport, 1 - static_cast<int>(i), compressor->get(), std::chrono::seconds(20))
                      .run(grad, 0, 5);
    ASSERT_TRUE(status.ok()) << status.message();
    sums[i] = grad;
  });
  EXPECT_TRUE(torch::equal(sums[0], sums[1]));
  EXPECT_EQ(sums[0].sizes(), (std::vector<int64_t>{30, 10}));
  torch::Tensor expected = (replica_gradient(0, 0, 300) + replica_gradient(1, 0, 300)).view({30, 10});
  EXPECT_TRUE(torch::allclose(sums[0], expected, 1e-2, 1e-2));
}

TEST(AllReduce, JobSizedInboxesHoldEveryStepOfLegitimateTraffic) {
  JobConfig job;
  job.parallel.replicas = 4;
  job.parallel.allreduce_chunk_bytes = 4096;
  const int64_t numel = 10007;
  for (bool compressed : {false, true}) {
    net::InboxLimits limits = job_inbox_limits(job, numel, compressed);
    auto mesh = net::LocalMesh::create(std::vector<std::string>(4, "lan"), nullptr, {}, limits);
    ASSERT_TRUE(mesh.ok()) << mesh.message();
    std::vector<std::thread> threads;
    for (size_t i = 0; i < 4; ++i)
      threads.emplace_back([&, i] {
        net::JobTransport& transport = (*mesh)->member(i);
        CompressionConfig config;
        config.gradients = "cocktail";
        auto compressor = compress::make_gradient_compressor(config, numel, i);
        ASSERT_TRUE(compressor.ok());
        RingOptions options;
        options.chunk_bytes = job.parallel.allreduce_chunk_bytes;
        for (int64_t step = 0; step < 3; ++step) {
          torch::Tensor buffer = replica_gradient(i, step, numel);
          auto status = compressed ? CompressedAllreduce(transport, {0, 1, 2, 3}, **compressor, options).run(buffer, step, 9)
                                   : ring_allreduce(transport, {0, 1, 2, 3}, buffer, step, options);
          ASSERT_TRUE(status.ok()) << status.message();
          ASSERT_TRUE(transport.flush(std::chrono::seconds(20)).ok());
          transport.finish_step(step);
        }
        EXPECT_EQ(transport.inbox_use().refused, 0);
      });
    for (auto& t : threads) t.join();
  }
}

TEST(Gradients, FlattenAndUnflattenRoundTrip) {
  auto a = torch::randn({3, 4}, torch::requires_grad());
  auto b = torch::randn({5}, torch::requires_grad());
  NamedTensors params = {{"a", a}, {"b", b}};
  (a.sum() * 2 + b.pow(2).sum()).backward();
  auto flat = flatten_gradients(params);
  ASSERT_EQ(flat.numel(), 17);
  auto expected_a = a.grad().clone(), expected_b = b.grad().clone();
  a.mutable_grad().zero_();
  b.mutable_grad().zero_();
  unflatten_gradients(flat, params);
  EXPECT_TRUE(torch::equal(a.grad(), expected_a));
  EXPECT_TRUE(torch::equal(b.grad(), expected_b));
  EXPECT_NE(parameters_hash(params), parameters_hash({{"a", a}}));
}

namespace {

// One node (P = D = 1) with a real gRPC server, driven by hand.
struct SingleNode {
  NodeKey key = NodeKey::generate();
  NodeKey client = NodeKey::generate();
  net::ControlSigner signer{client};
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("sn-train-unit-" + std::to_string(::getpid()));
  net::DeliveryService delivery;
  std::unique_ptr<net::NodeRuntime> runtime;
  std::unique_ptr<grpc::Service> service;
  std::unique_ptr<solvernet::v1::Train::Stub> stub;
  JobConfig job;

  explicit SingleNode(int64_t memory_limit_bytes = 0) {
    init_single_threaded();
    net::NodeRuntimeOptions runtime_options;
    runtime_options.key = &key;
    runtime_options.memory_limit_bytes = memory_limit_bytes;
    runtime_options.data_dir = dir;
    runtime = std::make_unique<net::NodeRuntime>(runtime_options);
    NodeServiceOptions options;
    options.runtime = runtime.get();
    options.data_dir = dir;
    options.peer_timeout = std::chrono::milliseconds(2000);
    options.delivery = &delivery;
    service = make_train_service(options);
    runtime->add_service(service.get());
    runtime->add_service(&delivery);
    EXPECT_TRUE(runtime->start("127.0.0.1:0").ok());
    stub = solvernet::v1::Train::NewStub(net::make_channel("127.0.0.1:" + std::to_string(runtime->port()), key.node_id()));
    job.model.layers = 2;
    job.model.d_model = 16;
    job.model.heads = 2;
    job.model.d_ff = 32;
    job.model.vocab = 32;
    job.model.seq_len = 8;
    job.train.global_batch = 2;
    job.parallel.micro_batches = 1;
  }
  ~SingleNode() {
    runtime->shutdown(std::chrono::system_clock::now());
    std::filesystem::remove_all(dir);
  }

  grpc::Status setup(const std::string& job_id, const NodeKey& member_key, int64_t start_step = 0) {
    solvernet::v1::SetupJobRequest request;
    request.set_job_id(job_id);
    request.set_start_step(start_step);
    request.set_job_toml(job_to_toml(job));
    request.set_first_layer(0);
    request.set_layer_count(2);
    auto* m = request.add_members();
    m->set_node_id(member_key.node_id());
    m->set_public_key(member_key.public_key().data(), 32);
    m->set_address("127.0.0.1:" + std::to_string(runtime->port()));
    sign_request(signer, "SetupJob", request);
    solvernet::v1::SetupJobReply reply;
    grpc::ClientContext context;
    return stub->SetupJob(&context, request, &reply);
  }

  grpc::Status step(int64_t step, const torch::Tensor& tokens, const torch::Tensor& targets,
                    solvernet::v1::RunStepReply* reply) {
    solvernet::v1::RunStepRequest request;
    request.set_job_id("j1");
    request.set_step(step);
    auto* mb = request.add_micro_batches();
    model::tensor_to_proto(tokens, mb->mutable_tokens());
    model::tensor_to_proto(targets, mb->mutable_targets());
    sign_request(signer, "RunStep", request);
    grpc::ClientContext context;
    return stub->RunStep(&context, request, reply);
  }
};

}  // namespace

TEST(NodeService, RejectsAJobThatAssignsTheRoleToAnotherNode) {
  SingleNode node;
  NodeKey other = NodeKey::generate();
  auto status = node.setup("j1", other);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.error_message().find("not to this node"), std::string::npos) << status.error_message();
}

TEST(NodeService, TrainsAndRejectsBadTensors) {
  SingleNode node;
  ASSERT_TRUE(node.setup("j1", node.key).ok());
  auto tokens = torch::randint(0, 32, {2, 8}, torch::kInt64);
  auto targets = torch::randint(0, 32, {2, 8}, torch::kInt64);
  solvernet::v1::RunStepReply reply;
  auto ok = node.step(0, tokens, targets, &reply);
  ASSERT_TRUE(ok.ok()) << ok.error_message();
  EXPECT_EQ(reply.loss_count(), 1);
  EXPECT_GT(reply.loss_sum(), 0.0);
  EXPECT_EQ(reply.state_hash().size(), 32u);

  auto wrong_shape = node.step(1, torch::randint(0, 32, {2, 9}, torch::kInt64), targets, &reply);
  ASSERT_FALSE(wrong_shape.ok());
  EXPECT_NE(wrong_shape.error_message().find("shape"), std::string::npos) << wrong_shape.error_message();

  ASSERT_TRUE(node.setup("j1", node.key).ok());  // set up afresh after the failure
  auto wrong_dtype = node.step(0, tokens.to(torch::kFloat32), targets, &reply);
  ASSERT_FALSE(wrong_dtype.ok());
  EXPECT_NE(wrong_dtype.error_message().find("dtype"), std::string::npos) << wrong_dtype.error_message();

  ASSERT_TRUE(node.setup("j1", node.key).ok());
  auto bad_ids = node.step(0, torch::full({2, 8}, 99, torch::kInt64), targets, &reply);
  ASSERT_FALSE(bad_ids.ok());
  EXPECT_NE(bad_ids.error_message().find("outside the vocabulary"), std::string::npos);

  ASSERT_TRUE(node.setup("j1", node.key).ok());
  auto out_of_order = node.step(5, tokens, targets, &reply);
  ASSERT_FALSE(out_of_order.ok());
  EXPECT_NE(out_of_order.error_message().find("step 5"), std::string::npos);
}

TEST(NodeService, HoldsTwoJobsThatFitAndRefusesOneThatDoesNot) {
  SingleNode node;
  ASSERT_TRUE(node.setup("j1", node.key).ok());
  auto second = node.setup("j2", node.key);
  EXPECT_TRUE(second.ok()) << second.error_message();
  EXPECT_EQ(node.runtime->held().job_ids.size(), 2u);

  SingleNode small(1 << 20);  // 1 MiB: less than any job's estimate
  auto refused = small.setup("j1", small.key);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("job needs ~"), std::string::npos) << refused.error_message();
  EXPECT_NE(refused.error_message().find("this node admits 1 MiB"), std::string::npos) << refused.error_message();
  EXPECT_TRUE(small.runtime->held().job_ids.empty());
}

TEST(NodeService, StageMemoryEstimateCountsEveryPart) {
  JobConfig job;
  job.parallel.stages = 2;
  job.parallel.replicas = 2;
  job.compression.activations = "aqsgd";
  job.compression.gradients = "cocktail";
  auto plain = estimate_stage_memory(JobConfig{}, 0, 0, 4, 1000);
  auto first = estimate_stage_memory(job, 0, 0, 2, 1000);
  EXPECT_GT(first.codec_buffers, 0);
  EXPECT_GT(first.residuals, 0);
  EXPECT_EQ(first.optimizer, 2 * first.weights);
  EXPECT_EQ(first.total, first.weights + first.gradients + first.optimizer + first.activations + first.codec_buffers +
                             first.residuals + first.overhead);
  EXPECT_EQ(plain.codec_buffers, 0);
  EXPECT_GT(plain.weights, first.weights);  // the whole model against half of it
}

TEST(NodeService, MessagesForNoJobAreRefused) {
  SingleNode node;
  solvernet::v1::TensorMessage message;
  message.set_job_id("nope");
  message.set_from_node_id(node.key.node_id());  // the sender its TLS certificate proves
  solvernet::v1::Empty reply;
  grpc::ClientContext context;
  auto transport = solvernet::v1::Transport::NewStub(net::make_channel("127.0.0.1:" + std::to_string(node.runtime->port()), node.key.node_id(), &node.key));
  auto status = transport->Send(&context, message, &reply);
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST(NodeService, WritesCheckpointsEveryKStepsKeepsTheLastNAndResumesFromThem) {
  SingleNode node;
  node.job.train.checkpoint_every = 2;
  node.job.train.checkpoint_keep = 2;
  ASSERT_TRUE(node.setup("j1", node.key).ok());
  torch::manual_seed(5);
  auto tokens = torch::randint(0, 32, {2, 8}, torch::kInt64);
  auto dir = node.dir / "checkpoints" / "j1" / "stage0-replica0";
  CheckpointStore store(dir, 2);
  std::vector<std::string> hashes;  // after steps 1..6
  solvernet::v1::RunStepReply reply;
  ASSERT_TRUE(node.step(0, tokens, tokens, &reply).ok());
  hashes.push_back(reply.state_hash());
  EXPECT_TRUE(store.steps().empty());
  for (int64_t step = 1; step < 6; ++step) {
    ASSERT_TRUE(node.step(step, tokens, tokens, &reply).ok());
    hashes.push_back(reply.state_hash());
  }
  EXPECT_EQ(store.steps(), (std::vector<int64_t>{4, 6}));  // 2 was pruned: keep = 2
  auto saved = store.load(4);
  ASSERT_TRUE(saved.ok()) << saved.message();
  // The manifest commits to the same hash the step reported.
  EXPECT_EQ(std::string(saved->manifest.state.root.begin(), saved->manifest.state.root.end()), hashes[3]);
  bool has_step = false, has_weights = false;
  for (const auto& [name, t] : saved->tensors) {
    if (name == "adam.step") {
      has_step = true;
      EXPECT_EQ(t.item<int64_t>(), 4);
    }
    has_weights = has_weights || name == "wte.weight";
  }
  EXPECT_TRUE(has_step);
  EXPECT_TRUE(has_weights);

  // Resume at step 4: steps 5 and 6 reproduce the uninterrupted run bitwise.
  ASSERT_TRUE(node.setup("j1", node.key, 4).ok());
  ASSERT_TRUE(node.step(4, tokens, tokens, &reply).ok());
  EXPECT_EQ(reply.state_hash(), hashes[4]);
  ASSERT_TRUE(node.step(5, tokens, tokens, &reply).ok());
  EXPECT_EQ(reply.state_hash(), hashes[5]);

  // A step with no checkpoint, and a tampered checkpoint, are refused by name.
  auto missing = node.setup("j1", node.key, 2);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error_message().find("no checkpoint of step 2"), std::string::npos) << missing.error_message();
  // Its own copy at fault, said typed: the client restores the role from another copy.
  EXPECT_EQ(net::failure_cause_of(missing), solvernet::v1::FailureCause::LOCAL_DATA);
  std::string data = read_file(store.data_path(4)).value();
  data[data.size() - 3] ^= 0x10;
  ASSERT_TRUE(write_file_atomic(store.data_path(4), data).ok());
  auto tampered = node.setup("j1", node.key, 4);
  ASSERT_FALSE(tampered.ok());
  EXPECT_NE(tampered.error_message().find(store.data_path(4).filename().string()), std::string::npos)
      << tampered.error_message();
  EXPECT_EQ(net::failure_cause_of(tampered), solvernet::v1::FailureCause::LOCAL_DATA);
}

// A step whose checkpoint finds the node's disk full fails with the typed
// cause DISK_FULL, and the node says it takes no jobs (disk_full) until its
// data dir takes a write again, which it tries by itself.
TEST(NodeService, ACheckpointThatFindsTheDiskFullIsSaidTypedUntilTheDataDirTakesAWrite) {
  SingleNode node;
  node.job.train.checkpoint_every = 1;
  ASSERT_TRUE(node.setup("j1", node.key).ok());
  auto tokens = torch::randint(0, 32, {2, 8}, torch::kInt64);
  solvernet::v1::RunStepReply reply;
  EXPECT_FALSE(node.runtime->disk_full());
  simulate_disk_full_for_tests(node.dir, 0);
  const auto full = node.step(0, tokens, tokens, &reply);
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << full.error_message();
  EXPECT_EQ(net::failure_cause_of(full), solvernet::v1::FailureCause::DISK_FULL) << full.error_message();
  EXPECT_TRUE(node.runtime->disk_full());
  simulate_disk_full_for_tests("", 0);
  for (auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
       node.runtime->disk_full() && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(node.runtime->disk_full()) << "the data dir takes writes again, but the node still says its disk is full";
}

// The cause a recovery acts on (Fleet::last_cause) is the failed member's
// typed FailureCause, never its message: a node that only says "local data"
// or "disk full" in words is blamed like any other, and a Refusal (whose
// causes share FailureCause's numbers) is no FailureCause.
TEST(Fleet, TheCauseOfAFailureIsItsTypedDetailsNotItsMessage) {
  const NodeKey node = NodeKey::generate(), client = NodeKey::generate();
  net::MemberInfo member;
  member.node_id = node.node_id();
  member.address = "127.0.0.1:9";
  const std::vector<net::MemberInfo> members{member};
  Fleet fleet(members, "j1", client, FleetTimeouts{}, nullptr);
  const auto fail_with = [&](const grpc::Status& status) {
    return fleet.run_one(0, "step 4", std::chrono::seconds(1), [&](size_t, grpc::ClientContext&) { return status; });
  };
  using Cause = solvernet::v1::FailureCause;
  const std::string local = "no usable checkpoint of step 3 here (local data: restore the role from another copy): x";
  const std::string disk = "/data/checkpoints/x.safetensors: disk full (No space left on device)";

  auto said = fail_with(grpc::Status(grpc::StatusCode::UNAVAILABLE, local));
  EXPECT_EQ(fleet.last_culprit(), node.node_id());
  EXPECT_EQ(fleet.last_cause(), Cause::CAUSE_UNSPECIFIED) << said.message();
  auto typed = fail_with(net::to_grpc(net::with_failure_cause(kind_error(ErrorKind::unavailable, "{}", local),
                                                              Cause::LOCAL_DATA)));
  EXPECT_EQ(fleet.last_culprit(), node.node_id());
  EXPECT_EQ(fleet.last_cause(), Cause::LOCAL_DATA) << typed.message();

  said = fail_with(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, disk));
  EXPECT_EQ(fleet.last_cause(), Cause::CAUSE_UNSPECIFIED) << said.message();
  EXPECT_EQ(said.error().kind, ErrorKind::resource_exhausted) << said.message();
  EXPECT_EQ(said.message().find("ran out of disk"), std::string::npos) << said.message();
  typed = fail_with(net::to_grpc(net::with_failure_cause(kind_error(ErrorKind::resource_exhausted, "{}", disk),
                                                         Cause::DISK_FULL)));
  EXPECT_EQ(fleet.last_cause(), Cause::DISK_FULL) << typed.message();
  EXPECT_EQ(typed.error().kind, ErrorKind::unavailable) << typed.message();  // replaced like a dead member
  EXPECT_NE(typed.message().find("ran out of disk"), std::string::npos) << typed.message();

  static_assert(static_cast<int>(solvernet::v1::Refusal::CLIENT_LIVE) == static_cast<int>(Cause::DISK_FULL));
  solvernet::v1::Refusal refusal;
  refusal.set_cause(solvernet::v1::Refusal::CLIENT_LIVE);
  said = fail_with(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "still run by a live client",
                                refusal.SerializeAsString()));
  EXPECT_EQ(fleet.last_cause(), Cause::CAUSE_UNSPECIFIED) << said.message();
  EXPECT_TRUE(fail_with(grpc::Status::OK).ok());
  EXPECT_TRUE(fleet.last_culprit().empty());
}
