"""vector-quantize-pytorch's surface on our kernels: VectorQuantizer, ResidualVQ and GroupedResidualVQ.

* the usage examples of vector-quantize-pytorch's README, with our classes;
* parity with the package (skipped when it is not installed): with the same weights and inputs, the
  same indices, outputs, losses, input and parameter gradients and codebook statistics over training
  steps, in every supported configuration; their state_dicts load into ours and ours into theirs;
* an unsupported argument raises an error naming it;
* the rotation trick's backward against its formula written out with autograd;
* no N x K tensor anywhere in a residual training step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlm_kernels.nn import GroupedResidualVQ, ResidualVQ, VectorQuantizer, to_vector_quantize_state_dict
from vlm_kernels.nn.vq import _UNSUPPORTED


def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


# ---------------------------------------------------------------------------------------------------
# vector-quantize-pytorch's README examples, with our classes (and, when installed, theirs: same shapes).


README_VQ = {
    "usage": (dict(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0), (1, 1024, 256),
              [(1, 1024, 256), (1, 1024), ()]),
    "rotation_trick": (dict(dim=256, codebook_size=256, rotation_trick=True), (1, 1024, 256),
                       [(1, 1024, 256), (1, 1024), ()]),
    "lower codebook dim": (dict(dim=256, codebook_size=256, codebook_dim=16), (1, 1024, 256),
                           [(1, 1024, 256), (1, 1024), ()]),
    "cosine": (dict(dim=256, codebook_size=256, use_cosine_sim=True), (1, 1024, 256), [(1, 1024, 256), (1, 1024), ()]),
    "expire codes": (dict(dim=256, codebook_size=512, threshold_ema_dead_code=2), (1, 1024, 256),
                     [(1, 1024, 256), (1, 1024), ()]),
    "orthogonal": (dict(dim=256, codebook_size=256, accept_image_fmap=True, orthogonal_reg_weight=10,
                        orthogonal_reg_max_codes=128, orthogonal_reg_active_codes_only=False), (1, 256, 32, 32),
                   [(1, 256, 32, 32), (1, 32, 32), ()]),
    "multi-headed": (dict(dim=256, codebook_dim=32, heads=8, separate_codebook_per_head=True, codebook_size=8196,
                          accept_image_fmap=True), (1, 256, 32, 32), [(1, 256, 32, 32), (1, 32, 32, 8), ()]),
}


def _shapes(out):
    return [tuple(t.shape) for t in out]


@pytest.mark.parametrize("name", list(README_VQ))
def test_readme_vector_quantize_examples(name):
    kw, x_shape, expected = README_VQ[name]
    torch.manual_seed(0)
    x = torch.randn(x_shape)
    ours = VectorQuantizer(**kw)
    assert _shapes(ours(x)) == expected
    try:
        import vector_quantize_pytorch as theirs
    except ImportError:
        return
    assert _shapes(theirs.VectorQuantize(**kw)(x)) == expected


def test_readme_eval_output_from_indices():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=256, codebook_size=512, decay=0.8, commitment_weight=1.0).eval()
    quantized, indices, _ = vq(torch.randn(1, 1024, 256))
    assert torch.allclose(quantized, vq.get_output_from_indices(indices))


README_RVQ = {
    "residual": (ResidualVQ, dict(dim=256, num_quantizers=8, codebook_size=1024),
                 [(1, 1024, 256), (1, 1024, 8), (8,)]),
    "rq-vae": (ResidualVQ, dict(dim=256, num_quantizers=8, codebook_size=1024, stochastic_sample_codes=True,
                                sample_codebook_temp=0.1, shared_codebook=True), [(1, 1024, 256), (1, 1024, 8), (8,)]),
    "grouped": (GroupedResidualVQ, dict(dim=256, num_quantizers=8, groups=2, codebook_size=1024),
                [(1, 1024, 256), (2, 1, 1024, 8), (2, 8)]),
    "kmeans init": (ResidualVQ, dict(dim=256, codebook_size=256, num_quantizers=4, kmeans_init=True, kmeans_iters=10),
                    [(1, 1024, 256), (1, 1024, 4), (4,)]),
}


@pytest.mark.parametrize("name", list(README_RVQ))
def test_readme_residual_examples(name):
    cls, kw, expected = README_RVQ[name]
    torch.manual_seed(0)
    x = torch.randn(1, 1024, 256)
    ours = cls(**kw)
    assert _shapes(ours(x)) == expected
    if name == "residual":
        out = ours(x, return_all_codes=True)
        assert tuple(out[3].shape) == (8, 1, 1024, 256)
    try:
        import vector_quantize_pytorch as theirs
    except ImportError:
        return
    assert _shapes(getattr(theirs, cls.__name__)(**kw)(x)) == expected


def test_readme_unsupported_examples_name_the_argument():
    with pytest.raises(ValueError, match="diveq"):
        ResidualVQ(dim=256, num_quantizers=8, codebook_size=1024, diveq=True)
    with pytest.raises(ValueError, match="directional_reparam"):
        VectorQuantizer(dim=256, codebook_size=256, directional_reparam=True, directional_reparam_variance=5e-3)


# ---------------------------------------------------------------------------------------------------
# Parity with vector-quantize-pytorch.


def _twin(ours, theirs):
    ours.load_state_dict(theirs.state_dict())  # their names and (1, K, D) shapes load unchanged
    return ours


def _assert_state_close(ours, theirs, skip=()):
    mine = to_vector_quantize_state_dict(ours)
    for key, value in theirs.state_dict().items():
        if any(s in key for s in skip):
            continue
        torch.testing.assert_close(mine[key].to(value.dtype), value, rtol=1e-5, atol=1e-5, msg=key)


def _train_steps(ours, theirs, make_x, steps=3, fwd=None, loss_of=lambda out: out[2].sum(), optimizer=False,
                 check_state=True):
    """Run both through training steps on the same inputs and noise; compare everything each step."""
    fwd = fwd or {}
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs)] if optimizer else None
    for step in range(steps):
        x = make_x()
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = []
        for m, xi in zip((ours, theirs), xs):
            torch.manual_seed(1000 + step)  # the same k-means samples and dropout draws
            outs.append(m(xi, **fwd))
        (o, t) = outs
        g = torch.randn_like(t[0])
        for out in outs:
            (loss_of(out) + (out[0] * g).sum()).backward()
        assert torch.equal(o[1], t[1]), f"step {step}: {(o[1] != t[1]).sum()} indices differ"
        torch.testing.assert_close(o[0], t[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[2].to(t[2].dtype), t[2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
        theirs_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            key = name.replace("embed", "_codebook.embed") if name.endswith("embed") else name
            q = theirs_params[key]
            if p.grad is None or q.grad is None:
                assert p.grad is None and q.grad is None, name
                continue
            scale = float(q.grad.abs().max()) + 1.0  # sums over many vectors: rounding grows with the magnitude
            torch.testing.assert_close(p.grad, q.grad.reshape(p.grad.shape), rtol=1e-5, atol=1e-6 * scale, msg=name)
        if check_state:
            _assert_state_close(ours, theirs)
        if opts:
            for opt in opts:
                opt.step()
                opt.zero_grad()


VQ_CONFIGS = {
    "defaults": dict(),
    "straight-through": dict(rotation_trick=False),
    "codebook_dim": dict(codebook_dim=6),
    "layernorm_after_project_in": dict(codebook_dim=6, layernorm_after_project_in=True),
    "heads shared": dict(heads=4, codebook_dim=4),
    "heads separate": dict(heads=4, codebook_dim=5, separate_codebook_per_head=True),
    "cosine": dict(use_cosine_sim=True),
    "cosine heads separate": dict(use_cosine_sim=True, heads=2, codebook_dim=8, separate_codebook_per_head=True),
    "decay 0.5 eps": dict(decay=0.5, eps=1e-3),
    "commitment_weight": dict(commitment_weight=0.25),
    "learnable codebook": dict(learnable_codebook=True, ema_update=False),
    "learnable codebook ste": dict(learnable_codebook=True, ema_update=False, rotation_trick=False),
    "no ema update": dict(ema_update=False),
    "frozen": dict(freeze_codebook=True),
    "orthogonal": dict(orthogonal_reg_weight=10.0),
    "orthogonal active codes": dict(orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True),
    "orthogonal cosine": dict(orthogonal_reg_weight=1.0, use_cosine_sim=True),
    "orthogonal heads separate": dict(orthogonal_reg_weight=1.0, heads=2, codebook_dim=8,
                                      separate_codebook_per_head=True),
    "stochastic at temperature 0": dict(stochastic_sample_codes=True, sample_codebook_temp=0.0),
    "kmeans": dict(kmeans_init=True, kmeans_iters=4),
    "kmeans heads shared": dict(kmeans_init=True, heads=2, codebook_dim=8),
    "kmeans heads separate": dict(kmeans_init=True, heads=2, codebook_dim=8, separate_codebook_per_head=True),
    "kmeans cosine": dict(kmeans_init=True, use_cosine_sim=True),
    "route_gradients_to_input off": dict(route_gradients_to_input=False),
}


@pytest.mark.parametrize("name", list(VQ_CONFIGS))
def test_vector_quantize_parity(name):
    peer = vqp()
    kw = VQ_CONFIGS[name]
    torch.manual_seed(0)
    theirs = peer.VectorQuantize(dim=16, codebook_size=12, **kw)
    ours = _twin(VectorQuantizer(16, 12, **kw), theirs)
    # Orthogonal losses train the codebook: optimizer steps take a cosine codebook off the unit sphere.
    _train_steps(ours, theirs, lambda: torch.randn(3, 40, 16) * 2, optimizer="orthogonal" in name)


LAYOUTS = {
    "channel_last=False": (dict(channel_last=False), (2, 16, 30)),
    "image fmap": (dict(accept_image_fmap=True), (2, 16, 5, 7)),
    "image fmap projected heads": (dict(accept_image_fmap=True, heads=2, codebook_dim=4,
                                        separate_codebook_per_head=True), (2, 16, 5, 7)),
    "3d fmap": (dict(accept_3d_fmap=True), (2, 16, 3, 4, 5)),
    "one vector per row": (dict(), (50, 16)),
    "one vector per row, heads": (dict(heads=2, codebook_dim=8), (50, 16)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_vector_quantize_layouts_parity(name):
    peer = vqp()
    kw, shape = LAYOUTS[name]
    torch.manual_seed(0)
    theirs = peer.VectorQuantize(dim=16, codebook_size=12, **kw)
    ours = _twin(VectorQuantizer(16, 12, **kw), theirs)
    _train_steps(ours, theirs, lambda: torch.randn(shape))
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    q, idx, loss = ours(x)
    q_t, idx_t, loss_t = theirs(x)
    assert torch.equal(idx, idx_t)
    torch.testing.assert_close(q, q_t)
    # Theirs returns 0 in eval; ours the commitment term.
    assert float(loss_t.detach()) == 0.0 and float(loss.detach()) > 0
    torch.testing.assert_close(ours.get_output_from_indices(idx), q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(channel_last=False), dict(return_zeros_for_masked_padding=False)], ids=str)
def test_mask_parity(kw):
    """(Their masked loss breaks with heads or projections: test_mask_commitment_is_taken_in_codebook_space.)"""
    peer = vqp()
    torch.manual_seed(0)
    theirs = peer.VectorQuantize(dim=16, codebook_size=12, **kw)
    ours = _twin(VectorQuantizer(16, 12, **kw), theirs)
    mask = torch.arange(30)[None] < torch.tensor([[30], [17], [4]])
    shape = (3, 16, 30) if kw.get("channel_last") is False else (3, 30, 16)
    _train_steps(ours, theirs, lambda: torch.randn(shape), fwd=dict(mask=mask))
    q, idx, _ = ours(torch.randn(shape), lens=mask.sum(1))
    assert torch.all(idx[~mask] == -1)


def test_mask_commitment_is_taken_in_codebook_space():
    """With a mask, the loss and outputs equal those of the packed valid vectors alone (also projected)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=6, codebook_dim=3, heads=2, codebook_size=8, use_cosine_sim=True, commitment_weight=0.7)
    x = 3 * torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    q, idx, loss = vq(x, mask=mask, freeze_codebook=True)
    q_p, idx_p, loss_p = vq(x[mask][None], freeze_codebook=True)
    torch.testing.assert_close(loss, loss_p)
    assert torch.equal(idx[mask], idx_p[0]) and torch.all(idx[~mask] == -1)
    torch.testing.assert_close(q[mask], q_p[0])
    assert torch.all(q[~mask] == 0)


