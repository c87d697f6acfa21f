// CUDA kernels of the Gumbel-softmax op family (csrc/cuda/gumbel.cu). Each function is also registered
// in the `vlm_kernels_C` torch library under the same name; the Python op layer
// (vlm_kernels/ops/gumbel.py) checks arguments first, these functions check them again with TORCH_CHECK.
//
// Tensors: contiguous CUDA float32/float16/bfloat16, `dim` normalised (0 <= dim < ndim), size(dim) >= 1.
// `seed` is a 64-bit Philox key (its bits, see csrc/common/philox.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

// Soft (`hard` false) or one-hot (`hard` true) Gumbel-softmax sample along `dim`; shape and dtype of `logits`.
at::Tensor gumbel_softmax_forward_cuda(const at::Tensor& logits, int64_t seed, double tau, bool hard, int64_t dim);

// dlogits = y * (grad - sum(grad * y)) / tau. `saved` is y for `hard` false, the logits for `hard` true
// (y is then recomputed from the logits and the seed).
at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& saved, int64_t seed, double tau,
                                        bool hard, int64_t dim);

// argmax along `dim` of logits + Gumbel noise (first index on ties, NaN counts as the largest): int64,
// the shape of `logits` without `dim`.
at::Tensor gumbel_argmax_cuda(const at::Tensor& logits, int64_t seed, int64_t dim);

// KL(softmax(logits) || uniform) along `dim`: the shape of `logits` without `dim`, its dtype.
at::Tensor categorical_kl_uniform_forward_cuda(const at::Tensor& logits, int64_t dim);

// Gradient of the KL: `grad` has the reduced shape; returns a tensor shaped and typed like `logits`.
at::Tensor categorical_kl_uniform_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, int64_t dim);
