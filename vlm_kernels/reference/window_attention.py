"""Shifted-window attention with relative position bias (Swin v1 and v2) in plain PyTorch.

The oracle and the fallback for ``vlm_kernels.ops.window_attention``: exactly timm 1.0's
``SwinTransformerBlock._attn`` / ``SwinTransformerV2Block._attn`` semantics, written as the unfused
sequence of steps so that a reader can check each one against timm. Checks live in the op layer.

The math of :func:`window_attention_forward` for ``qkv`` (B, H, W, 3C) with ``heads`` heads of
``d = C / heads`` channels, window (Mh, Mw), ``N = Mh * Mw``, shift (sh, sw):

1. cyclic shift: ``x = roll(qkv, (-sh, -sw), dims=(1, 2))`` (on the unpadded map, as timm does);
2. pad the bottom and right of the shifted map up to (Hp, Wp), multiples of the window; a padded
   token's qkv is ``pad_qkv`` (timm pads the block's input with zeros, so its qkv is the projection's
   bias; zeros when the projection has none);
3. partition into ``nW = (Hp / Mh) * (Wp / Mw)`` windows of N tokens, row-major inside a window,
   windows row-major over the map, batch-major over the batch (timm's ``window_partition``);
4. logits per window and head, in the accumulation dtype (float64 for float64 input, else float32):
   v1: ``s = (scale * q) k^T``; v2 (``logit_scale`` given): ``s = norm(q) norm(k)^T * exp(min(logit_scale,
   log 100))`` with ``norm(x) = x / max(|x|, 1e-12)`` (``F.normalize``);
5. ``s += bias[h, i, j]``, the table row ``relative_position_index[i, j]`` for a table
   ((2Mh-1)(2Mw-1), heads), or the dense (heads, N, N) bias as given;
6. shifted windows: ``s += -100`` where tokens i and j lie in different regions of timm's mask. The
   regions are cut on the *padded* shifted map at rows ``Hp - Mh``, ``Hp - sh`` and columns
   ``Wp - Mw``, ``Wp - sw`` (timm builds its mask on the padded size, so with padding the cut is not
   at the wrap seam ``H - sh``; this is reproduced, not fixed). Within one window only the cut at
   ``Hp - sh`` / ``Wp - sw`` can separate two tokens, so the kernels' rule is simply
   ``(yi >= Hp - sh) != (yj >= Hp - sh) or (xi >= Wp - sw) != (xj >= Wp - sw)`` in padded shifted
   coordinates. Padded tokens are not masked out: they take part as keys, exactly as in timm;
7. ``p = softmax(s)``, ``o = p v``; window reverse, crop to (H, W), roll back by (sh, sw).

The forward also returns the log-sum-exp of each query row, (B, H, W, heads) in the unshifted layout
and the accumulation dtype, which is all the backward needs to rebuild ``p`` (flash style).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_VALUE = -100.0  # timm's shifted-window mask value (not -inf: masked pairs keep a tiny weight)
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm v2 clamps the learnt logit scale at log(100)
NORMALIZE_EPS = 1e-12  # F.normalize's default eps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Index helpers (timm's, shared by the modules)


def relative_position_index(win_h: int, win_w: int, device=None) -> Tensor:
    """(N, N) int64: the bias-table row for query i and key j of a (win_h, win_w) window (timm's)."""
    ys, xs = torch.meshgrid(torch.arange(win_h, device=device), torch.arange(win_w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (win_h - 1)
    dx = xs[:, None] - xs[None, :] + (win_w - 1)
    return dy * (2 * win_w - 1) + dx


def padded_size(h: int, w: int, window: Sequence[int]) -> tuple[int, int]:
    return math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1]


def shift_region_labels(hp: int, wp: int, window: Sequence[int], shift: Sequence[int], device=None) -> Tensor:
    """(hp, wp) region label of every token of the padded shifted map, built as timm's ``img_mask``."""
    labels = torch.zeros(hp, wp, dtype=torch.int64, device=device)
    cnt = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            labels[h[0]:h[1], w[0]:w[1]] = cnt
            cnt += 1
    return labels


def shift_mask(hp: int, wp: int, window: Sequence[int], shift: Sequence[int], device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(nW, N, N) additive mask, 0 or -100: timm's ``attn_mask`` for a padded map of (hp, wp)."""
    labels = shift_region_labels(hp, wp, window, shift, device)
    windows = window_partition(labels[None, :, :, None], window).squeeze(-1)  # nW, N
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.where(differ, MASK_VALUE, 0.0).to(dtype)


def window_partition(x: Tensor, window: Sequence[int]) -> Tensor:
    """(B, Hp, Wp, C) -> (B * nW, N, C), timm's order."""
    b, hp, wp, c = x.shape
    mh, mw = window
    x = x.view(b, hp // mh, mh, wp // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (hp // mh) * (wp // mw), mh * mw, c)


def window_reverse(windows: Tensor, window: Sequence[int], hp: int, wp: int) -> Tensor:
    """(B * nW, N, C) -> (B, Hp, Wp, C), the inverse of :func:`window_partition`."""
    mh, mw = window
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // mh) * (wp // mw))
    x = windows.reshape(b, hp // mh, wp // mw, mh, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)


def shift_and_pad(x: Tensor, window: Sequence[int], shift: Sequence[int], pad_value: Optional[Tensor]) -> Tensor:
    """Steps 1-2: roll by (-sh, -sw) then pad bottom/right with ``pad_value`` (C,) (zeros when None)."""
    b, h, w, c = x.shape
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    hp, wp = padded_size(h, w, window)
    if (hp, wp) == (h, w):
        return x
    fill = x.new_zeros(c) if pad_value is None else pad_value.to(x.dtype)
    out = fill.expand(b, hp, wp, c).clone()
    out[:, :h, :w] = x
    return out


def crop_and_unshift(x: Tensor, h: int, w: int, shift: Sequence[int]) -> Tensor:
    """Step 7's tail: crop (B, Hp, Wp, C) to (B, H, W, C) and roll back by (sh, sw)."""
    x = x[:, :h, :w]
    if any(shift):
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x


def dense_bias(rel_pos_bias: Optional[Tensor], window: Sequence[int], num_heads: int) -> Optional[Tensor]:
    """(heads, N, N) bias from a ((2Mh-1)(2Mw-1), heads) table (gathered) or a dense (heads, N, N) one."""
    if rel_pos_bias is None or rel_pos_bias.dim() == 3:
        return rel_pos_bias
    n = window[0] * window[1]
    index = relative_position_index(window[0], window[1], rel_pos_bias.device)
    return rel_pos_bias[index.view(-1)].view(n, n, num_heads).permute(2, 0, 1)


def table_gradient(dbias: Tensor, window: Sequence[int], table_rows: int) -> Tensor:
    """The bias table's gradient from the dense (heads, N, N) one: a scatter-add by relative index."""
    heads = dbias.shape[0]
    index = relative_position_index(window[0], window[1], dbias.device).view(-1)
    out = dbias.new_zeros(table_rows, heads)
    return out.index_add_(0, index, dbias.permute(1, 2, 0).reshape(-1, heads))


def logit_multiplier(logit_scale: Tensor) -> Tensor:
    """v2's per-head ``exp(min(logit_scale, log 100))`` as (heads, 1, 1)."""
    return torch.clamp(logit_scale.reshape(-1, 1, 1), max=LOGIT_SCALE_MAX).exp()


# ----------------------------------------------------------------------------------------------------
# Attention on partitioned windows: q, k, v (B*nW, heads, N, d)


def _logits(q: Tensor, k: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float,
            logit_scale: Optional[Tensor]) -> Tensor:
    if logit_scale is None:
        s = (q * scale) @ k.transpose(-2, -1)
    else:
        s = F.normalize(q, dim=-1, eps=NORMALIZE_EPS) @ F.normalize(k, dim=-1, eps=NORMALIZE_EPS).transpose(-2, -1)
        s = s * logit_multiplier(logit_scale)
    if bias is not None:
        s = s + bias
    if mask is not None:
        bw, heads, n, _ = s.shape
        s = (s.view(bw // mask.shape[0], mask.shape[0], heads, n, n) + mask[None, :, None]).view(bw, heads, n, n)
    return s


def windowed_attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                               scale: float, logit_scale: Optional[Tensor],
                               dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """(out (B*nW, heads, N, d) in q's dtype, lse (B*nW, heads, N) in the accumulation dtype).

    ``mask`` (nW, N, N) is added to window ``b * nW + w`` as ``mask[w]`` (timm's convention).
    ``dropout_p`` drops attention probabilities (the modules' training fallback; not part of the op).
    """
    acc = acc_dtype(q.dtype)
    cast = (lambda t: None if t is None else t.to(acc))
    s = _logits(q.to(acc), k.to(acc), cast(bias), cast(mask), scale, cast(logit_scale))
    # p from the row max and sum (as a fused kernel does), not exp(s - lse): lse carries ~ulp(lse) error.
    m = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - m)
    row = e.sum(dim=-1, keepdim=True)
    p = e / row
    lse = (m + torch.log(row)).squeeze(-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return (p @ v.to(acc)).to(q.dtype), lse


def _normalize_backward(x: Tensor, dy: Tensor) -> Tensor:
    """Gradient of ``x / max(|x|, eps)`` (F.normalize) along the last dimension."""
    norm = x.norm(dim=-1, keepdim=True)
    denom = norm.clamp_min(NORMALIZE_EPS)
    y = x / denom
    through_norm = (norm >= NORMALIZE_EPS).to(x.dtype)  # clamp_min passes the gradient where norm >= eps
    return dy / denom - through_norm * y * (y * dy).sum(-1, keepdim=True) / denom


def windowed_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                bias: Optional[Tensor], mask: Optional[Tensor], scale: float,
                                logit_scale: Optional[Tensor], query_valid: Optional[Tensor] = None):
    """(dq, dk, dv, dbias (heads, N, N) or None, dlogit_scale (logit_scale's shape) or None).

    ``p = exp(s - lse)`` (renormalised); ``dv = p^T do``; ``dp = do v^T``; ``ds = p (dp - rowsum(p dp))``
    (``rowsum(p dp) = rowsum(do * out)``, the form a fused kernel uses; ``out`` is part of the contract
    for that reason and unused here); ``dbias = sum_windows ds``; v1: ``dq = scale ds k``,
    ``dk = scale ds^T q``; v2: through the clamped logit scale and the normalisation.

    ``query_valid`` (B*nW, 1, N, 1) bool, from :func:`window_attention_backward`: False for padded query
    rows, whose output is cropped and whose ``lse`` the forward did not keep: it is recomputed here, so
    that those rows take part exactly as in eager autograd of timm's math (their incoming gradient is 0,
    and 0 * NaN is NaN: the non-finite contract). Every NaN/inf flows as in autograd of the forward.
    """
    acc = acc_dtype(q.dtype)
    q, k, v, do = (t.to(acc) for t in (q, k, v, grad_out))
    zero = torch.zeros((), dtype=acc, device=q.device)
    cast = (lambda t: None if t is None else t.to(acc))
    s = _logits(q, k, cast(bias), cast(mask), scale, cast(logit_scale))
    if query_valid is not None:  # padded (cropped) query rows: their softmax as the forward computed it
        lse = torch.where(query_valid.squeeze(-1), lse.to(acc), torch.logsumexp(s, -1))
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    # lse is exact only to ~ulp(lse) (logits reach ~100 with v2's logit scale), which would scale whole
    # rows of p by 1 + 1e-5 in float32; renormalising keeps the reductions (dbias, dlogit_scale) as
    # accurate as autograd through softmax. A row whose lse is NaN/inf (its forward row was NaN) stays
    # NaN, as autograd through softmax gives.
    p = p / p.sum(-1, keepdim=True)
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    # rowsum(p * dp) equals rowsum(do * o) (what a fused kernel uses), but taken from the same p it
    # makes every row of ds sum to 0 to rounding, which the cancelling sums for dlogit_scale need.
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dbias = ds.sum(0) if bias is not None else None
    dlogit = None
    if logit_scale is None:
        dq = scale * (ds @ k)
        dk = scale * (ds.transpose(-2, -1) @ q)
    else:
        t = logit_multiplier(logit_scale.to(acc))  # heads, 1, 1
        qn = F.normalize(q, dim=-1, eps=NORMALIZE_EPS)
        kn = F.normalize(k, dim=-1, eps=NORMALIZE_EPS)
        cos = qn @ kn.transpose(-2, -1)
        dt = (ds * cos).sum((0, 2, 3))  # heads
        # clamp's gradient is selected, not multiplied: 0 above the clamp and for a NaN logit_scale
        # (autograd's clamp backward), even when dt is NaN.
        unclamped = logit_scale.to(acc).reshape(-1) <= LOGIT_SCALE_MAX
        dlogit = torch.where(unclamped, dt * t.reshape(-1), zero).reshape(logit_scale.shape)
        ds_cos = ds * t
        dq = _normalize_backward(q, ds_cos @ kn)
        dk = _normalize_backward(k, ds_cos.transpose(-2, -1) @ qn)
    return dq, dk, dv, dbias, dlogit


# ----------------------------------------------------------------------------------------------------
# The fused op's semantics on the (B, H, W, 3C) map


def windows_qkv(qkv: Tensor, pad_qkv: Optional[Tensor], num_heads: int, window: Sequence[int],
                 shift: Sequence[int]):
    """Steps 1-3: q, k, v as (B*nW, heads, N, d)."""
    b, h, w, c3 = qkv.shape
    x = shift_and_pad(qkv, window, shift, pad_qkv)
    hp, wp = x.shape[1], x.shape[2]
    windows = window_partition(x, window)  # B*nW, N, 3C
    bw, n, _ = windows.shape
    q, k, v = windows.view(bw, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, hp, wp


def _window_mask(hp: int, wp: int, window: Sequence[int], shift: Sequence[int], device, dtype) -> Optional[Tensor]:
    return shift_mask(hp, wp, window, shift, device, dtype) if any(shift) else None


def heads_to_map(t: Tensor, window: Sequence[int], h: int, w: int, hp: int, wp: int,
                  shift: Sequence[int]) -> Tensor:
    """(B*nW, heads, N, d) -> (B, H, W, heads*d) in the unshifted layout (step 7)."""
    bw, heads, n, d = t.shape
    t = window_reverse(t.permute(0, 2, 1, 3).reshape(bw, n, heads * d), window, hp, wp)
    return crop_and_unshift(t, h, w, shift)


def window_attention_forward(qkv: Tensor, pad_qkv: Optional[Tensor], rel_pos_bias: Optional[Tensor],
                             logit_scale: Optional[Tensor], num_heads: int, window: Sequence[int],
                             shift: Sequence[int], scale: float, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """(out (B, H, W, C) in qkv's dtype, lse (B, H, W, heads) in the accumulation dtype).

    Differentiable by torch autograd (the tests' oracle for the explicit backward).
    """
    b, h, w, c3 = qkv.shape
    if qkv.numel() == 0:  # an empty batch or map: nothing to attend
        return qkv.new_zeros(b, h, w, c3 // 3), qkv.new_zeros(b, h, w, num_heads, dtype=acc_dtype(qkv.dtype))
    q, k, v, hp, wp = windows_qkv(qkv, pad_qkv, num_heads, window, shift)
    bias = dense_bias(rel_pos_bias, window, num_heads)
    mask = _window_mask(hp, wp, window, shift, qkv.device, acc_dtype(qkv.dtype))
    out, lse = windowed_attention_forward(q, k, v, bias, mask, scale, logit_scale, dropout_p)
    out = heads_to_map(out, window, h, w, hp, wp, shift)
    lse = heads_to_map(lse.unsqueeze(-1), window, h, w, hp, wp, shift)
    return out.contiguous(), lse.contiguous()


def window_attention_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, pad_qkv: Optional[Tensor],
                              rel_pos_bias: Optional[Tensor], logit_scale: Optional[Tensor], num_heads: int,
                              window: Sequence[int], shift: Sequence[int], scale: float):
    """(dqkv (B, H, W, 3C), dpad_qkv (3C,) or None, drel_pos_bias or None, dlogit_scale or None).

    The gradients of the real tokens' qkv go back to their unshifted place; those of the padded
    tokens (which all hold ``pad_qkv``) are summed into ``dpad_qkv``. A padded query's output is
    cropped, so its rows contribute 0 to finite gradients; they still take part (their softmax is
    recomputed), so that a NaN/inf there reaches ``dk``, ``dbias`` and ``dpad_qkv`` as ``0 * NaN`` does in
    eager autograd (docs/nonfinite.md). Only the real rows' ``out`` and ``lse`` are needed.
    """
    b, h, w, c3 = qkv.shape
    if qkv.numel() == 0:
        zeros = (lambda t: None if t is None else torch.zeros_like(t))
        return torch.zeros_like(qkv), zeros(pad_qkv), zeros(rel_pos_bias), zeros(logit_scale)
    q, k, v, hp, wp = windows_qkv(qkv, pad_qkv, num_heads, window, shift)
    acc = acc_dtype(qkv.dtype)
    # Padded query rows: zero incoming gradient; their lse (not kept by the forward) is recomputed from
    # query_valid, so that they take part as in eager autograd (a placeholder lse of 0 here).
    def as_windows(t: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        t = window_partition(shift_and_pad(t, window, shift, fill), window)
        return t.view(q.shape[0], q.shape[2], num_heads, t.shape[-1] // num_heads).transpose(1, 2)

    do = as_windows(grad_out.to(acc))
    o = as_windows(out.to(acc))
    lse_w = as_windows(lse.to(acc), lse.new_zeros((num_heads,), dtype=acc)).squeeze(-1)
    query_valid = None
    if (hp, wp) != (h, w):
        real = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=qkv.device)
        real[:, :h, :w] = True
        query_valid = window_partition(real, window).view(-1, 1, q.shape[2], 1).repeat(b, 1, 1, 1)
    bias = dense_bias(rel_pos_bias, window, num_heads)
    mask = _window_mask(hp, wp, window, shift, qkv.device, acc)
    dq, dk, dv, dbias, dlogit = windowed_attention_backward(do, q.to(acc), k.to(acc), v.to(acc), o, lse_w, bias,
                                                            mask, scale, logit_scale, query_valid)
    # Windows -> padded shifted map (B, Hp, Wp, 3C) -> split real / padded tokens.
    dwin = torch.stack((dq, dk, dv), 0).permute(1, 3, 0, 2, 4).reshape(q.shape[0], q.shape[2], c3)
    dmap = window_reverse(dwin, window, hp, wp)
    dpad = None
    if pad_qkv is not None:
        padded = torch.ones(hp, wp, dtype=torch.bool, device=qkv.device)
        padded[:h, :w] = False
        dpad = dmap[:, padded].sum((0, 1)).to(pad_qkv.dtype)
    dqkv = crop_and_unshift(dmap, h, w, shift).to(qkv.dtype).contiguous()
    if dbias is not None and rel_pos_bias.dim() == 2:
        dbias = table_gradient(dbias, window, rel_pos_bias.shape[0])
    dbias = None if dbias is None else dbias.to(rel_pos_bias.dtype)
    dlogit = None if dlogit is None else dlogit.to(logit_scale.dtype)
    return dqkv, dpad, dbias, dlogit


def window_attention(qkv: Tensor, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int] = (0, 0),
                     rel_pos_bias: Optional[Tensor] = None, scale: Optional[float] = None,
                     pad_qkv: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None,
                     dropout_p: float = 0.0) -> Tensor:
    """The op's semantics in one differentiable call (see the module docstring); ``scale`` defaults to
    ``d ** -0.5`` and is unused with ``logit_scale`` (cosine attention)."""
    if scale is None:
        scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    return window_attention_forward(qkv, pad_qkv, rel_pos_bias, logit_scale, num_heads, tuple(window_size),
                                    tuple(shift_size), scale, dropout_p)[0]


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                       scale: Optional[float] = None, logit_scale: Optional[Tensor] = None) -> Tensor:
    """Attention on already-partitioned windows (B*nW, heads, N, d); differentiable by torch autograd."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return windowed_attention_forward(q, k, v, bias, mask, scale, logit_scale)[0]
