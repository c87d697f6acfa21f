"""Vector quantisation: every backend against a float64 oracle, gradients, ops, the layer, peers."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels.nn.vq import VectorQuantizer
from vlm_kernels.reference import vq as ref

DTYPE_BACKENDS = {"triton": (torch.float32, torch.float16, torch.bfloat16)}


def oracle(x: torch.Tensor, e: torch.Tensor, dim: int = -1, metric: str = "l2"):
    """Independent float64 answer by direct differences (small shapes only): (indices, distances)."""
    rows = x.movedim(dim, -1).reshape(-1, x.shape[dim]).double()
    ed = e.double()
    good = torch.isfinite(ed).all(1)
    # Lowest index among bit-identical codes.
    keep = torch.ones(e.shape[0], dtype=torch.bool)
    seen = {}
    for k in range(e.shape[0]):
        key = e[k].contiguous().view(torch.uint8).numpy().tobytes()
        if key in seen:
            keep[k] = False
        seen.setdefault(key, k)
    idx, dist = [], []
    for start in range(0, rows.shape[0], 16):
        r = rows[start:start + 16]
        if metric == "l2":
            d = ((r[:, None, :] - ed[None]) ** 2).sum(-1)
        else:
            cos = (r @ ed.T) / (r.norm(dim=1, keepdim=True).clamp_min(1e-12) * ed.norm(dim=1).clamp_min(1e-12))
            d = 1.0 - cos
        d = torch.where((good & keep)[None], d, torch.full_like(d, float("inf")))
        d = torch.nan_to_num(d, nan=float("inf"))
        i = d.argmin(1)
        idx.append(i)
        dist.append(d.gather(1, i[:, None])[:, 0])
    idx, dist = torch.cat(idx), torch.cat(dist)
    bad = ~torch.isfinite(rows).all(1) | ~good.any()
    idx = torch.where(bad, torch.zeros_like(idx), idx)
    dist = torch.where(bad, torch.full_like(dist, float("nan")), dist)
    shape = list(x.shape)
    del shape[dim]
    return idx.reshape(shape), dist.float().reshape(shape)


def skip_unsupported(backend, dtype):
    allowed = DTYPE_BACKENDS.get(backend)
    if allowed is not None and dtype not in allowed:
        pytest.skip(f"{backend} takes {allowed}, not {dtype}")


def nearest(backend, x, e, **kw):
    with vk.use_backend(backend):
        return vk.vq_nearest(x, e, **kw)


def assert_matches_oracle(backend, x, e, dim=-1, metric="l2"):
    i, d = nearest(backend, x, e, dim=dim, metric=metric)
    io, do = oracle(x, e, dim, metric)
    assert i.dtype == torch.int64 and d.dtype == torch.float32
    mismatch = (i != io).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} indices differ from float64, e.g. at {mismatch[:3].tolist()}"
    torch.testing.assert_close(d, do, rtol=2e-6, atol=1e-6 if metric == "cosine" else 0.0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# Nearest code: exactness on random and offset data, odd shapes, both metrics, dtypes, layouts.


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,d,k", [(300, 3, 1), (300, 64, 1000), (257, 257, 1000), (70, 256, 8192)])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_nearest_matches_float64(cpu_backend, metric, n, d, k, offset):
    g = torch.Generator().manual_seed(n + d + k)
    x = torch.randn(n, d, generator=g) + offset
    e = torch.randn(k, d, generator=g) + offset
    assert_matches_oracle(cpu_backend, x, e, metric=metric)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nearest_dtypes(cpu_backend, dtype):
    skip_unsupported(cpu_backend, dtype)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 50, 64, generator=g) + 10).to(dtype)
    e = (torch.randn(500, 64, generator=g) + 10).to(dtype)
    assert_matches_oracle(cpu_backend, x, e)
    assert_matches_oracle(cpu_backend, x, e, metric="cosine")


def test_offset_data_defeats_the_naive_expanded_form():
    """The case the re-scoring exists for: fp32 |x|^2 - 2x.e + |e|^2 picks wrong codes here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 64, generator=g) * 0.01 + 1000
    e = torch.randn(512, 64, generator=g) * 0.01 + 1000
    naive = ((x * x).sum(1, keepdim=True) - 2 * x @ e.T + (e * e).sum(1)).argmin(1)
    exact, _ = oracle(x, e)
    assert (naive != exact).float().mean() > 0.1
    with vk.use_backend("cpu" if not vk._backend.device_reason("cpu", torch.device("cpu")) else "reference"):
        ours, _ = vk.vq_nearest(x, e)
    assert torch.equal(ours, exact)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_channel_first_layout(cpu_backend, metric):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 9, 13, generator=g)
    e = torch.randn(100, 48, generator=g)
    i1, d1 = nearest(cpu_backend, x, e, dim=1, metric=metric)
    i2, d2 = nearest(cpu_backend, x.permute(0, 2, 3, 1).contiguous(), e, metric=metric)
    assert i1.shape == (2, 9, 13)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2)
    assert_matches_oracle(cpu_backend, x, e, dim=1, metric=metric)


