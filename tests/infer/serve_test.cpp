// Block servers: real `solvernet node --serve` processes on 127.0.0.1, driven
// by this test as an Infer client with keys of its own; the reference is the
// same span arithmetic (infer::SpanModel) in this process.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "infer/model_store.h"
#include "infer/protocol.h"
#include "infer/server.h"
#include "infer/span.h"
#include "swarm.h"
#include "test_model.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"
#include "net/control.h"
#include "net/rpc.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;
namespace pb = solvernet::v1;

namespace {

using infer::testing::Swarm;
using infer::testing::wait_for_address;
using infer::testing::wait_for_text;
std::string bin() { return infer::testing::solvernet_bin(); }
fs::path scratch(const std::string& name) { return infer::testing::scratch("serve", name); }

// A model file as train writes it: weights and the metadata that makes it servable.
fs::path write_model(const fs::path& dir) { return infer::testing::write_tiny_model(dir / "tiny.safetensors"); }
ModelConfig tiny_config() { return infer::testing::tiny_model_config(); }

// Removes a test's scratch dir when it passed (declared before the processes using it, so it goes after them).
struct ScratchCleanup {
  fs::path dir;
  ~ScratchCleanup() {
    if (!::testing::Test::HasFailure()) fs::remove_all(dir);
  }
};

// An Infer client of one server, signing with its own key.
struct Client {
  std::unique_ptr<pb::Infer::Stub> infer;
  std::unique_ptr<pb::Node::Stub> node;
  net::ControlSigner* signer;
  std::string model;

  Client(const std::string& address, const std::string& node_id, net::ControlSigner& s, std::string model_id)
      : signer(&s), model(std::move(model_id)) {
    auto channel = net::make_channel(address, node_id);
    infer = pb::Infer::NewStub(channel);
    node = pb::Node::NewStub(channel);
  }
  static std::unique_ptr<grpc::ClientContext> context() {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + 30s);
    return c;
  }
  grpc::Status open(const std::string& session, int first, int end, int max_length = 32) {
    pb::OpenSessionRequest request;
    request.set_session_id(session);
    request.set_model(model);
    request.set_first_block(first);
    request.set_end_block(end);
    request.set_max_length(max_length);
    infer::sign_infer(*signer, "OpenSession", request);
    pb::OpenSessionReply reply;
    return infer->OpenSession(context().get(), request, &reply);
  }
  pb::ForwardRequest forward_request(const std::string& session, int64_t position, const torch::Tensor& input) {
    pb::ForwardRequest request;
    request.set_session_id(session);
    request.set_position(position);
    model::tensor_to_proto(input, request.mutable_input());
    return request;
  }
  grpc::Status send(const pb::ForwardRequest& request, torch::Tensor* output) {
    pb::ForwardReply reply;
    auto status = infer->Forward(context().get(), request, &reply);
    if (status.ok() && output) *output = model::tensor_from_proto(reply.output()).value();
    return status;
  }
  grpc::Status forward(const std::string& session, int64_t position, const torch::Tensor& input, torch::Tensor* output) {
    auto request = forward_request(session, position, input);
    infer::sign_infer(*signer, "Forward", request);
    return send(request, output);
  }
  pb::NodeInfo info() {
    pb::SignedNodeInfo signed_info;
    pb::NodeInfo out;
    if (node->GetInfo(context().get(), pb::Empty(), &signed_info).ok()) out.ParseFromString(signed_info.info());
    return out;
  }
};

torch::Tensor tokens(std::vector<int64_t> ids) { return torch::tensor(ids, torch::kInt64); }
int64_t top_token(const torch::Tensor& logits) { return logits.reshape({-1}).argmax().item<int64_t>(); }
// Equal up to float32 rounding: the node processes and this one run the same
// kernels on most machines (bitwise equal), but on an AMD EPYC host they
// differed in the last bits (1.7e-7 on logits of 0.8), as LibTorch's and
// OpenBLAS's kernel choice may differ between processes. A wrong span, cache
// or position is off by far more.
bool same(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && torch::allclose(a, b, /*rtol=*/1e-5, /*atol=*/1e-6);
}

}  // namespace

TEST(ServeSpec, ParsesModelAndInclusiveSpan) {
  auto spec = infer::parse_serve_spec("dir/m.safetensors:2-3");
  ASSERT_TRUE(spec.ok()) << spec.message();
  EXPECT_EQ(spec->model, "dir/m.safetensors");
  EXPECT_EQ(spec->first_block, 2);
  EXPECT_EQ(spec->end_block, 4);
  auto whole = infer::parse_serve_spec("m.safetensors");
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(whole->first_block, -1);
  auto backwards = infer::parse_serve_spec("m:3-1");
  ASSERT_FALSE(backwards.ok());
  EXPECT_EQ(backwards.error().kind, ErrorKind::invalid_input);
  EXPECT_NE(backwards.message().find("before its first"), std::string::npos) << backwards.message();
  EXPECT_FALSE(infer::parse_serve_spec(":0-1").ok());
}

