// Tensors on the wire and in safetensors files: round trips, and every kind
// of malformed input rejected with a message naming the problem.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "model/gpt.h"
#include "model/safetensors.h"
#include "model/tensor_wire.h"

namespace sn::model {
namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// --- tensor_wire ---------------------------------------------------------

TEST(TensorWire, RoundTripsEveryDtype) {
  for (auto type : {torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kFloat64, torch::kInt64, torch::kInt32,
                    torch::kUInt8}) {
    torch::Tensor t = torch::arange(24, torch::kFloat64).mul(1.5).reshape({2, 3, 4}).to(type);
    solvernet::v1::Tensor message;
    tensor_to_proto(t, &message);
    EXPECT_EQ(message.data().size(), 24 * c10::elementSize(type));
    auto back = tensor_from_proto(message, type, std::vector<int64_t>{2, 3, 4});
    ASSERT_TRUE(back.ok()) << back.message();
    EXPECT_EQ(back->scalar_type(), type);
    EXPECT_TRUE(torch::equal(*back, t)) << *dtype_name(type);
  }
}

TEST(TensorWire, NonContiguousAndEmptyAndScalar) {
  torch::Tensor t = torch::arange(12, torch::kFloat32).reshape({3, 4}).t();  // a strided view
  solvernet::v1::Tensor message;
  tensor_to_proto(t, &message);
  auto back = tensor_from_proto(message);
  ASSERT_TRUE(back.ok()) << back.message();
  EXPECT_TRUE(torch::equal(*back, t));
  // Little-endian bytes of 0.0f, 4.0f, ... (row-major over the transposed view).
  float second;
  std::memcpy(&second, message.data().data() + 4, 4);
  EXPECT_EQ(second, 4.0f);

  tensor_to_proto(torch::empty({0, 5}), &message);
  auto empty = tensor_from_proto(message);
  ASSERT_TRUE(empty.ok()) << empty.message();
  EXPECT_EQ(empty->sizes(), (std::vector<int64_t>{0, 5}));

  tensor_to_proto(torch::tensor(3.5), &message);
  auto scalar = tensor_from_proto(message);
  ASSERT_TRUE(scalar.ok()) << scalar.message();
  EXPECT_EQ(scalar->dim(), 0);
  EXPECT_EQ(scalar->item<float>(), 3.5f);
}

solvernet::v1::Tensor valid_message() {
  solvernet::v1::Tensor message;
  tensor_to_proto(torch::ones({2, 3}), &message);
  return message;
}

TEST(TensorWire, RejectsUnknownDtype) {
  auto message = valid_message();
  message.set_dtype("complex128");
  auto r = tensor_from_proto(message);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.message(), "unknown dtype")) << r.message();
}

TEST(TensorWire, RejectsNegativeDimension) {
  auto message = valid_message();
  message.set_shape(0, -2);
  auto r = tensor_from_proto(message);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.message(), "negative")) << r.message();
}

TEST(TensorWire, RejectsOversizedShape) {
  auto message = valid_message();
  message.set_shape(0, int64_t(1) << 40);
  message.set_shape(1, int64_t(1) << 40);
  auto r = tensor_from_proto(message);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.message(), "too large")) << r.message();
}

TEST(TensorWire, RejectsByteCountMismatch) {
  auto message = valid_message();
  message.mutable_data()->pop_back();
  auto r = tensor_from_proto(message);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(contains(r.message(), "needs 24 bytes, got 23")) << r.message();
}

TEST(TensorWire, RejectsUnexpectedDtypeAndShape) {
  auto message = valid_message();
  auto wrong_type = tensor_from_proto(message, torch::kInt64);
  ASSERT_FALSE(wrong_type.ok());
  EXPECT_TRUE(contains(wrong_type.message(), "dtype f32, expected i64")) << wrong_type.message();
  auto wrong_shape = tensor_from_proto(message, torch::kFloat32, std::vector<int64_t>{3, 2});
  ASSERT_FALSE(wrong_shape.ok());
  EXPECT_TRUE(contains(wrong_shape.message(), "shape [2, 3], expected [3, 2]")) << wrong_shape.message();
}

// --- safetensors -----------------------------------------------------------

NamedTensors sample_tensors() {
  return {{"b.weight", torch::arange(6, torch::kFloat32).reshape({2, 3})},
          {"a.ids", torch::tensor({1, -2, 3}, torch::kInt64)},
          {"half", torch::tensor({0.5, -1.0}, torch::kFloat16)},
          {"bytes", torch::tensor({7, 255}, torch::kUInt8)}};
}

// An independent reader of the format, as docs/safetensors.md describes it:
// 8-byte little-endian header length N, N bytes of JSON, then the data.
struct IndependentEntry {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};
std::map<std::string, IndependentEntry> read_independently(const std::string& file, std::string* data,
                                                           nlohmann::json* metadata) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file[static_cast<size_t>(i)]);
  auto header = nlohmann::json::parse(file.substr(8, n));
  *data = file.substr(8 + n);
  std::map<std::string, IndependentEntry> out;
  for (auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      *metadata = value;
      continue;
    }
    out[name] = {value["dtype"], value["shape"].get<std::vector<int64_t>>(), value["data_offsets"][0],
                 value["data_offsets"][1]};
  }
  return out;
}

