"""Triton-specific tests of ``vlm_kernels.triton.vq``: through the interpreter on CPU tensors, and (``cuda``
marker) compiled on a GPU.

The oracle here is :func:`exact_nearest`: the float64 direct-difference distance to every code (small
shapes only), lowest index on exact ties, the reference's non-finite rules. Small tile sizes are forced so
several codebook tiles, several D chunks and the flagged-row rescan all run on small shapes.
"""

import math

import pytest
import torch

from conftest import backend_reason

triton = pytest.importorskip("triton")

# On a GPU machine (no TRITON_INTERPRET) the interpreter tests skip and the `cuda` ones run.
_REASON = backend_reason("triton", "cpu")
_CUDA_REASON = backend_reason("triton", "cuda") if torch.cuda.is_available() else "no CUDA device"
if _REASON and _CUDA_REASON:
    pytest.skip(f"triton: {_REASON}; {_CUDA_REASON}", allow_module_level=True)

import vlm_kernels  # noqa: E402
from vlm_kernels.reference import vq as ref  # noqa: E402
from vlm_kernels.triton import vq as tvq  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _interpreter_or_cuda(request):
    if _REASON and "cuda" not in request.keywords:
        pytest.skip(f"triton on CPU tensors: {_REASON}")


SMALL = dict(block_m=16, max_block_n=16, max_block_d=16)  # many programs, tiles and D chunks


