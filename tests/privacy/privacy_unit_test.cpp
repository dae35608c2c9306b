#include <gtest/gtest.h>

#include <cmath>

#include "privacy/accountant.h"

namespace sn::privacy {
namespace {

// Opacus's own accountant test (tests/accountants_test.py): σ = 1.5,
// q = 0.04, 90 epochs = 2,250 steps, δ = 1e-5 → ε = 7.32911117143.
TEST(Accountant, MatchesOpacusPublishedFigure) {
  auto spent = epsilon_spent(1.5, 0.04, 2250, 1e-5);
  ASSERT_TRUE(spent.ok()) << spent.message();
  EXPECT_NEAR(spent->epsilon, 7.32911117143, 1e-7);
}

TEST(Accountant, RunningAccountantEqualsOneShot) {
  Accountant accountant(1.5, 0.04);
  for (int i = 0; i < 2250; ++i) accountant.step();
  EXPECT_NEAR(accountant.epsilon(1e-5), 7.32911117143, 1e-7);
}

TEST(Accountant, EpsilonGrowsWithStepsAndFallsWithNoise) {
  double previous = 0;
  for (int64_t steps : {1, 10, 100, 1000, 10000}) {
    const double eps = epsilon_spent(1.0, 0.01, steps, 1e-5)->epsilon;
    EXPECT_GT(eps, previous) << steps;
    previous = eps;
  }
  previous = INFINITY;
  for (double sigma : {0.5, 0.8, 1.0, 2.0, 4.0, 8.0}) {
    const double eps = epsilon_spent(sigma, 0.01, 1000, 1e-5)->epsilon;
    EXPECT_LT(eps, previous) << sigma;
    previous = eps;
  }
}

// With q = 1 the mechanism is the plain Gaussian: RDP(α) = α / 2σ² exactly.
TEST(Accountant, FullBatchIsPlainGaussian) {
  EXPECT_DOUBLE_EQ(sampled_gaussian_rdp(1.0, 2.0, 3.0), 3.0 / 8.0);
  // Integer and fractional series agree where they meet.
  const double at_int = sampled_gaussian_rdp(0.1, 1.0, 5.0);
  const double near_int = sampled_gaussian_rdp(0.1, 1.0, 5.0 + 1e-9);
  EXPECT_NEAR(at_int, near_int, 1e-6);
}

TEST(Accountant, NoiseForTargetReachesTarget) {
  auto sigma = noise_for_epsilon(7.32911117143, 0.04, 2250, 1e-5);
  ASSERT_TRUE(sigma.ok()) << sigma.message();
  EXPECT_NEAR(*sigma, 1.5, 1e-3);
  EXPECT_LE(epsilon_spent(*sigma, 0.04, 2250, 1e-5)->epsilon, 7.32911117143);
  auto one = noise_for_epsilon(1.0, 0.01, 1000, 1e-5);
  ASSERT_TRUE(one.ok());
  EXPECT_LE(epsilon_spent(*one, 0.01, 1000, 1e-5)->epsilon, 1.0);
  EXPECT_GT(epsilon_spent(*one * 0.99, 0.01, 1000, 1e-5)->epsilon, 1.0);
  // Many full-batch steps need σ far above 1e4: still found (the search goes to the job's limit, 1e6).
  auto large = noise_for_epsilon(0.5, 1.0, 10000000, 1e-5);
  ASSERT_TRUE(large.ok()) << large.message();
  EXPECT_GT(*large, 1e4);
  EXPECT_LE(epsilon_spent(*large, 1.0, 10000000, 1e-5)->epsilon, 0.5);
}

TEST(Accountant, BadParametersAreInputErrors) {
  EXPECT_EQ(epsilon_spent(0, 0.1, 10, 1e-5).error().kind, ErrorKind::invalid_input);
  EXPECT_FALSE(epsilon_spent(1, 0, 10, 1e-5).ok());
  EXPECT_FALSE(epsilon_spent(1, 1.5, 10, 1e-5).ok());
  EXPECT_FALSE(epsilon_spent(1, 0.1, 0, 1e-5).ok());
  EXPECT_FALSE(epsilon_spent(1, 0.1, 10, 1).ok());
  EXPECT_FALSE(noise_for_epsilon(0, 0.1, 10, 1e-5).ok());
  auto unreachable = noise_for_epsilon(0.01, 0.1, 10, 1e-5);
  ASSERT_FALSE(unreachable.ok());
  EXPECT_NE(unreachable.message().find("unreachable"), std::string::npos);
}

}  // namespace
}  // namespace sn::privacy

