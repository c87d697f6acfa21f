"""vlm_kernels.integrations.transformers: the fused window attention in Hugging Face's SwinModel,
Swinv2Model, DonutSwinModel and a VisionEncoderDecoderModel around a DonutSwin encoder.

Models are built from configs (random weights, no download). The relative position bias tables, which
transformers initialises to zeros, are filled with visible values first, as are the linear biases (a
padded token's qkv is the projection's bias). Parity is checked against the unpatched model with the
same weights: outputs and input/parameter gradients within a relative 1e-5 in float32.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import (DonutSwinConfig, DonutSwinModel, SwinConfig, SwinModel, Swinv2Config,  # noqa: E402
                          Swinv2Model)

import vlm_kernels.integrations.transformers as vk_hf  # noqa: E402
from vlm_kernels.nn import hf_swin  # noqa: E402

RTOL = 1e-5


def _donut_config(image_size, **kw):
    """Donut's encoder (window 10, Donut's layer code) scaled down to three narrow stages."""
    return DonutSwinConfig(image_size=list(image_size), window_size=10, depths=[2, 2, 2], embed_dim=32,
                           num_heads=[2, 4, 8], **kw)


# name -> (model class, config, input (H, W), batch)
MODELS = {
    # patch grids 55x45, 28x23, 14x12: every stage padded, odd blocks shifted
    "donut-220x180": (DonutSwinModel, lambda **kw: _donut_config((220, 180), **kw), (220, 180), 2),
    # 50x40 (divisible), 25x20 (padded), 13x10 (window = shorter side: transformers drops the shift)
    "donut-200x160": (DonutSwinModel, lambda **kw: _donut_config((200, 160), **kw), (200, 160), 2),
    # Swin-T widths and depths; 56x58, 28x29, 14x15, 7x8 (window 7 = shorter side in stage 4)
    "swin-t-eager": (SwinModel, lambda **kw: SwinConfig(image_size=224, attn_implementation="eager", **kw),
                     (224, 232), 1),
    "swin-t-sdpa": (SwinModel, lambda **kw: SwinConfig(image_size=224, attn_implementation="sdpa", **kw),
                    (224, 232), 1),
    # Swin v2-T widths and depths at a small image: windows (7, 7, 4, 2), shifts (3, 3, 0, 0) fixed by the
    # config's 64x64; the 64x80 input gives maps 16x20, 8x10, 4x5, 2x3 (padded, shifted on the padded map)
    "swinv2-t-64": (Swinv2Model, lambda **kw: Swinv2Config(image_size=64, **kw), (64, 80), 2),
    # windows 7 and shifts 3 in every stage (config 256x256), maps far smaller than the window at run time
    "swinv2-t-256": (Swinv2Model, lambda **kw: Swinv2Config(image_size=256, **kw), (64, 80), 1),
    # two narrow stages, for the tests of behaviour: maps 28x30, 14x15 (padded, shifted)
    "swin-small": (SwinModel, lambda **kw: SwinConfig(image_size=112, embed_dim=48, depths=[2, 2], num_heads=[2, 4],
                                                      **{"attn_implementation": "eager", **kw}), (112, 120), 2),
    "swinv2-small": (Swinv2Model, lambda **kw: Swinv2Config(image_size=64, embed_dim=48, depths=[2, 2],
                                                            num_heads=[2, 4], **kw), (64, 80), 2),
}
PARITY = [n for n in MODELS if not n.endswith("-small")]


def _visible_biases(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if name.endswith("logit_scale"):  # Swin v2: different per-head temperatures
                p.copy_(torch.rand(p.shape, generator=g) * 3.0 + 0.5)
    return model


def _build(name: str, **config_kw):
    cls, config, image, batch = MODELS[name]
    torch.manual_seed(0)
    model = _visible_biases(cls(config(**config_kw))).eval()
    return model, image, batch


def _num_layers(model) -> int:
    return sum(1 for m in model.modules() if hf_swin.known_layer_name(type(m)) or hf_swin.original_class(type(m)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-30)
    return ((a.double() - b.double()).abs().max() / scale).item()


class _OpSpy:
    """Counts the fused op calls made by the patched layers (proves the fused path ran)."""

    def __init__(self, monkeypatch):
        self.map_calls = self.windowed_calls = 0
        wa, wd = hf_swin.window_attention, hf_swin.windowed_attention

        def map_op(*a, **k):
            self.map_calls += 1
            return wa(*a, **k)

        def windowed_op(*a, **k):
            self.windowed_calls += 1
            return wd(*a, **k)

        monkeypatch.setattr(hf_swin, "window_attention", map_op)
        monkeypatch.setattr(hf_swin, "windowed_attention", windowed_op)

    @property
    def calls(self) -> int:
        return self.map_calls + self.windowed_calls


@pytest.fixture
def spy(monkeypatch):
    return _OpSpy(monkeypatch)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The fallback warning is given once per process and reason: reset for the test."""
    monkeypatch.setattr(hf_swin, "_WARNED", set())


