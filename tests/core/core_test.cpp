#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "core/fs.h"
#include "core/hash.h"
#include "core/job.h"
#include "core/keys.h"
#include "core/merkle.h"
#include "core/process.h"

namespace fs = std::filesystem;
using namespace sn;

static fs::path temp_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("sn-core-test-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  return dir;
}

TEST(Keys, CreatedOnceThenReloadedWithSameId) {
  auto dir = temp_dir("keys");
  auto first = NodeKey::load_or_create(dir);
  ASSERT_TRUE(first.ok()) << first.message();
  auto second = NodeKey::load_or_create(dir);
  ASSERT_TRUE(second.ok()) << second.message();
  EXPECT_EQ(first->node_id(), second->node_id());
  EXPECT_EQ(first->node_id().size(), 64u);
  EXPECT_EQ(fs::status(dir / "node.key").permissions() & fs::perms::others_read, fs::perms::none);
  fs::remove_all(dir);
}

TEST(Keys, SignatureRejectsTamperedMessage) {
  NodeKey key = NodeKey::generate();
  std::string msg = "announce node at 127.0.0.1:7000";
  Signature sig = key.sign(as_bytes(msg));
  EXPECT_TRUE(verify_signature(key.public_key(), as_bytes(msg), sig));
  std::string tampered = msg;
  tampered[5] ^= 1;
  EXPECT_FALSE(verify_signature(key.public_key(), as_bytes(tampered), sig));
  NodeKey other = NodeKey::generate();
  EXPECT_FALSE(verify_signature(other.public_key(), as_bytes(msg), sig));
}

TEST(Keys, CorruptKeyFileIsAnError) {
  auto dir = temp_dir("corrupt");
  fs::create_directories(dir);
  ASSERT_TRUE(write_file_atomic(dir / "node.key", "garbage").ok());
  auto key = NodeKey::load_or_create(dir);
  ASSERT_FALSE(key.ok());
  EXPECT_NE(key.message().find("node.key"), std::string::npos);
  fs::remove_all(dir);
}

TEST(Hash, HexRoundTrip) {
  Hash256 h = hash_string("abc");
  auto back = from_hex(to_hex(h));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(std::string(h.begin(), h.end()), *back);
  EXPECT_FALSE(from_hex("abz").ok());
}

