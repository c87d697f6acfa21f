"""The non-finite contract (issue 12): what NaN and +-inf in each input do to every op's outputs and
gradients, on every backend, held to eager PyTorch's math (``tests/_oracles.py``: timm's attention,
``F.gumbel_softmax``'s math, cdist + argmin) with the contract's documented differences.

Each case puts one non-finite value (or a few) into one input and compares positions of NaN, +inf and
-inf in the outputs and in every gradient with the oracle's, and the finite values within the dtype's
tolerance. The oracle runs in the accumulation dtype of the backend (float32 for float32 input), as
eager code would; where NaN-or-inf depends on whether a probability underflowed to 0 (an inf in v
meeting a weight of exactly 0), only the non-finite positions must agree.

``KNOWN`` lists the cases a backend does not meet yet, as strict xfails naming what happens now and
the file the fix belongs in; the suite turns red the moment a fix lands (then delete the entry).
"""

from __future__ import annotations

import math

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels.ops import gumbel as gumbel_ops
from vlm_kernels.ops import vq as vq_ops
from vlm_kernels.ops import window_attention as wa_ops
from vlm_kernels.reference.philox import gumbel_noise

from _oracles import (eager_gumbel_argmax, eager_gumbel_softmax, eager_kl_uniform, eager_vq_nearest,
                      eager_vq_quantize, eager_window_attention)
from _robust import (TARGETS, assert_matches, ci_budget_skip, mark_known_violation, require_target,
                     skip_unless_implemented)

NAN, INF = math.nan, math.inf

KNOWN = {}


@pytest.fixture(params=TARGETS)
def target(request):
    return require_target(request.param)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _leaf(t, device, dtype=None):
    return None if t is None else t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# window attention: a map with padding (9 x 10 -> 12 x 12) and a shift, and the token put in the bottom
# band after the shift, whose windows hold padded tokens and the shifted-window mask.

WA = dict(b=1, h=9, w=10, window=(4, 4), shift=(2, 2), heads=2, c=8)
TOKEN = (0, 1, 2)


def _wa_inputs(version: int, dtype: torch.dtype, c: int = WA["c"]):
    g = torch.Generator().manual_seed(0)
    b, h, w, heads, (mh, mw) = WA["b"], WA["h"], WA["w"], WA["heads"], WA["window"]
    qkv = torch.randn(b, h, w, 3 * c, generator=g)
    if version == 1:
        bias, logit_scale = torch.randn((2 * mh - 1) * (2 * mw - 1), heads, generator=g), None
    else:
        n = mh * mw
        bias = 16 * torch.sigmoid(torch.randn(heads, n, n, generator=g))
        logit_scale = math.log(10.0) + 0.1 * torch.randn(heads, 1, 1, generator=g)
    pad = torch.randn(3 * c, generator=g)
    grad = torch.randn(b, h, w, c, generator=g)
    return {"qkv": qkv.to(dtype), "bias": bias.to(dtype), "pad": pad.to(dtype),
            "logit_scale": None if logit_scale is None else logit_scale.to(dtype), "grad": grad.to(dtype)}


def _put(name, index, value):
    def mutate(t):
        t[name][index] = value
    return mutate


def _wa_cases(c: int = WA["c"]):
    cases = []
    for part, offset in (("q", 0), ("k", c), ("v", 2 * c)):
        for vname, value in (("nan", NAN), ("+inf", INF), ("-inf", -INF)):
            cases.append((f"{part}_{vname}", 1, _put("qkv", TOKEN + (offset + 3,), value), part != "v"))
    for part, offset in (("q", 0), ("k", c), ("v", 2 * c)):
        for vname, value in (("nan", NAN), ("+inf", INF)):
            cases.append((f"pad_{part}_{vname}", 1, _put("pad", (offset + 1,), value), part != "v"))
    for vname, value in (("nan", NAN), ("+inf", INF), ("-inf", -INF)):
        cases.append((f"bias_{vname}", 1, _put("bias", (5, 1), value), True))
    for vname, value in (("nan", NAN), ("+inf", INF)):
        cases.append((f"grad_out_{vname}", 1, _put("grad", (0, 3, 4, 2), value), False))
    for vname, value in (("nan", NAN), ("+inf", INF), ("-inf", -INF)):
        cases.append((f"v2_logit_scale_{vname}", 2, _put("logit_scale", (1, 0, 0), value), True))
    cases.append(("v2_dense_bias_nan", 2, _put("bias", (0, 3, 5), NAN), True))
    for part, offset in (("q", 0), ("k", c)):
        for vname, value in (("nan", NAN), ("+inf", INF)):
            cases.append((f"v2_{part}_{vname}", 2, _put("qkv", TOKEN + (offset + 3,), value), True))
    return cases


