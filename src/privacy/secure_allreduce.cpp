#include <algorithm>
#include <cstring>

#include "privacy/privacy.h"

namespace sn::privacy {
namespace {

using Clock = std::chrono::steady_clock;
using Message = solvernet::v1::TensorMessage;

constexpr const char* kKeys = "sa-key";
constexpr const char* kShares = "sa-share";
constexpr const char* kMasked = "sa-mask";
constexpr const char* kReveal = "sa-reveal";

Message bytes_message(const std::string& kind, int64_t step, const std::string& bytes) {
  Message m;
  m.set_kind(kind);
  m.set_step(step);
  auto* t = m.mutable_tensor();
  t->set_dtype("u8");
  t->add_shape(static_cast<int64_t>(bytes.size()));
  t->set_data(bytes);
  return m;
}

Result<std::string> bytes_of(const Message& m, const std::string& sender) {
  if (!m.has_tensor() || m.tensor().dtype() != "u8" || m.tensor().shape_size() != 1 ||
      m.tensor().shape(0) != static_cast<int64_t>(m.tensor().data().size()))
    return kind_error(ErrorKind::bad_peer, "{} message from {} is malformed", m.kind(), sender);
  return m.tensor().data();
}

std::chrono::milliseconds left(Clock::time_point deadline) {
  return std::max(std::chrono::milliseconds(1),
                  std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
}

}  // namespace

SecureAllreduce::SecureAllreduce(net::Transport& transport, std::vector<int> ring, std::vector<PublicKey> ring_keys,
                                 const NodeKey& key, SecureAllreduceOptions options)
    : transport_(transport),
      ring_(std::move(ring)),
      ring_keys_(std::move(ring_keys)),
      key_(key),
      options_(std::move(options)) {}

Status SecureAllreduce::run(std::span<float> buffer, int64_t step) {
  const int d = static_cast<int>(ring_.size());
  last_survivors_ = 0;
  if (d <= 1) return ok_status();
  const auto found = std::find(ring_.begin(), ring_.end(), transport_.self());
  if (found == ring_.end()) return make_error("secure aggregation: this member is not in the ring");
  const int self = static_cast<int>(found - ring_.begin());
  auto fail = [&](Error error) -> Status {
    if (error.kind != ErrorKind::aborted) transport_.abort(error.message);
    return error;
  };
  SecAggParams params{fmt::format("{}/{}", options_.context, step), d, options_.threshold,
                      static_cast<int64_t>(buffer.size()), options_.range};
  auto created = SecAggSession::create(params, self, key_, ring_keys_);
  if (!created.ok()) return fail(created.error());
  SecAggSession& session = *created;
  auto peer = [&](int pos) { return ring_[static_cast<size_t>(pos)]; };
  auto receive = [&](const char* kind, int pos, int chunk, std::chrono::milliseconds timeout) {
    return transport_.receive({kind, step, 0, 0, chunk, peer(pos)}, timeout);
  };
  auto send = [&](int pos, Message m) { return transport_.send(peer(pos), std::move(m), net::Traffic::kDataParallel); };

  // Round 1: keys. Every replica must take part (a replica gone before its
  // shares are out cannot be recovered; the step fails and is retried).
  const std::string advert = encode(session.advertise());
  for (int j = 0; j < d; ++j)
    if (j != self)
      if (auto s = send(j, bytes_message(kKeys, step, advert)); !s.ok()) return fail(s.error());
  if (options_.stop_after_round == 1) return ok_status();
  std::vector<KeyAdvert> adverts{session.advertise()};
  for (int j = 0; j < d; ++j) {
    if (j == self) continue;
    auto m = receive(kKeys, j, 0, options_.timeout);
    if (!m.ok()) return fail(m.error());
    auto bytes = bytes_of(*m, transport_.describe(peer(j)));
    if (!bytes.ok()) return fail(bytes.error());
    auto a = decode_advert(*bytes);
    if (!a.ok()) return fail(a.error());
    if (a->index != j)
      return fail(kind_error(ErrorKind::bad_peer, "secure aggregation: {} sent the key advert of replica {}",
                             transport_.describe(peer(j)), a->index));
    adverts.push_back(*a);
  }
  if (auto s = session.accept_adverts(adverts); !s.ok()) return fail(s.error());

  // Round 2: shares, each to its holder only (the link is TLS, so only the
  // holder reads it).
  for (int j = 0; j < d; ++j)
    if (j != self)
      if (auto s = send(j, bytes_message(kShares, step, encode(session.shares_for(j)))); !s.ok())
        return fail(s.error());
  if (options_.stop_after_round == 2) return ok_status();
  for (int j = 0; j < d; ++j) {
    if (j == self) continue;
    auto m = receive(kShares, j, 0, options_.timeout);
    if (!m.ok()) return fail(m.error());
    auto bytes = bytes_of(*m, transport_.describe(peer(j)));
    if (!bytes.ok()) return fail(bytes.error());
    auto bundle = decode_share(*bytes);
    if (!bundle.ok()) return fail(bundle.error());
    if (bundle->seed.dealer != j)
      return fail(kind_error(ErrorKind::bad_peer, "secure aggregation: {} sent shares dealt by replica {}",
                             transport_.describe(peer(j)), bundle->seed.dealer));
    if (auto s = session.accept_share(*bundle); !s.ok()) return fail(s.error());
  }

  // Round 3: the masked vector to every replica, in chunks. From here on a
  // replica that stays silent has dropped; sends to it may fail.
  auto masked_own = session.mask(std::span<const float>(buffer.data(), buffer.size()));
  if (!masked_own.ok()) return fail(masked_own.error());
  const int64_t n = static_cast<int64_t>(buffer.size());
  const int64_t chunk_values = std::max<int64_t>(1, options_.chunk_bytes / 4);
  for (int j = 0; j < d; ++j) {
    if (j == self) continue;
    int chunk = 0;
    for (int64_t off = 0; off < n; off += chunk_values, ++chunk) {
      const int64_t count = std::min(chunk_values, n - off);
      Message m;
      m.set_kind(kMasked);
      m.set_step(step);
      m.set_chunk(chunk);
      auto* t = m.mutable_tensor();
      t->set_dtype("u32");
      t->add_shape(count);
      t->set_data(reinterpret_cast<const char*>(masked_own->data() + off), static_cast<size_t>(count) * 4);
      (void)send(j, std::move(m));  // a dropped peer: it simply gets nothing
    }
  }
  if (options_.stop_after_round == 3) return ok_status();
  std::vector<std::optional<std::vector<uint32_t>>> masked(static_cast<size_t>(d));
  masked[static_cast<size_t>(self)] = std::move(*masked_own);
  const auto round3_deadline = Clock::now() + options_.timeout;
  for (int j = 0; j < d; ++j) {
    if (j == self) continue;
    std::vector<uint32_t> values(static_cast<size_t>(n));
    bool complete = true;
    int chunk = 0;
    for (int64_t off = 0; off < n; off += chunk_values, ++chunk) {
      const int64_t count = std::min(chunk_values, n - off);
      auto m = receive(kMasked, j, chunk, left(round3_deadline));
      if (!m.ok()) {
        if (m.error().kind == ErrorKind::timeout) { complete = false; break; }
        return fail(m.error());
      }
      if (!m->has_tensor() || m->tensor().dtype() != "u32" || m->tensor().shape_size() != 1 ||
          m->tensor().shape(0) != count || m->tensor().data().size() != static_cast<size_t>(count) * 4)
        return fail(kind_error(ErrorKind::bad_peer,
                               "secure aggregation: masked vector chunk {} from {} is malformed: expected {} u32 values",
                               chunk, transport_.describe(peer(j)), count));
      std::memcpy(values.data() + off, m->tensor().data().data(), static_cast<size_t>(count) * 4);
    }
    if (complete) masked[static_cast<size_t>(j)] = std::move(values);
  }
  std::vector<int> survivors;
  std::vector<std::vector<uint32_t>> survivor_vectors;
  for (int j = 0; j < d; ++j)
    if (masked[static_cast<size_t>(j)]) {
      survivors.push_back(j);
      survivor_vectors.push_back(std::move(*masked[static_cast<size_t>(j)]));
    }

  // Round 4: reveal for the survivors, to the survivors.
  auto own_reveal = session.reveal(survivors);
  if (!own_reveal.ok()) return fail(own_reveal.error());
  const std::string reveal_bytes = encode(*own_reveal);
  for (int j : survivors)
    if (j != self) (void)send(j, bytes_message(kReveal, step, reveal_bytes));
  if (options_.stop_after_round == 4) return ok_status();
  std::vector<Reveal> reveals{*own_reveal};
  int other_views = 0;
  const auto round4_deadline = Clock::now() + options_.timeout;
  for (int j : survivors) {
    if (j == self) continue;
    auto m = receive(kReveal, j, 0, left(round4_deadline));
    if (!m.ok()) {
      if (m.error().kind == ErrorKind::timeout) continue;  // dropped after sending its vector
      return fail(m.error());
    }
    auto bytes = bytes_of(*m, transport_.describe(peer(j)));
    if (!bytes.ok()) return fail(bytes.error());
    auto r = decode_reveal(*bytes);
    if (!r.ok()) return fail(r.error());
    if (r->holder != j)
      return fail(kind_error(ErrorKind::bad_peer, "secure aggregation: {} sent the reveal of replica {}",
                             transport_.describe(peer(j)), r->holder));
    // A replica that saw a different survivor set (a vector that reached it
    // but not us) cannot be combined with ours: leave it out.
    if (r->survivors != survivors) {
      ++other_views;
      continue;
    }
    reveals.push_back(std::move(*r));
  }
  if (static_cast<int>(reveals.size()) < session.threshold())
    return fail(kind_error(ErrorKind::aborted,
                           "secure aggregation: {} of {} replicas revealed for the same {} survivors ({} saw others), "
                           "{} needed: step aborted",
                           reveals.size(), d, survivors.size(), other_views, session.threshold()));
  auto sum = session.unmask(survivors, survivor_vectors, reveals);
  if (!sum.ok()) return fail(sum.error());
  const auto floats = dequantize(*sum, session.scale());
  std::copy(floats.begin(), floats.end(), buffer.begin());
  last_survivors_ = static_cast<int>(survivors.size());
  return ok_status();
}

}  // namespace sn::privacy
