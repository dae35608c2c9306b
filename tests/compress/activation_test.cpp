// Activation codecs: AQ-SGD sender and receiver buffers stay bitwise equal
// (also across a restart), deltas are small and converge, drift and corrupt
// messages are errors, and the bytes on the wire match the formulas.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "compress/compress.h"

namespace sn::compress {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kSamples = 24;
constexpr int64_t kSeq = 8;
constexpr int64_t kModel = 32;
constexpr int64_t kBatch = 4;

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class ActivationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(1);
    dir_ = fs::temp_directory_path() /
           ("sn-compress-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    config_.activations = "aqsgd";
    config_.forward_bits = 4;
    config_.backward_bits = 8;
  }
  void TearDown() override { fs::remove_all(dir_); }

  ActivationBufferOptions options(const std::string& file) const {
    return {dir_ / file, kSamples, {kSeq, kModel}};
  }
  std::unique_ptr<ActivationCodec> codec(const std::string& file, bool forward = true) {
    auto made = make_activation_codec(config_, forward, options(file));
    EXPECT_TRUE(made.ok()) << made.message();
    return made.ok() ? std::move(made).value() : nullptr;
  }

  // A sample's "activation" at epoch E: a fixed pattern plus a random walk of
  // small steps, as a fine-tuned model's activations drift between passes.
  static torch::Tensor activation(int64_t sample, int64_t epoch) {
    torch::manual_seed(1000 + sample);
    torch::Tensor value = torch::randn({kSeq, kModel}) * 2.0;
    for (int64_t e = 1; e <= epoch; ++e) {
      torch::manual_seed(5000 + sample * 100 + e);
      value += 0.05 * torch::randn({kSeq, kModel});
    }
    return value;
  }
  static torch::Tensor batch(const std::vector<int64_t>& ids, int64_t epoch) {
    std::vector<torch::Tensor> rows;
    for (int64_t id : ids) rows.push_back(activation(id, epoch));
    return torch::stack(rows);
  }

  // Runs EPOCHS epochs of shuffled micro-batches from sender to receiver,
  // checking every decode succeeds. Returns the last message per epoch kind.
  void run_epochs(ActivationCodec& sender, ActivationCodec& receiver, int64_t first_epoch,
                  int64_t epochs, std::mt19937& rng) {
    std::vector<int64_t> order(kSamples);
    for (int64_t e = first_epoch; e < first_epoch + epochs; ++e) {
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      for (int64_t start = 0; start < kSamples; start += kBatch) {
        std::vector<int64_t> ids(order.begin() + start, order.begin() + start + kBatch);
        auto message = sender.encode(batch(ids, e), ids, rng());
        ASSERT_TRUE(message.ok()) << message.message();
        auto decoded = receiver.decode(*message, ids);
        ASSERT_TRUE(decoded.ok()) << decoded.message();
      }
    }
  }

  fs::path dir_;
  CompressionConfig config_;
};

TEST_F(ActivationTest, SenderAndReceiverBuffersStayBitwiseEqualAcrossARestart) {
  std::mt19937 rng(11);
  {
    auto sender = codec("sender.buf");
    auto receiver = codec("receiver.buf");
    ASSERT_TRUE(sender && receiver);
    run_epochs(*sender, *receiver, 0, 5, rng);
    ASSERT_TRUE(sender->flush().ok());
    ASSERT_TRUE(receiver->flush().ok());
    EXPECT_EQ(read_bytes(dir_ / "sender.buf"), read_bytes(dir_ / "receiver.buf"));
  }
  // Both processes restart: reopen the same files and keep going.
  auto sender = codec("sender.buf");
  auto receiver = codec("receiver.buf");
  ASSERT_TRUE(sender && receiver);
  const std::vector<int64_t> ids{3, 17, 0, 9};
  auto message = sender->encode(batch(ids, 5), ids, 1);
  ASSERT_TRUE(message.ok());
  EXPECT_EQ(message->data()[1], 1) << "a seen sample goes as a delta after the restart";
  ASSERT_TRUE(receiver->decode(*message, ids).ok());
  run_epochs(*sender, *receiver, 6, 3, rng);
  ASSERT_TRUE(sender->flush().ok());
  ASSERT_TRUE(receiver->flush().ok());
  EXPECT_EQ(read_bytes(dir_ / "sender.buf"), read_bytes(dir_ / "receiver.buf"));
}

