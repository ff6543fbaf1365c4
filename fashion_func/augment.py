"""Data augmentation on the device, as pure functions of (key, images).

Every draw is counter-based (`nn.uniform`), so an augmented batch is a pure function of the
run's seed and the step: a compiled step stays deterministic, resume stays bitwise exact, and
the functions vmap over ensemble members (each member draws its own). Images are `[B, H, W]`
or `[B, C, H, W]` (any dtype); the transforms act on the last two axes.

`Augment` wraps a preprocess (e.g. `step.NormalizeImages()`) for `make_train_step`: the train
step calls it with the step's key and augments; evaluation calls it without one and gets the
plain preprocess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fashion_func import nn

__all__ = ["Augment", "cutout", "hflip", "random_crop"]

# salts: each transform draws from its own stream of the step's key
_CROP, _FLIP, _CUTOUT = 0xC201, 0xF119, 0xC0C7


def _offsets(key: Tensor, batch: int, high: int, salt: int) -> Tensor:
    """`[B, 2]` integers uniform in [0, high], a pure function of `key`."""
    u = nn.uniform(nn.fold_in(key, salt), (batch, 2))
    return torch.clamp((u * (high + 1)).to(torch.int64), max=high)


def random_crop(key: Tensor, images: Tensor, padding: int) -> Tensor:
    """Each image shifted by up to `padding` pixels in each direction, the gap filled with
    zeros: torchvision's `RandomCrop(size, padding)` drawn per image."""
    if padding <= 0:
        return images
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    off = _offsets(key, b, 2 * padding, _CROP).to(images.device)
    rows = off[:, 0, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = off[:, 1, None] + torch.arange(w, device=images.device)  # [B, W]
    # gather rows then columns: two index_selects per image expressed as batched gathers
    lead = padded.shape[1:-2]
    flat = padded.reshape(b, -1, h + 2 * padding, w + 2 * padding)
    r_idx = rows[:, None, :, None].expand(b, flat.shape[1], h, w + 2 * padding)
    picked = torch.gather(flat, 2, r_idx)
    c_idx = cols[:, None, None, :].expand(b, flat.shape[1], h, w)
    return torch.gather(picked, 3, c_idx).reshape(b, *lead, h, w)


def hflip(key: Tensor, images: Tensor, p: float = 0.5) -> Tensor:
    """Each image mirrored left-right with probability `p`."""
    flip = nn.uniform(nn.fold_in(key, _FLIP), (images.shape[0],)).to(images.device) < p
    shape = (images.shape[0],) + (1,) * (images.dim() - 1)
    return torch.where(flip.reshape(shape), images.flip(-1), images)


def cutout(key: Tensor, images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """A `size` x `size` square (clipped at the border) set to `fill` in each image, centred
    anywhere in it (DeVries & Taylor's Cutout; random erasing with a fixed square)."""
    if size <= 0:
        return images
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    u = nn.uniform(nn.fold_in(key, _CUTOUT), (b, 2)).to(images.device)
    cy = (u[:, 0] * h).to(torch.int64)[:, None]
    cx = (u[:, 1] * w).to(torch.int64)[:, None]
    ys = torch.arange(h, device=images.device)[None]
    xs = torch.arange(w, device=images.device)[None]
    in_y = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)  # [B, H]
    in_x = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)  # [B, W]
    hole = in_y[:, :, None] & in_x[:, None, :]  # [B, H, W]
    shape = (b,) + (1,) * (images.dim() - 3) + (h, w)
    return torch.where(
        hole.reshape(shape), torch.full((), fill, dtype=images.dtype, device=images.device), images
    )


@dataclass(frozen=True)
class Augment:
    """A preprocess that augments in training: crop with `crop_padding`, flip, Cutout of
    `cutout` pixels (filled with 0: Fashion-MNIST's black background), then `base` (e.g.
    `NormalizeImages()`; None: none). Without a key (evaluation) it is `base` alone. Augmenting
    the raw images before `base` keeps `base`'s memory layout (NHWC on CPU)."""

    base: Callable[[Tensor], Tensor] | None = None
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __call__(self, images: Tensor, key: Tensor | None = None) -> Tensor:
        if key is not None:
            images = random_crop(key, images, self.crop_padding)
            if self.flip:
                images = hflip(key, images)
            images = cutout(key, images, self.cutout)
        return images if self.base is None else self.base(images)
