"""Shifted-window attention (Swin v1/v2) as Triton kernels, forward and backward, with their launchers.

The launchers take what ``vlm_kernels.ops.window_attention``'s backend contract gives (contiguous,
checked tensors of one dtype and device; float32, float16 or bfloat16) and match
``vlm_kernels.reference.window_attention`` to float32 rounding (softmax, sums and dots accumulate in
float32; float32 dots run in IEEE fp32, not TF32).

Program mapping. One program per (window, head), heads fastest (neighbouring programs read the same
tokens' rows), on a 1D grid (no axis is capped at 65535); window ``w`` counts over the batch
(``b = w // nW``). The program computes the coordinates of its window's tokens itself:

* token ``i`` of window ``(wy, wx)`` sits at ``(ys, xs) = (wy * Mh + i // Mw, wx * Mw + i % Mw)`` of the
  padded, shifted map; it is real when ``ys < H and xs < W`` and then reads the qkv row of the unshifted
  token ``((ys + sh) % H, (xs + sw) % W)`` (the cyclic shift); a padded token reads ``pad_qkv`` (or
  zeros); the output row is written back at that same unshifted place;
* the relative bias is ``table[(dy + Mh - 1) * (2Mw - 1) + dx + Mw - 1, head]`` gathered by computed index
  (or ``bias[head, i, j]`` when dense);
* the shifted-window mask is ``-100`` where ``(ys_i >= Hp - sh) != (ys_j >= Hp - sh)`` or the same in x
  (the coordinate rule of the reference docstring, timm's mask without the (nW, N, N) tensor).

``windowed_*`` (already partitioned (B*nW, heads, N, d) q, k, v) run the same kernels with plain row
offsets and a dense (nW, N, N) mask ``mask[w % nW]``.

The window's N tokens are padded to a power of two ``NP >= 16`` (tl.dot's minimum) with masking; so is
the head dim. Windows of ``NP <= 64`` (7x7, 8x8, and every smaller or rectangular one) are one tile:
the forward computes S, the softmax and P V once; the backward (``_bwd_fused_kernel``) rebuilds P from
q, k, the bias and the saved lse, renormalises it (see the reference backward: the lse is exact only
to ~ulp(lse)), and computes dv, dp, ``D = rowsum(p * dp)`` from that same p (rows of ds then sum to 0
to rounding, which v2's logit-scale gradient needs), ds, dq, dk in one pass, over a few windows per
program. Larger windows (12x12 -> 256, 16x16) use 64 x 64 tiles: the forward is a flash loop over key
blocks with an online softmax; the backward runs a row kernel (per query block: row sums and D over the
key blocks, then dq, the bias and logit-scale terms) that saves each row's (renormaliser, D), then a
column kernel (per key block: dk, dv over the query blocks, FA2 style).

Gradients: dq, dk, dv are stored straight into the (B, H, W, 3C) gradient (every real token lies in
exactly one window: no atomics); padded tokens' dk/dv rows are summed per program into the fp32
``pad_qkv`` gradient with ``tl.atomic_add`` (their dq is 0: padded queries are cropped). The bias
gradient is summed per program over its windows (fused path) or per tile (large windows) into an fp32
(heads, N, N) buffer with ``tl.atomic_add``; the launcher turns it into the table gradient with one
small index_add (``reference.table_gradient``). The logit-scale gradient ``sum(ds * cos)`` is reduced
per program and atomically added per head. On a GPU, float atomics make dbias, dpad_qkv and
dlogit_scale not bit-reproducible from run to run (dqkv is).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from ..reference import window_attention as reference

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_EPS = tl.constexpr(1e-12)  # F.normalize's eps
_LOG100 = tl.constexpr(math.log(100.0))  # v2 clamps the learnt logit scale at log(100)
_MASK_VALUE = tl.constexpr(-100.0)  # timm's shifted-window mask value

# Windows whose padded token count is at most this are one tile (fused backward).
FUSED_MAX = 64
# Tile edge (query and key blocks) for larger windows.
TILE = 64
# Target number of programs of the fused backward; it takes several windows per program beyond this so
# that the (heads, N, N) bias gradient is atomically added fewer times.
BWD_PROGRAMS = 2048
MAX_WINDOWS_PER_PROGRAM = 8

_NONE, _TABLE, _DENSE = 0, 1, 2  # BIAS kinds
_COORD = 1  # MASK kinds: 0 none, 1 from coordinates (map), 2 dense (windowed)


# ----------------------------------------------------------------------------------------------------
# Helpers.


@triton.jit
def _tokens(idx, w, head, H, W, Hp, Wp, sh, sw, nWw, nW, heads, N,
            MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr):
    """Rows of tokens ``idx`` (int32 [X]) of window ``w`` (int64): (row, valid, real, ty, tx, fy, fx).

    ``row`` indexes qkv/out rows (map: the unshifted token ``(b * H + y) * W + x``; windowed:
    ``(w * heads + head) * N + i``), int64. ``valid``: a token of the window (i < N); ``real``: valid and
    not padding. ``ty, tx``: position in the window (bias index); ``fy, fx``: the token lies past the
    mask cut of the padded shifted map (``Hp - sh``, ``Wp - sw``).
    """
    valid = idx < N
    if MAP:
        b = w // nW
        win = w % nW
        ty = idx // MW
        tx = idx % MW
        ys = (win // nWw) * MH + ty
        xs = (win % nWw) * MW + tx
        real = valid & (ys < H) & (xs < W)
        row = (b * H + (ys + sh) % H) * W + (xs + sw) % W
        fy = ys >= Hp - sh
        fx = xs >= Wp - sw
    else:
        real = valid
        row = (w * heads + head) * N + idx
        ty = idx
        tx = idx
        fy = valid
        fx = valid
    return row, valid, real, ty, tx, fy, fx


@triton.jit
def _load_rows(ptr, row, stride, col, dcol, dmask, real, pad_ptr, HAS_PAD: tl.constexpr):
    """[X, BLOCK_D] tile of rows ``row`` at column ``col``; padded rows read ``pad_ptr[col:]`` (or 0)."""
    x = tl.load(ptr + (row[:, None] * stride + col + dcol[None, :]), mask=real[:, None] & dmask[None, :],
                other=0.0)
    if HAS_PAD:
        pad = tl.load(pad_ptr + col + dcol, mask=dmask, other=0.0)
        x = tl.where(real[:, None], x, pad[None, :])
    return x


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """a @ b accumulated in fp32. ``DOT_PREC == "upcast"``: both operands go to fp32 first (the
    interpreter stores bfloat16 as uint16 and would multiply the bit patterns; the products of bf16
    values are exact in fp32, so the result equals the GPU's bf16 MMA to accumulation order)."""
    if DOT_PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c


@triton.jit
def _row_norm(x):
    """(|x|, max(|x|, eps)) per row, in fp32."""
    xf = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(xf * xf, axis=1))
    return norm, tl.maximum(norm, _EPS)


