// Gumbel-softmax, Gumbel-argmax and KL-to-uniform: CUDA kernels (float32 / float16 / bfloat16 in and
// out, fp32 math). Semantics: vlm_kernels/reference/gumbel.py; noise: csrc/common/philox.h.
//
// Layout. The input is viewed as (outer, K, inner), K = size(dim); each of the outer * inner reductions
// ("groups" below) has its elements at base + k * inner with base = o * K * inner + i, and element offset
// = its linear index, which picks its Philox word. A block holds R groups of G threads (G * R =
// blockDim.x <= kMaxThreads); blocks walk the groups with a grid-stride loop (grid.x only, never above
// 2^31 - 1 blocks).
//
// Gumbel kernels work on quads: 4 consecutive elements along the contiguous axis. Rows (inner == 1, dim
// is the last dim): k = 4q .. 4q + 3 of a row, one group per row, a group's G threads adjacent (quad q
// of thread `lane` is q = lane, lane + G, ...), reductions by warp shuffles (+ one shared-memory step when
// G > 32). Columns (inner > 1): a "column quad" is 4 adjacent inner positions (4 groups) and its quad q
// is category k = q of the 4; the R column quads of a block are adjacent, so a warp reads R * 4
// neighbouring positions of a category, and the G threads of a column quad sit in different warps and
// reduce through a shared-memory tree. No transposed copy is made. With `aligned` (rows: K % 4 == 0;
// columns: inner % 4 == 0) a quad is one Philox call (vlm::gumbel_noise4: its 4 words) and one 16-byte
// (fp32) or 8-byte load or store (the host copies an input view that is not 4-element aligned); otherwise
// each element takes its own call (the same bits) and its own access.
//
// Each thread keeps up to kQuads quads in registers when the layout is aligned and the group's quads fit
// (K <= 8192 for columns, K <= 32768 for rows, at 512 threads per group): the logits are read once, the
// noise made once. Longer or unaligned groups take an online softmax (running max + rescaled sum) and a
// second pass that re-reads the logits and regenerates the noise. Argmax and hard samples need one read whatever K: the one-hot is written from
// the index alone. The backward keeps y in registers (8 quads per thread: K <= 16384 for rows, <= 4096 for
// columns) and reads dy twice (its second read comes from L2: a block's share is at most 64 KB);
// longer groups take two passes.
//
// Bit-exactness: z = float(logit) + noise, the noise of philox.h (correctly rounded fmas), so hard samples
// and argmax equal the CPU and reference bit for bit; the argmax combine is a total order (NaN largest,
// then value, then lowest index), so the reduction order cannot change the winner.
#include "gumbel.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"

