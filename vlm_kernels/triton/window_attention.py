"""Shifted-window attention (Swin v1/v2) as Triton kernels, forward and backward, with their launchers.

The launchers take what ``vlm_kernels.ops.window_attention``'s backend contract gives (contiguous,
checked tensors of one dtype and device; float32, float16 or bfloat16) and match
``vlm_kernels.reference.window_attention``: softmax, sums and dots accumulate in float32.

Dots. fp16/bf16: tensor cores (``tl.dot`` on 16-bit operands, fp32 accumulation; exact products).
fp32: IEEE fp32 dots by default (FMA units); TF32 tensor cores when PyTorch allows TF32 for float32
matmuls (``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``
/ ``"medium"``), read at each call, the same switch that makes timm's ``q @ k.transpose(-2, -1)`` use
TF32. Operands that are products of the kernel (p, ds) are rounded to the input dtype for their dots,
as timm's eager math rounds them; v2's normalised q and k rows are computed in fp32 and rounded likewise.

Bias and mask tile. Before the attention kernels, ``_bias_mask_kernel`` (one small launch) builds the
table ``bm`` (heads, kinds, NP, NP) in fp32: the relative position bias (gathered from the
((2Mh-1)(2Mw-1), heads) table by relative index, or the dense (heads, N, N) one) plus the additive mask
of each window *kind*, times log2(e) (the kernels use exp2), and -inf on the key columns j >= N that pad
the window to the tile (those keys then get probability exactly 0 with no per-element test). Kinds:

* map layout, shifted: timm's -100 mask only cuts the last window row (at ``Hp - sh``) and the last
  window column (at ``Wp - sw``) of the padded shifted map, and inside a window the cut sits at a fixed
  offset (``Mh - sh``, ``Mw - sw``), so there are four kinds: interior (no mask), last row, last column,
  corner; kind = 2 * (window row is last) + (window column is last). Unshifted: one kind.
* windowed layout with a dense (nW, N, N) mask: kind = w % nW, one tile per mask window.

The attention kernels thus add one loaded tile per (window, head) instead of gathering the bias and
comparing region labels per element. The table is heads * kinds * NP^2 * 4 bytes: 64 KB per head for
shifted 7x7 windows (16 KB unshifted), next to megabytes of q, k, v.

Program mapping. Windows of at most ``FUSED_MAX`` (64) padded tokens (7x7, 8x8 and smaller or
rectangular ones) are one tile: a program takes one head and a run of consecutive windows (``_fwd_kernel``,
``_bwd_fused_kernel``), 1D grid ``groups * heads``, heads fastest (neighbouring programs read the same
token rows); the backward sums the bias gradient of its windows in registers and adds it once. One
warpgroup per window tile (tensor cores; 8 warps with IEEE fp32 FMA dots). The one-tile kernels take
head dims up to 128 forward and 64 backward with tensor cores, 32 with IEEE fp32; larger head dims go
through the tiled kernels, whose blocks shrink with the head dim (``_one_tile``, ``_tiled_blocks``: the
choices that ptxas compiles for sm_90 without spilling).

Per window a program computes its tokens' rows with int32 arithmetic (64-bit only for the row
offsets): token ``i`` of window ``(wy, wx)`` sits at ``(ys, xs) = (wy * Mh + i // Mw, wx * Mw + i % Mw)`` of
the padded, shifted map; it is real when ``ys < H and xs < W`` and then reads the qkv row of the unshifted
token ``((ys + sh) % H, (xs + sw) % W)`` (the cyclic shift); a padded token reads ``pad_qkv`` (its pointer
is redirected there, or the load masked to 0); the output row is written back at that same place.
Warps and pipelining stages are autotuned per shape (one configuration under the interpreter).

Larger windows (12x12, 16x16) use blocks of up to TILE x TILE: a flash forward over key blocks with an
online softmax (``_fwd_tiled_kernel``, one query block per program), and a backward split in a row kernel (per
query block: row sums and ``D`` over the key blocks, then dq, the bias and logit-scale terms; it saves each
row's renormaliser and ``D``) and a column kernel (per key block: dk, dv over the query blocks, FA2 style).

Backward of one-tile windows: P is recomputed from the logits exactly as in the forward (row max and
sum, no saved lse), so every query row, including padded tokens' (cropped) rows, has the softmax that
eager autograd differentiates; then dv, dp, ``D = rowsum(p * dp)`` from that same p (rows of ds sum to 0
to rounding, which v2's logit-scale gradient needs), ds, dq, dk. The tiled backward rebuilds P from the
saved lse and renormalises it (the lse is exact only to ~ulp(lse)); padded tokens' query rows there are 0.

Non-finite values follow eager PyTorch's math: a NaN in a key or value channel of one token makes every
query row of that (window, head) NaN (it enters every row sum); a NaN in a query channel makes that row
NaN. The row max is Triton's (NaN-dropping) maximum, but a NaN logit still reaches the row sum and the
output through ``exp2(NaN - m)``; key columns past N hold -inf and zero q/k/v rows, so they never add NaN
of their own. In the one-tile backward the gradients are those of eager autograd through timm's math,
NaN included (a NaN row of p spreads into dk, dv and the bias gradient as autograd spreads it).

Gradients: dq, dk, dv are stored straight into the (B, H, W, 3C) gradient (every real token lies in
exactly one window: no atomics); padded tokens' dq/dk/dv rows are summed per program into the fp32
``pad_qkv`` gradient with ``tl.atomic_add``. The bias gradient is summed per program over its windows
(fused path) or per tile (large windows) into an fp32 (heads, N, N) buffer with ``tl.atomic_add``; the
launcher turns it into the table gradient with one small index_add (``reference.table_gradient``). The
logit-scale gradient ``sum(ds * cos)`` is reduced per program and atomically added per head; the one-tile
backward takes its row terms as ``normalize(q)_i . (ds @ normalize(k))_i``, the dot it needs for dq
anyway, so that no cos tile stays live. On a GPU,
float atomics make dbias, dpad_qkv and dlogit_scale not bit-reproducible from run to run (dqkv is).

Triton language features used are present since Triton 3.2 (``tl.dot(input_precision=...)``,
``triton.autotune(reset_to_zero=...)``, ``tl.exp2``/``tl.log2``, runtime loop bounds, ``tl.where`` on
pointers, ``tl.atomic_add(sem="relaxed")``).
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
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)

# Windows whose padded token count is at most this are one tile (fused kernels).
FUSED_MAX = 64
# Tile edge (query and key blocks) for larger windows.
TILE = 64
# Target program counts of the one-tile kernels: a program takes several windows of one head beyond
# this. The forward only amortises its per-program set-up; the backward also adds its (heads, N, N)
# bias gradient atomically once per program, so it takes more windows per program.
FWD_PROGRAMS = 4096
BWD_PROGRAMS = 1024
MAX_WINDOWS_PER_PROGRAM = 16

_MASK_NONE, _MASK_COORD, _MASK_DENSE = 0, 1, 2  # how the bias/mask table builds its kinds
_BIAS_NONE, _BIAS_TABLE, _BIAS_DENSE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------
# Autotuning: a few configurations on a GPU, one under the interpreter (speed of the CPU tests).


def _configs(options):
    if triton_interpreted():
        options = options[:1]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in options]


# (num_warps, num_stages). Tensor-core dots (16-bit, TF32): one warpgroup per 64 x 64 tile (a second
# one would repeat the tile's wgmma, not split it), each tile's fp32 values at 32 registers per thread;
# two stages let the next window's loads run under this window's math. IEEE fp32 dots run on the FMA
# units and need 8 warps to keep their operands in registers (ptxas spills at 4).
_FWD_CONFIGS = _configs([(4, 2), (4, 1), (8, 1), (8, 2)])
_BWD_CONFIGS = _configs([(4, 1), (4, 2), (8, 1)])


def _prune_by_dot(configs, named_args, **kwargs):
    fma = kwargs.get("DOT_PREC", named_args.get("DOT_PREC")) == "ieee"
    return [c for c in configs if (c.num_warps == 8) == fma] or configs[:1]


def _prune_bwd(configs, named_args, **kwargs):
    """As _prune_by_dot; at d = 64 the backward's second pipeline stage (another window's q, k, v, do
    in flight) costs the registers it would need (ptxas spills with v2), so one stage there."""
    configs = _prune_by_dot(configs, named_args, **kwargs)
    if kwargs.get("BLOCK_D", named_args.get("BLOCK_D")) >= 64:
        configs = [c for c in configs if c.num_stages == 1] or configs[:1]
    return configs


_TUNE_KEY = ["N", "d", "heads", "COSINE", "HAS_PAD", "DOT_PREC"]


# ----------------------------------------------------------------------------------------------------
# Helpers.


@triton.jit
def _window(w, nW, nWw, last_y, last_x, n_kinds, MAP: tl.constexpr):
    """(image b, window row wy, window column wx, kind) of window ``w`` (int32 scalars)."""
    if MAP:
        b = w // nW
        win = w - b * nW
        wy = win // nWw
        wx = win - wy * nWw
        kind = (wy == last_y).to(tl.int32) * 2 + (wx == last_x).to(tl.int32)
    else:
        b = w
        wy = w * 0
        wx = w * 0
        kind = w % n_kinds
    return b, wy, wx, kind


@triton.jit
def _token_rows(w, b, wy, wx, head, ty, tx, idx, valid, H, W, shy, shx, heads, N,
                MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr):
    """(row int64 [X], real [X]) of tokens ``idx`` of window ``w``.

    Map layout: ``row`` is the unshifted token ``(b * H + y) * W + x`` of the (B, H, W, .) tensors;
    ``real`` marks the window's tokens that are not padding. ``shy, shx`` are the shifts modulo H, W
    (so a single wrap-around suffices). Windowed layout: ``row = (w * heads + head) * N + i``.
    """
    if MAP:
        ys = wy * MH + ty
        xs = wx * MW + tx
        real = valid & (ys < H) & (xs < W)
        y = ys + shy
        y = tl.where(y >= H, y - H, y)
        x = xs + shx
        x = tl.where(x >= W, x - W, x)
        row = (tl.cast(b, tl.int64) * H) * W + (y * W + x)
    else:
        real = valid
        row = (tl.cast(w, tl.int64) * heads + head) * N + idx
    return row, real


@triton.jit
def _load_rows(ptr, row, stride, col, dcol, dmask, valid, real, pad_ptr, HAS_PAD: tl.constexpr):
    """[X, BLOCK_D] tile of rows ``row`` at column ``col``; padded tokens read ``pad_ptr[col:]`` (or 0),
    rows past the window read 0."""
    # Row pointers first (1D), then the columns: a [X, BLOCK_D] 64-bit offset tile built outside the
    # window loop would stay live across it (ptxas registers).
    if HAS_PAD:
        rows = tl.where(real, ptr + (row * stride + col), pad_ptr + col)
        x = tl.load(rows[:, None] + dcol[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
    else:
        x = tl.load((ptr + (row * stride + col))[:, None] + dcol[None, :], mask=real[:, None] & dmask[None, :],
                    other=0.0)
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
def _dot_split(a, a_op, b, DOT_PREC: tl.constexpr):
    """a @ b for fp32 ``a`` whose operand ``a_op`` was rounded to 16 bits: the rounding error goes through
    a second dot, so that the product is accurate to ~2^-16 of |a| |b|. v2's logit-scale gradient sums
    ds * cos over every pair, terms of both signs whose rows cancel: ds rounded to 16 bits once would
    leave errors several times those of timm's eager math."""
    c = _dot(a_op, b, DOT_PREC)
    if a_op.dtype != tl.float32:
        c += _dot((a - a_op.to(tl.float32)).to(a_op.dtype), b, DOT_PREC)
    return c


