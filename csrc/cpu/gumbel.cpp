// CPU kernels of the Gumbel-softmax op family: Gumbel-softmax forward/backward, Gumbel-argmax and
// KL(softmax || uniform) forward/backward. The math is vlm_kernels/reference/gumbel.py's; the noise is
// csrc/common/philox.h's, bit for bit.
//
// Two implementations share the op entry points at the bottom of the file:
//  * simd:: (AVX-512F/BW/VL, float32 / float16 / bfloat16, computed in float32). A tensor viewed as
//    (outer, K, inner) is cut into units that one thread processes at a time (at::parallel_for):
//      - Row  (inner == 1): the K contiguous elements of a row, 16 per step, reduced across lanes at the end;
//      - Tile (inner > 1):  32 (or, for the last columns and for K > 65536, 16) adjacent columns of one
//        outer slice, one step per k: the lanes are the columns, so nothing is transposed and no
//        horizontal reduction is needed.
//    The noise is generated in registers, 4 vectors at a time (interleaved: one chain alone is
//    latency-bound), bit-identical to vlm::gumbel_noise: one Philox call gives the 4 words of an aligned
//    group of 4 offsets, 8 calls per vector op, and the log is built from fmas. The soft sample writes z = logits + noise into
//    a float workspace (the output row itself for a float32 row, else a per-thread buffer of K x 32
//    floats at most), then exponentiates and normalises it, so the noise is generated once and the unit
//    stays in cache. Hard samples and argmax need one pass; the backward of a hard sample regenerates
//    the soft sample. Sums over K are kept in float64 lanes.
//  * scalar:: (any dtype, float64 in float64): one column at a time, plain loops. It runs float64 always
//    and everything on CPUs without AVX-512.
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
#include <limits>
#include <type_traits>
#include <vector>

#include "common/philox.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define VLM_GUMBEL_AVX512 1
#else
#define VLM_GUMBEL_AVX512 0
#endif

namespace vlm {
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
// simd: AVX-512, 16 float32 lanes.
// ====================================================================================================
#if VLM_GUMBEL_AVX512
namespace simd {

constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();

inline __m512i iota16() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline __m512 splat(float v) { return _mm512_set1_ps(v); }
inline __m512 nan16() { return splat(std::numeric_limits<float>::quiet_NaN()); }
inline __m512 neg_inf16() { return splat(-std::numeric_limits<float>::infinity()); }

// ---- the noise: vlm::gumbel_noise, 16 lanes at a time, bit for bit ----------------------------------
// Every fp32 step is exact or a correctly rounded fma (vfmadd/vfnmsub round once, like std::fmaf), and no
// product meets an add outside an fma, so no compiler contraction can change a bit.

// Philox4x32-10 round keys of one seed, broadcast.
struct PhiloxKeys {
  __m512i k0[10], k1[10];
  explicit PhiloxKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r, a += kPhiloxKeyA, b += kPhiloxKeyB) {
      k0[r] = _mm512_set1_epi32(static_cast<int32_t>(a));
      k1[r] = _mm512_set1_epi32(static_cast<int32_t>(b));
    }
  }
};

inline __m512i xor3(__m512i a, __m512i b, __m512i c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }

#if defined(__AVX512IFMA__)
// vlm::philox4 for the 8 counters in the 64-bit lanes of `ctr` (c0 = low word, c1 = high word): w[j] gets
// output word j of each call in the low half of its lane (the upper half is junk). High words of the
// products come from IFMA: vpmadd52huq(x, M << 20) = (x * M) >> 32 when x < 2^32, so c0 and c2 (the
// multiplicands) are kept clean by zeroing the upper halves in the XOR itself; low words come from
// _mm512_mul_epu32, whose upper-half junk only ever meets that masked XOR.
inline void philox4x8(__m512i ctr, const PhiloxKeys& key, __m512i w[4]) {
  constexpr __mmask16 kLow = 0x5555;
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  const __m512i ma_hi = _mm512_set1_epi64(uint64_t(kPhiloxRoundA) << 20), mb_hi = _mm512_set1_epi64(uint64_t(kPhiloxRoundB) << 20);
  const __m512i zero = _mm512_setzero_si512();
  __m512i c0 = _mm512_maskz_mov_epi32(kLow, ctr);
  __m512i c2 = _mm512_maskz_xor_epi32(kLow, _mm512_madd52hi_epu64(zero, c0, ma_hi), key.k1[0]);
  __m512i c3 = _mm512_mul_epu32(c0, ma);
  c0 = _mm512_maskz_xor_epi32(kLow, _mm512_srli_epi64(ctr, 32), key.k0[0]);
  __m512i c1 = zero;
#pragma GCC unroll 9
  for (int r = 1; r < 10; ++r) {
    const __m512i hi_b = _mm512_madd52hi_epu64(zero, c2, mb_hi), lo_b = _mm512_mul_epu32(c2, mb);
    const __m512i hi_a = _mm512_madd52hi_epu64(zero, c0, ma_hi), lo_a = _mm512_mul_epu32(c0, ma);
    c0 = _mm512_maskz_ternarylogic_epi32(kLow, hi_b, c1, key.k0[r], 0x96);
    c2 = _mm512_maskz_ternarylogic_epi32(kLow, hi_a, c3, key.k1[r], 0x96);
    c1 = lo_b;
    c3 = lo_a;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}
#else
// vlm::philox4 for the 8 counters in the 64-bit lanes of `ctr` (c0 = low word, c1 = high word): w[j] gets
// output word j of each call in the low half of its lane. Every 32-bit state word lives in the low half
// of a 64-bit lane and the high half is junk: _mm512_mul_epu32 reads only the low halves, so a
// 32 x 32 -> 64 multiply is one instruction and its high word one shift, with no packing. Round 0 has
// c2 = c3 = 0.
inline void philox4x8(__m512i ctr, const PhiloxKeys& key, __m512i w[4]) {
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i mb = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i pa = _mm512_mul_epu32(ctr, ma);
  __m512i c0 = _mm512_xor_si512(_mm512_srli_epi64(ctr, 32), key.k0[0]);
  __m512i c2 = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), key.k1[0]);
  __m512i c1 = _mm512_setzero_si512();
  __m512i c3 = pa;
