"""ViT encoder: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale" (ICLR 2021).

Equations (section 3.1):

* (1) ``z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos``: a stride-``patch_size`` convolution is the
  patch embedding E, a learned CLS token is prepended, and learned 1D absolute position embeddings
  ``E_pos`` (one per patch plus one for the CLS token) are added.
* (2) ``z'_l = MSA(LN(z_{l-1})) + z_{l-1}`` and (3) ``z_l = MLP(LN(z'_l)) + z'_l``: pre-norm blocks,
  GELU MLP.
* (4) ``y = LN(z_L^0)``: the final LayerNorm; the CLS token feeds the optional classification head.
* Section 3.2 (fine-tuning at higher resolution): the grid of position embeddings is interpolated in 2D
  to the new patch grid (bicubic by default, as timm does; ``"bilinear"`` for the linear variant); the
  CLS embedding is kept as is. A model built for 224x224 therefore runs on larger (or non-square)
  inputs whose sides are multiples of ``patch_size``.

Parameter names follow timm's ``VisionTransformer`` (class token, no register tokens, pre-norm), so a
timm ViT state_dict of the same configuration loads unchanged and gives the same outputs.
Attention is ``F.scaled_dot_product_attention`` (vlm_kernels has no global-attention kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm_kernels.nn import Mlp

from ._checks import (check_bool_field, check_float_field, check_images, check_int_field,
                      resolve_config)


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 0
    dynamic_img_size: bool = True  # interpolate the position embeddings for other input sizes
    pos_interpolation: str = "bicubic"  # or "bilinear"

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig: {name} must be a positive int, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig: img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig: embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.pos_interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"ViTConfig: pos_interpolation must be 'bicubic' or 'bilinear', "
                             f"got {self.pos_interpolation!r}")
        check_float_field("ViTConfig", "mlp_ratio", self.mlp_ratio, low_open=True)
        check_int_field("ViTConfig", "num_classes", self.num_classes, minimum=0)
        for name in ("qkv_bias", "dynamic_img_size"):
            check_bool_field("ViTConfig", name, getattr(self, name))


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       mode: str = "bicubic", num_prefix_tokens: int = 1) -> Tensor:
    """Interpolate (1, prefix + gh*gw, D) position embeddings to another patch grid (ViT section 3.2).

    The prefix (CLS) embeddings are kept; the grid is resized with ``F.interpolate`` (antialiased when
    shrinking, as timm's ``resample_abs_pos_embed``) in float32.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, gh, gw, D) by a stride-``patch_size`` convolution (the matrix E)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Eqs. (2) and (3): pre-norm multi-head self-attention and MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer encoder.

    ``forward_features(x)``: (B, C, H, W) -> (B, 1 + (H/p)(W/p), D) tokens after the final LayerNorm
    (CLS first). ``forward(x)``: (B, num_classes) logits from the CLS token, or the (B, D) CLS feature
    when ``num_classes == 0``.
    """

    Config = ViTConfig

    def __init__(self, config: Optional[ViTConfig] = None, **kwargs):
        super().__init__()
        config = resolve_config(type(self).__name__, ViTConfig, config, kwargs)
        self.config = c = config
        self.grid = (c.img_size // c.patch_size, c.img_size // c.patch_size)
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], c.embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = nn.Linear(c.embed_dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_weights)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _check(self, x: Tensor) -> Tensor:
        c = self.config
        size = None if c.dynamic_img_size else (c.img_size, c.img_size)
        return check_images("ViT", "x", x, c.in_chans, size=size, multiple_of=c.patch_size)

    def forward_features(self, x: Tensor) -> Tensor:
        self._check(x)
        tokens = self.patch_embed(x)  # (B, gh, gw, D)
        b, gh, gw, d = tokens.shape
        pos = resample_pos_embed(self.pos_embed, (gh, gw), self.grid, self.config.pos_interpolation)
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens.reshape(b, gh * gw, d)], dim=1) + pos  # eq. (1)
        return self.norm(self.blocks(x))  # eqs. (2)-(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def vit_tiny(**kwargs) -> ViT:
    """ViT-Ti/16 (DeiT-Tiny sizes): D=192, 12 blocks, 3 heads."""
    return ViT(ViTConfig(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs}))


def vit_small(**kwargs) -> ViT:
    """ViT-S/16: D=384, 12 blocks, 6 heads."""
    return ViT(ViTConfig(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs}))


def vit_base(**kwargs) -> ViT:
    """ViT-B/16 (paper table 1): D=768, 12 blocks, 12 heads."""
    return ViT(ViTConfig(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs}))


__all__ = ["ViT", "ViTConfig", "resample_pos_embed", "vit_base", "vit_small", "vit_tiny"]
