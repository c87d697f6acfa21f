"""Timing and peak-memory measurement shared by every benchmark (the runner and the pytest suites).

CPU: wall-clock median over repeats after warm-up. The implementations of a case are timed in rounds
(each once per round, the order rotated), so that a slow spell of a shared machine falls on all of them
alike instead of on whichever ran during it. Timing runs under glibc's steady-state allocator (big
buffers recycled from the heap, as in a training loop); peak memory comes from a separate call per
implementation with every buffer above 128 KiB its own mapping, as the rise of the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident size before the call.
CUDA: CUDA events around each call, median; peak memory from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Measurement:
    time_s: float
    peak_bytes: Optional[int]
    times_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"{key}:\s+(\d+) kB", fh.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_cpu_peak() -> Optional[int]:
    """Reset the resident high-water mark; returns the resident size now (None if unsupported)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):  # not glibc
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextlib.contextmanager
def _every_buffer_mapped():
    """glibc: every allocation above 128 KiB gets its own mapping (and is unmapped when freed), so the
    resident high-water mark sees each buffer; afterwards thresholds like glibc's warmed-up dynamic ones
    (32 MiB mmap, 64 MiB trim), so timed calls recycle big buffers from the heap as a training loop does."""
    _mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    _mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        _mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _peak_call(fn: Callable[[], object]) -> Optional[int]:
    """Peak extra resident memory of one call of ``fn`` (its outputs included)."""
    with _every_buffer_mapped():
        gc.collect()  # garbage freed after the trim would refill the heap with resident pages
        _malloc_trim()  # free heap pages are given back: reusing one shows as a resident rise again
        base = _reset_cpu_peak()
        out = fn()
        hwm = _proc_status("VmHWM")
        del out
    return max(0, hwm - base) if hwm is not None and base is not None else None


def _without_frames(exc: BaseException) -> BaseException:
    """The exception without its traceback: the frames would keep a failed implementation's buffers
    (its model, inputs, activations; on CUDA, what an OOM left behind) alive for the later peers."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    return exc


def measure_many(fns: dict, device: torch.device, repeats: int = 5, warmup: int = 1) -> dict:
    """{name: Measurement, or the exception the implementation raised} for implementations timed side
    by side: on CPU in rotating rounds (see the module docstring), on CUDA one after the other."""
    repeats = max(1, repeats)
    results: dict = {}
    live = {}
    for name, fn in fns.items():
        try:
            if device.type == "cuda":
                for _ in range(warmup):
                    fn()
                results[name] = _measure_cuda(fn, repeats)
                continue
            for _ in range(warmup):  # first: one-time work (compilation, caches) is not a peak of the op
                fn()
            peak = _peak_call(fn)
            fn()  # the heap grows back after the peak call's trim: not in a timed round
            live[name] = fn
            results[name] = Measurement(0.0, peak, [])
        except Exception as exc:  # noqa: BLE001 - reported per implementation by the caller
            results[name] = _without_frames(exc)
    names = list(live)
    for r in range(repeats):
        for name in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
            if isinstance(results[name], Exception):
                continue
            try:
                t0 = time.perf_counter()
                out = live[name]()
                results[name].times_s.append(time.perf_counter() - t0)
                del out
            except Exception as exc:  # noqa: BLE001
                results[name] = _without_frames(exc)
    for name in names:
        if isinstance(results[name], Measurement):
            results[name].time_s = statistics.median(results[name].times_s)
    return results


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> Measurement:
    """Median time of ``fn()`` and the peak extra memory one call needs (its outputs included)."""
    result = measure_many({"fn": fn}, device, repeats, warmup)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def _measure_cuda(fn: Callable[[], object], repeats: int) -> Measurement:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        del out
    peak = torch.cuda.max_memory_allocated() - base
    return Measurement(statistics.median(times), peak, times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device, repeats=5, warmup=2)
    return 2 * nbytes / m.time_s


def matmul_rate(device: torch.device, n: int = 4096, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul rate in FLOP/s for an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = measure(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * n**3 / m.time_s


def machine_record(device: torch.device) -> dict:
    """Device, versions and machine facts for the JSON record."""
    rec = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        rec["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        rec["triton"] = None
    try:
        import subprocess

        rec["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        rec["git_commit"] = None
    return rec


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            m = re.search(r"model name\s*:\s*(.+)", fh.read())
        if m:
            return f"{m.group(1).strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
