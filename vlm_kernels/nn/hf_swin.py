"""Hugging Face transformers' Swin layers (``SwinLayer``, ``DonutSwinLayer``, ``Swinv2Layer``) on the fused
shifted-window attention op.

:func:`fused_layer_class` returns, for one of those transformers classes, a subclass whose ``forward``
computes the block with :func:`vlm_kernels.window_attention` (or :func:`vlm_kernels.windowed_attention`,
see below) and otherwise the layer's own sub-modules: same parameters, buffers, attribute names and
outputs. :mod:`vlm_kernels.integrations.transformers` swaps it in by assigning ``layer.__class__`` (as
FSDP2 does for its wrappers), so the patched layer *is* the original object: every Parameter, buffer,
hook, state_dict key and the layer's mutable window/shift state are untouched, ``isinstance`` checks
and transformers' gradient checkpointing keep working, and unpatching restores the class. The classes
are built on first use from the installed transformers (this module never imports it at import time)
and are reachable by name here (``FusedSwinLayer`` ...), so a pickled patched model loads again.

What each forward reproduces of transformers (read from transformers 4.x/5.x; tested on 5.24):

* v1 (``SwinLayer``, ``DonutSwinLayer``): the window shrinks to ``min(H, W)`` and the shift drops to 0
  when ``min(H, W) <= window`` (unless ``always_partition``), by calling the layer's own
  ``set_shift_and_window_size``, so the change persists on the layer as in transformers. A map smaller
  than the bias table's window fails in transformers itself (its bias no longer matches the windows);
  the patched layer raises a ValueError that says so.
* Padding: transformers pads the (normalised) map with zeros *before* the cyclic shift, and builds the
  shift mask on the padded size; the op (timm 1.0's order) shifts first. Without a shift the two agree
  (the op pads with the qkv of a zero token, the projection's bias); with a shift and padding the
  layer pads the map itself and gives the op a map that needs no padding.
* Swin v2 (``Swinv2Layer``): cosine attention with the clamped learnt logit scale and the continuous
  (CPB-MLP) bias, computed from the layer's own buffers as transformers does. transformers adds the
  -100 shifted-window mask twice (masked pairs get -200); the fused map op knows only -100, so shifted
  v2 blocks partition the map as transformers does and run :func:`vlm_kernels.windowed_attention` with
  transformers' own mask doubled; unshifted v2 blocks use the fused map op.
* Dropout: a layer's hidden/output dropout that transformers applies to the attention output in the
  window layout is applied through a mask drawn in that layout (same random stream, same result for
  the same seed); stochastic depth and the MLP dropout run unchanged.

The layer runs transformers' own forward (with a one-time warning naming the reason) whenever a call
asks for what the op does not compute: ``output_attentions=True`` (the op never forms the attention
matrix), attention-probability dropout in training (``attention_probs_dropout_prob > 0``), a
``head_mask`` (transformers 4.x), any other keyword argument, and TorchScript tracing. Results are then
transformers' own, exactly.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.window_attention import window_attention, windowed_attention
from ..reference import window_attention as reference

# transformers' classes this module knows: name of the fused class -> (module, class name).
KNOWN_LAYERS = {
    "FusedSwinLayer": ("transformers.models.swin.modeling_swin", "SwinLayer"),
    "FusedDonutSwinLayer": ("transformers.models.donut.modeling_donut_swin", "DonutSwinLayer"),
    "FusedSwinv2Layer": ("transformers.models.swinv2.modeling_swinv2", "Swinv2Layer"),
}


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def _pad_amounts(h: int, w: int, window: int) -> tuple[int, int]:
    return (window - h % window) % window, (window - w % window) % window


def _windows_to_map(t: Tensor, window: int, shift: int, h: int, w: int) -> Tensor:
    """(B*nW, N, C) windows of the padded, shifted map -> (B, H, W, C): transformers' window reverse,
    reverse cyclic shift and crop."""
    pad_h, pad_w = _pad_amounts(h, w, window)
    t = reference.window_reverse(t, (window, window), h + pad_h, w + pad_w)
    if shift > 0:
        t = torch.roll(t, shifts=(shift, shift), dims=(1, 2))
    return t[:, :h, :w]


def _map_to_windows(x: Tensor, window: int, shift: int) -> Tensor:
    """(B, H, W, C) -> (B*nW, N, C): transformers' zero padding, cyclic shift and window partition."""
    pad_h, pad_w = _pad_amounts(x.shape[1], x.shape[2], window)
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    return reference.window_partition(x, (window, window))


