"""Shared fixtures. Without a CUDA device, Triton kernels run on CPU tensors through the interpreter:
TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vlm_kernels import _backend  # noqa: E402

CPU_BACKENDS = ("reference", "cpu", "triton")
# CI sets VLM_KERNELS_TEST_REQUIRE=cpu,triton so that a broken build fails instead of skipping.
REQUIRED = {b for b in os.environ.get("VLM_KERNELS_TEST_REQUIRE", "").split(",") if b}


def backend_reason(name: str, device: str) -> str:
    return _backend.device_reason(name, torch.device(device))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """A backend name usable on CPU tensors here; skipped (with the reason) when it cannot run."""
    reason = backend_reason(request.param, "cpu")
    if reason and request.param in REQUIRED:
        pytest.fail(f"{request.param} is required by VLM_KERNELS_TEST_REQUIRE but cannot run: {reason}")
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    return request.param


@pytest.fixture(params=("cuda", "triton", "reference"))
def gpu_backend(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backend_reason(request.param, "cuda")
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    return request.param