def _run(model, x, grad_seed=3, seed=None, **kwargs):
    """(output, input grad, {param name: grad}) of last_hidden_state . random cotangent."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    y = model(x, **kwargs).last_hidden_state
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.device, y.dtype)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _grad_errors(grads: dict, exact: dict) -> dict:
    """Per tensor: max error relative to the exact tensor's largest entry, with a floor of 1e-3 of the
    largest exact gradient anywhere (some gradients are zero up to rounding, e.g. the key bias's:
    softmax ignores a per-row constant)."""
    floor = 1e-3 * max(g.abs().max().item() for g in exact.values())
    return {n: (grads[n].double() - exact[n].double()).abs().max().item() / max(exact[n].abs().max().item(), floor)
            for n in exact}


def _assert_grads_close(ours: dict, ref: dict, rtol: float):
    assert ours.keys() == ref.keys()
    for name, err in _grad_errors(ours, ref).items():
        assert err <= rtol, f"{name}: gradient error {err:.2e}"


# As the timm block tests (tests/test_window_attention.py): each parameter gradient's error against a
# float64 run of transformers is at most FACTOR times transformers' own float32 error plus FLOOR. Some
# are cancelling sums of ~1e5 float32 terms (the q/k weights behind the softmax, v2's CPB-MLP), where
# transformers' own float32 error reaches 3e-5 and the order of the sums decides the rest.
FACTOR, FLOOR = 4.0, 5e-5


def _assert_parity(ref_model, patched, x, seed=None, exact=True):
    """Output and input gradient within RTOL of transformers' float32 ones; parameter gradients bounded
    by transformers' own float32 error against float64 (``exact``), or, when a float64 run cannot share
    the random stream (dropout), within 2e-4 of transformers' float32 ones."""
    y_ref, dx_ref, dp_ref = _run(ref_model, x, seed=seed)
    y, dx, dp = _run(patched, x, seed=seed)
    assert _rel(y, y_ref) <= RTOL, f"output error {_rel(y, y_ref):.2e}"
    assert _rel(dx, dx_ref) <= RTOL, f"input gradient error {_rel(dx, dx_ref):.2e}"
    assert dp.keys() == dp_ref.keys()
    if not exact:
        _assert_grads_close(dp, dp_ref, 2e-4)
        return
    _, _, dp64 = _run(copy.deepcopy(ref_model).double(), x.double(), seed=seed)
    ours, theirs = _grad_errors(dp, dp64), _grad_errors(dp_ref, dp64)
    for name in dp64:
        assert ours[name] <= FACTOR * theirs[name] + FLOOR, (name, ours[name], theirs[name])


# ----------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", PARITY)
def test_forward_and_gradients_match_transformers(name, spy):
    model, (h, w), batch = _build(name)
    ref = copy.deepcopy(model)
    assert vk_hf.patch(model) is model
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to transformers' forward
        _assert_parity(ref, model, x)
    assert spy.calls == _num_layers(model)  # every layer ran the fused op (once, forward only)
    if name.startswith("swinv2"):  # shifted v2 blocks take the windowed op (transformers' doubled mask)
        assert spy.windowed_calls == sum(1 for m in model.modules() if getattr(m, "shift_size", 0) > 0
                                         and hf_swin.original_class(type(m)))
    # transformers' per-layer window state after the call is the same on both
    for a, b in zip(ref.modules(), model.modules()):
        if hf_swin.original_class(type(b)):
            assert (int(a.window_size), int(a.shift_size)) == (int(b.window_size), int(b.shift_size))


def test_window_equal_to_the_map_drops_the_shift_as_transformers_does():
    model, (h, w), batch = _build("donut-200x160")
    vk_hf.patch(model)
    with torch.no_grad():
        model(torch.randn(1, 3, h, w))
    last = model.encoder.layers[2].blocks  # 13x10 map, window 10: shift dropped, window kept
    assert [(blk.window_size, blk.shift_size) for blk in last] == [(10, 0), (10, 0)]
    first = model.encoder.layers[0].blocks
    assert [(blk.window_size, blk.shift_size) for blk in first] == [(10, 0), (10, 5)]


