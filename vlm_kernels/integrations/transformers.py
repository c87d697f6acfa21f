"""Swap vlm_kernels' fused shifted-window attention into Hugging Face transformers' Swin encoders, in place.

    from transformers import VisionEncoderDecoderModel
    import vlm_kernels.integrations.transformers as vk_hf

    model = VisionEncoderDecoderModel.from_pretrained("naver-clova-ix/donut-base")
    vk_hf.patch(model)      # every SwinLayer / DonutSwinLayer / Swinv2Layer inside, in place
    ...
    vk_hf.unpatch(model)    # back to transformers' own forward

Every ``SwinLayer``, ``DonutSwinLayer`` and ``Swinv2Layer`` in ``model`` (a ``SwinModel``,
``Swinv2Model``, ``DonutSwinModel``, their task heads and backbones, or anything that embeds them, such
as a ``VisionEncoderDecoderModel``) gets the fused forward of :mod:`vlm_kernels.nn.hf_swin`. The layer
objects stay the same (their class is swapped for a subclass), so parameters, buffers, state_dict
keys, hooks and optimizers are untouched; outputs and gradients equal transformers' within rounding.
Calls the fused op does not cover (``output_attentions=True``, attention dropout in training,
``head_mask``) run transformers' own code, with a one-time warning.
"""

from __future__ import annotations

import torch.nn as nn

from ..nn import hf_swin


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError("vlm_kernels.integrations.transformers needs transformers (pip install transformers)") from exc


def patch(model: nn.Module) -> nn.Module:
    """Give every transformers Swin v1/v2/Donut layer in ``model`` (``model`` itself included) the fused
    forward, in place; returns ``model``. Layers already patched are left as they are.

    Raises ValueError when ``model`` holds no such layer, or when a layer's attributes are not those
    of the transformers code this integration reads (nothing is changed then).
    """
    _require_transformers()
    swaps, found = [], 0
    for module in model.modules():
        if hf_swin.original_class(type(module)) is not None:
            found += 1
            continue
        fused = hf_swin.fused_layer_class(module)  # raises before anything is swapped
        if fused is not None:
            swaps.append((module, fused))
    if not swaps and not found:
        raise ValueError(f"patch: no transformers SwinLayer, DonutSwinLayer or Swinv2Layer found in "
                         f"{type(model).__name__}")
    for module, fused in swaps:
        module.__class__ = fused
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore transformers' own classes on every layer :func:`patch` changed in ``model``; returns ``model``.

    The layers keep any state they acquired meanwhile (e.g. transformers' shrunk window), as the
    unpatched model would have. Raises ValueError when ``model`` holds no transformers Swin layer.
    """
    found = 0
    for module in model.modules():
        original = hf_swin.original_class(type(module))
        if original is not None:
            module.__class__ = original
            found += 1
        elif hf_swin.known_layer_name(type(module)) is not None:
            found += 1
    if not found:
        raise ValueError(f"unpatch: no transformers SwinLayer, DonutSwinLayer or Swinv2Layer found in "
                         f"{type(model).__name__}")
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any layer of ``model`` runs the fused forward."""
    return any(hf_swin.original_class(type(m)) is not None for m in model.modules())


__all__ = ["is_patched", "patch", "unpatch"]