def test_ties_go_to_the_lowest_index(cpu_backend):
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 3.0]])
    i, d = nearest(cpu_backend, x, e)
    assert i.tolist() == [0, 0, 0, 2]
    assert d.tolist() == [1.0, 0.0, 0.5, 4.0]


def test_duplicate_codes(cpu_backend):
    g = torch.Generator().manual_seed(5)
    e = torch.randn(10, 16, generator=g).repeat(40, 1)  # every code 40 times
    x = torch.randn(300, 16, generator=g)
    i, _ = nearest(cpu_backend, x, e)
    assert int(i.max()) < 10
    assert_matches_oracle(cpu_backend, x, e)
    same = torch.zeros(64, 16)  # an all-zero (e.g. freshly initialised) codebook
    i, d = nearest(cpu_backend, x, same)
    assert torch.equal(i, torch.zeros_like(i))


def test_near_duplicate_codes_overflow_the_candidates(cpu_backend):
    """More near-equal codes than the kernels keep per row: the exact fallback scan must run."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(1, 32, generator=g) + 50
    e = base + torch.randn(200, 32, generator=g) * 1e-5
    x = base + torch.randn(40, 32, generator=g) * 1e-5
    assert_matches_oracle(cpu_backend, x, e)


@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpu_tile_precisions(monkeypatch, tiles, metric):
    """The CPU kernel's float32 and bf16 GEMM tiles give the same (exact) answer, offset data included."""
    if vk._backend.device_reason("cpu", torch.device("cpu")):
        pytest.skip("the cpu backend is not built")
    monkeypatch.setenv("VLM_KERNELS_VQ_CPU_TILES", tiles)
    g = torch.Generator().manual_seed(13)
    for offset in (0.0, 300.0):
        x = torch.randn(600, 96, generator=g) + offset
        e = torch.randn(2500, 96, generator=g) + offset
        assert_matches_oracle("cpu", x, e, metric=metric)


def test_cpu_bf16_window_overflow_is_redone_in_fp32(monkeypatch):
    """All codes sit within the bf16 tiles' error window but are far apart for fp32 tiles: every row
    overflows its bf16 candidates and must be redone, and still find the exact code."""
    if vk._backend.device_reason("cpu", torch.device("cpu")):
        pytest.skip("the cpu backend is not built")
    monkeypatch.setenv("VLM_KERNELS_VQ_CPU_TILES", "bf16")
    g = torch.Generator().manual_seed(14)
    d, k, r = 64, 100, 4.0
    axis = torch.zeros(d)
    axis[0] = 1.0
    v = torch.randn(k, d, generator=g)
    v[:, 0] = 0.0
    v = v / v.norm(dim=1, keepdim=True) * (r * torch.sqrt(1 + 0.002 * torch.randperm(k, generator=g).float()))[:, None]
    e = v + 3.0 * axis
    x = (3.0 + r) * axis + 1e-3 * torch.randn(50, d, generator=g)
    x[:, 0] = 3.0 + r
    assert_matches_oracle("cpu", x, e)


