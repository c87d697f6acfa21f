"""TrOCR-style encoder-decoder: Li et al., "TrOCR: Transformer-based Optical Character Recognition with
Pre-trained Models" (AAAI 2023), section 2 (model architecture).

* Encoder: the text-line image is cut into patches and encoded by a ViT (``python_models.vit``, eq. (1)-(4)
  of Dosovitskiy et al.; a learned position embedding per patch of the H x W line, no interpolation) or by
  a Swin Transformer (``python_models.swin``, on the fused ``vlm_kernels`` window attention). All output
  tokens (the ViT's CLS included, as TrOCR keeps DeiT's [CLS]) are projected to the decoder width.
* Decoder: the original Transformer decoder (Vaswani et al. 2017, section 3.1): masked self-attention,
  cross-attention over the encoder tokens ("encoder-decoder attention"), position-wise FFN; pre-norm
  (``torch.nn.TransformerDecoderLayer(norm_first=True)``), learned position embeddings, linear output
  to the vocabulary. Trained with teacher forcing: ``p(y_t | y_<t, image)``, cross entropy on every
  target token after BOS (padding ignored).
* Decoding: greedy, and beam search (TrOCR section 2: "beam search ... to get the final output") on the
  sum of token log-probabilities with an optional length penalty ``((5 + L) / 6) ** alpha`` (Wu et al.
  2016; ``alpha = 0``: the raw log-likelihood).

The tokenizer is character level (:class:`CharTokenizer`): pad, bos, eos, then one id per character.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (check_float_field, check_images, check_int_tuple_field, describe,
                      resolve_config)
from .vit import ViT, ViTConfig

PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """Character-level tokenizer: ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; then ``chars`` in order."""

    specials = ("<pad>", "<bos>", "<eos>")
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"CharTokenizer: chars must be non-empty and without repeats, got {chars!r}")
        self.chars = chars
        self._ids = {c: i + len(self.specials) for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.chars)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(f"CharTokenizer.encode: characters {unknown!r} of {text!r} are not in the vocabulary")
        ids = [self._ids[c] for c in text]
        return [BOS] + ids + [EOS] if add_special else ids

    def batch_encode(self, texts: Sequence[str]) -> Tensor:
        """(B, 2 + max len) int64: BOS, characters, EOS, then PAD."""
        if len(texts) == 0:
            raise ValueError("CharTokenizer.batch_encode: texts is an empty batch")
        rows = [self.encode(t) for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out

    def decode(self, ids) -> str:
        """Characters up to the first EOS (BOS and PAD skipped)."""
        out = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == EOS:
                break
            if i >= len(self.specials):
                out.append(self.chars[i - len(self.specials)])
        return "".join(out)


def check_token_ids(model: str, name: str, tokens: object, vocab_size: int, batch: Optional[int] = None) -> Tensor:
    """``tokens`` must be a non-empty integer (B, T) tensor with values in [0, vocab_size) (and B == batch)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{model}: {name} must be an integer torch.Tensor of shape (B, T), got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{model}: {name} must be an integer tensor, got {describe(tokens)}")
    if tokens.dim() != 2:
        raise ValueError(f"{model}: {name} must have shape (B, T), got {describe(tokens)}")
    if tokens.numel() == 0:
        raise ValueError(f"{model}: {name} is empty, got {describe(tokens)}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"{model}: {name} must have batch size {batch} (the images'), got {describe(tokens)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{model}: {name} must lie in [0, {vocab_size}) (the vocabulary), got values in "
                         f"[{low}, {high}], {describe(tokens)}")
    return tokens.long()


@dataclass
class TrOCRConfig:
    vocab_size: int
    encoder: str = "vit"  # or "swin"
    img_height: int = 32
    img_width: int = 128
    in_chans: int = 1
    patch_size: int = 8
    enc_dim: int = 128
    enc_depth: int = 4  # ViT blocks
    enc_heads: int = 4
    swin_depths: tuple = (2, 2)  # Swin stages (enc_dim doubles per stage, heads too)
    window_size: int = 4
    dec_dim: int = 128
    dec_depth: int = 2
    dec_heads: int = 4
    dec_mlp_ratio: float = 4.0
    max_len: int = 32  # decoder positions, BOS and EOS included
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("vocab_size", "img_height", "img_width", "in_chans", "patch_size", "enc_dim", "enc_depth",
                     "enc_heads", "dec_dim", "dec_depth", "dec_heads", "max_len", "window_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrOCRConfig: {name} must be a positive int, got {value!r}")
        if self.vocab_size <= EOS:
            raise ValueError(f"TrOCRConfig: vocab_size must exceed the 3 special tokens, got {self.vocab_size}")
        if self.encoder not in ("vit", "swin"):
            raise ValueError(f"TrOCRConfig: encoder must be 'vit' or 'swin', got {self.encoder!r}")
        if self.img_height % self.patch_size or self.img_width % self.patch_size:
            raise ValueError(f"TrOCRConfig: image {self.img_height}x{self.img_width} must be a multiple of "
                             f"patch_size {self.patch_size}")
        if self.dec_dim % self.dec_heads:
            raise ValueError(f"TrOCRConfig: dec_dim {self.dec_dim} must be divisible by dec_heads {self.dec_heads}")
        self.swin_depths = check_int_tuple_field("TrOCRConfig", "swin_depths", self.swin_depths)
        check_float_field("TrOCRConfig", "dec_mlp_ratio", self.dec_mlp_ratio, low_open=True)
        check_float_field("TrOCRConfig", "dropout", self.dropout, high=1.0)


class LineViT(ViT):
    """A ViT whose learned position embeddings cover an H x W grid of patches (a text line, not a square)."""

    def __init__(self, config: ViTConfig, grid: tuple[int, int]):
        super().__init__(config)
        self.grid = tuple(grid)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], config.embed_dim) * 0.02)


