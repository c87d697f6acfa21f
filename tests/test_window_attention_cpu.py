"""The cpu backend's window-attention kernels on shapes that hit their vector remainders: head dims
8..64 (SIMD units of 8 or 16 lanes, or the plain loops where the width does not divide d), windows whose
token count N is not a multiple of 8 or 16 (padded score rows), padded maps, shifted windows, and
non-finite values (NaN logits, -inf bias entries, large logits). Everything against the reference math
in float64 (float32 inputs), forward and every gradient. The checks run at the level chosen at load
(VLM_KERNELS_CPU_ISA=baseline|avx2|avx512 runs this file at that level: plain loops, 8-lane or 16-lane
units), and test_every_level_matches_float64 runs a digest of them at every level this CPU can run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels import _backend
from vlm_kernels.ops import window_attention as wa_ops
from vlm_kernels.ops.window_attention import window_attention, windowed_attention
from vlm_kernels.reference import window_attention as ref

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _need_cpu_backend():
    for entry in wa_ops.TABLE.impls:
        reason = wa_ops.TABLE.reason("cpu", entry, CPU)
        if reason:
            pytest.skip(f"cpu: {reason}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(name, got, exact, tol):
    """|got - exact| <= tol * (|exact| + max|exact|): relative, with a floor at the tensor's scale."""
    exact = exact.double()
    scale = exact.abs().max().item() + 1e-30
    err = (got.double() - exact).abs()
    bound = tol * (exact.abs() + scale)
    assert bool((err <= bound).all()), (name, (err / (exact.abs() + scale)).max().item())


def _map_case(b, h, w, heads, d, window, shift, bias=True, pad=True, logit_scale=False, seed=0, mult=1.0):
    g = _gen(seed)
    c = heads * d
    qkv = torch.randn(b, h, w, 3 * c, generator=g) * mult
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, generator=g) if bias else None
    pad_qkv = torch.randn(3 * c, generator=g) if pad else None
    ls = (torch.rand(heads, generator=g) * 5.0) if logit_scale else None
    dy = torch.randn(b, h, w, c, generator=g)
    return qkv, table, pad_qkv, ls, dy


def _run_map(backend, qkv, table, pad_qkv, ls, dy, heads, window, shift, dtype):
    leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (qkv, table, pad_qkv, ls)]
    live = [t for t in leaves if t is not None]
    if backend == "exact":
        out = ref.window_attention(leaves[0], heads, window, shift, leaves[1], None, leaves[2], leaves[3])
    else:
        with vk.use_backend(backend):
            out = window_attention(leaves[0], num_heads=heads, window_size=window, shift_size=shift,
                                   rel_pos_bias=leaves[1], pad_qkv=leaves[2], logit_scale=leaves[3])
    grads = torch.autograd.grad(out, live, dy.to(dtype), allow_unused=True)  # pad_qkv: unused without padding
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(live, grads)]
    names = [n for n, t in zip(("qkv", "table", "pad_qkv", "logit_scale"), leaves) if t is not None]
    return out.detach(), dict(zip(names, grads))


# (map h, w, window, shift): N = 49 (7x7, padded and shifted), 15 (3x5), 25, 81 (9x9), 24 (4x6), 1.
WINDOWS = [
    pytest.param(13, 17, (7, 7), (3, 3), id="N49-pad-shift"),
    pytest.param(10, 11, (3, 5), (1, 2), id="N15-pad-shift"),
    pytest.param(10, 10, (5, 5), (0, 0), id="N25"),
    pytest.param(11, 9, (9, 9), (4, 4), id="N81-pad-shift"),
    pytest.param(8, 12, (4, 6), (2, 3), id="N24-shift"),
    pytest.param(3, 4, (1, 1), (0, 0), id="N1"),
]


@pytest.mark.parametrize("d", [8, 16, 24, 32, 40, 64])
@pytest.mark.parametrize("h,w,window,shift", WINDOWS)
def test_map_op_remainders_match_float64(d, h, w, window, shift):
    heads = 2 if d >= 32 else 3
    args = _map_case(2, h, w, heads, d, window, shift, seed=d + window[0])
    out, grads = _run_map("cpu", *args, heads, window, shift, torch.float32)
    out64, grads64 = _run_map("exact", *args, heads, window, shift, torch.float64)
    _close("out", out, out64, 2e-5)
    for name in grads64:
        _close(name, grads[name], grads64[name], 5e-5)