def _window_layout_dropout(drop: nn.Module, out: Tensor, window: int, shift: int) -> Tensor:
    """``drop`` applied to the (B, H, W, C) map ``out`` as transformers applies it to the same values in
    window layout (B*nW, N, C) of the padded, shifted map: the mask is drawn in that layout (same random
    numbers for the same seed) and brought to the map. A no-op unless the dropout is active."""
    if not (drop.training and drop.p > 0):
        return out
    b, h, w, c = out.shape
    pad_h, pad_w = _pad_amounts(h, w, window)
    n_windows = b * ((h + pad_h) // window) * ((w + pad_w) // window)
    keep = drop(out.new_ones(n_windows, window * window, c))
    return out * _windows_to_map(keep, window, shift, h, w)


def _qkv_projection(linears) -> tuple[Tensor, Optional[Tensor]]:
    """One (3C', C) weight and (3C',) bias from the q, k and v Linears (a missing bias is zeros)."""
    weight = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return weight, None
    biases = [b if b is not None else lin.weight.new_zeros(lin.weight.shape[0]) for b, lin in zip(biases, linears)]
    return weight, torch.cat(biases)


def _table_bias(table: Tensor, index: Tensor, window: int) -> Tensor:
    """(heads, N, N): the bias table gathered by the layer's own relative position index."""
    n = window * window
    return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1)


# id(index buffer) -> (weak reference, window, version, is standard): tensors compare elementwise, so
# they cannot be the keys of a WeakKeyDictionary.
_STANDARD_INDEX: dict = {}


def _is_standard_index(index: Tensor, window: int) -> bool:
    """Whether the layer's relative position index is the usual one (what the op gathers by itself);
    checked once per buffer, window and version."""
    key = id(index)
    cached = _STANDARD_INDEX.get(key)
    if cached is not None and cached[0]() is index and cached[1:3] == (window, index._version):
        return cached[3]
    expected = reference.relative_position_index(window, window, device=index.device)
    same = index.numel() == expected.numel() and bool(torch.equal(index.reshape(-1), expected.reshape(-1)))
    ref = weakref.ref(index, lambda _, k=key: _STANDARD_INDEX.pop(k, None))
    _STANDARD_INDEX[key] = (ref, window, index._version, same)
    return same


def _v1_bias(table: Tensor, index: Tensor, window: int) -> Tensor:
    """The op's bias argument: the table itself (gathered inside the op) when the layer's index is the
    usual one, else the (heads, N, N) bias gathered here by the layer's index."""
    if not torch.compiler.is_compiling() and _is_standard_index(index, window):
        return table
    return _table_bias(table, index, window)


def _map_attention(x: Tensor, linears, *, num_heads: int, window: int, shift: int, bias: Tensor,
                   scale: Optional[float] = None, logit_scale: Optional[Tensor] = None) -> Tensor:
    """Shifted-window attention on the (B, H, W, C) map ``x`` with transformers' order (pad, then shift),
    through the fused map op; returns (B, H, W, C') before the output projection."""
    h, w = x.shape[1], x.shape[2]
    weight, qkv_bias = _qkv_projection(linears)
    pad_h, pad_w = _pad_amounts(h, w, window)
    pre_pad = shift > 0 and (pad_h or pad_w)
    if pre_pad:  # transformers pads before the shift: hand the op a map that needs no padding
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    qkv = F.linear(x, weight, qkv_bias)
    dtype = qkv.dtype
    pad_qkv = None if pre_pad or qkv_bias is None else qkv_bias.to(dtype)
    out = window_attention(qkv, num_heads=num_heads, window_size=window, shift_size=shift,
                           rel_pos_bias=bias.to(dtype), scale=scale, pad_qkv=pad_qkv,
                           logit_scale=None if logit_scale is None else logit_scale.to(dtype))
    return out[:, :h, :w] if pre_pad else out


_WARNED: set = set()


def _warn_fallback(cls_name: str, reason: str) -> None:
    key = (cls_name, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"vlm_kernels: {cls_name} runs transformers' own forward for {reason} (the fused "
                      f"window attention does not compute it); results are transformers' own", stacklevel=4)


# ----------------------------------------------------------------------------------------------------
# The layer mixins: one per transformers code layout