def test_dead_codes_parity():
    """Dead codes are the same codes as theirs; they become batch vectors with count = threshold (which
    vectors is random in both), every other code and statistic equals theirs."""
    peer = vqp()
    torch.manual_seed(0)
    # (A threshold no EMA count hits exactly: 0.8 * 1 + 0.2 * count is never 2.5.)
    theirs = peer.VectorQuantize(dim=8, codebook_size=32, threshold_ema_dead_code=2.5, decay=0.8)
    ours = _twin(VectorQuantizer(8, 32, threshold_ema_dead_code=2.5, decay=0.8), theirs)
    x = torch.randn(4, 25, 8) * 3
    _, i_o, _ = ours(x)
    _, i_t, _ = theirs(x)
    assert torch.equal(i_o, i_t)
    dead_t = theirs._codebook.cluster_size[0] == 2.5
    dead_o = ours.cluster_size == 2.5
    assert torch.equal(dead_o, dead_t) and dead_o.any() and not dead_o.all()
    torch.testing.assert_close(ours.embed[~dead_o], theirs._codebook.embed[0][~dead_t])
    torch.testing.assert_close(ours.embed_avg[~dead_o], theirs._codebook.embed_avg[0][~dead_t])
    rows = x.reshape(-1, 8)
    nearest = ((ours.embed[dead_o][:, None] - rows[None]) ** 2).sum(-1).min(1).values
    assert torch.all(nearest == 0)
    torch.testing.assert_close(ours.embed_avg[dead_o], ours.embed[dead_o] * 2.5)


