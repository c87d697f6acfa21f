// CPU kernels of the shifted-window attention op family (Swin v1 / v2): the fused window_attention on
// the (B, H, W, 3C) qkv map and windowed_attention on partitioned windows, forward and backward. The
// math is vlm_kernels/reference/window_attention.py's.
//
// Work unit: one (window, head). at::parallel_for hands contiguous ranges of units (heads innermost, so
// the heads of a window read the same token rows) to threads. A unit:
//  1. gathers its N tokens' q, k, v (d channels each) into per-thread float32 (float64) buffers. For the
//     fused op the cyclic shift, the padding and the partition are index arithmetic: token t of window
//     (b, wy, wx) sits at (ys, xs) = (wy Mh + t / Mw, wx Mw + t % Mw) of the padded shifted map, i.e. at
//     ((ys + sh) mod H, (xs + sw) mod W) of the input when ys < H and xs < W, and is a padded token
//     (qkv = pad_qkv) otherwise. v1 stores scale * q; v2 stores q / max(|q|, eps) and k likewise;
//  2. S = Q K^T (N x N, one small GEMM), then per row: v2's clamped logit multiplier, + the bias row (the
//     table is gathered once per call into a dense (heads, N, Np) copy), + timm's -100 mask where the two
//     tokens' region labels differ (label = [ys >= Hp - sh] * 2 + [xs >= Wp - sw]; only windows whose
//     tokens have different labels pay for it), softmax in float32 (float64) with the row's lse;
//  3. O = P V, written back at the tokens' unshifted positions (padded query rows are dropped).
// The backward recomputes S and P the same way (bit-identical P, so its rows sum to one), then
// dP = dO V^T, dS = P (dP - rowsum(P dP)), dV = P^T dO, dQ = dS K, dK = dS^T Q (v1: times scale; v2:
// through the logit multiplier and the normalisation). dq, dk, dv of real tokens go to their unshifted
// place in dqkv (every (token, head) belongs to exactly one unit: no two threads write the same place);
// those of padded tokens, dS (the bias gradient) and v2's sum(dS * cos) are added into per-thread float64
// accumulators, reduced in thread order at the end (the table gradient by relative index). Nothing of
// size N x N exists per window beyond the unit's own S and dP buffers.
//
// SIMD: float32 work runs on one width-generic kernel body written against a tiny vector type (V16:
// AVX-512, 16 lanes; V8: AVX2 + FMA, 8 lanes; V4: GCC / Clang vector extensions, 4 lanes, SSE2 on x86-64
// and NEON on aarch64): register-tiled GEMMs (float32 accumulate), vectorised exp / softmax / dS rows,
// in-register W x W transposes. This file is compiled once per instruction-set level (csrc/cpu/isa.h):
// as itself for the portable baseline (V4; no intrinsic), and through the wrappers of the same name in
// csrc/cpu_avx2/ (V8) and csrc/cpu_avx512/ (V16, and V8 where the head dim is a multiple of 8 but not
// of 16) with the level's `#pragma GCC target`. float64, and head dims the width does not divide, use
// plain loops. The level is picked once at load time; VLM_KERNELS_CPU_ISA forces a lower one.
#include "cpu/isa.h"
#include "cpu/window_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#if VLM_CPU_X86
#include <immintrin.h>
#endif

#ifndef VLM_CPU_INCLUDES_ONLY  // (a level wrapper's first pass takes the headers only, see isa.h)
// The level: VLM_WA_ISA_AVX512 / VLM_WA_ISA_AVX2 come from the wrappers in csrc/cpu_avx512/ and
// csrc/cpu_avx2/ (g++ does not define __AVX2__ / __AVX512F__ for a `#pragma GCC target` in C++: it lexes
// the whole file before the pragma applies, so those macros follow the command line only, e.g.
// -march=native with VLM_KERNELS_NATIVE=1).
#if defined(VLM_WA_ISA_AVX512) || \
    (defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__))
#define VLM_WA_V16 1
#define VLM_WA_EVEX 1  // AVX-512VL: the 8-lane code reaches ymm16..31
#else
#define VLM_WA_V16 0
#define VLM_WA_EVEX 0
#endif
#if VLM_WA_V16 || defined(VLM_WA_ISA_AVX2) || (defined(__AVX2__) && defined(__FMA__))
#define VLM_WA_V8 1
#else
#define VLM_WA_V8 0
#endif
// The baseline level's portable 4-lane vectors (GCC / Clang vector extensions: SSE2 on x86-64, NEON on
// aarch64; no intrinsic).
#if !VLM_WA_V16 && !VLM_WA_V8 && defined(__GNUC__) && (defined(__SSE2__) || defined(__ARM_NEON))
#define VLM_WA_V4 1
#else
#define VLM_WA_V4 0
#endif
#define VLM_WA_SIMD (VLM_WA_V16 || VLM_WA_V8 || VLM_WA_V4)