@pytest.mark.parametrize("d", [8, 24, 32])
@pytest.mark.parametrize("bias,pad", [(False, False), (True, False), (False, True)])
def test_map_op_without_bias_or_pad(d, bias, pad):
    window, shift = (7, 7), (3, 3)
    args = _map_case(2, 12, 15, 2, d, window, shift, bias=bias, pad=pad, seed=5)
    out, grads = _run_map("cpu", *args, 2, window, shift, torch.float32)
    out64, grads64 = _run_map("exact", *args, 2, window, shift, torch.float64)
    _close("out", out, out64, 2e-5)
    for name in grads64:
        _close(name, grads[name], grads64[name], 5e-5)


@pytest.mark.parametrize("d", [8, 16, 24, 32])
def test_map_op_cosine_attention_remainders(d):
    window, shift = (5, 5), (2, 2)
    args = _map_case(2, 9, 11, 3, d, window, shift, logit_scale=True, seed=9)
    out, grads = _run_map("cpu", *args, 3, window, shift, torch.float32)
    out64, grads64 = _run_map("exact", *args, 3, window, shift, torch.float64)
    _close("out", out, out64, 1e-4)
    for name in grads64:
        # logit_scale: a cancelling sum over every window (see test_window_attention.py).
        _close(name, grads[name], grads64[name], 1e-3 if name == "logit_scale" else 2e-4)


@pytest.mark.parametrize("d", [8, 32])
def test_map_op_large_logits(d):
    """Logits of order 1e3 (max subtraction) and probabilities that underflow to 0 in float32."""
    window, shift = (7, 7), (3, 3)
    args = _map_case(1, 14, 14, 2, d, window, shift, seed=11, mult=12.0)
    out, grads = _run_map("cpu", *args, 2, window, shift, torch.float32)
    out64, grads64 = _run_map("exact", *args, 2, window, shift, torch.float64)
    # Logits this large carry float32 rounding of order 1e-4 relative into the probabilities.
    _close("out", out, out64, 2e-3)
    for name in grads64:
        _close(name, grads[name], grads64[name], 2e-3)


@pytest.mark.parametrize("d", [8, 16, 24, 32])
def test_map_op_minus_inf_bias_entries(d):
    """-inf in the bias table: those (query, key) pairs get probability 0 exactly, gradients stay finite."""
    window, shift = (7, 7), (3, 3)
    qkv, table, pad_qkv, ls, dy = _map_case(2, 14, 14, 2, d, window, shift, seed=13)
    table[::7] = float("-inf")  # every 7th relative offset, never a whole row
    out, grads = _run_map("cpu", qkv, table, pad_qkv, ls, dy, 2, window, shift, torch.float32)
    out64, grads64 = _run_map("exact", qkv, table, pad_qkv, ls, dy, 2, window, shift, torch.float64)
    assert torch.isfinite(out).all()
    _close("out", out, out64, 2e-5)
    for name in grads64:
        g64 = torch.nan_to_num(grads64[name], nan=0.0)  # the table's -inf rows: 0 in both
        assert torch.isfinite(grads[name]).all(), name
        _close(name, grads[name], g64, 5e-5)


