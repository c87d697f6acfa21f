// CPU kernels of the Gumbel-softmax op family: Gumbel-softmax forward/backward, Gumbel-argmax and
// KL(softmax || uniform) forward/backward. The math is vlm_kernels/reference/gumbel.py's; the noise is
// csrc/common/philox.h's, bit for bit, on every instruction-set level.
//
// This file is compiled once per level (csrc/cpu/isa.h): as itself for the portable baseline and through
// csrc/cpu_avx2/gumbel.cpp (AVX2 + FMA) and csrc/cpu_avx512/gumbel.cpp (AVX-512 F/BW/VL/DQ). Two
// implementations share the entry points at the bottom of the file:
//  * simd:: (the AVX2 and AVX-512 levels; float32 / float16 / bfloat16, computed in float32), written once
//    over a small wrapper of W float32 lanes (W = 8 or 16, see "the wrapper" below). A tensor viewed as
//    (outer, K, inner) is cut into units that one thread processes at a time (at::parallel_for):
//      - Row  (inner == 1): the K contiguous elements of a row, W per step, reduced across lanes at the end;
//      - Tile (inner > 1):  32 (or, for the last columns and for K > 65536, W) adjacent columns of one
//        outer slice, one step per k: the lanes are the columns, so nothing is transposed and no
//        horizontal reduction is needed.
//    The noise is generated in registers, kNoiseGroups vectors at a time (interleaved: one chain alone is
//    latency-bound), bit-identical to vlm::gumbel_noise: one Philox call gives the 4 words of an aligned
//    group of 4 offsets, W / 2 calls per vector op (one per 64-bit lane), and the log is built from fmas.
//    The soft sample writes z = logits + noise into a float workspace (the output row itself for a
//    float32 row, else a per-thread buffer of K x 32 floats at most), then exponentiates and normalises
//    it, so the noise is generated once and the unit stays in cache. Hard samples and argmax need one
//    pass; the backward of a hard sample regenerates the soft sample. Sums over K are kept in float64 lanes.
//  * scalar:: (any dtype, float64 in float64): one column at a time, plain loops. It runs float64 always
//    and everything at the baseline level (where std::fma may be a libm call: slow, correctly rounded).
#include "cpu/isa.h"
#include "cpu/gumbel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/philox.h"

#if VLM_CPU_X86
#include <immintrin.h>
#endif

#ifndef VLM_CPU_INCLUDES_ONLY  // (a level wrapper's first pass takes the headers only, see isa.h)
// W, the float32 lanes of the vector kernels at this level (0: scalar kernels only). The level wrappers
// say their level with VLM_GUMBEL_ISA_AVX512 / VLM_GUMBEL_ISA_AVX2: GCC's C++ front end evaluates #if
// before it applies `#pragma GCC target`, so __AVX2__ / __AVX512F__ are set by the command line only
// (-march=native, the opt-in build, where the baseline copy gets the vector kernels too).
#if defined(VLM_GUMBEL_ISA_AVX512) || \
    (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__))
#define VLM_GUMBEL_LANES 16
#elif defined(VLM_GUMBEL_ISA_AVX2) || (defined(__AVX2__) && defined(__FMA__))
#define VLM_GUMBEL_LANES 8
#else
#define VLM_GUMBEL_LANES 0
#endif

namespace vlm {
namespace VLM_CPU_LEVEL {
namespace {

// The (outer, K, inner) view of a contiguous tensor around `dim`.
struct Shape {
  int64_t outer = 1, K = 1, inner = 1;
  int64_t numel() const { return outer * K * inner; }
  // Index in the dim-reduced output (outer, inner) of the unit whose first element has offset `base`.
  int64_t reduced(int64_t base) const {
    const int64_t o = base / (K * inner);
    return o * inner + (base - o * K * inner);
  }
};

Shape shape_around(const at::Tensor& t, int64_t dim) {
  Shape s;
  for (int64_t d = 0; d < dim; ++d) s.outer *= t.size(d);
  s.K = t.size(dim);
  for (int64_t d = dim + 1; d < t.dim(); ++d) s.inner *= t.size(d);
  return s;
}

std::vector<int64_t> sizes_without(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes.erase(sizes.begin() + dim);
  return sizes;
}

// Cheap argument checks; the Python op layer has already validated everything with better messages.
void check_tensor(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              fn, ": ", name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

void check_dim(const at::Tensor& t, int64_t dim, const char* fn) {
  TORCH_CHECK(t.dim() >= 1 && dim >= 0 && dim < t.dim(), fn, ": dim must be in [0, ", t.dim(), ") for logits of shape ",
              t.sizes(), ", got ", dim);
  TORCH_CHECK(t.size(dim) >= 1, fn, ": logits must have at least one category along dim ", dim, ", shape ", t.sizes());
}

void check_tau(double tau, const char* fn) {
  TORCH_CHECK(tau > 0.0 && std::isfinite(tau), fn, ": tau must be positive and finite, got ", tau);
}

// A 64-byte aligned float buffer (one per thread and parallel chunk).
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    if (n <= 0) return;
    const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
    data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data_ != nullptr, "gumbel cpu kernel: could not allocate a ", bytes, "-byte workspace");
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* get() const { return data_; }

 private:
  float* data_ = nullptr;
};

// Work per parallel task of at least ~32K elements, so small tensors stay on one thread.
int64_t grain_for(int64_t elements_per_unit) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elements_per_unit)); }

// ====================================================================================================
// scalar: any dtype, one (outer, inner) column at a time, element k at column[k * inner].
// ====================================================================================================
namespace scalar {

template <typename T>
using acc_t = at::opmath_type<T>;  // float for half / bfloat16 / float, double for double
using sum_t = double;              // sums over K run in float64 (see simd::LaneSum)

template <typename T>
acc_t<T> perturbed(const T* logits, uint64_t seed, int64_t offset) {
  return static_cast<acc_t<T>>(logits[offset]) + static_cast<acc_t<T>>(gumbel_noise(seed, static_cast<uint64_t>(offset)));
}

// Runs f(base offset of the column, its index in the reduced (outer, inner) output, workspace of K) in parallel.
template <typename A, typename F>
void for_each_column(const Shape& sh, F&& f) {
  at::parallel_for(0, sh.outer * sh.inner, grain_for(sh.K), [&](int64_t c0, int64_t c1) {
    std::vector<A> ws(static_cast<size_t>(sh.K));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = c / sh.inner, i = c % sh.inner;
      f(o * sh.K * sh.inner + i, c, ws.data());
    }
  });
}

// Soft sample of the column at `base` into y[0, K).
template <typename T>
void soft_column(const T* logits, uint64_t seed, const Shape& sh, int64_t base, acc_t<T> inv_tau, acc_t<T>* y) {
  using A = acc_t<T>;
  A m = -std::numeric_limits<A>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < sh.K; ++k) {
    y[k] = perturbed(logits, seed, base + k * sh.inner);
    nan |= std::isnan(y[k]);
    m = std::max(m, y[k]);
  }
  if (nan) m = std::numeric_limits<A>::quiet_NaN();  // amax propagates NaN: the whole column becomes NaN
  sum_t sum = 0;
  for (int64_t k = 0; k < sh.K; ++k) {
    y[k] = std::exp((y[k] - m) * inv_tau);
    sum += y[k];
  }
  const A total = static_cast<A>(sum);
  for (int64_t k = 0; k < sh.K; ++k) y[k] /= total;
}

// argmax_k of logits + noise (first index on ties); sets `nan` and returns the first NaN's index if any.
template <typename T>
int64_t argmax_column(const T* logits, uint64_t seed, const Shape& sh, int64_t base, bool& nan) {
  using A = acc_t<T>;
  A best = -std::numeric_limits<A>::infinity();
  int64_t index = 0;  // a column of -inf only: index 0, as torch.argmax
  nan = false;
  for (int64_t k = 0; k < sh.K; ++k) {
    const A z = perturbed(logits, seed, base + k * sh.inner);
    if (std::isnan(z)) {
      nan = true;
      return k;
    }
    if (z > best) {
      best = z;
      index = k;
    }
  }
  return index;
}

template <typename T>
void forward(const T* logits, T* out, const Shape& sh, uint64_t seed, double tau, bool hard) {
  using A = acc_t<T>;
  const A inv_tau = static_cast<A>(1.0 / tau);
  for_each_column<A>(sh, [&](int64_t base, int64_t, A* y) {
    if (hard) {
      bool nan = false;
      const int64_t index = argmax_column(logits, seed, sh, base, nan);
      // The row is NaN wherever the soft sample's is (eager's y_hard - sg(y_soft) + y_soft): a NaN, or a
      // non-finite maximum (+inf: inf - inf; only -inf: -inf - -inf).
      nan = nan || !std::isfinite(perturbed(logits, seed, base + index * sh.inner));
      for (int64_t k = 0; k < sh.K; ++k)
        out[base + k * sh.inner] = nan ? std::numeric_limits<A>::quiet_NaN() : static_cast<A>(k == index);
      return;
    }
    soft_column(logits, seed, sh, base, inv_tau, y);
    for (int64_t k = 0; k < sh.K; ++k) out[base + k * sh.inner] = static_cast<T>(y[k]);
  });
}