def test_non_finite_rows_and_codes(cpu_backend):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 8, generator=g)
    e = torch.randn(30, 8, generator=g)
    x[3, 2] = float("nan")
    x[5, 0] = float("inf")
    e[4] = float("nan")
    e[9, 1] = float("-inf")
    x[6] = e[4].nan_to_num(0) * 0 + 1e-3  # a clean row
    i, d = nearest(cpu_backend, x, e)
    assert i[3] == 0 and torch.isnan(d[3]) and i[5] == 0 and torch.isnan(d[5])
    assert not ((i == 4) | (i == 9)).any()
    clean = torch.ones(20, dtype=torch.bool)
    clean[[3, 5]] = False
    io, do = oracle(x, e)
    assert torch.equal(i, io) and torch.isfinite(d[clean]).all()
    i_all, d_all = nearest(cpu_backend, x[:2].clone().nan_to_num(0), torch.full((4, 8), float("nan")))
    assert torch.equal(i_all, torch.zeros(2, dtype=torch.int64)) and torch.isnan(d_all).all()


def test_inputs_are_not_modified(cpu_backend):
    x = torch.randn(40, 16) + 3
    e = torch.randn(50, 16) + 3
    x0, e0 = x.clone(), e.clone()
    nearest(cpu_backend, x, e)
    nearest(cpu_backend, x, e, metric="cosine")
    assert torch.equal(x, x0) and torch.equal(e, e0)


# ---------------------------------------------------------------------------------------------------
# Code statistics.


@pytest.mark.parametrize("dim", [-1, 1])
def test_code_stats(cpu_backend, dim):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 33, 7, generator=g) if dim == 1 else torch.randn(5, 41, 33, generator=g)
    rows_shape = list(x.shape)
    del rows_shape[dim]
    k = 50
    idx = torch.randint(0, k - 10, rows_shape, generator=g)  # the last 10 codes get no rows
    with vk.use_backend(cpu_backend):
        counts, sums = vk.vq_code_stats(x, idx, k, dim=dim)
    rows = x.movedim(dim, -1).reshape(-1, x.shape[dim]).double()
    expect_sums = torch.zeros(k, x.shape[dim], dtype=torch.float64).index_add_(0, idx.reshape(-1), rows)
    expect_counts = torch.bincount(idx.reshape(-1), minlength=k)
    assert counts.dtype == torch.float32 and sums.shape == (k, x.shape[dim])
    assert torch.equal(counts, expect_counts.float())
    torch.testing.assert_close(sums, expect_sums.float(), rtol=1e-5, atol=1e-5)


def test_code_stats_rejects_out_of_range_indices():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        vk.vq_code_stats(x, torch.full((10,), 5), 5)
    with pytest.raises(ValueError, match="indices must have x's shape"):
        vk.vq_code_stats(x, torch.zeros(9, dtype=torch.int64), 5)
    with pytest.raises(TypeError, match="int64"):
        vk.vq_code_stats(x, torch.zeros(10, dtype=torch.int32), 5)


# ---------------------------------------------------------------------------------------------------
# Straight-through quantiser: values, gradients, gradcheck.


def _quantize_by_hand(x, e, beta, codebook_weight, dim):
    idx, _ = oracle(x.detach(), e.detach(), dim)
    q = e[idx].movedim(-1, dim) if dim != -1 else e[idx]
    mse_codebook = ((x.detach() - q) ** 2).mean()
    mse_commit = ((x - q.detach()) ** 2).mean()
    return x + (q - x).detach(), idx, codebook_weight * mse_codebook + beta * mse_commit


@pytest.mark.parametrize("dim", [-1, 1])
def test_quantize_values_and_gradients(cpu_backend, dim):
    g = torch.Generator().manual_seed(9)
    shape = (2, 24, 5, 6) if dim == 1 else (4, 30, 24)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    e = torch.randn(64, 24, generator=g, dtype=torch.float64)
    if cpu_backend == "triton":
        x, e = x.float(), e.float()
    grad_q = torch.randn(shape, generator=g, dtype=x.dtype)
    outs = []
    for how in ("ours", "hand"):
        xr = x.clone().requires_grad_()
        er = e.clone().requires_grad_()
        if how == "ours":
            with vk.use_backend(cpu_backend):
                q, idx, loss = vk.vq_quantize(xr, er, beta=0.3, dim=dim, codebook_weight=0.7)
        else:
            q, idx, loss = _quantize_by_hand(xr, er, 0.3, 0.7, dim)
        (loss * 3.0 + (q * grad_q).sum()).backward()
        outs.append((q.detach(), idx, loss.detach(), xr.grad, er.grad))
    ours, hand = outs
    assert torch.equal(ours[1], hand[1])
    torch.testing.assert_close(ours[0], hand[0])
    for a, b in zip(ours[2:], hand[2:]):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-5, atol=1e-6)