// ---- Secure aggregation ----------------------------------------------------

#include <random>

#include "privacy/secagg.h"

namespace sn::privacy {
namespace {

// D replicas, each with its own node key, running the rounds in memory
// (the transport adds nothing to the math; train's hook is tested over it).
struct Group {
  std::vector<NodeKey> keys;
  std::vector<SecAggSession> sessions;
  Group(int replicas, int64_t length, int threshold = 0) {
    std::vector<PublicKey> pubs;
    for (int i = 0; i < replicas; ++i) keys.push_back(NodeKey::generate());
    for (auto& k : keys) pubs.push_back(k.public_key());
    SecAggParams params{"job/0/1", replicas, threshold, length, 4.0};
    for (int i = 0; i < replicas; ++i) {
      auto s = SecAggSession::create(params, i, keys[i], pubs);
      EXPECT_TRUE(s.ok()) << s.message();
      sessions.push_back(std::move(*s));
    }
  }
  void exchange_keys_and_shares() {
    std::vector<KeyAdvert> adverts;
    for (auto& s : sessions) adverts.push_back(*decode_advert(encode(s.advertise())));
    for (auto& s : sessions) ASSERT_TRUE(s.accept_adverts(adverts).ok());
    for (size_t d = 0; d < sessions.size(); ++d)
      for (size_t h = 0; h < sessions.size(); ++h) {
        if (d == h) continue;
        auto bundle = decode_share(encode(sessions[d].shares_for(static_cast<int>(h))));
        ASSERT_TRUE(bundle.ok());
        ASSERT_TRUE(sessions[h].accept_share(*bundle).ok());
      }
  }
};

std::vector<std::vector<float>> random_gradients(int replicas, int64_t length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0, 0.01f);
  std::vector<std::vector<float>> out(replicas, std::vector<float>(static_cast<size_t>(length)));
  for (auto& v : out)
    for (auto& x : v) x = normal(rng);
  return out;
}

std::vector<uint32_t> plain_fixed_point_sum(const std::vector<std::vector<float>>& grads, const std::vector<int>& who,
                                            double scale) {
  std::vector<uint32_t> sum(grads[0].size(), 0);
  for (int u : who) {
    auto q = quantize(grads[u], scale, 4.0);
    for (size_t k = 0; k < sum.size(); ++k) sum[k] += q[k];
  }
  return sum;
}

// Survivors SURVIVORS sent their vectors; every survivor reveals and unmasks.
Result<std::vector<uint32_t>> run_rounds(Group& g, const std::vector<std::vector<float>>& grads,
                                         const std::vector<int>& survivors) {
  std::vector<std::vector<uint32_t>> masked;
  for (int u : survivors) {
    SN_ASSIGN(auto y, g.sessions[u].mask(grads[u]));
    masked.push_back(std::move(y));
  }
  std::vector<Reveal> reveals;
  for (int u : survivors) {
    SN_ASSIGN(auto r, g.sessions[u].reveal(survivors));
    SN_ASSIGN(auto decoded, decode_reveal(encode(r)));
    reveals.push_back(std::move(decoded));
  }
  std::optional<std::vector<uint32_t>> first;
  for (int u : survivors) {
    SN_ASSIGN(auto sum, g.sessions[u].unmask(survivors, masked, reveals));
    if (first && *first != sum) return make_error("replicas disagree on the sum");
    first = std::move(sum);
  }
  return *first;
}

TEST(SecAgg, DefaultThresholdIsTwoThirds) {
  EXPECT_EQ(default_threshold(2), 2);
  EXPECT_EQ(default_threshold(3), 2);
  EXPECT_EQ(default_threshold(4), 3);
  EXPECT_EQ(default_threshold(6), 4);
  EXPECT_EQ(default_threshold(10), 7);
}

TEST(SecAgg, SumIsExactFixedPointSum) {
  const int64_t n = 1000;
  Group g(4, n);
  g.exchange_keys_and_shares();
  auto grads = random_gradients(4, n, 7);
  auto sum = run_rounds(g, grads, {0, 1, 2, 3});
  ASSERT_TRUE(sum.ok()) << sum.message();
  EXPECT_EQ(*sum, plain_fixed_point_sum(grads, {0, 1, 2, 3}, g.sessions[0].scale()));
  // And it is the float sum within the quantization error.
  auto floats = dequantize(*sum, g.sessions[0].scale());
  for (int64_t k = 0; k < n; ++k) {
    float plain = 0;
    for (auto& v : grads) plain += v[k];
    EXPECT_NEAR(floats[k], plain, 4 * 0.5 / g.sessions[0].scale() + 1e-7);
  }
}

// A masked vector of an all-zero gradient must look uniform: chi-square over
// its 256 byte values (255 degrees of freedom; 341 is the 0.9999 quantile).
TEST(SecAgg, MaskedVectorLooksUniform) {
  const int64_t n = 1 << 16;
  Group g(2, n);
  g.exchange_keys_and_shares();
  std::vector<float> zeros(n, 0.0f);
  auto y = g.sessions[0].mask(zeros);
  ASSERT_TRUE(y.ok());
  std::vector<double> counts(256, 0);
  const auto* bytes = reinterpret_cast<const uint8_t*>(y->data());
  for (size_t k = 0; k < y->size() * 4; ++k) counts[bytes[k]] += 1;
  const double expected = static_cast<double>(y->size() * 4) / 256;
  double chi2 = 0;
  for (double c : counts) chi2 += (c - expected) * (c - expected) / expected;
  EXPECT_LT(chi2, 341.0);
  // Without the masks the same vector is all zero bytes: the check has teeth.
  auto plain = quantize(zeros, g.sessions[0].scale(), 4.0);
  EXPECT_TRUE(std::all_of(plain.begin(), plain.end(), [](uint32_t v) { return v == 0; }));
}

// D = 4, t = 3: replica 2 drops after the share round, before its vector.
TEST(SecAgg, OneDropoutBeforeSendingGivesSurvivorsSum) {
  const int64_t n = 257;
  Group g(4, n);
  g.exchange_keys_and_shares();
  auto grads = random_gradients(4, n, 11);
  auto sum = run_rounds(g, grads, {0, 1, 3});
  ASSERT_TRUE(sum.ok()) << sum.message();
  EXPECT_EQ(*sum, plain_fixed_point_sum(grads, {0, 1, 3}, g.sessions[0].scale()));
}

// D = 4, t = 3: replica 3 sends its masked vector, then dies before revealing:
// the other three still recover the exact sum of all four.
TEST(SecAgg, OneDropoutAfterSendingGivesExactSumOfAll) {
  const int64_t n = 300;
  Group g(4, n);
  g.exchange_keys_and_shares();
  auto grads = random_gradients(4, n, 13);
  const std::vector<int> u{0, 1, 2, 3};
  std::vector<std::vector<uint32_t>> masked;
  for (int i : u) masked.push_back(*g.sessions[i].mask(grads[i]));
  std::vector<Reveal> reveals;
  for (int i : {0, 1, 2}) reveals.push_back(*g.sessions[i].reveal(u));
  for (int i : {0, 1, 2}) {
    auto sum = g.sessions[i].unmask(u, masked, reveals);
    ASSERT_TRUE(sum.ok()) << sum.message();
    EXPECT_EQ(*sum, plain_fixed_point_sum(grads, u, g.sessions[0].scale()));
  }
}

TEST(SecAgg, TwoDropoutsAbortCleanly) {
  const int64_t n = 64;
  Group g(4, n);
  g.exchange_keys_and_shares();
  auto grads = random_gradients(4, n, 17);
  auto sum = run_rounds(g, grads, {0, 1});
  ASSERT_FALSE(sum.ok());
  EXPECT_EQ(sum.error().kind, ErrorKind::aborted);
  EXPECT_NE(sum.message().find("aborted"), std::string::npos) << sum.message();
  // All four sent, but only two are left to reveal: also an abort, no sum.
  Group h(4, n);
  h.exchange_keys_and_shares();
  const std::vector<int> u{0, 1, 2, 3};
  std::vector<std::vector<uint32_t>> masked;
  for (int i : u) masked.push_back(*h.sessions[i].mask(grads[i]));
  std::vector<Reveal> reveals{*h.sessions[0].reveal(u), *h.sessions[1].reveal(u)};
  auto partial = h.sessions[0].unmask(u, masked, reveals);
  ASSERT_FALSE(partial.ok());
  EXPECT_EQ(partial.error().kind, ErrorKind::aborted);
}

// A replica never reveals both secrets of one replica: its reveal carries a
// seed share for a survivor and a key share for a dropped one, and it
// refuses to reveal for a second survivor set.
TEST(SecAgg, NeverRevealsBothSecretsOfOneReplica) {
  Group g(4, 8);
  g.exchange_keys_and_shares();
  auto r = g.sessions[0].reveal({0, 1, 2});
  ASSERT_TRUE(r.ok());
  for (const auto& s : r->shares) EXPECT_EQ(s.kind, s.dealer == 3 ? ShareKind::secret : ShareKind::seed);
  auto second = g.sessions[0].reveal({0, 1, 2, 3});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().kind, ErrorKind::bad_peer);
}

