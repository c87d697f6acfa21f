// CPU kernels of the vector-quantisation op family (see vlm_kernels/reference/vq.py for the contract).
//
// `x` is a contiguous CPU tensor viewed as (outer, D, inner) around a normalised `dim`; its rows are
// the outer * inner vectors x[o, :, i], numbered o * inner + i. `codebook` is a contiguous (K, D)
// tensor of x's dtype. dtypes: float32, float16, bfloat16 (distance tiles in float32) and float64.
// The functions are also registered as torch.ops.vlm_kernels_C.<name> for CPU tensors (the level chosen
// at load time, see isa.h). No include guard: declares the entry points of the level VLM_CPU_LEVEL names.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string_view>
#include <tuple>

#include "cpu/isa.h"

namespace vlm {
namespace VLM_CPU_LEVEL {

// Nearest code of every row: (indices int64, distances float32), x's shape without dim. metric is
// "l2" (squared Euclidean) or "cosine" (1 - cosine similarity). The index equals a float64
// evaluation's (lowest index on ties): float32 distance tiles (a GEMM on centred data) with a running
// minimum keep every code within the tiles' rounding-error bound of the best, and those candidates are
// re-scored exactly in float64. Extra memory: a float32 copy of the codebook plus per-thread tiles.
std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& x, const at::Tensor& codebook, int64_t dim,
                                                  std::string_view metric);

// Per-code statistics in one pass over x: counts (K,) and sums (K, D) of the rows assigned by
// `indices` (int64, x's shape without dim, values in [0, num_codes)). float32 outputs (float64 for
// float64 x), float64 accumulation, rows added in increasing order (deterministic).
std::tuple<at::Tensor, at::Tensor> vq_code_stats_cpu(const at::Tensor& x, const at::Tensor& indices, int64_t num_codes,
                                                     int64_t dim);

}  // namespace VLM_CPU_LEVEL
}  // namespace vlm
