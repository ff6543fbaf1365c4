"""ScatterNet features (Tramèr & Boneh, ICLR 2021): kymatio's 2-D wavelet scattering of each image
scaled by 1/255, a fixed function of the image alone, so private training on them spends nothing
on the features. A model whose `inputs` name a transform of `TRANSFORMS` (`models.scatternet`:
"scattering"; `models.scatternet_ms`: "scattering_ms") takes these features instead of images:
training computes them once per split (`features`); `predict` and the ONNX export put
`Scattering` in front. `privacy_note` is what such a private run records.

- "scattering": J=2, L=8, 81 channels of 7x7 (Tramèr & Boneh's features).
- "scattering_ms": those 81 channels and the J=1 scattering's 9 channels of 14x14, each 2x2
  block of its grid moved into channels (`c (i j)`, 36 channels of 7x7): [117, 7, 7]. The finer
  grid adds what the J=2 averaging blurs away (+0.3 points at epsilon 3, README).

kymatio is optional (the `privacy` extra; else `ScatteringUnavailable`, one line). It is
imported from its torch frontend: kymatio 0.3.0's `kymatio.torch` fails with SciPy >= 1.15.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch import nn as tnn

__all__ = [
    "TRANSFORMS",
    "Scattering",
    "ScatteringUnavailable",
    "channels",
    "describe",
    "features",
    "privacy_note",
]

L, SHAPE = 8, (28, 28)
# the scales J of each transform: J=2 gives 1 + J L + L^2 J (J - 1) / 2 = 81 channels of 28 / 2^J = 7 x 7,
# J=1 gives 1 + L = 9 channels of 14 x 14 (36 of 7 x 7 once each 2x2 block is moved into channels)
TRANSFORMS: dict[str, tuple[int, ...]] = {"scattering": (2,), "scattering_ms": (2, 1)}
CHANNELS = {2: 81, 1: 36}  # channels of 7 x 7 per scale
CHUNK = 2000  # images per call: memory stays bounded (0.35 GB of kymatio's intermediates, measured)


class ScatteringUnavailable(ImportError):
    """kymatio, which computes the features, is not installed."""

    def __init__(self) -> None:
        super().__init__("ScatterNet features need kymatio: pip install 'fashion-func[privacy]' "
                         "(or: pip install 'kymatio>=0.3,<0.4')")  # fmt: skip


def _scales(kind: str) -> tuple[int, ...]:
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown feature transform {kind!r}; choose from {', '.join(TRANSFORMS)}")
    return TRANSFORMS[kind]


def describe(kind: str = "scattering") -> str:
    """What the features of transform `kind` are, in one line (metadata, ONNX properties, the log)."""
    parts = " + ".join(f"J={j} L={L}" for j in _scales(kind))
    return f"kymatio scattering {parts} of images / 255 -> float32 [B,{channels(kind)},7,7]"


def channels(kind: str = "scattering") -> int:
    """How many 7x7 channels transform `kind` gives (81, or 117 with the J=1 scale)."""
    return sum(CHANNELS[j] for j in _scales(kind))


def privacy_note(kind: str = "scattering") -> dict[str, str]:
    """What a private run on features of transform `kind` records of the data's statistics: none."""
    groups = "27 groups of the J=2 channels" + (", 3 of the J=1 channels" if 1 in _scales(kind) else "")
    return {
        "data_statistics": "none",
        "features": f"{describe(kind)} (kymatio): a fixed function of each image",
        "normalisation": f"per-example group norm ({groups}; no affine, no running statistics)",
    }


class Scattering(tnn.Module):
    """uint8 images `[B, 28, 28]` (or `[B, 1, 28, 28]`) -> float32 features `[B, C, 7, 7]`: kymatio's
    `ScatteringTorch2D(J=j, shape=(28, 28), L=8)` of `images / 255` for each scale j of transform
    `kind` (`TRANSFORMS`), concatenated over channels. A module (its filters are buffers:
    `.to(device)` moves them), so it exports to ONNX in front of a model."""

    def __init__(self, kind: str = "scattering") -> None:
        super().__init__()
        scales = _scales(kind)
        try:
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError:
            raise ScatteringUnavailable() from None
        self.transforms = tnn.ModuleList(ScatteringTorch2D(J=j, shape=SHAPE, L=L) for j in scales)
        self.kind = kind

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:  # floats would be scaled twice
            raise TypeError(f"Scattering takes uint8 images (0..255), got {str(images.dtype)[6:]}")
        if images.dim() == 4:  # [B, 1, H, W]: one channel, as the other models take
            images = rearrange(images, "b 1 h w -> b h w")
        x = images.to(torch.float32) / 255.0
        out = []
        for j, transform in zip(TRANSFORMS[self.kind], self.transforms, strict=True):
            f = transform(x)  # [B, C_j, 28 / 2^j, 28 / 2^j]
            k = 2 ** (2 - j)  # each k x k block of a finer grid becomes k^2 channels of the 7 x 7 one
            out.append(rearrange(f, "b c (h i) (w j) -> b (c i j) h w", i=k, j=k))
        return torch.cat(out, dim=1)


def features(images: Tensor, kind: str = "scattering", *, chunk: int = CHUNK) -> Tensor:
    """The features of transform `kind` of every image of `images` (uint8 `[N, 28, 28]`): float32
    `[N, C, 7, 7]` on their device, computed `chunk` images at a time (no graph recorded)."""
    transform = Scattering(kind).to(images.device)
    with torch.no_grad():
        return torch.cat([transform(images[i : i + chunk]) for i in range(0, len(images), chunk)])
