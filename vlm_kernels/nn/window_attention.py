"""Drop-in Swin layers (timm 1.0 compatible) on the fused shifted-window attention op.

:class:`WindowAttention`, :class:`SwinTransformerBlock` (Swin v1) and :class:`WindowAttentionV2`,
:class:`SwinTransformerV2Block` (Swin v2) take timm's constructor arguments and keep timm's parameter
and buffer names, so a timm state_dict loads unchanged. timm is not needed to use them.

The blocks run the whole shifted-window attention as one op (:func:`vlm_kernels.window_attention`):
the qkv projection is applied to the unshifted, unpadded map, then shift, padding, partition, bias,
mask, softmax, window reverse and un-shift happen inside the op. ``WindowAttention.forward(x, mask)``
keeps timm's windows-in, windows-out interface (on :func:`vlm_kernels.windowed_attention`).

With attention dropout active (``attn_drop > 0`` in training) the modules fall back to the pure
PyTorch reference with dropout, since the op has none.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops._common import (check_bool, check_factory_dtype, check_int, check_module_class, check_probability,
                           check_real, describe)
from ..ops.window_attention import window_attention, windowed_attention
from ..reference import window_attention as reference
from .mlp import Mlp

IntOrPair = Union[int, Tuple[int, int]]


def to_2tuple(x) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return tuple(x)  # type: ignore[return-value]
    return (x, x)


# ----------------------------------------------------------------------------------------------------
# Small timm-compatible pieces (same names as timm's, so state_dicts match)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


_ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU,
                "silu": nn.SiLU, "swish": nn.SiLU}


def _act_layer(act_layer):
    if not isinstance(act_layer, str):
        return act_layer
    if act_layer in _ACTIVATIONS:
        return _ACTIVATIONS[act_layer]
    try:  # timm's full registry when it is installed
        from timm.layers import get_act_layer

        found = get_act_layer(act_layer)
    except (ImportError, KeyError, ValueError) as exc:
        raise ValueError(f"unknown act_layer {act_layer!r}; known without timm: {', '.join(_ACTIVATIONS)}") from exc
    if found is None:
        raise ValueError(f"unknown act_layer {act_layer!r}")
    return found


# ----------------------------------------------------------------------------------------------------
# Argument checks (named errors before any kernel runs)


def _check_pair(op: str, name: str, value: object, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_attention_args(op: str, dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, dtype,
                          head_dim=None, heads_divide=False) -> Tuple[int, int]:
    check_int(op, "dim", dim)
    check_int(op, "num_heads", num_heads)
    if head_dim is not None:
        check_int(op, "head_dim", head_dim)
    elif heads_divide and dim % num_heads:
        raise ValueError(f"{op}: dim={dim} must be divisible by num_heads={num_heads}")
    elif dim < num_heads:
        raise ValueError(f"{op}: num_heads={num_heads} exceeds dim={dim} (head_dim would be 0)")
    window = _check_pair(op, "window_size", window_size, 1)
    check_bool(op, "qkv_bias", qkv_bias)
    check_probability(op, "attn_drop", attn_drop)
    check_probability(op, "proj_drop", proj_drop)
    check_factory_dtype(op, dtype)
    return window


def _check_block_args(op: str, input_resolution, shift_size, always_partition, dynamic_mask, mlp_ratio, drop_path,
                      act_layer, norm_layer) -> None:
    _check_pair(op, "input_resolution", input_resolution, 1)
    _check_pair(op, "shift_size", shift_size, 0)
    check_bool(op, "always_partition", always_partition)
    check_bool(op, "dynamic_mask", dynamic_mask)
    check_real(op, "mlp_ratio", mlp_ratio, low=0.0, low_open=True)
    check_probability(op, "drop_path", drop_path)
    check_module_class(op, "act_layer", _act_layer(act_layer))
    check_module_class(op, "norm_layer", norm_layer)


def _check_float_input(op: str, name: str, x: object, what: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = describe(x) if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{op}: {name} must be a floating-point tensor {what}, got {got}")
    return x


def _check_windows_input(op: str, x: object, mask: object, n: int, c: int) -> None:
    """``forward(x, mask)``: x (B*nW, N, C) windows, mask None or (nW, N, N) dividing the windows."""
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing: nothing to check yet
        return
    x = _check_float_input(op, "x", x, f"(B*nW, {n}, {c})")
    if x.dim() != 3 or tuple(x.shape[1:]) != (n, c):
        raise ValueError(f"{op}: x must be (B*nW, {n}, {c}) windows of N = {n} tokens and C = {c} channels, "
                         f"got {describe(x)}")
    if mask is not None:
        mask = _check_float_input(op, "mask", mask, f"(nW, {n}, {n})")
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (n, n) or mask.shape[0] == 0 or x.shape[0] % mask.shape[0]:
            raise ValueError(f"{op}: mask must be (nW, {n}, {n}) with nW dividing the {x.shape[0]} windows of x, "
                             f"got {describe(mask)}")


def _check_shift_below_window(op: str, window: Sequence[int], shift: Sequence[int]) -> None:
    if any(s >= w for s, w in zip(shift, window)):
        raise ValueError(f"{op}: shift_size {tuple(shift)} must be smaller than the window {tuple(window)} in each "
                         f"dimension")


def _check_map_input(op: str, x: object, c: int) -> None:
    """A (B, H, W, C) feature map."""
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing: nothing to check yet
        return
    x = _check_float_input(op, "x", x, f"(B, H, W, {c})")
    if x.dim() != 4 or x.shape[-1] != c:
        raise ValueError(f"{op}: x must be a (B, H, W, {c}) feature map, got {describe(x)}")


def _adopt(cls, old: nn.Module) -> nn.Module:
    """A ``cls`` instance that shares ``old``'s parameters, buffers, children and attributes (no copy)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(old).items():
        if not key.startswith("_"):
            new.__dict__[key] = value
    for name, p in old._parameters.items():
        new.register_parameter(name, p)
    for name, b in old._buffers.items():
        new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    for name, m in old._modules.items():
        new.add_module(name, m)
    return new


