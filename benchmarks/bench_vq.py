"""Vector-quantisation benchmarks: the nearest-code lookup and the VQ layer's training step.

Lookup (N x D rows against a K x D codebook, fp32): vlm_kernels.vq_nearest against torch.cdist + argmin,
the expanded-matmul form (|x|^2 - 2 x e^T + |e|^2, argmin), faiss-cpu's IndexFlatL2 search with k = 1
(CPU), and the distance product alone (torch.matmul x @ e^T, the GEMM every method must do; on a GPU
both in IEEE fp32 and in TF32, the rate our TF32 tiles are held to).

Training step (forward, backward, EMA update; K = 8192, D = 256, decay 0.99): vlm_kernels.nn.VectorQuantizer
against vector-quantize-pytorch's VectorQuantize with the same arguments (its plain straight-through
estimator: rotation_trick=False).

Residual VQ training step (forward, the summed stage losses, backward, EMA update; SoundStream/EnCodec's
shape: 8 quantizers of K = 1024, D = 256, rows as (B, 2048, D) sequences): vlm_kernels.nn.ResidualVQ against
vector-quantize-pytorch's ResidualVQ, both with their defaults (decay 0.8, rotation trick) and the same
initial codebooks (one seed: our layers draw them as theirs do).

Runner: ``python -m benchmarks.run --ops vq``. pytest-benchmark: ``pytest benchmarks/bench_vq.py``.
"""

from __future__ import annotations

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels.nn.vq import VectorQuantizer

from .cases import Case, Target

K, D = 8192, 256
FULL_N = (8192, 65536)
GPU_N = (65536,)
QUICK_N = (2048,)
QUICK_K = 1024

CPU_LOOKUP_TARGETS = [Target("faiss IndexFlatL2", 1.0, "as fast as faiss-cpu IndexFlatL2 (k=1)")]
CPU_STEP_TARGETS = [Target("vector-quantize-pytorch", 3.0, ">=3x vector-quantize-pytorch training step")]
GPU_LOOKUP_TARGETS = [Target("torch.cdist + argmin", 5.0, ">=5x torch.cdist + argmin"),
                      Target("torch.matmul x@e^T TF32", 0.6, ">=60% of the TF32 matmul rate on the distance product")]
GPU_STEP_TARGETS: list[Target] = []
RVQ_QUANTIZERS, RVQ_K, RVQ_T = 8, 1024, 2048
RVQ_FULL_N, RVQ_GPU_N, RVQ_QUICK_N = (65536,), (65536,), (2048,)
RVQ_MEMORY_TARGET = Target("vector-quantize-pytorch", 0.0, "peak memory <= 1/4 of vector-quantize-pytorch's",
                           max_peak_ratio=0.25)
CPU_RVQ_TARGETS = [Target("vector-quantize-pytorch", 3.0, ">=3x vector-quantize-pytorch ResidualVQ training step"),
                   RVQ_MEMORY_TARGET]
GPU_RVQ_TARGETS = [RVQ_MEMORY_TARGET]


def _data(n, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g).to(device)
    e = torch.randn(k, D, generator=g).to(device)
    return x, e


def _lookup(kind, n, k, device):
    def setup():
        x, e = _data(n, k, device)
        if kind == "ours":
            return lambda: vk.vq_nearest(x, e)
        if kind == "cdist":
            return lambda: torch.cdist(x, e).argmin(dim=1)
        if kind == "expanded":
            e_sq = (e * e).sum(1)

            def expanded():
                d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ e.T) + e_sq
                return d.argmin(dim=1)

            return expanded
        if kind in ("matmul", "matmul tf32"):  # IEEE fp32 (PyTorch's default) or TF32 tensor cores
            tf32 = kind == "matmul tf32"

            def product():
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    return x @ e.T
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old

            return product
        if kind == "faiss":
            import faiss

            index = faiss.IndexFlatL2(D)
            index.add(e.numpy())
            xn = x.numpy()
            return lambda: index.search(xn, 1)
        raise ValueError(kind)

    return setup


def _train_step(kind, n, k, device):
    def setup():
        x, _ = _data(n, k, device, seed=1)
        if kind == "ours":
            layer = VectorQuantizer(D, k, decay=0.99, commitment_weight=0.25, rotation_trick=False)
        else:
            from vector_quantize_pytorch import VectorQuantize

            layer = VectorQuantize(dim=D, codebook_size=k, decay=0.99, commitment_weight=0.25, rotation_trick=False)
        layer = layer.to(device).train()
        xg = x.clone().requires_grad_(True)
        g = torch.randn_like(x)

        def step():
            quantized, _, loss = layer(xg)
            (loss + (quantized * g).sum()).backward()
            xg.grad = None

        return step

    return setup


def _residual_step(kind, n, device):
    def setup():
        x, _ = _data(n, 1, device, seed=2)
        torch.manual_seed(0)  # the same initial codebooks for both
        if kind == "ours":
            layer = vk.nn.ResidualVQ(dim=D, num_quantizers=RVQ_QUANTIZERS, codebook_size=RVQ_K)
        else:
            from vector_quantize_pytorch import ResidualVQ

            layer = ResidualVQ(dim=D, num_quantizers=RVQ_QUANTIZERS, codebook_size=RVQ_K)
        layer = layer.to(device).train()
        xg = x.reshape(-1, min(n, RVQ_T), D).clone().requires_grad_(True)
        g = torch.randn_like(xg)

        def step():
            quantized, _, losses = layer(xg)
            (losses.sum() + (quantized * g).sum()).backward()
            xg.grad = None

        return step

    return setup


