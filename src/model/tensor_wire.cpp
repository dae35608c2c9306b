#include "model/tensor_wire.h"

#include <bit>
#include <cstring>

namespace sn::model {

// Both formats are little-endian; tensor bytes are copied as they lie in memory.
static_assert(std::endian::native == std::endian::little, "solvernet assumes a little-endian host");

namespace {
const std::pair<const char*, torch::ScalarType> kDtypes[] = {
    {"f32", torch::kFloat32}, {"f16", torch::kFloat16}, {"bf16", torch::kBFloat16}, {"f64", torch::kFloat64},
    {"i64", torch::kInt64},   {"i32", torch::kInt32},   {"u8", torch::kUInt8}};
constexpr int64_t kMaxElements = int64_t(1) << 32;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
}  // namespace

std::optional<torch::ScalarType> dtype_from_name(const std::string& name) {
  for (const auto& [n, t] : kDtypes)
    if (name == n) return t;
  return std::nullopt;
}

std::optional<std::string> dtype_name(torch::ScalarType type) {
  for (const auto& [n, t] : kDtypes)
    if (type == t) return std::string(n);
  return std::nullopt;
}

void tensor_to_proto(const torch::Tensor& tensor, solvernet::v1::Tensor* out) {
  torch::Tensor c = tensor.detach().to(torch::kCPU).contiguous();
  auto name = dtype_name(c.scalar_type());
  TORCH_CHECK(name.has_value(), "tensor_to_proto: unsupported dtype");
  out->set_dtype(*name);
  out->clear_shape();
  for (int64_t d : c.sizes()) out->add_shape(d);
  out->set_data(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size());
}

Result<torch::Tensor> tensor_from_proto(const solvernet::v1::Tensor& message,
                                        std::optional<torch::ScalarType> expected_dtype,
                                        std::optional<std::vector<int64_t>> expected_shape) {
  auto type = dtype_from_name(message.dtype());
  if (!type) return make_error("tensor has unknown dtype \"{}\"", message.dtype().substr(0, 16));
  if (expected_dtype && *type != *expected_dtype)
    return make_error("tensor has dtype {}, expected {}", message.dtype(), dtype_name(*expected_dtype).value_or("?"));
  std::vector<int64_t> shape(message.shape().begin(), message.shape().end());
  if (shape.size() > 8) return make_error("tensor has {} dimensions (at most 8)", shape.size());
  int64_t elements = 1;
  for (int64_t d : shape) {
    if (d < 0) return make_error("tensor shape {} has a negative dimension", shape_text(shape));
    if (d > 0 && elements > kMaxElements / d) return make_error("tensor shape {} is too large", shape_text(shape));
    elements *= d;
  }
  if (expected_shape && shape != *expected_shape)
    return make_error("tensor has shape {}, expected {}", shape_text(shape), shape_text(*expected_shape));
  const size_t element_size = c10::elementSize(*type);
  if (message.data().size() != static_cast<size_t>(elements) * element_size)
    return make_error("tensor of shape {} and dtype {} needs {} bytes, got {}", shape_text(shape), message.dtype(),
                      static_cast<size_t>(elements) * element_size, message.data().size());
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(*type));
  if (elements > 0) std::memcpy(t.data_ptr(), message.data().data(), message.data().size());
  return t;
}

}  // namespace sn::model