namespace {

constexpr int kMaxThreads = 512;  // threads per block (a power of two): __launch_bounds__ gives 128 registers
constexpr int kItems = 16;        // KL: elements a thread keeps in registers on the one-read path
constexpr int kColumnGroups = 32; // KL: groups per block in the column layout (one per lane of a warp)
constexpr double kLog2e = 1.4426950408889634;
constexpr int kQuads = 16;        // Gumbel: quads (64 elements) a thread keeps in registers on the one-read path
constexpr int kArgQuads = 4;      // Gumbel-argmax: quads a thread has in flight per step

// ---------------------------------------------------------------------------------------------------
// Geometry.

struct Layout {
  int64_t K;       // reduction length
  int64_t inner;   // stride between consecutive k of a group
  int64_t groups;  // outer * inner reductions
  int64_t blocks;  // ceil(groups / R): block indices walked by the grid-stride loop
  int G;           // threads per group (power of two)
  int R;           // groups per block (Gumbel columns: column quads per block)
  bool rows;       // inner == 1: a group's threads are adjacent
  // Gumbel kernels only (quads):
  int64_t quads = 0;      // quads per group: rows ceil(K / 4), columns K
  int64_t col_quads = 0;  // columns: column quads per outer index, ceil(inner / 4)
  bool aligned = false;   // a quad is one Philox call and one vector access (rows: K % 4 == 0; columns:
                          // inner % 4 == 0; the host aligns every pointer to 4 elements then)
};

// This thread's group and lane within the block handling block index `blk`.
struct Slot {
  int gib;       // group in block
  int lane;      // thread within the group
  int64_t group; // global group index (o * inner + i): also the index of the reduced output
  int64_t base;  // offset of element k = 0
  bool valid;    // group < groups
};

__device__ __forceinline__ Slot slot_of(const Layout& L, int64_t blk) {
  const int t = static_cast<int>(threadIdx.x);
  Slot s;
  s.gib = L.rows ? t / L.G : t % L.R;
  s.lane = L.rows ? t % L.G : t / L.R;
  s.group = blk * L.R + s.gib;
  s.valid = s.group < L.groups;
  const int64_t o = s.group / L.inner;
  const int64_t i = s.group - o * L.inner;
  s.base = o * L.K * L.inner + i;
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Reduction values, their combines (all commutative: every lane of a group gets identical bits) and
// warp shuffles.

// Max that propagates NaN, as torch.amax does: a NaN anywhere makes the whole row NaN downstream.
__device__ __forceinline__ float nan_max(float a, float b) { return (isnan(a) || a > b) ? a : b; }

struct ArgMax {
  float v;
  int idx;
};
// Total order: NaN beats any number, a larger value beats a smaller one, then the lower index wins.
__device__ __forceinline__ ArgMax argmax_combine(ArgMax a, ArgMax b) {
  const bool an = isnan(a.v), bn = isnan(b.v);
  if (an != bn) return an ? a : b;
  if (!an && a.v != b.v) return a.v > b.v ? a : b;
  return a.idx <= b.idx ? a : b;
}

// Online softmax state of exp2((z - m) * scale2), scale2 = log2(e) / tau: max m, sum s, and a second sum t
// rescaled like s (sum dy * exp2(...) for the hard backward; unused, 0, elsewhere).
struct Stats {
  float m, s, t;
};
__device__ __forceinline__ Stats stats_rebase(Stats a, float m, float scale) {
  if (a.m == m) return a;  // also -inf == -inf: nothing accumulated yet
  const float alpha = exp2f((a.m - m) * scale);
  return {m, a.s * alpha, a.t * alpha};
}
__device__ __forceinline__ Stats stats_combine(Stats a, Stats b, float scale) {
  const float m = nan_max(a.m, b.m);
  a = stats_rebase(a, m, scale);
  b = stats_rebase(b, m, scale);
  return {m, a.s + b.s, a.t + b.t};
}
// Adds element z (with weight w for t).
__device__ __forceinline__ Stats stats_add(Stats a, float z, float w, float scale) {
  a = stats_rebase(a, nan_max(a.m, z), scale);
  const float e = z == -INFINITY ? 0.f : exp2f((z - a.m) * scale);  // no exp2(-inf - -inf)
  return {a.m, a.s + e, a.t + w * e};
}

// KL state: max m, s = sum exp(l - m), t = sum exp(l - m) (l - m) over terms with exp(l - m) != 0. The
// guards test != 0 (never > 0) so a NaN term, alpha or t still propagates (0 log 0 = 0 only).
__device__ __forceinline__ Stats kl_rebase(Stats a, float m) {
  if (a.m == m) return a;
  const float alpha = expf(a.m - m);
  // t + s (m_a - m), times alpha; when alpha underflows the old terms vanish (and s (m_a - m) may
  // overflow), when s == 0 (m_a still -inf) there is nothing to rebase.
  const float t = (alpha != 0.f && a.s != 0.f) ? (a.t + a.s * (a.m - m)) * alpha : a.t * 0.f;
  return {m, a.s * alpha, t};
}
__device__ __forceinline__ Stats kl_combine(Stats a, Stats b) {
  const float m = nan_max(a.m, b.m);
  a = kl_rebase(a, m);
  b = kl_rebase(b, m);
  return {m, a.s + b.s, a.t + b.t};
}
__device__ __forceinline__ Stats kl_add(Stats a, float l) {
  a = kl_rebase(a, nan_max(a.m, l));
  if (l == -INFINITY) return a;  // p = 0: no term (0 log 0 = 0)
  const float d = l - a.m;
  const float e = expf(d);
  return {a.m, a.s + e, e != 0.f ? a.t + e * d : a.t};
}

struct Sum2 {
  float a, b;
};

__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ int shfl_xor(int v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ ArgMax shfl_xor(ArgMax v, int mask) { return {shfl_xor(v.v, mask), shfl_xor(v.idx, mask)}; }
__device__ __forceinline__ Stats shfl_xor(Stats v, int mask) {
  return {shfl_xor(v.m, mask), shfl_xor(v.s, mask), shfl_xor(v.t, mask)};
}
__device__ __forceinline__ Sum2 shfl_xor(Sum2 v, int mask) { return {shfl_xor(v.a, mask), shfl_xor(v.b, mask)}; }

// Reduces v over the G threads of each group; every thread of the group gets the result. Must be
// called by every thread of the block (it may __syncthreads), with the same L.
template <typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, const Layout& L, const Slot& s, Op op) {
  __shared__ T buf[kMaxThreads];
  if (L.rows) {
    // A group's lanes are adjacent and aligned inside a warp (G divides 32), or (G > 32) the group is
    // made of whole warps.
    const int width = L.G < 32 ? L.G : 32;
    for (int off = width >> 1; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
    if (L.G <= 32) return v;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    if ((threadIdx.x & 31) == 0) buf[warp] = v;
    __syncthreads();
    const int first = (s.gib * L.G) >> 5;  // the group's first warp (groups of G > 32 are whole warps)
    T r = buf[first];
    for (int w = 1; w < (L.G >> 5); ++w) r = op(r, buf[first + w]);
    __syncthreads();  // buf is reused by the next reduction
    return r;
  }
  // Column layout: element (group gib, lane) at buf[lane * R + gib]; a tree over the lanes.
  buf[s.lane * L.R + s.gib] = v;
  __syncthreads();
  for (int stride = L.G >> 1; stride > 0; stride >>= 1) {
    if (s.lane < stride) {
      const int here = s.lane * L.R + s.gib;
      buf[here] = op(buf[here], buf[here + stride * L.R]);
    }
    __syncthreads();
  }
  const T r = buf[s.gib];
  __syncthreads();
  return r;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return nan_max(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Sum2Op {
  __device__ Sum2 operator()(Sum2 x, Sum2 y) const { return {x.a + y.a, x.b + y.b}; }
};
struct ArgMaxOp {
  __device__ ArgMax operator()(ArgMax a, ArgMax b) const { return argmax_combine(a, b); }
};
struct StatsOp {
  float scale;
  __device__ Stats operator()(Stats a, Stats b) const { return stats_combine(a, b, scale); }
};
struct KlOp {
  __device__ Stats operator()(Stats a, Stats b) const { return kl_combine(a, b); }
};

// ---------------------------------------------------------------------------------------------------
// Element access.

template <typename scalar_t>
__device__ __forceinline__ float load_f32(const scalar_t* p, int64_t off) {
  return static_cast<float>(p[off]);
}

// ---------------------------------------------------------------------------------------------------
// Quads (Gumbel kernels).

// S values per thread: one statistic per group a quad touches (rows: 1, columns: 4).
template <typename T, int S>
struct Arr {
  T v[S];
};
template <typename T, int S>
__device__ __forceinline__ Arr<T, S> shfl_xor(Arr<T, S> a, int mask) {
#pragma unroll
  for (int j = 0; j < S; ++j) a.v[j] = shfl_xor(a.v[j], mask);
  return a;
}
// A combine applied slot by slot.
template <typename Op>
struct Each {
  Op op;
  template <typename T, int S>
  __device__ __forceinline__ Arr<T, S> operator()(Arr<T, S> a, const Arr<T, S>& b) const {
#pragma unroll
    for (int j = 0; j < S; ++j) a.v[j] = op(a.v[j], b.v[j]);
    return a;
  }
};
template <typename T, int S>
__device__ __forceinline__ Arr<T, S> filled(T value) {
  Arr<T, S> a;
#pragma unroll
  for (int j = 0; j < S; ++j) a.v[j] = value;
  return a;
}

// A thread's slot: Slot's group and lane (columns: the group is the column quad o * col_quads + p and
// base the offset of its quad 0), plus the quad stride and, for columns, how many of the 4 positions exist.
struct QSlot : Slot {
  int64_t qstride;  // offset from quad q to quad q + 1: 4 (rows) or inner (columns)
  int width;        // columns: min(4, inner - 4p); rows: 4
};

template <bool ROWS>
__device__ __forceinline__ QSlot qslot_of(const Layout& L, int64_t blk) {
  const int t = static_cast<int>(threadIdx.x);
  QSlot s;
  s.gib = ROWS ? t / L.G : t % L.R;
  s.lane = ROWS ? t % L.G : t / L.R;
  s.group = blk * L.R + s.gib;
  s.valid = s.group < L.groups;
  if (ROWS) {
    s.base = s.group * L.K;
    s.qstride = 4;
    s.width = 4;
  } else {
    const int64_t o = s.group / L.col_quads, p = s.group - o * L.col_quads;
    s.base = o * L.K * L.inner + 4 * p;
    s.qstride = L.inner;
    s.width = static_cast<int>(min(int64_t{4}, L.inner - 4 * p));
  }
  return s;
}

// Elements of quad q of the slot (0 past the group's end or in an invalid slot).
template <bool ROWS>
__device__ __forceinline__ int quad_size(const Layout& L, const QSlot& s, int64_t q) {
  if (!s.valid || q >= L.quads) return 0;
  return ROWS ? static_cast<int>(min(int64_t{4}, L.K - 4 * q)) : s.width;
}
// How many quads the slot's thread owns (q = lane + i G, i < count), at most `cap`.
__device__ __forceinline__ int thread_quads(const Layout& L, const QSlot& s, int cap) {
  if (!s.valid || s.lane >= L.quads) return 0;
  return static_cast<int>(min(static_cast<int64_t>(cap), (L.quads - s.lane + L.G - 1) / L.G));
}

// The statistic slot of element j of a quad, and its index along K.
template <bool ROWS>
__device__ __forceinline__ int stat_of(int j) {
  return ROWS ? 0 : j;
}
template <bool ROWS>
__device__ __forceinline__ int k_of(int64_t q, int j) {
  return static_cast<int>(ROWS ? 4 * q + j : q);
}

// Vector access of an aligned quad: 16 bytes (fp32) or 8 bytes (fp16 / bf16) as one integer vector, so the
// compiler never splits it.
__device__ __forceinline__ void load4(const float* p, float out[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
__device__ __forceinline__ void store4(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename half_t>  // c10::Half, c10::BFloat16: 16-bit storage
__device__ __forceinline__ void load4(const half_t* p, float out[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const uint16_t bits[4] = {static_cast<uint16_t>(v.x), static_cast<uint16_t>(v.x >> 16), static_cast<uint16_t>(v.y),
                            static_cast<uint16_t>(v.y >> 16)};
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = static_cast<float>(half_t(bits[j], half_t::from_bits()));
}
template <typename half_t>
__device__ __forceinline__ void store4(half_t* p, const float v[4]) {
  uint16_t bits[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) bits[j] = static_cast<half_t>(v[j]).x;
  *reinterpret_cast<uint2*>(p) = make_uint2(bits[0] | (uint32_t{bits[1]} << 16), bits[2] | (uint32_t{bits[3]} << 16));
}

// The n (<= 4) elements of the quad at `off` as fp32, `fill` for the others. VEC: an aligned quad (n == 4,
// off a multiple of 4, the pointer 4-element aligned: the host guarantees it), one vector access.
template <bool VEC, typename scalar_t>
__device__ __forceinline__ void load_quad(const scalar_t* p, int64_t off, int n, float fill, float out[4]) {
  if (VEC) {
    load4(p + off, out);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = j < n ? static_cast<float>(p[off + j]) : fill;
  }
}

template <bool VEC, typename scalar_t>
__device__ __forceinline__ void store_quad(scalar_t* p, int64_t off, int n, const float v[4]) {
  if (VEC) {
    store4(p + off, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < n) p[off + j] = static_cast<scalar_t>(v[j]);
    }
  }
}

// The same with the layout's alignment known only at run time (the loops of the long and unaligned paths;
// the one-read paths are aligned by construction and use VEC = true, so no loop is duplicated per case).
template <typename scalar_t>
__device__ __forceinline__ void load_quad(const scalar_t* p, int64_t off, int n, bool aligned, float fill, float out[4]) {
  if (aligned) {
    load_quad<true>(p, off, n, fill, out);
  } else {
    load_quad<false>(p, off, n, fill, out);
  }
}
template <typename scalar_t>
__device__ __forceinline__ void store_quad(scalar_t* p, int64_t off, int n, bool aligned, const float v[4]) {
  if (aligned) {
    store_quad<true>(p, off, n, v);
  } else {
    store_quad<false>(p, off, n, v);
  }
}

// The noise of a call: the round keys of its seed (a kernel argument: the keys are constant-bank operands).
struct Noise {
  vlm::PhiloxKey key;
};

// One Philox call per element, for quads that straddle calls (unaligned layouts; only in loops that keep
// nothing per element, so the 4 inlined copies cost code size, not registers).
__device__ __forceinline__ float element_noise(const vlm::PhiloxKey& key, uint64_t offset) {
  return vlm::gumbel_noise(key, offset);
}

// z = logit + Gumbel noise for the n elements of the quad at `off` (-inf for the others), bit-identical to
// every backend.
// ALIGNED_ONLY: the caller has checked L.aligned (the one-read paths, whose unrolled loops must not hold
// a call: its frame would spill their registers).
template <bool ALIGNED_ONLY = false, typename scalar_t>
__device__ __forceinline__ void perturbed_quad(const scalar_t* x, int64_t off, int n, const Layout& L, const Noise& nz,
                                               float z[4]) {
  if (ALIGNED_ONLY || L.aligned) {  // off is a multiple of 4: the quad is the call at counter off / 4
    float g[4];
    vlm::gumbel_noise4(nz.key, static_cast<uint64_t>(off) >> 2, g);
    load_quad<true>(x, off, n, -INFINITY, z);
#pragma unroll
    for (int j = 0; j < 4; ++j) z[j] = __fadd_rn(z[j], g[j]);
  } else {
    load_quad<false>(x, off, n, -INFINITY, z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < n) z[j] = __fadd_rn(z[j], element_noise(nz.key, static_cast<uint64_t>(off + j)));
    }
  }
}

// 2^x with one MUFU.EX2 (max error 2 ulp; results below 2^-126, probabilities under 1.2e-38, flush to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Running argmax of a thread over its elements in increasing k: the first element is taken, then a
// strictly larger one (the first maximum stays) or the first NaN (which then stays).
__device__ __forceinline__ void argmax_step(ArgMax& best, float z, int k) {
  if (best.idx == INT_MAX || z > best.v || (isnan(z) && !isnan(best.v))) best = ArgMax{z, k};
}

// ---------------------------------------------------------------------------------------------------
// Gumbel kernels.

template <typename scalar_t, bool ROWS>
__global__ void __launch_bounds__(kMaxThreads)
    gumbel_softmax_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Layout L, Noise nz,
                                  float scale2) {
  constexpr int S = ROWS ? 1 : 4;
  using F = Arr<float, S>;
  const bool cached = L.aligned && L.quads <= static_cast<int64_t>(L.G) * kQuads;
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const QSlot s = qslot_of<ROWS>(L, blk);
    if (cached) {  // aligned: whole quads; this thread's are at off0 + i * step, i < nq
      const int nq = thread_quads(L, s, kQuads);
      const int64_t off0 = s.base + s.lane * s.qstride, step = static_cast<int64_t>(L.G) * s.qstride;
      float z[kQuads][4];
      F m = filled<float, S>(-INFINITY);
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {
        if (i < nq) {
          perturbed_quad<true>(x, off0 + i * step, 4, L, nz, z[i]);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) z[i][j] = -INFINITY;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) m.v[stat_of<ROWS>(j)] = fmaxf(m.v[stat_of<ROWS>(j)], z[i][j]);
      }
      m = group_reduce(m, L, s, Each<MaxOp>{});
      F sum = filled<float, S>(0.f);
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // Padding (-inf) gives 0; a NaN anywhere makes the sum, so the whole group, NaN.
          z[i][j] = fast_exp2((z[i][j] - m.v[stat_of<ROWS>(j)]) * scale2);
          sum.v[stat_of<ROWS>(j)] += z[i][j];
        }
      }
      sum = group_reduce(sum, L, s, Each<SumOp>{});
      F r;
#pragma unroll
      for (int j = 0; j < S; ++j) r.v[j] = 1.f / sum.v[j];
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {
        if (i >= nq) continue;
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = z[i][j] * r.v[stat_of<ROWS>(j)];
        store_quad<true>(y, off0 + i * step, 4, v);
      }
    } else {
      Arr<Stats, S> st = filled<Stats, S>(Stats{-INFINITY, 0.f, 0.f});
      for (int64_t q = s.lane; q < L.quads && s.valid; q += L.G) {
        const int n = quad_size<ROWS>(L, s, q);
        float z[4];
        perturbed_quad(x, s.base + q * s.qstride, n, L, nz, z);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < n) st.v[stat_of<ROWS>(j)] = stats_add(st.v[stat_of<ROWS>(j)], z[j], 0.f, scale2);
        }
      }
      st = group_reduce(st, L, s, Each<StatsOp>{StatsOp{scale2}});
      for (int64_t q = s.lane; q < L.quads && s.valid; q += L.G) {
        const int n = quad_size<ROWS>(L, s, q);
        float z[4];
        perturbed_quad(x, s.base + q * s.qstride, n, L, nz, z);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const Stats& t = st.v[stat_of<ROWS>(j)];
          z[j] = fast_exp2((z[j] - t.m) * scale2) * (1.f / t.s);
        }
        store_quad(y, s.base + q * s.qstride, n, L.aligned, z);
      }
    }
  }
}

