"""Eager-PyTorch oracles for the non-finite contract (issue 12): each op's math written the way a user
would write it without vlm_kernels, differentiated by autograd. They are deliberately independent of
``vlm_kernels.reference`` (no shared helper), so that a reference that drops a NaN is caught too.

* window attention: timm 1.0's ``SwinTransformerBlock._attn`` / ``WindowAttention.forward`` (v1) and
  ``WindowAttentionV2.forward`` (v2), written out literally on the (B, H, W, 3C) qkv map;
* Gumbel: ``F.gumbel_softmax``'s math with the noise given (our Philox noise), KL to uniform with
  ``torch.special.xlogy``;
* VQ: squared distances of every row to every code (``cdist ** 2``) and ``argmin``.

The contract's documented differences from plain eager are applied here explicitly, each marked
``# contract:``, so that every other NaN/inf position is eager's.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# window attention (timm 1.0)


def _window_partition(x: Tensor, ws: Sequence[int]) -> Tensor:  # timm's window_partition
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0], ws[1], c)


def _window_reverse(windows: Tensor, ws: Sequence[int], h: int, w: int) -> Tensor:  # timm's window_reverse
    c = windows.shape[-1]
    x = windows.view(-1, h // ws[0], w // ws[1], ws[0], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


def _relative_position_index(ws: Sequence[int]) -> Tensor:  # timm's get_relative_position_index
    coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws[0] - 1
    rel[:, :, 1] += ws[1] - 1
    rel[:, :, 0] *= 2 * ws[1] - 1
    return rel.sum(-1)


def _attn_mask(hp: int, wp: int, ws: Sequence[int], shift: Sequence[int], dtype) -> Optional[Tensor]:
    """timm's ``get_attn_mask`` on the padded map: (nW, N, N), 0 or -100."""
    if not any(shift):
        return None
    img_mask = torch.zeros((1, hp, wp, 1), dtype=dtype)
    cnt = 0
    for h in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
            img_mask[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    mask_windows = _window_partition(img_mask, ws).view(-1, ws[0] * ws[1])
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def eager_windowed_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                             scale: float, logit_scale: Optional[Tensor]) -> Tensor:
    """timm's ``WindowAttention.forward`` after the qkv projection: (B*nW, heads, N, d) windows. Padded
    tokens' query rows are computed (and their outputs cropped later), as timm does: in the backward their
    zero incoming gradient meets NaN/inf as 0 * NaN, and that is the contract too."""
    if logit_scale is None:
        attn = (q * scale) @ k.transpose(-2, -1)
    else:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale.reshape(-1, 1, 1), max=math.log(1.0 / 0.01)).exp()
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw, n = mask.shape[0], attn.shape[-1]
        attn = attn.view(-1, nw, attn.shape[1], n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, attn.shape[2], n, n)
    attn = attn.softmax(dim=-1)
    return attn @ v