TEST_F(ActivationTest, FirstPassGoesInFullThenSmallDeltasTrackTheActivation) {
  auto sender = codec("s.buf");
  auto receiver = codec("r.buf");
  ASSERT_TRUE(sender && receiver);
  const std::vector<int64_t> ids{5, 6, 7, 8};
  const torch::Tensor x = batch(ids, 0);
  const int64_t sample_numel = kSeq * kModel;

  auto first = sender->encode(x, ids, 100);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->codec(), "aqsgd");
  EXPECT_EQ(static_cast<int64_t>(first->data().size()),
            aqsgd_data_bytes(kBatch, sample_numel, kModel, 4, kBatch));
  for (int b = 0; b < kBatch; ++b) EXPECT_EQ(first->data()[1 + b], 0) << "full pass flag";
  auto decoded = receiver->decode(*first, ids);
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(torch::equal(*decoded, x.to(torch::kHalf).to(torch::kFloat)));

  // Later passes: the activation has drifted a little (the model was trained
  // in between); the delta is small, so its 4-bit quantization is fine.
  for (int pass = 1; pass <= 4; ++pass) {
    const torch::Tensor drifted = batch(ids, pass);
    auto message = sender->encode(drifted, ids, 100 + pass);
    ASSERT_TRUE(message.ok());
    for (int b = 0; b < kBatch; ++b) EXPECT_EQ(message->data()[1 + b], 1) << "delta flag";
    EXPECT_EQ(static_cast<int64_t>(message->data().size()),
              aqsgd_data_bytes(kBatch, sample_numel, kModel, 4, 0));
    EXPECT_EQ(static_cast<int64_t>(message->data().size()),
              steady_state_activation_bytes(config_, true, {kBatch, kSeq, kModel}));
    // fp16 → 4 bits plus per-row scales and 9 bytes of header per sample.
    EXPECT_LT(message->data().size() * 3, first->data().size());
    EXPECT_LT(message->data().size() * 6, static_cast<size_t>(fp32_data_bytes(x.numel())));
    auto out = receiver->decode(*message, ids);
    ASSERT_TRUE(out.ok()) << out.message();
    // Direct quantization at the same bits, for comparison.
    auto direct_block = quantize(drifted, 4, 7);
    ASSERT_TRUE(direct_block.ok());
    const double direct_error =
        (*dequantize(*direct_block, drifted.sizes().vec(), 4) - drifted).norm().item<double>();
    const double error = (*out - drifted).norm().item<double>();
    EXPECT_LT(error, 0.1 * direct_error) << "pass " << pass;
  }
}

TEST_F(ActivationTest, BackwardDirectionIsDirectQuantizationAtBackwardBits) {
  auto sender = codec("unused.buf", /*forward=*/false);
  auto receiver = codec("unused2.buf", false);
  ASSERT_TRUE(sender && receiver);
  EXPECT_EQ(sender->name(), "quant");
  EXPECT_FALSE(fs::exists(dir_ / "unused.buf"));
  const std::vector<int64_t> ids{1, 2};
  torch::Tensor g = torch::randn({2, kSeq, kModel});
  auto message = sender->encode(g, ids, 3);
  ASSERT_TRUE(message.ok());
  EXPECT_EQ(static_cast<int64_t>(message->data().size()), quant_data_bytes(g.numel(), kModel, 8));
  EXPECT_EQ(static_cast<int64_t>(message->data().size()),
            steady_state_activation_bytes(config_, false, {2, kSeq, kModel}));
  auto out = receiver->decode(*message, ids);
  ASSERT_TRUE(out.ok());
  EXPECT_LT((*out - g).abs().max().item<float>(), 2.0f * g.abs().max().item<float>() / 255 * 1.01f);
}

TEST_F(ActivationTest, BaselineCodecsRoundTripWithTheirSizes) {
  const std::vector<int64_t> ids{0, 1, 2};
  torch::Tensor x = torch::randn({3, kSeq, kModel});
  for (const std::string kind : {"none", "fp16", "quant"}) {
    config_.activations = kind;
    auto sender = codec("x.buf");
    auto receiver = codec("y.buf");
    ASSERT_TRUE(sender && receiver);
    auto message = sender->encode(x, ids, 9);
    ASSERT_TRUE(message.ok()) << kind << ": " << message.message();
    auto out = receiver->decode(*message, ids);
    ASSERT_TRUE(out.ok()) << kind << ": " << out.message();
    EXPECT_EQ(out->sizes(), x.sizes());
    if (kind == "none") {
      EXPECT_EQ(message->codec(), "fp32");
      EXPECT_EQ(static_cast<int64_t>(message->data().size()), fp32_data_bytes(x.numel()));
      EXPECT_TRUE(torch::equal(*out, x));
    } else if (kind == "fp16") {
      EXPECT_EQ(static_cast<int64_t>(message->data().size()), fp16_data_bytes(x.numel()));
      EXPECT_TRUE(torch::equal(*out, x.to(torch::kHalf).to(torch::kFloat)));
    } else {
      EXPECT_EQ(static_cast<int64_t>(message->data().size()), quant_data_bytes(x.numel(), kModel, 4));
      EXPECT_LT((*out - x).abs().max().item<float>(), 2.0f * x.abs().max().item<float>() / 15 * 1.01f);
    }
    EXPECT_EQ(static_cast<int64_t>(message->data().size()),
              steady_state_activation_bytes(config_, true, {3, kSeq, kModel}));
    // The protobuf framing adds only the codec name and the shape.
    EXPECT_LT(message->ByteSizeLong(), message->data().size() + 32);
  }
  EXPECT_FALSE(fs::exists(dir_ / "x.buf"));
}