@triton.jit
def _cos_operand(x, den, COSINE: tl.constexpr, DOT_PREC: tl.constexpr):
    """(operand, row factor) of the cosine dots: cos = dot(xo_q, xo_k^T) * f_q f_k.

    fp32 (``ieee``): the rows normalised first, ``x / max(|x|, eps)`` (F.normalize's rounding, so the
    interpreter tests agree with timm to its own rounding), factor 1. 16-bit: the raw rows (exact
    products in the MMA) and the factor ``1 / max(|x|, eps)`` applied in fp32, which is more accurate than
    rounding normalised rows back to 16 bits. v1: ``x`` itself (the factor is unused).
    """
    # Nested constexpr ifs and one return: older Triton front ends reject `and` on constexprs and early
    # returns from branches.
    if COSINE:
        if DOT_PREC == "ieee":
            xo = x.to(tl.float32) / den[:, None]
            f = den * 0.0 + 1.0
        else:
            xo = x
            f = 1.0 / den
    else:
        xo = x
        f = 1.0 / den
    return xo, f


@triton.jit
def _normalize_bwd(x, g, norm, den):
    """Gradient of ``x / max(|x|, eps)`` per row given the gradient ``g`` of the normalised rows."""
    y = x.to(tl.float32) / den[:, None]
    yg = tl.where(norm >= _EPS, tl.sum(y * g, axis=1), 0.0)
    return (g - yg[:, None] * y) / den[:, None]


@triton.jit
def _logit_multiplier(ls_ptr, head, COSINE: tl.constexpr):
    if COSINE:
        t = tl.exp(tl.minimum(tl.load(ls_ptr + head).to(tl.float32), _LOG100))
    else:
        t = 1.0
    return t