@triton.jit
def _row_norm(x, ONE_CHANNEL: tl.constexpr):
    """(|x|, max(|x|, eps)) per row, in fp32. ONE_CHANNEL (head dim 1; the other columns are zeros): |x|
    itself, as eager's norm of one element (exact: sqrt(x^2) would overflow for |x| > 1.8e19 where
    F.normalize gives +-1). A constexpr: the test costs the other head dims nothing."""
    xf = x.to(tl.float32)
    if ONE_CHANNEL:
        norm = tl.abs(tl.sum(xf, axis=1))
    else:
        norm = tl.sqrt(tl.sum(xf * xf, axis=1))
    return norm, tl.maximum(norm, _EPS)


@triton.jit
def _cos_operand(x, den, COSINE: tl.constexpr):
    """The operand of the q k^T dot: v2, the rows normalised in fp32, ``x / max(|x|, eps)`` (F.normalize),
    in x's dtype (16-bit inputs: rounded to 16 bits as timm's eager F.normalize output is); v1, x."""
    if COSINE:
        xo = (x.to(tl.float32) / den[:, None]).to(x.dtype)
    else:
        xo = x
    return xo


@triton.jit
def _normalize_bwd_y(y, g, norm, den):
    """Gradient of ``x / max(|x|, eps)`` per row given the gradient ``g`` of the normalised rows and the
    normalised rows ``y`` themselves (the dots' operands: for 16-bit inputs rounded to 16 bits, as the
    eager F.normalize output that timm differentiates is)."""
    yg = tl.where(norm >= _EPS, tl.sum(y * g, axis=1), 0.0)
    return (g - yg[:, None] * y) / den[:, None]


@triton.jit
def _logit_multiplier(ls_ptr, head, COSINE: tl.constexpr):
    if COSINE:
        ls = tl.load(ls_ptr + head).to(tl.float32)
        # torch.clamp(ls, max=log 100): a NaN stays NaN (tl.minimum may return the other operand).
        t = tl.exp(tl.where(ls > _LOG100, _LOG100, ls))
    else:
        t = 1.0
    return t


