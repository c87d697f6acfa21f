"""Drop-in nn.Modules on the vlm_kernels ops (timm / vector-quantize-pytorch compatible names)."""

from .window_attention import SwinTransformerBlock, SwinTransformerV2Block, WindowAttention, WindowAttentionV2