template <typename T>
void backward(const T* grad, const T* saved, T* out, const Shape& sh, uint64_t seed, double tau, bool hard) {
  using A = acc_t<T>;
  const A inv_tau = static_cast<A>(1.0 / tau);
  for_each_column<A>(sh, [&](int64_t base, int64_t, A* y) {
    if (hard) {
      soft_column(saved, seed, sh, base, inv_tau, y);
    } else {
      for (int64_t k = 0; k < sh.K; ++k) y[k] = static_cast<A>(saved[base + k * sh.inner]);
    }
    sum_t dot_sum = 0;
    for (int64_t k = 0; k < sh.K; ++k) dot_sum += static_cast<A>(grad[base + k * sh.inner]) * y[k];
    const A dot = static_cast<A>(dot_sum);
    for (int64_t k = 0; k < sh.K; ++k) {
      const int64_t at = base + k * sh.inner;
      out[at] = static_cast<T>(y[k] * (static_cast<A>(grad[at]) - dot) * inv_tau);
    }
  });
}

template <typename T>
void argmax(const T* logits, int64_t* out, const Shape& sh, uint64_t seed) {
  for_each_column<acc_t<T>>(sh, [&](int64_t base, int64_t column, acc_t<T>*) {
    bool nan = false;
    out[column] = argmax_column(logits, seed, sh, base, nan);
  });
}

// log_softmax statistics of a column: log p_k = (l_k - m) - log(s) (in that order: m + log(s) would
// round log(s) away for huge m) and sum_k p_k log p_k = t / s - log(s), where
// s = sum exp(l - m), t = sum exp(l - m) (l - m) over the terms with exp(l - m) != 0: 0 log 0 = 0, so
// extreme finite logits give no NaN, while a NaN (a NaN or +inf logit, or only -inf) propagates to the
// KL and to the whole gradient of its column, as in the reference.
template <typename T>
void logit_stats(const T* logits, const Shape& sh, int64_t base, acc_t<T>& m, acc_t<T>& log_s, acc_t<T>& neg_entropy) {
  using A = acc_t<T>;
  m = -std::numeric_limits<A>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < sh.K; ++k) {
    const A x = static_cast<A>(logits[base + k * sh.inner]);
    nan |= std::isnan(x);
    m = std::max(m, x);
  }
  if (nan) m = std::numeric_limits<A>::quiet_NaN();
  sum_t s_sum = 0, t_sum = 0;
  for (int64_t k = 0; k < sh.K; ++k) {
    const A d = static_cast<A>(logits[base + k * sh.inner]) - m;
    const A e = std::exp(d);
    s_sum += e;
    if (e != 0) t_sum += e * d;  // NaN != 0: a NaN is kept
  }
  const A s = static_cast<A>(s_sum), t = static_cast<A>(t_sum);
  log_s = std::log(s);
  neg_entropy = t / s - log_s;
}

template <typename T>
void kl_forward(const T* logits, T* out, const Shape& sh) {
  using A = acc_t<T>;
  const A log_k = static_cast<A>(std::log(static_cast<double>(sh.K)));
  for_each_column<A>(sh, [&](int64_t base, int64_t column, A*) {
    A m, log_s, neg_entropy;
    logit_stats(logits, sh, base, m, log_s, neg_entropy);
    out[column] = static_cast<T>(neg_entropy + log_k);
  });
}

template <typename T>
void kl_backward(const T* grad, const T* logits, T* out, const Shape& sh) {
  using A = acc_t<T>;
  for_each_column<A>(sh, [&](int64_t base, int64_t column, A*) {
    A m, log_s, neg_entropy;
    logit_stats(logits, sh, base, m, log_s, neg_entropy);
    const A g = static_cast<A>(grad[column]);
    for (int64_t k = 0; k < sh.K; ++k) {
      const int64_t at = base + k * sh.inner;
      const A logp = (static_cast<A>(logits[at]) - m) - log_s;
      const A p = std::exp(logp);
      out[at] = static_cast<T>(p != 0 ? g * p * (logp - neg_entropy) : A(0));
    }
  });
}

}  // namespace scalar


// ====================================================================================================
// simd: W float32 lanes, AVX-512 (W = 16) or AVX2 + FMA (W = 8).
// ====================================================================================================
#if VLM_GUMBEL_LANES
namespace simd {

// ---- the wrapper -----------------------------------------------------------------------------------
// F: W float lanes (GCC's vector operators + - * / work on it); I: W int32 lanes, or W / 2 64-bit lanes
// for Philox; M: a lane predicate. A memory access or an accumulation takes the lanes that hold data as
// Full (all W, known at compile time) or Tail (the first n <= W, at the end of a row or in a partial tile).
struct Full {};
constexpr int kRn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

#if VLM_GUMBEL_LANES == 16
constexpr int W = 16;
using F = __m512;
using I = __m512i;
using H = __m256i;  // W 16-bit lanes
using M = __mmask16;

inline I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
struct Tail {
  __mmask16 k;
  explicit Tail(int64_t n) : k(static_cast<__mmask16>((1u << n) - 1u)) {}
};
inline M valid(Full) { return 0xFFFF; }
inline M valid(const Tail& t) { return t.k; }
inline bool any_lane(M m) { return m != 0; }

inline F splat(float v) { return _mm512_set1_ps(v); }
inline I splat_i(int32_t v) { return _mm512_set1_epi32(v); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c, one rounding
inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline F fnmsub(F a, F b, F c) { return _mm512_fnmsub_ps(a, b, c); }  // -(a b) - c
inline F max(F a, F b) { return _mm512_max_ps(a, b); }                // b where either is NaN
inline F min(F a, F b) { return _mm512_min_ps(a, b); }
inline F round_even(F x) { return _mm512_roundscale_ps(x, kRn); }
inline F scale2(F y, F n) { return _mm512_scalef_ps(y, n); }  // y 2^n, n integral
inline F to_float(I x) { return _mm512_cvtepi32_ps(x); }
inline I bits(F x) { return _mm512_castps_si512(x); }
inline F from_bits(I x) { return _mm512_castsi512_ps(x); }
inline I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
inline I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
inline I and_i(I a, I b) { return _mm512_and_si512(a, b); }
inline I xor_i(I a, I b) { return _mm512_xor_si512(a, b); }
template <int n>
I sra_i(I a) { return _mm512_srai_epi32(a, n); }
template <int n>
I srl_i(I a) { return _mm512_srli_epi32(a, n); }
template <int n>
I sll_i(I a) { return _mm512_slli_epi32(a, n); }
inline M is_nan(F x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
inline M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline M ne(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }  // true for NaN
inline M eq_i(I a, I b) { return _mm512_cmpeq_epi32_mask(a, b); }
inline M lt_i(I a, I b) { return _mm512_cmplt_epi32_mask(a, b); }
inline F select(M m, F a, F b) { return _mm512_mask_mov_ps(b, m, a); }  // a where m, else b
inline I select(M m, I a, I b) { return _mm512_mask_mov_epi32(b, m, a); }
inline float reduce_max(F x) { return _mm512_reduce_max_ps(x); }
inline int32_t reduce_min_i(I x) { return _mm512_reduce_min_epi32(x); }
inline F broadcast0(F x) { return _mm512_broadcastss_ps(_mm512_castps512_ps128(x)); }
inline void store_i(int32_t* p, I x) { _mm512_storeu_si512(p, x); }

inline F load(const float* p, Full) { return _mm512_loadu_ps(p); }
inline F load(const float* p, const Tail& t) { return _mm512_maskz_loadu_ps(t.k, p); }
inline void store(float* p, F v, Full) { _mm512_storeu_ps(p, v); }
inline void store(float* p, F v, const Tail& t) { _mm512_mask_storeu_ps(p, t.k, v); }
inline H load16(const void* p, Full) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline H load16(const void* p, const Tail& t) { return _mm256_maskz_loadu_epi16(t.k, p); }
inline void store16(void* p, H x, Full) { _mm256_storeu_si256(static_cast<__m256i*>(p), x); }
inline void store16(void* p, H x, const Tail& t) { _mm256_mask_storeu_epi16(p, t.k, x); }
inline I widen16(H x) { return _mm512_cvtepu16_epi32(x); }
inline H narrow16(I x) { return _mm512_cvtepi32_epi16(x); }  // x < 2^16
inline F half_to_float(H x) { return _mm512_cvtph_ps(x); }
inline H float_to_half(F x) { return _mm512_cvtps_ph(x, kRn); }

// A per-lane sum kept in float64: a lane of a tile adds up all K terms of its column, and a float sum
// that long would lose digits the reference (a tree-like torch reduction) keeps.
struct LaneSum {
  // (a constructor of its own: an implicit one is compiled without the level's target, see isa.h)
  LaneSum() : lo(_mm512_setzero_pd()), hi(_mm512_setzero_pd()) {}
  __m512d lo, hi;
  void add(F v) {
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  F lanes() const {
    const __m256 l = _mm512_cvtpd_ps(lo), h = _mm512_cvtpd_ps(hi);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(l)), _mm256_castps_pd(h), 1));
  }
  float total() const { return static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(lo, hi))); }
};

