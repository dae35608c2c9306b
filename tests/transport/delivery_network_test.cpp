// Multi-process: a real `solvernet node` holding a job, and this process as
// the job's other member (a real stage worker behind its own server) and as
// an attacker holding that member's key, or no member's key at all.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "core/fs.h"
#include "core/job.h"
#include "core/keys.h"
#include "core/process.h"
#include "model/tensor_wire.h"
#include "net/delivery.h"
#include "net/rpc.h"
#include "train/control.h"
#include "train/train.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return std::getenv("SOLVERNET_BIN"); }

fs::path scratch(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("sn-delivery-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// VmRSS of PID in bytes, from /proc/PID/status.
int64_t resident_bytes(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}

// The port a node prints once it listens ("listening on 127.0.0.1:PORT").
int wait_for_port(const fs::path& out, ChildProcess& node) {
  std::regex listening("listening on 127\\.0\\.0\\.1:(\\d+)");
  for (int i = 0; i < 600 && node.running(); ++i) {
    std::smatch match;
    std::string text = read_file(out).value_or("");
    if (std::regex_search(text, match, listening)) return std::stoi(match[1]);
    std::this_thread::sleep_for(100ms);
  }
  return 0;
}

solvernet::v1::TensorMessage signed_message(const NodeKey& key, const std::string& kind, int64_t step, int micro,
                                            int round, size_t bytes) {
  solvernet::v1::TensorMessage m;
  m.set_job_id("flood");
  m.set_from_node_id(key.node_id());
  m.set_kind(kind);
  m.set_step(step);
  m.set_micro(micro);
  m.set_round(round);
  m.mutable_tensor()->set_dtype("f32");
  m.mutable_tensor()->add_shape(static_cast<int64_t>(bytes / 4));
  m.mutable_tensor()->set_data(std::string(bytes / 4 * 4, '\x01'));
  auto sig = key.sign(net::tensor_message_digest(m));
  m.set_signature(sig.data(), sig.size());
  return m;
}

struct Tally {
  int ok = 0, exhausted = 0, denied = 0, other = 0;
};

Tally send_all(solvernet::v1::Transport::Stub& stub, const std::vector<solvernet::v1::TensorMessage>& messages) {
  Tally t;
  for (const auto& m : messages) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    solvernet::v1::Empty reply;
    auto status = stub.Send(&context, m, &reply);
    if (status.ok()) ++t.ok;
    else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) ++t.exhausted;
    else if (status.error_code() == grpc::StatusCode::PERMISSION_DENIED) ++t.denied;
    else ++t.other;
  }
  return t;
}

}  // namespace