def test_map_smaller_than_the_window_fails_clearly_as_in_transformers():
    """transformers shrinks the window to the map but keeps the bias table of the full window: the
    unpatched model fails with a shape mismatch; the patched one says why."""
    model, _, _ = _build("donut-200x160")
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(1, 3, 160, 120)  # stage 3 map 10x8 < window 10
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(ValueError, match=r"10x8 feature map is smaller than the 10x10 window"):
        model(x)
    assert model.encoder.layers[2].blocks[0].window_size == ref.encoder.layers[2].blocks[0].window_size == 8


def test_nonstandard_relative_position_index_is_followed():
    """The layer's own index buffer decides the bias gather, as in transformers (Donut's is persistent,
    so a checkpoint could carry any)."""
    model, (h, w), batch = _build("donut-220x180")
    blk = model.encoder.layers[0].blocks[1].attention.self
    with torch.no_grad():
        blk.relative_position_index.copy_(blk.relative_position_index.flip(-1))
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    _assert_parity(ref, model, torch.randn(batch, 3, h, w))


@pytest.mark.parametrize("name", ["donut-220x180", "swin-small", "swinv2-small"])
def test_training_mode_with_dropout_and_stochastic_depth(name, spy):
    """Hidden dropout and drop path in training: the same random stream as transformers (the dropout
    that transformers applies in window layout draws its mask in that layout), so the same seed gives
    the same outputs and gradients."""
    model, (h, w), batch = _build(name, hidden_dropout_prob=0.2, drop_path_rate=0.3)
    model.train()
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_parity(ref, model, x, seed=123, exact=False)
    assert spy.calls == _num_layers(model)


@pytest.mark.parametrize("name", ["donut-220x180", "swin-small", "swinv2-small"])
def test_attention_dropout_runs_transformers_forward_in_training(name, spy, fresh_warnings):
    model, (h, w), batch = _build(name, attention_probs_dropout_prob=0.2)
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    _assert_parity(ref, model, x)  # eval: dropout off, the fused path
    assert spy.calls == _num_layers(model)
    model.train()
    ref.train()
    with pytest.warns(UserWarning, match="attention dropout in training"):
        _assert_parity(ref, model, x, seed=7, exact=False)
    assert spy.calls == _num_layers(model)  # no further fused call


def test_bfloat16_error_within_transformers_own(spy):
    """In bfloat16 the patched model's error against float64 is at most about transformers' own
    (the op accumulates in float32; transformers' Donut takes its softmax in bfloat16)."""
    model, (h, w), batch = _build("donut-220x180")
    ref64 = copy.deepcopy(model).double()
    ref16 = copy.deepcopy(model).to(torch.bfloat16)
    ours = vk_hf.patch(model.to(torch.bfloat16))
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = ref64(x.double()).last_hidden_state
        theirs = ref16(x.to(torch.bfloat16)).last_hidden_state
        mine = ours(x.to(torch.bfloat16)).last_hidden_state
    assert mine.dtype == torch.bfloat16
    assert _rel(mine, truth) <= 2 * _rel(theirs, truth)
    assert spy.calls == _num_layers(model)


# ----------------------------------------------------------------------------------------------------
# Keyword arguments transformers accepts


@pytest.mark.parametrize("name,attn", [("donut-220x180", None), ("swin-small", "eager"), ("swin-small", "sdpa"),
                                       ("swinv2-small", None)])
def test_output_attentions_runs_transformers_forward(name, attn, spy, fresh_warnings):
    model, (h, w), batch = _build(name, **({} if attn is None else {"attn_implementation": attn}))
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        expected = ref(x, output_attentions=True)
        with pytest.warns(UserWarning, match="output_attentions=True"):
            got = model(x, output_attentions=True)
        plain = model(x, output_attentions=False)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert len(got.attentions) == len(expected.attentions)
    for a, b in zip(got.attentions, expected.attentions):
        assert (a is None and b is None) or torch.equal(a, b)
    assert spy.calls == _num_layers(model)  # only the output_attentions=False call took the fused path
    assert _rel(plain.last_hidden_state, expected.last_hidden_state) <= RTOL


@pytest.mark.parametrize("kind", ["swin", "donut", "swinv2"])
def test_output_hidden_states_take_the_fused_path(kind, spy):
    model = _small(kind)
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(2, 3, 64, 72)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        got = model(x, output_hidden_states=True)
        expected = ref(x, output_hidden_states=True)
    assert spy.calls == _num_layers(model)
    for name in ("hidden_states", "reshaped_hidden_states"):
        assert len(getattr(got, name)) == len(getattr(expected, name))
        for a, b in zip(getattr(got, name), getattr(expected, name)):
            assert _rel(a, b) <= RTOL