// Philox on W / 2 64-bit lanes: one call per lane, each 32-bit state word in the low half of its lane.
inline I mul_wide(I a, I b) { return _mm512_mul_epu32(a, b); }  // the 64-bit products of the low halves
inline I high_half(I a) { return _mm512_srli_epi64(a, 32); }
inline I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline I splat64(uint64_t v) { return _mm512_set1_epi64(static_cast<int64_t>(v)); }
// The counters of the W / 4 calls c, c + 1, ... and of the W / 4 calls d, d + 1, ...
inline I counters(uint64_t c, uint64_t d) {
  return _mm512_add_epi64(_mm512_setr_epi64(int64_t(c), int64_t(c), int64_t(c), int64_t(c), int64_t(d), int64_t(d),
                                            int64_t(d), int64_t(d)),
                          _mm512_setr_epi64(0, 1, 2, 3, 0, 1, 2, 3));
}
// The output words w[j] of the calls at counters(c, d) laid out as elements: lo = the W words of elements
// 4c .. 4c + W - 1 (word j of call c + i at 4i + j), hi = those of elements 4d .. 4d + W - 1.
inline void to_elements(const I w[4], I& lo, I& hi) {
  const I w01 = _mm512_mask_blend_epi32(0xAAAA, w[0], _mm512_slli_epi64(w[1], 32));  // (w0, w1) per call
  const I w23 = _mm512_mask_blend_epi32(0xAAAA, w[2], _mm512_slli_epi64(w[3], 32));  // (w2, w3) per call
  lo = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), w23);
  hi = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), w23);
}
// Lanes s .. s + W - 1 of the 2W lanes lo:hi (0 <= s < W).
inline I window(I lo, I hi, int s) { return _mm512_permutex2var_epi32(lo, add_i(iota(), splat_i(s)), hi); }

#else  // VLM_GUMBEL_LANES == 8: AVX2 + FMA
constexpr int W = 8;
using F = __m256;
using I = __m256i;
using H = __m128i;  // W 16-bit lanes
struct M {          // a lane predicate: all ones or all zeros per lane
  __m256 v;
};
inline M operator&(M a, M b) { return {_mm256_and_ps(a.v, b.v)}; }
inline M operator|(M a, M b) { return {_mm256_or_ps(a.v, b.v)}; }
inline M& operator|=(M& a, M b) { return a = a | b; }
inline M as_mask(I x) { return {_mm256_castsi256_ps(x)}; }

inline I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
struct Tail {
  I k;
  int n;
  explicit Tail(int64_t count) : k(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), iota())), n(static_cast<int>(count)) {}
};
inline M valid(Full) { return as_mask(_mm256_set1_epi32(-1)); }
inline M valid(const Tail& t) { return as_mask(t.k); }
inline bool any_lane(M m) { return _mm256_movemask_ps(m.v) != 0; }

inline F splat(float v) { return _mm256_set1_ps(v); }
inline I splat_i(int32_t v) { return _mm256_set1_epi32(v); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
inline F fnmsub(F a, F b, F c) { return _mm256_fnmsub_ps(a, b, c); }
inline F max(F a, F b) { return _mm256_max_ps(a, b); }  // b where either is NaN, as AVX-512's
inline F min(F a, F b) { return _mm256_min_ps(a, b); }
inline F round_even(F x) { return _mm256_round_ps(x, kRn); }
inline F to_float(I x) { return _mm256_cvtepi32_ps(x); }
inline I bits(F x) { return _mm256_castps_si256(x); }
inline F from_bits(I x) { return _mm256_castsi256_ps(x); }
inline I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
inline I sub_i(I a, I b) { return _mm256_sub_epi32(a, b); }
inline I and_i(I a, I b) { return _mm256_and_si256(a, b); }
inline I or_i(I a, I b) { return _mm256_or_si256(a, b); }
inline I xor_i(I a, I b) { return _mm256_xor_si256(a, b); }
template <int n>
I sra_i(I a) { return _mm256_srai_epi32(a, n); }
template <int n>
I srl_i(I a) { return _mm256_srli_epi32(a, n); }
template <int n>
I sll_i(I a) { return _mm256_slli_epi32(a, n); }
inline M is_nan(F x) { return {_mm256_cmp_ps(x, x, _CMP_UNORD_Q)}; }
inline M gt(F a, F b) { return {_mm256_cmp_ps(a, b, _CMP_GT_OQ)}; }
inline M eq(F a, F b) { return {_mm256_cmp_ps(a, b, _CMP_EQ_OQ)}; }
inline M ne(F a, F b) { return {_mm256_cmp_ps(a, b, _CMP_NEQ_UQ)}; }
inline M eq_i(I a, I b) { return as_mask(_mm256_cmpeq_epi32(a, b)); }
inline M lt_i(I a, I b) { return as_mask(_mm256_cmpgt_epi32(b, a)); }
inline F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m.v); }
inline I select(M m, I a, I b) { return bits(_mm256_blendv_ps(from_bits(b), from_bits(a), m.v)); }
// y 2^n for integral n in [-150, 128] with one rounding, as vscalefps: two factors 2^(n/2) that are normal
// floats, the first product exact.
inline F scale2(F y, F n) {
  const I e = _mm256_cvtps_epi32(n), e1 = sra_i<1>(e), e2 = sub_i(e, e1);
  return y * from_bits(sll_i<23>(add_i(e1, splat_i(127)))) * from_bits(sll_i<23>(add_i(e2, splat_i(127))));
}
inline float reduce_max(F x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline int32_t reduce_min_i(I x) {
  __m128i m = _mm_min_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  return _mm_cvtsi128_si32(_mm_min_epi32(m, _mm_shuffle_epi32(m, 0xB1)));
}
inline F broadcast0(F x) { return _mm256_broadcastss_ps(_mm256_castps256_ps128(x)); }
inline void store_i(int32_t* p, I x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }

inline F load(const float* p, Full) { return _mm256_loadu_ps(p); }
inline F load(const float* p, const Tail& t) { return _mm256_maskload_ps(p, t.k); }
inline void store(float* p, F v, Full) { _mm256_storeu_ps(p, v); }
inline void store(float* p, F v, const Tail& t) { _mm256_maskstore_ps(p, t.k, v); }
// No 16-bit masked moves in AVX2: a tail goes through a small buffer.
inline H load16(const void* p, Full) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline H load16(const void* p, const Tail& t) {
  alignas(16) uint16_t b[8] = {};
  std::memcpy(b, p, sizeof(uint16_t) * t.n);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(b));
}
inline void store16(void* p, H x, Full) { _mm_storeu_si128(static_cast<__m128i*>(p), x); }
inline void store16(void* p, H x, const Tail& t) {
  alignas(16) uint16_t b[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(b), x);
  std::memcpy(p, b, sizeof(uint16_t) * t.n);
}
inline I widen16(H x) { return _mm256_cvtepu16_epi32(x); }
inline H narrow16(I x) { return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)); }  // x < 2^16
// float16 <-> float32 without F16C (the level promises AVX2 and FMA only), as c10::Half converts: exact
// widening, round-to-nearest-even narrowing, NaN -> 0x7E00 with the sign.
inline F half_to_float(H x) {
  const I h = widen16(x), em = and_i(h, splat_i(0x7FFF));
  const I sign = sll_i<16>(xor_i(h, em)), shifted = sll_i<13>(em);
  const I normal = add_i(shifted, splat_i(112 << 23));   // exponent bias 15 -> 127
  const I special = add_i(shifted, splat_i(224 << 23));  // inf / NaN: exponent 31 -> 255
  const F subnormal = to_float(em) * splat(0x1p-24f);    // em < 0x400: em 2^-24, exact
  I r = select(lt_i(splat_i(0x7BFF), em), special, normal);
  r = select(lt_i(em, splat_i(0x400)), bits(subnormal), r);
  return from_bits(or_i(r, sign));
}
inline H float_to_half(F v) {
  const I u = bits(v), a = and_i(u, splat_i(0x7FFFFFFF)), sign = srl_i<16>(xor_i(u, a));
  // |v| >= 2^16: inf, or NaN (quiet).
  const I big = select(lt_i(splat_i(0x7F800000), a), splat_i(0x7E00), splat_i(0x7C00));
  // |v| < 2^-14: a subnormal half; |v| + 0.5f rounds to a multiple of 2^-24 (nearest even) in its low bits.
  const I small = sub_i(bits(from_bits(a) + splat(0.5f)), splat_i(0x3F000000));
  // normal: rebias (-112 << 23) and round to nearest even on the 13 dropped bits (a carry may give inf).
  const I odd = and_i(srl_i<13>(a), splat_i(1));
  const I normal = srl_i<13>(add_i(add_i(a, splat_i(static_cast<int32_t>(0xC8000FFFu))), odd));
  I r = select(lt_i(a, splat_i(0x38800000)), small, normal);
  r = select(lt_i(splat_i(0x477FFFFF), a), big, r);
  return narrow16(or_i(r, sign));
}