def test_gradcheck_codebook_and_commitment_gradients():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    e = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    backend = "cpu" if not vk._backend.device_reason("cpu", torch.device("cpu")) else "reference"
    with vk.use_backend(backend):
        # The codebook loss is a smooth function of the codes (the assignment is locally constant).
        assert torch.autograd.gradcheck(lambda cb: vk.vq_quantize(x, cb, beta=0.0)[2], (e,))
        xg = x.clone().requires_grad_()
        # The commitment loss of x with the codes held fixed.
        assert torch.autograd.gradcheck(lambda xx: vk.vq_quantize(xx, e.detach(), beta=1.0, codebook_weight=0.0)[2], (xg,))
        # The straight-through output's gradient to x is the identity.
        q, _, _ = vk.vq_quantize(xg, e.detach())
        gq = torch.randn_like(q)
        (grad_x,) = torch.autograd.grad(q, xg, gq)
        assert torch.equal(grad_x, gq)


def test_opcheck():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, 8, generator=g)
    e = torch.randn(12, 8, generator=g)
    xg = x.clone().requires_grad_()
    eg = e.clone().requires_grad_()
    ops = torch.ops.vlm_kernels
    torch.library.opcheck(ops.vq_nearest, (x, e, 2, "l2"))
    torch.library.opcheck(ops.vq_nearest, (x.permute(0, 2, 1).contiguous(), e, 1, "cosine"))
    idx, _ = ops.vq_nearest(x, e, 2, "l2")
    torch.library.opcheck(ops.vq_code_stats, (x, idx, 12, 2))
    torch.library.opcheck(ops.vq_quantize_forward, (xg, eg, 0.25, 1.0, 2))
    q, idx, loss = ops.vq_quantize_forward(x, e, 0.25, 1.0, 2)
    torch.library.opcheck(ops.vq_quantize_backward, (torch.randn_like(q), torch.tensor(1.0), x, e, idx, 0.25, 1.0, 2))


# ---------------------------------------------------------------------------------------------------
# EMA update.