def vq_breakdown_report(n: int = 65536, k: int = K, device: str = "cuda", calls: int = 3) -> dict:
    """Where the Triton lookup's time goes at (N, K, D = 256) (fp32, l2, randn data): the rows flagged for the
    float64 rescan, and each kernel's device time per call (torch.profiler) beside a TF32 ``x @ e^T`` of
    the same shape. Printed by benchmarks/gpu_check.sh: the lookup measured 2.5 ms against 0.9-1.6 ms
    predicted, and these numbers say which kernel holds the difference."""
    from vlm_kernels.triton import vq as tvq

    x, e = _data(n, k, torch.device(device))
    stats: dict = {}
    tvq.vq_nearest(x, e, 1, "l2", stats=stats)  # also the warm-up (compiles, codebook set-up cached)
    rec: dict = {"shape": [n, k, D], "flagged_rows": int(stats["flagged"].item())}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        (x @ e.T).sum()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                tvq.vq_nearest(x, e, 1, "l2")
                x @ e.T
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    per_call = {}
    for ev in prof.key_averages():
        if device == "cuda":  # device_time_total since torch 2.4, cuda_time_total before
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        else:
            t = ev.cpu_time_total
        if t and ("_vq_" in ev.key or "gemm" in ev.key.lower() or "matmul" in ev.key.lower()
                  or "vq_nearest" in ev.key):
            per_call[ev.key[:80]] = round(t / calls, 1)
    rec["us_per_call"] = dict(sorted(per_call.items(), key=lambda kv: -kv[1]))
    print("vq lookup breakdown:", rec)
    return rec


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    ns = QUICK_N if quick else (GPU_N if gpu else FULL_N)
    k = QUICK_K if quick else K
    out = []
    for n in ns:
        impls = {
            "vlm_kernels": _lookup("ours", n, k, device),
            "torch.cdist + argmin": _lookup("cdist", n, k, device),
            "expanded matmul + argmin": _lookup("expanded", n, k, device),
            "torch.matmul x@e^T": _lookup("matmul", n, k, device),
        }
        if gpu:
            impls["torch.matmul x@e^T TF32"] = _lookup("matmul tf32", n, k, device)
        else:
            impls["faiss IndexFlatL2"] = _lookup("faiss", n, k, device)
        targets = list(GPU_LOOKUP_TARGETS if gpu else CPU_LOOKUP_TARGETS)
        if not gpu and n == 65536:
            targets.append(Target("", 0.0, "extra memory <= 64 MB", max_bytes=64 << 20))
        out.append(Case("vq_nearest", f"N={n} K={k} D={D}", "lookup", "float32", "vlm_kernels", impls, targets,
                        floor_flops=2 * n * k * D, repeats=10 if gpu else 3, headline=True))
    for n in ns:
        impls = {"vlm_kernels": _train_step("ours", n, k, device),
                 "vector-quantize-pytorch": _train_step("vqp", n, k, device)}
        out.append(Case("VectorQuantizer", f"N={n} K={k} D={D} EMA", "train step", "float32", "vlm_kernels", impls,
                        list(GPU_STEP_TARGETS if gpu else CPU_STEP_TARGETS), repeats=3, extended=gpu))
    for n in RVQ_QUICK_N if quick else (RVQ_GPU_N if gpu else RVQ_FULL_N):
        impls = {"vlm_kernels": _residual_step("ours", n, device),
                 "vector-quantize-pytorch": _residual_step("vqp", n, device)}
        out.append(Case("ResidualVQ", f"ResidualVQ(dim={D}, num_quantizers={RVQ_QUANTIZERS}, codebook_size={RVQ_K}) "
                        f"N={n}", "train step", "float32", "vlm_kernels", impls,
                        list(GPU_RVQ_TARGETS if gpu else CPU_RVQ_TARGETS), repeats=3 if gpu else 2, extended=gpu))
    return out


def scaling_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Nearest-code lookup of N rows against K=8192 codes, D=256, for growing N."""
    gpu = device.type == "cuda"
    k = QUICK_K if quick else K
    ns = (512, 2048) if quick else ((4096, 16384, 65536, 262144) if gpu else (1024, 4096, 16384, 65536))
    out = []
    for n in ns:
        impls = {"vlm_kernels": _lookup("ours", n, k, device), "torch.cdist + argmin": _lookup("cdist", n, k, device)}
        if gpu:
            impls["torch.matmul x@e^T TF32"] = _lookup("matmul tf32", n, k, device)
        else:
            impls["faiss IndexFlatL2"] = _lookup("faiss", n, k, device)
        out.append(Case("vq_nearest", f"N={n} K={k} D={D}", "lookup", "float32", "vlm_kernels", impls,
                        floor_flops=2 * n * k * D, repeats=3, scaling_group=f"VQ lookup, K={k} D={D}", size=n,
                        size_label="N (rows)"))
    return out


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark suite (quick shapes; the runner covers the full ones).


@pytest.mark.parametrize("case", cases(torch.device("cpu"), quick=True), ids=lambda c: f"{c.op}-{c.shape}")
@pytest.mark.parametrize("impl", ["vlm_kernels", "torch.cdist + argmin", "vector-quantize-pytorch"])
def test_vq_cpu(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{impl} is not a peer of {case.op}")
    benchmark.group = f"{case.op} {case.shape} {case.mode}"
    benchmark(case.impls[impl]())
