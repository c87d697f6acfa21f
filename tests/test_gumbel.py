"""Gumbel-softmax, Gumbel-argmax and KL-to-uniform: every backend against the reference, statistics,
extreme inputs, gradients, torch.library checks, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlm_kernels as vk
from vlm_kernels import _backend
from vlm_kernels.reference import gumbel as ref
from vlm_kernels.reference.philox import gumbel_noise, philox4, uniform_from_bits

# (shape, dim): odd sizes on purpose; dim=1 of NCHW is the dVAE layout.
CASES = [
    ((7,), 0),
    ((3, 5, 7), 0),
    ((3, 5, 7), 1),
    ((3, 5, 7), 2),
    ((4, 1), -1),
    ((5, 1000), -1),
    ((2, 37, 3, 5), 1),
    ((2, 3, 300), 1),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOFT_ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _dtypes_for(backend):
    return DTYPES + ((torch.float64,) if backend in ("reference", "cpu") else ())


# ---------------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.parametrize("shape,dim", CASES)
def test_forward_matches_reference(cpu_backend, shape, dim):
    for dtype in _dtypes_for(cpu_backend):
        x = _logits(shape, dtype)
        x_before = x.clone()
        d = dim % len(shape)
        for tau in (1.0, 0.3):
            with vk.use_backend(cpu_backend):
                soft = vk.gumbel_softmax(x, tau=tau, dim=dim, seed=1234)
                hard = vk.gumbel_softmax(x, tau=tau, hard=True, dim=dim, seed=1234)
                idx = vk.gumbel_argmax(x, dim=dim, seed=1234)
            assert soft.dtype == dtype and hard.dtype == dtype and idx.dtype == torch.int64
            torch.testing.assert_close(soft.double(), ref.gumbel_softmax_forward(x, 1234, tau, False, d).double(),
                                       atol=SOFT_ATOL[dtype], rtol=1e-3 if dtype != torch.float32 else 1e-5)
            assert torch.equal(hard, ref.gumbel_softmax_forward(x, 1234, tau, True, d)), (cpu_backend, dtype)
            assert torch.equal(idx, ref.gumbel_argmax(x, 1234, d))
            assert torch.equal(hard.argmax(d), idx)
        assert torch.equal(x, x_before), "the input logits were modified"


@pytest.mark.parametrize("shape,dim", CASES[1:])
def test_backward_matches_reference(cpu_backend, shape, dim):
    d = dim % len(shape)
    for dtype in _dtypes_for(cpu_backend):
        x = _logits(shape, dtype)
        dy = _logits(shape, dtype, scale=1.0, seed=1)
        for hard in (False, True):
            xr = x.clone().requires_grad_(True)
            with vk.use_backend(cpu_backend):
                y = vk.gumbel_softmax(xr, tau=0.7, hard=hard, dim=dim, seed=99)
                (gx,) = torch.autograd.grad(y, xr, dy)
            saved = x if hard else ref.gumbel_softmax_forward(x, 99, 0.7, False, d)
            expect = ref.gumbel_softmax_backward(dy, saved, 99, 0.7, hard, d)
            tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
            torch.testing.assert_close(gx.double(), expect.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape,dim", CASES)
def test_kl_uniform_matches_reference(cpu_backend, shape, dim):
    d = dim % len(shape)
    for dtype in _dtypes_for(cpu_backend):
        x = _logits(shape, dtype).requires_grad_(True)
        with vk.use_backend(cpu_backend):
            kl = vk.categorical_kl_uniform(x, dim=dim)
            (gx,) = torch.autograd.grad(kl.sum(), x)
        x64 = x.detach().double().requires_grad_(True)
        p = torch.softmax(x64, d)
        expect = (p * (torch.log_softmax(x64, d) + math.log(shape[d]))).sum(d)
        (gexpect,) = torch.autograd.grad(expect.sum(), x64)
        tol = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 2e-2)
        assert kl.dtype == dtype and kl.shape == expect.shape
        torch.testing.assert_close(kl.double(), expect, atol=tol * 10, rtol=tol)
        torch.testing.assert_close(gx.double(), gexpect, atol=tol, rtol=tol)


def test_low_precision_error_bounded_by_torch_own_error(cpu_backend):
    """fp16/bf16 soft samples: error vs a float64 computation at most ~2x PyTorch's own eager error."""
    shape, d = (64, 513), 1
    for dtype in (torch.float16, torch.bfloat16):
        x = _logits(shape, dtype)
        g = gumbel_noise(shape, 7)
        exact = torch.softmax((x.double() + g.double()) / 0.5, d)
        torch_own = torch.softmax((x + g.to(dtype)) / 0.5, d)  # PyTorch computing it at this precision
        with vk.use_backend(cpu_backend):
            ours = vk.gumbel_softmax(x, tau=0.5, dim=d, seed=7)
        torch_err = (torch_own.double() - exact).abs().max().item()
        our_err = (ours.double() - exact).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-6, (dtype, our_err, torch_err)