#pragma GCC unroll 9
  for (int r = 1; r < 10; ++r) {
    const __m512i pb = _mm512_mul_epu32(c2, mb);
    pa = _mm512_mul_epu32(c0, ma);
    c0 = xor3(_mm512_srli_epi64(pb, 32), c1, key.k0[r]);
    c2 = xor3(_mm512_srli_epi64(pa, 32), c3, key.k1[r]);
    c1 = pb;
    c3 = pa;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}
#endif  // __AVX512IFMA__

// The words of the 8 calls at counters c .. c + 3 (lanes 0-3 of `ctr`) and d .. d + 3 (lanes 4-7), laid
// out as elements: lo = the 16 words of elements 4c .. 4c + 15 (word j of call c + i at 4i + j),
// hi = those of elements 4d .. 4d + 15.
inline void philox_elements(__m512i ctr, const PhiloxKeys& key, __m512i& lo, __m512i& hi) {
  __m512i w[4];
  philox4x8(ctr, key, w);
  const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, w[0], _mm512_slli_epi64(w[1], 32));  // (w0, w1) per call
  const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, w[2], _mm512_slli_epi64(w[3], 32));  // (w2, w3) per call
  lo = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), w23);
  hi = _mm512_permutex2var_epi64(w01, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), w23);
}

inline __m512i counters4x2(uint64_t c, uint64_t d) {
  return _mm512_add_epi64(_mm512_setr_epi64(static_cast<int64_t>(c), static_cast<int64_t>(c), static_cast<int64_t>(c),
                                            static_cast<int64_t>(c), static_cast<int64_t>(d), static_cast<int64_t>(d),
                                            static_cast<int64_t>(d), static_cast<int64_t>(d)),
                          _mm512_setr_epi64(0, 1, 2, 3, 0, 1, 2, 3));
}

// The Philox words of the N groups of 16 offsets start[q] .. start[q] + 15. Groups that start on a
// multiple of 4 take 4 calls each (two groups per philox4x8); others take the 8 calls at counters
// start / 4 .. start / 4 + 7 and keep the 16-word window that begins at word start % 4.
template <int N>
inline void philox_words16xN(const PhiloxKeys& key, const uint64_t* start, __m512i* bits) {
  bool aligned = true;
  for (int q = 0; q < N; ++q) aligned &= (start[q] & 3) == 0;
  if (aligned) {
#pragma GCC unroll 4
    for (int q = 0; q + 1 < N; q += 2) philox_elements(counters4x2(start[q] >> 2, start[q + 1] >> 2), key, bits[q], bits[q + 1]);
    if (N % 2) {
      __m512i unused;
      philox_elements(counters4x2(start[N - 1] >> 2, start[N - 1] >> 2), key, bits[N - 1], unused);
    }
    return;
  }
  for (int q = 0; q < N; ++q) {
    const uint64_t c = start[q] >> 2;
    __m512i lo, hi;
    philox_elements(counters4x2(c, c + 4), key, lo, hi);
    const __m512i window = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(start[q] & 3)),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    bits[q] = _mm512_permutex2var_epi32(lo, window, hi);
  }
}

// -vlm::vlm_logf on N vectors, lane by lane, same operations. The N polynomial chains are interleaved
// step by step: one chain alone is latency-bound (7 dependent fmas).
template <int N>
inline void neg_log16xN(__m512* x) {
  __m512i e[N];
  __m512 f[N], p[N];
#pragma GCC unroll 4
  for (int q = 0; q < N; ++q) {
    const __m512i b = _mm512_castps_si512(x[q]);
    e[q] = _mm512_srai_epi32(_mm512_sub_epi32(b, _mm512_set1_epi32(0x3f3504f3)), 23);
    f[q] = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_sub_epi32(b, _mm512_slli_epi32(e[q], 23))), splat(1.0f));  // exact
    p[q] = _mm512_fmadd_ps(f[q], splat(kLogP0), splat(kLogP1));
  }
  for (const float c : {kLogP2, kLogP3, kLogP4, kLogP5, kLogP6, -0.5f}) {
#pragma GCC unroll 4
    for (int q = 0; q < N; ++q) p[q] = _mm512_fmadd_ps(p[q], f[q], splat(c));
  }