namespace vlm {
namespace VLM_CPU_LEVEL {
namespace {

constexpr double kMaskValue = -100.0;  // timm's shifted-window mask value
constexpr double kNormEps = 1e-12;     // F.normalize's eps
constexpr int64_t kPlainPad = 16;      // row padding of the plain-loop (and v2 / float64) buffers

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(static_cast<std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>(v));
}

// ----------------------------------------------------------------------------------------------------
// Vector types: W float32 lanes, `mask` a lane selection. Loads and stores are unaligned; the kernels
// only touch whole vectors inside buffers padded to a multiple of W (lanes past the data are scratch and
// are masked out of every reduction with lanes()/select()). max(a, b) returns b where either is NaN, so
// max(c, x) keeps a NaN x. exp: Cephes' polynomial (~1 ulp) for x in [-87, 88] (the kernels' arguments
// are x - max <= 0 and S - lse ~<= 0); below, 0, and no subnormal is ever produced, not even in lanes
// thrown away (each takes a microcode assist: rows of masked windows ran 3x slower); x above 88 is taken
// as 88; NaN stays NaN.

#if VLM_WA_SIMD
constexpr float kExpLo = -87.0f;  // exp(-87) = 1.6e-38: results stay normal (FLT_MIN = exp(-87.34))
#endif

#if VLM_WA_V16
struct V16 {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int W = 16;
  static constexpr int kRegs = 32;
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float a) { return _mm512_set1_ps(a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static mask lanes(int64_t n) {  // lanes [0, n)
    return n >= 16 ? mask(0xFFFF) : n <= 0 ? mask(0) : static_cast<mask>((1u << n) - 1u);
  }
  static reg select(mask m, reg a, reg b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
  static float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static float hmax(reg x) { return _mm512_reduce_max_ps(x); }

  static reg exp(reg x) {
    const reg lo = _mm512_set1_ps(kExpLo);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // x >= kExpLo or NaN
    x = _mm512_max_ps(lo, x);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    const reg n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_scalef_ps(keep, exp_poly(x, n), n);
  }
  // e^r with r = x - n ln 2 in [-ln2/2, ln2/2].
  static reg exp_poly(reg x, reg n) {
    reg r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    reg p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    return _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  }

  // r[0..15] <- its transpose (16 x 16).
  static void transpose(reg* r) {
    reg t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    // r[4b + k] now holds, for rows 4b..4b+3, column k + 4m in 128-bit lane m (k = 0..3).
    for (int k = 0; k < 4; ++k) {
      const reg a = r[k], b = r[4 + k], c = r[8 + k], e = r[12 + k];
      const reg ab_lo = _mm512_shuffle_f32x4(a, b, 0x88), ab_hi = _mm512_shuffle_f32x4(a, b, 0xdd);
      const reg ce_lo = _mm512_shuffle_f32x4(c, e, 0x88), ce_hi = _mm512_shuffle_f32x4(c, e, 0xdd);
      t[k] = _mm512_shuffle_f32x4(ab_lo, ce_lo, 0x88);       // column k
      t[k + 8] = _mm512_shuffle_f32x4(ab_lo, ce_lo, 0xdd);   // column k + 8
      t[k + 4] = _mm512_shuffle_f32x4(ab_hi, ce_hi, 0x88);   // column k + 4
      t[k + 12] = _mm512_shuffle_f32x4(ab_hi, ce_hi, 0xdd);  // column k + 12
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
};
#endif  // VLM_WA_V16

#if VLM_WA_V8
struct V8 {
  using reg = __m256;
  using mask = __m256;  // all-ones lanes are selected
  static constexpr int W = 8;
#if VLM_WA_EVEX
  static constexpr int kRegs = 32;  // EVEX encodings reach ymm16..31
#else
  static constexpr int kRegs = 16;
#endif
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float a) { return _mm256_set1_ps(a); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static mask lanes(int64_t n) {  // lanes [0, n)
    const int k = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n, 8)));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static reg select(mask m, reg a, reg b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b
  static float hsum(reg x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(reg x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }

  static reg exp(reg x) {
    const reg lo = _mm256_set1_ps(kExpLo);
    const reg keep = _mm256_cmp_ps(x, lo, _CMP_NLT_UQ);  // x >= kExpLo or NaN
    x = _mm256_max_ps(lo, x);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    const reg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    reg p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    // 2^n, n in [-126, 127], from its exponent bits.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
  }

  // r[0..7] <- its transpose (8 x 8).
  static void transpose(reg* r) {
    reg t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
  }
};
#endif  // VLM_WA_V8

#if VLM_WA_V4
// 4 lanes in GCC / Clang vector extensions, for the baseline level (SSE2 on x86-64, NEON on aarch64).
// No FMA at this level: fmadd is a * b + c rounded twice (-ffp-contract=off keeps it so). max, select
// and exp follow V8's lane semantics (max(a, b) = a > b ? a : b; exp's range, flush to 0 and NaN).
struct V4 {
  typedef float reg __attribute__((vector_size(16)));
  typedef int32_t ireg __attribute__((vector_size(16)));
  using mask = ireg;  // all-ones lanes are selected
  static constexpr int W = 4;
#if defined(__aarch64__)
  static constexpr int kRegs = 32;
#else
  static constexpr int kRegs = 16;
#endif
  static reg load(const float* p) {
    reg x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  static void store(float* p, reg x) { std::memcpy(p, &x, sizeof(x)); }
  static reg zero() { return reg{0.0f, 0.0f, 0.0f, 0.0f}; }
  static reg set1(float a) { return reg{a, a, a, a}; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg div(reg a, reg b) { return a / b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg select(mask m, reg a, reg b) {  // m ? a : b
    return reinterpret_cast<reg>((m & reinterpret_cast<ireg>(a)) | (~m & reinterpret_cast<ireg>(b)));
  }
  static reg max(reg a, reg b) { return select(a > b, a, b); }
  static mask lanes(int64_t n) {  // lanes [0, n)
    const int32_t k = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(n, 4)));
    return ireg{0, 1, 2, 3} < ireg{k, k, k, k};
  }
  static float hsum(reg x) { return (x[0] + x[2]) + (x[1] + x[3]); }
  static float hmax(reg x) {
    const float a = x[0] > x[2] ? x[0] : x[2], b = x[1] > x[3] ? x[1] : x[3];
    return a > b ? a : b;
  }

  static reg exp(reg x) {
    const reg lo = set1(kExpLo);
    const mask keep = ~(x < lo);  // x >= kExpLo or NaN
    x = max(lo, x);
    x = select(set1(88.0f) < x, set1(88.0f), x);
    // n = round(x log2 e) (|x log2 e| <= 127): adding 1.5 * 2^23 rounds to an integer, which then sits
    // in the low mantissa bits.
    const reg shifter = set1(12582912.0f);
    const reg big = x * set1(1.44269504088896341f) + shifter;
    const reg n = big - shifter;
    reg r = x - n * set1(0.693359375f);
    r = r - n * set1(-2.12194440e-4f);
    reg p = set1(1.9875691500e-4f);
    p = p * r + set1(1.3981999507e-3f);
    p = p * r + set1(8.3334519073e-3f);
    p = p * r + set1(4.1665795894e-2f);
    p = p * r + set1(1.6666665459e-1f);
    p = p * r + set1(5.0000001201e-1f);
    p = p * (r * r) + r;
    p = p + set1(1.0f);
    // 2^n, n in [-126, 127], from its exponent bits (n = bits(big) - bits(1.5 * 2^23)).
    const ireg e = (reinterpret_cast<ireg>(big) - reinterpret_cast<ireg>(shifter) + 127) << 23;
    return reinterpret_cast<reg>(reinterpret_cast<ireg>(p * reinterpret_cast<reg>(e)) & keep);
  }

  // r[0..3] <- its transpose (4 x 4).
  static void transpose(reg* r) {
    const reg a = r[0], b = r[1], c = r[2], d = r[3];
    for (int i = 0; i < 4; ++i) r[i] = reg{a[i], b[i], c[i], d[i]};
  }
};
#endif  // VLM_WA_V4

#if VLM_WA_V16
using VBest = V16;  // the plain-loop path's float32 GEMMs and softmax rows (buffers padded to 16)
#elif VLM_WA_V8
using VBest = V8;
#elif VLM_WA_V4
using VBest = V4;
#endif

// ----------------------------------------------------------------------------------------------------
// Small GEMM: C[m * ldc + n] = sum_{k < K} A[m * am + k * ak] * B[k * ldb + n], m < M, n < ncols.
// A is read by (strided) broadcasts, so the same kernel serves A and A^T.

template <typename T>
void gemm_plain(int64_t M, int64_t ncols, int64_t K, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb,
                T* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    T* c = C + m * ldc;
    std::fill(c, c + ncols, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[m * am + k * ak];
      const T* b = B + k * ldb;
      for (int64_t n = 0; n < ncols; ++n) c[n] += a * b[n];
    }
  }
}

#if VLM_WA_SIMD
// Epilogue of a tile: C = init + alpha * rs[r] * (A B) (init, rs optional). `init` has C's layout.
struct Epilogue {
  const float* init = nullptr;  // accumulator start values (ldc-strided), or zeros
  const float* rs = nullptr;    // per-row factors, or none
  float alpha = 1.0f;
};

struct GemmArgs {
  int64_t K;
  const float* A;
  int64_t am, ak;
  const float* B;
  int64_t ldb;
  float* C;
  int64_t ldc;
  Epilogue ep;
};

// One R x (NV * W) tile of C: R * NV accumulators, NV B vectors and one broadcast A value live in registers.
template <class V, int R, int NV>
inline void gemm_tile(const GemmArgs& g) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const int64_t K = g.K, am = g.am, ak = g.ak, ldb = g.ldb, ldc = g.ldc;
  const float* A = g.A;
  const float* B = g.B;
  float* C = g.C;
  const float* init = g.ep.init;
  const bool scaled = g.ep.rs != nullptr || g.ep.alpha != 1.0f;
  const float* start = scaled ? nullptr : init;  // unscaled: accumulate onto init
  reg acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = start ? V::load(start + r * ldc + W * v) : V::zero();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const float* a = A + k * ak;
    reg bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + W * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const reg ar = V::set1(a[r * am]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(ar, bv[v], acc[r][v]);
    }
  }
  if (!scaled) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(C + r * ldc + W * v, acc[r][v]);
    }
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const reg f = V::set1(g.ep.rs ? g.ep.alpha * g.ep.rs[r] : g.ep.alpha);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      V::store(C + r * ldc + W * v, init ? V::fmadd(acc[r][v], f, V::load(init + r * ldc + W * v))
                                         : V::mul(acc[r][v], f));
  }
}

// Tile shapes by register file: 32 registers: up to 6 rows x 4 vectors or 12 rows x 2 (24 accumulators);
// 16 registers: 6 rows x 2 vectors or 12 rows x 1 (12 accumulators).
template <class V>
struct TileShape {
  static constexpr int kMaxVecs = V::kRegs >= 32 ? 4 : 2;
  static constexpr int max_rows(int vecs) { return vecs <= kMaxVecs / 2 ? 12 : 6; }
};

template <class V, int NV, int R>
inline void gemm_rows(int rows, const GemmArgs& g) {
  if constexpr (R > 1) {
    if (rows < R) {
      gemm_rows<V, NV, R - 1>(rows, g);
      return;
    }
  }
  gemm_tile<V, R, NV>(g);
}

// A panel of NV column vectors over all M rows, in row blocks of near-equal height.
template <class V, int NV>
void gemm_panel(int64_t M, const GemmArgs& g0) {
  constexpr int rmax = TileShape<V>::max_rows(NV);
  const int64_t blocks = (M + rmax - 1) / rmax;
  GemmArgs g = g0;
  for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
    const int rows = static_cast<int>((M - m0 + (blocks - b) - 1) / (blocks - b));
    g.A = g0.A + m0 * g0.am;
    g.C = g0.C + m0 * g0.ldc;
    g.ep.init = g0.ep.init ? g0.ep.init + m0 * g0.ldc : nullptr;
    g.ep.rs = g0.ep.rs ? g0.ep.rs + m0 : nullptr;
    gemm_rows<V, NV, rmax>(rows, g);
    m0 += rows;
  }
}

// ncols must be a multiple of V::W. Column panels outermost so that a panel of B stays in L1.
template <class V>
void gemm_simd(int64_t M, int64_t ncols, int64_t K, const float* A, int64_t am, int64_t ak, const float* B,
               int64_t ldb, float* C, int64_t ldc, const Epilogue& ep = Epilogue()) {
  constexpr int W = V::W, vmax = TileShape<V>::kMaxVecs;
  const int64_t total = ncols / W;
  const int64_t panels = (total + vmax - 1) / vmax;
  for (int64_t pnl = 0, v0 = 0; pnl < panels; ++pnl) {
    const int vecs = static_cast<int>((total - v0 + (panels - pnl) - 1) / (panels - pnl));
    GemmArgs g{K, A, am, ak, B + W * v0, ldb, C + W * v0, ldc, ep};
    if (ep.init) g.ep.init = ep.init + W * v0;
    switch (vecs) {
      case 1: gemm_panel<V, 1>(M, g); break;
      case 2: gemm_panel<V, 2>(M, g); break;
      default:
        if constexpr (vmax >= 4) {
          if (vecs == 3)
            gemm_panel<V, 3>(M, g);
          else
            gemm_panel<V, 4>(M, g);
        }
        break;
    }
    v0 += vecs;
  }
}

// Softmax pieces of one row of logits x = row (+ add) over [0, n), the row (and add) padded to a multiple
// of V::W (lanes past n are ignored): row_max gives max(x); row_exp writes e = exp(x - m) into the row
// (0 in the padding) and returns sum(e).
template <class V>
inline float row_max(const float* row, const float* add, int64_t n) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const int64_t last = round_up(n, W) - W;
  const reg ninf = V::set1(-std::numeric_limits<float>::infinity());
  reg mx = ninf;
  for (int64_t j = 0; j < last; j += W) {
    reg x = V::load(row + j);
    if (add) x = V::add(x, V::load(add + j));
    mx = V::max(mx, x);
  }
  reg x = V::load(row + last);
  if (add) x = V::add(x, V::load(add + last));
  return V::hmax(V::max(mx, V::select(V::lanes(n - last), x, ninf)));
}

template <class V>
inline float row_exp(float* row, const float* add, int64_t n, float m) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const int64_t last = round_up(n, W) - W;
  const reg mv = V::set1(m);
  reg sum = V::zero();
  for (int64_t j = 0; j <= last; j += W) {
    reg x = V::load(row + j);
    if (add) x = V::add(x, V::load(add + j));
    reg e = V::exp(V::sub(x, mv));
    if (j == last) e = V::select(V::lanes(n - last), e, V::zero());
    sum = V::add(sum, e);
    V::store(row + j, e);
  }
  return V::hsum(sum);
}
#endif  // VLM_WA_SIMD

template <typename T>
inline void gemm(int64_t M, int64_t ncols, int64_t K, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb,
                 T* C, int64_t ldc) {
#if VLM_WA_SIMD
  if constexpr (std::is_same_v<T, float>) {
    gemm_simd<VBest>(M, ncols, K, A, am, ak, B, ldb, C, ldc);
    return;
  }
#endif
  gemm_plain(M, ncols, K, A, am, ak, B, ldb, C, ldc);
}

// Softmax of s[0, n) in place (s padded to a multiple of kPlainPad: the padding is overwritten); returns
// the row's log-sum-exp.
template <typename T>
T softmax_row(T* s, int64_t n) {
#if VLM_WA_SIMD
  if constexpr (std::is_same_v<T, float>) {
    const float m = row_max<VBest>(s, nullptr, n);
    const float total = row_exp<VBest>(s, nullptr, n, m);
    const typename VBest::reg inv = VBest::set1(1.0f / total);  // one division per row, not per element
    for (int64_t j = 0; j < n; j += VBest::W) VBest::store(s + j, VBest::mul(VBest::load(s + j), inv));
    return m + std::log(total);
  }
#endif
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  T total = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  for (int64_t j = 0; j < n; ++j) s[j] /= total;
  return m + std::log(total);
}
// ----------------------------------------------------------------------------------------------------
// One unit's math on gathered buffers.