def _small(kind: str):
    kw = dict(image_size=64, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4)
    if kind == "swin":
        return _visible_biases(SwinModel(SwinConfig(attn_implementation="eager", **kw))).eval()
    if kind == "donut":
        return _visible_biases(DonutSwinModel(DonutSwinConfig(**kw))).eval()
    return _visible_biases(Swinv2Model(Swinv2Config(**kw))).eval()


@pytest.mark.parametrize("kind", ["swin", "donut", "swinv2"])
def test_head_mask_and_attention_mask_behave_as_in_transformers(kind, spy, fresh_warnings):
    """transformers 5.x's Swin models take no head_mask: SwinModel passes it down to an attention that
    ignores it (the patched layer receives it and runs transformers' own forward), DonutSwinModel and
    Swinv2Model drop it before the layers (the fused path runs). SwinModel rejects attention_mask with a
    TypeError, the others drop it: the patched models do the same."""
    model = _small(kind)
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(1, 3, 64, 64)
    head_mask = torch.zeros(2, 3)
    with torch.no_grad():
        expected = ref(x, head_mask=head_mask).last_hidden_state
        assert torch.equal(expected, ref(x).last_hidden_state)  # transformers ignores it
        if kind == "swin":
            with pytest.warns(UserWarning, match="head_mask"):
                got = model(x, head_mask=head_mask).last_hidden_state
            assert spy.calls == 0 and torch.equal(got, expected)
            with pytest.raises(TypeError, match="attention_mask"):
                ref(x, attention_mask=torch.ones(1, 256))
            with pytest.warns(UserWarning, match="attention_mask"), pytest.raises(TypeError, match="attention_mask"):
                model(x, attention_mask=torch.ones(1, 256))
        else:
            got = model(x, head_mask=head_mask).last_hidden_state
            assert spy.calls == _num_layers(model) and _rel(got, expected) <= RTOL
            got = model(x, attention_mask=torch.ones(1, 256)).last_hidden_state
            assert _rel(got, ref(x, attention_mask=torch.ones(1, 256)).last_hidden_state) <= RTOL


# ----------------------------------------------------------------------------------------------------
# In place, same weights, reversible


