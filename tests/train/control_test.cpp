// Multi-process tests of the node runtime's control plane: real `solvernet`
// node, dht and train processes on 127.0.0.1; this test process is a client
// holding keys of its own.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "model/tensor_wire.h"
#include "net/control.h"
#include "net/rpc.h"
#include "train/control.h"
#include "train/train.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return std::getenv("SOLVERNET_BIN"); }
fs::path data(const std::string& name) {
  return fs::path(std::getenv("SOLVERNET_SOURCE_DIR")) / "tests/train/data" / name;
}

fs::path scratch(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("sn-control-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Waits until LOG shows "listening on ADDRESS"; returns ADDRESS ("" if not within 30 s).
std::string wait_for_address(const fs::path& log) {
  for (int i = 0; i < 300; ++i) {
    std::string text = read_file(log).value_or("");
    auto at = text.find("listening on ");
    if (at != std::string::npos) {
      auto end = text.find(' ', at + 13);
      if (end != std::string::npos) return text.substr(at + 13, end - at - 13);
    }
    std::this_thread::sleep_for(100ms);
  }
  return "";
}

bool wait_for_text(ChildProcess& process, const fs::path& file, const std::string& text, std::chrono::seconds limit) {
  for (auto until = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < until;) {
    if (read_file(file).value_or("").find(text) != std::string::npos) return true;
    if (!process.running()) return false;
    std::this_thread::sleep_for(100ms);
  }
  return false;
}

// A DHT bootstrap and N nodes; everything is stopped when it goes out of scope.
struct Network {
  fs::path dir;
  std::string bootstrap;
  ChildProcess dht;
  std::vector<ChildProcess> nodes;

  Network(const fs::path& d, int n, const std::vector<std::string>& node_flags) : dir(d) {
    SpawnOptions quiet;
    quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
    // A port nobody holds: a DHT of another test on the same port would mix networks.
    int port = free_loopback_port(SOCK_DGRAM).value();
    dht = std::move(ChildProcess::spawn({bin(), "dht", "--port", std::to_string(port)}, quiet).value());
    bootstrap = "127.0.0.1:" + std::to_string(port);
    for (int i = 0; i < n; ++i) {
      SpawnOptions options;
      options.stdout_path = options.stderr_path = log(i);
      std::vector<std::string> argv = {bin(), "node", "--data", node_dir(i).string(), "--listen", "127.0.0.1:0",
                                       "--dht-port", "0", "--bootstrap", bootstrap};
      argv.insert(argv.end(), node_flags.begin(), node_flags.end());
      nodes.push_back(std::move(ChildProcess::spawn(argv, options).value()));
    }
  }
  ~Network() {
    for (auto& node : nodes) {
      ::kill(node.pid(), SIGCONT);
      node.terminate();
    }
    dht.terminate();
  }
  fs::path node_dir(int i) const { return dir / ("n" + std::to_string(i)); }
  fs::path log(int i) const { return dir / ("n" + std::to_string(i) + ".log"); }

  // `solvernet peers --json`: node id → busy job id ("" when idle).
  std::map<std::string, std::string> peers() const {
    SpawnOptions options;
    options.stdout_path = dir / "peers.out";
    options.stderr_path = dir / "peers.err";
    fs::remove(options.stdout_path);  // spawn appends
    fs::remove(options.stderr_path);
    auto child = ChildProcess::spawn({bin(), "peers", "--bootstrap", bootstrap, "--json"}, options);
    std::map<std::string, std::string> out;
    if (!child.ok() || child->wait_for(30s) != 0) return out;
    try {
      for (const auto& n : nlohmann::json::parse(read_file(options.stdout_path).value_or("[]")))
        out[n.value("node_id", "")] = n.value("busy_job_id", "");
    } catch (const std::exception&) {
    }
    return out;
  }
};

// The tiny job J of issue 15, as a single stage on one node.
JobConfig tiny_job() {
  JobConfig job;
  job.model.layers = 2;
  job.model.d_model = 32;
  job.model.heads = 2;
  job.model.d_ff = 64;
  job.model.vocab = 64;
  job.model.seq_len = 16;
  job.train.global_batch = 8;
  job.train.steps = 5;
  return job;
}

solvernet::v1::RunStepRequest step_request(const std::string& job_id, int64_t step) {
  solvernet::v1::RunStepRequest request;
  request.set_job_id(job_id);
  request.set_step(step);
  auto* mb = request.add_micro_batches();
  for (int64_t i = 0; i < 8; ++i) mb->add_sample_ids(i);
  auto tokens = torch::randint(0, 64, {8, 16}, torch::kInt64);
  model::tensor_to_proto(tokens, mb->mutable_tokens());
  model::tensor_to_proto(tokens, mb->mutable_targets());
  return request;
}

}  // namespace

TEST(SignedControl, UnsignedForeignReplayedAndStaleRequestsAreRefusedAndTheJobGoesOn) {
  auto dir = scratch("auth");
  Network net(dir, 1, {"--lease-s", "20"});
  std::string address = wait_for_address(net.log(0));
  ASSERT_FALSE(address.empty()) << read_file(net.log(0)).value_or("");
  auto node_key = NodeKey::load_or_create(net.node_dir(0));
  ASSERT_TRUE(node_key.ok());
  auto stub = solvernet::v1::Train::NewStub(net::make_channel(address, node_key->node_id()));

  NodeKey owner = NodeKey::generate(), stranger = NodeKey::generate();
  net::ControlSigner owner_signer(owner), stranger_signer(stranger);
  solvernet::v1::SetupJobRequest setup;
  setup.set_job_id("j4");
  setup.set_job_toml(job_to_toml(tiny_job()));
  setup.set_layer_count(2);
  auto* m = setup.add_members();
  m->set_node_id(node_key->node_id());
  m->set_public_key(node_key->public_key().data(), 32);
  m->set_address(address);
  auto call = [&](auto method, const auto& request, auto* reply) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 30s);
    return ((*stub).*method)(&context, request, reply);
  };
  solvernet::v1::SetupJobReply setup_reply;
  train::sign_request(owner_signer, "SetupJob", setup);
  auto set_up = call(&solvernet::v1::Train::Stub::SetupJob, setup, &setup_reply);
  ASSERT_TRUE(set_up.ok()) << set_up.error_message();
  EXPECT_EQ(setup_reply.lease_ms(), 20000);

  solvernet::v1::RunStepReply reply;
  auto first = step_request("j4", 0);
  train::sign_request(owner_signer, "RunStep", first);
  ASSERT_TRUE(call(&solvernet::v1::Train::Stub::RunStep, first, &reply).ok());

  auto expect_denied = [&](const grpc::Status& status, const std::string& why) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << why << ": " << status.error_message();
    EXPECT_NE(status.error_message().find(why), std::string::npos) << status.error_message();
  };
  // Unsigned.
  auto unsigned_step = step_request("j4", 1);
  expect_denied(call(&solvernet::v1::Train::Stub::RunStep, unsigned_step, &reply), "unsigned");
  solvernet::v1::EndJobRequest unsigned_end;
  unsigned_end.set_job_id("j4");
  solvernet::v1::Empty empty;
  expect_denied(call(&solvernet::v1::Train::Stub::EndJob, unsigned_end, &empty), "unsigned");
  // Another key: no step, no weights, no end, no renewal, no taking the job over.
  auto foreign_step = step_request("j4", 1);
  train::sign_request(stranger_signer, "RunStep", foreign_step);
  expect_denied(call(&solvernet::v1::Train::Stub::RunStep, foreign_step, &reply), "belongs to client");
  solvernet::v1::EndJobRequest foreign_end;
  foreign_end.set_job_id("j4");
  foreign_end.set_abort(true);
  train::sign_request(stranger_signer, "EndJob", foreign_end);
  expect_denied(call(&solvernet::v1::Train::Stub::EndJob, foreign_end, &empty), "belongs to client");
  solvernet::v1::FetchWeightsRequest foreign_fetch;
  foreign_fetch.set_job_id("j4");
  train::sign_request(stranger_signer, "FetchWeights", foreign_fetch);
  solvernet::v1::FetchWeightsReply weights;
  expect_denied(call(&solvernet::v1::Train::Stub::FetchWeights, foreign_fetch, &weights), "belongs to client");
  solvernet::v1::RenewLeaseRequest foreign_renew;
  foreign_renew.set_job_id("j4");
  train::sign_request(stranger_signer, "RenewLease", foreign_renew);
  solvernet::v1::RenewLeaseReply lease;
  expect_denied(call(&solvernet::v1::Train::Stub::RenewLease, foreign_renew, &lease), "belongs to client");
  auto takeover = setup;
  train::sign_request(stranger_signer, "SetupJob", takeover);
  expect_denied(call(&solvernet::v1::Train::Stub::SetupJob, takeover, &setup_reply), "belongs to client");
  // The owner's own request, replayed.
  expect_denied(call(&solvernet::v1::Train::Stub::RunStep, first, &reply), "replayed");
  // The owner's key, but signed two minutes ago.
  auto stale = step_request("j4", 1);
  {
    auto* auth = stale.mutable_auth();
    auth->set_client_public_key(owner.public_key().data(), 32);
    auth->set_sequence(1ull << 62);
    auth->set_time_ms(net::unix_ms_now() - 120000);
    auto digest = train::request_digest("RunStep", stale);
    auto signature = owner.sign(digest);
    auth->set_signature(signature.data(), signature.size());
  }
  expect_denied(call(&solvernet::v1::Train::Stub::RunStep, stale, &reply), "stale");
  // A signature that does not cover what was sent (the step changed after signing).
  auto tampered = step_request("j4", 1);
  train::sign_request(owner_signer, "RunStep", tampered);
  tampered.set_step(7);
  expect_denied(call(&solvernet::v1::Train::Stub::RunStep, tampered, &reply), "bad signature");

  // The job went on untouched: its next step runs.
  auto second = step_request("j4", 1);
  train::sign_request(owner_signer, "RunStep", second);
  auto ran = call(&solvernet::v1::Train::Stub::RunStep, second, &reply);
  ASSERT_TRUE(ran.ok()) << ran.error_message();
  EXPECT_EQ(reply.step(), 1);
  std::string log = read_file(net.log(0)).value_or("");
  // The node logs why it refused each one.
  for (const char* why : {"the request is unsigned", "job j4 belongs to client", "replayed request", "stale request",
                          "bad signature"})
    EXPECT_NE(log.find(std::string("refused RunStep for job j4: ") + why), std::string::npos) << why << "\n" << log;
  solvernet::v1::EndJobRequest end;
  end.set_job_id("j4");
  train::sign_request(owner_signer, "EndJob", end);
  EXPECT_TRUE(call(&solvernet::v1::Train::Stub::EndJob, end, &empty).ok());
  fs::remove_all(dir);
}

