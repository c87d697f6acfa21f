"""Swin Transformer: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(ICCV 2021); v2 as an option: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution"
(CVPR 2022).

Paper v1, section 3.1 (overall architecture) and 3.2 (shifted windows):

* Patch partition + linear embedding: a stride-``patch_size`` convolution (4x4 patches, C channels),
  then LayerNorm (as the official code and timm).
* Stages 1-4: stage 1 at H/4 x W/4; each later stage starts with *patch merging* (concatenate each 2x2
  group of neighbours, 4C features, LayerNorm, linear 4C -> 2C without bias), halving the resolution.
* Swin blocks in pairs, eq. (3): ``z' = W-MSA(LN(z)) + z; z = MLP(LN(z')) + z'`` then the same with
  SW-MSA (windows shifted by ``floor(M / 2)``), where the attention is eq. (4),
  ``softmax(Q K^T / sqrt(d) + B) V`` with the relative position bias B gathered from a
  (2M-1)^2-entry table. Each block is :class:`vlm_kernels.nn.SwinTransformerBlock`, which runs the
  cyclic shift, window partition, padding, bias, shift mask, softmax, window reverse and un-shift as
  one fused op (:func:`vlm_kernels.window_attention`). A stage whose map is no larger than the window
  uses one window and no shift (timm's rule).
* Head: LayerNorm, global average pooling, linear classifier.
* Table 1 / section 3.3 variants: Swin-T (C=96, depths 2-2-6-2), Swin-S (C=96, 2-2-18-2), Swin-B
  (C=128, 2-2-18-2); heads 3-6-12-24 (T, S) and 4-8-16-32 (B); window M=7, MLP ratio 4.

v2 (``version=2``), section 3.1-3.3: residual post-norm (``z' = LN(Attn(z)) + z``), scaled cosine
attention ``cos(q, k) / tau`` with a learnt, clamped ``1/tau`` per head, and the log-spaced continuous
position bias (a 2-layer MLP, ``16 * sigmoid``), all in :class:`vlm_kernels.nn.SwinTransformerV2Block`;
patch merging applies the linear reduction before its LayerNorm (2C features), as timm does.

Parameter names are timm 1.0's (``patch_embed.proj``, ``layers.i.downsample``, ``layers.i.blocks.j``,
``norm``, ``head.fc``): a state_dict of timm's ``swin_tiny_patch4_window7_224`` (or
``swinv2_tiny_window8_256`` for v2) loads unchanged and gives the same logits.

:func:`swin_flops` counts multiply-adds the way the paper's FLOPs are counted (the official code's
``flops()``: convolutions, linear layers, the two attention matmuls, LayerNorms): Swin-T at 224 x 224
is 4.5 G.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from vlm_kernels.nn import SwinTransformerBlock, SwinTransformerV2Block

from ._checks import (check_bool_field, check_float_field, check_images, check_int_field, check_int_tuple_field,
                      resolve_config)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class SwinConfig:
    img_size: Union[int, tuple] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    version: int = 1  # 2: Swin v2 (post-norm, cosine attention, continuous position bias)
    pretrained_window_sizes: tuple = (0, 0, 0, 0)  # v2 only: windows the CPB coordinates are scaled for
    strict_img_size: bool = True  # False: any size whose sides are multiples of patch_size

    def __post_init__(self):
        self.img_size = _pair(self.img_size)
        self.depths = check_int_tuple_field("SwinConfig", "depths", self.depths)
        self.num_heads = check_int_tuple_field("SwinConfig", "num_heads", self.num_heads)
        self.pretrained_window_sizes = check_int_tuple_field("SwinConfig", "pretrained_window_sizes",
                                                             self.pretrained_window_sizes, minimum=0)
        check_int_field("SwinConfig", "num_classes", self.num_classes, minimum=0)
        check_float_field("SwinConfig", "mlp_ratio", self.mlp_ratio, low_open=True)
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            check_float_field("SwinConfig", name, getattr(self, name), high=1.0)
        for name in ("qkv_bias", "strict_img_size"):
            check_bool_field("SwinConfig", name, getattr(self, name))
        for name in ("patch_size", "in_chans", "embed_dim", "window_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SwinConfig: {name} must be a positive int, got {value!r}")
        if len(self.img_size) != 2 or any(not isinstance(s, int) or s <= 0 or s % self.patch_size
                                          for s in self.img_size):
            raise ValueError(f"SwinConfig: img_size {self.img_size} must be positive multiples of patch_size "
                             f"{self.patch_size}")
        if not self.depths or len(self.depths) != len(self.num_heads) or min(self.depths) <= 0:
            raise ValueError(f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} must be non-empty, "
                             "positive and of the same length")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ValueError(f"SwinConfig: stage {i} width {self.embed_dim * 2 ** i} is not divisible by "
                                 f"num_heads[{i}] = {heads}")
        if isinstance(self.version, bool) or self.version not in (1, 2):
            raise ValueError(f"SwinConfig: version must be 1 or 2, got {self.version!r}")
        if self.version == 2 and len(self.pretrained_window_sizes) != len(self.depths):
            self.pretrained_window_sizes = (0,) * len(self.depths)
        if self.num_classes < 0:
            raise ValueError(f"SwinConfig: num_classes must be >= 0, got {self.num_classes}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def stage_resolutions(self) -> list[tuple[int, int]]:
        res, out = self.grid, []
        for i in range(len(self.depths)):
            if i > 0:
                res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
            out.append(res)
        return out


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p, W/p, D): stride-p convolution then LayerNorm (timm's ``PatchEmbed``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim): 2x2 neighbours concatenated (zero-padded to even
    sides) then LayerNorm + linear (v1) or linear + LayerNorm (v2)."""

    def __init__(self, dim: int, out_dim: int, version: int = 1):
        super().__init__()
        self.version = version
        if version == 1:
            self.norm = nn.LayerNorm(4 * dim)
            self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        else:
            self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
            self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = x.shape[1:3]
        # timm's order of the four neighbours: (0,0), (1,0), (0,1), (1,1) -> x0, x1, x2, x3 of the paper's code
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x)) if self.version == 1 else self.norm(self.reduction(x))


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating regular and shifted windows."""

    def __init__(self, dim: int, out_dim: int, resolution: tuple[int, int], depth: int, num_heads: int,
                 downsample: bool, c: SwinConfig, drop_path: list[float], pretrained_window_size: int = 0):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, c.version) if downsample else nn.Identity()
        window, shift = _pair(c.window_size), (c.window_size // 2, c.window_size // 2)
        common = dict(dim=out_dim, input_resolution=resolution, num_heads=num_heads, window_size=window,
                      mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, proj_drop=c.drop_rate,
                      attn_drop=c.attn_drop_rate)
        if c.version == 1:
            blocks = [SwinTransformerBlock(shift_size=0 if i % 2 == 0 else shift, drop_path=drop_path[i], **common)
                      for i in range(depth)]
        else:
            blocks = [SwinTransformerV2Block(shift_size=0 if i % 2 == 0 else shift, drop_path=drop_path[i],
                                             pretrained_window_size=pretrained_window_size, **common)
                      for i in range(depth)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pooling of the (B, H, W, C) map, dropout, linear (timm's ``head.fc``)."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin Transformer (v1, or v2 with ``version=2``).

    ``forward_features(x)``: (B, C, H, W) -> (B, H/32, W/32, 8D) after the final LayerNorm (four stages);
    ``forward(x)``: (B, num_classes) logits (or the (B, 8D) pooled feature when ``num_classes == 0``).
    """

    Config = SwinConfig

    def __init__(self, config: Optional[SwinConfig] = None, **kwargs):
        super().__init__()
        config = resolve_config(type(self).__name__, SwinConfig, config, kwargs)
        self.config = c = config
        n = len(c.depths)
        dims = [c.embed_dim * 2 ** i for i in range(n)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        rates = torch.linspace(0, c.drop_path_rate, sum(c.depths), device="cpu").tolist()
        stages, start = [], 0
        for i, res in enumerate(c.stage_resolutions()):
            stages.append(SwinStage(dims[max(i - 1, 0)], dims[i], res, c.depths[i], c.num_heads[i], i > 0, c,
                                    rates[start:start + c.depths[i]],
                                    c.pretrained_window_sizes[i] if c.version == 2 else 0))
            start += c.depths[i]
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, c.num_classes, c.drop_rate)
        self.apply(_init_weights)
        if c.version == 2:  # timm's _init_respostnorm: the post-norms start at zero (each block the identity)
            for stage in self.layers:
                for blk in stage.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    def _check(self, x: Tensor) -> Tensor:
        c = self.config
        return check_images("SwinTransformer", "x", x, c.in_chans, size=c.img_size if c.strict_img_size else None,
                            multiple_of=c.patch_size)

    def forward_features(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------
# FLOPs


def _block_windows(resolution: tuple[int, int], window: int) -> tuple[int, int]:
    """(number of windows, tokens per window) of a block at ``resolution`` (padded to whole windows;
    one window of the whole map when the map is no larger than the window, as the blocks do)."""
    wh, ww = min(window, resolution[0]), min(window, resolution[1])
    nw = -(-resolution[0] // wh) * -(-resolution[1] // ww)
    return nw, wh * ww


def swin_attention_macs(config: SwinConfig, batch: int = 1) -> int:
    """Multiply-adds of the two attention matmuls (Q K^T and A V) over all blocks: what the fused op does
    and ``torch.utils.flop_counter`` cannot see inside a custom op."""
    c, total = config, 0
    for i, res in enumerate(c.stage_resolutions()):
        dim = c.embed_dim * 2 ** i
        nw, n = _block_windows(res, c.window_size)
        total += c.depths[i] * 2 * nw * n * n * dim
    return batch * total


def swin_flops(config: SwinConfig, batch: int = 1, include_norms: bool = True) -> int:
    """Multiply-adds of one forward pass, counted as the official Swin code's ``flops()`` (the paper's
    "FLOPs"): patch embedding, per block qkv/attention/projection/MLP (+ LayerNorms), patch merging,
    the final norm and the head. ``include_norms=False`` keeps only the matmuls and convolutions (what
    ``torch.utils.flop_counter`` counts, halved)."""
    c = config
    gh, gw = c.grid
    norms = int(include_norms)
    total = gh * gw * c.embed_dim * c.in_chans * c.patch_size ** 2 + norms * gh * gw * c.embed_dim
    for i, (h, w) in enumerate(c.stage_resolutions()):
        dim = c.embed_dim * 2 ** i
        if i > 0:
            ph, pw = c.stage_resolutions()[i - 1]
            prev = dim // 2
            total += h * w * 4 * prev * dim + norms * (ph * pw * prev if c.version == 1 else h * w * dim)
        tokens = h * w
        per_block = tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * dim * int(dim * c.mlp_ratio)
        per_block += norms * 2 * tokens * dim
        total += c.depths[i] * per_block
    total += swin_attention_macs(c)
    h, w = c.stage_resolutions()[-1]
    total += norms * h * w * _last_dim(c) + _last_dim(c) * c.num_classes
    return batch * total


def _last_dim(c: SwinConfig) -> int:
    return c.embed_dim * 2 ** (len(c.depths) - 1)


# ----------------------------------------------------------------------------------------------------
# Configurations (paper table 1 / section 3.3)


def swin_tiny(**kwargs) -> SwinTransformer:
    """Swin-T: C=96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7 (timm ``swin_tiny_patch4_window7_224``)."""
    return SwinTransformer(SwinConfig(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24),
                                         **kwargs}))


def swin_small(**kwargs) -> SwinTransformer:
    """Swin-S: C=96, depths (2, 2, 18, 2), heads (3, 6, 12, 24), window 7."""
    return SwinTransformer(SwinConfig(**{"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24),
                                         **kwargs}))


def swin_base(**kwargs) -> SwinTransformer:
    """Swin-B: C=128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 7."""
    return SwinTransformer(SwinConfig(**{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32),
                                         **kwargs}))


def swinv2_tiny(**kwargs) -> SwinTransformer:
    """Swin-V2-T at 256 x 256, window 8 (timm ``swinv2_tiny_window8_256``)."""
    return SwinTransformer(SwinConfig(**{"img_size": 256, "window_size": 8, "embed_dim": 96, "depths": (2, 2, 6, 2),
                                         "num_heads": (3, 6, 12, 24), "version": 2, **kwargs}))


__all__ = ["ClassifierHead", "PatchEmbed", "PatchMerging", "SwinConfig", "SwinStage", "SwinTransformer",
           "swin_attention_macs", "swin_base", "swin_flops", "swin_small", "swin_tiny", "swinv2_tiny"]
