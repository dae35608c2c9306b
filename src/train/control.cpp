#include "train/control.h"

#include <bit>

namespace sn::train {
namespace {
std::string digest_of(const std::string& bytes) {
  Hash256 h = hash_string(bytes);
  return std::string(reinterpret_cast<const char*>(h.data()), h.size());
}
int64_t bits_of(double value) { return std::bit_cast<int64_t>(value); }
}  // namespace

net::ControlBody control_body(const solvernet::v1::SetupJobRequest& r) {
  net::ControlBody body;
  body.add(int64_t{r.stage()}).add(int64_t{r.replica()}).add(int64_t{r.first_layer()}).add(int64_t{r.layer_count()});
  body.add(digest_of(r.job_toml()));
  body.add(int64_t{r.members_size()});
  for (const auto& m : r.members())
    body.add(m.node_id()).add(m.public_key()).add(m.address()).add(m.region()).add(int64_t{m.stage()}).add(int64_t{m.replica()});
  body.add(digest_of(r.topology_toml()));
  body.add(bits_of(r.time_dilation())).add(bits_of(r.byte_ratio())).add(bits_of(r.gradient_byte_ratio()));
  body.add(digest_of(r.initial_weights()));
  body.add(r.start_step()).add(r.dataset_samples()).add(r.peer_timeout_ms());
  body.add(static_cast<int64_t>(r.chain_job_id()));
  return body;
}

net::ControlBody control_body(const solvernet::v1::RunStepRequest& r) {
  net::ControlBody body;
  body.add(r.step()).add_bool(r.forward_only()).add(int64_t{r.micro_batches_size()});
  for (const auto& mb : r.micro_batches()) {
    body.add(int64_t{mb.sample_ids_size()});
    for (int64_t id : mb.sample_ids()) body.add(id);
    body.add(digest_of(mb.tokens().data())).add(digest_of(mb.targets().data()));
  }
  // A [diloco] outer step: which groups meet, and which attempt this is.
  if (r.outer_sync()) {
    body.add_bool(true).add(int64_t{r.outer_replicas_size()});
    for (int32_t g : r.outer_replicas()) body.add(int64_t{g});
    body.add(int64_t{r.outer_attempt()});
  }
  return body;
}

net::ControlBody control_body(const solvernet::v1::FetchWeightsRequest&) { return {}; }

net::ControlBody control_body(const solvernet::v1::EndJobRequest& r) {
  net::ControlBody body;
  body.add_bool(r.abort()).add(r.reason()).add_bool(r.takeover());
  return body;
}

net::ControlBody control_body(const solvernet::v1::RenewLeaseRequest&) { return {}; }

net::ControlBody control_body(const solvernet::v1::FetchCheckpointRequest& r) {
  net::ControlBody body;
  body.add(int64_t{r.stage()}).add(int64_t{r.replica()}).add(r.step());
  return body;
}

// The files' names and digests: the signature covers every byte put on the node.
net::ControlBody control_body(const solvernet::v1::PutCheckpointRequest& r) {
  net::ControlBody body;
  body.add(int64_t{r.stage()}).add(int64_t{r.replica()}).add(r.step()).add(int64_t{r.files_size()});
  for (const auto& f : r.files()) body.add(f.name()).add(digest_of(f.data()));
  return body;
}

}  // namespace sn::train
