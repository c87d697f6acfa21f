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
# hypothesis budget: CI runs a fixed, derandomised budget; VLM_KERNELS_HYPOTHESIS=long runs a longer,
# random one (its failures are printed with a @reproduce_failure blob and become regular tests).

HYPOTHESIS_MODE = os.environ.get("VLM_KERNELS_HYPOTHESIS", "ci").strip().lower()


def hypothesis_settings(ci_examples: int, long_examples: Optional[int] = None):
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                        HealthCheck.filter_too_much])
    if HYPOTHESIS_MODE == "long":
        return settings(max_examples=long_examples or 25 * ci_examples, derandomize=False, print_blob=True,
                        **common)
    return settings(max_examples=ci_examples, derandomize=True, database=None, print_blob=True, **common)