def test_manual_ema_update_parity():
    """forward(ema_update=False) then update_indices equals one ordinary step (their test_manual_ema)."""
    peer = vqp()
    torch.manual_seed(0)
    theirs = peer.VectorQuantize(dim=16, codebook_size=32)
    ours = _twin(VectorQuantizer(16, 32), theirs)
    plain = _twin(VectorQuantizer(16, 32), theirs)
    x = torch.randn(2, 64, 16)
    mask = torch.rand(2, 64) > 0.4
    q1, i1, _ = plain(x, mask=mask)
    q2, i2, _ = ours(x, mask=mask, ema_update=False)
    assert torch.equal(i1, i2) and torch.equal(q1, q2)
    assert not torch.allclose(plain.embed_avg, ours.embed_avg)
    ours.update_ema_indices(x, i2, mask=mask)
    theirs(x, mask=mask, ema_update=False)
    theirs.update_ema_indices(x, i2, mask=mask)
    for m in (plain, ours):
        torch.testing.assert_close(m.cluster_size, theirs._codebook.cluster_size[0])
        torch.testing.assert_close(m.embed_avg, theirs._codebook.embed_avg[0])
        torch.testing.assert_close(m.codebook, theirs.codebook)


def test_loss_breakdown_parity():
    peer = vqp()
    torch.manual_seed(0)
    kw = dict(orthogonal_reg_weight=2.0, commitment_weight=0.5)
    theirs = peer.VectorQuantize(dim=16, codebook_size=32, **kw)
    ours = _twin(VectorQuantizer(16, 32, **kw), theirs)
    x = torch.randn(2, 30, 16)
    _, _, loss_o, parts_o = ours(x, return_loss_breakdown=True)
    _, _, loss_t, parts_t = theirs(x, return_loss_breakdown=True)
    torch.testing.assert_close(loss_o, loss_t)
    torch.testing.assert_close(parts_o.commitment, parts_t.commitment)
    torch.testing.assert_close(parts_o.orthogonal_reg, parts_t.orthogonal_reg)