// Gumbel-argmax of each group: writes the one-hot sample (ONE_HOT) or the int64 index. One read.
template <typename scalar_t, bool ROWS, bool ONE_HOT>
__global__ void __launch_bounds__(kMaxThreads)
    gumbel_argmax_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t* __restrict__ index, Layout L,
                         Noise nz) {
  constexpr int S = ROWS ? 1 : 4;
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const QSlot s = qslot_of<ROWS>(L, blk);
    Arr<ArgMax, S> best = filled<ArgMax, S>(ArgMax{-INFINITY, INT_MAX});  // loses to any element
    if (L.aligned) {  // whole quads, kArgQuads independent Philox calls in flight per thread
      const int64_t step = static_cast<int64_t>(L.G) * s.qstride;
      for (int64_t q0 = s.lane; q0 < L.quads && s.valid; q0 += kArgQuads * L.G) {
        const int64_t off0 = s.base + q0 * s.qstride;
#pragma unroll
        for (int i = 0; i < kArgQuads; ++i) {
          const int64_t q = q0 + static_cast<int64_t>(i) * L.G;
          if (q < L.quads) {
            float z[4];
            perturbed_quad<true>(x, off0 + i * step, 4, L, nz, z);
#pragma unroll
            for (int j = 0; j < 4; ++j) argmax_step(best.v[stat_of<ROWS>(j)], z[j], k_of<ROWS>(q, j));
          }
        }
      }
    } else {
      for (int64_t q = s.lane; q < L.quads && s.valid; q += L.G) {
        const int n = quad_size<ROWS>(L, s, q);
        float z[4];
        perturbed_quad(x, s.base + q * s.qstride, n, L, nz, z);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < n) argmax_step(best.v[stat_of<ROWS>(j)], z[j], k_of<ROWS>(q, j));
        }
      }
    }
    best = group_reduce(best, L, s, Each<ArgMaxOp>{});
    if (!s.valid) continue;  // after the last reduction of this block index: no barrier below
    if (ONE_HOT) {
      // The whole group is NaN wherever its soft sample is (eager's y_hard - sg(y_soft) + y_soft): the
      // winner is NaN (the group holds one), +inf (inf - inf) or -inf (only -inf: -inf - -inf).
      const float nan = __int_as_float(0x7fc00000);
      float one[S], zero[S];
#pragma unroll
      for (int j = 0; j < S; ++j) {
        one[j] = isfinite(best.v[j].v) ? 1.f : nan;
        zero[j] = isfinite(best.v[j].v) ? 0.f : nan;
      }
      const auto hot = [&](int64_t q, float v[4]) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int t = stat_of<ROWS>(j);
          v[j] = k_of<ROWS>(q, j) == best.v[t].idx ? one[t] : zero[t];
        }
      };
      if (L.aligned) {  // whole quads, vector stores, kArgQuads per step
        const int64_t step = static_cast<int64_t>(L.G) * s.qstride;
        for (int64_t q0 = s.lane; q0 < L.quads; q0 += kArgQuads * L.G) {
          const int64_t off0 = s.base + q0 * s.qstride;
#pragma unroll
          for (int i = 0; i < kArgQuads; ++i) {
            const int64_t q = q0 + static_cast<int64_t>(i) * L.G;
            if (q < L.quads) {
              float v[4];
              hot(q, v);
              store_quad<true>(y, off0 + i * step, 4, v);
            }
          }
        }
      } else {
        for (int64_t q = s.lane; q < L.quads; q += L.G) {
          float v[4];
          hot(q, v);
          store_quad<false>(y, s.base + q * s.qstride, quad_size<ROWS>(L, s, q), v);
        }
      }
    } else if (s.lane == 0) {
      if (ROWS) {
        index[s.group] = best.v[0].idx;
      } else {
        const int64_t o = s.group / L.col_quads, p = s.group - o * L.col_quads;
#pragma unroll
        for (int j = 0; j < S; ++j) {
          if (j < s.width) index[o * L.inner + 4 * p + j] = best.v[j].idx;
        }
      }
    }
  }
}