TEST_F(ActivationTest, DriftBetweenSenderAndReceiverIsAnErrorAndForgetRecovers) {
  auto sender = codec("s.buf");
  auto receiver = codec("r.buf");
  ASSERT_TRUE(sender && receiver);
  const std::vector<int64_t> ids{1, 2, 3, 4};
  auto first = sender->encode(batch(ids, 0), ids, 1);
  ASSERT_TRUE(first.ok() && receiver->decode(*first, ids).ok());
  // A message is lost: the sender's buffer moved on, the receiver's did not.
  ASSERT_TRUE(sender->encode(batch(ids, 1), ids, 2).ok());
  auto third = sender->encode(batch(ids, 2), ids, 3);
  ASSERT_TRUE(third.ok());
  auto drifted = receiver->decode(*third, ids);
  ASSERT_FALSE(drifted.ok());
  EXPECT_NE(drifted.message().find("differs between sender and receiver"), std::string::npos)
      << drifted.message();
  // A receiver that never saw a sample cannot take a delta for it.
  auto fresh_receiver = codec("fresh.buf");
  EXPECT_FALSE(fresh_receiver->decode(*third, ids).ok());

  ASSERT_TRUE(sender->forget(ids).ok());
  ASSERT_TRUE(receiver->forget(ids).ok());
  auto resent = sender->encode(batch(ids, 3), ids, 4);
  ASSERT_TRUE(resent.ok());
  EXPECT_EQ(resent->data()[1], 0) << "forgotten samples go in full again";
  auto out = receiver->decode(*resent, ids);
  ASSERT_TRUE(out.ok()) << out.message();
  EXPECT_TRUE(torch::equal(*out, batch(ids, 3).to(torch::kHalf).to(torch::kFloat)));
}

TEST_F(ActivationTest, CorruptOrTruncatedMessagesAreRejectedAndLeaveTheBufferAlone) {
  auto sender = codec("s.buf");
  auto receiver = codec("r.buf");
  ASSERT_TRUE(sender && receiver);
  const std::vector<int64_t> ids{10, 11, 12, 13};
  for (int64_t pass = 0; pass < 2; ++pass) {
    auto message = sender->encode(batch(ids, pass), ids, 50 + pass);
    ASSERT_TRUE(message.ok());
    ASSERT_TRUE(receiver->flush().ok());
    const std::string receiver_before = read_bytes(dir_ / "r.buf");
    const std::string& data = message->data();
    int rejected = 0;
    for (size_t cut = 0; cut < data.size(); cut += (cut < 64 ? 1 : 37)) {
      CompressedTensor truncated = *message;
      truncated.set_data(data.substr(0, cut));
      EXPECT_FALSE(receiver->decode(truncated, ids).ok()) << "cut at " << cut;
    }
    for (size_t position = 0; position < data.size(); position += (position < 200 ? 1 : 13)) {
      for (uint8_t flip : {uint8_t{0x01}, uint8_t{0x80}}) {
        CompressedTensor corrupt = *message;
        corrupt.mutable_data()->at(position) ^= static_cast<char>(flip);
        auto out = receiver->decode(corrupt, ids);
        // Every byte matters: the header is checked, and a changed value or
        // scale changes the rebuilt buffer, which the sender's checksum catches.
        ASSERT_FALSE(out.ok()) << "flip 0x" << std::hex << int(flip) << " at " << std::dec << position;
        ++rejected;
      }
    }
    EXPECT_GT(rejected, 100);
    CompressedTensor renamed = *message;
    renamed.set_codec("quant");
    EXPECT_FALSE(receiver->decode(renamed, ids).ok());
    CompressedTensor reshaped = *message;
    reshaped.set_shape(2, kModel + 1);
    EXPECT_FALSE(receiver->decode(reshaped, ids).ok());
    EXPECT_FALSE(receiver->decode(*message, {10, 11, 12}).ok());
    EXPECT_FALSE(receiver->decode(*message, {10, 11, 12, kSamples}).ok());
    EXPECT_FALSE(receiver->decode(*message, {10, 11, 12, 12}).ok());
    EXPECT_FALSE(receiver->decode(*message, {13, 12, 11, 10}).ok()) << "ids bound into checksums";

    ASSERT_TRUE(receiver->flush().ok());
    EXPECT_EQ(read_bytes(dir_ / "r.buf"), receiver_before) << "a rejected message changed nothing";
    auto out = receiver->decode(*message, ids);
    ASSERT_TRUE(out.ok()) << out.message();
  }
}

