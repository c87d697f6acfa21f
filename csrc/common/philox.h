// Counter-based Philox4x32-10 and the Gumbel noise built on it, shared by every compiled backend.
//
// Bit-for-bit contract (mirrored in vlm_kernels/reference/philox.py and vlm_kernels/triton/philox.py):
//   * Element i of a tensor (its linear index in the contiguous tensor) takes word i mod 4 of the
//     Philox4x32-10 call at counter c = i div 4: counter words (c lo32, c hi32, 0, 0), key (seed lo32,
//     seed hi32). The four words of one call are Triton's tl.randint4x(seed, c), so one call serves the
//     4 elements 4c .. 4c + 3 (every backend computes it once per aligned group of 4 where it can).
//   * uniform: r = word as int32, r = r < 0 ? -r - 1 : r, u = float(r) * 4.6566127342e-10f: tl.rand's
//     mapping exactly, u in [0, 1 - 6e-8].
//   * vlm_logf (below): correctly rounded fp32 fused multiply-adds (std::fmaf, __fmaf_rn, tl.fma; the
//     PyTorch reference emulates them in float64) plus exact operations, so every backend computes the
//     same bits. Max error 1.15 ulp over [4.6e-10, 22] (exhaustive); vlm_logf(0) = fp32(-127 ln 2).
//   * noise g = -vlm_logf(-vlm_logf(u)): finite for every u (0 included), so Gumbel-argmax and hard
//     samples are identical on every backend.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VLM_HD __host__ __device__ __forceinline__
#else
#define VLM_HD inline
#endif

namespace vlm {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // largest s with (2^31 - 1) * s < 1 in fp32

// log1p(f) = f + f^2 (-1/2 + f P(f)) for f = m - 1, m in [sqrt(1/2), sqrt(2)); P of degree 6, a
// least-squares fit (max relative error 3.2e-8) refined on the fp32 evaluation. Each constant is the exact
// fp32 value of its literal (their bits: 3db226f6 be1214a2 3e18b984 be29c1ad 3e4c6c24 be8001bf 3eaaab6c).
constexpr float kLogP0 = 0.086988375f;
constexpr float kLogP1 = -0.14265683f;
constexpr float kLogP2 = 0.14914519f;
constexpr float kLogP3 = -0.16577788f;
constexpr float kLogP4 = 0.19963127f;
constexpr float kLogP5 = -0.25001332f;
constexpr float kLogP6 = 0.3333391f;
constexpr float kLn2 = 0.693147182f;  // fp32 ln 2, 0x3f317218; e * kLn2 is exact inside the fma

// The 20 round keys of a seed: (seed lo32, seed hi32) plus r times the Weyl increments. Kernels take them
// as an argument (a constant-bank operand of each XOR on the GPU, no key schedule per call).
struct PhiloxKey {
  uint32_t k0[10], k1[10];
};
VLM_HD PhiloxKey philox_key(uint64_t seed) {
  PhiloxKey key;
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, a += kPhiloxKeyA, b += kPhiloxKeyB) {
    key.k0[r] = a;
    key.k1[r] = b;
  }
  return key;
}

// hi:lo = a * b, one widening multiply (IMAD.WIDE.U32 on the GPU: PTX mul.lo + mul.hi of the same operands
// fuse into it, while a 64-bit product in C++ costs an extra add).
VLM_HD void mul_wide(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  asm("mul.lo.u32 %0, %2, %3;\n\tmul.hi.u32 %1, %2, %3;" : "=r"(lo), "=r"(hi) : "r"(a), "r"(b));
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10 for counter (c0, c1, 0, 0) and `key`: out[0..3] = its four output words (tl.randint4x).
VLM_HD void philox4(uint32_t c0, uint32_t c1, const PhiloxKey& key, uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_b, lo_b, hi_a, lo_a;
    mul_wide(kPhiloxRoundB, c2, hi_b, lo_b);
    mul_wide(kPhiloxRoundA, c0, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ key.k0[round];
    c2 = hi_a ^ c3 ^ key.k1[round];
    c1 = lo_b;
    c3 = lo_a;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Correctly rounded fp32 a * b + c (one rounding) on host and device.
VLM_HD float fmaf_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

VLM_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  union { uint32_t u; float f; } v{b};
  return v.f;
#endif
}
VLM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } v{f};
  return v.u;
#endif
}