// dlogits = y * (dy - sum(dy * y)) * inv_tau; y read from `saved` or (RECOMPUTE) recomputed from the
// logits in `saved` and the seed. The one-read path keeps y in registers and reads dy twice (the second
// read of a block's at most 128 KB comes from L2).
template <typename scalar_t, bool ROWS, bool RECOMPUTE>
__global__ void __launch_bounds__(kMaxThreads)
    gumbel_softmax_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ saved,
                                   scalar_t* __restrict__ dx, Layout L, Noise nz, float scale2, float inv_tau) {
  constexpr int S = ROWS ? 1 : 4;
  // 8 quads per thread (K <= 16384 for rows, 4096 for columns, at 512 threads): 16 spill here, where dy's
  // quads and the recomputed softmax share the registers (offline sm_90 compile).
  constexpr int Q = kQuads / 2;
  using F = Arr<float, S>;
  const bool cached = L.aligned && L.quads <= static_cast<int64_t>(L.G) * Q;
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const QSlot s = qslot_of<ROWS>(L, blk);
    F dot = filled<float, S>(0.f);
    if (cached) {
      float yv[Q][4];
      if (RECOMPUTE) {  // y = softmax(z / tau), as in the forward
        F m = filled<float, S>(-INFINITY);
#pragma unroll
        for (int i = 0; i < Q; ++i) {
          const int64_t q = s.lane + static_cast<int64_t>(i) * L.G;
          const int n = quad_size<ROWS>(L, s, q);
          if (n > 0) {
            perturbed_quad<true>(saved, s.base + q * s.qstride, n, L, nz, yv[i]);
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) yv[i][j] = -INFINITY;
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) m.v[stat_of<ROWS>(j)] = fmaxf(m.v[stat_of<ROWS>(j)], yv[i][j]);
        }
        m = group_reduce(m, L, s, Each<MaxOp>{});
        F sum = filled<float, S>(0.f);
#pragma unroll
        for (int i = 0; i < Q; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            yv[i][j] = fast_exp2((yv[i][j] - m.v[stat_of<ROWS>(j)]) * scale2);
            sum.v[stat_of<ROWS>(j)] += yv[i][j];
          }
        }
        sum = group_reduce(sum, L, s, Each<SumOp>{});
        F r;
#pragma unroll
        for (int j = 0; j < S; ++j) r.v[j] = 1.f / sum.v[j];
#pragma unroll
        for (int i = 0; i < Q; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) yv[i][j] *= r.v[stat_of<ROWS>(j)];
        }
      } else {
#pragma unroll
        for (int i = 0; i < Q; ++i) {
          const int64_t q = s.lane + static_cast<int64_t>(i) * L.G;
          const int n = quad_size<ROWS>(L, s, q);
          if (n > 0) {
            load_quad<true>(saved, s.base + q * s.qstride, n, 0.f, yv[i]);
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) yv[i][j] = 0.f;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < Q; ++i) {
        const int64_t q = s.lane + static_cast<int64_t>(i) * L.G;
        const int n = quad_size<ROWS>(L, s, q);
        if (n == 0) continue;
        float g[4];
        load_quad<true>(dy, s.base + q * s.qstride, n, 0.f, g);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < n) dot.v[stat_of<ROWS>(j)] += g[j] * yv[i][j];
        }
      }
      dot = group_reduce(dot, L, s, Each<SumOp>{});
