#include "privacy/secagg.h"

#include <sodium.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "core/hash.h"

namespace sn::privacy {
namespace {

// Shamir over GF(p), p = 2^61 − 1 (a Mersenne prime: reduction is a shift and
// an add). A 32-byte secret is cut into 7-byte limbs (< 2^56 < p), each
// shared with its own random polynomial at the same points x = holder + 1.
constexpr uint64_t kPrime = (uint64_t{1} << 61) - 1;
constexpr int kLimbBytes = 7;
constexpr int kLimbs = (32 + kLimbBytes - 1) / kLimbBytes;  // 5

uint64_t reduce(unsigned __int128 v) {
  uint64_t lo = static_cast<uint64_t>(v & kPrime);
  uint64_t hi = static_cast<uint64_t>(v >> 61);
  uint64_t r = lo + hi;
  while (r >= kPrime) r -= kPrime;
  return r;
}
uint64_t mul(uint64_t a, uint64_t b) { return reduce(static_cast<unsigned __int128>(a) * b); }
uint64_t add(uint64_t a, uint64_t b) { return reduce(static_cast<unsigned __int128>(a) + b); }
uint64_t sub(uint64_t a, uint64_t b) { return add(a, kPrime - b); }
uint64_t power(uint64_t base, uint64_t exp) {
  uint64_t r = 1;
  while (exp) {
    if (exp & 1) r = mul(r, base);
    base = mul(base, base);
    exp >>= 1;
  }
  return r;
}
uint64_t inverse(uint64_t a) { return power(a, kPrime - 2); }

uint64_t random_field() {
  for (;;) {  // rejection keeps coefficients uniform
    uint64_t v = 0;
    randombytes_buf(&v, sizeof v);
    v &= (uint64_t{1} << 61) - 1;
    if (v < kPrime) return v;
  }
}

std::array<uint64_t, kLimbs> limbs_of(const std::array<uint8_t, 32>& secret) {
  std::array<uint64_t, kLimbs> out{};
  for (int l = 0; l < kLimbs; ++l)
    for (int b = 0; b < kLimbBytes && l * kLimbBytes + b < 32; ++b)
      out[l] |= uint64_t{secret[l * kLimbBytes + b]} << (8 * b);
  return out;
}

Result<std::array<uint8_t, 32>> secret_of(const std::array<uint64_t, kLimbs>& limbs) {
  std::array<uint8_t, 32> out{};
  for (int l = 0; l < kLimbs; ++l) {
    const int bytes = std::min(kLimbBytes, 32 - l * kLimbBytes);
    if (limbs[l] >> (8 * bytes)) return kind_error(ErrorKind::bad_peer, "reconstructed limb out of range");
    for (int b = 0; b < bytes; ++b) out[l * kLimbBytes + b] = static_cast<uint8_t>(limbs[l] >> (8 * b));
  }
  return out;
}

// Shares of SECRET for x = 1 … D (index i holds x = i + 1).
std::vector<std::vector<uint64_t>> split(const std::array<uint8_t, 32>& secret, int threshold, int holders) {
  const auto limbs = limbs_of(secret);
  std::vector<std::vector<uint64_t>> shares(holders, std::vector<uint64_t>(kLimbs));
  for (int l = 0; l < kLimbs; ++l) {
    std::vector<uint64_t> coef{limbs[l]};
    for (int k = 1; k < threshold; ++k) coef.push_back(random_field());
    for (int h = 0; h < holders; ++h) {
      const uint64_t x = static_cast<uint64_t>(h + 1);
      uint64_t y = 0;
      for (int k = threshold - 1; k >= 0; --k) y = add(mul(y, x), coef[k]);  // Horner
      shares[h][l] = y;
    }
  }
  sodium_memzero(const_cast<uint64_t*>(limbs.data()), sizeof limbs);
  return shares;
}

// Lagrange interpolation at 0 from (holder, values) pairs.
Result<std::array<uint8_t, 32>> combine(const std::vector<const Share*>& shares) {
  std::array<uint64_t, kLimbs> limbs{};
  for (size_t a = 0; a < shares.size(); ++a) {
    const uint64_t xa = static_cast<uint64_t>(shares[a]->holder + 1);
    uint64_t num = 1, den = 1;
    for (size_t b = 0; b < shares.size(); ++b) {
      if (a == b) continue;
      const uint64_t xb = static_cast<uint64_t>(shares[b]->holder + 1);
      num = mul(num, xb);            // (0 − xb) / (xa − xb) = xb / (xb − xa)
      den = mul(den, sub(xb, xa));
    }
    const uint64_t lambda = mul(num, inverse(den));
    for (int l = 0; l < kLimbs; ++l) limbs[l] = add(limbs[l], mul(lambda, shares[a]->values[l]));
  }
  return secret_of(limbs);
}

// ChaCha20 keystream of KEY as LENGTH 32-bit words. Each key is used for one
// stream only (fresh keys per session), so a zero nonce is safe.
void add_stream(std::span<uint32_t> out, const std::array<uint8_t, 32>& key, bool subtract) {
  std::vector<uint32_t> stream(out.size());
  const std::array<uint8_t, crypto_stream_chacha20_NONCEBYTES> nonce{};
  crypto_stream_chacha20(reinterpret_cast<unsigned char*>(stream.data()), stream.size() * sizeof(uint32_t),
                         nonce.data(), key.data());
  if (subtract)
    for (size_t k = 0; k < out.size(); ++k) out[k] -= stream[k];
  else
    for (size_t k = 0; k < out.size(); ++k) out[k] += stream[k];
}

Hash256 advert_digest(const std::string& context, const KeyAdvert& advert) {
  Hasher h;
  h.update(std::string_view("solvernet-secagg-advert-v1"));
  h.update(context);
  h.update_u64(static_cast<uint64_t>(advert.index));
  h.update(advert.mask_public);
  h.update(advert.seed_commit);
  return h.finish();
}

Hash256 share_digest(const std::string& context, const Share& share) {
  Hasher h;
  h.update(std::string_view("solvernet-secagg-share-v1"));
  h.update(context);
  h.update_u64(static_cast<uint64_t>(share.dealer));
  h.update_u64(static_cast<uint64_t>(share.holder));
  h.update_u64(static_cast<uint64_t>(share.kind));
  for (uint64_t v : share.values) h.update_u64(v);
  return h.finish();
}

// Little-endian byte writer / reader for the three messages.
struct Writer {
  std::string out;
  void u32(uint32_t v) { for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>(v >> (8 * b))); }
  void u64(uint64_t v) { for (int b = 0; b < 8; ++b) out.push_back(static_cast<char>(v >> (8 * b))); }
  void bytes(std::span<const uint8_t> v) { out.append(reinterpret_cast<const char*>(v.data()), v.size()); }
};
struct Reader {
  std::string_view in;
  bool failed = false;
  uint64_t take(int n) {
    if (in.size() < static_cast<size_t>(n)) { failed = true; return 0; }
    uint64_t v = 0;
    for (int b = 0; b < n; ++b) v |= uint64_t{static_cast<uint8_t>(in[b])} << (8 * b);
    in.remove_prefix(n);
    return v;
  }
  uint32_t u32() { return static_cast<uint32_t>(take(4)); }
  uint64_t u64() { return take(8); }
  template <size_t N>
  void bytes(std::array<uint8_t, N>& v) {
    if (in.size() < N) { failed = true; return; }
    std::memcpy(v.data(), in.data(), N);
    in.remove_prefix(N);
  }
};

void write_share(Writer& w, const Share& s) {
  w.u32(static_cast<uint32_t>(s.dealer));
  w.u32(static_cast<uint32_t>(s.holder));
  w.u32(static_cast<uint32_t>(s.kind));
  w.u32(static_cast<uint32_t>(s.values.size()));
  for (uint64_t v : s.values) w.u64(v);
  w.bytes(s.signature);
}
Share read_share(Reader& r) {
  Share s;
  s.dealer = static_cast<int>(r.u32());
  s.holder = static_cast<int>(r.u32());
  const uint32_t kind = r.u32();
  s.kind = kind == 0 ? ShareKind::seed : ShareKind::secret;
  if (kind > 1) r.failed = true;
  const uint32_t n = r.u32();
  if (n != kLimbs) r.failed = true;
  for (uint32_t k = 0; k < n && !r.failed; ++k) s.values.push_back(r.u64());
  r.bytes(s.signature);
  return s;
}

}  // namespace