RVQ_CONFIGS = {
    "defaults": dict(num_quantizers=4, codebook_size=16),
    "straight-through": dict(num_quantizers=3, codebook_size=16, rotation_trick=False),
    "projected, sizes per stage": dict(codebook_size=(16, 8, 4), codebook_dim=6),
    "shared codebook": dict(num_quantizers=4, codebook_size=16, shared_codebook=True),
    "shared codebook dead codes": dict(num_quantizers=3, codebook_size=64, shared_codebook=True,
                                       threshold_ema_dead_code=1e-9),
    "quantize dropout": dict(num_quantizers=6, codebook_size=16, quantize_dropout=True,
                             quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
    # (The straight-through estimator: a k-means code can equal a vector, and the rotation trick's 1/|residual|
    # then magnifies the rounding of their rotated (ours: exact) codes in the next stage's residual.)
    "kmeans": dict(num_quantizers=3, codebook_size=8, kmeans_init=True, rotation_trick=False),
    "cosine": dict(num_quantizers=3, codebook_size=16, use_cosine_sim=True),
    "quant_grad_frac": dict(num_quantizers=3, codebook_size=16, quant_grad_frac=0.5),
    "learnable codebooks": dict(num_quantizers=3, codebook_size=16, learnable_codebook=True, ema_update=False),
    "commitment 0.25 decay 0.99": dict(num_quantizers=3, codebook_size=16, commitment_weight=0.25, decay=0.99),
}


@pytest.mark.parametrize("name", list(RVQ_CONFIGS))
def test_residual_vq_parity(name):
    peer = vqp()
    kw = RVQ_CONFIGS[name]
    torch.manual_seed(0)
    theirs = peer.ResidualVQ(dim=16, **kw)
    ours = _twin(ResidualVQ(dim=16, **kw), theirs)
    _train_steps(ours, theirs, lambda: torch.randn(3, 40, 16) * 2, steps=4 if "dropout" in name else 3)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 40, 16)
    q, idx, _, codes = ours(x, return_all_codes=True)
    q_t, idx_t, _, codes_t = theirs(x, return_all_codes=True)
    assert torch.equal(idx, idx_t)
    torch.testing.assert_close(q, q_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codes, codes_t)
    torch.testing.assert_close(ours.get_output_from_indices(idx), theirs.get_output_from_indices(idx_t),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_output_from_indices(idx), q, rtol=1e-5, atol=1e-5)
    if ours.quantize_dropout:  # coarse indices decode with the missing stages as zeros
        torch.testing.assert_close(ours.get_output_from_indices(idx[..., :2]),
                                   theirs.get_output_from_indices(idx_t[..., :2]), rtol=1e-5, atol=1e-5)


