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
    """Random size x size crops (with random horizontal flips) of a list of photos."""

    def __init__(self, photos: Sequence[Tensor], size: int, seed: int = 0):
        self.photos, self.size = list(photos), size
        self.gen = torch.Generator().manual_seed(seed)
        # Sample photos in proportion to their area, so every region is equally likely.
        areas = torch.tensor([float(p.shape[1] * p.shape[2]) for p in self.photos])
        self.weights = areas / areas.sum()

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


def save_comparison(rows: Sequence[Sequence[Tensor]], path: str, scale: int = 1, pad: int = 2) -> None:
    """Save a grid PNG: one row per list of (3, H, W) [0, 1] images (e.g. originals, reconstructions)."""
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * float(np.log10(1.0 / mse))