struct LaneSum {  // see the AVX-512 one
  LaneSum() : lo(_mm256_setzero_pd()), hi(_mm256_setzero_pd()) {}
  __m256d lo, hi;
  void add(F v) {
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  F lanes() const { return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)); }
  float total() const {
    const __m256d s = _mm256_add_pd(lo, hi);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return static_cast<float>(_mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t))));
  }
};

inline I mul_wide(I a, I b) { return _mm256_mul_epu32(a, b); }
inline I high_half(I a) { return _mm256_srli_epi64(a, 32); }
inline I xor3(I a, I b, I c) { return xor_i(xor_i(a, b), c); }
inline I splat64(uint64_t v) { return _mm256_set1_epi64x(static_cast<int64_t>(v)); }
// Lanes (c, d, c + 1, d + 1): to_elements's in-lane unpacks then put calls c, c + 1 and d, d + 1 in order.
inline I counters(uint64_t c, uint64_t d) {
  return _mm256_setr_epi64x(int64_t(c), int64_t(d), int64_t(c + 1), int64_t(d + 1));
}
inline void to_elements(const I w[4], I& lo, I& hi) {
  const I w01 = _mm256_blend_epi32(w[0], _mm256_slli_epi64(w[1], 32), 0xAA);
  const I w23 = _mm256_blend_epi32(w[2], _mm256_slli_epi64(w[3], 32), 0xAA);
  lo = _mm256_unpacklo_epi64(w01, w23);
  hi = _mm256_unpackhi_epi64(w01, w23);
}
inline I window(I lo, I hi, int s) {
  const I j = add_i(iota(), splat_i(s)), lane = and_i(j, splat_i(7));
  return select(lt_i(splat_i(7), j), _mm256_permutevar8x32_epi32(hi, lane), _mm256_permutevar8x32_epi32(lo, lane));
}
#endif  // VLM_GUMBEL_LANES

// Level-independent pieces of the wrapper.
inline M only(Full, M m) { return m; }  // m on the lanes that hold data
inline M only(const Tail& t, M m) { return m & valid(t); }
inline F keep(Full, F v) { return v; }  // v on the lanes that hold data, 0 elsewhere
inline F keep(const Tail& t, F v) { return select(valid(t), v, splat(0.0f)); }
inline F max_in(Full, F acc, F x) { return max(acc, x); }  // acc = max(acc, x) on the lanes that hold data
inline F max_in(const Tail& t, F acc, F x) { return select(valid(t), max(acc, x), acc); }
inline F nan_f() { return splat(std::numeric_limits<float>::quiet_NaN()); }
inline F neg_inf() { return splat(-std::numeric_limits<float>::infinity()); }

// Loads and stores with dtype conversion; lanes outside a Tail load as 0 and are not written.
template <typename V>
F load(const c10::Half* p, const V& on) { return half_to_float(load16(p, on)); }
template <typename V>
F load(const c10::BFloat16* p, const V& on) { return from_bits(sll_i<16>(widen16(load16(p, on)))); }
template <typename V>
void store(c10::Half* p, F v, const V& on) { store16(p, float_to_half(v), on); }
template <typename V>
void store(c10::BFloat16* p, F v, const V& on) {
  // c10::BFloat16's rounding: round to nearest even, NaN -> 0x7FC0.
  const I u = bits(v), bias = add_i(and_i(srl_i<16>(u), splat_i(1)), splat_i(0x7FFF));
  store16(p, narrow16(select(is_nan(v), splat_i(0x7FC0), srl_i<16>(add_i(u, bias)))), on);
}

// ---- the noise: vlm::gumbel_noise, W lanes at a time, bit for bit -----------------------------------
// Every fp32 step is exact or a correctly rounded fma (vfmadd/vfnmsub round once, like std::fma), and no
// product meets an add outside an fma, so no compiler contraction can change a bit.

struct PhiloxKeys {  // the round keys of one seed, broadcast
  I k0[10], k1[10];
  explicit PhiloxKeys(uint64_t seed) {
    const PhiloxKey key = philox_key(seed);
    for (int r = 0; r < 10; ++r) {
      k0[r] = splat_i(static_cast<int32_t>(key.k0[r]));
      k1[r] = splat_i(static_cast<int32_t>(key.k1[r]));
    }
  }
};

// vlm::philox4 for the counters in the 64-bit lanes of `ctr` (c0 = low word, c1 = high word): w[j] gets
// output word j of each call in the low half of its lane. The high halves are junk: mul_wide reads only
// the low halves, so a 32 x 32 -> 64 multiply is one instruction and its high word one shift, with no
// packing. Round 0 has c2 = c3 = 0.
inline void philox_calls(I ctr, const PhiloxKeys& key, I w[4]) {
  const I ma = splat64(kPhiloxRoundA), mb = splat64(kPhiloxRoundB);
  I pa = mul_wide(ctr, ma);
  I c0 = xor_i(high_half(ctr), key.k0[0]);
  I c2 = xor_i(high_half(pa), key.k1[0]);
  I c1 = splat_i(0);
  I c3 = pa;
#pragma GCC unroll 9
  for (int r = 1; r < 10; ++r) {
    const I pb = mul_wide(c2, mb);
    pa = mul_wide(c0, ma);
    c0 = xor3(high_half(pb), c1, key.k0[r]);
    c2 = xor3(high_half(pa), c3, key.k1[r]);
    c1 = pb;
    c3 = pa;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

inline void philox_elements(I ctr, const PhiloxKeys& key, I& lo, I& hi) {
  I w[4];
  philox_calls(ctr, key, w);
  to_elements(w, lo, hi);
}

// The Philox words of the N groups of W offsets start[q] .. start[q] + W - 1. Groups that start on a
// multiple of 4 take W / 4 calls each (two groups per philox_elements); others take the W / 2 calls at
// counters start / 4 .. and keep the W-word window that begins at word start % 4.
template <int N>
inline void philox_words(const PhiloxKeys& key, const uint64_t* start, I* words) {
  bool aligned = true;
  for (int q = 0; q < N; ++q) aligned &= (start[q] & 3) == 0;
  if (aligned) {
#pragma GCC unroll 4
    for (int q = 0; q + 1 < N; q += 2) philox_elements(counters(start[q] >> 2, start[q + 1] >> 2), key, words[q], words[q + 1]);
    if (N % 2) {
      I unused;
      philox_elements(counters(start[N - 1] >> 2, start[N - 1] >> 2), key, words[N - 1], unused);
    }
    return;
  }
  for (int q = 0; q < N; ++q) {
    const uint64_t c = start[q] >> 2;
    I lo, hi;
    philox_elements(counters(c, c + W / 4), key, lo, hi);
    words[q] = window(lo, hi, static_cast<int>(start[q] & 3));
  }
}

// -vlm::vlm_logf on N vectors, lane by lane, same operations. The N polynomial chains are interleaved
// step by step: one chain alone is latency-bound (7 dependent fmas).
template <int N>
inline void neg_log(F* x) {
  I e[N];
  F f[N], p[N];
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) {
    const I b = bits(x[q]);
    e[q] = sra_i<23>(sub_i(b, splat_i(0x3f3504f3)));
    f[q] = from_bits(sub_i(b, sll_i<23>(e[q]))) - splat(1.0f);  // exact
    p[q] = fmadd(f[q], splat(kLogP0), splat(kLogP1));
  }
  for (const float c : {kLogP2, kLogP3, kLogP4, kLogP5, kLogP6, -0.5f}) {
#pragma GCC unroll 8
    for (int q = 0; q < N; ++q) p[q] = fmadd(p[q], f[q], splat(c));
  }
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) {
    const F r = fmadd(p[q], f[q] * f[q], f[q]);
    x[q] = fnmsub(to_float(e[q]), splat(kLn2), r);  // -(e ln2 + r), one rounding
  }
}

// vlm::gumbel_noise for the N groups of W offsets start[q] .. start[q] + W - 1, into out[q].
template <int N>
inline void gumbel_noise_vecs(const PhiloxKeys& key, const uint64_t* start, F* out) {
  I words[N];
  philox_words<N>(key, start, words);
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) {
    // uniform_from_bits: r < 0 ? -r - 1 : r is r ^ (r >> 31), then the scale.
    out[q] = to_float(xor_i(words[q], sra_i<31>(words[q]))) * splat(kUniformScale);
  }
  neg_log<N>(out);
  neg_log<N>(out);
}

