// Model distribution: manifests and chunks in one process, then fetching over
// the DHT between real `solvernet node` processes on 127.0.0.1 — resumed after
// a SIGKILL, and with a provider whose chunks are corrupt on disk.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <thread>

#include "core/fs.h"
#include "core/keys.h"
#include "core/process.h"
#include "infer/model_store.h"
#include "infer/span.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "net/rpc.h"
#include "proto/solvernet.grpc.pb.h"
#include "swarm.h"
#include "test_model.h"

namespace fs = std::filesystem;
using namespace sn;
using namespace std::chrono_literals;

namespace {

std::string bin() { return infer::testing::solvernet_bin(); }
fs::path scratch(const std::string& name) { return infer::testing::scratch("model-store", name); }

fs::path write_model(const fs::path& path, uint64_t seed = 7) { return infer::testing::write_tiny_model(path, seed); }

std::map<std::string, torch::Tensor> by_name(const model::NamedTensors& tensors) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : tensors) out[name] = t;
  return out;
}

void flip_byte(const fs::path& path, int64_t at) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(at);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(at);
  f.write(&c, 1);
}

}  // namespace

TEST(ModelStore, PublishSplitsIntoChunksThatLoadBackBitwise) {
  auto dir = scratch("publish");
  auto file = write_model(dir / "tiny.safetensors");
  auto store = infer::ModelStore::open(dir / "store");
  ASSERT_TRUE(store.ok()) << store.message();
  auto id = (*store)->publish(file);
  ASSERT_TRUE(id.ok()) << id.message();

  // The id is the hash of the manifest's bytes as stored, and those bytes are canonical.
  auto stored = read_file(dir / "store" / "manifests" / (*id + ".json"));
  ASSERT_TRUE(stored.ok());
  EXPECT_EQ(to_hex(hash_string(*stored)), *id);
  EXPECT_EQ(stored->find_first_of(" \n"), std::string::npos);
  auto m = infer::parse_manifest(*stored);
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_EQ(m->name, "tiny-test");
  EXPECT_EQ(m->config.layers, 4);
  ASSERT_EQ(m->chunks.size(), 6u);
  EXPECT_EQ(m->chunks.front().label(), "embed");
  EXPECT_EQ(m->chunks[3].label(), "block.2");
  EXPECT_EQ(m->chunks.back().label(), "head");
  for (const auto& c : m->chunks)
    EXPECT_EQ(to_hex(hash_string(read_file(dir / "store" / "chunks" / c.hash).value_or(""))), c.hash) << c.label();

  // Publishing again is the same model; a different model is a different id.
  EXPECT_EQ((*store)->publish(file).value_or(""), *id);
  auto other = (*store)->publish(write_model(dir / "other.safetensors", 8));
  ASSERT_TRUE(other.ok());
  EXPECT_NE(*other, *id);
  EXPECT_EQ((*store)->complete_models(), (std::vector<std::string>{std::min(*id, *other), std::max(*id, *other)}));

  // Whole model: every tensor back, bitwise.
  auto original = infer::load_model_file(file);
  ASSERT_TRUE(original.ok()) << original.message();
  auto whole = (*store)->load_span(*id, 0, 4);
  ASSERT_TRUE(whole.ok()) << whole.message();
  auto loaded = by_name(*whole);
  EXPECT_EQ(loaded.size(), original->tensors.size());
  for (const auto& [name, t] : original->tensors) {
    ASSERT_TRUE(loaded.count(name)) << name;
    EXPECT_TRUE(torch::equal(loaded[name], t)) << name;
  }
  EXPECT_EQ((*store)->tokenizer_vocab(*id).value_or(""), original->tokenizer_vocab);

  // A middle span holds only its blocks; a last span also the tied embedding.
  auto middle = by_name((*store)->load_span(*id, 1, 3).value());
  EXPECT_EQ(middle.size(), 24u);
  EXPECT_TRUE(middle.count("blocks.1.ln1.weight") && middle.count("blocks.2.mlp.proj.bias"));
  auto last = by_name((*store)->load_span(*id, 3, 4).value());
  EXPECT_TRUE(last.count("wte.weight") && last.count("ln_f.bias") && last.count("blocks.3.attn.qkv.weight"));
  EXPECT_FALSE(last.count("blocks.2.ln1.weight"));

  // Bad spans and ids are input errors.
  EXPECT_EQ((*store)->load_span(*id, 2, 5).error().kind, ErrorKind::invalid_input);
  EXPECT_EQ((*store)->load_span(*id, 2, 2).error().kind, ErrorKind::invalid_input);
  EXPECT_EQ((*store)->manifest(std::string(64, '0')).error().kind, ErrorKind::not_found);
  EXPECT_EQ((*store)->manifest("../../etc/passwd").error().kind, ErrorKind::invalid_input);
  fs::remove_all(dir);
}