#pragma GCC unroll 4
  for (int q = 0; q < N; ++q) {
    const __m512 r = _mm512_fmadd_ps(p[q], _mm512_mul_ps(f[q], f[q]), f[q]);
    x[q] = _mm512_fnmsub_ps(_mm512_cvtepi32_ps(e[q]), splat(kLn2), r);  // -(e ln2 + r), one rounding
  }
}

// vlm::gumbel_noise for the N groups of 16 offsets start[q] .. start[q] + 15, into out[q].
template <int N>
inline void gumbel16xN(const PhiloxKeys& key, const uint64_t* start, __m512* out) {
  __m512i bits[N];
  philox_words16xN<N>(key, start, bits);
#pragma GCC unroll 4
  for (int q = 0; q < N; ++q) {
    // uniform_from_bits: r < 0 ? -r - 1 : r is r ^ (r >> 31), then the scale.
    const __m512i r = _mm512_xor_si512(bits[q], _mm512_srai_epi32(bits[q], 31));
    out[q] = _mm512_mul_ps(_mm512_cvtepi32_ps(r), splat(kUniformScale));
  }
  neg_log16xN<N>(out);
  neg_log16xN<N>(out);
}

constexpr int kRn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
constexpr int kNoiseGroups = 4;  // groups of 16 offsets whose noise is computed together

// exp(x) to ~1 ulp: 2^n * e^r with n = round(x / ln 2) (Cephes' expf polynomial). scalef gives the
// gradual underflow to 0; NaN passes the clamps (max/min return their second operand when it is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(splat(88.8f), _mm512_max_ps(splat(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, splat(1.44269504088896341f)), kRn);
  __m512 r = _mm512_fnmadd_ps(n, splat(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, splat(-2.12194440e-4f), r);
  __m512 p = splat(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, splat(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, splat(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, splat(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, splat(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, splat(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), splat(1.0f));
  return _mm512_scalef_ps(y, n);
}

// Natural log lane by lane with std::log (once per row or tile, not per element).
inline __m512 log16_exact(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  for (float& x : lanes) x = std::log(x);
  return _mm512_load_ps(lanes);
}

// ---- loads and stores with dtype conversion; lanes outside the mask load as 0 and are not written ----
template <typename T>
__m512 load(const T* p, __mmask16 m);
template <>
inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <>
inline __m512 load(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
template <>
inline __m512 load(const c10::BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename T>
void store(T* p, __m512 v, __mmask16 m);
template <>
inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
template <>
inline void store(c10::Half* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, kRn)); }
template <>
inline void store(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // c10::BFloat16's rounding: round to nearest even, NaN -> 0x7FC0.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(rounded));
}

// A per-lane sum kept in float64: a lane of a tile adds up all K terms of its column, and a float sum
// that long would lose digits the reference (a tree-like torch reduction) keeps.
struct LaneSum {
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  void add(__m512 v, __mmask16 m) {
    v = _mm512_maskz_mov_ps(m, v);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  __m512 lanes() const {
    const __m256 l = _mm512_cvtpd_ps(lo), h = _mm512_cvtpd_ps(hi);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(l)), _mm256_castps_pd(h), 1));
  }
  // All lanes summed (in float64), in every lane.
  __m512 total() const { return splat(static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(lo, hi)))); }
};

// Fixed-size arrays of vectors, one per vector of a step (a vector type as a template argument, as in
// std::array<__m512, V>, draws -Wignored-attributes).
template <int V>
struct Vecs {
  __m512 v[V];
  __m512& operator[](int i) { return v[i]; }
  const __m512& operator[](int i) const { return v[i]; }
  void fill(__m512 x) {
    for (__m512& e : v) e = x;
  }
};
template <int V>
struct Indices {
  __m512i v[V];
  __m512i& operator[](int i) { return v[i]; }
  const __m512i& operator[](int i) const { return v[i]; }
  void fill(__m512i x) {
    for (__m512i& e : v) e = x;
  }
};
template <int V>
using Masks = std::array<__mmask16, V>;

// The winner of an argmax in every lane (a row broadcasts its single winner), and the lanes whose soft
// sample is NaN: a NaN, or a non-finite maximum (+inf, or only -inf), as eager's softmax gives.
template <int V>
struct Winner {
  Indices<V> index;
  Masks<V> nan;
};