def test_ema_update_matches_the_formula():
    g = torch.Generator().manual_seed(12)
    k, d = 16, 6
    x = torch.randn(200, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    cluster = torch.rand(k, generator=g) + 0.5
    avg = codebook * cluster[:, None]
    idx, _ = vk.vq_nearest(x, codebook)
    c0, a0 = cluster.clone(), avg.clone()
    stats = vk.vq_ema_update_(codebook, cluster, avg, x, idx, decay=0.9, eps=1e-5)
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, d).index_add_(0, idx, x)
    exp_c = 0.9 * c0 + 0.1 * counts
    exp_a = 0.9 * a0 + 0.1 * sums
    n = exp_c.sum()
    smoothed = (exp_c + 1e-5) / (n + k * 1e-5) * n
    torch.testing.assert_close(cluster, exp_c)
    torch.testing.assert_close(avg, exp_a)
    torch.testing.assert_close(codebook, exp_a / smoothed[:, None])
    p = counts / counts.sum()
    torch.testing.assert_close(stats["perplexity"], torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    assert int(stats["dead"]) == 0


def test_dead_codes_are_reinitialised_from_the_batch():
    torch.manual_seed(0)
    k, d = 32, 4
    x = torch.randn(100, d) + 5
    codebook = torch.randn(k, d)
    codebook[0] = 5.0  # the only code near the data
    cluster = torch.ones(k)
    avg = codebook.clone()
    idx, _ = vk.vq_nearest(x, codebook)
    stats = vk.vq_ema_update_(codebook, cluster, avg, x, idx, decay=0.5, threshold_dead=0.6)
    dead = int(stats["dead"])
    assert dead >= k - 5
    replaced = cluster == 0.6
    assert int(replaced.sum()) == dead
    # Every replaced code is now one of the batch's rows.
    dist = ((codebook[replaced][:, None] - x[None]) ** 2).sum(-1).min(1).values
    assert torch.all(dist == 0)


# ---------------------------------------------------------------------------------------------------
# The layer.


def test_layer_matches_vector_quantize_pytorch_indices():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    for cosine in (False, True):
        theirs = vqp.VectorQuantize(dim=32, codebook_size=300, decay=0.9, use_cosine_sim=cosine).eval()
        ours = VectorQuantizer(32, 300, decay=0.9, use_cosine_sim=cosine)
        ours.load_state_dict(theirs.state_dict())  # their names and (1, K, D) shapes load unchanged
        ours.eval()
        x = torch.randn(4, 60, 32)
        q1, i1, _ = theirs(x)
        q2, i2, _ = ours(x)
        assert torch.equal(i1, i2)
        torch.testing.assert_close(q1, q2)
        fmap_theirs = vqp.VectorQuantize(dim=32, codebook_size=300, accept_image_fmap=True, use_cosine_sim=cosine).eval()
        fmap_ours = VectorQuantizer(32, 300, decay=0.9, accept_image_fmap=True, use_cosine_sim=cosine).eval()
        fmap_ours.load_state_dict(fmap_theirs.state_dict())
        img = torch.randn(2, 32, 5, 7)
        assert torch.equal(fmap_theirs(img)[1], fmap_ours(img)[1])


@pytest.mark.parametrize("decay", [None, 0.8])
def test_layer_trains(decay):
    torch.manual_seed(0)
    centres = torch.randn(8, 16) * 4
    data = (centres[torch.randint(0, 8, (1024,))] + 0.1 * torch.randn(1024, 16))
    layer = VectorQuantizer(16, 8, decay=decay, commitment_weight=0.25,
                            threshold_ema_dead_code=0 if decay is None else 1.0)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05) if decay is None else None
    losses = []
    for _ in range(60):
        x = data.clone().requires_grad_()
        q, idx, loss = layer(x)
        losses.append(float(loss.detach()))
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_usage_counts_the_codes_picked_in_the_last_batch():
    torch.manual_seed(0)
    for decay in (None, 0.9):
        layer = VectorQuantizer(4, 16, decay=decay, threshold_ema_dead_code=0 if decay is None else 5.0)
        x = torch.randn(64, 4)
        _, idx, _ = layer(x)
        expected = torch.unique(idx).numel() / 16
        usage = layer.usage()
        assert float(usage["used_fraction"]) == pytest.approx(expected)
        counts = torch.bincount(idx, minlength=16).float()
        torch.testing.assert_close(usage["perplexity"], vk.perplexity(counts))


def test_kmeans_init_starts_near_the_clusters():
    torch.manual_seed(0)
    centres = torch.randn(8, 16) * 4
    data = centres[torch.randint(0, 8, (1024,))] + 0.1 * torch.randn(1024, 16)
    random_init = VectorQuantizer(16, 8, decay=0.8)
    kmeans = VectorQuantizer(16, 8, decay=0.8, kmeans_init=True)
    assert not kmeans._initted and not bool(kmeans.initted)
    _, _, loss_kmeans = kmeans(data)
    _, _, loss_random = random_init(data)
    assert kmeans._initted and bool(kmeans.initted)
    assert float(loss_kmeans.detach()) < 0.1 * float(loss_random.detach())


def test_layer_compiles_without_recompiling():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = VectorQuantizer(16, 32, decay=0.9, threshold_ema_dead_code=0.5)
    x = torch.randn(64, 16)
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for _ in range(3):
        xg = x.clone().requires_grad_()
        q, idx, loss = compiled(xg)
        (loss + q.sum()).backward()
    assert counts["frames"] == 1
    learned = VectorQuantizer(16, 32, decay=None)  # a learned codebook (the default is an EMA codebook)
    step = torch.compile(learned, fullgraph=True)
    for _ in range(2):
        xg = x.clone().requires_grad_()
        q, idx, loss = step(xg)
        loss.backward()
    assert learned.embed.grad is not None


