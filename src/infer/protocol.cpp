#include "infer/protocol.h"

#include "core/hash.h"

namespace sn::infer {
namespace {

// A tensor is covered by its dtype, shape and the BLAKE2b of its bytes.
void add_tensor(net::ControlBody& body, const solvernet::v1::Tensor& t) {
  body.add(t.dtype());
  body.add(static_cast<int64_t>(t.shape_size()));
  for (int64_t d : t.shape()) body.add(d);
  Hash256 h = hash_string(t.data());
  body.add(std::string_view(reinterpret_cast<const char*>(h.data()), h.size()));
}

}  // namespace

net::ControlBody control_body(const solvernet::v1::OpenSessionRequest& r) {
  net::ControlBody body;
  body.add(r.model()).add(int64_t{r.first_block()}).add(int64_t{r.end_block()}).add(int64_t{r.max_length()});
  return body;
}

net::ControlBody control_body(const solvernet::v1::ForwardRequest& r) {
  net::ControlBody body;
  body.add(r.position());
  add_tensor(body, r.input());
  return body;
}

net::ControlBody control_body(const solvernet::v1::CloseSessionRequest&) { return {}; }

net::ControlBody control_body(const solvernet::v1::RecomputeRequest& r) {
  net::ControlBody body;
  body.add(r.model()).add(int64_t{r.first_block()}).add(int64_t{r.end_block()}).add(int64_t{r.rows()});
  add_tensor(body, r.inputs());
  return body;
}

}  // namespace sn::infer
