// C++ unit tests of the Philox / Gumbel-noise contract (csrc/common/philox.h) and of the CPU Gumbel
// kernels (csrc/cpu/gumbel.cpp), run by ctest. No framework: EXPECT counts (c10 owns the name CHECK),
// main prints the tally and fails when anything failed. The known answers come from the Python oracle
// (vlm_kernels/reference/philox.py), e.g. philox_first(torch.arange(8), seed).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/philox.h"
#include "cpu/gumbel.h"

namespace {

int passed = 0, failed = 0;

void check(bool ok, const char* what, const char* file, int line, const std::string& context) {
  if (ok) {
    ++passed;
    return;
  }
  ++failed;
  std::printf("FAIL %s:%d: %s%s%s\n", file, line, what, context.empty() ? "" : "  [", context.empty() ? "" : (context + "]").c_str());
}
#define EXPECT(cond) check((cond), #cond, __FILE__, __LINE__, "")
#define EXPECT_CTX(cond, ctx) check((cond), #cond, __FILE__, __LINE__, (ctx))

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

// ---- Philox and noise -------------------------------------------------------------------------------

void test_philox_known_answers() {
  // The four words of the calls at counters 0..3, and at counters around 2^32 for seed 0; equal to
  // Triton's tl.randint4x(seed, counter) (checked in tests/test_gumbel_noise.py).
  struct Case {
    uint64_t seed;
    uint64_t counter;
    uint32_t words[4];
  };
  const Case cases[] = {
      {0, 0, {1713891541u, 3781805453u, 3159862348u, 2600524760u}},
      {0, 1, {4175744164u, 1555169499u, 2980410603u, 159317863u}},
      {0, 2, {83534633u, 1372009126u, 605361069u, 1167144420u}},
      {0, 3, {3381718825u, 1782871206u, 2596868943u, 1832992260u}},
      {0, (uint64_t(1) << 32) - 1, {3316779677u, 1144319054u, 297526523u, 706672549u}},
      {0, uint64_t(1) << 32, {1792067052u, 3928187465u, 1940150773u, 122242227u}},
      {0, (uint64_t(1) << 32) + 1, {1839274038u, 3837959459u, 4228731886u, 1683837507u}},
      {0, (uint64_t(1) << 40) + 3, {3434229619u, 1592161190u, 2162475551u, 1854760711u}},
      {1, 0, {3823634032u, 3842641596u, 2515673792u, 3054873127u}},
      {1, 3, {3253981089u, 156954468u, 615781017u, 231320490u}},
      {(uint64_t(1) << 40) + 17, 0, {3043933274u, 813215800u, 3631212836u, 2372675247u}},
      {(uint64_t(1) << 40) + 17, 2, {110749509u, 277256878u, 4185509901u, 2586208388u}},
  };
  for (const Case& c : cases) {
    uint32_t w[4];
    vlm::philox_words(c.seed, c.counter, w);
    for (int j = 0; j < 4; ++j)
      EXPECT_CTX(w[j] == c.words[j], "seed " + std::to_string(c.seed) + " counter " + std::to_string(c.counter) +
                                         " word " + std::to_string(j));
  }
}

// Exact noise bits (element i = word i % 4 of call i / 4): catches a reordered or unfused vlm_logf.
void test_noise_known_bits() {
  const uint32_t expected[8] = {0xbea0ba95u, 0xbe51ca8fu, 0x3eea96bcu, 0x3ddf2aa1u,
                                0x3fa47d5cu, 0xbecd6d6du, 0xbf904079u, 0xbf1af5aau};
  float four[4];
  vlm::gumbel_noise4(1234, 1, four);
  for (uint64_t i = 0; i < 8; ++i) {
    EXPECT_CTX(bits_of(vlm::gumbel_noise(1234, i)) == expected[i], "offset " + std::to_string(i));
    if (i >= 4) EXPECT_CTX(bits_of(four[i - 4]) == expected[i], "gumbel_noise4, offset " + std::to_string(i));
  }
}

// u = 0 (words 0 and 2^32 - 1) and the largest u give finite noise; vlm_logf stays within 1.2 ulp of log.
void test_noise_finite_at_extreme_bits() {
  const uint32_t raw[] = {0u, 0x7fffffffu, 0x80000000u, 0xffffffffu, 1u, 0xfffffffeu};
  for (uint32_t b : raw) {
    const float u = vlm::uniform_from_bits(b);
    const float g = vlm::noise_from_bits(b);
    EXPECT_CTX(u >= 0.0f && u < 1.0f && std::isfinite(g), "bits " + std::to_string(b));
  }
  EXPECT(vlm::uniform_from_bits(0u) == 0.0f && vlm::uniform_from_bits(0xffffffffu) == 0.0f);
  EXPECT(bits_of(vlm::noise_from_bits(0u)) == 0xc08f491bu);           // u = 0: vlm_logf(0) = -127 ln 2
  EXPECT(bits_of(vlm::noise_from_bits(0x7fffffffu)) == 0x41851592u);  // the largest u
  EXPECT(bits_of(vlm::noise_from_bits(1u)) == 0xc0445180u);           // the smallest positive u
  EXPECT(bits_of(vlm::vlm_logf(0.0f)) == bits_of(-127.0f * 0.693147182f));
  double worst = 0;
  for (float x = 4.6e-10f; x < 22.0f; x *= 1.0001373f) {
    const double exact = std::log(static_cast<double>(x));
    const double ulp = std::nextafter(static_cast<float>(std::fabs(exact)), INFINITY) - static_cast<float>(std::fabs(exact));
    worst = std::max(worst, std::fabs(vlm::vlm_logf(x) - exact) / ulp);
  }
  EXPECT_CTX(worst < 1.2, "vlm_logf max error " + std::to_string(worst) + " ulp");
}

// The vectorised fill gives the scalar noise bit for bit, for any start and length (incl. across 2^32).
void test_noise_fill_matches_scalar() {
  const uint64_t starts[] = {0, 5, 8, 1000003, (uint64_t(1) << 31) - 6, (uint64_t(1) << 32) - 37, (uint64_t(1) << 32) - 36,
                             (uint64_t(1) << 40) - 3};
  const uint64_t seeds[] = {0, 1234, (uint64_t(1) << 40) + 17, ~uint64_t(0)};
  for (uint64_t seed : seeds)
    for (uint64_t start : starts)
      for (int64_t n : {1, 15, 16, 17, 63, 64, 65, 200}) {
        std::vector<float> fill(n);
        vlm::gumbel_noise_fill(seed, start, n, fill.data());
        bool same = true;
        for (int64_t j = 0; j < n; ++j) same &= bits_of(fill[j]) == bits_of(vlm::gumbel_noise(seed, start + j));
        EXPECT_CTX(same, "seed " + std::to_string(seed) + " start " + std::to_string(start) + " n " + std::to_string(n));
      }
}

// ---- kernels against ATen ---------------------------------------------------------------------------

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// logits + noise in the accumulation dtype, the noise from the scalar vlm::gumbel_noise.
at::Tensor perturbed(const at::Tensor& logits, uint64_t seed) {
  at::Tensor noise = at::empty(logits.sizes(), at::kFloat);
  float* g = noise.data_ptr<float>();
  for (int64_t i = 0; i < noise.numel(); ++i) g[i] = vlm::gumbel_noise(seed, static_cast<uint64_t>(i));
  return logits.to(acc_of(logits.scalar_type())) + noise.to(acc_of(logits.scalar_type()));
}

at::Tensor soft_expected(const at::Tensor& logits, uint64_t seed, double tau, int64_t dim) {
  const at::Tensor z = perturbed(logits, seed).to(at::kDouble);
  return at::softmax((z - std::get<0>(z.max(dim, true))) * (1.0 / tau), dim);
}

double tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 2e-6;
    case at::kHalf: return 2e-3;
    default: return 1.6e-2;  // bfloat16
  }
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return at::allclose(a.to(at::kDouble), b.to(at::kDouble), /*rtol=*/tol, /*atol=*/tol, /*equal_nan=*/true);
}