template <typename acc_t>
struct Params {
  int64_t N = 0, Np = 0, d = 0, dp = 0, heads = 0;  // Np, dp: N, d padded (row strides of the buffers)
  bool cosine = false;
  acc_t scale = 1;
  std::vector<acc_t> mult;        // v2: exp(min(logit_scale, log 100)) per head
  std::vector<uint8_t> unclamped;  // v2: logit_scale <= log 100 per head
  const acc_t* bias = nullptr;    // dense (heads, N, Np) or null
};

template <typename acc_t>
struct Work {
  int64_t N, Np, d, dp;
  // Row-major N x dp: q (scaled / normalised), k (normalised for v2), v, dO, dq, dk, dv (dq doubles as O).
  std::vector<acc_t> q, k, v, dout, dq, dk, dv;
  std::vector<acc_t> kt, vt;  // d x Np: K^T, V^T (zero beyond N)
  std::vector<acc_t> s, dp_;  // N x Np: logits / P, dP / dS
  std::vector<acc_t> qden, kden, qnorm, knorm, lse;  // per token

  Work(const Params<acc_t>& p, bool backward)
      : N(p.N), Np(p.Np), d(p.d), dp(p.dp),
        q(N * dp), k(N * dp), v(N * dp), dq(N * dp), kt(d * Np), s(N * Np),
        qden(N), kden(N), qnorm(N), knorm(N), lse(N) {
    if (backward) {
      dout.assign(N * dp, acc_t(0));
      dk.assign(N * dp, acc_t(0));
      dv.assign(N * dp, acc_t(0));
      vt.assign(d * Np, acc_t(0));
      dp_.assign(N * Np, acc_t(0));
    }
  }

  // Stores token t's q, k, v (d values each, from any dtype) as the unit's operands.
  template <typename scalar_t>
  void put(int64_t t, const scalar_t* __restrict qs, const scalar_t* __restrict ks, const scalar_t* __restrict vs,
           const Params<acc_t>& p, bool backward) {
    acc_t* __restrict qr = q.data() + t * dp;
    acc_t* __restrict kr = k.data() + t * dp;
    acc_t* __restrict vr = v.data() + t * dp;
    const acc_t sc = p.cosine ? acc_t(1) : p.scale;
    for (int64_t c = 0; c < d; ++c) qr[c] = to_acc<acc_t>(qs[c]) * sc;  // * 1 is exact for v2
    for (int64_t c = 0; c < d; ++c) kr[c] = to_acc<acc_t>(ks[c]);
    for (int64_t c = 0; c < d; ++c) vr[c] = to_acc<acc_t>(vs[c]);
    if (p.cosine) {
      normalise(qr, &qnorm[t], &qden[t]);
      normalise(kr, &knorm[t], &kden[t]);
    }
    acc_t* __restrict ktc = kt.data() + t;
    for (int64_t c = 0; c < d; ++c) ktc[c * Np] = kr[c];
    if (backward) {
      acc_t* __restrict vtc = vt.data() + t;
      for (int64_t c = 0; c < d; ++c) vtc[c * Np] = vr[c];
    }
  }

  void normalise(acc_t* x, acc_t* norm, acc_t* den) const {
    acc_t sq = 0;
    for (int64_t c = 0; c < d; ++c) sq += x[c] * x[c];
    *norm = d == 1 ? std::abs(x[0]) : std::sqrt(sq);  // one channel: |x| exactly, as eager (no overflow)
    *den = std::max(*norm, static_cast<acc_t>(kNormEps));
    for (int64_t c = 0; c < d; ++c) x[c] = x[c] / *den;
  }

  // P = softmax(logits) into s, lse per row. mask: (N, Np) additive or null; else the tokens' region
  // labels give timm's mask when non-null (a mixed window).
  void probabilities(const Params<acc_t>& p, int64_t h, const acc_t* mask, const int* label) {
    gemm<acc_t>(N, Np, d, q.data(), dp, 1, kt.data(), Np, s.data(), Np);
    const acc_t t = p.cosine ? p.mult[h] : acc_t(1);
    const acc_t* bias = p.bias ? p.bias + h * N * Np : nullptr;
    const acc_t mval = static_cast<acc_t>(kMaskValue);
    for (int64_t i = 0; i < N; ++i) {
      acc_t* row = s.data() + i * Np;
      if (p.cosine)
        for (int64_t j = 0; j < N; ++j) row[j] = row[j] * t;
      if (bias) {
        const acc_t* br = bias + i * Np;
        for (int64_t j = 0; j < N; ++j) row[j] = row[j] + br[j];
      }
      if (mask) {
        const acc_t* mr = mask + i * Np;
        for (int64_t j = 0; j < N; ++j) row[j] = row[j] + mr[j];
      } else if (label) {
        const int li = label[i];
        for (int64_t j = 0; j < N; ++j)
          if (label[j] != li) row[j] = row[j] + mval;
      }
      lse[i] = softmax_row(row, N);
    }
  }

  // O = P V into dq.
  void forward(const Params<acc_t>& p, int64_t h, const acc_t* mask, const int* label) {
    probabilities(p, h, mask, label);
    gemm<acc_t>(N, dp, N, s.data(), Np, 1, v.data(), dp, dq.data(), dp);
  }

  // dq, dk, dv of the unit (inputs' gradients, before the normalisation for v2: see finish_cosine).
  // Adds dS into dbias (N x N, float64) when given; returns v2's sum(dS * cos) (0 for v1).
  double backward(const Params<acc_t>& p, int64_t h, const acc_t* mask, const int* label, double* dbias) {
    probabilities(p, h, mask, label);
    gemm<acc_t>(N, Np, d, dout.data(), dp, 1, vt.data(), Np, dp_.data(), Np);  // dP = dO V^T
    for (int64_t i = 0; i < N; ++i) {
      const acc_t* pr = s.data() + i * Np;
      acc_t* dr = dp_.data() + i * Np;
      // D = rowsum(P dP) / rowsum(P): the rows of dS then sum to zero to rounding even though the rows of
      // P sum to one only to rounding (the logit-scale gradient is a cancelling sum of dS * cos).
      acc_t D = 0, rowsum = 0;
      for (int64_t j = 0; j < N; ++j) {
        D += pr[j] * dr[j];
        rowsum += pr[j];
      }
      D = D / rowsum;
      for (int64_t j = 0; j < N; ++j) dr[j] = pr[j] * (dr[j] - D);
      if (dbias) {
        double* br = dbias + i * N;
        for (int64_t j = 0; j < N; ++j) br[j] += static_cast<double>(dr[j]);
      }
    }
    gemm<acc_t>(N, dp, N, s.data(), 1, Np, dout.data(), dp, dv.data(), dp);   // dV = P^T dO
    gemm<acc_t>(N, dp, N, dp_.data(), Np, 1, k.data(), dp, dq.data(), dp);    // dS K
    gemm<acc_t>(N, dp, N, dp_.data(), 1, Np, q.data(), dp, dk.data(), dp);    // dS^T Q
    if (!p.cosine) {
      // q holds scale * q, so dS^T Q is already dk; dq = scale * dS K.
      for (int64_t i = 0; i < N; ++i)
        for (int64_t c = 0; c < d; ++c) dq[i * dp + c] = dq[i * dp + c] * p.scale;
      return 0.0;
    }
    // v2: s = t * qn kn^T + ...: sum(dS * cos) = sum_i qn_i . (dS Kn)_i; dqn = t dS Kn, dkn = t dS^T Qn.
    double dt = 0.0;
    const acc_t t = p.mult[h];
    for (int64_t i = 0; i < N; ++i) {
      acc_t dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += q[i * dp + c] * dq[i * dp + c];
      dt += static_cast<double>(dot);
      normalise_backward(q.data() + i * dp, dq.data() + i * dp, qnorm[i], qden[i], t);
      normalise_backward(k.data() + i * dp, dk.data() + i * dp, knorm[i], kden[i], t);
    }
    return dt;
  }

  // g <- d/dx of x / max(|x|, eps) applied to dy = t * g, with y = x / max(|x|, eps) given.
  void normalise_backward(const acc_t* y, acc_t* g, acc_t norm, acc_t den, acc_t t) const {
    acc_t dot = 0;
    for (int64_t c = 0; c < d; ++c) {
      g[c] = t * g[c];
      dot += y[c] * g[c];
    }
    const acc_t through = norm >= static_cast<acc_t>(kNormEps) ? acc_t(1) : acc_t(0);
    for (int64_t c = 0; c < d; ++c) g[c] = g[c] / den - through * y[c] * dot / den;
  }
};

// ----------------------------------------------------------------------------------------------------
// Shared preparation

template <typename acc_t>
acc_t logit_scale_max() {
  return static_cast<acc_t>(std::log(100.0));
}

template <typename scalar_t, typename acc_t>
void fill_logit_scale(Params<acc_t>& p, const std::optional<at::Tensor>& logit_scale) {
  p.cosine = logit_scale.has_value() && logit_scale->defined();
  if (!p.cosine) return;
  const scalar_t* ls = logit_scale->const_data_ptr<scalar_t>();
  p.mult.resize(p.heads);
  p.unclamped.resize(p.heads);
  const acc_t cap = logit_scale_max<acc_t>();
  for (int64_t h = 0; h < p.heads; ++h) {
    const acc_t v = to_acc<acc_t>(ls[h]);
    p.mult[h] = std::exp(std::min(v, cap));
    p.unclamped[h] = v <= cap;
  }
  p.scale = 1;
}

// Relative-position-table row of query i and key j in a (mh, mw) window (timm's index).
inline int64_t rel_index(int64_t i, int64_t j, int64_t mh, int64_t mw) {
  const int64_t dy = i / mw - j / mw + (mh - 1);
  const int64_t dx = i % mw - j % mw + (mw - 1);
  return dy * (2 * mw - 1) + dx;
}

// Dense (heads, N, Np) bias in the accumulation type from a table (mh, mw > 0) or a dense (heads, N, N).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> dense_bias(const at::Tensor& bias, int64_t heads, int64_t N, int64_t Np, int64_t mh, int64_t mw) {
  std::vector<acc_t> out(heads * N * Np, acc_t(0));
  const scalar_t* b = bias.const_data_ptr<scalar_t>();
  if (bias.dim() == 2) {  // the table: one relative index per (i, j), all heads from its row
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const scalar_t* row = b + rel_index(i, j, mh, mw) * heads;
        for (int64_t h = 0; h < heads; ++h) out[(h * N + i) * Np + j] = to_acc<acc_t>(row[h]);
      }
    return out;
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) out[(h * N + i) * Np + j] = to_acc<acc_t>(b[(h * N + i) * N + j]);
  return out;
}

