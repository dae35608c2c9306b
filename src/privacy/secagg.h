// Secure aggregation of one stage's replica gradients (after Bonawitz et al.,
// CCS 2017, as a peer-to-peer protocol: every replica is also the "server").
// The replicas learn the sum of their gradients and nothing else about any
// one of them, even when up to D − t replicas drop out after sending.
//
// One aggregation (one training step) in rounds; each replica runs one
// SecAggSession and forwards its messages to the others (train's hook does
// this over net's signed transport, docs/privacy.md has the formats):
//   1. keys:    advertise() → every other replica. A fresh X25519 key pair
//               per session, its public key and a commitment to the
//               self-mask seed, signed with the replica's Ed25519 node key.
//   2. shares:  accept_adverts(), then shares_for(j) → replica j. Shamir
//               shares (threshold t of D) of the self-mask seed and of the
//               X25519 secret key, each signed by the dealer.
//   3. input:   accept_share() for each dealer, then mask(gradient) → all.
//               y_i = q(x_i) + PRG(b_i) + Σ_{j>i} PRG(k_ij) − Σ_{j<i} PRG(k_ij)
//               over Z_2^32, with q the fixed-point quantizer below.
//   4. reveal:  once the survivors U (replicas whose y arrived) are known:
//               reveal(U) → all. For each survivor, this replica's share of
//               its self-mask seed; for each dropped replica, its share of
//               that replica's X25519 secret; never both for one replica.
//   5. unmask:  unmask(U, y_U, reveals from ≥ t replicas) → the exact sum of
//               q(x_u) over U, every replica bitwise the same.
//
// Fixed point: a value v is clamped to [−range, range] and becomes
// round(v · scale) mod 2^32, with scale = the largest power of two such that
// D · range · scale < 2^31, so a sum of D values never wraps; the sum is read
// back as a signed 32-bit integer divided by scale (quantization error
// ≤ 0.5/scale per value and replica).
//
// Not thread-safe; one session per (job, stage, step). Every failure is a
// value: bad_peer for a message that fails its signature or consistency
// check (naming the replica), invalid_input for a wrong-length vector or bad
// parameters, aborted when fewer than t replicas survive. After an error the
// session must be discarded.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/keys.h"
#include "core/result.h"

namespace sn::privacy {

// Default threshold ⌈2D/3⌉ (at least ⌊D/2⌋ + 1, so two disjoint survivor
// sets cannot both unmask).
int default_threshold(int replicas);

struct SecAggParams {
  std::string context;      // binds every signature and key: "job/stage/step"
  int replicas = 0;         // D ≥ 2
  int threshold = 0;        // t, D/2 < t ≤ D; 0: default_threshold(D)
  int64_t length = 0;       // values per vector, ≥ 1
  double range = 4.0;       // fixed-point clipping range, > 0
};
Status check_params(const SecAggParams& params);
// The fixed-point scale for these parameters (a power of two).
double fixed_point_scale(int replicas, double range);
std::vector<uint32_t> quantize(std::span<const float> values, double scale, double range);
std::vector<float> dequantize(std::span<const uint32_t> sum, double scale);

// Round 1. Signed by the replica's node key over (context, index, keys).
struct KeyAdvert {
  int index = 0;
  std::array<uint8_t, 32> mask_public{};    // X25519
  std::array<uint8_t, 32> seed_commit{};    // BLAKE2b-256 of the self-mask seed
  Signature signature{};
};
// Round 2. One Shamir share of one of a dealer's two secrets, for one holder,
// signed by the dealer over (context, dealer, holder, kind, values).
enum class ShareKind : uint8_t { seed = 0, secret = 1 };
struct Share {
  int dealer = 0, holder = 0;
  ShareKind kind = ShareKind::seed;
  std::vector<uint64_t> values;        // one field element per 7-byte limb
  Signature signature{};
};
struct ShareBundle {                   // what a dealer sends one holder
  Share seed, secret;
};
// Round 4. A holder's revealed shares; each keeps its dealer's signature so
// nobody can forge one.
struct Reveal {
  int holder = 0;
  std::vector<int> survivors;          // the U this holder revealed for
  std::vector<Share> shares;           // seed shares of U, secret shares of the rest
};

// Byte encodings (little-endian, documented in docs/privacy.md).
std::string encode(const KeyAdvert& advert);
std::string encode(const ShareBundle& bundle);
std::string encode(const Reveal& reveal);
Result<KeyAdvert> decode_advert(std::string_view bytes);
Result<ShareBundle> decode_share(std::string_view bytes);
Result<Reveal> decode_reveal(std::string_view bytes);

class SecAggSession {
 public:
  // KEYS: every replica's Ed25519 public key, by index (this one's at SELF).
  // KEY must be this replica's node key.
  static Result<SecAggSession> create(SecAggParams params, int self, const NodeKey& key,
                                      std::vector<PublicKey> replica_keys);

  const SecAggParams& params() const { return params_; }
  double scale() const { return scale_; }
  int threshold() const { return params_.threshold; }

  KeyAdvert advertise() const;
  // All D adverts (own included), in any order; each signature checked.
  Status accept_adverts(const std::vector<KeyAdvert>& adverts);
  ShareBundle shares_for(int holder) const;
  // A bundle from DEALER for this replica; checked and kept.
  Status accept_share(const ShareBundle& bundle);
  // q(values) plus the masks; needs every dealer's share accepted first.
  Result<std::vector<uint32_t>> mask(std::span<const float> values) const;
  // SURVIVORS: sorted indices whose masked vector arrived (this one's too).
  // aborted if fewer than t.
  Result<Reveal> reveal(const std::vector<int>& survivors) const;
  // MASKED[k] is survivors[k]'s vector. REVEALS from ≥ t holders, each for
  // the same SURVIVORS. Returns Σ_{u∈U} q(x_u) in Z_2^32.
  Result<std::vector<uint32_t>> unmask(const std::vector<int>& survivors,
                                       const std::vector<std::vector<uint32_t>>& masked,
                                       const std::vector<Reveal>& reveals) const;

 private:
  SecAggSession() = default;
  std::array<uint8_t, 32> pair_key(std::span<const uint8_t> secret, int a, int b) const;
  Status check_share(const Share& share, int holder, ShareKind kind) const;

  SecAggParams params_;
  int self_ = 0;
  const NodeKey* key_ = nullptr;
  std::vector<PublicKey> replica_keys_;
  double scale_ = 1;
  std::array<uint8_t, 32> mask_secret_{}, mask_public_{}, seed_{};
  std::vector<std::optional<KeyAdvert>> adverts_;
  std::vector<ShareBundle> dealt_;                // [holder] → this replica's shares for it
  std::vector<std::optional<ShareBundle>> held_;  // [dealer] → the shares this replica holds
  mutable std::optional<std::vector<int>> revealed_for_;  // a replica reveals for one U only
};

}  // namespace sn::privacy
