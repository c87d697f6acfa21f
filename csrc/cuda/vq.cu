// Vector-quantisation code statistics: CUDA kernels (float32 / float16 / bfloat16 in, float32 out,
// float64 accumulation). Semantics: vlm_kernels/reference/vq.py (vq_code_stats).
//
// Deterministic by construction (the point of this backend next to Triton's atomics): no floating-point
// atomics, every sum is taken in a fixed order that depends only on the shapes and the indices.
//
// Algorithm, for each pass over at most kMaxPassRows rows (one pass unless N > 2^28; several passes add
// into float64 accumulators, in pass order):
//   1. make_keys_kernel: key[r] = indices[r] (or K for an index outside [0, K): such rows sort after
//      every valid one and are skipped), value[r] = r.
//   2. cub::DeviceRadixSort::SortPairs on the low bit_width(K) bits: a stable sort, so the rows of each
//      code come out in row order. Code k's rows are sorted positions [offsets[k], offsets[k+1]).
//   3. segment_offsets_kernel: offsets[k] = lower_bound(sorted keys, k) for k = 0..K (K + 1 binary
//      searches, no atomics); offsets[K] = the number of valid rows.
//   4. tile_sum_kernel: the sorted positions are cut into tiles of kTileRows. One thread per (tile, d)
//      walks its tile in order, summing x[row, d] in float64 and flushing at every change of code. A
//      code that lies entirely inside the tile is final and stored directly; the (at most two) codes
//      that cross the tile's edges store a partial sum in the tile's slot 0 (the segment holding the
//      tile's first position) or slot 1 (the one holding its last position).
//   5. finalize_kernel: one thread per (k, d) adds the partials of a code that crosses tiles, tile by
//      tile in order (a code holding m rows costs its threads m / kTileRows reads); writes zeros for
//      codes without rows, and the counts.
// Memory besides the outputs: 16 bytes per row (keys and values, double-buffered), cub's small temp
// storage and the partials, 2 * ceil(N / kTileRows) * D doubles (1/8 byte per element of x); never an
// N x K one-hot.
//
// Access pattern. dim = last (inner == 1): the threads of a tile are its D columns, so a warp reads
// consecutive elements of one row (coalesced). Channel-first (inner > 1): element (r, d) sits at
// o * D * inner + d * inner + i, so the same threads read with stride `inner`, one 32-byte sector per
// element (a gather; no transposed copy of x is made). The sorted keys and rows of a tile are read by
// all its threads at once (broadcast loads).
#include "vq.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kThreads = 256;                      // threads per block
constexpr int kTileRows = 128;                     // sorted positions per tile
constexpr int kBatch = 4;                          // positions a thread loads ahead (memory-level parallelism)
constexpr int64_t kMaxPassRows = int64_t{1} << 28; // rows per sort (int row ids; caps the 16 B/row scratch at 4 GiB)
constexpr uint32_t kNoKey = 0xffffffffu;           // past the end of a tile (valid keys are < K <= INT_MAX)

// Where the results go. One pass: straight into the float32 outputs. Several passes: added into float64
// accumulators (one writer per element per pass, passes in order), converted once at the end.
struct Dest {
  float* counts;
  float* sums;
  double* acc_counts;  // null for a single pass
  double* acc_sums;
};

__device__ __forceinline__ void store_sum(const Dest& out, int64_t e, double s) {
  if (out.acc_sums != nullptr) {
    out.acc_sums[e] += s;
  } else {
    out.sums[e] = static_cast<float>(s);  // round to nearest, as the reference's .to(float32)
  }
}

__device__ __forceinline__ void store_count(const Dest& out, int64_t k, int64_t n) {
  if (out.acc_counts != nullptr) {
    out.acc_counts[k] += static_cast<double>(n);
  } else {
    out.counts[k] = static_cast<float>(n);
  }
}

// Geometry of one pass.
struct Pass {
  int64_t K;       // number of codes
  int64_t D;       // vector length
  int64_t inner;   // stride between consecutive d of a row
  int64_t row0;    // global index of this pass's first row
  int64_t n;       // rows in this pass
  int G;           // threads per tile (d-lanes); thread lane handles d = lane + j * G, j < nd
  int nd;
  int tiles_per_block;
  int64_t groups;  // ceil(ceil(n / kTileRows) / tiles_per_block): block indices walked by the grid-stride loop
};

