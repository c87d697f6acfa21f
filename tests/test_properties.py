"""Property-based tests (issue 12, hypothesis): every op and its backward, on every backend, against the
reference backend, on drawn inputs:

* shapes with sizes 1, primes and window-size remainders; every softmax/vector dim; every dtype the
  backend takes;
* layouts: contiguous, sliced (non-contiguous), transposed, expanded (stride 0), channels_last and a
  storage offset; the reference always gets a contiguous copy of the same values;
* values: normal at a drawn scale, with NaN, +-inf, huge and tiny values at random places;
* ``VectorQuantizer``: random sequences of train / eval / backward calls, on two layers started equal,
  one on the reference backend, compared after every call.

CI runs a fixed budget (derandomised, a few examples per test, no example database);
``VLM_KERNELS_HYPOTHESIS=long`` runs 25 times as many random examples and prints a
``@reproduce_failure`` blob for anything it finds. A finding becomes a regular test: add its inputs
as an ``@example`` below (or a case in test_nonfinite.py) once understood.

Window attention: the backward of inputs holding NaN/inf is compared only on the backends in
``NONFINITE_BACKWARD`` (test_nonfinite.py holds the others to the contract case by case, with strict
xfails naming what they do now); finite inputs, huge and tiny values included, are compared everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import vlm_kernels as vk  # noqa: E402
from vlm_kernels import _backend  # noqa: E402

from _robust import HYPOTHESIS_MODE, assert_matches, hypothesis_settings  # noqa: E402

SIZES = (1, 2, 3, 5, 7, 11, 13)
BACKENDS = ["reference", "cpu", "triton"]
NONFINITE_BACKWARD = {"reference", "cpu", "triton"}  # every backend meets the window-attention contract
DTYPES = {"reference": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
          "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
          "triton": (torch.float32, torch.float16, torch.bfloat16)}


def _examples(backend: str, cheap: int) -> int:
    """Examples per test in the CI budget (VLM_KERNELS_ROBUST=long: 25 x ``cheap``): the interpreted
    Triton backend takes seconds per example, so it gets one or two in CI."""
    if HYPOTHESIS_MODE == "long":
        return cheap
    return max(1, cheap // 20) if backend == "triton" else max(3, cheap // 3)


def _skip_unless_runs(backend: str) -> None:
    reason = _backend.device_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(f"{backend}: {reason}")


def settings_for(backend: str, cheap: int):
    return hypothesis_settings(_examples(backend, cheap))


# ----------------------------------------------------------------------------------------------------
# drawn tensors


def _huge(dtype):
    # float64: below 1.3e154, whose square is the largest float64 (beyond it the float64 answer itself
    # overflows, and the contract says nothing about cosines of such vectors)
    return {torch.float16: 6e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e150}[dtype]


def _tiny(dtype):
    return {torch.float16: 1e-7, torch.bfloat16: 1e-38, torch.float32: 1e-40, torch.float64: 1e-310}[dtype]


SPECIALS = ("nan", "+inf", "-inf", "huge", "-huge", "tiny", "zero")


def _layout(values: torch.Tensor, layout: str, draw) -> torch.Tensor:
    shape = values.shape
    if layout == "sliced":
        big = torch.zeros(*shape[:-1], shape[-1] * 2 + 1, dtype=values.dtype)
        big[..., 1::2] = values
        return big[..., 1::2]
    if layout == "transposed":
        perm = list(range(values.dim()))[::-1]
        inverse = sorted(range(len(perm)), key=perm.__getitem__)
        return values.permute(perm).contiguous().permute(inverse)
    if layout == "expanded":
        d = draw(st.sampled_from([i for i, s in enumerate(shape) if s > 1] or [0]))
        return values.narrow(d, 0, 1).expand(shape)
    if layout == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "offset":
        off = draw(st.integers(1, 7))
        storage = torch.zeros(values.numel() + off, dtype=values.dtype)
        storage[off:] = values.reshape(-1)
        return storage[off:].view(shape)
    return values


LAYOUTS = ("contiguous", "sliced", "transposed", "expanded", "channels_last", "offset")


@st.composite
def tensors(draw, shape, dtype, *, specials=SPECIALS, max_specials=3, layouts=LAYOUTS, scale=None, huge=None):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0])) if scale is None else scale
    values = (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)
    flat = values.view(-1)
    if flat.numel() and specials:
        for _ in range(draw(st.integers(0, max_specials))):
            i = draw(st.integers(0, flat.numel() - 1))
            kind = draw(st.sampled_from(specials))
            big = _huge(dtype) if huge is None else min(huge, _huge(dtype))
            flat[i] = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "huge": big,
                       "-huge": -big, "tiny": _tiny(dtype), "zero": 0.0}[kind]
    return _layout(values, draw(st.sampled_from(layouts)), draw)


def _has_nonfinite(*ts) -> bool:
    return any(t is not None and not torch.isfinite(t).all() for t in ts)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _leaf_like(t):
    """A leaf with ``t``'s values and layout (strides, offset, expansion)."""
    return t.detach().requires_grad_(True) if t.is_leaf and not t.requires_grad else _leaf(t)


