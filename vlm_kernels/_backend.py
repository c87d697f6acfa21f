"""Which backends exist here, how one is chosen for a call, and how to force one.

Backends: ``reference`` (pure PyTorch), ``cpu`` (C++ in ``vlm_kernels._C``), ``triton``, ``cuda``
(CUDA C++ in ``vlm_kernels._C``). Nothing here raises at import: what is missing is recorded and
reported when someone asks for it (``python -m vlm_kernels info``).

Choice per call: a forced backend (``with use_backend("triton"):`` or ``VLM_KERNELS_BACKEND``) wins
and raises :class:`BackendUnavailableError` with the reason when it cannot run the call; otherwise
the first backend of the device's order that can run it, with one warning per process when the
preferred one had to be skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Preferred order per tensor device type. CUDA tensors: the CUDA C++ kernels first, Triton next
# (ops may override this per their benchmarks). CPU tensors: C++, then reference. Triton runs on CPU
# tensors only through its interpreter, which is for tests, so it is never chosen automatically there.
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run this call here."""


_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vlm_kernels_backend", default=None)
_warned: set[tuple[str, str]] = set()
_warn_lock = threading.Lock()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every vlm_kernels op called inside the block to use backend ``name`` (None: automatic).

    The choice is a ContextVar: it holds for the calling thread (and asyncio task) only; threads started
    inside the block do not inherit it (before Python 3.14's thread_inherit_context), and
    ``VLM_KERNELS_BACKEND`` is the process-wide default outside any block.
    """
    value = None if name is None else _check_name(name)
    previous = _forced.get()
    try:  # the set inside the try: a KeyboardInterrupt right after it still restores the previous choice
        _forced.set(value)
        yield
    finally:
        _forced.set(previous)


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` or, outside any such block, by ``VLM_KERNELS_BACKEND``."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("VLM_KERNELS_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env)


# ----------------------------------------------------------------------------------------------------
# What exists on this machine (computed lazily, once).


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    # A request the user made explicitly cannot be honoured (VLM_KERNELS_CPU_ISA above what the CPU
    # runs): calls raise instead of falling back to the next backend.
    refuse: bool = False


_cache: dict[str, Availability] = {}


def _load_ext() -> Availability:
    try:
        ext = importlib.import_module("vlm_kernels._C")
    except ImportError as exc:  # not built (VLM_KERNELS_NO_EXT=1, no compiler) or built against another torch
        return Availability(False, f"the compiled extension vlm_kernels._C is not importable ({exc}); "
                                   "reinstall with `pip install --no-build-isolation -e .`")
    return Availability(True, "cuda" if getattr(ext, "with_cuda", False) else "")


def cpu_isa() -> dict:
    """The CPU kernels' instruction-set levels: {"selected", "detected", "compiled", "error"} (see
    csrc/cpu/isa.h; VLM_KERNELS_CPU_ISA=baseline|avx2|avx512 forces a lower level). {} without the
    compiled extension."""
    if not _load_ext().ok:
        return {}
    try:
        report = torch.ops.vlm_kernels_C.cpu_isa()
    except (AttributeError, RuntimeError):  # an extension built before the levels existed
        return {}
    fields = dict(item.split("=", 1) for item in report.split(" error=")[0].split())
    fields["error"] = report.split(" error=", 1)[1] if " error=" in report else ""
    return fields


def _cpu_isa_availability() -> Availability:
    err = cpu_isa().get("error", "")
    return Availability(False, err, refuse=True) if err else Availability(True)


def _triton_available() -> Availability:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return Availability(False, f"triton is not importable ({exc.__class__.__name__}: {exc})")
    return Availability(True)


def availability(name: str) -> Availability:
    """Whether backend ``name`` exists in this process at all (independently of any tensor)."""
    _check_name(name)
    if name not in _cache:
        if name == "reference":
            _cache[name] = Availability(True)
        elif name == "cpu":
            ext = _load_ext()
            _cache[name] = _cpu_isa_availability() if ext.ok else Availability(False, ext.reason)
        elif name == "cuda":
            ext = _load_ext()
            if not ext.ok:
                _cache[name] = ext
            elif ext.reason != "cuda":
                _cache[name] = Availability(False, "vlm_kernels._C was built without the CUDA sources "
                                                   "(no CUDA toolkit at build time, or VLM_KERNELS_CUDA=0)")
            else:
                _cache[name] = Availability(True)
        else:
            _cache[name] = _triton_available()
    return _cache[name]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_compile_only = False


def set_triton_compile_only(on: bool) -> None:
    """Compile-only mode (``python -m benchmarks.compile_report``): the triton backend accepts CPU tensors,
    its launchers size their launches for a GPU (see ``vlm_kernels.triton._target``), and every launch
    is turned into an sm_90 compile by the report; nothing runs. Not for use outside that report."""
    global _triton_compile_only
    _triton_compile_only = bool(on)


def triton_compile_only() -> bool:
    return _triton_compile_only


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_reason() -> str:
    """Triton < 3.7's interpreter turns one-element arrays into Python ints with ``int(array)``, an error
    since numpy 2.4: every kernel with a runtime loop bound then fails. '' when the pair works."""
    import numpy
    import triton
    from torch.torch_version import TorchVersion  # PEP 440 comparison against tuples

    if TorchVersion(triton.__version__) < (3, 7) and TorchVersion(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (it needs "
                "numpy < 2.4; fixed in Triton 3.7): pip install 'numpy<2.4' to run triton on CPU tensors")
    return ""


def device_reason(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot run on tensors of ``device`` ('' when it can)."""
    avail = availability(name)
    if not avail.ok:
        return avail.reason
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        if torch.version.hip is not None:
            return "the cuda backend is not built for ROCm"
    if name == "triton":
        if device.type == "cpu" and not (triton_interpreted() or triton_compile_only()):
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
        if device.type == "cpu" and triton_interpreted() and _interpreter_numpy_reason():
            return _interpreter_numpy_reason()
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
    return ""