inline __mmask16 infinite_lanes(__m512 x) {
  return _mm512_cmp_ps_mask(x, splat(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ) |
         _mm512_cmp_ps_mask(x, splat(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
}

// Software prefetch distances in steps: a step of the noise passes takes ~100 cycles or more, one of the
// memory-bound passes a few, and a DRAM access some hundreds.
constexpr int kComputeAhead = 8;
constexpr int kStreamAhead = 48;

// A unit of work is walked in steps of kVecs vectors of 16 lanes; vector v of step s is at element
// offset at(s, v) from the unit's base and at ws_at(s, v) in the float workspace.
//
// A row: K contiguous elements, one vector per step (the last one masked), statistics reduced across
// the lanes at the end.
struct Row {
  static constexpr int kVecs = 1;
  int64_t K;
  int64_t steps() const { return (K + 15) / 16; }
  int64_t at(int64_t s, int) const { return s * 16; }
  int64_t ws_at(int64_t s, int) const { return s * 16; }
  __mmask16 mask(int64_t s, int) const {
    const int64_t left = K - s * 16;
    return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
  }
  __mmask16 result_mask(int) const { return 1; }  // one reduced result, in lane 0
  __m512i index(int64_t s, int) const { return _mm512_add_epi32(iota16(), _mm512_set1_epi32(static_cast<int32_t>(s * 16))); }
  Vecs<1> all_max(const Vecs<1>& v) const { return {splat(_mm512_reduce_max_ps(v[0]))}; }
  Vecs<1> all_sum(const std::array<LaneSum, 1>& v) const { return {v[0].total()}; }
  Masks<1> any(const Masks<1>& m) const { return {m[0] ? __mmask16(0xFFFF) : __mmask16(0)}; }
  Vecs<1> broadcast(const Vecs<1>& v) const { return {_mm512_broadcastss_ps(_mm512_castps512_ps128(v[0]))}; }
  template <int kAhead, typename T>
  void prefetch(const T*, int64_t, int) const {}  // sequential: the hardware prefetcher does it
  Winner<1> finish(const Vecs<1>& best, const Indices<1>& index, const Indices<1>& nan_index) const {
    const __m512i none = _mm512_set1_epi32(kNoIndex);
    if (_mm512_cmpneq_epi32_mask(nan_index[0], none))
      return {{_mm512_set1_epi32(_mm512_reduce_min_epi32(nan_index[0]))}, {__mmask16(0xFFFF)}};
    const float m = _mm512_reduce_max_ps(best[0]);
    // all -inf: index 0; the soft row (and so the hard one) is NaN
    if (m == -std::numeric_limits<float>::infinity()) return {{_mm512_setzero_si512()}, {__mmask16(0xFFFF)}};
    const __m512i candidates = _mm512_mask_mov_epi32(none, _mm512_cmp_ps_mask(best[0], splat(m), _CMP_EQ_OQ), index[0]);
    const __mmask16 nan_row = std::isinf(m) ? __mmask16(0xFFFF) : __mmask16(0);  // a +inf maximum: NaN soft row
    return {{_mm512_set1_epi32(_mm512_reduce_min_epi32(candidates))}, {nan_row}};
  }
};

// A tile: 16 V adjacent columns of one outer slice (lanes = columns), one step per k, so nothing is
// transposed and no horizontal reduction is needed. Consecutive steps are `inner` elements apart, often a
// page: every step costs a TLB miss per tensor, which 32 columns per step (V = 2) share 2 ways.
template <int V>
struct Tile {
  static constexpr int kVecs = V;
  int64_t K, inner;
  __mmask16 last;  // the columns of the last vector; the others are full
  int64_t steps() const { return K; }
  int64_t at(int64_t s, int v) const { return s * inner + 16 * v; }
  int64_t ws_at(int64_t s, int v) const { return (s * V + v) * 16; }
  __mmask16 mask(int64_t, int v) const { return v == V - 1 ? last : __mmask16(0xFFFF); }
  __mmask16 result_mask(int v) const { return mask(0, v); }
  __m512i index(int64_t s, int) const { return _mm512_set1_epi32(static_cast<int32_t>(s)); }
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
    const __m512i none = _mm512_set1_epi32(kNoIndex);
    Winner<V> w;
    for (int v = 0; v < V; ++v) {
      index[v] = _mm512_mask_mov_epi32(index[v], _mm512_cmpeq_epi32_mask(index[v], none), _mm512_setzero_si512());
      w.nan[v] = _mm512_cmpneq_epi32_mask(nan_index[v], none);
      w.index[v] = _mm512_mask_mov_epi32(index[v], w.nan[v], nan_index[v]);
      w.nan[v] |= infinite_lanes(best[v]);  // +inf, or only -inf (best stays -inf)
    }
    return w;
  }
};

// Calls f(s, v, mask) for every vector of every step, in order.
template <typename L, typename F>
inline void each_step(const L& lay, F&& f) {
  const int64_t n = lay.steps();
  for (int64_t s = 0; s < n; ++s) {
#pragma GCC unroll 4
    for (int v = 0; v < L::kVecs; ++v) f(s, v, lay.mask(s, v));
  }
}

// Calls f(s, v, mask, noise) for every vector of every step, in order. The noise is generated
// kNoiseGroups vectors at a time, or read from `noise` (filled beforehand, indexed like the tensor)
// when the unit is too narrow to fill 16 lanes.
template <bool kPrefilled, typename L, typename F>
inline void each_noisy_step(const L& lay, const PhiloxKeys& key, uint64_t base, const float* noise, F&& f) {
  constexpr int V = L::kVecs;
  if constexpr (kPrefilled) {
    each_step(lay, [&](int64_t s, int v, __mmask16 m) { f(s, v, m, _mm512_maskz_loadu_ps(m, noise + lay.at(s, v))); });
  } else {
    const int64_t n = lay.steps() * V;  // vectors, in order
    for (int64_t j0 = 0; j0 < n; j0 += kNoiseGroups) {
      uint64_t start[kNoiseGroups];
      for (int q = 0; q < kNoiseGroups; ++q)  // past the end: computed, unused
        start[q] = base + static_cast<uint64_t>(lay.at((j0 + q) / V, static_cast<int>((j0 + q) % V)));
      __m512 g[kNoiseGroups];
      gumbel16xN<kNoiseGroups>(key, start, g);
      const auto consume = [&](int q) {
        const int64_t s = (j0 + q) / V;
        const int v = static_cast<int>((j0 + q) % V);
        f(s, v, lay.mask(s, v), g[q]);
      };
      if (n - j0 >= kNoiseGroups) {  // all but the last group: unrolled, so g and f's state stay in registers
#pragma GCC unroll 4
        for (int q = 0; q < kNoiseGroups; ++q) consume(q);
      } else {
        for (int q = 0; q < n - j0; ++q) consume(q);
      }
    }
  }
}

// Pass 1 of the soft sample: ws = z = logits + noise; returns max z (NaN where the unit holds a NaN).
template <bool kPrefilled, typename T, typename L>
Vecs<L::kVecs> perturb_and_max(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base, const float* noise,
                               float* ws) {
  Vecs<L::kVecs> mx;
  mx.fill(neg_inf16());
  Masks<L::kVecs> nan{};
  each_noisy_step<kPrefilled>(lay, key, base, noise, [&](int64_t s, int v, __mmask16 m, __m512 g) {
    lay.template prefetch<kComputeAhead>(l, s, v);
    const __m512 z = _mm512_add_ps(load(l + lay.at(s, v), m), g);
    _mm512_mask_storeu_ps(ws + lay.ws_at(s, v), m, z);
    mx[v] = _mm512_mask_max_ps(mx[v], m, mx[v], z);
    nan[v] |= _mm512_mask_cmp_ps_mask(m, z, z, _CMP_UNORD_Q);
  });
  mx = lay.all_max(mx);
  nan = lay.any(nan);
  for (int v = 0; v < L::kVecs; ++v) mx[v] = _mm512_mask_mov_ps(mx[v], nan[v], nan16());
  return mx;
}

// Pass 2: ws = exp((z - max) * inv_tau); returns the sum.
template <typename L>
Vecs<L::kVecs> exp_and_sum(const L& lay, float* ws, const Vecs<L::kVecs>& mx, __m512 inv_tau) {
  std::array<LaneSum, L::kVecs> sum;
  each_step(lay, [&](int64_t s, int v, __mmask16 m) {
    float* w = ws + lay.ws_at(s, v);
    const __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w), mx[v]), inv_tau));
    _mm512_mask_storeu_ps(w, m, e);
    sum[v].add(e, m);
  });
  return lay.all_sum(sum);
}

