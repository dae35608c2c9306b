// Serving across nodes, end to end with real `solvernet node --serve`
// processes: greedy output over 2- and 3-hop chains equals the one-process
// output token for token; a server killed mid-generation is replaced and the
// output does not change; a server answering garbage is caught by spot checks
// and avoided from then on; with no server left the client fails clearly.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>

#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <mutex>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "infer/engine.h"
#include "infer/route.h"
#include "swarm.h"
#include "test_model.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

using infer::testing::Swarm;
using infer::testing::wait_for_text;
std::string bin() { return infer::testing::solvernet_bin(); }
fs::path scratch(const std::string& name) { return infer::testing::scratch("chain", name); }

struct Output {
  std::vector<int32_t> ids;
  std::string text;
};

Output generate(infer::Engine& engine, const std::string& prompt, int tokens,
                const std::function<void(int)>& at_token = {}) {
  infer::SamplingParams params;
  params.max_tokens = tokens;
  Output out;
  auto stats = engine.generate(engine.encode(prompt), params, [&](const infer::TokenEvent& e) {
    out.ids.push_back(e.id);
    if (at_token) at_token(e.index);
    return true;
  });
  EXPECT_TRUE(stats.ok()) << stats.message();
  if (stats.ok()) out.text = stats->text;
  return out;
}

// Events the remote engine reports, kept for assertions.
struct Events {
  std::mutex mutex;
  std::vector<std::string> lines;
  std::function<void(const std::string&)> sink() {
    return [this](const std::string& line) {
      std::lock_guard lock(mutex);
      lines.push_back(line);
    };
  }
  bool any(const std::string& text) {
    std::lock_guard lock(mutex);
    for (const auto& line : lines)
      if (line.find(text) != std::string::npos) return true;
    return false;
  }
  std::string all() {
    std::lock_guard lock(mutex);
    std::string out;
    for (const auto& line : lines) out += line + "\n";
    return out;
  }
};

struct ChainTest : ::testing::Test {
  void SetUp() override {
    dir = scratch(::testing::UnitTest::GetInstance()->current_test_info()->name());
    model = infer::testing::write_tiny_model(dir / "tiny.safetensors");
    auto local = infer::open_local_engine(model);
    ASSERT_TRUE(local.ok()) << local.message();
    reference = generate(**local, "hello world", 24);
    ASSERT_EQ(reference.ids.size(), 24u);
  }
  void TearDown() override { fs::remove_all(dir); }

  std::unique_ptr<infer::RemoteEngine> connect(Swarm& swarm, double spot_checks = 0.0,
                                               std::chrono::milliseconds step_timeout = 5s,
                                               std::function<double(const std::string&)> emulated_rtt_s = {}) {
    infer::RemoteEngineOptions options;
    options.bootstrap = {swarm.bootstrap};
    options.identity = &client_key;
    options.spot_check_fraction = spot_checks;
    options.step_timeout = step_timeout;
    options.on_event = events.sink();
    options.emulated_rtt_s = std::move(emulated_rtt_s);
    auto engine = infer::open_remote_engine(options);
    EXPECT_TRUE(engine.ok()) << engine.message();
    return engine.ok() ? std::move(*engine) : nullptr;
  }
  // Waits until the engine's route can cover the whole model (announcements reach the DHT).
  static void wait_covered(infer::RemoteEngine& engine) {
    for (int i = 0; i < 60; ++i) {
      infer::SamplingParams p;
      p.max_tokens = 1;
      if (engine.generate(engine.encode("a"), p, [](const infer::TokenEvent&) { return true; }).ok()) return;
      std::this_thread::sleep_for(500ms);
    }
    FAIL() << "the swarm never covered every block";
  }

  fs::path dir, model;
  Output reference;
  NodeKey client_key = NodeKey::generate();
  Events events;
};

TEST_F(ChainTest, GreedyOverTwoAndThreeHopsEqualsOneProcess) {
  {
    Swarm swarm(dir);
    swarm.serve(model.string() + ":0-1");
    swarm.serve(model.string() + ":2-3");
    auto engine = connect(swarm);
    ASSERT_TRUE(engine);
    wait_covered(*engine);
    Output two = generate(*engine, "hello world", 24);
    EXPECT_EQ(two.ids, reference.ids);
    EXPECT_EQ(two.text, reference.text);
    EXPECT_TRUE(events.any("[0,2) → ")) << events.all();
  }
  Swarm swarm(scratch("three"));
  swarm.serve(model.string() + ":0-0");
  swarm.serve(model.string() + ":1-2");
  swarm.serve(model.string() + ":3-3");
  auto engine = connect(swarm);
  ASSERT_TRUE(engine);
  wait_covered(*engine);
  Output three = generate(*engine, "hello world", 24);
  EXPECT_EQ(three.ids, reference.ids);
  EXPECT_TRUE(events.any("[0,1) → ")) << events.all();
  fs::remove_all(swarm.dir);
}