WA_CASES = _wa_cases()
# Head dim 40 in float32: the Triton backward's tiled kernels (rows/columns passes) instead of the
# one-tile kernel (IEEE fp32 dots beyond d = 32); a subset of the cases, on every backend.
WA_TILED_C = 80
WA_TILED_CASES = [c for c in _wa_cases(WA_TILED_C) if c[0] in (
    "k_nan", "v_nan", "pad_q_nan", "v2_k_nan")]


def _wa_call(inputs, device, dtype):
    qkv, bias, pad, ls = (_leaf(inputs[k], device, dtype) for k in ("qkv", "bias", "pad", "logit_scale"))
    out = vk.window_attention(qkv, num_heads=WA["heads"], window_size=WA["window"], shift_size=WA["shift"],
                              rel_pos_bias=bias, pad_qkv=pad, logit_scale=ls)
    out.backward(inputs["grad"].to(device=device, dtype=dtype))
    return out, [qkv.grad, bias.grad, pad.grad, None if ls is None else ls.grad]


def _wa_oracle(inputs, dtype):
    qkv, bias, pad, ls = (_leaf(inputs[k], "cpu", dtype) for k in ("qkv", "bias", "pad", "logit_scale"))
    out = eager_window_attention(qkv, WA["heads"], WA["window"], WA["shift"], bias, pad, ls)
    out.backward(inputs["grad"].to(dtype))
    return out, [qkv.grad, bias.grad, pad.grad, None if ls is None else ls.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", [c[0] for c in WA_CASES])
def test_window_attention(request, target, case, dtype):
    backend, device = target
    _, version, mutate, exact_kind = next(c for c in WA_CASES if c[0] == case)
    inputs = _wa_inputs(version, dtype)
    skip_unless_implemented(wa_ops.TABLE, "forward", backend, device, inputs["qkv"])
    ci_budget_skip(backend, dtype)
    mark_known_violation(request, KNOWN, "window_attention", case, backend)
    with torch.no_grad():
        mutate(inputs)
    expect_out, expect_grads = _wa_oracle(inputs, _acc(dtype))
    with vk.use_backend(backend):
        out, grads = _wa_call(inputs, device, dtype)
    assert_matches(out, expect_out, "out", dtype=dtype, exact_kind=exact_kind)
    for name, got, expect in zip(("dqkv", "drel_pos_bias", "dpad_qkv", "dlogit_scale"), grads, expect_grads):
        assert_matches(got, expect, name, dtype=dtype, exact_kind=exact_kind)


@pytest.mark.parametrize("case", [c[0] for c in WA_TILED_CASES])
def test_window_attention_tiled(request, target, case):
    backend, device = target
    dtype = torch.float32
    _, version, mutate, exact_kind = next(c for c in WA_TILED_CASES if c[0] == case)
    inputs = _wa_inputs(version, dtype, WA_TILED_C)
    skip_unless_implemented(wa_ops.TABLE, "forward", backend, device, inputs["qkv"])
    mark_known_violation(request, KNOWN, "window_attention_tiled", case, backend)
    with torch.no_grad():
        mutate(inputs)
    expect_out, expect_grads = _wa_oracle(inputs, dtype)
    with vk.use_backend(backend):
        out, grads = _wa_call(inputs, device, dtype)
    assert_matches(out, expect_out, "out", dtype=dtype, exact_kind=exact_kind)
    for name, got, expect in zip(("dqkv", "drel_pos_bias", "dpad_qkv", "dlogit_scale"), grads, expect_grads):
        assert_matches(got, expect, name, dtype=dtype, exact_kind=exact_kind)


@pytest.mark.parametrize("part", ["q", "k"])
def test_window_attention_issue_example(target, part):
    """The issue's report at Swin-T's stage-3 shape (window 7, shift 3, 3 heads of 32 channels): one NaN
    in a key channel of one token makes every query of that window and head NaN (1,568 outputs), one in
    a query channel that token's head (32 outputs), as in eager; inference (no grad) and training."""
    backend, device = target
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 14, 14, 288, generator=g)
    table = torch.randn(169, 3, generator=g)
    qkv[0, 1, 2, 5 if part == "q" else 96 + 5] = NAN
    expect = eager_window_attention(qkv, 3, (7, 7), (3, 3), table)
    for grad in (False, True):
        with vk.use_backend(backend), torch.set_grad_enabled(grad):
            x = qkv.to(device).requires_grad_(grad)
            out = vk.window_attention(x, num_heads=3, window_size=7, shift_size=3, rel_pos_bias=table.to(device))
        assert int(out.isnan().sum()) == (32 if part == "q" else 1568)
        assert_matches(out, expect, f"out (grad={grad})")


# ----------------------------------------------------------------------------------------------------
# Gumbel: (3, 7, 5) logits, softmax over dim 1 (not the last: the strided layout)