TEST(ServeSpec, ChoosesTheLargestGap) {
  EXPECT_EQ(infer::choose_span(4, 2, {1, 1, 0, 0}), std::make_pair(2, 4));
  EXPECT_EQ(infer::choose_span(6, 2, {2, 0, 1, 1, 0, 2}), std::make_pair(1, 3));  // least total among windows with a 0, first
  EXPECT_EQ(infer::choose_span(4, 9, {}), std::make_pair(0, 4));                  // at most all blocks
  EXPECT_EQ(infer::choose_span(4, 1, {1, 1, 1, 0}), std::make_pair(3, 4));
  pb::NodeInfo a, b;
  auto* span = a.add_serving();
  span->set_model("m");
  span->set_first_block(0);
  span->set_end_block(2);
  span = b.add_serving();
  span->set_model("other");
  span->set_first_block(0);
  span->set_end_block(4);
  EXPECT_EQ(infer::swarm_coverage({a, b}, "m", 4), (std::vector<int>{1, 1, 0, 0}));
}

// Bad --serve flags: one line naming the problem, exit 2, before the node starts.
TEST(BlockServers, BadServeFlagsExitTwoWithOneLine) {
  auto dir = scratch("flags");
  ScratchCleanup cleanup{dir};
  const fs::path model_path = write_model(dir);
  struct Case {
    std::vector<std::string> flags;
    std::string says;
  };
  const std::vector<Case> cases = {
      {{"--serve", (dir / "missing.safetensors").string()}, "no such model file"},
      {{"--serve", model_path.string() + ":2-4"}, "past the model's last block 3"},
      {{"--serve", model_path.string() + ":3-1"}, "before its first"},
      {{"--serve", model_path.string(), "--cheat", "lies"}, "--cheat must be garbage-states"},
      {{"--cheat", "garbage-states"}, "needs --serve"},
      {{"--serve", model_path.string(), "--max-batch", "0"}, "--max-batch must be in 1..1024"},
      {{"--serve", model_path.string(), "--session-idle-s", "0"}, "--session-idle-s must be in"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SpawnOptions options;
    options.stdout_path = dir / ("out" + std::to_string(i));
    options.stderr_path = dir / ("err" + std::to_string(i));
    std::vector<std::string> argv = {bin(), "node", "--data", (dir / ("d" + std::to_string(i))).string(), "--listen",
                                     "127.0.0.1:0", "--dht-port", "0"};
    argv.insert(argv.end(), cases[i].flags.begin(), cases[i].flags.end());
    auto child = ChildProcess::spawn(argv, options);
    ASSERT_TRUE(child.ok());
    EXPECT_EQ(child->wait_for(30s), 2) << cases[i].says;
    const std::string err = read_file(options.stderr_path).value_or("");
    EXPECT_NE(err.find(cases[i].says), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(read_file(options.stdout_path).value_or(""), "");
  }
}

TEST(BlockServers, SessionsAcrossTwoServersBatchingAdmissionAndExpiry) {
  torch::set_num_threads(1);  // the nodes compute single-threaded; bitwise equality needs the same here
  torch::NoGradGuard no_grad;
  auto dir = scratch("swarm");
  ScratchCleanup cleanup{dir};
  const fs::path model_path = write_model(dir);
  auto file = infer::load_model_file(model_path);
  ASSERT_TRUE(file.ok()) << file.message();
  // The model's id is its manifest's hash, as the nodes' stores compute it.
  auto store = infer::ModelStore::open(dir / "store");
  ASSERT_TRUE(store.ok()) << store.message();
  auto published = (*store)->publish(model_path);
  ASSERT_TRUE(published.ok()) << published.message();
  const std::string model_id = *published;
  auto span = [&](int first, int end) { return infer::SpanModel::create(file->config, first, end, file->tensors).value(); };
  const auto ref01 = span(0, 2), ref23 = span(2, 4), ref03 = span(0, 4);

  Swarm swarm(dir);
  const int a = swarm.start({"--serve", model_path.string() + ":0-1"});
  const std::string address_a = wait_for_address(swarm.log(a));
  ASSERT_FALSE(address_a.empty()) << read_file(swarm.log(a)).value_or("");
  // C is given only the model's id: it fetches the manifest from A (which
  // published the file and announces the model), picks its own span once A's
  // [0, 2) is in the DHT (and before the others are: 1 MiB admits 2 blocks, so
  // the gap [2, 4)), and fetches that span's chunks.
  bool listed = false;
  for (int i = 0; i < 30 && !(listed = swarm.listed(a)); ++i) std::this_thread::sleep_for(500ms);
  ASSERT_TRUE(listed);
  const int c = swarm.start({"--serve", model_id, "--memory-limit-mb", "1", "--session-idle-s", "3"});
  const std::string address_c = wait_for_address(swarm.log(c));
  const int b = swarm.start({"--serve", model_path.string() + ":2-3"});
  const int cheat = swarm.start({"--serve", model_path.string() + ":0-3", "--cheat", "garbage-states"});
  const std::string address_b = wait_for_address(swarm.log(b)), address_cheat = wait_for_address(swarm.log(cheat));
  ASSERT_FALSE(address_b.empty()) << read_file(swarm.log(b)).value_or("");
  ASSERT_FALSE(address_c.empty()) << read_file(swarm.log(c)).value_or("");
  ASSERT_FALSE(address_cheat.empty()) << read_file(swarm.log(cheat)).value_or("");
  EXPECT_TRUE(wait_for_text(swarm.log(c), "serving blocks [2, 4)", 1s)) << read_file(swarm.log(c)).value_or("");
  EXPECT_TRUE(wait_for_text(swarm.log(c), "fetched ", 1s)) << read_file(swarm.log(c)).value_or("");
  EXPECT_TRUE(wait_for_text(swarm.log(cheat), "CHEAT", 1s));

  NodeKey owner = NodeKey::generate(), stranger = NodeKey::generate();
  net::ControlSigner signer(owner), stranger_signer(stranger);
  Client server_a(address_a, swarm.node_id(a), signer, model_id), server_b(address_b, swarm.node_id(b), signer, model_id);
  {
    auto info = server_a.info();
    ASSERT_EQ(info.serving_size(), 1);
    EXPECT_EQ(info.serving(0).model(), model_id);
    EXPECT_EQ(info.serving(0).end_block(), 2);
    EXPECT_GT(info.serving(0).throughput(), 0);
  }

  // One session through [0, 2) then [2, 4) is the in-process arithmetic, to float32 rounding (see same).
  const std::string s = "5e55101100000000000000000000000a";
  ASSERT_TRUE(server_a.open(s, 0, 2).ok());
  ASSERT_TRUE(server_b.open(s, 2, 4).ok());
  infer::KvCache cache01, cache23, cache03;
  torch::Tensor input = tokens({3, 14, 15, 9, 26});
  int64_t position = 0;
  auto step = [&](const torch::Tensor& in) {
    torch::Tensor hidden, logits;
    auto hop1 = server_a.forward(s, position, in, &hidden);
    ASSERT_TRUE(hop1.ok()) << hop1.error_message();
    auto hop2 = server_b.forward(s, position, hidden, &logits);
    ASSERT_TRUE(hop2.ok()) << hop2.error_message();
    auto want_hidden = ref01.forward(cache01, in).value();
    EXPECT_TRUE(same(hidden, want_hidden)) << "position " << position;
    auto want_logits = ref23.forward(cache23, want_hidden).value();
    EXPECT_TRUE(same(logits, want_logits)) << "position " << position;
    EXPECT_TRUE(same(logits, ref03.forward(cache03, in).value())) << "position " << position;
    position += in.size(0);
    input = tokens({top_token(logits)});
  };
  step(input);
  for (int i = 0; i < 4; ++i) step(input);

  // Unsigned and foreign-key steps are refused; so is a stale position, and the session goes on.
  auto unsigned_step = server_a.forward_request(s, position, input);
  auto refused = server_a.send(unsigned_step, nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED) << refused.error_message();
  Client foreign(address_a, swarm.node_id(a), stranger_signer, model_id);
  refused = foreign.forward(s, position, input, nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::PERMISSION_DENIED) << refused.error_message();
  refused = server_a.forward(s, position - 1, input, nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << refused.error_message();
  refused = server_a.forward(s, position, tokens({64}), nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << refused.error_message();
  EXPECT_NE(refused.error_message().find("vocabulary"), std::string::npos) << refused.error_message();
  refused = server_b.forward(s, position, torch::zeros({1, 32}), nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << refused.error_message();
  for (int i = 0; i < 2; ++i) step(input);

  // A spot check recomputes [0, 2) over the history without a session: the same rows.
  {
    pb::RecomputeRequest check;
    check.set_check_id("c0ffee00000000000000000000000001");
    check.set_model(model_id);
    check.set_first_block(0);
    check.set_end_block(2);
    auto history = tokens({3, 14, 15, 9, 26});
    model::tensor_to_proto(history, check.mutable_inputs());
    check.set_rows(2);
    infer::sign_infer(signer, "Recompute", check);
    pb::ForwardReply reply;
    auto status = server_a.infer->Recompute(Client::context().get(), check, &reply);
    ASSERT_TRUE(status.ok()) << status.error_message();
    auto rows = model::tensor_from_proto(reply.output()).value();
    EXPECT_TRUE(same(rows, ref01.forward_full(history).value().slice(0, 3, 5)));
  }

  // The cheat answers with noise of the right shape.
  {
    Client liar(address_cheat, swarm.node_id(cheat), signer, model_id);
    ASSERT_TRUE(liar.open("bad0", 0, 4).ok());
    torch::Tensor logits;
    ASSERT_TRUE(liar.forward("bad0", 0, tokens({3, 14, 15, 9, 26}), &logits).ok());
    infer::KvCache fresh;
    auto honest = ref03.forward(fresh, tokens({3, 14, 15, 9, 26})).value();
    EXPECT_EQ(logits.sizes(), honest.sizes());
    EXPECT_FALSE(torch::equal(logits, honest));
  }

  // Eight concurrent sessions on B: their decode steps run in batches, and each gets its own answer.
  {
    constexpr int kSessions = 8, kSteps = 12;
    std::barrier start(kSessions);
    std::atomic<int> wrong{0}, failed{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < kSessions; ++i)
      threads.emplace_back([&, i] {
        torch::NoGradGuard guard;
        const std::string id = "ba7c4" + std::to_string(i);
        if (!server_b.open(id, 2, 4).ok()) return void(++failed);
        torch::Generator generator = at::detail::createCPUGenerator(static_cast<uint64_t>(100 + i));
        infer::KvCache reference;
        auto prefill = torch::randn({4, 64}, generator);
        torch::Tensor out;
        if (!server_b.forward(id, 0, prefill, &out).ok()) return void(++failed);
        (void)ref23.forward(reference, prefill);
        start.arrive_and_wait();
        for (int k = 0; k < kSteps; ++k) {
          auto x = torch::randn({1, 64}, generator);
          if (!server_b.forward(id, 4 + k, x, &out).ok()) return void(++failed);
          if (!torch::allclose(out, ref23.forward(reference, x).value(), 1e-4, 1e-5)) ++wrong;
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(failed.load(), 0);
    EXPECT_EQ(wrong.load(), 0);
    // The server logs each new largest batch: "decode batch of N sessions".
    const std::string log = read_file(swarm.log(b)).value_or("");
    int largest = 0;
    for (auto at = log.find("decode batch of "); at != std::string::npos; at = log.find("decode batch of ", at + 1))
      largest = std::max(largest, std::atoi(log.c_str() + at + 16));
    EXPECT_GT(largest, 1) << log;
  }

  // C admits sessions within 1 MiB, refuses the next, and drops idle ones, freeing their memory.
  {
    Client server_c(address_c, swarm.node_id(c), signer, model_id);
    // The fetched blocks compute what the file's do.
    ASSERT_TRUE(server_c.open("fe7c4ed", 2, 4, 8).ok());
    torch::Tensor hidden = torch::randn({3, 64}), logits;
    ASSERT_TRUE(server_c.forward("fe7c4ed", 0, hidden, &logits).ok());
    infer::KvCache fetched;
    EXPECT_TRUE(same(logits, ref23.forward(fetched, hidden).value()));
    int opened = 1;
    grpc::Status last;
    for (int i = 0; i < 64; ++i) {
      last = server_c.open("f111" + std::to_string(i), 2, 4, 64);
      if (!last.ok()) break;
      ++opened;
    }
    EXPECT_GT(opened, 1);
    EXPECT_EQ(last.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << last.error_message();
    EXPECT_NE(last.error_message().find("inference session"), std::string::npos) << last.error_message();
    auto info = server_c.info();
    EXPECT_GT(info.memory_admitted_bytes(), 0);
    EXPECT_LE(info.memory_admitted_bytes(), info.memory_limit_bytes());
    ASSERT_EQ(info.serving_size(), 1);
    EXPECT_EQ(info.serving(0).sessions(), opened);
    // Nobody uses them: within the 3 s idle lease (and the reaper's second) they are gone.
    for (int i = 0; i < 100 && (info.memory_admitted_bytes() > 0 || info.serving(0).sessions() > 0); ++i) {
      std::this_thread::sleep_for(200ms);
      info = server_c.info();
      ASSERT_EQ(info.serving_size(), 1);
    }
    EXPECT_EQ(info.memory_admitted_bytes(), 0);
    EXPECT_EQ(info.serving(0).sessions(), 0);
    auto gone = server_c.forward("f1110", 0, torch::zeros({1, 64}), nullptr);
    EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND) << gone.error_message();
    gone = server_c.forward("fe7c4ed", 3, torch::zeros({1, 64}), nullptr);
    EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND) << gone.error_message();
    EXPECT_TRUE(wait_for_text(swarm.log(c), "idle for 3 s, dropped", 1s));
  }
}