@triton.jit
def _scores(q, k, rq, rk, t, scale, bias_ptr, mask_ptr, head, w, n_mask, heads, N,
            qi, q_valid, q_ty, q_tx, q_fy, q_fx, kj, k_valid, k_ty, k_tx, k_fy, k_fx,
            MH: tl.constexpr, MW: tl.constexpr, BIAS: tl.constexpr, MASK: tl.constexpr, COSINE: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """(s, cos) [BM, BN] in fp32: the logits of query rows ``qi`` against keys ``kj``, -inf on padding
    columns (j >= N); ``cos`` is the cosine (v2) or the raw q k^T (v1, unused). ``q, k, rq, rk``: the
    operands and row factors of ``_cos_operand`` (v2) or the raw rows (v1)."""
    qk = _dot(q, tl.trans(k), DOT_PREC)
    if COSINE:
        cos = qk * rq[:, None] * rk[None, :]
        s = cos * t
    else:
        cos = qk
        s = qk * scale
    pair = q_valid[:, None] & k_valid[None, :]
    if BIAS == 1:  # table ((2Mh-1)(2Mw-1), heads), gathered by relative index
        rel = (q_ty[:, None] - k_ty[None, :] + (MH - 1)) * (2 * MW - 1) + (q_tx[:, None] - k_tx[None, :] + (MW - 1))
        # Per-element offsets stay int32 (a 64-bit [BM, BN] offset tensor costs 2 registers per element);
        # the 64-bit per-head/per-window bases go on the scalar pointer.
        s += tl.load((bias_ptr + head) + rel * heads, mask=pair, other=0.0).to(tl.float32)
    elif BIAS == 2:  # dense (heads, N, N)
        s += tl.load((bias_ptr + head * N * N) + (qi[:, None] * N + kj[None, :]), mask=pair, other=0.0).to(tl.float32)
    if MASK == 1:  # shifted windows: tokens on different sides of a cut
        differ = (q_fy[:, None] != k_fy[None, :]) | (q_fx[:, None] != k_fx[None, :])
        s = tl.where(differ, s + _MASK_VALUE, s)
    elif MASK == 2:  # dense (nW, N, N), mask[w % nW]
        s += tl.load((mask_ptr + (w % n_mask) * N * N) + (qi[:, None] * N + kj[None, :]), mask=pair,
                     other=0.0).to(tl.float32)
    s = tl.where(k_valid[None, :], s, float("-inf"))
    return s, cos


# ----------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bias_ptr, mask_ptr, ls_ptr, out_ptr, lse_ptr, scale,
                H, W, Hp, Wp, sh, sw, nWw, nW, n_mask, heads, N, d,
                in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                BIAS: tl.constexpr, MASK: tl.constexpr, COSINE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                ONE_BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    head = pid % heads
    w = pid // heads
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < d
    in_col = head * in_head
    t = _logit_multiplier(ls_ptr, head, COSINE)
    for m0 in range(0, N, BLOCK_M):
        qi = m0 + tl.arange(0, BLOCK_M)
        q_row, q_valid, q_real, q_ty, q_tx, q_fy, q_fx = _tokens(qi, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                 heads, N, MH, MW, MAP)
        q = _load_rows(q_ptr, q_row, in_stride, in_col, dcol, dmask, q_real, pad_ptr, HAS_PAD)
        q_norm, q_den = _row_norm(q)
        qo, rq = _cos_operand(q, q_den, COSINE, DOT_PREC)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, N, BLOCK_N):  # one iteration when the window is one tile
            kj = n0 + tl.arange(0, BLOCK_N)
            k_row, k_valid, k_real, k_ty, k_tx, k_fy, k_fx = _tokens(kj, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                     heads, N, MH, MW, MAP)
            k = _load_rows(k_ptr, k_row, in_stride, in_col + k_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
            v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
            k_norm, k_den = _row_norm(k)
            ko, rk = _cos_operand(k, k_den, COSINE, DOT_PREC)
            s, cos = _scores(qo, ko, rq, rk, t, scale, bias_ptr, mask_ptr, head, w, n_mask, heads, N,
                             qi, q_valid, q_ty, q_tx, q_fy, q_fx, kj, k_valid, k_ty, k_tx, k_fy, k_fx,
                             MH, MW, BIAS, MASK, COSINE, DOT_PREC)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf, m_new finite)
            e = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            if ONE_BLOCK:  # whole rows: p normalised before P V, as softmax(s) @ v rounds it
                acc = _dot((e / l_i[:, None]).to(v.dtype), v, DOT_PREC)
            else:
                acc = acc * alpha[:, None] + _dot(e.to(v.dtype), v, DOT_PREC)
            m_i = m_new
        if ONE_BLOCK:
            out = acc
        else:
            out = acc / l_i[:, None]
        lse = m_i + tl.log(l_i)
        out_offs = q_row[:, None] * out_stride + head * out_head + dcol[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=q_real[:, None] & dmask[None, :])
        tl.store(lse_ptr + (q_row * lse_stride + head * lse_head), lse, mask=q_real)


# ----------------------------------------------------------------------------------------------------
# Backward, windows of one tile: everything from one rebuilt P, several windows per program.