TEST(ModelStore, ManifestsThatAreNotCanonicalAreRefused) {
  auto dir = scratch("canonical");
  auto store = infer::ModelStore::open(dir / "store");
  ASSERT_TRUE(store.ok());
  auto id = (*store)->publish(write_model(dir / "tiny.safetensors"));
  ASSERT_TRUE(id.ok()) << id.message();
  std::string bytes = (*store)->manifest(*id)->bytes;
  EXPECT_TRUE(infer::parse_manifest(bytes).ok());
  auto pretty = nlohmann::json::parse(bytes).dump(1);
  EXPECT_FALSE(infer::parse_manifest(pretty).ok());
  auto wrong_format = nlohmann::json::parse(bytes);
  wrong_format["format"] = "solvernet-model-v0";
  auto refused = infer::parse_manifest(wrong_format.dump());
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("format"), std::string::npos) << refused.message();
  auto missing_block = nlohmann::json::parse(bytes);
  missing_block["chunks"].erase(2);
  EXPECT_FALSE(infer::parse_manifest(missing_block.dump()).ok());
  EXPECT_FALSE(infer::parse_manifest("not json").ok());

  EXPECT_EQ(infer::parse_block_range("1-2", 4, "--blocks").value(), std::make_pair(1, 3));
  EXPECT_EQ(infer::parse_block_range("3", 4, "--blocks").value(), std::make_pair(3, 4));
  for (const char* bad : {"2-1", "0-4", "-1", "a-b", "", "1-", "99999999999"}) {
    auto r = infer::parse_block_range(bad, 4, "--blocks");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.message().find("--blocks"), std::string::npos);
  }
  fs::remove_all(dir);
}

TEST(ModelStore, ATamperedChunkIsNeverLoaded) {
  auto dir = scratch("tampered");
  auto store = infer::ModelStore::open(dir / "store");
  ASSERT_TRUE(store.ok());
  auto id = (*store)->publish(write_model(dir / "tiny.safetensors"));
  ASSERT_TRUE(id.ok()) << id.message();
  auto m = (*store)->manifest(*id);
  const auto& block2 = m->chunks[3];
  ASSERT_EQ(block2.label(), "block.2");
  flip_byte(dir / "store" / "chunks" / block2.hash, block2.bytes - 5);

  auto refused = (*store)->load_span(*id, 0, 4);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("block.2"), std::string::npos) << refused.message();
  EXPECT_NE(refused.message().find("does not match"), std::string::npos) << refused.message();
  EXPECT_FALSE((*store)->load_span(*id, 2, 3).ok());
  // Spans that do not need the block still load.
  EXPECT_TRUE((*store)->load_span(*id, 0, 2).ok());
  EXPECT_TRUE((*store)->load_span(*id, 3, 4).ok());

  // A damaged tokenizer is caught the same way.
  flip_byte(dir / "store" / "chunks" / m->tokenizer.hash, 0);
  auto vocab = (*store)->tokenizer_vocab(*id);
  ASSERT_FALSE(vocab.ok());
  EXPECT_NE(vocab.message().find("tokenizer"), std::string::npos) << vocab.message();
  fs::remove_all(dir);
}

