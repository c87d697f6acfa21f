"""Shifted-window attention (Swin v1/v2): parity with timm 1.0's blocks and models, every backend,
float64 gradcheck, torch.library checks, torch.compile, the drop-in layers and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vlm_kernels as vk
from vlm_kernels.nn import SwinTransformerBlock, SwinTransformerV2Block, WindowAttention, WindowAttentionV2
from vlm_kernels.ops import window_attention as wa_ops
from vlm_kernels.ops.window_attention import window_attention, windowed_attention
from vlm_kernels.reference import window_attention as ref

timm = pytest.importorskip("timm")
from timm.models import swin_transformer as timm_v1  # noqa: E402
from timm.models import swin_transformer_v2 as timm_v2  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def backend(cpu_backend):
    """A CPU backend that implements window attention here (skipped, with the reason, otherwise)."""
    for entry in wa_ops.TABLE.impls:
        reason = wa_ops.TABLE.reason(cpu_backend, entry, CPU)
        if reason:
            pytest.skip(f"{cpu_backend}: {reason}")
    return cpu_backend


def _float64_backends():
    return [b for b in ("reference", "cpu") if not any(wa_ops.TABLE.reason(b, e, CPU) for e in wa_ops.TABLE.impls)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Make every term visible: a bias table and qkv biases of order 1 (padded tokens then matter),
    v2 logit scales spread over [0, 5] with one head above the log(100) clamp."""
    g = _gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("relative_position_bias_table") or name.endswith("qkv.bias") \
                    or name.endswith("q_bias") or name.endswith("v_bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 5.0)
                p.view(-1)[0] = 5.0
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _timm_block(version, dim, res, heads, window, shift, always_partition=False, dtype=torch.float32):
    cls = timm_v1.SwinTransformerBlock if version == 1 else timm_v2.SwinTransformerV2Block
    with torch.random.fork_rng():  # the same weights whatever ran before (the checks' margins depend on them)
        torch.manual_seed(1000 * version + 100 * heads + dim + res[0] * res[1])
        blk = cls(dim=dim, input_resolution=res, num_heads=heads, window_size=window, shift_size=shift,
                  always_partition=always_partition).to(dtype)
    _randomize_(blk)
    return blk.eval()


def _grads(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    dy = torch.randn(y.shape, generator=_gen(7), dtype=torch.float64).to(y.dtype)
    names, params = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(y, (x,) + params, dy, allow_unused=True)
    return y.detach(), dict(zip(("input",) + names, grads))


def _assert_grads_close(ours, theirs, rtol, atol_rel):
    assert set(ours) == set(theirs)
    for name, g_theirs in theirs.items():
        g_ours = ours[name]
        if g_theirs is None:
            assert g_ours is None or torch.count_nonzero(g_ours) == 0, name
            continue
        scale = g_theirs.abs().max().item() + 1e-30
        torch.testing.assert_close(g_ours, g_theirs, rtol=rtol, atol=atol_rel * scale, msg=lambda m: f"{name}: {m}")


def _rel_err(g, exact):
    return ((g.double() - exact).abs().max() / (exact.abs().max() + 1e-30)).item()


def _check_block_against_timm(ours, theirs, x, backend, factor=4.0, floor=5e-5):
    """Forward close to timm's; every gradient's error against a float64 timm at most ``factor`` times
    timm's own float32 error, plus a floor: the logit-scale and bias gradients are cancelling sums of
    ~1e5 float32 terms whose error (~sqrt(n) * 6e-8, varying with the reduction order from run to run)
    timm sometimes happens to undercut. Semantics are pinned in float64 by the exact test below."""
    exact64 = copy.deepcopy(theirs).double()
    y_exact, g_exact = _grads(exact64, x.double())
    y_theirs, g_theirs = _grads(theirs, x)
    with vk.use_backend(backend):
        y_ours, g_ours = _grads(ours, x)
    # The forward too is bounded by timm's own float32 error: v2 scales logits by up to 100, where a
    # fixed tolerance against timm's float32 output sits at the noise level.
    fwd_ours, fwd_timm = _rel_err(y_ours, y_exact), _rel_err(y_theirs, y_exact)
    assert fwd_ours <= factor * fwd_timm + 1e-6, ("output", fwd_ours, fwd_timm)
    assert set(g_ours) == set(g_theirs)
    for name, exact in g_exact.items():
        if exact is None:
            assert g_ours[name] is None or torch.count_nonzero(g_ours[name]) == 0, name
            continue
        ours_err, timm_err = _rel_err(g_ours[name], exact), _rel_err(g_theirs[name], exact)
        # v2's logit-scale gradient is one scalar per head summing dS * cos over every (window, i, j),
        # terms of both signs: relative to its own value its float32 error grows without bound as the
        # sum cancels (seen: 2e-4 where timm happened to get 2e-5). A wrong formula is off by O(1).
        name_floor = 1e-3 if name.endswith("logit_scale") else floor
        assert ours_err <= factor * timm_err + name_floor, (name, ours_err, timm_err)


# (H, W, window, shift, dim, heads, batch): divisible, padded, rectangular, window larger than the map.
BLOCK_CASES = [
    pytest.param(56, 56, 7, 0, 96, 3, 1, id="56x56-w7"),
    pytest.param(56, 56, 7, 3, 96, 3, 1, id="56x56-w7-shift3"),
    pytest.param(20, 20, 7, 0, 32, 2, 2, id="20x20-w7-pad"),
    pytest.param(20, 20, 7, 3, 32, 2, 2, id="20x20-w7-shift3-pad"),
    pytest.param(13, 17, 7, 3, 32, 4, 2, id="13x17-w7-shift3-pad"),
    pytest.param(13, 17, (4, 6), (2, 3), 24, 3, 2, id="13x17-w4x6-shift2x3"),
    pytest.param(12, 16, 8, 4, 32, 2, 1, id="12x16-w8-shift4-pad"),
    pytest.param(24, 24, 12, 6, 64, 2, 1, id="24x24-w12-shift6"),
    pytest.param(32, 20, 16, 8, 256, 2, 1, id="32x20-w16-shift8-pad-d128"),
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("h,w,window,shift,dim,heads,batch", BLOCK_CASES)
def test_block_matches_timm(backend, version, h, w, window, shift, dim, heads, batch):
    theirs = _timm_block(version, dim, (h, w), heads, window, shift)
    ours = (SwinTransformerBlock if version == 1 else SwinTransformerV2Block).from_timm(copy.deepcopy(theirs))
    x = torch.randn(batch, h, w, dim, generator=_gen(1))
    _check_block_against_timm(ours, theirs, x, backend)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("h,w", [(5, 9), (3, 3)])
def test_window_larger_than_map_matches_timm(backend, version, h, w):
    """timm shrinks the window to the map, or pads up to it with always_partition=True."""
    for always_partition in (False, True):
        theirs = _timm_block(version, 16, (h, w), 2, 7, 3, always_partition=always_partition)
        ours = (SwinTransformerBlock if version == 1 else SwinTransformerV2Block).from_timm(copy.deepcopy(theirs))
        assert ours.window_size == theirs.window_size and ours.shift_size == theirs.shift_size
        x = torch.randn(2, h, w, 16, generator=_gen(2))
        _check_block_against_timm(ours, theirs, x, backend)


@pytest.mark.parametrize("version", [1, 2])
def test_block_without_qkv_bias_or_with_head_dim_matches_timm(backend, version):
    """No qkv bias: padded tokens' qkv are zeros (pad_qkv=None). v1's head_dim: attention width != dim."""
    cls = timm_v1.SwinTransformerBlock if version == 1 else timm_v2.SwinTransformerV2Block
    kwargs = dict(dim=32, input_resolution=(13, 17), num_heads=2, window_size=7, shift_size=3, qkv_bias=False)
    variants = [kwargs] + ([dict(kwargs, qkv_bias=True, head_dim=12)] if version == 1 else [])
    for kw in variants:
        theirs = cls(**kw).eval()
        _randomize_(theirs)
        ours = (SwinTransformerBlock if version == 1 else SwinTransformerV2Block).from_timm(copy.deepcopy(theirs))
        _check_block_against_timm(ours, theirs, torch.randn(2, 13, 17, 32, generator=_gen(16)), backend)


def test_block_under_cpu_autocast_bfloat16(backend):
    blk = SwinTransformerBlock(32, (13, 17), num_heads=2, window_size=7, shift_size=3).eval()
    _randomize_(blk)
    x = torch.randn(2, 13, 17, 32, generator=_gen(17))
    with vk.use_backend(backend):
        expect = blk(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = blk(x)
            assert blk.attn.forward_map(x, blk.shift_size).dtype == torch.bfloat16  # the op ran in bf16
    torch.testing.assert_close(got.float(), expect, rtol=0.05, atol=0.1)


def test_block_matches_timm_float64_exactly():
    """Same semantics to rounding: padded tokens, timm's mask cut on the padded map, v2's clamp."""
    for version in (1, 2):
        theirs = _timm_block(version, 24, (13, 17), 3, 7, 3, dtype=torch.float64)
        ours = (SwinTransformerBlock if version == 1 else SwinTransformerV2Block).from_timm(copy.deepcopy(theirs))
        x = torch.randn(2, 13, 17, 24, generator=_gen(3), dtype=torch.float64)
        y_theirs, g_theirs = _grads(theirs, x)
        with vk.use_backend("reference"):
            y_ours, g_ours = _grads(ours, x)
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
        _assert_grads_close(g_ours, g_theirs, rtol=1e-9, atol_rel=1e-10)


class _WithMask(torch.nn.Module):
    def __init__(self, attn, mask):
        super().__init__()
        self.attn = attn
        self.mask = mask

    def forward(self, x):
        return self.attn(x, mask=None if self.mask is None else self.mask.to(x.dtype))


@pytest.mark.parametrize("version", [1, 2])
def test_window_attention_module_matches_timm_on_windows(backend, version):
    """WindowAttention.forward(windows, mask): timm's windows-in, windows-out interface."""
    blk = _timm_block(version, 24, (14, 21), 3, 7, 3)
    ours_attn = (WindowAttention if version == 1 else WindowAttentionV2).from_timm(copy.deepcopy(blk.attn))
    x = torch.randn(2 * 6, 49, 24, generator=_gen(4))
    for mask in (None, blk.attn_mask):
        _check_block_against_timm(_WithMask(ours_attn, mask), _WithMask(blk.attn, mask), x, backend)


def test_index_and_mask_helpers_match_timm_and_the_coordinate_rule():
    """The reference's relative index and -100 mask are timm's; the mask equals the rule the kernels use:
    tokens i, j of a window are masked iff (yi >= Hp - sh) != (yj >= Hp - sh) or (xi >= Wp - sw) != (xj >= Wp - sw),
    in padded shifted coordinates."""
    for window in ((7, 7), (4, 6), (8, 8), (1, 3)):
        torch.testing.assert_close(ref.relative_position_index(*window), timm_v1.get_relative_position_index(*window))
    for (h, w), window, shift in (((13, 17), (7, 7), (3, 3)), ((20, 20), (7, 7), (3, 3)), ((13, 17), (4, 6), (2, 3)),
                                  ((9, 9), (7, 7), (0, 3)), ((5, 5), (7, 7), (3, 3)), ((16, 16), (8, 8), (4, 4))):
        blk = timm_v1.SwinTransformerBlock(8, (h, w), num_heads=1, window_size=window, shift_size=shift,
                                           always_partition=True)
        hp, wp = ref.padded_size(h, w, window)
        mask = ref.shift_mask(hp, wp, window, shift)
        torch.testing.assert_close(mask, blk.attn_mask)
        ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        flags = torch.stack((ys >= hp - shift[0], xs >= wp - shift[1]), -1).to(torch.int64)  # Hp, Wp, 2
        flags = ref.window_partition(flags[None], window)  # nW, N, 2
        differ = (flags[:, :, None, :] != flags[:, None, :, :]).any(-1)
        torch.testing.assert_close(mask, torch.where(differ, -100.0, 0.0))


# ---------------------------------------------------------------------------------------------------
# Low precision


def test_low_precision_error_bounded_by_torch_own_error(backend):
    """fp16/bf16: error vs float64 at most ~2x that of the same math done by PyTorch at that precision."""
    b, h, w, heads, d = 2, 13, 17, 3, 16
    c = heads * d
    qkv = torch.randn(b, h, w, 3 * c, generator=_gen(8), dtype=torch.float64)
    table = torch.randn(13 * 13, heads, generator=_gen(9), dtype=torch.float64)
    pad = torch.randn(3 * c, generator=_gen(10), dtype=torch.float64)
    args = dict(num_heads=heads, window_size=7, shift_size=3)
    exact = ref.window_attention(qkv, heads, (7, 7), (3, 3), table, None, pad)
    for dtype in (torch.float16, torch.bfloat16):
        low = [t.to(dtype) for t in (qkv, table, pad)]
        # PyTorch's own: the unfused steps computed in `dtype` (timm's eager block at that precision).
        q, k, v, hp, wp = ref.windows_qkv(low[0], low[2], heads, (7, 7), (3, 3))
        s = (q * d ** -0.5) @ k.transpose(-2, -1) + ref.dense_bias(low[1], (7, 7), heads)
        s = s.view(b, -1, heads, 49, 49) + ref.shift_mask(hp, wp, (7, 7), (3, 3), dtype=dtype)[None, :, None]
        o = torch.softmax(s.view(-1, heads, 49, 49), -1) @ v
        torch_own = ref.heads_to_map(o, (7, 7), h, w, hp, wp, (3, 3))
        with vk.use_backend(backend):
            ours = window_attention(low[0], rel_pos_bias=low[1], pad_qkv=low[2], **args)
        assert ours.dtype == dtype
        torch_err = (torch_own.double() - exact).abs().max().item()
        our_err = (ours.double() - exact).abs().max().item()
        assert our_err <= 2 * torch_err + 1e-6, (dtype, our_err, torch_err)


@pytest.mark.parametrize("threads", [1, 3])
def test_many_windows_and_windows_split_between_threads(backend, threads):
    """Many windows (batch 4 of a 56x35 map: 160 windows), 5 heads, so that the units (window, head) of
    one window land on different threads: forward and every gradient element-wise vs the reference."""
    g = _gen(40)
    heads, d = 5, 16
    qkv = torch.randn(4, 52, 33, 3 * heads * d, generator=g)  # padded to 56x35
    table = torch.randn(169, heads, generator=g)
    pad = torch.randn(3 * heads * d, generator=g)
    dy = torch.randn(4, 52, 33, heads * d, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (qkv, table, pad)]
    expect = ref.window_attention(leaves[0], heads, (7, 7), (3, 3), leaves[1], None, leaves[2])
    g_expect = torch.autograd.grad(expect, leaves, dy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with vk.use_backend(backend):
            got = window_attention(leaves[0], num_heads=heads, window_size=7, shift_size=3, rel_pos_bias=leaves[1],
                                   pad_qkv=leaves[2])
            g_got = torch.autograd.grad(got, leaves, dy)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    _assert_same_grads(("qkv", "table", "pad_qkv"), g_got, g_expect, 1e-4)


# ---------------------------------------------------------------------------------------------------
# Gradients, torch.library, torch.compile


def _small_inputs(dtype=torch.float64, seed=0):
    g = _gen(seed)
    heads, window = 2, (3, 4)
    qkv = torch.randn(2, 5, 7, 3 * 2 * heads, generator=g, dtype=dtype)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, generator=g, dtype=dtype)
    dense = torch.randn(heads, 12, 12, generator=g, dtype=dtype)
    pad = torch.randn(qkv.shape[-1], generator=g, dtype=dtype)
    logit_scale = torch.tensor([1.0, 5.0], dtype=dtype).view(heads, 1, 1)  # head 1 above the clamp
    return heads, window, qkv, table, dense, pad, logit_scale


def _gradcheck(fn, inputs):
    # fast mode (random projections of the Jacobian): the element-wise comparison with autograd is
    # test_explicit_backward_matches_autograd_of_reference.
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend64", ["reference", "cpu"])
def test_gradcheck_float64(backend64):
    if backend64 not in _float64_backends():
        pytest.skip(f"{backend64}: no float64 window attention here")
    heads, window, qkv, table, dense, pad, logit_scale = _small_inputs()
    logit_scale = logit_scale.clone()
    logit_scale.view(-1)[1] = 4.0  # gradcheck needs differentiability: stay off the clamp's kink
    qkv, table, dense, pad, logit_scale = (t.requires_grad_(True) for t in (qkv, table, dense, pad, logit_scale))
    with vk.use_backend(backend64):
        for shift in ((0, 0), (1, 2)):
            assert _gradcheck(
                lambda a, b, c: window_attention(a, num_heads=heads, window_size=window, shift_size=shift,
                                                 rel_pos_bias=b, pad_qkv=c), (qkv, table, pad))
            assert _gradcheck(
                lambda a, b, c, d: window_attention(a, num_heads=heads, window_size=window, shift_size=shift,
                                                    rel_pos_bias=b, pad_qkv=c, logit_scale=d),
                (qkv, dense, pad, logit_scale))
        # Full (element-wise) gradcheck on a tiny padded, shifted map.
        tiny = torch.randn(1, 3, 3, 12, generator=_gen(20), dtype=torch.float64).requires_grad_(True)
        tiny_table = torch.randn(9, heads, generator=_gen(21), dtype=torch.float64).requires_grad_(True)
        tiny_dense = torch.randn(heads, 4, 4, generator=_gen(22), dtype=torch.float64).requires_grad_(True)
        tiny_pad = torch.randn(12, generator=_gen(23), dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b, c: window_attention(a, num_heads=heads, window_size=2, shift_size=1, rel_pos_bias=b,
                                             pad_qkv=c), (tiny, tiny_table, tiny_pad))
        assert torch.autograd.gradcheck(
            lambda a, b, c, d: window_attention(a, num_heads=heads, window_size=2, shift_size=1, rel_pos_bias=b,
                                                pad_qkv=c, logit_scale=d), (tiny, tiny_dense, tiny_pad, logit_scale))
        q, k, v = (torch.randn(6, heads, 12, 4, generator=_gen(i), dtype=torch.float64).requires_grad_(True)
                   for i in range(3))
        mask = ref.shift_mask(6, 8, window, (1, 2), dtype=torch.float64)
        assert _gradcheck(lambda a, b, c, e: windowed_attention(a, b, c, bias=e, mask=mask[:3]), (q, k, v, dense))
        assert _gradcheck(lambda a, b, c, e, f: windowed_attention(a, b, c, bias=e, logit_scale=f),
                          (q, k, v, dense, logit_scale))


def test_logit_scale_gradient_is_zero_above_the_clamp():
    heads, window, qkv, table, dense, pad, logit_scale = _small_inputs()
    logit_scale = logit_scale.clone().requires_grad_(True)  # head 1 at 5.0 > log(100)
    out = window_attention(qkv, num_heads=heads, window_size=window, shift_size=1, rel_pos_bias=dense,
                           logit_scale=logit_scale)
    (g,) = torch.autograd.grad(out.square().sum(), logit_scale)
    assert g.view(-1)[0] != 0 and g.view(-1)[1] == 0


def _assert_same_grads(names, got, expect, tol):
    for name, a, b in zip(names, got, expect):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * (b.abs().max().item() + 1), msg=lambda m: f"{name}: {m}")


def test_explicit_backward_matches_autograd_of_reference(backend):
    """The backward ops (dqkv, dpad, dtable/dbias, dlogit_scale; dq, dk, dv, ...) element-wise against
    autograd through the plain reference forward."""
    dtype, tol = torch.float32, 1e-4
    heads, window, qkv, table, dense, pad, logit_scale = _small_inputs(dtype, seed=3)
    for bias, ls in ((table, None), (dense, logit_scale)):
        leaves = [t.clone().requires_grad_(True) for t in (qkv, bias, pad) + (() if ls is None else (ls,))]
        ls_leaf = leaves[3] if ls is not None else None
        expect = ref.window_attention(leaves[0], heads, window, (1, 2), leaves[1], None, leaves[2], ls_leaf)
        dy = torch.randn(expect.shape, generator=_gen(11), dtype=dtype)
        g_expect = torch.autograd.grad(expect, leaves, dy)
        with vk.use_backend(backend):
            got = window_attention(leaves[0], num_heads=heads, window_size=window, shift_size=(1, 2),
                                   rel_pos_bias=leaves[1], pad_qkv=leaves[2], logit_scale=ls_leaf)
            g_got = torch.autograd.grad(got, leaves, dy)
        torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
        _assert_same_grads(("qkv", "bias", "pad_qkv", "logit_scale"), g_got, g_expect, tol)

    mask = ref.shift_mask(6, 8, window, (1, 2))
    qkv_w = [torch.randn(8, heads, 12, 4, generator=_gen(30 + i)) for i in range(3)]
    for bias, m, ls in ((dense, mask, None), (dense, None, logit_scale), (None, mask[:2], logit_scale)):
        extra = [t for t in (bias, ls) if t is not None]
        leaves = [t.clone().requires_grad_(True) for t in qkv_w + extra]
        b_leaf = leaves[3] if bias is not None else None
        ls_leaf = leaves[-1] if ls is not None else None
        expect = ref.windowed_attention(*leaves[:3], b_leaf, m, None, ls_leaf)
        dy = torch.randn(expect.shape, generator=_gen(12), dtype=dtype)
        g_expect = torch.autograd.grad(expect, leaves, dy)
        with vk.use_backend(backend):
            got = windowed_attention(*leaves[:3], bias=b_leaf, mask=m, logit_scale=ls_leaf)
            g_got = torch.autograd.grad(got, leaves, dy)
        torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
        _assert_same_grads(("q", "k", "v", "bias/logit_scale", "logit_scale"), g_got, g_expect, tol)


def test_opcheck_every_op():
    ops = torch.ops.vlm_kernels
    heads, window, qkv, table, dense, pad, logit_scale = _small_inputs(torch.float32)
    qkv = qkv.requires_grad_(True)
    for p, bias, ls, shift, scale in ((pad, table, None, [1, 2], 0.5), (None, dense, logit_scale, [0, 0], 1.0),
                                      (None, None, None, [2, 3], 0.3)):
        torch.library.opcheck(ops.window_attention_forward.default,
                              (qkv, p, bias, ls, heads, list(window), shift, scale))
        out, lse = ops.window_attention_forward(qkv.detach(), p, bias, ls, heads, list(window), shift, scale)
        torch.library.opcheck(ops.window_attention_backward.default,
                              (torch.randn_like(out), qkv.detach(), out, lse, p, bias, ls, heads, list(window), shift,
                               scale))
    q, k, v = (torch.randn(6, heads, 12, 4, generator=_gen(i)).requires_grad_(True) for i in range(3))
    mask = ref.shift_mask(6, 8, window, (1, 2))
    cases = ((dense, mask[:3], None, 0.5), (None, None, logit_scale, 1.0), (None, mask[:2], None, 0.2))
    for bias, m, ls, scale in cases:
        torch.library.opcheck(ops.windowed_attention_forward.default, (q, k, v, bias, m, ls, scale))
        out, lse = ops.windowed_attention_forward(q.detach(), k.detach(), v.detach(), bias, m, ls, scale)
        torch.library.opcheck(ops.windowed_attention_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, bias, m, ls, scale))


def test_torch_compile_fullgraph_no_recompile():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    blocks = torch.nn.Sequential(
        SwinTransformerBlock(32, (13, 17), num_heads=2, window_size=7, shift_size=3),
        SwinTransformerV2Block(32, (13, 17), num_heads=2, window_size=7, shift_size=3),
    )
    attn = WindowAttention(32, num_heads=2, window_size=7)
    mask = ref.shift_mask(14, 21, (7, 7), (3, 3))

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, windows):
        return blocks(x).square().mean() + attn(windows, mask=mask).square().mean()

    x = torch.randn(2, 13, 17, 32, requires_grad=True)
    windows = torch.randn(12, 49, 32, requires_grad=True)
    for _ in range(2):
        loss = step(x, windows)
        loss.backward()
    assert counter.frame_count == 1, "the second call recompiled"
    eager = blocks(x).square().mean() + attn(windows, mask=mask).square().mean()
    torch.testing.assert_close(loss, eager)


# ---------------------------------------------------------------------------------------------------
# Drop-in layers and timm integration


def test_state_dicts_load_unchanged_both_ways():
    kwargs = dict(dim=32, input_resolution=(13, 17), num_heads=2, window_size=7, shift_size=3)
    for timm_cls, our_cls in ((timm_v1.SwinTransformerBlock, SwinTransformerBlock),
                              (timm_v2.SwinTransformerV2Block, SwinTransformerV2Block)):
        theirs = timm_cls(**kwargs).eval()
        _randomize_(theirs)
        ours = our_cls(**kwargs).eval()
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 13, 17, 32, generator=_gen(12))
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=2e-5)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        names_t = {n for n, _ in theirs.named_buffers()} - {"attn_mask"}
        assert names_t <= {n for n, _ in ours.named_buffers()}


@pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate")  # timm's own resize helper
@pytest.mark.parametrize("version", [1, 2])
def test_set_input_size_matches_timm(version):
    theirs = _timm_block(version, 32, (14, 14), 2, 7, 3)
    ours = (SwinTransformerBlock if version == 1 else SwinTransformerV2Block).from_timm(copy.deepcopy(theirs))
    theirs.set_input_size((24, 20), window_size=(8, 6))
    ours.set_input_size((24, 20), window_size=(8, 6))
    assert ours.window_size == theirs.window_size == (8, 6) and ours.shift_size == theirs.shift_size == (4, 3)
    if version == 1:
        torch.testing.assert_close(ours.attn.relative_position_bias_table, theirs.attn.relative_position_bias_table)
    x = torch.randn(1, 24, 20, 32, generator=_gen(13))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=2e-5)


def test_set_window_size_bicubic_option():
    attn = WindowAttention(32, num_heads=2, window_size=7)
    table = attn.relative_position_bias_table.detach().clone()
    attn.set_window_size(12, interpolation="bicubic")
    expect = torch.nn.functional.interpolate(table.T.reshape(1, 2, 13, 13), size=(23, 23), mode="bicubic",
                                             align_corners=False).reshape(2, -1).T
    torch.testing.assert_close(attn.relative_position_bias_table.detach(), expect)
    assert attn.relative_position_index.shape == (144, 144) and attn.window_size == (12, 12)
    with pytest.raises(ValueError, match="interpolation"):
        attn.set_window_size(8, interpolation="nearest")


