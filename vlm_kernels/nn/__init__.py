"""Drop-in nn.Modules on the vlm_kernels ops (timm / vector-quantize-pytorch compatible names)."""

from .mlp import Mlp
from .vq import VectorQuantizer
from .window_attention import SwinTransformerBlock, SwinTransformerV2Block, WindowAttention, WindowAttentionV2

__all__ = ["Mlp", "SwinTransformerBlock", "SwinTransformerV2Block", "VectorQuantizer", "WindowAttention", "WindowAttentionV2"]
