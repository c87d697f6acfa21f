"""Fused Gumbel-softmax sampling (DALL-E dVAE): argument checks, torch.library ops, autograd, backends.

Public functions:

* :func:`gumbel_softmax` - ``F.gumbel_softmax`` semantics, one pass over the logits, any ``dim``.
* :func:`gumbel_argmax` - Gumbel-max token sampling (int64 indices), one read of the logits.
* :func:`categorical_kl_uniform` - KL(softmax(logits) || uniform) per row, with its gradient.

Noise: element ``i`` (linear index in the contiguous logits) takes word ``i % 4`` of the Philox4x32-10 call
at counter ``i // 4`` under ``seed`` (``tl.randint4x``'s words, ``tl.rand``'s uniform); the same seed gives
the same noise on every backend (``csrc/common/philox.h``). Backward never stores noise: soft samples keep
the output, hard samples regenerate the soft sample from the logits and the seed.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .. import _backend
from .._backend import BackendUnavailableError, OpTable
from ..reference import gumbel as reference
from ._common import (
    check_float_tensor,
    check_nonempty_dim,
    check_positive_finite,
    describe,
    compiled_kernel,
    contiguous,
    eager_fast_path,
    first_tensor_reason,
    gpu_dtype_reason,
    normalize_dim,
    seed_tensor,
    triton_kernel,
)

# ----------------------------------------------------------------------------------------------------
# Which compiled GPU backend runs first on CUDA tensors, per entry and layout. Decided offline (no GPU yet)
# from the sm_90 compile of both at the benchmark shapes, fp32 (see the module notes below); flip an entry
# when benchmarks/gpu_check.sh (bench_gumbel times the triton and cuda backends side by side) measures the
# other faster. A forced backend (use_backend / VLM_KERNELS_BACKEND) ignores this table.
#
# Layouts: "rows" (dim is the last dim) or "columns" (dim=1 of NCHW and any dim with inner > 1), "long"
# when K is past the forward's one-read limit, the same in both backends (rows: K > 32768; columns:
# K > 8192), where both read the logits twice and make the noise twice.
#
# Offline evidence (SASS instructions per element, Triton 3.8 and nvcc 13.0 for sm_90; registers, no
# spills in either):
#   softmax_forward rows (65536, 8192): triton 55 (8 warps, 32 elements/thread), cuda ~61 + reductions
#     (256 threads, 8 quads/thread); one read each.
#   softmax_forward columns (64, 8192, 32, 32): triton 57 (16 warps, a 4-column x 8192 strip in
#     registers), cuda ~64 + reductions (512 threads, 16 quads/thread); one read each.
#   argmax / hard: triton ~51-54 + 6 for the one-hot write; cuda ~57 + the write; one read each.
#   softmax_backward: no noise for soft samples (memory-bound): triton keeps dy and y of a [8192, 2]
#     column strip in registers (12 B/element); cuda keeps y and re-reads dy from L2 for K <= 4096 only,
#     two passes (20 B/element) above.
# Both backends give the same bits (noise, argmax, hard samples), so this choice never changes a sample.
CUDA_FIRST: dict[str, dict[str, str]] = {
    "softmax_forward": {"rows": "triton", "rows long": "triton", "columns": "triton", "columns long": "triton"},
    "softmax_backward": {"rows": "triton", "rows long": "triton", "columns": "triton", "columns long": "triton"},
    "argmax": {"rows": "triton", "rows long": "triton", "columns": "triton", "columns long": "triton"},
}
_ONE_READ_K = {"rows": 32768, "columns": 8192}  # the forward's one-read limit in both backends


def _tensor_and_dim(entry: str, args: tuple) -> tuple[Tensor, int]:
    """The reduced tensor and dim of an entry's arguments (see _FN_NAMES for the argument lists)."""
    if entry == "softmax_backward":  # (grad, saved, seed, tau, hard, dim)
        return args[1], args[-1]
    return args[0], args[-1]  # (logits, seed, tau, hard, dim) / (logits, seed, dim)


def cuda_layout(x: Tensor, dim: int) -> str:
    """The layout key of CUDA_FIRST for a reduction of ``x`` along ``dim``."""
    inner = 1
    for s in x.shape[dim + 1:]:
        inner *= int(s)
    kind = "rows" if inner == 1 else "columns"
    return kind + (" long" if x.shape[dim] > _ONE_READ_K[kind] else "")