TEST(Hash, KeccakMatchesEthereum) {
  // Ethereum's Keccak-256 of the empty string and of a function signature
  // (the ERC-20 transfer selector is its first 4 bytes, a9059cbb).
  EXPECT_EQ(to_hex(keccak256(std::string_view(""))),
            "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
  EXPECT_EQ(to_hex(keccak256(std::string_view("transfer(address,uint256)"))).substr(0, 8), "a9059cbb");
}

TEST(Merkle, ProofsVerifyAndDetectTampering) {
  for (MerkleHash kind : {MerkleHash::blake2b, MerkleHash::keccak256}) {
    for (size_t n : {1u, 2u, 3u, 5u, 8u, 13u}) {
      std::vector<Hash256> leaves;
      for (size_t i = 0; i < n; ++i) leaves.push_back(merkle_leaf(as_bytes(std::to_string(i)), kind));
      Hash256 root = merkle_root(leaves, kind);
      for (size_t i = 0; i < n; ++i) {
        auto proof = merkle_proof(leaves, i, kind);
        EXPECT_TRUE(merkle_verify(root, leaves[i], proof, kind)) << n << " " << i;
        Hash256 wrong = merkle_leaf(as_bytes("x"), kind);
        EXPECT_FALSE(merkle_verify(root, wrong, proof, kind));
        if (n > 1) {
          // A proof made with one hash never verifies under the other.
          const MerkleHash other = kind == MerkleHash::blake2b ? MerkleHash::keccak256 : MerkleHash::blake2b;
          EXPECT_FALSE(merkle_verify(root, leaves[i], proof, other));
        }
      }
    }
  }
  // Keccak leaf and inner node, byte for byte as a contract computes them:
  // keccak256(abi.encodePacked(bytes1(0x00), leaf)), keccak256(abi.encodePacked(bytes1(0x01), l, r)).
  Hash256 a{}, b{};
  a.fill(0xaa);
  b.fill(0xbb);
  std::vector<uint8_t> leaf_bytes(33, 0xaa);
  leaf_bytes[0] = 0x00;
  EXPECT_EQ(merkle_leaf(a, MerkleHash::keccak256), keccak256(leaf_bytes));
  std::vector<uint8_t> pair(65);
  pair[0] = 0x01;
  std::copy(a.begin(), a.end(), pair.begin() + 1);
  std::copy(b.begin(), b.end(), pair.begin() + 33);
  EXPECT_EQ(merkle_root({a, b}, MerkleHash::keccak256), keccak256(pair));
}

TEST(Job, ParsesAndRoundTrips) {
  auto job = parse_job_string(R"(
name = "tiny"
[model]
layers = 4
d_model = 64
heads = 4
[parallel]
stages = 2
replicas = 2
micro_batches = 2
[train]
global_batch = 8
steps = 5
lr = 0.001
)", "job.toml");
  ASSERT_TRUE(job.ok()) << job.message();
  EXPECT_EQ(job->parallel.stages, 2);
  EXPECT_EQ(job->model.d_ff, 256);
  EXPECT_EQ(job->sequences_per_micro_batch(), 2);
  auto again = parse_job_string(job_to_toml(*job), "again.toml");
  ASSERT_TRUE(again.ok()) << again.message();
  EXPECT_EQ(job_to_toml(*again), job_to_toml(*job));
}

TEST(Job, ErrorsNameFileAndLine) {
  auto bad = parse_job_string("[model]\nlayers = 2\n\n[parallel]\nstages = 0\n", "j.toml");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.message(), "j.toml:5: parallel.stages must be in [1, 1024], got 0");
  EXPECT_EQ(bad.error().exit_code, kExitBadInput);

  auto typo = parse_job_string("[train]\nstepz = 3\n", "j.toml");
  ASSERT_FALSE(typo.ok());
  EXPECT_EQ(typo.message(), "j.toml:2: unknown key train.stepz");

  auto indivisible = parse_job_string("[parallel]\nreplicas = 3\n[train]\nglobal_batch = 8\n", "j.toml");
  ASSERT_FALSE(indivisible.ok());
  EXPECT_NE(indivisible.message().find("j.toml:4: train.global_batch (8) must be divisible"), std::string::npos);

  auto syntax = parse_job_string("[model\n", "j.toml");
  ASSERT_FALSE(syntax.ok());
  EXPECT_EQ(syntax.message().rfind("j.toml:1:", 0), 0u);

  // The name becomes part of file names on the nodes: no paths, no spaces.
  for (const char* name : {"../../etc/x", "a b", "", ".hidden", "x/y"}) {
    auto named = parse_job_string(fmt::format("name = \"{}\"\n", name), "j.toml");
    ASSERT_FALSE(named.ok()) << name;
    EXPECT_NE(named.message().find("j.toml:1: name must be 1 to 64 of the characters"), std::string::npos)
        << named.message();
  }
  EXPECT_TRUE(parse_job_string("name = \"tiny-fortunes_2.b\"\n", "j.toml").ok());
}

// Issue 15 kind 2: a CLI override is checked by the job file's own rules.
TEST(Job, OverridesFollowTheJobFilesRules) {
  auto job = parse_job_string("[model]\nlayers = 2\n[train]\nsteps = 5\nglobal_batch = 8\n", "j.toml");
  ASSERT_TRUE(job.ok()) << job.message();
  auto ten = override_job_integer(*job, "train.steps", 10, "--steps");
  ASSERT_TRUE(ten.ok()) << ten.message();
  EXPECT_EQ(ten->train.steps, 10);
  EXPECT_EQ(job->train.steps, 5);  // unchanged
  for (int64_t steps : {int64_t{-3}, int64_t{0}, (int64_t{1} << 40) + 1}) {
    auto bad = override_job_integer(*job, "train.steps", steps, "--steps");
    ASSERT_FALSE(bad.ok()) << steps;
    EXPECT_EQ(bad.error().exit_code, kExitBadInput);
    EXPECT_EQ(bad.message(), fmt::format("--steps {}: train.steps must be in [1, 1099511627776], got {}", steps, steps));
  }
  auto stages = override_job_integer(*job, "parallel.stages", 3, "--stages");
  ASSERT_FALSE(stages.ok());
  EXPECT_NE(stages.message().find("parallel.stages (3) exceeds model.layers (2)"), std::string::npos) << stages.message();
  auto batch = override_job_integer(*job, "train.global_batch", 7, "--global-batch");
  EXPECT_TRUE(batch.ok()) << batch.message();
  EXPECT_FALSE(override_job_integer(*job, "train.lr", 1, "--lr").ok());  // not an integer field
  EXPECT_TRUE(check_stages(job->model, 2, "--stages").ok());
  EXPECT_FALSE(check_stages(job->model, 3, "--stages").ok());
}

