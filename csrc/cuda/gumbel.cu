// Gumbel-softmax, Gumbel-argmax and KL-to-uniform: CUDA kernels (float32 / float16 / bfloat16 in and
// out, fp32 math). Semantics: vlm_kernels/reference/gumbel.py; noise: csrc/common/philox.h.
//
// Layout. The input is viewed as (outer, K, inner), K = size(dim); each of the outer * inner
// "groups" (one reduction along K) has its elements at base + k * inner with
// base = o * K * inner + i, and element offset = its Philox counter. A block holds R groups of G threads
// (G * R = blockDim.x <= kMaxThreads):
//   * rows layout (inner == 1, dim is the last dim): a group's G threads are adjacent, so a warp reads
//     its row(s) contiguously; reductions are warp shuffles (+ one shared-memory step when G > 32);
//   * column layout (inner > 1): the R = 32 groups are adjacent (consecutive inner positions, the
//     contiguous axis), so a warp reads 32 neighbouring columns; the G threads of a group sit in
//     different warps and reduce through a shared-memory tree. No transposed copy is made.
// Blocks walk the groups with a grid-stride loop (grid.x only, never above 2^31 - 1 blocks).
//
// Each thread owns elements k = lane, lane + G, ... of its group. When K <= G * kItems a thread keeps
// its values in registers (logits read once); otherwise an online softmax (running max + rescaled sum)
// takes one pass and a second pass re-reads the logits, regenerates the noise and writes. Argmax and
// hard samples never need the second read: the one-hot is written from the index alone.
//
// Bit-exactness: z = float(logit) + vlm::gumbel_noise(seed, offset) uses __fadd_rn/__fmul_rn, so hard
// samples and argmax equal the CPU and reference bit for bit; the argmax combine is a total order (NaN
// largest, then value, then lowest index), so the reduction order cannot change the winner.
#include "gumbel.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"

namespace {

constexpr int kMaxThreads = 512;  // threads per block (a power of two)
constexpr int kItems = 16;        // elements a thread keeps in registers on the one-read path
constexpr int kColumnGroups = 32; // groups per block in the column layout (one per lane of a warp)

// ---------------------------------------------------------------------------------------------------
// Geometry.

struct Layout {
  int64_t K;       // reduction length
  int64_t inner;   // stride between consecutive k of a group
  int64_t groups;  // outer * inner reductions
  int64_t blocks;  // ceil(groups / R): block indices walked by the grid-stride loop
  int G;           // threads per group (power of two)
  int R;           // groups per block
  bool rows;       // inner == 1: a group's threads are adjacent
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

// Online softmax state of exp((z - m) * scale): max m, sum s, and a second sum t rescaled like s
// (sum dy * exp(...) for the hard backward; unused, 0, elsewhere).
struct Stats {
  float m, s, t;
};
__device__ __forceinline__ Stats stats_rebase(Stats a, float m, float scale) {
  if (a.m == m) return a;  // also -inf == -inf: nothing accumulated yet
  const float alpha = expf((a.m - m) * scale);
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
  const float e = z == -INFINITY ? 0.f : expf((z - a.m) * scale);  // no exp(-inf - -inf)
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
    // the whole block (R == 1) and is made of whole warps.
    const int width = L.G < 32 ? L.G : 32;
    for (int off = width >> 1; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
    if (L.G <= 32) return v;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    if ((threadIdx.x & 31) == 0) buf[warp] = v;
    __syncthreads();
    T r = buf[0];
    for (int w = 1; w < (L.G >> 5); ++w) r = op(r, buf[w]);
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

// z = float(logit) + Gumbel noise of the element's offset (bit-identical on every backend).
template <typename scalar_t>
__device__ __forceinline__ float perturbed(const scalar_t* x, int64_t off, uint64_t seed) {
  return vlm::fadd(load_f32(x, off), vlm::gumbel_noise(seed, static_cast<uint64_t>(off)));
}

// ---------------------------------------------------------------------------------------------------
// Kernels.

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    gumbel_softmax_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Layout L, uint64_t seed,
                                  float inv_tau) {
  const bool cached = L.K <= static_cast<int64_t>(L.G) * kItems;
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const Slot s = slot_of(L, blk);
    if (cached) {
      float z[kItems];
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        z[j] = (s.valid && k < L.K) ? perturbed(x, s.base + k * L.inner, seed) : -INFINITY;
        m = nan_max(m, z[j]);
      }
      m = group_reduce(m, L, s, MaxOp());
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        z[j] = (s.valid && k < L.K) ? expf((z[j] - m) * inv_tau) : 0.f;
        sum += z[j];
      }
      sum = group_reduce(sum, L, s, SumOp());
      const float r = 1.f / sum;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        if (s.valid && k < L.K) y[s.base + k * L.inner] = static_cast<scalar_t>(z[j] * r);
      }
    } else {
      Stats st{-INFINITY, 0.f, 0.f};
      if (s.valid) {
        for (int64_t k = s.lane; k < L.K; k += L.G) st = stats_add(st, perturbed(x, s.base + k * L.inner, seed), 0.f, inv_tau);
      }
      st = group_reduce(st, L, s, StatsOp{inv_tau});
      const float r = 1.f / st.s;
      if (s.valid) {
        for (int64_t k = s.lane; k < L.K; k += L.G) {
          const int64_t off = s.base + k * L.inner;
          y[off] = static_cast<scalar_t>(expf((perturbed(x, off, seed) - st.m) * inv_tau) * r);
        }
      }
    }
  }
}