@triton.jit
def _bwd_fused_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bias_ptr, mask_ptr, ls_ptr, do_ptr, lse_ptr,
                      dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dpad_ptr, dt_ptr, scale,
                      H, W, Hp, Wp, sh, sw, nWw, nW, n_mask, heads, N, d,
                      in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                      n_windows, windows_per_program,
                      MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                      BIAS: tl.constexpr, MASK: tl.constexpr, COSINE: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    head = pid % heads
    w_start = (pid // heads) * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, n_windows)
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < d
    in_col = head * in_head
    out_col = head * out_head
    t = _logit_multiplier(ls_ptr, head, COSINE)
    idx = tl.arange(0, BLOCK)
    dbias_acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    dt_acc = tl.zeros([BLOCK], tl.float32)
    dpk_acc = tl.zeros([BLOCK_D], tl.float32)
    dpv_acc = tl.zeros([BLOCK_D], tl.float32)
    for w in range(w_start, w_end):
        row, valid, real, ty, tx, fy, fx = _tokens(idx, w, head, H, W, Hp, Wp, sh, sw, nWw, nW, heads, N,
                                                   MH, MW, MAP)
        q = _load_rows(q_ptr, row, in_stride, in_col, dcol, dmask, real, pad_ptr, HAS_PAD)
        k = _load_rows(k_ptr, row, in_stride, in_col + k_off, dcol, dmask, real, pad_ptr, HAS_PAD)
        v = _load_rows(v_ptr, row, in_stride, in_col + v_off, dcol, dmask, real, pad_ptr, HAS_PAD)
        io_mask = real[:, None] & dmask[None, :]
        out_offs = row[:, None] * out_stride + out_col + dcol[None, :]
        do = tl.load(do_ptr + out_offs, mask=io_mask, other=0.0)
        lse = tl.load(lse_ptr + (row * lse_stride + head * lse_head), mask=real, other=float("inf"))
        q_norm, q_den = _row_norm(q)
        qo, rq = _cos_operand(q, q_den, COSINE, DOT_PREC)
        k_norm, k_den = _row_norm(k)
        ko, rk = _cos_operand(k, k_den, COSINE, DOT_PREC)
        s, cos = _scores(qo, ko, rq, rk, t, scale, bias_ptr, mask_ptr, head, w, n_mask, heads, N,
                         idx, valid, ty, tx, fy, fx, idx, valid, ty, tx, fy, fx,
                         MH, MW, BIAS, MASK, COSINE, DOT_PREC)
        # Padded queries (cropped) and rows past N: p = 0, so they give no gradient anywhere.
        p = tl.where(real[:, None], tl.exp(s - lse[:, None]), 0.0)
        rsum = tl.sum(p, axis=1)
        p = p / tl.where(rsum > 0, rsum, 1.0)[:, None]
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        # Reductions first and each gradient stored as soon as it is made: fewer [BLOCK, BLOCK] tiles
        # live at once (register spills).
        if BIAS != 0:
            dbias_acc += ds
        if COSINE:
            dt_acc += tl.sum(ds * cos, axis=0)
        in_offs = row[:, None] * in_stride + in_col + dcol[None, :]
        padded = (valid & ~real)[:, None]
        dv = _dot(tl.trans(p.to(do.dtype)), do, DOT_PREC)
        tl.store(dv_ptr + (in_offs + v_off), dv.to(dv_ptr.dtype.element_ty), mask=io_mask)
        if HAS_PAD:
            dpv_acc += tl.sum(tl.where(padded, dv, 0.0), axis=0)
        if COSINE:
            dsc = ds * t
            dq = _normalize_bwd(q, _dot((dsc * rk[None, :]).to(ko.dtype), ko, DOT_PREC), q_norm, q_den)
            tl.store(dq_ptr + in_offs, dq.to(dq_ptr.dtype.element_ty), mask=io_mask)
            dk = _normalize_bwd(k, _dot(tl.trans((dsc * rq[:, None]).to(qo.dtype)), qo, DOT_PREC),
                                k_norm, k_den)
        else:
            dq = _dot(ds.to(k.dtype), k, DOT_PREC) * scale
            tl.store(dq_ptr + in_offs, dq.to(dq_ptr.dtype.element_ty), mask=io_mask)
            dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT_PREC) * scale
        tl.store(dk_ptr + (in_offs + k_off), dk.to(dk_ptr.dtype.element_ty), mask=io_mask)
        if HAS_PAD:
            dpk_acc += tl.sum(tl.where(padded, dk, 0.0), axis=0)
    if BIAS != 0:
        pair = (idx < N)[:, None] & (idx < N)[None, :]
        tl.atomic_add((dbias_ptr + head * N * N) + (idx[:, None] * N + idx[None, :]), dbias_acc, mask=pair)
    if COSINE:
        tl.atomic_add(dt_ptr + head, tl.sum(dt_acc, axis=0))
    if HAS_PAD:
        tl.atomic_add(dpad_ptr + (in_col + k_off + dcol), dpk_acc, mask=dmask)
        tl.atomic_add(dpad_ptr + (in_col + v_off + dcol), dpv_acc, mask=dmask)


# ----------------------------------------------------------------------------------------------------
# Backward, larger windows: a row kernel (dq, dbias, dlogit_scale, per-row statistics) then a column
# kernel (dk, dv), both on TILE x TILE blocks.