int default_threshold(int replicas) { return std::max(replicas / 2 + 1, (2 * replicas + 2) / 3); }

Status check_params(const SecAggParams& p) {
  if (p.replicas < 2) return input_error("secure aggregation needs ≥ 2 replicas, got {}", p.replicas);
  if (p.replicas > 1024) return input_error("secure aggregation supports ≤ 1024 replicas, got {}", p.replicas);
  const int t = p.threshold == 0 ? default_threshold(p.replicas) : p.threshold;
  if (!(t > p.replicas / 2 && t <= p.replicas))
    return input_error("secure aggregation threshold must be in ({}, {}], got {}", p.replicas / 2.0, p.replicas, t);
  if (p.length < 1) return input_error("secure aggregation vector length must be ≥ 1, got {}", p.length);
  if (!(p.range > 0) || !std::isfinite(p.range))
    return input_error("secure aggregation range must be > 0, got {}", p.range);
  if (fixed_point_scale(p.replicas, p.range) < 1)
    return input_error("secure aggregation range {} × {} replicas leaves no fixed-point precision", p.range,
                       p.replicas);
  return ok_status();
}

double fixed_point_scale(int replicas, double range) {
  // Largest 2^k with D · range · 2^k < 2^31.
  return std::exp2(std::floor(std::log2(2147483647.0 / (replicas * range))));
}

