"""Argument checks and small helpers shared by the op files (one place, the same messages everywhere)."""

from __future__ import annotations

import math
import numbers
import threading
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


def check_int(op: str, name: str, value: object, minimum: int = 1) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_bool(op: str, name: str, value: object) -> bool:
    """A bool (Python's or numpy's): a string or tensor here is almost always a misplaced argument."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    return bool(value)


def check_real(op: str, name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval given by ``low``/``high`` (closed unless ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        bounds = []
        if low != -math.inf:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high != math.inf:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        raise ValueError(f"{op}: {name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, "
                         f"got {value}")
    return value


def check_probability(op: str, name: str, value: object) -> float:
    """A dropout-style probability in [0, 1]."""
    return check_real(op, name, value, low=0.0, high=1.0)


def check_factory_dtype(op: str, dtype: object) -> None:
    """The ``dtype`` factory argument of a layer: None or a floating-point torch.dtype."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{op}: dtype must be None or a floating-point torch.dtype, got {dtype!r}")


def check_module_class(op: str, name: str, value: object) -> None:
    """A layer factory such as ``act_layer=nn.GELU``: a class or callable that builds a module, not a module."""
    if isinstance(value, torch.nn.Module) or not callable(value):
        raise TypeError(f"{op}: {name} must be a class (or callable) that builds an nn.Module, e.g. nn.GELU, "
                        f"got {value!r}")


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
    nothing to differentiate gets the same result from the backend itself. The fast path still chooses
    the backend through the op's table (``OpTable.select``), so ``use_backend`` (per thread) and
    ``VLM_KERNELS_BACKEND`` hold for it exactly as for the op."""
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


# Triton's interpreter (CPU tensors under TRITON_INTERPRET=1) patches triton.language module-wide while
# a kernel runs and restores it afterwards, so two interpreted launches from different threads break
# each other ("Did you forget to add @triton.jit?"). Interpreted launches therefore take turns; GPU
# launches do not need (or take) the lock.
_INTERPRETER_LOCK = threading.RLock()


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
        if device.type != "cuda":
            with _INTERPRETER_LOCK:
                return launcher(*args)
        if device.index is None or device.index == torch.cuda.current_device():
            return launcher(*args)
        with torch.cuda.device(device):  # Triton launches on the current device
            return launcher(*args)

    return call
