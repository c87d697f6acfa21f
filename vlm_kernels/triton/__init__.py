"""Triton kernels and their launchers (``philox.py``, ``gumbel.py``, ...).

Importing this package imports nothing else, so ``import vlm_kernels.triton`` works without Triton;
import a submodule (``vlm_kernels.triton.gumbel``) to load Triton and the kernels.
"""
