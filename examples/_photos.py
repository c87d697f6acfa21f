"""Training data for the examples: patches of the sample photographs that scikit-image ships (no
downloads), and a PNG of originals next to reconstructions."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# RGB photographs bundled with scikit-image (skimage.data loads them from the package, offline).
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "colorwheel")
HELD_OUT_PHOTOS = ("chelsea",)


def load_photos(names: Sequence[str]) -> list[Tensor]:
    """(3, H, W) float32 tensors in [0, 1]."""
    import skimage.data

    photos = []
    for name in names:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(torch.from_numpy(img[..., :3].copy()).permute(2, 0, 1).float() / 255.0)
    return photos


class PatchSampler:
    """Random size x size crops (with random horizontal flips) of a list of photos.

    ``weighting="area"`` (the default) picks a photo in proportion to its area, so that every region is
    equally likely; ``"photo"`` picks every photo equally often (with TRAIN_PHOTOS, area weighting draws
    half of the patches from ``retina`` and a fifth from ``hubble_deep_field``, mostly flat red and black)."""

    def __init__(self, photos: Sequence[Tensor], size: int, seed: int = 0, weighting: str = "area"):
        self.photos, self.size = list(photos), size
        self.gen = torch.Generator().manual_seed(seed)
        if weighting == "area":
            weights = torch.tensor([float(p.shape[1] * p.shape[2]) for p in self.photos])
        elif weighting == "photo":
            weights = torch.ones(len(self.photos))
        else:
            raise ValueError(f"PatchSampler: weighting must be 'area' or 'photo', got {weighting!r}")
        self.weights = weights / weights.sum()

    def sample(self, batch: int) -> Tensor:
        out = torch.empty(batch, 3, self.size, self.size)
        which = torch.multinomial(self.weights, batch, replacement=True, generator=self.gen)
        for i, k in enumerate(which.tolist()):
            p = self.photos[k]
            top = int(torch.randint(0, p.shape[1] - self.size + 1, (1,), generator=self.gen))
            left = int(torch.randint(0, p.shape[2] - self.size + 1, (1,), generator=self.gen))
            crop = p[:, top:top + self.size, left:left + self.size]
            if torch.rand((), generator=self.gen) < 0.5:
                crop = crop.flip(-1)
            out[i] = crop
        return out


def center_crop(photo: Tensor, size: int) -> Tensor:
    top, left = (photo.shape[1] - size) // 2, (photo.shape[2] - size) // 2
    return photo[:, top:top + size, left:left + size]


def grid_image(rows: Sequence[Sequence[Tensor]], scale: int = 1, pad: int = 2):
    """A PIL image of a grid: one row per list of (3, H, W) [0, 1] images, each cell the largest size."""
    from PIL import Image

    h = max(img.shape[1] for row in rows for img in row) * scale
    w = max(img.shape[2] for row in rows for img in row) * scale
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            arr = (img.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((img.shape[2] * scale, img.shape[1] * scale), Image.NEAREST)
            canvas.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def save_comparison(rows: Sequence[Sequence[Tensor]], path: str, scale: int = 1, pad: int = 2) -> None:
    """Save a grid PNG: one row per list of (3, H, W) [0, 1] images (e.g. originals, reconstructions)."""
    save_stacked([grid_image(rows, scale, pad)], path)


def save_stacked(images: Sequence, path: str, pad: int = 6) -> None:
    """Save PIL images one above the other (left-aligned, white between) as one PNG."""
    from PIL import Image

    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images) + pad * (len(images) - 1)), (255, 255, 255))
    top = 0
    for im in images:
        canvas.paste(im, (0, top))
        top += im.height + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def caption(text: str, width: int, height: int = 16):
    """A white strip with ``text`` in Pillow's built-in font (no font files needed)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 2), text, fill=(0, 0, 0))
    return strip


def token_palette(vocab_size: int) -> Tensor:
    """A fixed colour per token index, (vocab_size, 3) in [0, 1]: hues a golden-ratio step apart (so that
    neighbouring indices differ), with saturation and value cycling through three levels each."""
    import colorsys

    return torch.tensor([colorsys.hsv_to_rgb((k * 0.6180339887) % 1.0, (0.95, 0.6, 0.35)[k % 3],
                                             (1.0, 0.75, 0.5)[(k // 3) % 3]) for k in range(vocab_size)])


def token_image(tokens: Tensor, palette: Tensor, cell: int = 1) -> Tensor:
    """(h, w) token indices -> (3, h * cell, w * cell) image in the palette's colours."""
    img = palette[tokens.long()].permute(2, 0, 1)
    return img.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * float(np.log10(1.0 / mse))
