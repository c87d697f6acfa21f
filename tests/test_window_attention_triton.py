"""Triton window attention, the paths tests/test_window_attention.py does not reach on its shapes: the
tiled path of large windows on small ones (row and column kernels, several blocks per window), several
windows per program in the fused backward, fp16/bf16 gradients, and the fallback for float64. Run on CPU
tensors through the interpreter (shapes sized for it), on CUDA tensors when there is a device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlm_kernels as vk
from vlm_kernels.ops import window_attention as wa_ops
from vlm_kernels.ops.window_attention import window_attention, windowed_attention
from vlm_kernels.reference import window_attention as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _triton_here():
    reason = wa_ops.TABLE.reason("triton", "forward", DEVICE)
    if reason:
        pytest.skip(f"triton: {reason}")


@pytest.fixture
def kernels():
    from vlm_kernels.triton import window_attention as tw

    return tw


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _map_inputs(dtype=torch.float32, b=2, h=13, w=17, heads=2, d=8, window=(7, 7), seed=0):
    g = _gen(seed)
    c = heads * d
    qkv = torch.randn(b, h, w, 3 * c, generator=g)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, generator=g)
    dense = torch.randn(heads, window[0] * window[1], window[0] * window[1], generator=g)
    pad = torch.randn(3 * c, generator=g)
    logit_scale = torch.tensor([1.0, 5.0] + [2.5] * (heads - 2)).view(heads, 1, 1)  # head 1 above the clamp
    return [t.to(DEVICE, dtype) for t in (qkv, table, dense, pad, logit_scale)]


def _grads(fn, leaves, dy_seed=11):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    dy = torch.randn(out.shape, generator=_gen(dy_seed)).to(out)
    return out.detach(), torch.autograd.grad(out, leaves, dy)


def _assert_close_rel(got, expect, tol, what):
    for i, (a, b) in enumerate(zip(got, expect)):
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item() + 1e-30
        assert err <= tol * scale, (what, i, err, scale)


def _map_cases(inputs, window, shift):
    qkv, table, dense, pad, ls = inputs
    v1 = (lambda a, b, c: window_attention(a, num_heads=2, window_size=window, shift_size=shift, rel_pos_bias=b,
                                           pad_qkv=c), (qkv, table, pad))
    v2 = (lambda a, b, c, e: window_attention(a, num_heads=2, window_size=window, shift_size=shift, rel_pos_bias=b,
                                              pad_qkv=c, logit_scale=e), (qkv, dense, pad, ls))
    return v1, v2


def _check_against_reference(cases, tol=2e-5):
    for fn, leaves in cases:
        with vk.use_backend("reference"):
            y_ref, g_ref = _grads(fn, leaves)
        with vk.use_backend("triton"):
            y, g = _grads(fn, leaves)
        _assert_close_rel((y,), (y_ref,), tol, "forward")
        _assert_close_rel(g, g_ref, tol, "gradients")


@pytest.mark.parametrize("shift", [(0, 0), (3, 2)])
def test_tiled_path_of_large_windows(kernels, monkeypatch, shift):
    """7x7 windows through the row/column kernels with 32 x 32 tiles (2 blocks per window edge)."""
    monkeypatch.setattr(kernels, "FUSED_MAX", 16)
    monkeypatch.setattr(kernels, "TILE", 32)
    inputs = _map_inputs(b=1, h=9, w=12)  # 2 x 2 windows, padded
    _check_against_reference(_map_cases(inputs, (7, 7), shift))
    q, k, v = (torch.randn(4, 2, 49, 8, generator=_gen(i)).to(DEVICE) for i in range(3))
    mask = ref.shift_mask(14, 14, (7, 7), (3, 3)).to(DEVICE)
    dense, ls = inputs[2], inputs[4]
    _check_against_reference([
        (lambda a, b, c, e: windowed_attention(a, b, c, bias=e, mask=mask), (q, k, v, dense)),
        (lambda a, b, c, e: windowed_attention(a, b, c, logit_scale=e, mask=mask[:2]), (q, k, v, ls)),
    ])


def test_several_windows_per_program(kernels, monkeypatch):
    """The one-tile kernels' window groups (forward and backward), with a last group shorter than the
    others, windows of every kind (interior, last row, last column, corner) in one group."""
    monkeypatch.setattr(kernels, "FWD_PROGRAMS", 1)
    monkeypatch.setattr(kernels, "BWD_PROGRAMS", 1)
    monkeypatch.setattr(kernels, "MAX_WINDOWS_PER_PROGRAM", 5)
    inputs = _map_inputs(b=3)  # 3 x 6 windows of 7x7: groups of 5, the last of 3
    _check_against_reference(_map_cases(inputs, (7, 7), (3, 3)))


@pytest.mark.parametrize("shift", [(3, 2), (0, 3), (2, 0), (0, 0)])
def test_bias_mask_table_matches_timm_per_window(kernels, shift):
    """The (heads, kinds, NP, NP) tile the kernels add: for every window of a padded, shifted map, the
    tile of its kind equals (the gathered bias + timm's mask of that window) * log2(e), with -inf on the
    key columns that pad the window to the tile."""
    b, h, w, heads, window = 1, 13, 17, 2, (7, 7)
    qkv, table = _map_inputs(b=b, h=h, w=w, heads=heads, window=window)[:2]
    geo = kernels._map_geometry(qkv, heads, window, shift)
    bm = kernels._bias_mask_table(geo, table, None, qkv.device, 64).cpu().double()
    n, npad = 49, bm.shape[-1]
    assert bm.shape == (heads, 4 if any(shift) else 1, npad, npad) and npad == 64
    hp, wp = ref.padded_size(h, w, window)
    dense = ref.dense_bias(table.cpu(), window, heads).double()
    masks = ref.shift_mask(hp, wp, window, shift, dtype=torch.float64) if any(shift) else torch.zeros(
        (hp // 7) * (wp // 7), n, n, dtype=torch.float64)
    nww = wp // 7
    for win in range(masks.shape[0]):
        wy, wx = divmod(win, nww)
        kind = 2 * (shift[0] > 0 and wy == hp // 7 - 1) + (shift[1] > 0 and wx == nww - 1) if any(shift) else 0
        expect = (dense + masks[win]) * kernels.LOG2E
        torch.testing.assert_close(bm[:, kind, :n, :n], expect, rtol=1e-6, atol=1e-5)
    assert torch.isneginf(bm[:, :, :, n:]).all()


@pytest.mark.parametrize("which", ["key", "query", "value"])
@pytest.mark.parametrize("version", [1, 2])
def test_nan_flows_as_in_eager(which, version):
    """A NaN in one channel of one token's key (value) makes every query row of that (window, head)
    NaN; in its query, that token's row only. Forward and every gradient: NaN exactly where eager
    autograd through timm's math has NaN, equal elsewhere."""
    heads, d, window, shift = 2, 8, (7, 7), (3, 3)
    qkv, table, dense, pad, ls = _map_inputs(b=1, h=13, w=17, heads=heads, d=d)  # 2 x 3 windows, padded
    c = heads * d
    col = {"query": 0, "key": c, "value": 2 * c}[which] + d + 3  # head 1, channel 3
    qkv = qkv.clone()
    qkv[0, 1, 2, col] = float("nan")
    if version == 1:
        leaves = (qkv, table, pad)
        fn = (lambda a, b_, p: window_attention(a, num_heads=heads, window_size=window, shift_size=shift,
                                                rel_pos_bias=b_, pad_qkv=p))
        eager = (lambda a, b_, p: ref.window_attention(a, heads, window, shift, b_, None, p))
    else:
        leaves = (qkv, dense, pad, ls)
        fn = (lambda a, b_, p, e: window_attention(a, num_heads=heads, window_size=window, shift_size=shift,
                                                   rel_pos_bias=b_, pad_qkv=p, logit_scale=e))
        eager = (lambda a, b_, p, e: ref.window_attention(a, heads, window, shift, b_, None, p, e))
    y_ref, g_ref = _grads(eager, leaves)
    with vk.use_backend("triton"):
        y, g = _grads(fn, leaves)
    # Token (1, 2) sits at (11, 16) of the shifted map, in its corner window (rows 7..13, columns
    # 14..20 of the 14 x 21 padded map): 6 x 3 real tokens, the rest padding.
    assert torch.isfinite(y_ref[..., :d]).all()  # head 0 untouched
    nan_rows = torch.isnan(y_ref[0, :, :, d:]).any(-1)
    assert nan_rows.sum() == (1 if which == "query" else 18)
    for name, a, e in zip(("out", "qkv", "bias", "pad", "logit_scale"), (y,) + tuple(g), (y_ref,) + tuple(g_ref)):
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        ok = ~torch.isnan(e)
        torch.testing.assert_close(a[ok], e[ok], rtol=2e-4, atol=2e-4 * (e[ok].abs().max().item() + 1),
                                   msg=lambda m: f"{name}: {m}")


def test_rectangular_window_larger_than_map():
    inputs = _map_inputs(h=3, w=5, window=(4, 6))
    _check_against_reference(_map_cases(inputs, (4, 6), (2, 3)))


def test_float32_dots_follow_torch_tf32_switch(kernels):
    """fp32 dots are IEEE unless PyTorch allows TF32 for float32 matmuls (either switch)."""
    precision, allow = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert kernels._dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kernels._dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kernels._dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_bounded_by_torch_own_error(dtype, version):
    """fp16/bf16 forward and gradients against float64, at most ~2x the error of the same math done by
    autograd at that precision (timm's eager block in that dtype); v2: the cosine logits with the
    clamped logit scale and the dense bias, and their gradients. The error of exact (float64) math on the
    rounded inputs is a floor no kernel can beat: the logit-scale gradient, one cancelling sum per head,
    has eager's own error below it at times (seen: bf16, eager 1.2%, float64 math on the bf16 inputs
    1.5%, this kernel 2.5%, about one bf16 ulp of the result)."""
    heads, d, window, shift = 3, 16, (7, 7), (3, 3)
    qkv, table, dense, pad, ls = _map_inputs(torch.float64, heads=heads, d=d)
    exact_in = (qkv, table, pad) if version == 1 else (qkv, dense, pad, ls)

    def torch_own(a, b, c, *e):  # unfused, every step in a's dtype
        h, w = a.shape[1], a.shape[2]
        q, k, v, hp, wp = ref.windows_qkv(a, c, heads, window, shift)
        if version == 1:
            s = (q * d ** -0.5) @ k.transpose(-2, -1)
        else:
            s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * ref.logit_multiplier(e[0])
        s = s + ref.dense_bias(b, window, heads)
        s = s.view(a.shape[0], -1, heads, 49, 49) + ref.shift_mask(hp, wp, window, shift, a.device, a.dtype)[None, :, None]
        o = torch.softmax(s.view(-1, heads, 49, 49), -1) @ v
        return ref.heads_to_map(o, window, h, w, hp, wp, shift)

    def fused(a, b, c, *e):
        return window_attention(a, num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias=b, pad_qkv=c,
                                logit_scale=e[0] if e else None)

    y_exact, g_exact = _grads(torch_own, exact_in)
    low = [t.to(dtype) for t in exact_in]
    y_torch, g_torch = _grads(torch_own, low)
    y_rounded, g_rounded = _grads(torch_own, [t.double() for t in low])
    with vk.use_backend("triton"):
        y_ours, g_ours = _grads(fused, low)
    assert y_ours.dtype == dtype and all(g.dtype == dtype for g in g_ours)
    names = ("out", "qkv", "bias", "pad", "logit_scale")
    for name, ours, theirs, rounded, exact in zip(names, (y_ours,) + g_ours, (y_torch,) + g_torch,
                                                  (y_rounded,) + g_rounded, (y_exact,) + g_exact):
        scale = exact.abs().max().item()
        our_err = (ours.double() - exact).abs().max().item() / scale
        torch_err = (theirs.double() - exact).abs().max().item() / scale
        floor = (rounded - exact).abs().max().item() / scale
        assert our_err <= 2 * max(torch_err, floor) + 1e-4, (name, dtype, our_err, torch_err, floor)


def test_float64_falls_back_or_says_why():
    qkv = torch.randn(1, 7, 7, 24, dtype=torch.float64, device=DEVICE)
    with vk.use_backend("triton"), pytest.raises(vk.BackendUnavailableError, match="float64"):
        window_attention(qkv, num_heads=2, window_size=7)
    assert "float64" in wa_ops.TABLE.reason("triton", "backward", DEVICE, qkv)


# Swin's real shapes on a GPU (skipped without one; run by the GPU check script): every tile
# configuration compiles for the device and matches the reference in every dtype.
GPU_CASES = [
    pytest.param(8, 56, 56, 3, 32, 7, 3, id="swin-t-stage1"),
    pytest.param(8, 14, 14, 12, 32, 7, 3, id="swin-t-stage3"),
    pytest.param(2, 20, 20, 4, 32, 12, 6, id="w12-pad"),
    pytest.param(2, 32, 20, 2, 128, 16, 8, id="w16-d128-pad"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,w,heads,d,win,shift", GPU_CASES)
def test_gpu_shapes_match_reference(dtype, b, h, w, heads, d, win, shift):
    inputs = _map_inputs(torch.float32, b=b, h=h, w=w, heads=heads, d=d, window=(win, win))
    qkv, table, dense, pad, ls = inputs
    cases = [
        (lambda a, t, c: window_attention(a, num_heads=heads, window_size=win, shift_size=shift, rel_pos_bias=t,
                                          pad_qkv=c), (qkv, table, pad)),
        (lambda a, t, c, e: window_attention(a, num_heads=heads, window_size=win, shift_size=shift, rel_pos_bias=t,
                                             pad_qkv=c, logit_scale=e), (qkv, dense, pad, ls)),
    ]
    for fn, leaves in cases:
        with vk.use_backend("reference"):
            y_exact, g_exact = _grads(fn, [t.to(dtype).double() for t in leaves])  # the same rounded inputs
        with vk.use_backend("triton"):
            y, g = _grads(fn, [t.to(dtype) for t in leaves])
        # fp32: IEEE dots, float32 rounding; fp16/bf16: p and ds are rounded to the dtype for the dots.
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        _assert_close_rel((y,) + tuple(g), (y_exact,) + tuple(g_exact), tol, str(dtype))


@pytest.mark.cuda
def test_gpu_tf32_opt_in():
    """fp32 with TF32 allowed: tensor-core dots with operands rounded to TF32 (10-bit mantissa)."""
    heads, d, win, shift = 3, 32, 7, 3
    qkv, table, dense, pad, ls = _map_inputs(torch.float32, b=4, h=28, w=28, heads=heads, d=d)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for leaves in ((qkv, table, pad), (qkv, dense, pad, ls)):
            fn = (lambda a, t, c, *e: window_attention(a, num_heads=heads, window_size=win, shift_size=shift,
                                                       rel_pos_bias=t, pad_qkv=c, logit_scale=e[0] if e else None))
            with vk.use_backend("reference"):
                y_exact, g_exact = _grads(fn, [t.double() for t in leaves])
            with vk.use_backend("triton"):
                y, g = _grads(fn, leaves)
            _assert_close_rel((y,) + tuple(g), (y_exact,) + tuple(g_exact), 1e-2, "tf32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def test_opcheck_with_triton():
    """The torch.library contract (schema, fake kernels, autograd registration) holds with the Triton kernels."""
    ops = torch.ops.vlm_kernels
    qkv, table, dense, pad, ls = _map_inputs(b=1, h=5, w=7, d=4, window=(3, 4))
    q, k, v = (torch.randn(4, 2, 12, 4, generator=_gen(i)).to(DEVICE).requires_grad_(True) for i in range(3))
    mask = ref.shift_mask(6, 8, (3, 4), (1, 2)).to(DEVICE)
    with vk.use_backend("triton"):
        for p, bias, logit, shift, scale in ((pad, table, None, [1, 2], 0.5), (pad, dense, ls, [1, 2], 1.0)):
            args = (qkv.requires_grad_(True), p, bias, logit, 2, [3, 4], shift, scale)
            torch.library.opcheck(ops.window_attention_forward.default, args)
            out, lse = ops.window_attention_forward(qkv.detach(), p, bias, logit, 2, [3, 4], shift, scale)
            torch.library.opcheck(ops.window_attention_backward.default,
                                  (torch.randn_like(out), qkv.detach(), out, lse, p, bias, logit, 2, [3, 4], shift, scale))
        for bias, m, logit, scale in ((dense, mask[:2], None, 0.5), (None, None, ls, 1.0)):
            torch.library.opcheck(ops.windowed_attention_forward.default, (q, k, v, bias, m, logit, scale))
            out, lse = ops.windowed_attention_forward(q.detach(), k.detach(), v.detach(), bias, m, logit, scale)
            torch.library.opcheck(ops.windowed_attention_backward.default,
                                  (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, bias, m, logit,
                                   scale))
