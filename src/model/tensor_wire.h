// Tensors on the wire (solvernet.v1.Tensor): dtype, shape, raw little-endian
// row-major bytes. Decoding validates everything a peer could get wrong.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <vector>

#include "core/result.h"
#include "proto/solvernet.pb.h"

namespace sn::model {

// Copies TENSOR (any device layout; made contiguous on CPU) into OUT.
void tensor_to_proto(const torch::Tensor& tensor, solvernet::v1::Tensor* out);

// Rejects an unknown dtype, a negative or oversized shape, a byte count that
// does not match the shape, and (if given) a dtype or shape other than expected.
Result<torch::Tensor> tensor_from_proto(const solvernet::v1::Tensor& message,
                                        std::optional<torch::ScalarType> expected_dtype = {},
                                        std::optional<std::vector<int64_t>> expected_shape = {});

// "f32" ↔ kFloat32 etc.; nullopt for an unknown name / type.
std::optional<torch::ScalarType> dtype_from_name(const std::string& name);
std::optional<std::string> dtype_name(torch::ScalarType type);

}  // namespace sn::model