#pragma unroll
      for (int i = 0; i < Q; ++i) {
        const int64_t q = s.lane + static_cast<int64_t>(i) * L.G;
        const int n = quad_size<ROWS>(L, s, q);
        if (n == 0) continue;
        float g[4];
        load_quad<true>(dy, s.base + q * s.qstride, n, 0.f, g);  // the second read of dy
#pragma unroll
        for (int j = 0; j < 4; ++j) g[j] = yv[i][j] * (g[j] - dot.v[stat_of<ROWS>(j)]) * inv_tau;
        store_quad<true>(dx, s.base + q * s.qstride, n, g);
      }
    } else {
      Arr<Stats, S> st = filled<Stats, S>(Stats{-INFINITY, 0.f, 0.f});
      for (int64_t q = s.lane; q < L.quads && s.valid; q += L.G) {
        const int n = quad_size<ROWS>(L, s, q);
        float g[4], v[4];
        load_quad(dy, s.base + q * s.qstride, n, L.aligned, 0.f, g);
        if (RECOMPUTE) {
          perturbed_quad(saved, s.base + q * s.qstride, n, L, nz, v);
        } else {
          load_quad(saved, s.base + q * s.qstride, n, L.aligned, 0.f, v);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j >= n) continue;
          if (RECOMPUTE) {
            st.v[stat_of<ROWS>(j)] = stats_add(st.v[stat_of<ROWS>(j)], v[j], g[j], scale2);
          } else {
            dot.v[stat_of<ROWS>(j)] += g[j] * v[j];
          }
        }
      }
      if (RECOMPUTE) {
        st = group_reduce(st, L, s, Each<StatsOp>{StatsOp{scale2}});
#pragma unroll
        for (int j = 0; j < S; ++j) dot.v[j] = st.v[j].t / st.v[j].s;
      } else {
        dot = group_reduce(dot, L, s, Each<SumOp>{});
      }
      for (int64_t q = s.lane; q < L.quads && s.valid; q += L.G) {
        const int n = quad_size<ROWS>(L, s, q);
        float g[4], v[4];
        load_quad(dy, s.base + q * s.qstride, n, L.aligned, 0.f, g);
        if (RECOMPUTE) {
          perturbed_quad(saved, s.base + q * s.qstride, n, L, nz, v);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const Stats& t = st.v[stat_of<ROWS>(j)];
            v[j] = fast_exp2((v[j] - t.m) * scale2) * (1.f / t.s);
          }
        } else {
          load_quad(saved, s.base + q * s.qstride, n, L.aligned, 0.f, v);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) g[j] = v[j] * (g[j] - dot.v[stat_of<ROWS>(j)]) * inv_tau;
        store_quad(dx, s.base + q * s.qstride, n, L.aligned, g);
      }
    }
  }
}