def _compare_models(theirs, patched, x):
    y_theirs, y_ours = theirs(x), patched(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-4)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    grads_theirs = dict(theirs.named_parameters())
    for name, p in patched.named_parameters():
        g_t = grads_theirs[name].grad
        torch.testing.assert_close(p.grad, g_t, rtol=1e-3, atol=1e-4 * (g_t.abs().max().item() + 1e-30),
                                   msg=lambda m: f"{name}: {m}")


def test_patched_swin_tiny_matches_timm():
    from vlm_kernels.integrations.timm import patch

    torch.manual_seed(0)
    theirs = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    patched = copy.deepcopy(theirs)
    params_before = {n: p for n, p in patched.named_parameters()}
    assert patch(patched) is patched
    blocks = [m for m in patched.modules() if isinstance(m, SwinTransformerBlock)]
    assert len(blocks) == 12 and not any(isinstance(m, timm_v1.SwinTransformerBlock) for m in patched.modules())
    assert all(p is params_before[n] for n, p in patched.named_parameters()), "patch must keep the weights"
    assert list(patched.state_dict()) == list(theirs.state_dict())
    _compare_models(theirs, patched, torch.randn(1, 3, 224, 224, generator=_gen(14)))


def test_patched_swin_v2_matches_timm():
    from vlm_kernels.integrations.timm import patch

    torch.manual_seed(0)
    theirs = timm_v2.SwinTransformerV2(img_size=(52, 68), patch_size=4, window_size=4, embed_dim=24,
                                       depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()
    for blk in theirs.modules():
        if isinstance(blk, timm_v2.SwinTransformerV2Block):
            _randomize_(blk)
    patched = patch(copy.deepcopy(theirs))
    assert sum(isinstance(m, SwinTransformerV2Block) for m in patched.modules()) == 4
    _compare_models(theirs, patched, torch.randn(2, 3, 52, 68, generator=_gen(15)))


@pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate")  # timm's own resize helper
@pytest.mark.parametrize("cls", [timm_v1.SwinTransformer, timm_v2.SwinTransformerV2])
def test_patched_model_set_input_size_matches_timm(cls):
    from vlm_kernels.integrations.timm import patch

    torch.manual_seed(0)
    theirs = cls(img_size=64, patch_size=4, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                 num_classes=10).eval()
    for blk in theirs.modules():
        if isinstance(blk, (timm_v1.SwinTransformerBlock, timm_v2.SwinTransformerV2Block)):
            _randomize_(blk)
    patched = patch(copy.deepcopy(theirs))
    for model in (theirs, patched):
        model.set_input_size(img_size=(96, 80), window_size=6)  # 24x20 and 12x10 maps, window 6, shift 3
    x = torch.randn(1, 3, 96, 80, generator=_gen(18))
    torch.testing.assert_close(patched(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_patch_rejects_models_without_swin():
    from vlm_kernels.integrations.timm import patch

    with pytest.raises(ValueError, match="no timm Swin"):
        patch(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attention_dropout_falls_back_to_reference_in_training():
    blk = SwinTransformerBlock(16, (9, 9), num_heads=2, window_size=7, shift_size=3, attn_drop=0.5)
    x = torch.randn(2, 9, 9, 16, requires_grad=True)
    blk.train()
    torch.manual_seed(0)
    y1 = blk(x)
    y1.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    blk.eval()
    y_eval = blk(x)
    assert not torch.allclose(y1, y_eval)


# ---------------------------------------------------------------------------------------------------
# Dispatch


def test_only_registered_backends_run():
    qkv = torch.randn(1, 7, 7, 24)
    with vk.use_backend("cuda"), pytest.raises(vk.BackendUnavailableError, match="cuda"):
        window_attention(qkv, num_heads=2, window_size=7)
    name, _ = wa_ops.TABLE.select("forward", CPU)
    assert name in wa_ops.TABLE.impls["forward"]


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_qkv():
    with pytest.raises(TypeError, match=r"qkv.*torch.int64"):
        window_attention(torch.ones(1, 7, 7, 24, dtype=torch.int64), num_heads=2, window_size=7)
    with pytest.raises(TypeError, match="torch.Tensor"):
        window_attention([1.0], num_heads=2, window_size=7)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3C\).*\(7, 7, 24\)"):
        window_attention(torch.ones(7, 7, 24), num_heads=2, window_size=7)
    with pytest.raises(ValueError, match=r"last dimension of qkv must be 3\*C.*got 25"):
        window_attention(torch.ones(1, 7, 7, 25), num_heads=2, window_size=7)
    with pytest.raises(ValueError, match=r"C=8 .* not divisible by num_heads=3"):
        window_attention(torch.ones(1, 7, 7, 24), num_heads=3, window_size=7)
    with pytest.raises(ValueError, match="num_heads"):
        window_attention(torch.ones(1, 7, 7, 24), num_heads=0, window_size=7)


def test_bad_window_and_shift():
    qkv = torch.ones(1, 7, 7, 24)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        window_attention(qkv, num_heads=2, window_size=0)
    with pytest.raises(TypeError, match="window_size"):
        window_attention(qkv, num_heads=2, window_size=(7, 7, 7))
    with pytest.raises(ValueError, match="shift_size must be smaller than window_size"):
        window_attention(qkv, num_heads=2, window_size=7, shift_size=7)
    with pytest.raises(ValueError, match="shift_size must be >= 0"):
        window_attention(qkv, num_heads=2, window_size=7, shift_size=-1)


def test_bad_bias_pad_and_logit_scale():
    qkv = torch.ones(1, 7, 7, 24)
    expect = r"rel_pos_bias must be a bias table of shape \(169, 2\).*\(2, 49, 49\).*\(169, 3\)"
    with pytest.raises(ValueError, match=expect):
        window_attention(qkv, num_heads=2, window_size=7, rel_pos_bias=torch.zeros(169, 3))
    with pytest.raises(ValueError, match=r"rel_pos_bias.*\(2, 48, 48\)"):
        window_attention(qkv, num_heads=2, window_size=7, rel_pos_bias=torch.zeros(2, 48, 48))
    with pytest.raises(ValueError, match=r"pad_qkv must have shape \(24,\)"):
        window_attention(qkv, num_heads=2, window_size=7, pad_qkv=torch.zeros(8))
    with pytest.raises(ValueError, match=r"logit_scale must have shape \(2,\) or \(2, 1, 1\)"):
        window_attention(qkv, num_heads=2, window_size=7, logit_scale=torch.zeros(3))
    with pytest.raises(ValueError, match="scale and logit_scale are exclusive"):
        window_attention(qkv, num_heads=2, window_size=7, logit_scale=torch.zeros(2), scale=0.5)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        window_attention(qkv, num_heads=2, window_size=7, scale=math.inf)


def test_mixed_dtypes_and_devices():
    qkv = torch.ones(1, 7, 7, 24)
    with pytest.raises(TypeError, match=r"rel_pos_bias must have qkv's dtype torch.float32.*torch.float64"):
        window_attention(qkv, num_heads=2, window_size=7, rel_pos_bias=torch.zeros(169, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"pad_qkv must have qkv's dtype"):
        window_attention(qkv, num_heads=2, window_size=7, pad_qkv=torch.zeros(24, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"rel_pos_bias must be on qkv's device cpu.*meta"):
        window_attention(qkv, num_heads=2, window_size=7, rel_pos_bias=torch.zeros(169, 2, device="meta"))
    q = torch.ones(2, 2, 49, 4)
    with pytest.raises(TypeError, match=r"k must have q's dtype"):
        windowed_attention(q, q.double(), q)


def test_bad_windowed_inputs():
    q = torch.ones(4, 2, 49, 4)
    with pytest.raises(ValueError, match=r"q must be \(B\*nW, heads, N, d\)"):
        windowed_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match=r"v must have q's shape"):
        windowed_attention(q, q, q[:, :, :, :3])
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 49, 49\)"):
        windowed_attention(q, q, q, bias=torch.zeros(3, 49, 49))
    with pytest.raises(ValueError, match=r"mask must be \(nW, 49, 49\) with nW dividing the 4 windows"):
        windowed_attention(q, q, q, mask=torch.zeros(3, 49, 49))
    with pytest.raises(ValueError, match="mask is a constant"):
        windowed_attention(q, q, q, mask=torch.zeros(2, 49, 49, requires_grad=True))


def test_empty_inputs(backend):
    with vk.use_backend(backend):
        for shape in ((0, 5, 7, 24), (2, 0, 7, 24)):
            qkv = torch.randn(shape, requires_grad=True)
            table = torch.randn(35, 2, requires_grad=True)
            out = window_attention(qkv, num_heads=2, window_size=(3, 4), shift_size=1, rel_pos_bias=table)
            assert out.shape == shape[:3] + (8,)
            out.sum().backward()
            assert qkv.grad.shape == shape and torch.count_nonzero(table.grad) == 0
        q = torch.randn(0, 2, 12, 4)
        assert windowed_attention(q, q, q).shape == (0, 2, 12, 4)
