"""Argument checks and small helpers shared by the op files (one place, the same messages everywhere)."""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {describe(t)}")
    return t


def normalize_dim(op: str, name: str, t: torch.Tensor, dim: object) -> int:
    """``dim`` as a non-negative index into ``t``'s dimensions, with a clear error when out of range."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    ndim = t.dim()
    if ndim == 0:
        raise ValueError(f"{op}: {name} must have at least one dimension, got a 0-dim tensor ({describe(t)})")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim={dim} is out of range for {name} with {ndim} dimensions ({describe(t)})")
    return int(dim) % ndim


def check_nonempty_dim(op: str, name: str, t: torch.Tensor, dim: int) -> None:
    if t.shape[dim] == 0:
        raise ValueError(f"{op}: the softmax dimension dim={dim} of {name} has size 0 ({describe(t)})")


def check_positive_finite(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def seed_tensor(op: str, seed: Union[None, int, torch.Tensor]) -> torch.Tensor:
    """The Philox seed as a 0-dim int64 CPU tensor.

    ``None`` draws it from torch's default CPU generator (so ``torch.manual_seed`` makes runs
    reproducible, also under torch.compile); an int in [-2**63, 2**64) is taken bit for bit.
    """
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"{op}: seed must be an int or a one-element integer tensor, got {describe(seed)}")
        if seed.device.type != "cpu":
            raise ValueError(f"{op}: a seed tensor must live on the CPU (it is read on the host), got {describe(seed)}")
        return seed.reshape(()).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{op}: seed must be None, an int or a one-element integer tensor, got {seed!r}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{op}: seed must fit in 64 bits, got {seed}")
    if seed >= 2**63:
        seed -= 2**64
    return torch.tensor(seed, dtype=torch.int64)


def gpu_dtype_reason(t: torch.Tensor) -> str:
    if t.dtype not in GPU_DTYPES:
        return f"the GPU kernels take float32, float16 or bfloat16, got {t.dtype} (the reference and cpu backends take float64)"
    return ""


def contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def first_tensor_reason(reason_fn):
    """Adapt a ``reason(tensor)`` predicate to a backend entry's argument list (first tensor argument)."""

    def why_not(*args, **kwargs) -> str:
        for a in args:
            if isinstance(a, torch.Tensor):
                return reason_fn(a)
        return ""

    return why_not



def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` may skip the torch.library dispatch and run the backend directly.

    The custom op costs ~15-20 us of Python per call (dispatcher, autograd key, redispatch), which is
    most of a small op's time on a GPU. It is needed for autograd, torch.compile, fake/meta tensors,
    dispatch and function modes, functorch transforms and tensor subclasses; a plain eager call with
    nothing to differentiate gets the same result from the backend itself."""
    try:
        if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
            return False
        if _dispatch_mode() is not None or torch._C._are_functorch_transforms_active():
            return False
        grad = torch.is_grad_enabled()
        for t in tensors:
            if type(t) is not torch.Tensor or (grad and t.requires_grad) or _functorch_wrapped(t):
                return False
        return True
    except (AttributeError, RuntimeError):  # a torch without one of these hooks: take the op's path
        return False


def _dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


def _functorch_wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def compiled_kernel(name: str):
    """A backend entry that calls ``torch.ops.vlm_kernels_C.<name>`` (resolved at call time, so a missing
    extension is reported by the backend table, not at import)."""

    def call(*args):
        return getattr(torch.ops.vlm_kernels_C, name)(*args)

    return call


def triton_kernel(module: str, name: str):
    """A backend entry that calls ``vlm_kernels.triton.<module>.<name>``: Triton is imported only when
    this backend runs, and kernels launch on the device of the first tensor argument."""
    found: list = []  # the launcher, once imported (a per-call import costs host time on small ops)

    def call(*args):
        if not found:
            import importlib

            found.append(getattr(importlib.import_module(f"vlm_kernels.triton.{module}"), name))
        launcher = found[0]
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
            return launcher(*args)
        with torch.cuda.device(device):  # Triton launches on the current device
            return launcher(*args)

    return call