// Per-thread float64 accumulators, reduced in thread order.
struct Accumulators {
  int64_t threads, size;
  std::vector<double> data;
  Accumulators(int64_t size_) : threads(at::get_num_threads()), size(size_), data(threads * size_, 0.0) {}
  double* mine() {
    const int64_t t = at::get_thread_num();
    TORCH_CHECK(t >= 0 && t < threads, "window_attention_cpu: thread index ", t, " out of range ", threads);
    return data.data() + t * size;
  }
  std::vector<double> reduce() const {
    std::vector<double> out(size, 0.0);
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t i = 0; i < size; ++i) out[i] += data[t * size + i];
    return out;
  }
};

template <typename scalar_t>
at::Tensor from_double(const std::vector<double>& v, const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options());
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  for (size_t i = 0; i < v.size(); ++i) o[i] = static_cast<scalar_t>(v[i]);
  return out;
}

// The bias gradient (table or dense) from the reduced dense (heads, N, N) float64 sum.
template <typename scalar_t>
at::Tensor bias_gradient(const std::vector<double>& dense, const at::Tensor& bias, int64_t heads, int64_t N,
                         int64_t mh, int64_t mw) {
  if (bias.dim() == 3) return from_double<scalar_t>(dense, bias);
  std::vector<double> table(bias.numel(), 0.0);
  for (int64_t i = 0; i < N; ++i)  // per table entry the (i, j) order of the sum is unchanged by the loop order
    for (int64_t j = 0; j < N; ++j) {
      double* row = table.data() + rel_index(i, j, mh, mw) * heads;
      for (int64_t h = 0; h < heads; ++h) row[h] += dense[(h * N + i) * N + j];
    }
  return from_double<scalar_t>(table, bias);
}

template <typename scalar_t, typename acc_t>
at::Tensor logit_scale_gradient(const std::vector<double>& dt, const Params<acc_t>& p, const at::Tensor& ls) {
  std::vector<double> g(p.heads);
  for (int64_t h = 0; h < p.heads; ++h)
    g[h] = p.unclamped[h] ? dt[h] * static_cast<double>(p.mult[h]) : 0.0;
  return from_double<scalar_t>(g, ls);
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ----------------------------------------------------------------------------------------------------
// The fused op on the (B, H, W, 3C) map

struct MapGeometry {
  int64_t B, H, W, C, heads, d, mh, mw, N, sh, sw, Hp, Wp, nwh, nww;
  int64_t windows() const { return B * nwh * nww; }
  // Input positions (b * H + y) * W + x of window `win`'s tokens (-1: padded) and their mask region
  // labels; returns whether the labels differ (the window needs the mask).
  bool tokens(int64_t win, int64_t* pos, int* label) const {
    const int64_t b = win / (nwh * nww);
    const int64_t r = win - b * nwh * nww;
    const int64_t wy = r / nww, wx = r - (r / nww) * nww;
    bool mixed = false;
    for (int64_t t = 0; t < N; ++t) {
      const int64_t ys = wy * mh + t / mw, xs = wx * mw + t % mw;
      pos[t] = (ys < H && xs < W) ? (b * H + (ys + sh) % H) * W + (xs + sw) % W : -1;
      label[t] = (sh > 0 && ys >= Hp - sh ? 2 : 0) + (sw > 0 && xs >= Wp - sw ? 1 : 0);
      mixed = mixed || label[t] != label[0];
    }
    return mixed;
  }
};

MapGeometry map_geometry(const at::Tensor& qkv, int64_t heads, at::IntArrayRef window, at::IntArrayRef shift,
                         const char* fn) {
  TORCH_CHECK(qkv.dim() == 4, fn, ": qkv must be (B, H, W, 3C), got ", qkv.sizes());
  TORCH_CHECK(window.size() == 2 && shift.size() == 2, fn, ": window and shift must be pairs");
  TORCH_CHECK(heads > 0, fn, ": num_heads must be positive, got ", heads);
  MapGeometry g;
  g.B = qkv.size(0);
  g.H = qkv.size(1);
  g.W = qkv.size(2);
  TORCH_CHECK(qkv.size(3) % (3 * heads) == 0, fn, ": qkv's last dimension ", qkv.size(3),
              " is not 3 * num_heads * head_dim for num_heads=", heads);
  g.C = qkv.size(3) / 3;
  g.heads = heads;
  g.d = g.C / heads;
  g.mh = window[0];
  g.mw = window[1];
  g.sh = shift[0];
  g.sw = shift[1];
  TORCH_CHECK(g.mh >= 1 && g.mw >= 1, fn, ": window must be >= 1, got ", window);
  TORCH_CHECK(g.sh >= 0 && g.sw >= 0 && g.sh < g.mh && g.sw < g.mw, fn, ": shift must be in [0, window), got ",
              shift);
  g.N = g.mh * g.mw;
  g.Hp = round_up(g.H, g.mh);
  g.Wp = round_up(g.W, g.mw);
  g.nwh = g.Hp / g.mh;
  g.nww = g.Wp / g.mw;
  return g;
}

void check_common(const at::Tensor& t, const at::Tensor& like, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), fn, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

void check_map_inputs(const at::Tensor& qkv, const MapGeometry& g, const std::optional<at::Tensor>& pad,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ls, const char* fn) {
  check_common(qkv, qkv, fn, "qkv");
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), fn, ": qkv must be floating point, got ", qkv.scalar_type());
  if (present(pad)) {
    check_common(*pad, qkv, fn, "pad_qkv");
    TORCH_CHECK(pad->numel() == 3 * g.C, fn, ": pad_qkv must have ", 3 * g.C, " elements, got ", pad->sizes());
  }
  if (present(bias)) {
    check_common(*bias, qkv, fn, "rel_pos_bias");
    const bool table = bias->dim() == 2 && bias->size(0) == (2 * g.mh - 1) * (2 * g.mw - 1) && bias->size(1) == g.heads;
    const bool dense = bias->dim() == 3 && bias->size(0) == g.heads && bias->size(1) == g.N && bias->size(2) == g.N;
    TORCH_CHECK(table || dense, fn, ": rel_pos_bias must be ((2Mh-1)(2Mw-1), heads) or (heads, N, N), got ",
                bias->sizes());
  }
  if (present(ls)) {
    check_common(*ls, qkv, fn, "logit_scale");
    TORCH_CHECK(ls->numel() == g.heads, fn, ": logit_scale must have num_heads elements, got ", ls->sizes());
  }
}

template <typename scalar_t>
std::vector<scalar_t> pad_row(const std::optional<at::Tensor>& pad, int64_t c3) {
  if (present(pad)) {
    const scalar_t* p = pad->const_data_ptr<scalar_t>();
    return std::vector<scalar_t>(p, p + c3);
  }
  return std::vector<scalar_t>(c3, static_cast<scalar_t>(0.0f));
}

// The vector width of the fused op's SIMD kernel for these parameters (float32, head dim a multiple of
// the width; the widest that fits), or 0: the plain-loop units.
template <typename acc_t>
int fast_width(const Params<acc_t>& p) {
  if (!std::is_same_v<acc_t, float>) return 0;
#if VLM_WA_V16
  if (p.d % 16 == 0) return 16;
#endif
#if VLM_WA_V8
  if (p.d % 8 == 0) return 8;
#endif
#if VLM_WA_V4
  if (p.d % 4 == 0) return 4;
#endif
  return 0;
}

// The fused op's parameters; the dense bias rows are padded to the SIMD kernel's width when it runs.
template <typename scalar_t, typename acc_t>
Params<acc_t> map_params(const MapGeometry& g, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& ls, double scale, std::vector<acc_t>& bias_store) {
  Params<acc_t> p;
  p.N = g.N;
  p.d = g.d;
  p.dp = round_up(g.d, kPlainPad);
  p.heads = g.heads;
  p.scale = static_cast<acc_t>(scale);
  fill_logit_scale<scalar_t, acc_t>(p, ls);
  const int width = fast_width(p);
  p.Np = round_up(g.N, width > 0 ? width : kPlainPad);
  if (present(bias)) {
    bias_store = dense_bias<scalar_t, acc_t>(*bias, g.heads, g.N, p.Np, g.mh, g.mw);
    p.bias = bias_store.data();
  }
  return p;
}

// A thread's staging area for the window it is working on: the window's token rows, read once per
// window as whole contiguous rows (the heads of a window are consecutive units, so the rows are fetched
// from memory once with sequential access instead of d-wide pieces per head), and its results, written
// back as whole rows when the window is done. `h_lo` .. `h_hi` are the heads this thread computed for the
// window (a window can be split between two threads at a chunk boundary: each writes only its heads).
template <typename acc_t>
struct WindowStage {
  int64_t win = -1, h_lo = 0, h_hi = -1;
  bool mixed = false;
  std::vector<acc_t> in;    // N x 3C: qkv rows (pad rows for padded tokens)
  std::vector<acc_t> go;    // N x C: grad_out rows (backward; zero rows for padded tokens)
  std::vector<acc_t> res;   // N x C (forward out) or N x 3C (backward dqkv)
  std::vector<acc_t> lse;   // N x heads (forward: results; SIMD backward: the forward's, gathered)
  std::vector<int64_t> pos;  // the tokens' input positions (-1: padded)
  std::vector<int> label;    // the tokens' mask region labels
  int64_t next_win = -1;         // the window whose rows are being prefetched
  std::vector<int64_t> next_pos;  // its token positions
  std::vector<int> next_label;
  WindowStage(const MapGeometry& g, bool backward)
      : in(g.N * 3 * g.C), go(backward ? g.N * g.C : 0), res(g.N * (backward ? 3 : 1) * g.C), lse(g.N * g.heads),
        pos(g.N), label(g.N), next_pos(g.N), next_label(g.N) {}
};