class _FusedLayer(nn.Module):
    """Binds a call to the transformers layer's own signature and picks the fused or the original path."""

    _hf_class: type  # the transformers class this one derives from
    _arg_names: tuple = ()
    _arg_defaults: dict = {}
    _var_keyword = False
    _SAFE_EXTRA = frozenset({"output_attentions"})  # keyword arguments the fused path honours

    @classmethod
    def _describe_signature(cls) -> None:
        params = list(inspect.signature(cls._hf_class.forward).parameters.values())[1:]
        cls._arg_names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        cls._arg_defaults = {p.name: p.default for p in params
                             if p.default is not p.empty and p.name in cls._arg_names}
        cls._var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)

    def _bind(self, args, kwargs) -> Optional[tuple[dict, dict]]:
        """(named arguments, extra keywords) or None when transformers would reject the call."""
        if len(args) > len(self._arg_names):
            return None
        bound = dict(zip(self._arg_names, args))
        extra = {}
        for key, value in kwargs.items():
            if key in self._arg_names:
                if key in bound:
                    return None
                bound[key] = value
            else:
                extra[key] = value
        if extra and not self._var_keyword:
            return None
        for key, value in self._arg_defaults.items():
            bound.setdefault(key, value)
        if "hidden_states" not in bound or "input_dimensions" not in bound:
            return None
        return bound, extra

    def _attention_dropout_active(self) -> bool:
        raise NotImplementedError

    def _feed_forward(self, x: Tensor) -> Tensor:
        """``output(intermediate(x))`` of the Donut / v2 / 4.x layouts (dense, act; dense, dropout)."""
        return self.output(self.intermediate(x))

    def _fallback_reason(self, call) -> Optional[str]:
        if call is None:
            return "a call it cannot bind"
        bound, extra = call
        if torch.jit.is_tracing():
            return "TorchScript tracing"
        if bound.get("output_attentions") or extra.get("output_attentions"):
            return "output_attentions=True"
        if bound.get("head_mask") is not None or extra.get("head_mask") is not None:
            return "head_mask"
        unknown = sorted(k for k in extra if k not in self._SAFE_EXTRA)
        if unknown:
            return "the keyword argument(s) " + ", ".join(unknown)
        if self.training and self._attention_dropout_active():
            return "attention dropout in training (attention_probs_dropout_prob > 0)"
        return None

    def forward(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        reason = self._fallback_reason(call)
        if reason is not None:
            _warn_fallback(self._hf_class.__name__, reason)
            return super().forward(*args, **kwargs)
        bound, _ = call
        return self._fused_forward(bound["hidden_states"], tuple(bound["input_dimensions"]),
                                   bool(bound.get("always_partition", False)))

    def _fused_forward(self, hidden_states: Tensor, input_dimensions: tuple, always_partition: bool):
        raise NotImplementedError


class _SwinV1Common(_FusedLayer):
    """v1 window bookkeeping (transformers' ``set_shift_and_window_size``) and the bias-table check."""

    def _window_and_shift(self, input_dimensions: tuple, always_partition: bool, table_rows: int) -> tuple[int, int]:
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        window, shift = int(self.window_size), int(self.shift_size)
        table_window = (math.isqrt(table_rows) + 1) // 2
        if (2 * window - 1) ** 2 != table_rows:
            h, w = input_dimensions
            raise ValueError(
                f"{self._hf_class.__name__}: the {h}x{w} feature map is smaller than the {table_window}x{table_window} "
                f"window: transformers shrinks the window to {window} but keeps the relative position bias of "
                f"{table_window}x{table_window} windows, so the unpatched model fails on this input as well "
                f"(a shape mismatch). Use an input whose every stage map is at least {table_window} on its "
                f"shorter side. (The layer now keeps window_size={window}, as transformers' does.)")
        return window, shift


class _SplitProjectionSwinLayer(_SwinV1Common):
    """transformers 5.x ``SwinLayer``: ``attention.{q,k,v,o}_proj`` + ``relative_position_bias``, ``mlp``,
    a ``dropout`` after the attention and the MLP; returns ``(hidden_states, attn_weights)``."""

    REQUIRED = ("layernorm_before", "layernorm_after", "attention.q_proj", "attention.k_proj", "attention.v_proj",
                "attention.o_proj", "attention.relative_position_bias.relative_position_bias_table",
                "attention.relative_position_bias.relative_position_index", "attention.num_attention_heads",
                "attention.scaling", "attention.attention_dropout", "mlp", "dropout", "drop_path",
                "window_size", "shift_size", "set_shift_and_window_size")

    def _attention_dropout_active(self) -> bool:
        return float(self.attention.attention_dropout) > 0

    def _fused_forward(self, hidden_states, input_dimensions, always_partition):
        attn = self.attention
        rpb = attn.relative_position_bias
        table = rpb.relative_position_bias_table
        window, shift = self._window_and_shift(input_dimensions, always_partition, table.shape[0])
        h, w = input_dimensions
        b, _, c = hidden_states.shape
        x = self.layernorm_before(hidden_states).view(b, h, w, c)
        out = _map_attention(x, (attn.q_proj, attn.k_proj, attn.v_proj), num_heads=attn.num_attention_heads,
                             window=window, shift=shift, bias=_v1_bias(table, rpb.relative_position_index, window),
                             scale=float(attn.scaling))
        out = _window_layout_dropout(self.dropout, attn.o_proj(out), window, shift)
        hidden_states = hidden_states + self.drop_path(out.reshape(b, h * w, -1))
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return self.dropout(hidden_states) + residual, None


class _SelfOutputSwinLayer(_SwinV1Common):
    """transformers' ``DonutSwinLayer`` (and 4.x ``SwinLayer``): ``attention.self.{query,key,value}`` with
    the bias table, ``attention.output.dense``, ``intermediate`` + ``output``; returns a 1-tuple."""

    REQUIRED = ("layernorm_before", "layernorm_after", "attention.self.query", "attention.self.key",
                "attention.self.value", "attention.self.relative_position_bias_table",
                "attention.self.relative_position_index", "attention.self.num_attention_heads",
                "attention.self.attention_head_size", "attention.self.dropout", "attention.output.dense",
                "attention.output.dropout", "intermediate", "output", "drop_path", "window_size", "shift_size",
                "set_shift_and_window_size")

    def _attention_dropout_active(self) -> bool:
        return self.attention.self.dropout.p > 0

    def _fused_forward(self, hidden_states, input_dimensions, always_partition):
        sa, so = self.attention.self, self.attention.output
        table = sa.relative_position_bias_table
        window, shift = self._window_and_shift(input_dimensions, always_partition, table.shape[0])
        h, w = input_dimensions
        b, _, c = hidden_states.shape
        x = self.layernorm_before(hidden_states).view(b, h, w, c)
        out = _map_attention(x, (sa.query, sa.key, sa.value), num_heads=sa.num_attention_heads, window=window,
                             shift=shift, bias=_v1_bias(table, sa.relative_position_index, window),
                             scale=1.0 / math.sqrt(sa.attention_head_size))
        out = _window_layout_dropout(so.dropout, so.dense(out), window, shift)
        hidden_states = hidden_states + self.drop_path(out.reshape(b, h * w, -1))
        return (hidden_states + self._feed_forward(self.layernorm_after(hidden_states)),)


class _SelfOutputSwinv2Layer(_FusedLayer):
    """transformers' ``Swinv2Layer`` (4.x and 5.x): cosine attention, CPB-MLP bias, residual post-norm;
    returns a 1-tuple."""

    REQUIRED = ("layernorm_before", "layernorm_after", "attention.self.query", "attention.self.key",
                "attention.self.value", "attention.self.logit_scale", "attention.self.continuous_position_bias_mlp",
                "attention.self.relative_coords_table", "attention.self.relative_position_index",
                "attention.self.num_attention_heads", "attention.self.dropout", "attention.output.dense",
                "attention.output.dropout", "intermediate", "output", "drop_path", "window_size", "shift_size",
                "get_attn_mask")

    def _attention_dropout_active(self) -> bool:
        return self.attention.self.dropout.p > 0

    def _continuous_bias(self, window: int) -> Tensor:
        """(heads, N, N): 16 * sigmoid of the CPB-MLP table gathered by the layer's index (transformers')."""
        sa = self.attention.self
        table = sa.continuous_position_bias_mlp(sa.relative_coords_table).view(-1, sa.num_attention_heads)
        return 16 * torch.sigmoid(_table_bias(table, sa.relative_position_index, window))

    def _fused_forward(self, hidden_states, input_dimensions, always_partition):
        sa, so = self.attention.self, self.attention.output
        window, shift = int(self.window_size), int(self.shift_size)
        h, w = input_dimensions
        b, _, c = hidden_states.shape
        x = hidden_states.view(b, h, w, c)
        bias = self._continuous_bias(window)
        linears = (sa.query, sa.key, sa.value)
        if shift == 0:
            out = _map_attention(x, linears, num_heads=sa.num_attention_heads, window=window, shift=0, bias=bias,
                                 logit_scale=sa.logit_scale)
        else:
            out = self._shifted_windows_attention(x, linears, window, shift, bias)
        out = _window_layout_dropout(so.dropout, so.dense(out), window, shift)
        hidden_states = hidden_states + self.drop_path(self.layernorm_before(out.reshape(b, h * w, -1)))
        return (hidden_states + self.drop_path(self.layernorm_after(self._feed_forward(hidden_states))),)

    def _shifted_windows_attention(self, x: Tensor, linears, window: int, shift: int, bias: Tensor) -> Tensor:
        """transformers' partition and its own mask, added twice as transformers adds it; the attention
        itself in the windowed op."""
        sa = self.attention.self
        b, h, w, _ = x.shape
        pad_h, pad_w = _pad_amounts(h, w, window)
        windows = _map_to_windows(x, window, shift)  # B*nW, N, C
        weight, qkv_bias = _qkv_projection(linears)
        qkv = F.linear(windows, weight, qkv_bias)
        bw, n, c3 = qkv.shape
        heads = sa.num_attention_heads
        q, k, v = qkv.view(bw, n, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.get_attn_mask(h + pad_h, w + pad_w, dtype=q.dtype, device=q.device)
        out = windowed_attention(q, k, v, bias=bias.to(q.dtype), mask=mask + mask,
                                 logit_scale=sa.logit_scale.to(q.dtype))
        return _windows_to_map(out.transpose(1, 2).reshape(bw, n, -1), window, shift, h, w)


# ----------------------------------------------------------------------------------------------------
# Building the classes


def _has_path(module: nn.Module, dotted: str) -> bool:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _mixin_for_class(hf_class: type) -> type:
    """The code layout of a known transformers layer class: v2 by name; for v1, transformers 5.x's
    ``SwinLayer`` (q/k/v/o projections) is the one whose forward takes ``**kwargs``."""
    if hf_class.__name__ == "Swinv2Layer":
        return _SelfOutputSwinv2Layer
    params = inspect.signature(hf_class.forward).parameters.values()
    return _SplitProjectionSwinLayer if any(p.kind == p.VAR_KEYWORD for p in params) else _SelfOutputSwinLayer


def missing_attributes(layer: nn.Module, mixin: type) -> list[str]:
    """The attributes of ``mixin``'s layout that ``layer`` lacks."""
    return [p for p in mixin.REQUIRED if not _has_path(layer, p)]


_CLASSES: dict[type, type] = {}


def _import_layer_class(module_name: str, class_name: str) -> Optional[type]:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, class_name, None)


def _build(fused_name: str, hf_class: type, mixin: type) -> type:
    cls = type(fused_name, (mixin, hf_class), {"_hf_class": hf_class, "__module__": __name__,
                                               "__qualname__": fused_name,
                                               "__doc__": f"transformers' ``{hf_class.__name__}`` on the fused "
                                                          f"shifted-window attention op (see {__name__})."})
    cls._describe_signature()
    return cls


def known_layer_name(hf_class: type) -> Optional[str]:
    """The fused class name for a transformers layer class this module knows, else None."""
    for fused_name, (module_name, class_name) in KNOWN_LAYERS.items():
        if hf_class.__name__ == class_name and hf_class.__module__ == module_name:
            return fused_name
    return None


def _class_for(fused_name: str, hf_class: type) -> type:
    if hf_class not in _CLASSES:
        _CLASSES[hf_class] = _build(fused_name, hf_class, _mixin_for_class(hf_class))
        globals()[fused_name] = _CLASSES[hf_class]
    return _CLASSES[hf_class]


def fused_layer_class(layer: nn.Module) -> Optional[type]:
    """The fused subclass for ``layer`` when it is an instance of one of :data:`KNOWN_LAYERS`'
    transformers classes (exactly, not a subclass), else None. ValueError when the class is known but
    ``layer`` lacks attributes the fused forward reads (a transformers version whose code differs)."""
    fused_name = known_layer_name(type(layer))
    if fused_name is None:
        return None
    cls = _class_for(fused_name, type(layer))
    missing = missing_attributes(layer, cls.__mro__[1])
    if missing:
        try:
            import transformers

            version = transformers.__version__
        except ImportError:  # pragma: no cover
            version = "?"
        raise ValueError(f"vlm_kernels: {type(layer).__name__} of transformers {version} lacks attributes the fused "
                         f"layer reads (missing: {', '.join(missing)}); this transformers version's Swin code is "
                         f"not supported")
    return cls


def original_class(cls: type) -> Optional[type]:
    """The transformers class a fused class derives from (None for any other class)."""
    return cls.__dict__.get("_hf_class") if isinstance(cls, type) and issubclass(cls, _FusedLayer) else None


def __getattr__(name: str):
    """``FusedSwinLayer`` etc. by name (for unpickling a patched model in a new process)."""
    if name in KNOWN_LAYERS:
        hf_class = _import_layer_class(*KNOWN_LAYERS[name])
        if hf_class is None:
            raise AttributeError(f"{__name__}.{name} needs transformers' {KNOWN_LAYERS[name][1]}")
        return _class_for(name, hf_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KNOWN_LAYERS", "fused_layer_class", "known_layer_name", "missing_attributes", "original_class"]