// Passes 1 and 2 of the soft sample of a unit: leaves the unnormalised exp in ws and returns its sum.
template <typename T, typename L>
Vecs<L::kVecs> soft_unnormalised(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base, const float* noise,
                                 float* ws, __m512 inv_tau) {
  const Vecs<L::kVecs> mx = noise ? perturb_and_max<true>(lay, l, key, base, noise, ws)
                                  : perturb_and_max<false>(lay, l, key, base, noise, ws);
  return exp_and_sum(lay, ws, mx, inv_tau);
}

// One pass: argmax of logits + noise per lane (first index on ties, first NaN wins).
template <bool kPrefilled, typename T, typename L>
Winner<L::kVecs> perturbed_argmax_pass(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base,
                                       const float* noise) {
  constexpr int V = L::kVecs;
  const __m512i none = _mm512_set1_epi32(kNoIndex);
  Vecs<V> best;
  best.fill(neg_inf16());
  Indices<V> index, nan_index;
  index.fill(none);
  nan_index.fill(none);
  each_noisy_step<kPrefilled>(lay, key, base, noise, [&](int64_t s, int v, __mmask16 m, __m512 g) {
    lay.template prefetch<kComputeAhead>(l, s, v);
    const __m512 z = _mm512_add_ps(load(l + lay.at(s, v), m), g);
    const __mmask16 greater = _mm512_mask_cmp_ps_mask(m, z, best[v], _CMP_GT_OQ);  // strict: the first maximum stays
    best[v] = _mm512_mask_mov_ps(best[v], greater, z);
    index[v] = _mm512_mask_mov_epi32(index[v], greater, lay.index(s, v));
    const __mmask16 first_nan = _mm512_mask_cmp_ps_mask(m, z, z, _CMP_UNORD_Q) & _mm512_cmpeq_epi32_mask(nan_index[v], none);
    nan_index[v] = _mm512_mask_mov_epi32(nan_index[v], first_nan, lay.index(s, v));
  });
  return lay.finish(best, index, nan_index);
}