def test_same_seed_same_samples_across_backends():
    names = [b for b in ("reference", "cpu", "triton") if not _backend.device_reason(b, torch.device("cpu"))]
    x = _logits((6, 3, 50, 2), torch.float32)
    outs = {}
    for name in names:
        with vk.use_backend(name):
            outs[name] = (vk.gumbel_argmax(x, dim=2, seed=2**40 + 5),
                          vk.gumbel_softmax(x, hard=True, dim=2, seed=2**40 + 5),
                          vk.gumbel_softmax(x, dim=2, seed=2**40 + 5))
    base = outs[names[0]]
    for name in names[1:]:
        assert torch.equal(outs[name][0], base[0]) and torch.equal(outs[name][1], base[1]), name
        torch.testing.assert_close(outs[name][2], base[2], atol=2e-6, rtol=1e-5)


def test_seed_none_follows_torch_manual_seed():
    x = _logits((8, 100), torch.float32)
    torch.manual_seed(5)
    a = vk.gumbel_softmax(x)
    torch.manual_seed(5)
    b = vk.gumbel_softmax(x)
    c = vk.gumbel_softmax(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert not torch.equal(vk.gumbel_argmax(x, seed=1), vk.gumbel_argmax(x, seed=2))


def test_seed_accepts_tensor_and_full_64_bit_range():
    x = _logits((4, 30), torch.float32)
    assert torch.equal(vk.gumbel_argmax(x, seed=torch.tensor(17)), vk.gumbel_argmax(x, seed=17))
    # 2**64 - 1 and -1 are the same 64 bits.
    assert torch.equal(vk.gumbel_argmax(x, seed=2**64 - 1), vk.gumbel_argmax(x, seed=-1))


# ---------------------------------------------------------------------------------------------------
# Philox and noise


def test_philox_known_answers():
    # Philox4x32-10 words for counters 0..3, key 0 (Triton's tl.randint4x(0, counter)); the first words are
    # tl.randint(0, counter)'s.
    words = philox4(torch.arange(4), 0)
    assert words[0].tolist() == [1713891541, 4175744164, 83534633, 3381718825]
    assert [int(w[0]) for w in words] == [1713891541, 3781805453, 3159862348, 2600524760]


def test_noise_finite_at_every_uniform_extreme():
    bits = torch.tensor([0, 1, 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1])
    u = uniform_from_bits(bits)
    assert (u >= 0).all() and (u < 1).all() and (u[[0, 7]] == 0).all()  # tl.rand's mapping: 0 included
    from vlm_kernels.reference.philox import noise_from_bits

    g = noise_from_bits(bits)
    assert torch.isfinite(g).all(), g


def test_extreme_logits_never_nan_or_inf(cpu_backend):
    cases = [
        (torch.float32, 3.0e38),
        (torch.float16, 65504.0),
        (torch.bfloat16, 3.3e38),
    ]
    for dtype, big in cases:
        x = torch.tensor([[big, -big, 0.0, big], [-big, -big, -big, -big], [big, big, big, big],
                          [1e-30, -1e-30, 0.0, 0.0]], dtype=torch.float64).to(dtype)
        x = x.repeat(16, 1)
        for tau in (1e-3, 1.0, 1e4):
            with vk.use_backend(cpu_backend):
                soft = vk.gumbel_softmax(x, tau=tau, seed=3)
                hard = vk.gumbel_softmax(x, tau=tau, hard=True, seed=3)
                kl = vk.categorical_kl_uniform(x)
            assert torch.isfinite(soft).all() and torch.isfinite(hard).all() and torch.isfinite(kl).all(), (dtype, tau)
            torch.testing.assert_close(soft.double().sum(-1), torch.ones(x.shape[0], dtype=torch.float64),
                                       atol=2e-2, rtol=0)
            assert (hard.sum(-1) == 1).all()


def test_nan_row_stays_in_its_row(cpu_backend):
    x = _logits((5, 40), torch.float32)
    x[2, 7] = float("nan")
    with vk.use_backend(cpu_backend):
        soft = vk.gumbel_softmax(x, seed=1)
        hard = vk.gumbel_softmax(x, hard=True, seed=1)
        idx = vk.gumbel_argmax(x, seed=1)
        kl = vk.categorical_kl_uniform(x)
    assert torch.isnan(kl[2]) and torch.isfinite(kl[[0, 1, 3, 4]]).all()
    for out in (soft, hard):
        assert torch.isnan(out[2]).all()
        assert torch.isfinite(out[[0, 1, 3, 4]]).all()
    assert idx[2] == 7


# ---------------------------------------------------------------------------------------------------
# Statistics


def test_chi_square_argmax_and_hard_frequencies(cpu_backend):
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 200_000 if cpu_backend != "triton" else 20_000  # the Triton interpreter is slow
    logits = torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0, 0.7])
    probs = torch.softmax(logits.double(), 0).numpy()
    rows = logits.expand(n, -1).contiguous()
    with vk.use_backend(cpu_backend):
        samples = {"argmax": vk.gumbel_argmax(rows, seed=11)}
        for tau in (0.1, 1.0, 5.0):
            samples[f"hard tau={tau}"] = vk.gumbel_softmax(rows, tau=tau, hard=True, seed=100 + int(tau * 10)).argmax(-1)
    for name, idx in samples.items():
        counts = torch.bincount(idx, minlength=6).numpy()
        p_value = scipy_stats.chisquare(counts, probs * n).pvalue
        assert p_value > 1e-4, (name, counts, probs * n, p_value)


