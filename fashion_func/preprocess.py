"""Raw pixels to model inputs: the one normalisation that training, evaluation, predict and the
ONNX export share, and the statistics it uses.

`normalize(images)` is `(x / 255 - mean) / std` in float32, the same expression everywhere
(eager, under torch.compile, in the exported ONNX graph), so a prediction from any of them
sees bitwise the inputs training saw (tests/test_onnx.py checks it with ONNX Runtime).
`NormalizeImages` is the train and eval steps' default preprocess; it refuses a batch that
is not uint8 (already-normalised floats would be normalised twice).

`MEAN` and `STD` are the training set's pixel statistics; `FASHION_MNIST` is
`NormalizeImages()` over them, the default preprocess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["FASHION_MNIST", "MEAN", "STD", "NormalizeImages", "normalize"]

# Pixel statistics of the 60,000 Fashion-MNIST training images scaled to [0, 1] (checked by
# tests/test_data.py against `data.dataset_stats` of the real files).
MEAN = 0.2860
STD = 0.3530
# The tutorial normalised with transforms.Normalize((0.5,), (0.5,)).
TUTORIAL_MEAN = 0.5
TUTORIAL_STD = 0.5


def normalize(
    images: Tensor,
    mean: float = MEAN,
    std: float = STD,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Tensor:
    """uint8 `[B, H, W]` (or `[B, 1, H, W]`) -> `dtype` `[B, 1, H, W]`, `(x / 255 - mean) / std`,
    in pure tensor ops (it runs inside a compiled step). channels_last: lay the result out NHWC
    in memory (same shape and values); the convolutions then keep that layout, which oneDNN
    runs faster on CPU."""
    if images.dim() == 4:  # already [B, 1, H, W]: drop the channel axis, add it back below
        images = rearrange(images, "b 1 h w -> b h w")
    # NHWC: [B, H, W, 1] in memory viewed as [B, 1, H, W], stride 1 along C, which
    # nn.conv2d reads as a request for NHWC outputs (one channel is otherwise ambiguous)
    if channels_last:
        x = rearrange(rearrange(images, "b h w -> b h w 1"), "b h w c -> b c h w")
    else:
        x = rearrange(images, "b h w -> b 1 h w")
    # division, not multiplication by 1/255 and 1/std: the ONNX export computes exactly this
    return (x.to(dtype) / 255.0 - mean) / std


@dataclass(frozen=True)
class NormalizeImages:
    """The default preprocess: uint8 grayscale images -> normalised float32 `[B, 1, H, W]`. A
    batch of another dtype is a TypeError (floats are taken to be normalised already: pass
    `preprocess=None`); the check reads only the dtype, static under torch.compile.
    channels_last: None (auto) lays activations out NHWC when the images are on the CPU, where
    oneDNN's convolutions run faster that way; on CUDA it measured no different."""

    mean: float = MEAN
    std: float = STD
    channels_last: bool | None = None

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(
                f"the default preprocess normalises uint8 images (0..255), got a {str(images.dtype)[6:]} "
                "batch; pass preprocess=None for inputs that are already normalised"
            )
        nhwc = images.device.type == "cpu" if self.channels_last is None else self.channels_last
        return normalize(images, self.mean, self.std, channels_last=nhwc)


FASHION_MNIST = NormalizeImages()
