// CPU kernels of the shifted-window attention op family (Swin v1 / v2). The contract is the one of the
// backend entries documented in vlm_kernels/ops/window_attention.py; the math is
// vlm_kernels/reference/window_attention.py's.
//
// Tensors arrive contiguous, on the CPU, all of qkv's (q's) dtype: float32, float16, bfloat16 (computed
// in float32) or float64 (computed in float64). An absent optional input is an undefined tensor (None);
// the gradient of an absent input comes back undefined (None in Python). The functions are registered as
// torch.ops.vlm_kernels_C.<name> for CPU tensors (the level chosen at load time, see isa.h).
// No include guard: declares the entry points of the level VLM_CPU_LEVEL names.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/isa.h"

namespace vlm {
namespace VLM_CPU_LEVEL {

// Fused shifted-window attention on the (B, H, W, 3C) qkv map: cyclic shift by -shift, bottom/right
// padding up to multiples of the window (a padded token's qkv is pad_qkv, zeros when absent), window
// partition, logits (scale * q k^T, or cosine attention with exp(min(logit_scale, log 100)) when
// logit_scale is given), + relative position bias (a ((2Mh-1)(2Mw-1), heads) table gathered by relative
// index, or dense (heads, N, N)), + timm's -100 shifted-window mask from token coordinates, softmax,
// P V, written back at the unshifted position. Returns (out (B, H, W, C), lse (B, H, W, heads) float32 /
// float64).
std::tuple<at::Tensor, at::Tensor> window_attention_forward_cpu(
    const at::Tensor& qkv, const std::optional<at::Tensor>& pad_qkv, const std::optional<at::Tensor>& rel_pos_bias,
    const std::optional<at::Tensor>& logit_scale, int64_t num_heads, at::IntArrayRef window, at::IntArrayRef shift,
    double scale);

// (dqkv, dpad_qkv, drel_pos_bias, dlogit_scale). The softmax is recomputed per window from q and k (the
// saved out and lse are accepted for the contract and not needed). The bias and pad gradients are
// accumulated per thread (no N x N tensor per window) and reduced in a fixed order in float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& pad_qkv, const std::optional<at::Tensor>& rel_pos_bias,
    const std::optional<at::Tensor>& logit_scale, int64_t num_heads, at::IntArrayRef window, at::IntArrayRef shift,
    double scale);

// Attention on partitioned windows q, k, v (B*nW, heads, N, d); bias (heads, N, N); mask (nW, N, N) added
// to window w as mask[w % nW]. Returns (out, lse (B*nW, heads, N)).
std::tuple<at::Tensor, at::Tensor> windowed_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, double scale, const std::optional<at::Tensor>& logit_scale);

// (dq, dk, dv, dbias, dlogit_scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> windowed_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask, double scale,
    const std::optional<at::Tensor>& logit_scale);

}  // namespace VLM_CPU_LEVEL
}  // namespace vlm