class _GumbelTable(OpTable):
    """OpTable whose automatic order on CUDA tensors starts with CUDA_FIRST's backend for the call's layout."""

    def cuda_order(self, entry: str, *args) -> tuple[str, ...]:
        default = self.order.get("cuda", ())
        first = CUDA_FIRST.get(entry, {}).get(cuda_layout(*_tensor_and_dim(entry, args)))
        if first is None:
            return default
        return (first,) + tuple(name for name in default if name != first)

    def select(self, entry: str, device: torch.device, *args, **kwargs):
        if device.type != "cuda" or _backend.forced_backend() is not None or entry not in CUDA_FIRST:
            return super().select(entry, device, *args, **kwargs)
        skipped = []
        for name in self.cuda_order(entry, *args):
            if name not in self.impls.get(entry, {}):
                continue
            reason = self.reason(name, entry, device, *args, **kwargs)
            if not reason:
                if skipped:
                    _backend._warn_once(self.op_name, name, skipped)
                return name, self.impls[entry][name].fn
            skipped.append((name, reason))
        raise BackendUnavailableError(f"{self.op_name}: no backend can run on cuda tensors here: "
                                      + "; ".join(f"{n}: {r}" for n, r in skipped))


TABLE = _GumbelTable("gumbel")


_FN_NAMES = {
    "softmax_forward": "gumbel_softmax_forward",
    "softmax_backward": "gumbel_softmax_backward",
    "argmax": "gumbel_argmax",
    "kl_forward": "categorical_kl_uniform_forward",
    "kl_backward": "categorical_kl_uniform_backward",
}

for _entry, _fn in _FN_NAMES.items():
    TABLE.register("reference", _entry, getattr(reference, _fn))
    TABLE.register("cpu", _entry, compiled_kernel(f"{_fn}_cpu"))
    TABLE.register("cuda", _entry, compiled_kernel(f"{_fn}_cuda"), first_tensor_reason(gpu_dtype_reason))
    TABLE.register("triton", _entry, triton_kernel("gumbel", _fn), first_tensor_reason(gpu_dtype_reason))


def _run(entry: str, *args):
    tensors = [a for a in args if isinstance(a, Tensor)]
    _, fn = TABLE.select(entry, tensors[0].device, *args)
    return fn(*args)


# ----------------------------------------------------------------------------------------------------
# torch.library ops. `seed` is a 0-dim int64 CPU tensor so that seed=None can be drawn from torch's
# generator inside a compiled graph without a graph break.


@torch.library.custom_op("vlm_kernels::gumbel_softmax_forward", mutates_args=())
def _gumbel_softmax_forward(logits: Tensor, seed: Tensor, tau: float, hard: bool, dim: int) -> Tensor:
    return _run("softmax_forward", contiguous(logits), int(seed.item()), tau, hard, dim)


@_gumbel_softmax_forward.register_fake
def _(logits, seed, tau, hard, dim):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("vlm_kernels::gumbel_softmax_backward", mutates_args=())
def _gumbel_softmax_backward(grad: Tensor, saved: Tensor, seed: Tensor, tau: float, hard: bool, dim: int) -> Tensor:
    return _run("softmax_backward", contiguous(grad).to(saved.dtype), contiguous(saved), int(seed.item()), tau, hard, dim)


@_gumbel_softmax_backward.register_fake
def _(grad, saved, seed, tau, hard, dim):
    return torch.empty_like(saved, memory_format=torch.contiguous_format)


def _gumbel_setup_context(ctx, inputs, output):
    logits, seed, tau, hard, dim = inputs
    ctx.tau, ctx.hard, ctx.dim = tau, hard, dim
    # Soft: the sample is all the backward needs. Hard: the logits, to regenerate the soft sample.
    ctx.save_for_backward(logits if hard else output, seed)


def _gumbel_backward(ctx, grad):
    saved, seed = ctx.saved_tensors
    grad_logits = torch.ops.vlm_kernels.gumbel_softmax_backward(grad, saved, seed, ctx.tau, ctx.hard, ctx.dim)
    return grad_logits, None, None, None, None


_gumbel_softmax_forward.register_autograd(_gumbel_backward, setup_context=_gumbel_setup_context)


@torch.library.custom_op("vlm_kernels::gumbel_argmax", mutates_args=())
def _gumbel_argmax(logits: Tensor, seed: Tensor, dim: int) -> Tensor:
    return _run("argmax", contiguous(logits), int(seed.item()), dim)


@_gumbel_argmax.register_fake
def _(logits, seed, dim):
    shape = list(logits.shape)
    del shape[dim]
    return logits.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("vlm_kernels::categorical_kl_uniform_forward", mutates_args=())