TEST(Admission, AJobTooLargeForTheNodeIsRefusedBeforeItStarts) {
  auto dir = scratch("memory");
  Network net(dir, 2, {"--memory-limit-mb", "8"});
  for (int i = 0; i < 2; ++i) ASSERT_FALSE(wait_for_address(net.log(i)).empty());
  // Two replicas of one stage (slow.toml's model and data).
  std::string job = read_file(data("slow.toml")).value();
  job.replace(job.find("stages = 2"), 10, "stages = 1");
  std::ofstream(dir / "two.toml") << job;
  SpawnOptions options;
  options.stdout_path = dir / "train.out";
  options.stderr_path = dir / "train.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", (dir / "two.toml").string(), "--bootstrap", net.bootstrap,
                                     "--key", (dir / "client.key").string(), "--steps", "3"},
                                    options);
  ASSERT_TRUE(client.ok());
  auto status = client->wait_for(120s);
  ASSERT_TRUE(status.has_value());
  EXPECT_NE(*status, 0);
  std::string err = read_file(dir / "train.err").value_or("");
  EXPECT_NE(err.find("refused job setup: job needs ~"), std::string::npos)
      << err << read_file(net.log(0)).value_or("") << read_file(net.log(1)).value_or("");
  EXPECT_NE(err.find("this node admits 8 MiB"), std::string::npos) << err;
  EXPECT_EQ(err.find("step 1/"), std::string::npos) << "training started: " << err;
  fs::remove_all(dir);
}