def eager_window_attention(qkv: Tensor, num_heads: int, window: Sequence[int], shift: Sequence[int] = (0, 0),
                           rel_pos_bias: Optional[Tensor] = None, pad_qkv: Optional[Tensor] = None,
                           logit_scale: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """timm 1.0's ``SwinTransformerBlock._attn`` from the qkv projection's output on: roll, pad (a padded
    token's qkv is ``pad_qkv``, the projection's bias), partition, attention, reverse, crop, roll back."""
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    if scale is None:
        scale = d ** -0.5
    x = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else qkv
    hp = math.ceil(h / window[0]) * window[0]
    wp = math.ceil(w / window[1]) * window[1]
    pad = torch.zeros(c3, dtype=qkv.dtype) if pad_qkv is None else pad_qkv
    padded = pad.expand(b, hp, wp, c3).clone()
    padded[:, :h, :w] = x
    windows = _window_partition(padded, window).view(-1, window[0] * window[1], c3)
    bw, n, _ = windows.shape
    q, k, v = windows.reshape(bw, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if rel_pos_bias is not None:
        if rel_pos_bias.dim() == 2:
            index = _relative_position_index(window).view(-1)
            bias = rel_pos_bias[index].view(n, n, -1).permute(2, 0, 1).contiguous()
        else:
            bias = rel_pos_bias
    out = eager_windowed_attention(q, k, v, bias, _attn_mask(hp, wp, window, shift, qkv.dtype), scale, logit_scale)
    out = out.transpose(1, 2).reshape(bw, n, c)
    out = _window_reverse(out.view(-1, window[0], window[1], c), window, hp, wp)[:, :h, :w, :]
    return torch.roll(out, shifts=tuple(shift), dims=(1, 2)) if any(shift) else out


# ----------------------------------------------------------------------------------------------------
# Gumbel


def eager_gumbel_softmax(logits: Tensor, noise: Tensor, tau: float, hard: bool, dim: int) -> Tensor:
    """``F.gumbel_softmax``'s math with the Gumbel noise given. Contract: the max is subtracted before
    dividing by tau (softmax is shift invariant), so finite logits never overflow for small tau."""
    z = logits + noise.to(logits.dtype)
    z = z - z.amax(dim=dim, keepdim=True).detach()  # contract: no overflow of (logits + g) / tau
    y_soft = (z / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def eager_gumbel_argmax(logits: Tensor, noise: Tensor, dim: int) -> Tensor:
    return torch.argmax(logits + noise.to(logits.dtype), dim=dim)


def eager_kl_uniform(logits: Tensor, dim: int) -> Tensor:
    """KL(softmax(l) || uniform) = sum p log p + log K. Contract: a term whose p is exactly 0 is 0 and
    so is its gradient (``xlogy`` gets the forward right but autograd through it, or through
    ``p * log_softmax``, gives NaN there: 0 * -inf)."""
    logp = logits.log_softmax(dim)
    p = logp.exp()
    zero = p == 0
    safe_logp = torch.where(zero, torch.zeros((), dtype=logp.dtype), logp)  # contract: 0 log 0 = 0
    return torch.where(zero, torch.zeros((), dtype=p.dtype), p * safe_logp).sum(dim) + math.log(logits.shape[dim])


# ----------------------------------------------------------------------------------------------------
# VQ


def eager_vq_nearest(rows: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """(N, D) rows, (K, D) codes -> argmin_k |x - e_k|^2 (cosine: argmin 1 - cos) and that distance, in
    float64, with the contract's exceptions: a code holding NaN/inf is never chosen; a row holding
    NaN/inf (or every code non-finite) gets index 0 and distance NaN."""
    x, e = rows.double(), codebook.double()
    if metric == "l2":
        dist = ((x[:, None, :] - e[None, :, :]) ** 2).sum(-1)  # torch.cdist(x, e) ** 2, exactly
    else:
        norms = x.norm(dim=1).clamp_min(1e-12)[:, None] * e.norm(dim=1).clamp_min(1e-12)[None, :]
        dist = -(x @ e.T) / norms  # the order of 1 - cos without rounding 1 - tiny to 1 (1 added below)
    good_code = torch.isfinite(e).all(1)
    dist = torch.where(good_code[None, :], dist, torch.full_like(dist, math.inf))  # contract
    index = dist.argmin(1)
    distance = dist.gather(1, index[:, None])[:, 0] + (0.0 if metric == "l2" else 1.0)
    bad_row = ~torch.isfinite(x).all(1) | ~good_code.any()  # contract
    index = torch.where(bad_row, torch.zeros_like(index), index)
    distance = torch.where(bad_row, torch.full_like(distance, math.nan), distance)
    return index, distance.float()


def eager_vq_quantize(x: Tensor, codebook: Tensor, beta: float, codebook_weight: float, dim: int = -1):
    """VQ-VAE (van den Oord et al. eq. 3) as eager code writes it: nearest code, straight-through
    ``x + sg(e - x)``, ``codebook_weight |sg(x) - e|^2 + beta |x - sg(e)|^2``. Contract: the quantised
    value is the code exactly, and the loss is NaN (not inf) when any row is non-finite."""
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    index, distance = eager_vq_nearest(rows.detach(), codebook.detach())
    e = codebook[index].reshape(moved.shape).movedim(-1, dim)
    # Eager's x + sg(e - x), with the contract's value: e exactly (eager's rounds e - x and adds x back,
    # which loses e entirely for |x| >> |e|), NaN where x is NaN or +-inf (as eager's); gradient: identity.
    quantized = e.detach() + (x - x.detach())
    loss = codebook_weight * ((x.detach() - e) ** 2).mean() + beta * ((x - e.detach()) ** 2).mean()
    # contract: NaN, not inf, and the gradients stay eager's (a constant added)
    loss = loss + torch.where(distance.isnan().any(), math.nan, 0.0).to(loss.dtype)
    return quantized, index.reshape(moved.shape[:-1]), loss