// Vectors whose noise is computed together: 8 (4 Philox chains at AVX2, 2 at AVX-512, then 8 log chains)
// measured 18-25% faster than 4 at both levels on Zen 4, and faster than 12 at AVX2 (register spills).
constexpr int kNoiseGroups = 8;

// exp(x) to ~1 ulp: 2^n * e^r with n = round(x / ln 2) (Cephes' expf polynomial). scale2 gives the
// gradual underflow to 0; NaN passes the clamps (max/min return their second operand when it is NaN).
inline F exp_f(F x) {
  x = min(splat(88.8f), max(splat(-104.0f), x));
  const F n = round_even(x * splat(1.44269504088896341f));
  F r = fnmadd(n, splat(0.693359375f), x);
  r = fnmadd(n, splat(-2.12194440e-4f), r);
  F p = splat(1.9875691500e-4f);
  p = fmadd(p, r, splat(1.3981999507e-3f));
  p = fmadd(p, r, splat(8.3334519073e-3f));
  p = fmadd(p, r, splat(4.1665795894e-2f));
  p = fmadd(p, r, splat(1.6666665459e-1f));
  p = fmadd(p, r, splat(5.0000001201e-1f));
  const F y = fmadd(p, r * r, r) + splat(1.0f);
  return scale2(y, n);
}

// Natural log lane by lane with std::log (once per row or tile, not per element).
inline F log_exact(F v) {
  alignas(64) float lanes[W];
  store(lanes, v, Full{});
  for (float& x : lanes) x = std::log(x);
  return load(lanes, Full{});
}

// ---- layouts -----------------------------------------------------------------------------------------
constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();

// Fixed-size arrays of vectors, one per vector of a step (a vector type as a template argument, as in
// std::array<F, V>, draws -Wignored-attributes).
template <int V>
struct Vecs {
  F v[V];
  F& operator[](int i) { return v[i]; }
  const F& operator[](int i) const { return v[i]; }
  void fill(F x) {
    for (F& e : v) e = x;
  }
};
template <int V>
struct Indices {
  I v[V];
  I& operator[](int i) { return v[i]; }
  const I& operator[](int i) const { return v[i]; }
  void fill(I x) {
    for (I& e : v) e = x;
  }
};
template <int V>
using Masks = std::array<M, V>;

// The winner of an argmax in every lane (a row broadcasts its single winner), and the lanes whose soft
// sample is NaN: a NaN, or a non-finite maximum (+inf, or only -inf), as eager's softmax gives.
template <int V>
struct Winner {
  Indices<V> index;
  Masks<V> nan;
};

inline M infinite_lanes(F x) {
  return eq(x, splat(std::numeric_limits<float>::infinity())) | eq(x, splat(-std::numeric_limits<float>::infinity()));
}

// Software prefetch distances in steps: a step of the noise passes takes ~100 cycles or more, one of the
// memory-bound passes a few, and a DRAM access some hundreds.
constexpr int kComputeAhead = 8;
constexpr int kStreamAhead = 48;

// A unit of work is walked in steps of kVecs vectors of W lanes; vector v of step s is at element
// offset at(s, v) from the unit's base and at ws_at(s, v) in the float workspace. Steps before
// full_steps() are Full; the others (single-vector layouts only) hold data in the lanes of `tail`.
//
// A row: K contiguous elements, one vector per step (the last one partial), statistics reduced across
// the lanes at the end.
struct Row {
  static constexpr int kVecs = 1;
  int64_t K;
  Tail tail;
  explicit Row(int64_t k) : K(k), tail(k % W) {}
  int64_t steps() const { return (K + W - 1) / W; }
  int64_t full_steps() const { return K / W; }
  int64_t at(int64_t s, int) const { return s * W; }
  int64_t ws_at(int64_t s, int) const { return s * W; }
  int results(int) const { return 1; }  // one reduced result, in lane 0
  I index(int64_t s, int) const { return add_i(iota(), splat_i(static_cast<int32_t>(s * W))); }
  Vecs<1> all_max(const Vecs<1>& v) const { return {{splat(reduce_max(v[0]))}}; }
  Vecs<1> all_sum(const std::array<LaneSum, 1>& v) const { return {{splat(v[0].total())}}; }
  Masks<1> any(const Masks<1>& m) const { return {any_lane(m[0]) ? valid(Full{}) : M{}}; }
  Vecs<1> broadcast(const Vecs<1>& v) const { return {{broadcast0(v[0])}}; }
  template <int kAhead, typename T>
  void prefetch(const T*, int64_t, int) const {}  // sequential: the hardware prefetcher does it
  Winner<1> finish(const Vecs<1>& best, const Indices<1>& index, const Indices<1>& nan_index) const {
    const int32_t first_nan = reduce_min_i(nan_index[0]);
    if (first_nan != kNoIndex) return {{{splat_i(first_nan)}}, {valid(Full{})}};
    const float m = reduce_max(best[0]);
    // all -inf: index 0, as torch.argmax; the soft row (and so the hard one) is NaN
    if (m == -std::numeric_limits<float>::infinity()) return {{{splat_i(0)}}, {valid(Full{})}};
    const I candidates = select(eq(best[0], splat(m)), index[0], splat_i(kNoIndex));
    const M nan_row = std::isinf(m) ? valid(Full{}) : M{};  // a +inf maximum: NaN soft row
    return {{{splat_i(reduce_min_i(candidates))}}, {nan_row}};
  }
};

// A tile: W V adjacent columns of one outer slice (lanes = columns), one step per k, so nothing is
// transposed and no horizontal reduction is needed. Consecutive steps are `inner` elements apart, often a
// page: every step costs a TLB miss per tensor, which 32 columns per step share. Only a Tile<1> may be
// partial (width < W columns).
template <int V>
struct Tile {
  static constexpr int kVecs = V;
  int64_t K, inner;
  int width;  // the columns of the last vector; the others are full
  Tail tail;
  Tile(int64_t k, int64_t in, int w) : K(k), inner(in), width(w), tail(w) {}
  int64_t steps() const { return K; }
  int64_t full_steps() const { return width == W ? K : 0; }
  int64_t at(int64_t s, int v) const { return s * inner + W * v; }
  int64_t ws_at(int64_t s, int v) const { return (s * V + v) * W; }
  int results(int v) const { return v == V - 1 ? width : W; }
  I index(int64_t s, int) const { return splat_i(static_cast<int32_t>(s)); }
  Vecs<V> all_max(const Vecs<V>& v) const { return v; }
  Vecs<V> all_sum(const std::array<LaneSum, V>& sums) const {
    Vecs<V> out;
    for (int v = 0; v < V; ++v) out[v] = sums[v].lanes();
    return out;
  }
  Masks<V> any(const Masks<V>& m) const { return m; }
  Vecs<V> broadcast(const Vecs<V>& v) const { return v; }
  // The hardware prefetcher does not follow steps a page apart: fetch kAhead steps ahead.
  template <int kAhead, typename T>
  void prefetch(const T* p, int64_t s, int v) const {
    const auto ahead = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(at(s + kAhead, v)) * sizeof(T);
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);  // never faults, even past the end
  }
  Winner<V> finish(const Vecs<V>& best, Indices<V> index, const Indices<V>& nan_index) const {
    const I none = splat_i(kNoIndex);
    Winner<V> w;
    for (int v = 0; v < V; ++v) {
      index[v] = select(eq_i(index[v], none), splat_i(0), index[v]);
      w.nan[v] = lt_i(nan_index[v], none);
      w.index[v] = select(w.nan[v], nan_index[v], index[v]);
      w.nan[v] = w.nan[v] | infinite_lanes(best[v]);  // +inf, or only -inf (best stays -inf)
    }
    return w;
  }
};

// Calls f(s, v, on) for every vector of every step, in order; `on` is Full or the layout's Tail.
template <typename L, typename Fn>
inline void each_step(const L& lay, Fn&& f) {
  const int64_t full = lay.full_steps(), n = lay.steps();
  for (int64_t s = 0; s < full; ++s) {
#pragma GCC unroll 4
    for (int v = 0; v < L::kVecs; ++v) f(s, v, Full{});
  }
  for (int64_t s = full; s < n; ++s) f(s, 0, lay.tail);
}

