"""Gumbel-softmax, Gumbel-argmax and KL-to-uniform as Triton kernels, with their launchers.

Every launcher takes contiguous tensors and a normalised ``dim`` (the checks live in
``vlm_kernels.ops.gumbel``) and matches ``vlm_kernels.reference.gumbel``: hard samples and argmax bit for
bit, soft samples and gradients to fp32 rounding.

Layout. ``logits`` is viewed as ``(outer, K, inner)`` with ``K = size(dim)``; element ``(o, k, i)`` has
linear offset ``(o * K + k) * inner + i``, which is also its Philox counter. A program owns a tile of
``BLOCK_K x BLOCK_I`` elements: ``BLOCK_I`` reduction columns (whole rows when ``dim`` is the last dim,
``LAST_DIM``: there the "columns" are rows of stride K and the tile walks K contiguously; otherwise
``BLOCK_I`` consecutive inner positions, the contiguous axis, so no transposed copy is ever made).

* ``SINGLE``: the whole reduction axis fits one tile (``next_power_of_2(K) <= max_block``, default
  ``MAX_BLOCK``): logits are read once, kept in registers, and the output is written once. Short
  reductions share a program (about ``TILE`` elements); long columns (dim != -1, e.g. K = 8192 over
  dim 1 of NCHW) take a strip of 2-8 neighbouring columns.
* otherwise a loop over K in chunks: one pass with an online softmax (running max + rescaled sum) or a
  running argmax, then a pass that re-reads the logits, regenerates the noise and writes. A hard
  sample's second pass only writes (the one-hot needs no logits).

The grid is 1D, one program per tile (grid x is not capped at 65535). Kernels that compute noise are
launched with ``enable_fp_fusion=False`` (see ``philox.py``); the noise is never stored, the hard
backward regenerates it from the seed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .philox import gumbel_noise, seed_words

# Most elements one program keeps in registers on the single-pass path; larger reductions loop.
MAX_BLOCK = 16384
# Target elements per program when a tile holds several short reductions (rows or columns).
TILE = 2048
# Elements per chunk on the looped path.
LOOP_TILE = 4096
# Inner positions per program on the looped column path (128 bytes of fp32: one full line).
LOOP_COLS = 32

_BIG = tl.constexpr(2147483647)  # larger than any index along K
_NOISE_LAUNCH = {"enable_fp_fusion": False}
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Tile helpers.


@triton.jit
def _columns(n_cols, n_col_tiles, BLOCK_I: tl.constexpr):
    """This program's outer index ``o`` and its ``BLOCK_I`` reduction columns (with their mask)."""
    pid = tl.program_id(0).to(tl.int64)
    o = pid // n_col_tiles
    cols = (pid % n_col_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)  # int64: rows may number >= 2^31
    return o, cols, cols < n_cols


@triton.jit
def _offsets(o, cols, ks, K, n_cols, LAST_DIM: tl.constexpr):
    """int64 linear offsets [BLOCK_K, BLOCK_I] of the elements (o, ks, cols)."""
    k64 = ks.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    if LAST_DIM:  # columns are rows of length K (o == 0)
        return c64 * K + k64
    else:
        return (o.to(tl.int64) * K + k64) * n_cols + c64


