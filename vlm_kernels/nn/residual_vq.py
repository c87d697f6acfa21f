"""``ResidualVQ`` and ``GroupedResidualVQ``: vector-quantize-pytorch's residual quantisers on the fused ops.

Residual VQ (Zeghidour et al. 2021, SoundStream, algorithm 1): quantiser i quantises what the
quantisers before it left, ``r_{i+1} = r_i - q_i``; the output is the sum of the q_i. Every stage is a
:class:`~vlm_kernels.nn.VectorQuantizer` (exact nearest code without an N x K matrix, one-pass EMA
statistics, the rotation trick's backward re-gathering its codes), so a training step keeps O(N D) per
stage and never an N x K tensor. Arguments, outputs and state_dicts are vector-quantize-pytorch's.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops._common import describe
from .vq import VectorQuantizer, _bool, _int, _nonnegative, _positive_int, _real, reject_unsupported

# ResidualVQ arguments not implemented here: name -> (the default, which is accepted, and why not).
_UNSUPPORTED = {
    "diveq": (False, "DiVeQ is not implemented"),
    "implicit_neural_codebook": (False, "implicit neural codebooks (QINCo) are not implemented"),
    "mlp_kwargs": ({}, "implicit neural codebooks (QINCo) are not implemented"),
    "beam_size": (None, "beam search needs the top-k codes of every vector"),
    "eval_beam_size": (None, "beam search needs the top-k codes of every vector"),
    "beam_score_quantizer_weights": (None, "beam search needs the top-k codes of every vector"),
}


def _maybe_sync_seed(device: torch.device, max_size: int = 10_000) -> int:
    """A seed drawn from torch's generator (the same on every rank), as vector-quantize-pytorch draws it."""
    import torch.distributed as dist

    seed = torch.randint(0, max_size, (), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(seed)
    return int(seed.item())


class ResidualVQ(nn.Module):
    """Residual vector quantisation (vector-quantize-pytorch's ``ResidualVQ``).

    Args:
        dim: input feature size.
        num_quantizers: number of stages (default: ``len(codebook_size)`` for a tuple).
        codebook_size: codes per stage, an int or a tuple of one per stage.
        codebook_dim: stage vector size; ``project_in`` / ``project_out`` (Linear) when it is not ``dim``.
        shared_codebook: one codebook for every stage; its statistics are updated by every stage and its
            codes moved (and dead codes replaced, from all stages' residuals) once per forward.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: in training, stop
            after a random stage in [cutoff, num_quantizers) (rounded up to a multiple), the rest get
            index -1 and loss 0 (SoundStream's quantiser dropout).
        accept_image_fmap: channel-first (B, dim, H, W) input (indices (B, H, W, num_quantizers)).
        quant_grad_frac: fraction of a stage's output gradient passed to the earlier stages through the
            residual (0: the residual stops it).
        return_zeros_for_masked_padding: masked output positions are 0 (else the input).
        heads: must be 1 (as vector-quantize-pytorch).
        **vq_kwargs: every stage's :class:`~vlm_kernels.nn.VectorQuantizer` arguments (decay,
            commitment_weight, kmeans_init, threshold_ema_dead_code, use_cosine_sim, rotation_trick,
            stochastic_sample_codes, sample_codebook_temp, orthogonal_reg_weight, ...).

    Not implemented (an error names them unless left at their default): diveq,
    implicit_neural_codebook, mlp_kwargs, beam_size, eval_beam_size, beam_score_quantizer_weights, and
    the ``indices`` argument of ``forward`` (the cross-entropy loss to given codes).

    ``forward(x, mask=None, return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False,
    rand_quantize_dropout_fixed_seed=None)`` returns ``(quantized, indices, losses)`` (plus ``all_codes``
    (num_quantizers, ..., codebook_dim) with ``return_all_codes``): ``quantized`` like ``x``, ``indices``
    (..., num_quantizers) int64, ``losses`` (num_quantizers,) float32, each stage's loss.
    """

    def __init__(self, *, dim: int, num_quantizers: Optional[int] = None,
                 codebook_size: Union[int, Sequence[int]], codebook_dim: Optional[int] = None,
                 shared_codebook: bool = False, heads: int = 1, quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
                 accept_image_fmap: bool = False, quant_grad_frac: float = 0.0,
                 return_zeros_for_masked_padding: bool = True, **vq_kwargs):
        super().__init__()
        owner = "ResidualVQ"
        reject_unsupported(owner, _UNSUPPORTED, {k: vq_kwargs.pop(k) for k in list(vq_kwargs) if k in _UNSUPPORTED})
        dim = _positive_int(owner, "dim", dim)
        shared_codebook = _bool(owner, "shared_codebook", shared_codebook)
        quantize_dropout = _bool(owner, "quantize_dropout", quantize_dropout)
        accept_image_fmap = _bool(owner, "accept_image_fmap", accept_image_fmap)
        return_zeros_for_masked_padding = _bool(owner, "return_zeros_for_masked_padding",
                                                return_zeros_for_masked_padding)
        quantize_dropout_cutoff_index = _int(owner, "quantize_dropout_cutoff_index", quantize_dropout_cutoff_index)
        quant_grad_frac = _real(owner, "quant_grad_frac", quant_grad_frac)
        if _int(owner, "heads", heads) != 1:
            raise ValueError(f"{owner}: heads must be 1 (residual VQ has no multi-headed codes), got {heads!r}")
        if num_quantizers is not None:
            num_quantizers = _positive_int(owner, "num_quantizers", num_quantizers)
        if isinstance(codebook_size, (tuple, list)):
            sizes = tuple(_positive_int(owner, "codebook_size", s) for s in codebook_size)
            if num_quantizers is not None and num_quantizers != len(sizes):
                raise ValueError(f"{owner}: num_quantizers={num_quantizers!r} but codebook_size has {len(sizes)} "
                                 "entries")
        else:
            if num_quantizers is None:
                raise ValueError(f"{owner}: num_quantizers is needed when codebook_size is an int")
            sizes = (_positive_int(owner, "codebook_size", codebook_size),) * _positive_int(
                owner, "num_quantizers", num_quantizers)
        if not sizes:
            raise ValueError(f"{owner}: at least one quantizer is needed")
        codebook_dim = dim if codebook_dim is None else _positive_int(owner, "codebook_dim", codebook_dim)
        if quantize_dropout_cutoff_index < 0 or quantize_dropout_cutoff_index >= len(sizes) and quantize_dropout:
            raise ValueError(f"{owner}: quantize_dropout_cutoff_index must lie in [0, {len(sizes)}), got "
                             f"{quantize_dropout_cutoff_index!r}")
        quantize_dropout_multiple_of = _positive_int(owner, "quantize_dropout_multiple_of",
                                                     quantize_dropout_multiple_of)
        if not 0.0 <= float(quant_grad_frac) <= 1.0:
            raise ValueError(f"{owner}: quant_grad_frac must lie in [0, 1], got {quant_grad_frac!r}")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"{owner}: shared_codebook needs one codebook_size for every quantizer, got {sizes}")

        self.dim, self.codebook_dim, self.num_quantizers, self.codebook_sizes = dim, codebook_dim, len(sizes), sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = bool(accept_image_fmap)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.layers = nn.ModuleList(
            VectorQuantizer(codebook_dim, size, codebook_dim=codebook_dim, accept_image_fmap=accept_image_fmap,
                            return_zeros_for_masked_padding=return_zeros_for_masked_padding, **vq_kwargs)
            for size in sizes)
        self.quantize_dropout = bool(quantize_dropout) and self.num_quantizers > 1
        self.quantize_dropout_cutoff_index = int(quantize_dropout_cutoff_index)
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.quant_grad_frac = float(quant_grad_frac)
        self.shared_codebook = bool(shared_codebook)
        if self.shared_codebook:
            self._share_first_codebook()

    def _share_first_codebook(self) -> None:
        """Every stage reads and updates the first stage's codebook tensors (state_dicts keep one copy of
        them per stage, as vector-quantize-pytorch's)."""
        first = self.layers[0]
        for layer in self.layers:
            layer._manual_ema = True
        for layer in self.layers[1:]:
            for name in ("embed", "cluster_size", "embed_avg", "initted", "batch_counts"):
                if not hasattr(first, name):
                    continue
                value = getattr(first, name)
                if isinstance(value, nn.Parameter):
                    setattr(layer, name, value)
                else:
                    layer.register_buffer(name, value, persistent=name != "batch_counts")

    @property
    def codebook_size(self) -> int:
        return self.codebook_sizes[0]

    @property
    def codebooks(self):
        """(num_quantizers, K, codebook_dim) (a tuple of (K_i, codebook_dim) for different sizes)."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    # ------------------------------------------------------------------------------------------------

    def _dropout_stop(self, seed: Optional[int], device: torch.device) -> int:
        """The last stage that runs under quantiser dropout (vector-quantize-pytorch's draw)."""
        if seed is None:
            seed = _maybe_sync_seed(device)
        stop = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        m = self.quantize_dropout_multiple_of
        if m != 1:
            stop = math.ceil((stop + 1) / m) * m - 1
        return stop

    def _vector_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def _project(self, layer: nn.Module, x: Tensor) -> Tensor:
        if not self.has_projections:
            return x
        if self.accept_image_fmap:
            return layer(x.movedim(1, -1)).movedim(-1, 1)
        return layer(x)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, indices=None, return_all_codes: bool = False,
                sample_codebook_temp: Optional[float] = None, freeze_codebook: bool = False,
                beam_size: Optional[int] = None, rand_quantize_dropout_fixed_seed: Optional[int] = None):
        owner = "ResidualVQ.forward"
        if indices is not None:
            raise ValueError("ResidualVQ.forward: argument indices (the cross-entropy loss to given codes) is not "
                             "supported")
        if beam_size is not None and _int(owner, "beam_size", beam_size) > 1:
            raise ValueError(f"ResidualVQ.forward: argument beam_size={beam_size!r} is not supported (beam search)")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"ResidualVQ: x must be a floating-point tensor, got {got}")
        return_all_codes = _bool(owner, "return_all_codes", return_all_codes)
        freeze_codebook = _bool(owner, "freeze_codebook", freeze_codebook)
        if sample_codebook_temp is not None:
            sample_codebook_temp = _nonnegative(owner, "sample_codebook_temp", sample_codebook_temp)
        if rand_quantize_dropout_fixed_seed is not None:
            rand_quantize_dropout_fixed_seed = _int(owner, "rand_quantize_dropout_fixed_seed",
                                                    rand_quantize_dropout_fixed_seed)
        vdim = self._vector_dim()
        if x.dim() < (4 if self.accept_image_fmap else 1) or x.shape[vdim] != self.dim:
            where = "(B, dim, H, W) with dim" if self.accept_image_fmap else "the last dim"
            raise ValueError(f"ResidualVQ: x must have size {self.dim} along {where}, got {describe(x)}")
        stop = self.num_quantizers - 1
        if self.training and self.quantize_dropout:
            stop = self._dropout_stop(rand_quantize_dropout_fixed_seed, x.device)
        expire_shared = self.training and self.shared_codebook and not freeze_codebook

        residual = self._project(self.project_in, x)
        quantized_out = None
        stage_indices, stage_losses, residuals = [], [], []
        for i, layer in enumerate(self.layers[:stop + 1]):
            if expire_shared:
                residuals.append(residual)
            quantized, idx, loss = layer(residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                                         freeze_codebook=freeze_codebook)
            frac = self.quant_grad_frac
            step = quantized.detach() if frac <= 0 else frac * quantized + (1.0 - frac) * quantized.detach()
            if i < stop:  # the last residual is not needed
                residual = residual - step
            # One buffer of our own from the second stage on, then summed into in place (no stage keeps
            # its output for the backward).
            if quantized_out is None:
                quantized_out = quantized
            else:
                quantized_out = quantized_out + quantized if i == 1 else quantized_out.add_(quantized)
            stage_indices.append(idx)
            stage_losses.append(loss)
        for _ in range(stop + 1, self.num_quantizers):  # dropped stages
            stage_indices.append(torch.full_like(stage_indices[0], -1))
            stage_losses.append(torch.zeros_like(stage_losses[0]))

        if expire_shared:
            self._update_shared_codebook(residuals, mask)
        quantized_out = self._project(self.project_out, quantized_out)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else x
            quantized_out = torch.where(mask.to(x.device)[..., None], quantized_out, fill)
        all_indices = torch.stack(stage_indices, dim=-1)
        all_losses = torch.stack(stage_losses)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)

    @torch.no_grad()
    def _update_shared_codebook(self, residuals: list, mask: Optional[Tensor]) -> None:
        """Once per forward: codes from the statistics every stage updated, then dead codes from the
        vectors of all stages (vector-quantize-pytorch's manual EMA of a shared codebook)."""
        first = self.layers[0]
        if first.decay is None:
            return
        if first.ema_update:
            first._codes_from_statistics(0)
        dim = self._vector_dim()
        if mask is not None:
            residuals, dim = [r[mask.to(r.device)] for r in residuals], -1
        first._expire(0, [(r, dim) for r in residuals])

    # ------------------------------------------------------------------------------------------------

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Every stage's codes: ``indices`` (..., q) with q <= num_quantizers (fewer: the rest dropped, with
        quantize_dropout) -> (num_quantizers, ..., codebook_dim), 0 where an index is -1."""
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.dim() == 0:
            got = describe(indices) if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"ResidualVQ: indices must be an integer tensor (..., num_quantizers), got {got}")
        q = indices.shape[-1]
        if q > self.num_quantizers or (q < self.num_quantizers and not self.quantize_dropout):
            raise ValueError(f"ResidualVQ: indices must end in {self.num_quantizers} quantizers (fewer only with "
                             f"quantize_dropout), got {describe(indices)}")
        codes = [layer._codes_last(indices[..., i]) if i < q else None for i, layer in enumerate(self.layers)]
        zero = torch.zeros_like(codes[0])
        return torch.stack([zero if c is None else c for c in codes])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """``forward``'s quantised output for ``indices`` (in ``x``'s layout)."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(0))
        return out.movedim(-1, 1) if self.accept_image_fmap else out