std::vector<uint32_t> quantize(std::span<const float> values, double scale, double range) {
  std::vector<uint32_t> out(values.size());
  for (size_t k = 0; k < values.size(); ++k) {
    double v = values[k];
    if (std::isnan(v)) v = 0;
    v = std::clamp(v, -range, range);
    out[k] = static_cast<uint32_t>(static_cast<int32_t>(std::llround(v * scale)));
  }
  return out;
}

std::vector<float> dequantize(std::span<const uint32_t> sum, double scale) {
  std::vector<float> out(sum.size());
  for (size_t k = 0; k < sum.size(); ++k)
    out[k] = static_cast<float>(static_cast<double>(static_cast<int32_t>(sum[k])) / scale);
  return out;
}

std::string encode(const KeyAdvert& a) {
  Writer w;
  w.u32(static_cast<uint32_t>(a.index));
  w.bytes(a.mask_public);
  w.bytes(a.seed_commit);
  w.bytes(a.signature);
  return w.out;
}
std::string encode(const ShareBundle& b) {
  Writer w;
  write_share(w, b.seed);
  write_share(w, b.secret);
  return w.out;
}
std::string encode(const Reveal& r) {
  Writer w;
  w.u32(static_cast<uint32_t>(r.holder));
  w.u32(static_cast<uint32_t>(r.survivors.size()));
  for (int s : r.survivors) w.u32(static_cast<uint32_t>(s));
  w.u32(static_cast<uint32_t>(r.shares.size()));
  for (const auto& s : r.shares) write_share(w, s);
  return w.out;
}

Result<KeyAdvert> decode_advert(std::string_view bytes) {
  Reader r{bytes};
  KeyAdvert a;
  a.index = static_cast<int>(r.u32());
  r.bytes(a.mask_public);
  r.bytes(a.seed_commit);
  r.bytes(a.signature);
  if (r.failed || !r.in.empty()) return kind_error(ErrorKind::bad_peer, "malformed key advert ({} bytes)", bytes.size());
  return a;
}
Result<ShareBundle> decode_share(std::string_view bytes) {
  Reader r{bytes};
  ShareBundle b;
  b.seed = read_share(r);
  b.secret = read_share(r);
  if (r.failed || !r.in.empty()) return kind_error(ErrorKind::bad_peer, "malformed share bundle ({} bytes)", bytes.size());
  return b;
}
Result<Reveal> decode_reveal(std::string_view bytes) {
  Reader r{bytes};
  Reveal v;
  v.holder = static_cast<int>(r.u32());
  const uint32_t n = r.u32();
  if (n > 1024) r.failed = true;
  for (uint32_t k = 0; k < n && !r.failed; ++k) v.survivors.push_back(static_cast<int>(r.u32()));
  const uint32_t m = r.u32();
  if (m > 1024) r.failed = true;
  for (uint32_t k = 0; k < m && !r.failed; ++k) v.shares.push_back(read_share(r));
  if (r.failed || !r.in.empty()) return kind_error(ErrorKind::bad_peer, "malformed reveal ({} bytes)", bytes.size());
  return v;
}

