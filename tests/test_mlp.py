"""vlm_kernels.nn.Mlp: the row-chunked timm Mlp against the eager composition (and timm's own Mlp)."""

import copy

import pytest
import torch
import torch.nn as nn

from vlm_kernels.nn.mlp import Mlp


def _mlp(dim=24, hidden=64, act=nn.GELU, chunk=7, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = Mlp(dim, hidden, act_layer=act, chunk_rows=chunk).to(dtype)
    if not bias:
        m.fc1.bias = None
        m.fc2.bias = None
    return m


def _eager(m):
    return m._eager


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [8, 30, 64])  # 8 and 30: a short last chunk of 7 rows; 64: one row over
def test_forward_and_gradients_match_eager(approximate, bias, rows):
    m = _mlp(act=lambda: nn.GELU(approximate=approximate), bias=bias)
    x = torch.randn(2, rows // 2, 24)
    x0 = x.clone()
    ours_x = x.clone().requires_grad_(True)
    ref_x = x.clone().requires_grad_(True)
    y = m(ours_x)
    y_ref = _eager(m)(ref_x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    params = [p for p in m.parameters()]
    g = torch.autograd.grad(y, [ours_x] + params, dy)
    g_ref = torch.autograd.grad(y_ref, [ref_x] + params, dy)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0)  # the input is not modified


def test_inference_matches_eager_without_a_hidden_tensor():
    m = _mlp(chunk=16).eval()
    x = torch.randn(100, 24)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _eager(m)(x), rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    m = _mlp(dim=5, hidden=9, chunk=3, dtype=torch.float64)
    x = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    w = [p.detach().clone().requires_grad_(True) for p in m.parameters()]

    def with_weights(x, w1, b1, w2, b2):
        from vlm_kernels.nn.mlp import _ChunkedMlp

        return _ChunkedMlp.apply(x, w1, b1, w2, b2, "none", 3)

    assert torch.autograd.gradcheck(with_weights, (x, *w))


def test_saves_one_hidden_tensor_for_backward():
    """Eager autograd keeps fc1's output and GELU's output (2 x rows x hidden); the chunked MLP keeps
    only fc1's output."""
    m = _mlp(dim=32, hidden=128, chunk=64)
    x = torch.randn(512, 32, requires_grad=True)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(total)

    hidden = 512 * 128 * 4
    ours, eager = saved_bytes(m), saved_bytes(_eager(m))
    assert eager - ours >= hidden - 1024, (ours, eager)


@pytest.mark.parametrize("case", ["relu", "dropout"])
def test_other_activations_and_dropout_take_the_eager_path(case):
    if case == "relu":
        m = _mlp(act=nn.ReLU)
    else:
        m = _mlp()
        m.drop1.p = 0.5
    m.train()
    x = torch.randn(40, 24)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, _eager(m)(x))


def test_from_timm_shares_weights_and_matches():
    timm_mlp = pytest.importorskip("timm.layers").Mlp
    torch.manual_seed(0)
    theirs = timm_mlp(24, 64)
    ours = Mlp.from_timm(copy.deepcopy(theirs))
    ours.chunk_rows = 7
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, 11, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    fresh = Mlp(24, 64)
    fresh.load_state_dict(theirs.state_dict())


def test_hooks_and_linear_subclasses_see_the_eager_path():
    m = _mlp()
    x = torch.randn(40, 24)
    calls = []
    handle = m.fc1.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    m(x)
    handle.remove()
    assert calls == [torch.Size([40, 64])]

    class Scaled(nn.Linear):  # e.g. a LoRA-style adapter: its forward is not weight @ x + bias
        def forward(self, x):
            return 2.0 * super().forward(x)

    s = Scaled(24, 64)
    s.load_state_dict(m.fc1.state_dict())
    m.fc1 = s
    torch.testing.assert_close(m(x), m.fc2(m.act(2.0 * torch.nn.functional.linear(x, s.weight, s.bias))))


def test_double_backward_and_torch_func():
    m = _mlp(dim=5, hidden=9, chunk=3, dtype=torch.float64)
    x = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    # gradient penalty: d/dx of |dy/dx|^2, through create_graph=True
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    (g_ref,) = torch.autograd.grad(_eager(m)(x).sum(), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), x)
    torch.testing.assert_close(gg, gg_ref)
    assert torch.autograd.gradgradcheck(lambda x: m(x), (x,))
    grad_fn = torch.func.grad(lambda x: m(x).sum())
    torch.testing.assert_close(grad_fn(x.detach()), g_ref.detach())


def test_fx_symbolic_trace():
    m = _mlp()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(40, 24)
    torch.testing.assert_close(gm(x), m(x))


def test_bfloat16_weight_gradients_as_accurate_as_eager():
    """The weight gradients sum over every row: accumulated in float32 across chunks, not rounded to
    bfloat16 after each one."""
    m = _mlp(dim=32, hidden=128, chunk=64, dtype=torch.bfloat16)
    exact = copy.deepcopy(m).double()
    x = torch.randn(2048, 32)
    dy = torch.randn(2048, 32)

    def weight_grads(mod, fn, dtype):
        mod.zero_grad(set_to_none=True)
        fn(x.to(dtype)).backward(dy.to(dtype))
        return [p.grad.double() for p in mod.parameters()]

    ref = weight_grads(exact, exact, torch.float64)
    ours = weight_grads(m, m, torch.bfloat16)
    eager = weight_grads(m, _eager(m), torch.bfloat16)
    for o, e, r in zip(ours, eager, ref):
        err_o = ((o - r).abs().max() / r.abs().max()).item()
        err_e = ((e - r).abs().max() / r.abs().max()).item()
        assert err_o <= 2 * err_e + 1e-3, (err_o, err_e)