// Gumbel-argmax of each group: writes the one-hot sample (ONE_HOT) or the int64 index.
template <typename scalar_t, bool ONE_HOT>
__global__ void __launch_bounds__(kMaxThreads)
    gumbel_argmax_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t* __restrict__ index, Layout L,
                         uint64_t seed) {
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const Slot s = slot_of(L, blk);
    ArgMax best{-INFINITY, INT_MAX};  // loses to any element, -inf ones included (by index)
    if (s.valid) {
      for (int64_t k = s.lane; k < L.K; k += L.G) {
        best = argmax_combine(best, ArgMax{perturbed(x, s.base + k * L.inner, seed), static_cast<int>(k)});
      }
    }
    best = group_reduce(best, L, s, ArgMaxOp());
    if (!s.valid) continue;  // after the last reduction of this block index: no barrier below
    if (ONE_HOT) {
      const bool has_nan = isnan(best.v);  // the winner is NaN iff the row holds one
      const float nan = __int_as_float(0x7fc00000);
      for (int64_t k = s.lane; k < L.K; k += L.G) {
        y[s.base + k * L.inner] = static_cast<scalar_t>(has_nan ? nan : (k == best.idx ? 1.f : 0.f));
      }
    } else if (s.lane == 0) {
      index[s.group] = best.idx;
    }
  }
}