Result<SecAggSession> SecAggSession::create(SecAggParams params, int self, const NodeKey& key,
                                            std::vector<PublicKey> replica_keys) {
  if (params.threshold == 0) params.threshold = default_threshold(params.replicas);
  if (auto checked = check_params(params); !checked.ok()) return checked.error();
  if (static_cast<int>(replica_keys.size()) != params.replicas)
    return input_error("secure aggregation: {} replica keys for {} replicas", replica_keys.size(), params.replicas);
  if (self < 0 || self >= params.replicas || replica_keys[self] != key.public_key())
    return input_error("secure aggregation: replica {} is not this node", self);
  if (sodium_init() < 0) return make_error("libsodium failed to initialize");
  SecAggSession s;
  s.params_ = std::move(params);
  s.self_ = self;
  s.key_ = &key;
  s.replica_keys_ = std::move(replica_keys);
  s.scale_ = fixed_point_scale(s.params_.replicas, s.params_.range);
  randombytes_buf(s.mask_secret_.data(), s.mask_secret_.size());
  crypto_scalarmult_base(s.mask_public_.data(), s.mask_secret_.data());
  randombytes_buf(s.seed_.data(), s.seed_.size());
  s.adverts_.resize(s.params_.replicas);
  s.held_.resize(s.params_.replicas);
  const auto seed_shares = split(s.seed_, s.params_.threshold, s.params_.replicas);
  const auto secret_shares = split(s.mask_secret_, s.params_.threshold, s.params_.replicas);
  for (int h = 0; h < s.params_.replicas; ++h) {
    ShareBundle b;
    b.seed = Share{self, h, ShareKind::seed, seed_shares[h], {}};
    b.secret = Share{self, h, ShareKind::secret, secret_shares[h], {}};
    b.seed.signature = key.sign(share_digest(s.params_.context, b.seed));
    b.secret.signature = key.sign(share_digest(s.params_.context, b.secret));
    s.dealt_.push_back(std::move(b));
  }
  s.held_[self] = s.dealt_[self];
  return s;
}

KeyAdvert SecAggSession::advertise() const {
  KeyAdvert a;
  a.index = self_;
  a.mask_public = mask_public_;
  a.seed_commit = hash_bytes(seed_);
  a.signature = key_->sign(advert_digest(params_.context, a));
  return a;
}

Status SecAggSession::accept_adverts(const std::vector<KeyAdvert>& adverts) {
  for (const auto& a : adverts) {
    if (a.index < 0 || a.index >= params_.replicas)
      return kind_error(ErrorKind::bad_peer, "secure aggregation: key advert for replica {} of {}", a.index,
                        params_.replicas);
    const Hash256 digest = advert_digest(params_.context, a);
    if (!verify_signature(replica_keys_[a.index], digest, a.signature))
      return kind_error(ErrorKind::bad_peer, "secure aggregation: replica {}'s key advert has a bad signature",
                        a.index);
    if (a.index == self_ && a.mask_public != mask_public_)
      return kind_error(ErrorKind::bad_peer, "secure aggregation: a second key advert for this replica");
    adverts_[a.index] = a;
  }
  for (int i = 0; i < params_.replicas; ++i)
    if (!adverts_[i]) return kind_error(ErrorKind::bad_peer, "secure aggregation: no key advert from replica {}", i);
  return ok_status();
}

ShareBundle SecAggSession::shares_for(int holder) const { return dealt_.at(holder); }