TEST(Delivery, FloodsAreBoundedAndReplaysRefusedWhileTheJobGoesOn) {
  auto dir = scratch("flood");
  SpawnOptions out;
  out.stdout_path = dir / "node.out";
  out.stderr_path = dir / "node.err";
  auto node = ChildProcess::spawn({bin(), "node", "--data", (dir / "a").string(), "--listen", "127.0.0.1:0",
                                   "--dht-port", "0", "--peer-timeout-s", "20", "--log-level", "error"},
                                  out);
  ASSERT_TRUE(node.ok()) << node.message();
  const int port = wait_for_port(dir / "node.out", *node);
  ASSERT_GT(port, 0) << read_file(dir / "node.err").value_or("");
  auto key_a = NodeKey::load_or_create(dir / "a");
  ASSERT_TRUE(key_a.ok());

  // Member B lives in this process: a real stage worker behind its own server.
  train::init_single_threaded();
  NodeKey key_b = NodeKey::generate();
  net::DeliveryService delivery_b;
  net::NodeRuntimeOptions runtime_options;
  runtime_options.key = &key_b;
  net::NodeRuntime runtime_b(runtime_options);
  train::NodeServiceOptions options;
  options.runtime = &runtime_b;
  options.data_dir = dir / "b";
  options.peer_timeout = 20s;
  options.delivery = &delivery_b;
  auto service_b = train::make_train_service(options);
  runtime_b.add_service(service_b.get());
  runtime_b.add_service(&delivery_b);
  auto started_b = runtime_b.start("127.0.0.1:0");
  ASSERT_TRUE(started_b.ok()) << started_b.message();
  NodeKey client = NodeKey::generate();
  net::ControlSigner signer(client);

  JobConfig job;
  job.model.layers = 2;
  job.model.d_model = 16;
  job.model.heads = 2;
  job.model.d_ff = 32;
  job.model.vocab = 32;
  job.model.seq_len = 8;
  job.train.global_batch = 2;
  job.parallel.replicas = 2;
  job.parallel.micro_batches = 1;
  const std::string address_a = "127.0.0.1:" + std::to_string(port);
  const std::string address_b = "127.0.0.1:" + std::to_string(runtime_b.port());
  auto control_a = solvernet::v1::Train::NewStub(net::make_channel(address_a, key_a->node_id()));
  auto control_b = solvernet::v1::Train::NewStub(net::make_channel(address_b, key_b.node_id()));
  // Over B's TLS identity: A checks every message's sender against it.
  auto transport_a = solvernet::v1::Transport::NewStub(net::make_channel(address_a, key_a->node_id(), &key_b));
  std::vector<solvernet::v1::Train::Stub*> controls = {control_a.get(), control_b.get()};

  solvernet::v1::SetupJobRequest setup;
  setup.set_job_id("flood");
  setup.set_job_toml(job_to_toml(job));
  setup.set_first_layer(0);
  setup.set_layer_count(2);
  for (int r = 0; r < 2; ++r) {
    const NodeKey& key = r == 0 ? *key_a : key_b;
    auto* m = setup.add_members();
    m->set_node_id(key.node_id());
    m->set_public_key(key.public_key().data(), 32);
    m->set_address(r == 0 ? address_a : address_b);
    m->set_replica(r);
  }
  for (int r = 0; r < 2; ++r) {
    setup.set_replica(r);
    train::sign_request(signer, "SetupJob", setup);
    grpc::ClientContext context;
    solvernet::v1::SetupJobReply reply;
    auto status = controls[static_cast<size_t>(r)]->SetupJob(&context, setup, &reply);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }
  auto run_step = [&](int64_t step) {
    std::vector<grpc::Status> statuses(2);
    std::vector<solvernet::v1::RunStepReply> replies(2);
    std::vector<std::thread> threads;
    for (size_t r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        solvernet::v1::RunStepRequest request;
        request.set_job_id("flood");
        request.set_step(step);
        auto* mb = request.add_micro_batches();
        mb->add_sample_ids(static_cast<int64_t>(r));
        auto tokens = torch::arange(8, torch::kInt64).view({1, 8}) + static_cast<int64_t>(r + step);
        model::tensor_to_proto(tokens.remainder(32), mb->mutable_tokens());
        model::tensor_to_proto((tokens + 1).remainder(32), mb->mutable_targets());
        train::sign_request(signer, "RunStep", request);
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + 60s);
        statuses[r] = controls[r]->RunStep(&context, request, &replies[r]);
      });
    for (auto& t : threads) t.join();
    for (const auto& s : statuses) EXPECT_TRUE(s.ok()) << s.error_message();
    // Replicas share weights, moments and cursor (replica_hash); their full
    // state hashes differ by their own seeds and residuals.
    EXPECT_EQ(replies[0].replica_hash().size(), 32u);
    EXPECT_EQ(replies[0].replica_hash(), replies[1].replica_hash());
  };
  run_step(0);

  // A replay of B's step-0 all-reduce chunk (ring position 1 sends segment 1
  // in round 0), signed by B's key, after A consumed it: refused.
  auto replayed = send_all(*transport_a, {signed_message(key_b, "allreduce", 0, 1, 0, 64)});
  EXPECT_EQ(replayed.denied, 1);
  // A job this node does not run.
  {
    auto wrong = signed_message(key_b, "act", 1, 0, 0, 64);
    wrong.set_job_id("no-such-job");
    grpc::ClientContext context;
    solvernet::v1::Empty reply;
    EXPECT_EQ(transport_a->Send(&context, wrong, &reply).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  // Warm up the receive path, then measure: the flood must not grow A's memory.
  const size_t kBytes = 512 << 10;
  NodeKey stranger = NodeKey::generate();
  auto batch = [&](const NodeKey& key, int64_t step, int first, int count) {
    std::vector<solvernet::v1::TensorMessage> messages;
    for (int i = first; i < first + count; ++i) messages.push_back(signed_message(key, "act", step, i, 0, kBytes));
    return messages;
  };
  send_all(*transport_a, batch(stranger, 1, 0, 20));
  const int64_t rss_before = resident_bytes(node->pid());
  ASSERT_GT(rss_before, 0);

  // A non-member's flood (300 MiB) is refused outright; the job goes on.
  auto foreign = send_all(*transport_a, batch(stranger, 1, 20, 600));
  EXPECT_EQ(foreign.denied, 600);
  run_step(1);

  // A flood under a member's key (300 MiB of distinct tags for the open step):
  // the inbox takes its bound's worth, then the sender gets RESOURCE_EXHAUSTED.
  auto member = send_all(*transport_a, batch(key_b, 2, 100, 600));
  EXPECT_LE(member.ok, 4);
  EXPECT_GE(member.exhausted, 596);
  EXPECT_EQ(member.other, 0);
  const int64_t rss_after = resident_bytes(node->pid());
  // 600 MiB were sent in all; the node may keep a few MiB of inbox and
  // allocator slack, never the flood.
  EXPECT_LT(rss_after - rss_before, int64_t{64} << 20) << "before " << rss_before << " after " << rss_after;
  EXPECT_TRUE(node->running());
  std::cout << "node RSS before the floods " << rss_before / (1 << 20) << " MiB, after " << rss_after / (1 << 20)
            << " MiB (600 MiB sent); member flood: " << member.ok << " accepted, " << member.exhausted
            << " RESOURCE_EXHAUSTED" << std::endl;

  node->terminate();
  runtime_b.shutdown(std::chrono::system_clock::now());
  fs::remove_all(dir);
}
