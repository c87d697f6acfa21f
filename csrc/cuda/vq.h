// CUDA kernels of the vector-quantisation op family (csrc/cuda/vq.cu). Each function is also registered
// in the `vlm_kernels_C` torch library under the same name; the Python op layer (vlm_kernels/ops/vq.py)
// checks arguments first, these functions check them again with TORCH_CHECK.
//
// Layout: `x` is a contiguous CUDA float32/float16/bfloat16 tensor viewed as (outer, D, inner) with
// D = x.size(dim) (`dim` normalised, 0 <= dim < ndim); its rows are the outer * inner vectors x[o, :, i],
// numbered r = o * inner + i. `indices` is contiguous int64 of x's shape without `dim`, one per row.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

// Per-code statistics: counts (K,) float32 = rows assigned to each code, sums (K, D) float32 = the sum of
// each code's rows, accumulated in float64 and rounded once. K = num_codes. Deterministic: the results
// are bit-identical from run to run (no floating-point atomics). Rows whose index lies outside [0, K)
// are skipped (they count nowhere and are never written); the Python layer rejects them beforehand
// unless called with validate=False.
std::tuple<at::Tensor, at::Tensor> vq_code_stats_cuda(const at::Tensor& x, const at::Tensor& indices,
                                                      int64_t num_codes, int64_t dim);
