"""Thin models (python_models): shapes, gradients, a few training steps, checkpoints, bad input, and
parity with timm's ViT and dall_e's Encoder/Decoder when those packages are installed.

Tiny configurations only: the whole file runs in well under a minute on two cores."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

# python_models/ and examples/ live at the repository root, which `python -m pytest` puts on sys.path
# and a bare `pytest` does not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from python_models.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint  # noqa: E402
from python_models.dvae import (DiscreteVAE, DVAEConfig, convert_dall_e_state_dict, kl_weight_schedule,  # noqa: E402
                                learning_rate_schedule, logit_laplace_nll, map_pixels, marginal_kl_uniform,
                                temperature_schedule, unmap_pixels)
from python_models.vae import VAE, VAEConfig, beta_vae  # noqa: E402
from python_models.vit import ViT, ViTConfig, resample_pos_embed  # noqa: E402
from python_models.vqvae import VQVAE, VQVAEConfig  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions on a shared 2-core machine: more threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(**kw):
    return ViT(ViTConfig(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4,
                            "num_classes": 5, **kw}))


def tiny_vae(**kw):
    return VAE(VAEConfig(**{"img_size": 16, "hidden": (8, 16), "latent_dim": 4, **kw}))


def tiny_vqvae(**kw):
    return VQVAE(VQVAEConfig(**{"hidden": 32, "res_hidden": 8, "num_res_blocks": 1, "codebook_size": 32,
                                "code_dim": 8, **kw}))


def tiny_dvae(**kw):
    return DiscreteVAE(DVAEConfig(**{"vocab_size": 64, "n_hid": 16, "n_init": 16, "n_blk_per_group": 1,
                                     "group_count": 3, **kw}))


MODELS = {
    "vit": tiny_vit,
    "vae": tiny_vae,
    "vqvae": tiny_vqvae,
    "vqvae_ema": lambda: tiny_vqvae(decay=0.9, threshold_ema_dead_code=1.0, kmeans_init=True),
    "dvae": tiny_dvae,
}


def images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def loss_of(name, model, x, step=0):
    if name == "vit":
        return F.cross_entropy(model(x), torch.arange(x.shape[0]) % 5)
    if name == "dvae":
        return model(x, tau=1.0, beta=1.0, seed=1234)["loss"]
    return model(x)["loss"]


# ----------------------------------------------------------------------------------------------------
# Shapes


def test_vit_shapes_and_position_interpolation():
    m = tiny_vit().eval()
    x = images(2, 32)
    assert m.forward_features(x).shape == (2, 1 + 16, 32)
    assert m(x).shape == (2, 5)
    # Larger and non-square inputs: the 4x4 grid of position embeddings is interpolated.
    assert m.forward_features(images(2, 64)).shape == (2, 1 + 64, 32)
    assert m.forward_features(torch.rand(1, 3, 48, 64)).shape == (1, 1 + 48, 32)
    pos = resample_pos_embed(m.pos_embed, (4, 4), (4, 4))
    assert pos is m.pos_embed
    big = resample_pos_embed(m.pos_embed, (8, 8), (4, 4))
    assert big.shape == (1, 65, 32) and torch.equal(big[:, 0], m.pos_embed[:, 0])  # CLS kept


def test_vit_no_head_returns_cls_feature():
    m = tiny_vit(num_classes=0)
    assert m(images(3, 32)).shape == (3, 32)


def test_vae_shapes_and_prior_sampling():
    m = tiny_vae()
    out = m(images())
    assert out["x_mean"].shape == (4, 3, 16, 16) and out["mu"].shape == (4, 4) and out["kl"].shape == (4,)
    assert m.sample(3).shape == (3, 3, 16, 16)
    assert m.sample(2, mean=False).shape == (2, 3, 16, 16)
    assert beta_vae(4.0, img_size=16, hidden=(8, 16), latent_dim=4).config.beta == 4.0


def test_vae_kl_and_likelihood_are_the_closed_forms():
    m = tiny_vae()
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(m.kl_to_standard_normal(mu, logvar), expected)
    x, xm = images(2), images(2, seed=1)
    with torch.no_grad():
        m.decoder_logvar.copy_(torch.tensor([0.1, -0.3, 0.5]))
    sd = torch.exp(0.5 * m.decoder_logvar).view(1, 3, 1, 1)
    expected = -torch.distributions.Normal(xm, sd).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(m.gaussian_nll(x, xm), expected)


@pytest.mark.parametrize("ema", [False, True])
def test_vqvae_shapes_and_token_decoding(ema):
    m = tiny_vqvae(decay=0.9 if ema else None)
    x = images(2)
    out = m(x)
    assert out["x_rec"].shape == x.shape and out["indices"].shape == (2, 4, 4)
    assert out["indices"].dtype == torch.int64
    m.eval()
    z_q, idx, _ = m.encode(x)
    torch.testing.assert_close(m.decode_tokens(idx), m.decode(z_q))
    if ema:
        usage = m.codebook_usage()
        assert 0 <= float(usage["used_fraction"]) <= 1


def test_dvae_shapes_tokens_and_gather_decoding():
    m = tiny_dvae().eval()
    x = images(2)
    logits = m.encode_logits(x)
    assert logits.shape == (2, 64, 4, 4)
    tokens = m.encode_tokens(x)
    assert tokens.shape == (2, 4, 4) and torch.equal(tokens, logits.argmax(1))
    one_hot = F.one_hot(tokens, 64).permute(0, 3, 1, 2).float()
    # The embedding gather computes what the 1x1 conv does on the one-hot tokens.
    torch.testing.assert_close(m.decode_tokens(tokens), m.stats_to_image(m.decode_stats(one_hot)))
    out = m(x, tau=0.5, beta=6.6)
    assert out["x_rec"].shape == x.shape and out["recon"].shape == (2,) and out["kl"].shape == (2,)
    assert out["x_rec"].min() >= 0 and out["x_rec"].max() <= 1


def test_dvae_paper_configuration_on_meta():
    # The paper's dVAE (8192 tokens, n_hid 256, 4 groups of 2 blocks): a 32x32 grid from 256x256, with no
    # memory or compute spent (meta tensors).
    with torch.device("meta"):
        m = DiscreteVAE()
        logits = m.encoder(torch.empty(1, 3, 256, 256))
        stats = m.decoder(torch.empty(1, 8192, 32, 32))
    assert logits.shape == (1, 8192, 32, 32)
    assert stats.shape == (1, 6, 256, 256)


def test_dvae_pixels_schedules_and_logit_laplace():
    x = images(2)
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    assert float(map_pixels(x).min()) >= 0.1 - 1e-7 and float(map_pixels(x).max()) <= 0.9 + 1e-7
    assert temperature_schedule(0, 100) == pytest.approx(1.0)
    assert temperature_schedule(100, 100) == pytest.approx(1 / 16)
    assert temperature_schedule(500, 100) == pytest.approx(1 / 16)
    assert 1 / 16 < temperature_schedule(50, 100) < 1
    assert kl_weight_schedule(0, 10) == 0 and kl_weight_schedule(10, 10) == pytest.approx(6.6)
    # -ln f(x | mu, b) is the density of logit(x) ~ Laplace(mu, b), times |d logit(x) / dx|.
    xm = map_pixels(x)
    mu, log_b = torch.randn_like(x), 0.3 * torch.randn_like(x)
    laplace = torch.distributions.Laplace(mu, torch.exp(log_b))
    expected = -(laplace.log_prob(torch.logit(xm)) - torch.log(xm) - torch.log1p(-xm))
    torch.testing.assert_close(logit_laplace_nll(xm, mu, log_b), expected)


def test_dvae_learning_rate_schedule_warms_up_then_anneals():
    lrs = [learning_rate_schedule(s, 100, 1e-3, 1e-5, warmup_steps=10) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear, peak at the warm-up's end
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # the cosine's midpoint
    assert lrs[100] == pytest.approx(1e-5) and lrs[119] == pytest.approx(1e-5)
    assert learning_rate_schedule(0, 100, 1e-3, 1e-5) == pytest.approx(1e-3)  # no warm-up


def test_dvae_marginal_kl_is_the_batch_part_of_the_kl_term():
    torch.manual_seed(0)
    logits = 3 * torch.randn(4, 64, 3, 5, dtype=torch.float64)
    q = torch.softmax(logits, dim=1)
    q_bar = q.mean(dim=(0, 2, 3), keepdim=True)
    # mean_i KL(q_i || u) = KL(q_bar || u) + mean_i KL(q_i || q_bar)   (ELBO surgery)
    per_position = (q * (q.log() + math.log(64))).sum(1).mean()
    mutual_information = (q * (q.log() - q_bar.log())).sum(1).mean()
    torch.testing.assert_close(marginal_kl_uniform(logits, dim=1).double(), per_position - mutual_information)
    same = torch.zeros(6, 64, 2, 2)
    same[:, 3] = 50.0  # every position sure of token 3
    assert float(marginal_kl_uniform(same)) == pytest.approx(math.log(64), abs=1e-4)
    spread = torch.full((64, 64), -50.0).fill_diagonal_(50.0)[:, :, None, None]  # one token per image
    assert float(marginal_kl_uniform(spread)) == pytest.approx(0.0, abs=1e-4)


def test_dvae_marginal_weight_and_torch_gumbel_softmax():
    torch.manual_seed(0)
    m, x = tiny_dvae(), images(2)
    base = m(x, tau=1.0, beta=1.0, seed=3)
    extra = m(x, tau=1.0, beta=1.0, seed=3, marginal_weight=2.0)
    grid = 4 * 4
    torch.testing.assert_close(extra["loss"], base["loss"] + 2.0 * grid * base["kl_marginal"] / x[0].numel())
    out = m(x, tau=0.5, beta=1.0, gumbel_softmax=F.gumbel_softmax)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.encoder.blocks.input.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Gradients and a few training steps


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_reach_every_trained_parameter(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = images(4, 32 if name == "vit" else 16)
    loss_of(name, model, x).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_training_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = images(8, 32 if name == "vit" else 16)
    # The ViT oscillates at 3e-3 on 8 images (flat after 15 steps under torch 2.11's initialisation):
    # a lower rate, more steps.
    lr, steps = (1e-3, 25) if name == "vit" else (3e-3, 15)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(name, model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_dvae_gradient_flows_through_the_gumbel_relaxation():
    m = tiny_dvae()
    out = m(images(2), tau=1.0, beta=0.0, seed=7)  # no KL: the encoder learns only through the sample
    out["loss"].backward()
    assert m.encoder.blocks.input.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = images(2, 32 if name == "vit" else 16)
    model.train()
    loss_of(name, model, x)  # EMA codebooks and k-means init change buffers in training
    model.eval()
    path = tmp_path / f"{name}.pt"
    save_checkpoint(model, path, step=3)
    loaded = load_checkpoint(path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        if name == "dvae":
            torch.testing.assert_close(loaded.encode_logits(x), model.encode_logits(x))
        elif name == "vit":
            torch.testing.assert_close(loaded(x), model(x))
        else:
            torch.testing.assert_close(loaded(x)["x_mean" if name == "vae" else "x_rec"],
                                       model(x)["x_mean" if name == "vae" else "x_rec"])
    # Loading into an existing model of the same configuration also works.
    load_checkpoint(path, MODELS[name]())


@pytest.mark.parametrize("name, other", [
    ("vit", lambda: tiny_vit(embed_dim=48)),
    ("vae", lambda: tiny_vae(latent_dim=6)),
    ("vqvae", lambda: tiny_vqvae(codebook_size=16)),
    ("vqvae", lambda: tiny_vqvae(decay=0.9)),
    ("dvae", lambda: tiny_dvae(vocab_size=128)),
])
def test_checkpoint_of_another_configuration_names_the_mismatch(name, other, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(MODELS[name](), path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, other())
    msg = str(err.value)
    assert "key '" in msg and ("shape" in msg or "missing" in msg or "unexpected" in msg)
    assert "configuration differs" in msg


def test_checkpoint_mismatch_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(tiny_vqvae(), path)
    with pytest.raises(CheckpointMismatchError, match=r"quantizer.embed': checkpoint shape \(32, 8\), "
                                                      r"model shape \(16, 8\)"):
        load_checkpoint(path, tiny_vqvae(codebook_size=16))
    save_checkpoint(tiny_vqvae(), path)
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'quantizer.cluster_size'"):
        load_checkpoint(path, tiny_vqvae(decay=0.9))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a python_models checkpoint"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------------
# Bad input: the error names the argument and its shape


@pytest.mark.parametrize("name, call, match", [
    ("vit", lambda m: m(torch.rand(2, 1, 32, 32)), r"x must have 3 channels.*\(2, 1, 32, 32\)"),
    ("vit", lambda m: m(torch.rand(2, 3, 30, 32)), r"x height and width must be .*multiples of 8.*\(2, 3, 30, 32\)"),
    ("vit", lambda m: m(torch.rand(0, 3, 32, 32)), r"x is an empty batch.*\(0, 3, 32, 32\)"),
    ("vit", lambda m: m(torch.rand(3, 32, 32)), r"x must have shape \(B, 3, H, W\).*\(3, 32, 32\)"),
    ("vae", lambda m: m(torch.rand(2, 3, 32, 32)), r"x must be 16x16 images.*\(2, 3, 32, 32\)"),
    ("vae", lambda m: m.decode(torch.rand(2, 5)), r"z must have shape \(B, 4\).*\(2, 5\)"),
    ("vqvae", lambda m: m(torch.rand(2, 4, 16, 16)), r"x must have 3 channels.*\(2, 4, 16, 16\)"),
    ("vqvae", lambda m: m(torch.rand(2, 3, 18, 16)), r"multiples of 4.*\(2, 3, 18, 16\)"),
    ("vqvae", lambda m: m.decode_tokens(torch.full((1, 4, 4), 32)), r"tokens must lie in \[0, 32\).*\(1, 4, 4\)"),
    ("vqvae", lambda m: m.decode_tokens(torch.zeros(0, 4, 4, dtype=torch.long)), r"tokens is empty.*\(0, 4, 4\)"),
    ("dvae", lambda m: m(torch.rand(0, 3, 16, 16)), r"x is an empty batch.*\(0, 3, 16, 16\)"),
    ("dvae", lambda m: m(torch.rand(2, 3, 16, 10)), r"multiples of 4.*\(2, 3, 16, 10\)"),
    ("dvae", lambda m: m(2 * torch.rand(2, 3, 16, 16)), r"x must hold pixels in \[0, 1\].*\(2, 3, 16, 16\)"),
    ("dvae", lambda m: m.decode_tokens(torch.full((2, 4, 4), -1)), r"tokens must lie in \[0, 64\).*\(2, 4, 4\)"),
    ("dvae", lambda m: m.decode_tokens(torch.zeros(2, 4, 4)), r"tokens must be an integer tensor.*\(2, 4, 4\)"),
    ("dvae", lambda m: m.decode_stats(torch.rand(2, 63, 4, 4)), r"z must be .*\(B > 0, 64, h, w\).*\(2, 63, 4, 4\)"),
])
def test_bad_input_names_the_argument_and_shape(name, call, match):
    model = MODELS[name]()
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)


def test_vit_fixed_size_when_interpolation_is_off():
    m = tiny_vit(dynamic_img_size=False)
    with pytest.raises(ValueError, match=r"x must be 32x32 images.*\(1, 3, 64, 64\)"):
        m(torch.rand(1, 3, 64, 64))


def test_bad_configurations():
    with pytest.raises(ValueError, match="embed_dim 30 must be divisible by num_heads 4"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="n_hid must be a multiple of 4"):
        DVAEConfig(n_hid=18)
    with pytest.raises(ValueError, match="img_size 20 must be a multiple of"):
        VAEConfig(img_size=20, hidden=(8, 16, 32))
    with pytest.raises(ValueError, match="n must be a positive int"):
        tiny_vae().sample(0)


# ----------------------------------------------------------------------------------------------------
# Peers: timm's ViT, dall_e's Encoder / Decoder


def test_vit_matches_timm_state_dict_and_outputs():
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                               depth=2, num_heads=4, num_classes=5, dynamic_img_size=True).eval()
    ours = tiny_vit().eval()
    ours.load_state_dict(theirs.state_dict())  # the same names and shapes
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (1, 3, 48, 64), (1, 3, 16, 24)]:
            x = torch.randn(shape)
            torch.testing.assert_close(ours(x), theirs(x))


def _dall_e_pair():
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    # The smallest sizes dall_e's validators accept (n_hid >= 64, vocab_size >= 512), one block per group.
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    with torch.no_grad():  # non-zero biases so that a swapped w/b mapping shows
        for p in list(enc.parameters()) + list(dec.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return dall_e, enc, dec


def test_dall_e_state_dict_loads_and_reproduces_outputs():
    dall_e, enc, dec = _dall_e_pair()
    ours = DiscreteVAE.from_dall_e(enc, dec).eval()
    assert ours.config == DVAEConfig(channels=3, vocab_size=512, n_hid=64, n_init=32, n_blk_per_group=1,
                                     group_count=4)
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(dall_e.map_pixels(x), map_pixels(x))
        logits = enc(dall_e.map_pixels(x))
        torch.testing.assert_close(ours.encode_logits(x), logits)
        tokens = logits.argmax(1)
        one_hot = F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
        stats = dec(one_hot)
        torch.testing.assert_close(ours.decode_stats(one_hot), stats)
        expected = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))
        torch.testing.assert_close(ours.decode_tokens(tokens), expected)
    # The documented key mapping: `.w` / `.b` -> `.weight` / `.bias` under encoder. / decoder.
    converted = convert_dall_e_state_dict(enc.state_dict(), dec.state_dict())
    assert "encoder.blocks.group_1.block_1.res_path.conv_1.weight" in converted
    assert "decoder.blocks.input.bias" in converted
    assert set(converted) == set(ours.state_dict())


def test_dall_e_state_dict_of_another_configuration_names_the_mismatch():
    _, enc, _ = _dall_e_pair()
    ours = tiny_dvae(vocab_size=512, n_hid=64, group_count=4, n_blk_per_group=2)
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'encoder.blocks.group_1.block_2"):
        ours.load_dall_e_state_dict(encoder=enc.state_dict())


# ----------------------------------------------------------------------------------------------------
# The training examples run (briefly) on scikit-image's photographs


@pytest.mark.parametrize("script", ["train_vqvae", "train_dvae"])
def test_training_example_runs(script, tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("tqdm")
    import importlib

    module = importlib.import_module(f"examples.{script}")
    extra = ["--no-compare"] if script == "train_dvae" else []  # the comparison: the test below
    result = module.main(["--steps", "3", "--batch-size", "4", "--eval-patches", "16", "--out", str(tmp_path)] + extra)
    for split in ("held_out", "train_photos"):
        assert math.isfinite(result[split]["mse"]) and 0 < result[split]["used"] <= 1
    stem = script.split("_")[1]
    assert (tmp_path / f"{stem}_reconstructions.png").stat().st_size > 0
    assert isinstance(load_checkpoint(tmp_path / f"{stem}.pt"), VQVAE if stem == "vqvae" else DiscreteVAE)


def test_dvae_example_schedules_scale_with_the_run():
    from examples.train_dvae import Schedules, parse_args

    args = parse_args(["--steps", "1000", "--tau-anneal", "0.1", "--tau-end", "0.0625", "--kl-warmup", "0.02",
                       "--beta", "2", "--lr", "1e-3", "--lr-end", "1e-5", "--hard-from", "0.9"])
    s = Schedules(args)
    assert s(0)["tau"] == pytest.approx(1.0) and s(100)["tau"] == pytest.approx(0.0625)
    assert s(500)["tau"] == pytest.approx(0.0625)  # annealed over the first 10%, then constant
    assert s(0)["beta"] == 0 and s(20)["beta"] == pytest.approx(2.0) and s(999)["beta"] == pytest.approx(2.0)
    assert s(0)["lr"] == pytest.approx(1e-3) and s(1000)["lr"] == pytest.approx(1e-5)
    assert not s(899)["hard"] and s(900)["hard"]
    assert not any(Schedules(parse_args(["--steps", "50"]))(i)["hard"] for i in range(50))  # --hard-from 1: never


def test_dvae_example_trains_beside_torch_gumbel_softmax(tmp_path):
    # A tiny configuration through the whole script: ours and F.gumbel_softmax's run (a second process),
    # held-out evaluation of both, the Gumbel-softmax timing, the PNG and the checkpoint.
    pytest.importorskip("skimage")
    pytest.importorskip("tqdm")
    from examples.train_dvae import main

    result = main(["--steps", "4", "--batch-size", "4", "--patch", "8", "--groups", "2", "--vocab", "16",
                   "--n-hid", "8", "--n-init", "8", "--eval-patches", "8", "--eval-every", "2", "--out", str(tmp_path)])
    for res in (result, result["torch"]):
        assert [step for step, _ in res["curve"]] == [2, 4]
        for split in ("held_out", "train_photos"):
            r = res[split]
            assert math.isfinite(r["psnr"]) and 0 < r["used"] <= 1 and 1 <= r["perplexity"] <= 16
        assert res["step_ms_cpu"] > 0 and res["step_ms_wall"] > 0
    assert result["gumbel_op"]["vlm_kernels_ms"] > 0 and result["gumbel_op"]["torch_ms"] > 0
    assert (tmp_path / "dvae_reconstructions.png").stat().st_size > 0
    model = load_checkpoint(tmp_path / "dvae.pt")
    assert isinstance(model, DiscreteVAE) and model.config.vocab_size == 16 and model.config.group_count == 2


def test_vqvae_data_parallel_example_keeps_codebooks_identical(tmp_path):
    # torchrun --nproc_per_node=2 (gloo, CPU): the EMA statistics, k-means init and dead-code resets are
    # all-reduced by VectorQuantizer, with DDP's buffer broadcast off; the script fails if they differ.
    pytest.importorskip("skimage")
    import subprocess

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "examples", "train_vqvae.py"), "--steps", "4", "--batch-size", "4",
           "--eval-patches", "16", "--dead-threshold", "1.0", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "codebooks identical on all 2 ranks: True" in proc.stdout