def exact_nearest(x, codebook, dim, metric):
    """(indices, distances) by the float64 direct difference to every code; lowest index on exact ties."""
    rows = ref.as_rows(x, dim).double()
    e = codebook.double()
    good = torch.isfinite(e).all(1)
    if metric == "l2":
        score = ((rows[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    else:
        nx = rows.norm(dim=1).clamp_min(ref.COSINE_EPS)
        ne = e.norm(dim=1).clamp_min(ref.COSINE_EPS)
        score = -(rows @ e.T) / (nx[:, None] * ne[None, :])
    score = torch.where(good[None, :], score, torch.full_like(score, math.inf))
    best = score.min(dim=1, keepdim=True).values
    k = torch.arange(e.shape[0]).expand_as(score)
    idx = torch.where(score == best, k, e.shape[0]).min(dim=1).values  # lowest index on exact ties
    idx = torch.where(idx == e.shape[0], 0, idx)
    dist = best[:, 0] if metric == "l2" else 1.0 + best[:, 0]
    bad = ~torch.isfinite(rows).all(1) | ~good.any()
    idx = torch.where(bad, 0, idx)
    dist = torch.where(bad, math.nan, dist)
    shape = ref.row_shape(x, dim)
    return idx.reshape(shape), dist.float().reshape(shape)


def check(x, codebook, dim, metric, **kw):
    """Run the Triton launcher, compare with the oracle, return the number of rescanned rows."""
    stats = {}
    idx, dist = tvq.vq_nearest(x, codebook, dim % x.dim(), metric, stats=stats, **kw)
    eidx, edist = exact_nearest(x, codebook, dim % x.dim(), metric)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == eidx.shape and dist.shape == edist.shape
    wrong = (idx != eidx).nonzero()
    assert wrong.numel() == 0, f"{wrong.shape[0]} wrong indices, first at {wrong[0].tolist()}"
    torch.testing.assert_close(dist, edist, rtol=2e-7, atol=1e-12, equal_nan=True)
    return int(stats["flagged"])


def data(shape, dtype, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)


# ----------------------------------------------------------------------------------------------------
# vq_nearest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape,dim,k,kw", [
    ((37, 3), -1, 1000, {}),
    ((2, 64, 3, 5), 1, 100, {}),
    ((3, 5, 257), -1, 40, {}),
    ((2, 40, 9), 1, 70, SMALL),  # 3 D chunks, 5 codebook tiles, 2 row blocks, channel-first
], ids=["D3-K1000", "D64-chw", "D257", "small-tiles"])
def test_nearest_matches_exact(dtype, metric, shape, dim, k, kw):
    D = shape[dim]
    offset = 3.0 if metric == "l2" else 0.5
    check(data(shape, dtype, offset, 1), data((k, D), dtype, offset, 2), dim, metric, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offset_data_and_reference(dtype):
    """x = randn + 1000: the expanded form cancels without centring; few rows need the rescan in fp32."""
    x, cb = data((128, 64), dtype, 1000.0, 3), data((600, 64), dtype, 1000.0, 4)
    flagged = check(x, cb, -1, "l2")
    if dtype == torch.float32:
        assert flagged < 8
        # No exact ties in float32 random data: the reference must agree too.
        ridx, rdist = ref.vq_nearest(x, cb, 1, "l2")
        idx, dist = tvq.vq_nearest(x, cb, 1, "l2")
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(dist, rdist, rtol=2e-7, atol=0)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_tf32_stays_exact(metric, dtype):
    """With the dot operands truncated to TF32 (as Hopper does), the bound still guards every row."""
    offset = 1000.0 if metric == "l2" else 0.0
    x, cb = data((3, 48, 11), dtype, offset, 5), data((300, 48), dtype, offset, 6)
    check(x, cb, 1, metric, emulate_tf32=True)


def near_duplicates(dtype):
    """Eight near-copies of each of 8 codes, and rows next to them."""
    base = data((8, 32), torch.float64, 0.0, 7)
    jitter = data((8, 8, 32), torch.float64, 0.0, 8) * 1e-3
    cb = (base[:, None, :] + jitter).reshape(64, 32).to(dtype)
    x = (base[torch.arange(40) % 8] + data((40, 32), torch.float64, 0.0, 9) * 1e-3).to(dtype)
    return x, cb


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_rescan_triggers_on_near_duplicates(dtype, metric):
    """The four kept candidates cannot settle such rows: they are flagged and the rescan settles them."""
    x, cb = near_duplicates(dtype)
    assert check(x, cb, -1, metric, block_m=16, max_block_n=16) > 0


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_rescan_is_needed(monkeypatch, metric):
    """Without the rescan launch the first kernel's answer is wrong on some flagged fp16 rows."""
    x, cb = near_duplicates(torch.float16)
    eidx, _ = exact_nearest(x, cb, 1, metric)
    with monkeypatch.context() as m:
        m.setattr(tvq, "_vq_rescan_kernel", _NoLaunch())
        idx, _ = tvq.vq_nearest(x, cb, 1, metric, block_m=16, max_block_n=16)
    assert (idx != eidx).any()
    idx, _ = tvq.vq_nearest(x, cb, 1, metric, block_m=16, max_block_n=16)
    assert torch.equal(idx, eidx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_forced_rescan_every_row(dtype, metric):
    """The float64 rescan kernel alone (every finite row flagged), channel-first, several code tiles."""
    x, cb = data((2, 5, 3, 4), dtype, 0.0, 10), data((70, 5), dtype, 0.0, 11)
    x[0, :, 1, 2] = math.nan
    flagged = check(x, cb, 1, metric, force_rescan=True, max_block_n=16)
    assert flagged == 23


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("cap", [None, 5], ids=["split", "over-cap"])
def test_split_rescan(metric, cap):
    """The rescan with the codebook split into ranges (4 ranges of 32 codes, the last one short) and the
    per-range winners reduced, or, past the cap of flagged rows, whole rows per work item. Codes repeated in
    other ranges must lose to their first copy; 3 programs loop over the work items."""
    x, cb = data((3, 7, 9), torch.float32, 0.5, 37), data((70, 7), torch.float32, 0.5, 38)
    cb[40] = cb[3]
    cb[65] = cb[3]
    cb[33] = cb[31]
    x[0, :, 0] = cb[3]
    x[1, :, 1] = cb[31]
    x[2, :, 2] = cb[65] * 2.0  # cosine: parallel to codes 3, 40 and 65
    x[2, 3, 5] = math.nan
    cb[50, 2] = math.inf
    x[2, :, 3] = cb[50].nan_to_num(posinf=100.0)
    kw = dict(force_rescan=True, max_block_n=16, rescan_split_codes=16, rescan_cap=cap)
    assert check(x, cb, 1, metric, **kw) == 26
    idx, _ = tvq.vq_nearest(x, cb, 1, metric, **kw)
    assert idx[0, 0] == 3 and idx[1, 1] == 31 and idx[2, 2] == 3 and idx[2, 3] != 50


class _ResidentOutOfResources:
    """Stands in for the main kernel: the resident variant "runs out of shared memory", as the Triton 3.8
    build of the D = 256 configuration does on sm_90; other variants run."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.seen.append((meta["SINGLE_D"], meta["BLOCK_D"]))
            if meta["SINGLE_D"]:
                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
            return self.kernel[grid](*args, **meta)
        return launch


def test_resident_falls_back_to_streaming(monkeypatch):
    fake = _ResidentOutOfResources(tvq._vq_nearest_kernel)
    monkeypatch.setattr(tvq, "_vq_nearest_kernel", fake)
    monkeypatch.setattr(tvq, "_RESIDENT_FAILED", set())
    x, cb = data((40, 72), torch.float32, 1.0, 39), data((90, 72), torch.float32, 1.0, 40)
    check(x, cb, -1, "l2", max_block_n=32)
    check(x, cb, -1, "cosine", max_block_n=32)
    # First call: tried resident, fell back to D chunks; later calls with that configuration go straight
    # to the fallback.
    assert fake.seen == [(True, 128), (False, tvq.LOOP_BLOCK_D), (False, tvq.LOOP_BLOCK_D)]


def test_ties_pick_the_lowest_index():
    """Duplicated codes and coarse bf16 data far from the origin give exact float64 ties."""
    cb = data((50, 16), torch.float32, 0.0, 12)
    cb = torch.cat([cb, cb[torch.arange(50).flip(0)], cb])  # every code three times
    x = cb[torch.randperm(150, generator=torch.Generator().manual_seed(0))[:40]]
    for metric in ("l2", "cosine"):
        idx, _ = tvq.vq_nearest(x, cb, 1, metric)
        assert (idx < 50).all()
    # bf16 around 1000 has a spacing of 8: many rows have several codes at exactly the same distance.
    # (The reference's float64 expanded form on data centred at a non-representable mean breaks such ties
    # by rounding noise, so the oracle here is the direct difference.)
    xb, cbb = data((64, 8), torch.bfloat16, 1000.0, 13), data((200, 8), torch.bfloat16, 1000.0, 14)
    assert check(xb, cbb, -1, "l2") > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_non_finite_rows_and_codes(dtype, metric):
    x, cb = data((30, 20), dtype, 0.0, 15), data((50, 20), dtype, 0.0, 16)
    x[3, 4] = math.nan
    x[7, 0] = math.inf
    x[8, 19] = -math.inf
    x[9] = 0.0  # a zero row: cosine ties every code at 0, index 0
    cb[0, 2] = math.nan
    cb[5, 1] = math.inf
    cb[17] = 0.0
    x[10] = cb[5].nan_to_num(posinf=8.0)  # rows next to codes that must never be chosen
    x[11] = cb[0].nan_to_num(0.0)
    check(x, cb, -1, metric, **SMALL)
    idx, dist = tvq.vq_nearest(x, cb, 1, metric)
    assert idx[3] == 0 and dist[3].isnan() and dist[7].isnan() and dist[8].isnan()
    assert not ((idx == 0) | (idx == 5))[9:].any()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_all_codes_non_finite(metric):
    x, cb = data((20, 6), torch.float32, 0.0, 17), data((40, 6), torch.float32, 0.0, 18)
    cb[:, 3] = math.nan
    for kw in ({}, {"force_rescan": True}):
        idx, dist = tvq.vq_nearest(x, cb, 1, metric, **kw)
        assert (idx == 0).all() and dist.isnan().all()


def test_huge_values_are_rescanned():
    """Scores that could overflow fp32 (|x| ~ 1e18) or fp16 operands (centred values past 2^15) send the
    rows to the float64 rescan instead of returning garbage."""
    x, cb = data((24, 8), torch.float32, 0.0, 19) * 1e18, data((40, 8), torch.float32, 0.0, 20) * 1e18
    assert check(x, cb, -1, "l2", max_block_n=16) == 24
    x16 = (data((24, 8), torch.float32, 0.0, 21) * 20000).clamp(-60000, 60000).half()
    cb16 = (data((40, 8), torch.float32, 0.0, 22) * 20000).clamp(-60000, 60000).half()
    cb16[0] = 60000.0
    cb16[1] = -60000.0
    assert check(x16, cb16, -1, "l2", max_block_n=16) == 24
    check(x16, cb16, -1, "cosine")


def test_single_code_and_empty():
    x, cb = data((2, 7, 33), torch.float16, 0.0, 23), data((1, 7), torch.float16, 0.0, 24)
    for metric in ("l2", "cosine"):
        check(x, cb, 1, metric)
    idx, dist = tvq.vq_nearest(torch.empty(0, 5, 3), torch.randn(4, 5), 1, "l2")
    assert idx.shape == (0, 3) and dist.shape == (0, 3)


@pytest.mark.parametrize("shape,dim", [((50, 24), -1), ((2, 9, 24), -1), ((2, 24, 5, 6), 1)])
def test_public_api(shape, dim):
    x, cb = data(shape, torch.float32, 2.0, 25), data((300, 24), torch.float32, 2.0, 26)
    with vlm_kernels.use_backend("triton"):
        idx, dist = vlm_kernels.vq_nearest(x, cb, dim=dim)
    with vlm_kernels.use_backend("reference"):
        ridx, rdist = vlm_kernels.vq_nearest(x, cb, dim=dim)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(dist, rdist, rtol=2e-7, atol=0)


# ----------------------------------------------------------------------------------------------------
# The error bound itself, checked in plain PyTorch: emulate the kernel's approximate scores (fp32 centring,
# operands rounded to the nearest TF32 value then truncated as Hopper does, or fp16 operands; fp32
# accumulation) and compare them with float64.


def _tf32(t):
    return (t.view(torch.int32) & -8192).view(torch.float32)


def test_round_tf32():
    """Nearest TF32 value: relative error <= 2^-11 (the bound's u_p), a fixed point of the truncation, and
    the codebook the kernel reads is already rounded."""
    t = torch.cat([data((4000,), torch.float32, 0.0, 35) * 10.0 ** torch.arange(-20, 20, 0.01)[:4000],
                   torch.tensor([0.0, -0.0, 1.0, -1.5, 2.0**-130, 3.0e38])])
    r = tvq.round_tf32(t)
    assert torch.equal(_tf32(r), r)
    rel = ((r.double() - t.double()).abs() / t.double().abs().clamp_min(2.0**-149)).max().item()
    assert rel <= 2.0**-11
    prepared = tvq._prepare_codebook(data((50, 20), torch.float32, 3.0, 36), "l2", torch.float32)[0]
    assert torch.equal(_tf32(prepared), prepared)


@pytest.mark.parametrize("D", [3, 64, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_error_bound_covers_emulated_scores(D, dtype, metric, offset):
    x, cb = data((400, D), dtype, offset, 27), data((300, D), dtype, offset, 28)
    fp16 = dtype == torch.float16
    prepared, penalty, center, shift, bounds, _ = tvq._prepare_codebook(
        cb, metric, torch.float16 if fp16 else torch.float32)
    xc = x.float() - center
    xn = xc.norm(dim=1)
    a, b = (xc.half().float(), prepared.float()) if fp16 else (_tf32(tvq.round_tf32(xc)), _tf32(prepared))
    acc = a @ b.T
    approx = (penalty - 2.0 * acc) if metric == "l2" else (penalty - acc)
    x64, e64 = x.double(), cb.double()
    if metric == "l2":
        exact = ((x64[:, None] - e64[None]) ** 2).sum(-1) - ((x64 - center.double()) ** 2).sum(-1)[:, None]
    else:
        exact = -(x64 @ e64.T) / e64.norm(dim=1).clamp_min(ref.COSINE_EPS) + (x64 @ shift.double())[:, None]
    tol_g, tol_h, tol_a, _ = tvq._tolerances(D, metric, fp16)
    m, p = bounds.double().tolist()
    tol = tol_g * xn.double() * m + tol_h * p + tol_a * (xn.double() + m)
    ratio = ((approx.double() - exact).abs() / tol[:, None]).max().item()
    assert ratio <= 0.5  # the kernel's tol is twice the derived bound


# ----------------------------------------------------------------------------------------------------
# vq_code_stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,k,kw", [
    ((300, 3), -1, 1, {}),
    ((2, 64, 5, 7), 1, 1000, {}),
    ((3, 11, 257), -1, 40, {}),
    ((2, 40, 9), 1, 7, dict(block_rows=16, max_block_d=16)),
], ids=["D3-K1", "D64-chw", "D257", "small-blocks"])
def test_code_stats_matches_reference(dtype, shape, dim, k, kw):
    x = data(shape, dtype, 0.5, 29)
    rows_shape = ref.row_shape(x, dim % x.dim())
    idx = torch.randint(0, k, rows_shape, generator=torch.Generator().manual_seed(1))
    counts, sums = tvq.vq_code_stats(x, idx, k, dim % x.dim(), **kw)
    rcounts, rsums = ref.vq_code_stats(x, idx, k, dim % x.dim())
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert torch.equal(counts, rcounts)
    n = idx.numel()
    torch.testing.assert_close(sums, rsums, rtol=1e-5, atol=1e-5 * math.sqrt(n))


def test_code_stats_skips_out_of_range_indices():
    x = data((40, 10), torch.float32, 0.0, 30)
    idx = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(2))
    bad = idx.clone()
    bad[::3] = -1
    bad[1::7] = 5
    bad[2::11] = 2**40
    counts, sums = tvq.vq_code_stats(x, bad, 5, 1)
    keep = (bad >= 0) & (bad < 5)
    rcounts, rsums = ref.vq_code_stats(x[keep], bad[keep], 5, 1)
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(sums, rsums, rtol=1e-6, atol=1e-6)


def test_code_stats_public_api():
    x = data((2, 24, 5, 6), torch.bfloat16, 0.0, 31)
    with vlm_kernels.use_backend("triton"):
        idx, _ = vlm_kernels.vq_nearest(x, data((30, 24), torch.bfloat16, 0.0, 32), dim=1)
        counts, sums = vlm_kernels.vq_code_stats(x, idx, 30, dim=1)
    rcounts, rsums = ref.vq_code_stats(x, idx, 30, 1)
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(sums, rsums, rtol=1e-5, atol=1e-5)


def test_int64_offsets(monkeypatch):
    """The int64-offset variant of every kernel (chosen for tensors with >= 2^31 elements)."""
    monkeypatch.setattr(tvq, "_needs_int64", lambda *args: True)
    x, cb = data((2, 40, 9), torch.float32, 0.0, 33), data((70, 40), torch.float32, 0.0, 34)
    for metric in ("l2", "cosine"):
        check(x, cb, 1, metric, **SMALL)
        check(x, cb, 1, metric, force_rescan=True, max_block_n=16)
    idx, _ = tvq.vq_nearest(x, cb, 1, "l2")
    counts, sums = tvq.vq_code_stats(x, idx, 70, 1, block_rows=16, max_block_d=16)
    rcounts, rsums = ref.vq_code_stats(x, idx, 70, 1)
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(sums, rsums, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (run by benchmarks/gpu_check.sh): real TF32 / fp16 tensor cores, the sm_90 tiles.


def check_cuda(x, codebook, dim, metric, **kw):
    stats = {}
    idx, dist = tvq.vq_nearest(x.cuda(), codebook.cuda(), dim % x.dim(), metric, stats=stats, **kw)
    eidx, edist = exact_nearest(x, codebook, dim % x.dim(), metric)
    assert torch.equal(idx.cpu(), eidx)
    torch.testing.assert_close(dist.cpu(), edist, rtol=2e-7, atol=1e-12, equal_nan=True)
    return int(stats["flagged"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape,dim,k,offset", [
    ((300, 3), -1, 1000, 0.0),
    ((2, 64, 7, 9), 1, 1000, 1000.0),
    ((129, 257), -1, 300, 1000.0),
    ((3, 40, 33), 1, 8192, 0.0),
])
def test_cuda_nearest_matches_exact(dtype, metric, shape, dim, k, offset):
    x, cb = data(shape, dtype, offset, 40), data((k, shape[dim]), dtype, offset, 41)
    x.view(-1)[7] = math.nan
    cb[5, 0] = math.inf
    check_cuda(x, cb, dim, metric)
    check_cuda(x, cb, dim, metric, **SMALL)
    check_cuda(x, cb, dim, metric, force_rescan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_near_duplicates_and_int64(monkeypatch, dtype):
    x, cb = near_duplicates(dtype)
    for metric in ("l2", "cosine"):
        check_cuda(x, cb, -1, metric)
    monkeypatch.setattr(tvq, "_needs_int64", lambda *args: True)
    x, cb = data((2, 100, 65), dtype, 3.0, 42), data((500, 100), dtype, 3.0, 43)
    for metric in ("l2", "cosine"):
        check_cuda(x, cb, 1, metric)


@pytest.mark.cuda
def test_cuda_many_rows_few_rescanned():
    """70000 rows (more than 65535 programs' worth of small blocks), fp32 data far from the origin."""
    x, cb = data((70000, 64), torch.float32, 1000.0, 44).cuda(), data((1024, 64), torch.float32, 1000.0, 45).cuda()
    stats = {}
    idx, dist = tvq.vq_nearest(x, cb, 1, "l2", stats=stats)
    ridx, rdist = ref.vq_nearest(x, cb, 1, "l2")
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(dist, rdist, rtol=2e-7, atol=0)
    assert int(stats["flagged"]) < 700  # under 1% of the rows take the float64 rescan


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,k", [((1000, 3), -1, 1), ((2, 64, 5, 11), 1, 1000), ((300, 257), -1, 7)])
def test_cuda_code_stats(dtype, shape, dim, k):
    x = data(shape, dtype, 0.5, 46).cuda()
    idx = torch.randint(0, k, ref.row_shape(x, dim % x.dim()), device="cuda")
    counts, sums = tvq.vq_code_stats(x, idx, k, dim % x.dim())
    rcounts, rsums = ref.vq_code_stats(x, idx, k, dim % x.dim())
    assert torch.equal(counts, rcounts)
    torch.testing.assert_close(sums, rsums, rtol=1e-5, atol=1e-5 * math.sqrt(idx.numel()))


def test_prepared_codebook_is_reused_only_while_unchanged():
    """The launcher's codebook set-up is cached per tensor and version: a second lookup reuses it, an
    in-place change (an EMA update) or another tensor re-prepares, and the answers stay exact."""
    import vlm_kernels as vk

    device = "cpu" if not _REASON else "cuda"
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 16, generator=g).to(device)
    e = torch.randn(40, 16, generator=g).to(device)
    calls = []
    original = tvq._prepare_codebook

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tvq._PREPARED.clear()
    tvq._prepare_codebook = counting
    try:
        with vk.use_backend("triton"):
            for _ in range(2):
                assert torch.equal(vk.vq_nearest(x, e)[0].cpu(), ref.vq_nearest(x.cpu(), e.cpu(), -1, "l2")[0])
            assert len(calls) == 1
            e.mul_(-1.0)  # in place: the version counter moves
            assert torch.equal(vk.vq_nearest(x, e)[0].cpu(), ref.vq_nearest(x.cpu(), e.cpu(), -1, "l2")[0])
            assert len(calls) == 2
            e2 = e.clone()
            assert torch.equal(vk.vq_nearest(x, e2)[0].cpu(), ref.vq_nearest(x.cpu(), e.cpu(), -1, "l2")[0])
            assert len(calls) == 3
    finally:
        tvq._prepare_codebook = original
        tvq._PREPARED.clear()
