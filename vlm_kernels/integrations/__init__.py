"""Patch third-party models in place to use the vlm_kernels layers (``integrations.timm.patch``).

Each integration imports its library only when called: ``import vlm_kernels.integrations`` never
needs timm.
"""
