"""Helpers shared by the robustness suites (issue 12): where each backend runs, the comparison that
holds non-finite values to the contract, known violations as strict xfails, and the hypothesis budget."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

from vlm_kernels import _backend

REQUIRED = {b for b in os.environ.get("VLM_KERNELS_TEST_REQUIRE", "").split(",") if b}

# (backend, device): every backend on CPU tensors (triton through its interpreter), and the GPU ones
# carrying the `cuda` mark (run by benchmarks/gpu_check.sh on a lent GPU).
TARGETS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton"),
    pytest.param(("reference", "cuda"), id="cuda-reference", marks=pytest.mark.cuda),
    pytest.param(("triton", "cuda"), id="cuda-triton", marks=pytest.mark.cuda),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.cuda),
]


def require_target(target: tuple[str, str]) -> tuple[str, str]:
    """Skip (or fail, for a backend CI requires) when ``target``'s backend cannot run on its device."""
    backend, device = target
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = _backend.device_reason(backend, torch.device(device))
    if reason and backend in REQUIRED and device == "cpu":
        pytest.fail(f"{backend} is required by VLM_KERNELS_TEST_REQUIRE but cannot run: {reason}")
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return target


def skip_unless_implemented(table, entry: str, backend: str, device: str, *args) -> None:
    """Skip when ``backend`` has no implementation of ``entry`` or refuses these arguments (e.g. the GPU
    backends and float64)."""
    reason = table.reason(backend, entry, torch.device(device), *args)
    if reason:
        pytest.skip(f"{backend}: {reason}")


def mark_known_violation(request, known: dict, *key) -> None:
    """A case the contract holds but a backend does not meet yet: a strict xfail, so the suite stays
    green and turns red the moment the fix lands (then delete the entry)."""
    reason = known.get(tuple(key))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5),
            torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 1e-2)}[dtype]


def _describe_mask(name: str, what: str, got: torch.Tensor, expect: torch.Tensor) -> str:
    diff = (got != expect).nonzero()
    first = tuple(diff[0].tolist()) if len(diff) else ()
    return (f"{name}: {what} differ at {len(diff)} places (first {first}); got {int(got.sum())}, "
            f"expected {int(expect.sum())}")


def assert_matches(got: Optional[torch.Tensor], expect: Optional[torch.Tensor], name: str, *,
                   dtype: torch.dtype = torch.float32, exact_kind: bool = True, scale: float = 1.0) -> None:
    """``got`` has NaN, +inf and -inf exactly where ``expect`` has them (``exact_kind=False``: only the
    non-finite positions must agree, where the contract leaves NaN-or-inf open), and its finite values
    are close (tolerance of ``dtype``, absolute part times ``scale``)."""
    assert (got is None) == (expect is None), f"{name}: got {got is None and 'None'}, expected {expect is None and 'None'}"
    if got is None:
        return
    got, expect = got.detach().cpu(), expect.detach().cpu()
    assert got.shape == expect.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    if not got.is_floating_point():
        assert torch.equal(got, expect.to(got.dtype)), _describe_mask(name, "values", got, expect.to(got.dtype))
        return
    got, expect = got.double(), expect.double()
    if exact_kind:
        for what, fn in (("NaN positions", torch.isnan), ("+inf positions", torch.isposinf),
                         ("-inf positions", torch.isneginf)):
            assert torch.equal(fn(got), fn(expect)), _describe_mask(name, what, fn(got), fn(expect))
    else:
        assert torch.equal(torch.isfinite(got), torch.isfinite(expect)), _describe_mask(
            name, "non-finite positions", ~torch.isfinite(got), ~torch.isfinite(expect))
    finite = torch.isfinite(got) & torch.isfinite(expect)
    rtol, atol = tolerances(dtype)
    mag = float(expect[finite].abs().max()) if finite.any() else 0.0
    torch.testing.assert_close(got[finite], expect[finite], rtol=rtol, atol=atol * scale * max(mag, 1.0),
                               msg=lambda m: f"{name}: finite values differ: {m}")


# ----------------------------------------------------------------------------------------------------
# hypothesis budget: CI runs a fixed, derandomised budget; VLM_KERNELS_ROBUST=long (or the older
# VLM_KERNELS_HYPOTHESIS=long) runs a longer, random one (its failures are printed with a @reproduce_failure blob and become regular tests).

# One switch for every long budget of the robustness suites: VLM_KERNELS_ROBUST=long (CI leaves it unset).
# It runs the hypothesis suites 25x longer and random, Triton (interpreted) on every dtype in
# test_nonfinite.py (CI: float32 only), and the long-run loops at their full length.
LONG = os.environ.get("VLM_KERNELS_ROBUST", "ci").strip().lower() == "long"
HYPOTHESIS_MODE = "long" if LONG else os.environ.get("VLM_KERNELS_HYPOTHESIS", "ci").strip().lower()


def ci_budget_skip(backend: str, dtype: torch.dtype) -> None:
    """CI budget: the interpreted Triton backend runs the non-finite cases in float32 only (its fp16/bf16
    code paths are the same kernels; the dtype matrix runs with VLM_KERNELS_ROBUST=long and on a GPU)."""
    if not LONG and backend == "triton" and dtype != torch.float32:
        pytest.skip("interpreted triton: float32 only in the CI budget (VLM_KERNELS_ROBUST=long runs every dtype)")