std::string describe(const at::Tensor& t, int64_t dim) {
  std::string s = std::string(c10::toString(t.scalar_type())) + " (";
  for (int64_t d = 0; d < t.dim(); ++d) s += std::to_string(t.size(d)) + (d + 1 < t.dim() ? ", " : "");
  return s + ") dim " + std::to_string(dim);
}

void check_forward(const at::Tensor& x, int64_t dim, uint64_t seed, double tau) {
  const std::string ctx = describe(x, dim);
  const auto s = static_cast<int64_t>(seed);
  const at::Tensor soft = vlm::gumbel_softmax_forward_cpu(x, s, tau, false, dim);
  const at::Tensor hard = vlm::gumbel_softmax_forward_cpu(x, s, tau, true, dim);
  const at::Tensor index = vlm::gumbel_argmax_cpu(x, s, dim);
  EXPECT_CTX(soft.scalar_type() == x.scalar_type() && soft.sizes() == x.sizes(), ctx);
  EXPECT_CTX(index.scalar_type() == at::kLong && index.dim() == x.dim() - 1, ctx);
  // Soft: matches the float64 softmax of the same perturbed logits, and sums to 1.
  EXPECT_CTX(close(soft, soft_expected(x, seed, tau, dim), tolerance(x.scalar_type())), ctx);
  EXPECT_CTX(close(soft.to(at::kDouble).sum(dim), at::ones(index.sizes(), at::kDouble), 4 * tolerance(x.scalar_type())), ctx);
  // Hard: exactly one-hot, at argmax of the bit-identical perturbed logits; argmax agrees.
  const at::Tensor expected_index = perturbed(x, seed).argmax(dim);
  EXPECT_CTX(at::equal(index, expected_index), ctx);
  EXPECT_CTX(at::equal(hard.to(at::kDouble).sum(dim), at::ones(index.sizes(), at::kDouble)), ctx);
  EXPECT_CTX(at::equal(hard.to(at::kDouble).argmax(dim), index), ctx);
  EXPECT_CTX(at::equal(at::logical_or(hard == 0, hard == 1), at::ones_like(hard, at::kBool)), ctx);
  // Same seed, same samples; another seed, other samples.
  EXPECT_CTX(at::equal(vlm::gumbel_softmax_forward_cpu(x, s, tau, false, dim), soft), ctx);
  if (x.size(dim) > 1 && x.numel() >= 64)
    EXPECT_CTX(!at::equal(vlm::gumbel_argmax_cpu(x, s + 1, dim), index), ctx);
}