# ----------------------------------------------------------------------------------------------------
# Per-op tables.


@dataclass
class Impl:
    """One backend's implementation of an op, with a predicate that says why it cannot run a call."""

    fn: Callable
    why_not: Callable[..., str] = lambda *args, **kwargs: ""


class OpTable:
    """The backend implementations of one op family, and the choice among them for a call."""

    def __init__(self, op_name: str, order: Optional[dict[str, tuple[str, ...]]] = None):
        self.op_name = op_name
        self.order = dict(DEFAULT_ORDER, **(order or {}))
        self.impls: dict[str, dict[str, Impl]] = {}

    def register(self, backend: str, entry: str, fn: Callable, why_not: Optional[Callable[..., str]] = None) -> None:
        _check_name(backend)
        self.impls.setdefault(entry, {})[backend] = Impl(fn, why_not or (lambda *a, **k: ""))

    def reason(self, backend: str, entry: str, device: torch.device, *args, **kwargs) -> str:
        impl = self.impls.get(entry, {}).get(backend)
        if impl is None:
            return f"{self.op_name}: no {backend} implementation of {entry}"
        reason = device_reason(backend, device)
        if reason:
            return reason
        return impl.why_not(*args, **kwargs)

    def select(self, entry: str, device: torch.device, *args, **kwargs) -> tuple[str, Callable]:
        """The backend name and function to run ``entry`` for tensors on ``device``."""
        forced = forced_backend()
        if forced is not None:
            reason = self.reason(forced, entry, device, *args, **kwargs)
            if reason:
                raise BackendUnavailableError(f"{self.op_name}: backend {forced!r} was requested but cannot run: {reason}")
            return forced, self.impls[entry][forced].fn
        order = self.order.get(device.type, ("reference",))
        skipped = []
        for name in order:
            reason = self.reason(name, entry, device, *args, **kwargs)
            if reason and availability(name).refuse and name in self.impls.get(entry, {}):
                raise BackendUnavailableError(f"{self.op_name}: {reason}")
            if not reason:
                if skipped:
                    _warn_once(self.op_name, name, skipped)
                return name, self.impls[entry][name].fn
            if name in self.impls.get(entry, {}):  # a backend that never implemented it is no fallback
                skipped.append((name, reason))
        if not skipped:
            skipped = [(name, self.reason(name, entry, device, *args, **kwargs)) for name in order]
        raise BackendUnavailableError(
            f"{self.op_name}: no backend can run on {device.type} tensors here: "
            + "; ".join(f"{n}: {r}" for n, r in skipped)
        )

    def backends_for(self, device: torch.device) -> list[tuple[str, str]]:
        """(backend, reason-or-'') for every backend of the first entry on ``device`` (for `info`)."""
        entry = next(iter(self.impls))
        return [(name, self.reason(name, entry, device) if name in self.impls[entry] else "not implemented")
                for name in BACKENDS]


def _warn_once(op_name: str, chosen: str, skipped: list[tuple[str, str]]) -> None:
    key = (op_name, chosen)
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    why = "; ".join(f"{n}: {r}" for n, r in skipped)
    warnings.warn(f"vlm_kernels.{op_name}: falling back to the {chosen} backend ({why})", RuntimeWarning, stacklevel=4)


def info_table() -> str:
    """A table of every backend: available in this process or not, and why."""
    lines = [f"torch {torch.__version__} (cuda {torch.version.cuda}), "
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}{' (interpreter)' if triton_interpreted() else ''}")
    except Exception:  # noqa: BLE001
        lines.append("triton: not importable")
    forced = os.environ.get("VLM_KERNELS_BACKEND")
    lines.append(f"VLM_KERNELS_BACKEND={forced!r}" if forced else "backend choice: automatic")
    isa = cpu_isa()
    if isa:
        lines.append(f"CPU kernels: {isa['selected']} level in use (this CPU runs up to {isa['detected']}; "
                     f"compiled: {isa['compiled']}; VLM_KERNELS_CPU_ISA forces a lower one)"
                     + (f"; ERROR: {isa['error']}" if isa["error"] else ""))
    lines.append("")
    lines.append(f"{'backend':<10} {'here':<5} {'CPU tensors':<12} {'CUDA tensors':<12} why not")
    for name in BACKENDS:
        avail = availability(name)
        cpu_reason = device_reason(name, torch.device("cpu"))
        cuda_reason = device_reason(name, torch.device("cuda")) if torch.cuda.is_available() else "no CUDA device"
        why = avail.reason or "; ".join(f"{dev}: {r}" for dev, r in (("CPU", cpu_reason), ("CUDA", cuda_reason)) if r)
        lines.append(f"{name:<10} {'yes' if avail.ok else 'no':<5} {'yes' if not cpu_reason else 'no':<12} "
                     f"{'yes' if not cuda_reason else 'no':<12} {why}")
    return "\n".join(lines)
