"""``VectorQuantizer``: vector-quantize-pytorch's ``VectorQuantize`` on the fused VQ ops.

Switching is a change of import: the arguments people use have ``VectorQuantize``'s names, defaults and
meaning (a decay-0.8 EMA codebook, commitment weight 1, the rotation trick), its state_dicts load
unchanged, and given the same codebook and input the same codes are picked. See :class:`VectorQuantizer`
for the list; an argument of ``VectorQuantize`` that is not implemented here raises an error naming it
when it is given a value other than its default (which would change what the layer does).

What is different, on purpose:

* the nearest code is exact (the float64 answer) and found without an N x K distance matrix; the EMA
  statistics come from a one-pass segmented sum, not a one-hot matrix; the rotation trick's backward
  re-gathers the codes instead of keeping them (so a training step holds O(N D), never O(N K)).
* ``decay=None`` (not in ``VectorQuantize``) is a codebook learned by the VQ-VAE codebook loss
  ``|sg(x) - e|^2`` next to the commitment loss (van den Oord et al. 2017, eq. 3).
* in eval mode the loss holds the commitment term (``VectorQuantize`` returns 0 there).
* random draws (dead-code samples, Gumbel noise) come from other random streams than theirs (k-means
  samples and quantizer-dropout draws are theirs: one seed gives the same ones).
* fp16/bf16 inputs are looked up against the codebook rounded to their dtype (VectorQuantize upcasts
  the input to float32).
* with ``mask``, the commitment loss is taken in codebook space (after ``project_in``, heads and
  normalisation) as without a mask; ``get_codes_from_indices`` / ``get_output_from_indices`` are
  consistent with ``forward`` also for shared multi-head codebooks and projected feature maps.
"""

from __future__ import annotations

import numbers
from collections import namedtuple
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._common import describe
from ..ops.gumbel import gumbel_argmax
from ..ops.vq import _all_reduce_, _broadcast_, perplexity, vq_code_stats, vq_ema_update_, vq_nearest, vq_quantize
from ..reference.vq import as_rows, row_shape

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

NORM_EPS = 1e-6  # VectorQuantize's l2-normalisation epsilon (inputs, codes, the rotation trick)
_STOCHASTIC_CHUNK = 1 << 22  # logits held at once when sampling codes: rows x K <= 4M (16 MB in fp32)

# VectorQuantize arguments not implemented here: name -> (the default, which is accepted, and why not).
_UNSUPPORTED = {
    "commitment_use_cross_entropy_loss": (False, "a cross-entropy over the N x K distance matrix"),
    "codebook_diversity_loss_weight": (0.0, "an entropy over the N x K distance matrix"),
    "codebook_diversity_temperature": (100.0, "it only sets codebook_diversity_loss_weight's softmax"),
    "straight_through": (False, "the Gumbel straight-through estimator needs the N x K softmax"),
    "directional_reparam": (False, "DiVeQ is not implemented"),
    "directional_reparam_variance": (5e-3, "DiVeQ is not implemented"),
    "vq_bridge": (None, "codebook bridges are not implemented"),
    "manual_ema_update": (False, "use update_indices() with ema_update=False in forward instead"),
    "in_place_codebook_optimizer": (None, "in-place codebook optimisers are not implemented"),
    "manual_in_place_optimizer_update": (False, "in-place codebook optimisers are not implemented"),
    "affine_param": (False, "affine codebook parameters are not implemented"),
    "sync_affine_param": (False, "affine codebook parameters are not implemented"),
    "affine_param_batch_decay": (0.99, "affine codebook parameters are not implemented"),
    "affine_param_codebook_decay": (0.9, "affine codebook parameters are not implemented"),
    "sync_update_v": (0.0, "the synchronous update rule is not implemented"),
}

# vector-quantize-pytorch's state_dict names -> ours (a leading codebook dim of 1 when there is one codebook).
_VQP_KEYS = {"_codebook.embed": "embed", "_codebook.cluster_size": "cluster_size",
             "_codebook.embed_avg": "embed_avg", "_codebook.initted": "initted"}


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reject_unsupported(owner: str, table: dict, given: dict) -> None:
    """Raise for an argument of ``table`` given a value other than its default, and for unknown names."""
    for name, value in given.items():
        if name not in table:
            raise TypeError(f"{owner}: unexpected keyword argument {name!r}")
        default, why = table[name]
        if value is not default and value != default:
            raise ValueError(f"{owner}: argument {name}={value!r} is not supported ({why}); "
                             f"only its default {default!r} is accepted")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def _got(value: object) -> str:
    return describe(value) if isinstance(value, Tensor) else f"{type(value).__name__} {value!r}"


def _bool(owner: str, name: str, value: object, optional: bool = False) -> Optional[bool]:
    """A bool (or numpy bool; ``None`` too when ``optional``); anything else is a TypeError naming it."""
    if value is None and optional:
        return None
    if not _is_bool(value):
        raise TypeError(f"{owner}: {name} must be a bool{' or None' if optional else ''}, got {_got(value)}")
    return bool(value)


def _int(owner: str, name: str, value: object) -> int:
    """An int (not a bool, not a float); else a TypeError naming it."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {_got(value)}")
    return int(value)


def _real(owner: str, name: str, value: object) -> float:
    """A real number (not a bool); else a TypeError naming it."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {_got(value)}")
    return float(value)