TEST(Job, CheckpointKeepDefaultsToThreeAndIsBounded) {
  auto plain = parse_job_string("[train]\nsteps = 3\n", "j.toml");
  ASSERT_TRUE(plain.ok()) << plain.message();
  EXPECT_EQ(plain->train.checkpoint_keep, 3);
  auto five = parse_job_string("[train]\ncheckpoint_keep = 5\n", "j.toml");
  ASSERT_TRUE(five.ok()) << five.message();
  EXPECT_EQ(five->train.checkpoint_keep, 5);
  EXPECT_NE(job_to_toml(*five).find("checkpoint_keep = 5"), std::string::npos);
  auto none = parse_job_string("[train]\ncheckpoint_keep = 0\n", "j.toml");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.message(), "j.toml:2: train.checkpoint_keep must be in [1, 1000], got 0");
  EXPECT_EQ(none.error().exit_code, kExitBadInput);
}

TEST(Process, RunCommandCapturesOutputAndFailure) {
  auto out = run_command({"sh", "-c", "echo hello"});
  ASSERT_TRUE(out.ok()) << out.message();
  EXPECT_EQ(*out, "hello\n");
  auto fail = run_command({"sh", "-c", "echo oops >&2; exit 3"});
  ASSERT_FALSE(fail.ok());
  EXPECT_NE(fail.message().find("status 3"), std::string::npos);
  EXPECT_NE(fail.message().find("oops"), std::string::npos);
}

TEST(Process, TerminateReapsChild) {
  auto child = ChildProcess::spawn({"sleep", "30"});
  ASSERT_TRUE(child.ok());
  pid_t pid = child->pid();
  EXPECT_TRUE(child->running());
  child->terminate(std::chrono::milliseconds(500));
  EXPECT_NE(::kill(pid, 0), 0);
}

TEST(Process, MissingProgramIsAnErrorAndNoChild) {
  auto child = ChildProcess::spawn({"solvernet-no-such-program-xyz"});
  ASSERT_FALSE(child.ok());
  EXPECT_EQ(child.error().kind, ErrorKind::not_found);
  EXPECT_NE(child.message().find("not found in PATH"), std::string::npos) << child.message();
}

TEST(Process, ChildDiesWithTheThreadThatStartedIt) {
  // PR_SET_PDEATHSIG: the kernel sends SIGTERM when the spawning thread ends,
  // as it would if the whole parent were SIGKILLed.
  ChildProcess child;
  std::thread([&] {
    auto spawned = ChildProcess::spawn({"sleep", "30"});
    ASSERT_TRUE(spawned.ok());
    child = std::move(spawned).value();
  }).join();
  EXPECT_EQ(child.wait_for(std::chrono::seconds(10)), std::optional<int>(128 + SIGTERM));
}

TEST(Process, TerminatingAGroupStopsWhatItStarted) {
  auto dir = std::filesystem::temp_directory_path() / ("sn-core-group-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  SpawnOptions options;
  options.new_process_group = true;
  // A wrapper (like anvil's Node.js one) whose real work is a grandchild.
  auto child = ChildProcess::spawn({"sh", "-c", "sleep 30 & echo $! > " + (dir / "pid").string() + "; wait"}, options);
  ASSERT_TRUE(child.ok());
  std::string pid_text;
  for (int i = 0; i < 100 && pid_text.empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    pid_text = read_file(dir / "pid").value_or("");
  }
  ASSERT_FALSE(pid_text.empty());
  const pid_t grandchild = std::stoi(pid_text);
  EXPECT_TRUE(is_same_or_group_member(grandchild, child->pid()));
  child->terminate(std::chrono::milliseconds(1000));
  // Gone, or a zombie waiting for whoever adopted it to reap it.
  auto running = [&] {
    auto stat = read_file("/proc/" + std::to_string(grandchild) + "/stat");
    if (!stat.ok()) return false;
    auto close = stat->rfind(')');
    return close != std::string::npos && close + 2 < stat->size() && (*stat)[close + 2] != 'Z';
  };
  for (int i = 0; i < 50 && running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(running()) << "the grandchild survived its group";
  std::filesystem::remove_all(dir);
}

TEST(Process, DirLockIsExclusiveAndNamesTheHolder) {
  auto dir = std::filesystem::temp_directory_path() / ("sn-core-lock-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  {
    auto first = DirLock::acquire(dir);
    ASSERT_TRUE(first.ok()) << first.message();
    auto second = DirLock::acquire(dir);
    ASSERT_FALSE(second.ok());
    EXPECT_EQ(second.error().exit_code, 2);
    EXPECT_NE(second.message().find("(pid " + std::to_string(::getpid()) + ")"), std::string::npos) << second.message();
    EXPECT_FALSE(wait_until_unlocked(dir, std::chrono::milliseconds(100)));
  }
  EXPECT_TRUE(wait_until_unlocked(dir, std::chrono::milliseconds(100)));
  EXPECT_TRUE(DirLock::acquire(dir).ok());
  auto bad = DirLock::acquire("/proc/solvernet-cannot-exist");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().exit_code, 2);
  std::filesystem::remove_all(dir);
}

TEST(Process, ListenerOfALocalPortIsFound) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t length = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  const uint16_t port = ntohs(addr.sin_port);
  EXPECT_FALSE(tcp_port_listening(port));  // bound, not listening
  ASSERT_EQ(::listen(fd, 1), 0);
  EXPECT_TRUE(tcp_port_listening(port));
  EXPECT_EQ(tcp_listener_pid(port), std::optional<pid_t>(::getpid()));
  EXPECT_NE(describe_pid(::getpid()).find("pid " + std::to_string(::getpid()) + " ("), std::string::npos);
  ::close(fd);
  EXPECT_FALSE(tcp_port_listening(port));
}

