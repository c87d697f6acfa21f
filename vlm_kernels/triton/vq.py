"""Vector-quantisation lookup (nearest code) and per-code statistics as Triton kernels, with launchers.

Every launcher takes contiguous tensors and a normalised ``dim`` (the checks live in ``vlm_kernels.ops.vq``)
and meets the contract of ``vlm_kernels.reference.vq``: the index is the float64 argmin (lowest index on
ties), the distance the float64 direct-difference value of the chosen code rounded to float32.

Layout. ``x`` is viewed as ``(outer, D, inner)`` with ``D = x.shape[dim]``; row ``r = o * inner + i`` has its
element ``d`` at ``o * D * inner + d * inner + i`` (``dim = -1``: ``inner = 1``, plain rows). The kernels read
``x`` strided in place: no transposed copy is made. The codebook is ``(K, D)``.

Nearest code (:func:`vq_nearest`), two launches and no host synchronisation:

1. ``_vq_nearest_kernel``: one program per ``BLOCK_M`` rows walks the codebook in ``BLOCK_N``-code tiles.
   Each tile's scores come from ``tl.dot`` on tensor cores (TF32 for float32 and bfloat16 input, fp16 for
   float16 input; fp32 accumulation) on *centred* data, so that data far from the origin (``randn + 1000``)
   do not cancel: with ``c`` the mean of the finite codes, l2 scores ``|e - c|^2 - 2 (x - c) . (e - c)``
   (``|x - e|^2`` less a per-row constant); cosine scores ``-x . e_n + x . m = -c . (e_n - m) - (x - c) .
   (e_n - m)`` with ``e_n = e / max(|e|, eps)`` and ``m`` the mean of the ``e_n`` (``-|x| cos`` plus a per-row
   constant), the first term a per-code penalty prepared in float64. No N x K matrix: each row keeps its 4
   best approximate candidates (a sorted where-chain insertion, fed by extracting each tile's 4 smallest
   scores), then re-scores them exactly in float64 on the original values (direct difference; cosine
   ``x . e / (max(|x|, eps) max(|e|, eps))``) and keeps the best (lowest index on ties).
2. Rigour. A per-row bound ``tol`` on the error of the approximate scores (below) decides whether the
   kept set provably holds the true winner: a code left out has an approximate score >= the worst kept
   one ``s4``, hence a true score >= ``s4 - tol``; the chosen candidate's true score in the same form is
   known from the float64 re-score (l2: ``|x - e|^2 - |x - c|^2``, cosine: ``-cos |x| + x . m``). If
   ``s4 - tol`` exceeds it (plus a float64 rounding slack), no left-out code can win or tie. Otherwise the
   row is *flagged*: its number is appended to a compact list (one ``atomic_add`` per program on a device
   counter, positions by ``tl.cumsum``). ``_vq_rescan_kernel`` (grid over the worst case, programs past the
   counter do nothing) then scans every code for the listed rows in float64 (direct difference) and
   overwrites their outputs. Rows whose approximate scores could overflow (``|x - c| + M`` too large for
   fp32 scores, or for fp16 operands) are flagged too.

Error bound (``_tolerances``). With ``u = 2^-24``, each dot operand carries a relative error of at most
``delta = u + u_p`` (the fp32 rounding of ``x - c`` / of the prepared code, then the rounding to the
tensor-core input format: ``u_p = 2^-10`` for TF32, which Hopper truncates, ``2^-11`` for fp16), and an fp32
accumulation of D exact products in any order (truncating adds allowed) errs by at most
``gamma = 4 (D + 16) u`` of the sum of ``|products|``; so ``|dot' - dot| <= g |x - c| |p_k|`` with
``g = (2 delta + delta^2)(1 + gamma) + gamma`` (Cauchy-Schwarz; ``p_k`` the prepared code). The score
``penalty - s dot`` (``s`` = 2 for l2, 1 for cosine) adds the fp32 rounding of the penalty and of the
subtraction: ``err <= (s g + 4u) |x - c| M + 4u P`` with ``M = max_k |p_k|`` and ``P = max_k |penalty_k|``.
The kernel uses twice that (margin for tensor-core accumulation quirks), plus ``2^-22 sqrt(D) (|x - c| + M)``
for fp16 subnormals and a ``2^-100`` floor for fp32 underflow. A row whose gap between its best and 4th-best
code is below about ``tol`` costs a float64 scan of the whole codebook; ``force_rescan=True`` flags every
finite row.

Why TF32 for bfloat16 input rather than bf16 operands: the centred values ``x - c`` and ``e - c`` are no
longer bf16 numbers, and bf16 operands (``u_p = 2^-8``) would make ``tol`` 4x wider than TF32 does, sending
many more rows to the float64 rescan, which costs far more than the 2x of tensor-core rate.

Non-finite values (as in the reference): a code with a NaN or an infinity is never chosen (it is zeroed in
the prepared copy and its score is +inf); a row with a NaN or an infinity (found as ``sum(x_d * 0)`` being
NaN), or any row when no code is finite, gets index 0 and distance NaN.

Extra memory: O(N + K D): the prepared (centred or normalised) codebook in the dot's input dtype, fp32
norms/penalties, float64 per-code norms, and an int64 list of flagged rows.

Per-code statistics (:func:`vq_code_stats`): one pass over ``x``, ``tl.atomic_add`` of each row into its
code's fp32 sum and count. On a GPU the float sums are therefore not bit-reproducible from run to run
(the order of the atomic adds varies); the counts are exact up to 2^24 rows per code.

Offsets are int32 unless some element offset of ``x`` or the codebook can reach 2^31 (``_needs_int64``),
then int64: int64 addresses for every element of a tile made the main kernel spill heavily on sm_90.

Unmeasured: everything on a GPU (none was available to this work). The tile sizes (BLOCK_M = 128 rows with
8 warps when there are enough rows for two waves of programs on an H100, else 64 rows with 4 warps;
BLOCK_N = 64; the whole D when D <= 64, else chunks of 32; num_stages = 2) are chosen by reasoning and by
compiling for sm_90 without a GPU (``triton.compile`` with a ``GPUTarget("cuda", 90, 32)``, then
``ptxas -v``): every variant compiles to wgmma code; the int32-offset variants spill at most ~100 bytes
(mostly none), the int64 ones up to ~1 KB. Not tuned; no split over the codebook for few rows and large K.
The share of flagged rows on real (trained) codebooks, the cost of the float64 rescan and of the atomics
under contention have not been measured. The tests run the kernels in the Triton interpreter, which
computes ``tl.dot`` in full fp32 (``emulate_tf32=True`` truncates the operands to TF32 there).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.vq import COSINE_EPS
from ._target import sized_for_interpreter

# Rows per program and codes per tile of the main kernel; a whole D <= MAX_BLOCK_D is one chunk (the row
# tile then stays in registers across codebook tiles). BLOCK_M rows with 8 warps when there are at least
# BIG_M_PROGRAMS such programs (two waves on 132 SMs), else SMALL_BLOCK_M rows with 4 warps.
BLOCK_M = 128
SMALL_BLOCK_M = 64
BIG_M_PROGRAMS = 264
BLOCK_N = 64
MAX_BLOCK_D = 64
LOOP_BLOCK_D = 32  # D chunk when D > MAX_BLOCK_D (64 spills on sm_90: ptxas -v of the 3.8 output)
# D chunk of the float64 re-score of the candidates.
RESCORE_CHUNK = 16
# Rows and codes per tile of the float64 rescan; rows per program of the statistics kernel.
RESCAN_ROWS = 16
RESCAN_CODES = 64
RESCAN_CHUNK = 8  # 16 x 64 x 8 float64 = 32 per thread at 8 warps
STATS_ROWS = 64
STATS_BLOCK_D = 32
# CPU tensors run in the Triton interpreter (tests), where each block op is a Python-level step and
# registers are no concern: larger tiles, same code path.
INTERPRETER_BLOCK_M = 128
INTERPRETER_BLOCK_N = 256
INTERPRETER_RESCAN_CHUNK = 32
# tl.dot needs every block dim >= 16.
_MIN_DOT = 16
_BIG = tl.constexpr(2147483647)  # larger than any code index
_EPS = tl.constexpr(COSINE_EPS)
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_U = 2.0**-24


# ----------------------------------------------------------------------------------------------------
# Helpers.


@triton.jit
def _index(v, I64: tl.constexpr):
    """``v`` in the offset type: int64 when some offset may reach 2^31 (``I64``), else int32 (int64
    addresses for every element of a tile cost registers: the main kernel spills with them)."""
    if I64:
        return v.to(tl.int64)
    else:
        return v.to(tl.int32)


@triton.jit
def _row_bases(rows, inner, D):
    """Offset of element 0 of each row ``o * inner + i``: ``o * D * inner + i``, in ``rows``' int type."""
    o = rows // inner
    i = rows - o * inner
    return (o * D) * inner + i