// ---------------------------------------------------------------------------------------------------
// Kernels.

__global__ void __launch_bounds__(kThreads)
    make_keys_kernel(const int64_t* __restrict__ indices, int64_t row0, int64_t n, int64_t K,
                     uint32_t* __restrict__ keys, int32_t* __restrict__ rows) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t code = indices[row0 + r];
    keys[r] = (code >= 0 && code < K) ? static_cast<uint32_t>(code) : static_cast<uint32_t>(K);
    rows[r] = static_cast<int32_t>(r);
  }
}

// offsets[k] = first sorted position whose key is >= k, for k = 0..K.
__global__ void __launch_bounds__(kThreads)
    segment_offsets_kernel(const uint32_t* __restrict__ sorted_keys, int64_t n, int64_t K,
                           int64_t* __restrict__ offsets) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k <= K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + ((hi - lo) >> 1);
      if (static_cast<int64_t>(sorted_keys[mid]) < k) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[k] = lo;
  }
}

// Offset of element (row, 0) of x viewed as (outer, D, inner); element (row, d) is at + d * inner.
template <bool kLastDim>
__device__ __forceinline__ int64_t row_base(int64_t row, const Pass& P) {
  if (kLastDim) return row * P.D;
  int64_t o, i;
  if (((row | P.inner) >> 32) == 0) {  // 32-bit division when it fits (the common case)
    const uint32_t r32 = static_cast<uint32_t>(row), in32 = static_cast<uint32_t>(P.inner);
    const uint32_t o32 = r32 / in32;
    o = o32;
    i = r32 - o32 * in32;
  } else {
    o = row / P.inner;
    i = row - o * P.inner;
  }
  return o * P.D * P.inner + i;
}

// One thread per (tile, d): sums x[row, d] over the tile's sorted positions in order (float64), one
// segment (run of equal keys) at a time. See the file comment for where each segment's sum goes.
template <typename scalar_t, bool kLastDim>
__global__ void __launch_bounds__(kThreads)
    tile_sum_kernel(const scalar_t* __restrict__ x, const uint32_t* __restrict__ sorted_keys,
                    const int32_t* __restrict__ sorted_rows, const int64_t* __restrict__ offsets, Pass P,
                    double* __restrict__ partial, Dest out) {
  const int tib = static_cast<int>(threadIdx.x) / P.G;  // tile in block
  const int lane = static_cast<int>(threadIdx.x) - tib * P.G;
  if (tib >= P.tiles_per_block) return;  // no barriers below
  const int64_t n_valid = offsets[P.K];
  const int64_t tiles = (n_valid + kTileRows - 1) / kTileRows;
  for (int64_t grp = blockIdx.x; grp < P.groups; grp += gridDim.x) {
    const int64_t tile = grp * P.tiles_per_block + tib;
    if (tile >= tiles) break;  // later groups hold later tiles
    const int64_t start = tile * kTileRows;
    const int len = static_cast<int>(min(static_cast<int64_t>(kTileRows), n_valid - start));
    const uint32_t* keys = sorted_keys + start;
    const int32_t* rows = sorted_rows + start;
    for (int j = 0; j < P.nd; ++j) {
      const int64_t d = lane + static_cast<int64_t>(j) * P.G;
      if (d >= P.D) break;
      const int64_t d_off = kLastDim ? d : d * P.inner;
      double acc = 0.0;
      for (int p0 = 0; p0 < len; p0 += kBatch) {
        // Load a batch (and the key after it) before adding, so the loads overlap; the adds stay in order.
        uint32_t key[kBatch + 1];
        float v[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int p = p0 + b;
          key[b] = p < len ? keys[p] : kNoKey;
          v[b] = p < len ? static_cast<float>(x[row_base<kLastDim>(P.row0 + rows[p], P) + d_off]) : 0.f;
        }
        key[kBatch] = p0 + kBatch < len ? keys[p0 + kBatch] : kNoKey;
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (p0 + b >= len) break;
          acc += static_cast<double>(v[b]);
          if (key[b + 1] == key[b]) continue;
          // Last position of code k's segment in this tile.
          const int64_t k = key[b];
          const int64_t a = offsets[k], e = offsets[k + 1];
          if (a >= start && e <= start + len) {
            store_sum(out, k * P.D + d, acc);  // the whole code lies in this tile
          } else {
            const int slot = a <= start ? 0 : 1;
            partial[(tile * 2 + slot) * P.D + d] = acc;
          }
          acc = 0.0;
        }
      }
    }
  }
}