template <typename T, typename L>
Winner<L::kVecs> perturbed_argmax(const L& lay, const T* l, const PhiloxKeys& key, uint64_t base, const float* noise) {
  return noise ? perturbed_argmax_pass<true>(lay, l, key, base, noise) : perturbed_argmax_pass<false>(lay, l, key, base, noise);
}

// The straight-through gradient y * (dy - sum(dy * y)) * inv_tau; y_at(s, v, m) loads y, from `y_tensor`
// (laid out like dy) or, when that is null, from the workspace.
template <typename T, typename L, typename Y>
void softmax_grad(const L& lay, Y&& y_at, const T* y_tensor, const T* dy, T* out, __m512 inv_tau) {
  const auto prefetch_inputs = [&](int64_t s, int v) {
    lay.template prefetch<kStreamAhead>(dy, s, v);
    if (y_tensor) lay.template prefetch<kStreamAhead>(y_tensor, s, v);
  };
  std::array<LaneSum, L::kVecs> lane_dot;
  each_step(lay, [&](int64_t s, int v, __mmask16 m) {
    prefetch_inputs(s, v);
    lane_dot[v].add(_mm512_mul_ps(load(dy + lay.at(s, v), m), y_at(s, v, m)), m);
  });
  const Vecs<L::kVecs> dot = lay.all_sum(lane_dot);
  each_step(lay, [&](int64_t s, int v, __mmask16 m) {
    prefetch_inputs(s, v);
    const __m512 g = load(dy + lay.at(s, v), m);
    store(out + lay.at(s, v), _mm512_mul_ps(_mm512_mul_ps(y_at(s, v, m), _mm512_sub_ps(g, dot[v])), inv_tau), m);
  });
}

// ---- drivers: cut the tensor into rows or tiles and run `unit` on each, in parallel ----------------
// unit(layout, base offset, prefilled noise of the unit or nullptr, float workspace of K x 32 at most).
// With `noisy`, units too narrow for 16 lanes (short rows, fewer than 16 columns) get their noise
// generated 16 contiguous offsets at a time into a buffer first.
constexpr int kWideVecs = 2;  // 32 columns: the K x 32 float workspace (1 MiB at K = 8192) stays near L2; 64 was 3-8% slower
constexpr int64_t kWideMaxK = 65536;  // wide tiles only while their workspace stays within 8 MiB

template <typename F>
void for_each_row(const Shape& sh, uint64_t seed, bool noisy, F&& unit) {
  const bool prefill = noisy && sh.K < 128;
  const int64_t block = prefill ? std::max<int64_t>(1, 4096 / sh.K) : 1;  // rows whose noise is filled at once
  at::parallel_for(0, sh.outer, grain_for(sh.K), [&](int64_t r0, int64_t r1) {
    Scratch ws(sh.K), noise(prefill ? block * sh.K : 0);
    const Row row{sh.K};
    for (int64_t r = r0; r < r1; r += block) {
      const int64_t rows = std::min(block, r1 - r);
      if (prefill) gumbel_noise_fill(seed, static_cast<uint64_t>(r * sh.K), rows * sh.K, noise.get());
      for (int64_t j = 0; j < rows; ++j) unit(row, (r + j) * sh.K, prefill ? noise.get() + j * sh.K : nullptr, ws.get());
    }
  });
}

// Each outer slice: inner / 32 wide tiles of 32 columns, then tiles of 16 (the last one partial).
template <typename F>
void for_each_tile(const Shape& sh, uint64_t seed, bool noisy, F&& unit) {
  const int64_t wide = sh.K <= kWideMaxK ? sh.inner / (16 * kWideVecs) : 0;
  const int64_t narrow = (sh.inner - wide * 16 * kWideVecs + 15) / 16;
  const int64_t per_outer = wide + narrow;
  const bool prefill = noisy && sh.inner < 16;  // then the only tile is a whole contiguous outer slice
  at::parallel_for(0, sh.outer * per_outer, grain_for(sh.K * 16), [&](int64_t u0, int64_t u1) {
    Scratch ws(sh.K * 16 * (wide ? kWideVecs : 1)), noise(prefill ? sh.K * sh.inner : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t o = u / per_outer, t = u % per_outer;
      if (t < wide) {
        unit(Tile<kWideVecs>{sh.K, sh.inner, 0xFFFF}, o * sh.K * sh.inner + t * 16 * kWideVecs, nullptr, ws.get());
        continue;
      }
      const int64_t i0 = wide * 16 * kWideVecs + (t - wide) * 16, width = std::min<int64_t>(16, sh.inner - i0);
      const int64_t base = o * sh.K * sh.inner + i0;
      if (prefill) gumbel_noise_fill(seed, static_cast<uint64_t>(base), sh.K * sh.inner, noise.get());
      unit(Tile<1>{sh.K, sh.inner, static_cast<__mmask16>((1u << width) - 1u)}, base, prefill ? noise.get() : nullptr,
           ws.get());
    }
  });
}

