"""Thin vision-language models built on vlm_kernels (issue 5: Swin, ViT, VAE, VQ-VAE, dVAE, TrOCR-style,
LLaVA-style). Each model is one file, built only from ``vlm_kernels`` functions and ``vlm_kernels.nn``
layers (no kernel code of its own), with a docstring naming the paper and equations it follows.
Import a model from its file, e.g. ``from python_models.vqvae import VQVAE``."""