@triton.jit
def _logits2(qk, t, scale, bm, COSINE: tl.constexpr):
    """The logits in base 2 (``s * log2(e)``; the bias/mask tile ``bm`` is already scaled) from the
    q k^T dot: v2, ``cos * t`` (qk is the cosine); v1, ``qk * scale``."""
    if COSINE:
        s2 = qk * (t * _LOG2E) + bm
    else:
        s2 = qk * (scale * _LOG2E) + bm
    return s2


# ----------------------------------------------------------------------------------------------------
# The bias + mask table (one small launch per call).


@triton.jit
def _bias_mask_kernel(bias_ptr, mask_ptr, bm_ptr, heads, n_kinds, N, cut_y, cut_x,
                      MH: tl.constexpr, MW: tl.constexpr, BIAS: tl.constexpr, MASK: tl.constexpr,
                      NP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """bm[head, kind, i, j] = (bias[head, i, j] + mask_kind[i, j]) * log2(e) for i, j < N; -inf for
    j >= N (keys that pad the tile); 0 for i >= N > j. One program per (head, kind, block)."""
    pid = tl.program_id(0)
    n_col_blocks = NP // BLOCK_J
    n_blocks = (NP // BLOCK_I) * n_col_blocks
    blk = pid % n_blocks
    hk = pid // n_blocks
    kind = hk % n_kinds
    head = hk // n_kinds
    i = (blk // n_col_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = (blk % n_col_blocks) * BLOCK_J + tl.arange(0, BLOCK_J)
    pair = (i < N)[:, None] & (j < N)[None, :]
    val = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    if BIAS == 1:  # table ((2Mh-1)(2Mw-1), heads), gathered by relative index
        rel = ((i // MW)[:, None] - (j // MW)[None, :] + (MH - 1)) * (2 * MW - 1) \
            + ((i % MW)[:, None] - (j % MW)[None, :] + (MW - 1))
        val += tl.load(bias_ptr + (rel * heads + head), mask=pair, other=0.0).to(tl.float32)
    elif BIAS == 2:  # dense (heads, N, N)
        val += tl.load(bias_ptr + (head * N * N + i[:, None] * N + j[None, :]), mask=pair, other=0.0).to(tl.float32)
    if MASK == 1:  # kind = 2 * (last window row) + (last window column); cut at Mh - sh, Mw - sw
        ky = kind // 2
        kx = kind % 2
        fy = (i // MW) >= cut_y
        fx = (i % MW) >= cut_x
        gy = (j // MW) >= cut_y
        gx = (j % MW) >= cut_x
        differ = ((fy[:, None] != gy[None, :]) & (ky == 1)) | ((fx[:, None] != gx[None, :]) & (kx == 1))
        val = tl.where(differ, val + _MASK_VALUE, val)
    elif MASK == 2:  # dense (n_kinds, N, N)
        val += tl.load(mask_ptr + (kind * N * N + i[:, None] * N + j[None, :]), mask=pair, other=0.0).to(tl.float32)
    val = tl.where((j < N)[None, :], val * _LOG2E, float("-inf"))
    tl.store(bm_ptr + (hk * NP * NP + i[:, None] * NP + j[None, :]), val)


# ----------------------------------------------------------------------------------------------------
# Forward, windows of one tile: several windows of one head per program.


@triton.jit
def _one_tile_program(n_windows, windows_per_program, n_kinds, heads, N, d, in_head, out_head, ls_ptr, bm_ptr,
                      MW: tl.constexpr, COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head and run of windows [w_start, w_end) in the one-tile kernels (heads fastest),
    and the window-independent indexing: (head, w_start, w_end, idx, ty, tx, valid, dcol, dmask, in_col,
    out_col, t, bm_head, tile)."""
    pid = tl.program_id(0)
    head = pid % heads
    w_start = (pid // heads) * windows_per_program
    w_end = tl.minimum(w_start + windows_per_program, n_windows)
    idx = tl.arange(0, BLOCK)
    dcol = tl.arange(0, BLOCK_D)
    t = _logit_multiplier(ls_ptr, head, COSINE)
    bm_head = bm_ptr + head * (n_kinds * BLOCK * BLOCK)
    return (head, w_start, w_end, idx, idx // MW, idx % MW, idx < N, dcol, dcol < d, head * in_head,
            head * out_head, t, bm_head, idx[:, None] * BLOCK + idx[None, :])


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY + ["ONE_KIND"],
                 prune_configs_by={"early_config_prune": _prune_by_dot})
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bm_ptr, ls_ptr, out_ptr, lse_ptr, scale,
                n_windows, windows_per_program, H, W, nW, nWw, last_y, last_x, shy, shx, n_kinds, heads, N, d,
                in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                ONE_KIND: tl.constexpr, COSINE: tl.constexpr, ONE_CHANNEL: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    head, w_start, w_end, idx, ty, tx, valid, dcol, dmask, in_col, out_col, t, bm_head, tile = _one_tile_program(
        n_windows, windows_per_program, n_kinds, heads, N, d, in_head, out_head, ls_ptr, bm_ptr, MW, COSINE, BLOCK,
        BLOCK_D)
    if ONE_KIND:
        bm = tl.load(bm_head + tile)
    for w in range(w_start, w_end):
        b, wy, wx, kind = _window(w, nW, nWw, last_y, last_x, n_kinds, MAP)
        row, real = _token_rows(w, b, wy, wx, head, ty, tx, idx, valid, H, W, shy, shx, heads, N, MH, MW, MAP)
        if not ONE_KIND:
            bm = tl.load(bm_head + kind * (BLOCK * BLOCK) + tile)
        q = _load_rows(q_ptr, row, in_stride, in_col, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
        k = _load_rows(k_ptr, row, in_stride, in_col + k_off, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
        v = _load_rows(v_ptr, row, in_stride, in_col + v_off, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
        q_norm, q_den = _row_norm(q, ONE_CHANNEL)
        qo = _cos_operand(q, q_den, COSINE)
        k_norm, k_den = _row_norm(k, ONE_CHANNEL)
        ko = _cos_operand(k, k_den, COSINE)
        cos = _dot(qo, tl.trans(ko), DOT_PREC)
        s2 = _logits2(cos, t, scale, bm, COSINE)
        m = tl.max(s2, axis=1)
        e = tl.exp2(s2 - m[:, None])
        l = tl.sum(e, axis=1)
        out = _dot(e.to(v.dtype), v, DOT_PREC) * (1.0 / l)[:, None]
        lse = (m + tl.log2(l)) * _LN2
        tl.store((out_ptr + (row * out_stride + out_col))[:, None] + dcol[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=real[:, None] & dmask[None, :])
        tl.store(lse_ptr + (row * lse_stride + head * lse_head), lse, mask=real)


# ----------------------------------------------------------------------------------------------------
# Backward, windows of one tile: everything from one recomputed P, several windows per program.


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, reset_to_zero=["dbias_ptr", "dpad_ptr", "dt_ptr"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _bwd_fused_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bm_ptr, ls_ptr, do_ptr,
                      dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dpad_ptr, dt_ptr, scale,
                      n_windows, windows_per_program, H, W, nW, nWw, last_y, last_x, shy, shx, n_kinds, heads, N, d,
                      in_stride, in_head, k_off, v_off, out_stride, out_head,
                      MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                      HAS_BIAS: tl.constexpr, COSINE: tl.constexpr, ONE_CHANNEL: tl.constexpr,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    head, w_start, w_end, idx, ty, tx, valid, dcol, dmask, in_col, out_col, t, bm_head, tile = _one_tile_program(
        n_windows, windows_per_program, n_kinds, heads, N, d, in_head, out_head, ls_ptr, bm_ptr, MW, COSINE, BLOCK,
        BLOCK_D)
    dbias_acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    dt_acc = tl.zeros([BLOCK], tl.float32)
    dpq_acc = tl.zeros([BLOCK_D], tl.float32)
    dpk_acc = tl.zeros([BLOCK_D], tl.float32)
    dpv_acc = tl.zeros([BLOCK_D], tl.float32)
    for w in range(w_start, w_end):
        b, wy, wx, kind = _window(w, nW, nWw, last_y, last_x, n_kinds, MAP)
        row, real = _token_rows(w, b, wy, wx, head, ty, tx, idx, valid, H, W, shy, shx, heads, N, MH, MW, MAP)
        # The tile read per window (an L1 hit), also with one kind: held across the loop it would take
        # 32 registers per thread that the backward does not have.
        bm = tl.load(bm_head + kind * (BLOCK * BLOCK) + tile)
        q = _load_rows(q_ptr, row, in_stride, in_col, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
        k = _load_rows(k_ptr, row, in_stride, in_col + k_off, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
        v = _load_rows(v_ptr, row, in_stride, in_col + v_off, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
        io_mask = real[:, None] & dmask[None, :]
        do = tl.load((do_ptr + (row * out_stride + out_col))[:, None] + dcol[None, :], mask=io_mask, other=0.0)
        q_norm, q_den = _row_norm(q, ONE_CHANNEL)
        qo = _cos_operand(q, q_den, COSINE)
        k_norm, k_den = _row_norm(k, ONE_CHANNEL)
        ko = _cos_operand(k, k_den, COSINE)
        s2 = _logits2(_dot(qo, tl.trans(ko), DOT_PREC), t, scale, bm, COSINE)
        # The forward's softmax, recomputed (padded tokens' query rows included: their gradient is 0
        # through do = 0, or NaN where eager autograd's is).
        m = tl.max(s2, axis=1)
        e = tl.exp2(s2 - m[:, None])
        p = e * (1.0 / tl.sum(e, axis=1))[:, None]
        # Each gradient made and stored as soon as its inputs exist, so that few 64 x 64 tiles live at
        # once. The order is the one ptxas (Triton 3.6 and 3.8) compiles without spills: tensor cores,
        # p rounded for the dv dot, then ds, dv; FMA dots, dv, then ds. Then dq and dk.
        in_offs = row * in_stride + in_col
        padded = (valid & ~real)[:, None]
        if DOT_PREC == "ieee":  # FMA dots: dv first, p's last use before ds
            dv = _dot(tl.trans(p), do, DOT_PREC)
            dp = _dot(do, tl.trans(v), DOT_PREC)
            ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        else:
            p_op = p.to(do.dtype)
            dp = _dot(do, tl.trans(v), DOT_PREC)
            ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
            dv = _dot(tl.trans(p_op), do, DOT_PREC)
        if HAS_BIAS:
            dbias_acc += ds
        tl.store((dv_ptr + (in_offs + v_off))[:, None] + dcol[None, :], dv.to(dv_ptr.dtype.element_ty), mask=io_mask)
        if HAS_PAD:
            dpv_acc += tl.sum(tl.where(padded, dv, 0.0), axis=0)
        ds_op = ds.to(qo.dtype)
        if COSINE:
            # g = ds @ normalize(k): the gradient of the normalised q rows is t * g, and
            # sum_j ds_ij cos_ij = normalize(q)_i . g_i is the logit-scale gradient's row term (so no
            # cos tile stays live through dp and ds).
            g = _dot_split(ds, ds_op, ko, DOT_PREC)
            qn = qo.to(tl.float32)
            dt_acc += tl.sum(qn * g, axis=1)
            dq = _normalize_bwd_y(qn, g * t, q_norm, q_den)
        else:
            dq = _dot(ds_op, k, DOT_PREC) * scale
        tl.store((dq_ptr + in_offs)[:, None] + dcol[None, :], dq.to(dq_ptr.dtype.element_ty), mask=io_mask)
        if HAS_PAD:
            dpq_acc += tl.sum(tl.where(padded, dq, 0.0), axis=0)
        if COSINE:
            dk = _normalize_bwd_y(ko.to(tl.float32), _dot(tl.trans(ds_op), qo, DOT_PREC) * t, k_norm, k_den)
        else:
            dk = _dot(tl.trans(ds_op), q, DOT_PREC) * scale
        tl.store((dk_ptr + (in_offs + k_off))[:, None] + dcol[None, :], dk.to(dk_ptr.dtype.element_ty), mask=io_mask)
        if HAS_PAD:
            dpk_acc += tl.sum(tl.where(padded, dk, 0.0), axis=0)
    if HAS_BIAS:
        pair = valid[:, None] & valid[None, :]
        tl.atomic_add((dbias_ptr + head * N * N) + (idx[:, None] * N + idx[None, :]), dbias_acc, mask=pair,
                      sem="relaxed")
    if COSINE:
        tl.atomic_add(dt_ptr + head, tl.sum(dt_acc, axis=0), sem="relaxed")
    if HAS_PAD:
        tl.atomic_add(dpad_ptr + (in_col + dcol), dpq_acc, mask=dmask, sem="relaxed")
        tl.atomic_add(dpad_ptr + (in_col + k_off + dcol), dpk_acc, mask=dmask, sem="relaxed")
        tl.atomic_add(dpad_ptr + (in_col + v_off + dcol), dpv_acc, mask=dmask, sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# Larger windows: TILE x TILE blocks. Program id -> (window, head, block) with the block fastest.


@triton.jit
def _block_tokens(blk, w, b, wy, wx, head, H, W, shy, shx, heads, N,
                  MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, BLOCK: tl.constexpr):
    """(index, row, valid, real) of the tokens of block ``blk`` of window ``w``."""
    i = blk * BLOCK + tl.arange(0, BLOCK)
    valid = i < N
    row, real = _token_rows(w, b, wy, wx, head, i // MW, i % MW, i, valid, H, W, shy, shx, heads, N, MH, MW, MAP)
    return i, row, valid, real


@triton.jit
def _tiled_program(N, nW, nWw, last_y, last_x, n_kinds, heads, d, in_head, NT, ls_ptr, bm_ptr,
                   MAP: tl.constexpr, COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block (of BLOCK tokens), head and window, block fastest, and what every block of
    that window and head shares: (blk, head, w, b, wy, wx, dcol, dmask, in_col, t, bm_tile)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    blk = pid % n_blocks
    head = (pid // n_blocks) % heads
    w = pid // (n_blocks * heads)
    b, wy, wx, kind = _window(w, nW, nWw, last_y, last_x, n_kinds, MAP)
    dcol = tl.arange(0, BLOCK_D)
    dmask = dcol < d
    in_col = head * in_head
    t = _logit_multiplier(ls_ptr, head, COSINE)
    bm_tile = bm_ptr + tl.cast(head * n_kinds + kind, tl.int64) * NT * NT
    return blk, head, w, b, wy, wx, dcol, dmask, in_col, t, bm_tile


@triton.jit
def _block_operand(x_ptr, col, blk, w, b, wy, wx, head, H, W, shy, shx, heads, N, in_stride, dcol, dmask, pad_ptr,
                   MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                   COSINE: tl.constexpr, ONE_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``blk`` of the window's q or k rows (channels from ``col``): (index, row, valid, real, x,
    |x|, max(|x|, eps), the q k^T dot operand)."""
    i, row, valid, real = _block_tokens(blk, w, b, wy, wx, head, H, W, shy, shx, heads, N, MH, MW, MAP, BLOCK)
    x = _load_rows(x_ptr, row, in_stride, col, dcol, dmask, valid, real, pad_ptr, HAS_PAD)
    norm, den = _row_norm(x, ONE_CHANNEL)
    return i, row, valid, real, x, norm, den, _cos_operand(x, den, COSINE)


@triton.jit
def _fwd_tiled_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bm_ptr, ls_ptr, out_ptr, lse_ptr, scale,
                      H, W, nW, nWw, last_y, last_x, shy, shx, n_kinds, heads, N, d, NT,
                      in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                      MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                      COSINE: tl.constexpr, ONE_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    mb, head, w, b, wy, wx, dcol, dmask, in_col, t, bm_tile = _tiled_program(
        N, nW, nWw, last_y, last_x, n_kinds, heads, d, in_head, NT, ls_ptr, bm_ptr, MAP, COSINE, BLOCK_M, BLOCK_D)
    qi, q_row, q_valid, q_real, q, q_norm, q_den, qo = _block_operand(
        q_ptr, in_col, mb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
        in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(0, tl.cdiv(N, BLOCK_N)):
        kj, k_row, k_valid, k_real, k, k_norm, k_den, ko = _block_operand(
            k_ptr, in_col + k_off, nb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
            in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_N)
        v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_valid, k_real, pad_ptr, HAS_PAD)
        bm = tl.load(bm_tile + (qi[:, None] * NT + kj[None, :]))
        cos = _dot(qo, tl.trans(ko), DOT_PREC)
        s2 = _logits2(cos, t, scale, bm, COSINE)
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf, m_new finite)
        e = tl.exp2(s2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        acc = acc * alpha[:, None] + _dot(e.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * _LN2
    tl.store(out_ptr + (q_row[:, None] * out_stride + (head * out_head + dcol)[None, :]),
             out.to(out_ptr.dtype.element_ty), mask=q_real[:, None] & dmask[None, :])
    tl.store(lse_ptr + (q_row * lse_stride + head * lse_head), lse, mask=q_real)


@triton.jit
def _bwd_rows_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bm_ptr, ls_ptr, do_ptr, lse_ptr,
                     dq_ptr, dbias_ptr, dpad_ptr, dt_ptr, rinv_ptr, dsum_ptr, lse2_ptr, scale,
                     H, W, nW, nWw, last_y, last_x, shy, shx, n_kinds, heads, N, d, NT,
                     in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                     MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                     HAS_BIAS: tl.constexpr, COSINE: tl.constexpr, ONE_CHANNEL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Per query block: the renormaliser and D of each row, then dq, the bias and logit-scale terms.

    Padded tokens' query rows (output cropped, lse not kept by the forward) take part as in eager
    autograd of timm's math: their lse is recomputed here (sweep 0), their incoming gradient is 0, and
    0 * NaN stays NaN (the non-finite contract). The lse used per row goes to ``lse2_ptr`` for the
    column pass."""
    mb, head, w, b, wy, wx, dcol, dmask, in_col, t, bm_tile = _tiled_program(
        N, nW, nWw, last_y, last_x, n_kinds, heads, d, in_head, NT, ls_ptr, bm_ptr, MAP, COSINE, BLOCK_M, BLOCK_D)
    qi, q_row, q_valid, q_real, q, q_norm, q_den, qo = _block_operand(
        q_ptr, in_col, mb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
        in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_M)
    io_mask = q_real[:, None] & dmask[None, :]
    do = tl.load(do_ptr + (q_row[:, None] * out_stride + (head * out_head + dcol)[None, :]), mask=io_mask, other=0.0)
    lse2 = tl.load(lse_ptr + (q_row * lse_stride + head * lse_head), mask=q_real, other=float("inf")) * _LOG2E
    n_kb = tl.cdiv(N, BLOCK_N)
    q_pad = q_valid & ~q_real
    if tl.max(q_pad.to(tl.int32), axis=0) > 0:
        # Sweep 0 (blocks holding padded query rows only): their log-sum-exp, online; a NaN or +inf logit
        # makes it NaN, as eager's softmax row.
        m0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l0 = tl.zeros([BLOCK_M], tl.float32)
        for nb in range(0, n_kb):
            kj, k_row, k_valid, k_real, k, k_norm, k_den, ko = _block_operand(
                k_ptr, in_col + k_off, nb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
                in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_N)
            bm = tl.load(bm_tile + (qi[:, None] * NT + kj[None, :]))
            s2 = _logits2(_dot(qo, tl.trans(ko), DOT_PREC), t, scale, bm, COSINE)
            m_new = tl.maximum(m0, tl.max(s2, axis=1))
            alpha = tl.where(m0 == m_new, 1.0, tl.exp2(m0 - m_new))
            l0 = l0 * alpha + tl.sum(tl.where(k_valid[None, :], tl.exp2(s2 - m_new[:, None]), 0.0), axis=1)
            m0 = m_new
        lse2 = tl.where(q_pad, m0 + tl.log2(l0), lse2)
    # Sweep 1: the renormaliser sum_j exp(s - lse) and sum_j exp(s - lse) dp of every row.
    rsum = tl.zeros([BLOCK_M], tl.float32)
    esum = tl.zeros([BLOCK_M], tl.float32)
    for nb in range(0, n_kb):
        kj, k_row, k_valid, k_real, k, k_norm, k_den, ko = _block_operand(
            k_ptr, in_col + k_off, nb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
            in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_N)
        v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_valid, k_real, pad_ptr, HAS_PAD)
        bm = tl.load(bm_tile + (qi[:, None] * NT + kj[None, :]))
        cos = _dot(qo, tl.trans(ko), DOT_PREC)
        s2 = _logits2(cos, t, scale, bm, COSINE)
        e = tl.where(q_valid[:, None], tl.exp2(s2 - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_PREC)
        rsum += tl.sum(e, axis=1)
        esum += tl.sum(e * dp, axis=1)
    rinv = 1.0 / tl.where(rsum > 0, rsum, 1.0)  # rows past the window: e = 0, p = 0
    dsum = esum * rinv  # D = rowsum(p * dp) with p = e / rsum
    stat = (tl.cast(w, tl.int64) * heads + head) * NT + qi
    tl.store(rinv_ptr + stat, rinv)
    tl.store(dsum_ptr + stat, dsum)
    tl.store(lse2_ptr + stat, lse2)
    # Sweep 2: ds = p (dp - D); dq, the bias and logit-scale terms.
    g = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for nb in range(0, n_kb):
        kj, k_row, k_valid, k_real, k, k_norm, k_den, ko = _block_operand(
            k_ptr, in_col + k_off, nb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
            in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_N)
        v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_valid, k_real, pad_ptr, HAS_PAD)
        bm = tl.load(bm_tile + (qi[:, None] * NT + kj[None, :]))
        s2 = _logits2(_dot(qo, tl.trans(ko), DOT_PREC), t, scale, bm, COSINE)
        p = tl.where(q_valid[:, None], tl.exp2(s2 - lse2[:, None]), 0.0) * rinv[:, None]
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - dsum[:, None])
        if COSINE:
            g += _dot_split(ds, ds.to(ko.dtype), ko, DOT_PREC)
        else:
            g += _dot(ds.to(ko.dtype), ko, DOT_PREC)
        if HAS_BIAS:
            pair = q_valid[:, None] & k_valid[None, :]
            tl.atomic_add((dbias_ptr + head * N * N) + (qi[:, None] * N + kj[None, :]), ds, mask=pair,
                          sem="relaxed")
    if COSINE:
        # g = ds @ normalize(k) over the key blocks: the logit-scale gradient's rows are
        # normalize(q)_i . g_i (no cos tile kept through the sweep).
        qn = qo.to(tl.float32)
        tl.atomic_add(dt_ptr + head, tl.sum(tl.sum(qn * g, axis=1), axis=0), sem="relaxed")
        dq = _normalize_bwd_y(qn, g * t, q_norm, q_den)
    else:
        dq = g * scale
    tl.store(dq_ptr + (q_row[:, None] * in_stride + (in_col + dcol)[None, :]), dq.to(dq_ptr.dtype.element_ty),
             mask=io_mask)
    if HAS_PAD:  # the padded tokens' q gradient goes to pad_qkv's q part (0, or NaN as in eager)
        tl.atomic_add(dpad_ptr + (in_col + dcol), tl.sum(tl.where(q_pad[:, None], dq, 0.0), axis=0), mask=dmask,
                      sem="relaxed")


@triton.jit
def _bwd_cols_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, bm_ptr, ls_ptr, do_ptr, lse_ptr,
                     dk_ptr, dv_ptr, dpad_ptr, rinv_ptr, dsum_ptr, lse2_ptr, scale,
                     H, W, nW, nWw, last_y, last_x, shy, shx, n_kinds, heads, N, d, NT,
                     in_stride, in_head, k_off, v_off, out_stride, out_head, lse_stride, lse_head,
                     MH: tl.constexpr, MW: tl.constexpr, MAP: tl.constexpr, HAS_PAD: tl.constexpr,
                     COSINE: tl.constexpr, ONE_CHANNEL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Per key block: dk and dv over the query blocks (FA2's column pass), from the rows' statistics."""
    nb, head, w, b, wy, wx, dcol, dmask, in_col, t, bm_tile = _tiled_program(
        N, nW, nWw, last_y, last_x, n_kinds, heads, d, in_head, NT, ls_ptr, bm_ptr, MAP, COSINE, BLOCK_N, BLOCK_D)
    kj, k_row, k_valid, k_real, k, k_norm, k_den, ko = _block_operand(
        k_ptr, in_col + k_off, nb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
        in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_N)
    v = _load_rows(v_ptr, k_row, in_stride, in_col + v_off, dcol, dmask, k_valid, k_real, pad_ptr, HAS_PAD)
    gk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for mb in range(0, tl.cdiv(N, BLOCK_M)):
        qi, q_row, q_valid, q_real, q, q_norm, q_den, qo = _block_operand(
            q_ptr, in_col, mb, w, b, wy, wx, head, H, W, shy, shx, heads, N,
            in_stride, dcol, dmask, pad_ptr, MH, MW, MAP, HAS_PAD, COSINE, ONE_CHANNEL, BLOCK_M)
        io_mask = q_real[:, None] & dmask[None, :]
        do = tl.load(do_ptr + (q_row[:, None] * out_stride + (head * out_head + dcol)[None, :]), mask=io_mask,
                     other=0.0)
        stat = (tl.cast(w, tl.int64) * heads + head) * NT + qi
        lse2 = tl.load(lse2_ptr + stat)  # the rows kernel's (padded rows' recomputed)
        rinv = tl.load(rinv_ptr + stat)
        dsum = tl.load(dsum_ptr + stat)
        bm = tl.load(bm_tile + (qi[:, None] * NT + kj[None, :]))
        cos = _dot(qo, tl.trans(ko), DOT_PREC)
        s2 = _logits2(cos, t, scale, bm, COSINE)
        p = tl.where(q_valid[:, None], tl.exp2(s2 - lse2[:, None]), 0.0) * rinv[:, None]
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - dsum[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PREC)
        gk += _dot(tl.trans(ds.to(qo.dtype)), qo, DOT_PREC)
    if COSINE:
        dk = _normalize_bwd_y(ko.to(tl.float32), gk * t, k_norm, k_den)
    else:
        dk = gk * scale
    io_mask = k_real[:, None] & dmask[None, :]
    offs = k_row[:, None] * in_stride + (in_col + dcol)[None, :]
    tl.store(dk_ptr + (offs + k_off), dk.to(dk_ptr.dtype.element_ty), mask=io_mask)
    tl.store(dv_ptr + (offs + v_off), dv.to(dv_ptr.dtype.element_ty), mask=io_mask)
    if HAS_PAD:
        padded = (k_valid & ~k_real)[:, None]
        tl.atomic_add(dpad_ptr + (in_col + k_off + dcol), tl.sum(tl.where(padded, dk, 0.0), axis=0), mask=dmask,
                      sem="relaxed")
        tl.atomic_add(dpad_ptr + (in_col + v_off + dcol), tl.sum(tl.where(padded, dv, 0.0), axis=0), mask=dmask,
                      sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# Launchers.


def _check(name: str, *tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(f"{name}: the Triton backend supports float32/float16/bfloat16, got {t.dtype}")


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and triton_interpreted():
        return "upcast"  # see _dot
    if dtype != torch.float32:
        return "tf32"  # unused for 16-bit operands (exact products, fp32 accumulation)
    # PyTorch's switch for float32 matmuls (allow_tf32 sets the precision to "high").
    allow = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allow else "ieee"


def _tiled_blocks(d: int, prec: str) -> dict:
    """Blocks and warps of the tiled (large-window) kernels, chosen so that ptxas keeps every tile in
    registers on sm_90 (compiled offline; no spills at head dims 32, 64 and 128, v1 and v2, forward and
    backward, bf16/fp16, TF32 and IEEE fp32). Tensor-core dots: 64 x 64 blocks on one warpgroup up to
    d = 32, 32 x 32 (TF32 at d = 128: 32 x 16) on 8 warps beyond. IEEE fp32 dots run on the FMA units
    with both operands in registers: 64 x 32 on 8 warps up to d = 32, 16 x 16 on 4 warps beyond."""
    block_d = max(16, triton.next_power_of_2(d))
    # Under the interpreter registers do not matter and small blocks only multiply the (slow, Python)
    # program count: the blocks of d <= 32, the same kernels, at any d.
    small_d = block_d <= 32 or triton_interpreted()
    if prec != "ieee":
        if small_d:
            bm, bn, warps = TILE, TILE, 4
        else:  # TF32 operands take twice the registers of 16-bit ones
            bm, bn, warps = TILE // 2, TILE // (4 if prec == "tf32" and block_d >= 128 else 2), 8
    elif small_d:
        bm, bn, warps = TILE, TILE // 2, 8
    else:
        bm, bn, warps = TILE // 4, TILE // 4, 4
    return dict(BLOCK_M=max(16, bm), BLOCK_N=max(16, bn), BLOCK_D=block_d, num_warps=warps, num_stages=1)


class _Geometry:
    """Scalars shared by the kernels: map or windowed layout, window, shift and strides."""

    def __init__(self, *, map_layout: bool, H=1, W=1, Hp=1, Wp=1, sh=0, sw=0, nWw=1, nW=1, heads: int, N: int,
                 d: int, in_stride: int, in_head: int, k_off: int, v_off: int, out_stride: int, out_head: int,
                 lse_stride: int, lse_head: int, MH: int = 1, MW: int = 1, n_kinds: int = 1):
        self.map_layout = map_layout
        self.H, self.W, self.Hp, self.Wp, self.sh, self.sw = H, W, Hp, Wp, sh, sw
        self.nW, self.nWw, self.heads, self.N, self.d, self.MH, self.MW = nW, nWw, heads, N, d, MH, MW
        self.n_kinds = n_kinds
        last_y = (Hp // MH - 1) if (map_layout and sh) else -1
        last_x = (Wp // MW - 1) if (map_layout and sw) else -1
        self.window_scalars = (H, W, nW, nWw, last_y, last_x, sh % H, sw % W, n_kinds, heads, N, d)
        self.strides = (in_stride, in_head, k_off, v_off, out_stride, out_head)
        self.lse_strides = (lse_stride, lse_head)


def _map_geometry(qkv: torch.Tensor, num_heads: int, window, shift) -> _Geometry:
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    mh, mw = window
    hp, wp = reference.padded_size(h, w, window)
    nww = wp // mw
    return _Geometry(map_layout=True, H=h, W=w, Hp=hp, Wp=wp, sh=shift[0], sw=shift[1], nWw=nww,
                     nW=(hp // mh) * nww, heads=num_heads, N=mh * mw, d=d, in_stride=c3, in_head=d, k_off=c,
                     v_off=2 * c, out_stride=c, out_head=d, lse_stride=num_heads, lse_head=1, MH=mh, MW=mw,
                     n_kinds=4 if any(shift) else 1)


def _windowed_geometry(q: torch.Tensor, mask: Optional[torch.Tensor]) -> _Geometry:
    bw, heads, n, d = q.shape
    return _Geometry(map_layout=False, heads=heads, N=n, d=d, in_stride=d, in_head=0, k_off=0, v_off=0,
                     out_stride=d, out_head=0, lse_stride=1, lse_head=0, MW=1,
                     n_kinds=1 if mask is None else mask.shape[0])


def _one_tile(geo: _Geometry, prec: str, backward: bool) -> bool:
    """Whether windows go through the one-tile kernels (else the tiled ones): at most FUSED_MAX padded
    tokens, and a head dim whose [64, d] tiles the one-tile kernel keeps in registers on sm_90 without
    spilling (compiled offline): tensor cores up to d = 128 forward and 64 backward (which holds dq, dk,
    dv, p, dp, ds and the bias-gradient sum of 64 x 64 at once); IEEE fp32 (FMA dots) up to 32."""
    block_d = max(16, triton.next_power_of_2(geo.d))
    limit = 32 if prec == "ieee" else (64 if backward else 128)
    return max(16, triton.next_power_of_2(geo.N)) <= FUSED_MAX and block_d <= limit


def _padded_tokens(geo: _Geometry, one_tile: bool) -> int:
    """Tokens of a window padded to the kernels' tile: a power of two >= 16 (tl.dot's minimum) for one
    tile, a multiple of TILE for the tiled kernels."""
    return max(16, triton.next_power_of_2(geo.N)) if one_tile else triton.cdiv(geo.N, TILE) * TILE


def _bias_mask_table(geo: _Geometry, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], device,
                     npad: int) -> torch.Tensor:
    """bm (heads, kinds, npad, npad) fp32: (bias + mask of the window kind) * log2(e), -inf past N."""
    bm = torch.empty(geo.heads, geo.n_kinds, npad, npad, dtype=torch.float32, device=device)
    bias_kind = _BIAS_NONE if bias is None else (_BIAS_TABLE if bias.dim() == 2 else _BIAS_DENSE)
    if mask is not None:
        mask_kind = _MASK_DENSE
    else:
        mask_kind = _MASK_COORD if (geo.map_layout and (geo.sh or geo.sw)) else _MASK_NONE
    block_i, block_j = min(npad, 16), min(npad, TILE)  # powers of two dividing npad
    grid = (geo.heads * geo.n_kinds * (npad // block_i) * (npad // block_j),)
    dummy = bm
    # Cut of the last window row / column inside the window (no cut: beyond the window).
    cut_y = geo.MH - geo.sh if geo.sh else geo.MH
    cut_x = geo.MW - geo.sw if geo.sw else geo.MW
    _bias_mask_kernel[grid](dummy if bias is None else bias, dummy if mask is None else mask, bm, geo.heads,
                            geo.n_kinds, geo.N, cut_y, cut_x, MH=geo.MH, MW=geo.MW, BIAS=bias_kind, MASK=mask_kind,
                            NP=npad, BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4)
    return bm


def _windows_per_program(n_windows: int, heads: int, target: int) -> int:
    return max(1, min(MAX_WINDOWS_PER_PROGRAM, (n_windows * heads) // max(1, target)))


def _or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t


def _flags(geo: _Geometry, pad, cosine: bool, prec) -> dict:
    """The constexprs every forward and backward kernel takes."""
    return dict(MH=geo.MH, MW=geo.MW, MAP=geo.map_layout, HAS_PAD=pad is not None, COSINE=cosine,
                ONE_CHANNEL=cosine and geo.d == 1, DOT_PREC=prec)


def _forward(q, k, v, pad, bias, mask, logit_scale, out, lse, scale, geo: _Geometry, n_windows: int):
    prec = _dot_precision(q.dtype)
    one_tile = _one_tile(geo, prec, backward=False)
    npad = _padded_tokens(geo, one_tile)
    bm = _bias_mask_table(geo, bias, mask, q.device, npad)
    cosine = logit_scale is not None
    common = (_or(pad, q), bm, _or(logit_scale, q), out, lse, float(scale))
    flags = _flags(geo, pad, cosine, prec)
    if one_tile:
        per_program = _windows_per_program(n_windows, geo.heads, FWD_PROGRAMS)
        grid = (triton.cdiv(n_windows, per_program) * geo.heads,)
        _fwd_kernel[grid](q, k, v, *common, n_windows, per_program, *geo.window_scalars, *geo.strides,
                          *geo.lse_strides, **flags, ONE_KIND=geo.n_kinds == 1, BLOCK=npad,
                          BLOCK_D=max(16, triton.next_power_of_2(geo.d)))
    else:
        cfg = _tiled_blocks(geo.d, prec)
        grid = (n_windows * geo.heads * triton.cdiv(geo.N, cfg["BLOCK_M"]),)
        _fwd_tiled_kernel[grid](q, k, v, *common, *geo.window_scalars, npad, *geo.strides, *geo.lse_strides,
                                **flags, **cfg)


def _backward(q, k, v, pad, bias, mask, logit_scale, do, lse, dq, dk, dv, scale, geo: _Geometry, n_windows: int):
    """Fills dq, dk, dv; returns (dbias (heads, N, N) fp32 or None, dpad fp32 or None, dt (heads,) fp32 or None)."""
    prec = _dot_precision(q.dtype)
    one_tile = _one_tile(geo, prec, backward=True)
    npad = _padded_tokens(geo, one_tile)
    bm = _bias_mask_table(geo, bias, mask, q.device, npad)
    f32 = dict(dtype=torch.float32, device=q.device)
    dbias = torch.zeros(geo.heads, geo.N, geo.N, **f32) if bias is not None else None
    dpad = torch.zeros(pad.shape[0], **f32) if pad is not None else None
    dt = torch.zeros(geo.heads, **f32) if logit_scale is not None else None
    dummy = torch.zeros(1, **f32)
    inputs = (q, k, v, _or(pad, q), bm, _or(logit_scale, q), do)
    cosine = logit_scale is not None
    flags = _flags(geo, pad, cosine, prec)
    if one_tile:
        per_program = _windows_per_program(n_windows, geo.heads, BWD_PROGRAMS)
        grid = (triton.cdiv(n_windows, per_program) * geo.heads,)
        _bwd_fused_kernel[grid](*inputs, dq, dk, dv, _or(dbias, dummy), _or(dpad, dummy), _or(dt, dummy),
                                float(scale), n_windows, per_program, *geo.window_scalars, *geo.strides, **flags,
                                HAS_BIAS=bias is not None, BLOCK=npad,
                                BLOCK_D=max(16, triton.next_power_of_2(geo.d)))
    else:
        cfg = _tiled_blocks(geo.d, prec)
        rinv = torch.empty(n_windows * geo.heads * npad, **f32)
        dsum = torch.empty_like(rinv)
        lse2 = torch.empty_like(rinv)  # every row's log2-sum-exp2, padded rows' recomputed
        rest = (*geo.window_scalars, npad, *geo.strides, *geo.lse_strides)
        grid = (n_windows * geo.heads * triton.cdiv(geo.N, cfg["BLOCK_M"]),)
        _bwd_rows_kernel[grid](*inputs, lse, dq, _or(dbias, dummy), _or(dpad, dummy), _or(dt, dummy), rinv, dsum,
                               lse2, float(scale), *rest, **flags, HAS_BIAS=bias is not None, **cfg)
        grid = (n_windows * geo.heads * triton.cdiv(geo.N, cfg["BLOCK_N"]),)
        _bwd_cols_kernel[grid](*inputs, lse, dk, dv, _or(dpad, dummy), rinv, dsum, lse2, float(scale), *rest, **flags,
                               **cfg)
    return dbias, dpad, dt


def _logit_scale_grad(dt: Optional[torch.Tensor], logit_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """d/d logit_scale of exp(min(logit_scale, log 100)) given dt = sum(ds * cos) per head."""
    if dt is None:
        return None
    ls = logit_scale.reshape(-1).float()
    # where, not a product: above the clamp the gradient is 0 even when dt is NaN (clamp's backward).
    grad = torch.where(ls <= reference.LOGIT_SCALE_MAX, dt * torch.exp(torch.clamp(ls, max=reference.LOGIT_SCALE_MAX)),
                       0.0)
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
    pad = pad_qkv if (geo.Hp, geo.Wp) != (h, w) else None
    _forward(qkv, qkv, qkv, pad, rel_pos_bias, None, logit_scale, out, lse, scale, geo, b * geo.nW)
    return out, lse


def window_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              pad_qkv: Optional[torch.Tensor], rel_pos_bias: Optional[torch.Tensor],
                              logit_scale: Optional[torch.Tensor], num_heads: int, window, shift, scale: float):
    """(dqkv (B, H, W, 3C), dpad_qkv or None, drel_pos_bias or None, dlogit_scale or None).

    ``out`` is not read: ``rowsum(p * dp)`` is taken from the rebuilt p (see the module docstring); ``lse``
    only by the tiled kernels of windows beyond 64 tokens.
    """
    _check("window_attention_backward", grad_out, qkv, pad_qkv, rel_pos_bias, logit_scale)
    b, h, w, c3 = qkv.shape
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    zeros = (lambda t: None if t is None else torch.zeros_like(t))
    if qkv.numel() == 0:
        return dqkv, zeros(pad_qkv), zeros(rel_pos_bias), zeros(logit_scale)
    window, shift = tuple(window), tuple(shift)
    geo = _map_geometry(qkv, num_heads, window, shift)
    pad = pad_qkv if (geo.Hp, geo.Wp) != (h, w) else None
    do = grad_out.to(qkv.dtype).contiguous()
    dbias, dpad, dt = _backward(qkv, qkv, qkv, pad, rel_pos_bias, None, logit_scale, do, lse.contiguous(),
                                dqkv, dqkv, dqkv, scale, geo, b * geo.nW)
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
    _forward(q, k, v, None, bias, mask, logit_scale, out, lse, scale, geo, q.shape[0])
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
                             q.shape[0])
    if dbias is not None:
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias, _logit_scale_grad(dt, logit_scale)
