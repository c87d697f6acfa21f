"""Drop-in nn.Modules on the vlm_kernels ops (timm / vector-quantize-pytorch compatible names)."""

from .mlp import Mlp
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .vq import LossBreakdown, VectorQuantizer, to_vector_quantize_state_dict
from .window_attention import SwinTransformerBlock, SwinTransformerV2Block, WindowAttention, WindowAttentionV2

__all__ = ["GroupedResidualVQ", "LossBreakdown", "Mlp", "ResidualVQ", "SwinTransformerBlock", "SwinTransformerV2Block",
           "VectorQuantizer", "WindowAttention", "WindowAttentionV2", "to_vector_quantize_state_dict"]
