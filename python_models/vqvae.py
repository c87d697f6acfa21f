"""VQ-VAE: van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation Learning" (NeurIPS 2017).

* Section 3.1, eqs. 1-2: the encoder output z_e(x) is replaced by its nearest codebook vector
  z_q(x) = e_k, k = argmin_j |z_e(x) - e_j|_2 (``vlm_kernels.nn.VectorQuantizer`` with
  ``accept_image_fmap=True``: the (B, D, h, w) map is quantised in place, no transposed copy, no
  N x K distance matrix); the decoder's gradient is copied to the encoder (straight-through).
* Section 3.2, eq. 3: ``L = -log p(x|z_q(x)) + |sg[z_e(x)] - e|^2 + beta |z_e(x) - sg[e]|^2``, with a
  Gaussian decoder of fixed variance (so the reconstruction term is the mean squared error) and
  beta = 0.25. With ``decay`` set, the codebook is the exponential moving average of appendix A.1
  instead of the codebook loss, optionally with k-means initialisation and dead-code reset
  (``threshold_ema_dead_code``, as vector-quantize-pytorch / Jukebox do).
* Section 4 (the image experiments): two stride-2 4x4 convolutions, then two residual 3x3 blocks (ReLU, 3x3 conv,
  ReLU, 1x1 conv) of 256 hidden units; the decoder mirrors it with transposed convolutions. Sizes here
  are configurable (``hidden``, ``res_hidden``, ``num_res_blocks``, ``num_downsamples``).

Tokens: ``encode_tokens(x)`` returns the (B, h, w) code indices; ``decode_tokens`` gathers their codes
from the codebook (an embedding lookup) and decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_kernels.nn import VectorQuantizer

from ._checks import (check_bool_field, check_float_field, check_images, check_int_field, check_tokens, describe,
                      resolve_config)


@dataclass
class VQVAEConfig:
    in_chans: int = 3
    hidden: int = 128
    res_hidden: int = 32
    num_res_blocks: int = 2
    num_downsamples: int = 2  # the token grid is (H / 2**n, W / 2**n)
    codebook_size: int = 512
    code_dim: int = 64
    commitment_weight: float = 0.25
    decay: Optional[float] = None  # None: learned codebook (eq. 3); a float: EMA codebook (appendix A.1)
    threshold_ema_dead_code: float = 0.0
    kmeans_init: bool = False
    kmeans_iters: int = 10

    def __post_init__(self):
        for name in ("in_chans", "hidden", "res_hidden", "num_downsamples", "codebook_size", "code_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VQVAEConfig: {name} must be a positive int, got {value!r}")
        check_int_field("VQVAEConfig", "num_res_blocks", self.num_res_blocks, minimum=0)
        check_int_field("VQVAEConfig", "kmeans_iters", self.kmeans_iters)
        check_float_field("VQVAEConfig", "commitment_weight", self.commitment_weight)
        check_float_field("VQVAEConfig", "threshold_ema_dead_code", self.threshold_ema_dead_code)
        if self.decay is not None:
            check_float_field("VQVAEConfig", "decay", self.decay, high=1.0, high_open=True)
        if self.threshold_ema_dead_code > 0 and self.decay is None:
            raise ValueError("VQVAEConfig: threshold_ema_dead_code needs an EMA codebook (a float decay)")
        check_bool_field("VQVAEConfig", "kmeans_init", self.kmeans_init)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))) (section 4)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _encoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = c.in_chans
    for i in range(c.num_downsamples):
        cout = c.hidden if i == c.num_downsamples - 1 else max(c.hidden // 2, 1)
        layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        cin = cout
    layers.append(nn.Conv2d(cin, c.hidden, 3, padding=1))
    layers += [ResBlock(c.hidden, c.res_hidden) for _ in range(c.num_res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(c.hidden, c.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c.code_dim, c.hidden, 3, padding=1)]
    layers += [ResBlock(c.hidden, c.res_hidden) for _ in range(c.num_res_blocks)]
    layers.append(nn.ReLU())
    cin = c.hidden
    for i in range(c.num_downsamples):
        last = i == c.num_downsamples - 1
        cout = c.in_chans if last else max(c.hidden // 2, 1)
        layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        cin = cout
    return nn.Sequential(*layers)


class VQVAE(nn.Module):
    """Convolutional VQ-VAE. ``forward(x)`` -> dict with ``loss`` (eq. 3: MSE + codebook/commitment
    loss), ``recon_loss`` (MSE), ``vq_loss``, ``x_rec`` and ``indices`` (B, h, w)."""

    Config = VQVAEConfig

    def __init__(self, config: Optional[VQVAEConfig] = None, **kwargs):
        super().__init__()
        self.config = c = resolve_config(type(self).__name__, VQVAEConfig, config, kwargs)
        self.encoder = _encoder(c)
        self.quantizer = VectorQuantizer(c.code_dim, c.codebook_size, decay=c.decay,
                                         commitment_weight=c.commitment_weight,
                                         threshold_ema_dead_code=c.threshold_ema_dead_code,
                                         kmeans_init=c.kmeans_init, kmeans_iters=c.kmeans_iters,
                                         accept_image_fmap=True,
                                         rotation_trick=False)  # the paper's straight-through copy
        self.decoder = _decoder(c)

    @property
    def downsample(self) -> int:
        return 2 ** self.config.num_downsamples

    def _check(self, x: Tensor) -> Tensor:
        return check_images("VQVAE", "x", x, self.config.in_chans, multiple_of=self.downsample)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (z_q (B, D, h, w), indices (B, h, w), vq loss)."""
        self._check(x)
        return self.quantizer(self.encoder(x))

    @torch.no_grad()
    def encode_tokens(self, x: Tensor) -> Tensor:
        return self.encode(x)[1]

    def decode(self, z_q: Tensor) -> Tensor:
        """(B, code_dim, h, w) quantised codes -> (B, C, H, W) images."""
        d = self.config.code_dim
        if not isinstance(z_q, Tensor) or not z_q.is_floating_point():
            got = describe(z_q) if isinstance(z_q, Tensor) else type(z_q).__name__
            raise TypeError(f"VQVAE: z_q must be a floating-point (B, {d}, h, w) tensor, got {got}")
        if z_q.dim() != 4 or z_q.shape[1] != d or z_q.shape[0] == 0:
            raise ValueError(f"VQVAE: z_q must have shape (B > 0, {d}, h, w), got {describe(z_q)}")
        return self.decoder(z_q)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, C, H, W) images, by gathering the codes from the codebook."""
        tokens = check_tokens("VQVAE", "tokens", tokens, self.config.codebook_size)
        z_q = F.embedding(tokens, self.quantizer.codebook).permute(0, 3, 1, 2)
        return self.decode(z_q)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z_q, indices, vq_loss = self.encode(x)
        x_rec = self.decode(z_q)
        recon_loss = F.mse_loss(x_rec, x)
        return {"loss": recon_loss + vq_loss, "recon_loss": recon_loss, "vq_loss": vq_loss, "x_rec": x_rec,
                "indices": indices}

    def codebook_usage(self) -> dict[str, Tensor]:
        """EMA codebooks only: fraction of codes in use and the perplexity of the running counts."""
        return self.quantizer.usage()


__all__ = ["VQVAE", "VQVAEConfig"]