def test_residual_vq_mask_parity():
    peer = vqp()
    torch.manual_seed(0)
    theirs = peer.ResidualVQ(dim=16, num_quantizers=3, codebook_size=16)
    ours = _twin(ResidualVQ(dim=16, num_quantizers=3, codebook_size=16), theirs)
    mask = torch.arange(30)[None] < torch.tensor([[30], [17], [4]])
    _train_steps(ours, theirs, lambda: torch.randn(3, 30, 16), fwd=dict(mask=mask))


def test_grouped_residual_vq_parity():
    peer = vqp()
    torch.manual_seed(0)
    kw = dict(dim=16, groups=2, num_quantizers=3, codebook_size=16, quantize_dropout=True)
    theirs = peer.GroupedResidualVQ(**kw)
    ours = _twin(GroupedResidualVQ(**kw), theirs)
    _train_steps(ours, theirs, lambda: torch.randn(3, 40, 16), steps=3)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 40, 16)
    q, idx, losses, codes = ours(x, return_all_codes=True)
    q_t, idx_t, losses_t, codes_t = theirs(x, return_all_codes=True)
    assert torch.equal(idx, idx_t) and losses.shape == losses_t.shape
    assert isinstance(codes, tuple) and len(codes) == 2  # one (num_quantizers, ..., codebook_dim) per group, as theirs
    for c, c_t in zip(codes, codes_t):
        torch.testing.assert_close(c, c_t)
    torch.testing.assert_close(ours.get_output_from_indices(idx), theirs.get_output_from_indices(idx_t))
    torch.testing.assert_close(ours.codebooks, theirs.codebooks)