TEST(Leases, AClientKilledMidJobLeavesEveryNodeIdleWithinTheLease) {
  auto dir = scratch("lease");
  const int lease_s = 3;
  Network net(dir, 4, {"--lease-s", std::to_string(lease_s)});
  for (int i = 0; i < 4; ++i) ASSERT_FALSE(wait_for_address(net.log(i)).empty());
  SpawnOptions options;
  options.stdout_path = dir / "train.out";
  options.stderr_path = dir / "train.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", data("slow.toml").string(), "--bootstrap", net.bootstrap,
                                     "--key", (dir / "client.key").string()},
                                    options);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(wait_for_text(*client, dir / "train.err", "step ", 60s)) << read_file(dir / "train.err").value_or("");
  // Every node holds the job now (its lease is renewed while the client lives).
  std::this_thread::sleep_for(std::chrono::seconds(lease_s + 1));
  auto busy = net.peers();
  ASSERT_EQ(busy.size(), 4u);
  for (const auto& [id, job] : busy) EXPECT_FALSE(job.empty()) << id << " went idle while its client lived";
  ::kill(client->pid(), SIGKILL);
  client->wait_for(10s);
  auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(lease_s + 10);
  std::map<std::string, std::string> peers;
  bool all_idle = false;
  while (!all_idle && std::chrono::steady_clock::now() < limit) {
    std::this_thread::sleep_for(500ms);
    peers = net.peers();
    all_idle = peers.size() == 4;
    for (const auto& [id, job] : peers) all_idle = all_idle && job.empty();
  }
  ASSERT_TRUE(all_idle) << "not every node idle within lease + 10 s: " << nlohmann::json(peers).dump() << "\n"
                        << read_file(dir / "peers.err").value_or("") << read_file(dir / "peers.out").value_or("");
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(net.nodes[static_cast<size_t>(i)].running());
    EXPECT_NE(read_file(net.log(i)).value_or("").find("lease of 3 s ran out"), std::string::npos);
  }
  fs::remove_all(dir);
}