// Calls f(s, v, on, noise) for every vector of every step, in order. The noise is generated
// kNoiseGroups vectors at a time, or read from `noise` (filled beforehand, indexed like the tensor)
// when the unit is too narrow to fill W lanes.
template <bool kPrefilled, typename L, typename Fn>
inline void each_noisy_step(const L& lay, const PhiloxKeys& key, uint64_t base, const float* noise, Fn&& f) {
  constexpr int V = L::kVecs, G = kNoiseGroups;
  if constexpr (kPrefilled) {
    each_step(lay, [&](int64_t s, int v, const auto& on) { f(s, v, on, load(noise + lay.at(s, v), on)); });
  } else {
    const int64_t full = lay.full_steps() * V, n = lay.steps() * V;  // vectors, in order
    for (int64_t j0 = 0; j0 < n; j0 += G) {
      uint64_t start[G];
      for (int q = 0; q < G; ++q)  // past the end: computed, unused
        start[q] = base + static_cast<uint64_t>(lay.at((j0 + q) / V, static_cast<int>((j0 + q) % V)));
      F g[G];
      gumbel_noise_vecs<G>(key, start, g);
      if (j0 + G <= full) {  // all but the last group: unrolled, so g and f's state stay in registers
#pragma GCC unroll 8
        for (int q = 0; q < G; ++q) f((j0 + q) / V, static_cast<int>((j0 + q) % V), Full{}, g[q]);
      } else {
        for (int64_t j = j0; j < std::min<int64_t>(j0 + G, n); ++j) {
          if (j < full) {
            f(j / V, static_cast<int>(j % V), Full{}, g[j - j0]);
          } else {
            f(j / V, static_cast<int>(j % V), lay.tail, g[j - j0]);
          }
        }
      }
    }
  }
}

// Pass 1 of the soft sample: ws = z = logits + noise; returns max z (NaN where the unit holds a NaN).
template <bool kPrefilled, typename T, typename L>
Vecs<L::kVecs> perturb_and_max(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base, const float* noise,
                               float* ws) {
  Vecs<L::kVecs> mx;
  mx.fill(neg_inf());
  Masks<L::kVecs> nan{};
  each_noisy_step<kPrefilled>(lay, key, base, noise, [&](int64_t s, int v, const auto& on, F g) {
    lay.template prefetch<kComputeAhead>(l, s, v);
    const F z = load(l + lay.at(s, v), on) + g;
    store(ws + lay.ws_at(s, v), z, on);
    mx[v] = max_in(on, mx[v], z);
    nan[v] |= only(on, is_nan(z));
  });
  mx = lay.all_max(mx);
  nan = lay.any(nan);
  for (int v = 0; v < L::kVecs; ++v) mx[v] = select(nan[v], nan_f(), mx[v]);
  return mx;
}

// Pass 2: ws = exp((z - max) * inv_tau); returns the sum.
template <typename L>
Vecs<L::kVecs> exp_and_sum(const L& lay, float* ws, const Vecs<L::kVecs>& mx, F inv_tau) {
  std::array<LaneSum, L::kVecs> sum;
  each_step(lay, [&](int64_t s, int v, const auto& on) {
    float* w = ws + lay.ws_at(s, v);
    const F e = exp_f((load(w, on) - mx[v]) * inv_tau);
    store(w, e, on);
    sum[v].add(keep(on, e));
  });
  return lay.all_sum(sum);
}

// Passes 1 and 2 of the soft sample of a unit: leaves the unnormalised exp in ws and returns its sum.
template <typename T, typename L>
Vecs<L::kVecs> soft_unnormalised(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base, const float* noise,
                                 float* ws, F inv_tau) {
  const Vecs<L::kVecs> mx = noise ? perturb_and_max<true>(lay, l, key, base, noise, ws)
                                  : perturb_and_max<false>(lay, l, key, base, noise, ws);
  return exp_and_sum(lay, ws, mx, inv_tau);
}

// One pass: argmax of logits + noise per lane (first index on ties, first NaN wins).
template <bool kPrefilled, typename T, typename L>
Winner<L::kVecs> perturbed_argmax_pass(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base,
                                       const float* noise) {
  constexpr int V = L::kVecs;
  const I none = splat_i(kNoIndex);
  Vecs<V> best;
  best.fill(neg_inf());
  Indices<V> index, nan_index;
  index.fill(none);
  nan_index.fill(none);
  each_noisy_step<kPrefilled>(lay, key, base, noise, [&](int64_t s, int v, const auto& on, F g) {
    lay.template prefetch<kComputeAhead>(l, s, v);
    const F z = load(l + lay.at(s, v), on) + g;
    const M greater = only(on, gt(z, best[v]));  // strict: the first maximum stays
    best[v] = select(greater, z, best[v]);
    index[v] = select(greater, lay.index(s, v), index[v]);
    const M first_nan = only(on, is_nan(z)) & eq_i(nan_index[v], none);
    nan_index[v] = select(first_nan, lay.index(s, v), nan_index[v]);
  });
  return lay.finish(best, index, nan_index);
}

template <typename T, typename L>
Winner<L::kVecs> perturbed_argmax(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base, const float* noise) {
  return noise ? perturbed_argmax_pass<true>(lay, l, key, base, noise) : perturbed_argmax_pass<false>(lay, l, key, base, noise);
}

// The straight-through gradient y * (dy - sum(dy * y)) * inv_tau; y_at(s, v, on) loads y, from `y_tensor`
// (laid out like dy) or, when that is null, from the workspace.
template <typename T, typename L, typename Y>
void softmax_grad(const L& lay, Y&& y_at, const T* y_tensor, const T* dy, T* out, F inv_tau) {
  const auto prefetch_inputs = [&](int64_t s, int v) {
    lay.template prefetch<kStreamAhead>(dy, s, v);
    if (y_tensor) lay.template prefetch<kStreamAhead>(y_tensor, s, v);
  };
  std::array<LaneSum, L::kVecs> lane_dot;
  each_step(lay, [&](int64_t s, int v, const auto& on) {
    prefetch_inputs(s, v);
    lane_dot[v].add(keep(on, load(dy + lay.at(s, v), on) * y_at(s, v, on)));
  });
  const Vecs<L::kVecs> dot = lay.all_sum(lane_dot);
  each_step(lay, [&](int64_t s, int v, const auto& on) {
    prefetch_inputs(s, v);
    const F g = load(dy + lay.at(s, v), on);
    store(out + lay.at(s, v), y_at(s, v, on) * (g - dot[v]) * inv_tau, on);
  });
}

// ---- drivers: cut the tensor into rows or tiles and run `unit` on each, in parallel ----------------
// unit(layout, base offset, prefilled noise of the unit or nullptr, float workspace of K x 32 at most).
// With `noisy`, units too narrow for W lanes (short rows, fewer than W columns) get their noise
// generated W contiguous offsets at a time into a buffer first.
constexpr int kWideVecs = 32 / W;     // 32 columns: the K x 32 float workspace (1 MiB at K = 8192) stays near L2
constexpr int64_t kWideMaxK = 65536;  // wide tiles only while their workspace stays within 8 MiB

template <typename Fn>
void for_each_row(const Shape& sh, uint64_t seed, bool noisy, Fn&& unit) {
  const bool prefill = noisy && sh.K < 128;
  const int64_t block = prefill ? std::max<int64_t>(1, 4096 / sh.K) : 1;  // rows whose noise is filled at once
  at::parallel_for(0, sh.outer, grain_for(sh.K), [&](int64_t r0, int64_t r1) {
    Scratch ws(sh.K), noise(prefill ? block * sh.K : 0);
    const Row row(sh.K);
    for (int64_t r = r0; r < r1; r += block) {
      const int64_t rows = std::min(block, r1 - r);
      if (prefill) gumbel_noise_fill(seed, static_cast<uint64_t>(r * sh.K), rows * sh.K, noise.get());
      for (int64_t j = 0; j < rows; ++j) unit(row, (r + j) * sh.K, prefill ? noise.get() + j * sh.K : nullptr, ws.get());
    }
  });
}

// Each outer slice: inner / 32 wide tiles of 32 columns, then tiles of W (the last one partial).
template <typename Fn>
void for_each_tile(const Shape& sh, uint64_t seed, bool noisy, Fn&& unit) {
  const int64_t wide = sh.K <= kWideMaxK ? sh.inner / (W * kWideVecs) : 0;
  const int64_t narrow = (sh.inner - wide * W * kWideVecs + W - 1) / W;
  const int64_t per_outer = wide + narrow;
  const bool prefill = noisy && sh.inner < W;  // then the only tile is a whole contiguous outer slice
  at::parallel_for(0, sh.outer * per_outer, grain_for(sh.K * W), [&](int64_t u0, int64_t u1) {
    Scratch ws(sh.K * W * (wide ? kWideVecs : 1)), noise(prefill ? sh.K * sh.inner : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t o = u / per_outer, t = u % per_outer;
      if (t < wide) {
        unit(Tile<kWideVecs>(sh.K, sh.inner, W), o * sh.K * sh.inner + t * W * kWideVecs, nullptr, ws.get());
        continue;
      }
      const int64_t i0 = wide * W * kWideVecs + (t - wide) * W;
      const int width = static_cast<int>(std::min<int64_t>(W, sh.inner - i0));
      const int64_t base = o * sh.K * sh.inner + i0;
      if (prefill) gumbel_noise_fill(seed, static_cast<uint64_t>(base), sh.K * sh.inner, noise.get());
      unit(Tile<1>(sh.K, sh.inner, width), base, prefill ? noise.get() : nullptr, ws.get());
    }
  });
}