# ----------------------------------------------------------------------------------------------------
# Relative position bias table resizing


def resize_rel_pos_bias_table(table: Tensor, old_window: Sequence[int], new_window: Sequence[int],
                              interpolation: str = "timm") -> Tensor:
    """Resize a ((2Mh-1)(2Mw-1), heads) bias table from window ``old_window`` to ``new_window``.

    ``interpolation="timm"``: timm 1.0's ``resize_rel_pos_bias_table`` (BEiT's geometric-progression
    source grid, linear interpolation), so that a patched model matches timm after ``set_input_size``.
    ``"bicubic"``: ``F.interpolate(mode="bicubic", align_corners=False)`` on the (2M-1) x (2M-1) grid
    (the original Swin code and timm's ``resize_rel_pos_bias_table_simple``).
    """
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if src == dst:
        return table
    heads = table.shape[1]
    grid = table.transpose(0, 1).reshape(1, heads, *src).float()
    if interpolation == "bicubic":
        out = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    elif interpolation == "timm":
        out = _beit_resize(grid[0].cpu(), src, dst).unsqueeze(0).to(table.device)
    else:
        raise ValueError(f"resize_rel_pos_bias_table: interpolation must be 'timm' or 'bicubic', got {interpolation!r}")
    return out.reshape(heads, -1).transpose(0, 1).to(table.dtype).contiguous()


def _geometric_positions(src: int, dst: int) -> Tensor:
    """timm's (BEiT's) source positions: spacing growing geometrically so that src spans dst."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return torch.tensor([-d for d in reversed(dis)] + [0] + dis)


def _interp_axis(points: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left/right indices and distances of ``x`` on the sorted grid ``points`` (timm's RegularGridInterpolator)."""
    right = torch.bucketize(x, points).clamp(max=points.shape[0] - 1)
    left = (right - 1).clamp(0, points.shape[0] - 1)
    dist_left = (x - points[left]).clamp_min(0.0)
    dist_right = (points[right] - x).clamp_min(0.0)
    both_zero = (dist_left == 0) & (dist_right == 0)
    dist_left = torch.where(both_zero, 1.0, dist_left)
    dist_right = torch.where(both_zero, 1.0, dist_right)
    return left, right, dist_left, dist_right