// One thread per (k, d): counts, zeros for empty codes, and the in-order sum of the partials of codes
// that cross tiles (codes inside one tile were stored by tile_sum_kernel).
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const int64_t* __restrict__ offsets, const double* __restrict__ partial, int64_t K, int64_t D,
                    Dest out) {
  const int64_t total = K * D;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = e / D;
    const int64_t d = e - k * D;
    const int64_t a = offsets[k], b = offsets[k + 1];
    if (d == 0) store_count(out, k, b - a);
    if (a == b) {
      if (out.acc_sums == nullptr) out.sums[e] = 0.f;
      continue;
    }
    const int64_t t0 = a / kTileRows, t1 = (b - 1) / kTileRows;
    if (t0 == t1) continue;
    // First tile: the segment holds the tile's first position (slot 0) only if the code starts there.
    double s = partial[(t0 * 2 + (a == t0 * kTileRows ? 0 : 1)) * D + d];
    for (int64_t t = t0 + 1; t <= t1; ++t) s += partial[(t * 2) * D + d];
    store_sum(out, e, s);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, INT_MAX)));
}

int bit_width(int64_t v) {
  int bits = 0;
  while (v > 0) {
    ++bits;
    v >>= 1;
  }
  return std::max(bits, 1);
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

void check_args(const char* fn, const at::Tensor& x, const at::Tensor& indices, int64_t num_codes, int64_t dim) {
  TORCH_CHECK(x.defined() && indices.defined(), fn, ": x and indices must be defined tensors");
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got device ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16 (float64 runs on the reference and cpu backends), got ", st);
  TORCH_CHECK(x.is_contiguous(), fn, ": x must be contiguous, got shape ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(x.dim() >= 1, fn, ": x must have at least one dimension");
  TORCH_CHECK(dim >= 0 && dim < x.dim(), fn, ": dim must be in [0, ", x.dim(), ") for x of shape ", x.sizes(),
              ", got ", dim);
  TORCH_CHECK(x.size(dim) >= 1, fn, ": the vector dimension dim=", dim, " of x (shape ", x.sizes(),
              ") must have size >= 1");
  TORCH_CHECK(x.size(dim) <= INT_MAX, fn, ": the vector dimension of x must be below 2^31, got ", x.size(dim));
  TORCH_CHECK(indices.scalar_type() == at::kLong, fn, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == x.device(), fn, ": indices (", indices.device(), ") and x (", x.device(),
              ") must be on the same device");
  TORCH_CHECK(indices.is_contiguous(), fn, ": indices must be contiguous");
  // Compared in place rather than against a std::vector of x's shape without dim: the one H200 run died
  // (SIGSEGV) exactly in the throw of this check, the first in this file thrown with a non-trivial local
  // still alive (unwinding through nvcc-compiled host code is the suspect; the checks before it, thrown
  // with nothing to destroy, raised properly). Nothing here needs destroying when it throws.
  bool same_rows = indices.dim() == x.dim() - 1;
  for (int64_t d = 0, k = 0; same_rows && d < x.dim(); ++d) {
    if (d != dim) same_rows = indices.size(k++) == x.size(d);
  }
  TORCH_CHECK(same_rows, fn, ": indices of shape ", indices.sizes(), " must have x's shape ", x.sizes(),
              " without dim ", dim);
  TORCH_CHECK(num_codes >= 1 && num_codes <= INT_MAX, fn, ": num_codes must be in [1, 2^31), got ", num_codes);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_code_stats_cuda(const at::Tensor& x, const at::Tensor& indices,
                                                      int64_t num_codes, int64_t dim) {
  constexpr const char* fn = "vq_code_stats_cuda";
  check_args(fn, x, indices, num_codes, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = num_codes;
  const int64_t D = x.size(dim);
  int64_t inner = 1;
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  const int64_t N = indices.numel();
  const auto f32 = x.options().dtype(at::kFloat);
  if (N == 0) return {at::zeros({K}, f32), at::zeros({K, D}, f32)};

  at::Tensor counts = at::empty({K}, f32);
  at::Tensor sums = at::empty({K, D}, f32);
  const bool several_passes = N > kMaxPassRows;
  at::Tensor acc_counts, acc_sums;
  if (several_passes) {
    acc_counts = at::zeros({K}, x.options().dtype(at::kDouble));
    acc_sums = at::zeros({K, D}, x.options().dtype(at::kDouble));
  }
  const Dest out{counts.mutable_data_ptr<float>(), sums.mutable_data_ptr<float>(),
                 several_passes ? acc_counts.mutable_data_ptr<double>() : nullptr,
                 several_passes ? acc_sums.mutable_data_ptr<double>() : nullptr};

  const int64_t pass_rows = std::min(N, kMaxPassRows);
  const auto i32 = x.options().dtype(at::kInt);
  at::Tensor keys = at::empty({2, pass_rows}, i32);  // uint32 keys, two buffers for the sort
  at::Tensor rows = at::empty({2, pass_rows}, i32);
  at::Tensor offsets = at::empty({K + 1}, x.options().dtype(at::kLong));
  const int64_t max_tiles = (pass_rows + kTileRows - 1) / kTileRows;
  at::Tensor partial = at::empty({max_tiles * 2, D}, x.options().dtype(at::kDouble));
  uint32_t* key_buf = reinterpret_cast<uint32_t*>(keys.mutable_data_ptr<int32_t>());
  int32_t* row_buf = rows.mutable_data_ptr<int32_t>();
  const int end_bit = bit_width(K);  // keys lie in [0, K]
  at::Tensor temp;
  size_t temp_bytes = 0;

  Pass P;
  P.K = K;
  P.D = D;
  P.inner = inner;
  P.nd = static_cast<int>((D + kThreads - 1) / kThreads);
  P.G = static_cast<int>((D + P.nd - 1) / P.nd);
  P.tiles_per_block = std::max(1, kThreads / P.G);
  const unsigned int block = static_cast<unsigned int>(P.tiles_per_block * P.G);

  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t row0 = 0; row0 < N; row0 += pass_rows) {
    const int64_t n = std::min(pass_rows, N - row0);
    P.row0 = row0;
    P.n = n;
    P.groups = ((n + kTileRows - 1) / kTileRows + P.tiles_per_block - 1) / P.tiles_per_block;

    make_keys_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(idx, row0, n, K, key_buf, row_buf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Stable radix sort of (key, row) on the key's low end_bit bits.
    cub::DoubleBuffer<uint32_t> key_db(key_buf, key_buf + pass_rows);
    cub::DoubleBuffer<int32_t> row_db(row_buf, row_buf + pass_rows);
    size_t need = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, need, key_db, row_db, static_cast<int>(n), 0, end_bit,
                                                   stream));
    if (!temp.defined() || need > temp_bytes) {
      temp_bytes = std::max<size_t>(need, 1);
      temp = at::empty({static_cast<int64_t>(temp_bytes)}, x.options().dtype(at::kByte));
    }
    size_t have = temp_bytes;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), have, key_db, row_db, static_cast<int>(n),
                                                   0, end_bit, stream));
    const uint32_t* sorted_keys = key_db.Current();
    const int32_t* sorted_rows = row_db.Current();

    segment_offsets_kernel<<<grid_for(K + 1, kThreads), kThreads, 0, stream>>>(sorted_keys, n, K,
                                                                                 offsets.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const unsigned int tile_grid = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(P.groups, INT_MAX)));
    dispatch_floating(x.scalar_type(), fn, [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* xp = x.const_data_ptr<scalar_t>();
      double* part = partial.mutable_data_ptr<double>();
      const int64_t* off = offsets.const_data_ptr<int64_t>();
      if (inner == 1) {
        tile_sum_kernel<scalar_t, true><<<tile_grid, block, 0, stream>>>(xp, sorted_keys, sorted_rows, off, P, part, out);
      } else {
        tile_sum_kernel<scalar_t, false><<<tile_grid, block, 0, stream>>>(xp, sorted_keys, sorted_rows, off, P, part, out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    finalize_kernel<<<std::min<unsigned int>(grid_for(K * D, kThreads), 1u << 20), kThreads, 0, stream>>>(
        offsets.const_data_ptr<int64_t>(), partial.const_data_ptr<double>(), K, D, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (several_passes) {
    counts.copy_(acc_counts);
    sums.copy_(acc_sums);
  }
  return {counts, sums};
}

TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def("vq_code_stats_cuda(Tensor x, Tensor indices, int num_codes, int dim) -> (Tensor, Tensor)", &vq_code_stats_cuda);
}