// Issue 15, kind 3: a node frozen with SIGSTOP mid-training is named, and the
// client exits about the peer timeout later instead of waiting ten minutes.
// Issue 13 (F8): it is named by the liveness pings, after half the peer
// timeout (2 s of 4), not by a step deadline (at least the peer timeout).
TEST(Liveness, AFrozenNodeIsNamedAsStoppedResponding) {
  auto dir = scratch("stop");
  Network net(dir, 4, {"--lease-s", "5"});
  for (int i = 0; i < 4; ++i) ASSERT_FALSE(wait_for_address(net.log(i)).empty());
  SpawnOptions options;
  options.stdout_path = dir / "train.out";
  options.stderr_path = dir / "train.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", data("slow.toml").string(), "--bootstrap", net.bootstrap,
                                     "--key", (dir / "client.key").string(), "--peer-timeout-s", "4"},
                                    options);
  ASSERT_TRUE(client.ok());
  // "step 1/": the first step's report (placement lines say "step" too): the
  // freeze lands during the steps.
  ASSERT_TRUE(wait_for_text(*client, dir / "train.err", "step 1/", 60s)) << read_file(dir / "train.err").value_or("");
  const auto frozen_at = std::chrono::steady_clock::now();
  ::kill(net.nodes[2].pid(), SIGSTOP);
  ASSERT_TRUE(wait_for_text(*client, dir / "train.err", "stopped responding", 90s))
      << "no member named 90 s after a node froze: " << read_file(dir / "train.err").value_or("");
  std::cout << "named " << std::chrono::duration<double>(std::chrono::steady_clock::now() - frozen_at).count()
            << " s after the freeze\n";
  auto status = client->wait_for(30s);
  ASSERT_TRUE(status.has_value()) << "client still running 30 s after naming the frozen node";
  EXPECT_NE(*status, 0);
  std::string err = read_file(dir / "train.err").value_or("");
  auto frozen = NodeKey::load_or_create(net.node_dir(2));
  ASSERT_TRUE(frozen.ok());
  EXPECT_NE(err.find("node " + frozen->node_id().substr(0, 8) + " (stage "), std::string::npos) << err;
  EXPECT_NE(err.find("stopped responding"), std::string::npos) << err;
  EXPECT_NE(err.find("no answer to pings for 2 s"), std::string::npos) << err;
  for (int i : {0, 1, 3}) EXPECT_TRUE(net.nodes[static_cast<size_t>(i)].running());
  fs::remove_all(dir);
}

// Issue 13 (F11): a client stopped (SIGSTOP) longer than its liveness window
// (4 s, half the peer timeout of 8) but shorter than a step's deadline and the
// nodes' leases, then continued: the members' silence was its own, so it
// names no member and the job completes.
TEST(Liveness, AClientStoppedPastItsLivenessWindowBlamesNoNodeAndCompletes) {
  auto dir = scratch("client-stop");
  Network net(dir, 4, {});
  for (int i = 0; i < 4; ++i) ASSERT_FALSE(wait_for_address(net.log(i)).empty());
  SpawnOptions options;
  options.stdout_path = dir / "train.out";
  options.stderr_path = dir / "train.err";
  auto client = ChildProcess::spawn({bin(), "train", "--job", data("slow.toml").string(), "--steps", "300",
                                     "--bootstrap", net.bootstrap, "--key", (dir / "client.key").string(),
                                     "--peer-timeout-s", "8"},
                                    options);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(wait_for_text(*client, dir / "train.err", "step 1/", 60s)) << read_file(dir / "train.err").value_or("");
  // Mid-job, most likely while a step call waits.
  std::this_thread::sleep_for(500ms);
  ::kill(client->pid(), SIGSTOP);
  std::this_thread::sleep_for(6s);
  ::kill(client->pid(), SIGCONT);
  auto status = client->wait_for(120s);
  ASSERT_TRUE(status.has_value()) << "client still running 120 s after it continued";
  std::string err = read_file(dir / "train.err").value_or("");
  EXPECT_EQ(*status, 0) << err;
  EXPECT_NE(err.find("step 300/300"), std::string::npos) << err;
  EXPECT_EQ(err.find("stopped responding"), std::string::npos) << err;
  EXPECT_EQ(err.find("failed during"), std::string::npos) << err;
  fs::remove_all(dir);
}
