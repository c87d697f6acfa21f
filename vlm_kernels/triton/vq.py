"""Vector-quantisation lookup (nearest code) and per-code statistics as Triton kernels, with launchers.

Every launcher takes contiguous tensors and a normalised ``dim`` (the checks live in ``vlm_kernels.ops.vq``)
and meets the contract of ``vlm_kernels.reference.vq``: the index is the float64 argmin (lowest index on
ties), the distance the float64 direct-difference value of the chosen code rounded to float32.

Layout. ``x`` is viewed as ``(outer, D, inner)`` with ``D = x.shape[dim]``; row ``r = o * inner + i`` has its
element ``d`` at ``o * D * inner + d * inner + i`` (``dim = -1``: ``inner = 1``, plain rows). The kernels read
``x`` strided in place: no transposed copy is made. The codebook is ``(K, D)``.

Nearest code (:func:`vq_nearest`), two or three launches and no host synchronisation:

1. ``_vq_nearest_kernel``: one program per ``BLOCK_M`` rows walks the codebook in ``BLOCK_N``-code tiles.
   Each tile's scores come from ``tl.dot`` on tensor cores (TF32 for float32 and bfloat16 input, fp16 for
   float16 input; fp32 accumulation) on *centred* data, so that data far from the origin (``randn + 1000``)
   do not cancel: with ``c`` the mean of the finite codes, l2 scores ``|e - c|^2 - 2 (x - c) . (e - c)``
   (``|x - e|^2`` less a per-row constant); cosine scores ``-x . e_n + x . m = -c . (e_n - m) - (x - c) .
   (e_n - m)`` with ``e_n = e / max(|e|, eps)`` and ``m`` the mean of the ``e_n`` (``-|x| cos`` plus a per-row
   constant), the first term a per-code penalty prepared in float64. TF32 operands are rounded to the
   nearest TF32 value first (the codebook once on the host side, ``x - c`` once per row tile), which the
   tensor cores then keep exactly: half the error of their own truncation.

   Resident row tile. When D <= 256 (fp32/bf16; 512 for fp16) the program's ``x - c`` tile is staged once,
   before the code loop, and stays in the wgmma A-operand registers (128 per thread for 128 rows of 256
   fp32 at 8 warps); each code tile is one dot over the whole D, its [D, BLOCK_N] slice of the (zero-padded,
   whole-tile) prepared codebook pipelined through shared memory (3 stages: 192 KB at D = 256). The first
   tile is peeled out of the loop: the operand then has two users, which keeps Triton (3.6) from re-loading
   it from a shared-memory copy in every iteration. Triton 3.2 and 3.8 re-load it anyway (320 KB of shared
   memory), so releases outside ``RESIDENT_TRITON`` (3.3-3.6) stream x instead: D in chunks of ``LOOP_BLOCK_D``,
   re-staged for every code tile (as does any larger D); a resident launch that runs out of resources
   falls back to that too.

   Epilogue (per score: one FFMA, one LOP3, three FMNMX). Each score's ``INDEX_BITS = log2(BLOCK_N)`` low
   mantissa bits are replaced by its column: one float min then gives the score and the code. One reduce
   per tile yields each row's smallest and second-smallest key; the smallest joins a sorted 6-candidate
   list (a where-chain insertion per row, amortised over the tile), the second lowers ``bound``. A code
   outside the list is a tile's non-best (key >= that tile's second best >= ``bound``) or a tile-best pushed
   out by six smaller keys (key >= ``s5``): every left-out key is >= ``low = min(s5, bound)``. After the
   loop the 6 candidates are re-scored exactly in float64 on the original values (direct difference;
   cosine ``x . e / (max(|x|, eps) max(|e|, eps))``), lowest index on ties.
2. Rigour. A per-row bound ``tol`` on the error of the approximate scores (below) decides whether the
   candidates provably hold the true winner: a left-out code's score is >= ``low - |low| 2^(INDEX_BITS-22)``
   (the key's low bits), hence its true score >= that - ``tol``; the chosen candidate's true score in the
   same form is known from the float64 re-score (l2: ``|x - e|^2 - |x - c|^2``, cosine: ``-cos |x| + x .
   m``). If the former exceeds it (plus a float64 rounding slack), no left-out code can win or tie.
   Otherwise the row is *flagged*: its number is appended to a compact list (one ``atomic_add`` per
   program on a device counter, positions by ``tl.cumsum``). Rows whose approximate scores could overflow
   (``|x - c| + M`` too large for fp32 scores, or for fp16 operands) are flagged too.
3. Rescan. ``_vq_rescan_kernel`` runs on a fixed grid (2 programs per SM) whose programs loop over work
   items counted from the device counter. While at most ``RESCAN_CAP`` rows are flagged, the codebook is
   split into up to 32 ranges of >= 256 codes and an item is (16 listed rows, one range): the few flagged
   rows' float64 work spreads over every SM; each item writes its rows' best (score, lowest code) per
   range, and ``_vq_rescan_reduce_kernel`` keeps the smallest, the lowest range on ties (so the lowest
   index). With more flagged rows, an item is 16 rows against the whole codebook, written directly.
   Either way the scores are float64 direct differences (one sub and one fma per term) and the outputs of
   the listed rows are overwritten.

Error bound (``_tolerances``). With ``u = 2^-24``, each dot operand carries a relative error of at most
``delta = u + u_p`` (the fp32 rounding of ``x - c`` / of the prepared code, then the rounding to the
tensor-core input format: ``u_p = 2^-11``, for fp16 and for the kernel's round-to-nearest TF32), and an fp32
accumulation of D exact products in any order (truncating adds allowed) errs by at most
``gamma = 4 (D + 16) u`` of the sum of ``|products|``; so ``|dot' - dot| <= g |x - c| |p_k|`` with
``g = (2 delta + delta^2)(1 + gamma) + gamma`` (Cauchy-Schwarz; ``p_k`` the prepared code). The score
``penalty - s dot`` (``s`` = 2 for l2, 1 for cosine) adds the fp32 rounding of the penalty and of the
subtraction: ``err <= (s g + 4u) |x - c| M + 4u P`` with ``M = max_k |p_k|`` and ``P = max_k |penalty_k|``.
The kernel uses twice that (margin for tensor-core accumulation quirks), plus ``2^-22 sqrt(D) (|x - c| + M)``
for fp16 subnormals and a ``2^-100`` floor for fp32 underflow. ``force_rescan=True`` flags every finite row.
On random normal data at N = 65536, K = 8192, D = 256 (fp32, BLOCK_N = 64) a replica of this logic in
PyTorch flags about 0.06% of the rows for l2 and 0.13% for cosine (with 4 candidates and TF32 truncation,
as before: 1.1% and 0.8%).

Why TF32 for bfloat16 input rather than bf16 operands: the centred values ``x - c`` and ``e - c`` are no
longer bf16 numbers, and bf16 operands (``u_p = 2^-8``) would make ``tol`` 8x wider than TF32 does, sending
many more rows to the float64 rescan, which costs far more than the 2x of tensor-core rate.

Non-finite values (as in the reference): a code with a NaN or an infinity is never chosen (it is zeroed in
the prepared copy and its penalty is ``2^126``, a finite score above any real one, so that no NaN enters the
min/max reductions; keys that large hold no code); a row with a NaN or an infinity (found as ``sum(x_d * 0)``
being NaN), or any row when no code is finite, gets index 0 and distance NaN.

Extra memory: O(N + K D): the prepared (centred or normalised) codebook in the dot's input dtype padded to
whole tiles, fp32 norms/penalties, float64 per-code norms, an int64 list of flagged rows, and the split
rescan's per-range partials (at most RESCAN_CAP x 32 x 12 bytes = 1.5 MB).

Per-code statistics (:func:`vq_code_stats`): one pass over ``x``, ``tl.atomic_add`` of each row into its
code's fp32 sum and count. On a GPU the float sums are therefore not bit-reproducible from run to run
(the order of the atomic adds varies); the counts are exact up to 2^24 rows per code.

Offsets are int32 unless some element offset of ``x`` or the codebook can reach 2^31 (``_needs_int64``),
then int64: int64 addresses for every element of a tile made the main kernel spill heavily on sm_90.

Unmeasured: everything on a GPU (none was available to this work). The configurations are chosen by
reasoning and by compiling for sm_90 without a GPU (a fake driver with ``GPUTarget("cuda", 90, 32)``; see
``python -m benchmarks.compile_report``). At N = 65536, K = 8192, D = 256 fp32 with Triton 3.6: 255
registers, no local memory, 192 KB shared memory, 32 HGMMA.64x64x8.F32.TF32 (A from registers) per code
tile and 468 SASS instructions per thread per tile in all. The share of flagged rows on real (trained)
codebooks and the float64 rescan's rate have not been measured. The tests run the kernels in the Triton
interpreter, which computes ``tl.dot`` in full fp32 (``emulate_tf32=True`` truncates the operands to TF32
there).
"""

