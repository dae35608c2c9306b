// Bad input of every kind gets one line naming the problem (and the limit) and
// exit 2, before any work starts (issue 15, kinds 1, 2 and 7). Each test runs the
// real solvernet binary on the shared inputs, generated in a temp dir:
// corpus.txt (400 lines of a dozen common words) and job J.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/job.h"
#include "model/gpt.h"
#include "model/safetensors.h"

namespace fs = std::filesystem;

namespace {

struct CliRun {
  int exit_code = -1;
  std::string out, err;
};

std::string solvernet_bin() {
  if (const char* bin = std::getenv("SOLVERNET_BIN")) return bin;
  return (fs::read_symlink("/proc/self/exe").parent_path() / "../../solvernet").lexically_normal().string();
}

std::string slurp(const fs::path& path) {
  std::stringstream s;
  s << std::ifstream(path).rdbuf();
  return s.str();
}

class CliInput : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/sn-cli-input-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // corpus.txt: 400 lines of a dozen common English words.
    const char* words[] = {"the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "its", "home"};
    std::ofstream corpus(dir_ / "corpus.txt");
    for (int line = 0; line < 400; ++line) {
      for (int w = 0; w < 12; ++w) corpus << (w ? " " : "") << words[(line * 7 + w * 5) % 12];
      corpus << "\n";
    }
    write("J.toml", job_text("corpus.txt", 64, 1));
    // A two-device topology; [data] cache_dir keeps the tokenizer cache in the temp dir.
    write("topo.toml", "[[region]]\nname = \"a\"\nnodes = 2\nlatency_ms = 1\nbandwidth_mbps = 1000\n");
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string job_text(const std::string& corpus, int vocab, int stages) const {
    return "[model]\nlayers = 2\nd_model = 32\nheads = 2\nd_ff = 64\nvocab = " + std::to_string(vocab) +
           "\nseq_len = 16\n\n[data]\ncorpus = \"" + corpus + "\"\ncache_dir = \"" + (dir_ / "cache").string() +
           "\"\n\n[parallel]\nstages = " + std::to_string(stages) + "\nreplicas = 1\nmicro_batches = 1\n\n"
           "[train]\nglobal_batch = 8\nsteps = 5\n";
  }
  fs::path write(const std::string& name, const std::string& text) const {
    std::ofstream(dir_ / name, std::ios::binary) << text;
    return dir_ / name;
  }
  fs::path path(const std::string& name) const { return dir_ / name; }

  // Runs `solvernet ARGS` in the temp dir with a short wall-clock cap.
  CliRun run(const std::string& args) const {
    const std::string cmd = "cd " + dir_.string() + " && timeout 60 " + solvernet_bin() + " " + args + " >" +
                            (dir_ / "out.txt").string() + " 2>" + (dir_ / "err.txt").string() + " </dev/null";
    const int status = std::system(cmd.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir_ / "out.txt"), slurp(dir_ / "err.txt")};
  }