// KL(softmax(l) || uniform) = t / s - log s + log K (forward, one value per group) and its gradient
// grad * p_k * (l_k - m - t / s) (BACKWARD). As in the reference, terms whose p is exactly 0 contribute 0
// (so extreme finite logits give no NaN), while a group whose log-softmax is NaN everywhere (a NaN or +inf
// logit, or all -inf: m, a NaN-propagating max, is not finite) gives a NaN KL and a NaN gradient for every
// element of the group.
template <typename scalar_t, bool BACKWARD>
__global__ void __launch_bounds__(kMaxThreads)
    kl_uniform_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad, scalar_t* __restrict__ out,
                      Layout L, float log_k) {
  const bool cached = L.K <= static_cast<int64_t>(L.G) * kItems;
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const Slot s = slot_of(L, blk);
    float l[kItems];
    Stats st{-INFINITY, 0.f, 0.f};
    if (cached) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        l[j] = (s.valid && k < L.K) ? load_f32(x, s.base + k * L.inner) : -INFINITY;
        st.m = nan_max(st.m, l[j]);
      }
      st.m = group_reduce(st.m, L, s, MaxOp());
      Sum2 sums{0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if (l[j] == -INFINITY) continue;  // masked slots and p = 0 terms
        const float d = l[j] - st.m;
        const float e = expf(d);
        sums.a += e;
        if (e != 0.f) sums.b += e * d;  // 0 log 0 = 0; a NaN e stays NaN
      }
      sums = group_reduce(sums, L, s, Sum2Op());
      st.s = sums.a;
      st.t = sums.b;
    } else {
      if (s.valid) {
        for (int64_t k = s.lane; k < L.K; k += L.G) st = kl_add(st, load_f32(x, s.base + k * L.inner));
      }
      st = group_reduce(st, L, s, KlOp());
    }
    if (!s.valid) continue;
    const bool ok = isfinite(st.m);  // false for a NaN, a +inf or an all -inf group
    const float nan = __int_as_float(0x7fc00000);
    const float r = 1.f / st.s;
    if (!BACKWARD) {
      if (s.lane == 0) out[s.group] = static_cast<scalar_t>((ok ? st.t * r - logf(st.s) : nan) + log_k);
      continue;
    }
    const float g = load_f32(grad, s.group);
    const float mean = st.t * r;
    if (cached) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        if (k >= L.K) continue;
        const float d = l[j] - st.m;
        const float e = expf(d);
        out[s.base + k * L.inner] = static_cast<scalar_t>(!ok ? nan : e != 0.f ? g * (e * r) * (d - mean) : 0.f);
      }
    } else {
      for (int64_t k = s.lane; k < L.K; k += L.G) {
        const int64_t off = s.base + k * L.inner;
        const float d = load_f32(x, off) - st.m;
        const float e = expf(d);
        out[off] = static_cast<scalar_t>(!ok ? nan : e != 0.f ? g * (e * r) * (d - mean) : 0.f);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n && p < (1 << 30)) p <<= 1;
  return p;
}