@triton.jit
def _f64(v):
    """Exact widening to float64 through fp32 (a bf16 -> f64 conversion is not available everywhere)."""
    return v.to(tl.float32).to(tl.float64)


@triton.jit
def _load_x(x_ptr, base, dd, row_ok, inner, D):
    """The [rows, dd] block of x in its own dtype (0 where masked)."""
    offs = base[:, None] + dd.to(base.dtype)[None, :] * inner
    mask = row_ok[:, None] & (dd < D)[None, :]
    return tl.load(x_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _truncate_tf32(v, EMULATE_TF32: tl.constexpr):
    """Tests only: drop the 13 low mantissa bits as Hopper's TF32 tensor cores do (the interpreter's
    tl.dot computes in full fp32, which would leave the TF32 error bound untested)."""
    if EMULATE_TF32:
        return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    else:
        return v


@triton.jit
def _dot_operand(x_ptr, center_ptr, base, dd, row_ok, finite, inner, D, DOT_FP16: tl.constexpr,
                 EMULATE_TF32: tl.constexpr):
    """The [rows, dd] block of x - c, zeroed on non-finite rows, in the dot's input dtype."""
    xv = _load_x(x_ptr, base, dd, row_ok, inner, D).to(tl.float32)
    xv = xv - tl.load(center_ptr + dd, mask=dd < D, other=0.0)[None, :]
    xv = tl.where(finite[:, None], xv, 0.0)
    if DOT_FP16:
        return xv.to(tl.float16)
    else:
        return _truncate_tf32(xv, EMULATE_TF32)


@triton.jit
def _code_block_t(cbp_ptr, codes, dd, K, D, EMULATE_TF32: tl.constexpr, I64: tl.constexpr):
    """The prepared codebook's [dd, codes] block (transposed), 0 where masked."""
    offs = _index(codes, I64)[None, :] * D + _index(dd, I64)[:, None]
    mask = (codes < K)[None, :] & (dd < D)[:, None]
    return _truncate_tf32(tl.load(cbp_ptr + offs, mask=mask, other=0.0), EMULATE_TF32)


@triton.jit
def _mma(a, b, acc, DOT_FP16: tl.constexpr):
    if DOT_FP16:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _insert(s0, s1, s2, s3, i0, i1, i2, i3, m, k):
    """Insert (m, k) into the sorted (s0 <= s1 <= s2 <= s3) candidate list; strict ``<`` keeps the earlier
    (lower) index ahead on ties, and a NaN ``m`` inserts nothing."""
    b0 = m < s0
    b1 = m < s1
    b2 = m < s2
    b3 = m < s3
    n3 = tl.where(b2, s2, tl.where(b3, m, s3))
    j3 = tl.where(b2, i2, tl.where(b3, k, i3))
    n2 = tl.where(b1, s1, tl.where(b2, m, s2))
    j2 = tl.where(b1, i1, tl.where(b2, k, i2))
    n1 = tl.where(b0, s0, tl.where(b1, m, s1))
    j1 = tl.where(b0, i0, tl.where(b1, k, i1))
    n0 = tl.where(b0, m, s0)
    j0 = tl.where(b0, k, i0)
    return n0, n1, n2, n3, j0, j1, j2, j3


@triton.jit
def _code_partial(cb_ptr, cand, x64, dd, D, L2: tl.constexpr, I64: tl.constexpr):
    """Float64 partial sum over ``dd`` for each row's candidate code: sum (x - e)^2 (l2) or sum x e."""
    offs = _index(cand, I64)[:, None] * D + _index(dd, I64)[None, :]
    e = _f64(tl.load(cb_ptr + offs, mask=(dd < D)[None, :], other=0.0))
    if L2:
        t = x64 - e
        return tl.sum(t * t, axis=1)
    else:
        return tl.sum(x64 * e, axis=1)


@triton.jit
def _rescore(acc, cand, s, nx, aux_ptr, best_sc, best_i, L2: tl.constexpr):
    """Fold one candidate's exact score (l2: the distance; cosine: -cos) into the running best, lowest
    index on ties. A candidate slot that never received a code (``s`` = +inf) is skipped."""
    if L2:
        sc = acc
    else:
        ne = tl.load(aux_ptr + cand)
        sc = -(acc / (nx * ne))
    better = (s < float("inf")) & ((sc < best_sc) | ((sc == best_sc) & (cand < best_i)))
    return tl.where(better, sc, best_sc), tl.where(better, cand, best_i)


# ----------------------------------------------------------------------------------------------------
# Nearest code: tensor-core tiles + candidates + exact re-score; flagged rows listed for the rescan.


@triton.jit
def _vq_nearest_kernel(x_ptr, cb_ptr, cbp_ptr, pen_ptr, center_ptr, shift_ptr, bounds_ptr, aux_ptr, idx_ptr, dist_ptr,
                       list_ptr, count_ptr, N, D, inner, K, tol_g, tol_h, tol_a, eps64, limit,
                       L2: tl.constexpr, DOT_FP16: tl.constexpr, SINGLE_D: tl.constexpr,
                       EMULATE_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, RESCORE_D: tl.constexpr, I64: tl.constexpr):
    pid = _index(tl.program_id(0), I64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    base = _row_bases(rows, inner, D)
    ds = tl.arange(0, BLOCK_D)

    # Pass 1: |x - c| (fp32, for the bound) and whether the row is finite (sum of x * 0 is NaN otherwise).
    sq = tl.zeros([BLOCK_M], tl.float32)
    probe = tl.zeros([BLOCK_M], tl.float32)
    ds2 = tl.arange(0, RESCORE_D)  # narrow chunks outside the tile loop keep register pressure low
    for d0 in range(0, D, RESCORE_D):
        dd = d0 + ds2
        xv = _load_x(x_ptr, base, dd, row_ok, inner, D).to(tl.float32)
        probe += tl.sum(xv * 0.0, axis=1)
        xv = xv - tl.load(center_ptr + dd, mask=dd < D, other=0.0)[None, :]
        sq += tl.sum(xv * xv, axis=1)
    finite = probe == 0.0
    if SINGLE_D:  # the whole row tile stays in registers across codebook tiles
        xa = _dot_operand(x_ptr, center_ptr, base, ds, row_ok, finite, inner, D, DOT_FP16, EMULATE_TF32)

    # Pass 2: codebook tiles, keeping the 4 smallest approximate scores per row.
    inf = float("inf")
    s0 = tl.full([BLOCK_M], inf, tl.float32)
    s1 = s0
    s2 = s0
    s3 = s0
    i0 = tl.zeros([BLOCK_M], tl.int32)
    i1 = i0
    i2 = i0
    i3 = i0
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(0, K, BLOCK_N):
        codes = n0 + cols
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if SINGLE_D:
            acc = _mma(xa, _code_block_t(cbp_ptr, codes, ds, K, D, EMULATE_TF32, I64), acc, DOT_FP16)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + ds
                a = _dot_operand(x_ptr, center_ptr, base, dd, row_ok, finite, inner, D, DOT_FP16, EMULATE_TF32)
                acc = _mma(a, _code_block_t(cbp_ptr, codes, dd, K, D, EMULATE_TF32, I64), acc, DOT_FP16)
        pen = tl.load(pen_ptr + codes, mask=codes < K, other=inf)  # +inf: non-finite code or past K
        if L2:
            score = pen[None, :] - 2.0 * acc
        else:
            score = pen[None, :] - acc
        for _ in tl.static_range(4):
            m, j = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
            s0, s1, s2, s3, i0, i1, i2, i3 = _insert(s0, s1, s2, s3, i0, i1, i2, i3, m, n0 + j)
            score = tl.where(cols[None, :] == j[:, None], inf, score)

    # Exact float64 re-score of the candidates on the original values.
    a0 = tl.zeros([BLOCK_M], tl.float64)
    a1 = a0
    a2 = a0
    a3 = a0
    xx = a0  # l2: |x - c|^2, cosine: |x|^2
    xm = a0  # cosine: x . m
    for d0 in range(0, D, RESCORE_D):
        dd = d0 + ds2
        x64 = _f64(_load_x(x_ptr, base, dd, row_ok, inner, D))
        if L2:
            xc = x64 - _f64(tl.load(center_ptr + dd, mask=dd < D, other=0.0))[None, :]
            xx += tl.sum(xc * xc, axis=1)
        else:
            xx += tl.sum(x64 * x64, axis=1)
            xm += tl.sum(x64 * _f64(tl.load(shift_ptr + dd, mask=dd < D, other=0.0))[None, :], axis=1)
        a0 += _code_partial(cb_ptr, i0, x64, dd, D, L2, I64)
        a1 += _code_partial(cb_ptr, i1, x64, dd, D, L2, I64)
        a2 += _code_partial(cb_ptr, i2, x64, dd, D, L2, I64)
        a3 += _code_partial(cb_ptr, i3, x64, dd, D, L2, I64)
    nx = tl.maximum(tl.sqrt(xx), _EPS)  # fp64 sqrt is correctly rounded
    best_sc = tl.full([BLOCK_M], inf, tl.float64)
    best_i = tl.full([BLOCK_M], _BIG, tl.int32)
    best_sc, best_i = _rescore(a0, i0, s0, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a1, i1, s1, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a2, i2, s2, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a3, i3, s3, nx, aux_ptr, best_sc, best_i, L2)
    bad = (~finite) | (best_i == _BIG)
    if L2:
        dist = best_sc
    else:
        dist = 1.0 + best_sc  # 1 - cos
    tl.store(idx_ptr + rows, tl.where(bad, 0, best_i).to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, tl.where(bad, float("nan"), dist.to(tl.float32)), mask=row_ok)

    # Could a code outside the kept four be the true winner? Every such code k has an approximate score
    # >= s3, so its true score is >= s3 - tol; the chosen code's true score (in the same form) is known:
    # l2 |x - e|^2 - |x - c|^2, cosine -cos |x| + x . m. If s3 - tol exceeds it, no left-out code can win
    # (or tie); otherwise list the row for the exact rescan.
    big_m = tl.load(bounds_ptr)  # max |prepared code|
    big_p = tl.load(bounds_ptr + 1)  # max |penalty|
    xn = tl.sqrt(sq) * 1.00390625  # covers the fp32 rounding of |x - c|
    tol = tol_g * xn * big_m + tol_h * big_p + tol_a * (xn + big_m) + 7.888609052210118e-31  # 2^-100
    if L2:
        chosen = best_sc - xx
        slack = eps64 * (best_sc + xx)  # float64 rounding of both sums
    else:
        chosen = best_sc * nx + xm
        slack = eps64 * 2.0 * nx
    in_range = (xn + big_m) < limit  # NaN/inf fail: the approximate scores may have overflowed
    ambiguous = (best_i != _BIG) & (~(s3.to(tl.float64) - tol.to(tl.float64) > chosen + slack))
    flag = row_ok & finite & ((~in_range) | ambiguous)
    f = flag.to(tl.int32)
    n_flag = tl.sum(f, axis=0)
    if n_flag > 0:
        start = tl.atomic_add(count_ptr, n_flag.to(tl.int64))
        pos = start + (tl.cumsum(f, axis=0) - f).to(tl.int64)
        tl.store(list_ptr + pos, rows.to(tl.int64), mask=flag)


@triton.jit
def _vq_rescan_kernel(x_ptr, cb_ptr, aux_ptr, list_ptr, count_ptr, idx_ptr, dist_ptr, D, inner, K,
                      L2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """Exact float64 scan of every code for the flagged rows ``list[pid * BLOCK_R :][:BLOCK_R]``, ``CHUNK``
    elements of D at a time (a [BLOCK_R, BLOCK_K, CHUNK] float64 broadcast, summed over the chunk)."""
    count = tl.load(count_ptr)
    start = tl.program_id(0).to(tl.int64) * BLOCK_R
    if start < count:
        slots = start + tl.arange(0, BLOCK_R)
        live = slots < count
        rows = tl.load(list_ptr + slots, mask=live, other=0)
        base = _row_bases(rows, inner, D)
        dcs = tl.arange(0, CHUNK)
        nx = tl.zeros([BLOCK_R], tl.float64)
        if not L2:
            for d0 in range(0, D, CHUNK):
                xv = _f64(_load_x(x_ptr, base, d0 + dcs, live, inner, D))
                nx += tl.sum(xv * xv, axis=1)
            nx = tl.maximum(tl.sqrt(nx), _EPS)
        cols = tl.arange(0, BLOCK_K)
        best_sc = tl.full([BLOCK_R], float("inf"), tl.float64)
        best_i = tl.zeros([BLOCK_R], tl.int32)
        for n0 in range(0, K, BLOCK_K):
            codes = n0 + cols
            cmask = codes < K
            crow = codes.to(tl.int64) * D
            acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float64)
            for d0 in range(0, D, CHUNK):
                dd = d0 + dcs
                xv = _f64(_load_x(x_ptr, base, dd, live, inner, D))
                ev = _f64(tl.load(cb_ptr + crow[:, None] + dd.to(tl.int64)[None, :],
                                  mask=cmask[:, None] & (dd < D)[None, :], other=0.0))
                if L2:
                    t = xv[:, None, :] - ev[None, :, :]
                    acc += tl.sum(t * t, axis=2)
                else:
                    acc += tl.sum(xv[:, None, :] * ev[None, :, :], axis=2)
            aux = tl.load(aux_ptr + codes, mask=cmask, other=float("nan"))  # NaN: non-finite code or past K
            if L2:
                sc = acc + aux[None, :]
            else:
                sc = -(acc / (nx[:, None] * aux[None, :]))
            sc = tl.where(sc == sc, sc, float("inf"))
            m, j = tl.min(sc, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = m < best_sc  # strict: an earlier tile keeps its tie
            best_sc = tl.where(better, m, best_sc)
            best_i = tl.where(better, n0 + j, best_i)
        none = best_sc == float("inf")  # no finite code at all
        if L2:
            dist = best_sc
        else:
            dist = 1.0 + best_sc
        tl.store(idx_ptr + rows, tl.where(none, 0, best_i).to(tl.int64), mask=live)
        tl.store(dist_ptr + rows, tl.where(none, float("nan"), dist.to(tl.float32)), mask=live)


# ----------------------------------------------------------------------------------------------------
# Per-code statistics.


@triton.jit
def _vq_code_stats_kernel(x_ptr, idx_ptr, counts_ptr, sums_ptr, N, D, inner, K,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr):
    pid = _index(tl.program_id(0), I64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    k = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    ok = row_ok & (k >= 0) & (k < K)  # never write outside counts/sums
    k = _index(tl.where(ok, k, 0), I64)
    tl.atomic_add(counts_ptr + k, tl.full([BLOCK_R], 1.0, tl.float32), mask=ok)
    base = _row_bases(rows, inner, D)
    ds = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + ds
        xv = _load_x(x_ptr, base, dd, row_ok, inner, D).to(tl.float32)
        offs = k[:, None] * D + _index(dd, I64)[None, :]
        tl.atomic_add(sums_ptr + offs, xv, mask=ok[:, None] & (dd < D)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers.


def _geometry(x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """(outer, D, inner) of ``x`` around ``dim``."""
    shape = x.shape
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def _check(name: str, t: torch.Tensor, arg: str) -> None:
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name}: the Triton backend supports float32/float16/bfloat16 {arg}, got {t.dtype}")


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _block_d(D: int, max_block_d: Optional[int], floor: int) -> int:
    limit = max(floor, _pow2_floor(max_block_d or MAX_BLOCK_D))
    return max(floor, min(limit, triton.next_power_of_2(D)))


def _needs_int64(x: torch.Tensor, K: int, D: int, block_rows: int) -> bool:
    """Whether an element offset into x or the (K, D) codebook (masked tail rows included) can reach 2^31."""
    return x.numel() + 2 * block_rows * D >= 2**31 or (K + 1024) * D >= 2**31


def _prepare_codebook(codebook: torch.Tensor, metric: str, dot_dtype: torch.dtype):
    """Device-side set-up, no host sync. Returns (prepared (K, D) in the dot dtype, penalty (K,) fp32,
    centre c (D,) fp32, shift m (D,) fp32, bounds (2,) fp32 = [max |prepared row|, max |penalty|] rounded up,
    aux (K,) float64).

    ``c`` is the mean of the finite codes; the kernel scores ``penalty - 2 (x - c) . prepared`` (l2) or
    ``penalty - (x - c) . prepared`` (cosine).

    * l2: prepared = e - c, penalty = |e - c|^2 (= |x - e|^2 - |x - c|^2 + 2 (x - c) . (e - c)), aux = 0.
    * cosine: with e_n = e / max(|e|, eps) and m the mean of the finite e_n, prepared = e_n - m and
      penalty = -c . (e_n - m), so the score is -x . e_n + x . m (the last term is the same for every code):
      data clustered around one direction keep small operands, hence a small error bound.
      aux = max(|e|, eps).

    Non-finite codes: prepared row 0, penalty +inf, aux NaN.
    """
    e64 = codebook.to(torch.float64)
    good = torch.isfinite(e64).all(dim=1)
    zero = torch.zeros((), dtype=torch.float64, device=e64.device)
    e64 = torch.where(good[:, None], e64, zero)
    inf = torch.full((), float("inf"), dtype=torch.float64, device=e64.device)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=e64.device)
    n_good = good.sum().clamp_min(1)
    center = (e64.sum(0) / n_good).to(torch.float32)
    if metric == "l2":
        prepared = e64 - center.to(torch.float64)
        penalty = (prepared * prepared).sum(1)
        aux = torch.where(good, zero, nan)
        shift = center  # unused
    else:
        norms = e64.norm(dim=1).clamp_min(COSINE_EPS)
        e_n = e64 / norms[:, None]
        shift = (e_n.sum(0) / n_good).to(torch.float32)
        prepared = torch.where(good[:, None], e_n - shift.to(torch.float64), zero)
        penalty = -(prepared @ center.to(torch.float64))
        aux = torch.where(good, norms, nan)
    big_m = torch.where(good, prepared.norm(dim=1), zero).max()
    big_p = torch.where(good, penalty.abs(), zero).max()
    bounds = (torch.stack([big_m, big_p]) * (1.0 + 2.0**-20)).to(torch.float32)
    penalty = torch.where(good, penalty, inf).to(torch.float32)
    return prepared.to(dot_dtype).contiguous(), penalty, center, shift, bounds, aux


def _tolerances(D: int, metric: str, dot_fp16: bool) -> tuple[float, float, float, float]:
    """(tol_g, tol_h, tol_a, limit): ``tol = tol_g |x - c| M + tol_h P + tol_a (|x - c| + M) + 2^-100`` bounds
    the error of a row's approximate scores (twice the derivation in the module docstring; ``M``, ``P``: the
    largest prepared-code norm and penalty); rows with ``|x - c| + M >= limit`` are rescanned (their fp32
    scores or fp16 operands could overflow)."""
    u = _U
    u_p = 2.0**-11 if dot_fp16 else 2.0**-10  # fp16 rounding; TF32 truncation
    delta = u + u_p + u * u_p
    gamma = 4.0 * (D + 16) * u
    g = (2.0 * delta + delta * delta) * (1.0 + gamma) + gamma
    tol_a = (2.0**-22 if dot_fp16 else 2.0**-110) * math.sqrt(D)
    scale = 2.0 if metric == "l2" else 1.0  # the score is penalty - scale * dot
    tol_g = 2.0 * (scale * g + 4.0 * u)
    tol_h = 2.0 * 4.0 * u
    limit = 2.0**15 if dot_fp16 else 2.0**60  # fp16 operands must not overflow; fp32 scores stay < 2^121
    return tol_g, tol_h, tol_a, limit


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, dim: int, metric: str, *,
               block_m: Optional[int] = None, max_block_n: Optional[int] = None,
               max_block_d: Optional[int] = None, force_rescan: bool = False,
               emulate_tf32: bool = False, stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every row of ``x``: ``(indices int64, distances float32)``, x's shape without ``dim``.

    x: contiguous, float32/float16/bfloat16, rows along ``dim`` (see the module docstring for the layout);
    codebook: contiguous (K, D), x's dtype; metric: ``"l2"`` or ``"cosine"``.

    ``block_m`` / ``max_block_n`` / ``max_block_d`` set the tile sizes (tests use them to run several
    codebook tiles and D chunks on small shapes; tl.dot needs >= 16), ``force_rescan`` sends every finite
    row through the float64 rescan, ``emulate_tf32`` truncates the float32 dot operands to TF32 in the
    kernel (for interpreter tests of the error bound), and a ``stats`` dict receives ``"flagged"``: a
    1-element int64 device tensor, the number of rows that were rescanned.
    """
    _check("vq_nearest", x, "x")
    _check("vq_nearest", codebook, "codebook")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"vq_nearest: metric must be 'l2' or 'cosine', got {metric!r}")
    x = x.contiguous()
    codebook = codebook.contiguous()
    outer, D, inner = _geometry(x, dim)
    K = codebook.shape[0]
    n = outer * inner
    shape = [s for i, s in enumerate(x.shape) if i != dim]
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    distances = torch.empty(n, dtype=torch.float32, device=x.device)
    count = torch.zeros(1, dtype=torch.int64, device=x.device)
    if stats is not None:
        stats["flagged"] = count
    if n == 0:
        return indices.reshape(shape), distances.reshape(shape)
    if K >= 2**31 - 1024 or D >= 2**31:
        raise ValueError(f"vq_nearest: codebook {tuple(codebook.shape)} is too large for the Triton kernels")

    dot_fp16 = x.dtype == torch.float16
    l2 = metric == "l2"
    prepared, penalty, center, shift, bounds, aux = _prepare_codebook(
        codebook, metric, torch.float16 if dot_fp16 else torch.float32)
    tol_g, tol_h, tol_a, limit = _tolerances(D, metric, dot_fp16)
    if force_rescan:
        tol_g = float("inf")

    interpreted = sized_for_interpreter(x)
    if block_m is None:
        if interpreted:
            bm = INTERPRETER_BLOCK_M
        else:
            bm = BLOCK_M if triton.cdiv(n, BLOCK_M) >= BIG_M_PROGRAMS else SMALL_BLOCK_M
    else:
        bm = max(_MIN_DOT, _pow2_floor(block_m))
    bn_max = max_block_n or (INTERPRETER_BLOCK_N if interpreted else BLOCK_N)
    bn = max(_MIN_DOT, min(_pow2_floor(bn_max), triton.next_power_of_2(K)))
    if max_block_d is None:
        bd = max(_MIN_DOT, triton.next_power_of_2(D))
        bd = bd if bd <= MAX_BLOCK_D else (MAX_BLOCK_D if interpreted else LOOP_BLOCK_D)
    else:
        bd = _block_d(D, max_block_d, _MIN_DOT)
    n_programs = triton.cdiv(n, bm)
    if triton.cdiv(n, RESCAN_ROWS) >= 2**31:
        raise ValueError(f"vq_nearest: too many rows for the Triton kernels ({n})")
    flagged = torch.empty(n, dtype=torch.int64, device=x.device)
    i64 = _needs_int64(x, K, D, bm)
    _vq_nearest_kernel[(n_programs,)](
        x, codebook, prepared, penalty, center, shift, bounds, aux, indices, distances, flagged, count,
        n, D, inner, K, tol_g, tol_h, tol_a, (D + 8) * 2.0**-52, limit,
        L2=l2, DOT_FP16=dot_fp16, SINGLE_D=bd >= D,
        EMULATE_TF32=bool(emulate_tf32) and not dot_fp16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        RESCORE_D=min(bd, RESCORE_CHUNK), I64=i64, num_warps=8 if bm >= 128 else 4, num_stages=2)
    rescan_codes = min(RESCAN_CODES, max(_MIN_DOT, _pow2_floor(max_block_n or RESCAN_CODES)))
    chunk = INTERPRETER_RESCAN_CHUNK if interpreted else RESCAN_CHUNK
    _vq_rescan_kernel[(triton.cdiv(n, RESCAN_ROWS),)](
        x, codebook, aux, flagged, count, indices, distances, D, inner, K,
        L2=l2, BLOCK_R=RESCAN_ROWS, BLOCK_K=rescan_codes, CHUNK=chunk, num_warps=8)
    return indices.reshape(shape), distances.reshape(shape)


def vq_code_stats(x: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int, *,
                  block_rows: Optional[int] = None, max_block_d: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts (K,), sums (K, D))``, both float32: rows per code and the sum of each code's rows.

    x: contiguous float32/float16/bfloat16; indices: contiguous int64 of x's shape without ``dim``, values
    in [0, num_codes) (others are skipped, never written). One pass, fp32 atomic adds: on a GPU the sums
    are not bit-reproducible from run to run.
    """
    _check("vq_code_stats", x, "x")
    x = x.contiguous()
    idx = indices.contiguous()
    outer, D, inner = _geometry(x, dim)
    n = outer * inner
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device)
    sums = torch.zeros(num_codes, D, dtype=torch.float32, device=x.device)
    if n == 0 or D == 0:
        return counts, sums
    br = _pow2_floor(block_rows or STATS_ROWS)
    bd = _block_d(D, max_block_d or STATS_BLOCK_D, 1)
    n_programs = triton.cdiv(n, br)
    if n_programs >= 2**31:
        raise ValueError(f"vq_code_stats: too many rows for the Triton kernel ({n})")
    _vq_code_stats_kernel[(n_programs,)](x, idx, counts, sums, n, D, inner, num_codes, BLOCK_R=br, BLOCK_D=bd,
                                         I64=_needs_int64(x, num_codes, D, br), num_warps=4)
    return counts, sums