  // The contract: exit 2, exactly one line on stderr, containing every one of NEEDLES.
  void expect_refused(const std::string& args, std::initializer_list<std::string> needles) const {
    const CliRun r = run(args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << ": not one line:\n" << r.err;
    for (const auto& needle : needles) EXPECT_NE(r.err.find(needle), std::string::npos) << args << "\n" << r.err;
    EXPECT_EQ(r.err.find("Exception raised from"), std::string::npos) << r.err;  // no LibTorch trace
  }

  fs::path dir_;
};

const std::string kAddress = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8";

// Kind 1: amounts that overflow, are negative, fractional below one wei or malformed
// are refused before the chain is contacted (--rpc points at nothing).
TEST_F(CliInput, WalletAmountsAreCheckedBeforeAnythingIsSent) {
  ASSERT_EQ(run("wallet new --out key").exit_code, 0);
  const std::string chain = " --rpc http://127.0.0.1:9 --deployment none.json";
  expect_refused("wallet send --key key --to " + kAddress + " --amount 340282366920938463464eth" + chain,
                 {"too large", "at most 340282366920938463463374607431768211455 wei"});
  expect_refused("wallet send --key key --to " + kAddress + " --amount 340282366920938463463374607431768211456" + chain,
                 {"too large"});
  expect_refused("wallet fund --to " + kAddress + " --amount 999999999999999999999999999999gwei" + chain, {"too large"});
  expect_refused("wallet stake --key key --amount -1" + chain, {"negative"});
  expect_refused("wallet unstake --key key --amount 0.5" + chain, {"fraction of a wei"});
  expect_refused("wallet stake --key key --amount 1.0000000001gwei" + chain, {"fraction of a wei"});
  expect_refused("wallet send --key key --to " + kAddress + " --amount 12abc" + chain, {"not a number of wei"});
  expect_refused("wallet send --key key --to 0x1234 --amount 1" + chain, {"--to", "20 bytes"});
}

// Kind 2: `plan --stages` more than the model's layers, as a job file already refuses.
TEST_F(CliInput, PlanStagesBeyondLayersIsRefusedLikeAJobFile) {
  write("model.toml", "[model]\nlayers = 4\nd_model = 64\nheads = 4\nvocab = 512\nseq_len = 64\n");
  write("big.toml", "[[region]]\nname = \"a\"\nnodes = 16\nlatency_ms = 1\nbandwidth_mbps = 1000\n");
  expect_refused("plan --topology big.toml --model model.toml --stages 8 --replicas 1",
                 {"--stages (8) exceeds model.layers (4)"});
  expect_refused("plan --topology big.toml --model model.toml --stages 0 --replicas 1", {"--stages must be in [1, 1024]"});
  expect_refused("plan --topology big.toml --model model.toml --stages 2 --replicas -1", {"--replicas"});
  write("J8.toml", job_text("corpus.txt", 64, 8));
  expect_refused("train --local --job J8.toml", {"parallel.stages (8) exceeds model.layers (2)"});
  EXPECT_EQ(run("plan --topology big.toml --model model.toml --stages 4 --replicas 2").exit_code, 0);
}

// Kind 2: topology links out of range (the emulator's nanosecond delay must stay finite).
TEST_F(CliInput, TopologyLinksOutOfRangeAreRefused) {
  write("model.toml", "[model]\nlayers = 4\nd_model = 64\nheads = 4\nvocab = 512\nseq_len = 64\n");
  for (const std::string link : {"latency_ms = 1\nbandwidth_mbps = 1e-300", "latency_ms = 1\nbandwidth_mbps = 1e301",
                                 "latency_ms = 1e12\nbandwidth_mbps = 100", "latency_ms = -1\nbandwidth_mbps = 100",
                                 "latency_ms = nan\nbandwidth_mbps = 100", "latency_ms = 1\nbandwidth_mbps = inf"}) {
    write("bad.toml", "[[region]]\nname = \"a\"\nnodes = 4\n" + link + "\n");
    expect_refused("plan --topology bad.toml --model model.toml --stages 2 --replicas 2", {"bad.toml:", "must be in"});
  }
  // The example, on the devnet (whose emulated delay overflowed).
  write("bad.toml", "[[region]]\nname = \"a\"\nnodes = 4\nlatency_ms = 1\nbandwidth_mbps = 1e-300\n");
  expect_refused("devnet --no-chain --topology bad.toml --job J.toml", {"bad.toml:5:", "bandwidth_mbps must be in"});
}

// Kind 2: a plan too large for this machine is refused naming the estimate and the
// machine's memory, before the n² matrices are allocated (was std::bad_alloc).
TEST_F(CliInput, PlanTooLargeForMemoryIsRefusedWithTheEstimate) {
  write("model.toml", "[model]\nlayers = 4\nd_model = 64\nheads = 4\nvocab = 512\nseq_len = 64\n");
  write("huge.toml", "[[region]]\nname = \"a\"\nnodes = 1000000\nlatency_ms = 1\nbandwidth_mbps = 1000\n");
  expect_refused("plan --topology huge.toml --model model.toml --stages 2 --replicas 2",
                 {"a plan on 1000000 devices needs about 48000.0 GB", "this machine's"});
  write("many.toml", "[[region]]\nname = \"a\"\nnodes = 9000000\nlatency_ms = 1\nbandwidth_mbps = 1000\n"
                     "[[region]]\nname = \"b\"\nnodes = 9000000\nlatency_ms = 1\nbandwidth_mbps = 1000\n"
                     "[default_link]\nlatency_ms = 1\nbandwidth_mbps = 1000\n");
  expect_refused("plan --topology many.toml --model model.toml --stages 2 --replicas 2", {"more than the limit of"});
}

// Kind 2: every CLI override under the job file's rules.
TEST_F(CliInput, OverridesFollowTheJobFilesRules) {
  for (const std::string steps : {"-3", "0", "2000000000000"})
    expect_refused("train --local --job J.toml --steps " + steps, {"--steps " + steps, "train.steps must be in [1, "});
  expect_refused("devnet --no-chain --topology topo.toml --job J.toml --steps 0", {"train.steps must be in"});
  expect_refused("train --local --job J.toml --steps many", {"--steps"});
  expect_refused("train --job J.toml --bootstrap 127.0.0.1:9 --wait-s 0", {"--wait-s must be in [1, 86400]"});
  expect_refused("train --local --job J.toml --time-dilation -1", {"--time-dilation"});
  expect_refused("train --local --job J.toml --time-dilation 1e300", {"--time-dilation"});
  expect_refused("train --local --job J.toml --algo best", {"--algo"});
  expect_refused("devnet --no-chain --topology topo.toml --job J.toml --nodes -3", {"--nodes must be at least 1"});
  expect_refused("devnet --no-chain --topology topo.toml --job J.toml --nodes 3", {"--nodes asks for 3"});
  // Without --nodes the message must not say that --nodes asked for anything.
  write("J4.toml", job_text("corpus.txt", 64, 2).replace(job_text("corpus.txt", 64, 2).find("replicas = 1"), 12,
                                                           "replicas = 2"));
  const CliRun r = run("devnet --no-chain --topology topo.toml --job J4.toml");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(r.err.find("--nodes"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the job needs 4 (2 stages × 2 replicas)"), std::string::npos) << r.err;
}

// Kind 7: outputs that could not be written are refused before the work, not after it.
TEST_F(CliInput, OutputPathsAreCheckedBeforeTheWork) {
  expect_refused("train --local --job J.toml --out missing/model.safetensors", {"--out", "does not exist"});
  fs::create_directory(path("adir"));
  expect_refused("train --local --job J.toml --out adir", {"--out", "is a directory"});
  expect_refused("devnet --no-chain --topology topo.toml --job J.toml --out missing/m.safetensors", {"--out"});
  expect_refused("devnet --no-chain --topology topo.toml --job J.toml --summary-json missing/s.json",
                 {"--summary-json", "does not exist"});
  expect_refused("devnet --no-chain --topology topo.toml --job J.toml --summary-json adir", {"is a directory"});
  EXPECT_FALSE(fs::exists(path("devnet-model.safetensors")));
}

// Kinds 2 and 7: --init weights are checked whole, naming the tensor, before any node
// is started or contacted and before the corpus is prepared.
TEST_F(CliInput, InitWeightsAreCheckedBeforeAnyNode) {
  write("empty.safetensors", "");
  write("model.bin", std::string("PK\x03\x04", 4) + std::string(200, 'x'));  // a PyTorch .bin is a zip
  write("pickle.bin", std::string("\x80\x02}q\x00", 5) + std::string(40, 'x'));
  sn::ModelConfig wrong;
  wrong.layers = 2;
  wrong.d_model = 16;  // J has 32
  wrong.heads = 2;
  wrong.d_ff = 64;
  wrong.vocab = 64;
  wrong.seq_len = 16;
  const std::string bytes =
      sn::model::safetensors_bytes(sn::model::StageModel(wrong, 0, 2, 1).named_parameters());
  write("wrong.safetensors", bytes);
  sn::ModelConfig right = wrong;
  right.d_model = 32;
  const std::string good = sn::model::safetensors_bytes(sn::model::StageModel(right, 0, 2, 1).named_parameters());
  write("truncated.safetensors", good.substr(0, good.size() / 2));
  fs::create_directory(path("adir"));
  // The devnet was the path that blamed a node; every kind of bad file on it.
  const std::string devnet = "devnet --no-chain --topology topo.toml --job J.toml";
  expect_refused(devnet + " --init empty.safetensors", {"not a safetensors file", "empty"});
  expect_refused(devnet + " --init model.bin", {"not a safetensors file", "zip"});
  expect_refused(devnet + " --init pickle.bin", {"not a safetensors file", "pickle"});
  expect_refused(devnet + " --init truncated.safetensors", {"truncated"});
  expect_refused(devnet + " --init nothing.safetensors", {"--init", "no such file"});
  expect_refused(devnet + " --init adir", {"--init", "is a directory"});
  // The same message on every path, --local included.
  for (const std::string& where : {std::string("train --local --job J.toml"),
                                   std::string("train --job J.toml --bootstrap 127.0.0.1:9"), devnet})
    expect_refused(where + " --init wrong.safetensors",
                   {"wrong.safetensors: tensor wte.weight has shape [64, 16], the job's model needs [64, 32]"});
  expect_refused("train --local --job J.toml --init model.bin", {"not a safetensors file", "zip"});
  EXPECT_FALSE(fs::exists(path("cache"))) << "the corpus was prepared before the weights were checked";
}

// Kind 2: corpora that would reach spm_train's internals or train into garbage.
TEST_F(CliInput, CorpusProblemsNameTheJobFieldNotSpmTrain) {
  // One line of 229,795 bytes (spm_train skipped it and printed its log).
  std::string line;
  while (line.size() < 229795) line += "the cat sat on a mat ";
  write("oneline.txt", line.substr(0, 229795));
  write("J1.toml", job_text("oneline.txt", 64, 1));
  expect_refused("train --local --job J1.toml", {"line 1 is 229795 bytes long", "100000-byte limit"});
  // 65 distinct Chinese characters and model.vocab = 64.
  std::string zh;
  for (int l = 0; l < 400; ++l) {
    for (int c = 0; c < 40; ++c) {
      const uint32_t code = 0x4e00 + static_cast<uint32_t>((l * 40 + c) % 65);
      zh += static_cast<char>(0xe0 | (code >> 12));
      zh += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      zh += static_cast<char>(0x80 | (code & 0x3f));
    }
    zh += "\n";
  }
  write("zh.txt", zh);
  write("Jzh.toml", job_text("zh.txt", 64, 1));
  expect_refused("train --local --job Jzh.toml", {"65 distinct characters", "model.vocab must be at least 70", "got 64"});
  // Binary data and non-UTF-8 text.
  write("bin.txt", std::string("abc\0def\n", 8));
  write("Jbin.toml", job_text("bin.txt", 64, 1));
  expect_refused("train --local --job Jbin.toml", {"NUL byte"});
  write("latin1.txt", "caf\xe9 au lait\n");
  write("Jl1.toml", job_text("latin1.txt", 64, 1));
  expect_refused("train --local --job Jl1.toml", {"line 1 is not UTF-8", "0xe9"});
  write("blank.txt", "\n\n  \n");
  write("Jblank.toml", job_text("blank.txt", 64, 1));
  expect_refused("train --local --job Jblank.toml", {"no text"});
  // Too few pieces for the vocabulary: spm_train's refusal becomes a line naming model.vocab.
  write("Jbig.toml", job_text("corpus.txt", 2048, 1));
  expect_refused("train --local --job Jbig.toml", {"model.vocab"});
  // A tokenizer trained on other text would turn this corpus into <unk>s.
  std::string unk = job_text("zh.txt", 64, 1);
  unk.insert(unk.find("cache_dir"), "tokenizer_corpus = \"corpus.txt\"\n");
  write("Junk.toml", unk);
  expect_refused("train --local --job Junk.toml", {"are <unk>", "data.tokenizer_corpus"});
  // The devnet checks the corpus before it starts a process.
  write("Jnone.toml", job_text("nothing.txt", 64, 1));
  expect_refused("devnet --no-chain --topology topo.toml --job Jnone.toml", {"nothing.txt", "not a readable file"});
}

// Kind 2: a model too large to build in this process is refused with the estimate,
// not a std::bad_alloc or a LibTorch trace.
TEST_F(CliInput, ModelTooLargeForMemoryIsRefusedWithTheEstimate) {
  write("Jhuge.toml", "[model]\nlayers = 4096\nd_model = 65536\nheads = 1024\nd_ff = 65536\nvocab = 64\n"
                      "seq_len = 16\n\n[data]\ncorpus = \"corpus.txt\"\n");
  expect_refused("train --local --job Jhuge.toml", {"training the job's model (", "GB of memory", "this machine's"});
}

// Kind 8's small lies: the summary counts the nodes the job ran on, not every node
// seen, and its links row has no empty field. One real devnet (no chain): three
// node processes, a job that needs one.
TEST_F(CliInput, SummaryCountsTheNodesUsed) {
  write("topo3.toml", "name = \"three\"\n[[region]]\nname = \"a\"\nnodes = 3\nlatency_ms = 1\nbandwidth_mbps = 1000\n");
  const CliRun r = run("devnet --no-chain --topology topo3.toml --job J.toml --summary-json summary.json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto summary = nlohmann::json::parse(slurp(path("summary.json")));
  EXPECT_EQ(summary["nodes"], 1);
  EXPECT_EQ(summary["nodes_seen"], 3);
  EXPECT_NE(r.out.find("  nodes                  1 (1 stages × 1 replicas)\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  links                  three raw (T = 1, R = 1)\n"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(path("devnet-model.safetensors")));
  // The job dir was in the devnet's temp dir, removed on exit: neither the
  // JSON nor the table names it (they did, a path that was gone).
  ASSERT_TRUE(summary.contains("recovery")) << summary.dump(2);
  const std::string job_dir = summary["recovery"]["job_dir"];
  EXPECT_TRUE(job_dir.empty() || fs::exists(job_dir)) << job_dir;
  EXPECT_EQ(r.out.find("/tmp/solvernet-devnet-"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  job dir                not kept"), std::string::npos) << r.out;
}

// The devnet's hidden --kill-at (repeatable): each entry is checked against
// the job's roles, and one role killed twice at one step is refused.
TEST_F(CliInput, DevnetKillPlansAreChecked) {
  const std::string devnet = "devnet --no-chain --topology topo.toml --job J.toml";
  const std::string must = "--kill-at must be STEP:STAGE.REPLICA with STEP in 1..5 and a role within the job's 1 × 1";
  expect_refused(devnet + " --kill-at 3:1.0", {must, "3:1.0"});
  expect_refused(devnet + " --kill-at 3:0.0 --kill-at 2:0.1", {must, "2:0.1"});
  expect_refused(devnet + " --kill-at 3:0.0x", {must, "3:0.0x"});
  expect_refused(devnet + " --kill-at 3:0.0 --kill-at 3:0.0", {"--kill-at 3:0.0 is given twice"});
  // Overflow, a sign or a space, and a step the 5-step job never reports.
  expect_refused(devnet + " --kill-at 99999999999999999999999:0.0", {must, "99999999999999999999999:0.0"});
  expect_refused(devnet + " --kill-at +4:+0.+0", {must, "+4:+0.+0"});
  expect_refused(devnet + " --kill-at ' 4:0.0'", {must, " 4:0.0"});
  expect_refused(devnet + " --kill-at -1:0.0", {must});
  expect_refused(devnet + " --kill-at 6:0.0", {must, "6:0.0"});
  expect_refused(devnet + " --kill-at 0:0.0", {must, "0:0.0"});
  expect_refused(devnet + " --kill-at 4:0.0 --kill-delay-ms -5", {"--kill-delay-ms must be in 0..600000, got -5"});
  expect_refused(devnet + " --kill-at 4:0.0 --restart-after-s -1", {"--restart-after-s must be in 0..86400, got -1"});
  expect_refused(devnet + " --join-at-step -3", {"--join-at-step must be in 1..5 (the job's steps), got -3"});
  expect_refused(devnet + " --join-at-step 6", {"--join-at-step must be in 1..5"});
}

// Ports out of 0..65535 used to wrap (dht --port 70000 listened on 4464), a
// node's peer timeout of 0 s was taken, and a data dir's lock file that is a
// symlink had its target overwritten with the pid.
TEST_F(CliInput, PortsTimeoutsAndALinkedLockFileAreRefused) {
  expect_refused("dht --port 70000", {"--port", "70000", "65535"});
  expect_refused("node --data n --dht-port 65536", {"--dht-port", "65536"});
  expect_refused("node --data n --peer-timeout-s 0", {"--peer-timeout-s", "0"});
  expect_refused("node --data n --kill-self-at setup:0", {"--kill-self-at must be CALL:N", "setup:0"});
  expect_refused("node --data n --stall-at setup:1", {"--stall-at must be CALL:N:MS", "setup:1"});
  expect_refused("node --data n --stall-at setup:1:-5", {"--stall-at must be CALL:N:MS", "setup:1:-5"});
  fs::create_directories(path("m"));
  write("target", "keep me");
  fs::create_symlink(path("target"), path("m") / "lock");
  expect_refused("node --data m --listen 127.0.0.1:0 --dht-port 0", {"lock is a symbolic link"});
  EXPECT_EQ(slurp(path("target")), "keep me");
}

// --resume used to ignore --init and --job-dir silently (and create the latter).
TEST_F(CliInput, ResumeRefusesFlagsItWouldIgnore) {
  expect_refused("train --resume jd --init w.safetensors --bootstrap 127.0.0.1:1", {"--init", "--resume"});
  expect_refused("train --resume jd --job-dir other --bootstrap 127.0.0.1:1", {"--job-dir", "--resume"});
  EXPECT_FALSE(fs::exists(path("other")));
}

}  // namespace
