"""The DALL-E discrete VAE: Ramesh et al., "Zero-Shot Text-to-Image Generation" (ICML 2021), and the
encoder/decoder of OpenAI's ``dall_e`` package (github.com/openai/DALL-E, ``dall_e/encoder.py``,
``decoder.py``, ``utils.py``).

Architecture (as ``dall_e``): ``group_count`` groups of ``n_blk_per_group`` residual blocks; group g of
the encoder has ``2**(g-1) * n_hid`` channels and ends in a 2x2 max-pool (except the last); the decoder
mirrors it with nearest-neighbour 2x upsampling, starting from a 1x1 convolution of the one-hot tokens to
``n_init`` channels. A block is ``id_path(x) + post_gain * res_path(x)`` with ``post_gain = 1 / L**2``,
``L = group_count * n_blk_per_group``, and ``res_path`` = (ReLU, conv) x 4 with hidden width
``n_out / 4`` (encoder kernels 3, 3, 3, 1; decoder kernels 1, 3, 3, 3). The paper's model (the
defaults): 4 groups of 2 blocks, ``n_hid`` 256, ``n_init`` 128, an 8192-token vocabulary, a 32x32 grid
of tokens from a 256x256 image.

Training (section 2.1 and appendix A.2):

* eq. (1), the ELBO ``E_q[ln p(x | z)] - beta * KL(q(z | x) || p(z))`` with a uniform prior over the
  K = ``vocab_size`` codes: the KL term is ``vlm_kernels.categorical_kl_uniform(logits, dim=1)`` summed
  over the grid, weighted by beta (6.6 in the paper, warmed up from 0 over the first 5000 updates:
  :func:`kl_weight_schedule`).
* the Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017) of the categorical posterior:
  ``vlm_kernels.gumbel_softmax(logits, tau, dim=1)`` directly on the NCHW logits; the temperature is
  annealed from 1 to 1/16 with a cosine schedule (:func:`temperature_schedule`).
* appendix A.3, the logit-Laplace likelihood
  ``f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)`` on pixels mapped into
  [eps, 1 - eps] by ``map_pixels`` (eps = 0.1; ``unmap_pixels`` inverts it): the decoder outputs mu
  (first C channels) and ln b (last C channels); the reconstruction is ``unmap_pixels(sigmoid(mu))``.

Tokens are the argmax of the logits (:meth:`DiscreteVAE.encode_tokens`); decoding from tokens
(:meth:`DiscreteVAE.decode_tokens`) replaces the one-hot first 1x1 convolution by a gather of its
weight columns (an embedding lookup), which is what it computes on a one-hot input.

Loading ``dall_e`` weights: the module tree is the package's, and its ``Conv2d`` keeps ``w`` and ``b``
where ``nn.Conv2d`` keeps ``weight`` and ``bias``; :func:`convert_dall_e_state_dict` renames exactly
that (``blocks.group_1.block_1.res_path.conv_1.w`` -> ``...conv_1.weight``), and
:meth:`DiscreteVAE.from_dall_e` builds the matching configuration from their ``Encoder``/``Decoder``.
Their CUDA mixed precision (float16 convolutions) is not reproduced: ours run in the input's dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlm_kernels

from ._checks import check_bool_field, check_float_field, check_images, check_tokens, resolve_config

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """[0, 1] pixels -> [eps, 1 - eps], where the logit-Laplace density is finite (appendix A.3)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_nll(x: Tensor, mu: Tensor, log_b: Tensor) -> Tensor:
    """-ln f(x | mu, b) per element, x in (0, 1): ln(2b) + ln x + ln(1 - x) + |logit(x) - mu| / b."""
    return math.log(2.0) + log_b + torch.log(x) + torch.log1p(-x) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)