TEST(ModelStore, TheServiceServesOnlyChunksByTheirHash) {
  auto dir = scratch("service");
  auto store = infer::ModelStore::open(dir / "store");
  ASSERT_TRUE(store.ok());
  auto id = (*store)->publish(write_model(dir / "tiny.safetensors"));
  ASSERT_TRUE(id.ok()) << id.message();
  auto m = (*store)->manifest(*id);
  NodeKey key = NodeKey::generate();
  auto server = net::start_server("127.0.0.1:0", (*store)->service(), key);
  ASSERT_TRUE(server.ok()) << server.message();
  auto stub = solvernet::v1::ModelStore::NewStub(
      net::make_channel("127.0.0.1:" + std::to_string(server->port), key.node_id()));
  auto get_chunk = [&](const std::string& hash, int64_t offset, int64_t max_bytes, solvernet::v1::GetChunkReply* reply) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    solvernet::v1::GetChunkRequest request;
    request.set_hash(hash);
    request.set_offset(offset);
    request.set_max_bytes(max_bytes);
    return stub->GetChunk(&context, request, reply).error_code();
  };
  const auto& block1 = m->chunks[2];
  const std::string bytes = read_file(dir / "store" / "chunks" / block1.hash).value();
  solvernet::v1::GetChunkReply reply;
  ASSERT_EQ(get_chunk(block1.hash, 1000, 500, &reply), grpc::OK);
  EXPECT_EQ(reply.data(), bytes.substr(1000, 500));
  EXPECT_EQ(reply.total_bytes(), block1.bytes);
  ASSERT_EQ(get_chunk(block1.hash, 0, 0, &reply), grpc::OK);  // 0: as much as a reply carries
  EXPECT_EQ(reply.data(), bytes);
  // Only 64 hex digits name a file: no path reaches outside chunks/.
  EXPECT_EQ(get_chunk("../manifests/" + *id + ".json", 0, 100, &reply), grpc::NOT_FOUND);
  EXPECT_EQ(get_chunk(std::string(64, '0'), 0, 100, &reply), grpc::NOT_FOUND);
  EXPECT_EQ(get_chunk(block1.hash, -1, 100, &reply), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(get_chunk(block1.hash, block1.bytes + 1, 100, &reply), grpc::INVALID_ARGUMENT);

  grpc::ClientContext context;
  solvernet::v1::GetManifestRequest request;
  request.set_model(*id);
  solvernet::v1::GetManifestReply manifest;
  ASSERT_TRUE(stub->GetManifest(&context, request, &manifest).ok());
  EXPECT_EQ(to_hex(hash_string(manifest.manifest())), *id);
  grpc::ClientContext unknown_context;
  request.set_model(std::string(64, 'f'));
  EXPECT_EQ(stub->GetManifest(&unknown_context, request, &manifest).error_code(), grpc::NOT_FOUND);
  server->server->Shutdown();
  fs::remove_all(dir);
}

// ---- real nodes ----

