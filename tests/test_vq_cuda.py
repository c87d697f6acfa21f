"""vq_code_stats on the cuda backend (csrc/cuda/vq.cu): parity with the float64 reference on odd shapes,
bit-identical reruns (the point of the sort-based kernel next to Triton's atomics), out-of-range
indices, empty input and the C++ argument checks. Every test needs a CUDA device (run by
benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels import _backend
from vlm_kernels.reference import vq as ref

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (shape, dim, K): odd sizes on purpose. dim=1 of (B, D, H, W) is the channel-first (strided) layout.
CASES = [
    ((37, 3), -1, 5),
    ((1000, 3), -1, 1),          # one code: its rows span many tiles (partial sums + finalize)
    ((517, 64), -1, 1000),       # most codes empty or holding a single row
    ((300, 257), -1, 7),         # D > 256: two d values per thread
    ((1, 3), -1, 1),
    ((4, 5, 6), 0, 3),
    ((5, 6, 7), 2, 9),
    ((2, 3, 5, 7), 1, 4),
    ((2, 64, 5, 11), 1, 1000),
    ((2, 257, 3, 3), 1, 2),
    ((4, 96, 33, 17), 1, 512),
    ((70001, 64), -1, 1024),     # more than 65535 rows and tiles
    ((2000, 16), -1, 70000),     # more than 65535 codes
]


@pytest.fixture
def cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = _backend.device_reason("cuda", torch.device("cuda"))
    if reason:
        pytest.skip(f"cuda: {reason}")
    return "cuda"


def _data(shape, dim, num_codes, dtype, seed=0, only_even=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    idx = torch.randint(0, num_codes, ref.row_shape(x, dim), generator=g)
    if only_even:  # every odd code has no row
        idx = (idx // 2) * 2
    return x, idx


def _cuda_stats(x, idx, num_codes, dim, validate=True):
    with vk.use_backend("cuda"):
        return vk.vq_code_stats(x.cuda(), idx.cuda(), num_codes, dim=dim, validate=validate)


def _assert_matches(counts, sums, ref_counts, ref_sums):
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert counts.shape == ref_counts.shape and sums.shape == ref_sums.shape
    assert torch.equal(counts.cpu(), ref_counts)
    # Both are float64 sums rounded once to float32: equal, or one float32 ulp apart.
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape,dim,num_codes", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(cuda_backend, shape, dim, num_codes, dtype):
    d = dim % len(shape)
    for only_even in (False, True):
        x, idx = _data(shape, d, num_codes, dtype, only_even=only_even)
        counts, sums = _cuda_stats(x, idx, num_codes, d)
        _assert_matches(counts, sums, *ref.vq_code_stats(x, idx, num_codes, d))


def test_non_contiguous_input(cuda_backend):
    x, idx = _data((6, 40, 9), 2, 11, torch.float32)
    xt = x.transpose(0, 2)  # (9, 40, 6), rows along dim 0 now
    idx_t = idx.transpose(0, 1)  # (40, 6): x's shape without dim 0
    counts, sums = _cuda_stats(xt, idx_t, 11, 0)
    _assert_matches(counts, sums, *ref.vq_code_stats(xt.contiguous(), idx_t.contiguous(), 11, 0))


@pytest.mark.parametrize("shape,dim,num_codes", [
    ((300_000, 64), -1, 512),
    ((200_000, 32), -1, 1),            # every row on one code: the worst case for atomics
    ((16, 64, 64, 64), 1, 1024),       # channel-first
])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_bit_identical_reruns(cuda_backend, shape, dim, num_codes, dtype):
    x, idx = _data(shape, dim % len(shape), num_codes, dtype, seed=3)
    xc, ic = x.cuda(), idx.cuda()
    with vk.use_backend("cuda"):
        runs = [vk.vq_code_stats(xc, ic, num_codes, dim=dim) for _ in range(3)]
    for counts, sums in runs[1:]:
        assert torch.equal(counts, runs[0][0])
        assert torch.equal(sums.view(torch.int32), runs[0][1].view(torch.int32))  # bits, NaN-proof
    _assert_matches(*runs[0], *ref.vq_code_stats(x, idx, num_codes, dim % len(shape)))


@pytest.mark.parametrize("shape,dim", [((513, 33), -1), ((3, 33, 7, 5), 1)])
def test_out_of_range_indices_are_skipped(cuda_backend, shape, dim):
    num_codes = 10
    x, idx = _data(shape, dim, num_codes, torch.float32, seed=5)
    flat = idx.view(-1)
    flat[::7] = -1
    flat[3::11] = num_codes
    flat[5::13] = num_codes + 123
    flat[1::17] = 2**62
    flat[2::19] = -(2**63)
    valid = (idx >= 0) & (idx < num_codes)
    counts, sums = _cuda_stats(x, idx, num_codes, dim, validate=False)
    torch.cuda.synchronize()  # an out-of-bounds write would surface here (or under compute-sanitizer)
    rows = ref.as_rows(x, dim)[valid.reshape(-1)]
    _assert_matches(counts, sums, *ref.vq_code_stats(rows, idx.reshape(-1)[valid.reshape(-1)], num_codes, 1))
    assert counts.sum().item() == valid.sum().item()
    # The context is still healthy, and the validating path rejects the same indices.
    with pytest.raises(ValueError, match="indices must lie in"):
        _cuda_stats(x, idx, num_codes, dim)


def test_all_indices_out_of_range(cuda_backend):
    x, _ = _data((50, 4), -1, 3, torch.float16)
    idx = torch.full((50,), 7, dtype=torch.int64)
    counts, sums = _cuda_stats(x, idx, 3, -1, validate=False)
    assert torch.equal(counts.cpu(), torch.zeros(3)) and torch.equal(sums.cpu(), torch.zeros(3, 4))


@pytest.mark.parametrize("shape,dim", [((0, 8), -1), ((3, 4, 0), 1), ((2, 5, 0, 3), 1)])
def test_empty_input_gives_zeros(cuda_backend, shape, dim):
    x = torch.randn(shape)
    idx = torch.zeros(ref.row_shape(x, dim), dtype=torch.int64)
    counts, sums = _cuda_stats(x, idx, 6, dim)
    assert torch.equal(counts.cpu(), torch.zeros(6))
    assert torch.equal(sums.cpu(), torch.zeros(6, shape[dim]))


def test_raw_op_checks_its_arguments(cuda_backend):
    op = torch.ops.vlm_kernels_C.vq_code_stats_cuda
    x = torch.randn(5, 4, device="cuda")
    idx = torch.zeros(5, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        op(x.cpu(), idx.cpu(), 3, 1)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(x.double(), idx, 3, 1)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        op(x, idx.int(), 3, 1)
    with pytest.raises(RuntimeError, match="without dim"):
        op(x, torch.zeros(4, dtype=torch.int64, device="cuda"), 3, 1)
    with pytest.raises(RuntimeError, match="num_codes"):
        op(x, idx, 0, 1)
    with pytest.raises(RuntimeError, match="dim must be in"):
        op(x, idx, 3, 2)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(x.t(), idx[:4], 3, 1)
