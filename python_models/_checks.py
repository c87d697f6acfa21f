"""Argument checks shared by the thin models: every error names the argument, its shape and dtype."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def check_images(model: str, name: str, x: object, channels: int, *, size: Optional[tuple[int, int]] = None,
                 multiple_of: int = 1) -> Tensor:
    """``x`` must be a non-empty float (B, channels, H, W) tensor; H, W equal ``size`` when given, and
    divisible by ``multiple_of``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{model}: {name} must be a torch.Tensor of shape (B, {channels}, H, W), "
                        f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{model}: {name} must be a floating-point tensor, got {describe(x)}")
    if x.dim() != 4:
        raise ValueError(f"{model}: {name} must have shape (B, {channels}, H, W), got {describe(x)}")
    if x.shape[0] == 0:
        raise ValueError(f"{model}: {name} is an empty batch (B = 0), got {describe(x)}")
    if x.shape[1] != channels:
        raise ValueError(f"{model}: {name} must have {channels} channels (dim 1), got {describe(x)}")
    h, w = x.shape[-2:]
    if size is not None and (h, w) != tuple(size):
        raise ValueError(f"{model}: {name} must be {size[0]}x{size[1]} images, got {describe(x)}")
    if h % multiple_of or w % multiple_of or h == 0 or w == 0:
        raise ValueError(f"{model}: {name} height and width must be positive multiples of {multiple_of}, "
                         f"got {describe(x)}")
    return x


def check_tokens(model: str, name: str, tokens: object, vocab_size: int) -> Tensor:
    """``tokens`` must be a non-empty integer (B, h, w) tensor with values in [0, vocab_size)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{model}: {name} must be an integer torch.Tensor of shape (B, h, w), "
                        f"got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{model}: {name} must be an integer tensor, got {describe(tokens)}")
    if tokens.dim() != 3:
        raise ValueError(f"{model}: {name} must have shape (B, h, w), got {describe(tokens)}")
    if tokens.numel() == 0:
        raise ValueError(f"{model}: {name} is empty, got {describe(tokens)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{model}: {name} must lie in [0, {vocab_size}) (the vocabulary), got values in "
                         f"[{low}, {high}], {describe(tokens)}")
    return tokens.long()


def check_latents(model: str, name: str, z: object, latent_dim: int) -> Tensor:
    if not isinstance(z, Tensor) or not z.is_floating_point():
        got = describe(z) if isinstance(z, Tensor) else type(z).__name__
        raise TypeError(f"{model}: {name} must be a floating-point tensor of shape (B, {latent_dim}), got {got}")
    if z.dim() != 2 or z.shape[1] != latent_dim or z.shape[0] == 0:
        raise ValueError(f"{model}: {name} must have shape (B, {latent_dim}) with B > 0, got {describe(z)}")
    return z


def check_count(model: str, name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{model}: {name} must be a positive int, got {n!r}")
    return n


# ----------------------------------------------------------------------------------------------------
# configurations


def resolve_config(model: str, config_cls: type, config: object, kwargs: dict):
    """``config`` (an instance of ``config_cls``) or the keyword arguments that build one, not both."""
    if config is None:
        return config_cls(**kwargs)
    if not isinstance(config, config_cls):
        raise TypeError(f"{model}: config must be a {config_cls.__name__} (or None with keyword arguments), "
                        f"got {type(config).__name__}")
    if kwargs:
        raise TypeError(f"{model}: pass either config or keyword arguments, not both (got config and "
                        f"{', '.join(sorted(kwargs))})")
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int_field(cfg: str, name: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{cfg}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_bool_field(cfg: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{cfg}: {name} must be a bool, got {value!r}")
    return value


def check_float_field(cfg: str, name: str, value: object, *, low: float = 0.0, high: float = math.inf,
                      low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in [low, high] (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{cfg}: {name} must be a number, got {value!r}")
    bad = (not math.isfinite(value) or (value <= low if low_open else value < low)
           or (value >= high if high_open else value > high))
    if bad:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{cfg}: {name} must be a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


def check_int_tuple_field(cfg: str, name: str, value: object, minimum: int = 1) -> tuple:
    """A non-empty tuple (or list) of ints >= ``minimum``."""
    if not isinstance(value, (tuple, list)) or not value or any(not _is_int(v) or v < minimum for v in value):
        raise ValueError(f"{cfg}: {name} must be a non-empty tuple of ints >= {minimum}, got {value!r}")
    return tuple(value)