def test_same_seed_same_initial_weights():
    """Our layers draw their initial weights as vector-quantize-pytorch's do (the benchmark relies on it)."""
    peer = vqp()
    for make_ours, make_theirs in [
        (lambda: VectorQuantizer(16, 32, codebook_dim=8, heads=2, separate_codebook_per_head=True),
         lambda: peer.VectorQuantize(dim=16, codebook_size=32, codebook_dim=8, heads=2,
                                     separate_codebook_per_head=True)),
        (lambda: ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8),
         lambda: peer.ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8)),
    ]:
        torch.manual_seed(7)
        ours = make_ours()
        torch.manual_seed(7)
        theirs = make_theirs()
        _assert_state_close(ours, theirs)


def test_state_dicts_load_both_ways():
    peer = vqp()
    torch.manual_seed(0)
    pairs = [
        (VectorQuantizer(16, 12, heads=2, codebook_dim=4, separate_codebook_per_head=True),
         peer.VectorQuantize(dim=16, codebook_size=12, heads=2, codebook_dim=4, separate_codebook_per_head=True)),
        (VectorQuantizer(16, 12, codebook_dim=4, layernorm_after_project_in=True),
         peer.VectorQuantize(dim=16, codebook_size=12, codebook_dim=4, layernorm_after_project_in=True)),
        (VectorQuantizer(16, 12, orthogonal_reg_weight=1.0),
         peer.VectorQuantize(dim=16, codebook_size=12, orthogonal_reg_weight=1.0)),
        (ResidualVQ(dim=16, num_quantizers=3, codebook_size=16),
         peer.ResidualVQ(dim=16, num_quantizers=3, codebook_size=16)),
        (ResidualVQ(dim=16, num_quantizers=3, codebook_size=16, shared_codebook=True),
         peer.ResidualVQ(dim=16, num_quantizers=3, codebook_size=16, shared_codebook=True)),
        (GroupedResidualVQ(dim=16, groups=2, num_quantizers=2, codebook_size=16),
         peer.GroupedResidualVQ(dim=16, groups=2, num_quantizers=2, codebook_size=16)),
    ]
    x = torch.randn(2, 20, 16)
    for ours, theirs in pairs:
        ours.train()(x)  # our codebooks move away from theirs
        theirs.load_state_dict(to_vector_quantize_state_dict(ours))  # ours -> theirs, strict
        ours.eval(), theirs.eval()
        assert torch.equal(ours(x)[1], theirs(x)[1])
        theirs.train()(x)  # now theirs moves
        ours.load_state_dict(theirs.state_dict())  # theirs -> ours, strict
        theirs.eval()
        assert torch.equal(ours(x)[1], theirs(x)[1])
    # Our own (flat) layout keeps loading, also into a fresh layer.
    vq = VectorQuantizer(16, 12)
    vq(x)
    copy = VectorQuantizer(16, 12)
    copy.load_state_dict(vq.state_dict())
    assert torch.equal(copy.embed, vq.embed) and torch.equal(copy.cluster_size, vq.cluster_size)