TEST(Safetensors, IndependentReaderSeesWhatWasWritten) {
  std::string file = safetensors_bytes(sample_tensors(), {{"step", "12"}});
  std::string data;
  nlohmann::json metadata;
  auto entries = read_independently(file, &data, &metadata);
  EXPECT_EQ((8 + file.size() - data.size() - 8) % 8, 0u) << "data should start 8-byte aligned";
  EXPECT_EQ(metadata["step"], "12");
  ASSERT_EQ(entries.size(), 4u);
  EXPECT_EQ(entries["b.weight"].dtype, "F32");
  EXPECT_EQ(entries["b.weight"].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(entries["b.weight"].begin, 0u);  // written in the given order
  EXPECT_EQ(entries["b.weight"].end, 24u);
  EXPECT_EQ(entries["a.ids"].dtype, "I64");
  EXPECT_EQ(entries["half"].dtype, "F16");
  EXPECT_EQ(entries["bytes"].dtype, "U8");
  EXPECT_EQ(entries["bytes"].end, data.size());
  float f[6];
  std::memcpy(f, data.data(), sizeof f);
  EXPECT_EQ(f[5], 5.0f);
  int64_t ids[3];
  std::memcpy(ids, data.data() + entries["a.ids"].begin, sizeof ids);
  EXPECT_EQ(ids[1], -2);
  EXPECT_EQ(static_cast<unsigned char>(data[entries["bytes"].begin + 1]), 255);
}

TEST(Safetensors, RoundTripsThroughAFile) {
  char dir_template[] = "/tmp/sn-safetensors-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  std::filesystem::path path = std::filesystem::path(dir_template) / "weights.safetensors";
  auto tensors = sample_tensors();
  ASSERT_TRUE(save_safetensors(path, tensors, {{"job", "x"}}).ok());
  auto back = load_safetensors(path);
  ASSERT_TRUE(back.ok()) << back.message();
  ASSERT_EQ(back->size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ((*back)[i].first, tensors[i].first);
    EXPECT_TRUE(torch::equal((*back)[i].second, tensors[i].second)) << tensors[i].first;
  }
  auto metadata = safetensors_metadata(*read_file(path));
  ASSERT_TRUE(metadata.ok());
  EXPECT_EQ(metadata->at("job"), "x");
  // No temporary file is left behind.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_template), {}), 1);
  std::filesystem::remove_all(dir_template);
}

TEST(Safetensors, RoundTripsAWholeGpt) {
  init_torch_single_thread();
  ModelConfig c;
  c.layers = 2;
  c.d_model = 16;
  c.heads = 2;
  c.d_ff = 32;
  c.vocab = 20;
  c.seq_len = 8;
  StageModel gpt(c, 0, 2, 4);
  auto back = load_safetensors_bytes(safetensors_bytes(gpt.named_parameters()));
  ASSERT_TRUE(back.ok()) << back.message();
  auto original = gpt.named_parameters();
  ASSERT_EQ(back->size(), original.size());
  for (size_t i = 0; i < original.size(); ++i) {
    EXPECT_EQ((*back)[i].first, original[i].first);
    EXPECT_TRUE(torch::equal((*back)[i].second, original[i].second.detach()));
  }
}

// Builds a file with a hand-written header over DATA_BYTES zero bytes.
std::string file_with_header(const std::string& json, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json + std::string(data_bytes, '\0');
}

void expect_rejected(const std::string& bytes, const std::string& why) {
  auto r = load_safetensors_bytes(bytes);
  ASSERT_FALSE(r.ok()) << "accepted a file that should fail with: " << why;
  EXPECT_TRUE(contains(r.message(), why)) << r.message();
}

TEST(Safetensors, RejectsCorruptFiles) {
  expect_rejected("abc", "shorter than");
  expect_rejected(file_with_header("{}", 0).replace(0, 1, "\x7f"), "exceeds the file");
  expect_rejected(file_with_header("{\"a\": [1,", 0), "not valid JSON");
  expect_rejected(file_with_header("[1, 2]", 0), "not a JSON object");
  expect_rejected(file_with_header(R"({"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}})", 4), "unknown dtype");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), "outside the data");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "shape needs 12");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), "invalid shape");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[1]}})", 4), "lacks");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                   R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
                  "overlap");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "belong to no tensor");
  expect_rejected(file_with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8), "belong to no tensor");
  // A truncated real file.
  std::string good = safetensors_bytes(sample_tensors());
  expect_rejected(good.substr(0, good.size() - 1), "outside the data");
  auto missing = load_safetensors("/nonexistent/weights.safetensors");
  EXPECT_FALSE(missing.ok());
}

}  // namespace
}  // namespace sn::model