TEST_F(ActivationTest, BufferFilesAreCheckedOnOpenAndOnUse) {
  {
    auto sender = codec("s.buf");
    ASSERT_TRUE(sender);
    auto second = make_activation_codec(config_, true, options("s.buf"));
    EXPECT_FALSE(second.ok()) << "one codec per buffer file";
    const std::vector<int64_t> ids{0, 1, 2, 3};
    ASSERT_TRUE(sender->encode(batch(ids, 0), ids, 1).ok());
    ASSERT_TRUE(sender->flush().ok());
  }
  auto other_shape = make_activation_codec(config_, true, {dir_ / "s.buf", kSamples, {kSeq, kModel * 2}});
  ASSERT_FALSE(other_shape.ok());
  EXPECT_NE(other_shape.message().find("delete it"), std::string::npos) << other_shape.message();
  EXPECT_FALSE(make_activation_codec(config_, true, {dir_ / "s.buf", kSamples + 1, {kSeq, kModel}}).ok());
  EXPECT_FALSE(make_activation_codec(config_, true, {dir_ / "t.buf", 0, {kSeq, kModel}}).ok());
  EXPECT_FALSE(make_activation_codec(config_, true, {dir_ / "t.buf", kSamples, {}}).ok());
  EXPECT_FALSE(make_activation_codec(config_, true, {"", kSamples, {kSeq, kModel}}).ok());

  // Flip one fp16 value of sample 2 on disk: using that sample is an error.
  {
    const auto size = fs::file_size(dir_ / "s.buf");
    const auto data_offset = size - 2 * kSamples * kSeq * kModel;
    const auto position = static_cast<std::streamoff>(data_offset + 2 * 2 * kSeq * kModel + 10);
    std::fstream file(dir_ / "s.buf", std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(position);
    const char original = static_cast<char>(file.get());
    file.seekp(position);
    file.put(static_cast<char>(original ^ 0x10));
  }
  auto reopened = codec("s.buf");
  ASSERT_TRUE(reopened);
  const std::vector<int64_t> clean{0, 1, 3, 4};
  EXPECT_TRUE(reopened->encode(batch(clean, 1), clean, 2).ok());
  const std::vector<int64_t> dirty{2};
  auto rejected = reopened->encode(batch(dirty, 1), dirty, 3);
  ASSERT_FALSE(rejected.ok());
  EXPECT_NE(rejected.message().find("checksum"), std::string::npos) << rejected.message();
}

TEST_F(ActivationTest, RejectsBadConfigsAndInputs) {
  CompressionConfig bad = config_;
  bad.activations = "zip";
  EXPECT_FALSE(make_activation_codec(bad, true, options("a.buf")).ok());
  bad = config_;
  bad.forward_bits = 9;
  EXPECT_FALSE(make_activation_codec(bad, true, options("a.buf")).ok());
  bad = config_;
  bad.backward_bits = 0;
  EXPECT_FALSE(make_activation_codec(bad, false, options("a.buf")).ok());

  auto sender = codec("s.buf");
  ASSERT_TRUE(sender);
  EXPECT_FALSE(sender->encode(torch::randn({2, kSeq, kModel}), {0, 1, 2}, 1).ok());
  EXPECT_FALSE(sender->encode(torch::randn({2, kSeq, kModel + 1}), {0, 1}, 1).ok());
  EXPECT_FALSE(sender->encode(torch::randn({2, kSeq, kModel}), {0, -1}, 1).ok());
  torch::Tensor huge = torch::randn({1, kSeq, kModel});
  huge[0][0][0] = 1e6;  // beyond fp16: the buffer cannot hold it
  EXPECT_FALSE(sender->encode(huge, {0}, 1).ok());
  torch::Tensor nan = torch::randn({1, kSeq, kModel});
  nan[0][1][1] = NAN;
  EXPECT_FALSE(sender->encode(nan, {0}, 1).ok());
}

}  // namespace
}  // namespace sn::compress