def _kl_forward(logits: Tensor, dim: int) -> Tensor:
    return _run("kl_forward", contiguous(logits), dim)


@_kl_forward.register_fake
def _(logits, dim):
    shape = list(logits.shape)
    del shape[dim]
    return logits.new_empty(shape)


@torch.library.custom_op("vlm_kernels::categorical_kl_uniform_backward", mutates_args=())
def _kl_backward(grad: Tensor, logits: Tensor, dim: int) -> Tensor:
    return _run("kl_backward", contiguous(grad).to(logits.dtype), contiguous(logits), dim)


@_kl_backward.register_fake
def _(grad, logits, dim):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _kl_setup_context(ctx, inputs, output):
    logits, dim = inputs
    ctx.dim = dim
    ctx.save_for_backward(logits)


def _kl_backward_formula(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.vlm_kernels.categorical_kl_uniform_backward(grad, logits, ctx.dim), None


_kl_forward.register_autograd(_kl_backward_formula, setup_context=_kl_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public API.

SeedLike = Union[None, int, Tensor]


def _check_logits(op: str, logits: object, dim: object) -> int:
    logits = check_float_tensor(op, "logits", logits)
    dim = normalize_dim(op, "logits", logits, dim)
    check_nonempty_dim(op, "logits", logits, dim)
    return dim


def _check_bool(op: str, name: str, value: object) -> bool:
    """``value`` as a Python bool; a bool (or numpy bool) only: a string or tensor is a TypeError naming it."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    got = describe(value) if isinstance(value, Tensor) else f"{type(value).__name__} {value!r}"
    raise TypeError(f"{op}: {name} must be a bool, got {got}")


def gumbel_softmax(logits: Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1, *,
                   seed: SeedLike = None) -> Tensor:
    """Sample from the Gumbel-softmax distribution (``torch.nn.functional.gumbel_softmax`` semantics).

    Args:
        logits: (..., K, ...) unnormalised log-probabilities, float32/float16/bfloat16/float64.
        tau: temperature > 0.
        hard: return exact one-hot samples whose gradient is that of the soft sample (straight-through).
        dim: the category dimension, e.g. ``dim=1`` for NCHW logits (no transposed copy is made).
        seed: Philox seed (int or one-element CPU integer tensor); ``None`` draws one from torch's
            default generator, so ``torch.manual_seed`` makes the call reproducible.

    Returns:
        A tensor of ``logits``' shape and dtype whose slices along ``dim`` sum to 1.
    """
    dim = _check_logits("gumbel_softmax", logits, dim)
    tau = check_positive_finite("gumbel_softmax", "tau", tau)
    seed = seed_tensor("gumbel_softmax", seed)
    hard = _check_bool("gumbel_softmax", "hard", hard)
    if eager_fast_path(logits):  # the op's own result, without its ~15 us of dispatch
        return _run("softmax_forward", contiguous(logits), int(seed.item()), tau, bool(hard), dim)
    return torch.ops.vlm_kernels.gumbel_softmax_forward(logits, seed, tau, bool(hard), dim)


def gumbel_argmax(logits: Tensor, dim: int = -1, *, seed: SeedLike = None) -> Tensor:
    """Gumbel-max sampling: int64 indices of ``argmax(logits + Gumbel noise)`` along ``dim``.

    Distributed as ``torch.multinomial(softmax(logits))``; identical, for the same seed, to the index
    of the one-hot ``gumbel_softmax(logits, hard=True, dim=dim, seed=seed)``. A row holding NaN yields
    the index of its first NaN (torch.argmax's convention).
    """
    dim = _check_logits("gumbel_argmax", logits, dim)
    seed = seed_tensor("gumbel_argmax", seed)
    if eager_fast_path(logits):
        return _run("argmax", contiguous(logits), int(seed.item()), dim)
    return torch.ops.vlm_kernels.gumbel_argmax(logits, seed, dim)


def categorical_kl_uniform(logits: Tensor, dim: int = -1) -> Tensor:
    """KL(softmax(logits) || uniform over K) for every slice along ``dim`` (the dVAE's KL term).

    Returns a tensor of ``logits``' shape without ``dim``, in ``logits``' dtype (fp32 math inside).
    Differentiable.
    """
    dim = _check_logits("categorical_kl_uniform", logits, dim)
    if eager_fast_path(logits):
        return _run("kl_forward", contiguous(logits), dim)
    return torch.ops.vlm_kernels.categorical_kl_uniform_forward(logits, dim)


__all__ = ["gumbel_softmax", "gumbel_argmax", "categorical_kl_uniform", "TABLE"]