Status SecAggSession::check_share(const Share& share, int holder, ShareKind kind) const {
  if (share.dealer < 0 || share.dealer >= params_.replicas || share.holder != holder || share.kind != kind ||
      share.values.size() != kLimbs)
    return kind_error(ErrorKind::bad_peer, "secure aggregation: malformed share (dealer {}, holder {})", share.dealer,
                      share.holder);
  for (uint64_t v : share.values)
    if (v >= kPrime) return kind_error(ErrorKind::bad_peer, "secure aggregation: share value outside the field");
  if (!verify_signature(replica_keys_[share.dealer], share_digest(params_.context, share), share.signature))
    return kind_error(ErrorKind::bad_peer,
                      "secure aggregation: share of replica {} held by replica {} has a bad signature (forged)",
                      share.dealer, share.holder);
  return ok_status();
}

Status SecAggSession::accept_share(const ShareBundle& bundle) {
  if (auto s = check_share(bundle.seed, self_, ShareKind::seed); !s.ok()) return s;
  if (auto s = check_share(bundle.secret, self_, ShareKind::secret); !s.ok()) return s;
  if (bundle.seed.dealer != bundle.secret.dealer)
    return kind_error(ErrorKind::bad_peer, "secure aggregation: share bundle mixes dealers");
  held_[bundle.seed.dealer] = bundle;
  return ok_status();
}

std::array<uint8_t, 32> SecAggSession::pair_key(std::span<const uint8_t> secret, int a, int b) const {
  // Diffie–Hellman of a's secret with b's public (symmetric), hashed with
  // both public keys and the context so the key is unique to this session.
  std::array<uint8_t, 32> shared{};
  const int other = b;
  if (crypto_scalarmult(shared.data(), secret.data(), adverts_[other]->mask_public.data()) != 0) shared.fill(0);
  const int lo = std::min(a, b), hi = std::max(a, b);
  Hasher h;
  h.update(std::string_view("solvernet-secagg-pair-v1"));
  h.update(params_.context);
  h.update(shared);
  h.update(adverts_[lo]->mask_public);
  h.update(adverts_[hi]->mask_public);
  sodium_memzero(shared.data(), shared.size());
  return h.finish();
}

Result<std::vector<uint32_t>> SecAggSession::mask(std::span<const float> values) const {
  if (static_cast<int64_t>(values.size()) != params_.length)
    return input_error("secure aggregation: vector of {} values, expected {}", values.size(), params_.length);
  for (int i = 0; i < params_.replicas; ++i) {
    if (!adverts_[i]) return make_error("secure aggregation: mask() before every key advert was accepted");
    if (!held_[i]) return kind_error(ErrorKind::bad_peer, "secure aggregation: no shares from replica {}", i);
  }
  std::vector<uint32_t> y = quantize(values, scale_, params_.range);
  add_stream(y, seed_, false);
  for (int j = 0; j < params_.replicas; ++j) {
    if (j == self_) continue;
    add_stream(y, pair_key(mask_secret_, self_, j), /*subtract=*/self_ > j);
  }
  return y;
}

Result<Reveal> SecAggSession::reveal(const std::vector<int>& survivors) const {
  if (!std::is_sorted(survivors.begin(), survivors.end()) ||
      std::adjacent_find(survivors.begin(), survivors.end()) != survivors.end())
    return make_error("secure aggregation: survivors must be sorted and distinct");
  for (int u : survivors)
    if (u < 0 || u >= params_.replicas) return make_error("secure aggregation: survivor {} out of range", u);
  if (static_cast<int>(survivors.size()) < params_.threshold)
    return kind_error(ErrorKind::aborted,
                      "secure aggregation: only {} of {} replicas sent their masked vector, {} needed: step aborted",
                      survivors.size(), params_.replicas, params_.threshold);
  // Revealing for two different survivor sets could hand out both secrets of
  // one replica; refuse.
  if (revealed_for_ && *revealed_for_ != survivors)
    return kind_error(ErrorKind::bad_peer, "secure aggregation: asked to reveal for a second survivor set");
  revealed_for_ = survivors;
  Reveal r;
  r.holder = self_;
  r.survivors = survivors;
  const std::set<int> in_u(survivors.begin(), survivors.end());
  for (int d = 0; d < params_.replicas; ++d) {
    if (!held_[d]) return make_error("secure aggregation: reveal() before replica {}'s shares arrived", d);
    r.shares.push_back(in_u.count(d) ? held_[d]->seed : held_[d]->secret);
  }
  return r;
}