template <typename acc_t, typename scalar_t>
inline void convert_row(acc_t* dst, const scalar_t* src, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<acc_t>(src[i]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, const acc_t* src, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// Loads window `win`'s token rows (and grad_out rows when `go` is given) into the stage.
template <typename scalar_t, typename acc_t>
void load_window(WindowStage<acc_t>& st, const MapGeometry& g, int64_t win, const scalar_t* qkv, const scalar_t* pad,
                 const scalar_t* go) {
  st.win = win;
  st.h_lo = -1;
  st.h_hi = -1;
  st.mixed = g.tokens(win, st.pos.data(), st.label.data());
  const int64_t c3 = 3 * g.C;
  for (int64_t t = 0; t < g.N; ++t) {
    const int64_t pos = st.pos[t];
    convert_row(st.in.data() + t * c3, pos >= 0 ? qkv + pos * c3 : pad, c3);
    if (go) {
      acc_t* dst = st.go.data() + t * g.C;
      if (pos >= 0)
        convert_row(dst, go + pos * g.C, g.C);
      else
        std::fill(dst, dst + g.C, acc_t(0));  // a padded query is cropped: no incoming gradient
    }
  }
}

// Asks for the rows of tokens [t0, t1) of window `win` (and their grad_out rows when `go` is given) to be
// brought into L2 while the current window is computed: the rows come from DRAM (the map is larger than
// the caches) in 7-token runs that the hardware prefetchers pick up too late on their own. Each unit of
// the current window asks for its share of the next window's tokens: a steady stream, not a burst at
// the window's start that fills the miss queues (measured: 5-10% faster at Swin-T stage 3, 12 heads).
template <typename scalar_t, typename acc_t>
void prefetch_window(WindowStage<acc_t>& st, const MapGeometry& g, int64_t win, const scalar_t* qkv,
                     const scalar_t* go, int64_t t0, int64_t t1) {
  if (win >= g.windows()) return;
  if (st.next_win != win) {
    g.tokens(win, st.next_pos.data(), st.next_label.data());
    st.next_win = win;
  }
  const int64_t qkv_bytes = 3 * g.C * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t go_bytes = g.C * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t pos = st.next_pos[t];
    if (pos < 0) continue;  // a padded token: nothing to fetch
    const char* row = reinterpret_cast<const char*>(qkv + pos * 3 * g.C);
    for (int64_t o = 0; o < qkv_bytes; o += 64) __builtin_prefetch(row + o, 0, 2);  // to L2 (x86: prefetcht1)
    if (go) {
      const char* grow = reinterpret_cast<const char*>(go + pos * g.C);
      for (int64_t o = 0; o < go_bytes; o += 64) __builtin_prefetch(grow + o, 0, 2);
    }
  }
}

template <typename scalar_t, typename acc_t>
void flush_forward(const WindowStage<acc_t>& st, const MapGeometry& g, scalar_t* out, acc_t* lse) {
  if (st.win < 0 || st.h_lo < 0) return;
  const int64_t c0 = st.h_lo * g.d, nc = (st.h_hi - st.h_lo + 1) * g.d, nh = st.h_hi - st.h_lo + 1;
  for (int64_t t = 0; t < g.N; ++t) {
    const int64_t pos = st.pos[t];
    if (pos < 0) continue;
    store_row(out + pos * g.C + c0, st.res.data() + t * g.C + c0, nc);
    std::memcpy(lse + pos * g.heads + st.h_lo, st.lse.data() + t * g.heads + st.h_lo, nh * sizeof(acc_t));
  }
}

template <typename scalar_t, typename acc_t>
void flush_backward(const WindowStage<acc_t>& st, const MapGeometry& g, scalar_t* dqkv) {
  if (st.win < 0 || st.h_lo < 0) return;
  const int64_t c0 = st.h_lo * g.d, nc = (st.h_hi - st.h_lo + 1) * g.d, c3 = 3 * g.C;
  for (int64_t t = 0; t < g.N; ++t) {
    const int64_t pos = st.pos[t];
    if (pos < 0) continue;
    for (int64_t part = 0; part < 3; ++part)
      store_row(dqkv + pos * c3 + part * g.C + c0, st.res.data() + t * c3 + part * g.C + c0, nc);
  }
}

// Adds a padded token's dq, dk, dv (d values each) into the pad_qkv gradient row of its head.
template <typename acc_t>
void add_pad_gradient(double* row, const acc_t* gq, const acc_t* gk, const acc_t* gv, int64_t d, int64_t C) {
  for (int64_t c = 0; c < d; ++c) {
    row[c] += static_cast<double>(gq[c]);
    row[C + c] += static_cast<double>(gk[c]);
    row[2 * C + c] += static_cast<double>(gv[c]);
  }
}

// A thread's float64 gradient accumulators (null when not wanted): dense bias (heads, N, N), pad_qkv
// row (3C), v2's sum(dS * cos) per head.
struct Sinks {
  double* bias;
  double* pad;
  double* ls;
};

// ----------------------------------------------------------------------------------------------------
// Plain-loop units of the fused op (every dtype, v1 and v2, any head dim): per-head copies into Work.

template <typename acc_t>
struct PlainUnits {
  Work<acc_t> w;
  PlainUnits(const Params<acc_t>& p, const MapGeometry&, bool backward) : w(p, backward) {}

  void window(WindowStage<acc_t>&, const Params<acc_t>&, const MapGeometry&, const acc_t*) {}

  void gather(const WindowStage<acc_t>& st, const Params<acc_t>& p, const MapGeometry& g, int64_t h, bool backward) {
    const int64_t c3 = 3 * g.C;
    for (int64_t t = 0; t < g.N; ++t) {
      const acc_t* row = st.in.data() + t * c3 + h * g.d;
      w.put(t, row, row + g.C, row + 2 * g.C, p, backward);
    }
  }

  void forward(WindowStage<acc_t>& st, const Params<acc_t>& p, const MapGeometry& g, int64_t h) {
    gather(st, p, g, h, false);
    w.forward(p, h, nullptr, st.mixed ? st.label.data() : nullptr);
    for (int64_t t = 0; t < g.N; ++t) {
      std::memcpy(st.res.data() + t * g.C + h * g.d, w.dq.data() + t * w.dp, g.d * sizeof(acc_t));
      st.lse[t * g.heads + h] = w.lse[t];
    }
  }

  void backward(WindowStage<acc_t>& st, const Params<acc_t>& p, const MapGeometry& g, int64_t h, const Sinks& sk) {
    const int64_t c3 = 3 * g.C;
    gather(st, p, g, h, true);
    for (int64_t t = 0; t < g.N; ++t)
      std::memcpy(w.dout.data() + t * w.dp, st.go.data() + t * g.C + h * g.d, g.d * sizeof(acc_t));
    const double dt = w.backward(p, h, nullptr, st.mixed ? st.label.data() : nullptr,
                                 sk.bias ? sk.bias + h * g.N * g.N : nullptr);
    if (sk.ls) sk.ls[h] += dt;
    for (int64_t t = 0; t < g.N; ++t) {
      const acc_t* gq = w.dq.data() + t * w.dp;
      const acc_t* gk = w.dk.data() + t * w.dp;
      const acc_t* gv = w.dv.data() + t * w.dp;
      if (st.pos[t] >= 0) {
        acc_t* row = st.res.data() + t * c3 + h * g.d;
        std::memcpy(row, gq, g.d * sizeof(acc_t));
        std::memcpy(row + g.C, gk, g.d * sizeof(acc_t));
        std::memcpy(row + 2 * g.C, gv, g.d * sizeof(acc_t));
      } else if (sk.pad) {
        add_pad_gradient(sk.pad + h * g.d, gq, gk, gv, g.d, g.C);
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------------
// SIMD units of the fused op (float32, head dim a multiple of V::W). The unit works on the staged
// window rows in place (row stride 3C) instead of per-head copies: once per window, v1 multiplies the q
// part of the stage by the scale and v2 normalises q and k of every head (x / max(|x|, eps), the norms
// kept); K^T (and V^T for the backward) are the only per-head copies. S = bias + t Q K^T inside the GEMM
// (v1: t = 1, Q = scale q; v2: t the head's clamped logit multiplier, Q, K normalised); the mask of a
// mixed window is built once per window from the token labels. The forward computes E = exp(S - max)
// and O = (E V) / rowsum(E) (the division on the d outputs, not on the N probabilities); the backward
// rebuilds P = exp(S - lse) from the forward's lse in one pass and takes the products straight from and
// into the staged rows: dP = dO V^T, dS = P (dP - rowsum(P dP) / rowsum(P)), dV = P^T dO, then v1:
// dQ = scale dS K, dK = dS^T (scale q); v2: G = dS Kn, H = dS^T Qn, sum(dS * cos) = sum_i Qn_i . G_i,
// and dQ, dK through the normalisation of t G, t H. Row buffers are N x Np, Np = N rounded up to W (the
// bias too).
#if VLM_WA_SIMD
template <class V>
struct FastWork {
  using reg = typename V::reg;
  static constexpr int W = V::W;
  int64_t N, Np, d;
  std::vector<float> kt, vt;  // d x Np (columns >= N stay zero)
  std::vector<float> s, dpb;  // N x Np: S / E / P, dP / dS
  std::vector<float> mask;    // N x Np: the window's additive mask (mixed windows)
  std::vector<float> rmax, inv;  // per row: max(S), 1 / rowsum(E)
  FastWork(int64_t n, int64_t dd, bool backward)
      : N(n), Np(round_up(n, W)), d(dd), kt(dd * Np, 0.0f), s(n * Np, 0.0f), mask(n * Np, 0.0f), rmax(n), inv(n) {
    if (backward) {
      vt.assign(dd * Np, 0.0f);
      dpb.assign(n * Np, 0.0f);
    }
  }

  // The transpose of N rows of d values (stride ld) into dst (d x Np, zero beyond N), in W x W blocks
  // transposed in registers.
  void transpose(const float* x, int64_t ld, float* dst) const {
    for (int64_t t0 = 0; t0 < Np; t0 += W)
      for (int64_t c0 = 0; c0 < d; c0 += W) {
        reg r[W];
        for (int i = 0; i < W; ++i) r[i] = t0 + i < N ? V::load(x + (t0 + i) * ld + c0) : V::zero();
        V::transpose(r);
        for (int i = 0; i < W; ++i) V::store(dst + (c0 + i) * Np + t0, r[i]);
      }
  }

  // v1, once per window: scale the staged q part (C values per token, row stride c3).
  void scale_q(float* in, int64_t C, int64_t c3, float scale) const {
    const reg sc = V::set1(scale);
    for (int64_t t = 0; t < N; ++t) {
      float* q = in + t * c3;
      for (int64_t c = 0; c < C; c += W) V::store(q + c, V::mul(V::load(q + c), sc));
    }
  }

  // x[0, d) <- x / max(|x|, eps); returns |x|, *den = max(|x|, eps).
  float normalise(float* x, float* den) const {
    reg sq = V::zero();
    for (int64_t c = 0; c < d; c += W) {
      const reg v = V::load(x + c);
      sq = V::fmadd(v, v, sq);
    }
    const float norm = d == 1 ? std::fabs(x[0]) : std::sqrt(V::hsum(sq));  // one channel: |x|, as eager
    *den = std::max(norm, static_cast<float>(kNormEps));
    const reg dv = V::set1(*den);
    for (int64_t c = 0; c < d; c += W) V::store(x + c, V::div(V::load(x + c), dv));
    return norm;
  }

  // g[0, d) <- the gradient of x / max(|x|, eps) for dy = t g, given y = x / max(|x|, eps).
  void normalise_backward(const float* y, float* g, float norm, float den, float t) const {
    const reg tv = V::set1(t);
    reg dot = V::zero();
    for (int64_t c = 0; c < d; c += W) {
      const reg gv = V::mul(tv, V::load(g + c));
      V::store(g + c, gv);
      dot = V::fmadd(V::load(y + c), gv, dot);
    }
    const reg dv = V::set1(norm >= static_cast<float>(kNormEps) ? V::hsum(dot) : 0.0f);
    const reg dn = V::set1(den);
    for (int64_t c = 0; c < d; c += W) {
      const reg gv = V::load(g + c), yv = V::load(y + c);
      V::store(g + c, V::sub(V::div(gv, dn), V::div(V::mul(yv, dv), dn)));
    }
  }

  // Once per window: the additive mask from the labels when the window is mixed.
  void build_mask(const int* label, bool mixed) {
    if (!mixed) return;
    const float mval = static_cast<float>(kMaskValue);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) mask[i * Np + j] = label[i] != label[j] ? mval : 0.0f;
  }

  // S = bias_h + t Q K^T (Q: the staged q rows of the head; bias_h: N x Np or null).
  void logits(const float* q, const float* k, int64_t ld, const float* bias_h, float t) {
    transpose(k, ld, kt.data());
    Epilogue ep;
    ep.init = bias_h;
    ep.alpha = t;
    gemm_simd<V>(N, Np, d, q, ld, 1, kt.data(), Np, s.data(), Np, ep);
  }

  // Forward: o (row stride ldo) = softmax(S [+ mask]) V; lse[t * lse_ld] per row.
  void forward(const float* q, const float* k, const float* v, int64_t ld, const float* bias_h, float t, bool mixed,
               float* o, int64_t ldo, float* lse, int64_t lse_ld) {
    logits(q, k, ld, bias_h, t);
    // Row maxima first, then the exponentials: rows independent of each other, which the out-of-order
    // core overlaps (one row's max -> exp -> sum chain alone is latency-bound).
    for (int64_t i = 0; i < N; ++i) rmax[i] = row_max<V>(s.data() + i * Np, mixed ? mask.data() + i * Np : nullptr, N);
    for (int64_t i = 0; i < N; ++i) inv[i] = row_exp<V>(s.data() + i * Np, mixed ? mask.data() + i * Np : nullptr, N, rmax[i]);
    for (int64_t i = 0; i < N; ++i) {
      lse[i * lse_ld] = rmax[i] + std::log(inv[i]);
      inv[i] = 1.0f / inv[i];
    }
    Epilogue ep;
    ep.rs = inv.data();
    gemm_simd<V>(N, d, N, s.data(), Np, 1, v, ld, o, ldo, ep);
  }

  // Backward of one head. go: dO rows (stride ldg; zero rows for padded queries); lse per row (stride
  // lse_ld; ignored where real[i] is 0: those rows take their own softmax); results into rows of stride
  // ldr: dv = P^T dO, dq = q_alpha dS K,
  // dk = dS^T Q. Adds dS into dbias (N x N float64) when given.
  void backward(const float* q, const float* k, const float* v, int64_t ld, const float* bias_h, float t, bool mixed,
                const float* go, int64_t ldg, const float* lse, int64_t lse_ld, const uint8_t* real, float q_alpha,
                float* dq, float* dk, float* dv, int64_t ldr, double* dbias) {
    logits(q, k, ld, bias_h, t);
    transpose(v, ld, vt.data());
    gemm_simd<V>(N, Np, d, go, ldg, 1, vt.data(), Np, dpb.data(), Np);  // dP = dO V^T
    const int64_t last = Np - W;
    const typename V::mask tail = V::lanes(N - last);
    for (int64_t i = 0; i < N; ++i) {
      float* prow = s.data() + i * Np;
      float* drow = dpb.data() + i * Np;
      const float* mrow = mask.data() + i * Np;
      reg pd = V::zero(), ps = V::zero();
      if (real[i]) {
        const reg l = V::set1(lse[i * lse_ld]);
        for (int64_t j = 0; j <= last; j += W) {
          reg x = V::load(prow + j);
          if (mixed) x = V::add(x, V::load(mrow + j));
          reg p = V::exp(V::sub(x, l));
          if (j == last) p = V::select(tail, p, V::zero());
          V::store(prow + j, p);
          pd = V::fmadd(p, V::load(drow + j), pd);
          ps = V::add(ps, p);
        }
      } else {
        // A padded query is cropped: its dO row is 0, so dS = P (0 - 0) = 0 exactly -- unless its logits
        // or V hold NaN / inf, where eager autograd gives a NaN row (P NaN, or dP = 0 * inf) that reaches
        // the bias, pad and k, v gradients. Computed as eager does, from the row's own softmax (no lse is
        // kept for it).
        const float* add = mixed ? mrow : nullptr;
        const float m = row_max<V>(prow, add, N);
        const reg inv = V::set1(1.0f / row_exp<V>(prow, add, N, m));  // e in prow, 0 past N
        for (int64_t j = 0; j <= last; j += W) {
          const reg p = V::mul(V::load(prow + j), inv);
          V::store(prow + j, p);
          pd = V::fmadd(p, V::load(drow + j), pd);
          ps = V::add(ps, p);
        }
      }
      // D = rowsum(P dP) / rowsum(P): the rows of dS sum to zero to rounding even where P's rows sum to
      // one only to rounding.
      const reg D = V::set1(V::hsum(pd) / V::hsum(ps));
      for (int64_t j = 0; j <= last; j += W)
        V::store(drow + j, V::mul(V::load(prow + j), V::sub(V::load(drow + j), D)));
      if (dbias) {
        double* br = dbias + i * N;
        for (int64_t j = 0; j < N; ++j) br[j] += static_cast<double>(drow[j]);
      }
    }
    gemm_simd<V>(N, d, N, s.data(), 1, Np, go, ldg, dv, ldr);  // dV = P^T dO
    Epilogue sc;
    sc.alpha = q_alpha;
    gemm_simd<V>(N, d, N, dpb.data(), Np, 1, k, ld, dq, ldr, sc);  // dQ = q_alpha dS K
    gemm_simd<V>(N, d, N, dpb.data(), 1, Np, q, ld, dk, ldr);      // dK = dS^T Q
  }
};

template <class V>
struct FastUnits {
  FastWork<V> fw;
  std::vector<uint8_t> real;             // per token of the window: not a padded token
  std::vector<float> norm, den;          // v2: |x| and max(|x|, eps) of q (rows [0, N)) and k ([N, 2N)), x heads
  FastUnits(const Params<float>& p, const MapGeometry& g, bool backward)
      : fw(g.N, g.d, backward), real(g.N), norm(p.cosine ? 2 * g.N * g.heads : 0), den(norm.size()) {}

  // Once per window; `lse` (backward): the forward's, gathered into the stage.
  void window(WindowStage<float>& st, const Params<float>& p, const MapGeometry& g, const float* lse) {
    const int64_t c3 = 3 * g.C;
    if (p.cosine) {
      for (int64_t part = 0; part < 2; ++part)
        for (int64_t t = 0; t < g.N; ++t)
          for (int64_t h = 0; h < g.heads; ++h) {
            const int64_t at = (part * g.N + t) * g.heads + h;
            norm[at] = fw.normalise(st.in.data() + t * c3 + part * g.C + h * g.d, &den[at]);
          }
    } else {
      fw.scale_q(st.in.data(), g.C, c3, p.scale);
    }
    fw.build_mask(st.label.data(), st.mixed);
    if (!lse) return;
    for (int64_t t = 0; t < g.N; ++t) {
      real[t] = st.pos[t] >= 0;
      if (real[t]) std::memcpy(st.lse.data() + t * g.heads, lse + st.pos[t] * g.heads, g.heads * sizeof(float));
    }
  }

  void forward(WindowStage<float>& st, const Params<float>& p, const MapGeometry& g, int64_t h) {
    const float* row = st.in.data() + h * g.d;
    fw.forward(row, row + g.C, row + 2 * g.C, 3 * g.C, p.bias ? p.bias + h * g.N * fw.Np : nullptr,
               p.cosine ? p.mult[h] : 1.0f, st.mixed, st.res.data() + h * g.d, g.C, st.lse.data() + h, g.heads);
  }

  // Results in place in the stage; padded tokens' gradients go to pad_qkv.
  void backward(WindowStage<float>& st, const Params<float>& p, const MapGeometry& g, int64_t h, const Sinks& sk) {
    const int64_t c3 = 3 * g.C;
    const float* row = st.in.data() + h * g.d;
    float* res = st.res.data() + h * g.d;
    const float t = p.cosine ? p.mult[h] : 1.0f;
    fw.backward(row, row + g.C, row + 2 * g.C, c3, p.bias ? p.bias + h * g.N * fw.Np : nullptr, t, st.mixed,
                st.go.data() + h * g.d, g.C, st.lse.data() + h, g.heads, real.data(), p.cosine ? 1.0f : p.scale,
                res, res + g.C, res + 2 * g.C, c3, sk.bias ? sk.bias + h * g.N * g.N : nullptr);
    if (p.cosine) {  // res holds G = dS Kn, H = dS^T Qn
      double dt = 0.0;
      for (int64_t i = 0; i < g.N; ++i) {
        const float* qn = row + i * c3;
        float* gq = res + i * c3;
        typename V::reg dot = V::zero();
        for (int64_t c = 0; c < g.d; c += V::W) dot = V::fmadd(V::load(qn + c), V::load(gq + c), dot);
        dt += static_cast<double>(V::hsum(dot));
        const int64_t aq = i * g.heads + h, ak = (g.N + i) * g.heads + h;
        fw.normalise_backward(qn, gq, norm[aq], den[aq], t);
        fw.normalise_backward(qn + g.C, gq + g.C, norm[ak], den[ak], t);
      }
      if (sk.ls) sk.ls[h] += dt;
    }
    if (sk.pad)
      for (int64_t i = 0; i < g.N; ++i)
        if (!real[i]) add_pad_gradient(sk.pad + h * g.d, res + i * c3, res + i * c3 + g.C, res + i * c3 + 2 * g.C, g.d, g.C);
  }
};
#endif  // VLM_WA_SIMD

// ----------------------------------------------------------------------------------------------------
// The fused op's loops over units with a unit kernel (PlainUnits or FastUnits).

template <class Units, typename scalar_t, typename acc_t>
void map_forward_units(const MapGeometry& g, const Params<acc_t>& p, const scalar_t* x, const scalar_t* pad,
                       scalar_t* o, acc_t* l) {
  at::parallel_for(0, g.windows() * g.heads, 1, [&](int64_t u0, int64_t u1) {
    WindowStage<acc_t> st(g, false);
    Units units(p, g, false);
    const int64_t win_end = (u1 + g.heads - 1) / g.heads;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u % g.heads, win = u / g.heads;
      if (win != st.win) {
        flush_forward(st, g, o, l);
        load_window<scalar_t, acc_t>(st, g, win, x, pad, nullptr);
        units.window(st, p, g, nullptr);
      }
      if (win + 1 < win_end)
        prefetch_window<scalar_t>(st, g, win + 1, x, nullptr, h * g.N / g.heads, (h + 1) * g.N / g.heads);
      units.forward(st, p, g, h);
      if (st.h_lo < 0) st.h_lo = h;
      st.h_hi = h;
    }
    flush_forward(st, g, o, l);
  });
}

template <class Units, typename scalar_t, typename acc_t>
void map_backward_units(const MapGeometry& g, const Params<acc_t>& p, const scalar_t* x, const scalar_t* pad,
                        const scalar_t* gop, const acc_t* lse, scalar_t* dx, Accumulators* acc_bias,
                        Accumulators* acc_pad, Accumulators* acc_ls) {
  at::parallel_for(0, g.windows() * g.heads, 1, [&](int64_t u0, int64_t u1) {
    WindowStage<acc_t> st(g, true);
    Units units(p, g, true);
    const Sinks sk{acc_bias ? acc_bias->mine() : nullptr, acc_pad ? acc_pad->mine() : nullptr,
                   acc_ls ? acc_ls->mine() : nullptr};
    const int64_t win_end = (u1 + g.heads - 1) / g.heads;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u % g.heads, win = u / g.heads;
      if (win != st.win) {
        flush_backward(st, g, dx);
        load_window<scalar_t, acc_t>(st, g, win, x, pad, gop);
        units.window(st, p, g, lse);
      }
      if (win + 1 < win_end)
        prefetch_window<scalar_t>(st, g, win + 1, x, gop, h * g.N / g.heads, (h + 1) * g.N / g.heads);
      units.backward(st, p, g, h, sk);
      if (st.h_lo < 0) st.h_lo = h;
      st.h_hi = h;
    }
    flush_backward(st, g, dx);
  });
}

template <typename scalar_t, typename acc_t>
void map_forward(const at::Tensor& qkv, const std::optional<at::Tensor>& pad_qkv,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ls, const MapGeometry& g,
                 double scale, at::Tensor& out, at::Tensor& lse) {
  std::vector<acc_t> bias_store;
  const Params<acc_t> p = map_params<scalar_t, acc_t>(g, bias, ls, scale, bias_store);
  const std::vector<scalar_t> pad = pad_row<scalar_t>(pad_qkv, 3 * g.C);
  const scalar_t* x = qkv.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  acc_t* l = lse.mutable_data_ptr<acc_t>();
  if constexpr (std::is_same_v<acc_t, float>) {
#if VLM_WA_V16
    if (fast_width(p) == 16) return map_forward_units<FastUnits<V16>>(g, p, x, pad.data(), o, l);
#endif
#if VLM_WA_V8
    if (fast_width(p) == 8) return map_forward_units<FastUnits<V8>>(g, p, x, pad.data(), o, l);
#endif
#if VLM_WA_V4
    if (fast_width(p) == 4) return map_forward_units<FastUnits<V4>>(g, p, x, pad.data(), o, l);
#endif
  }
  map_forward_units<PlainUnits<acc_t>>(g, p, x, pad.data(), o, l);
}

template <typename scalar_t, typename acc_t>
void map_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse,
                  const std::optional<at::Tensor>& pad_qkv,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& ls, const MapGeometry& g,
                  double scale, at::Tensor& dqkv, at::Tensor& dpad, at::Tensor& dbias, at::Tensor& dls) {
  std::vector<acc_t> bias_store;
  const Params<acc_t> p = map_params<scalar_t, acc_t>(g, bias, ls, scale, bias_store);
  const std::vector<scalar_t> pad = pad_row<scalar_t>(pad_qkv, 3 * g.C);
  const scalar_t* x = qkv.const_data_ptr<scalar_t>();
  const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dx = dqkv.mutable_data_ptr<scalar_t>();
  const acc_t* lse_p = lse.const_data_ptr<acc_t>();
  const bool want_bias = present(bias), want_pad = present(pad_qkv), want_ls = p.cosine;
  Accumulators acc_bias(want_bias ? g.heads * g.N * g.N : 0), acc_pad(want_pad ? 3 * g.C : 0),
      acc_ls(want_ls ? g.heads : 0);
  Accumulators* ab = want_bias ? &acc_bias : nullptr;
  Accumulators* ap = want_pad ? &acc_pad : nullptr;
  Accumulators* al = want_ls ? &acc_ls : nullptr;
  bool done = false;
  if constexpr (std::is_same_v<acc_t, float>) {
#if VLM_WA_V16
    if (!done && fast_width(p) == 16) {
      map_backward_units<FastUnits<V16>>(g, p, x, pad.data(), gop, lse_p, dx, ab, ap, al);
      done = true;
    }
#endif
#if VLM_WA_V8
    if (!done && fast_width(p) == 8) {
      map_backward_units<FastUnits<V8>>(g, p, x, pad.data(), gop, lse_p, dx, ab, ap, al);
      done = true;
    }
#endif
#if VLM_WA_V4
    if (!done && fast_width(p) == 4) {
      map_backward_units<FastUnits<V4>>(g, p, x, pad.data(), gop, lse_p, dx, ab, ap, al);
      done = true;
    }
#endif
  }
  if (!done) map_backward_units<PlainUnits<acc_t>>(g, p, x, pad.data(), gop, lse_p, dx, ab, ap, al);
  if (want_bias) dbias = bias_gradient<scalar_t>(acc_bias.reduce(), *bias, g.heads, g.N, g.mh, g.mw);
  if (want_pad) dpad = from_double<scalar_t>(acc_pad.reduce(), *pad_qkv);
  if (want_ls) dls = logit_scale_gradient<scalar_t, acc_t>(acc_ls.reduce(), p, *ls);
}
// ----------------------------------------------------------------------------------------------------
// Attention on partitioned windows (B*nW, heads, N, d)

struct WindowsGeometry {
  int64_t BW, heads, N, d, nW;
};

WindowsGeometry windows_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& ls, const char* fn) {
  TORCH_CHECK(q.dim() == 4, fn, ": q must be (B*nW, heads, N, d), got ", q.sizes());
  check_common(q, q, fn, "q");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), fn, ": q must be floating point, got ", q.scalar_type());
  check_common(k, q, fn, "k");
  check_common(v, q, fn, "v");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), fn, ": k and v must have q's shape ", q.sizes());
  WindowsGeometry g{q.size(0), q.size(1), q.size(2), q.size(3), 1};
  if (present(bias)) {
    check_common(*bias, q, fn, "bias");
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == g.heads && bias->size(1) == g.N && bias->size(2) == g.N, fn,
                ": bias must be (heads, N, N), got ", bias->sizes());
  }
  if (present(mask)) {
    check_common(*mask, q, fn, "mask");
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) > 0 && mask->size(1) == g.N && mask->size(2) == g.N &&
                    g.BW % mask->size(0) == 0,
                fn, ": mask must be (nW, N, N) with nW dividing B*nW, got ", mask->sizes());
    g.nW = mask->size(0);
  }
  if (present(ls)) {
    check_common(*ls, q, fn, "logit_scale");
    TORCH_CHECK(ls->numel() == g.heads, fn, ": logit_scale must have heads elements, got ", ls->sizes());
  }
  return g;
}

