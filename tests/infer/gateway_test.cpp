// The OpenAI-compatible gateway as a user meets it: real `solvernet gateway
// --model tiny.safetensors` processes on 127.0.0.1, driven by Python's
// http.client (gateway_client.py): models, completions whole and streamed,
// chat, stop strings, every error with its status and OpenAI's error shape,
// a client that vanishes mid-stream, 429 at the concurrency limit, API keys,
// and 64 streams at once.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/fs.h"
#include "core/job.h"
#include "core/process.h"
#include "test_model.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return std::getenv("SOLVERNET_BIN") ? std::getenv("SOLVERNET_BIN") : ""; }
fs::path client_script() {
  return fs::path(std::getenv("SOLVERNET_SOURCE_DIR")) / "tests/infer/gateway_client.py";
}

struct Gateway {
  fs::path dir;
  std::string address;
  ChildProcess process;
};

// Starts `solvernet gateway` on a free port with FLAGS (--model or
// --bootstrap, and the rest); waits until it serves (LIMIT: finding block servers takes longer).
void start_gateway(Gateway& gateway, const std::vector<std::string>& flags, std::chrono::seconds limit = 30s) {
  const uint16_t port = free_loopback_port(SOCK_STREAM).value();
  gateway.address = "127.0.0.1:" + std::to_string(port);
  std::vector<std::string> argv = {bin(), "gateway", "--listen", gateway.address};
  argv.insert(argv.end(), flags.begin(), flags.end());
  SpawnOptions spawn;
  spawn.stdout_path = gateway.dir / "gateway.out";
  spawn.stderr_path = gateway.dir / "gateway.err";
  auto child = ChildProcess::spawn(argv, spawn);
  ASSERT_TRUE(child.ok()) << child.message();
  gateway.process = std::move(*child);
  for (auto until = std::chrono::steady_clock::now() + limit; std::chrono::steady_clock::now() < until;) {
    if (read_file(spawn.stdout_path).value_or("").find("gateway: serving") != std::string::npos) return;
    ASSERT_TRUE(gateway.process.running()) << "the gateway exited: " << read_file(spawn.stderr_path).value_or("");
    std::this_thread::sleep_for(50ms);
  }
  FAIL() << "the gateway did not start within " << limit.count() << " s: " << read_file(spawn.stderr_path).value_or("");
}

json client(const Gateway& gateway, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"python3", client_script().string(), gateway.address};
  argv.insert(argv.end(), args.begin(), args.end());
  auto out = run_command(argv);
  EXPECT_TRUE(out.ok()) << out.message();
  if (!out.ok()) return json::object();
  json parsed = json::parse(*out, nullptr, false);
  EXPECT_FALSE(parsed.is_discarded()) << *out;
  return parsed;
}

json post(const Gateway& gateway, const std::string& path, const json& body) {
  return client(gateway, {"request", "POST", path, body.dump()});
}

json post_raw(const Gateway& gateway, const std::string& path, const std::string& body) {
  return client(gateway, {"request", "POST", path, body});
}

json stream(const Gateway& gateway, const std::string& path, json body) {
  body["stream"] = true;
  return client(gateway, {"stream", path, body.dump()});
}

json metrics(const Gateway& gateway) { return client(gateway, {"request", "GET", "/metrics", "-"})["body"]; }

// STATUS and OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
void expect_error(const json& reply, int status, const std::string& code = "", const std::string& param = "") {
  EXPECT_EQ(reply.value("status", 0), status) << reply.dump();
  ASSERT_TRUE(reply.contains("body") && reply["body"].is_object() && reply["body"].contains("error")) << reply.dump();
  const json& error = reply["body"]["error"];
  ASSERT_TRUE(error.is_object()) << reply.dump();
  EXPECT_TRUE(error["message"].is_string() && !error["message"].get<std::string>().empty()) << reply.dump();
  EXPECT_TRUE(error["type"].is_string()) << reply.dump();
  EXPECT_TRUE(error.contains("param") && error.contains("code")) << reply.dump();
  if (!code.empty()) EXPECT_EQ(error["code"], code) << reply.dump();
  if (!param.empty()) EXPECT_EQ(error["param"], param) << reply.dump();
  EXPECT_NE(reply.value("content_type", "").find("application/json"), std::string::npos) << reply.dump();
}

std::string message_of(const json& reply) { return reply["body"]["error"].value("message", ""); }

class GatewayTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (bin().empty()) return;
    dir_ = fs::temp_directory_path() / ("sn-gateway-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "main");
    fs::create_directories(dir_ / "slow");
    model_ = infer::testing::write_tiny_model(dir_ / "tiny.safetensors");
  }
  static void TearDownTestSuite() {
    for (Gateway* g : {&main_, &slow_, &keyed_})
      if (g->process.pid() > 0) g->process.terminate();
    fs::remove_all(dir_);
  }
  void SetUp() override {
    if (bin().empty()) GTEST_SKIP() << "SOLVERNET_BIN is not set (ctest sets it)";
    ASSERT_TRUE(fs::exists(bin())) << bin() << " does not exist: build target solvernet";
  }
  // Each gateway is started on first use and serves every test after.
  static Gateway& started(Gateway& gateway, const std::string& name, const std::vector<std::string>& flags) {
    if (gateway.process.pid() <= 0) {
      gateway.dir = dir_ / name;
      fs::create_directories(gateway.dir);
      std::vector<std::string> all = {"--model", model_.string()};
      all.insert(all.end(), flags.begin(), flags.end());
      start_gateway(gateway, all);
    }
    return gateway;
  }
  Gateway& main_gateway() { return started(main_, "main", {"--max-concurrency", "8"}); }
  // Slow tokens, so a test can act while streams run; 2 generations at most.
  Gateway& slow_gateway() {
    return started(slow_, "slow", {"--max-concurrency", "2", "--token-delay-ms", "40", "--json-log"});
  }
  Gateway& keyed_gateway() {
    fs::create_directories(dir_ / "keyed");
    std::ofstream(dir_ / "keyed" / "keys") << "# test keys\nsk-first\n\nsk-second\n";
    return started(keyed_, "keyed", {"--api-key-file", (dir_ / "keyed" / "keys").string()});
  }

  static fs::path dir_, model_;
  static Gateway main_, slow_, keyed_;
};

fs::path GatewayTest::dir_, GatewayTest::model_;
Gateway GatewayTest::main_, GatewayTest::slow_, GatewayTest::keyed_;

TEST_F(GatewayTest, ListsItsModel) {
  json reply = client(main_gateway(), {"request", "GET", "/v1/models", "-"});
  ASSERT_EQ(reply["status"], 200) << reply.dump();
  const json& data = reply["body"]["data"];
  ASSERT_EQ(data.size(), 1u) << reply.dump();
  EXPECT_EQ(data[0]["object"], "model");
  EXPECT_EQ(data[0]["context_length"], 64);
  EXPECT_FALSE(data[0]["id"].get<std::string>().empty());
  json one = client(main_gateway(), {"request", "GET", "/v1/models/" + data[0]["id"].get<std::string>(), "-"});
  EXPECT_EQ(one["status"], 200) << one.dump();
  expect_error(client(main_gateway(), {"request", "GET", "/v1/models/no-such-model", "-"}), 404, "model_not_found");
}