# ----------------------------------------------------------------------------------------------------
# Gumbel


@st.composite
def gumbel_cases(draw, backend):
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from(SIZES)) for _ in range(ndim)]
    dtype = draw(st.sampled_from(DTYPES[backend]))
    logits = draw(tensors(shape, dtype))
    grad = draw(tensors(shape, dtype, specials=("nan", "+inf", "zero"), max_specials=1, scale=1.0))
    return dict(logits=logits, grad=grad, dim=draw(st.integers(-ndim, ndim - 1)),
                tau=draw(st.sampled_from([1e-3, 0.5, 1.0, 10.0])), seed=draw(st.integers(0, 2 ** 63 - 1)))


def _gumbel_all(backend, c):
    """Every Gumbel op on ``c``: soft and hard samples with their gradients, argmax, KL and its gradient."""
    out = {}
    with vk.use_backend(backend):
        for hard in (False, True):
            x = _leaf_like(c["logits"])
            y = vk.gumbel_softmax(x, c["tau"], hard, c["dim"], seed=c["seed"])
            y.backward(c["grad"])
            out[f"sample hard={hard}"], out[f"dlogits hard={hard}"] = y.detach(), x.grad
        out["argmax"] = vk.gumbel_argmax(c["logits"], c["dim"], seed=c["seed"])
        x = _leaf_like(c["logits"])
        kl = vk.categorical_kl_uniform(x, c["dim"])
        kl.backward(c["grad"].select(c["dim"], 0))
        out["kl"], out["dkl"] = kl.detach(), x.grad
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_gumbel_ops_match_the_reference(backend):
    _skip_unless_runs(backend)

    @settings_for(backend, 40)
    @given(gumbel_cases(backend))
    def check(c):
        got = _gumbel_all(backend, c)
        contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        expect = _gumbel_all("reference", contiguous)
        dtype = c["logits"].dtype
        for name in expect:
            assert_matches(got[name], expect[name], name, dtype=dtype, scale=4.0)

    check()


# ----------------------------------------------------------------------------------------------------
# VQ


@st.composite
def vq_cases(draw, backend):
    channel_first = draw(st.booleans())
    d, k = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    lead = [draw(st.sampled_from(SIZES)) for _ in range(draw(st.integers(1, 3)))]
    shape = [lead[0], d] + lead[1:] if channel_first else lead + [d]
    dtype = draw(st.sampled_from(DTYPES[backend]))
    x = draw(tensors(shape, dtype))
    codebook = draw(tensors((k, d), dtype, max_specials=1, layouts=("contiguous", "transposed", "offset", "sliced")))
    rows = 1
    for s in lead:
        rows *= s
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    indices = torch.randint(0, k, (rows,), generator=g).reshape([s for i, s in enumerate(shape) if i != (1 if
                                                                 channel_first else len(shape) - 1)])
    grad = draw(tensors(shape, dtype, specials=(), scale=1.0, layouts=("contiguous",)))
    return dict(x=x, codebook=codebook, dim=1 if channel_first else -1, metric=draw(st.sampled_from(["l2", "cosine"])),
                indices=indices, grad=grad, beta=draw(st.sampled_from([0.0, 0.25, 2.0])),
                codebook_weight=draw(st.sampled_from([0.0, 1.0])))


