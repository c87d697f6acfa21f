"""Gumbel-softmax benchmarks: vlm_kernels against F.gumbel_softmax (eager and torch.compile) and a plain
torch.softmax of the same tensor, forward soft, forward hard and forward+backward.

On a GPU: the target shapes (64, 8192, 32, 32) dim=1 and (65536, 8192) dim=-1, with the fraction of the
measured copy bandwidth (logits read + sample written; fwd+bwd: x, y, dy read/written, dx) as the
target, and each GPU backend of ours timed on its own (``vlm_kernels triton`` / ``vlm_kernels cuda``)
so that the automatic choice per layout can follow the measurement; for the soft sample over columns
(forward, forward+backward), also the Triton column plans the default replaced (``COLUMN_PLANS``).

Runner: ``python -m benchmarks.run --ops gumbel``. pytest-benchmark: ``pytest benchmarks/bench_gumbel.py``.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _triton_plan(**plan):
    """Module-level plan switches of ``vlm_kernels.triton.gumbel`` set for the duration (an A/B of the
    column plans in one process)."""
    from vlm_kernels.triton import gumbel as tg

    saved = {k: getattr(tg, k) for k in plan}
    try:
        for k, v in plan.items():
            setattr(tg, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(tg, k, v)


def _call(fn, shape, dim, mode, device, dtype, plan=None):
    """setup() for one implementation: allocates inputs, returns the timed closure (run under the Triton
    plan switches ``plan``, forward and backward, when given)."""

    def setup():
        x = torch.randn(shape, device=device, dtype=dtype)
        hard = mode == "fwd hard"
        if mode != "fwd+bwd":
            step = lambda: fn(x, hard, dim)  # noqa: E731
        else:
            xg = x.requires_grad_(True)
            grad = torch.randn_like(x)

            def step():
                y = fn(xg, False, dim)
                y.backward(grad)
                xg.grad = None

        if not plan:
            return step

        def planned():
            with _triton_plan(**plan):
                return step()

        return planned

    return setup


def _ours(x, hard, dim):
    return vk.gumbel_softmax(x, tau=1.0, hard=hard, dim=dim)


def _ours_on(backend):
    def fn(x, hard, dim):
        with vk.use_backend(backend):
            return vk.gumbel_softmax(x, tau=1.0, hard=hard, dim=dim)

    return fn


# The column plans that were or could be the default for long columns (dim=1 of NCHW, K = 8192), timed
# beside the default (the split plan) on a GPU: the looped plan (one program per 64-column strip, inputs
# read twice) and the single-pass strip of 4 columns (the first plan measured, 26% of copy bandwidth).
COLUMN_PLANS = {"vlm_kernels triton looped": dict(SPLIT_COLUMNS=False),
                "vlm_kernels triton strip4": dict(MIN_STRIP_COLS=4)}


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
                if dim % len(shape) != len(shape) - 1 and mode != "fwd hard":
                    for name, plan in COLUMN_PLANS.items():
                        impls[name] = _call(_ours_on("triton"), shape, dim, mode, device, dtype, plan=plan)
            # Bytes the forward must move: logits read once, sample written once (fwd+bwd: x, y, dy, dx).
            floor_bytes = numel * 4 * (2 if mode != "fwd+bwd" else 5)
            out.append(Case("gumbel_softmax", label, mode, "float32", "vlm_kernels", impls, list(targets[mode]),
                            floor_bytes=floor_bytes, repeats=2 if big and not gpu else 10,
                            headline=mode in ("fwd soft", "fwd+bwd"),
                            extended_impls=frozenset({"F.gumbel_softmax compiled"})))
    return out


def split_plan_report(shape=(64, 8192, 32, 32), device: str = "cuda") -> dict:
    """How the split soft forward ran at ``shape`` (dim=1, fp32): how many of its chunks gave up waiting
    for their strip's statistics and were written by the fix-up kernel (0 when the strips' programs run
    together), over three launches. Printed by benchmarks/gpu_check.sh."""
    from vlm_kernels.triton import gumbel as tg

    x = torch.randn(shape, device=device)
    out = torch.empty_like(x)
    _, sizes, n_strips, meta = tg._split_plan(x, 1, None)
    n_splits = sizes[-1]
    marked = []
    for seed in range(3):
        _, sync = tg._split_launch(x, x, out, seed, 1.0, 1, None, backward=False)
        marks = sync.view(n_strips, n_splits + 3)[:, 3:]
        marked.append(int((marks != 0).sum()))
    rec = {"shape": list(shape), "strips": n_strips, "chunks_per_strip": n_splits, "BR": meta["BR"], "BC": meta["BC"],
           "num_warps": meta["num_warps"], "max_polls": tg.SPLIT_MAX_POLLS, "chunks_given_up": marked}
    print("gumbel split plan:", rec)
    return rec


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