@triton.jit
def _perturbed(x_ptr, offs, mask, seed_lo, seed_hi):
    """z = logits + Gumbel noise in fp32; -inf where ``mask`` is off."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x + gumbel_noise(seed_lo, seed_hi, offs)
    return tl.where(mask, z, float("-inf"))


@triton.jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _online_update(m, s, z, scale):
    """One chunk of an online softmax of ``z * scale`` along axis 0: new (max, rescaled sum, chunk exps).

    -inf entries (masked lanes included) contribute 0 even while the running max is still -inf; NaN
    entries make the sum NaN (the callers also flag NaN rows explicitly).
    """
    m_new = tl.maximum(m, tl.max(z, axis=0))
    alpha = tl.where(m == m_new, 1.0, tl.exp((m - m_new) * scale))
    e = tl.where(z == float("-inf"), 0.0, tl.exp((z - m_new[None, :]) * scale))
    return m_new, s * alpha, e, alpha


# ----------------------------------------------------------------------------------------------------
# Soft sample (forward).


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_softmax_fwd_kernel(x_ptr, y_ptr, seed_lo, seed_hi, inv_tau, K, n_cols, n_col_tiles,
                               BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, LAST_DIM: tl.constexpr,
                               SINGLE: tl.constexpr):
    o, cols, col_mask = _columns(n_cols, n_col_tiles, BLOCK_I)
    ks = tl.arange(0, BLOCK_K)
    if SINGLE:
        mask = (ks < K)[:, None] & col_mask[None, :]
        offs = _offsets(o, cols, ks, K, n_cols, LAST_DIM)
        z = _perturbed(x_ptr, offs, mask, seed_lo, seed_hi)
        has_nan = tl.max((z != z).to(tl.int32), axis=0) > 0
        m = tl.max(z, axis=0)
        e = tl.where(mask, tl.exp((z - m[None, :]) * inv_tau), 0.0)
        y = e * (1.0 / tl.sum(e, axis=0))[None, :]
        y = tl.where(has_nan[None, :], float("nan"), y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_I], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_I], tl.float32)
        n_nan = tl.zeros([BLOCK_I], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            mask = (kk < K)[:, None] & col_mask[None, :]
            z = _perturbed(x_ptr, _offsets(o, cols, kk, K, n_cols, LAST_DIM), mask, seed_lo, seed_hi)
            n_nan += tl.sum((z != z).to(tl.int32), axis=0)
            m, s, e, alpha = _online_update(m, s, z, inv_tau)
            s += tl.sum(e, axis=0)
        r = 1.0 / s
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            mask = (kk < K)[:, None] & col_mask[None, :]
            offs = _offsets(o, cols, kk, K, n_cols, LAST_DIM)
            z = _perturbed(x_ptr, offs, mask, seed_lo, seed_hi)
            y = tl.exp((z - m[None, :]) * inv_tau) * r[None, :]
            y = tl.where(n_nan[None, :] > 0, float("nan"), y)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Gumbel-argmax and the hard sample.


@triton.jit
def _gumbel_argmax_columns(x_ptr, seed_lo, seed_hi, o, cols, col_mask, K, n_cols,
                           BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, LAST_DIM: tl.constexpr):
    """argmax_k z per column (first index on ties, NaN largest, first NaN wins) and whether z has NaN."""
    ks = tl.arange(0, BLOCK_K)
    best = tl.full([BLOCK_I], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_I], tl.int32)  # index 0 is right when every z is -inf
    first_nan = tl.full([BLOCK_I], _BIG, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kb = kk[:, None]
        mask = (kk < K)[:, None] & col_mask[None, :]
        z = _perturbed(x_ptr, _offsets(o, cols, kk, K, n_cols, LAST_DIM), mask, seed_lo, seed_hi)
        is_nan = z != z
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, kb, _BIG), axis=0))
        zc = tl.where(is_nan, float("-inf"), z)
        c_max = tl.max(zc, axis=0)
        c_idx = tl.min(tl.where((zc == c_max[None, :]) & mask, kb, _BIG), axis=0)
        better = c_max > best  # strict: an earlier chunk keeps its tie
        best = tl.where(better, c_max, best)
        best_idx = tl.where(better, c_idx, best_idx)
    has_nan = first_nan < _BIG
    return tl.where(has_nan, first_nan, best_idx), has_nan


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_hard_fwd_kernel(x_ptr, y_ptr, seed_lo, seed_hi, K, n_cols, n_col_tiles,
                            BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, LAST_DIM: tl.constexpr):
    o, cols, col_mask = _columns(n_cols, n_col_tiles, BLOCK_I)
    idx, has_nan = _gumbel_argmax_columns(x_ptr, seed_lo, seed_hi, o, cols, col_mask, K, n_cols,
                                          BLOCK_K, BLOCK_I, LAST_DIM)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):  # writes only: the one-hot needs no logits
        kk = k0 + ks
        mask = (kk < K)[:, None] & col_mask[None, :]
        y = tl.where(kk[:, None] == idx[None, :], 1.0, 0.0)
        y = tl.where(has_nan[None, :], float("nan"), y)
        tl.store(y_ptr + _offsets(o, cols, kk, K, n_cols, LAST_DIM), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_argmax_kernel(x_ptr, idx_ptr, seed_lo, seed_hi, K, n_cols, n_col_tiles,
                          BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, LAST_DIM: tl.constexpr):
    o, cols, col_mask = _columns(n_cols, n_col_tiles, BLOCK_I)
    idx, has_nan = _gumbel_argmax_columns(x_ptr, seed_lo, seed_hi, o, cols, col_mask, K, n_cols,
                                          BLOCK_K, BLOCK_I, LAST_DIM)
    out = o.to(tl.int64) * n_cols + cols.to(tl.int64)
    tl.store(idx_ptr + out, idx.to(tl.int64), mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# Backward: dlogits = y * (dy - sum_k dy * y) / tau; y is saved (soft) or recomputed (hard).


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _gumbel_softmax_bwd_kernel(dy_ptr, saved_ptr, dx_ptr, seed_lo, seed_hi, inv_tau, K, n_cols, n_col_tiles,
                               BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, LAST_DIM: tl.constexpr,
                               SINGLE: tl.constexpr, RECOMPUTE: tl.constexpr):
    o, cols, col_mask = _columns(n_cols, n_col_tiles, BLOCK_I)
    ks = tl.arange(0, BLOCK_K)
    if SINGLE:
        mask = (ks < K)[:, None] & col_mask[None, :]
        offs = _offsets(o, cols, ks, K, n_cols, LAST_DIM)
        dy = _load_f32(dy_ptr, offs, mask)
        if RECOMPUTE:  # saved = logits: y = softmax((logits + noise) / tau)
            z = _perturbed(saved_ptr, offs, mask, seed_lo, seed_hi)
            m = tl.max(z, axis=0)
            e = tl.where(mask, tl.exp((z - m[None, :]) * inv_tau), 0.0)
            y = e * (1.0 / tl.sum(e, axis=0))[None, :]
        else:  # saved = y
            y = _load_f32(saved_ptr, offs, mask)
        dot = tl.sum(tl.where(mask, dy * y, 0.0), axis=0)
        dx = y * (dy - dot[None, :]) * inv_tau
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        if RECOMPUTE:
            m = tl.full([BLOCK_I], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_I], tl.float32)
            t = tl.zeros([BLOCK_I], tl.float32)  # sum dy * exp((z - m) / tau), rescaled with s
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + ks
                mask = (kk < K)[:, None] & col_mask[None, :]
                offs = _offsets(o, cols, kk, K, n_cols, LAST_DIM)
                z = _perturbed(saved_ptr, offs, mask, seed_lo, seed_hi)
                dy = _load_f32(dy_ptr, offs, mask)
                m, s, e, alpha = _online_update(m, s, z, inv_tau)
                s += tl.sum(e, axis=0)
                t = t * alpha + tl.sum(dy * e, axis=0)
            r = 1.0 / s
            dot = t * r
        else:
            dot = tl.zeros([BLOCK_I], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + ks
                mask = (kk < K)[:, None] & col_mask[None, :]
                offs = _offsets(o, cols, kk, K, n_cols, LAST_DIM)
                dot += tl.sum(_load_f32(dy_ptr, offs, mask) * _load_f32(saved_ptr, offs, mask), axis=0)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            mask = (kk < K)[:, None] & col_mask[None, :]
            offs = _offsets(o, cols, kk, K, n_cols, LAST_DIM)
            dy = _load_f32(dy_ptr, offs, mask)
            if RECOMPUTE:
                z = _perturbed(saved_ptr, offs, mask, seed_lo, seed_hi)
                y = tl.exp((z - m[None, :]) * inv_tau) * r[None, :]
            else:
                y = _load_f32(saved_ptr, offs, mask)
            dx = y * (dy - dot[None, :]) * inv_tau
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# KL(softmax(l) || uniform) = sum p (l - lse) + log K = t / s - log s + log K, with m = max l,
# s = sum exp(l - m), t = sum exp(l - m) (l - m); its gradient is grad * p_k (l_k - m - t / s).
# As in the reference, a term whose p is exactly 0 contributes 0 (0 log 0 = 0, so -inf and extreme finite
# logits give no NaN), while a column whose log-softmax is NaN everywhere (a NaN or +inf logit, or every
# logit -inf) gives a NaN KL and a NaN gradient for the whole column. The guards below test ``!= 0``
# (never ``> 0``) so a NaN term is kept, and the kernel also flags such columns explicitly (``valid``)
# rather than rely on how ``tl.max`` treats NaN.


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


def _launch_plan(x: torch.Tensor, dim: int, max_block: Optional[int]):
    """Grid and meta-parameters for a reduction of ``x`` along ``dim``."""
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
    # About 8 elements per thread: the Philox + log chain needs ~5 live registers per element, so
    # this keeps sm_90 kernels near 40-60 registers without spills (ptxas -v on the 3.8 output).
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
    ``max_block`` lowers the single-pass limit (tests use it to exercise the looped path).
    """
    _check("gumbel_softmax_forward", logits)
    x = logits.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid, K, n_cols, n_col_tiles, single, meta = _launch_plan(x, dim, max_block)
    lo, hi = seed_words(seed)
    if hard:
        _gumbel_hard_fwd_kernel[grid](x, out, lo, hi, K, n_cols, n_col_tiles, **meta, **_NOISE_LAUNCH)
    else:
        _gumbel_softmax_fwd_kernel[grid](x, out, lo, hi, 1.0 / tau, K, n_cols, n_col_tiles, SINGLE=single, **meta,
                                         **_NOISE_LAUNCH)
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
    grid, K, n_cols, n_col_tiles, single, meta = _launch_plan(s, dim, max_block)
    lo, hi = seed_words(seed)
    launch = _NOISE_LAUNCH if hard else {}
    _gumbel_softmax_bwd_kernel[grid](dy, s, out, lo, hi, 1.0 / tau, K, n_cols, n_col_tiles, SINGLE=single,
                                     RECOMPUTE=bool(hard), **meta, **launch)
    return out


def gumbel_argmax(logits: torch.Tensor, seed: int, dim: int, *, max_block: Optional[int] = None) -> torch.Tensor:
    """argmax along ``dim`` of logits + Gumbel noise: int64, the shape of ``logits`` without ``dim``."""
    _check("gumbel_argmax", logits)
    x = logits.contiguous()
    out = torch.empty(_reduced_shape(x, dim), dtype=torch.int64, device=x.device)
    if x.numel() == 0:
        return out
    grid, K, n_cols, n_col_tiles, single, meta = _launch_plan(x, dim, max_block)
    lo, hi = seed_words(seed)
    _gumbel_argmax_kernel[grid](x, out, lo, hi, K, n_cols, n_col_tiles, **meta, **_NOISE_LAUNCH)
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