void check_input(const char* fn, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), fn, ": ", arg, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", arg, " must be contiguous");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn, ": ", arg,
              " must be float32, float16 or bfloat16 (float64 runs on the reference and cpu backends), got ", st);
}

// Checks `logits` and `dim` and returns the launch layout of a reduction along `dim`.
Layout make_layout(const char* fn, const char* arg, const at::Tensor& x, int64_t dim) {
  check_input(fn, arg, x);
  TORCH_CHECK(dim >= 0 && dim < x.dim(), fn, ": dim must be in [0, ", x.dim(), ") for ", arg, " of shape ", x.sizes(),
              ", got ", dim);
  const int64_t K = x.size(dim);
  TORCH_CHECK(K >= 1, fn, ": size ", K, " of dim ", dim, " of ", arg, " must be at least 1");
  TORCH_CHECK(K <= INT_MAX, fn, ": size ", K, " of dim ", dim, " of ", arg, " must be below 2^31");
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  Layout L;
  L.K = K;
  L.inner = inner;
  L.groups = outer * inner;
  L.rows = inner == 1;
  const int threads_per_group = next_pow2((K + 3) / 4);  // about 4 elements per thread
  if (L.rows) {
    L.G = std::min(threads_per_group, kMaxThreads);
    const int block = std::max(L.G, 128);
    L.R = block / L.G;
  } else {
    L.R = kColumnGroups;
    L.G = std::min(threads_per_group, kMaxThreads / kColumnGroups);
  }
  L.blocks = (L.groups + L.R - 1) / L.R;
  return L;
}

// Checks `x` and `dim` and returns the quad layout of a Gumbel reduction along `dim`.
Layout make_quad_layout(const char* fn, const char* arg, const at::Tensor& x, int64_t dim) {
  Layout L = make_layout(fn, arg, x, dim);  // the checks, K, inner
  int64_t outer = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  L.aligned = L.rows ? L.K % 4 == 0 : L.inner % 4 == 0;
  // About 8 quads (32 elements) per thread; up to kQuads when the group needs the whole block.
  if (L.rows) {
    L.quads = (L.K + 3) / 4;
    L.groups = outer;
    L.G = std::min(next_pow2((L.quads + 7) / 8), kMaxThreads);
    L.R = std::max(1, 128 / L.G);
  } else {
    L.col_quads = (L.inner + 3) / 4;
    L.quads = L.K;
    L.groups = outer * L.col_quads;
    L.G = std::min(next_pow2((L.K + 7) / 8), kMaxThreads);
    L.R = std::max(1, std::min(32, 128 / L.G));
  }
  L.blocks = (L.groups + L.R - 1) / L.R;
  return L;
}

// An input of an aligned layout with its data pointer 4-element aligned (one vector access per quad):
// `t` itself, or a copy when `t` is a view at an odd storage offset (fresh allocations are aligned).
at::Tensor quad_aligned(const at::Tensor& t, const Layout& L) {
  const auto quad_bytes = 4 * static_cast<uintptr_t>(t.element_size());
  if (!L.aligned || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % quad_bytes == 0) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

dim3 grid_of(const Layout& L) {
  return dim3(static_cast<unsigned int>(std::min<int64_t>(L.blocks, INT_MAX)));
}
dim3 block_of(const Layout& L) { return dim3(static_cast<unsigned int>(L.G * L.R)); }

std::vector<int64_t> reduced_sizes(const at::Tensor& x, int64_t dim) {
  std::vector<int64_t> sizes;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d != dim) sizes.push_back(x.size(d));
  }
  return sizes;
}

// Calls f(scalar_t{}) for the three supported dtypes (no float64 instantiation).
template <typename F>
void dispatch_floating(at::ScalarType st, const char* fn, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, fn, ": unsupported dtype ", st);
  }
}

void check_tau(const char* fn, double tau) {
  TORCH_CHECK(tau > 0.0 && std::isfinite(tau), fn, ": tau must be a finite number > 0, got ", tau);
}

}  // namespace

