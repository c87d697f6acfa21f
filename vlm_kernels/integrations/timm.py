"""Swap vlm_kernels' fused Swin layers into a timm model, in place, keeping the weights.

    model = timm.create_model("swin_tiny_patch4_window7_224")
    vlm_kernels.integrations.timm.patch(model)

Every timm ``SwinTransformerBlock`` / ``SwinTransformerV2Block`` becomes the vlm_kernels block of the
same configuration, sharing (not copying) its parameters and sub-modules, so optimizers and
state_dicts keep working; any remaining timm Swin ``WindowAttention`` (used on windows directly)
becomes the vlm_kernels one. ``model.set_input_size(...)`` keeps working after the patch.
"""

from __future__ import annotations

import torch.nn as nn

from ..nn.window_attention import SwinTransformerBlock, SwinTransformerV2Block, WindowAttention, WindowAttentionV2


def _replacements():
    try:
        from timm.models import swin_transformer as v1
        from timm.models import swin_transformer_v2 as v2
    except ImportError as exc:
        raise ImportError("vlm_kernels.integrations.timm.patch needs timm (pip install timm)") from exc
    blocks = {v1.SwinTransformerBlock: SwinTransformerBlock, v2.SwinTransformerV2Block: SwinTransformerV2Block}
    attentions = {v1.WindowAttention: WindowAttention, v2.WindowAttention: WindowAttentionV2}
    return blocks, attentions


def _swap(model: nn.Module, table: dict) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new_cls = table.get(type(child))
            if new_cls is not None:
                setattr(parent, name, new_cls.from_timm(child))
                count += 1
    return count


def patch(model: nn.Module) -> nn.Module:
    """Replace timm's Swin v1/v2 blocks and window attentions in ``model`` (in place); returns ``model``.

    Raises ValueError when the model holds none of them. Forward outputs and gradients equal the
    unpatched model's within floating-point tolerance (attention dropout falls back to the reference).
    """
    blocks, attentions = _replacements()
    if type(model) in blocks or type(model) in attentions:
        raise ValueError("patch: pass the model that contains the Swin block, or use "
                         "vlm_kernels.nn.<Block>.from_timm(block) for a lone block")
    count = _swap(model, blocks) + _swap(model, attentions)
    if count == 0:
        raise ValueError(f"patch: no timm Swin v1/v2 block or WindowAttention found in {type(model).__name__}")
    return model


__all__ = ["patch"]
