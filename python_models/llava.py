"""LLaVA-style vision-language model: Liu et al., "Visual Instruction Tuning" (NeurIPS 2023) and
"Improved Baselines with Visual Instruction Tuning" (LLaVA 1.5, CVPR 2024).

* Visual features ``Z_v = g(X_v)``: a frozen vision encoder from ``python_models`` (a ViT, or a Swin on the
  fused window attention) gives one feature per patch (the ViT's CLS token is dropped: LLaVA uses the
  grid features; this model takes the encoder's last layer rather than the penultimate one).
* Projector, LLaVA eq. (1): ``H_v = W Z_v`` (linear, LLaVA) or ``H_v = W_2 GELU(W_1 Z_v)`` (the two-layer
  MLP of LLaVA 1.5, ``projector="mlp2x_gelu"``), into the decoder's token-embedding space.
* Sequence: the image tokens ``H_v`` are placed before the text embeddings (``<image>\\n`` first, as in
  LLaVA's single-image prompts), and a causal decoder (pre-norm Transformer, learned positions, here a
  small one in plain ``torch.nn``) predicts the next token.
* Loss, LLaVA eq. (3): ``p(X_a | X_v, X_instruct) = prod_i p(x_i | X_v, X_instruct, X_a,<i)``: cross entropy
  on the answer tokens only; image positions, prompt (instruction) tokens and padding carry label
  ``IGNORE_INDEX`` (-100) and do not count (:func:`answer_labels`).
* Two training stages (section 4.2): ``set_stage(1)`` "pre-training for feature alignment" trains only the
  projector; ``set_stage(2)`` "fine-tuning end-to-end" trains the projector and the decoder. The vision
  encoder stays frozen in both.
* :meth:`LLaVA.generate`: greedy decoding after the image and the prompt.
* :meth:`LLaVA.text_loss`: next-token loss on text alone, at the positions text takes after the image, to
  pre-train the decoder as a small language model before the two stages (LLaVA starts from a pre-trained
  LLM, Vicuna). :meth:`LLaVA.vision_features` gives the encoder's grid features, e.g. to pre-train it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_float_field, check_images, check_int_tuple_field, describe, resolve_config
from .trocr import LineViT, check_token_ids
from .vit import ViTConfig

IGNORE_INDEX = -100
PAD, BOS, EOS = 0, 1, 2


@dataclass
class LLaVAConfig:
    vocab_size: int
    vision: str = "vit"  # or "swin"
    img_size: int = 32
    in_chans: int = 3
    patch_size: int = 8
    vision_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    swin_depths: tuple = (2, 2)
    window_size: int = 4
    projector: str = "mlp2x_gelu"  # or "linear"
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 64  # image tokens + text tokens
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "img_size", "in_chans", "patch_size", "vision_dim", "vision_depth",
                     "vision_heads", "window_size", "dim", "depth", "heads", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLaVAConfig: {name} must be a positive int, got {value!r}")
        if self.vocab_size <= EOS:
            raise ValueError(f"LLaVAConfig: vocab_size must exceed the 3 special tokens, got {self.vocab_size}")
        if self.vision not in ("vit", "swin"):
            raise ValueError(f"LLaVAConfig: vision must be 'vit' or 'swin', got {self.vision!r}")
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"LLaVAConfig: projector must be 'linear' or 'mlp2x_gelu', got {self.projector!r}")
        if self.dim % self.heads:
            raise ValueError(f"LLaVAConfig: dim {self.dim} must be divisible by heads {self.heads}")
        self.swin_depths = check_int_tuple_field("LLaVAConfig", "swin_depths", self.swin_depths)
        check_float_field("LLaVAConfig", "mlp_ratio", self.mlp_ratio, low_open=True)
        check_float_field("LLaVAConfig", "dropout", self.dropout, high=1.0)


def _vision_encoder(c: LLaVAConfig) -> tuple[nn.Module, int]:
    if c.vision == "vit":
        vit = ViTConfig(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.vision_dim,
                        depth=c.vision_depth, num_heads=c.vision_heads, num_classes=0, dynamic_img_size=False)
        grid = c.img_size // c.patch_size
        return LineViT(vit, (grid, grid)), c.vision_dim
    from .swin import SwinConfig, SwinTransformer
    n = len(c.swin_depths)
    swin = SwinConfig(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.vision_dim,
                      depths=c.swin_depths, num_heads=tuple(c.vision_heads * 2 ** i for i in range(n)),
                      window_size=c.window_size, num_classes=0, drop_path_rate=0.0)
    return SwinTransformer(swin), c.vision_dim * 2 ** (n - 1)


def answer_labels(input_ids: Tensor, prompt_lengths) -> Tensor:
    """Labels for :meth:`LLaVA.loss`: ``input_ids`` with the first ``prompt_lengths[i]`` tokens of row i and
    every PAD set to ``IGNORE_INDEX`` (LLaVA's loss on the answer only)."""
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).view(-1, 1)
    if lengths.shape[0] != input_ids.shape[0]:
        raise ValueError(f"answer_labels: prompt_lengths has {lengths.shape[0]} entries for input_ids of "
                         f"{describe(input_ids)}")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return input_ids.masked_fill((positions < lengths) | (input_ids == PAD), IGNORE_INDEX)


