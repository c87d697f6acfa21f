"""vlm-kernels: fused CPU and GPU kernels for encoder-decoder vision-language models.

``import vlm_kernels`` never needs a compiler, a GPU or Triton: the backends that are missing are
reported by ``python -m vlm_kernels info`` and raise only when explicitly requested.
"""

from ._backend import BACKENDS, BackendUnavailableError, forced_backend, info_table, use_backend
from .ops.gumbel import categorical_kl_uniform, gumbel_argmax, gumbel_softmax
from .ops.vq import perplexity, vq_code_stats, vq_ema_update_, vq_nearest, vq_quantize
from .ops.window_attention import window_attention, windowed_attention
from . import nn  # noqa: E402  (vlm_kernels.nn.VectorQuantizer etc. after a plain import)

__version__ = "0.1.0"


def info() -> str:
    """A table of the backends and whether each can run here (also ``python -m vlm_kernels info``)."""
    return info_table()


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "categorical_kl_uniform",
    "forced_backend",
    "gumbel_argmax",
    "gumbel_softmax",
    "info",
    "nn",
    "perplexity",
    "use_backend",
    "vq_code_stats",
    "vq_ema_update_",
    "vq_nearest",
    "vq_quantize",
    "window_attention",
    "windowed_attention",
    "__version__",
]
