"""``VectorQuantizer``: a drop-in for vector-quantize-pytorch's ``VectorQuantize`` on the fused VQ ops.

Switching is a change of import for the arguments both share (``dim``, ``codebook_size``, ``decay``,
``commitment_weight``, ``eps``, ``use_cosine_sim``, ``threshold_ema_dead_code``, ``kmeans_init``,
``kmeans_iters``, ``accept_image_fmap``, ``sync_codebook``) and the return value
``(quantized, indices, loss)``. A ``VectorQuantize`` state_dict (single head) loads unchanged.

Differences, on purpose:

* ``decay=None`` (the default here) is a learned codebook trained by the VQ-VAE codebook loss
  ``|sg(x) - e|^2`` next to the commitment loss (van den Oord et al. 2017, eq. 3); a float is an EMA
  codebook (appendix A.1), as in ``VectorQuantize``.
* the loss is also computed in eval mode (``VectorQuantize`` returns 0 there).
* the nearest code is exact (float64 answer) and found without an N x K distance matrix; the EMA
  statistics come from a one-pass segmented sum, not a one-hot matrix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._common import describe
from ..ops.vq import vq_code_stats, vq_ema_update_, vq_nearest, vq_quantize
from ..reference.vq import as_rows

# vector-quantize-pytorch's state_dict names (single head: a leading dim of 1) -> ours.
_VQP_KEYS = {"_codebook.embed": "embed", "_codebook.cluster_size": "cluster_size",
             "_codebook.embed_avg": "embed_avg", "_codebook.initted": "initted"}


def _distributed_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class VectorQuantizer(nn.Module):
    """Vector quantisation with a straight-through estimator (VQ-VAE).

    Args:
        dim: vector size D.
        codebook_size: number of codes K.
        decay: ``None`` for a codebook learned by gradient (codebook loss), or the EMA decay in [0, 1).
        commitment_weight: beta, the weight of the commitment loss ``|x - sg(e)|^2``.
        eps: Laplace smoothing of the EMA counts.
        use_cosine_sim: l2-normalise inputs and codes and pick the code of highest cosine similarity.
        threshold_ema_dead_code: EMA codes whose running count falls below this are re-initialised from
            batch vectors (0: never).
        kmeans_init: initialise the codebook by k-means on the first training batch (using the fused
            nearest-code kernel); the first training call then runs eagerly-shaped code once.
        kmeans_iters: k-means iterations.
        accept_image_fmap: inputs are channel-first feature maps (B, D, H, W); no transposed copy is made.
        sync_codebook: all-reduce the EMA statistics, the k-means statistics and the dead-code samples
            across ``torch.distributed`` ranks. ``None``: when a process group of more than one rank is
            initialised.

    ``forward(x)`` takes (..., D) (or (B, D, H, W) with ``accept_image_fmap``) and returns
    ``(quantized, indices, loss)``: ``quantized`` like ``x``, ``indices`` int64 of ``x``'s shape without
    the vector dim, ``loss`` a 0-dim float32 tensor.
    """

    def __init__(self, dim: int, codebook_size: int, *, decay: Optional[float] = None, commitment_weight: float = 0.25,
                 eps: float = 1e-5, use_cosine_sim: bool = False, threshold_ema_dead_code: float = 0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, accept_image_fmap: bool = False,
                 sync_codebook: Optional[bool] = None):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"VectorQuantizer: {name} must be a positive int, got {value!r}")
        if decay is not None and not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be None (learned codebook) or in [0, 1), got {decay!r}")
        if not commitment_weight >= 0 or not eps > 0 or not threshold_ema_dead_code >= 0:
            raise ValueError("VectorQuantizer: commitment_weight and threshold_ema_dead_code must be >= 0 and eps > 0, "
                             f"got {commitment_weight}, {threshold_ema_dead_code}, {eps}")
        if threshold_ema_dead_code > 0 and decay is None:
            raise ValueError("VectorQuantizer: threshold_ema_dead_code needs an EMA codebook (a float decay)")
        self.dim, self.codebook_size = dim, codebook_size
        self.decay = None if decay is None else float(decay)
        self.commitment_weight, self.eps = float(commitment_weight), float(eps)
        self.use_cosine_sim = bool(use_cosine_sim)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), int(kmeans_iters)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.sync_codebook = sync_codebook

        embed = torch.zeros(codebook_size, dim)
        if not kmeans_init:
            nn.init.kaiming_uniform_(embed)  # vector-quantize-pytorch's uniform_init
            if use_cosine_sim:
                embed = F.normalize(embed, dim=1)
        if self.decay is None:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # Codes picked in the last training batch (summed over ranks when syncing): what `usage` reports.
        # Not the EMA counts, which a dead-code reset sets back to the threshold.
        self.register_buffer("batch_counts", torch.zeros(codebook_size), persistent=False)
        self._initted = not kmeans_init  # a Python mirror: no host sync (or guard on a tensor) per call

    @property
    def codebook(self) -> Tensor:
        """The (K, D) codebook the lookup uses (normalised for cosine similarity)."""
        return F.normalize(self.embed, dim=1) if self.use_cosine_sim and self.decay is None else self.embed

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}, "
                f"commitment_weight={self.commitment_weight}, use_cosine_sim={self.use_cosine_sim}, "
                f"threshold_ema_dead_code={self.threshold_ema_dead_code}, accept_image_fmap={self.accept_image_fmap}")

    # ------------------------------------------------------------------------------------------------

    def _vector_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"VectorQuantizer: x must be a floating-point tensor, got {got}")
        if self.accept_image_fmap and x.dim() != 4:
            raise ValueError(f"VectorQuantizer: accept_image_fmap expects x of shape (B, {self.dim}, H, W), "
                             f"got {describe(x)}")
        if x.dim() == 0 or x.shape[self._vector_dim()] != self.dim:
            where = "dim 1" if self.accept_image_fmap else "the last dim"
            raise ValueError(f"VectorQuantizer: x must have size {self.dim} along {where}, got {describe(x)}")

    def _sync(self) -> bool:
        if self.sync_codebook is None:
            return _distributed_world() > 1
        return bool(self.sync_codebook)

    @torch.no_grad()
    def init_codebook(self, x: Tensor) -> None:
        """k-means initialisation of the codebook from the batch ``x`` (all ranks' rows when syncing)."""
        sync = self._sync()
        dim = self._vector_dim()
        rows = as_rows(x.detach(), dim % x.dim()).to(self.embed.dtype)
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=1)
        n, k = rows.shape[0], self.codebook_size
        pick = torch.randperm(n, device=rows.device)[:k] if n >= k else torch.randint(0, n, (k,), device=rows.device)
        centroids = rows[pick].contiguous()
        if sync:
            from ..ops.vq import _broadcast_

            centroids = _broadcast_(centroids, None)
        metric = "cosine" if self.use_cosine_sim else "l2"
        counts = torch.zeros(k, dtype=rows.dtype, device=rows.device)
        for _ in range(max(self.kmeans_iters, 1)):
            indices, _ = vq_nearest(rows, centroids, metric=metric)
            counts, sums = vq_code_stats(rows, indices, k, validate=False)
            if sync:
                from ..ops.vq import _all_reduce_

                packed = _all_reduce_(torch.cat([counts[:, None], sums], dim=1), None)
                counts, sums = packed[:, 0], packed[:, 1:]
            means = sums / counts.clamp_min(1)[:, None]
            if self.use_cosine_sim:
                means = F.normalize(means, dim=1)
            centroids = torch.where((counts > 0)[:, None], means, centroids)
        self.embed.data.copy_(centroids)
        if self.decay is not None:
            self.cluster_size.copy_(counts)
            self.embed_avg.copy_(centroids * counts[:, None])
        self.initted.fill_(True)
        self._initted = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check_input(x)
        dim = self._vector_dim()
        if self.training and not self._initted:
            self.init_codebook(x)
        x_in = F.normalize(x, dim=dim) if self.use_cosine_sim else x
        if self.decay is None:
            codebook = self.codebook.to(x.dtype)
            quantized, indices, loss = vq_quantize(x_in, codebook, beta=self.commitment_weight, dim=dim,
                                                   codebook_weight=1.0)
            if self.training:
                with torch.no_grad():
                    counts = torch.zeros_like(self.batch_counts).index_add_(
                        0, indices.reshape(-1), torch.ones_like(indices.reshape(-1), dtype=self.batch_counts.dtype))
                    if self._sync():
                        from ..ops.vq import _all_reduce_

                        counts = _all_reduce_(counts, None)
                    self.batch_counts.copy_(counts)
            return quantized, indices, loss
        # EMA codebook: no gradient; the lookup uses this step's codebook (a copy, since the update
        # below changes the buffer in place and the backward needs the codes that were picked).
        codebook = self.embed.detach().to(x.dtype)
        if self.training:
            codebook = codebook.clone()
        quantized, indices, loss = vq_quantize(x_in, codebook, beta=self.commitment_weight, dim=dim,
                                               codebook_weight=0.0)
        if self.training:
            stats = vq_ema_update_(self.embed, self.cluster_size, self.embed_avg, x_in.detach(), indices,
                                   decay=self.decay, eps=self.eps, dim=dim, threshold_dead=self.threshold_ema_dead_code,
                                   sync=self._sync(), normalize=self.use_cosine_sim)
            self.batch_counts.copy_(stats["counts"])
        return quantized, indices, loss

    # ------------------------------------------------------------------------------------------------
    # Loading vector-quantize-pytorch state_dicts.

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for theirs, ours in _VQP_KEYS.items():
            key = prefix + theirs
            if key in state_dict:
                value = state_dict.pop(key)
                if value.dim() > 0 and value.shape[0] == 1 and ours != "initted":
                    value = value[0]  # VectorQuantize keeps a leading codebook (head) dim of 1
                state_dict[prefix + ours] = value.reshape(()) if ours == "initted" else value
        state_dict.pop(prefix + "zero", None)  # VectorQuantize's constant buffer
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._initted = bool(self.initted)

    def usage(self) -> dict[str, Tensor]:
        """Code usage in the last training batch (all ranks' rows when syncing): the fraction of codes
        picked at least once and the perplexity of the picks. (The EMA counts are not used: a dead-code
        reset sets them back to the threshold, which would count a reset code as used.)"""
        from ..ops.vq import perplexity

        return {"used_fraction": (self.batch_counts > 0).float().mean(), "perplexity": perplexity(self.batch_counts)}


__all__ = ["VectorQuantizer"]