def test_stochastic_codes_follow_the_softmax():
    """stochastic_sample_codes draws code k with probability softmax(-|x - e_k| / temp) (Gumbel-max on
    vlm_kernels' sampler); eval mode and temperature 0 pick the nearest code."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3, stochastic_sample_codes=True, sample_codebook_temp=0.5, ema_update=False)
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 0]]))
    x = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(20000, 4).contiguous()
    _, idx, _ = vq(x)
    freq = torch.bincount(idx, minlength=3).double() / idx.numel()
    p = torch.softmax(-torch.cdist(x[:1].double(), vq.embed.double())[0] / 0.5, 0)
    assert torch.allclose(freq, p, atol=0.015), (freq, p)
    _, idx0, _ = vq(x[:10], sample_codebook_temp=0.0)
    assert torch.all(idx0 == 0)
    vq.eval()
    assert torch.all(vq(x[:10])[1] == 0)


# ---------------------------------------------------------------------------------------------------
# Gradients and the rotation trick.


def _rotation_by_formula(x, q):
    """VectorQuantize's rotate_to written out: s (e - 2 (e.w) w + 2 (e.u) q^) with u, q^, w, s constants."""
    eps = 1e-6
    nx, nq = x.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    u = (x / nx.clamp_min(eps)).detach()
    qh = (q / nq.clamp_min(eps)).detach()
    w = F.normalize(u + qh, dim=-1, eps=eps).detach()
    s = (nq / nx.clamp_min(eps)).detach()
    e = x
    return s * (e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * qh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channel_first", [False, True])
def test_rotation_trick_gradient_matches_its_formula(dtype, channel_first):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, commitment_weight=0.3, accept_image_fmap=channel_first).to(dtype)
    x = torch.randn(2, 8, 5, 3, dtype=dtype) if channel_first else torch.randn(4, 15, 8, dtype=dtype)
    x1 = x.clone().requires_grad_()
    q, idx, loss = vq(x1, freeze_codebook=True)  # the codes stay those of the lookup
    g = torch.randn_like(q)
    (loss + (q * g).sum()).backward()
    codes = vq.get_codes_from_indices(idx)
    assert torch.equal(q, codes.to(q.dtype))
    x2 = x.clone().requires_grad_()
    last = (lambda t: t.movedim(1, -1)) if channel_first else (lambda t: t)
    out = _rotation_by_formula(last(x2), last(codes).to(dtype))
    commit = 0.3 * F.mse_loss(x2, codes.to(dtype))
    (commit + (out * last(g)).sum()).backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)


def test_residual_gradients_reach_inputs_projections_and_learned_codebooks():
    torch.manual_seed(0)
    for kw in (dict(codebook_dim=8), dict(learnable_codebook=True, ema_update=False), dict(decay=None),
               dict(rotation_trick=False, decay=None, use_cosine_sim=True)):
        rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, **kw)
        x = torch.randn(2, 30, 16, requires_grad=True)
        q, idx, losses = rvq(x)
        (losses.sum() + q.square().sum()).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        for name, p in rvq.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (kw, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_residual_vq_dtypes(dtype):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, threshold_ema_dead_code=1.0)
    x = torch.randn(2, 30, 16, dtype=dtype, requires_grad=True)
    q, idx, losses = rvq(x)
    (losses.sum() + q.float().sum()).backward()
    assert q.dtype == dtype and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert losses.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32)
    ref.load_state_dict(rvq.state_dict())
    ref.eval(), rvq.eval()
    # Every stage picks the codes a float32 layer picks for the same residual. The residuals are computed
    # in the input's dtype (as vector-quantize-pytorch does), so the float32 oracle of stage i is fed our
    # rounded residual, not a float32 chain's (that one may flip a near-tie: bf16 under torch 2.11).
    ours = rvq(x.detach())[1]
    residual = x.detach()
    with torch.no_grad():
        for i, (layer, ref_layer) in enumerate(zip(rvq.layers, ref.layers)):
            assert torch.equal(ours[..., i], ref_layer(residual.float())[1]), i
            residual = residual - layer(residual)[0]


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kw", [dict(), dict(rotation_trick=False), dict(threshold_ema_dead_code=2.0),
                                dict(shared_codebook=True, threshold_ema_dead_code=2.0),
                                dict(stochastic_sample_codes=True, sample_codebook_temp=0.5)], ids=str)
