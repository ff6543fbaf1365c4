"""ScatterNet features (Tramèr & Boneh, ICLR 2021): kymatio's 2-D wavelet scattering (J=2, L=8:
81 channels of 7x7) of each image scaled by 1/255: a fixed function of the image alone, so
private training on them spends nothing on the features. A model whose `inputs` are
"scattering" (`models.scatternet`) takes these features instead of images: training computes
them once per split (`features`); `predict` and the ONNX export put `Scattering` in front.
`PRIVACY_NOTE` is what such a private run records.

kymatio is optional (the `privacy` extra; else `ScatteringUnavailable`, one line). It is
imported from its torch frontend: kymatio 0.3.0's `kymatio.torch` fails with SciPy >= 1.15.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor
from torch import nn as tnn

__all__ = ["PRIVACY_NOTE", "Scattering", "ScatteringUnavailable", "features"]

J, L, SHAPE = 2, 8, (28, 28)  # 1 + J L + L^2 J (J - 1) / 2 = 81 channels of 28 / 2^J = 7 x 7
DESCRIPTION = f"kymatio scattering J={J} L={L} of images / 255 -> float32 [B,81,7,7]"
PRIVACY_NOTE = {
    "data_statistics": "none",
    "features": f"scattering J={J} L={L} of images / 255 (kymatio): a fixed function of each image",
    "normalisation": "per-example group norm (27 groups of 81 channels, no affine, no running statistics)",
}
CHUNK = 2000  # images per call: memory stays bounded (0.35 GB of kymatio's intermediates, measured)


class ScatteringUnavailable(ImportError):
    """kymatio, which computes the features, is not installed."""

    def __init__(self) -> None:
        super().__init__("ScatterNet features need kymatio: pip install 'fashion-func[privacy]' "
                         "(or: pip install 'kymatio>=0.3,<0.4')")  # fmt: skip


class Scattering(tnn.Module):
    """uint8 images `[B, 28, 28]` (or `[B, 1, 28, 28]`) -> float32 features `[B, 81, 7, 7]`:
    kymatio's `ScatteringTorch2D(J=2, shape=(28, 28), L=8)` of `images / 255`. A module (its
    filters are buffers: `.to(device)` moves them), so it exports to ONNX in front of a model."""

    def __init__(self) -> None:
        super().__init__()
        try:
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError:
            raise ScatteringUnavailable() from None
        self.transform = ScatteringTorch2D(J=J, shape=SHAPE, L=L)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:  # floats would be scaled twice
            raise TypeError(f"Scattering takes uint8 images (0..255), got {str(images.dtype)[6:]}")
        if images.dim() == 4:  # [B, 1, H, W]: one channel, as the other models take
            images = rearrange(images, "b 1 h w -> b h w")
        return self.transform(images.to(torch.float32) / 255.0)


def features(images: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """The features of every image of `images` (uint8 `[N, 28, 28]`): float32 `[N, 81, 7, 7]` on
    their device, computed `chunk` images at a time (no graph recorded)."""
    transform = Scattering().to(images.device)
    with torch.no_grad():
        return torch.cat([transform(images[i : i + chunk]) for i in range(0, len(images), chunk)])
