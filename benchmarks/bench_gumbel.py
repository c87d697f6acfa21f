"""Gumbel-softmax benchmarks: vlm_kernels against F.gumbel_softmax (eager and torch.compile) and a plain
torch.softmax of the same tensor, forward soft, forward hard and forward+backward.

On a GPU: the target shapes (64, 8192, 32, 32) dim=1 and (65536, 8192) dim=-1, with the fraction of the
measured copy bandwidth (logits read + sample written; fwd+bwd: x, y, dy read/written, dx) as the
target, and each GPU backend of ours timed on its own (``vlm_kernels triton`` / ``vlm_kernels cuda``)
so that the automatic choice per layout can follow the measurement.

Runner: ``python -m benchmarks.run --ops gumbel``. pytest-benchmark: ``pytest benchmarks/bench_gumbel.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vlm_kernels as vk

from .cases import Case, Target

# (label, shape, dim): the dVAE's NCHW logits and a long batch of 8192-way rows.
FULL_SHAPES = [("(8,8192,32,32) dim=1", (8, 8192, 32, 32), 1), ("(65536,8192) dim=-1", (65536, 8192), -1)]
GPU_SHAPES = [("(64,8192,32,32) dim=1", (64, 8192, 32, 32), 1), ("(65536,8192) dim=-1", (65536, 8192), -1)]
QUICK_SHAPES = [("(2,8192,8,8) dim=1", (2, 8192, 8, 8), 1), ("(2048,8192) dim=-1", (2048, 8192), -1)]
MODES = ("fwd soft", "fwd hard", "fwd+bwd")

CPU_TARGETS = {
    "fwd soft": [Target("F.gumbel_softmax", 10.0, ">=10x F.gumbel_softmax"), Target("torch.softmax", 1 / 3, "within 3x of torch.softmax")],
    "fwd hard": [Target("F.gumbel_softmax", 10.0, ">=10x F.gumbel_softmax"), Target("torch.softmax", 1 / 3, "within 3x of torch.softmax")],
    "fwd+bwd": [Target("F.gumbel_softmax", 5.0, ">=5x F.gumbel_softmax")],
}
# On a GPU the one-pass kernel is bandwidth-bound: the target is the fraction of the copy bandwidth
# (eager F.gumbel_softmax's own traffic caps any one-pass kernel at about 6x over it).
GPU_TARGETS = {
    "fwd soft": [Target("floor", 0.85, ">=85% of copy bandwidth")],
    "fwd hard": [Target("floor", 0.85, ">=85% of copy bandwidth")],
    "fwd+bwd": [Target("floor", 0.70, ">=70% of copy bandwidth")],
}


@functools.lru_cache(maxsize=None)
def _compiled_gumbel():
    return torch.compile(F.gumbel_softmax, dynamic=False)


def _call(fn, shape, dim, mode, device, dtype):
    """setup() for one implementation: allocates inputs, returns the timed closure."""

    def setup():
        x = torch.randn(shape, device=device, dtype=dtype)
        hard = mode == "fwd hard"
        if mode != "fwd+bwd":
            return lambda: fn(x, hard, dim)
        xg = x.requires_grad_(True)
        grad = torch.randn_like(x)

        def step():
            y = fn(xg, False, dim)
            y.backward(grad)
            xg.grad = None

        return step

    return setup


def _ours(x, hard, dim):
    return vk.gumbel_softmax(x, tau=1.0, hard=hard, dim=dim)


def _ours_on(backend):
    def fn(x, hard, dim):
        with vk.use_backend(backend):
            return vk.gumbel_softmax(x, tau=1.0, hard=hard, dim=dim)

    return fn


def _torch(x, hard, dim):
    return F.gumbel_softmax(x, tau=1.0, hard=hard, dim=dim)


def _torch_compiled(x, hard, dim):
    return _compiled_gumbel()(x, tau=1.0, hard=hard, dim=dim)


def _softmax(x, hard, dim):
    return torch.softmax(x, dim)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32
    gpu = device.type == "cuda"
    targets = GPU_TARGETS if gpu else CPU_TARGETS
    out = []
    for label, shape, dim in QUICK_SHAPES if quick else (GPU_SHAPES if gpu else FULL_SHAPES):
        numel = 1
        for s in shape:
            numel *= s
        big = numel > 10**8
        for mode in MODES:
            impls = {
                "vlm_kernels": _call(_ours, shape, dim, mode, device, dtype),
                "F.gumbel_softmax": _call(_torch, shape, dim, mode, device, dtype),
                "F.gumbel_softmax compiled": _call(_torch_compiled, shape, dim, mode, device, dtype),
            }
            if mode != "fwd+bwd":
                impls["torch.softmax"] = _call(_softmax, shape, dim, mode, device, dtype)
            if gpu:
                for backend in ("triton", "cuda"):
                    impls[f"vlm_kernels {backend}"] = _call(_ours_on(backend), shape, dim, mode, device, dtype)
            # Bytes the forward must move: logits read once, sample written once (fwd+bwd: x, y, dy, dx).
            floor_bytes = numel * 4 * (2 if mode != "fwd+bwd" else 5)
            out.append(Case("gumbel_softmax", label, mode, "float32", "vlm_kernels", impls, list(targets[mode]),
                            floor_bytes=floor_bytes, repeats=2 if big and not gpu else 10,
                            headline=mode in ("fwd soft", "fwd+bwd"),
                            extended_impls=frozenset({"F.gumbel_softmax compiled"})))
    return out


def scaling_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Forward soft sample of (N, 8192) rows, dim=-1, for growing N."""
    gpu = device.type == "cuda"
    rows = (256, 1024) if quick else ((1024, 4096, 16384, 65536) if gpu else (256, 1024, 4096, 16384))
    out = []
    for n in rows:
        shape = (n, 8192)
        impls = {"vlm_kernels": _call(_ours, shape, -1, "fwd soft", device, torch.float32),
                 "F.gumbel_softmax": _call(_torch, shape, -1, "fwd soft", device, torch.float32),
                 "torch.softmax": _call(_softmax, shape, -1, "fwd soft", device, torch.float32)}
        out.append(Case("gumbel_softmax", f"({n},8192) dim=-1", "fwd soft", "float32", "vlm_kernels", impls,
                        floor_bytes=n * 8192 * 8, repeats=5, scaling_group="Gumbel-softmax fwd, (N, 8192) dim=-1",
                        size=n, size_label="N (rows of 8192 logits)"))
    return out


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark suite (quick shapes; the runner covers the full ones).


@pytest.mark.parametrize("case", cases(torch.device("cpu"), quick=True), ids=lambda c: f"{c.shape}-{c.mode}")
@pytest.mark.parametrize("impl", ["vlm_kernels", "F.gumbel_softmax"])
def test_gumbel_cpu(benchmark, case, impl):
    benchmark.group = f"gumbel {case.shape} {case.mode}"
    benchmark(case.impls[impl]())