// dlogits = y * (dy - sum(dy * y)) * inv_tau; y read from `saved` or (RECOMPUTE) recomputed from the
// logits in `saved` and the seed.
template <typename scalar_t, bool RECOMPUTE>
__global__ void __launch_bounds__(kMaxThreads)
    gumbel_softmax_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ saved,
                                   scalar_t* __restrict__ dx, Layout L, uint64_t seed, float inv_tau) {
  const bool cached = L.K <= static_cast<int64_t>(L.G) * kItems;
  for (int64_t blk = blockIdx.x; blk < L.blocks; blk += gridDim.x) {
    const Slot s = slot_of(L, blk);
    if (cached) {
      float yv[kItems], g[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        const bool in = s.valid && k < L.K;
        const int64_t off = s.base + k * L.inner;
        g[j] = in ? load_f32(dy, off) : 0.f;
        if (RECOMPUTE) {
          yv[j] = in ? perturbed(saved, off, seed) : -INFINITY;
        } else {
          yv[j] = in ? load_f32(saved, off) : 0.f;
        }
      }
      float dot;
      if (RECOMPUTE) {
        float m = -INFINITY;
#pragma unroll
        for (int j = 0; j < kItems; ++j) m = nan_max(m, yv[j]);
        m = group_reduce(m, L, s, MaxOp());
        Sum2 st{0.f, 0.f};  // sum e, sum dy * e
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
          yv[j] = (s.valid && k < L.K) ? expf((yv[j] - m) * inv_tau) : 0.f;
          st.a += yv[j];
          st.b += g[j] * yv[j];
        }
        st = group_reduce(st, L, s, Sum2Op());
        const float r = 1.f / st.a;
#pragma unroll
        for (int j = 0; j < kItems; ++j) yv[j] *= r;
        dot = st.b * r;
      } else {
        dot = 0.f;
#pragma unroll
        for (int j = 0; j < kItems; ++j) dot += g[j] * yv[j];
        dot = group_reduce(dot, L, s, SumOp());
      }
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t k = s.lane + static_cast<int64_t>(j) * L.G;
        if (s.valid && k < L.K) dx[s.base + k * L.inner] = static_cast<scalar_t>(yv[j] * (g[j] - dot) * inv_tau);
      }
    } else {
      float dot;
      float m = 0.f, r = 0.f;
      if (RECOMPUTE) {
        Stats st{-INFINITY, 0.f, 0.f};
        if (s.valid) {
          for (int64_t k = s.lane; k < L.K; k += L.G) {
            const int64_t off = s.base + k * L.inner;
            st = stats_add(st, perturbed(saved, off, seed), load_f32(dy, off), inv_tau);
          }
        }
        st = group_reduce(st, L, s, StatsOp{inv_tau});
        m = st.m;
        r = 1.f / st.s;
        dot = st.t * r;
      } else {
        dot = 0.f;
        if (s.valid) {
          for (int64_t k = s.lane; k < L.K; k += L.G) {
            const int64_t off = s.base + k * L.inner;
            dot += load_f32(dy, off) * load_f32(saved, off);
          }
        }
        dot = group_reduce(dot, L, s, SumOp());
      }
      if (s.valid) {
        for (int64_t k = s.lane; k < L.K; k += L.G) {
          const int64_t off = s.base + k * L.inner;
          const float yk = RECOMPUTE ? expf((perturbed(saved, off, seed) - m) * inv_tau) * r : load_f32(saved, off);
          dx[off] = static_cast<scalar_t>(yk * (load_f32(dy, off) - dot) * inv_tau);
        }
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
  const Layout L = make_layout(fn, "logits", logits, dim);
  check_tau(fn, tau);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (L.blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t key = static_cast<uint64_t>(seed);
  const float inv_tau = static_cast<float>(1.0 / tau);
  dispatch_floating(logits.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* x = logits.const_data_ptr<scalar_t>();
    auto* y = out.mutable_data_ptr<scalar_t>();
    if (hard) {
      gumbel_argmax_kernel<scalar_t, true><<<grid_of(L), block_of(L), 0, stream>>>(x, y, nullptr, L, key);
    } else {
      gumbel_softmax_forward_kernel<scalar_t><<<grid_of(L), block_of(L), 0, stream>>>(x, y, L, key, inv_tau);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& saved, int64_t seed, double tau,
                                        bool hard, int64_t dim) {
  constexpr const char* fn = "gumbel_softmax_backward_cuda";
  const Layout L = make_layout(fn, "saved", saved, dim);
  check_input(fn, "grad", grad);
  TORCH_CHECK(grad.sizes() == saved.sizes(), fn, ": grad of shape ", grad.sizes(), " must have the shape of saved ",
              saved.sizes());
  TORCH_CHECK(grad.device() == saved.device(), fn, ": grad (", grad.device(), ") and saved (", saved.device(),
              ") must be on the same device");
  check_tau(fn, tau);
  const c10::cuda::CUDAGuard guard(saved.device());
  const at::Tensor dy = grad.scalar_type() == saved.scalar_type() ? grad : grad.to(saved.scalar_type());
  at::Tensor out = at::empty_like(saved, at::MemoryFormat::Contiguous);
  if (L.blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t key = static_cast<uint64_t>(seed);
  const float inv_tau = static_cast<float>(1.0 / tau);
  dispatch_floating(saved.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* g = dy.const_data_ptr<scalar_t>();
    const auto* sv = saved.const_data_ptr<scalar_t>();
    auto* dx = out.mutable_data_ptr<scalar_t>();
    if (hard) {
      gumbel_softmax_backward_kernel<scalar_t, true><<<grid_of(L), block_of(L), 0, stream>>>(g, sv, dx, L, key, inv_tau);
    } else {
      gumbel_softmax_backward_kernel<scalar_t, false><<<grid_of(L), block_of(L), 0, stream>>>(g, sv, dx, L, key, inv_tau);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gumbel_argmax_cuda(const at::Tensor& logits, int64_t seed, int64_t dim) {
  constexpr const char* fn = "gumbel_argmax_cuda";
  const Layout L = make_layout(fn, "logits", logits, dim);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty(reduced_sizes(logits, dim), logits.options().dtype(at::kLong));
  if (L.blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint64_t key = static_cast<uint64_t>(seed);
  dispatch_floating(logits.scalar_type(), fn, [&](auto tag) {
    using scalar_t = decltype(tag);
    gumbel_argmax_kernel<scalar_t, false><<<grid_of(L), block_of(L), 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), nullptr, out.mutable_data_ptr<int64_t>(), L, key);
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
