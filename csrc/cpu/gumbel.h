// CPU kernels of the Gumbel-softmax op family (see vlm_kernels/reference/gumbel.py for the math).
//
// Every function takes a contiguous CPU tensor and a normalised `dim` (0 <= dim < ndim) and views it
// as (outer, K, inner) with K = size(dim). Element (o, k, i) has linear offset (o * K + k) * inner + i
// and Gumbel noise vlm::gumbel_noise(seed, offset) (csrc/common/philox.h), bit-identical to every other
// backend. dtypes: float32, float16, bfloat16 (computed in float32) and float64 (computed in float64).
// The functions are also registered as torch.ops.vlm_kernels_C.<name> for CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace vlm {

// Soft sample softmax((logits + g) / tau) or, with `hard`, the one-hot of argmax(logits + g); a row
// that holds a NaN comes out all NaN. Same dtype and shape as `logits`.
at::Tensor gumbel_softmax_forward_cpu(const at::Tensor& logits, int64_t seed, double tau, bool hard, int64_t dim);

// d(logits) = y * (grad - sum(grad * y)) / tau with y the soft sample. `saved` is the forward output
// for hard=false and the logits for hard=true (the soft sample is then recomputed from the seed).
at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& saved, int64_t seed, double tau,
                                       bool hard, int64_t dim);

// argmax(logits + g) along dim (first index on ties, first NaN wins): int64, logits' shape without dim.
at::Tensor gumbel_argmax_cpu(const at::Tensor& logits, int64_t seed, int64_t dim);

// KL(softmax(logits) || uniform) along dim: logits' dtype and shape without dim.
at::Tensor categorical_kl_uniform_forward_cpu(const at::Tensor& logits, int64_t dim);

// Its gradient: grad * p * (log p - sum p log p), `grad` having the forward output's shape.
at::Tensor categorical_kl_uniform_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t dim);

// out[j] = gumbel_noise(seed, start + j) for 0 <= j < n, vectorised where the CPU allows (for tests and
// for kernels that need the noise of a contiguous range).
void gumbel_noise_fill(uint64_t seed, uint64_t start, int64_t n, float* out);

// The same as a float32 tensor of n values (registered as torch.ops.vlm_kernels_C.gumbel_noise_cpu, for
// tests of the noise contract at any offset, 2^32 and beyond included). start >= 0, n >= 0.
at::Tensor gumbel_noise_cpu(int64_t seed, int64_t start, int64_t n);

}  // namespace vlm