template <typename F>
void for_each_unit(const Shape& sh, uint64_t seed, bool noisy, F&& unit) {
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
  const __m512 inv_tau = splat(static_cast<float>(1.0 / tau));
  for_each_unit(sh, seed, true, [&](const auto& lay, int64_t base, const float* noise, float* ws) {
    using L = std::decay_t<decltype(lay)>;
    const T* l = logits + base;
    T* o = out + base;
    if (hard) {
      const Winner<L::kVecs> w = perturbed_argmax(lay, l, key, static_cast<uint64_t>(base), noise);
      each_step(lay, [&](int64_t s, int v, __mmask16 m) {
        const __m512 hot = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(lay.index(s, v), w.index[v]), splat(1.0f));
        store(o + lay.at(s, v), _mm512_mask_mov_ps(hot, w.nan[v], nan16()), m);
      });
      return;
    }
    // A float32 row is its own workspace: z, then exp, then the sample, in place.
    float* work = ws;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<L, Row>) work = o;
    const Vecs<L::kVecs> sum = soft_unnormalised(lay, l, key, static_cast<uint64_t>(base), noise, work, inv_tau);
    each_step(lay, [&](int64_t s, int v, __mmask16 m) {
      store(o + lay.at(s, v), _mm512_div_ps(_mm512_maskz_loadu_ps(m, work + lay.ws_at(s, v)), sum[v]), m);
    });
  });
}

template <typename T>
void backward(const T* grad, const T* saved, T* out, const Shape& sh, uint64_t seed, double tau, bool hard) {
  const PhiloxKeys key(seed);
  const __m512 inv_tau = splat(static_cast<float>(1.0 / tau));
  for_each_unit(sh, seed, hard, [&](const auto& lay, int64_t base, const float* noise, float* ws) {
    using L = std::decay_t<decltype(lay)>;
    if (!hard) {
      const T* y = saved + base;
      softmax_grad(lay, [&](int64_t s, int v, __mmask16 m) { return load(y + lay.at(s, v), m); }, y, grad + base,
                   out + base, inv_tau);
      return;
    }
    // Hard: recompute the soft sample from the logits into ws, normalised, then the same gradient.
    const Vecs<L::kVecs> sum = soft_unnormalised(lay, saved + base, key, static_cast<uint64_t>(base), noise, ws, inv_tau);
    each_step(lay, [&](int64_t s, int v, __mmask16 m) {
      float* w = ws + lay.ws_at(s, v);
      _mm512_mask_storeu_ps(w, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, w), sum[v]));
    });
    softmax_grad(lay, [&](int64_t s, int v, __mmask16 m) { return _mm512_maskz_loadu_ps(m, ws + lay.ws_at(s, v)); },
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
      alignas(64) int32_t index[16];
      _mm512_store_si512(index, w.index[v]);
      for (int j = 0; j < 16; ++j)
        if (lay.result_mask(v) & (1u << j)) out[first + 16 * v + j] = index[j];
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
  st.max.fill(neg_inf16());
  Masks<V> nan{};
  each_step(lay, [&](int64_t s, int v, __mmask16 m) {
    lay.template prefetch<kStreamAhead>(l, s, v);
    const __m512 x = load(l + lay.at(s, v), m);
    st.max[v] = _mm512_mask_max_ps(st.max[v], m, st.max[v], x);
    nan[v] |= _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
  });
  st.max = lay.all_max(st.max);
  nan = lay.any(nan);
  for (int v = 0; v < V; ++v) st.max[v] = _mm512_mask_mov_ps(st.max[v], nan[v], nan16());
  std::array<LaneSum, V> lane_sum, lane_t;
  each_step(lay, [&](int64_t s, int v, __mmask16 m) {
    lay.template prefetch<kStreamAhead>(l, s, v);
    const __m512 d = _mm512_sub_ps(load(l + lay.at(s, v), m), st.max[v]);
    const __m512 e = exp16(d);
    lane_sum[v].add(e, m);
    lane_t[v].add(_mm512_mul_ps(e, d), _mm512_mask_cmp_ps_mask(m, e, _mm512_setzero_ps(), _CMP_NEQ_UQ));
  });
  const Vecs<V> sum = lay.all_sum(lane_sum), t = lay.all_sum(lane_t);
  for (int v = 0; v < V; ++v) {
    st.log_sum[v] = log16_exact(sum[v]);
    st.neg_entropy[v] = _mm512_sub_ps(_mm512_div_ps(t[v], sum[v]), st.log_sum[v]);
  }
  return st;
}

template <typename T>
void kl_forward(const T* logits, T* out, const Shape& sh) {
  const __m512 log_k = splat(static_cast<float>(std::log(static_cast<double>(sh.K))));
  for_each_unit(sh, 0, false, [&](const auto& lay, int64_t base, const float*, float*) {
    using L = std::decay_t<decltype(lay)>;
    const LogitStats<L::kVecs> st = logit_stats(lay, logits + base);
    for (int v = 0; v < L::kVecs; ++v)
      store(out + sh.reduced(base) + 16 * v, _mm512_add_ps(st.neg_entropy[v], log_k), lay.result_mask(v));
  });
}

template <typename T>
void kl_backward(const T* grad, const T* logits, T* out, const Shape& sh) {
  for_each_unit(sh, 0, false, [&](const auto& lay, int64_t base, const float*, float*) {
    using L = std::decay_t<decltype(lay)>;
    const T* l = logits + base;
    const LogitStats<L::kVecs> st = logit_stats(lay, l);
    Vecs<L::kVecs> g;
    for (int v = 0; v < L::kVecs; ++v) g[v] = load(grad + sh.reduced(base) + 16 * v, lay.result_mask(v));
    g = lay.broadcast(g);
    each_step(lay, [&](int64_t s, int v, __mmask16 m) {
      lay.template prefetch<kStreamAhead>(l, s, v);
      const __m512 logp = _mm512_sub_ps(_mm512_sub_ps(load(l + lay.at(s, v), m), st.max[v]), st.log_sum[v]);
      const __m512 p = exp16(logp);
      const __m512 x = _mm512_mul_ps(_mm512_mul_ps(g[v], p), _mm512_sub_ps(logp, st.neg_entropy[v]));
      store(out + base + lay.at(s, v), _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_NEQ_UQ), x), m);
    });
  });
}

}  // namespace simd
#endif  // VLM_GUMBEL_AVX512