@pytest.mark.parametrize("d", [8, 16, 24, 32])
@pytest.mark.parametrize("part", ["q", "k"])
def test_map_op_nan_flows_as_in_eager(d, part):
    """A NaN in one token's q (k) makes exactly the outputs NaN that PyTorch's own math makes NaN: the
    token's query row (every query of its window) in that head."""
    heads, window, shift = 2, (7, 7), (3, 3)
    qkv, table, pad_qkv, _, _ = _map_case(2, 14, 14, heads, d, window, shift, seed=17)
    c = heads * d
    offset = {"q": 0, "k": c}[part]
    qkv[1, 5, 6, offset + d + 3] = float("nan")  # head 1
    with vk.use_backend("cpu"):
        out = window_attention(qkv, num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias=table,
                               pad_qkv=pad_qkv)
    expect = ref.window_attention(qkv, heads, window, shift, table, None, pad_qkv)
    nan = torch.isnan(expect)
    assert nan.any()
    assert torch.equal(torch.isnan(out), nan)
    torch.testing.assert_close(out[~nan], expect[~nan], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d", [8, 24, 32, 40])
@pytest.mark.parametrize("n", [15, 49])
@pytest.mark.parametrize("cosine", [False, True])
def test_windowed_op_remainders_match_float64(d, n, cosine):
    g = _gen(d + n)
    bw, heads, nw = 6, 2, 3
    q, k, v, dy = (torch.randn(bw, heads, n, d, generator=g) for _ in range(4))
    bias = torch.randn(heads, n, n, generator=g)
    mask = torch.where(torch.rand(nw, n, n, generator=g) < 0.3, -100.0, 0.0)
    ls = torch.rand(heads, generator=g) * 5.0 if cosine else None

    def run(dtype, backend):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v, bias) + ((ls,) if cosine else ())]
        lsl = leaves[4] if cosine else None
        if backend == "exact":
            out = ref.windowed_attention(*leaves[:3], leaves[3], mask.to(dtype), None, lsl)
        else:
            with vk.use_backend(backend):
                out = windowed_attention(*leaves[:3], bias=leaves[3], mask=mask.to(dtype), logit_scale=lsl)
        return out.detach(), torch.autograd.grad(out, leaves, dy.to(dtype))

    out, grads = run(torch.float32, "cpu")
    out64, grads64 = run(torch.float64, "exact")
    _close("out", out, out64, 1e-4 if cosine else 2e-5)
    for name, a, b in zip(("q", "k", "v", "bias", "logit_scale"), grads, grads64):
        _close(name, a, b, 1e-3 if name == "logit_scale" else (2e-4 if cosine else 5e-5))


def _grads(fn, leaves, dy_seed=11):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    dy = torch.randn(out.shape, generator=_gen(dy_seed)).to(out)
    return out.detach(), torch.autograd.grad(out, leaves, dy)