TEST_F(GatewayTest, CompletionStreamedEqualsWholeAndEndsWithDone) {
  const json body = {{"prompt", "Hello world"}, {"max_tokens", 20}, {"temperature", 0}};
  json whole = post(main_gateway(), "/v1/completions", body);
  ASSERT_EQ(whole["status"], 200) << whole.dump();
  const json& answer = whole["body"];
  EXPECT_EQ(answer["object"], "text_completion");
  const json& usage = answer["usage"];
  EXPECT_GT(usage["prompt_tokens"].get<int>(), 0);
  EXPECT_EQ(usage["completion_tokens"], 20) << "greedy with no stop runs to max_tokens";
  EXPECT_EQ(usage["total_tokens"].get<int>(), usage["prompt_tokens"].get<int>() + 20);
  EXPECT_EQ(answer["choices"][0]["finish_reason"], "length");
  const std::string text = answer["choices"][0]["text"];

  json streamed = stream(main_gateway(), "/v1/completions", body);
  ASSERT_EQ(streamed["status"], 200) << streamed.dump();
  EXPECT_NE(streamed["content_type"].get<std::string>().find("text/event-stream"), std::string::npos);
  EXPECT_TRUE(streamed["done"]) << "no final data: [DONE]";
  EXPECT_EQ(streamed["text"], text) << "streamed chunks differ from the whole answer";
  EXPECT_EQ(streamed["finish_reason"], "length");
  // One event per token, then the finishing one.
  EXPECT_EQ(streamed["events"].size(), 21u) << streamed.dump();
  for (const auto& event : streamed["events"]) EXPECT_EQ(event["object"], "text_completion");

  // Seeded sampling is as reproducible, streamed or not; it gives a varied
  // text to cut. A stop string cuts it before its first occurrence; a second
  // one whose start appears but whose end never can ("\x01" is no token) makes
  // the stream hold text back and release it later: the chunks still add up.
  json sampled_body = body;
  sampled_body["temperature"] = 1.0;
  sampled_body["seed"] = 5;
  json sampled = post(main_gateway(), "/v1/completions", sampled_body);
  ASSERT_EQ(sampled["status"], 200) << sampled.dump();
  const std::string sampled_text = sampled["body"]["choices"][0]["text"];
  EXPECT_EQ(stream(main_gateway(), "/v1/completions", sampled_body)["text"], sampled_text);
  ASSERT_GE(sampled_text.size(), 12u) << sampled.dump();
  const std::string stop = sampled_text.substr(8, 2), near_miss = sampled_text.substr(1, 2) + "\x01";
  const std::string expected = sampled_text.substr(0, sampled_text.find(stop));
  json stop_body = sampled_body;
  stop_body["stop"] = json::array({near_miss, stop});
  json stopped = post(main_gateway(), "/v1/completions", stop_body);
  ASSERT_EQ(stopped["status"], 200) << stopped.dump();
  EXPECT_EQ(stopped["body"]["choices"][0]["text"], expected) << "stop " << json(stop).dump() << " in " << sampled.dump();
  EXPECT_EQ(stopped["body"]["choices"][0]["finish_reason"], "stop");
  json stopped_stream = stream(main_gateway(), "/v1/completions", stop_body);
  EXPECT_EQ(stopped_stream["text"], expected) << stopped_stream.dump();
  EXPECT_EQ(stopped_stream["finish_reason"], "stop");
  EXPECT_TRUE(stopped_stream["done"]);
}

TEST_F(GatewayTest, ChatWholeAndStreamed) {
  const json body = {{"messages", json::array({{{"role", "system"}, {"content", "Be brief."}},
                                               {{"role", "user"}, {"content", "Hi there"}}})},
                     {"max_tokens", 12},
                     {"temperature", 0},
                     {"model", "tiny-test"}};
  json whole = post(main_gateway(), "/v1/chat/completions", body);
  ASSERT_EQ(whole["status"], 200) << whole.dump();
  const json& answer = whole["body"];
  EXPECT_EQ(answer["object"], "chat.completion");
  EXPECT_EQ(answer["choices"][0]["message"]["role"], "assistant");
  const std::string reply = answer["choices"][0]["message"]["content"];
  EXPECT_GT(answer["usage"]["prompt_tokens"].get<int>(), 10) << "the template and both messages are in the prompt";

  json streamed = stream(main_gateway(), "/v1/chat/completions", body);
  ASSERT_EQ(streamed["status"], 200) << streamed.dump();
  EXPECT_TRUE(streamed["done"]);
  EXPECT_EQ(streamed["text"], reply);
  EXPECT_EQ(streamed["events"][0]["object"], "chat.completion.chunk");
  EXPECT_EQ(streamed["events"][0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(streamed["finish_reason"], answer["choices"][0]["finish_reason"]);
}

TEST_F(GatewayTest, BadRequestsGetOpenAIErrors) {
  Gateway& g = main_gateway();
  expect_error(post_raw(g, "/v1/completions", "{\"prompt\": \"Hi\","), 400, "invalid_json");
  expect_error(post_raw(g, "/v1/completions", "[1, 2]"), 400, "invalid_json");
  expect_error(post(g, "/v1/completions", {{"max_tokens", 4}}), 400, "missing_field", "prompt");
  expect_error(post(g, "/v1/completions", {{"prompt", 42}}), 400, "invalid_type", "prompt");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"max_tokens", "ten"}}), 400, "invalid_type", "max_tokens");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 0}}), 400, "invalid_value", "max_tokens");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"temperature", 5}}), 400, "invalid_value", "temperature");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"top_p", 0}}), 400, "invalid_value", "top_p");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"stream", "yes"}}), 400, "invalid_type", "stream");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"stop", json::array({"a", "b", "c", "d", "e"})}}), 400,
               "invalid_value", "stop");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"n", 3}}), 400, "", "n");
  expect_error(post(g, "/v1/completions", {{"prompt", ""}}), 400, "empty_prompt", "prompt");
  expect_error(post(g, "/v1/completions", {{"prompt", "Hi"}, {"model", "gpt-4"}}), 404, "model_not_found", "model");
  expect_error(post(g, "/v1/chat/completions", {{"prompt", "Hi"}}), 400, "missing_field", "messages");
  expect_error(post(g, "/v1/chat/completions", {{"messages", json::array({{{"role", "wizard"}, {"content", "x"}}})}}),
               400, "invalid_value", "messages[0].role");
  expect_error(client(g, {"request", "GET", "/v2/nothing", "-"}), 404);
  json big = client(g, {"big", "/v1/completions", std::to_string((1 << 20) + 1000)});
  expect_error(big, 413);
  EXPECT_NE(message_of(big).find("1048576"), std::string::npos) << big.dump();
  EXPECT_EQ(client(g, {"request", "GET", "/v1/models", "-"})["status"], 200) << "the gateway is still up";
}