void check_backward(const at::Tensor& x, int64_t dim, uint64_t seed, double tau) {
  const std::string ctx = describe(x, dim);
  const auto s = static_cast<int64_t>(seed);
  const at::Tensor dy = at::randn(x.sizes(), at::kDouble).to(x.scalar_type());
  for (bool hard : {false, true}) {
    const at::Tensor saved = hard ? x : vlm::gumbel_softmax_forward_cpu(x, s, tau, false, dim);
    const at::Tensor y = hard ? soft_expected(x, seed, tau, dim) : saved.to(at::kDouble);
    const at::Tensor g = dy.to(at::kDouble);
    const at::Tensor expected = y * (g - (g * y).sum(dim, true)) * (1.0 / tau);
    const at::Tensor got = vlm::gumbel_softmax_backward_cpu(dy, saved, s, tau, hard, dim);
    EXPECT_CTX(got.scalar_type() == x.scalar_type() && got.sizes() == x.sizes(), ctx);
    EXPECT_CTX(close(got, expected, 4 * tolerance(x.scalar_type())), ctx + (hard ? " hard" : " soft"));
  }
}

void check_kl(const at::Tensor& x, int64_t dim) {
  const std::string ctx = describe(x, dim);
  const at::Tensor logp = at::log_softmax(x.to(at::kDouble), dim);
  const at::Tensor p = logp.exp();
  const at::Tensor neg_entropy = (p * logp).sum(dim, true);
  const at::Tensor expected = neg_entropy.squeeze(dim) + std::log(static_cast<double>(x.size(dim)));
  const at::Tensor kl = vlm::categorical_kl_uniform_forward_cpu(x, dim);
  EXPECT_CTX(kl.scalar_type() == x.scalar_type() && kl.sizes() == expected.sizes(), ctx);
  EXPECT_CTX(close(kl, expected, 4 * tolerance(x.scalar_type())), ctx);
  const at::Tensor grad = at::randn(expected.sizes(), at::kDouble).to(x.scalar_type());
  const at::Tensor expected_grad = grad.to(at::kDouble).unsqueeze(dim) * p * (logp - neg_entropy);
  EXPECT_CTX(close(vlm::categorical_kl_uniform_backward_cpu(grad, x, dim), expected_grad, 4 * tolerance(x.scalar_type())), ctx);
}

struct ShapeCase {
  std::vector<int64_t> sizes;
  int64_t dim;
};

