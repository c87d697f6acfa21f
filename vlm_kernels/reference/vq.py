"""Vector-quantisation lookup and codebook statistics in plain PyTorch: the oracle and the fallback.

Every function takes contiguous tensors and a normalised ``dim`` (the checks live in
``vlm_kernels.ops.vq``). Layout: ``x`` is viewed as ``(outer, D, inner)`` with ``D = x.shape[dim]``; its
rows are the ``outer * inner`` vectors ``x[o, :, i]``, numbered ``o * inner + i`` (for ``dim = -1`` that is
simply the flattened leading dims). ``codebook`` is ``(K, D)``.

The contract every backend meets (``metric`` is ``"l2"`` or ``"cosine"``):

* l2: ``index = argmin_k sum_d (x_d - e_kd)^2`` evaluated in float64 (the lowest index on ties);
  ``distance`` is that float64 sum for the chosen code, rounded to float32.
* cosine: ``index = argmax_k cos(x, e_k)`` with ``cos = x.e / (max(|x|, 1e-12) max(|e_k|, 1e-12))`` in
  float64 (the lowest index on ties; a zero vector has cosine 0 with everything); ``distance`` is
  ``1 - cos`` rounded to float32.
* a code with a NaN or an infinity is never chosen; a row of ``x`` with a NaN or an infinity (or a row
  when every code is non-finite) gets index 0 and distance NaN. Other rows are unaffected.

Code statistics: ``counts[k]`` is the number of rows assigned to code ``k`` and ``sums[k]`` the sum of
those rows (float64 accumulation), both float32 (float64 for float64 ``x``).

The kernels reach the float64 answer without an N x K matrix: fp32 (or tensor-core) distance tiles
with a running minimum, then an exact float64 re-score of every code within the tiles' error bound.
This reference takes the float64 expanded form on centred data in row chunks instead (about 16M
distances at a time), which is exact enough to be the oracle and small enough to be the fallback.
"""

from __future__ import annotations

import torch

# Rows per chunk: chunk * K float64 distances at a time (~128 MB at most).
_CHUNK_ELEMENTS = 1 << 24
COSINE_EPS = 1e-12