class GroupedResidualVQ(nn.Module):
    """Residual VQ on ``groups`` slices of the feature dim (Yang et al. 2023, HiFi-Codec; vector-quantize-
    pytorch's ``GroupedResidualVQ``): a :class:`ResidualVQ` of ``dim // groups`` per group, every
    ``ResidualVQ`` argument passed on.

    ``forward(x, ...)`` returns ``(quantized, indices, losses)``: ``indices`` (groups, ..., num_quantizers),
    ``losses`` (groups, num_quantizers); with ``return_all_codes`` also a tuple of one (num_quantizers, ...,
    codebook_dim) tensor per group (as vector-quantize-pytorch).
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        dim = _positive_int("GroupedResidualVQ", "dim", dim)
        groups = _positive_int("GroupedResidualVQ", "groups", groups)
        accept_image_fmap = _bool("GroupedResidualVQ", "accept_image_fmap", accept_image_fmap)
        if dim % groups:
            raise ValueError(f"GroupedResidualVQ: dim={dim} must be a multiple of groups={groups}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, bool(accept_image_fmap)
        self.rvqs = nn.ModuleList(ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
                                  for _ in range(groups))

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> Tensor:
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    def forward(self, x: Tensor, indices=None, return_all_codes: bool = False,
                sample_codebook_temp: Optional[float] = None, freeze_codebook: bool = False,
                mask: Optional[Tensor] = None):
        if indices is not None:
            raise ValueError("GroupedResidualVQ.forward: argument indices (the cross-entropy loss to given codes) "
                             "is not supported")
        owner = "GroupedResidualVQ.forward"
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"GroupedResidualVQ: x must be a floating-point tensor, got {got}")
        return_all_codes = _bool(owner, "return_all_codes", return_all_codes)
        freeze_codebook = _bool(owner, "freeze_codebook", freeze_codebook)
        if sample_codebook_temp is not None:
            sample_codebook_temp = _nonnegative(owner, "sample_codebook_temp", sample_codebook_temp)
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
            got = describe(mask) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"GroupedResidualVQ: mask must be a bool tensor, got {got}")
        if x.dim() == 0 or x.shape[self.split_dim] != self.dim:
            got = describe(x) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GroupedResidualVQ: x must have size {self.dim} along dim {self.split_dim}, got {got}")
        # One dropout draw for all groups (drawn in training whether or not dropout is on, as theirs).
        seed = _maybe_sync_seed(x.device) if self.training else None
        outs = [rvq(chunk, mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                    freeze_codebook=freeze_codebook, rand_quantize_dropout_fixed_seed=seed)
                for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized, all_indices, losses, *codes = zip(*outs)
        ret = (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(losses))
        return ret + (tuple(codes[0]),) if codes else ret


__all__ = ["GroupedResidualVQ", "ResidualVQ"]