def temperature_schedule(step: int, total_steps: int, start: float = 1.0, end: float = 1.0 / 16) -> float:
    """Cosine annealing of the Gumbel-softmax temperature from ``start`` to ``end`` over ``total_steps``
    (the paper: 1 -> 1/16 over the first 150,000 updates), constant afterwards."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * frac))


def kl_weight_schedule(step: int, warmup_steps: int, beta: float = 6.6) -> float:
    """The KL weight, raised from 0 to ``beta`` over ``warmup_steps`` (cosine; 5000 updates in the paper)."""
    frac = min(max(step / max(warmup_steps, 1), 0.0), 1.0)
    return beta * 0.5 * (1 - math.cos(math.pi * frac))


def learning_rate_schedule(step: int, total_steps: int, peak: float, end: float, warmup_steps: int = 0) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak`` over ``warmup_steps``, then cosine annealing
    to ``end`` at ``total_steps``, constant afterwards (the paper anneals 1e-4 -> 1.25e-6 with a cosine
    over 1.2M updates and has no warm-up)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    frac = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * frac))


def marginal_kl_uniform(logits: Tensor, dim: int = 1) -> Tensor:
    """KL(q_bar || uniform) in nats, q_bar the posterior averaged over every position of the batch (all
    dims but ``dim``): ln K + sum_k q_bar_k ln q_bar_k, a scalar.

    The mean over positions of the per-position KL(q(z | x) || uniform) (eq. (1)'s KL term) is exactly
    this marginal KL plus the mutual information between position and token within the batch (Hoffman &
    Johnson 2016, "ELBO surgery"); weighting this part on its own pushes the *batch* to use the whole
    vocabulary without pushing each posterior towards uniform."""
    q = torch.softmax(logits.float(), dim=dim)
    q_bar = q.movedim(dim, -1).reshape(-1, logits.shape[dim]).mean(0)
    return math.log(logits.shape[dim]) + torch.special.xlogy(q_bar, q_bar).sum()


@dataclass
class DVAEConfig:
    channels: int = 3
    vocab_size: int = 8192
    n_hid: int = 256
    n_init: int = 128
    n_blk_per_group: int = 2
    group_count: int = 4

    def __post_init__(self):
        for name in ("channels", "vocab_size", "n_hid", "n_init", "n_blk_per_group", "group_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DVAEConfig: {name} must be a positive int, got {value!r}")
        if self.n_hid % 4:
            raise ValueError(f"DVAEConfig: n_hid must be a multiple of 4 (blocks use n_out / 4 hidden), "
                             f"got {self.n_hid}")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kw ** 2))  # dall_e's Conv2d initialisation
    nn.init.zeros_(conv.bias)
    return conv


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """``dall_e.Encoder``: (B, C, H, W) mapped pixels -> (B, vocab_size, H/2**(G-1), W/2**(G-1)) logits."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        n_layers = c.group_count * c.n_blk_per_group
        groups: list = [("input", _conv(c.channels, c.n_hid, 7))]
        n_prev = c.n_hid
        for g in range(c.group_count):
            n_out = 2 ** g * c.n_hid
            items: list = []
            for i in range(c.n_blk_per_group):
                items.append((f"block_{i + 1}", _Block(n_prev if i == 0 else n_out, n_out, n_layers, (3, 3, 3, 1))))
            if g < c.group_count - 1:
                items.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(items))))
            n_prev = n_out
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                             ("conv", _conv(n_prev, c.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class DVAEDecoder(nn.Module):
    """``dall_e.Decoder``: (B, vocab_size, h, w) one-hot or relaxed tokens -> (B, 2C, 2**(G-1) h, ...)
    logit-Laplace statistics (mu, ln b)."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        n_layers = c.group_count * c.n_blk_per_group
        groups: list = [("input", _conv(c.vocab_size, c.n_init, 1))]
        n_prev = c.n_init
        for g in range(c.group_count):
            n_out = 2 ** (c.group_count - 1 - g) * c.n_hid
            items: list = []
            for i in range(c.n_blk_per_group):
                items.append((f"block_{i + 1}", _Block(n_prev if i == 0 else n_out, n_out, n_layers, (1, 3, 3, 3))))
            if g < c.group_count - 1:
                items.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(items))))
            n_prev = n_out
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                             ("conv", _conv(n_prev, 2 * c.channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(z)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """(B, h, w) int64 tokens -> statistics, with the first 1x1 conv of the one-hot input done as an
        embedding gather of its weight columns (no (B, K, h, w) one-hot tensor)."""
        first = self.blocks.input
        table = first.weight[:, :, 0, 0].t()  # (K, n_init)
        h = (F.embedding(tokens, table) + first.bias).permute(0, 3, 1, 2)
        return self.blocks[1:](h)


def _dall_e_key(key: str) -> str:
    if key.endswith(".w"):
        return key[:-2] + ".weight"
    if key.endswith(".b"):
        return key[:-2] + ".bias"
    return key


def convert_dall_e_state_dict(encoder: Optional[Mapping[str, Tensor]] = None,
                              decoder: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """``dall_e`` Encoder/Decoder state_dicts -> a :class:`DiscreteVAE` state_dict.

    Key mapping: ``<path>.w`` -> ``encoder.<path>.weight`` (or ``decoder.``) and ``<path>.b`` ->
    ``...bias``; the module paths (``blocks.input``, ``blocks.group_g.block_i.id_path`` /
    ``res_path.conv_j``, ``blocks.output.conv``) are the same. Tensors are cast to float32 (the
    published checkpoints keep some weights in float16 on CUDA).
    """
    out: dict[str, Tensor] = {}
    for prefix, sd in (("encoder.", encoder), ("decoder.", decoder)):
        if sd is not None:
            for key, value in sd.items():
                out[prefix + _dall_e_key(key)] = value.float() if value.is_floating_point() else value
    return out


class DiscreteVAE(nn.Module):
    """DALL-E dVAE. Images are (B, C, H, W) pixels in [0, 1], H and W multiples of 2**(group_count-1).

    ``forward(x, tau, beta)`` -> dict with ``loss`` (negative beta-ELBO per pixel dimension), ``recon``
    and ``kl`` (per image, nats), ``x_rec`` (reconstruction in [0, 1]), ``logits``.
    """

    Config = DVAEConfig

    def __init__(self, config: Optional[DVAEConfig] = None, **kwargs):
        super().__init__()
        self.config = c = resolve_config(type(self).__name__, DVAEConfig, config, kwargs)
        self.encoder = DVAEEncoder(c)
        self.decoder = DVAEDecoder(c)

    # -- checks ------------------------------------------------------------------------------------------

    def _check_images(self, x: Tensor, name: str = "x") -> Tensor:
        return check_images("DiscreteVAE", name, x, self.config.channels, multiple_of=self.config.downsample)

    def _check_relaxed(self, z: Tensor) -> Tensor:
        c = self.config
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 4 or z.shape[1] != c.vocab_size \
                or z.shape[0] == 0:
            got = f"shape {tuple(z.shape)}, dtype {z.dtype}" if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"DiscreteVAE: z must be a float (B > 0, {c.vocab_size}, h, w) tensor, got {got}")
        return z

    # -- encoder -----------------------------------------------------------------------------------------

    def encode_logits(self, x: Tensor) -> Tensor:
        """[0, 1] pixels (B, C, H, W) -> (B, vocab_size, h, w) logits of q(z | x)."""
        self._check_images(x)
        return self.encoder(map_pixels(x))

    @torch.no_grad()
    def encode_tokens(self, x: Tensor) -> Tensor:
        """The tokens: argmax of the logits, (B, h, w) int64."""
        return self.encode_logits(x).argmax(dim=1)

    # -- decoder -----------------------------------------------------------------------------------------

    def decode_stats(self, z: Tensor) -> Tensor:
        """(B, vocab_size, h, w) relaxed or one-hot tokens -> (B, 2C, H, W) logit-Laplace (mu, ln b)."""
        return self.decoder(self._check_relaxed(z))

    def stats_to_image(self, stats: Tensor) -> Tensor:
        return unmap_pixels(torch.sigmoid(stats[:, : self.config.channels]))

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, h, w) tokens -> (B, C, H, W) images in [0, 1] (embedding gather instead of one-hot)."""
        tokens = check_tokens("DiscreteVAE", "tokens", tokens, self.config.vocab_size)
        return self.stats_to_image(self.decoder.forward_tokens(tokens))

    # -- training ----------------------------------------------------------------------------------------

    def forward(self, x: Tensor, tau: float = 1.0, beta: float = 6.6, *, hard: bool = False,
                seed: Optional[int] = None, marginal_weight: float = 0.0,
                gumbel_softmax: Optional[Callable[..., Tensor]] = None) -> dict[str, Tensor]:
        """``marginal_weight`` (default 0, the paper's loss) adds ``marginal_weight * h * w *``
        :func:`marginal_kl_uniform` ``(logits)`` to the per-image loss: a batch-level usage term that is
        not in the paper. ``gumbel_softmax`` replaces ``vlm_kernels.gumbel_softmax`` by a function with
        the signature of ``torch.nn.functional.gumbel_softmax(logits, tau, hard, dim=1)`` (to compare
        the two; ``seed`` then does not apply)."""
        self._check_images(x)
        check_float_field("DiscreteVAE", "beta", beta)
        check_bool_field("DiscreteVAE", "hard", hard)
        check_float_field("DiscreteVAE", "marginal_weight", marginal_weight)
        if gumbel_softmax is not None and not callable(gumbel_softmax):
            raise TypeError(f"DiscreteVAE: gumbel_softmax must be None or a function like "
                            f"torch.nn.functional.gumbel_softmax, got {type(gumbel_softmax).__name__}")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"DiscreteVAE: x must hold pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}], "
                             f"shape {tuple(x.shape)}")
        x_mapped = map_pixels(x)
        logits = self.encoder(x_mapped)
        if gumbel_softmax is None:
            z = vlm_kernels.gumbel_softmax(logits, tau, hard, dim=1, seed=seed)
        else:
            z = gumbel_softmax(logits, tau, hard, dim=1)
        stats = self.decoder(z)
        c = self.config.channels
        recon = logit_laplace_nll(x_mapped, stats[:, :c], stats[:, c:]).flatten(1).sum(1)
        kl = vlm_kernels.categorical_kl_uniform(logits, dim=1).flatten(1).sum(1)
        dims = x[0].numel()
        loss = (recon + beta * kl).mean() / dims
        if marginal_weight:
            kl_marginal = marginal_kl_uniform(logits, dim=1)
            loss = loss + marginal_weight * logits[0, 0].numel() * kl_marginal / dims
        else:
            with torch.no_grad():
                kl_marginal = marginal_kl_uniform(logits, dim=1)
        return {"loss": loss, "recon": recon, "kl": kl, "kl_marginal": kl_marginal,
                "x_rec": self.stats_to_image(stats.detach()), "logits": logits}

    # -- dall_e weights ----------------------------------------------------------------------------------

    def load_dall_e_state_dict(self, encoder: Optional[Mapping[str, Tensor]] = None,
                               decoder: Optional[Mapping[str, Tensor]] = None) -> None:
        """Load ``dall_e`` Encoder and/or Decoder state_dicts (see :func:`convert_dall_e_state_dict`);
        a clear error names any key or shape that does not match this configuration."""
        from .checkpoint import check_state_dict

        converted = convert_dall_e_state_dict(encoder, decoder)
        full = self.state_dict()
        parts = tuple(p for p, sd in (("encoder.", encoder), ("decoder.", decoder)) if sd is not None)
        check_state_dict("DiscreteVAE", {k: v for k, v in full.items() if k.startswith(parts)}, converted,
                         what="dall_e state_dict")
        self.load_state_dict(converted, strict=False)

    @classmethod
    def from_dall_e(cls, encoder=None, decoder=None) -> "DiscreteVAE":
        """Build the matching configuration from ``dall_e.Encoder`` / ``dall_e.Decoder`` modules and load
        their weights."""
        if encoder is None and decoder is None:
            raise ValueError("DiscreteVAE.from_dall_e: pass a dall_e Encoder, Decoder, or both")
        ref = encoder if encoder is not None else decoder
        config = DVAEConfig(channels=encoder.input_channels if encoder is not None else decoder.output_channels,
                            vocab_size=ref.vocab_size, n_hid=ref.n_hid, n_blk_per_group=ref.n_blk_per_group,
                            group_count=ref.group_count,
                            n_init=decoder.n_init if decoder is not None else DVAEConfig.n_init)
        if encoder is not None and decoder is not None:
            for name, a, b in (("channels", encoder.input_channels, decoder.output_channels),
                               ("vocab_size", encoder.vocab_size, decoder.vocab_size),
                               ("n_hid", encoder.n_hid, decoder.n_hid),
                               ("n_blk_per_group", encoder.n_blk_per_group, decoder.n_blk_per_group)):
                if a != b:
                    raise ValueError(f"DiscreteVAE.from_dall_e: encoder and decoder differ in {name}: {a} vs {b}")
        model = cls(config)
        model.load_dall_e_state_dict(None if encoder is None else encoder.state_dict(),
                                     None if decoder is None else decoder.state_dict())
        return model


__all__ = ["DVAEConfig", "DVAEDecoder", "DVAEEncoder", "DiscreteVAE", "convert_dall_e_state_dict",
           "kl_weight_schedule", "learning_rate_schedule", "logit_laplace_nll", "map_pixels", "marginal_kl_uniform",
           "temperature_schedule", "unmap_pixels"]
