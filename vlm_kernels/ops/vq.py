"""Fused vector-quantisation lookup (VQ-VAE): argument checks, torch.library ops, autograd, backends.

Public functions:

* :func:`vq_nearest` - nearest code per row, exact (float64 answer) without an N x K distance matrix.
* :func:`vq_quantize` - straight-through quantiser with the VQ-VAE losses; codebook gradient as a
  segmented sum over each code's rows.
* :func:`vq_code_stats` - per-code row counts and row sums in one pass (no one-hot matrix).
* :func:`vq_ema_update_` - the EMA codebook step built on it: decay, Laplace smoothing, dead-code
  re-initialisation, usage statistics, optional all-reduce; no host synchronisation.

``x`` is (..., D) with ``dim=-1``, or channel-first such as (B, D, H, W) with ``dim=1`` (no transposed
copy is made by the compiled kernels); ``codebook`` is (K, D) of ``x``'s dtype and device. The exact
contract (ties, cosine, non-finite rows) is in ``vlm_kernels.reference.vq``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .._backend import OpTable
from ..reference import vq as reference
from ._common import (check_bool, check_float_tensor, check_real, compiled_kernel, contiguous, describe, eager_fast_path,
                      first_tensor_reason, gpu_dtype_reason, normalize_dim, triton_kernel)

TABLE = OpTable("vq")
METRICS = ("l2", "cosine")


_gpu_reason = first_tensor_reason(gpu_dtype_reason)

TABLE.register("reference", "nearest", reference.vq_nearest)
TABLE.register("cpu", "nearest", compiled_kernel("vq_nearest_cpu"))
TABLE.register("triton", "nearest", triton_kernel("vq", "vq_nearest"), _gpu_reason)
TABLE.register("reference", "code_stats", reference.vq_code_stats)
TABLE.register("cpu", "code_stats", compiled_kernel("vq_code_stats_cpu"))
TABLE.register("triton", "code_stats", triton_kernel("vq", "vq_code_stats"), _gpu_reason)
TABLE.register("cuda", "code_stats", compiled_kernel("vq_code_stats_cuda"), _gpu_reason)


def _run(entry: str, *args):
    _, fn = TABLE.select(entry, args[0].device, *args)
    return fn(*args)


# ----------------------------------------------------------------------------------------------------
# torch.library ops.


@torch.library.custom_op("vlm_kernels::vq_nearest", mutates_args=())
def _vq_nearest(x: Tensor, codebook: Tensor, dim: int, metric: str) -> tuple[Tensor, Tensor]:
    return _vq_nearest_impl(x, codebook, dim, metric)


def _vq_nearest_impl(x: Tensor, codebook: Tensor, dim: int, metric: str) -> tuple[Tensor, Tensor]:
    return _run("nearest", contiguous(x), contiguous(codebook), dim, metric)


@_vq_nearest.register_fake
def _(x, codebook, dim, metric):
    shape = reference.row_shape(x, dim)
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("vlm_kernels::vq_code_stats", mutates_args=())
def _vq_code_stats(x: Tensor, indices: Tensor, num_codes: int, dim: int) -> tuple[Tensor, Tensor]:
    return _vq_code_stats_impl(x, indices, num_codes, dim)


def _vq_code_stats_impl(x: Tensor, indices: Tensor, num_codes: int, dim: int) -> tuple[Tensor, Tensor]:
    return _run("code_stats", contiguous(x), contiguous(indices), num_codes, dim)


@_vq_code_stats.register_fake
def _(x, indices, num_codes, dim):
    out = reference.stats_dtype(x.dtype)
    return x.new_empty((num_codes,), dtype=out), x.new_empty((num_codes, x.shape[dim]), dtype=out)


def _gather_codes(codebook: Tensor, indices: Tensor, x_shape, dim: int) -> Tensor:
    """``codebook[indices]`` laid out like ``x`` (the code dimension at ``dim``)."""
    rows = codebook[indices.reshape(-1)]
    return reference.from_rows(rows, list(x_shape), dim)


@torch.library.custom_op("vlm_kernels::vq_quantize_forward", mutates_args=())
def _vq_quantize_forward(x: Tensor, codebook: Tensor, beta: float, codebook_weight: float,
                         dim: int) -> tuple[Tensor, Tensor, Tensor]:
    indices, distances = torch.ops.vlm_kernels.vq_nearest(x, codebook, dim, "l2")
    # The straight-through value x + sg(e - x) of eager code: the code, and NaN where x is NaN or +-inf
    # (x * 0 is NaN exactly there, 0 elsewhere), in the same pass that writes the output.
    quantized = _gather_codes(codebook, indices, x.shape, dim).addcmul_(x, x.new_zeros(()))
    if x.dtype == torch.float64:
        mse = ((x - quantized) ** 2).mean()
    else:
        # The rows' squared distances sum to sum (x - q)^2, and they are exact (float64, rounded to
        # float32): no N x D temporary.
        mse = distances.sum() / x.numel()
    return quantized, indices, (codebook_weight + beta) * mse


@_vq_quantize_forward.register_fake
def _(x, codebook, beta, codebook_weight, dim):
    shape = reference.row_shape(x, dim)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(shape, dtype=torch.int64),
            x.new_empty((), dtype=reference.stats_dtype(x.dtype)))


@torch.library.custom_op("vlm_kernels::vq_quantize_backward", mutates_args=())
def _vq_quantize_backward(grad_quantized: Tensor, grad_loss: Tensor, x: Tensor, codebook: Tensor, indices: Tensor,
                          beta: float, codebook_weight: float, dim: int) -> tuple[Tensor, Tensor]:
    acc = reference.stats_dtype(x.dtype)
    quantized = _gather_codes(codebook, indices, x.shape, dim)
    scale = 2.0 * grad_loss.to(acc) / x.numel()
    # Straight-through: the quantised output's gradient reaches x unchanged; the commitment term pulls
    # x towards its code.
    grad_x = grad_quantized.to(acc) + (beta * scale) * (x.to(acc) - quantized.to(acc))
    if codebook_weight == 0.0:
        grad_codebook = torch.zeros_like(codebook)
    else:
        # d/de_k of sum over k's rows of |e_k - x_r|^2 = 2 (count_k e_k - sum of k's rows): a segmented
        # sum, from the same one-pass statistics kernel the EMA update uses.
        counts, sums = torch.ops.vlm_kernels.vq_code_stats(x, indices, codebook.shape[0], dim)
        grad_codebook = (codebook_weight * scale) * (counts[:, None] * codebook.to(acc) - sums)
        # A code no row picked gets exactly 0 (autograd's index backward), also when it holds NaN/inf.
        grad_codebook = torch.where(counts[:, None] > 0, grad_codebook, 0.0).to(codebook.dtype)
    return grad_x.to(x.dtype), grad_codebook


@_vq_quantize_backward.register_fake
def _(grad_quantized, grad_loss, x, codebook, indices, beta, codebook_weight, dim):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(codebook)


def _quantize_setup_context(ctx, inputs, output):
    x, codebook, beta, codebook_weight, dim = inputs
    _, indices, _ = output
    ctx.beta, ctx.codebook_weight, ctx.dim = beta, codebook_weight, dim
    ctx.save_for_backward(x, codebook, indices)


def _quantize_backward(ctx, grad_quantized, grad_indices, grad_loss):
    x, codebook, indices = ctx.saved_tensors
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(x)
    if grad_loss is None:
        grad_loss = x.new_zeros((), dtype=reference.stats_dtype(x.dtype))
    codebook_weight = ctx.codebook_weight if ctx.needs_input_grad[1] else 0.0
    grad_x, grad_codebook = torch.ops.vlm_kernels.vq_quantize_backward(
        grad_quantized, grad_loss, x, codebook, indices, ctx.beta, codebook_weight, ctx.dim)
    return grad_x, (grad_codebook if ctx.needs_input_grad[1] else None), None, None, None


_vq_quantize_forward.register_autograd(_quantize_backward, setup_context=_quantize_setup_context)


# ----------------------------------------------------------------------------------------------------
# Argument checks.


def _check_pair(op: str, x: object, codebook: object, dim: object) -> int:
    x = check_float_tensor(op, "x", x)
    codebook = check_float_tensor(op, "codebook", codebook)
    dim = normalize_dim(op, "x", x, dim)
    if codebook.dim() != 2:
        raise ValueError(f"{op}: codebook must be 2-D (K, D), got {describe(codebook)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook is empty (K = 0): {describe(codebook)}")
    if codebook.shape[1] != x.shape[dim]:
        raise ValueError(f"{op}: x has D = {x.shape[dim]} along dim={dim} but codebook has D = {codebook.shape[1]} "
                         f"(x: {describe(x)}; codebook: {describe(codebook)})")
    if x.shape[dim] == 0:
        raise ValueError(f"{op}: the vector dimension dim={dim} of x has size 0 ({describe(x)})")
    if x.dtype != codebook.dtype:
        raise TypeError(f"{op}: x and codebook must have the same dtype (x: {describe(x)}; codebook: {describe(codebook)})")
    if x.device != codebook.device:
        raise ValueError(f"{op}: x and codebook must be on the same device (x: {describe(x)}; "
                         f"codebook: {describe(codebook)})")
    return dim


def _check_weight(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------
# Public API.


def vq_nearest(x: Tensor, codebook: Tensor, *, dim: int = -1, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """The nearest code of every row of ``x``.

    Args:
        x: (..., D) with ``dim=-1``, or channel-first (B, D, H, W) with ``dim=1``; float32, float16,
            bfloat16 or float64.
        codebook: (K, D), same dtype and device as ``x``.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (1 - cosine similarity; codes and rows are
            normalised inside).

    Returns:
        ``(indices, distances)``: int64 and float32, of ``x``'s shape without ``dim``. The indices are
        those of a float64 evaluation (lowest index on ties), also for data far from the origin; rows
        holding NaN or infinity get index 0 and distance NaN; non-finite codes are never chosen. Not
        differentiable (use :func:`vq_quantize` for gradients).
    """
    dim = _check_pair("vq_nearest", x, codebook, dim)
    if metric not in METRICS:
        raise ValueError(f"vq_nearest: metric must be one of {METRICS}, got {metric!r}")
    if eager_fast_path(x, codebook):  # the op's own result, without its ~15 us of dispatch
        return _vq_nearest_impl(x, codebook, dim, metric)
    return torch.ops.vlm_kernels.vq_nearest(x, codebook, dim, metric)


def vq_quantize(x: Tensor, codebook: Tensor, *, beta: float = 0.25, dim: int = -1,
                codebook_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Straight-through vector quantisation with the VQ-VAE loss (van den Oord et al. 2017, eq. 3).

    Returns ``(quantized, indices, loss)``: ``quantized`` holds the nearest codebook rows in ``x``'s
    layout and passes its gradient straight through to ``x``; ``loss = codebook_weight * |sg(x) - e|^2 +
    beta * |x - sg(e)|^2`` (means over all elements), a 0-dim float32 tensor (float64 for float64 input).
    The codebook gradient is a segmented sum over the rows assigned to each code. Use
    ``codebook_weight=0`` when the codebook is trained by EMA (:func:`vq_ema_update_`).
    """
    dim = _check_pair("vq_quantize", x, codebook, dim)
    beta = _check_weight("vq_quantize", "beta", beta)
    codebook_weight = _check_weight("vq_quantize", "codebook_weight", codebook_weight)
    return torch.ops.vlm_kernels.vq_quantize_forward(x, codebook, beta, codebook_weight, dim)