template <typename Fn>
void for_each_unit(const Shape& sh, uint64_t seed, bool noisy, Fn&& unit) {
  if (sh.inner == 1) {
    for_each_row(sh, seed, noisy, unit);
  } else {
    for_each_tile(sh, seed, noisy, unit);
  }
}

// ---- ops -------------------------------------------------------------------------------------------
template <typename T>
void forward(const T* logits, T* out, const Shape& sh, uint64_t seed, double tau, bool hard) {
  const PhiloxKeys key(seed);
  const F inv_tau = splat(static_cast<float>(1.0 / tau));
  for_each_unit(sh, seed, true, [&](const auto& lay, int64_t base, const float* noise, float* ws) {
    using L = std::decay_t<decltype(lay)>;
    const T* l = logits + base;
    T* o = out + base;
    if (hard) {
      const Winner<L::kVecs> w = perturbed_argmax(lay, l, key, static_cast<uint64_t>(base), noise);
      each_step(lay, [&](int64_t s, int v, const auto& on) {
        const F hot = select(eq_i(lay.index(s, v), w.index[v]), splat(1.0f), splat(0.0f));
        store(o + lay.at(s, v), select(w.nan[v], nan_f(), hot), on);
      });
      return;
    }
    // A float32 row is its own workspace: z, then exp, then the sample, in place.
    float* work = ws;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<L, Row>) work = o;
    const Vecs<L::kVecs> sum = soft_unnormalised(lay, l, key, static_cast<uint64_t>(base), noise, work, inv_tau);
    each_step(lay, [&](int64_t s, int v, const auto& on) {
      store(o + lay.at(s, v), load(work + lay.ws_at(s, v), on) / sum[v], on);
    });
  });
}

template <typename T>
void backward(const T* grad, const T* saved, T* out, const Shape& sh, uint64_t seed, double tau, bool hard) {
  const PhiloxKeys key(seed);
  const F inv_tau = splat(static_cast<float>(1.0 / tau));
  for_each_unit(sh, seed, hard, [&](const auto& lay, int64_t base, const float* noise, float* ws) {
    using L = std::decay_t<decltype(lay)>;
    if (!hard) {
      const T* y = saved + base;
      softmax_grad(lay, [&](int64_t s, int v, const auto& on) { return load(y + lay.at(s, v), on); }, y, grad + base,
                   out + base, inv_tau);
      return;
    }
    // Hard: recompute the soft sample from the logits into ws, normalised, then the same gradient.
    const Vecs<L::kVecs> sum = soft_unnormalised(lay, saved + base, key, static_cast<uint64_t>(base), noise, ws, inv_tau);
    each_step(lay, [&](int64_t s, int v, const auto& on) {
      float* w = ws + lay.ws_at(s, v);
      store(w, load(w, on) / sum[v], on);
    });
    softmax_grad(lay, [&](int64_t s, int v, const auto& on) { return load(ws + lay.ws_at(s, v), on); },
                 static_cast<const T*>(nullptr), grad + base, out + base, inv_tau);
  });
}

template <typename T>
void argmax(const T* logits, int64_t* out, const Shape& sh, uint64_t seed) {
  const PhiloxKeys key(seed);
  for_each_unit(sh, seed, true, [&](const auto& lay, int64_t base, const float* noise, float*) {
    using L = std::decay_t<decltype(lay)>;
    const Winner<L::kVecs> w = perturbed_argmax(lay, logits + base, key, static_cast<uint64_t>(base), noise);
    const int64_t first = sh.reduced(base);
    for (int v = 0; v < L::kVecs; ++v) {
      alignas(64) int32_t index[W];
      store_i(index, w.index[v]);
      for (int j = 0; j < lay.results(v); ++j) out[first + W * v + j] = index[j];
    }
  });
}

// Per lane: the max m, log(s) and sum p log p = t / s - log(s), with s = sum exp(l - m) and
// t = sum exp(l - m) (l - m) over the terms with exp(l - m) != 0 (see scalar::logit_stats: 0 log 0 = 0,
// NaN propagates). log p = (l - m) - log(s), as in scalar::logit_stats.
template <int V>
struct LogitStats {
  Vecs<V> max, log_sum, neg_entropy;
};

template <typename T, typename L>
LogitStats<L::kVecs> logit_stats(const L& lay, const T* l) {
  constexpr int V = L::kVecs;
  LogitStats<V> st;
  st.max.fill(neg_inf());
  Masks<V> nan{};
  each_step(lay, [&](int64_t s, int v, const auto& on) {
    lay.template prefetch<kStreamAhead>(l, s, v);
    const F x = load(l + lay.at(s, v), on);
    st.max[v] = max_in(on, st.max[v], x);
    nan[v] |= only(on, is_nan(x));
  });
  st.max = lay.all_max(st.max);
  nan = lay.any(nan);
  for (int v = 0; v < V; ++v) st.max[v] = select(nan[v], nan_f(), st.max[v]);
  std::array<LaneSum, V> lane_sum, lane_t;
  each_step(lay, [&](int64_t s, int v, const auto& on) {
    lay.template prefetch<kStreamAhead>(l, s, v);
    const F d = load(l + lay.at(s, v), on) - st.max[v];
    const F e = exp_f(d);
    lane_sum[v].add(keep(on, e));
    lane_t[v].add(keep(on, select(ne(e, splat(0.0f)), e * d, splat(0.0f))));
  });
  const Vecs<V> sum = lay.all_sum(lane_sum), t = lay.all_sum(lane_t);
  for (int v = 0; v < V; ++v) {
    st.log_sum[v] = log_exact(sum[v]);
    st.neg_entropy[v] = t[v] / sum[v] - st.log_sum[v];
  }
  return st;
}

template <typename T>
void kl_forward(const T* logits, T* out, const Shape& sh) {
  const F log_k = splat(static_cast<float>(std::log(static_cast<double>(sh.K))));
  for_each_unit(sh, 0, false, [&](const auto& lay, int64_t base, const float*, float*) {
    using L = std::decay_t<decltype(lay)>;
    const LogitStats<L::kVecs> st = logit_stats(lay, logits + base);
    for (int v = 0; v < L::kVecs; ++v)
      store(out + sh.reduced(base) + W * v, st.neg_entropy[v] + log_k, Tail(lay.results(v)));
  });
}

template <typename T>
void kl_backward(const T* grad, const T* logits, T* out, const Shape& sh) {
  for_each_unit(sh, 0, false, [&](const auto& lay, int64_t base, const float*, float*) {
    using L = std::decay_t<decltype(lay)>;
    const T* l = logits + base;
    const LogitStats<L::kVecs> st = logit_stats(lay, l);
    Vecs<L::kVecs> g;
    for (int v = 0; v < L::kVecs; ++v) g[v] = load(grad + sh.reduced(base) + W * v, Tail(lay.results(v)));
    g = lay.broadcast(g);
    each_step(lay, [&](int64_t s, int v, const auto& on) {
      lay.template prefetch<kStreamAhead>(l, s, v);
      const F logp = load(l + lay.at(s, v), on) - st.max[v] - st.log_sum[v];
      const F p = exp_f(logp);
      const F x = g[v] * p * (logp - st.neg_entropy[v]);
      store(out + base + lay.at(s, v), select(ne(p, splat(0.0f)), x, splat(0.0f)), on);
    });
  });
}

}  // namespace simd
#endif  // VLM_GUMBEL_LANES

// The vector kernels run float32 / float16 / bfloat16 with K below 2^31 (int32 lane indices).
template <typename T>
constexpr bool simd_dtype() {
  return VLM_GUMBEL_LANES != 0 && !std::is_same_v<T, double>;
}
[[maybe_unused]] bool simd_shape(const Shape& sh) { return sh.K < std::numeric_limits<int32_t>::max(); }

#define VLM_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Calls simd::FN<scalar_t>(ARGS) where the vector kernels apply, scalar::FN<scalar_t>(ARGS) otherwise.
#if VLM_GUMBEL_LANES
#define VLM_RUN(FN, SH, ...)                 \
  do {                                       \
    if constexpr (simd_dtype<scalar_t>()) {  \
      if (simd_shape(SH)) {                  \
        simd::FN<scalar_t>(__VA_ARGS__);     \
        break;                               \
      }                                      \
    }                                        \
    scalar::FN<scalar_t>(__VA_ARGS__);       \
  } while (0)
#else
#define VLM_RUN(FN, SH, ...) scalar::FN<scalar_t>(__VA_ARGS__)
#endif

}  // namespace