def test_patch_is_in_place_and_keeps_parameters_and_state_dict():
    model, (h, w), _ = _build("donut-220x180")
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    keys = list(model.state_dict().keys())
    modules = {n: m for n, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    vk_hf.patch(model)
    assert list(model.state_dict().keys()) == keys
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert all(m is modules[n] for n, m in model.named_modules())
    from transformers.models.donut.modeling_donut_swin import DonutSwinLayer

    layers = [m for m in model.modules() if isinstance(m, DonutSwinLayer)]
    assert len(layers) == 6 and all(type(m).__name__ == "FusedDonutSwinLayer" for m in layers)
    assert vk_hf.is_patched(model)
    # the optimizer steps the very parameters the patched model uses
    model(torch.randn(1, 3, h, w)).last_hidden_state.sum().backward()
    before = params["encoder.layers.0.blocks.0.attention.self.query.weight"].detach().clone()
    optimizer.step()
    assert not torch.equal(model.encoder.layers[0].blocks[0].attention.self.query.weight, before)


def test_unpatch_restores_transformers_classes_and_outputs():
    model, (h, w), batch = _build("swinv2-small")
    ref = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    vk_hf.patch(model)
    x = torch.randn(batch, 3, h, w)
    with torch.no_grad():
        assert _rel(model(x).last_hidden_state, ref(x).last_hidden_state) <= RTOL
        assert vk_hf.unpatch(model) is model
        assert {n: type(m) for n, m in model.named_modules()} == classes
        assert not vk_hf.is_patched(model)
        assert torch.equal(model(x).last_hidden_state, ref(x).last_hidden_state)
        vk_hf.patch(model)
        vk_hf.patch(model)  # patching again is a no-op
        assert _rel(model(x).last_hidden_state, ref(x).last_hidden_state) <= RTOL


def test_patch_errors_and_lone_layers():
    with pytest.raises(ValueError, match="no transformers SwinLayer"):
        vk_hf.patch(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no transformers SwinLayer"):
        vk_hf.unpatch(torch.nn.Linear(2, 2))
    model, (h, w), _ = _build("donut-220x180")
    layer = model.encoder.layers[0].blocks[1]
    ref_layer = copy.deepcopy(layer)
    assert vk_hf.patch(layer) is layer and type(layer).__name__ == "FusedDonutSwinLayer"
    hidden = torch.randn(2, 55 * 45, 32)
    with torch.no_grad():
        assert _rel(layer(hidden, (55, 45))[0], ref_layer(hidden, (55, 45))[0]) <= RTOL
    # a layer whose code differs from the transformers this module reads is refused, nothing swapped
    del model.encoder.layers[1].blocks[0].attention.self.query
    with pytest.raises(ValueError, match=r"missing: attention\.self\.query"):
        vk_hf.patch(model)
    assert type(model.encoder.layers[0].blocks[0]).__name__ == "DonutSwinLayer"


def test_pickle_and_deepcopy_of_a_patched_model():
    model, (h, w), batch = _build("donut-220x180")
    vk_hf.patch(model)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        expected = model(x).last_hidden_state
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert type(loaded.encoder.layers[0].blocks[0]) is type(model.encoder.layers[0].blocks[0])
        assert torch.equal(loaded(x).last_hidden_state, expected)
        assert torch.equal(copy.deepcopy(model)(x).last_hidden_state, expected)


def test_gradient_checkpointing(spy):
    """transformers' gradient checkpointing wraps the patched forward as it wraps its own (SwinLayer is a
    GradientCheckpointingLayer): the backward recomputes the fused forward."""
    config = SwinConfig(image_size=64, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=5,
                        attn_implementation="eager")
    model = _visible_biases(SwinModel(config)).train()
    ref = copy.deepcopy(model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    vk_hf.patch(model)
    x = torch.randn(2, 3, 64, 72)
    _assert_parity(ref, model, x, seed=11, exact=False)  # SwinConfig's default drop_path_rate is 0.1
    # the backward recomputed the fused forward (stages and layers are both checkpointed: nested recomputes)
    assert spy.calls >= 2 * _num_layers(model)


# ----------------------------------------------------------------------------------------------------
# An encoder-decoder model


def test_vision_encoder_decoder_with_donut_encoder(spy):
    from transformers import MBartConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    decoder = MBartConfig(vocab_size=64, d_model=48, decoder_layers=2, decoder_attention_heads=4,
                          decoder_ffn_dim=64, encoder_layers=2, max_position_embeddings=32, is_decoder=True,
                          add_cross_attention=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(_donut_config((220, 180)), decoder)
    config.decoder_start_token_id, config.pad_token_id = 0, 1
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config).eval()
    _visible_biases(model.encoder)
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    assert type(model.encoder.encoder.layers[0].blocks[0]).__name__ == "FusedDonutSwinLayer"
    pixels = torch.randn(2, 3, 220, 180, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        px = pixels.clone().requires_grad_(True)
        out = m(pixel_values=px, labels=labels)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), px.grad, {n: p.grad for n, p in m.named_parameters()
                                                                 if p.grad is not None}

    loss_r, logits_r, dx_r, dp_r = loss_and_grads(ref)
    loss, logits, dx, dp = loss_and_grads(model)
    assert _rel(loss, loss_r) <= RTOL and _rel(logits, logits_r) <= RTOL and _rel(dx, dx_r) <= RTOL
    _assert_grads_close(dp, dp_r, 2e-4)
    assert spy.calls == 6
    with torch.no_grad():
        kw = dict(max_new_tokens=5, do_sample=False, decoder_start_token_id=0)
        assert torch.equal(model.generate(pixels, **kw), ref.generate(pixels, **kw))


# ----------------------------------------------------------------------------------------------------
# On a CUDA device (benchmarks/gpu_check.sh runs these)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["donut-220x180", "swin-t-sdpa", "swinv2-t-64"])
def test_parity_on_cuda(name, spy):
    model, (h, w), batch = _build(name)
    model = model.cuda()
    ref = copy.deepcopy(model)
    vk_hf.patch(model)
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the patch embedding in full fp32
        _assert_parity(ref, model, x)
    assert spy.calls == _num_layers(model)


@pytest.mark.cuda
def test_bfloat16_on_cuda(spy):
    model, (h, w), batch = _build("donut-220x180")
    model = model.cuda()
    ref64 = copy.deepcopy(model).double()
    ref16 = copy.deepcopy(model).to(torch.bfloat16)
    ours = vk_hf.patch(model.to(torch.bfloat16))
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        truth = ref64(x.double()).last_hidden_state
        theirs = ref16(x.to(torch.bfloat16)).last_hidden_state
        mine = ours(x.to(torch.bfloat16)).last_hidden_state
    assert _rel(mine, truth) <= 2 * _rel(theirs, truth)
    assert spy.calls == _num_layers(model)