@triton.jit
def _bwd_rows_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bias_ptr, mask_ptr, ls_ptr, do_ptr, lse_ptr,
                     dq_ptr, dbias_ptr, dt_ptr, rsum_ptr, dsum_ptr, scale,
                     H, W, Hp, Wp, sh, sw, nWw, nW, n_mask, heads, N, d,
                     in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                     MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                     BIAS: tl.constexpr, MASK: tl.constexpr, COSINE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    head = pid % heads
    w = pid // heads
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < d
    in_col = head * in_head
    t = _logit_multiplier(ls_ptr, head, COSINE)
    dt_acc = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        qi = m0 + tl.arange(0, BLOCK_M)
        q_row, q_valid, q_real, q_ty, q_tx, q_fy, q_fx = _tokens(qi, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                 heads, N, MH, MW, MAP)
        q = _load_rows(q_ptr, q_row, in_stride, in_col, dcol, dmask, q_real, pad_ptr, HAS_PAD)
        q_norm, q_den = _row_norm(q)
        qo, rq = _cos_operand(q, q_den, COSINE, DOT_PREC)
        io_mask = q_real[:, None] & dmask[None, :]
        do = tl.load(do_ptr + (q_row[:, None] * out_stride + head * out_head + dcol[None, :]), mask=io_mask, other=0.0)
        lse = tl.load(lse_ptr + (q_row * lse_stride + head * lse_head), mask=q_real, other=float("inf"))
        # Sweep 1: the renormaliser sum_j exp(s - lse) and sum_j exp(s - lse) dp of every row.
        rsum = tl.zeros([BLOCK_M], tl.float32)
        esum = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            kj = n0 + tl.arange(0, BLOCK_N)
            k_row, k_valid, k_real, k_ty, k_tx, k_fy, k_fx = _tokens(kj, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                     heads, N, MH, MW, MAP)
            k = _load_rows(k_ptr, k_row, in_stride, in_col + k_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
            v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
            k_norm, k_den = _row_norm(k)
            ko, rk = _cos_operand(k, k_den, COSINE, DOT_PREC)
            s, cos = _scores(qo, ko, rq, rk, t, scale, bias_ptr, mask_ptr, head, w, n_mask, heads, N,
                             qi, q_valid, q_ty, q_tx, q_fy, q_fx, kj, k_valid, k_ty, k_tx, k_fy, k_fx,
                             MH, MW, BIAS, MASK, COSINE, DOT_PREC)
            e = tl.where(q_real[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), DOT_PREC)
            rsum += tl.sum(e, axis=1)
            esum += tl.sum(e * dp, axis=1)
        rinv = 1.0 / tl.where(rsum > 0, rsum, 1.0)
        dsum = esum * rinv  # D = rowsum(p * dp) with p = e / rsum
        stat = (w * heads + head) * N + qi
        tl.store(rsum_ptr + stat, rsum, mask=q_valid)
        tl.store(dsum_ptr + stat, dsum, mask=q_valid)
        # Sweep 2: ds = p (dp - D); dq, the bias and logit-scale terms.
        g = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            kj = n0 + tl.arange(0, BLOCK_N)
            k_row, k_valid, k_real, k_ty, k_tx, k_fy, k_fx = _tokens(kj, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                     heads, N, MH, MW, MAP)
            k = _load_rows(k_ptr, k_row, in_stride, in_col + k_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
            v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
            k_norm, k_den = _row_norm(k)
            ko, rk = _cos_operand(k, k_den, COSINE, DOT_PREC)
            s, cos = _scores(qo, ko, rq, rk, t, scale, bias_ptr, mask_ptr, head, w, n_mask, heads, N,
                             qi, q_valid, q_ty, q_tx, q_fy, q_fx, kj, k_valid, k_ty, k_tx, k_fy, k_fx,
                             MH, MW, BIAS, MASK, COSINE, DOT_PREC)
            p = tl.where(q_real[:, None], tl.exp(s - lse[:, None]), 0.0) * rinv[:, None]
            dp = _dot(do, tl.trans(v), DOT_PREC)
            ds = p * (dp - dsum[:, None])
            if COSINE:
                g += _dot((ds * t * rk[None, :]).to(ko.dtype), ko, DOT_PREC)
                dt_acc += tl.sum(ds * cos, axis=0)
            else:
                g += _dot(ds.to(k.dtype), k, DOT_PREC)
            if BIAS != 0:
                pair = q_valid[:, None] & k_valid[None, :]
                tl.atomic_add((dbias_ptr + head * N * N) + (qi[:, None] * N + kj[None, :]), ds, mask=pair)
        if COSINE:
            dq = _normalize_bwd(q, g, q_norm, q_den)
        else:
            dq = g * scale
        tl.store(dq_ptr + (q_row[:, None] * in_stride + in_col + dcol[None, :]), dq.to(dq_ptr.dtype.element_ty),
                 mask=io_mask)
    if COSINE:
        tl.atomic_add(dt_ptr + head, tl.sum(dt_acc, axis=0))


@triton.jit
def _bwd_cols_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bias_ptr, mask_ptr, ls_ptr, do_ptr, lse_ptr,
                     dk_ptr, dv_ptr, dpad_ptr, rsum_ptr, dsum_ptr, scale,
                     H, W, Hp, Wp, sh, sw, nWw, nW, n_mask, heads, N, d,
                     in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                     MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                     BIAS: tl.constexpr, MASK: tl.constexpr, COSINE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    head = pid % heads
    w = pid // heads
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < d
    in_col = head * in_head
    t = _logit_multiplier(ls_ptr, head, COSINE)
    dpk_acc = tl.zeros([BLOCK_D], tl.float32)
    dpv_acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        kj = n0 + tl.arange(0, BLOCK_N)
        k_row, k_valid, k_real, k_ty, k_tx, k_fy, k_fx = _tokens(kj, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                 heads, N, MH, MW, MAP)
        k = _load_rows(k_ptr, k_row, in_stride, in_col + k_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
        v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_real, pad_ptr, HAS_PAD)
        k_norm, k_den = _row_norm(k)
        ko, rk = _cos_operand(k, k_den, COSINE, DOT_PREC)
        gk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for m0 in range(0, N, BLOCK_M):
            qi = m0 + tl.arange(0, BLOCK_M)
            q_row, q_valid, q_real, q_ty, q_tx, q_fy, q_fx = _tokens(qi, w, head, H, W, Hp, Wp, sh, sw, nWw, nW,
                                                                     heads, N, MH, MW, MAP)
            q = _load_rows(q_ptr, q_row, in_stride, in_col, dcol, dmask, q_real, pad_ptr, HAS_PAD)
            q_norm, q_den = _row_norm(q)
            qo, rq = _cos_operand(q, q_den, COSINE, DOT_PREC)
            io_mask = q_real[:, None] & dmask[None, :]
            do = tl.load(do_ptr + (q_row[:, None] * out_stride + head * out_head + dcol[None, :]), mask=io_mask,
                         other=0.0)
            lse = tl.load(lse_ptr + (q_row * lse_stride + head * lse_head), mask=q_real, other=float("inf"))
            stat = (w * heads + head) * N + qi
            rsum = tl.load(rsum_ptr + stat, mask=q_valid, other=1.0)
            dsum = tl.load(dsum_ptr + stat, mask=q_valid, other=0.0)
            rinv = 1.0 / tl.where(rsum > 0, rsum, 1.0)
            s, cos = _scores(qo, ko, rq, rk, t, scale, bias_ptr, mask_ptr, head, w, n_mask, heads, N,
                             qi, q_valid, q_ty, q_tx, q_fy, q_fx, kj, k_valid, k_ty, k_tx, k_fy, k_fx,
                             MH, MW, BIAS, MASK, COSINE, DOT_PREC)
            p = tl.where(q_real[:, None], tl.exp(s - lse[:, None]), 0.0) * rinv[:, None]
            dp = _dot(do, tl.trans(v), DOT_PREC)
            ds = p * (dp - dsum[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PREC)
            if COSINE:
                gk += _dot(tl.trans((ds * t * rq[:, None]).to(qo.dtype)), qo, DOT_PREC)
            else:
                gk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PREC)
        if COSINE:
            dk = _normalize_bwd(k, gk, k_norm, k_den)
        else:
            dk = gk * scale
        io_mask = k_real[:, None] & dmask[None, :]
        offs = k_row[:, None] * in_stride + in_col + dcol[None, :]
        tl.store(dk_ptr + (offs + k_off), dk.to(dk_ptr.dtype.element_ty), mask=io_mask)
        tl.store(dv_ptr + (offs + v_off), dv.to(dv_ptr.dtype.element_ty), mask=io_mask)
        if HAS_PAD:
            padded = (k_valid & ~k_real)[:, None]
            dpk_acc += tl.sum(tl.where(padded, dk, 0.0), axis=0)
            dpv_acc += tl.sum(tl.where(padded, dv, 0.0), axis=0)
    if HAS_PAD:
        tl.atomic_add(dpad_ptr + (in_col + k_off + dcol), dpk_acc, mask=dmask)
        tl.atomic_add(dpad_ptr + (in_col + v_off + dcol), dpv_acc, mask=dmask)


# ----------------------------------------------------------------------------------------------------
# Launchers.


def _check(name: str, *tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: the Triton backend supports float32/float16/bfloat16, got {t.dtype}")


def _blocks(n: int, d: int) -> dict:
    """Tile sizes, warps and stages for windows of ``n`` tokens and head dim ``d``."""
    np2 = max(16, triton.next_power_of_2(n))
    block_d = max(16, triton.next_power_of_2(d))
    fused = np2 <= FUSED_MAX
    tile = np2 if fused else TILE
    # 8 warps for 64 x 64 tiles. ptxas for sm_90 (Triton 3.8, compiled without a GPU; see the commit note):
    # 64 x 64 tiles with d = 32 take 255 registers at 8 warps: the forward spills 8-370 bytes (848 at
    # 4 warps), the fused backward ~300 (fp16 v1) to ~1550 (fp32 v2) (16 warps cap registers at 128 and
    # spill more); d = 128 and fp32 (IEEE FMA dots) spill more. Shared memory stays <= 160 KB (fp32,
    # d = 128). Not timed on a GPU.
    # No software pipelining (num_stages=1): the loops are short (one iteration for one-tile windows)
    # and the gathered row loads would only take shared memory away from the dots.
    warps = 4 if tile <= 32 else 8  # small windows (<= 32 tokens): 4 warps are plenty
    return dict(fused=fused, np2=np2, tile=tile, block_d=block_d, fwd_warps=warps, bwd_warps=warps, num_stages=1)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and triton_interpreted():
        return "upcast"  # see _dot
    return "ieee" if dtype == torch.float32 else "tf32"  # fp16/bf16 dots are exact-product fp32-accumulate


class _Geometry:
    """Scalars shared by every kernel: map or windowed layout, window, shift and strides."""

    def __init__(self, *, map_layout: bool, H=1, W=1, Hp=1, Wp=1, sh=0, sw=0, nWw=1, nW=1, n_mask=1,
                 heads: int, N: int, d: int, in_stride: int, in_head: int, k_off: int, v_off: int,
                 out_stride: int, out_head: int, lse_stride: int, lse_head: int, MH: int = 1, MW: int = 1):
        self.map_layout = map_layout
        self.scalars = (H, W, Hp, Wp, sh, sw, nWw, nW, n_mask, heads, N, d,
                        in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head)
        self.heads, self.N, self.d, self.MH, self.MW = heads, N, d, MH, MW


def _map_geometry(qkv: torch.Tensor, num_heads: int, window, shift) -> _Geometry:
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    mh, mw = window
    hp, wp = reference.padded_size(h, w, window)
    nww = wp // mw
    return _Geometry(map_layout=True, H=h, W=w, Hp=hp, Wp=wp, sh=shift[0], sw=shift[1], nWw=nww,
                     nW=(hp // mh) * nww, heads=num_heads, N=mh * mw, d=d, in_stride=c3, in_head=d, k_off=c,
                     v_off=2 * c, out_stride=c, out_head=d, lse_stride=num_heads, lse_head=1, MH=mh, MW=mw)


def _windowed_geometry(q: torch.Tensor, mask: Optional[torch.Tensor]) -> _Geometry:
    bw, heads, n, d = q.shape
    return _Geometry(map_layout=False, n_mask=1 if mask is None else mask.shape[0], heads=heads, N=n, d=d,
                     in_stride=d, in_head=0, k_off=0, v_off=0, out_stride=d, out_head=0, lse_stride=1, lse_head=0)


def _flags(geo: _Geometry, bias: Optional[torch.Tensor], mask_kind: int, has_pad: bool, cosine: bool,
           dtype: torch.dtype) -> dict:
    bias_kind = _NONE if bias is None else (_TABLE if bias.dim() == 2 else _DENSE)
    return dict(MH=geo.MH, MW=geo.MW, MAP=geo.map_layout, HAS_PAD=has_pad, BIAS=bias_kind, MASK=mask_kind,
                COSINE=cosine, DOT_PREC=_dot_precision(dtype))


def _or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t


def _forward(q, k, v, pad, bias, mask, logit_scale, out, lse, scale, geo: _Geometry, n_windows: int,
             mask_kind: int):
    cfg = _blocks(geo.N, geo.d)
    flags = _flags(geo, bias, mask_kind, pad is not None, logit_scale is not None, q.dtype)
    grid = (n_windows * geo.heads,)
    _fwd_kernel[grid](q, k, v, _or(pad, q), _or(bias, q), _or(mask, q), _or(logit_scale, q), out, lse, float(scale),
                      *geo.scalars, **flags, BLOCK_M=cfg["tile"], BLOCK_N=cfg["tile"], BLOCK_D=cfg["block_d"],
                      ONE_BLOCK=cfg["fused"], num_warps=cfg["fwd_warps"], num_stages=cfg["num_stages"])


def _backward(q, k, v, pad, bias, mask, logit_scale, do, lse, dq, dk, dv, scale, geo: _Geometry, n_windows: int,
              mask_kind: int):
    """Fills dq, dk, dv; returns (dbias (heads, N, N) fp32 or None, dpad fp32 or None, dt (heads,) fp32 or None)."""
    cfg = _blocks(geo.N, geo.d)
    flags = _flags(geo, bias, mask_kind, pad is not None, logit_scale is not None, q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    dbias = torch.zeros(geo.heads, geo.N, geo.N, **f32) if bias is not None else None
    dpad = torch.zeros(pad.shape[0], **f32) if pad is not None else None
    dt = torch.zeros(geo.heads, **f32) if logit_scale is not None else None
    dummy = torch.zeros(1, **f32)
    inputs = (q, k, v, _or(pad, q), _or(bias, q), _or(mask, q), _or(logit_scale, q), do, lse)
    launch = dict(num_warps=cfg["bwd_warps"], num_stages=cfg["num_stages"])
    if cfg["fused"]:
        per_program = max(1, min(MAX_WINDOWS_PER_PROGRAM, (n_windows * geo.heads) // BWD_PROGRAMS))
        grid = (triton.cdiv(n_windows, per_program) * geo.heads,)
        _bwd_fused_kernel[grid](*inputs, dq, dk, dv, _or(dbias, dummy), _or(dpad, dummy), _or(dt, dummy),
                                float(scale), *geo.scalars, n_windows, per_program, **flags, BLOCK=cfg["tile"],
                                BLOCK_D=cfg["block_d"], **launch)
    else:
        rsum = torch.empty(n_windows * geo.heads * geo.N, **f32)
        dsum = torch.empty_like(rsum)
        grid = (n_windows * geo.heads,)
        blocks = dict(BLOCK_M=cfg["tile"], BLOCK_N=cfg["tile"], BLOCK_D=cfg["block_d"])
        _bwd_rows_kernel[grid](*inputs, dq, _or(dbias, dummy), _or(dt, dummy), rsum, dsum, float(scale),
                               *geo.scalars, **flags, **blocks, **launch)
        _bwd_cols_kernel[grid](*inputs, dk, dv, _or(dpad, dummy), rsum, dsum, float(scale), *geo.scalars, **flags,
                               **blocks, **launch)
    return dbias, dpad, dt


def _logit_scale_grad(dt: Optional[torch.Tensor], logit_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """d/d logit_scale of exp(min(logit_scale, log 100)) given dt = sum(ds * cos) per head."""
    if dt is None:
        return None
    ls = logit_scale.reshape(-1).float()
    grad = dt * torch.exp(torch.clamp(ls, max=reference.LOGIT_SCALE_MAX)) * (ls <= reference.LOGIT_SCALE_MAX)
    return grad.reshape(logit_scale.shape).to(logit_scale.dtype)


def window_attention_forward(qkv: torch.Tensor, pad_qkv: Optional[torch.Tensor], rel_pos_bias: Optional[torch.Tensor],
                             logit_scale: Optional[torch.Tensor], num_heads: int, window, shift, scale: float):
    """(out (B, H, W, C) in qkv's dtype, lse (B, H, W, heads) float32) for qkv (B, H, W, 3C)."""
    _check("window_attention_forward", qkv, pad_qkv, rel_pos_bias, logit_scale)
    b, h, w, c3 = qkv.shape
    out = torch.empty(b, h, w, c3 // 3, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(b, h, w, num_heads, dtype=torch.float32, device=qkv.device)
    if qkv.numel() == 0:
        return out, lse
    window, shift = tuple(window), tuple(shift)
    geo = _map_geometry(qkv, num_heads, window, shift)
    hp, wp = reference.padded_size(h, w, window)
    pad = pad_qkv if (hp, wp) != (h, w) else None
    _forward(qkv, qkv, qkv, pad, rel_pos_bias, None, logit_scale, out, lse, scale, geo,
             b * geo.scalars[7], _COORD if any(shift) else _NONE)
    return out, lse


def window_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              pad_qkv: Optional[torch.Tensor], rel_pos_bias: Optional[torch.Tensor],
                              logit_scale: Optional[torch.Tensor], num_heads: int, window, shift, scale: float):
    """(dqkv (B, H, W, 3C), dpad_qkv or None, drel_pos_bias or None, dlogit_scale or None).

    ``out`` is not read: ``rowsum(p * dp)`` is taken from the rebuilt p (see the module docstring).
    """
    _check("window_attention_backward", grad_out, qkv, pad_qkv, rel_pos_bias, logit_scale)
    b, h, w, c3 = qkv.shape
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    zeros = (lambda t: None if t is None else torch.zeros_like(t))
    if qkv.numel() == 0:
        return dqkv, zeros(pad_qkv), zeros(rel_pos_bias), zeros(logit_scale)
    window, shift = tuple(window), tuple(shift)
    geo = _map_geometry(qkv, num_heads, window, shift)
    hp, wp = reference.padded_size(h, w, window)
    pad = pad_qkv if (hp, wp) != (h, w) else None
    do = grad_out.to(qkv.dtype).contiguous()
    dbias, dpad, dt = _backward(qkv, qkv, qkv, pad, rel_pos_bias, None, logit_scale, do, lse.contiguous(),
                                dqkv, dqkv, dqkv, scale, geo, b * geo.scalars[7], _COORD if any(shift) else _NONE)
    if pad_qkv is not None:
        dpad = zeros(pad_qkv) if dpad is None else dpad.to(pad_qkv.dtype)
    if dbias is not None:
        if rel_pos_bias.dim() == 2:
            dbias = reference.table_gradient(dbias, window, rel_pos_bias.shape[0])
        dbias = dbias.to(rel_pos_bias.dtype)
    return dqkv, dpad, dbias, _logit_scale_grad(dt, logit_scale)


def windowed_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                               mask: Optional[torch.Tensor], scale: float, logit_scale: Optional[torch.Tensor]):
    """(out (B*nW, heads, N, d) in q's dtype, lse (B*nW, heads, N) float32); ``mask[w % nW]`` per window."""
    _check("windowed_attention_forward", q, k, v, bias, mask, logit_scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    geo = _windowed_geometry(q, mask)
    _forward(q, k, v, None, bias, mask, logit_scale, out, lse, scale, geo, q.shape[0],
             _NONE if mask is None else _DENSE)
    return out, lse


def windowed_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, bias: Optional[torch.Tensor],
                                mask: Optional[torch.Tensor], scale: float, logit_scale: Optional[torch.Tensor]):
    """(dq, dk, dv, dbias (heads, N, N) or None, dlogit_scale or None)."""
    _check("windowed_attention_backward", grad_out, q, k, v, bias, mask, logit_scale)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if q.numel() == 0:
        return dq, dk, dv, None if bias is None else torch.zeros_like(bias), \
            None if logit_scale is None else torch.zeros_like(logit_scale)
    geo = _windowed_geometry(q, mask)
    do = grad_out.to(q.dtype).contiguous()
    dbias, _, dt = _backward(q, k, v, None, bias, mask, logit_scale, do, lse.contiguous(), dq, dk, dv, scale, geo,
                             q.shape[0], _NONE if mask is None else _DENSE)
    if dbias is not None:
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias, _logit_scale_grad(dt, logit_scale)