G_SHAPE, G_DIM, G_TAU, G_SEED = (3, 7, 5), 1, 0.5, 123
G_ROW = (0, slice(None), 1)


def _g_cases():
    def put(index, value, name="logits"):
        def mutate(t):
            t[name][index] = value
        return mutate

    def two(t):
        t["logits"][0, 2, 1] = INF
        t["logits"][0, 4, 1] = INF

    return [("nan", put((0, 2, 1), NAN), True), ("+inf", put((0, 2, 1), INF), True),
            ("-inf", put((0, 2, 1), -INF), True), ("row_all_-inf", put(G_ROW, -INF), True),
            ("two_+inf", two, True), ("huge_+3e38", put((0, 2, 1), 3e38), True),
            ("huge_-3e38", put((0, 2, 1), -3e38), True), ("row_all_nan", put(G_ROW, NAN), True),
            ("grad_nan", put((0, 2, 1), NAN, "grad"), True), ("grad_+inf", put((0, 2, 1), INF, "grad"), True),
            ("clean", lambda t: None, True)]


G_CASES = _g_cases()
G_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64"),
            pytest.param(torch.bfloat16, id="bf16")]


def _g_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return {"logits": torch.randn(G_SHAPE, generator=g).to(dtype), "grad": torch.randn(G_SHAPE, generator=g).to(dtype)}


def _g_prepare(request, target, case, dtype, op, entry):
    backend, device = target
    _, mutate, _ = next(c for c in G_CASES if c[0] == case)
    inputs = _g_inputs(dtype)
    skip_unless_implemented(gumbel_ops.TABLE, entry, backend, device, inputs["logits"])
    ci_budget_skip(backend, dtype)
    mark_known_violation(request, KNOWN, op, case, backend)
    mutate(inputs)
    return backend, device, inputs


@pytest.mark.parametrize("dtype", G_DTYPES)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("case", [c[0] for c in G_CASES])
def test_gumbel_softmax(request, target, case, hard, dtype):
    backend, device, inputs = _g_prepare(request, target, case, dtype, "gumbel_softmax_" + ("hard" if hard else "soft"),
                                         "softmax_forward")
    noise = gumbel_noise(G_SHAPE, G_SEED)
    x = _leaf(inputs["logits"], "cpu", _acc(dtype))
    expect = eager_gumbel_softmax(x, noise, G_TAU, hard, G_DIM)
    expect.backward(inputs["grad"].to(_acc(dtype)))
    logits = _leaf(inputs["logits"], device)
    with vk.use_backend(backend):
        out = vk.gumbel_softmax(logits, G_TAU, hard, G_DIM, seed=G_SEED)
        out.backward(inputs["grad"].to(device))
    assert_matches(out, expect, "out", dtype=dtype)
    assert_matches(logits.grad, x.grad, "dlogits", dtype=dtype)


@pytest.mark.parametrize("dtype", G_DTYPES)
@pytest.mark.parametrize("case", [c[0] for c in G_CASES if not c[0].startswith("grad")])
def test_gumbel_argmax(request, target, case, dtype):
    backend, device, inputs = _g_prepare(request, target, case, dtype, "gumbel_argmax", "argmax")
    expect = eager_gumbel_argmax(inputs["logits"].to(_acc(dtype)), gumbel_noise(G_SHAPE, G_SEED), G_DIM)
    with vk.use_backend(backend):
        got = vk.gumbel_argmax(inputs["logits"].to(device), G_DIM, seed=G_SEED)
    assert_matches(got, expect, "index")


@pytest.mark.parametrize("dtype", G_DTYPES)
@pytest.mark.parametrize("case", [c[0] for c in G_CASES])
def test_categorical_kl_uniform(request, target, case, dtype):
    backend, device, inputs = _g_prepare(request, target, case, dtype, "categorical_kl_uniform", "kl_forward")
    grad = inputs["grad"].select(G_DIM, 0)
    x = _leaf(inputs["logits"], "cpu", _acc(dtype))
    expect = eager_kl_uniform(x, G_DIM)
    expect.backward(grad.to(_acc(dtype)))
    logits = _leaf(inputs["logits"], device)
    with vk.use_backend(backend):
        out = vk.categorical_kl_uniform(logits, G_DIM)
        out.backward(grad.to(device))
    assert_matches(out, expect, "kl", dtype=dtype, scale=4.0)
    assert_matches(logits.grad, x.grad, "dlogits", dtype=dtype, scale=4.0)


# ----------------------------------------------------------------------------------------------------
# VQ: 37 rows of D = 5 against K = 11 codes