// Rows (inner = 1) short and long; tiles of 64 columns (inner = 64, 200, 130) and of 16, full and
// partial; narrow slices (inner < 16); K = 1.
const ShapeCase kShapes[] = {
    {{5, 37}, 1},   {{3, 1000}, 1}, {{16, 8}, 1},      {{4, 1}, 1}, {{3, 40, 20}, 1}, {{2, 300, 16}, 1},
    {{2, 7, 3}, 1}, {{6, 200}, 0},  {{2, 5, 1, 1}, 1}, {{7}, 0},    {{2, 3, 33}, 1},  {{3, 9, 64}, 1},
    {{2, 17, 130}, 1},
};

void test_kernels() {
  at::manual_seed(0);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble})
    for (const ShapeCase& c : kShapes) {
      const at::Tensor x = (at::randn(c.sizes, at::kDouble) * 3).to(dtype);
      check_forward(x, c.dim, 1234, 1.0);
      check_forward(x, c.dim, (uint64_t(1) << 40) + 17, 0.3);
      check_backward(x, c.dim, 99, 0.7);
      check_kl(x, c.dim);
    }
}

// Past K = 65536 the 64-column tiles give way to 16-column ones (smaller workspace).
void test_many_categories_with_columns() {
  const at::Tensor x = at::randn({1, 65537, 64});
  const at::Tensor z = perturbed(x, 5);
  EXPECT(at::equal(vlm::gumbel_argmax_cpu(x, 5, 1), z.argmax(1)));
  EXPECT(close(vlm::gumbel_softmax_forward_cpu(x, 5, 1.0, false, 1), soft_expected(x, 5, 1.0, 1), tolerance(at::kFloat)));
}

void test_nan_rows_stay_in_their_row() {
  for (int64_t inner : {1, 20}) {
    at::Tensor x = at::randn({5, 40, inner});
    x.index_put_({2, 7, 0}, NAN);
    x.index_put_({2, 9, 0}, NAN);
    const at::Tensor soft = vlm::gumbel_softmax_forward_cpu(x, 1, 1.0, false, 1);
    const at::Tensor hard = vlm::gumbel_softmax_forward_cpu(x, 1, 1.0, true, 1);
    const at::Tensor index = vlm::gumbel_argmax_cpu(x, 1, 1);
    for (const at::Tensor& out : {soft, hard}) {
      EXPECT(out.select(0, 2).select(1, 0).isnan().all().item<bool>());
      EXPECT(out.index({at::indexing::Slice(0, 2)}).isfinite().all().item<bool>());
      if (inner > 1) EXPECT(out.select(0, 2).select(1, 1).isfinite().all().item<bool>());  // the next column
    }
    EXPECT(index.index({2, 0}).item<int64_t>() == 7);  // the first NaN wins
    // KL propagates the NaN to its row (value and whole gradient) and nowhere else.
    const at::Tensor kl = vlm::categorical_kl_uniform_forward_cpu(x, 1);
    const at::Tensor dkl = vlm::categorical_kl_uniform_backward_cpu(at::ones_like(kl), x, 1);
    EXPECT(kl.index({2, 0}).isnan().item<bool>() && dkl.select(0, 2).select(1, 0).isnan().all().item<bool>());
    EXPECT(kl.index({at::indexing::Slice(0, 2)}).isfinite().all().item<bool>());
    EXPECT(dkl.index({at::indexing::Slice(0, 2)}).isfinite().all().item<bool>());
  }
}