Result<std::vector<uint32_t>> SecAggSession::unmask(const std::vector<int>& survivors,
                                                    const std::vector<std::vector<uint32_t>>& masked,
                                                    const std::vector<Reveal>& reveals) const {
  if (static_cast<int>(survivors.size()) < params_.threshold)
    return kind_error(ErrorKind::aborted,
                      "secure aggregation: only {} of {} replicas survived, {} needed: step aborted",
                      survivors.size(), params_.replicas, params_.threshold);
  if (masked.size() != survivors.size()) return make_error("secure aggregation: {} vectors for {} survivors",
                                                           masked.size(), survivors.size());
  const std::set<int> in_u(survivors.begin(), survivors.end());
  // Shares by dealer, one per distinct holder, each checked.
  std::map<int, std::vector<const Share*>> by_dealer;
  std::set<int> holders;
  for (const auto& r : reveals) {
    if (r.survivors != survivors)
      return kind_error(ErrorKind::bad_peer, "secure aggregation: replica {} revealed for a different survivor set",
                        r.holder);
    if (r.holder < 0 || r.holder >= params_.replicas || !holders.insert(r.holder).second)
      return kind_error(ErrorKind::bad_peer, "secure aggregation: duplicate or unknown revealer {}", r.holder);
    for (const auto& s : r.shares) {
      const ShareKind want = in_u.count(s.dealer) ? ShareKind::seed : ShareKind::secret;
      if (auto ok = check_share(s, r.holder, want); !ok.ok()) return ok.error();
      by_dealer[s.dealer].push_back(&s);
    }
  }
  if (static_cast<int>(holders.size()) < params_.threshold)
    return kind_error(ErrorKind::aborted, "secure aggregation: {} replicas revealed, {} needed: step aborted",
                      holders.size(), params_.threshold);
  std::vector<uint32_t> sum(static_cast<size_t>(params_.length), 0);
  for (size_t k = 0; k < survivors.size(); ++k) {
    if (static_cast<int64_t>(masked[k].size()) != params_.length)
      return kind_error(ErrorKind::bad_peer, "secure aggregation: replica {} sent {} values, expected {}",
                        survivors[k], masked[k].size(), params_.length);
    for (size_t v = 0; v < sum.size(); ++v) sum[v] += masked[k][v];
  }
  for (int d = 0; d < params_.replicas; ++d) {
    auto& shares = by_dealer[d];
    if (static_cast<int>(shares.size()) < params_.threshold)
      return kind_error(ErrorKind::aborted, "secure aggregation: {} shares of replica {}, {} needed", shares.size(),
                        d, params_.threshold);
    shares.resize(static_cast<size_t>(params_.threshold));
    SN_ASSIGN(auto secret, combine(shares));
    if (in_u.count(d)) {
      if (hash_bytes(secret) != adverts_[d]->seed_commit)
        return kind_error(ErrorKind::bad_peer,
                          "secure aggregation: replica {}'s seed shares are inconsistent with its commitment", d);
      add_stream(sum, secret, /*subtract=*/true);
    } else {
      std::array<uint8_t, 32> pub{};
      crypto_scalarmult_base(pub.data(), secret.data());
      if (pub != adverts_[d]->mask_public)
        return kind_error(ErrorKind::bad_peer,
                          "secure aggregation: replica {}'s key shares are inconsistent with its public key", d);
      // Each survivor u added sign(u, d)·PRG(k_ud) for the dropped d: take it off.
      for (int u : survivors) add_stream(sum, pair_key(secret, d, u), /*subtract=*/u < d);
    }
    sodium_memzero(secret.data(), secret.size());
  }
  return sum;
}

}  // namespace sn::privacy