def _vq_all(backend, c):
    out = {}
    with vk.use_backend(backend):
        out["index"], out["distance"] = vk.vq_nearest(c["x"], c["codebook"], dim=c["dim"], metric=c["metric"])
        x, e = _leaf_like(c["x"]), _leaf_like(c["codebook"])
        q, idx, loss = vk.vq_quantize(x, e, dim=c["dim"], beta=c["beta"], codebook_weight=c["codebook_weight"])
        ((q * c["grad"]).sum() + loss).backward()
        out.update(quantized=q.detach(), quantize_index=idx, loss=loss.detach(), dx=x.grad, dcodebook=e.grad)
        out["counts"], out["sums"] = vk.vq_code_stats(c["x"], c["indices"], c["codebook"].shape[0], dim=c["dim"])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_vq_ops_match_the_reference(backend):
    _skip_unless_runs(backend)

    @settings_for(backend, 40)
    @given(vq_cases(backend))
    def check(c):
        got = _vq_all(backend, c)
        contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        expect = _vq_all("reference", contiguous)
        dtype = c["x"].dtype
        for name in expect:
            # distances and the loss are float32 sums of float64-exact terms; dx/dcodebook are sums too
            exact = name in ("index", "quantize_index", "counts")
            assert_matches(got[name], expect[name], name, dtype=torch.float64 if exact else dtype, scale=8.0)

    check()


# ----------------------------------------------------------------------------------------------------
# window attention


@st.composite
def window_cases(draw, backend):
    mh, mw = draw(st.sampled_from((1, 2, 3, 4, 7))), draw(st.sampled_from((1, 2, 3, 4, 7)))
    # map sizes: 1, primes, and window multiples +- 1 (remainders that pad)
    h = draw(st.sampled_from(sorted({1, 2, 3, 5, 7, 11, mh, mh + 1, 2 * mh - 1})))
    w = draw(st.sampled_from(sorted({1, 2, 3, 5, 7, 13, mw, mw + 1, 2 * mw - 1})))
    sh, sw = draw(st.integers(0, mh - 1)), draw(st.integers(0, mw - 1))
    heads, d = draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from((1, 2, 3, 5, 8)))
    dtype = draw(st.sampled_from(DTYPES[backend]))
    version = draw(st.sampled_from((1, 2)))
    b, c3 = draw(st.sampled_from((1, 2))), 3 * heads * d
    nonfinite = draw(st.booleans())
    specials = SPECIALS if nonfinite else ("huge", "-huge", "tiny", "zero")
    # v2 normalises q and k: a value whose square overflows the float32 accumulator makes the norm inf,
    # and eager's F.normalize is exact for one channel but 0 for more (test_finding_cosine_... below)
    qkv = draw(tensors((b, h, w, c3), dtype, specials=specials, max_specials=2, huge=1e15 if version == 2 else None))
    n = mh * mw
    if version == 1:
        bias = draw(tensors(((2 * mh - 1) * (2 * mw - 1), heads), dtype, specials=specials, max_specials=1,
                            layouts=("contiguous", "transposed", "offset"), scale=1.0))
        logit_scale = None
    else:
        bias = draw(tensors((heads, n, n), dtype, specials=(), layouts=("contiguous", "expanded"), scale=3.0))
        logit_scale = draw(tensors((heads,), dtype, specials=specials, max_specials=1, scale=2.0,
                                   layouts=("contiguous",)))
    pad = draw(st.one_of(st.none(), tensors((c3,), dtype, specials=specials, max_specials=1,
                                            layouts=("contiguous", "sliced"))))
    grad = draw(tensors((b, h, w, heads * d), dtype, specials=(), scale=1.0, layouts=("contiguous", "transposed")))
    return dict(qkv=qkv, num_heads=heads, window_size=(mh, mw), shift_size=(sh, sw), rel_pos_bias=bias,
                pad_qkv=pad, logit_scale=logit_scale, grad=grad)


