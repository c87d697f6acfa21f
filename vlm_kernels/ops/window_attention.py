"""Shifted-window attention with relative position bias (Swin v1 and v2): argument checks, torch.library
ops, autograd, backends.

Public functions:

* :func:`window_attention` - the fused op on the (B, H, W, 3C) qkv map: cyclic shift, padding, window
  partition, QK^T, relative position bias, the shifted-window mask, softmax, PV, window reverse and
  un-shift, exactly as timm's ``SwinTransformerBlock`` / ``SwinTransformerV2Block`` compute them.
* :func:`windowed_attention` - the attention alone, on windows the caller has partitioned.

Each is a pair of torch.library ops (``vlm_kernels::window_attention_forward`` / ``_backward``,
``vlm_kernels::windowed_attention_forward`` / ``_backward``) with fake kernels and
``register_autograd``. The forward ops also return the log-sum-exp of every query row (fp32, fp64
for fp64 input), from which the backward rebuilds the attention probabilities. The math is written
out in ``vlm_kernels/reference/window_attention.py``.

Padded tokens: timm pads the block's (normalised) input with zeros before the qkv projection, so a
padded token's qkv is the projection's bias, and padded tokens take part in attention as keys. The op
therefore takes ``pad_qkv`` (3C,): the qkv of a padded token, i.e. the qkv projection's bias
(``attn.qkv.bias`` in v1, ``cat(q_bias, k_bias, v_bias)`` in v2; None when the projection has no
bias, meaning zeros). Its gradient is the sum of the padded tokens' qkv gradients.

Backend contract (``TABLE`` entries; tensors arrive contiguous, checked, all of qkv's dtype/device;
``window`` and ``shift`` are (int, int) tuples; absent optional tensors are None):

* ``forward(qkv, pad_qkv, rel_pos_bias, logit_scale, num_heads, window, shift, scale)`` ->
  ``(out (B, H, W, C) in qkv's dtype, lse (B, H, W, heads) float32/float64)``; ``rel_pos_bias`` is a
  table ((2Mh-1)(2Mw-1), heads) when 2-D, dense (heads, N, N) when 3-D; cosine attention iff
  ``logit_scale`` is not None (then ``scale`` is 1.0 and unused).
* ``backward(grad_out, qkv, out, lse, pad_qkv, rel_pos_bias, logit_scale, num_heads, window, shift,
  scale)`` -> ``(dqkv, dpad_qkv, drel_pos_bias, dlogit_scale)``, each shaped as its input, None for
  an absent input. Only the real (unpadded) query rows carry gradient.
* ``windowed_forward(q, k, v, bias, mask, scale, logit_scale)`` -> ``(out, lse (B*nW, heads, N))``.
* ``windowed_backward(grad_out, q, k, v, out, lse, bias, mask, scale, logit_scale)`` ->
  ``(dq, dk, dv, dbias, dlogit_scale)`` (the mask takes no gradient).

``lse`` is the row log-sum-exp; the mask is -100 (not -inf) on masked pairs, as in timm. The
logit-scale gradient is a cancelling sum over every (window, query, key): build ``ds`` so that its
rows sum to zero to rounding (``D = rowsum(p * dp)`` from the same ``p``), or its float32 error grows
~10x beyond autograd's (see the reference backward).
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .._backend import OpTable
from ..reference import window_attention as reference
from ._common import (check_float_tensor, compiled_kernel, contiguous, describe, first_tensor_reason, gpu_dtype_reason,
                      triton_kernel)

TABLE = OpTable("window_attention")

_ENTRIES = {
    "forward": reference.window_attention_forward,
    "backward": reference.window_attention_backward,
    "windowed_forward": reference.windowed_attention_forward,
    "windowed_backward": reference.windowed_attention_backward,
}
for _entry, _fn in _ENTRIES.items():
    TABLE.register("reference", _entry, _fn)
    # The C++ kernels return None for an absent input's gradient.
    TABLE.register("cpu", _entry, compiled_kernel(_fn.__name__ + "_cpu"))
    TABLE.register("triton", _entry, triton_kernel("window_attention", _fn.__name__),
                   first_tensor_reason(gpu_dtype_reason))


def _run(entry: str, *args):
    device = next(a.device for a in args if isinstance(a, Tensor))
    _, fn = TABLE.select(entry, device, *args)
    return fn(*args)


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else contiguous(t)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Ops cannot return None: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# window_attention ops


@torch.library.custom_op("vlm_kernels::window_attention_forward", mutates_args=())
def _wa_forward(qkv: Tensor, pad_qkv: Optional[Tensor], rel_pos_bias: Optional[Tensor], logit_scale: Optional[Tensor],
                num_heads: int, window_size: List[int], shift_size: List[int], scale: float) -> tuple[Tensor, Tensor]:
    return _run("forward", contiguous(qkv), _opt(pad_qkv), _opt(rel_pos_bias), _opt(logit_scale), num_heads,
                tuple(window_size), tuple(shift_size), scale)


@_wa_forward.register_fake
def _(qkv, pad_qkv, rel_pos_bias, logit_scale, num_heads, window_size, shift_size, scale):
    b, h, w, c3 = qkv.shape
    out = qkv.new_empty(b, h, w, c3 // 3)
    lse = qkv.new_empty(b, h, w, num_heads, dtype=_acc_dtype(qkv.dtype))
    return out, lse


@torch.library.custom_op("vlm_kernels::window_attention_backward", mutates_args=())
def _wa_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, pad_qkv: Optional[Tensor],
                 rel_pos_bias: Optional[Tensor], logit_scale: Optional[Tensor], num_heads: int,
                 window_size: List[int], shift_size: List[int], scale: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dqkv, dpad, dbias, dlogit = _run("backward", contiguous(grad_out).to(qkv.dtype), contiguous(qkv), contiguous(out),
                                     contiguous(lse), _opt(pad_qkv), _opt(rel_pos_bias), _opt(logit_scale),
                                     num_heads, tuple(window_size), tuple(shift_size), scale)
    cast = (lambda g, like: None if g is None else g.to(like.dtype))
    return (dqkv.to(qkv.dtype), _or_empty(cast(dpad, pad_qkv), qkv), _or_empty(cast(dbias, rel_pos_bias), qkv),
            _or_empty(cast(dlogit, logit_scale), qkv))


@_wa_backward.register_fake
def _(grad_out, qkv, out, lse, pad_qkv, rel_pos_bias, logit_scale, num_heads, window_size, shift_size, scale):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format),
            qkv.new_empty(0) if pad_qkv is None else torch.empty_like(pad_qkv),
            qkv.new_empty(0) if rel_pos_bias is None else torch.empty_like(rel_pos_bias),
            qkv.new_empty(0) if logit_scale is None else torch.empty_like(logit_scale))


def _wa_setup_context(ctx, inputs, output):
    qkv, pad_qkv, rel_pos_bias, logit_scale, num_heads, window_size, shift_size, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (num_heads, window_size, shift_size, scale)
    ctx.present = (pad_qkv is not None, rel_pos_bias is not None, logit_scale is not None)
    ctx.save_for_backward(qkv, out, lse, pad_qkv, rel_pos_bias, logit_scale)


def _wa_backward_formula(ctx, grad_out, grad_lse):
    qkv, out, lse, pad_qkv, rel_pos_bias, logit_scale = ctx.saved_tensors
    dqkv, dpad, dbias, dlogit = torch.ops.vlm_kernels.window_attention_backward(
        grad_out, qkv, out, lse, pad_qkv, rel_pos_bias, logit_scale, *ctx.args)
    has_pad, has_bias, has_logit = ctx.present
    return (dqkv, dpad if has_pad else None, dbias if has_bias else None, dlogit if has_logit else None,
            None, None, None, None)


_wa_forward.register_autograd(_wa_backward_formula, setup_context=_wa_setup_context)


# ----------------------------------------------------------------------------------------------------
# windowed_attention ops


@torch.library.custom_op("vlm_kernels::windowed_attention_forward", mutates_args=())
def _wd_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                logit_scale: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return _run("windowed_forward", contiguous(q), contiguous(k), contiguous(v), _opt(bias), _opt(mask), scale,
                _opt(logit_scale))


@_wd_forward.register_fake
def _(q, k, v, bias, mask, logit_scale, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("vlm_kernels::windowed_attention_backward", mutates_args=())
def _wd_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
                 mask: Optional[Tensor], logit_scale: Optional[Tensor], scale: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias, dlogit = _run("windowed_backward", contiguous(grad_out).to(q.dtype), contiguous(q),
                                     contiguous(k), contiguous(v), contiguous(out), contiguous(lse), _opt(bias),
                                     _opt(mask), scale, _opt(logit_scale))
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            _or_empty(None if dbias is None else dbias.to(bias.dtype), q),
            _or_empty(None if dlogit is None else dlogit.to(logit_scale.dtype), q))


@_wd_backward.register_fake
def _(grad_out, q, k, v, out, lse, bias, mask, logit_scale, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(0) if bias is None else torch.empty_like(bias),
            q.new_empty(0) if logit_scale is None else torch.empty_like(logit_scale))


def _wd_setup_context(ctx, inputs, output):
    q, k, v, bias, mask, logit_scale, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.scale = scale
    ctx.present = (bias is not None, logit_scale is not None)
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, logit_scale)


def _wd_backward_formula(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, mask, logit_scale = ctx.saved_tensors
    dq, dk, dv, dbias, dlogit = torch.ops.vlm_kernels.windowed_attention_backward(
        grad_out, q, k, v, out, lse, bias, mask, logit_scale, ctx.scale)
    has_bias, has_logit = ctx.present
    return dq, dk, dv, dbias if has_bias else None, None, dlogit if has_logit else None, None


_wd_forward.register_autograd(_wd_backward_formula, setup_context=_wd_setup_context)


# ----------------------------------------------------------------------------------------------------
# Argument checks

IntPair = Union[int, Sequence[int]]


def _pair(op: str, name: str, value: object, minimum: int) -> tuple[int, int]:
    items = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        pair = tuple(items)  # type: ignore[arg-type]
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_companion(op: str, name: str, t: object, like: Tensor, like_name: str) -> Tensor:
    t = check_float_tensor(op, name, t)
    if t.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have {like_name}'s dtype {like.dtype}, got {describe(t)} "
                        f"(cast it, e.g. {name}.to({like_name}.dtype))")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like_name}'s device {like.device}, got {describe(t)}")
    return t


def _check_scale(op: str, scale: object, logit_scale: Optional[Tensor], head_dim: int) -> float:
    if logit_scale is not None:
        if scale is not None:
            raise ValueError(f"{op}: scale and logit_scale are exclusive (logit_scale selects Swin v2's cosine "
                             f"attention, which has no fixed scale), got scale={scale!r}")
        return 1.0
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_logit_scale(op: str, logit_scale: object, like: Tensor, like_name: str, num_heads: int) -> Tensor:
    logit_scale = _check_companion(op, "logit_scale", logit_scale, like, like_name)
    if tuple(logit_scale.shape) not in ((num_heads,), (num_heads, 1, 1)):
        raise ValueError(f"{op}: logit_scale must have shape ({num_heads},) or ({num_heads}, 1, 1) for "
                         f"num_heads={num_heads}, got {describe(logit_scale)}")
    return logit_scale


def window_attention(qkv: Tensor, *, num_heads: int, window_size: IntPair, shift_size: IntPair = 0,
                     rel_pos_bias: Optional[Tensor] = None, scale: Optional[float] = None,
                     pad_qkv: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None) -> Tensor:
    """Shifted-window multi-head attention on a (B, H, W, 3C) qkv map, timm's Swin semantics.

    Args:
        qkv: (B, H, W, 3C) per-token qkv projection of the *unshifted, unpadded* feature map, channels
            ordered (q | k | v) and, inside each, head-major (timm's ``qkv`` Linear output).
        num_heads: heads; C must be divisible by it (head dim d = C / num_heads).
        window_size: (Mh, Mw) or an int. A window larger than the map is allowed: the map is padded up
            to it (timm's ``always_partition=True``; timm's block otherwise shrinks the window to the
            map, which :class:`vlm_kernels.nn.SwinTransformerBlock` does before calling this).
        shift_size: (sh, sw) or an int, each in [0, window): the cyclic shift of shifted windows.
        rel_pos_bias: the relative position bias table ((2Mh-1)(2Mw-1), heads) (gathered by relative
            index, v1), or a dense (heads, N, N) bias with N = Mh * Mw (v2's 16*sigmoid(CPB-MLP)), or None.
        scale: the logit scale of v1 attention (default d ** -0.5). Must be None with ``logit_scale``.
        pad_qkv: (3C,) the qkv of a padded token: the qkv projection's bias (see the module docstring);
            None means zeros. Only used when H or W is not a multiple of the window.
        logit_scale: Swin v2 cosine attention: the learnt per-head logit scale, (heads,) or
            (heads, 1, 1), used as ``exp(min(logit_scale, log 100))``; None for v1 attention.

    Every tensor argument must share ``qkv``'s dtype (float32, float16, bfloat16 or float64) and device.
    Softmax and accumulation run in float32 (float64 for float64 input).

    Returns:
        (B, H, W, C) in ``qkv``'s dtype, in the same unshifted layout, ready for the output projection.
        Differentiable in ``qkv``, ``rel_pos_bias``, ``pad_qkv`` and ``logit_scale``.
    """
    op = "window_attention"
    qkv = check_float_tensor(op, "qkv", qkv)
    if qkv.dim() != 4:
        raise ValueError(f"{op}: qkv must be (B, H, W, 3C), got {describe(qkv)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    num_heads = int(num_heads)
    c3 = qkv.shape[-1]
    if c3 % 3 != 0 or c3 == 0:
        raise ValueError(f"{op}: the last dimension of qkv must be 3*C (q, k and v of C channels), got {c3} "
                         f"({describe(qkv)})")
    c = c3 // 3
    if c % num_heads != 0:
        raise ValueError(f"{op}: C={c} (qkv's last dimension {c3} / 3) is not divisible by num_heads={num_heads} "
                         f"({describe(qkv)})")
    window = _pair(op, "window_size", window_size, 1)
    shift = _pair(op, "shift_size", shift_size, 0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"{op}: shift_size must be smaller than window_size in each dimension, got "
                         f"shift_size={shift}, window_size={window}")
    n = window[0] * window[1]
    if rel_pos_bias is not None:
        rel_pos_bias = _check_companion(op, "rel_pos_bias", rel_pos_bias, qkv, "qkv")
        table = ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        dense = (num_heads, n, n)
        if tuple(rel_pos_bias.shape) not in (table, dense):
            raise ValueError(f"{op}: rel_pos_bias must be a bias table of shape {table} ((2*Mh-1)*(2*Mw-1), heads) "
                             f"or a dense bias of shape {dense} (heads, N, N) for window_size={window}, "
                             f"num_heads={num_heads}; got {describe(rel_pos_bias)}")
    if pad_qkv is not None:
        pad_qkv = _check_companion(op, "pad_qkv", pad_qkv, qkv, "qkv")
        if tuple(pad_qkv.shape) != (c3,):
            raise ValueError(f"{op}: pad_qkv must have shape ({c3},) (the qkv projection's bias), "
                             f"got {describe(pad_qkv)}")
    if logit_scale is not None:
        logit_scale = _check_logit_scale(op, logit_scale, qkv, "qkv", num_heads)
    scale = _check_scale(op, scale, logit_scale, c // num_heads)
    out, _ = torch.ops.vlm_kernels.window_attention_forward(qkv, pad_qkv, rel_pos_bias, logit_scale, num_heads,
                                                            list(window), list(shift), scale)
    return out


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor] = None,
                       mask: Optional[Tensor] = None, scale: Optional[float] = None,
                       logit_scale: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention on already-partitioned windows (what timm's ``WindowAttention.forward`` does
    after its qkv projection).

    Args:
        q, k, v: (B*nW, heads, N, d), window ``b * nW + w`` being window w of image b.
        bias: (heads, N, N) added to every window's logits (the gathered relative position bias).
        mask: (nW, N, N) additive mask, ``mask[w]`` added to window w of every image (timm's 0/-100
            ``attn_mask``). A constant: it receives no gradient.
        scale: logit scale (default d ** -0.5); must be None with ``logit_scale``.
        logit_scale: Swin v2 cosine attention with ``exp(min(logit_scale, log 100))``, (heads,) or (heads, 1, 1).

    Returns:
        (B*nW, heads, N, d) in q's dtype; differentiable in q, k, v, bias and logit_scale.
    """
    op = "windowed_attention"
    q = check_float_tensor(op, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be (B*nW, heads, N, d), got {describe(q)}")
    for name, t in (("k", k), ("v", v)):
        _check_companion(op, name, t, q, "q")
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)}, got {describe(t)}")
    bw, heads, n, d = q.shape
    if bias is not None:
        bias = _check_companion(op, "bias", bias, q, "q")
        if tuple(bias.shape) != (heads, n, n):
            raise ValueError(f"{op}: bias must have shape {(heads, n, n)} (heads, N, N), got {describe(bias)}")
    if mask is not None:
        mask = _check_companion(op, "mask", mask, q, "q")
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n) or mask.shape[0] == 0 or bw % mask.shape[0] != 0:
            raise ValueError(f"{op}: mask must be (nW, {n}, {n}) with nW dividing the {bw} windows of q, "
                             f"got {describe(mask)}")
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: mask is a constant (timm's attn_mask buffer) and receives no gradient; "
                             f"pass mask.detach() or use bias for a learnt term")
    if logit_scale is not None:
        logit_scale = _check_logit_scale(op, logit_scale, q, "q", heads)
    scale = _check_scale(op, scale, logit_scale, d)
    out, _ = torch.ops.vlm_kernels.windowed_attention_forward(q, k, v, bias, mask, logit_scale, scale)
    return out


__all__ = ["window_attention", "windowed_attention", "TABLE"]