def as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` as an (N, D) matrix of its rows (a copy only when ``dim`` is not the last dim)."""
    d = x.shape[dim]
    return x.movedim(dim, -1).reshape(-1, d)


def row_shape(x: torch.Tensor, dim: int) -> list[int]:
    """The shape of ``indices`` / ``distances``: ``x``'s shape without ``dim``."""
    shape = list(x.shape)
    del shape[dim]
    return shape


def from_rows(rows: torch.Tensor, x_shape: list[int], dim: int) -> torch.Tensor:
    """Inverse of :func:`as_rows`: (N, D) rows back in ``x``'s layout (contiguous)."""
    moved = list(x_shape)
    d = moved.pop(dim)
    return rows.reshape(moved + [d]).movedim(-1, dim).contiguous()


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).all(dim=1)


def _repeats_earlier_row(t: torch.Tensor) -> torch.Tensor:
    """(K,) bool: row k equals (bit for bit) some row j < k."""
    # A fresh row-major copy: contiguous() keeps odd strides on size-1 dims (a (1, 1) slice with
    # stride 2 is "contiguous"), which view(uint8) rejects.
    bits = t.clone(memory_format=torch.contiguous_format).view(torch.uint8).reshape(t.shape[0], -1)
    _, inverse = torch.unique(bits, dim=0, return_inverse=True)
    order = torch.arange(t.shape[0], device=t.device)
    first = torch.full((int(inverse.max()) + 1,), t.shape[0], dtype=torch.int64, device=t.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first[inverse] != order


def _exact_argmin(score: torch.Tensor, tol: torch.Tensor, r: torch.Tensor, e: torch.Tensor, metric: str,
                  candidate: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest index of the exact minimum among the codes whose (float64 expanded) score is
    within ``tol`` (twice its rounding-error bound) of the row's best: exact ties go to the lowest index
    whatever the rounding of the expanded form."""
    finite = torch.isfinite(score)
    best = torch.where(finite, score, torch.full_like(score, float("inf"))).min(dim=1, keepdim=True).values
    rows, codes = (finite & (score <= best + tol[:, None])).nonzero(as_tuple=True)
    if metric == "l2":
        exact = ((r[rows] - e[codes]) ** 2).sum(1)
    else:
        norms = r[rows].norm(dim=1).clamp_min(COSINE_EPS) * e[codes].norm(dim=1).clamp_min(COSINE_EPS)
        exact = -(r[rows] * e[codes]).sum(1) / norms
    n = score.shape[0]
    row_min = torch.full((n,), float("inf"), dtype=exact.dtype, device=exact.device)
    row_min = row_min.scatter_reduce(0, rows, exact, reduce="amin")
    win = exact == row_min[rows]
    out = torch.full((n,), score.shape[1], dtype=torch.int64, device=score.device)
    out = out.scatter_reduce(0, rows[win], codes[win], reduce="amin")
    _overflowed_rows(out, finite, r, e, metric, candidate)
    return torch.where(out == score.shape[1], torch.zeros_like(out), out)


def _overflowed_rows(out: torch.Tensor, finite: torch.Tensor, r: torch.Tensor, e: torch.Tensor, metric: str,
                     candidate: torch.Tensor) -> None:
    """Rows whose every expanded score overflowed (codes or rows beyond ~1e154 in float64, where the
    centred squares are inf) although some code's own distance is finite: the exact distance to every
    candidate code, in place. (Rows holding NaN/inf land here too; their index is overwritten later.)"""
    lost = (~finite.any(1)).nonzero()[:, 0]
    codes = candidate.nonzero()[:, 0]
    if len(lost) == 0 or len(codes) == 0:
        return
    ec = e[codes]
    block = max(1, (1 << 22) // (len(codes) * max(e.shape[1], 1)))
    for start in range(0, len(lost), block):
        rows = lost[start:start + block]
        rb = r[rows]
        if metric == "l2":
            exact = ((rb[:, None, :] - ec[None, :, :]) ** 2).sum(-1)
        else:
            norms = rb.norm(dim=1).clamp_min(COSINE_EPS)[:, None] * ec.norm(dim=1).clamp_min(COSINE_EPS)[None, :]
            exact = -(rb @ ec.T) / norms
        out[rows] = codes[exact.argmin(1)]  # the first of equal minima: the lowest index


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor, dim: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64, distances float32), both of ``x``'s shape without ``dim``."""
    rows = as_rows(x, dim).to(torch.float64)
    e = codebook.to(torch.float64)
    n, k = rows.shape[0], e.shape[0]
    good_code = _finite_rows(e)
    e = torch.where(good_code[:, None], e, torch.zeros((), dtype=e.dtype, device=e.device))
    # A code equal to an earlier one can never be the lowest-index minimum; dropping it also keeps a
    # BLAS that rounds equal columns differently from picking the later copy.
    candidate = good_code & ~_repeats_earlier_row(codebook)
    if metric == "l2":
        # Distances are translation invariant; centring on the codebook mean keeps the expanded form
        # from cancelling when the data sit far from the origin.
        n_good = good_code.sum().clamp_min(1)
        center = e.sum(0) / n_good
        e_c = e - center
        penalty = torch.where(candidate, (e_c * e_c).sum(1), torch.full_like(e_c[:, 0], float("inf")))
    else:
        e_c = e / e.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
        penalty = torch.where(candidate, torch.zeros_like(e_c[:, 0]), torch.full_like(e_c[:, 0], float("inf")))
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(k, 1))
    max_norm = torch.where(candidate, e_c.norm(dim=1), torch.zeros_like(e_c[:, 0])).max()
    for start in range(0, n, chunk):
        r = rows[start:start + chunk]
        if metric == "l2":
            r_c = r - center
            score = penalty - 2.0 * (r_c @ e_c.T)  # |r_c|^2 is the same for every code of a row
            scale = (r_c.norm(dim=1) + max_norm) ** 2
        else:
            score = penalty - r @ e_c.T  # r's norm does not change the order
            scale = r.norm(dim=1) * (max_norm + 1.0)
        indices[start:start + chunk] = _exact_argmin(score, 2.0 * (e.shape[1] + 8) * 2.0**-53 * scale, r, e, metric,
                                                     candidate)
    chosen = codebook.to(torch.float64)[indices]
    if metric == "l2":
        distances = ((rows - chosen) ** 2).sum(1)
    else:
        dots = (rows * chosen).sum(1)
        norms = rows.norm(dim=1).clamp_min(COSINE_EPS) * chosen.norm(dim=1).clamp_min(COSINE_EPS)
        distances = 1.0 - dots / norms
    bad_row = ~_finite_rows(rows) | ~good_code.any()
    indices = torch.where(bad_row, torch.zeros_like(indices), indices)
    distances = torch.where(bad_row, torch.full_like(distances, float("nan")), distances)
    shape = row_shape(x, dim)
    return indices.reshape(shape), distances.to(torch.float32).reshape(shape)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def vq_code_stats(x: torch.Tensor, indices: torch.Tensor, num_codes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (K,), sums (K, D)): rows per code and the sum of each code's rows, no one-hot matrix."""
    rows = as_rows(x, dim).to(torch.float64)
    idx = indices.reshape(-1)
    out = stats_dtype(x.dtype)
    counts = torch.bincount(idx, minlength=num_codes).to(out)
    sums = torch.zeros(num_codes, rows.shape[1], dtype=torch.float64, device=x.device).index_add_(0, idx, rows)
    return counts, sums.to(out)


__all__ = ["vq_nearest", "vq_code_stats", "as_rows", "from_rows", "row_shape", "stats_dtype", "COSINE_EPS"]