TEST(SecAgg, ForgedAdvertsAndSharesAreRefused) {
  Group g(4, 16);
  std::vector<KeyAdvert> adverts;
  for (auto& s : g.sessions) adverts.push_back(s.advertise());
  // A key advert re-signed by someone else (a man in the middle swapping keys).
  auto forged = adverts;
  forged[2].mask_public[0] ^= 1;
  auto refused = g.sessions[0].accept_adverts(forged);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().kind, ErrorKind::bad_peer);
  EXPECT_NE(refused.message().find("replica 2"), std::string::npos) << refused.message();
  for (auto& s : g.sessions) ASSERT_TRUE(s.accept_adverts(adverts).ok());
  // A share whose value was altered: its dealer's signature no longer holds.
  auto bundle = g.sessions[1].shares_for(0);
  bundle.seed.values[0] ^= 1;
  auto bad = g.sessions[0].accept_share(bundle);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("forged"), std::string::npos) << bad.message();
  // A share meant for another holder is refused too.
  EXPECT_FALSE(g.sessions[0].accept_share(g.sessions[1].shares_for(2)).ok());
}

// A revealer who alters a share it holds is caught by the dealer's signature;
// a dealer who deals inconsistent (validly signed) shares is caught by its
// commitment when the shares are combined.
TEST(SecAgg, InconsistentRevealsAreRefused) {
  const int64_t n = 32;
  Group g(4, n);
  g.exchange_keys_and_shares();
  auto grads = random_gradients(4, n, 19);
  const std::vector<int> u{0, 1, 2, 3};
  std::vector<std::vector<uint32_t>> masked;
  for (int i : u) masked.push_back(*g.sessions[i].mask(grads[i]));
  std::vector<Reveal> reveals;
  for (int i : u) reveals.push_back(*g.sessions[i].reveal(u));
  reveals[1].shares[2].values[3] += 1;
  auto sum = g.sessions[0].unmask(u, masked, reveals);
  ASSERT_FALSE(sum.ok());
  EXPECT_EQ(sum.error().kind, ErrorKind::bad_peer);
  EXPECT_NE(sum.message().find("bad signature"), std::string::npos) << sum.message();
  // Different survivor sets in the reveals: refused.
  auto mixed = reveals;
  mixed[1] = *g.sessions[1].reveal(u);
  mixed[2].survivors = {0, 1, 2};
  EXPECT_FALSE(g.sessions[0].unmask(u, masked, mixed).ok());
}