template <typename scalar_t, typename acc_t>
Params<acc_t> windows_params(const WindowsGeometry& g, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& ls, double scale, std::vector<acc_t>& bias_store) {
  Params<acc_t> p;
  p.N = g.N;
  p.Np = round_up(g.N, kPlainPad);
  p.d = g.d;
  p.dp = round_up(g.d, kPlainPad);
  p.heads = g.heads;
  p.scale = static_cast<acc_t>(scale);
  fill_logit_scale<scalar_t, acc_t>(p, ls);
  if (present(bias)) {
    bias_store = dense_bias<scalar_t, acc_t>(*bias, g.heads, g.N, p.Np, 0, 0);
    p.bias = bias_store.data();
  }
  return p;
}

// (nW, N, Np) copy of the mask in the accumulation type (empty when absent).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> padded_mask(const std::optional<at::Tensor>& mask, int64_t N) {
  if (!present(mask)) return {};
  const int64_t nW = mask->size(0), Np = round_up(N, kPlainPad);
  std::vector<acc_t> out(nW * N * Np, acc_t(0));
  const scalar_t* m = mask->const_data_ptr<scalar_t>();
  for (int64_t w = 0; w < nW; ++w)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) out[(w * N + i) * Np + j] = to_acc<acc_t>(m[(w * N + i) * N + j]);
  return out;
}