def test_soft_sample_distribution_matches_torch(cpu_backend):
    """Two-sample check of E[y] and E[y^2] against F.gumbel_softmax at two temperatures (dim=1, NCHW)."""
    n = 20_000 if cpu_backend != "triton" else 4_000
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0])
    x = logits.view(1, 4, 1).expand(n, 4, 1).contiguous()
    torch.manual_seed(0)
    for tau in (0.5, 2.0):
        with vk.use_backend(cpu_backend):
            ours = vk.gumbel_softmax(x, tau=tau, dim=1, seed=5).squeeze(-1).double()
        theirs = F.gumbel_softmax(x, tau=tau, dim=1).squeeze(-1).double()
        for stat in (lambda y: y, lambda y: y * y):
            a, b = stat(ours), stat(theirs)
            se = torch.sqrt(a.var(0) / n + b.var(0) / n)
            z = ((a.mean(0) - b.mean(0)).abs() / se).max().item()
            assert z < 5.0, (tau, z)


# ---------------------------------------------------------------------------------------------------
# Gradients, torch.library, torch.compile


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    reason = _backend.device_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    x = _logits((3, 4, 5), torch.float64, scale=1.0).requires_grad_(True)
    with vk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: vk.gumbel_softmax(t, tau=0.8, dim=1, seed=4), (x,))
        assert torch.autograd.gradcheck(lambda t: vk.categorical_kl_uniform(t, dim=2), (x,))
        # Straight-through: the hard sample's gradient is the soft sample's.
        (g_hard,) = torch.autograd.grad(vk.gumbel_softmax(x, tau=0.8, hard=True, dim=1, seed=4), x, x.detach().cos())
        (g_soft,) = torch.autograd.grad(vk.gumbel_softmax(x, tau=0.8, hard=False, dim=1, seed=4), x, x.detach().cos())
    torch.testing.assert_close(g_hard, g_soft, atol=1e-12, rtol=1e-12)