// The AVX-512 kernels run float32 / float16 / bfloat16 with K below 2^31 (int32 lane indices).
template <typename T>
constexpr bool simd_dtype() {
  return VLM_GUMBEL_AVX512 && !std::is_same_v<T, double>;
}
bool simd_shape(const Shape& sh) { return sh.K < std::numeric_limits<int32_t>::max(); }

#define VLM_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Calls simd::FN<scalar_t>(ARGS) where the AVX-512 kernels apply, scalar::FN<scalar_t>(ARGS) otherwise.
#if VLM_GUMBEL_AVX512
#define VLM_RUN(FN, SH, ...)                                                   \
  do {                                                                         \
    if constexpr (simd_dtype<scalar_t>()) {                                    \
      if (simd_shape(SH)) {                                                    \
        simd::FN<scalar_t>(__VA_ARGS__);                                       \
        break;                                                                 \
      }                                                                        \
    }                                                                          \
    scalar::FN<scalar_t>(__VA_ARGS__);                                         \
  } while (0)
#else
#define VLM_RUN(FN, SH, ...) scalar::FN<scalar_t>(__VA_ARGS__)
#endif

}  // namespace

void gumbel_noise_fill(uint64_t seed, uint64_t start, int64_t n, float* out) {
#if VLM_GUMBEL_AVX512
  constexpr int kGroups = simd::kNoiseGroups;
  const simd::PhiloxKeys key(seed);
  for (int64_t j = 0; j < n; j += 16 * kGroups) {
    uint64_t first[kGroups];
    for (int q = 0; q < kGroups; ++q) first[q] = start + static_cast<uint64_t>(j + 16 * q);
    __m512 g[kGroups];
    simd::gumbel16xN<kGroups>(key, first, g);
    for (int q = 0; q < kGroups && j + 16 * q < n; ++q) {
      const int64_t left = n - j - 16 * q;
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm512_mask_storeu_ps(out + j + 16 * q, m, g[q]);
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

}  // namespace vlm

// Schemas here, kernels for the CPU dispatch key (other files may add kernels for other keys).
TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def("gumbel_softmax_forward_cpu(Tensor logits, int seed, float tau, bool hard, int dim) -> Tensor");
  m.def("gumbel_softmax_backward_cpu(Tensor grad, Tensor saved, int seed, float tau, bool hard, int dim) -> Tensor");
  m.def("gumbel_argmax_cpu(Tensor logits, int seed, int dim) -> Tensor");
  m.def("categorical_kl_uniform_forward_cpu(Tensor logits, int dim) -> Tensor");
  m.def("categorical_kl_uniform_backward_cpu(Tensor grad, Tensor logits, int dim) -> Tensor");
  m.def("gumbel_noise_cpu(int seed, int start, int n) -> Tensor", &vlm::gumbel_noise_cpu);
}

TORCH_LIBRARY_IMPL(vlm_kernels_C, CPU, m) {
  m.impl("gumbel_softmax_forward_cpu", &vlm::gumbel_softmax_forward_cpu);
  m.impl("gumbel_softmax_backward_cpu", &vlm::gumbel_softmax_backward_cpu);
  m.impl("gumbel_argmax_cpu", &vlm::gumbel_argmax_cpu);
  m.impl("categorical_kl_uniform_forward_cpu", &vlm::categorical_kl_uniform_forward_cpu);
  m.impl("categorical_kl_uniform_backward_cpu", &vlm::categorical_kl_uniform_backward_cpu);
}
