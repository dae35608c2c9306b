// The verifier's arithmetic, the on-chain commitment and the Evidence service,
// served by a real gRPC server on 127.0.0.1 and fetched by the real client.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <set>

#include "core/fs.h"
#include "net/control.h"
#include "net/rpc.h"
#include "net/tls.h"
#include "proto/solvernet.grpc.pb.h"
#include "train/evidence.h"
#include "verify/verify.h"

namespace sn::verify {
namespace {

namespace fs = std::filesystem;
namespace pb = solvernet::v1;

TEST(Sampling, DetectionProbabilityFollowsTheFormula) {
  EXPECT_NEAR(detection_probability(0.1, 1.0, 44), 1 - std::pow(0.9, 44), 1e-12);
  EXPECT_NEAR(detection_probability(0.1, 0.5, 100), 1 - std::pow(0.9, 50), 1e-12);
  EXPECT_EQ(detection_probability(0.1, 0.0, 100), 0.0);
  EXPECT_EQ(detection_probability(0.0, 1.0, 100), 0.0);
  EXPECT_EQ(detection_probability(1.0, 0.01, 100), 1.0);
}

TEST(Sampling, FractionForTargetIsTheSmallestThatReachesIt) {
  // ln(0.01) / ln(0.9) = 43.7: 44 segments of 1000.
  auto f = fraction_for_target(0.99, 0.1, 1000);
  ASSERT_TRUE(f.ok()) << f.message();
  EXPECT_DOUBLE_EQ(*f, 0.044);
  EXPECT_GE(detection_probability(0.1, *f, 1000), 0.99);
  EXPECT_LT(detection_probability(0.1, *f - 0.001, 1000), 0.99);
  EXPECT_EQ(segments_for_fraction(*f, 1000), 44);
  // A job with fewer segments than that replays all of them.
  EXPECT_DOUBLE_EQ(*fraction_for_target(0.99, 0.1, 10), 1.0);
  EXPECT_FALSE(fraction_for_target(0.99, 0.0, 10).ok());
  EXPECT_FALSE(fraction_for_target(1.0, 0.1, 10).ok());
  EXPECT_EQ(fraction_for_target(0.99, 0.1, 0).error().exit_code, kExitBadInput);
}

TEST(Sampling, PicksAreDistinctSortedAndFollowTheSeed) {
  Hash256 seed = hash_string("seed");
  auto a = pick_segments(seed, 0, 0, 100, 10);
  ASSERT_EQ(a.size(), 10u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_EQ(std::set<int64_t>(a.begin(), a.end()).size(), 10u);
  for (int64_t s : a) EXPECT_TRUE(s >= 0 && s < 100);
  EXPECT_EQ(a, pick_segments(seed, 0, 0, 100, 10));
  EXPECT_NE(a, pick_segments(hash_string("other"), 0, 0, 100, 10));
  EXPECT_NE(a, pick_segments(seed, 1, 0, 100, 10));
  EXPECT_EQ(pick_segments(seed, 0, 0, 5, 9).size(), 5u);
  // Every segment gets picked by some seed (no segment is safe to fake).
  std::set<int64_t> seen;
  for (int i = 0; i < 200; ++i)
    for (int64_t s : pick_segments(hash_string(std::to_string(i)), 0, 0, 20, 1)) seen.insert(s);
  EXPECT_EQ(seen.size(), 20u);
}

std::vector<Hash256> some_leaves(int n) {
  std::vector<Hash256> leaves;
  for (int i = 0; i < n; ++i) leaves.push_back(hash_string("leaf " + std::to_string(i)));
  return leaves;
}

TEST(Commitment, EveryProofChecksAndForgeriesDoNot) {
  for (int n : {1, 2, 3, 5, 8, 13}) {
    auto leaves = some_leaves(n);
    const Hash256 root = commitment_root(leaves);
    for (int i = 0; i < n; ++i) {
      auto proof = commitment_proof(leaves, static_cast<uint64_t>(i));
      EXPECT_TRUE(check_commitment_proof(root, n, i, leaves[static_cast<size_t>(i)], proof)) << n << " " << i;
      // Another leaf, another index, another count, a bent sibling, a sibling too many: refused.
      EXPECT_FALSE(check_commitment_proof(root, n, i, hash_string("forged"), proof));
      if (n > 1) {
        EXPECT_FALSE(check_commitment_proof(root, n, (i + 1) % n, leaves[static_cast<size_t>(i)], proof));
        auto bent = proof;
        bent[0][0] ^= 1;
        EXPECT_FALSE(check_commitment_proof(root, n, i, leaves[static_cast<size_t>(i)], bent));
      }
      auto longer = proof;
      longer.push_back(root);
      EXPECT_FALSE(check_commitment_proof(root, n, i, leaves[static_cast<size_t>(i)], longer));
      EXPECT_FALSE(check_commitment_proof(root, n, n, leaves[static_cast<size_t>(i)], proof));
    }
  }
  // The tree is Keccak over 0x00/0x01-prefixed nodes (what the contract recomputes).
  auto two = some_leaves(2);
  uint8_t l0[33] = {0}, l1[33] = {0}, in[65] = {1};
  std::copy(two[0].begin(), two[0].end(), l0 + 1);
  std::copy(two[1].begin(), two[1].end(), l1 + 1);
  Hash256 a = keccak256(std::span<const uint8_t>(l0, 33)), b = keccak256(std::span<const uint8_t>(l1, 33));
  std::copy(a.begin(), a.end(), in + 1);
  std::copy(b.begin(), b.end(), in + 33);
  EXPECT_EQ(commitment_root(two), keccak256(std::span<const uint8_t>(in, 65)));
}

TEST(Paths, JobIdsThatEscapeTheDataDirAreRefused) {
  EXPECT_TRUE(check_job_id("tiny-1712345").ok());
  for (std::string bad : {std::string(), std::string("."), std::string(".."), std::string("a/b"), std::string("../x"),
                          std::string(257, 'a'), std::string("a\0b", 3)})
    EXPECT_FALSE(check_job_id(bad).ok()) << bad;
}

// A node's data dir with one member's evidence, served over TLS.
class EvidenceServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("sn-verify-unit-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    leaves_ = some_leaves(5);
    const fs::path ev = train::evidence_dir(dir_, "job-1", 1, 0);
    fs::create_directories(ev);
    std::string bytes;
    for (auto& l : leaves_) bytes.append(reinterpret_cast<const char*>(l.data()), 32);
    ASSERT_TRUE(write_file_atomic(ev / "leaves.bin", bytes).ok());
    pb::SetupJobRequest setup;
    setup.set_job_id("job-1");
    setup.set_stage(1);
    setup.set_chain_job_id(7);
    ASSERT_TRUE(write_file_atomic(ev / "setup.pb", setup.SerializeAsString()).ok());
    ASSERT_TRUE(write_file_atomic(train::step_evidence_path(ev, 2), "step two").ok());
    const fs::path ck = train::checkpoint_dir(dir_, "job-1", 1, 0);
    fs::create_directories(ck);
    big_ = std::string((9 << 20) + 17, 'x');  // three chunks
    for (size_t i = 0; i < big_.size(); i += 4093) big_[i] = static_cast<char>(i % 251);
    ASSERT_TRUE(write_file_atomic(ck / "step-000000000004.safetensors", big_).ok());
    ASSERT_TRUE(write_file_atomic(ck / "step-000000000004.manifest.json",
                                  R"({"files": [{"name": "step-000000000004.safetensors"}]})")
                    .ok());
  }
  void TearDown() override {
    if (server_.server) server_.server->Shutdown(std::chrono::system_clock::now());
    fs::remove_all(dir_);
  }
  void serve(EvidenceServiceOptions options) {
    options.data_dir = dir_;
    service_ = make_evidence_service(std::move(options));
    auto started = net::start_server("127.0.0.1:0", service_.get(), node_key_);
    ASSERT_TRUE(started.ok()) << started.message();
    server_ = std::move(started).value();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(server_.port); }

  fs::path dir_;
  std::vector<Hash256> leaves_;
  std::string big_;
  NodeKey node_key_ = NodeKey::generate();
  NodeKey verifier_key_ = NodeKey::generate();
  std::unique_ptr<grpc::Service> service_;
  net::RunningServer server_;
};

TEST_F(EvidenceServiceTest, ServesCommitmentSetupStepsAndCheckpointsInChunks) {
  EvidenceServiceOptions options;
  options.chain_address = "0x00000000000000000000000000000000000000aa";
  serve(options);
  EvidenceClient client(address(), node_key_.node_id(), verifier_key_);
  const Member member{"job-1", 1, 0};
  auto commitment = client.commitment(member);
  ASSERT_TRUE(commitment.ok()) << commitment.message();
  EXPECT_EQ(commitment->leaves, leaves_);
  EXPECT_EQ(commitment->root, commitment_root(leaves_));
  EXPECT_EQ(commitment->chain_address, options.chain_address);
  auto setup = client.setup(member);
  ASSERT_TRUE(setup.ok()) << setup.message();
  EXPECT_EQ(setup->chain_job_id(), 7u);
  auto step = client.step_evidence(member, 2);
  ASSERT_TRUE(step.ok()) << step.message();
  EXPECT_EQ(*step, "step two");
  auto missing = client.step_evidence(member, 3);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().kind, ErrorKind::not_found);
  auto fetched = client.fetch_checkpoint(member, 4, dir_ / "fetched");
  ASSERT_TRUE(fetched.ok()) << fetched.message();
  auto read = read_file(*fetched / "step-000000000004.safetensors");
  ASSERT_TRUE(read.ok()) << read.message();
  const std::string copy = *read;
  EXPECT_EQ(copy.size(), big_.size());
  EXPECT_TRUE(copy == big_) << "the fetched checkpoint file differs from the node's";
  EXPECT_TRUE(fs::exists(*fetched / "step-000000000004.manifest.json"));
  // Another member, another job: not found, never a path outside the data dir.
  EXPECT_EQ(client.commitment({"job-1", 0, 0}).error().kind, ErrorKind::not_found);
  EXPECT_EQ(client.commitment({"../job-1", 1, 0}).error().kind, ErrorKind::invalid_input);
}

TEST_F(EvidenceServiceTest, UnsignedForgedAndStaleRequestsAreRefused) {
  serve({});
  auto stub = pb::Evidence::NewStub(net::make_channel(address(), node_key_.node_id(), &verifier_key_));
  pb::GetCommitmentRequest request;
  request.mutable_member()->set_job_id("job-1");
  request.mutable_member()->set_stage(1);
  pb::GetCommitmentReply reply;
  {
    grpc::ClientContext context;
    auto status = stub->GetCommitment(&context, request, &reply);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  }
  // Signed for stage 0, asked for stage 1.
  net::ControlSigner signer(verifier_key_);
  net::ControlBody body;
  body.add(int64_t{0}).add(int64_t{0});
  *request.mutable_auth() = signer.sign("Evidence.GetCommitment", "job-1", body);
  {
    grpc::ClientContext context;
    auto status = stub->GetCommitment(&context, request, &reply);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << status.error_message();
  }
}

TEST_F(EvidenceServiceTest, WithholdRefusesEvidenceButNotTheCommitment) {
  EvidenceServiceOptions options;
  options.withhold = true;
  serve(options);
  EvidenceClient client(address(), node_key_.node_id(), verifier_key_);
  const Member member{"job-1", 1, 0};
  EXPECT_TRUE(client.commitment(member).ok());
  EXPECT_FALSE(client.step_evidence(member, 2).ok());
  EXPECT_FALSE(client.fetch_checkpoint(member, 4, dir_ / "fetched").ok());
  EXPECT_FALSE(client.tensor(member, 2, leaves_[0]).ok());
}

TEST_F(EvidenceServiceTest, OneKeyIsRateLimited) {
  EvidenceServiceOptions options;
  options.requests_per_second = 1;
  options.burst = 3;
  serve(options);
  EvidenceClient client(address(), node_key_.node_id(), verifier_key_);
  const Member member{"job-1", 1, 0};
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client.commitment(member).ok());
  auto refused = client.commitment(member);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().kind, ErrorKind::resource_exhausted);
  // Another key has its own budget.
  NodeKey other = NodeKey::generate();
  EXPECT_TRUE(EvidenceClient(address(), node_key_.node_id(), other).commitment(member).ok());
}

}  // namespace
}  // namespace sn::verify
