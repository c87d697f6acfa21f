// Counter-based Philox4x32-10 and the Gumbel noise built on it, shared by every compiled backend.
//
// Bit-for-bit contract (mirrored in vlm_kernels/reference/philox.py and vlm_kernels/triton/philox.py):
//   * philox4x32_10(key = (seed_lo, seed_hi), counter = (c0, c1, 0, 0)) is Triton's
//     tl.philox / tl.randint with the same seed: for an element whose linear index `offset` is below
//     2^32, the first output equals tl.randint(seed, offset), so the uniform below equals
//     tl.rand(seed, offset) (except that a 0 is lifted to the smallest positive step, see below).
//     Offsets >= 2^32 put their high word in c1.
//   * uniform: r = bits as int32, r = r < 0 ? -r - 1 : r, r = max(r, 1), u = float(r) * 4.6566127342e-10f.
//     u lies in [4.66e-10, 1 - 6e-8], so -log(u) > 0 and -log(-log(u)) is always finite.
//   * vlm_logf: a fixed sequence of IEEE fp32 multiplies and adds (no FMA contraction, no division),
//     so every backend computes the same bits and Gumbel-argmax / hard samples are identical.
#pragma once

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

// Polynomial for log1p(f) = f - f^2/2 + f^3 * P(f), f in [sqrt(1/2) - 1, sqrt(2) - 1]; weighted
// least-squares fit (scripts in benchmarks/notes), max error 1.3 ulp over (0, 64].
constexpr float kLogC0 = -0.072297103703022f;
constexpr float kLogC1 = 0.12446440011262894f;
constexpr float kLogC2 = -0.13166923820972443f;
constexpr float kLogC3 = 0.1424783170223236f;
constexpr float kLogC4 = -0.166270911693573f;
constexpr float kLogC5 = 0.19999174773693085f;
constexpr float kLogC6 = -0.2500067949295044f;
constexpr float kLogC7 = 0.3333335816860199f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

VLM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox4x32-10 for counter (c0, c1, 0, 0) and key (k0, k1).
VLM_HD uint32_t philox_first(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
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
  return c0;
}

// fp32 add/mul that never contract into an FMA (device: explicit round-to-nearest intrinsics;
// host: the CPU sources are compiled with -ffp-contract=off).
VLM_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
VLM_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
VLM_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
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

// Natural log of a positive, finite, normal fp32 value, same bits on every backend.
VLM_HD float vlm_logf(float x) {
  const int32_t b = static_cast<int32_t>(float_to_bits(x));
  const int32_t e = (b - 0x3f3504f3) >> 23;  // arithmetic shift: mantissa lands in [sqrt(1/2), sqrt(2))
  const float m = bits_to_float(static_cast<uint32_t>(b) - (static_cast<uint32_t>(e) << 23));
  const float f = fsub(m, 1.0f);
  float p = kLogC0;
  p = fadd(fmul(p, f), kLogC1);
  p = fadd(fmul(p, f), kLogC2);
  p = fadd(fmul(p, f), kLogC3);
  p = fadd(fmul(p, f), kLogC4);
  p = fadd(fmul(p, f), kLogC5);
  p = fadd(fmul(p, f), kLogC6);
  p = fadd(fmul(p, f), kLogC7);
  const float z = fmul(f, f);
  const float r = fadd(fsub(f, fmul(0.5f, z)), fmul(fmul(z, f), p));
  const float ef = static_cast<float>(e);
  return fadd(fmul(ef, kLn2Hi), fadd(r, fmul(ef, kLn2Lo)));
}

// Uniform in [kUniformScale, 1) from the raw Philox word (tl.rand's mapping, 0 lifted to one step).
VLM_HD float uniform_from_bits(uint32_t bits) {
  int32_t r = static_cast<int32_t>(bits);
  r = r < 0 ? -r - 1 : r;
  r = r < 1 ? 1 : r;
  return fmul(static_cast<float>(r), kUniformScale);
}

// Gumbel(0, 1) noise for element `offset` of a tensor under `seed`: -log(-log(u)). Always finite.
VLM_HD float gumbel_noise(uint64_t seed, uint64_t offset) {
  const uint32_t bits = philox_first(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                     static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u = uniform_from_bits(bits);
  return -vlm_logf(-vlm_logf(u));
}

}  // namespace vlm