def hypothesis_settings(ci_examples: int, long_examples: Optional[int] = None):
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.filter_too_much])
    if HYPOTHESIS_MODE == "long":
        return settings(max_examples=long_examples or 25 * ci_examples, derandomize=False, print_blob=True,
                        **common)
    return settings(max_examples=ci_examples, derandomize=True, database=None, print_blob=True, **common)


# ----------------------------------------------------------------------------------------------------
# Workloads: one forward + backward of every op on small inputs, shared by the thread and long-run
# suites. ``make(device)`` builds read-only inputs; ``run(inputs)`` returns every output and gradient.


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _gumbel_inputs(device):
    g = _g(1)
    return {"logits": torch.randn(4, 9, 5, generator=g).to(device), "grad": torch.randn(4, 9, 5, generator=g).to(device)}


def _run_gumbel_softmax(t, hard):
    import vlm_kernels as vk

    logits = _leaf(t["logits"])
    out = vk.gumbel_softmax(logits, 0.7, hard, 1, seed=11)
    out.backward(t["grad"])
    return out.detach(), logits.grad


def _run_gumbel_argmax(t):
    import vlm_kernels as vk

    return (vk.gumbel_argmax(t["logits"], 1, seed=12),)


def _run_kl(t):
    import vlm_kernels as vk

    logits = _leaf(t["logits"])
    out = vk.categorical_kl_uniform(logits, 1)
    out.backward(t["grad"][:, 0])
    return out.detach(), logits.grad


def _vq_inputs(device):
    g = _g(2)
    return {"x": torch.randn(2, 6, 5, 3, generator=g).to(device), "codebook": torch.randn(13, 6, generator=g).to(device),
            "grad": torch.randn(2, 6, 5, 3, generator=g).to(device)}


def _run_vq_nearest(t):
    import vlm_kernels as vk

    return vk.vq_nearest(t["x"], t["codebook"], dim=1)


def _run_vq_quantize(t):
    import vlm_kernels as vk

    x, e = _leaf(t["x"]), _leaf(t["codebook"])
    q, idx, loss = vk.vq_quantize(x, e, dim=1)
    ((q * t["grad"]).sum() + loss).backward()
    return q.detach(), idx, loss.detach(), x.grad, e.grad


def _run_vq_code_stats(t):
    import vlm_kernels as vk

    idx = (torch.arange(30, device=t["x"].device) % 13).reshape(2, 5, 3)
    return vk.vq_code_stats(t["x"], idx, 13, dim=1)


def _wa_inputs(device):
    g = _g(3)
    return {"qkv": torch.randn(2, 9, 10, 24, generator=g).to(device), "table": torch.randn(49, 2, generator=g).to(device),
            "pad": torch.randn(24, generator=g).to(device), "grad": torch.randn(2, 9, 10, 8, generator=g).to(device)}


def _run_window_attention(t):
    import vlm_kernels as vk

    qkv, table, pad = _leaf(t["qkv"]), _leaf(t["table"]), _leaf(t["pad"])
    out = vk.window_attention(qkv, num_heads=2, window_size=4, shift_size=2, rel_pos_bias=table, pad_qkv=pad)
    out.backward(t["grad"])
    return out.detach(), qkv.grad, table.grad, pad.grad


def _wd_inputs(device):
    g = _g(4)
    return {k: torch.randn(4, 2, 16, 4, generator=g).to(device) for k in ("q", "k", "v", "grad")} | {
        "bias": torch.randn(2, 16, 16, generator=g).to(device)}


def _run_windowed_attention(t):
    import vlm_kernels as vk

    q, k, v, bias = (_leaf(t[n]) for n in ("q", "k", "v", "bias"))
    out = vk.windowed_attention(q, k, v, bias=bias)
    out.backward(t["grad"])
    return out.detach(), q.grad, k.grad, v.grad, bias.grad


WORKLOADS = {
    "gumbel_softmax_soft": (_gumbel_inputs, lambda t: _run_gumbel_softmax(t, False)),
    "gumbel_softmax_hard": (_gumbel_inputs, lambda t: _run_gumbel_softmax(t, True)),
    "gumbel_argmax": (_gumbel_inputs, _run_gumbel_argmax),
    "categorical_kl_uniform": (_gumbel_inputs, _run_kl),
    "vq_nearest": (_vq_inputs, _run_vq_nearest),
    "vq_quantize": (_vq_inputs, _run_vq_quantize),
    "vq_code_stats": (_vq_inputs, _run_vq_code_stats),
    "window_attention": (_wa_inputs, _run_window_attention),
    "windowed_attention": (_wd_inputs, _run_windowed_attention),
}
WORKLOAD_TABLES = {"gumbel": ("gumbel_softmax_soft", "gumbel_softmax_hard", "gumbel_argmax", "categorical_kl_uniform"),
                   "vq": ("vq_nearest", "vq_quantize", "vq_code_stats"),
                   "window_attention": ("window_attention", "windowed_attention")}


def workload_table(name: str):
    from vlm_kernels.ops import gumbel, vq, window_attention

    family = next(f for f, names in WORKLOAD_TABLES.items() if name in names)
    return {"gumbel": gumbel.TABLE, "vq": vq.TABLE, "window_attention": window_attention.TABLE}[family]


def workload_entry(name: str) -> str:
    return {"gumbel_softmax_soft": "softmax_forward", "gumbel_softmax_hard": "softmax_forward",
            "gumbel_argmax": "argmax", "categorical_kl_uniform": "kl_forward", "vq_nearest": "nearest",
            "vq_quantize": "nearest", "vq_code_stats": "code_stats", "window_attention": "forward",
            "windowed_attention": "windowed_forward"}[name]
