"""What the Triton launchers size their launches for: the interpreter (CPU tensors, in tests) or a GPU.

Launchers ask :func:`sized_for_interpreter` instead of looking at ``tensor.device`` themselves, so that
``python -m benchmarks.compile_report`` (compile-only mode: CPU tensors, every launch compiled for
sm_90, nothing run) sees the configurations a GPU run would use. Device facts a launcher needs (the
number of SMs) come from here too, with the H200's values in compile-only mode.
"""

from __future__ import annotations

import torch

from .._backend import triton_compile_only

H200_SMS = 132


def sized_for_interpreter(t: torch.Tensor) -> bool:
    """True when a launch on ``t`` runs in the Triton interpreter: use small, interpreter-friendly tiles."""
    return t.device.type == "cpu" and not triton_compile_only()


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s device (the H200's 132 in compile-only mode; 1 in the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return H200_SMS if triton_compile_only() else 1