def test_opcheck_every_op():
    ops = torch.ops.vlm_kernels
    x = _logits((3, 6, 5), torch.float32).requires_grad_(True)
    seed = torch.tensor(42)
    y = vk.gumbel_softmax(x.detach(), dim=1, seed=42)
    samples = [
        (ops.gumbel_softmax_forward.default, (x, seed, 0.5, False, 1)),
        (ops.gumbel_softmax_forward.default, (x, seed, 0.5, True, 2)),
        (ops.gumbel_softmax_backward.default, (torch.randn(3, 6, 5), y, seed, 0.5, False, 1)),
        (ops.gumbel_softmax_backward.default, (torch.randn(3, 6, 5), x.detach(), seed, 0.5, True, 1)),
        (ops.gumbel_argmax.default, (x.detach(), seed, 1)),
        (ops.categorical_kl_uniform_forward.default, (x, 0)),
        (ops.categorical_kl_uniform_backward.default, (torch.randn(6, 5), x.detach(), 0)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_no_recompile():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def dvae_step(logits, tau):
        z = vk.gumbel_softmax(logits, tau=tau, hard=False, dim=1)  # seed drawn from torch's generator
        kl = vk.categorical_kl_uniform(logits, dim=1).mean()
        tokens = vk.gumbel_argmax(logits, dim=1)
        return (z * z).sum() + kl, tokens

    x = _logits((2, 16, 3, 3), torch.float32).requires_grad_(True)
    for step in range(2):
        torch.manual_seed(step)
        loss, tokens = dvae_step(x, 0.5)
        loss.backward()
        assert tokens.shape == (2, 3, 3)
    assert counter.frame_count == 1, "the second call recompiled"
    # Same seed drawn eagerly and compiled gives the same sample.
    torch.manual_seed(3)
    eager = vk.gumbel_softmax(x.detach(), tau=0.5, dim=1)
    torch.manual_seed(3)
    compiled = torch.compile(lambda t: vk.gumbel_softmax(t, tau=0.5, dim=1), backend="aot_eager", fullgraph=True)(x.detach())
    assert compiled.shape == eager.shape


# ---------------------------------------------------------------------------------------------------
# Dispatch


def test_forced_backend_that_cannot_run_raises():
    x = _logits((2, 5), torch.float32)
    with vk.use_backend("cuda"), pytest.raises(vk.BackendUnavailableError, match="cuda"):
        vk.gumbel_softmax(x, seed=0)
    with pytest.raises(ValueError, match="unknown backend"):
        with vk.use_backend("tpu"):
            pass


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("VLM_KERNELS_BACKEND", "reference")
    assert vk.forced_backend() == "reference"
    name, _ = vk.ops.gumbel.TABLE.select("softmax_forward", torch.device("cpu"))
    assert name == "reference"
    monkeypatch.setenv("VLM_KERNELS_BACKEND", "cuda")
    with pytest.raises(vk.BackendUnavailableError):
        vk.gumbel_argmax(_logits((2, 5), torch.float32), seed=0)


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setitem(_backend._cache, "cpu", _backend.Availability(False, "simulated missing extension"))
    monkeypatch.setattr(_backend, "_warned", set())
    x = _logits((2, 5), torch.float32)
    with pytest.warns(RuntimeWarning, match="simulated missing extension"):
        vk.gumbel_softmax(x, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vk.gumbel_softmax(x, seed=0)  # no second warning


def test_cuda_tensors_start_with_the_backend_chosen_per_layout(monkeypatch):
    """The automatic order on CUDA tensors follows ops.gumbel.CUDA_FIRST per entry and layout (decided from the
    offline sm_90 compile, flipped by the GPU check); a forced backend ignores it. No GPU needed: the choice
    only reads shapes and asks each backend whether it can run."""
    from vlm_kernels.ops import gumbel as ops

    cuda = torch.device("cuda")
    rows, cols = torch.empty(4, 8192), torch.empty(2, 8192, 4, 4)
    assert ops.cuda_layout(rows, 1) == "rows" and ops.cuda_layout(cols, 1) == "columns"
    assert ops.cuda_layout(torch.empty(2, 40000), 1) == "rows long"
    assert ops.cuda_layout(torch.empty(2, 9000, 3), 1) == "columns long"
    for entry, args in (("softmax_forward", (rows, 1, 1.0, False, 1)), ("argmax", (cols, 1, 1)),
                        ("softmax_backward", (cols, cols, 1, 1.0, False, 1))):
        first = ops.CUDA_FIRST[entry][ops.cuda_layout(args[1] if entry == "softmax_backward" else args[0], 1)]
        order = ops.TABLE.cuda_order(entry, *args)
        assert order[0] == first and sorted(order) == sorted(ops.TABLE.order["cuda"])
    # KL has no entry: the default order.
    assert ops.TABLE.cuda_order("kl_forward", rows, 1) == ops.TABLE.order["cuda"]
    if _backend.device_reason("triton", cuda):
        pytest.skip("triton cannot be chosen here")
    # Flipping an entry to cuda: tried first, and (no compiled CUDA kernels here) a warned fallback to triton.
    monkeypatch.setitem(ops.CUDA_FIRST, "argmax", dict(ops.CUDA_FIRST["argmax"], columns="cuda"))
    monkeypatch.setattr(_backend, "_warned", set())
    assert ops.TABLE.cuda_order("argmax", cols, 1, 1)[0] == "cuda"
    if _backend.device_reason("cuda", cuda):
        with pytest.warns(RuntimeWarning, match="falling back to the triton backend"):
            assert ops.TABLE.select("argmax", cuda, cols, 1, 1)[0] == "triton"
    with vk.use_backend("reference"):
        assert ops.TABLE.select("argmax", cuda, cols, 1, 1)[0] == "reference"


def test_info_lists_every_backend():
    text = vk.info()
    for name in vk.BACKENDS:
        assert name in text


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        vk.gumbel_softmax(torch.randn(2, 3), tau=tau)


@pytest.mark.parametrize("fn", [vk.gumbel_softmax, vk.gumbel_argmax, vk.categorical_kl_uniform])
def test_bad_logits(fn):
    with pytest.raises(TypeError, match=r"logits.*torch.int64"):
        fn(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"logits.*complex"):
        fn(torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"size 0.*\(2, 0\)"):
        fn(torch.ones(2, 0))
    with pytest.raises(IndexError, match=r"dim=3 is out of range.*\(2, 3\)"):
        fn(torch.ones(2, 3), dim=3)
    with pytest.raises(ValueError, match="0-dim"):
        fn(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([1.0, 2.0])


def test_bad_seed():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="seed"):
        vk.gumbel_softmax(x, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        vk.gumbel_softmax(x, seed=2**64)
    with pytest.raises(ValueError, match="seed"):
        vk.gumbel_softmax(x, seed=torch.tensor([1, 2]))


def test_empty_batch_is_fine(cpu_backend):
    with vk.use_backend(cpu_backend):
        assert vk.gumbel_softmax(torch.randn(0, 5), seed=1).shape == (0, 5)
        assert vk.gumbel_argmax(torch.randn(0, 5), seed=1).shape == (0,)
        assert vk.categorical_kl_uniform(torch.randn(0, 5)).shape == (0,)


# ---------------------------------------------------------------------------------------------------
# GPU (run by benchmarks/gpu_check.sh)


# GPU layouts beyond CASES (float32 only, to keep compiles few): aligned columns and rows (one Philox call
# per quad, vector access), columns past the one-read strip (two passes), long rows, rows whose group spans
# 2 warps with 2 groups in a block (K = 2000 on CUDA, K = 200 for the CUDA KL kernel), unaligned columns.
GPU_LAYOUTS = [((2, 9000, 8), 1), ((4, 300, 8), 1), ((2, 300, 6), 1), ((6, 2000), -1), ((5, 200), -1),
               ((3, 40000), -1), ((2, 8, 12), 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dim", CASES + [((8, 8192, 4, 4), 1), ((64, 8192), -1), ((3, 20000), -1)])
def test_gpu_matches_reference(gpu_backend, shape, dim):
    _gpu_matches_reference(gpu_backend, shape, dim, DTYPES)


@pytest.mark.cuda
@pytest.mark.parametrize("shape,dim", GPU_LAYOUTS)
def test_gpu_layouts_match_reference(gpu_backend, shape, dim):
    _gpu_matches_reference(gpu_backend, shape, dim, (torch.float32,))


def _gpu_matches_reference(gpu_backend, shape, dim, dtypes):
    d = dim % len(shape)
    for dtype in dtypes:
        x = _logits(shape, dtype)
        xc = x.cuda()
        with vk.use_backend(gpu_backend):
            soft = vk.gumbel_softmax(xc, tau=0.5, dim=dim, seed=77).cpu()
            hard = vk.gumbel_softmax(xc, tau=0.5, hard=True, dim=dim, seed=77).cpu()
            idx = vk.gumbel_argmax(xc, dim=dim, seed=77).cpu()
            kl = vk.categorical_kl_uniform(xc, dim=dim).cpu()
            dy = _logits(shape, dtype, scale=1.0, seed=1)
            grads = {}
            for hard_bwd in (False, True):
                xr = xc.clone().requires_grad_(True)
                (grads[hard_bwd],) = torch.autograd.grad(vk.gumbel_softmax(xr, tau=0.5, hard=hard_bwd, dim=dim, seed=77),
                                                         xr, dy.cuda())
        torch.testing.assert_close(soft.double(), ref.gumbel_softmax_forward(x, 77, 0.5, False, d).double(),
                                   atol=SOFT_ATOL[dtype], rtol=1e-3)
        assert torch.equal(hard, ref.gumbel_softmax_forward(x, 77, 0.5, True, d)), (gpu_backend, dtype, shape)
        assert torch.equal(idx, ref.gumbel_argmax(x, 77, d))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(kl.double(), ref.categorical_kl_uniform_forward(x, d).double(), atol=tol, rtol=tol)
        for hard_bwd, gx in grads.items():
            saved = x if hard_bwd else soft  # the soft backward takes the sample this backend produced
            torch.testing.assert_close(gx.cpu().double(),
                                       ref.gumbel_softmax_backward(dy, saved, 77, 0.5, hard_bwd, d).double(),
                                       atol=tol, rtol=tol)


@pytest.mark.cuda
def test_gpu_misaligned_views_and_same_bits_across_gpu_backends(gpu_backend):
    """A logits view whose data pointer is not 4-element aligned (storage offset 1) gives the reference's
    samples; argmax and hard samples are the same bits on every backend."""
    base = _logits((4 * 300 * 8 + 1,), torch.float32).cuda()
    for shape, dim in (((4, 300, 8), 1), ((8, 300), -1)):
        x = base[1:1 + math.prod(shape)].view(shape)
        with vk.use_backend(gpu_backend):
            hard = vk.gumbel_softmax(x, tau=0.5, hard=True, dim=dim, seed=2**32 + 3).cpu()
            soft = vk.gumbel_softmax(x, tau=0.5, dim=dim, seed=2**32 + 3).cpu()
            idx = vk.gumbel_argmax(x, dim=dim, seed=2**32 + 3).cpu()
        d = dim % len(shape)
        xc = x.cpu()
        assert torch.equal(hard, ref.gumbel_softmax_forward(xc, 2**32 + 3, 0.5, True, d))
        assert torch.equal(idx, ref.gumbel_argmax(xc, 2**32 + 3, d))
        torch.testing.assert_close(soft, ref.gumbel_softmax_forward(xc, 2**32 + 3, 0.5, False, d), atol=2e-6, rtol=1e-5)