TEST(SecAgg, WrongLengthsAndBadParametersAreRefused) {
  Group g(2, 10);
  g.exchange_keys_and_shares();
  std::vector<float> short_vec(9, 0.f);
  auto y = g.sessions[0].mask(short_vec);
  ASSERT_FALSE(y.ok());
  EXPECT_NE(y.message().find("expected 10"), std::string::npos) << y.message();
  std::vector<float> ok_vec(10, 0.f);
  std::vector<std::vector<uint32_t>> masked{*g.sessions[0].mask(ok_vec), *g.sessions[1].mask(ok_vec)};
  masked[1].pop_back();
  std::vector<Reveal> reveals{*g.sessions[0].reveal({0, 1}), *g.sessions[1].reveal({0, 1})};
  auto sum = g.sessions[0].unmask({0, 1}, masked, reveals);
  ASSERT_FALSE(sum.ok());
  EXPECT_EQ(sum.error().kind, ErrorKind::bad_peer);
  EXPECT_NE(sum.message().find("replica 1 sent 9 values"), std::string::npos) << sum.message();
  EXPECT_FALSE(check_params({"c", 1, 0, 10, 4.0}).ok());
  EXPECT_FALSE(check_params({"c", 4, 2, 10, 4.0}).ok());  // t must exceed D/2
  EXPECT_FALSE(check_params({"c", 4, 0, 0, 4.0}).ok());
  EXPECT_FALSE(check_params({"c", 4, 0, 10, -1.0}).ok());
  EXPECT_FALSE(decode_reveal("junk").ok());
}

}  // namespace
}  // namespace sn::privacy