from __future__ import annotations

import collections
import math
import threading
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.vq import COSINE_EPS
from ._target import sized_for_interpreter, sm_count

# Main kernel tiles. The row tile x - c stays resident (in the dot's operand registers) across code tiles
# when D <= RESIDENT_MAX_D (fp32/tf32 operands; twice that for fp16 operands): BLOCK_M x D fp32 = 128
# registers per thread at D = 256 and 8 warps. BLOCK_M rows with 8 warps when there are at least
# BIG_M_PROGRAMS such programs (two waves on 132 SMs), else SMALL_BLOCK_M rows with 4 warps. Larger D
# streams x in LOOP_BLOCK_D chunks for every code tile.
BLOCK_M = 128
SMALL_BLOCK_M = 64
BIG_M_PROGRAMS = 264
BLOCK_N = 64
FP16_BLOCK_N = 128  # fp16 operands: half the x registers, so twice the codes per tile (same 64 KB per stage)
RESIDENT_MAX_D = 256
# Triton releases whose sm_90 build keeps the resident operand in registers, checked offline at D = 256
# fp32: 3.3.1 and 3.4.0 (255 registers, 80-120 B of spills outside the code loop), 3.5.1 and 3.6.0 (no
# spills), all with 192 KB of shared memory. 3.2.0 and 3.8.0 keep a shared-memory copy of it and re-load
# it in every iteration: 320 KB, more than an SM has. Other releases stream x (and a resident launch that
# runs out of resources anyway falls back to streaming).
RESIDENT_TRITON = ((3, 3), (3, 7))  # [from, to)
RESIDENT_STAGES = 3  # 3 x (256 x 64 fp32) = 192 KB of code tiles in flight at D = 256
LOOP_BLOCK_D = 32  # D chunk when x is not resident (64 spills on sm_90: ptxas -v of the 3.8 output)
LOOP_STAGES = 2
# D chunk of the float64 re-score of the candidates.
RESCORE_CHUNK = 16
# Float64 rescan: BLOCK_R rows x RESCAN_CODES codes x RESCAN_CHUNK of D per step. While at most RESCAN_CAP
# rows are flagged, the codebook is split into up to RESCAN_MAX_SPLITS ranges of >= RESCAN_SPLIT_CODES
# codes, each range a separate work item; RESCAN_PROGRAMS_PER_SM programs per SM loop over the items.
RESCAN_ROWS = 16
RESCAN_CODES = 64
RESCAN_CHUNK = 8  # 16 x 64 x 8 float64 accumulator = 32 per thread at 8 warps
RESCAN_SPLIT_CODES = 256
RESCAN_MAX_SPLITS = 32
RESCAN_CAP = 4096
RESCAN_PROGRAMS_PER_SM = 2
REDUCE_ROWS = 64
STATS_ROWS = 64
STATS_BLOCK_D = 32
# In the Triton interpreter (tests, CPU tensors) each block op is a Python-level step and registers are no
# concern: larger tiles, same code paths, few rescan programs.
INTERPRETER_BLOCK_M = 128
INTERPRETER_BLOCK_N = 256
INTERPRETER_RESCAN_CHUNK = 32
INTERPRETER_PROGRAMS = 3
# tl.dot needs every block dim >= 16.
_MIN_DOT = 16
_BIG = tl.constexpr(2147483647)  # larger than any code index
# Approximate score of a past-K or non-finite code: finite (no NaN in the min/max reductions) and above any
# in-range row's score (|score| <= (|x - c| + M)^2 < limit^2 = 2^120); keys >= _BAD_KEY hold no code.
_BAD_SCORE_F = 2.0**126
_BAD_SCORE = tl.constexpr(_BAD_SCORE_F)
_BAD_KEY = tl.constexpr(2.0**125)
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
        return tl.cast(v, tl.int64)  # (tl.cast also takes the interpreter's plain-int loop variables)
    else:
        return tl.cast(v, tl.int32)


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
def _finite_rows(x_ptr, base, row_ok, ds, inner, D, CHUNK: tl.constexpr):
    """Whether each row of x holds only finite values (the sum of x * 0 is NaN otherwise)."""
    probe = tl.zeros([base.shape[0]], tl.float32)
    for d0 in range(0, D, CHUNK):
        xv = _load_x(x_ptr, base, d0 + ds, row_ok, inner, D).to(tl.float32)
        probe += tl.sum(xv * 0.0, axis=1)
    return probe == 0.0