at::Tensor gumbel_softmax_forward_cuda(const at::Tensor& logits, int64_t seed, double tau, bool hard, int64_t dim) {
  constexpr const char* fn = "gumbel_softmax_forward_cuda";
  check_input(fn, "logits", logits);
  check_tau(fn, tau);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Layout L = make_quad_layout(fn, "logits", logits, dim);
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (L.blocks == 0) return out;
  const at::Tensor input = quad_aligned(logits, L);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const Noise key{vlm::philox_key(static_cast<uint64_t>(seed))};
  const float scale2 = static_cast<float>(kLog2e / tau);
  dispatch_floating(logits.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* x = input.const_data_ptr<scalar_t>();
    auto* y = out.mutable_data_ptr<scalar_t>();
    if (hard && L.rows) {
      gumbel_argmax_kernel<scalar_t, true, true><<<grid_of(L), block_of(L), 0, stream>>>(x, y, nullptr, L, key);
    } else if (hard) {
      gumbel_argmax_kernel<scalar_t, false, true><<<grid_of(L), block_of(L), 0, stream>>>(x, y, nullptr, L, key);
    } else if (L.rows) {
      gumbel_softmax_forward_kernel<scalar_t, true><<<grid_of(L), block_of(L), 0, stream>>>(x, y, L, key, scale2);
    } else {
      gumbel_softmax_forward_kernel<scalar_t, false><<<grid_of(L), block_of(L), 0, stream>>>(x, y, L, key, scale2);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& saved, int64_t seed, double tau,
                                        bool hard, int64_t dim) {
  constexpr const char* fn = "gumbel_softmax_backward_cuda";
  check_input(fn, "saved", saved);
  check_input(fn, "grad", grad);
  TORCH_CHECK(grad.sizes() == saved.sizes(), fn, ": grad of shape ", grad.sizes(), " must have the shape of saved ",
              saved.sizes());
  TORCH_CHECK(grad.device() == saved.device(), fn, ": grad (", grad.device(), ") and saved (", saved.device(),
              ") must be on the same device");
  check_tau(fn, tau);
  const c10::cuda::CUDAGuard guard(saved.device());
  const Layout L = make_quad_layout(fn, "saved", saved, dim);
  at::Tensor out = at::empty_like(saved, at::MemoryFormat::Contiguous);
  if (L.blocks == 0) return out;
  const at::Tensor dy = quad_aligned(grad.scalar_type() == saved.scalar_type() ? grad : grad.to(saved.scalar_type()), L);
  const at::Tensor saved_in = quad_aligned(saved, L);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const Noise key{vlm::philox_key(static_cast<uint64_t>(seed))};
  const float inv_tau = static_cast<float>(1.0 / tau);
  const float scale2 = static_cast<float>(kLog2e / tau);
  dispatch_floating(saved.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* g = dy.const_data_ptr<scalar_t>();
    const auto* sv = saved_in.const_data_ptr<scalar_t>();
    auto* dx = out.mutable_data_ptr<scalar_t>();
    const auto launch = [&](auto rows, auto recompute) {
      gumbel_softmax_backward_kernel<scalar_t, decltype(rows)::value, decltype(recompute)::value>
          <<<grid_of(L), block_of(L), 0, stream>>>(g, sv, dx, L, key, scale2, inv_tau);
    };
    if (L.rows) {
      hard ? launch(std::true_type{}, std::true_type{}) : launch(std::true_type{}, std::false_type{});
    } else {
      hard ? launch(std::false_type{}, std::true_type{}) : launch(std::false_type{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gumbel_argmax_cuda(const at::Tensor& logits, int64_t seed, int64_t dim) {
  constexpr const char* fn = "gumbel_argmax_cuda";
  check_input(fn, "logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Layout L = make_quad_layout(fn, "logits", logits, dim);
  at::Tensor out = at::empty(reduced_sizes(logits, dim), logits.options().dtype(at::kLong));
  if (L.blocks == 0) return out;
  const at::Tensor input = quad_aligned(logits, L);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const Noise key{vlm::philox_key(static_cast<uint64_t>(seed))};
  dispatch_floating(logits.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* x = input.const_data_ptr<scalar_t>();
    auto* index = out.mutable_data_ptr<int64_t>();
    if (L.rows) {
      gumbel_argmax_kernel<scalar_t, true, false><<<grid_of(L), block_of(L), 0, stream>>>(x, nullptr, index, L, key);
    } else {
      gumbel_argmax_kernel<scalar_t, false, false><<<grid_of(L), block_of(L), 0, stream>>>(x, nullptr, index, L, key);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor categorical_kl_uniform_forward_cuda(const at::Tensor& logits, int64_t dim) {
  constexpr const char* fn = "categorical_kl_uniform_forward_cuda";
  const Layout L = make_layout(fn, "logits", logits, dim);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(reduced_sizes(logits, dim), logits.options());
  if (L.blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const float log_k = static_cast<float>(std::log(static_cast<double>(L.K)));
  dispatch_floating(logits.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    kl_uniform_kernel<scalar_t, false><<<grid_of(L), block_of(L), 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<scalar_t>(), L, log_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor categorical_kl_uniform_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, int64_t dim) {
  constexpr const char* fn = "categorical_kl_uniform_backward_cuda";
  const Layout L = make_layout(fn, "logits", logits, dim);
  check_input(fn, "grad", grad);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(reduced_sizes(logits, dim)), fn, ": grad of shape ", grad.sizes(),
              " must have the shape of logits ", logits.sizes(), " without dim ", dim);
  TORCH_CHECK(grad.device() == logits.device(), fn, ": grad (", grad.device(), ") and logits (", logits.device(),
              ") must be on the same device");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = grad.scalar_type() == logits.scalar_type() ? grad : grad.to(logits.scalar_type());
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (L.blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const float log_k = static_cast<float>(std::log(static_cast<double>(L.K)));
  dispatch_floating(logits.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    kl_uniform_kernel<scalar_t, true><<<grid_of(L), block_of(L), 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), L, log_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def("gumbel_softmax_forward_cuda(Tensor logits, int seed, float tau, bool hard, int dim) -> Tensor",
        &gumbel_softmax_forward_cuda);
  m.def("gumbel_softmax_backward_cuda(Tensor grad, Tensor saved, int seed, float tau, bool hard, int dim) -> Tensor",
        &gumbel_softmax_backward_cuda);
  m.def("gumbel_argmax_cuda(Tensor logits, int seed, int dim) -> Tensor", &gumbel_argmax_cuda);
  m.def("categorical_kl_uniform_forward_cuda(Tensor logits, int dim) -> Tensor", &categorical_kl_uniform_forward_cuda);
  m.def("categorical_kl_uniform_backward_cuda(Tensor grad, Tensor logits, int dim) -> Tensor",
        &categorical_kl_uniform_backward_cuda);
}