// Exact ties: logits = -noise makes every z exactly 0, so the first index must win, across the lanes of
// a row and along k in a tile; likewise for tied +inf and all -inf.
void test_ties_pick_the_first_index() {
  for (int64_t inner : {1, 3, 20}) {
    const int64_t outer = 3, K = 37;
    at::Tensor noise = at::empty({outer, K, inner});
    vlm::gumbel_noise_fill(42, 0, noise.numel(), noise.data_ptr<float>());
    at::Tensor x = -noise;
    const std::string ctx = "inner " + std::to_string(inner);
    EXPECT_CTX(at::equal(vlm::gumbel_argmax_cpu(x, 42, 1), at::zeros({outer, inner}, at::kLong)), ctx);
    // k = 21 and k = 30 tie for the maximum: 2^30 + g rounds to 2^30 (its ulp is 128 > 2|g|); 21 wins.
    x.select(1, 21).fill_(1073741824.0f);
    x.select(1, 30).fill_(1073741824.0f);
    EXPECT_CTX(at::equal(vlm::gumbel_argmax_cpu(x, 42, 1), at::full({outer, inner}, 21, at::kLong)), ctx);
    const at::Tensor hard = vlm::gumbel_softmax_forward_cpu(x, 42, 1.0, true, 1);
    EXPECT_CTX(at::equal(hard.argmax(1), at::full({outer, inner}, 21, at::kLong)) && hard.sum().item<float>() == outer * inner, ctx);
    // Tied +inf at k = 17 and 33; a slice of -inf only picks index 0.
    at::Tensor y = at::randn({outer, K, inner});
    y.select(1, 17).fill_(INFINITY);
    y.select(1, 33).fill_(INFINITY);
    y.select(0, 1).fill_(-INFINITY);
    const at::Tensor index = vlm::gumbel_argmax_cpu(y, 42, 1);
    EXPECT_CTX(at::equal(index.select(0, 0), at::full({inner}, 17, at::kLong)), ctx);
    EXPECT_CTX(at::equal(index.select(0, 1), at::zeros({inner}, at::kLong)), ctx);
    EXPECT_CTX(at::equal(index, perturbed(y, 42).argmax(1)), ctx);
  }
}

void test_extreme_logits_stay_finite() {
  const std::pair<at::ScalarType, double> cases[] = {{at::kFloat, 3e38}, {at::kHalf, 65504.0}, {at::kBFloat16, 3e38}};
  for (const auto& [dtype, big] : cases) {
    const at::Tensor x = at::tensor({big, -big, 0.0, big, -big, -big, -big, -big, big, big, big, big}, at::kDouble)
                             .reshape({3, 4})
                             .repeat({8, 1})
                             .to(dtype);
    for (double tau : {1e-3, 1.0, 1e4}) {
      for (bool hard : {false, true}) {
        const at::Tensor y = vlm::gumbel_softmax_forward_cpu(x, 3, tau, hard, 1);
        EXPECT_CTX(y.isfinite().all().item<bool>(), std::string(c10::toString(dtype)) + " tau " + std::to_string(tau));
        EXPECT(close(y.to(at::kDouble).sum(1), at::ones({24}, at::kDouble), 2e-2));
      }
    }
    EXPECT(vlm::categorical_kl_uniform_forward_cpu(x, 1).isfinite().all().item<bool>());
    EXPECT(vlm::categorical_kl_uniform_backward_cpu(at::ones({24}, dtype), x, 1).isfinite().all().item<bool>());
  }
}

void test_empty_and_bad_arguments() {
  EXPECT(vlm::gumbel_softmax_forward_cpu(at::empty({0, 5}), 1, 1.0, false, 1).sizes() == at::IntArrayRef({0, 5}));
  EXPECT(vlm::gumbel_argmax_cpu(at::empty({3, 4, 0}), 1, 1).sizes() == at::IntArrayRef({3, 0}));
  EXPECT(vlm::categorical_kl_uniform_forward_cpu(at::empty({0, 5}), 1).numel() == 0);
  const at::Tensor x = at::randn({4, 6});
  EXPECT(throws([&] { vlm::gumbel_softmax_forward_cpu(x, 1, 1.0, false, 2); }));
  EXPECT(throws([&] { vlm::gumbel_softmax_forward_cpu(x.t(), 1, 1.0, false, 1); }));       // not contiguous
  EXPECT(throws([&] { vlm::gumbel_argmax_cpu(x.to(at::kInt), 1, 1); }));                   // dtype
  EXPECT(throws([&] { vlm::gumbel_softmax_forward_cpu(x, 1, 0.0, false, 1); }));           // tau
  EXPECT(throws([&] { vlm::gumbel_softmax_backward_cpu(x, x.reshape({6, 4}), 1, 1.0, false, 1); }));  // shapes
  EXPECT(throws([&] { vlm::categorical_kl_uniform_backward_cpu(at::ones({6}), x, 1); }));  // grad shape
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_noise_known_bits();
  test_noise_finite_at_extreme_bits();
  test_noise_fill_matches_scalar();
  test_kernels();
  test_many_categories_with_columns();
  test_nan_rows_stay_in_their_row();
  test_ties_pick_the_first_index();
  test_extreme_logits_stay_finite();
  test_empty_and_bad_arguments();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