def _beit_resize(values: Tensor, src: Sequence[int], dst: Sequence[int]) -> Tensor:
    """(heads, src_h, src_w) -> (heads, dst_h, dst_w), bilinear on timm's geometric source grid."""
    py, px = _geometric_positions(src[0], dst[0]), _geometric_positions(src[1], dst[1])
    ty, tx = dst[0] // 2.0, dst[1] // 2.0
    ys, xs = torch.meshgrid(torch.arange(-ty, ty + 0.1, 1.0), torch.arange(-tx, tx + 0.1, 1.0), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    yl, yr, dyl, dyr = _interp_axis(py, ys)
    xl, xr, dxl, dxr = _interp_axis(px, xs)
    num = (values[:, yl, xl] * dyr * dxr + values[:, yl, xr] * dyr * dxl
           + values[:, yr, xl] * dyl * dxr + values[:, yr, xr] * dyl * dxl)
    return (num / ((dyl + dyr) * (dxl + dxr))).view(values.shape[0], dst[0], dst[1])


# ----------------------------------------------------------------------------------------------------
# Swin v1


class WindowAttention(nn.Module):
    """timm's Swin v1 ``WindowAttention`` (same arguments, parameters and buffers) on the fused op.

    ``forward(x, mask)`` takes windows (B*nW, N, C) like timm's; :meth:`forward_map` takes the whole
    (B, H, W, C) map and a shift and does everything in one op (what the blocks call).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size: IntOrPair = 7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        window_size = _check_attention_args("WindowAttention", dim, num_heads, window_size, qkv_bias, attn_drop,
                                            proj_drop, dtype, head_dim=head_dim)
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        self.register_buffer("relative_position_index",
                             torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
                             persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    @classmethod
    def from_timm(cls, module: nn.Module) -> "WindowAttention":
        """Wrap a timm ``WindowAttention``, sharing its parameters (no copy)."""
        return _adopt(cls, module)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        self.relative_position_index.copy_(reference.relative_position_index(
            *self.window_size, device=self.relative_position_index.device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: IntOrPair, interpolation: str = "timm") -> None:
        """Change the window and resize the bias table (see :func:`resize_rel_pos_bias_table`)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        old = self.window_size
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        with torch.no_grad():
            table = self.relative_position_bias_table
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(table, old, window_size, interpolation), requires_grad=table.requires_grad)
            self.register_buffer("relative_position_index",
                                 reference.relative_position_index(*window_size, device=table.device),
                                 persistent=False)

    def _dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def _bias(self) -> Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) additive 0/-100 or None. Returns (B*nW, N, C)."""
        _check_windows_input("WindowAttention", x, mask, self.window_size[0] * self.window_size[1],
                             self.qkv.in_features)
        bw, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._bias().to(q.dtype)
        mask = None if mask is None else mask.to(q.dtype)
        if self._dropout_p() > 0:
            out = reference.windowed_attention_forward(q, k, v, bias, mask, self.scale, None, self._dropout_p())[0]
        else:
            out = windowed_attention(q, k, v, bias=bias, mask=mask, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, -1)))

    def forward_map(self, x: Tensor, shift_size: IntOrPair = 0) -> Tensor:
        """x: (B, H, W, C) unshifted map -> (B, H, W, C): shifted-window attention incl. both projections."""
        _check_map_input("WindowAttention", x, self.qkv.in_features)
        qkv = self.qkv(x)
        table = self.relative_position_bias_table.to(qkv.dtype)
        pad = None if self.qkv.bias is None else self.qkv.bias.to(qkv.dtype)
        shift = to_2tuple(shift_size)
        if self._dropout_p() > 0:
            out = reference.window_attention(qkv, self.num_heads, self.window_size, shift, table, self.scale, pad,
                                             dropout_p=self._dropout_p())
        else:
            out = window_attention(qkv, num_heads=self.num_heads, window_size=self.window_size, shift_size=shift,
                                   rel_pos_bias=table, scale=self.scale, pad_qkv=pad)
        return self.proj_drop(self.proj(out))


class _ShiftedWindowBlock(nn.Module):
    """timm's window/shift bookkeeping, shared by the v1 and v2 blocks."""

    def _calc_window_shift(self, target_window_size, target_shift_size=None):
        target_window_size = to_2tuple(target_window_size)
        if target_shift_size is None:
            target_shift_size = self.target_shift_size
            if any(target_shift_size):
                target_shift_size = (target_window_size[0] // 2, target_window_size[1] // 2)
        else:
            target_shift_size = to_2tuple(target_shift_size)
        if self.always_partition:
            return target_window_size, target_shift_size
        window_size = [r if r <= w else w for r, w in zip(self.input_resolution, target_window_size)]
        shift_size = [0 if r <= w else s for r, w, s in zip(self.input_resolution, window_size, target_shift_size)]
        return tuple(window_size), tuple(shift_size)

    def set_input_size(self, feat_size: Tuple[int, int], window_size: IntOrPair,
                       always_partition: Optional[bool] = None) -> None:
        """timm's ``set_input_size``: new resolution and window (the bias follows the window)."""
        self.input_resolution = feat_size
        if always_partition is not None:
            self.always_partition = always_partition
        self.window_size, self.shift_size = self._calc_window_shift(to_2tuple(window_size))
        self.window_area = self.window_size[0] * self.window_size[1]
        self.attn.set_window_size(self.window_size)

    def init_non_persistent_buffers(self) -> None:
        """Nothing to do: the shifted-window mask comes from token coordinates inside the op."""

    def _attn(self, x: Tensor) -> Tensor:
        if self.attn.window_size != tuple(self.window_size):  # e.g. after a direct attn.set_window_size
            raise RuntimeError(f"{type(self).__name__}: attn.window_size {self.attn.window_size} differs from the "
                               f"block's {self.window_size}; use set_input_size")
        return self.attn.forward_map(x, self.shift_size)

    @classmethod
    def from_timm(cls, block: nn.Module):
        """Wrap a timm block, sharing its parameters and sub-modules (no copy); its attention is swapped."""
        new = _adopt(cls, block)
        new.attn = cls._attention_class.from_timm(block.attn)
        if all(hasattr(block.mlp, n) for n in ("fc1", "act", "drop1", "norm", "fc2", "drop2")):
            new.mlp = Mlp.from_timm(block.mlp)  # timm's Mlp: same sub-modules, chunked computation
        new._buffers.pop("attn_mask", None)  # the op computes the mask from coordinates
        return new


class SwinTransformerBlock(_ShiftedWindowBlock):
    """timm's Swin v1 ``SwinTransformerBlock`` (pre-norm) with the fused shifted-window attention."""

    _attention_class = WindowAttention

    def __init__(self, dim: int, input_resolution: IntOrPair, num_heads: int = 4, head_dim: Optional[int] = None,
                 window_size: IntOrPair = 7, shift_size: IntOrPair = 0, always_partition: bool = False,
                 dynamic_mask: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: Type[nn.Module] = nn.GELU,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        op = "SwinTransformerBlock"
        _check_attention_args(op, dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, dtype, head_dim=head_dim)
        _check_block_args(op, input_resolution, shift_size, always_partition, dynamic_mask, mlp_ratio, drop_path,
                          act_layer, norm_layer)
        self.dim = dim
        self.input_resolution = input_resolution
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask  # accepted for compatibility: the mask always follows the input
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        _check_shift_below_window(op, self.window_size, self.shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(dim, num_heads=num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=_act_layer(act_layer), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        _check_map_input(type(self).__name__, x, self.attn.qkv.in_features)
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


# ----------------------------------------------------------------------------------------------------
# Swin v2


def _relative_coords_table(window_size, pretrained_window_size, device=None, dtype=None) -> Tensor:
    """(1, 2Mh-1, 2Mw-1, 2) log-spaced relative coordinates, the CPB-MLP's input (timm's)."""
    ch = torch.arange(-(window_size[0] - 1), window_size[0], device=device, dtype=torch.float32)
    cw = torch.arange(-(window_size[1] - 1), window_size[1], device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(ch, cw, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    ref = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    table[:, :, :, 0] /= max(ref[0] - 1, 1)
    table[:, :, :, 1] /= max(ref[1] - 1, 1)
    table *= 8
    table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
    return table.to(dtype=dtype)


class WindowAttentionV2(nn.Module):
    """timm's Swin v2 ``WindowAttention``: cosine attention with a learnt, clamped logit scale and the
    continuous (CPB-MLP) relative position bias, on the fused op."""

    def __init__(self, dim: int, window_size: IntOrPair, num_heads: int, qkv_bias: bool = True,
                 qkv_bias_separate: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 pretrained_window_size: IntOrPair = (0, 0), device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        _check_attention_args("WindowAttentionV2", dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, dtype,
                              heads_divide=True)
        check_bool("WindowAttentionV2", "qkv_bias_separate", qkv_bias_separate)
        _check_pair("WindowAttentionV2", "pretrained_window_size", pretrained_window_size, 0)
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate
        self.logit_scale = nn.Parameter(torch.empty((num_heads, 1, 1), **dd))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True, **dd), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim, **dd))
            self.register_buffer("k_bias", torch.empty(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.q_bias = None
            self.k_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        win_h, win_w = self.window_size
        self.register_buffer("relative_coords_table", torch.empty(1, 2 * win_h - 1, 2 * win_w - 1, 2, **dd),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
                             persistent=False)
        self.reset_parameters()

    @classmethod
    def from_timm(cls, module: nn.Module) -> "WindowAttentionV2":
        """Wrap a timm v2 ``WindowAttention``, sharing its parameters (no copy)."""
        return _adopt(cls, module)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        self.relative_coords_table.copy_(_relative_coords_table(self.window_size, self.pretrained_window_size,
                                                                device, dtype))
        self.relative_position_index.copy_(reference.relative_position_index(*self.window_size, device=device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: IntOrPair) -> None:
        """Change the window; the continuous bias is re-evaluated on the new coordinates (as timm does)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        device, dtype = self.relative_coords_table.device, self.relative_coords_table.dtype
        self.window_size = window_size
        self.register_buffer("relative_coords_table",
                             _relative_coords_table(window_size, self.pretrained_window_size, device, dtype),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             reference.relative_position_index(*window_size, device=device), persistent=False)

    def _dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def _qkv_bias(self) -> Optional[Tensor]:
        return None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def _qkv(self, x: Tensor) -> Tensor:
        bias = self._qkv_bias()
        if bias is None:
            return self.qkv(x)
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)

    def _bias(self) -> Tensor:
        """(heads, N, N): ``16 * sigmoid`` of the CPB-MLP table gathered by relative index."""
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) or None. Returns (B*nW, N, C)."""
        _check_windows_input("WindowAttentionV2", x, mask, self.window_size[0] * self.window_size[1],
                             self.qkv.in_features)
        bw, n, c = x.shape
        q, k, v = self._qkv(x).reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._bias().to(q.dtype)
        logit_scale = self.logit_scale.to(q.dtype)
        mask = None if mask is None else mask.to(q.dtype)
        if self._dropout_p() > 0:
            out = reference.windowed_attention_forward(q, k, v, bias, mask, 1.0, logit_scale, self._dropout_p())[0]
        else:
            out = windowed_attention(q, k, v, bias=bias, mask=mask, logit_scale=logit_scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))

    def forward_map(self, x: Tensor, shift_size: IntOrPair = 0) -> Tensor:
        """x: (B, H, W, C) unshifted map -> (B, H, W, C): shifted-window attention incl. both projections."""
        _check_map_input("WindowAttentionV2", x, self.qkv.in_features)
        qkv = self._qkv(x)
        bias = self._bias().to(qkv.dtype)
        pad = self._qkv_bias()
        pad = None if pad is None else pad.to(qkv.dtype)
        logit_scale = self.logit_scale.to(qkv.dtype)
        shift = to_2tuple(shift_size)
        if self._dropout_p() > 0:
            out = reference.window_attention(qkv, self.num_heads, self.window_size, shift, bias, None, pad,
                                             logit_scale, dropout_p=self._dropout_p())
        else:
            out = window_attention(qkv, num_heads=self.num_heads, window_size=self.window_size, shift_size=shift,
                                   rel_pos_bias=bias, pad_qkv=pad, logit_scale=logit_scale)
        return self.proj_drop(self.proj(out))


class SwinTransformerV2Block(_ShiftedWindowBlock):
    """timm's ``SwinTransformerV2Block`` (residual post-norm) with the fused shifted-window attention."""

    _attention_class = WindowAttentionV2

    def __init__(self, dim: int, input_resolution: IntOrPair, num_heads: int, window_size: IntOrPair = 7,
                 shift_size: IntOrPair = 0, always_partition: bool = False, dynamic_mask: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: Union[str, Type[nn.Module]] = "gelu",
                 norm_layer: Type[nn.Module] = nn.LayerNorm, pretrained_window_size: IntOrPair = 0,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        op = "SwinTransformerV2Block"
        _check_attention_args(op, dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, dtype, heads_divide=True)
        _check_block_args(op, input_resolution, shift_size, always_partition, dynamic_mask, mlp_ratio, drop_path,
                          act_layer, norm_layer)
        _check_pair(op, "pretrained_window_size", pretrained_window_size, 0)
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.num_heads = num_heads
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask  # accepted for compatibility: the mask always follows the input
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        _check_shift_below_window(op, self.window_size, self.shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.attn = WindowAttentionV2(dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                      attn_drop=attn_drop, proj_drop=proj_drop,
                                      pretrained_window_size=to_2tuple(pretrained_window_size), **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=_act_layer(act_layer), drop=proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        _check_map_input(type(self).__name__, x, self.attn.qkv.in_features)
        b, h, w, c = x.shape
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(b, h, w, c)


__all__ = [
    "DropPath",
    "Mlp",
    "SwinTransformerBlock",
    "SwinTransformerV2Block",
    "WindowAttention",
    "WindowAttentionV2",
    "resize_rel_pos_bias_table",
]