TEST_F(ChainTest, KilledServerIsReplacedAndTheOutputIsUnchanged) {
  Swarm swarm(dir);
  const int a = swarm.serve(model.string() + ":0-1");
  const int b = swarm.serve(model.string() + ":0-1");
  swarm.serve(model.string() + ":2-3");
  auto engine = connect(swarm);
  ASSERT_TRUE(engine);
  wait_covered(*engine);
  // Kill whichever of the two servers of blocks [0, 2) the route uses, mid-generation.
  const std::string id_a = swarm.node_id(a), id_b = swarm.node_id(b);
  Output out = generate(*engine, "hello world", 24, [&](int index) {
    if (index != 8) return;
    const bool uses_a = events.any(id_a.substr(0, 8) + "[0,2)");
    swarm.nodes[static_cast<size_t>(uses_a ? a : b)].kill_now();
  });
  EXPECT_EQ(out.ids, reference.ids);
  auto counters = engine->counters();
  EXPECT_GE(counters.replacements, 1) << events.all();
  EXPECT_TRUE(events.any("moved to")) << events.all();
  std::printf("failover stall: %.3f s\n", counters.last_stall_s);

  // With every server of [0, 2) gone the client gives up with a clear error, no hang.
  swarm.nodes[static_cast<size_t>(a)].kill_now();
  swarm.nodes[static_cast<size_t>(b)].kill_now();
  infer::SamplingParams params;
  params.max_tokens = 4;
  auto failed = engine->generate(engine->encode("hello"), params, [](const infer::TokenEvent&) { return true; });
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(failed.error().kind == ErrorKind::not_found || failed.error().kind == ErrorKind::unavailable)
      << failed.message();
}

// A server that freezes (SIGSTOP) mid-generation is replaced after the step
// timeout; the output does not change.
TEST_F(ChainTest, FrozenServerIsReplacedAfterTheStepTimeout) {
  Swarm swarm(dir);
  const int a = swarm.serve(model.string() + ":0-3");
  const int b = swarm.serve(model.string() + ":0-3");
  auto engine = connect(swarm, 0.0, 2s);
  ASSERT_TRUE(engine);
  wait_covered(*engine);
  const std::string id_a = swarm.node_id(a);
  int frozen = -1;
  Output out = generate(*engine, "hello world", 24, [&](int index) {
    if (index != 5) return;
    frozen = events.any(id_a.substr(0, 8) + "[0,4)") ? a : b;
    ::kill(swarm.nodes[static_cast<size_t>(frozen)].pid(), SIGSTOP);
  });
  ASSERT_GE(frozen, 0);
  ::kill(swarm.nodes[static_cast<size_t>(frozen)].pid(), SIGCONT);  // so that it can be stopped cleanly
  EXPECT_EQ(out.ids, reference.ids);
  auto counters = engine->counters();
  EXPECT_EQ(counters.replacements, 1) << events.all();
  auto avoided = engine->avoided();
  EXPECT_EQ(avoided, std::vector<std::string>{swarm.node_id(frozen)});
}

// A server answering mis-shaped states is dropped from the route and reported;
// its blocks move to another server and the output is the one-process output.
TEST_F(ChainTest, MalformedStatesDropTheServer) {
  Swarm swarm(dir);
  const int bad = swarm.serve(model.string() + ":0-1", {"--cheat", "malformed-states"});
  const int good = swarm.serve(model.string() + ":0-1");
  swarm.serve(model.string() + ":2-3");
  const std::string good_id = swarm.node_id(good);
  // The honest server looks 50 ms away, so the route takes the bad one first.
  auto engine = connect(swarm, 0.0, 5s, [good_id](const std::string& id) { return id == good_id ? 0.05 : 0.0; });
  ASSERT_TRUE(engine);
  wait_covered(*engine);
  Output out = generate(*engine, "hello world", 24);
  EXPECT_EQ(out.ids, reference.ids);
  EXPECT_TRUE(events.any("returned malformed states")) << events.all();
  EXPECT_EQ(engine->avoided(), std::vector<std::string>{swarm.node_id(bad)});
}