namespace {

struct Node {
  ChildProcess process;
  std::string id, address;
};

// Starts `solvernet node` on DATA and waits for its "node ID listening on ADDRESS" line.
Node start_node(const fs::path& data, const std::string& bootstrap, const fs::path& log_dir) {
  SpawnOptions spawn;
  spawn.stdout_path = log_dir / (data.filename().string() + ".out");
  spawn.stderr_path = log_dir / (data.filename().string() + ".err");
  auto child = ChildProcess::spawn({bin(), "node", "--data", data.string(), "--listen", "127.0.0.1:0", "--dht-port", "0",
                                    "--bootstrap", bootstrap, "--memory-limit-mb", "256"},
                                   spawn);
  EXPECT_TRUE(child.ok()) << child.message();
  Node node{std::move(child).value(), "", ""};
  std::regex line("node ([0-9a-f]{64}) listening on (\\S+) ");
  for (int i = 0; i < 300 && node.address.empty(); ++i) {
    std::this_thread::sleep_for(100ms);
    std::smatch match;
    std::string out = read_file(spawn.stdout_path).value_or("");
    if (std::regex_search(out, match, line)) {
      node.id = match[1];
      node.address = match[2];
    }
    if (!node.process.running()) break;
  }
  EXPECT_FALSE(node.address.empty()) << "node did not start: " << read_file(spawn.stderr_path).value_or("");
  return node;
}

using test::CommandRun;
CommandRun run(const std::vector<std::string>& argv, const fs::path& dir) { return test::run_command(argv, dir, 60s); }

std::map<std::string, int64_t> chunk_files(const fs::path& chunks, bool parts) {
  std::map<std::string, int64_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(chunks, ec)) {
    std::string name = e.path().filename().string();
    if (name.ends_with(".part") == parts) out[name] = static_cast<int64_t>(e.file_size());
  }
  return out;
}

}  // namespace

