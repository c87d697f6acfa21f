"""Gumbel-softmax, Gumbel-argmax and KL-to-uniform in plain PyTorch: the oracle and the fallback.

Every function takes a contiguous ``logits`` and a normalised ``dim`` (checks live in
``vlm_kernels.ops.gumbel``). The math (shared by every backend):

* noise: ``g[i]`` for the element of linear index ``i``: word ``i % 4`` of the Philox call at counter ``i // 4``
  mapped to Gumbel(0, 1) noise in float32 (see philox.py)
* ``z = logits + g`` in the accumulation type (float64 for float64 logits, float32 otherwise)
* soft sample: ``softmax((z - max z) / tau)``; hard sample: one-hot of ``argmax z`` (lowest index on
  ties, NaN counts as the largest), a whole row of NaN when the soft sample's row is NaN (z holds a NaN
  or a +inf, or is all -inf)
* backward: ``dlogits = y * (dy - sum(dy * y)) / tau`` with ``y`` the soft sample (the straight-through
  gradient for hard samples)
* KL(softmax(l) || uniform) = ``sum p (l - lse) + log K``; its gradient ``p * (log p - sum p log p)``;
  terms whose p is exactly 0 contribute 0 (0 log 0 = 0), so extreme finite logits never give NaN,
  while a row holding NaN gives NaN (KL and gradient)
"""

from __future__ import annotations

import math

import torch

from .philox import gumbel_noise


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def perturbed_logits(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """``logits + Gumbel noise`` in the accumulation dtype."""
    acc = _acc_dtype(logits.dtype)
    return logits.to(acc) + gumbel_noise(logits.shape, seed, logits.device).to(acc)


def _first_argmax(z: torch.Tensor, dim: int) -> torch.Tensor:
    # torch.argmax already returns the first maximum and treats NaN as the maximum.
    return torch.argmax(z, dim=dim)


def _soft(z: torch.Tensor, tau: float, dim: int) -> torch.Tensor:
    m = torch.amax(z, dim=dim, keepdim=True)  # amax propagates NaN, so a NaN row stays NaN
    e = torch.exp((z - m) * (1.0 / tau))
    return e / e.sum(dim=dim, keepdim=True)


def gumbel_softmax_forward(logits: torch.Tensor, seed: int, tau: float, hard: bool, dim: int) -> torch.Tensor:
    z = perturbed_logits(logits, seed)
    if not hard:
        return _soft(z, tau, dim).to(logits.dtype)
    index = _first_argmax(z, dim).unsqueeze(dim)
    out = torch.zeros_like(z).scatter_(dim, index, 1.0)
    # The row is NaN wherever the soft sample's is (eager's y_hard - sg(y_soft) + y_soft): a NaN, a +inf
    # (inf - inf) or only -inf (-inf - -inf) in z, i.e. a non-finite max (amax propagates NaN).
    out = torch.where(torch.isfinite(torch.amax(z, dim=dim, keepdim=True)), out, torch.nan)
    return out.to(logits.dtype)


def gumbel_softmax_backward(grad: torch.Tensor, saved: torch.Tensor, seed: int, tau: float, hard: bool,
                            dim: int) -> torch.Tensor:
    """``saved`` is the soft output for ``hard=False``, the logits for ``hard=True``."""
    acc = _acc_dtype(saved.dtype)
    y = _soft(perturbed_logits(saved, seed), tau, dim) if hard else saved.to(acc)
    g = grad.to(acc)
    out = y * (g - (g * y).sum(dim=dim, keepdim=True)) * (1.0 / tau)
    return out.to(saved.dtype)


def gumbel_argmax(logits: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    return _first_argmax(perturbed_logits(logits, seed), dim)


def _p_log_p(logp: torch.Tensor) -> torch.Tensor:
    """p log p with 0 log 0 = 0 (logp is -inf where an extreme logit underflows p to 0); NaN stays NaN."""
    p = logp.exp()
    return torch.where(p == 0, 0.0, p * logp)


def categorical_kl_uniform_forward(logits: torch.Tensor, dim: int) -> torch.Tensor:
    acc = _acc_dtype(logits.dtype)
    x = logits.to(acc)
    logp = torch.log_softmax(x, dim=dim)
    kl = _p_log_p(logp).sum(dim=dim) + math.log(logits.shape[dim])
    return kl.to(logits.dtype)


def categorical_kl_uniform_backward(grad: torch.Tensor, logits: torch.Tensor, dim: int) -> torch.Tensor:
    acc = _acc_dtype(logits.dtype)
    logp = torch.log_softmax(logits.to(acc), dim=dim)
    p = logp.exp()
    neg_entropy = _p_log_p(logp).sum(dim=dim, keepdim=True)
    out = torch.where(p == 0, 0.0, grad.to(acc).unsqueeze(dim) * p * (logp - neg_entropy))
    return out.to(logits.dtype)