@triton.jit
def _round_tf32(v):
    """fp32 -> nearest TF32 value (10 explicit mantissa bits; half-way cases away from zero), still fp32.
    Hopper's TF32 tensor cores truncate an fp32 operand (relative error up to 2^-10); rounding first halves
    that (2^-11), and the truncation of a TF32 value is exact. Finite inputs below 2^127 stay finite."""
    return ((v.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot_operand(x_ptr, center_ptr, base, dd, row_ok, finite, inner, D, DOT_FP16: tl.constexpr,
                 EMULATE_TF32: tl.constexpr):
    """The [rows, dd] block of x - c, zeroed on non-finite rows, in the dot's input dtype. (No select on a
    row mask: Triton may move the conversion to the dot-operand layout above it, and an i1 tensor cannot be
    staged in shared memory.)"""
    keep = row_ok & finite
    xv = _load_x(x_ptr, base, dd, keep, inner, D).to(tl.float32)
    xv = xv - tl.load(center_ptr + dd, mask=dd < D, other=0.0)[None, :] * keep.to(tl.float32)[:, None]
    if DOT_FP16:
        return xv.to(tl.float16)
    else:
        return _truncate_tf32(_round_tf32(xv), EMULATE_TF32)


@triton.jit
def _code_block_t(cbp_ptr, n0, cols, dd, D, EVEN_D: tl.constexpr, EMULATE_TF32: tl.constexpr, I64: tl.constexpr):
    """The prepared codebook's [dd, n0 + cols] block (transposed), 0 past D. The codebook is padded with zero
    rows to whole tiles (no code mask); the tile's base is a scalar pointer and the offsets within the tile
    are loop-invariant, which keeps the address arithmetic per tile small. EVEN_D: no D mask either. (A
    block pointer costs more instructions and registers here.)"""
    tile_ptr = cbp_ptr + _index(n0, I64) * D
    offs = _index(cols, I64)[None, :] * D + _index(dd, I64)[:, None]
    if EVEN_D:
        b = tl.load(tile_ptr + offs)
    else:
        b = tl.load(tile_ptr + offs, mask=(dd < D)[:, None], other=0.0)
    return _truncate_tf32(b, EMULATE_TF32)


@triton.jit
def _mma(a, b, acc, DOT_FP16: tl.constexpr):
    if DOT_FP16:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _top2(a1, a2, b1, b2):
    """Combine of a running (smallest, second smallest) pair. The second slot starts as NaN, which min()
    ignores, so the per-element step folds to three min/max."""
    lo = tl.minimum(a1, b1)
    hi = tl.maximum(a1, b1)
    return lo, tl.minimum(hi, tl.minimum(a2, b2))


@triton.jit
def _tile_keys(acc, pen, cols, L2: tl.constexpr, INDEX_BITS: tl.constexpr):
    """Per row of one code tile: the smallest key and the second smallest key.

    A key is the fp32 approximate score with its ``INDEX_BITS`` low mantissa bits replaced by the code's
    column in the tile, so one float min yields both the score and the code. The key differs from the
    score by less than 2^(INDEX_BITS - 23) of its magnitude (folded into the bound); past-K and non-finite
    codes score ``_BAD_SCORE`` (finite, so no NaN enters the min)."""
    if L2:
        score = pen[None, :] - 2.0 * acc
    else:
        score = pen[None, :] - acc
    bits = score.to(tl.int32, bitcast=True)
    key = ((bits & -(1 << INDEX_BITS)) | cols[None, :]).to(tl.float32, bitcast=True)
    return tl.reduce((key, tl.full(key.shape, float("nan"), tl.float32)), 1, _top2)


@triton.jit
def _insert(s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, m, k):
    """Insert (m, k) into the sorted (s0 <= ... <= s5) candidate list; strict ``<`` keeps an equal earlier
    key ahead, and a NaN ``m`` inserts nothing."""
    b0 = m < s0
    b1 = m < s1
    b2 = m < s2
    b3 = m < s3
    b4 = m < s4
    b5 = m < s5
    n5 = tl.where(b4, s4, tl.where(b5, m, s5))
    j5 = tl.where(b4, i4, tl.where(b5, k, i5))
    n4 = tl.where(b3, s3, tl.where(b4, m, s4))
    j4 = tl.where(b3, i3, tl.where(b4, k, i4))
    n3 = tl.where(b2, s2, tl.where(b3, m, s3))
    j3 = tl.where(b2, i2, tl.where(b3, k, i3))
    n2 = tl.where(b1, s1, tl.where(b2, m, s2))
    j2 = tl.where(b1, i1, tl.where(b2, k, i2))
    n1 = tl.where(b0, s0, tl.where(b1, m, s1))
    j1 = tl.where(b0, i0, tl.where(b1, k, i1))
    n0 = tl.where(b0, m, s0)
    j0 = tl.where(b0, k, i0)
    return n0, n1, n2, n3, n4, n5, j0, j1, j2, j3, j4, j5


@triton.jit
def _fold_tile(acc, pen_ptr, n0, cols, s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, bound, L2: tl.constexpr,
               INDEX_BITS: tl.constexpr):
    """Fold one code tile into a row's state: its best key joins the 6-candidate list, its second best
    lowers ``bound`` (every other code of the tile scores at least that)."""
    pen = tl.load(pen_ptr + n0 + cols)  # padded with _BAD_SCORE to whole tiles
    m1, m2 = _tile_keys(acc, pen, cols, L2, INDEX_BITS)
    j = n0 + (m1.to(tl.int32, bitcast=True) & ((1 << INDEX_BITS) - 1))
    s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5 = _insert(s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, m1, j)
    return s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, tl.minimum(bound, m2)


@triton.jit
def _tile_acc(xa, x_ptr, center_ptr, cbp_ptr, base, row_ok, finite, n0, cols, ds, inner, K, D,
              EVEN_D: tl.constexpr, SINGLE_D: tl.constexpr, DOT_FP16: tl.constexpr, EMULATE_TF32: tl.constexpr,
              I64: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(x - c) . prepared codes for one [BLOCK_M, BLOCK_N] tile: one dot on the resident row tile ``xa``,
    or (D > BLOCK_D) a loop over D chunks that re-stages x."""
    if SINGLE_D:
        acc = _mma(xa, _code_block_t(cbp_ptr, n0, cols, ds, D, EVEN_D, EMULATE_TF32, I64),
                   tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_FP16)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + ds
            a = _dot_operand(x_ptr, center_ptr, base, dd, row_ok, finite, inner, D, DOT_FP16, EMULATE_TF32)
            acc = _mma(a, _code_block_t(cbp_ptr, n0, cols, dd, D, False, EMULATE_TF32, I64), acc,
                       DOT_FP16)
    return acc


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
    index on ties. A slot holding no code, or a past-K / non-finite one (key ``_BAD_SCORE``), is skipped."""
    if L2:
        sc = acc
    else:
        ne = tl.load(aux_ptr + cand)
        sc = -(acc / (nx * ne))
    better = (s < _BAD_KEY) & ((sc < best_sc) | ((sc == best_sc) & (cand < best_i)))
    return tl.where(better, sc, best_sc), tl.where(better, cand, best_i)


# ----------------------------------------------------------------------------------------------------
# Nearest code: tensor-core tiles + candidates + exact re-score; flagged rows listed for the rescan.


@triton.jit
def _vq_nearest_kernel(x_ptr, cb_ptr, cbp_ptr, pen_ptr, center_ptr, shift_ptr, bounds_ptr, aux_ptr, idx_ptr, dist_ptr,
                       list_ptr, count_ptr, N, D, inner, K, tol_g, tol_h, tol_a, eps64, limit,
                       L2: tl.constexpr, DOT_FP16: tl.constexpr, SINGLE_D: tl.constexpr,
                       EVEN_D: tl.constexpr, EMULATE_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       INDEX_BITS: tl.constexpr,
                       BLOCK_D: tl.constexpr, RESCORE_D: tl.constexpr, I64: tl.constexpr):
    pid = _index(tl.program_id(0), I64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    base = _row_bases(rows, inner, D)
    ds = tl.arange(0, BLOCK_D)

    # Pass 1: whether the row is finite (sum of x * 0 is NaN otherwise). Row values needed after the code
    # loop (|x - c|, finiteness) are recomputed there: registers are what the loop is short of.
    ds2 = tl.arange(0, RESCORE_D)  # narrow chunks outside the tile loop keep register pressure low
    finite = _finite_rows(x_ptr, base, row_ok, ds2, inner, D, RESCORE_D)
    # SINGLE_D: the row tile x - c is staged once, in the dot's operand registers, for every code tile.
    xa = _dot_operand(x_ptr, center_ptr, base, ds, row_ok, finite, inner, D, DOT_FP16, EMULATE_TF32)

    # Pass 2: code tiles. Per row: the 6 smallest tile-best keys with their codes, and ``bound``, the
    # smallest tile-second-best key. A code outside the list is a tile's non-best (key >= that tile's
    # second best >= bound) or a tile-best pushed out by 6 smaller keys (key >= s5): its key is >=
    # min(s5, bound). The first tile is peeled: the resident operand then has two users, which keeps
    # Triton (3.6) from re-loading it from shared memory inside the loop.
    inf = float("inf")
    s0 = tl.full([BLOCK_M], inf, tl.float32)
    s1 = s0
    s2 = s0
    s3 = s0
    s4 = s0
    s5 = s0
    bound = s0
    i0 = tl.zeros([BLOCK_M], tl.int32)
    i1 = i0
    i2 = i0
    i3 = i0
    i4 = i0
    i5 = i0
    cols = tl.arange(0, BLOCK_N)
    acc = _tile_acc(xa, x_ptr, center_ptr, cbp_ptr, base, row_ok, finite, 0, cols, ds, inner, K, D, EVEN_D,
                    SINGLE_D, DOT_FP16, EMULATE_TF32, I64, BLOCK_M, BLOCK_N, BLOCK_D)
    s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, bound = _fold_tile(
        acc, pen_ptr, 0, cols, s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, bound, L2, INDEX_BITS)
    for n0 in range(BLOCK_N, K, BLOCK_N):
        # (Issuing the next tile's product before this epilogue does not overlap them: Triton 3.6 waits for
        # the wgmma right away, and the second accumulator costs registers.)
        acc = _tile_acc(xa, x_ptr, center_ptr, cbp_ptr, base, row_ok, finite, n0, cols, ds, inner, K, D, EVEN_D,
                        SINGLE_D, DOT_FP16, EMULATE_TF32, I64, BLOCK_M, BLOCK_N, BLOCK_D)
        s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, bound = _fold_tile(
            acc, pen_ptr, n0, cols, s0, s1, s2, s3, s4, s5, i0, i1, i2, i3, i4, i5, bound, L2, INDEX_BITS)

    # Exact float64 re-score of the candidates on the original values; |x - c| in fp32 for the bound.
    finite = _finite_rows(x_ptr, base, row_ok, ds2, inner, D, RESCORE_D)
    sq = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([BLOCK_M], tl.float64)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    xx = a0  # l2: |x - c|^2, cosine: |x|^2
    xm = a0  # cosine: x . m
    for d0 in range(0, D, RESCORE_D):
        dd = d0 + ds2
        xv = _load_x(x_ptr, base, dd, row_ok, inner, D)
        xc32 = xv.to(tl.float32) - tl.load(center_ptr + dd, mask=dd < D, other=0.0)[None, :]
        sq += tl.sum(xc32 * xc32, axis=1)
        x64 = _f64(xv)
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
        a4 += _code_partial(cb_ptr, i4, x64, dd, D, L2, I64)
        a5 += _code_partial(cb_ptr, i5, x64, dd, D, L2, I64)
    nx = tl.maximum(tl.sqrt(xx), _EPS)  # fp64 sqrt is correctly rounded
    best_sc = tl.full([BLOCK_M], inf, tl.float64)
    best_i = tl.full([BLOCK_M], _BIG, tl.int32)
    best_sc, best_i = _rescore(a0, i0, s0, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a1, i1, s1, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a2, i2, s2, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a3, i3, s3, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a4, i4, s4, nx, aux_ptr, best_sc, best_i, L2)
    best_sc, best_i = _rescore(a5, i5, s5, nx, aux_ptr, best_sc, best_i, L2)
    bad = (~finite) | (best_i == _BIG)
    if L2:
        dist = best_sc
    else:
        dist = 1.0 + best_sc  # 1 - cos
    tl.store(idx_ptr + rows, tl.where(bad, 0, best_i).to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, tl.where(bad, float("nan"), dist.to(tl.float32)), mask=row_ok)

    # Could a code outside the list be the true winner? Its key is >= low = min(s5, bound), so its score is
    # >= low - |low| 2^(INDEX_BITS - 22) (the key's low bits hold the column) and its true score >= that
    # - tol. The chosen code's true score in the same form is known: l2 |x - e|^2 - |x - c|^2, cosine
    # -cos |x| + x . m. If the bound exceeds it, no code outside the list can win (or tie); otherwise the
    # row is listed for the exact rescan.
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
    low = tl.minimum(s5, bound).to(tl.float64)
    low = low - tl.abs(low) * (2.0 ** (INDEX_BITS - 22))
    in_range = (xn + big_m) < limit  # NaN/inf fail: the approximate scores may have overflowed
    ambiguous = (best_i != _BIG) & (~(low - tol.to(tl.float64) > chosen + slack))
    flag = row_ok & finite & ((~in_range) | ambiguous)
    f = flag.to(tl.int32)
    n_flag = tl.sum(f, axis=0)
    if n_flag > 0:
        start = tl.atomic_add(count_ptr, n_flag.to(tl.int64))
        pos = start + (tl.cumsum(f, axis=0) - f).to(tl.int64)
        tl.store(list_ptr + pos, rows.to(tl.int64), mask=flag)


# ----------------------------------------------------------------------------------------------------
# Rescan of the flagged rows: float64 direct difference against every code, spread over many programs.


@triton.jit
def _scan_codes(x_ptr, cb_ptr, aux_ptr, base, live, nx, lo, hi, D, inner, L2: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """Exact float64 best (score, code) of each row over codes [lo, hi): l2 the direct-difference distance,
    cosine -cos; lowest index on ties; +inf / 0 when no finite code is in range. A [BLOCK_R, BLOCK_K, CHUNK]
    float64 accumulator is summed over its last axis once per code tile (one sub and one fma per term)."""
    cols = tl.arange(0, BLOCK_K)
    dcs = tl.arange(0, CHUNK)
    best_sc = tl.full([BLOCK_R], float("inf"), tl.float64)
    best_i = tl.zeros([BLOCK_R], tl.int32)
    for n0 in range(lo, hi, BLOCK_K):
        codes = n0 + cols
        cmask = codes < hi
        crow = codes.to(tl.int64) * D
        acc = tl.zeros([BLOCK_R, BLOCK_K, CHUNK], tl.float64)
        for d0 in range(0, D, CHUNK):
            dd = d0 + dcs
            xv = _f64(_load_x(x_ptr, base, dd, live, inner, D))
            ev = _f64(tl.load(cb_ptr + crow[:, None] + dd.to(tl.int64)[None, :],
                              mask=cmask[:, None] & (dd < D)[None, :], other=0.0))
            if L2:
                t = xv[:, None, :] - ev[None, :, :]
                acc += t * t
            else:
                acc += xv[:, None, :] * ev[None, :, :]
        part = tl.sum(acc, axis=2)
        aux = tl.load(aux_ptr + codes, mask=cmask, other=float("nan"))  # NaN: non-finite code or past the range
        if L2:
            sc = part + aux[None, :]
        else:
            sc = -(part / (nx[:, None] * aux[None, :]))
        sc = tl.where(sc == sc, sc, float("inf"))
        m, j = tl.min(sc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = m < best_sc  # strict: an earlier tile keeps its tie
        best_sc = tl.where(better, m, best_sc)
        best_i = tl.where(better, n0 + j, best_i)
    return best_sc, best_i


@triton.jit
def _row_norms(x_ptr, base, live, D, inner, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr):
    """max(|x|, eps) of each row in float64 (cosine)."""
    dcs = tl.arange(0, CHUNK)
    nx = tl.zeros([BLOCK_R], tl.float64)
    for d0 in range(0, D, CHUNK):
        xv = _f64(_load_x(x_ptr, base, d0 + dcs, live, inner, D))
        nx += tl.sum(xv * xv, axis=1)
    return tl.maximum(tl.sqrt(nx), _EPS)


@triton.jit
def _store_final(idx_ptr, dist_ptr, rows, live, best_sc, best_i, L2: tl.constexpr):
    none = best_sc == float("inf")  # no finite code at all
    if L2:
        dist = best_sc
    else:
        dist = 1.0 + best_sc
    tl.store(idx_ptr + rows, tl.where(none, 0, best_i).to(tl.int64), mask=live)
    tl.store(dist_ptr + rows, tl.where(none, float("nan"), dist.to(tl.float32)), mask=live)


@triton.jit
def _vq_rescan_kernel(x_ptr, cb_ptr, aux_ptr, list_ptr, count_ptr, idx_ptr, dist_ptr, part_sc_ptr, part_i_ptr,
                      D, inner, K, span, cap, n_programs, L2: tl.constexpr, SPLITS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """Exact float64 scan of every code for the flagged rows, as work items over a fixed grid of
    ``n_programs`` programs (no host sync: the item count comes from the device counter).

    Few flagged rows (count <= cap): an item is (block of BLOCK_R listed rows, one of SPLITS code ranges of
    ``span`` codes), so the rows' work spreads over up to cdiv(count, BLOCK_R) * SPLITS programs; each item
    writes its rows' best (score, code) to ``part_*[slot, split]`` and ``_vq_rescan_reduce_kernel`` picks
    the winner. Many flagged rows: an item is a row block against the whole codebook, written directly."""
    count = tl.load(count_ptr)
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(count, BLOCK_R)
    split = (SPLITS > 1) & (count <= cap)
    n_items = tl.where(split, n_blocks * SPLITS, n_blocks).to(tl.int32)
    n_parts = tl.where(split, SPLITS, 1)
    width = tl.where(split, span, K)
    for w in range(pid, n_items, n_programs):
        rb = w // n_parts
        cs = w - rb * n_parts
        slots = (tl.zeros([BLOCK_R], tl.int64) + rb) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = slots < count
        rows = tl.load(list_ptr + slots, mask=live, other=0)
        base = _row_bases(rows, inner, D)
        if L2:
            nx = tl.zeros([BLOCK_R], tl.float64)
        else:
            nx = _row_norms(x_ptr, base, live, D, inner, BLOCK_R, CHUNK)
        lo = cs * width
        hi = tl.minimum(lo + width, K)
        best_sc, best_i = _scan_codes(x_ptr, cb_ptr, aux_ptr, base, live, nx, lo, hi, D, inner, L2, BLOCK_R,
                                      BLOCK_K, CHUNK)
        if split:
            tl.store(part_sc_ptr + slots * SPLITS + cs, best_sc, mask=live)
            tl.store(part_i_ptr + slots * SPLITS + cs, best_i, mask=live)
        else:
            _store_final(idx_ptr, dist_ptr, rows, live, best_sc, best_i, L2)


@triton.jit
def _vq_rescan_reduce_kernel(list_ptr, count_ptr, idx_ptr, dist_ptr, part_sc_ptr, part_i_ptr, cap, n_programs,
                             L2: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Winner of each split-rescanned row: the smallest partial score, the lowest split on ties (its code
    ranges come first, and each partial already holds its range's lowest index)."""
    count = tl.load(count_ptr)
    if (SPLITS > 1) & (count <= cap):
        pid = tl.program_id(0)
        parts = tl.arange(0, SPLITS)
        for rb in range(pid, tl.cdiv(count, BLOCK_R).to(tl.int32), n_programs):
            slots = (tl.zeros([BLOCK_R], tl.int64) + rb) * BLOCK_R + tl.arange(0, BLOCK_R)
            live = slots < count
            offs = slots[:, None] * SPLITS + parts[None, :]
            sc = tl.load(part_sc_ptr + offs, mask=live[:, None], other=float("inf"))
            ci = tl.load(part_i_ptr + offs, mask=live[:, None], other=0)
            best_sc, j = tl.min(sc, axis=1, return_indices=True, return_indices_tie_break_left=True)
            best_i = tl.sum(tl.where(parts[None, :] == j[:, None], ci, 0), axis=1)
            rows = tl.load(list_ptr + slots, mask=live, other=0)
            _store_final(idx_ptr, dist_ptr, rows, live, best_sc, best_i, L2)


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


def _block_d(D: int, max_block_d: int, floor: int) -> int:
    limit = max(floor, _pow2_floor(max_block_d))
    return max(floor, min(limit, triton.next_power_of_2(D)))


def _needs_int64(x: torch.Tensor, K: int, D: int, block_rows: int) -> bool:
    """Whether an element offset into x or the (K, D) codebook (masked tail rows included) can reach 2^31."""
    return x.numel() + 2 * block_rows * D >= 2**31 or (K + 1024) * D >= 2**31


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (half-way away from zero), as float32: the kernel's ``_round_tf32``."""
    return ((t.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


_PREPARED: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_PREPARED_LOCK = threading.Lock()
_PREPARED_MAX = 8


def _prepared_codebook(codebook: torch.Tensor, metric: str, dot_dtype: torch.dtype, tile: int):
    """:func:`_prepare_codebook`, reused while the same codebook tensor is unchanged.

    The set-up is ~25 small device ops (~0.25 ms of host time per lookup on an H200 machine, whose
    measured host overhead of a tiny vq_nearest was 1 ms, benchmarks/results/2026-11-30_h200_*); a
    lookup against a fixed codebook (inference, tokenizers) pays it once. The entry is keyed by the
    tensor object itself (a weak reference, so a freed codebook is never matched by a new one at the
    same address) and its version counter (any in-place change, e.g. an EMA update, re-prepares).
    Inference tensors (no version counter) and graph capture/compilation are never cached."""
    key = (metric, dot_dtype, tile)
    cacheable = not codebook.is_inference() and not torch.compiler.is_compiling() and not (
        codebook.is_cuda and torch.cuda.is_current_stream_capturing())
    if cacheable:
        with _PREPARED_LOCK:
            hit = _PREPARED.get(id(codebook))
            if hit is not None and hit[0]() is codebook and hit[1] == codebook._version and hit[2] == key:
                _PREPARED.move_to_end(id(codebook))
                return hit[3]
    result = _prepare_codebook(codebook, metric, dot_dtype, tile)
    if cacheable:
        with _PREPARED_LOCK:
            _PREPARED[id(codebook)] = (weakref.ref(codebook), codebook._version, key, result)
            while len(_PREPARED) > _PREPARED_MAX:
                _PREPARED.popitem(last=False)
    return result


def _prepare_codebook(codebook: torch.Tensor, metric: str, dot_dtype: torch.dtype, tile: int = 1):
    """Device-side set-up, no host sync. Returns (prepared (K', D) in the dot dtype, penalty (K',) fp32,
    centre c (D,) fp32, shift m (D,) fp32, bounds (2,) fp32 = [max |prepared row|, max |penalty|] rounded up,
    aux (K,) float64).

    ``c`` is the mean of the finite codes; the kernel scores ``penalty - 2 (x - c) . prepared`` (l2) or
    ``penalty - (x - c) . prepared`` (cosine).

    * l2: prepared = e - c, penalty = |e - c|^2 (= |x - e|^2 - |x - c|^2 + 2 (x - c) . (e - c)), aux = 0.
    * cosine: with e_n = e / max(|e|, eps) and m the mean of the finite e_n, prepared = e_n - m and
      penalty = -c . (e_n - m), so the score is -x . e_n + x . m (the last term is the same for every code):
      data clustered around one direction keep small operands, hence a small error bound.
      aux = max(|e|, eps).

    Non-finite codes: prepared row 0, penalty 2^126 (_BAD_SCORE: finite, above every real score), aux NaN.
    ``prepared`` and ``penalty`` are padded the same way to K' = a multiple of ``tile`` rows (whole code tiles).
    """
    e64 = codebook.to(torch.float64)
    good = torch.isfinite(e64).all(dim=1)
    zero = torch.zeros((), dtype=torch.float64, device=e64.device)
    e64 = torch.where(good[:, None], e64, zero)
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
    penalty = torch.where(good, penalty, torch.full_like(penalty, _BAD_SCORE_F)).to(torch.float32)
    pad = -codebook.shape[0] % tile
    prepared = prepared.to(dot_dtype)
    if dot_dtype == torch.float32:
        prepared = round_tf32(prepared)
    prepared = torch.nn.functional.pad(prepared, (0, 0, 0, pad))
    penalty = torch.nn.functional.pad(penalty, (0, pad), value=_BAD_SCORE_F)
    return prepared.contiguous(), penalty, center, shift, bounds, aux


def _tolerances(D: int, metric: str, dot_fp16: bool) -> tuple[float, float, float, float]:
    """(tol_g, tol_h, tol_a, limit): ``tol = tol_g |x - c| M + tol_h P + tol_a (|x - c| + M) + 2^-100`` bounds
    the error of a row's approximate scores (twice the derivation in the module docstring; ``M``, ``P``: the
    largest prepared-code norm and penalty); rows with ``|x - c| + M >= limit`` are rescanned (their fp32
    scores or fp16 operands could overflow)."""
    u = _U
    u_p = 2.0**-11  # fp16 rounding, or the kernel's round-to-nearest TF32 (which the tensor cores keep exact)
    delta = u + u_p + u * u_p
    gamma = 4.0 * (D + 16) * u
    g = (2.0 * delta + delta * delta) * (1.0 + gamma) + gamma
    tol_a = (2.0**-22 if dot_fp16 else 2.0**-110) * math.sqrt(D)
    scale = 2.0 if metric == "l2" else 1.0  # the score is penalty - scale * dot
    tol_g = 2.0 * (scale * g + 4.0 * u)
    tol_h = 2.0 * 4.0 * u
    limit = 2.0**15 if dot_fp16 else 2.0**60  # fp16 operands must not overflow; fp32 scores stay < 2^121
    return tol_g, tol_h, tol_a, limit


# Row-tile configurations whose resident variant did not fit the device (Triton versions differ in how
# they stage the loop-invariant operand: 3.8 keeps a shared-memory copy next to the code-tile stages).
_RESIDENT_FAILED: set = set()


def _triton_version() -> tuple[int, int]:
    return tuple(int(v) for v in triton.__version__.split(".")[:2])


def _launch_nearest(grid, args, meta) -> None:
    """Launch the main kernel; a resident variant that runs out of resources falls back to streaming x."""
    key = (meta["DOT_FP16"], meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"], meta["num_stages"])
    if meta["SINGLE_D"] and key not in _RESIDENT_FAILED:
        try:
            _vq_nearest_kernel[grid](*args, **meta)
            return
        except triton.runtime.errors.OutOfResources:
            _RESIDENT_FAILED.add(key)
    if meta["SINGLE_D"]:
        D = args[13]
        bd = min(LOOP_BLOCK_D, meta["BLOCK_D"])
        meta = dict(meta, SINGLE_D=bd >= D, EVEN_D=D == bd, BLOCK_D=bd, RESCORE_D=min(bd, RESCORE_CHUNK),
                    num_stages=LOOP_STAGES)
    _vq_nearest_kernel[grid](*args, **meta)


def _rescan_programs(x: torch.Tensor, interpreted: bool) -> int:
    return INTERPRETER_PROGRAMS if interpreted else RESCAN_PROGRAMS_PER_SM * sm_count(x)


def _rescan(x, codebook, aux, flagged, count, indices, distances, D, inner, K, l2, interpreted, block_k,
            split_codes, cap) -> None:
    """Launch the float64 rescan of the flagged rows (and, when the codebook is split, the reduction of the
    per-range winners). Sized for the worst case; the device counter decides the work."""
    n = flagged.numel()
    splits = 1 if K < 2 * split_codes else min(RESCAN_MAX_SPLITS, _pow2_floor(K // split_codes))
    span = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    cap = min(n, cap) if splits > 1 else 0
    part_sc = torch.empty(max(cap, 1) * splits, dtype=torch.float64, device=x.device)
    part_i = torch.empty(max(cap, 1) * splits, dtype=torch.int32, device=x.device)
    programs = _rescan_programs(x, interpreted)
    chunk = INTERPRETER_RESCAN_CHUNK if interpreted else RESCAN_CHUNK
    _vq_rescan_kernel[(programs,)](
        x, codebook, aux, flagged, count, indices, distances, part_sc, part_i, D, inner, K, span, cap, programs,
        L2=l2, SPLITS=splits, BLOCK_R=RESCAN_ROWS, BLOCK_K=block_k, CHUNK=chunk, num_warps=8)
    if splits > 1:
        reduce_programs = max(1, min(programs, triton.cdiv(cap, REDUCE_ROWS)))
        _vq_rescan_reduce_kernel[(reduce_programs,)](
            flagged, count, indices, distances, part_sc, part_i, cap, reduce_programs,
            L2=l2, SPLITS=splits, BLOCK_R=REDUCE_ROWS, num_warps=4)


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, dim: int, metric: str, *,
               block_m: Optional[int] = None, max_block_n: Optional[int] = None,
               max_block_d: Optional[int] = None, force_rescan: bool = False,
               emulate_tf32: bool = False, stats: Optional[dict] = None,
               rescan_split_codes: Optional[int] = None, rescan_cap: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of every row of ``x``: ``(indices int64, distances float32)``, x's shape without ``dim``.

    x: contiguous, float32/float16/bfloat16, rows along ``dim`` (see the module docstring for the layout);
    codebook: contiguous (K, D), x's dtype; metric: ``"l2"`` or ``"cosine"``.

    ``block_m`` / ``max_block_n`` / ``max_block_d`` set the tile sizes (tests use them to run several
    codebook tiles and D chunks on small shapes; tl.dot needs >= 16), ``force_rescan`` sends every finite
    row through the float64 rescan, ``emulate_tf32`` truncates the float32 dot operands to TF32 in the
    kernel (for interpreter tests of the error bound), and a ``stats`` dict receives ``"flagged"``: a
    1-element int64 device tensor, the number of rows that were rescanned. ``rescan_split_codes`` (codes per
    range of the split rescan, default RESCAN_SPLIT_CODES) and ``rescan_cap`` (most flagged rows for the split
    mode, default RESCAN_CAP) let tests run both rescan modes on small shapes.
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
    interpreted = sized_for_interpreter(x)
    if block_m is None:
        if interpreted:
            bm = INTERPRETER_BLOCK_M
        else:
            bm = BLOCK_M if triton.cdiv(n, BLOCK_M) >= BIG_M_PROGRAMS else SMALL_BLOCK_M
    else:
        bm = max(_MIN_DOT, _pow2_floor(block_m))
    bn_max = max_block_n or (INTERPRETER_BLOCK_N if interpreted else FP16_BLOCK_N if dot_fp16 else BLOCK_N)
    bn = max(_MIN_DOT, min(_pow2_floor(bn_max), triton.next_power_of_2(K)))
    if max_block_d is None:
        resident = D <= RESIDENT_MAX_D * (2 if dot_fp16 else 1) and (
            interpreted or RESIDENT_TRITON[0] <= _triton_version() < RESIDENT_TRITON[1] or D <= LOOP_BLOCK_D)
        bd = max(_MIN_DOT, triton.next_power_of_2(D)) if resident else (64 if interpreted else LOOP_BLOCK_D)
    else:
        bd = _block_d(D, max_block_d, _MIN_DOT)
        resident = bd >= D
    prepared, penalty, center, shift, bounds, aux = _prepared_codebook(
        codebook, metric, torch.float16 if dot_fp16 else torch.float32, bn)
    tol_g, tol_h, tol_a, limit = _tolerances(D, metric, dot_fp16)
    if force_rescan:
        tol_g = float("inf")
    if triton.cdiv(n, RESCAN_ROWS) >= 2**31:
        raise ValueError(f"vq_nearest: too many rows for the Triton kernels ({n})")
    flagged = torch.empty(n, dtype=torch.int64, device=x.device)
    args = (x, codebook, prepared, penalty, center, shift, bounds, aux, indices, distances, flagged, count,
            n, D, inner, K, tol_g, tol_h, tol_a, (D + 8) * 2.0**-52, limit)
    meta = dict(L2=l2, DOT_FP16=dot_fp16, SINGLE_D=resident, EVEN_D=D == bd,
                EMULATE_TF32=bool(emulate_tf32) and not dot_fp16,
                BLOCK_M=bm, BLOCK_N=bn, INDEX_BITS=bn.bit_length() - 1, BLOCK_D=bd, RESCORE_D=min(bd, RESCORE_CHUNK),
                I64=_needs_int64(x, K, D, bm),
                num_warps=8 if bm >= 128 else 4, num_stages=RESIDENT_STAGES if resident else LOOP_STAGES)
    _launch_nearest((triton.cdiv(n, bm),), args, meta)
    _rescan(x, codebook, aux, flagged, count, indices, distances, D, inner, K, l2, interpreted,
            min(RESCAN_CODES, max(_MIN_DOT, _pow2_floor(max_block_n or RESCAN_CODES))),
            rescan_split_codes or RESCAN_SPLIT_CODES, RESCAN_CAP if rescan_cap is None else rescan_cap)
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