void gumbel_noise_fill(uint64_t seed, uint64_t start, int64_t n, float* out) {
#if VLM_GUMBEL_LANES
  constexpr int G = simd::kNoiseGroups, W = simd::W;
  const simd::PhiloxKeys key(seed);
  for (int64_t j = 0; j < n; j += W * G) {
    uint64_t first[G];
    for (int q = 0; q < G; ++q) first[q] = start + static_cast<uint64_t>(j + W * q);
    simd::F g[G];
    simd::gumbel_noise_vecs<G>(key, first, g);
    for (int q = 0; q < G && j + W * q < n; ++q) {
      const int64_t left = n - j - W * q;
      if (left >= W) {
        simd::store(out + j + W * q, g[q], simd::Full{});
      } else {
        simd::store(out + j + W * q, g[q], simd::Tail(left));
      }
    }
  }
#else
  // One Philox call per aligned group of four offsets; the partial groups at either end keep their words.
  for (int64_t j = 0; j < n;) {
    const uint64_t offset = start + static_cast<uint64_t>(j);
    float g[4];
    gumbel_noise4(seed, offset >> 2, g);
    for (uint64_t w = offset & 3; w < 4 && j < n; ++w, ++j) out[j] = g[w];
  }
#endif
}

at::Tensor gumbel_noise_cpu(int64_t seed, int64_t start, int64_t n) {
  TORCH_CHECK(start >= 0, "gumbel_noise_cpu: start must be >= 0, got ", start);
  TORCH_CHECK(n >= 0 && n <= std::numeric_limits<int64_t>::max() - start, "gumbel_noise_cpu: n must be >= 0 with start + n < 2^63, got n = ", n);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  gumbel_noise_fill(static_cast<uint64_t>(seed), static_cast<uint64_t>(start), n, out.mutable_data_ptr<float>());
  return out;
}

at::Tensor gumbel_softmax_forward_cpu(const at::Tensor& logits, int64_t seed, double tau, bool hard, int64_t dim) {
  constexpr const char* fn = "gumbel_softmax_forward_cpu";
  check_tensor(logits, fn, "logits");
  check_dim(logits, dim, fn);
  check_tau(tau, fn);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return out;
  const Shape sh = shape_around(logits, dim);
  const auto s = static_cast<uint64_t>(seed);
  VLM_DISPATCH(logits.scalar_type(), fn, [&] {
    VLM_RUN(forward, sh, logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), sh, s, tau, hard);
  });
  return out;
}

at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& saved, int64_t seed, double tau,
                                       bool hard, int64_t dim) {
  constexpr const char* fn = "gumbel_softmax_backward_cpu";
  check_tensor(grad, fn, "grad");
  check_tensor(saved, fn, hard ? "saved (the logits)" : "saved (the soft sample)");
  check_dim(saved, dim, fn);
  check_tau(tau, fn);
  TORCH_CHECK(grad.sizes() == saved.sizes(), fn, ": grad must have the shape of saved ", saved.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == saved.scalar_type(), fn, ": grad must have the dtype of saved (",
              saved.scalar_type(), "), got ", grad.scalar_type());
  at::Tensor out = at::empty(saved.sizes(), saved.options());
  if (saved.numel() == 0) return out;
  const Shape sh = shape_around(saved, dim);
  const auto s = static_cast<uint64_t>(seed);
  VLM_DISPATCH(saved.scalar_type(), fn, [&] {
    VLM_RUN(backward, sh, grad.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), sh, s, tau, hard);
  });
  return out;
}

at::Tensor gumbel_argmax_cpu(const at::Tensor& logits, int64_t seed, int64_t dim) {
  constexpr const char* fn = "gumbel_argmax_cpu";
  check_tensor(logits, fn, "logits");
  check_dim(logits, dim, fn);
  at::Tensor out = at::empty(sizes_without(logits, dim), logits.options().dtype(at::kLong));
  if (logits.numel() == 0) return out;
  const Shape sh = shape_around(logits, dim);
  const auto s = static_cast<uint64_t>(seed);
  VLM_DISPATCH(logits.scalar_type(), fn, [&] {
    VLM_RUN(argmax, sh, logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<int64_t>(), sh, s);
  });
  return out;
}

at::Tensor categorical_kl_uniform_forward_cpu(const at::Tensor& logits, int64_t dim) {
  constexpr const char* fn = "categorical_kl_uniform_forward_cpu";
  check_tensor(logits, fn, "logits");
  check_dim(logits, dim, fn);
  at::Tensor out = at::empty(sizes_without(logits, dim), logits.options());
  if (logits.numel() == 0) return out;
  const Shape sh = shape_around(logits, dim);
  VLM_DISPATCH(logits.scalar_type(), fn, [&] {
    VLM_RUN(kl_forward, sh, logits.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), sh);
  });
  return out;
}

at::Tensor categorical_kl_uniform_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t dim) {
  constexpr const char* fn = "categorical_kl_uniform_backward_cpu";
  check_tensor(grad, fn, "grad");
  check_tensor(logits, fn, "logits");
  check_dim(logits, dim, fn);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(sizes_without(logits, dim)), fn, ": grad must have the shape of logits ",
              logits.sizes(), " without dim ", dim, ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), fn, ": grad must have the dtype of logits (",
              logits.scalar_type(), "), got ", grad.scalar_type());
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  if (logits.numel() == 0) return out;
  const Shape sh = shape_around(logits, dim);
  VLM_DISPATCH(logits.scalar_type(), fn, [&] {
    VLM_RUN(kl_backward, sh, grad.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), sh);
  });
  return out;
}


}  // namespace VLM_CPU_LEVEL
}  // namespace vlm

#undef VLM_RUN
#undef VLM_DISPATCH
#undef VLM_GUMBEL_LANES

#if VLM_CPU_BASE_BUILD  // the ops are registered once, with the entry points of the level chosen at load
#define VLM_CPU_HEADER "cpu/gumbel.h"
#include "cpu/other_levels.h"

// The level-free entry points (gumbel.h): the chosen level's, for C++ callers.
namespace vlm {

at::Tensor gumbel_softmax_forward_cpu(const at::Tensor& logits, int64_t seed, double tau, bool hard, int64_t dim) {
  static const auto fn = VLM_CPU_PICK(gumbel_softmax_forward_cpu);
  return fn(logits, seed, tau, hard, dim);
}
at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& saved, int64_t seed, double tau,
                                       bool hard, int64_t dim) {
  static const auto fn = VLM_CPU_PICK(gumbel_softmax_backward_cpu);
  return fn(grad, saved, seed, tau, hard, dim);
}
at::Tensor gumbel_argmax_cpu(const at::Tensor& logits, int64_t seed, int64_t dim) {
  static const auto fn = VLM_CPU_PICK(gumbel_argmax_cpu);
  return fn(logits, seed, dim);
}
at::Tensor categorical_kl_uniform_forward_cpu(const at::Tensor& logits, int64_t dim) {
  static const auto fn = VLM_CPU_PICK(categorical_kl_uniform_forward_cpu);
  return fn(logits, dim);
}
at::Tensor categorical_kl_uniform_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t dim) {
  static const auto fn = VLM_CPU_PICK(categorical_kl_uniform_backward_cpu);
  return fn(grad, logits, dim);
}
void gumbel_noise_fill(uint64_t seed, uint64_t start, int64_t n, float* out) {
  static const auto fn = VLM_CPU_PICK(gumbel_noise_fill);
  fn(seed, start, n, out);
}
at::Tensor gumbel_noise_cpu(int64_t seed, int64_t start, int64_t n) {
  static const auto fn = VLM_CPU_PICK(gumbel_noise_cpu);
  return fn(seed, start, n);
}

}  // namespace vlm

// Schemas here, kernels for the CPU dispatch key (other files may add kernels for other keys).
TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def("gumbel_softmax_forward_cpu(Tensor logits, int seed, float tau, bool hard, int dim) -> Tensor");
  m.def("gumbel_softmax_backward_cpu(Tensor grad, Tensor saved, int seed, float tau, bool hard, int dim) -> Tensor");
  m.def("gumbel_argmax_cpu(Tensor logits, int seed, int dim) -> Tensor");
  m.def("categorical_kl_uniform_forward_cpu(Tensor logits, int dim) -> Tensor");
  m.def("categorical_kl_uniform_backward_cpu(Tensor grad, Tensor logits, int dim) -> Tensor");
  m.def("gumbel_noise_cpu(int seed, int start, int n) -> Tensor", VLM_CPU_PICK(gumbel_noise_cpu));
}

TORCH_LIBRARY_IMPL(vlm_kernels_C, CPU, m) {
  m.impl("gumbel_softmax_forward_cpu", VLM_CPU_PICK(gumbel_softmax_forward_cpu));
  m.impl("gumbel_softmax_backward_cpu", VLM_CPU_PICK(gumbel_softmax_backward_cpu));
  m.impl("gumbel_argmax_cpu", VLM_CPU_PICK(gumbel_argmax_cpu));
  m.impl("categorical_kl_uniform_forward_cpu", VLM_CPU_PICK(categorical_kl_uniform_forward_cpu));
  m.impl("categorical_kl_uniform_backward_cpu", VLM_CPU_PICK(categorical_kl_uniform_backward_cpu));
}
#endif  // VLM_CPU_BASE_BUILD
#endif  // VLM_CPU_INCLUDES_ONLY