TEST(ModelStore, FetchOverTheDhtResumesAfterAKillAndRefusesCorruptChunks) {
  auto dir = scratch("network");
  auto model = write_model(dir / "tiny.safetensors");

  // Node A holds the model intact; node C holds it with every block chunk corrupt on disk.
  CommandRun published = run({bin(), "model", "publish", model.string(), "--data", (dir / "a").string(), "--json"}, dir);
  ASSERT_EQ(published.status, 0) << published.err;
  const std::string id = nlohmann::json::parse(published.out)["id"];
  ASSERT_EQ(run({bin(), "model", "publish", model.string(), "--data", (dir / "c").string()}, dir).status, 0);
  auto c_store = infer::ModelStore::open(dir / "c" / "models");
  ASSERT_TRUE(c_store.ok());
  auto manifest = (*c_store)->manifest(id);
  ASSERT_TRUE(manifest.ok()) << manifest.message();
  for (const auto& chunk : manifest->chunks)
    if (chunk.kind == "block") flip_byte(dir / "c" / "models" / "chunks" / chunk.hash, chunk.bytes / 2);

  auto dht_port = free_loopback_port(SOCK_DGRAM);
  ASSERT_TRUE(dht_port.ok());
  SpawnOptions quiet;
  quiet.stdout_path = quiet.stderr_path = dir / "dht.log";
  auto dht = ChildProcess::spawn({bin(), "dht", "--port", std::to_string(*dht_port)}, quiet);
  ASSERT_TRUE(dht.ok());
  const std::string bootstrap = "127.0.0.1:" + std::to_string(*dht_port);
  Node a = start_node(dir / "a", bootstrap, dir);
  Node c = start_node(dir / "c", bootstrap, dir);
  ASSERT_FALSE(a.address.empty() || c.address.empty());
  const fs::path a_chunks = dir / "a" / "models" / "chunks";

  // 1. Node B fetches the model by its id alone, found through the DHT: bytes equal A's.
  CommandRun fetched = run({bin(), "model", "fetch", id, "--data", (dir / "b").string(), "--bootstrap", bootstrap,
                            "--json", "--wait-ms", "20000"},
                           dir);
  ASSERT_EQ(fetched.status, 0) << fetched.err;
  for (const auto& [name, size] : chunk_files(a_chunks, false))
    EXPECT_EQ(read_file(dir / "b" / "models" / "chunks" / name).value_or("?"), read_file(a_chunks / name).value())
        << name;
  EXPECT_TRUE(chunk_files(dir / "b" / "models" / "chunks", true).empty());
  CommandRun listed = run({bin(), "model", "ls", "--data", (dir / "b").string(), "--json"}, dir);
  ASSERT_EQ(listed.status, 0) << listed.err;
  auto ls = nlohmann::json::parse(listed.out);
  ASSERT_EQ(ls.size(), 1u);
  EXPECT_EQ(ls[0]["id"], id);
  EXPECT_TRUE(ls[0]["complete"].get<bool>());

  // A span: only the chunks blocks 1-2 need (tokenizer and the two blocks; no embed or head).
  CommandRun span = run({bin(), "model", "fetch", id, "--data", (dir / "s").string(), "--bootstrap", bootstrap,
                         "--blocks", "1-2", "--json", "--wait-ms", "20000"},
                        dir);
  ASSERT_EQ(span.status, 0) << span.err;
  std::set<std::string> want{manifest->tokenizer.hash, manifest->chunks[2].hash, manifest->chunks[3].hash};
  std::set<std::string> got;
  for (const auto& [name, size] : chunk_files(dir / "s" / "models" / "chunks", false)) got.insert(name);
  EXPECT_EQ(got, want);
  CommandRun span_ls = run({bin(), "model", "ls", "--data", (dir / "s").string(), "--json"}, dir);
  ASSERT_EQ(span_ls.status, 0) << span_ls.err;
  auto span_list = nlohmann::json::parse(span_ls.out);
  ASSERT_EQ(span_list.size(), 1u);
  EXPECT_FALSE(span_list[0]["complete"].get<bool>());
  EXPECT_EQ(span_list[0]["blocks_held"], nlohmann::json::array({1, 2}));

  // 2. Corrupt chunks are refused and fetched from the other provider. C is
  // asked first for some blocks (chunk i starts at provider i mod 2).
  {
    auto d_store = infer::ModelStore::open(dir / "d");
    ASSERT_TRUE(d_store.ok());
    auto report = (*d_store)->fetch(id, 0, 4, {{c.id, c.address}, {a.id, a.address}}, nullptr);
    ASSERT_TRUE(report.ok()) << report.message();
    ASSERT_FALSE(report->refused.empty());
    for (const auto& why : report->refused) {
      EXPECT_NE(why.find(c.id), std::string::npos) << why;
      EXPECT_NE(why.find("does not match"), std::string::npos) << why;
    }
    EXPECT_EQ(report->chunks_fetched, 7);
    EXPECT_TRUE((*d_store)->load_span(id, 0, 4).ok());
    for (const auto& [name, size] : chunk_files(a_chunks, false))
      EXPECT_EQ(read_file(dir / "d" / "chunks" / name).value_or("?"), read_file(a_chunks / name).value()) << name;
    // C alone cannot deliver a block: the error names the chunk, and nothing corrupt is kept.
    auto e_store = infer::ModelStore::open(dir / "e");
    auto only_c = (*e_store)->fetch(id, 1, 2, {{c.id, c.address}}, nullptr);
    ASSERT_FALSE(only_c.ok());
    EXPECT_EQ(only_c.error().kind, ErrorKind::unavailable);
    EXPECT_NE(only_c.message().find("block.1"), std::string::npos) << only_c.message();
    EXPECT_FALSE((*e_store)->has_chunks(id, 1, 2));
    EXPECT_TRUE(chunk_files(dir / "e" / "chunks", true).empty());
  }

  // 3. A fetch killed midway resumes: completed chunks are not fetched again,
  // and a partial chunk continues from its .part's size.
  c.process.terminate();  // from here on A is the only provider: every byte counted comes from it
  {
    const fs::path f_chunks = dir / "f" / "models" / "chunks";
    SpawnOptions spawn;
    spawn.stdout_path = dir / "slow.out";
    spawn.stderr_path = dir / "slow.err";
    auto slow = ChildProcess::spawn({bin(), "model", "fetch", id, "--data", (dir / "f").string(), "--bootstrap",
                                     bootstrap, "--max-rate-kbps", "200", "--wait-ms", "20000"},
                                    spawn);
    ASSERT_TRUE(slow.ok());
    bool midway = false;
    for (int i = 0; i < 600 && !midway; ++i) {
      std::this_thread::sleep_for(50ms);
      midway = chunk_files(f_chunks, false).size() >= 3 && !chunk_files(f_chunks, true).empty();
      ASSERT_TRUE(slow->running()) << "finished before it could be killed: " << read_file(spawn.stderr_path).value_or("");
    }
    ASSERT_TRUE(midway) << read_file(spawn.stderr_path).value_or("");
    ::kill(slow->pid(), SIGKILL);
    slow->wait();
    auto complete = chunk_files(f_chunks, false);
    auto parts = chunk_files(f_chunks, true);
    ASSERT_LT(complete.size(), 7u);
    std::map<std::string, ino_t> inodes;
    int64_t complete_bytes = 0, part_bytes = 0;
    for (const auto& [name, size] : complete) {
      struct stat st {};
      ::stat((f_chunks / name).c_str(), &st);
      inodes[name] = st.st_ino;
      complete_bytes += size;
    }
    for (const auto& [name, size] : parts) part_bytes += size;

    CommandRun resumed = run({bin(), "model", "fetch", id, "--data", (dir / "f").string(), "--bootstrap", bootstrap,
                              "--json", "--wait-ms", "20000"},
                             dir);
    ASSERT_EQ(resumed.status, 0) << resumed.err;
    auto report = nlohmann::json::parse(resumed.out);
    EXPECT_EQ(report["chunks_present"].get<size_t>(), complete.size());
    EXPECT_EQ(report["chunks_fetched"].get<size_t>(), 7 - complete.size());
    EXPECT_EQ(report["bytes_resumed"].get<int64_t>(), part_bytes);
    EXPECT_EQ(report["bytes_fetched"].get<int64_t>(), manifest->total_bytes() - complete_bytes - part_bytes);
    for (const auto& [name, inode] : inodes) {
      struct stat st {};
      ::stat((f_chunks / name).c_str(), &st);
      EXPECT_EQ(st.st_ino, inode) << name << " was written again";
    }
    for (const auto& [name, size] : chunk_files(a_chunks, false))
      EXPECT_EQ(read_file(f_chunks / name).value_or("?"), read_file(a_chunks / name).value()) << name;
  }

  // 4. A model published into a running node's store is announced without a restart.
  {
    auto second = write_model(dir / "second.safetensors", 9);
    CommandRun added = run({bin(), "model", "publish", second.string(), "--data", (dir / "a").string(), "--json"}, dir);
    ASSERT_EQ(added.status, 0) << added.err;
    const std::string second_id = nlohmann::json::parse(added.out)["id"];
    CommandRun got = run({bin(), "model", "fetch", second_id, "--data", (dir / "h").string(), "--bootstrap", bootstrap,
                          "--json", "--wait-ms", "20000"},
                         dir);
    ASSERT_EQ(got.status, 0) << got.err;
    EXPECT_EQ(nlohmann::json::parse(got.out)["chunks_fetched"], 7);
  }

  // Bad input: one line, exit 2, before any work.
  CommandRun bad_id = run({bin(), "model", "fetch", "xyz", "--data", (dir / "g").string(), "--bootstrap", bootstrap}, dir);
  EXPECT_EQ(bad_id.status, 2);
  EXPECT_NE(bad_id.err.find("not a model id"), std::string::npos) << bad_id.err;
  CommandRun bad_blocks = run({bin(), "model", "fetch", id, "--data", (dir / "b").string(), "--bootstrap", bootstrap,
                               "--blocks", "2-9"}, dir);
  EXPECT_EQ(bad_blocks.status, 2);
  EXPECT_NE(bad_blocks.err.find("--blocks 2-9"), std::string::npos) << bad_blocks.err;
  CommandRun not_a_model = run({bin(), "model", "publish", (dir / "dht.log").string(), "--data", (dir / "g").string()}, dir);
  EXPECT_EQ(not_a_model.status, 2) << not_a_model.err;

  a.process.terminate();
  dht->terminate();
  fs::remove_all(dir);
}
