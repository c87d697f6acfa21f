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

VLM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1): out[0..3] = its four output words.
VLM_HD void philox4(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
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

// Natural log of a positive normal fp32 value (or of 0, giving fp32(-127 ln 2)), same bits on every
// backend: exact integer/fp32 steps and correctly rounded fmas only.
VLM_HD float vlm_logf(float x) {
  const int32_t b = static_cast<int32_t>(float_to_bits(x));
  const int32_t e = (b - 0x3f3504f3) >> 23;  // arithmetic shift: mantissa lands in [sqrt(1/2), sqrt(2))
  const float f = bits_to_float(static_cast<uint32_t>(b) - (static_cast<uint32_t>(e) << 23)) - 1.0f;  // exact
  float p = fmaf_rn(f, kLogP0, kLogP1);
  p = fmaf_rn(p, f, kLogP2);
  p = fmaf_rn(p, f, kLogP3);
  p = fmaf_rn(p, f, kLogP4);
  p = fmaf_rn(p, f, kLogP5);
  p = fmaf_rn(p, f, kLogP6);
  p = fmaf_rn(p, f, -0.5f);
  const float r = fmaf_rn(p, f * f, f);  // log1p(f); f * f only feeds a multiplicand
  return fmaf_rn(static_cast<float>(e), kLn2, r);
}

// tl.rand's uniform in [0, 1) of a raw Philox word.
VLM_HD float uniform_from_bits(uint32_t bits) {
  const int32_t r = static_cast<int32_t>(bits);
  return static_cast<float>(r ^ (r >> 31)) * kUniformScale;  // r < 0 ? -r - 1 : r
}

// Gumbel(0, 1) noise -log(-log(u)) of a raw Philox word. Always finite.
VLM_HD float noise_from_bits(uint32_t bits) { return -vlm_logf(-vlm_logf(uniform_from_bits(bits))); }

// The four words of the Philox call at `counter` (elements 4 counter .. 4 counter + 3) under `seed`.
VLM_HD void philox_words(uint64_t seed, uint64_t counter, uint32_t words[4]) {
  philox4(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), static_cast<uint32_t>(seed),
          static_cast<uint32_t>(seed >> 32), words);
}

// Noise of the four elements 4 counter + j, j = 0..3: one Philox call.
VLM_HD void gumbel_noise4(uint64_t seed, uint64_t counter, float out[4]) {
  uint32_t w[4];
  philox_words(seed, counter, w);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = noise_from_bits(w[j]);
}

// Gumbel(0, 1) noise for element `offset` of a tensor under `seed` (a whole Philox call for one word:
// use gumbel_noise4 for aligned groups of four).
VLM_HD float gumbel_noise(uint64_t seed, uint64_t offset) {
  uint32_t w[4];
  philox_words(seed, offset >> 2, w);
  const uint32_t j = static_cast<uint32_t>(offset & 3);  // a select, not an indexed (local-memory) load
  return noise_from_bits(j == 0 ? w[0] : j == 1 ? w[1] : j == 2 ? w[2] : w[3]);
}

}  // namespace vlm
