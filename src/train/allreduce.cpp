#include "train/allreduce.h"

#include <algorithm>
#include <cstring>

namespace sn::train {
namespace {

solvernet::v1::TensorMessage float_message(const std::string& kind, int64_t step, int round,
                                           int chunk, int segment, const float* data,
                                           int64_t count) {
  solvernet::v1::TensorMessage m;
  m.set_kind(kind);
  m.set_step(step);
  m.set_micro(segment);
  m.set_round(round);
  m.set_chunk(chunk);
  auto* t = m.mutable_tensor();
  t->set_dtype("f32");
  t->add_shape(count);
  t->set_data(reinterpret_cast<const char*>(data), static_cast<size_t>(count) * sizeof(float));
  return m;
}

Status check_float_payload(const solvernet::v1::TensorMessage& m, int64_t expected,
                           const std::string& who) {
  if (!m.has_tensor() || m.tensor().dtype() != "f32" || m.tensor().shape_size() != 1 ||
      m.tensor().shape(0) != expected ||
      m.tensor().data().size() != static_cast<size_t>(expected) * sizeof(float))
    return make_error("{} message from {} is malformed: expected {} f32 values", m.kind(), who, expected);
  return ok_status();
}

}  // namespace

Status ring_allreduce(net::JobTransport& transport, const std::vector<int>& ring,
                      torch::Tensor buffer, int64_t step, const RingOptions& options) {
  const int n_ring = static_cast<int>(ring.size());
  if (n_ring <= 1) return ok_status();
  if (!buffer.is_contiguous() || buffer.scalar_type() != torch::kFloat32)
    return make_error("all-reduce needs a contiguous f32 buffer");
  auto pos_it = std::find(ring.begin(), ring.end(), transport.self());
  if (pos_it == ring.end()) return make_error("all-reduce: this node is not in the ring");
  const int pos = static_cast<int>(pos_it - ring.begin());
  const int next = ring[static_cast<size_t>((pos + 1) % n_ring)];
  const int prev = ring[static_cast<size_t>((pos + n_ring - 1) % n_ring)];
  float* data = buffer.data_ptr<float>();
  const int64_t n = buffer.numel();
  auto seg_begin = [&](int s) { return n * s / n_ring; };
  auto seg_end = [&](int s) { return n * (s + 1) / n_ring; };
  const int64_t chunk_elems = std::max<int64_t>(1, options.chunk_bytes / static_cast<int64_t>(sizeof(float)));
  auto mod = [&](int x) { return ((x % n_ring) + n_ring) % n_ring; };

  // Round r of phase p is message round p * n_ring + r.
  for (int phase = 0; phase < 2; ++phase) {
    for (int r = 0; r < n_ring - 1; ++r) {
      const int send_seg = phase == 0 ? mod(pos - r) : mod(pos + 1 - r);
      const int recv_seg = phase == 0 ? mod(pos - r - 1) : mod(pos - r);
      const int round = phase * n_ring + r;
      int chunk = 0;
      for (int64_t off = seg_begin(send_seg); off < seg_end(send_seg); off += chunk_elems, ++chunk) {
        int64_t count = std::min(chunk_elems, seg_end(send_seg) - off);
        SN_TRY(transport.send(next, float_message(options.kind, step, round, chunk, send_seg, data + off, count),
                              net::Traffic::kDataParallel));
      }
      chunk = 0;
      for (int64_t off = seg_begin(recv_seg); off < seg_end(recv_seg); off += chunk_elems, ++chunk) {
        int64_t count = std::min(chunk_elems, seg_end(recv_seg) - off);
        SN_ASSIGN(auto message, transport.receive({options.kind, step, recv_seg, round, chunk, prev}, options.timeout));
        SN_TRY(check_float_payload(message, count, transport.describe(prev)));
        const float* in = reinterpret_cast<const float*>(message.tensor().data().data());
        if (phase == 0) {
          for (int64_t i = 0; i < count; ++i) data[off + i] += in[i];
        } else {
          std::memcpy(data + off, in, static_cast<size_t>(count) * sizeof(float));
        }
      }
    }
  }
  return ok_status();
}

Result<torch::Tensor> exchange_with(net::JobTransport& transport, int peer,
                                    const torch::Tensor& buffer, int64_t step,
                                    const std::string& kind, std::chrono::milliseconds timeout) {
  torch::Tensor contiguous = buffer.contiguous();
  SN_TRY(transport.send(peer, float_message(kind, step, 0, 0, 0, contiguous.data_ptr<float>(), contiguous.numel()),
                        net::Traffic::kDataParallel));
  SN_ASSIGN(auto message, transport.receive({kind, step, 0, 0, 0, peer}, timeout));
  SN_TRY(check_float_payload(message, contiguous.numel(), transport.describe(peer)));
  torch::Tensor out = torch::empty_like(contiguous);
  std::memcpy(out.data_ptr<float>(), message.tensor().data().data(), message.tensor().data().size());
  return out;
}

namespace {

solvernet::v1::TensorMessage compressed_message(const std::string& kind, int64_t step, int round,
                                                int source, compress::CompressedTensor payload) {
  solvernet::v1::TensorMessage m;
  m.set_kind(kind);
  m.set_step(step);
  m.set_micro(source);
  m.set_round(round);
  *m.mutable_compressed() = std::move(payload);
  return m;
}

Result<torch::Tensor> decompress_from(const compress::GradientCompressor& compressor,
                                      const solvernet::v1::TensorMessage& m, const std::string& who) {
  if (!m.has_compressed())
    return make_error("{} message from {} carries no compressed gradient", m.kind(), who);
  auto dense = compressor.decompress(m.compressed());
  if (!dense.ok()) return make_error("{} message from {}: {}", m.kind(), who, dense.message());
  return dense;
}

}  // namespace

Status compressed_allreduce(net::JobTransport& transport, const std::vector<int>& ring,
                            compress::GradientCompressor& compressor, torch::Tensor buffer,
                            int64_t step, uint64_t shared_seed, const RingOptions& options) {
  const int n_ring = static_cast<int>(ring.size());
  if (n_ring <= 1) return ok_status();
  if (!buffer.is_contiguous() || buffer.scalar_type() != torch::kFloat32 || buffer.numel() != compressor.numel())
    return make_error("compressed all-reduce needs a contiguous f32 buffer of {} values", compressor.numel());
  auto pos_it = std::find(ring.begin(), ring.end(), transport.self());
  if (pos_it == ring.end()) return make_error("all-reduce: this node is not in the ring");
  const int pos = static_cast<int>(pos_it - ring.begin());
  const int next = ring[static_cast<size_t>((pos + 1) % n_ring)];
  const int prev = ring[static_cast<size_t>((pos + n_ring - 1) % n_ring)];

  std::vector<solvernet::v1::TensorMessage> gathered(static_cast<size_t>(n_ring));
  SN_ASSIGN(auto own, compressor.compress(buffer, shared_seed));
  gathered[static_cast<size_t>(pos)] = compressed_message(options.kind, step, 0, pos, std::move(own));
  // Round r: forward the message of ring position pos − r, receive that of pos − r − 1.
  for (int r = 0; r < n_ring - 1; ++r) {
    const int send_source = (pos - r + n_ring) % n_ring;
    const int recv_source = (pos - r - 1 + n_ring) % n_ring;
    solvernet::v1::TensorMessage outgoing = gathered[static_cast<size_t>(send_source)];
    outgoing.set_round(r);
    SN_TRY(transport.send(next, std::move(outgoing), net::Traffic::kDataParallel));
    SN_ASSIGN(gathered[static_cast<size_t>(recv_source)],
              transport.receive({options.kind, step, recv_source, r, 0, prev}, options.timeout));
  }
  torch::NoGradGuard no_grad;
  torch::Tensor sum;
  for (int source = 0; source < n_ring; ++source) {
    SN_ASSIGN(auto dense, decompress_from(compressor, gathered[static_cast<size_t>(source)],
                                          transport.describe(ring[static_cast<size_t>(source)])));
    if (source == 0)
      sum = std::move(dense);
    else
      sum.add_(dense);
  }
  buffer.copy_(sum);
  return ok_status();
}

Result<torch::Tensor> compressed_exchange_sum(net::JobTransport& transport, int peer,
                                              compress::GradientCompressor& compressor,
                                              const torch::Tensor& buffer, int64_t step,
                                              uint64_t shared_seed, const std::string& kind,
                                              std::chrono::milliseconds timeout) {
  SN_ASSIGN(auto own, compressor.compress(buffer.reshape({-1}), shared_seed));
  auto outgoing = compressed_message(kind, step, 0, 0, own);
  SN_TRY(transport.send(peer, outgoing, net::Traffic::kDataParallel));
  SN_ASSIGN(auto incoming, transport.receive({kind, step, 0, 0, 0, peer}, timeout));
  SN_ASSIGN(auto sum, decompress_from(compressor, outgoing, "this node"));
  SN_ASSIGN(auto other, decompress_from(compressor, incoming, transport.describe(peer)));
  torch::NoGradGuard no_grad;
  return sum.add_(other).view(buffer.sizes());
}

}  // namespace sn::train