def _wa_all(backend, c):
    names = ("qkv", "rel_pos_bias", "pad_qkv", "logit_scale")
    leaves = {k: None if c[k] is None else _leaf_like(c[k]) for k in names}
    with vk.use_backend(backend):
        out = vk.window_attention(leaves["qkv"], num_heads=c["num_heads"], window_size=c["window_size"],
                                  shift_size=c["shift_size"], rel_pos_bias=leaves["rel_pos_bias"],
                                  pad_qkv=leaves["pad_qkv"], logit_scale=leaves["logit_scale"])
        out.backward(c["grad"])
    return {"out": out.detach(), **{f"d{k}": None if v is None else v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_attention_matches_the_reference(backend):
    _skip_unless_runs(backend)

    @settings_for(backend, 30)
    @given(window_cases(backend))
    def check(c):
        got = _wa_all(backend, c)
        contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        expect = _wa_all("reference", contiguous)
        nonfinite = _has_nonfinite(c["qkv"], c["rel_pos_bias"], c["pad_qkv"], c["logit_scale"])
        dtype = c["qkv"].dtype
        # inf in v meets weights that underflow to 0 differently in each implementation: then only the
        # non-finite positions must agree (the contract leaves NaN-or-inf open there)
        assert_matches(got["out"], expect["out"], "out", dtype=dtype, exact_kind=not nonfinite, scale=4.0)
        if nonfinite and backend not in NONFINITE_BACKWARD:
            return
        for name in ("dqkv", "drel_pos_bias", "dpad_qkv", "dlogit_scale"):
            assert_matches(got[name], expect[name], name, dtype=dtype, exact_kind=not nonfinite, scale=16.0)

    check()


# ----------------------------------------------------------------------------------------------------
# VectorQuantizer: random sequences of calls


STEPS = ("train", "train+backward", "eval", "eval+backward", "train_input_grad")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("decay", [None, 0.8], ids=["learned", "ema"])
def test_vector_quantizer_sequences_match_the_reference(backend, decay):
    _skip_unless_runs(backend)

    @settings_for(backend, 20)
    @given(steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=8), seed=st.integers(0, 2 ** 31 - 1),
           cosine=st.booleans(), dead=st.sampled_from([0.0, 0.5]), channel_first=st.booleans(),
           kmeans=st.booleans())
    def check(steps, seed, cosine, dead, channel_first, kmeans):
        torch.manual_seed(seed)
        kw = dict(decay=decay, use_cosine_sim=cosine, threshold_ema_dead_code=dead if decay else 0,
                  accept_image_fmap=channel_first, kmeans_init=kmeans, kmeans_iters=2)
        ours, ref = vk.nn.VectorQuantizer(5, 7, **kw), vk.nn.VectorQuantizer(5, 7, **kw)
        ref.load_state_dict(ours.state_dict())
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, ref)] if decay is None else None
        g = torch.Generator().manual_seed(seed)
        for i, step in enumerate(steps):
            x = torch.randn((2, 5, 3, 2) if channel_first else (3, 4, 5), generator=g)
            results = []
            for module, name in ((ours, backend), (ref, "reference")):
                module.train(step.startswith("train"))
                xi = x.clone().requires_grad_(step == "train_input_grad")
                torch.manual_seed(seed + i)  # dead-code and k-means draws
                with vk.use_backend(name):
                    q, idx, loss = module(xi)
                    total = q.sum() + loss
                    if "backward" in step or step == "train_input_grad":
                        if total.requires_grad:
                            total.backward()
                grads = [p.grad.clone() if p.grad is not None else None for p in module.parameters()]
                results.append((q.detach(), idx, loss.detach(), xi.grad, grads,
                                {k: v.clone() for k, v in module.state_dict().items()}))
            if opts:
                for opt in opts:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            (q0, i0, l0, gx0, gp0, s0), (q1, i1, l1, gx1, gp1, s1) = results
            where = f"step {i} ({step}) of {steps}"
            assert torch.equal(i0, i1), f"indices differ at {where}"
            assert_matches(q0, q1, f"quantized at {where}")
            assert_matches(l0, l1, f"loss at {where}", scale=4.0)
            assert_matches(gx0, gx1, f"dx at {where}", scale=4.0)
            for a, b in zip(gp0, gp1):
                assert_matches(a, b, f"parameter gradient at {where}", scale=4.0)
            for key in s1:
                assert_matches(s0[key], s1[key], f"{key} at {where}", scale=4.0)
            assert (ours.cluster_size >= 0).all() if decay else True

    check()