TEST(Job, DilocoTableParsesRoundTripsAndNamesItsLimits) {
  auto job = parse_job_string("[diloco]\ninner_steps = 10\nouter_lr = 0.5\nouter_momentum = 0.8\npseudo_grad = \"fp32\"\n",
                              "j.toml");
  ASSERT_TRUE(job.ok()) << job.message();
  EXPECT_TRUE(job->diloco.enabled);
  EXPECT_EQ(job->diloco.inner_steps, 10);
  EXPECT_DOUBLE_EQ(job->diloco.outer_lr, 0.5);
  EXPECT_DOUBLE_EQ(job->diloco.outer_momentum, 0.8);
  EXPECT_EQ(job->diloco.pseudo_grad, "fp32");
  auto again = parse_job_string(job_to_toml(*job), "again.toml");
  ASSERT_TRUE(again.ok()) << again.message();
  EXPECT_EQ(job_to_toml(*again), job_to_toml(*job));
  // Defaults: the paper's outer Nesterov (0.7, 0.9) with int8 pseudo-gradients.
  auto plain = parse_job_string("[diloco]\n", "j.toml");
  ASSERT_TRUE(plain.ok()) << plain.message();
  EXPECT_EQ(plain->diloco.pseudo_grad, "int8");
  EXPECT_DOUBLE_EQ(plain->diloco.outer_lr, 0.7);
  EXPECT_DOUBLE_EQ(plain->diloco.outer_momentum, 0.9);
  EXPECT_FALSE(parse_job_string("[train]\nsteps = 3\n", "j.toml")->diloco.enabled);

  auto zero = parse_job_string("[diloco]\ninner_steps = 0\n", "j.toml");
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.error().exit_code, kExitBadInput);
  EXPECT_NE(zero.message().find("diloco.inner_steps must be in [1, "), std::string::npos) << zero.message();
  auto codec = parse_job_string("[diloco]\npseudo_grad = \"int4\"\n", "j.toml");
  ASSERT_FALSE(codec.ok());
  EXPECT_NE(codec.message().find("j.toml:2: diloco.pseudo_grad"), std::string::npos) << codec.message();
  auto momentum = parse_job_string("[diloco]\nouter_momentum = 1.5\n", "j.toml");
  ASSERT_FALSE(momentum.ok());
  EXPECT_NE(momentum.message().find("diloco.outer_momentum must be in"), std::string::npos) << momentum.message();
  auto verify = parse_job_string("[verify]\n[diloco]\n", "j.toml");
  ASSERT_FALSE(verify.ok());
  EXPECT_NE(verify.message().find("cannot be combined with [verify]"), std::string::npos) << verify.message();
  auto compressed = parse_job_string("[compression]\ngradients = \"fp16\"\n[diloco]\n", "j.toml");
  ASSERT_FALSE(compressed.ok());
  EXPECT_NE(compressed.message().find("compression.gradients = \"none\""), std::string::npos) << compressed.message();
  auto typo = parse_job_string("[diloco]\ninner_step = 3\n", "j.toml");
  ASSERT_FALSE(typo.ok());
}

// A real full device (/dev/full answers every write with ENOSPC): the write
// fails as resource_exhausted, "disk full", so a caller can tell whose disk
// ran out from a bug (docs/resilience.md, "A full disk").
TEST(Fs, AWriteToAFullDiskIsResourceExhausted) {
  ASSERT_TRUE(std::filesystem::exists("/dev/full"));
  const Status full = append_file("/dev/full", "x");
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.error().kind, ErrorKind::resource_exhausted) << full.message();
  EXPECT_TRUE(says_disk_full(full.message())) << full.message();
  EXPECT_EQ(full.message(), "/dev/full: disk full (No space left on device)");
  EXPECT_FALSE(says_disk_full("/tmp/x: write failed: Permission denied"));
}
