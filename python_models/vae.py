"""Gaussian VAE and beta-VAE on images.

* Kingma & Welling, "Auto-Encoding Variational Bayes" (ICLR 2014): the encoder q(z|x) = N(mu(x),
  diag(sigma^2(x))); the reparameterisation z = mu + sigma * eps, eps ~ N(0, I) (section 2.4);
  the SGVB estimator of the ELBO with the KL term in closed form (eq. 10, appendix B):
  ``-KL(q(z|x) || N(0, I)) = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)``;
  a Gaussian decoder p(x|z) = N(mu_dec(z), diag(sigma_dec^2)) (appendix C.2), here with one learned
  log-variance per channel (``decoder_logvar="learned"``) or a fixed one (a float).
* Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework"
  (ICLR 2017), eq. 4: ``L = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))``; beta = 1 is the VAE.

Sampling from the prior: z ~ N(0, I), x = mu_dec(z) (or a draw from p(x|z) with ``mean=False``).

The encoder and decoder are small convolutional stacks (stride-2 convolutions down, transposed
convolutions up) around linear maps to and from the latent vector, so the image size is fixed by the
configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (check_bool_field, check_count, check_float_field, check_images, check_int_field, check_latents,
                      resolve_config)


@dataclass
class VAEConfig:
    img_size: int = 32
    in_chans: int = 3
    hidden: tuple = (32, 64)  # channels after each stride-2 convolution
    latent_dim: int = 16
    beta: float = 1.0  # > 1: beta-VAE
    decoder_logvar: Union[str, float] = "learned"  # "learned" (per channel) or a fixed log-variance

    def __post_init__(self):
        for name in ("img_size", "in_chans", "latent_dim"):
            check_int_field("VAEConfig", name, getattr(self, name))
        self.hidden = tuple(self.hidden) if isinstance(self.hidden, (tuple, list)) else self.hidden
        if (not isinstance(self.hidden, tuple) or not self.hidden
                or any(not isinstance(h, int) or h <= 0 for h in self.hidden)):
            raise ValueError(f"VAEConfig: hidden must be a non-empty tuple of positive ints, got {self.hidden!r}")
        factor = 2 ** len(self.hidden)
        if self.img_size % factor:
            raise ValueError(f"VAEConfig: img_size {self.img_size} must be a multiple of 2**len(hidden) = {factor}")
        check_float_field("VAEConfig", "beta", self.beta)
        if self.decoder_logvar != "learned" and (isinstance(self.decoder_logvar, bool)
                                                 or not isinstance(self.decoder_logvar, (int, float))
                                                 or not math.isfinite(self.decoder_logvar)):
            raise ValueError(f"VAEConfig: decoder_logvar must be 'learned' or a float, got {self.decoder_logvar!r}")


class VAE(nn.Module):
    """Convolutional Gaussian VAE (beta-VAE with ``beta != 1``).

    ``forward(x)`` -> dict with ``loss`` (negative ELBO per image, beta-weighted), ``recon`` (the negative
    Gaussian log-likelihood per image), ``kl`` (per image), ``x_mean`` (decoder mean), ``mu``, ``logvar``.
    """

    Config = VAEConfig

    def __init__(self, config: Optional[VAEConfig] = None, **kwargs):
        super().__init__()
        self.config = c = resolve_config(type(self).__name__, VAEConfig, config, kwargs)
        self.grid = c.img_size // 2 ** len(c.hidden)
        chans = (c.in_chans,) + c.hidden
        down = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            down += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*down, nn.Flatten())
        flat = c.hidden[-1] * self.grid * self.grid
        self.to_stats = nn.Linear(flat, 2 * c.latent_dim)  # mu and log sigma^2
        self.from_latent = nn.Linear(c.latent_dim, flat)
        up = []
        rev = chans[::-1]
        for i, (cin, cout) in enumerate(zip(rev[:-1], rev[1:])):
            up.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            if i < len(rev) - 2:
                up.append(nn.ReLU())
        self.decoder = nn.Sequential(*up)
        if c.decoder_logvar == "learned":
            self.decoder_logvar = nn.Parameter(torch.zeros(c.in_chans))
        else:
            self.register_buffer("decoder_logvar", torch.full((c.in_chans,), float(c.decoder_logvar)))

    def _check(self, x: Tensor) -> Tensor:
        c = self.config
        return check_images("VAE", "x", x, c.in_chans, size=(c.img_size, c.img_size))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x): (B, C, H, W) -> mu, log sigma^2, each (B, latent_dim)."""
        self._check(x)
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling section 2.4)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x|z): (B, latent_dim) -> (B, C, H, W)."""
        c = self.config
        check_latents("VAE", "z", z, c.latent_dim)
        h = self.from_latent(z).view(z.shape[0], c.hidden[-1], self.grid, self.grid)
        return self.decoder(F.relu(h))

    def gaussian_nll(self, x: Tensor, x_mean: Tensor) -> Tensor:
        """-log N(x; x_mean, sigma_dec^2) summed over pixels: (B,)."""
        logvar = self.decoder_logvar.view(1, -1, 1, 1)
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (x - x_mean) ** 2 * torch.exp(-logvar))
        return nll.flatten(1).sum(1)

    @staticmethod
    def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, sigma^2) || N(0, I)) per row (Kingma & Welling appendix B): (B,)."""
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        x_mean = self.decode(z)
        recon = self.gaussian_nll(x, x_mean)
        kl = self.kl_to_standard_normal(mu, logvar)
        loss = (recon + self.config.beta * kl).mean()  # negative beta-ELBO (Higgins et al. eq. 4)
        return {"loss": loss, "recon": recon, "kl": kl, "x_mean": x_mean, "mu": mu, "logvar": logvar}

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``n`` images from the prior: z ~ N(0, I), then the decoder mean (or a draw of p(x|z))."""
        check_count("VAE.sample", "n", n)
        check_bool_field("VAE.sample", "mean", mean)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"VAE.sample: generator must be a torch.Generator or None, got {generator!r}")
        device = self.from_latent.weight.device
        z = torch.randn(n, self.config.latent_dim, device=device, generator=generator)
        x = self.decode(z)
        if not mean:
            std = torch.exp(0.5 * self.decoder_logvar).view(1, -1, 1, 1)
            x = x + std * torch.randn(x.shape, device=device, generator=generator)
        return x


def beta_vae(beta: float = 4.0, **kwargs) -> VAE:
    """A beta-VAE (Higgins et al. 2017); their experiments use beta in [4, 250] depending on the data."""
    return VAE(VAEConfig(beta=beta, **kwargs))


__all__ = ["VAE", "VAEConfig", "beta_vae"]