# ----------------------------------------------------------------------------------------------------
# Findings of the property runs, kept as regular tests


@pytest.mark.parametrize("backend", BACKENDS)
def test_finding_vq_on_a_one_by_one_strided_codebook(backend):
    """A (1, 1) slice with stride 2 counts as contiguous; the reference crashed viewing it as bytes."""
    _skip_unless_runs(backend)
    big = torch.zeros(1, 3)
    big[0, 1] = 0.5
    codebook = big[:, 1::2]
    assert codebook.is_contiguous() and codebook.stride(-1) == 2
    with vk.use_backend(backend):
        index, distance = vk.vq_nearest(torch.tensor([[0.1]]), codebook)
    assert index.tolist() == [0] and math.isclose(float(distance), 0.16, rel_tol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_finding_vq_float64_code_whose_distance_overflows(backend):
    """float64 codes at 1e200: their squared distance is inf, a finite one wins (the reference's centred
    expanded form overflowed for every code and returned index 0)."""
    _skip_unless_runs(backend)
    x = torch.tensor([[0.0015]], dtype=torch.float64)
    codebook = torch.tensor([[1e200], [-2.9343e-04]], dtype=torch.float64)
    with vk.use_backend(backend):
        index, distance = vk.vq_nearest(x, codebook)
    assert index.tolist() == [1] and math.isclose(float(distance), (0.0015 + 2.9343e-04) ** 2, rel_tol=1e-6)


def _cosine_huge_params():
    for d in (1, 2, 4):
        yield pytest.param("reference", d, id=f"reference-d{d}")
        yield pytest.param("cpu", d, id=f"cpu-d{d}")
        yield pytest.param("triton", d, id=f"triton-d{d}")


@pytest.mark.parametrize("backend,head_dim", list(_cosine_huge_params()))
def test_finding_cosine_attention_of_a_huge_query(backend, head_dim):
    """v2 with one query element at 1e20 (float32; 1e30 for one channel): as eager, forward and backward. Eager's F.normalize
    divides by the norm, which for one channel is |q| (exact: q / |q| = 1) and for more overflows to inf
    (q / inf = 0, finite); the property runs draw huge values below 1e15 in v2 for this reason."""
    _skip_unless_runs(backend)
    from _oracles import eager_window_attention

    g = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(1, 1, 2, 3 * head_dim, generator=g)
    qkv[0, 0, 0, 0] = 1e30 if head_dim == 1 else 1e20
    bias = 4 * torch.randn(1, 2, 2, generator=g)
    logit_scale = torch.tensor([3.0])
    dout = torch.randn(1, 1, 2, head_dim, generator=g)
    x = qkv.clone().requires_grad_()
    expect = eager_window_attention(x, 1, (1, 2), (0, 0), bias, None, logit_scale)
    (expect_grad,) = torch.autograd.grad(expect, x, dout)
    y = qkv.clone().requires_grad_()
    with vk.use_backend(backend):
        got = vk.window_attention(y, num_heads=1, window_size=(1, 2), rel_pos_bias=bias, logit_scale=logit_scale)
        (got_grad,) = torch.autograd.grad(got, y, dout)
    assert torch.isfinite(expect).all() and torch.isfinite(expect_grad).all()
    assert_matches(got, expect, "out")
    assert_matches(got_grad, expect_grad, "dqkv")


def test_budget_mode_is_known():
    assert HYPOTHESIS_MODE in ("ci", "long")