def _build_encoder(c: TrOCRConfig) -> tuple[nn.Module, int]:
    if c.encoder == "vit":
        vit_config = ViTConfig(img_size=c.img_width, patch_size=c.patch_size, in_chans=c.in_chans,
                               embed_dim=c.enc_dim, depth=c.enc_depth, num_heads=c.enc_heads, num_classes=0)
        return LineViT(vit_config, (c.img_height // c.patch_size, c.img_width // c.patch_size)), c.enc_dim
    from .swin import SwinConfig, SwinTransformer
    n = len(c.swin_depths)
    swin_config = SwinConfig(img_size=(c.img_height, c.img_width), patch_size=c.patch_size, in_chans=c.in_chans,
                             embed_dim=c.enc_dim, depths=c.swin_depths,
                             num_heads=tuple(c.enc_heads * 2 ** i for i in range(n)), window_size=c.window_size,
                             num_classes=0, drop_path_rate=0.0)
    return SwinTransformer(swin_config), c.enc_dim * 2 ** (n - 1)


class TrOCR(nn.Module):
    """Image-to-text Transformer. ``forward(images, tokens)``: (B, C, H, W) images and (B, T) decoder inputs
    (BOS first) -> (B, T, vocab) next-token logits. ``loss(images, targets)`` with targets BOS ... EOS PAD.
    """

    Config = TrOCRConfig

    def __init__(self, config: Optional[TrOCRConfig] = None, **kwargs):
        super().__init__()
        config = resolve_config(type(self).__name__, TrOCRConfig, config, kwargs)
        self.config = c = config
        self.encoder, enc_out = _build_encoder(c)
        self.enc_proj = nn.Linear(enc_out, c.dec_dim)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dec_dim, padding_idx=PAD)
        self.embed_positions = nn.Parameter(torch.randn(1, c.max_len, c.dec_dim) * 0.02)
        layer = nn.TransformerDecoderLayer(c.dec_dim, c.dec_heads, int(c.dec_dim * c.dec_mlp_ratio), c.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.dec_depth, norm=nn.LayerNorm(c.dec_dim))
        self.lm_head = nn.Linear(c.dec_dim, c.vocab_size)

    # -- pieces

    def _check_images(self, images: Tensor) -> Tensor:
        c = self.config
        return check_images("TrOCR", "images", images, c.in_chans, size=(c.img_height, c.img_width))

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, S, dec_dim) encoder tokens, the decoder's cross-attention memory."""
        self._check_images(images)
        feats = self.encoder.forward_features(images)
        return self.enc_proj(feats.reshape(feats.shape[0], -1, feats.shape[-1]))

    def decode(self, memory: Tensor, tokens: Tensor) -> Tensor:
        """(B, S, D) memory and (B, T) tokens -> (B, T, vocab) logits (causal self-attention)."""
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"TrOCR: tokens has {t} positions, more than max_len {self.config.max_len}, "
                             f"got {describe(tokens)}")
        x = self.embed_tokens(tokens) + self.embed_positions[:, :t]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True: may not attend
        pad_mask = tokens == PAD
        y = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad_mask if pad_mask.any() else None,
                         tgt_is_causal=True)
        return self.lm_head(y)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        self._check_images(images)
        tokens = check_token_ids("TrOCR", "tokens", tokens, self.config.vocab_size, batch=images.shape[0])
        return self.decode(self.encode(images), tokens)

    def loss(self, images: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced cross entropy of targets[:, 1:] given targets[:, :-1] (PAD ignored)."""
        self._check_images(images)
        targets = check_token_ids("TrOCR", "targets", targets, self.config.vocab_size, batch=images.shape[0])
        if targets.shape[1] < 2:
            raise ValueError(f"TrOCR: targets needs at least BOS and one token, got {describe(targets)}")
        logits = self.decode(self.encode(images), targets[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=PAD)

    # -- decoding

    def _max_len(self, max_len: Optional[int]) -> int:
        max_len = self.config.max_len if max_len is None else max_len
        if not 2 <= max_len <= self.config.max_len:
            raise ValueError(f"TrOCR: max_len must be in [2, {self.config.max_len}], got {max_len}")
        return max_len

    @torch.no_grad()
    def greedy(self, images: Tensor, max_len: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Greedy decoding. Returns (B, L) tokens (BOS first, PAD after EOS) and (B,) sums of their
        log-probabilities (the EOS included)."""
        max_len = self._max_len(max_len)
        memory = self.encode(images)
        b = images.shape[0]
        tokens = torch.full((b, 1), BOS, dtype=torch.long, device=images.device)
        scores = torch.zeros(b, device=images.device)
        done = torch.zeros(b, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            logp = self.decode(memory, tokens)[:, -1].float().log_softmax(-1)
            best, nxt = logp.max(-1)
            scores = scores + torch.where(done, 0.0, best)
            nxt = torch.where(done, PAD, nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done = done | (nxt == EOS)
            if bool(done.all()):
                break
        return tokens, scores

    @torch.no_grad()
    def beam_search(self, images: Tensor, beam_size: int = 4, max_len: Optional[int] = None,
                    length_penalty: float = 0.0) -> tuple[Tensor, Tensor]:
        """Beam search per image. Returns (B, L) tokens (BOS first, PAD-padded) and (B,) log-probabilities
        (sums, as greedy's; the choice among hypotheses uses ``score / ((5 + L) / 6) ** length_penalty``)."""
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size <= 0:
            raise ValueError(f"TrOCR: beam_size must be a positive int, got {beam_size!r}")
        check_float_field("TrOCR", "length_penalty", length_penalty, low=-math.inf)
        max_len = self._max_len(max_len)
        memory = self.encode(images)
        rows, scores = [], []
        for i in range(images.shape[0]):
            seq, score = self._beam_one(memory[i:i + 1], beam_size, max_len, length_penalty)
            rows.append(seq)
            scores.append(score)
        out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long, device=images.device)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out, torch.stack(scores)

    def _beam_one(self, memory: Tensor, k: int, max_len: int, alpha: float) -> tuple[Tensor, Tensor]:
        def normalised(score: Tensor, length: int) -> float:
            return float(score) / (((5 + length) / 6) ** alpha)

        alive = torch.full((1, 1), BOS, dtype=torch.long, device=memory.device)
        alive_scores = torch.zeros(1, device=memory.device)
        finished: list[tuple[float, Tensor, Tensor]] = []
        for step in range(1, max_len):
            logp = self.decode(memory.expand(alive.shape[0], -1, -1), alive)[:, -1].float().log_softmax(-1)
            cand = (alive_scores[:, None] + logp).reshape(-1)
            top_scores, top = cand.topk(min(2 * k, cand.numel()))
            vocab = logp.shape[-1]
            new_alive, new_scores = [], []
            for s, idx in zip(top_scores, top.tolist()):
                seq = torch.cat([alive[idx // vocab], alive.new_tensor([idx % vocab])])
                if idx % vocab == EOS:
                    finished.append((normalised(s, step), seq, s))
                elif len(new_alive) < k:
                    new_alive.append(seq)
                    new_scores.append(s)
                if len(new_alive) == k:
                    break
            if not new_alive:
                break
            alive, alive_scores = torch.stack(new_alive), torch.stack(new_scores)
            # Scores only fall as sequences grow: with no length penalty, stop once no live beam can win.
            if finished and alpha == 0 and max(f[0] for f in finished) >= float(alive_scores.max()):
                break
        if not finished:  # nothing ended within max_len: take the best live (truncated) hypothesis
            finished = [(normalised(s, alive.shape[1]), seq, s) for seq, s in zip(alive, alive_scores)]
        _, seq, score = max(finished, key=lambda f: f[0])
        return seq, score

    @torch.no_grad()
    def sequence_log_prob(self, images: Tensor, tokens: Tensor) -> Tensor:
        """(B,) sum of log p(tokens[t] | tokens[<t], image) over t >= 1 up to and including the first EOS."""
        self._check_images(images)
        tokens = check_token_ids("TrOCR", "tokens", tokens, self.config.vocab_size, batch=images.shape[0])
        logp = self.decode(self.encode(images), tokens[:, :-1]).float().log_softmax(-1)
        picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]
        return (picked * (tokens[:, 1:] != PAD)).sum(1)


def char_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Total Levenshtein distance over total reference length (the CER)."""
    if len(predictions) != len(references):
        raise ValueError(f"char_error_rate: {len(predictions)} predictions for {len(references)} references")
    errors = sum(_levenshtein(p, r) for p, r in zip(predictions, references))
    return errors / max(1, sum(len(r) for r in references))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


__all__ = ["CharTokenizer", "LineViT", "TrOCR", "TrOCRConfig", "char_error_rate", "check_token_ids"]