def _vq_cases():
    def put(name, index, value):
        def mutate(t):
            t[name][index] = value
        return mutate

    return [("clean", lambda t: None), ("x_nan", put("x", (3, 1), NAN)), ("x_+inf", put("x", (3, 1), INF)),
            ("x_-inf", put("x", (3, 1), -INF)), ("x_row_nan", put("x", (3,), NAN)),
            ("x_huge", put("x", (3, 1), 1e30)), ("x_tiny", put("x", (3,), 1e-44)),
            ("code_nan", put("e", (2, 1), NAN)), ("code_+inf", put("e", (2, 1), INF)),
            ("code0_nan", put("e", (0, 1), NAN)), ("code_huge", put("e", (2,), 1e30)),
            ("all_codes_nan", put("e", (slice(None), 1), NAN)), ("x_nan_and_code_nan", lambda t: (
                put("x", (3, 1), NAN)(t), put("e", (2, 4), NAN)(t)))]


VQ_CASES = _vq_cases()


def _vq_inputs(dtype, case):
    g = torch.Generator().manual_seed(2)
    t = {"x": torch.randn(37, 5, generator=g).to(dtype), "e": torch.randn(11, 5, generator=g).to(dtype),
         "grad": torch.randn(37, 5, generator=g).to(dtype)}
    dict(VQ_CASES)[case](t)
    return t


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", G_DTYPES)
@pytest.mark.parametrize("case", [c[0] for c in VQ_CASES])
def test_vq_nearest(request, target, case, dtype, metric):
    backend, device = target
    t = _vq_inputs(dtype, case)
    skip_unless_implemented(vq_ops.TABLE, "nearest", backend, device, t["x"])
    ci_budget_skip(backend, dtype)
    mark_known_violation(request, KNOWN, "vq_nearest", case, backend)
    expect_index, expect_distance = eager_vq_nearest(t["x"], t["e"], metric)
    with vk.use_backend(backend):
        index, distance = vk.vq_nearest(t["x"].to(device), t["e"].to(device), metric=metric)
    assert_matches(index, expect_index, "index")
    assert_matches(distance, expect_distance, "distance", dtype=torch.float32)


@pytest.mark.parametrize("dtype", G_DTYPES)
@pytest.mark.parametrize("case", [c[0] for c in VQ_CASES])
def test_vq_quantize(request, target, case, dtype):
    backend, device = target
    t = _vq_inputs(dtype, case)
    skip_unless_implemented(vq_ops.TABLE, "nearest", backend, device, t["x"])
    ci_budget_skip(backend, dtype)
    mark_known_violation(request, KNOWN, "vq_quantize", case, backend)
    x, e = _leaf(t["x"], "cpu", _acc(dtype)), _leaf(t["e"], "cpu", _acc(dtype))
    eq, eindex, eloss = eager_vq_quantize(x, e, beta=0.25, codebook_weight=0.5)
    (eq * t["grad"].to(eq.dtype)).sum().add(eloss * 3.0).backward()
    xb, eb = _leaf(t["x"], device), _leaf(t["e"], device)
    with vk.use_backend(backend):
        q, index, loss = vk.vq_quantize(xb, eb, beta=0.25, codebook_weight=0.5)
        (q * t["grad"].to(device)).sum().add(loss * 3.0).backward()
    assert_matches(index, eindex, "index")
    assert_matches(q, eq, "quantized", dtype=dtype)
    assert_matches(loss, eloss, "loss", dtype=torch.float32 if dtype != torch.float64 else dtype, scale=10.0)
    assert_matches(xb.grad, x.grad, "dx", dtype=dtype, scale=10.0)
    assert_matches(eb.grad, e.grad, "dcodebook", dtype=dtype, scale=10.0)


@pytest.mark.parametrize("dtype", G_DTYPES)
@pytest.mark.parametrize("case", ["x_nan", "x_+inf", "x_-inf", "x_row_nan", "x_huge"])
def test_vq_code_stats(request, target, case, dtype):
    """Counts are exact; a non-finite row enters its code's sum (index_add semantics): NaN/inf in that
    code's channels only, never in another code's (an eager one-hot matmul would spread 0 * NaN)."""
    backend, device = target
    t = _vq_inputs(dtype, case)
    skip_unless_implemented(vq_ops.TABLE, "code_stats", backend, device, t["x"])
    ci_budget_skip(backend, dtype)
    mark_known_violation(request, KNOWN, "vq_code_stats", case, backend)
    index = torch.arange(37) % 11
    expect_sums = torch.zeros(11, 5, dtype=torch.float64).index_add_(0, index, t["x"].double())
    with vk.use_backend(backend):
        counts, sums = vk.vq_code_stats(t["x"].to(device), index.to(device), 11)
    assert_matches(counts, torch.bincount(index, minlength=11).to(counts.dtype), "counts")
    assert_matches(sums, expect_sums, "sums", dtype=dtype)