def _check_indices(op: str, x: Tensor, indices: object, dim: int) -> Tensor:
    if not isinstance(indices, Tensor) or indices.dtype != torch.int64:
        got = describe(indices) if isinstance(indices, Tensor) else type(indices).__name__
        raise TypeError(f"{op}: indices must be an int64 tensor, got {got}")
    expected = reference.row_shape(x, dim)
    if list(indices.shape) != expected:
        raise ValueError(f"{op}: indices must have x's shape without dim={dim}, {tuple(expected)}, "
                         f"got {describe(indices)} (x: {describe(x)})")
    if indices.device != x.device:
        raise ValueError(f"{op}: indices and x must be on the same device (indices: {describe(indices)}; x: {describe(x)})")
    return indices


def vq_code_stats(x: Tensor, indices: Tensor, num_codes: int, *, dim: int = -1,
                  validate: bool = True) -> tuple[Tensor, Tensor]:
    """Per-code statistics in one pass: ``counts`` (K,) and ``sums`` (K, D) of the rows of ``x``.

    ``indices`` (x's shape without ``dim``, int64) assigns each row to a code in ``[0, num_codes)``.
    With ``validate`` (the default) out-of-range indices raise, at the cost of one host
    synchronisation; pass ``validate=False`` for indices that come from :func:`vq_nearest` (as the EMA
    update does) to keep a compiled training step free of synchronisation.
    """
    x = check_float_tensor("vq_code_stats", "x", x)
    dim = normalize_dim("vq_code_stats", "x", x, dim)
    indices = _check_indices("vq_code_stats", x, indices, dim)
    if isinstance(num_codes, bool) or not isinstance(num_codes, numbers.Integral) or num_codes <= 0:
        raise ValueError(f"vq_code_stats: num_codes must be a positive int, got {num_codes!r}")
    validate = check_bool("vq_code_stats", "validate", validate)
    if validate and indices.numel() and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"vq_code_stats: indices must lie in [0, {num_codes}), got values in [{lo}, {hi}]")
    if eager_fast_path(x, indices):
        return _vq_code_stats_impl(x, indices, int(num_codes), dim)
    return torch.ops.vlm_kernels.vq_code_stats(x, indices, int(num_codes), dim)


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code-usage distribution ``counts / counts.sum()`` (0 log 0 = 0): (K,) counts,
    real (integer counts are taken as float32)."""
    if not isinstance(counts, Tensor) or counts.dtype == torch.bool or counts.is_complex():
        got = describe(counts) if isinstance(counts, Tensor) else type(counts).__name__
        raise TypeError(f"perplexity: counts must be a real (K,) tensor, got {got}")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"perplexity: counts must be a non-empty (K,) tensor, got {describe(counts)}")
    if not counts.is_floating_point():
        counts = counts.float()
    p = counts / counts.sum().clamp_min(torch.finfo(counts.dtype).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def _all_reduce_(t: Tensor, group) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _broadcast_(t: Tensor, group) -> Tensor:
    import torch.distributed as dist

    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(t, src=src, group=group)
    return t


def _check_ema_state(codebook: object, cluster_size: object, embed_avg: object, x: object, indices: object,
                     dim: object) -> None:
    op = "vq_ema_update_"
    codebook = check_float_tensor(op, "codebook", codebook)
    if codebook.dim() != 2 or codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook must be a non-empty (K, D) tensor, got {describe(codebook)}")
    k, d = codebook.shape
    for name, t, shape in (("cluster_size", cluster_size, (k,)), ("embed_avg", embed_avg, (k, d))):
        t = check_float_tensor(op, name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} for the (K, D) = {(k, d)} codebook, got {describe(t)}")
        if t.device != codebook.device:
            raise ValueError(f"{op}: {name} must be on codebook's device {codebook.device}, got {describe(t)}")
    x = check_float_tensor(op, "x", x)
    dim = normalize_dim(op, "x", x, dim)
    if x.shape[dim] != d or x.device != codebook.device:
        raise ValueError(f"{op}: x must have D = {d} along dim={dim} and codebook's device {codebook.device} "
                         f"(x: {describe(x)}; codebook: {describe(codebook)})")
    _check_indices(op, x, indices, dim)


@torch.no_grad()
def vq_ema_update_(codebook: Tensor, cluster_size: Tensor, embed_avg: Tensor, x: Tensor, indices: Tensor, *,
                   decay: float, eps: float = 1e-5, dim: int = -1, threshold_dead: float = 0.0,
                   sync: bool = False, group=None, normalize: bool = False) -> dict[str, Tensor]:
    """One EMA codebook step (van den Oord et al. 2017, appendix A.1), in place, with no host sync.

    ``cluster_size`` (K,) and ``embed_avg`` (K, D) are the running per-code counts and sums; with this
    batch's ``counts, sums = vq_code_stats(x, indices)`` (summed over ranks when ``sync``):
    ``cluster_size <- decay * cluster_size + (1 - decay) * counts``, the same for ``embed_avg``; the
    counts are Laplace-smoothed, ``(c + eps) / (n + K eps) * n``, and ``codebook <- embed_avg / smoothed``
    (re-normalised when ``normalize``, for cosine codebooks). Codes whose running count falls below
    ``threshold_dead`` are re-initialised from random rows of the batch (rank 0's rows when ``sync``, so
    every rank holds the same codebook) with their running count reset to ``threshold_dead``.

    Returns ``{"counts", "perplexity", "dead"}``: this batch's (synced) counts, the perplexity of the
    code usage and the number of codes re-initialised, all tensors.
    """
    _check_ema_state(codebook, cluster_size, embed_avg, x, indices, dim)
    decay = check_real("vq_ema_update_", "decay", decay, low=0.0, high=1.0)
    eps = check_real("vq_ema_update_", "eps", eps, low=0.0, low_open=True)
    threshold_dead = check_real("vq_ema_update_", "threshold_dead", threshold_dead, low=0.0)
    sync = check_bool("vq_ema_update_", "sync", sync)
    normalize = check_bool("vq_ema_update_", "normalize", normalize)
    num_codes = codebook.shape[0]
    counts, sums = vq_code_stats(x, indices, num_codes, dim=dim, validate=False)
    if sync:
        # One all-reduce for both statistics.
        packed = _all_reduce_(torch.cat([counts[:, None], sums], dim=1), group)
        counts, sums = packed[:, 0], packed[:, 1:]
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    updated = embed_avg / smoothed[:, None]
    if normalize:
        updated = torch.nn.functional.normalize(updated, dim=1)
    codebook.copy_(updated.to(codebook.dtype))
    dead = torch.zeros((), dtype=torch.int64, device=codebook.device)
    if threshold_dead > 0:
        rows = reference.as_rows(x, dim)
        pick = torch.randint(0, rows.shape[0], (num_codes,), device=rows.device)
        samples = rows[pick].to(codebook.dtype)
        if normalize:
            samples = torch.nn.functional.normalize(samples, dim=1)
        if sync:
            samples = _broadcast_(samples.contiguous(), group)
        is_dead = cluster_size < threshold_dead
        codebook.copy_(torch.where(is_dead[:, None], samples, codebook))
        cluster_size.copy_(torch.where(is_dead, torch.full_like(cluster_size, threshold_dead), cluster_size))
        embed_avg.copy_(torch.where(is_dead[:, None], samples.to(embed_avg.dtype) * threshold_dead, embed_avg))
        dead = is_dead.sum()
    return {"counts": counts, "perplexity": perplexity(counts), "dead": dead}


__all__ = ["vq_nearest", "vq_quantize", "vq_code_stats", "vq_ema_update_", "perplexity", "TABLE"]