@pytest.mark.parametrize("d", [8, 16, 20, 24])  # 8/16/24: SIMD units (8 or 16 lanes); 20: plain loops
@pytest.mark.parametrize("which", ["key", "query", "value"])
@pytest.mark.parametrize("version", [1, 2])
def test_nan_flows_as_in_eager_forward_and_backward(d, which, version):
    """The non-finite contract (issue 12): a NaN in one channel of one token's key (value) makes every
    query row of that (window, head) NaN; in its query, that token's row only. Forward and every
    gradient: NaN exactly where eager autograd through timm's math (the reference) has NaN, equal
    elsewhere. v2: cosine attention with a logit scale above the clamp in head 1."""
    heads, window, shift = 2, (7, 7), (3, 3)
    g = _gen(d)
    c = heads * d
    qkv = torch.randn(1, 13, 17, 3 * c, generator=g)  # 2 x 3 windows, padded, shifted
    table = torch.randn(169, heads, generator=g)
    pad = torch.randn(3 * c, generator=g)
    col = {"query": 0, "key": c, "value": 2 * c}[which] + d + 3  # head 1, channel 3
    qkv[0, 1, 2, col] = float("nan")
    leaves = (qkv, table, pad) + ((torch.tensor([1.0, 5.0]),) if version == 2 else ())

    def ours(a, b, p, *ls):
        return window_attention(a, num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias=b,
                                pad_qkv=p, logit_scale=ls[0] if ls else None)

    def eager(a, b, p, *ls):
        return ref.window_attention(a, heads, window, shift, b, None, p, ls[0] if ls else None)

    y_ref, g_ref = _grads(eager, leaves)
    with vk.use_backend("cpu"):
        y, gr = _grads(ours, leaves)
    # Token (1, 2) sits at (11, 16) of the shifted map, in the corner window: 6 x 3 real tokens.
    assert torch.isfinite(y_ref[..., :d]).all()  # head 0 untouched
    assert torch.isnan(y_ref[0, :, :, d:]).any(-1).sum() == (1 if which == "query" else 18)
    for name, a, e in zip(("out", "qkv", "bias", "pad", "logit_scale"), (y,) + tuple(gr), (y_ref,) + tuple(g_ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), (name, torch.isnan(a).sum(), torch.isnan(e).sum())
        ok = ~torch.isnan(e)
        torch.testing.assert_close(a[ok], e[ok], rtol=2e-4, atol=2e-4 * (e[ok].abs().max().item() + 1),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("d", [8, 16, 20])
def test_windowed_op_nan_key_flows_as_in_eager(d):
    """windowed_attention: a NaN in one key channel makes that (window, head)'s every output and every
    gradient of q, k, v and the bias row NaN exactly as eager autograd does."""
    g = _gen(d)
    bw, heads, n, nw = 4, 2, 15, 2
    q, k, v = (torch.randn(bw, heads, n, d, generator=g) for _ in range(3))
    bias = torch.randn(heads, n, n, generator=g)
    mask = torch.where(torch.rand(nw, n, n, generator=g) < 0.3, -100.0, 0.0)
    k[2, 1, 4, 3] = float("nan")
    leaves = (q, k, v, bias)
    y_ref, g_ref = _grads(lambda *t: ref.windowed_attention(*t[:3], t[3], mask), leaves)
    with vk.use_backend("cpu"):
        y, gr = _grads(lambda *t: windowed_attention(*t[:3], bias=t[3], mask=mask), leaves)
    assert torch.isnan(y_ref[2, 1]).all() and not torch.isnan(y_ref[:2]).any()
    for name, a, e in zip(("out", "q", "k", "v", "bias"), (y,) + tuple(gr), (y_ref,) + tuple(g_ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), (name, torch.isnan(a).sum(), torch.isnan(e).sum())
        ok = ~torch.isnan(e)
        torch.testing.assert_close(a[ok], e[ok], rtol=2e-4, atol=2e-4 * (e[ok].abs().max().item() + 1),
                                   msg=lambda m: f"{name}: {m}")


LEVEL_DIGEST = r"""
import sys, torch, vlm_kernels as vk
from vlm_kernels import _backend
from vlm_kernels.reference import window_attention as ref
level = _backend.cpu_isa()["selected"]
assert level == sys.argv[1], (level, sys.argv[1])
g = torch.Generator().manual_seed(0)
worst = 0.0
for d in (8, 16, 20, 24):  # 16-lane, 8-lane and plain-loop units
    for v2 in (False, True):
        heads, window, shift = 2, (7, 7), (3, 3)
        qkv = torch.randn(2, 13, 17, 3 * heads * d, generator=g)
        if v2:
            qkv[0, 1, 2, heads * d + d + 3] = float("nan")  # a NaN key: NaN flows as in eager
        table, pad = torch.randn(169, heads, generator=g), torch.randn(3 * heads * d, generator=g)
        ls = torch.tensor([1.0, 5.0]) if v2 else None
        dy = torch.randn(2, 13, 17, heads * d, generator=g)
        res = {}
        for name, dtype in (("cpu", torch.float32), ("exact", torch.float64)):
            leaves = [t.to(dtype).requires_grad_(True) for t in (qkv, table, pad) + ((ls,) if v2 else ())]
            if name == "cpu":
                with vk.use_backend("cpu"):
                    out = vk.window_attention(leaves[0], num_heads=heads, window_size=window, shift_size=shift,
                                              rel_pos_bias=leaves[1], pad_qkv=leaves[2],
                                              logit_scale=leaves[3] if v2 else None)
            else:
                out = ref.window_attention(leaves[0], heads, window, shift, leaves[1], None, leaves[2],
                                           leaves[3] if v2 else None)
            res[name] = [out.detach()] + list(torch.autograd.grad(out, leaves, dy.to(dtype)))
        for i, (a, e) in enumerate(zip(res["cpu"], res["exact"])):
            assert torch.equal(torch.isnan(a), torch.isnan(e)), (d, v2, i)
            ok = ~torch.isnan(e)
            err = (a[ok].double() - e[ok]).abs().max().item() / (e[ok].abs().max().item() + 1e-30)
            worst = max(worst, err)
            assert err < (1e-3 if v2 else 1e-4), (d, v2, i, err)
print("DIGEST OK", level, worst)
"""


def test_every_level_matches_float64():
    """Each level this CPU can run (VLM_KERNELS_CPU_ISA forced in a fresh process): the fused op, v1 and
    v2 (v2 with a NaN key), forward and gradients against float64 at head dims of every unit width."""
    isa = _backend.cpu_isa()
    if not isa:
        pytest.skip("needs the compiled extension with CPU levels")
    levels = ("baseline", "avx2", "avx512")
    compiled = isa["compiled"].split(",")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for level in levels[: levels.index(isa["detected"]) + 1]:
        if level not in compiled:
            continue
        env = dict(os.environ, VLM_KERNELS_CPU_ISA=level,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("VLM_KERNELS_BACKEND", None)
        proc = subprocess.run([sys.executable, "-c", LEVEL_DIGEST, level], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and "DIGEST OK" in proc.stdout, (level, proc.stdout[-2000:], proc.stderr[-3000:])
