// Internal to train: how strings and tensors enter a BLAKE2b hash, shared by
// the state hash (state.cpp), the step leaves (evidence.cpp) and the op trace
// (trace.cpp), whose formats (docs/commitments.md, docs/verification.md, "Operation trace")
// must agree byte for byte.
#pragma once

#include <torch/torch.h>

#include <span>
#include <string_view>

#include "core/hash.h"

namespace sn::train::hashing {

// A string as its byte length (u64 LE) and its bytes, so that no two different
// inputs concatenate to the same stream.
inline void put_string(Hasher& h, std::string_view s) {
  h.update_u64(s.size());
  h.update(s);
}

// The dtype as safetensors names it.
inline const char* dtype_name(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat32: return "F32";
    case torch::kFloat16: return "F16";
    case torch::kBFloat16: return "BF16";
    case torch::kFloat64: return "F64";
    case torch::kInt64: return "I64";
    case torch::kInt32: return "I32";
    case torch::kInt8: return "I8";
    case torch::kUInt8: return "U8";
    case torch::kBool: return "BOOL";
    default: return "OTHER";
  }
}

// str(dtype) ‖ u64(dims) ‖ u64(size)… ‖ u64(nbytes) ‖ bytes (little-endian, as stored).
inline void put_tensor(Hasher& h, const torch::Tensor& tensor) {
  torch::Tensor c = tensor.detach().contiguous();
  put_string(h, dtype_name(c.scalar_type()));
  h.update_u64(static_cast<uint64_t>(c.dim()));
  for (int64_t d : c.sizes()) h.update_u64(static_cast<uint64_t>(d));
  const auto nbytes = static_cast<size_t>(c.numel()) * c.element_size();
  h.update_u64(nbytes);
  h.update(std::span<const uint8_t>(static_cast<const uint8_t*>(c.data_ptr()), nbytes));
}

}  // namespace sn::train::hashing