TEST_F(GatewayTest, ContextLimitsNameTheFigures) {
  Gateway& g = main_gateway();
  const std::string long_prompt(200, 'x');  // one token a character: far past the 64-token context
  json too_long = post(g, "/v1/completions", {{"prompt", long_prompt}, {"max_tokens", 4}});
  expect_error(too_long, 400, "context_length_exceeded", "prompt");
  EXPECT_NE(message_of(too_long).find("64"), std::string::npos) << too_long.dump();

  json truncated = post(g, "/v1/completions", {{"prompt", long_prompt}, {"max_tokens", 4}, {"truncate_prompt", true}});
  ASSERT_EQ(truncated["status"], 200) << truncated.dump();
  EXPECT_LE(truncated["body"]["usage"]["total_tokens"].get<int>(), 64) << truncated.dump();
  EXPECT_EQ(truncated["body"]["usage"]["completion_tokens"], 4) << truncated.dump();

  json too_many = post(g, "/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 1000}});
  expect_error(too_many, 400, "context_length_exceeded", "max_tokens");
  EXPECT_NE(message_of(too_many).find("at most 63"), std::string::npos) << too_many.dump();
  json no_room = post(g, "/v1/completions", {{"prompt", std::string(60, 'y')}, {"max_tokens", 10}});
  expect_error(no_room, 400, "context_length_exceeded", "max_tokens");
  EXPECT_NE(message_of(no_room).find("at most"), std::string::npos) << no_room.dump();
}

TEST_F(GatewayTest, ApiKeysAreRequiredWhenConfigured) {
  Gateway& g = keyed_gateway();
  expect_error(client(g, {"request", "GET", "/v1/models", "-"}), 401, "invalid_api_key");
  expect_error(client(g, {"request", "GET", "/v1/models", "-", "sk-wrong"}), 401, "invalid_api_key");
  EXPECT_EQ(client(g, {"request", "GET", "/v1/models", "-", "sk-first"})["status"], 200);
  json ok = client(g, {"request", "POST", "/v1/completions", json{{"prompt", "Hi"}, {"max_tokens", 2}}.dump(), "sk-second"});
  EXPECT_EQ(ok["status"], 200) << ok.dump();
}

TEST_F(GatewayTest, DisconnectedClientCancelsItsGeneration) {
  Gateway& g = slow_gateway();
  const json before = metrics(g);
  json left = client(g, {"disconnect", "/v1/completions",
                         json{{"prompt", "Hi"}, {"max_tokens", 60}, {"stream", true}}.dump(), "3"});
  EXPECT_EQ(left["status"], 200) << left.dump();
  EXPECT_EQ(left["events_read"], 3) << left.dump();
  // 60 tokens at 40 ms would take 2.4 s; the cancel comes at the next write.
  json m;
  for (int i = 0; i < 100; ++i) {
    m = metrics(g);
    if (m.value("sessions_open", -1) == 0 && m.value("cancelled", 0) > before.value("cancelled", 0)) break;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_EQ(m["sessions_open"], 0) << m.dump();
  EXPECT_EQ(m["cancelled"].get<int>(), before["cancelled"].get<int>() + 1) << m.dump();
  EXPECT_LT(m["tokens"].get<int>() - before["tokens"].get<int>(), 60) << "the generation ran to its end: " << m.dump();
}

TEST_F(GatewayTest, BeyondMaxConcurrencyIs429WithRetryAfter) {
  Gateway& g = slow_gateway();
  // Six 40-token streams at once against a limit of 2: each takes 1.6 s.
  json out = client(g, {"concurrent", "6", "/v1/completions",
                        json{{"prompt", "Hi"}, {"max_tokens", 40}, {"stream", true}, {"temperature", 0}}.dump()});
  const json& statuses = out["statuses"];
  EXPECT_GE(statuses.value("200", 0), 2) << out.dump();
  EXPECT_GE(statuses.value("429", 0), 1) << out.dump();
  EXPECT_EQ(statuses.value("200", 0) + statuses.value("429", 0), 6) << out.dump();
  EXPECT_EQ(out["completed"], statuses.value("200", 0)) << out.dump();
  EXPECT_EQ(out["refused_with_retry_after"], statuses.value("429", 0)) << out.dump();
  EXPECT_EQ(out["texts"].size(), 1u) << "greedy streams differ: " << out.dump();
  // The access log has a line per request.
  const std::string log = read_file(g.dir / "gateway.err").value_or("");
  EXPECT_NE(log.find("\"status\":429"), std::string::npos) << log;
}

TEST_F(GatewayTest, SixtyFourConcurrentStreamsCompleteOrAreRefused) {
  Gateway& g = main_gateway();
  json out = client(g, {"concurrent", "64", "/v1/chat/completions",
                        json{{"messages", json::array({{{"role", "user"}, {"content", "Tell me more"}}})},
                             {"max_tokens", 16}, {"temperature", 0}, {"stream", true}}.dump()});
  const json& statuses = out["statuses"];
  EXPECT_TRUE(out["exceptions"].empty()) << "hung or broken: " << out.dump();
  EXPECT_EQ(statuses.value("200", 0) + statuses.value("429", 0) + statuses.value("503", 0), 64) << out.dump();
  EXPECT_EQ(out["completed"], statuses.value("200", 0)) << out.dump();
  EXPECT_GE(statuses.value("200", 0), 8) << out.dump();
  EXPECT_EQ(out["refused_with_retry_after"], 64 - statuses.value("200", 0)) << out.dump();
  EXPECT_EQ(out["texts"].size(), 1u) << "greedy streams differ: " << out.dump();
  const json m = metrics(g);
  EXPECT_EQ(m["sessions_open"], 0) << m.dump();
  EXPECT_GE(m["tokens"].get<int>(), 16 * statuses.value("200", 0)) << m.dump();
  EXPECT_GT(m["token_latency_p95_ms"].get<double>(), 0) << m.dump();
  EXPECT_EQ(client(g, {"request", "GET", "/v1/models", "-"})["status"], 200) << "the gateway is down";
  EXPECT_TRUE(g.process.running());
  // The live line on stderr (on a file: the first after 1 s, then when the figures change, every 5 s at most).
  bool live = false;
  for (int i = 0; i < 100 && !live; ++i, std::this_thread::sleep_for(100ms))
    live = read_file(g.dir / "gateway.err").value_or("").find("tok/s, per-token p50") != std::string::npos;
  EXPECT_TRUE(live) << read_file(g.dir / "gateway.err").value_or("");
}

// The gateway over the network: two block servers (`node --serve`) holding
// the model's halves, `gateway --bootstrap`. Its greedy answers, whole and
// streamed, equal those of the model in one process; with every server gone a
// request is a 503 with Retry-After, and the gateway stays up.
TEST_F(GatewayTest, OverBlockServersEqualsOneProcessThen503) {
  const fs::path dir = dir_ / "network";
  fs::create_directories(dir);
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
  const int dht_port = free_loopback_port(SOCK_DGRAM).value();
  auto dht = ChildProcess::spawn({bin(), "dht", "--port", std::to_string(dht_port)}, quiet);
  ASSERT_TRUE(dht.ok()) << dht.message();
  const std::string bootstrap = "127.0.0.1:" + std::to_string(dht_port);
  std::vector<ChildProcess> servers;
  for (const std::string span : {":0-1", ":2-3"}) {
    const std::string name = "node" + std::to_string(servers.size());
    SpawnOptions options;
    options.stdout_path = options.stderr_path = dir / (name + ".log");
    auto node = ChildProcess::spawn({bin(), "node", "--data", (dir / name).string(), "--listen", "127.0.0.1:0",
                                     "--dht-port", "0", "--bootstrap", bootstrap, "--serve", model_.string() + span},
                                    options);
    ASSERT_TRUE(node.ok()) << node.message();
    servers.push_back(std::move(*node));
  }
  Gateway remote;
  remote.dir = dir;
  start_gateway(remote, {"--bootstrap", bootstrap, "--spot-check", "0"}, 60s);
  if (HasFatalFailure()) {
    for (const auto& log : {"node0.log", "node1.log"}) ADD_FAILURE() << log << ": " << read_file(dir / log).value_or("");
    return;
  }

  // Both name the model by its manifest's hash.
  const json local_models = client(main_gateway(), {"request", "GET", "/v1/models", "-"});
  const json remote_models = client(remote, {"request", "GET", "/v1/models", "-"});
  EXPECT_EQ(remote_models["body"]["data"][0]["id"], local_models["body"]["data"][0]["id"]) << remote_models.dump();

  const json body = {{"prompt", "Hello world"}, {"max_tokens", 12}, {"temperature", 0}};
  json local = post(main_gateway(), "/v1/completions", body);
  json over_network = post(remote, "/v1/completions", body);
  ASSERT_EQ(local["status"], 200) << local.dump();
  ASSERT_EQ(over_network["status"], 200) << over_network.dump() << read_file(dir / "gateway.err").value_or("");
  EXPECT_EQ(over_network["body"]["choices"][0]["text"], local["body"]["choices"][0]["text"]);
  EXPECT_EQ(over_network["body"]["usage"], local["body"]["usage"]);
  json streamed = stream(remote, "/v1/completions", body);
  EXPECT_EQ(streamed["text"], local["body"]["choices"][0]["text"]) << streamed.dump();
  EXPECT_TRUE(streamed["done"]);
  const json engine = metrics(remote)["engine"];
  EXPECT_GT(engine.value("steps", 0.0), 0) << "no route counters in /metrics: " << engine.dump();
  EXPECT_EQ(engine.value("spot_check_mismatches", -1.0), 0) << engine.dump();

  for (auto& server : servers) server.kill_now();
  json gone = post(remote, "/v1/completions", body);
  expect_error(gone, 503, "engine_unavailable");
  EXPECT_FALSE(gone["retry_after"].get<std::string>().empty()) << gone.dump();
  EXPECT_EQ(metrics(remote)["sessions_open"], 0);
  EXPECT_TRUE(remote.process.running());
  remote.process.terminate();
  dht->terminate();
}

// Bad flags: one line naming the problem, exit 2, before any model is loaded
// or port bound.
TEST_F(GatewayTest, BadFlagsExit2WithOneLine) {
  const fs::path dir = dir_ / "flags";
  fs::create_directories(dir);
  std::ofstream(dir / "empty-keys") << "# no key here\n\n";
  const Gateway& busy = main_gateway();  // holds its port
  const std::string model = model_.string();
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{}, "--model or --bootstrap is required"},
      {{"--model", model, "--bootstrap", "127.0.0.1:1"}, "excludes"},
      {{"--model", (dir / "missing.safetensors").string()}, "no such file"},
      {{"--model", model, "--listen", "nope"}, "--listen"},
      {{"--model", model, "--max-concurrency", "0"}, "--max-concurrency must be in 1..1024"},
      {{"--model", model, "--api-key-file", (dir / "empty-keys").string()}, "holds no key"},
      {{"--model", model, "--api-key-file", (dir / "no-such-file").string()}, "cannot be read"},
      {{"--model", model, "--listen", busy.address}, "is in use"},
  };
  for (const auto& [flags, expected] : cases) {
    std::vector<std::string> argv = {bin(), "gateway"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    SpawnOptions spawn;
    fs::remove(dir / "out");
    spawn.stdout_path = spawn.stderr_path = dir / "out";
    auto child = ChildProcess::spawn(argv, spawn);
    ASSERT_TRUE(child.ok()) << child.message();
    const auto code = child->wait_for(30s);
    const std::string out = read_file(dir / "out").value_or("");
    EXPECT_EQ(code, 2) << json(flags).dump() << ": " << out;
    EXPECT_NE(out.find(expected), std::string::npos) << json(flags).dump() << ": " << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << json(flags).dump() << ": " << out;
  }
}

}  // namespace