class LLaVA(nn.Module):
    """Vision encoder + projector + causal decoder. ``forward(images, input_ids)``: (B, C, H, W) and (B, T)
    -> (B, n_image + T, vocab) logits over the whole sequence (image tokens first)."""

    Config = LLaVAConfig

    def __init__(self, config: Optional[LLaVAConfig] = None, **kwargs):
        super().__init__()
        config = resolve_config(type(self).__name__, LLaVAConfig, config, kwargs)
        self.config = c = config
        self.vision_tower, vision_out = _vision_encoder(c)
        if c.projector == "linear":
            self.projector = nn.Linear(vision_out, c.dim)
        else:
            self.projector = nn.Sequential(nn.Linear(vision_out, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim, padding_idx=PAD)
        self.embed_positions = nn.Parameter(torch.randn(1, c.max_len, c.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, int(c.dim * c.mlp_ratio), c.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, c.depth, norm=nn.LayerNorm(c.dim), enable_nested_tensor=False)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.stage = 0
        self.set_stage(2)

    # -- training stages

    def set_stage(self, stage: int) -> "LLaVA":
        """1: only the projector trains; 2: projector and decoder (embeddings, blocks, head). The vision
        encoder is frozen in both (and kept in eval mode)."""
        if stage not in (1, 2):
            raise ValueError(f"LLaVA.set_stage: stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        for p in self.vision_tower.parameters():
            p.requires_grad_(False)
        for p in self.projector.parameters():
            p.requires_grad_(True)
        for module in (self.embed_tokens, self.decoder, self.lm_head):
            for p in module.parameters():
                p.requires_grad_(stage == 2)
        self.embed_positions.requires_grad_(stage == 2)
        return self

    def train(self, mode: bool = True) -> "LLaVA":
        super().train(mode)
        self.vision_tower.eval()  # frozen: no dropout / drop path
        return self

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- forward

    @property
    def num_image_tokens(self) -> int:
        c = self.config
        if c.vision == "vit":
            return (c.img_size // c.patch_size) ** 2
        g = c.img_size // c.patch_size
        for _ in range(len(c.swin_depths) - 1):
            g = (g + 1) // 2
        return g * g

    def vision_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, n_image, vision width): the encoder's grid features in row-major order (no
        CLS), before the projector. Under no_grad while the encoder is frozen."""
        c = self.config
        check_images("LLaVA", "images", images, c.in_chans, size=(c.img_size, c.img_size))
        with torch.no_grad() if not any(p.requires_grad for p in self.vision_tower.parameters()) else nullcontext():
            feats = self.vision_tower.forward_features(images)
        return feats[:, 1:] if c.vision == "vit" else feats.reshape(feats.shape[0], -1, feats.shape[-1])

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, n_image, dim): projected patch features (no CLS)."""
        return self.projector(self.vision_features(images))

    def _decode(self, embeds: Tensor, offset: int = 0) -> Tensor:
        """Logits of ``embeds`` placed at positions ``offset, offset + 1, ...`` (causal)."""
        n = embeds.shape[1]
        if offset + n > self.config.max_len:
            raise ValueError(f"LLaVA: {offset + n} image + text positions exceed max_len {self.config.max_len}")
        x = embeds + self.embed_positions[:, offset:offset + n]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        return self.lm_head(self.decoder(x, mask=causal, is_causal=True))

    def forward(self, images: Tensor, input_ids: Tensor) -> Tensor:
        image = self.image_embeddings(images)
        input_ids = check_token_ids("LLaVA", "input_ids", input_ids, self.config.vocab_size, batch=images.shape[0])
        if image.shape[1] + input_ids.shape[1] > self.config.max_len:
            raise ValueError(f"LLaVA: input_ids has {input_ids.shape[1]} tokens: with the {image.shape[1]} image "
                             f"tokens they exceed max_len {self.config.max_len}, got {describe(input_ids)}")
        return self._decode(torch.cat([image, self.embed_tokens(input_ids)], dim=1))

    def loss(self, images: Tensor, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Mean cross entropy of the labelled text tokens: label[t] (``IGNORE_INDEX`` to skip) is predicted
        from the image and input_ids[:t]. Use :func:`answer_labels` to mask the prompt."""
        self._check_labels(input_ids, labels)
        logits = self(images, input_ids)
        n_img = logits.shape[1] - input_ids.shape[1]
        text_logits = logits[:, n_img - 1:-1]  # position n_img - 1 + t predicts text token t
        return F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), labels.reshape(-1).long(),
                               ignore_index=IGNORE_INDEX)

    def text_loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Language-model loss without an image: mean cross entropy of label[t] (t >= 1; ``IGNORE_INDEX`` to
        skip) predicted from input_ids[:t], the text placed at the positions it takes after the image
        tokens (the image positions are left out, not filled). For pre-training the decoder on text; the
        projector and the vision encoder take no part."""
        input_ids = check_token_ids("LLaVA", "input_ids", input_ids, self.config.vocab_size)
        self._check_labels(input_ids, labels, first_predicted=1)
        logits = self._decode(self.embed_tokens(input_ids), offset=self.num_image_tokens)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).long(),
                               ignore_index=IGNORE_INDEX)

    def _check_labels(self, input_ids: Tensor, labels: Tensor, first_predicted: int = 0) -> None:
        if not isinstance(labels, Tensor) or labels.shape != getattr(input_ids, "shape", None):
            got = describe(labels) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"LLaVA: labels must have input_ids' shape "
                             f"{tuple(getattr(input_ids, 'shape', ()))}, got {got}")
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.config.vocab_size))
        if bool(bad.any()):
            raise ValueError(f"LLaVA: labels must lie in [0, {self.config.vocab_size}) or be {IGNORE_INDEX}, "
                             f"got {describe(labels)}")
        if bool((labels[:, first_predicted:] == IGNORE_INDEX).all()):
            where = "" if first_predicted == 0 else f" after position {first_predicted - 1}"
            raise ValueError(f"LLaVA: labels has no answer token{where} (all {IGNORE_INDEX}), {describe(labels)}")

    @torch.no_grad()
    def generate(self, images: Tensor, prompt_ids: Tensor, max_new_tokens: int = 16) -> Tensor:
        """Greedy decoding after the image and the prompt (rows of equal length, no padding). Returns the
        (B, <= max_new_tokens) new tokens, PAD after each row's EOS."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"LLaVA.generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        image = self.image_embeddings(images)
        ids = check_token_ids("LLaVA", "prompt_ids", prompt_ids, self.config.vocab_size, batch=images.shape[0])
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = []
        for _ in range(max_new_tokens):
            if image.shape[1] + ids.shape[1] >= self.config.max_len:
                break
            logits = self._decode(torch.cat([image, self.embed_tokens(ids)], dim=1))[:, -1]
            nxt = torch.where(done, PAD, logits.argmax(-1))
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return torch.stack(new, 1) if new else ids.new_zeros(ids.shape[0], 0)


__all__ = ["IGNORE_INDEX", "LLaVA", "LLaVAConfig", "answer_labels"]