def _positive_int(owner: str, name: str, value: object) -> int:
    value = _int(owner, name, value)
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _nonnegative(owner: str, name: str, value: object) -> float:
    value = _real(owner, name, value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return value


def _codes_in_layout(codebook: Tensor, indices: Tensor, dim: int) -> Tensor:
    """``codebook[indices]`` with the code dimension at ``dim`` (-1, or 1 for channel-first)."""
    codes = F.embedding(indices, codebook)
    return codes if dim == -1 else codes.movedim(-1, dim).contiguous()


def _rowdot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Per-vector dot products (keepdim) without an elementwise-product temporary."""
    if dim == -1 or dim == a.dim() - 1:
        return torch.einsum("...d,...d->...", a, b).unsqueeze(-1)
    return torch.einsum("bd...,bd...->b...", a, b).unsqueeze(1)


class _Quantize(torch.autograd.Function):
    """Codes, losses and a gradient estimator in one autograd node (the rotation trick, or codes that
    are not vq_nearest's: sampled ones).

    Forward: ``indices`` (vq_nearest's when None), the codes ``q = codebook[indices]`` and
    ``loss = (beta + codebook_weight) * mean |x - q|^2`` (from vq_nearest's exact distances when it
    picked the codes).

    Backward: x receives ``beta * d mse/dx`` (the commitment term) plus the output gradient through the
    estimator: "rotation" (Fifty et al. 2024, sec. 4.2: g goes through the rotation R that maps x/|x| onto
    q/|q|, scaled by |q|/|x|, both constants: ``s (g - 2 w (w.g) + 2 u (q^.g))`` with u = x/|x|,
    q^ = q/|q|, w = (u + q^)/|u + q^|, s = |q|/|x|, norms clamped at 1e-6 as in VectorQuantize), "ste"
    (g unchanged) or "none"; the codebook receives ``codebook_weight * d mse/de`` as a segmented sum
    (vq_code_stats). Only x (which the loss needs anyway), the codebook and the indices are kept: the
    codes are gathered again, and the whole x gradient is s g + a x + b q with per-vector scalars a, b.
    """

    @staticmethod
    def forward(ctx, x: Tensor, codebook: Tensor, indices: Optional[Tensor], dim: int, beta: float,
                codebook_weight: float, estimator: str):
        distances = None
        if indices is None:
            indices, distances = vq_nearest(x, codebook, dim=dim)
        q = _codes_in_layout(codebook, indices, dim)
        if distances is None or x.dtype == torch.float64:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            mse = ((x.to(acc) - q.to(acc)) ** 2).mean()
        else:
            mse = distances.sum() / x.numel()  # exact squared distances (float64, rounded): no N x D temporary
        ctx.dim, ctx.beta, ctx.codebook_weight, ctx.estimator = dim, beta, codebook_weight, estimator
        ctx.save_for_backward(x, codebook, indices)
        ctx.mark_non_differentiable(indices)
        return q, indices, (beta + codebook_weight) * mse

    @staticmethod
    def backward(ctx, grad_q: Optional[Tensor], grad_indices, grad_loss: Optional[Tensor]):
        x, codebook, indices = ctx.saved_tensors
        dim, numel = ctx.dim, x.numel()
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        q = _codes_in_layout(codebook.detach().to(acc), indices, dim)
        xa = x.to(acc)
        commit = None if grad_loss is None else (2.0 * ctx.beta / numel) * grad_loss.to(acc)
        if grad_q is None or ctx.estimator == "none":
            grad_x = torch.zeros_like(xa) if commit is None else (xa - q).mul_(commit)
        elif ctx.estimator == "ste":
            grad_x = grad_q.to(acc) if commit is None else (xa - q).mul_(commit).add_(grad_q)
        else:
            g = grad_q.to(acc)
            x_norm, q_norm = xa.norm(dim=dim, keepdim=True), q.norm(dim=dim, keepdim=True)
            nx, nq = x_norm.clamp_min(NORM_EPS), q_norm.clamp_min(NORM_EPS)
            ug, qg = _rowdot(xa, g, dim) / nx, _rowdot(q, g, dim) / nq
            uq = _rowdot(xa, q, dim) / (nx * nq)
            nw = ((x_norm / nx) ** 2 + (q_norm / nq) ** 2 + 2 * uq).clamp_min(0).sqrt().clamp_min(NORM_EPS)
            wg = (ug + qg) / nw
            s = q_norm / nx
            a = 2 * s * (qg - wg / nw) / nx
            b = -2 * s * wg / (nw * nq)
            if commit is not None:
                a, b = a + commit, b - commit
            grad_x = torch.mul(g, s).addcmul_(xa, a).addcmul_(q, b)
        grad_codebook = None
        if ctx.needs_input_grad[1] and ctx.codebook_weight != 0.0 and grad_loss is not None:
            # d/de_k of sum over k's vectors |e_k - x_r|^2 = 2 (count_k e_k - sum of k's vectors).
            counts, sums = vq_code_stats(x.detach(), indices, codebook.shape[0], dim=dim, validate=False)
            scale = (2.0 * ctx.codebook_weight / numel) * grad_loss.to(acc)
            grad_codebook = (scale * (counts.to(acc)[:, None] * codebook.detach().to(acc) - sums.to(acc)))
            grad_codebook = grad_codebook.to(codebook.dtype)
        return grad_x.to(x.dtype), grad_codebook, None, None, None, None, None


class VectorQuantizer(nn.Module):
    """Vector quantisation with a codebook trained by EMA or by gradient (vector-quantize-pytorch's
    ``VectorQuantize``).

    Args (``VectorQuantize``'s names, defaults and meaning):
        dim: input feature size.
        codebook_size: number of codes K.
        codebook_dim: code size; when ``codebook_dim * heads != dim`` the input is projected in by a
            ``Linear(dim, codebook_dim * heads)`` (``project_in``) and back by ``project_out``.
        heads: vectors per input feature (each head quantises its ``codebook_dim`` slice);
        separate_codebook_per_head: one codebook per head instead of one shared by all heads.
        decay: EMA decay of the codebook statistics (0.8). ``None`` (ours): a codebook learned by the
            VQ-VAE codebook loss ``|sg(x) - e|^2`` (weight 1) next to the commitment loss.
        eps: Laplace smoothing of the EMA counts.
        freeze_codebook: no codebook update and no codebook gradient (``forward`` can override it).
        kmeans_init, kmeans_iters, sync_kmeans: initialise the codebook by k-means on the first batch
            seen (in any mode, as VectorQuantize), with its statistics synced across ranks.
        use_cosine_sim: l2-normalise inputs and codes; the lookup maximises the dot product.
        layernorm_after_project_in: a LayerNorm after ``project_in``.
        threshold_ema_dead_code: codes whose EMA count falls below this are re-initialised from batch
            vectors (their count reset to the threshold).
        channel_last: ``False`` takes (B, dim, N) sequences.
        accept_image_fmap, accept_3d_fmap: channel-first (B, dim, H, W) / (B, dim, D, H, W) maps.
        commitment_weight: weight of the commitment loss ``|x - sg(e)|^2``.
        orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes: the
            codebook orthogonality loss (Shin et al. 2021, eq. 2), computed through the D x D Gram matrix
            when that is the smaller; the codebook becomes a parameter that this loss trains.
        stochastic_sample_codes, sample_codebook_temp: in training, draw the code from
            ``softmax(-|x - e| / temp)`` (cosine: ``softmax(x.e / temp)``) with vlm_kernels' Gumbel-max
            sampler, in row chunks (temp 0: the nearest code).
        rotation_trick: the gradient estimator of Fifty et al. 2024 (default: ``dim > 1``); ``False``
            is the straight-through estimator.
        sync_codebook: all-reduce the EMA statistics and k-means, broadcast dead-code samples
            (default: when a process group of more than one rank is initialised).
        ema_update: update the codebook from the EMA statistics (default True with a float decay).
        learnable_codebook: the codebook is a parameter trained by the commitment loss (needs
            ``ema_update=False``).
        return_zeros_for_masked_padding: masked positions of the output are 0 (else the input).
        route_gradients_to_input: ``False`` gives the output no gradient to the input.

    Arguments of ``VectorQuantize`` not implemented (an error names them unless left at their
    default): commitment_use_cross_entropy_loss, codebook_diversity_loss_weight,
    codebook_diversity_temperature, straight_through, directional_reparam, directional_reparam_variance,
    vq_bridge, manual_ema_update, in_place_codebook_optimizer, manual_in_place_optimizer_update,
    affine_param, sync_affine_param, affine_param_batch_decay, affine_param_codebook_decay, sync_update_v.

    ``forward(x, mask=None, lens=None, sample_codebook_temp=None, freeze_codebook=None,
    return_loss_breakdown=False, ema_update=None)`` takes (..., dim) (or channel-first as configured)
    and returns ``(quantized, indices, loss)``: ``quantized`` like ``x``; ``indices`` int64 of ``x``'s
    shape without the feature dim (with a trailing ``heads`` dim when ``heads > 1``; -1 where ``mask`` is
    False); ``loss`` a 0-dim float32 tensor (commitment * weight, plus the orthogonal loss in training).
    ``mask`` (B, N) bool (or ``lens`` (B,)) excludes padding positions from the lookup statistics and loss.
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: Optional[int] = None, heads: int = 1,
                 separate_codebook_per_head: bool = False, decay: Optional[float] = 0.8, eps: float = 1e-5, *,
                 freeze_codebook: bool = False, kmeans_init: bool = False, kmeans_iters: int = 10,
                 sync_kmeans: bool = True, use_cosine_sim: bool = False, layernorm_after_project_in: bool = False,
                 threshold_ema_dead_code: float = 0, channel_last: bool = True, accept_image_fmap: bool = False,
                 accept_3d_fmap: bool = False, commitment_weight: float = 1.0, orthogonal_reg_weight: float = 0.0,
                 orthogonal_reg_active_codes_only: bool = False, orthogonal_reg_max_codes: Optional[int] = None,
                 stochastic_sample_codes: bool = False, sample_codebook_temp: float = 1.0,
                 rotation_trick: Optional[bool] = None, sync_codebook: Optional[bool] = None,
                 ema_update: Optional[bool] = None, learnable_codebook: Optional[bool] = None,
                 return_zeros_for_masked_padding: bool = True, route_gradients_to_input: bool = True,
                 **unsupported):
        super().__init__()
        owner = "VectorQuantizer"
        reject_unsupported(owner, _UNSUPPORTED, unsupported)
        dim = _positive_int(owner, "dim", dim)
        codebook_size = _positive_int(owner, "codebook_size", codebook_size)
        codebook_dim = dim if codebook_dim is None else _positive_int(owner, "codebook_dim", codebook_dim)
        heads = _positive_int(owner, "heads", heads)
        if decay is not None and not 0.0 <= _real(owner, "decay", decay) < 1.0:
            raise ValueError(f"{owner}: decay must be None (learned codebook) or in [0, 1), got {decay!r}")
        if not _real(owner, "eps", eps) > 0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps!r}")
        separate_codebook_per_head = _bool(owner, "separate_codebook_per_head", separate_codebook_per_head)
        freeze_codebook = _bool(owner, "freeze_codebook", freeze_codebook)
        kmeans_init = _bool(owner, "kmeans_init", kmeans_init)
        sync_kmeans = _bool(owner, "sync_kmeans", sync_kmeans)
        use_cosine_sim = _bool(owner, "use_cosine_sim", use_cosine_sim)
        layernorm_after_project_in = _bool(owner, "layernorm_after_project_in", layernorm_after_project_in)
        channel_last = _bool(owner, "channel_last", channel_last)
        accept_image_fmap = _bool(owner, "accept_image_fmap", accept_image_fmap)
        accept_3d_fmap = _bool(owner, "accept_3d_fmap", accept_3d_fmap)
        orthogonal_reg_active_codes_only = _bool(owner, "orthogonal_reg_active_codes_only",
                                                 orthogonal_reg_active_codes_only)
        stochastic_sample_codes = _bool(owner, "stochastic_sample_codes", stochastic_sample_codes)
        rotation_trick = _bool(owner, "rotation_trick", rotation_trick, optional=True)
        sync_codebook = _bool(owner, "sync_codebook", sync_codebook, optional=True)
        ema_update = _bool(owner, "ema_update", ema_update, optional=True)
        learnable_codebook = _bool(owner, "learnable_codebook", learnable_codebook, optional=True)
        return_zeros_for_masked_padding = _bool(owner, "return_zeros_for_masked_padding",
                                                return_zeros_for_masked_padding)
        route_gradients_to_input = _bool(owner, "route_gradients_to_input", route_gradients_to_input)
        commitment_weight = _nonnegative(owner, "commitment_weight", commitment_weight)
        threshold_ema_dead_code = _nonnegative(owner, "threshold_ema_dead_code", threshold_ema_dead_code)
        orthogonal_reg_weight = _nonnegative(owner, "orthogonal_reg_weight", orthogonal_reg_weight)
        sample_codebook_temp = _nonnegative(owner, "sample_codebook_temp", sample_codebook_temp)
        kmeans_iters = _positive_int(owner, "kmeans_iters", kmeans_iters)
        if orthogonal_reg_max_codes is not None:
            orthogonal_reg_max_codes = _positive_int(owner, "orthogonal_reg_max_codes", orthogonal_reg_max_codes)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError(f"{owner}: accept_image_fmap and accept_3d_fmap exclude each other")
        if decay is None:
            # Ours: a codebook learned by the VQ-VAE codebook loss.
            if ema_update:
                raise ValueError(f"{owner}: ema_update=True needs a float decay (decay=None is a learned codebook)")
            if learnable_codebook is False:
                raise ValueError(f"{owner}: decay=None is a learned codebook; learnable_codebook=False needs a float "
                                 "decay")
            if threshold_ema_dead_code > 0:
                raise ValueError(f"{owner}: threshold_ema_dead_code needs EMA statistics (a float decay)")
            ema_update, learnable_codebook = False, True
        else:
            ema_update = True if ema_update is None else bool(ema_update)
            learnable_codebook = bool(learnable_codebook)
            if ema_update and learnable_codebook:
                raise ValueError(f"{owner}: learnable_codebook=True needs ema_update=False (a codebook is trained "
                                 "either by EMA or by gradient)")
            if use_cosine_sim and learnable_codebook:
                raise ValueError(f"{owner}: use_cosine_sim is not compatible with learnable_codebook=True "
                                 "(as in VectorQuantize; decay=None gives a learned cosine codebook)")
        num_codebooks = heads if separate_codebook_per_head else 1
        if orthogonal_reg_active_codes_only and num_codebooks > 1:
            raise ValueError(f"{owner}: orthogonal_reg_active_codes_only is not compatible with "
                             "separate_codebook_per_head (as in VectorQuantize)")

        self.dim, self.codebook_size, self.codebook_dim, self.heads = dim, codebook_size, codebook_dim, heads
        self.separate_codebook_per_head = bool(separate_codebook_per_head)
        self.num_codebooks = num_codebooks
        self.decay = None if decay is None else float(decay)
        self.eps = float(eps)
        self.freeze_codebook = bool(freeze_codebook)
        self.kmeans_init, self.kmeans_iters, self.sync_kmeans = bool(kmeans_init), kmeans_iters, bool(sync_kmeans)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = (bool(channel_last), bool(accept_image_fmap),
                                                                          bool(accept_3d_fmap))
        self.commitment_weight = commitment_weight
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = bool(orthogonal_reg_active_codes_only)
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes, self.sample_codebook_temp = bool(stochastic_sample_codes), sample_codebook_temp
        self.rotation_trick = (dim > 1) if rotation_trick is None else bool(rotation_trick)
        self.sync_codebook = sync_codebook
        self.ema_update, self.learnable_codebook = ema_update, learnable_codebook
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.route_gradients_to_input = bool(route_gradients_to_input)
        # Set by ResidualVQ(shared_codebook=True): the per-call step tracks the statistics and replaces dead
        # codes, and the owner moves the codes once per forward (VectorQuantize's manual_ema_update).
        self._manual_ema = False

        # Created in VectorQuantize's order, so that one seed gives both the same initial weights.
        inner = codebook_dim * heads
        self.has_projections = inner != dim
        if self.has_projections:
            self.project_in = (nn.Sequential(nn.Linear(dim, inner), nn.LayerNorm(inner))
                               if layernorm_after_project_in else nn.Linear(dim, inner))
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        shape = (codebook_size, codebook_dim) if num_codebooks == 1 else (num_codebooks, codebook_size, codebook_dim)
        embed = torch.zeros(num_codebooks, codebook_size, codebook_dim)
        if not kmeans_init:
            if self.decay is None:
                for c in range(num_codebooks):  # codes at the scale of unit-variance data
                    nn.init.kaiming_uniform_(embed[c])
            else:
                nn.init.kaiming_uniform_(embed)  # VectorQuantize's uniform_init (fan-in K * D of the 3-D tensor)
            if self.use_cosine_sim:
                embed = F.normalize(embed, dim=-1, eps=NORM_EPS)
        embed = embed.reshape(shape)
        if self.decay is not None:
            self.register_buffer("cluster_size", torch.ones(shape[:-1]))
            self.register_buffer("embed_avg", embed.clone())
        self._embed_is_param = self.decay is None or learnable_codebook or orthogonal_reg_weight > 0
        if self._embed_is_param:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # Codes picked in the last training batch (summed over ranks when syncing): what `usage` reports.
        self.register_buffer("batch_counts", torch.zeros(shape[:-1]), persistent=False)
        self._initted = not kmeans_init  # a Python mirror: no host sync (or guard on a tensor) per call

    # ------------------------------------------------------------------------------------------------
    # Codebook views.

    def _per_codebook(self, t: Tensor) -> Tensor:
        """``t`` with a leading codebook dim (a view)."""
        return t.unsqueeze(0) if self.num_codebooks == 1 else t

    @property
    def codebook(self) -> Tensor:
        """The codes the lookup uses: (K, codebook_dim), or (heads, K, codebook_dim) with separate codebooks
        (normalised for a learned cosine codebook)."""
        if self.use_cosine_sim and self.decay is None:
            return F.normalize(self.embed, dim=-1, eps=NORM_EPS)
        return self.embed

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        with torch.no_grad():
            self.embed.copy_(codes)

    def _lookup_codebook(self, c: int, dtype: torch.dtype, with_grad: bool) -> Tensor:
        embed = self._per_codebook(self.embed)[c]
        if not with_grad:
            embed = embed.detach()
        if self.use_cosine_sim and self.decay is None:
            embed = F.normalize(embed, dim=-1, eps=NORM_EPS)
        return embed.to(dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"heads={self.heads}, separate_codebook_per_head={self.separate_codebook_per_head}, "
                f"decay={self.decay}, "
                f"commitment_weight={self.commitment_weight}, use_cosine_sim={self.use_cosine_sim}, "
                f"threshold_ema_dead_code={self.threshold_ema_dead_code}, rotation_trick={self.rotation_trick}, "
                f"ema_update={self.ema_update}, learnable_codebook={self.learnable_codebook}")

    # ------------------------------------------------------------------------------------------------
    # Input layout.

    def _channel_first(self, x: Tensor) -> bool:
        return self.accept_image_fmap or self.accept_3d_fmap or (not self.channel_last and x.dim() > 2)

    def _check_input(self, x: object) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"VectorQuantizer: x must be a floating-point tensor, got {got}")
        if self.accept_image_fmap and x.dim() != 4:
            raise ValueError(f"VectorQuantizer: accept_image_fmap expects x of shape (B, {self.dim}, H, W), "
                             f"got {describe(x)}")
        if self.accept_3d_fmap and x.dim() != 5:
            raise ValueError(f"VectorQuantizer: accept_3d_fmap expects x of shape (B, {self.dim}, D, H, W), "
                             f"got {describe(x)}")
        first = x.dim() > 0 and self._channel_first(x)
        if x.dim() == 0 or x.shape[1 if first else -1] != self.dim:
            where = "dim 1" if first else "the last dim"
            raise ValueError(f"VectorQuantizer: x must have size {self.dim} along {where}, got {describe(x)}")

    def _mask(self, x: Tensor, mask: Optional[Tensor], lens: Optional[Tensor]) -> Optional[Tensor]:
        if mask is not None and lens is not None:
            raise ValueError("VectorQuantizer: pass mask or lens, not both")
        if mask is None and lens is None:
            return None
        if self.accept_image_fmap or self.accept_3d_fmap or x.dim() != 3:
            raise ValueError("VectorQuantizer: mask / lens need sequences (B, N, dim) (or (B, dim, N) with "
                             f"channel_last=False), got {describe(x)}")
        b, n = (x.shape[0], x.shape[2]) if self._channel_first(x) else x.shape[:2]
        if lens is not None:
            if not isinstance(lens, Tensor) or lens.shape != (b,) or lens.is_floating_point():
                got = describe(lens) if isinstance(lens, Tensor) else type(lens).__name__
                raise ValueError(f"VectorQuantizer: lens must be an integer tensor of shape ({b},), got {got}")
            return torch.arange(n, device=x.device) < lens.to(x.device)[:, None]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
            got = describe(mask) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"VectorQuantizer: mask must be a bool tensor of shape ({b}, {n}), got {got}")
        return mask.to(x.device)

    def _to_codebook_space(self, x: Tensor) -> Tensor:
        """project_in, the head split (..., heads, codebook_dim) and the cosine normalisation."""
        x_c = self.project_in(x)
        if self.heads > 1:
            x_c = x_c.unflatten(-1, (self.heads, self.codebook_dim))
        return x_c

    def _sync(self) -> bool:
        if self.sync_codebook is None:
            return _distributed_world() > 1
        return bool(self.sync_codebook)

    # ------------------------------------------------------------------------------------------------
    # k-means initialisation.

    def _kmeans_rows(self, x_c: Tensor, c: int, dim: int, mask: Optional[Tensor]) -> Tensor:
        """Codebook ``c``'s training vectors as rows, in VectorQuantize's order (so one seed samples the
        same initial centroids)."""
        d = self.codebook_dim
        if self.num_codebooks > 1:
            part = x_c[..., c, :]
            return part[mask] if mask is not None else part.reshape(-1, d)
        if self.heads > 1:  # one codebook for every head: ordered by batch, head, position
            moved = x_c.movedim(-2, 1)
            if mask is not None:
                return moved[mask.unsqueeze(1).expand(moved.shape[:3])]
            return moved.reshape(-1, d)
        if mask is not None:
            return x_c[mask]
        return as_rows(x_c, dim % x_c.dim())

    def _kmeans(self, rows: Tensor, sync: bool) -> tuple[Tensor, Tensor]:
        n, k = rows.shape[0], self.codebook_size
        pick = torch.randperm(n, device=rows.device)[:k] if n >= k else torch.randint(0, n, (k,), device=rows.device)
        centroids = rows[pick].contiguous()
        if sync:
            centroids = _broadcast_(centroids, None)
        metric = "cosine" if self.use_cosine_sim else "l2"
        counts = torch.zeros(k, dtype=rows.dtype, device=rows.device)
        for _ in range(self.kmeans_iters):
            indices, _ = vq_nearest(rows, centroids, metric=metric)
            counts, sums = vq_code_stats(rows, indices, k, validate=False)
            if sync:
                packed = _all_reduce_(torch.cat([counts[:, None], sums], dim=1), None)
                counts, sums = packed[:, 0], packed[:, 1:]
            means = sums / counts.clamp_min(1)[:, None]
            if self.use_cosine_sim:
                means = F.normalize(means, dim=1, eps=NORM_EPS)
            centroids = torch.where((counts > 0)[:, None], means, centroids)
        return centroids, counts

    @torch.no_grad()
    def _kmeans_init(self, x_c: Tensor, dim: int, mask: Optional[Tensor]) -> None:
        sync = self._sync() and self.sync_kmeans
        embed = self._per_codebook(self.embed)
        for c in range(self.num_codebooks):
            rows = self._kmeans_rows(x_c.detach(), c, dim, mask).to(embed.dtype)
            centroids, counts = self._kmeans(rows, sync)
            if self.decay is None:
                embed[c].copy_(centroids)
            else:
                # As VectorQuantize: the last pass's counts and sums become the EMA statistics and the codes
                # their smoothed means (a code no vector chose there starts at 0).
                self._per_codebook(self.cluster_size)[c].copy_(counts)
                self._per_codebook(self.embed_avg)[c].copy_(centroids * counts[:, None])
                self._codes_from_statistics(c)
        self.initted.fill_(True)
        self._initted = True

    @torch.no_grad()
    def init_codebook(self, x: Tensor, mask: Optional[Tensor] = None) -> None:
        """k-means initialisation of the codebook from the batch ``x`` (the layer's input; all ranks' rows
        when syncing). ``forward`` calls it on its first batch when ``kmeans_init``."""
        self._check_input(x)
        mask = self._mask(x, mask, None)
        x, dim = self._input_layout(x, mask)
        self._kmeans_init(self._normalize(self._to_codebook_space(x), dim), dim, mask)

    # ------------------------------------------------------------------------------------------------
    # EMA statistics and dead codes.

    @torch.no_grad()
    def _codes_from_statistics(self, c: int) -> None:
        """codes <- embed_avg / Laplace-smoothed cluster_size (VectorQuantize's update_ema)."""
        cluster_size = self._per_codebook(self.cluster_size)[c]
        total = cluster_size.sum()
        smoothed = (cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codes = self._per_codebook(self.embed_avg)[c] / smoothed[:, None]
        if self.use_cosine_sim:
            codes = F.normalize(codes, dim=-1, eps=NORM_EPS)
        self._per_codebook(self.embed)[c].copy_(codes)

    @torch.no_grad()
    def _track(self, c: int, x: Tensor, indices: Tensor, dim: int) -> Tensor:
        """Fold this batch's per-code counts and sums into the EMA statistics; returns the counts."""
        counts, sums = vq_code_stats(x, indices, self.codebook_size, dim=dim, validate=False)
        if self._sync():
            packed = _all_reduce_(torch.cat([counts[:, None], sums], dim=1), None)
            counts, sums = packed[:, 0], packed[:, 1:]
        cluster_size, embed_avg = self._per_codebook(self.cluster_size)[c], self._per_codebook(self.embed_avg)[c]
        cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - self.decay)
        embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - self.decay)
        return counts

    @torch.no_grad()
    def _expire(self, c: int, sources: list) -> None:
        """Codes whose EMA count is below the threshold become random vectors of ``sources`` (a list of
        (tensor, vector dim) pairs), with their count reset to the threshold. No host synchronisation."""
        threshold = self.threshold_ema_dead_code
        if threshold <= 0:
            return
        embed = self._per_codebook(self.embed)[c]
        sizes = [t.numel() // t.shape[dim] for t, dim in sources]
        total = sum(sizes)
        if total == 0:
            return
        pick = torch.randint(0, total, (self.codebook_size,), device=embed.device)
        samples = torch.zeros_like(embed)
        start = 0
        for (t, dim), n in zip(sources, sizes):
            if n == 0:
                continue
            moved = t.detach().movedim(dim, -1)  # a view: only the picked rows are read
            local = pick - start
            inside = (local >= 0) & (local < n)
            where = torch.unravel_index(local.clamp(0, n - 1), moved.shape[:-1])
            samples = torch.where(inside[:, None], moved[where].to(samples.dtype), samples)
            start += n
        if self.use_cosine_sim:
            samples = F.normalize(samples, dim=-1, eps=NORM_EPS)
        if self._sync():
            samples = _broadcast_(samples.contiguous(), None)  # every rank replaces with rank 0's vectors
        cluster_size, embed_avg = self._per_codebook(self.cluster_size)[c], self._per_codebook(self.embed_avg)[c]
        dead = cluster_size < threshold
        embed.copy_(torch.where(dead[:, None], samples, embed))
        cluster_size.copy_(torch.where(dead, torch.full_like(cluster_size, threshold), cluster_size))
        embed_avg.copy_(torch.where(dead[:, None], samples.to(embed_avg.dtype) * threshold, embed_avg))

    @torch.no_grad()
    def _ema_step(self, c: int, x: Tensor, indices: Tensor, dim: int, ema_update: bool) -> None:
        """VectorQuantize's codebook update for codebook ``c`` from this batch's vectors and codes."""
        if ema_update and not self._manual_ema:
            stats = vq_ema_update_(self._per_codebook(self.embed)[c], self._per_codebook(self.cluster_size)[c],
                                   self._per_codebook(self.embed_avg)[c], x, indices, decay=self.decay, eps=self.eps,
                                   dim=dim, threshold_dead=self.threshold_ema_dead_code, sync=self._sync(),
                                   normalize=self.use_cosine_sim)
            counts = stats["counts"]
        else:  # statistics (and dead codes) only; the codes move elsewhere or not at all
            counts = self._track(c, x, indices, dim)
            self._expire(c, [(x, dim)])
        self._per_codebook(self.batch_counts)[c].copy_(counts)

    @torch.no_grad()
    def _record_usage(self, c: int, indices: Tensor) -> None:
        flat = indices.reshape(-1)
        counts = torch.zeros(self.codebook_size, dtype=self.batch_counts.dtype, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))
        if self._sync():
            counts = _all_reduce_(counts, None)
        self._per_codebook(self.batch_counts)[c].copy_(counts)

    # ------------------------------------------------------------------------------------------------
    # Lookup, losses and gradient estimators.

    def _loss_weights(self, learn: bool) -> tuple[float, float, bool]:
        """(beta, codebook_weight, halve) for vq_quantize, whose loss (codebook_weight + beta) * mse sends
        beta * d mse/dx to x and codebook_weight * d mse/de to the codebook. VectorQuantize's learnable
        codebook has the loss w * mse with gradient w to both: beta = codebook_weight = w, value halved."""
        w = self.commitment_weight
        if self.decay is None:
            return w, (1.0 if learn else 0.0), False
        return w, (w if learn else 0.0), learn

    def _pick_codes(self, x: Tensor, codebook: Tensor, dim: int, temp: float) -> Tensor:
        """Codes that are not vq_nearest's: Gumbel-max samples of softmax(score / temp) (temp > 0), or the
        largest dot product with codes that may be off the unit sphere (cosine, temp 0)."""
        rows = as_rows(x.detach(), dim % x.dim())
        cb = codebook.detach()
        if temp > 0:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            rows, cb = rows.to(acc), cb.to(acc)
            step = max(1, _STOCHASTIC_CHUNK // cb.shape[0])
            picks = []
            for start in range(0, rows.shape[0], step):
                chunk = rows[start:start + step]
                score = chunk @ cb.T if self.use_cosine_sim else -torch.cdist(chunk, cb)
                picks.append(gumbel_argmax(score / temp, dim=-1))
            indices = torch.cat(picks) if picks else rows.new_zeros((0,), dtype=torch.int64)
        else:
            # argmax x.e = argmin |x' - e'|^2 with e' = (e, sqrt(M - |e|^2)), x' = (x, 0), M = max |e|^2.
            sq = (cb * cb).sum(1)
            lift = (sq.max() - sq).clamp_min(0).sqrt()
            indices, _ = vq_nearest(F.pad(rows, (0, 1)), torch.cat([cb, lift[:, None].to(cb.dtype)], dim=1))
        return indices.reshape(row_shape(x, dim % x.dim()))

    def _quantize_codebook(self, x: Tensor, c: int, dim: int, *, temp: float, frozen: bool, update: bool,
                           ema_update: bool, route: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Quantise ``x`` (codebook space, vectors along ``dim``) with codebook ``c``.
        Returns (output with its gradient estimator, indices, weighted loss, unweighted commitment mse)."""
        learn = self.learnable_codebook and not frozen
        codebook = self._lookup_codebook(c, x.dtype, with_grad=learn)
        if update:
            codebook = codebook.clone()  # the update below changes the codes in place; the backward needs these
        estimator = ("rotation" if self.rotation_trick else "ste") if route else "none"
        beta, codebook_weight, halve = self._loss_weights(learn)
        stochastic = self.training and self.stochastic_sample_codes and temp > 0
        # An EMA codebook stays on the unit sphere; a trained one (orthogonal loss) may leave it, and
        # VectorQuantize then scores x.e, not the cosine.
        dot_product = self.use_cosine_sim and self._embed_is_param and self.decay is not None
        if not stochastic and not dot_product and estimator != "rotation":
            quantized, indices, loss = vq_quantize(x, codebook, beta=beta, dim=dim, codebook_weight=codebook_weight)
        else:
            given = None
            if stochastic or dot_product:
                given = self._pick_codes(x, codebook, dim, temp if stochastic else 0.0)
            quantized, indices, loss = _Quantize.apply(x, codebook, given, dim, beta, codebook_weight, estimator)
        factor = beta + codebook_weight
        if halve:  # the value w * mse, the gradients unchanged
            loss, factor = loss - 0.5 * loss.detach(), 0.5 * factor
        mse = loss / factor if factor > 0 else torch.zeros_like(loss)
        if estimator != "none":
            out = quantized
        elif self._embed_is_param:  # VectorQuantize: without an estimator the output reaches a trained codebook
            out = _codes_in_layout(self._lookup_codebook(c, x.dtype, with_grad=True), indices, dim)
        else:
            out = quantized.detach()
        if update:
            self._ema_step(c, x.detach(), indices, dim, ema_update)
        elif self.training:
            self._record_usage(c, indices)
        return out, indices, loss, mse

    def _quantize(self, x_c: Tensor, dim: int, **kw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.num_codebooks == 1:
            return self._quantize_codebook(x_c, 0, dim, **kw)
        parts = [self._quantize_codebook(part, c, -1, **kw) for c, part in enumerate(x_c.unbind(-2))]
        outs, indices, losses, mses = zip(*parts)
        n = self.num_codebooks
        return torch.stack(outs, -2), torch.stack(indices, -1), sum(losses) / n, sum(mses) / n

    def _orthogonal_loss(self, indices: Tensor) -> Tensor:
        """mean over codebooks and code pairs of (cos(e_i, e_j) - [i == j])^2 (Shin et al. 2021, eq. 2; for
        codes of non-zero norm this is VectorQuantize's sum cos^2 / (h n^2) - 1/n), through whichever Gram
        matrix (n x n or D x D) is the smaller."""
        codes = self._per_codebook(self.embed)
        if self.orthogonal_reg_active_codes_only:
            codes = codes[:, torch.unique(indices[indices >= 0])]
        n = codes.shape[1]
        if self.orthogonal_reg_max_codes is not None and n > self.orthogonal_reg_max_codes:
            codes = codes[:, torch.randperm(n, device=codes.device)[:self.orthogonal_reg_max_codes]]
            n = codes.shape[1]
        normed = F.normalize(codes, dim=-1, eps=NORM_EPS)
        gram = normed @ normed.transpose(1, 2) if n <= normed.shape[-1] else normed.transpose(1, 2) @ normed
        h = codes.shape[0]
        return ((gram * gram).sum() - 2 * (normed * normed).sum() + h * n) / (h * n * n)

    # ------------------------------------------------------------------------------------------------

    def _input_layout(self, x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, int]:
        """``x`` with its vectors along the returned dim: channel-first inputs stay so (no copy) unless a
        projection, heads or a mask need them last."""
        if not self._channel_first(x):
            return x, -1
        if self.has_projections or self.heads > 1 or mask is not None:
            return x.movedim(1, -1), -1
        return x, 1

    def _normalize(self, x_c: Tensor, dim: int) -> Tensor:
        return F.normalize(x_c, dim=dim, eps=NORM_EPS) if self.use_cosine_sim else x_c

    def forward(self, x: Tensor, indices: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                lens: Optional[Tensor] = None, topk: Optional[int] = None, sample_codebook_temp: Optional[float] = None,
                freeze_codebook: Optional[bool] = None, return_loss_breakdown: bool = False,
                codebook_transform_fn=None, ema_update_weight=None, accum_ema_update: bool = False,
                ema_update: Optional[bool] = None):
        for name, value in (("indices", indices), ("topk", topk), ("codebook_transform_fn", codebook_transform_fn),
                            ("ema_update_weight", ema_update_weight)):
            if value is not None:
                raise ValueError(f"VectorQuantizer.forward: argument {name} is not supported (cross-entropy "
                                 "losses, top-k codes, codebook transforms and weighted EMA updates are not "
                                 "implemented)")
        owner = "VectorQuantizer.forward"
        if _bool(owner, "accum_ema_update", accum_ema_update):
            raise ValueError("VectorQuantizer.forward: argument accum_ema_update is not supported")
        freeze_codebook = _bool(owner, "freeze_codebook", freeze_codebook, optional=True)
        return_loss_breakdown = _bool(owner, "return_loss_breakdown", return_loss_breakdown)
        ema_update = _bool(owner, "ema_update", ema_update, optional=True)
        if sample_codebook_temp is not None:
            sample_codebook_temp = _nonnegative(owner, "sample_codebook_temp", sample_codebook_temp)
        self._check_input(x)
        mask = self._mask(x, mask, lens)
        frozen = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        temp = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        if ema_update and self.decay is None:
            raise ValueError("VectorQuantizer.forward: ema_update=True needs a float decay")
        ema_update = self.ema_update if ema_update is None else ema_update
        # As VectorQuantize: the estimator only when the input itself asks for gradients.
        route = self.training and self.route_gradients_to_input and x.requires_grad
        update = (self.training and not frozen and self.decay is not None
                  and (ema_update or self.threshold_ema_dead_code > 0))

        orig = x
        x, dim = self._input_layout(x, mask)
        x_c = self._normalize(self._to_codebook_space(x), dim)
        if not self._initted:
            if bool(self.initted):  # a codebook shared with a layer that has initialised it
                self._initted = True
            else:
                self._kmeans_init(x_c, dim, mask)
        rows = x_c if mask is None else x_c[mask]
        out, idx, loss, mse = self._quantize(rows, dim, temp=temp, frozen=frozen, update=update,
                                             ema_update=ema_update, route=route)
        if mask is not None:
            out = out.new_zeros(x_c.shape).index_put((mask,), out)
            idx = idx.new_full(x_c.shape[:-1], -1).index_put((mask,), idx)
        if self.heads > 1:
            out = out.flatten(-2)
        out = self.project_out(out)

        orthogonal = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if self.training and self.orthogonal_reg_weight > 0:
            orthogonal = self._orthogonal_loss(idx)
            loss = loss + self.orthogonal_reg_weight * orthogonal.to(loss.dtype)
        if mask is not None:
            fill = torch.zeros_like(x) if self.return_zeros_for_masked_padding else x
            out = torch.where(mask[..., None], out, fill)
        if x is not orig:
            out = out.movedim(-1, 1)
        if not return_loss_breakdown:
            return out, idx, loss
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        return out, idx, loss, LossBreakdown(mse if self.commitment_weight > 0 else zero, zero, orthogonal, zero)

    # ------------------------------------------------------------------------------------------------
    # Codes from indices, and the EMA step from given indices.

    def _codes_last(self, indices: Tensor) -> Tensor:
        """Codes of ``indices`` (x's shape without the feature dim, heads last), features last; -1 gives 0."""
        if not isinstance(indices, Tensor) or indices.is_floating_point():
            got = describe(indices) if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"VectorQuantizer: indices must be an integer tensor, got {got}")
        indices = indices.long()
        if self.heads > 1 and (indices.dim() == 0 or indices.shape[-1] != self.heads):
            raise ValueError(f"VectorQuantizer: indices must end in a heads dim of {self.heads}, "
                             f"got {describe(indices)}")
        codebook = self._per_codebook(self.codebook)
        dropped = indices < 0
        safe = indices.clamp_min(0)
        if self.num_codebooks == 1:
            codes = F.embedding(safe, codebook[0])
        else:
            codes = torch.stack([F.embedding(safe[..., c], codebook[c]) for c in range(self.num_codebooks)], -2)
        codes = codes.masked_fill(dropped[..., None], 0.0)
        return codes.flatten(-2) if self.heads > 1 else codes

    def _channel_first_output(self, like_dims: int) -> bool:
        return self.accept_image_fmap or self.accept_3d_fmap or (not self.channel_last and like_dims > 2)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codes (codebook space, heads concatenated) of ``indices`` as ``forward`` returns them; feature
        dim first for channel-first layouts (as VectorQuantize); 0 for an index of -1."""
        codes = self._codes_last(indices)
        if self._channel_first_output(codes.dim()):
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """``forward``'s quantised output for ``indices`` (project_out applied, ``x``'s layout)."""
        out = self.project_out(self._codes_last(indices))
        if self._channel_first_output(out.dim()):
            out = out.movedim(-1, 1)
        return out

    @torch.no_grad()
    def update_indices(self, x: Tensor, indices: Tensor, mask: Optional[Tensor] = None) -> None:
        """VectorQuantize's ``update_indices``: the codebook update of a training step with the given
        ``indices`` (as ``forward`` returned them; -1 and masked positions are left out)."""
        if self.decay is None:
            raise ValueError("VectorQuantizer.update_indices: needs EMA statistics (a float decay)")
        self._check_input(x)
        mask = self._mask(x, mask, None)
        x, dim = self._input_layout(x, mask)
        x_c = self._normalize(self._to_codebook_space(x), dim)
        indices = indices.to(x.device).long()
        for c in range(self.num_codebooks):
            part = x_c if self.num_codebooks == 1 else x_c[..., c, :]
            idx = indices if self.num_codebooks == 1 else indices[..., c]
            keep = idx >= 0
            if mask is not None:
                keep = keep & (mask if idx.dim() == 2 else mask[..., None])
            if dim != -1:  # channel-first: gather the kept rows
                part = part.movedim(dim, -1)
            self._ema_step(c, part[keep], idx[keep], -1, self.ema_update)

    update_ema_indices = update_indices

    # ------------------------------------------------------------------------------------------------
    # Loading vector-quantize-pytorch state_dicts.

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for theirs, ours in _VQP_KEYS.items():
            key = prefix + theirs
            if key in state_dict:
                value = state_dict.pop(key)
                if ours == "initted":
                    value = value.reshape(())
                elif self.num_codebooks == 1 and value.dim() > 0 and value.shape[0] == 1:
                    value = value[0]  # VectorQuantize keeps a leading codebook dim of 1
                state_dict[prefix + ours] = value
        state_dict.pop(prefix + "zero", None)  # VectorQuantize's constant buffer (persistent in old versions)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._initted = bool(self.initted)

    def usage(self) -> dict[str, Tensor]:
        """Code usage in the last training batch (all ranks' rows when syncing): the fraction of codes
        picked at least once and the perplexity of the picks (averaged over separate codebooks). (The EMA
        counts are not used: a dead-code reset sets them back to the threshold.)"""
        counts = self._per_codebook(self.batch_counts)
        ppl = torch.stack([perplexity(counts[c]) for c in range(counts.shape[0])]).mean()
        return {"used_fraction": (counts > 0).float().mean(), "perplexity": ppl}


def to_vector_quantize_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with every VectorQuantizer's codebook under vector-quantize-pytorch's names
    and shapes (``_codebook.embed`` (1, K, D), ...), for loading into their ``VectorQuantize`` /
    ``ResidualVQ`` / ``GroupedResidualVQ``. Our own ``load_state_dict`` reads both layouts."""
    state = module.state_dict()
    for name, sub in module.named_modules():
        if not isinstance(sub, VectorQuantizer):
            continue
        prefix = f"{name}." if name else ""
        for theirs, ours in _VQP_KEYS.items():
            key = prefix + ours
            if key in state:
                value = state.pop(key)
                if ours != "initted" and sub.num_codebooks == 1:
                    value = value.unsqueeze(0)
                state[prefix + theirs] = value
    return state


__all__ = ["LossBreakdown", "VectorQuantizer", "to_vector_quantize_state_dict"]