TEST_F(ChainTest, SpotChecksCatchAServerReturningGarbage) {
  Swarm swarm(dir);
  const int honest1 = swarm.serve(model.string() + ":0-1");
  const int honest2 = swarm.serve(model.string() + ":0-1");
  const int cheat = swarm.serve(model.string() + ":0-1", {"--cheat", "garbage-states"});
  swarm.serve(model.string() + ":2-3");
  auto engine = connect(swarm, /*spot_checks=*/1.0);
  ASSERT_TRUE(engine);
  wait_covered(*engine);
  const std::string cheat_id = swarm.node_id(cheat);
  auto avoided = [&] {
    auto list = engine->avoided();
    return std::find(list.begin(), list.end(), cheat_id) != list.end();
  };
  for (int attempt = 0; attempt < 6 && !avoided(); ++attempt) generate(*engine, "hello world", 16);
  ASSERT_TRUE(avoided()) << events.all();
  EXPECT_TRUE(events.any("spot check mismatch")) << events.all();
  EXPECT_TRUE(events.any(cheat_id)) << events.all();
  auto list = engine->avoided();
  EXPECT_EQ(std::count(list.begin(), list.end(), swarm.node_id(honest1)), 0);
  EXPECT_EQ(std::count(list.begin(), list.end(), swarm.node_id(honest2)), 0);
  EXPECT_GT(engine->counters().spot_checks, 0);
  // From then on the cheater is not used, and the output is the one-process output.
  Output clean = generate(*engine, "hello world", 24);
  EXPECT_EQ(clean.ids, reference.ids);
}

}  // namespace

namespace {

// `solvernet devnet --serve --init MODEL`: block servers and the gateway on this
// machine; a streamed completion over HTTP equals the one-process greedy text;
// Ctrl-C stops everything, leaving no process behind.
TEST_F(ChainTest, DevnetServesTheModelThroughTheGateway) {
  const int port = free_loopback_port(SOCK_STREAM).value();
  SpawnOptions options;
  options.stdout_path = dir / "devnet.out";
  options.stderr_path = dir / "devnet.err";
  auto devnet = ChildProcess::spawn({bin(), "devnet", "--serve", "--init", model.string(), "--no-chain",
                                     "--serve-nodes", "2", "--gateway-listen", "127.0.0.1:" + std::to_string(port),
                                     "--serve-for", "120"},
                                    options);
  ASSERT_TRUE(devnet.ok()) << devnet.message();
  ASSERT_TRUE(wait_for_text(dir / "devnet.out", "try: curl", 90s))
      << read_file(dir / "devnet.out").value_or("") << read_file(dir / "devnet.err").value_or("");
  // The gateway's route needs both servers' announcements: retry until a completion comes back whole.
  const std::string request = R"({"prompt": "hello world", "max_tokens": 24, "temperature": 0, "stream": true})";
  std::string body;
  for (int attempt = 0; attempt < 30 && body.find("[DONE]") == std::string::npos; ++attempt) {
    SpawnOptions curl;
    curl.stdout_path = dir / "curl.out";
    curl.stderr_path = dir / "curl.err";
    auto child = ChildProcess::spawn({"curl", "-sN", "--max-time", "30", "-H", "Content-Type: application/json", "-d",
                                      request, "http://127.0.0.1:" + std::to_string(port) + "/v1/completions"},
                                     curl);
    ASSERT_TRUE(child.ok());
    child->wait_for(60s);
    body = read_file(dir / "curl.out").value_or("");
    if (body.find("[DONE]") == std::string::npos) std::this_thread::sleep_for(1s);
  }
  ASSERT_NE(body.find("data: [DONE]"), std::string::npos) << body;
  // Concatenate the streamed pieces.
  std::string streamed;
  for (size_t at = 0; (at = body.find("data: {", at)) != std::string::npos;) {
    const size_t end = body.find('\n', at);
    auto chunk = nlohmann::json::parse(body.substr(at + 6, end - at - 6));
    streamed += chunk["choices"][0]["text"].get<std::string>();
    at = end;
  }
  EXPECT_EQ(streamed, reference.text);
  // Ctrl-C: the devnet stops its servers and gateway and exits 130.
  ::kill(devnet->pid(), SIGINT);
  auto status = devnet->wait_for(30s);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 130);
  // Nothing the devnet started is left: the DHT and servers carry --parent-pid, the gateway its --listen.
  for (const std::string pattern : {"--parent-pid " + std::to_string(devnet->pid()), "127.0.0.1:" + std::to_string(port)}) {
    SpawnOptions quiet;
    quiet.stdout_path = dir / "pgrep.out";
    auto pgrep = ChildProcess::spawn({"pgrep", "-f", "--", pattern}, quiet);
    ASSERT_TRUE(pgrep.ok());
    EXPECT_NE(pgrep->wait(), 0) << pattern << " left behind: " << read_file(dir / "pgrep.out").value_or("");
  }
}

}  // namespace
