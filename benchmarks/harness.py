"""Timing and peak-memory measurement shared by every benchmark (the runner and the pytest suites).

CPU: wall-clock median over repeats after warm-up; peak memory is the rise of the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident size before the call.
CUDA: CUDA events around each call, median; peak memory from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

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


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> Measurement:
    """Median time of ``fn()`` and the peak extra memory one call needs (its outputs included)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return _measure_cuda(fn, repeats)
    times = []
    peak = None
    for i in range(repeats):
        base = _reset_cpu_peak() if i == 0 else None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if base is not None:
            hwm = _proc_status("VmHWM")
            peak = max(0, hwm - base) if hwm is not None else None
        del out
    return Measurement(statistics.median(times), peak, times)


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
    del src, dst
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