// -log(x) for x positive normal fp32 or 0, same bits on every backend: exact integer/fp32 steps and
// correctly rounded fmas only. With b = bits(x), e = (b - 0x3f3504f3) >> 23 (arithmetic) puts the
// mantissa m = bits(b - (e << 23)) in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), r = log1p(f) by the fmas
// below, and the result is -fma(e, kLn2, r) = fma(e, -kLn2, -r) (one rounding; RN is symmetric). e is kept
// as th = e << 23: float(th) is exact and float(th) * (kLn2 * 2^-23) == e * kLn2, so the product inside the
// last fma is the same. neg_vlm_logf(0) = fp32(127 ln 2).
VLM_HD float neg_vlm_logf(float x) {
  const uint32_t b = float_to_bits(x);
  const uint32_t th = (b - 0x3f3504f3u) & 0xff800000u;  // e << 23, two's complement
  const float f = bits_to_float(b - th) - 1.0f;
  float p = fmaf_rn(f, kLogP0, kLogP1);
  p = fmaf_rn(p, f, kLogP2);
  p = fmaf_rn(p, f, kLogP3);
  p = fmaf_rn(p, f, kLogP4);
  p = fmaf_rn(p, f, kLogP5);
  p = fmaf_rn(p, f, kLogP6);
  p = fmaf_rn(p, f, -0.5f);
  const float r = fmaf_rn(p, f * f, f);  // log1p(f); f * f only feeds a multiplicand
  return fmaf_rn(static_cast<float>(static_cast<int32_t>(th)), -kLn2 / 8388608.0f, -r);
}

// Natural log, the exact negation of neg_vlm_logf (vlm_logf(0) = fp32(-127 ln 2)).
VLM_HD float vlm_logf(float x) { return -neg_vlm_logf(x); }

// tl.rand's uniform in [0, 1) of a raw Philox word.
VLM_HD float uniform_from_bits(uint32_t bits) {
  const int32_t r = static_cast<int32_t>(bits);
  return static_cast<float>(r ^ (r >> 31)) * kUniformScale;  // r < 0 ? -r - 1 : r
}

// Gumbel(0, 1) noise -log(-log(u)) of a raw Philox word. Always finite.
VLM_HD float noise_from_bits(uint32_t bits) { return neg_vlm_logf(neg_vlm_logf(uniform_from_bits(bits))); }

// The four words of the Philox call at `counter` (elements 4 counter .. 4 counter + 3).
VLM_HD void philox_words(const PhiloxKey& key, uint64_t counter, uint32_t words[4]) {
  philox4(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), key, words);
}
VLM_HD void philox_words(uint64_t seed, uint64_t counter, uint32_t words[4]) {
  philox_words(philox_key(seed), counter, words);
}

// Noise of the four elements 4 counter + j, j = 0..3: one Philox call.
VLM_HD void gumbel_noise4(const PhiloxKey& key, uint64_t counter, float out[4]) {
  uint32_t w[4];
  philox_words(key, counter, w);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = noise_from_bits(w[j]);
}
VLM_HD void gumbel_noise4(uint64_t seed, uint64_t counter, float out[4]) { gumbel_noise4(philox_key(seed), counter, out); }

// Gumbel(0, 1) noise for element `offset` of a tensor (a whole Philox call for one word: use
// gumbel_noise4 for aligned groups of four).
VLM_HD float gumbel_noise(const PhiloxKey& key, uint64_t offset) {
  uint32_t w[4];
  philox_words(key, offset >> 2, w);
  const uint32_t j = static_cast<uint32_t>(offset & 3);  // a select, not an indexed (local-memory) load
  return noise_from_bits(j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3]);
}
VLM_HD float gumbel_noise(uint64_t seed, uint64_t offset) { return gumbel_noise(philox_key(seed), offset); }

}  // namespace vlm
