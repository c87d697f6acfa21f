"""Gumbel-softmax, Gumbel-argmax and KL-to-uniform as Triton kernels, with their launchers.

Every launcher takes contiguous tensors and a normalised ``dim`` (the checks live in
``vlm_kernels.ops.gumbel``) and matches ``vlm_kernels.reference.gumbel``: hard samples and argmax bit for
bit, soft samples and gradients to fp32 rounding.

Layout. ``logits`` is viewed as ``(outer, K, inner)`` with ``K = size(dim)``; element ``(o, k, i)`` has
linear offset ``(o * K + k) * inner + i``, which also picks its Philox word (``philox.py``). A Gumbel
program owns a tile ``[BR, BC]`` whose axis 1 is the contiguous one, so loads and stores are 16-byte
vectors and no transposed copy is ever made:

* ``LAST_DIM`` (``dim`` is the last dim): ``BR`` rows x ``BC`` consecutive categories, reduced along axis 1;
* otherwise (e.g. ``dim=1`` of NCHW): ``BR`` categories x ``BC`` consecutive inner positions ("columns")
  of one outer index, reduced along axis 0.

Noise. With ``ALIGN4`` (rows: ``K % 4 == 0``; columns: ``inner % 4 == 0``) every aligned group of four
elements along axis 1 lies in one tile, so a tile takes one Philox call per group
(``gumbel_noise4`` on a ``[BR, BC / 4]`` tile of counters, then ``interleave4``: the four words land
in the registers that hold the four elements). Otherwise each element takes its own call and keeps its
word (``gumbel_noise``): 4x the Philox work, the same bits.

Passes. ``SINGLE``: the whole reduction fits one tile (``next_power_of_2(K) x`` the narrowest tile
``<= MAX_TILE`` elements, half that for the two-input backward): the logits are read once, the noise is
made once, both stay in registers, and the output is written once. A single-pass column tile must span
at least ``MIN_STRIP_COLS`` (16) contiguous inner positions, 64 bytes of fp32 per row, or the whole row:
long columns (K = 8192 over dim 1 of NCHW) no longer take a strip of 4 columns (16 bytes from each of
8192 rows 4 KiB apart, less than a DRAM burst, which the H200 measured at 26% of copy bandwidth).
Otherwise a loop over the reduction axis in chunks of ``LOOP_TILE`` elements, ``LOOP_COLS`` (64) inner
positions wide on the column layout (256 contiguous bytes per row): a pass with an online softmax
(running max + rescaled sum) or a running argmax, then a pass that re-reads the logits, regenerates the
noise and writes (a hard sample's second pass only writes: the one-hot needs no logits). The looped soft
forward moves 12 bytes per element (logits twice, output once) and makes the noise twice; the hard
forward and argmax stay at 8 and 4. Each loop loads chunk k + 1 before it works on chunk k (register
double buffering, ``_chunk_load``). The soft forward and the soft backward over long columns (dim=1 of
NCHW, K = 8192) take the split plan instead (``SPLIT_COLUMNS``): K cut across the programs of a
64-column strip, each chunk kept in registers while the strip's statistics are merged through global
memory, so every input is read once and the noise made once (the forward moves 8 bytes per element, the
backward 12; see ``_gumbel_softmax_split_kernel``). Rows that fit one tile are read once for the hard
sample and argmax too (no streamed chunks).

NaN: a NaN in z makes the softmax sum NaN, so the whole line comes out NaN without a separate test;
the argmax takes a NaN-propagating max per chunk and looks for the first NaN only in tiles that hold
one. The grid is 1D, one program per tile (grid x is not capped at 65535). Kernels that compute noise
are launched with ``enable_fp_fusion=False`` (see ``philox.py``); the noise is never stored, the hard
backward regenerates it from the seed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .philox import gumbel_noise, gumbel_noise4, interleave4, seed_words

# Most elements one Gumbel program keeps in registers on the single-pass path (128 KB of fp32: a strip of
# 4 columns x 8192 categories); the two-input backward keeps half as many per input.
MAX_TILE = 32768
# Most elements the KL kernels keep in registers on their single-pass path; larger reductions loop.
MAX_BLOCK = 16384
# Target elements per program when a tile holds several short reductions (rows or columns).
TILE = 2048
# Elements per chunk on the looped path.
LOOP_TILE = 4096
# Inner positions per program on the looped column path (256 bytes of fp32: two full 128-byte lines, four
# 64-byte DRAM bursts, per row of a chunk).
LOOP_COLS = 64
# Fewest contiguous inner positions a single-pass column tile may span (64 bytes of fp32: one DRAM burst);
# a column reduction too long for that takes the looped path.
MIN_STRIP_COLS = 16
# The soft forward and backward over columns too long for a single-pass strip take the split plan (K cut
# across the programs of a strip, every input read once, statistics merged through global memory; see
# ``_gumbel_softmax_split_kernel``) when True, the looped plan (inputs read twice, the forward's noise
# made twice) when False. A split chunk holds SPLIT_TILE elements, half that per input for the backward
# (forward: 64 columns x 128 categories of fp32, 32 KB, 4 warps of 64 elements per thread); the last
# program of a strip merges SPLIT_MERGE partials per step; a waiting program polls at most
# SPLIT_MAX_POLLS times (a millisecond or more on an H200) before it marks its chunk for the fix-up
# kernel and exits.
SPLIT_COLUMNS = True
SPLIT_TILE = 8192
SPLIT_MERGE = 16
SPLIT_MAX_POLLS = 1 << 14
# Elements each thread holds on a Gumbel tile (offline sm_90 compiles, Triton 3.8, no spills at any of
# them): 32 in general. The single-pass column strip (4 columns x up to 8192 categories, one program per
# SM) takes 64: its reductions run per column across all the program's threads, and at 32 per thread they
# cost 2.5 shuffles and combines per element (62 vs 57 instructions per element, 64 vs 128 registers).
# 16 where a thread's noise chains are longer: one Philox call per element (unaligned layouts, whose
# tiles also stop at UNALIGNED_TILE elements) or noise next to a second input (the hard backward); 16 on the
# looped column paths, which hold the prefetched chunk as well (8 warps per 4096-element chunk: 97-100
# registers, 2 programs and 16 warps per SM; at 32 per thread, 4 warps and 155-165 registers, 3 programs
# and 12 warps per SM, for 5-8% fewer instructions) and on the looped two-input backward (no spill there).
ELEMENTS_PER_THREAD = 32
STRIP_ELEMENTS_PER_THREAD = 64
NARROW_ELEMENTS_PER_THREAD = 16
LOOP_ELEMENTS_PER_THREAD = 16
UNALIGNED_TILE = 8192

_BIG = tl.constexpr(2147483647)  # larger than any index along K
_NOISE_LAUNCH = {"enable_fp_fusion": False}
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# Gumbel tile helpers. A program's lines (axis 0) are rows (LAST_DIM) or categories (columns layout); its
# columns (axis 1) are categories (LAST_DIM) or inner positions. A chunk is addressed as ``base`` (the
# int64 offset of its element (0, 0)) plus ``rel`` (the offsets within it: int32 with REL32, so each
# thread keeps one register per line of the tile rather than a 64-bit pointer).


@triton.jit
def _program_origin(n_c_tiles, BR: tl.constexpr, BC: tl.constexpr, LAST_DIM: tl.constexpr):
    """(outer index o, first line a0, first column c0) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    if LAST_DIM:
        return pid * 0, pid * BR, pid * 0
    else:
        return pid // n_c_tiles, pid * 0, (pid % n_c_tiles) * BC