def test_residual_training_step_keeps_no_rows_by_codes_tensor(kw):
    """No tensor of N x K elements (N vectors, K codes) in a residual training step: every stage's lookup,
    loss, estimator and EMA update is fused (the sampled codes' logits are made in row chunks)."""
    n, d, k = 4096, 4, 4096  # sampled codes: logits of at most 4M elements (n * k / 4) at a time
    rvq = ResidualVQ(dim=d, num_quantizers=3, codebook_size=k, **kw)
    x = torch.randn(1, n, d, requires_grad=True)
    with _LargestTensor() as mode:
        q, idx, losses = rvq(x)
        (losses.sum() + q.sum()).backward()
    assert mode.largest <= n * k // 4, mode.largest


# ---------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("name, value", [
    ("commitment_use_cross_entropy_loss", True), ("codebook_diversity_loss_weight", 0.1), ("straight_through", True),
    ("directional_reparam", True), ("in_place_codebook_optimizer", torch.optim.SGD), ("affine_param", True),
    ("sync_update_v", 0.5), ("manual_ema_update", True), ("vq_bridge", torch.nn.Identity()),
])
def test_unsupported_arguments_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        VectorQuantizer(16, 32, **{name: value})
    with pytest.raises(ValueError, match=name):
        ResidualVQ(dim=16, num_quantizers=2, codebook_size=32, **{name: value})
    VectorQuantizer(16, 32, **{name: _UNSUPPORTED[name][0]})  # the default is accepted


def test_other_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'codebook_sz'"):
        VectorQuantizer(16, 32, codebook_sz=3)
    with pytest.raises(ValueError, match="learnable_codebook=True needs ema_update=False"):
        VectorQuantizer(16, 32, learnable_codebook=True)
    with pytest.raises(ValueError, match="use_cosine_sim"):
        VectorQuantizer(16, 32, learnable_codebook=True, ema_update=False, use_cosine_sim=True)
    with pytest.raises(ValueError, match="heads must be 1"):
        ResidualVQ(dim=16, num_quantizers=2, codebook_size=32, heads=2)
    for name, value in (("beam_size", 4), ("implicit_neural_codebook", True), ("mlp_kwargs", {"depth": 2})):
        with pytest.raises(ValueError, match=name):
            ResidualVQ(dim=16, num_quantizers=2, codebook_size=32, **{name: value})
    with pytest.raises(ValueError, match="shared_codebook needs one codebook_size"):
        ResidualVQ(dim=16, codebook_size=(8, 16), shared_codebook=True)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(dim=16, codebook_size=8)
    vq = VectorQuantizer(16, 32)
    with pytest.raises(ValueError, match="topk"):
        vq(torch.randn(2, 5, 16), topk=2)
    with pytest.raises(ValueError, match="indices"):
        vq(torch.randn(2, 5, 16), indices=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 5\)"):
        vq(torch.randn(2, 5, 16), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask / lens need sequences"):
        VectorQuantizer(16, 32, accept_image_fmap=True)(torch.randn(1, 16, 2, 2),
                                                         mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"size 16 along the last dim, got shape \(2, 5, 15\)"):
        ResidualVQ(dim=16, num_quantizers=2, codebook_size=8)(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="indices"):
        ResidualVQ(dim=16, num_quantizers=2, codebook_size=8)(torch.randn(2, 5, 16), indices=torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="quantize_dropout"):
        ResidualVQ(dim=16, num_quantizers=3, codebook_size=8).get_codes_from_indices(
            torch.zeros(2, 5, 2, dtype=torch.long))
