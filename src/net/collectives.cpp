#include "net/collectives.h"

#include <algorithm>
#include <cstring>

namespace sn::net {
namespace {

// Runs BODY; on error aborts TRANSPORT with it (the header's failure contract).
template <typename T, typename Body>
Result<T> aborting_on_error(Transport& transport, const CollectiveOptions& options, Body body) {
  Result<T> result = body();
  if (!result.ok() && options.abort_on_error) transport.abort(result.message());
  return result;
}

Result<int> ring_position(const Transport& transport, const std::vector<int>& ring) {
  auto it = std::find(ring.begin(), ring.end(), transport.self());
  if (it == ring.end()) return make_error("collective: {} is not in the ring", transport.describe(transport.self()));
  return static_cast<int>(it - ring.begin());
}

}  // namespace

solvernet::v1::TensorMessage f32_message(std::span<const float> values) {
  solvernet::v1::TensorMessage m;
  auto* t = m.mutable_tensor();
  t->set_dtype("f32");
  t->add_shape(static_cast<int64_t>(values.size()));
  t->set_data(reinterpret_cast<const char*>(values.data()), values.size_bytes());
  return m;
}

Status read_f32(const solvernet::v1::TensorMessage& m, std::span<float> out, const std::string& sender) {
  const auto expected = static_cast<int64_t>(out.size());
  if (!m.has_tensor() || m.tensor().dtype() != "f32" || m.tensor().shape_size() != 1 ||
      m.tensor().shape(0) != expected || m.tensor().data().size() != out.size_bytes())
    return kind_error(ErrorKind::bad_peer, "{} message from {} is malformed: expected {} f32 values", m.kind(),
                      sender, expected);
  std::memcpy(out.data(), m.tensor().data().data(), out.size_bytes());
  return ok_status();
}

RingAllreduce::RingAllreduce(Transport& transport, std::vector<int> ring, CollectiveOptions options)
    : transport_(transport), ring_(std::move(ring)), options_(std::move(options)) {}

int64_t RingAllreduce::messages_per_member(int64_t values, int ring_size, int64_t chunk_bytes) {
  if (ring_size <= 1) return 0;
  const int64_t chunk_values = std::max<int64_t>(1, chunk_bytes / static_cast<int64_t>(sizeof(float)));
  const int64_t largest_segment = (values + ring_size - 1) / ring_size;
  const int64_t chunks = std::max<int64_t>(1, (largest_segment + chunk_values - 1) / chunk_values);
  return 2 * (ring_size - 1) * chunks;
}

Status RingAllreduce::run(std::span<float> buffer, int64_t step) {
  const int n_ring = static_cast<int>(ring_.size());
  if (n_ring <= 1) return ok_status();
  return aborting_on_error<void>(transport_, options_, [&]() -> Status {
    SN_ASSIGN(const int pos, ring_position(transport_, ring_));
    const int next = ring_[static_cast<size_t>((pos + 1) % n_ring)];
    const int prev = ring_[static_cast<size_t>((pos + n_ring - 1) % n_ring)];
    float* data = buffer.data();
    const auto n = static_cast<int64_t>(buffer.size());
    auto seg_begin = [&](int s) { return n * s / n_ring; };
    auto seg_end = [&](int s) { return n * (s + 1) / n_ring; };
    const int64_t chunk_elems = std::max<int64_t>(1, options_.chunk_bytes / static_cast<int64_t>(sizeof(float)));
    auto mod = [&](int x) { return ((x % n_ring) + n_ring) % n_ring; };
    std::vector<float> incoming;
    // Round r of phase p is message round p · ring size + r; micro is the segment.
    for (int phase = 0; phase < 2; ++phase) {
      for (int r = 0; r < n_ring - 1; ++r) {
        const int send_seg = phase == 0 ? mod(pos - r) : mod(pos + 1 - r);
        const int recv_seg = phase == 0 ? mod(pos - r - 1) : mod(pos - r);
        const int round = phase * n_ring + r;
        int chunk = 0;
        for (int64_t off = seg_begin(send_seg); off < seg_end(send_seg); off += chunk_elems, ++chunk) {
          const int64_t count = std::min(chunk_elems, seg_end(send_seg) - off);
          auto message = f32_message({data + off, static_cast<size_t>(count)});
          message.set_kind(options_.kind);
          message.set_step(step);
          message.set_micro(send_seg);
          message.set_round(round);
          message.set_chunk(chunk);
          SN_TRY(transport_.send(next, std::move(message), Traffic::kDataParallel));
        }
        chunk = 0;
        for (int64_t off = seg_begin(recv_seg); off < seg_end(recv_seg); off += chunk_elems, ++chunk) {
          const int64_t count = std::min(chunk_elems, seg_end(recv_seg) - off);
          SN_ASSIGN(auto message, transport_.receive({options_.kind, step, recv_seg, round, chunk, prev}, options_.timeout));
          if (phase == 0) {
            incoming.resize(static_cast<size_t>(count));
            SN_TRY(read_f32(message, incoming, transport_.describe(prev)));
            for (int64_t i = 0; i < count; ++i) data[off + i] += incoming[static_cast<size_t>(i)];
          } else {
            SN_TRY(read_f32(message, {data + off, static_cast<size_t>(count)}, transport_.describe(prev)));
          }
        }
      }
    }
    return ok_status();
  });
}

RingAllgather::RingAllgather(Transport& transport, std::vector<int> ring, CollectiveOptions options)
    : transport_(transport), ring_(std::move(ring)), options_(std::move(options)) {}

Result<std::vector<solvernet::v1::TensorMessage>> RingAllgather::run(solvernet::v1::TensorMessage own, int64_t step) {
  using Messages = std::vector<solvernet::v1::TensorMessage>;
  return aborting_on_error<Messages>(transport_, options_, [&]() -> Result<Messages> {
    const int n_ring = static_cast<int>(ring_.size());
    SN_ASSIGN(const int pos, ring_position(transport_, ring_));
    const int next = ring_[static_cast<size_t>((pos + 1) % n_ring)];
    const int prev = ring_[static_cast<size_t>((pos + n_ring - 1) % n_ring)];
    Messages gathered(static_cast<size_t>(n_ring));
    own.set_kind(options_.kind);
    own.set_step(step);
    own.set_micro(pos);  // micro names the ring position whose message this is
    own.set_round(0);
    own.set_chunk(0);
    gathered[static_cast<size_t>(pos)] = std::move(own);
    // Round r: forward the message of ring position pos − r, receive that of pos − r − 1.
    for (int r = 0; r < n_ring - 1; ++r) {
      const int send_source = (pos - r + n_ring) % n_ring;
      const int recv_source = (pos - r - 1 + n_ring) % n_ring;
      solvernet::v1::TensorMessage outgoing = gathered[static_cast<size_t>(send_source)];
      outgoing.set_round(r);
      SN_TRY(transport_.send(next, std::move(outgoing), Traffic::kDataParallel));
      SN_ASSIGN(gathered[static_cast<size_t>(recv_source)],
                transport_.receive({options_.kind, step, recv_source, r, 0, prev}, options_.timeout));
    }
    return gathered;
  });
}

PairExchange::PairExchange(Transport& transport, int peer, CollectiveOptions options)
    : transport_(transport), peer_(peer), options_(std::move(options)) {}

Result<solvernet::v1::TensorMessage> PairExchange::run(solvernet::v1::TensorMessage own, int64_t step) {
  return aborting_on_error<solvernet::v1::TensorMessage>(transport_, options_, [&]() -> Result<solvernet::v1::TensorMessage> {
    own.set_kind(options_.kind);
    own.set_step(step);
    own.set_micro(0);
    own.set_round(0);
    own.set_chunk(0);
    SN_TRY(transport_.send(peer_, std::move(own), Traffic::kDataParallel));
    return transport_.receive({options_.kind, step, 0, 0, 0, peer_}, options_.timeout);
  });
}

}  // namespace sn::net