def test_layer_bad_input():
    layer = VectorQuantizer(8, 16)
    with pytest.raises(ValueError, match=r"size 8 along the last dim, got shape \(3, 7\)"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        VectorQuantizer(8, 16, accept_image_fmap=True)(torch.randn(3, 8))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, 16, decay=1.5)


def test_op_bad_input():
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"D = 8 .* codebook has D = 7"):
        vk.vq_nearest(x, torch.randn(3, 7))
    with pytest.raises(ValueError, match="K = 0"):
        vk.vq_nearest(x, torch.randn(0, 8))
    with pytest.raises(TypeError, match="floating-point"):
        vk.vq_nearest(x.long(), torch.randn(3, 8))
    with pytest.raises(TypeError, match="same dtype"):
        vk.vq_nearest(x, torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="same device"):
        vk.vq_nearest(x, torch.randn(3, 8, device="meta"))
    with pytest.raises(IndexError, match="dim=2 is out of range"):
        vk.vq_nearest(x, torch.randn(3, 8), dim=2)
    with pytest.raises(ValueError, match="metric"):
        vk.vq_nearest(x, torch.randn(3, 8), metric="dot")
    with pytest.raises(ValueError, match="beta"):
        vk.vq_quantize(x, torch.randn(3, 8), beta=-1)


# ---------------------------------------------------------------------------------------------------
# GPU (run by benchmarks/gpu_check.sh on a lent GPU; skipped here).


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_nearest_matches_float64(metric, dtype):
    g = torch.Generator().manual_seed(20)
    for n, d, k, offset in [(1000, 64, 1000, 0.0), (4099, 256, 8192, 0.0), (777, 257, 1000, 1000.0), (300, 3, 1, 0.0)]:
        x = (torch.randn(n, d, generator=g) + offset).to(dtype)
        e = (torch.randn(k, d, generator=g) + offset).to(dtype)
        i, dist = vk.vq_nearest(x.cuda(), e.cuda(), metric=metric)
        io, do = oracle(x, e, metric=metric)
        assert torch.equal(i.cpu(), io), f"{(i.cpu() != io).sum()} indices differ (n={n}, d={d}, k={k})"
        torch.testing.assert_close(dist.cpu(), do, rtol=2e-6, atol=1e-6 if metric == "cosine" else 0.0)


@pytest.mark.cuda
def test_gpu_channel_first_and_layer_step():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 64, 17, 19, generator=g)
    e = torch.randn(512, 64, generator=g)
    i1, _ = vk.vq_nearest(x.cuda(), e.cuda(), dim=1)
    assert torch.equal(i1.cpu(), oracle(x, e, dim=1)[0])
    layer = VectorQuantizer(64, 512, decay=0.9, accept_image_fmap=True, threshold_ema_dead_code=1.0).cuda()
    xg = x.cuda().requires_grad_()
    q, idx, loss = layer(xg)
    (loss + q.sum()).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    counts, sums = vk.vq_code_stats(x.cuda(), idx, 512, dim=1)
    c_ref, s_ref = ref.vq_code_stats(x, idx.cpu(), 512, 1)
    assert torch.equal(counts.cpu(), c_ref)
    torch.testing.assert_close(sums.cpu(), s_ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Distributed: two gloo ranks with different data keep identical codebooks.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different data (and different local random draws) per rank
    layer = VectorQuantizer(8, 32, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.0)
    assert layer._sync()
    for _ in range(4):
        x = torch.randn(256, 8) * (1 + rank) + rank
        q, idx, loss = layer(x.requires_grad_())
        loss.backward()
    gathered = [torch.empty_like(layer.embed) for _ in range(world)]
    dist.all_gather(gathered, layer.embed)
    torch.save({"embeds": gathered, "cluster": layer.cluster_size}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_codebooks_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["embeds"][0], r0["embeds"][1])
    assert torch.equal(r0["cluster"], r1["cluster"])
    assert r0["embeds"][0].abs().sum() > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