template <typename scalar_t, typename acc_t>
void windows_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                     const std::optional<at::Tensor>& ls, const WindowsGeometry& g, double scale, at::Tensor& out,
                     at::Tensor& lse) {
  std::vector<acc_t> bias_store;
  const Params<acc_t> p = windows_params<scalar_t, acc_t>(g, bias, ls, scale, bias_store);
  const std::vector<acc_t> masks = padded_mask<scalar_t, acc_t>(mask, g.N);
  const scalar_t *qp = q.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>(),
                 *vp = v.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  acc_t* l = lse.mutable_data_ptr<acc_t>();
  at::parallel_for(0, g.BW * g.heads, 1, [&](int64_t u0, int64_t u1) {
    Work<acc_t> w(p, false);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u % g.heads, base = u * g.N * g.d;
      for (int64_t t = 0; t < g.N; ++t)
        w.put(t, qp + base + t * g.d, kp + base + t * g.d, vp + base + t * g.d, p, false);
      const acc_t* m = masks.empty() ? nullptr : masks.data() + ((u / g.heads) % g.nW) * g.N * p.Np;
      w.forward(p, h, m, nullptr);
      for (int64_t t = 0; t < g.N; ++t) {
        for (int64_t c = 0; c < g.d; ++c) o[base + t * g.d + c] = static_cast<scalar_t>(w.dq[t * w.dp + c]);
        l[u * g.N + t] = w.lse[t];
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void windows_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                      const std::optional<at::Tensor>& ls, const WindowsGeometry& g, double scale, at::Tensor& dq,
                      at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias, at::Tensor& dls) {
  std::vector<acc_t> bias_store;
  const Params<acc_t> p = windows_params<scalar_t, acc_t>(g, bias, ls, scale, bias_store);
  const std::vector<acc_t> masks = padded_mask<scalar_t, acc_t>(mask, g.N);
  const scalar_t *qp = q.const_data_ptr<scalar_t>(), *kp = k.const_data_ptr<scalar_t>(),
                 *vp = v.const_data_ptr<scalar_t>(), *gp = grad_out.const_data_ptr<scalar_t>();
  scalar_t *dqp = dq.mutable_data_ptr<scalar_t>(), *dkp = dk.mutable_data_ptr<scalar_t>(),
           *dvp = dv.mutable_data_ptr<scalar_t>();
  const bool want_bias = present(bias), want_ls = p.cosine;
  const int64_t NN = g.N * g.N;
  Accumulators acc_bias(want_bias ? g.heads * NN : 0), acc_ls(want_ls ? g.heads : 0);
  at::parallel_for(0, g.BW * g.heads, 1, [&](int64_t u0, int64_t u1) {
    Work<acc_t> w(p, true);
    double* db = want_bias ? acc_bias.mine() : nullptr;
    double* dl = want_ls ? acc_ls.mine() : nullptr;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = u % g.heads, base = u * g.N * g.d;
      for (int64_t t = 0; t < g.N; ++t) {
        w.put(t, qp + base + t * g.d, kp + base + t * g.d, vp + base + t * g.d, p, true);
        for (int64_t c = 0; c < g.d; ++c) w.dout[t * w.dp + c] = to_acc<acc_t>(gp[base + t * g.d + c]);
      }
      const acc_t* m = masks.empty() ? nullptr : masks.data() + ((u / g.heads) % g.nW) * g.N * p.Np;
      const double dt = w.backward(p, h, m, nullptr, db ? db + h * NN : nullptr);
      if (dl) dl[h] += dt;
      for (int64_t t = 0; t < g.N; ++t)
        for (int64_t c = 0; c < g.d; ++c) {
          dqp[base + t * g.d + c] = static_cast<scalar_t>(w.dq[t * w.dp + c]);
          dkp[base + t * g.d + c] = static_cast<scalar_t>(w.dk[t * w.dp + c]);
          dvp[base + t * g.d + c] = static_cast<scalar_t>(w.dv[t * w.dp + c]);
        }
    }
  });
  if (want_bias) dbias = from_double<scalar_t>(acc_bias.reduce(), *bias);
  if (want_ls) dls = logit_scale_gradient<scalar_t, acc_t>(acc_ls.reduce(), p, *ls);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor zeros_of(at::IntArrayRef sizes, at::TensorOptions options) { return at::zeros(sizes, options); }
at::Tensor empty_of(at::IntArrayRef sizes, at::TensorOptions options) { return at::empty(sizes, options); }

at::Tensor zeros_like_opt(const std::optional<at::Tensor>& t) {
  return present(t) ? at::zeros(t->sizes(), t->options()) : at::Tensor();
}

#define VLM_WA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_forward_cpu(
    const at::Tensor& qkv, const std::optional<at::Tensor>& pad_qkv, const std::optional<at::Tensor>& rel_pos_bias,
    const std::optional<at::Tensor>& logit_scale, int64_t num_heads, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  constexpr const char* fn = "window_attention_forward_cpu";
  const MapGeometry g = map_geometry(qkv, num_heads, window, shift, fn);
  check_map_inputs(qkv, g, pad_qkv, rel_pos_bias, logit_scale, fn);
  // Every real (token, head) is written by exactly one unit: no zero fill needed.
  const auto alloc = qkv.numel() == 0 ? &zeros_of : &empty_of;
  at::Tensor out = alloc({g.B, g.H, g.W, g.C}, qkv.options());
  at::Tensor lse = alloc({g.B, g.H, g.W, g.heads}, qkv.options().dtype(acc_type(qkv.scalar_type())));
  if (qkv.numel() == 0) return {out, lse};
  VLM_WA_DISPATCH(qkv.scalar_type(), fn, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    map_forward<scalar_t, acc_t>(qkv, pad_qkv, rel_pos_bias, logit_scale, g, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& pad_qkv, const std::optional<at::Tensor>& rel_pos_bias,
    const std::optional<at::Tensor>& logit_scale, int64_t num_heads, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  constexpr const char* fn = "window_attention_backward_cpu";
  const MapGeometry g = map_geometry(qkv, num_heads, window, shift, fn);
  check_map_inputs(qkv, g, pad_qkv, rel_pos_bias, logit_scale, fn);
  check_common(grad_out, qkv, fn, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.B && grad_out.size(1) == g.H && grad_out.size(2) == g.W &&
                  grad_out.size(3) == g.C,
              fn, ": grad_out must be (B, H, W, C) = (", g.B, ", ", g.H, ", ", g.W, ", ", g.C, "), got ",
              grad_out.sizes());
  (void)out;
  TORCH_CHECK(lse.scalar_type() == acc_type(qkv.scalar_type()) && lse.is_contiguous() && lse.dim() == 4 &&
                  lse.size(0) == g.B && lse.size(1) == g.H && lse.size(2) == g.W && lse.size(3) == g.heads,
              fn, ": lse must be the forward's contiguous (B, H, W, num_heads) = (", g.B, ", ", g.H, ", ", g.W, ", ",
              g.heads, ") ", acc_type(qkv.scalar_type()), " tensor, got ", lse.sizes(), " ", lse.scalar_type());
  at::Tensor dqkv = (qkv.numel() == 0 ? &zeros_of : &empty_of)(qkv.sizes(), qkv.options());
  at::Tensor dpad = zeros_like_opt(pad_qkv), dbias = zeros_like_opt(rel_pos_bias), dls = zeros_like_opt(logit_scale);
  if (qkv.numel() == 0) return {dqkv, dpad, dbias, dls};
  VLM_WA_DISPATCH(qkv.scalar_type(), fn, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    map_backward<scalar_t, acc_t>(grad_out, qkv, lse, pad_qkv, rel_pos_bias, logit_scale, g, scale, dqkv, dpad, dbias,
                                  dls);
  });
  return {dqkv, dpad, dbias, dls};
}

std::tuple<at::Tensor, at::Tensor> windowed_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, double scale, const std::optional<at::Tensor>& logit_scale) {
  constexpr const char* fn = "windowed_attention_forward_cpu";
  const WindowsGeometry g = windows_geometry(q, k, v, bias, mask, logit_scale, fn);
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::zeros({g.BW, g.heads, g.N}, q.options().dtype(acc_type(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  VLM_WA_DISPATCH(q.scalar_type(), fn, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    windows_forward<scalar_t, acc_t>(q, k, v, bias, mask, logit_scale, g, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> windowed_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask, double scale,
    const std::optional<at::Tensor>& logit_scale) {
  constexpr const char* fn = "windowed_attention_backward_cpu";
  const WindowsGeometry g = windows_geometry(q, k, v, bias, mask, logit_scale, fn);
  check_common(grad_out, q, fn, "grad_out");
  TORCH_CHECK(grad_out.sizes() == q.sizes(), fn, ": grad_out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes());
  (void)out;
  (void)lse;
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(q.sizes(), q.options()),
             dv = at::zeros(q.sizes(), q.options());
  at::Tensor dbias = zeros_like_opt(bias), dls = zeros_like_opt(logit_scale);
  if (q.numel() == 0) return {dq, dk, dv, dbias, dls};
  VLM_WA_DISPATCH(q.scalar_type(), fn, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    windows_backward<scalar_t, acc_t>(grad_out, q, k, v, bias, mask, logit_scale, g, scale, dq, dk, dv, dbias, dls);
  });
  return {dq, dk, dv, dbias, dls};
}

}  // namespace VLM_CPU_LEVEL
}  // namespace vlm

#undef VLM_WA_DISPATCH
#undef VLM_WA_SIMD
#undef VLM_WA_V4
#undef VLM_WA_EVEX
#undef VLM_WA_V8
#undef VLM_WA_V16

// Schemas here, kernels for the CPU dispatch key: registered once, by the baseline build, with the entry
// points of the level chosen at load time.
#if VLM_CPU_BASE_BUILD
#define VLM_CPU_HEADER "cpu/window_attention.h"
#include "cpu/other_levels.h"

TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def(
      "window_attention_forward_cpu(Tensor qkv, Tensor? pad_qkv, Tensor? rel_pos_bias, Tensor? logit_scale, "
      "int num_heads, int[] window, int[] shift, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attention_backward_cpu(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor? pad_qkv, "
      "Tensor? rel_pos_bias, Tensor? logit_scale, int num_heads, int[] window, int[] shift, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "windowed_attention_forward_cpu(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, float scale, "
      "Tensor? logit_scale) -> (Tensor, Tensor)");
  m.def(
      "windowed_attention_backward_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? bias, Tensor? mask, float scale, Tensor? logit_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vlm_kernels_C, CPU, m) {
  m.impl("window_attention_forward_cpu", VLM_CPU_PICK(window_attention_forward_cpu));
  m.impl("window_attention_backward_cpu", VLM_CPU_PICK(window_attention_backward_cpu));
  m.impl("windowed_attention_forward_cpu", VLM_CPU_PICK(windowed_attention_forward_cpu));
  m.impl("windowed_attention_backward_cpu", VLM_CPU_PICK(windowed_attention_backward_cpu));
}
#endif  // VLM_CPU_BASE_BUILD
#endif  // VLM_CPU_INCLUDES_ONLY