@triton.jit
def _chunk(o, a_start, c_start, n_rows, K, inner, BR: tl.constexpr, BC: tl.constexpr, LAST_DIM: tl.constexpr,
           REL32: tl.constexpr):
    """(base, rel, mask, stride, k index) of the tile whose element (0, 0) is (line a_start, column c_start)."""
    ar = tl.arange(0, BR)
    cr = tl.arange(0, BC)
    if LAST_DIM:
        base = a_start.to(tl.int64) * K + c_start
        stride = K
        mask = ((a_start + ar) < n_rows)[:, None] & ((c_start + cr) < K)[None, :]
        kidx = (c_start + cr)[None, :]
    else:
        base = (o * K + a_start) * inner + c_start
        stride = inner
        mask = ((a_start + ar) < K)[:, None] & ((c_start + cr) < inner)[None, :]
        kidx = (a_start + ar)[:, None]
    if REL32:
        rel = ar[:, None] * stride + cr[None, :]
    else:
        rel = ar.to(tl.int64)[:, None] * stride + cr[None, :]
    return base, rel, mask, stride, kidx.to(tl.int32)


@triton.jit
def _load(ptr, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=other)
    else:  # the tiles cover the tensor exactly: no predicates to keep
        return tl.load(ptr)


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty))


@triton.jit
def _tile_noise(seed_lo, seed_hi, base, stride, BR: tl.constexpr, BC: tl.constexpr, ALIGN4: tl.constexpr,
                REL32: tl.constexpr):
    """fp32 noise of the tile of elements base + a * stride + c."""
    ar = tl.arange(0, BR)
    if not REL32:
        ar = ar.to(tl.int64)
    if ALIGN4:  # base and stride are multiples of 4: one Philox call per group of four columns
        q = tl.arange(0, BC // 4)
        counter = (base >> 2) + (ar[:, None] * (stride >> 2) + q[None, :])
        g0, g1, g2, g3 = gumbel_noise4(seed_lo, seed_hi, counter)
        return interleave4(g0, g1, g2, g3)
    else:
        return gumbel_noise(seed_lo, seed_hi, base + (ar[:, None] * stride + tl.arange(0, BC)[None, :]))


@triton.jit
def _perturbed(x_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR: tl.constexpr, BC: tl.constexpr,
               ALIGN4: tl.constexpr, REL32: tl.constexpr, MASKED: tl.constexpr):
    """z = logits + noise in fp32 (-inf where masked) of a chunk."""
    x = _load(x_ptr + base + rel, mask, float("-inf"), MASKED).to(tl.float32)
    return x + _tile_noise(seed_lo, seed_hi, base, stride, BR, BC, ALIGN4, REL32)


@triton.jit
def _chunk_start(k0, a0, c0, LAST_DIM: tl.constexpr):
    """(a_start, c_start) of the chunk at position k0 along the reduction axis (looped paths)."""
    if LAST_DIM:
        return a0, c0 + k0
    else:
        return a0 + k0, c0


@triton.jit
def _next_start(k0, K, STEP: tl.constexpr):
    """Position of the chunk after k0, or k0 itself on the last trip: the prefetch of the last trip
    reloads the current chunk (a cache hit, no mask to build) and its value is dropped."""
    nk = k0 + STEP
    return nk - STEP * (nk >= K).to(nk.dtype)


@triton.jit
def _chunk_load(ptr, o, k0, a0, c0, n_rows, K, inner, other, BR: tl.constexpr, BC: tl.constexpr,
                LAST_DIM: tl.constexpr, REL32: tl.constexpr, MASKED: tl.constexpr):
    """The raw values (``other`` where masked) of the chunk at position k0 along the reduction axis.

    The looped paths load chunk k + 1 at the top of trip k and use it on trip k + 1 (register double
    buffering): every program keeps one chunk of loads in flight while it makes the noise of the last one,
    so DRAM latency is covered by the program's own work, not only by the other programs on its SM.
    """
    a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
    base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
    return _load(ptr + base + rel, mask, other, MASKED)


@triton.jit
def _expand(v, RED: tl.constexpr):
    """A per-line (RED = 1) or per-column (RED = 0) vector as a broadcastable [BR, 1] / [1, BC] tile."""
    return tl.expand_dims(v, RED)


@triton.jit
def _online_update(m, s, z, scale2, RED: tl.constexpr):
    """One chunk of an online softmax of exp2(z * scale2) along axis RED: new (max, rescaled sum, exps, alpha).

    -inf entries (masked lanes included) contribute 0 even while the running max is still -inf; NaN
    entries make the sum NaN.
    """
    m_new = tl.maximum(m, tl.max(z, axis=RED))
    alpha = tl.where(m == m_new, 1.0, tl.exp2((m - m_new) * scale2))
    e = tl.where(z == float("-inf"), 0.0, tl.exp2((z - _expand(m_new, RED)) * scale2))
    return m_new, s * alpha, e, alpha


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _argmax_update(z, kidx, best, best_idx, first_nan, RED: tl.constexpr):
    """Folds a chunk of z (indices along K: kidx) into the running argmax (strict: an earlier chunk keeps
    its tie) and the first NaN index, per line/column."""
    zmax = tl.reduce(z, RED, _nan_max)  # NaN where the chunk holds a NaN
    c_idx = tl.min(tl.where(z == _expand(zmax, RED), kidx, _BIG), axis=RED)
    better = zmax > best  # false for NaN
    best = tl.where(better, zmax, best)
    best_idx = tl.where(better, c_idx, best_idx)
    if tl.max((zmax != zmax).to(tl.int32), axis=0) > 0:  # rare: some line of the tile holds a NaN
        first_nan = tl.minimum(first_nan, tl.min(tl.where(z != z, kidx, _BIG), axis=RED))
    return best, best_idx, first_nan


# ----------------------------------------------------------------------------------------------------
# Soft sample (forward).


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_softmax_fwd_kernel(x_ptr, y_ptr, seed_lo, seed_hi, scale2, n_rows, K, inner, n_c_tiles,
                               BR: tl.constexpr, BC: tl.constexpr, LAST_DIM: tl.constexpr, SINGLE: tl.constexpr,
                               ALIGN4: tl.constexpr, REL32: tl.constexpr, MASKED: tl.constexpr):
    """y = softmax(z / tau) with z = logits + noise; scale2 = log2(e) / tau."""
    RED: tl.constexpr = 1 if LAST_DIM else 0
    STEP: tl.constexpr = BC if LAST_DIM else BR  # chunk length along the reduction axis
    o, a0, c0 = _program_origin(n_c_tiles, BR, BC, LAST_DIM)
    if SINGLE:
        base, rel, mask, stride, kidx = _chunk(o, a0, c0, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
        z = _perturbed(x_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR, BC, ALIGN4, REL32, MASKED)
        e = tl.exp2((z - _expand(tl.max(z, axis=RED), RED)) * scale2)  # masked lanes: exp2(-inf) = 0
        y = e * _expand(1.0 / tl.sum(e, axis=RED), RED)
        _store(y_ptr + base + rel, y, mask, MASKED)
    else:
        N: tl.constexpr = BR if LAST_DIM else BC
        m = tl.full([N], float("-inf"), tl.float32)
        s = tl.zeros([N], tl.float32)
        x = _chunk_load(x_ptr, o, 0, a0, c0, n_rows, K, inner, float("-inf"), BR, BC, LAST_DIM, REL32, MASKED)
        for k0 in range(0, K, STEP):
            x_next = _chunk_load(x_ptr, o, _next_start(k0, K, STEP), a0, c0, n_rows, K, inner, float("-inf"),
                                 BR, BC, LAST_DIM, REL32, MASKED)
            a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
            base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
            z = x.to(tl.float32) + _tile_noise(seed_lo, seed_hi, base, stride, BR, BC, ALIGN4, REL32)
            m, s, e, alpha = _online_update(m, s, z, scale2, RED)
            s += tl.sum(e, axis=RED)
            x = x_next
        r = 1.0 / s
        x = _chunk_load(x_ptr, o, 0, a0, c0, n_rows, K, inner, float("-inf"), BR, BC, LAST_DIM, REL32, MASKED)
        for k0 in range(0, K, STEP):
            x_next = _chunk_load(x_ptr, o, _next_start(k0, K, STEP), a0, c0, n_rows, K, inner, float("-inf"),
                                 BR, BC, LAST_DIM, REL32, MASKED)
            a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
            base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
            z = x.to(tl.float32) + _tile_noise(seed_lo, seed_hi, base, stride, BR, BC, ALIGN4, REL32)
            y = tl.exp2((z - _expand(m, RED)) * scale2) * _expand(r, RED)
            _store(y_ptr + base + rel, y, mask, MASKED)
            x = x_next


# ----------------------------------------------------------------------------------------------------
# Soft sample and its backward over long columns, split along K ("split plan"). A strip of BC columns and
# K categories is cut into n_splits chunks of BR categories, one program each. A program keeps its chunk
# in registers and publishes its per-column partial statistics (forward: max and sum of exps; backward:
# sum of dy * y); the strip's last program to arrive (an arrival counter) merges the partials in order and
# publishes the strip's statistics; every program then writes its chunk from registers. Each input is
# read once and the noise made once (forward 8 bytes per element, as the single pass; backward 12),
# while each row is read BC columns (256 bytes) wide.
#
# Waiting is bounded, so no launch can deadlock whatever the scheduling: a program that has not seen the
# strip's statistics after ``max_polls`` polls (a strip-mate not yet scheduled, or the Triton
# interpreter, which runs programs one after another) marks its chunk and exits without writing, and a
# second, small kernel (one program per strip) writes the marked chunks from the published statistics,
# reading their inputs (and making their noise) again with the code their own program runs: a chunk's
# bits do not depend on which kernel wrote it.
#
# ``part`` (fp32): per strip, n_splits + 1 rows of W vectors of BC (forward W = 2: max, sum; backward
# W = 1: the dot); the last row is the strip's statistics. ``sync`` (int32, zeroed per launch): per strip,
# the arrival counter, the statistics flag, the count of marked chunks, then one mark per chunk.


@triton.jit
def _split_origin(n_c_tiles, n_splits, BC: tl.constexpr):
    """(strip, chunk j, outer index o, first column c0) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    strip = pid // n_splits
    return strip, pid % n_splits, strip // n_c_tiles, (strip % n_c_tiles) * BC


@triton.jit
def _stats_ptr(part_ptr, row, BC: tl.constexpr, W: tl.constexpr):
    return part_ptr + row.to(tl.int64) * (W * BC) + tl.arange(0, BC)


@triton.jit
def _split_arrive(sync):
    """Counts this program in once its partial is stored (every thread's stores before the release);
    returns how many arrived before it."""
    tl.debug_barrier()
    return tl.atomic_add(sync, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _split_release(sync):
    """Publishes the strip's statistics, stored just before (by every thread)."""
    tl.debug_barrier()
    tl.atomic_xchg(sync + 1, 1, sem="release", scope="gpu")


@triton.jit
def _split_await(sync, j, max_polls):
    """Polls for the strip's statistics at most max_polls times; nonzero once they are published.
    Otherwise marks chunk j for the fix-up kernel."""
    done = tl.atomic_add(sync + 1, 0, sem="acquire", scope="gpu")
    polls = 0
    while (done == 0) & (polls < max_polls):
        done = tl.atomic_add(sync + 1, 0, sem="acquire", scope="gpu")
        polls += 1
    if done == 0:
        tl.atomic_xchg(sync + 3 + j, 1, sem="relaxed", scope="gpu")
        tl.atomic_add(sync + 2, 1, sem="relaxed", scope="gpu")  # nonzero: some chunk of the strip is marked
    return done


@triton.jit
def _split_exps(z, scale2):
    """Per-column max of a chunk of z and e = exp2((z - max) * scale2) (0 for -inf entries)."""
    m = tl.max(z, axis=0)
    # z = -inf gives exp2(-inf) = 0 by itself while the max is finite; a column of -inf only (max -inf)
    # is shifted by 0 instead, so that its exps are 0, not exp2(-inf - -inf) = NaN.
    return m, tl.exp2((z - tl.where(m == float("-inf"), 0.0, m)[None, :]) * scale2)


@triton.jit
def _merge_stats(m, s, m_b, s_b, scale2):
    """(max, sum) of two partials, each sum rescaled to the larger max (-inf partials hold sum 0)."""
    m_new = tl.maximum(m, m_b)
    a = tl.where(m == m_new, 1.0, tl.exp2((m - m_new) * scale2))
    b = tl.where(m_b == m_new, 1.0, tl.exp2((m_b - m_new) * scale2))
    return m_new, s * a + s_b * b


@triton.jit
def _strip_stats(part_ptr, row0, n_splits, scale2, BC: tl.constexpr, NSB: tl.constexpr, BACKWARD: tl.constexpr):
    """The strip's statistics from its n_splits partials (rows row0...), NSB at a time, in order:
    (max, sum of exps) for the forward, (dot, unused) for the backward."""
    W: tl.constexpr = 1 if BACKWARD else 2
    cols = tl.arange(0, BC)
    m = tl.full([BC], float("-inf"), tl.float32)
    s = tl.zeros([BC], tl.float32)
    for i0 in range(0, n_splits, NSB):
        r = i0 + tl.arange(0, NSB)
        ok = (r < n_splits)[:, None]
        p = part_ptr + (row0 + r).to(tl.int64)[:, None] * (W * BC) + cols[None, :]
        if BACKWARD:
            s += tl.sum(tl.load(p, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
        else:
            mt = tl.load(p, mask=ok, other=float("-inf"), cache_modifier=".cg")
            st = tl.load(p + BC, mask=ok, other=0.0, cache_modifier=".cg")
            mb = tl.max(mt, axis=0)
            sb = tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp2((mt - mb[None, :]) * scale2)), axis=0)
            m, s = _merge_stats(m, s, mb, sb, scale2)
    return m, s


@triton.jit
def _split_write(y_ptr, e, m_chunk, m, s, scale2, base, rel, mask, MASKED: tl.constexpr):
    """The chunk's output from its exps (relative to its own max m_chunk) and the strip's (max, sum): one
    exp2 per column instead of one per element."""
    f = tl.exp2((m_chunk - m) * scale2) * (1.0 / s)  # NaN for a NaN sum or a column of -inf only
    _store(y_ptr + base + rel, e * f[None, :], mask, MASKED)


@triton.jit
def _split_chunk(a_ptr, b_ptr, seed_lo, seed_hi, scale2, o, j, c0, K, inner, BR: tl.constexpr, BC: tl.constexpr,
                 BACKWARD: tl.constexpr, ALIGN4: tl.constexpr, REL32: tl.constexpr, MASKED: tl.constexpr):
    """Chunk j of a strip: (base, rel, mask, u, v, partial 0, partial 1). Forward (a = logits): u = exps,
    v = 0, partials = (max, sum of exps). Backward (a = dy, b = y): u = dy, v = y, partials = (dot, 0)."""
    base, rel, mask, stride, kidx = _chunk(o, j * BR, c0, 1, K, inner, BR, BC, False, REL32)
    if BACKWARD:
        u = _load(a_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
        v = _load(b_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
        p0 = tl.sum(u * v, axis=0)
        p1 = p0 * 0.0
    else:
        z = _perturbed(a_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR, BC, ALIGN4, REL32, MASKED)
        p0, u = _split_exps(z, scale2)
        v = u * 0.0
        p1 = tl.sum(u, axis=0)
    return base, rel, mask, u, v, p0, p1


@triton.jit
def _split_output(out_ptr, u, v, p0, m, s, scale2, inv_tau, base, rel, mask, BACKWARD: tl.constexpr,
                  MASKED: tl.constexpr):
    if BACKWARD:  # dx = y * (dy - dot) / tau
        _store(out_ptr + base + rel, v * (u - s[None, :]) * inv_tau, mask, MASKED)
    else:
        _split_write(out_ptr, u, p0, m, s, scale2, base, rel, mask, MASKED)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_softmax_split_kernel(a_ptr, b_ptr, out_ptr, part_ptr, sync_ptr, seed_lo, seed_hi, scale2, inv_tau, K,
                                 inner, n_c_tiles, n_splits, max_polls, BR: tl.constexpr, BC: tl.constexpr,
                                 NSB: tl.constexpr, BACKWARD: tl.constexpr, ALIGN4: tl.constexpr,
                                 REL32: tl.constexpr, MASKED: tl.constexpr):
    """Along axis 1 of (outer, K, inner), K split across the programs of a strip. Forward (a = logits):
    out = softmax(z / tau), z = logits + noise. Backward (a = dy, b = y): out = y * (dy - sum dy * y) / tau."""
    W: tl.constexpr = 1 if BACKWARD else 2
    strip, j, o, c0 = _split_origin(n_c_tiles, n_splits, BC)
    base, rel, mask, u, v, p0, p1 = _split_chunk(a_ptr, b_ptr, seed_lo, seed_hi, scale2, o, j, c0, K, inner, BR, BC,
                                                 BACKWARD, ALIGN4, REL32, MASKED)
    row0 = strip * (n_splits + 1)
    p = _stats_ptr(part_ptr, row0 + j, BC, W)
    tl.store(p, p0)
    if not BACKWARD:
        tl.store(p + BC, p1)
    sync = sync_ptr + strip * (n_splits + 3)  # [arrivals, statistics flag, marked count, n_splits marks]
    arrived = _split_arrive(sync)
    m = p0  # the strip's statistics once known
    s = p1
    if arrived == n_splits - 1:  # the last to arrive: every partial is published
        m, s = _strip_stats(part_ptr, row0, n_splits, scale2, BC, NSB, BACKWARD)
        p = _stats_ptr(part_ptr, row0 + n_splits, BC, W)
        if BACKWARD:
            tl.store(p, s)
        else:
            tl.store(p, m)
            tl.store(p + BC, s)
        _split_release(sync)
        done = arrived * 0 + 1
    else:
        done = _split_await(sync, j, max_polls)
        if done != 0:
            p = _stats_ptr(part_ptr, row0 + n_splits, BC, W)
            if BACKWARD:
                s = tl.load(p, cache_modifier=".cg")
            else:
                m = tl.load(p, cache_modifier=".cg")
                s = tl.load(p + BC, cache_modifier=".cg")
    if done != 0:  # otherwise _gumbel_softmax_split_fixup_kernel writes this chunk
        _split_output(out_ptr, u, v, p0, m, s, scale2, inv_tau, base, rel, mask, BACKWARD, MASKED)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_softmax_split_fixup_kernel(a_ptr, b_ptr, out_ptr, part_ptr, sync_ptr, seed_lo, seed_hi, scale2, inv_tau,
                                       K, inner, n_c_tiles, n_splits, BR: tl.constexpr, BC: tl.constexpr,
                                       BACKWARD: tl.constexpr, ALIGN4: tl.constexpr, REL32: tl.constexpr,
                                       MASKED: tl.constexpr):
    """One program per strip: writes the chunks whose program gave up waiting (usually none)."""
    W: tl.constexpr = 1 if BACKWARD else 2
    strip = tl.program_id(0).to(tl.int64)
    sync = sync_ptr + strip * (n_splits + 3)
    if tl.load(sync + 2) != 0:
        o = strip // n_c_tiles
        c0 = (strip % n_c_tiles) * BC
        p = _stats_ptr(part_ptr, strip * (n_splits + 1) + n_splits, BC, W)
        if BACKWARD:
            s = tl.load(p)
            m = s
        else:
            m = tl.load(p)
            s = tl.load(p + BC)
        for j in range(0, n_splits):
            if tl.load(sync + 3 + j) != 0:
                base, rel, mask, u, v, p0, p1 = _split_chunk(a_ptr, b_ptr, seed_lo, seed_hi, scale2, o, j, c0, K,
                                                             inner, BR, BC, BACKWARD, ALIGN4, REL32, MASKED)
                _split_output(out_ptr, u, v, p0, m, s, scale2, inv_tau, base, rel, mask, BACKWARD, MASKED)


# ----------------------------------------------------------------------------------------------------
# Gumbel-argmax and the hard sample.


@triton.jit
def _gumbel_argmax_tile(x_ptr, seed_lo, seed_hi, o, a0, c0, n_rows, K, inner, BR: tl.constexpr, BC: tl.constexpr,
                        LAST_DIM: tl.constexpr, SINGLE: tl.constexpr, ALIGN4: tl.constexpr, REL32: tl.constexpr,
                        MASKED: tl.constexpr):
    """argmax_k z per line (LAST_DIM) or column (first index on ties, first NaN wins), whether z has NaN,
    and the largest non-NaN z (-inf for a line of -inf only)."""
    RED: tl.constexpr = 1 if LAST_DIM else 0
    STEP: tl.constexpr = BC if LAST_DIM else BR
    N: tl.constexpr = BR if LAST_DIM else BC
    best = tl.full([N], float("-inf"), tl.float32)
    best_idx = tl.zeros([N], tl.int32)  # index 0 is right when every z is -inf
    first_nan = tl.full([N], _BIG, tl.int32)
    if SINGLE:  # one chunk: nothing to prefetch
        base, rel, mask, stride, kidx = _chunk(o, a0, c0, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
        z = _perturbed(x_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR, BC, ALIGN4, REL32, MASKED)
        best, best_idx, first_nan = _argmax_update(z, kidx, best, best_idx, first_nan, RED)
    else:
        x = _chunk_load(x_ptr, o, 0, a0, c0, n_rows, K, inner, float("-inf"), BR, BC, LAST_DIM, REL32, MASKED)
        for k0 in range(0, K, STEP):
            x_next = _chunk_load(x_ptr, o, _next_start(k0, K, STEP), a0, c0, n_rows, K, inner, float("-inf"),
                                 BR, BC, LAST_DIM, REL32, MASKED)
            a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
            base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
            z = x.to(tl.float32) + _tile_noise(seed_lo, seed_hi, base, stride, BR, BC, ALIGN4, REL32)
            best, best_idx, first_nan = _argmax_update(z, kidx, best, best_idx, first_nan, RED)
            x = x_next
    has_nan = first_nan < _BIG
    return tl.where(has_nan, first_nan, best_idx), has_nan, best


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_hard_fwd_kernel(x_ptr, y_ptr, seed_lo, seed_hi, n_rows, K, inner, n_c_tiles, BR: tl.constexpr,
                            BC: tl.constexpr, LAST_DIM: tl.constexpr, SINGLE: tl.constexpr, ALIGN4: tl.constexpr, REL32: tl.constexpr,
                            MASKED: tl.constexpr):
    RED: tl.constexpr = 1 if LAST_DIM else 0
    STEP: tl.constexpr = BC if LAST_DIM else BR
    o, a0, c0 = _program_origin(n_c_tiles, BR, BC, LAST_DIM)
    idx, has_nan, best = _gumbel_argmax_tile(x_ptr, seed_lo, seed_hi, o, a0, c0, n_rows, K, inner, BR, BC,
                                             LAST_DIM, SINGLE, ALIGN4, REL32, MASKED)
    # The row is NaN wherever the soft sample's is (eager's y_hard - sg(y_soft) + y_soft): a NaN, or a
    # non-finite maximum (+inf: inf - inf; only -inf: -inf - -inf).
    nan_row = has_nan | (best == float("inf")) | (best == float("-inf"))
    one = _expand(tl.where(nan_row, float("nan"), 1.0), RED)
    zero = _expand(tl.where(nan_row, float("nan"), 0.0), RED)
    idx = _expand(idx, RED)
    for k0 in range(0, K, STEP):  # writes only: the one-hot needs no logits
        a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
        base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
        y = tl.where(kidx == idx, one, zero)
        _store(y_ptr + base + rel, y, mask, MASKED)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_argmax_kernel(x_ptr, idx_ptr, seed_lo, seed_hi, n_rows, K, inner, n_c_tiles, BR: tl.constexpr,
                          BC: tl.constexpr, LAST_DIM: tl.constexpr, SINGLE: tl.constexpr, ALIGN4: tl.constexpr, REL32: tl.constexpr,
                          MASKED: tl.constexpr):
    o, a0, c0 = _program_origin(n_c_tiles, BR, BC, LAST_DIM)
    idx, has_nan, best = _gumbel_argmax_tile(x_ptr, seed_lo, seed_hi, o, a0, c0, n_rows, K, inner, BR, BC,
                                             LAST_DIM, SINGLE, ALIGN4, REL32, MASKED)
    if LAST_DIM:
        r = a0 + tl.arange(0, BR)
        tl.store(idx_ptr + r, idx.to(tl.int64), mask=r < n_rows)
    else:
        c = c0 + tl.arange(0, BC)
        tl.store(idx_ptr + o * inner + c, idx.to(tl.int64), mask=c < inner)


# ----------------------------------------------------------------------------------------------------
# Backward: dlogits = y * (dy - sum_k dy * y) / tau; y is saved (soft) or recomputed (hard).


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_softmax_bwd_kernel(dy_ptr, saved_ptr, dx_ptr, seed_lo, seed_hi, inv_tau, scale2, n_rows, K, inner,
                               n_c_tiles, BR: tl.constexpr, BC: tl.constexpr, LAST_DIM: tl.constexpr,
                               SINGLE: tl.constexpr, RECOMPUTE: tl.constexpr, ALIGN4: tl.constexpr,
                               REL32: tl.constexpr, MASKED: tl.constexpr):
    RED: tl.constexpr = 1 if LAST_DIM else 0
    STEP: tl.constexpr = BC if LAST_DIM else BR
    o, a0, c0 = _program_origin(n_c_tiles, BR, BC, LAST_DIM)
    if SINGLE:
        base, rel, mask, stride, kidx = _chunk(o, a0, c0, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
        dy = _load(dy_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
        if RECOMPUTE:  # saved = logits: y = softmax((logits + noise) / tau)
            z = _perturbed(saved_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR, BC, ALIGN4, REL32, MASKED)
            e = tl.exp2((z - _expand(tl.max(z, axis=RED), RED)) * scale2)
            y = e * _expand(1.0 / tl.sum(e, axis=RED), RED)
        else:  # saved = y
            y = _load(saved_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
        dot = tl.sum(dy * y, axis=RED)
        dx = y * (dy - _expand(dot, RED)) * inv_tau
        _store(dx_ptr + base + rel, dx, mask, MASKED)
    else:
        N: tl.constexpr = BR if LAST_DIM else BC
        if RECOMPUTE:
            m = tl.full([N], float("-inf"), tl.float32)
            s = tl.zeros([N], tl.float32)
            t = tl.zeros([N], tl.float32)  # sum dy * exp2((z - m) * scale2), rescaled with s
            for k0 in range(0, K, STEP):
                a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
                base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
                z = _perturbed(saved_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR, BC, ALIGN4, REL32, MASKED)
                dy = _load(dy_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
                m, s, e, alpha = _online_update(m, s, z, scale2, RED)
                s += tl.sum(e, axis=RED)
                t = t * alpha + tl.sum(dy * e, axis=RED)
            r = 1.0 / s
            dot = t * r
        else:
            dot = tl.zeros([N], tl.float32)
            for k0 in range(0, K, STEP):
                a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
                base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
                dy = _load(dy_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
                dot += tl.sum(dy * _load(saved_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32), axis=RED)
        for k0 in range(0, K, STEP):
            a_start, c_start = _chunk_start(k0, a0, c0, LAST_DIM)
            base, rel, mask, stride, kidx = _chunk(o, a_start, c_start, n_rows, K, inner, BR, BC, LAST_DIM, REL32)
            dy = _load(dy_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
            if RECOMPUTE:
                z = _perturbed(saved_ptr, seed_lo, seed_hi, base, rel, mask, stride, BR, BC, ALIGN4, REL32, MASKED)
                y = tl.exp2((z - _expand(m, RED)) * scale2) * _expand(r, RED)
            else:
                y = _load(saved_ptr + base + rel, mask, 0.0, MASKED).to(tl.float32)
            dx = y * (dy - _expand(dot, RED)) * inv_tau
            _store(dx_ptr + base + rel, dx, mask, MASKED)


# ----------------------------------------------------------------------------------------------------
# KL(softmax(l) || uniform) = sum p (l - lse) + log K = t / s - log s + log K, with m = max l,
# s = sum exp(l - m), t = sum exp(l - m) (l - m); its gradient is grad * p_k (l_k - m - t / s).
# As in the reference, a term whose p is exactly 0 contributes 0 (0 log 0 = 0, so -inf and extreme finite
# logits give no NaN), while a column whose log-softmax is NaN everywhere (a NaN or +inf logit, or every
# logit -inf) gives a NaN KL and a NaN gradient for the whole column. The guards below test ``!= 0``
# (never ``> 0``) so a NaN term is kept, and the kernel also flags such columns explicitly (``valid``)
# rather than rely on how ``tl.max`` treats NaN.


@triton.jit
def _columns(n_cols, n_col_tiles, BLOCK_I: tl.constexpr):
    """This program's outer index ``o`` and its ``BLOCK_I`` reduction columns (with their mask)."""
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_col_tiles
    cols = (pid % n_col_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)  # int64: rows may number >= 2^31
    return o, cols, cols < n_cols


@triton.jit
def _offsets(o, cols, ks, K, n_cols, LAST_DIM: tl.constexpr):
    """int64 linear offsets [BLOCK_K, BLOCK_I] of the elements (o, ks, cols) (K along axis 0)."""
    k64 = ks.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    if LAST_DIM:  # columns are rows of length K (o == 0)
        return c64 * K + k64
    else:
        return (o.to(tl.int64) * K + k64) * n_cols + c64


@triton.jit
def _kl_stats_update(m, s, t, l, mask):
    """One chunk of the online (max, sum exp, sum exp * (l - max)) along axis 0."""
    m_new = tl.maximum(m, tl.max(l, axis=0))
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    # Rebase t on m_new: t + s (m - m_new), times alpha. When alpha underflows to 0 the old terms vanish
    # (and s (m - m_new) may overflow), when s == 0 (m still -inf) there is nothing to rebase.
    # The guards test != 0 so a NaN s / alpha / t still propagates.
    shift = tl.where(s != 0, s * (m - m_new), 0.0)
    t = tl.where(alpha != 0, (t + shift) * alpha, t * 0.0)
    d = l - m_new[None, :]
    e = tl.where(mask & (l != float("-inf")), tl.exp(d), 0.0)  # no exp(-inf - -inf) while m_new is -inf
    s = s * alpha + tl.sum(e, axis=0)
    t = t + tl.sum(tl.where(e != 0, e * d, 0.0), axis=0)  # 0 log 0 = 0; a NaN e stays NaN
    return m_new, s, t


@triton.jit
def _kl_uniform_kernel(x_ptr, g_ptr, out_ptr, K, log_k, n_cols, n_col_tiles,
                       BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, LAST_DIM: tl.constexpr,
                       SINGLE: tl.constexpr, BACKWARD: tl.constexpr):
    """Forward: out[o, col] = KL. Backward: out[o, k, col] = g[o, col] * p_k * (log p_k - sum p log p)."""
    o, cols, col_mask = _columns(n_cols, n_col_tiles, BLOCK_I)
    red = o.to(tl.int64) * n_cols + cols.to(tl.int64)  # offsets of the reduced (o, col) entries
    ks = tl.arange(0, BLOCK_K)
    if SINGLE:
        mask = (ks < K)[:, None] & col_mask[None, :]
        offs = _offsets(o, cols, ks, K, n_cols, LAST_DIM)
        l = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        n_nan = tl.sum((l != l).to(tl.int32), axis=0)
        m = tl.max(l, axis=0)
        d = l - m[None, :]
        e = tl.where(mask, tl.exp(d), 0.0)
        s = tl.sum(e, axis=0)
        t = tl.sum(tl.where(e != 0, e * d, 0.0), axis=0)  # 0 log 0 = 0; a NaN e stays NaN
    else:
        m = tl.full([BLOCK_I], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_I], tl.float32)
        t = tl.zeros([BLOCK_I], tl.float32)
        n_nan = tl.zeros([BLOCK_I], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            mask = (kk < K)[:, None] & col_mask[None, :]
            offs = _offsets(o, cols, kk, K, n_cols, LAST_DIM)
            l = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            n_nan += tl.sum((l != l).to(tl.int32), axis=0)
            m, s, t = _kl_stats_update(m, s, t, l, mask)
    # NaN, +inf or all -inf: the log-softmax is NaN everywhere, so are the KL and the whole gradient.
    valid = (n_nan == 0) & (m > float("-inf")) & (m < float("inf"))
    r = 1.0 / s
    if BACKWARD:
        g = tl.load(g_ptr + red, mask=col_mask, other=0.0).to(tl.float32)
        mean = t * r  # sum p log p + log s
        if SINGLE:
            dx = g[None, :] * (e * r[None, :]) * (d - mean[None, :])
            dx = tl.where(valid[None, :], tl.where(e != 0, dx, 0.0), float("nan"))
            tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + ks
                mask = (kk < K)[:, None] & col_mask[None, :]
                offs = _offsets(o, cols, kk, K, n_cols, LAST_DIM)
                d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - m[None, :]
                e = tl.exp(d)
                dx = g[None, :] * (e * r[None, :]) * (d - mean[None, :])
                dx = tl.where(valid[None, :], tl.where(e != 0, dx, 0.0), float("nan"))
                tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        kl = tl.where(valid, t * r - tl.log(s), float("nan")) + log_k
        tl.store(out_ptr + red, kl.to(out_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# Launchers.


def _geometry(x: torch.Tensor, dim: int) -> tuple[int, int, int]:
    """(outer, K, inner) of ``x`` around ``dim``."""
    shape = x.shape
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1:])
    return outer, shape[dim], inner


def _check(name: str, x: torch.Tensor, arg: str = "logits") -> None:
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"{name}: the Triton backend supports float32/float16/bfloat16 {arg}, got {x.dtype}")


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _num_warps(tile: int, per_thread: int = ELEMENTS_PER_THREAD) -> int:
    return min(32, max(4, tile // (32 * per_thread)))


def _gumbel_plan(x: torch.Tensor, dim: int, max_tile: Optional[int], inputs: int = 1, noise: bool = True,
                 stream: bool = False):
    """Grid, scalar arguments (n_rows, K, inner, n_c_tiles), single-pass flag and meta-parameters of a
    Gumbel kernel.

    ``inputs``: tensors the kernel keeps in registers on its single-pass path (the backward: 2);
    ``noise``: whether it makes noise (then groups of four columns stay in one tile where they can);
    ``stream``: a one-pass reduction that keeps nothing per element (argmax): chunks of at most
    ``LOOP_TILE`` elements, whatever the length, so registers stay low and column chunks span full
    128-byte lines. ``max_tile`` lowers the tile limit (tests use it to exercise the looped paths).
    """
    outer, K, inner = _geometry(x, dim)
    last_dim = inner == 1
    stream = stream and not last_dim  # a row that fits one tile is read into registers once, as the soft one
    align4 = noise and ((K % 4 == 0) if last_dim else (inner % 4 == 0))
    limit = max(4, _pow2_floor(max_tile or MAX_TILE // inputs))
    if stream:
        limit = min(limit, LOOP_TILE)
    if noise and not align4:
        limit = min(limit, UNALIGNED_TILE)
    bk = triton.next_power_of_2(K)
    if last_dim:  # tile [BR rows, BC categories]
        single = bk <= limit
        bc = bk if single else min(limit, LOOP_TILE)
        br = min(max(1, TILE // bk), triton.next_power_of_2(outer)) if single else 1
        n_c_tiles, n_programs = 1, triton.cdiv(outer, br)
        masked = K % bc != 0 or outer % br != 0
    else:  # tile [BR categories, BC inner positions]
        cols_p2 = triton.next_power_of_2(inner)
        min_cols = 4 if align4 else 1  # a group of four columns shares a Philox call
        # A single-pass tile must span at least MIN_STRIP_COLS contiguous columns (or the whole row):
        # narrower strips read pieces smaller than a DRAM burst from rows far apart.
        strip = max(min_cols, min(MIN_STRIP_COLS, cols_p2))
        single = bk * strip <= limit
        if single:
            br = bk
            bc = min(max(strip, TILE // bk), cols_p2)
        else:
            bc = min(cols_p2, max(min_cols, LOOP_COLS))
            br = max(1, min(limit, LOOP_TILE) // bc)
        n_c_tiles = triton.cdiv(inner, bc)
        n_programs = outer * n_c_tiles
        masked = K % br != 0 or inner % bc != 0
    if n_programs >= 2**31:
        raise ValueError(f"tensor too large for the Triton Gumbel kernels: {n_programs} programs")
    if K >= 2**31 - max(br, bc):
        raise ValueError(f"size {K} of dim {dim} is too large for the Triton Gumbel kernels")
    rel32 = br * (K if last_dim else inner) + bc < 2**31  # offsets within a chunk fit int32
    if (noise and (not align4 or inputs > 1)) or (inputs > 1 and not single):
        per_thread = NARROW_ELEMENTS_PER_THREAD
    elif not single and not last_dim and noise:  # looped column strips: the prefetched chunk doubles the tile
        per_thread = LOOP_ELEMENTS_PER_THREAD
    elif single and not last_dim and inputs == 1 and br * bc > LOOP_TILE:  # the column strip
        per_thread = STRIP_ELEMENTS_PER_THREAD
    else:
        per_thread = ELEMENTS_PER_THREAD
    meta = dict(BR=br, BC=bc, LAST_DIM=last_dim, ALIGN4=align4, REL32=rel32, MASKED=masked,
                num_warps=_num_warps(br * bc, per_thread))
    return (n_programs,), (outer if last_dim else 1, K, inner, n_c_tiles), single, meta


def _split_plan(x: torch.Tensor, dim: int, max_tile: Optional[int], inputs: int = 1):
    """Grid, (K, inner, n_c_tiles, n_splits), strip count and meta-parameters of a split kernel (columns
    layout): chunks of BR categories x BC inner positions, BR * BC <= SPLIT_TILE / inputs (the backward
    keeps dy and y)."""
    outer, K, inner = _geometry(x, dim)
    noise = inputs == 1
    align4 = inner % 4 == 0
    limit = max(4, _pow2_floor(max_tile or MAX_TILE))
    if noise and not align4:
        limit = min(limit, UNALIGNED_TILE)
    bc = min(triton.next_power_of_2(inner), max(4 if noise and align4 else 1, LOOP_COLS))
    br = max(1, min(limit, SPLIT_TILE // inputs) // bc)
    n_c_tiles = triton.cdiv(inner, bc)
    n_splits = triton.cdiv(K, br)
    n_strips = outer * n_c_tiles
    if n_strips * n_splits >= 2**31:
        raise ValueError(f"tensor too large for the Triton Gumbel kernels: {n_strips * n_splits} programs")
    if K >= 2**31 - br:
        raise ValueError(f"size {K} of dim {dim} is too large for the Triton Gumbel kernels")
    per_thread = STRIP_ELEMENTS_PER_THREAD // inputs if align4 or not noise else NARROW_ELEMENTS_PER_THREAD
    meta = dict(BR=br, BC=bc, NSB=min(SPLIT_MERGE, triton.next_power_of_2(n_splits)), BACKWARD=not noise,
                ALIGN4=noise and align4, REL32=br * inner + bc < 2**31, MASKED=K % br != 0 or inner % bc != 0,
                num_warps=_num_warps(br * bc, per_thread))
    return (n_strips * n_splits,), (K, inner, n_c_tiles, n_splits), n_strips, meta


def _split_launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, seed: int, tau: float, dim: int,
                  max_tile: Optional[int], backward: bool, part: Optional[torch.Tensor] = None,
                  sync: Optional[torch.Tensor] = None):
    """Launches a split kernel (forward: a = logits; backward: a = dy, b = y) into ``out``; returns its
    (part, sync) buffers (tests pass them back in to replay a launch whose statistics are published)."""
    grid, sizes, n_strips, meta = _split_plan(a, dim, max_tile, inputs=2 if backward else 1)
    n_splits = sizes[-1]
    if part is None:
        width = 1 if backward else 2
        part = torch.empty(n_strips * (n_splits + 1) * width * meta["BC"], dtype=torch.float32, device=a.device)
        sync = torch.zeros(n_strips * (n_splits + 3), dtype=torch.int32, device=a.device)
    # Polling only means anything on a GPU: the interpreter runs the programs one after another.
    max_polls = SPLIT_MAX_POLLS if a.is_cuda else 1
    lo, hi = seed_words(seed)
    args = (a, b, out, part, sync, lo, hi, _LOG2E / tau, 1.0 / tau, *sizes)
    launch = {} if backward else _NOISE_LAUNCH
    _gumbel_softmax_split_kernel[grid](*args, max_polls, **meta, **launch)
    meta.pop("NSB")
    _gumbel_softmax_split_fixup_kernel[(n_strips,)](*args, **meta, **launch)
    return part, sync


def _launch_plan(x: torch.Tensor, dim: int, max_block: Optional[int]):
    """Grid and meta-parameters of a KL kernel (tile [BLOCK_K, BLOCK_I], K along axis 0)."""
    outer, K, inner = _geometry(x, dim)
    last_dim = inner == 1
    n_cols = outer if last_dim else inner  # reduction columns per outer index
    n_outer = 1 if last_dim else outer
    limit = _pow2_floor(max_block or MAX_BLOCK)
    bk = triton.next_power_of_2(K)
    cols_p2 = triton.next_power_of_2(n_cols)
    if bk <= limit:  # the whole reduction axis stays in registers
        single = True
        bi = max(1, TILE // bk)
        if not last_dim:  # long columns: still a few contiguous positions per program
            bi = max(bi, min(8, limit // bk))
        bi = min(bi, cols_p2)
    else:
        single = False
        bi = 1 if last_dim else min(cols_p2, LOOP_COLS)
        bk = max(1, min(limit, LOOP_TILE) // bi)
    tile = bk * bi
    num_warps = min(32, max(4, tile // 256))
    n_col_tiles = triton.cdiv(n_cols, bi)
    n_programs = n_outer * n_col_tiles
    if n_programs >= 2**31:
        raise ValueError(f"tensor too large for the Triton Gumbel kernels: {n_programs} programs")
    if K >= 2**31 - bk:
        raise ValueError(f"size {K} of dim {dim} is too large for the Triton Gumbel kernels")
    meta = dict(BLOCK_K=bk, BLOCK_I=bi, LAST_DIM=last_dim, num_warps=num_warps)
    return (n_programs,), K, n_cols, n_col_tiles, single, meta


def _reduced_shape(x: torch.Tensor, dim: int) -> list[int]:
    return [s for d, s in enumerate(x.shape) if d != dim]


def gumbel_softmax_forward(logits: torch.Tensor, seed: int, tau: float, hard: bool, dim: int, *,
                           max_block: Optional[int] = None) -> torch.Tensor:
    """Soft (``hard=False``) or one-hot (``hard=True``) Gumbel-softmax sample along ``dim``.

    logits: any shape, float32/16/bf16, contiguous. Returns a tensor of the same shape and dtype.
    ``max_block`` lowers the single-pass tile limit (tests use it to exercise the looped path).
    """
    _check("gumbel_softmax_forward", logits)
    x = logits.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid, sizes, single, meta = _gumbel_plan(x, dim, max_block, stream=hard)
    if not hard and not single and not meta["LAST_DIM"] and SPLIT_COLUMNS:
        _split_launch(x, x, out, seed, tau, dim, max_block, backward=False)
        return out
    lo, hi = seed_words(seed)
    if hard:
        _gumbel_hard_fwd_kernel[grid](x, out, lo, hi, *sizes, SINGLE=single, **meta, **_NOISE_LAUNCH)
    else:
        _gumbel_softmax_fwd_kernel[grid](x, out, lo, hi, _LOG2E / tau, *sizes, SINGLE=single, **meta, **_NOISE_LAUNCH)
    return out


def gumbel_softmax_backward(grad: torch.Tensor, saved: torch.Tensor, seed: int, tau: float, hard: bool, dim: int,
                            *, max_block: Optional[int] = None) -> torch.Tensor:
    """dlogits = y * (grad - sum(grad * y)) / tau along ``dim``.

    ``saved`` is the soft sample y for ``hard=False``, the logits for ``hard=True`` (y is then
    recomputed from the logits and the seed). Returns a tensor shaped and typed like ``saved``.
    """
    _check("gumbel_softmax_backward", saved, "saved")
    _check("gumbel_softmax_backward", grad, "grad")
    dy = grad.contiguous()
    s = saved.contiguous()
    out = torch.empty_like(s)
    if s.numel() == 0:
        return out
    grid, sizes, single, meta = _gumbel_plan(s, dim, max_block, inputs=2, noise=bool(hard))
    if not hard and not single and not meta["LAST_DIM"] and SPLIT_COLUMNS:
        _split_launch(dy, s, out, seed, tau, dim, max_block, backward=True)
        return out
    lo, hi = seed_words(seed)
    launch = _NOISE_LAUNCH if hard else {}
    _gumbel_softmax_bwd_kernel[grid](dy, s, out, lo, hi, 1.0 / tau, _LOG2E / tau, *sizes, SINGLE=single,
                                     RECOMPUTE=bool(hard), **meta, **launch)
    return out


def gumbel_argmax(logits: torch.Tensor, seed: int, dim: int, *, max_block: Optional[int] = None) -> torch.Tensor:
    """argmax along ``dim`` of logits + Gumbel noise: int64, the shape of ``logits`` without ``dim``."""
    _check("gumbel_argmax", logits)
    x = logits.contiguous()
    out = torch.empty(_reduced_shape(x, dim), dtype=torch.int64, device=x.device)
    if x.numel() == 0:
        return out
    grid, sizes, single, meta = _gumbel_plan(x, dim, max_block, stream=True)
    lo, hi = seed_words(seed)
    _gumbel_argmax_kernel[grid](x, out, lo, hi, *sizes, SINGLE=single, **meta, **_NOISE_LAUNCH)
    return out


def categorical_kl_uniform_forward(logits: torch.Tensor, dim: int, *, max_block: Optional[int] = None) -> torch.Tensor:
    """KL(softmax(logits) || uniform) along ``dim``: the shape of ``logits`` without ``dim``, its dtype."""
    _check("categorical_kl_uniform_forward", logits)
    x = logits.contiguous()
    out = torch.empty(_reduced_shape(x, dim), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    grid, K, n_cols, n_col_tiles, single, meta = _launch_plan(x, dim, max_block)
    _kl_uniform_kernel[grid](x, x, out, K, math.log(K), n_cols, n_col_tiles, SINGLE=single, BACKWARD=False, **meta)
    return out


def categorical_kl_uniform_backward(grad: torch.Tensor, logits: torch.Tensor, dim: int, *,
                                    max_block: Optional[int] = None) -> torch.Tensor:
    """Gradient of the KL: ``grad`` has the reduced shape; returns a tensor shaped and typed like ``logits``."""
    _check("categorical_kl_uniform_backward", logits)
    _check("categorical_kl_uniform_backward", grad, "grad")
    x = logits.contiguous()
    g = grad.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid, K, n_cols, n_col_tiles, single, meta = _launch_plan(x, dim, max_block)
    _kl_uniform_kernel[grid](x, g, out, K, math.log(K), n_cols, n_col_tiles, SINGLE=single, BACKWARD=True, **meta)
    return out
