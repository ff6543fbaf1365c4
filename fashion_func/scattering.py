"""ScatterNet features (Tramèr & Boneh, ICLR 2021): kymatio's 2-D wavelet scattering of each image
scaled by 1/255, a fixed function of the image alone, so private training on them spends nothing
on the features. A model whose `inputs` name a transform of `TRANSFORMS` (`models.scatternet`:
"scattering"; `models.scatternet_ms`: "scattering_ms"; `models.scatternet_ms3`: "scattering_ms3")
takes these features instead of images: training computes them once per split (`features`);
`predict` and the ONNX export put `Scattering` in front. `privacy_note` is what such a private
run records.

- "scattering": J=2, L=8, 81 channels of 7x7 (Tramèr & Boneh's features).
- "scattering_ms": those 81 channels and the J=1 scattering's 9 channels of 14x14, each 2x2
  block of its grid moved into channels (`c (i j)`, 36 channels of 7x7): [117, 7, 7]. The finer
  grid adds what the J=2 averaging blurs away (+0.3 points at epsilon 3, README).
- "scattering_ms3": those and the J=3 scattering's 217 channels of 3x3, the coarser scale; the
  grids differ, so each block is flattened (`c h w` order) and the three joined: [7686].

Each scale's block and the groups its per-example group norm uses (`BLOCKS`, `GROUPS`) are
here, beside the transform, and `models` reads them (`blocks`).

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
    "blocks",
    "describe",
    "features",
    "privacy_note",
    "shape",
]

L, SHAPE = 8, (28, 28)
# the scales J of each transform: J gives 1 + J L + L^2 J (J - 1) / 2 channels of 28 / 2^J
TRANSFORMS: dict[str, tuple[int, ...]] = {
    "scattering": (2,),
    "scattering_ms": (2, 1),
    "scattering_ms3": (2, 1, 3),
}
# each scale's block (channels, grid side): J=2 81 of 7x7; J=1 9 of 14x14, each 2x2 block moved into
# channels (36 of 7x7, so it joins J=2's grid); J=3 217 of 3x3 (28 / 8, rounded down by kymatio)
BLOCKS: dict[int, tuple[int, int]] = {2: (81, 7), 1: (36, 7), 3: (217, 3)}
# the groups of each block's per-example group norm (models): 3 channels each (J=2), 3 of J=1's
# 14x14 channels each (12 of 7x7), 31 channels each (J=3)
GROUPS: dict[int, int] = {2: 27, 1: 3, 3: 7}
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


def shape(kind: str = "scattering") -> tuple[int, ...]:
    """The shape of one image's features of transform `kind`: `(C, 7, 7)` where every block shares
    the 7x7 grid ((81, 7, 7), (117, 7, 7)), else the blocks flattened and joined ((7686,))."""
    scales = _scales(kind)
    sides = {BLOCKS[j][1] for j in scales}
    if len(sides) == 1:
        (side,) = sides
        return (sum(BLOCKS[j][0] for j in scales), side, side)
    return (sum(c * side * side for c, side in (BLOCKS[j] for j in scales)),)


def blocks(kind: str = "scattering") -> tuple[tuple[int, int], ...]:
    """(features, group-norm groups) of each scale's block of transform `kind`, in the order its
    features are joined (a block's features are contiguous in `c h w` order)."""
    return tuple((BLOCKS[j][0] * BLOCKS[j][1] ** 2, GROUPS[j]) for j in _scales(kind))


def describe(kind: str = "scattering") -> str:
    """What the features of transform `kind` are, in one line (metadata, ONNX properties, the log)."""
    parts = " + ".join(f"J={j} L={L}" for j in _scales(kind))
    return f"kymatio scattering {parts} of images / 255 -> float32 [B,{','.join(map(str, shape(kind)))}]"


def privacy_note(kind: str = "scattering") -> dict[str, str]:
    """What a private run on features of transform `kind` records of the data's statistics: none."""
    names = {2: "the J=2 channels", 1: "the J=1 channels", 3: "the J=3 channels"}
    groups = ", ".join(f"{GROUPS[j]} groups of {names[j]}" for j in _scales(kind))
    return {
        "data_statistics": "none",
        "features": f"{describe(kind)} (kymatio): a fixed function of each image",
        "normalisation": f"per-example group norm ({groups}; no affine, no running statistics)",
    }


class Scattering(tnn.Module):
    """uint8 images `[B, 28, 28]` (or `[B, 1, 28, 28]`) -> float32 features `[B, *shape(kind)]`:
    kymatio's `ScatteringTorch2D(J=j, shape=(28, 28), L=8)` of `images / 255` for each scale j of
    transform `kind` (`TRANSFORMS`), joined as `shape` says. A module (its filters are buffers:
    `.to(device)` moves them), so it exports to ONNX in front of a model.

    `batched=True` computes the same equations with kymatio's padding and filters, one batched
    operation per scale and order over all orientations (`_batched`) instead of kymatio's one
    per path: what the ONNX export traces, since kymatio's J=3 graph is about 35,000 nodes and
    took 2.5 minutes to export (this one: 500 nodes, seconds). Equal to kymatio's in exact
    arithmetic (bitwise on the CPU measured, Zen 4); on the CPU it runs slower (larger
    intermediates), so training keeps kymatio's."""

    def __init__(self, kind: str = "scattering", *, batched: bool = False) -> None:
        super().__init__()
        scales = _scales(kind)
        try:
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError:
            raise ScatteringUnavailable() from None
        self.transforms = tnn.ModuleList(ScatteringTorch2D(J=j, shape=SHAPE, L=L) for j in scales)
        self.kind, self.batched = kind, batched

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:  # floats would be scaled twice
            raise TypeError(f"Scattering takes uint8 images (0..255), got {str(images.dtype)[6:]}")
        if images.dim() == 4:  # [B, 1, H, W]: one channel, as the other models take
            images = rearrange(images, "b 1 h w -> b h w")
        x = images.to(torch.float32) / 255.0
        out = []
        for j, transform in zip(TRANSFORMS[self.kind], self.transforms, strict=True):
            f = _batched(transform, x) if self.batched else transform(x)  # [B, C_j, 28 // 2^j, 28 // 2^j]
            if j < 2:  # each k x k block of the finer grid becomes k^2 channels of the 7 x 7 one
                k = 2 ** (2 - j)
                f = rearrange(f, "b c (h i) (w j) -> b (c i j) h w", i=k, j=k)
            out.append(f)
        if len(shape(self.kind)) == 3:  # one grid: the blocks' channels side by side
            return torch.cat(out, dim=1)
        return torch.cat([f.flatten(1) for f in out], dim=1)


# kymatio's torch backend on its complex layout (a last axis of 2: real, imaginary), op for op
def _fft(x: Tensor) -> Tensor:
    return torch.view_as_real(torch.fft.fft2(torch.view_as_complex(x)))


def _rfft(x: Tensor) -> Tensor:  # a real [..., 1] to the Fourier domain
    return _fft(torch.cat([x, torch.zeros_like(x)], dim=-1))


def _ifft(x: Tensor) -> Tensor:
    return torch.view_as_real(torch.fft.ifft2(torch.view_as_complex(x)))


def _irfft(x: Tensor) -> Tensor:
    return torch.fft.ifft2(torch.view_as_complex(x)).real[..., None]


def _subsample(x: Tensor, k: int) -> Tensor:
    """Subsampling by k in space is periodisation in frequency: the mean of the k x k tiles."""
    lead, (m, n) = x.shape[:-3], x.shape[-3:-1]
    tiles = x.reshape(-1, k, m // k, k, n // k, 2)
    return tiles.mean(3).mean(1).reshape(*lead, m // k, n // k, 2)


def _modulus(x: Tensor) -> Tensor:
    return (x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1]).sqrt()[..., None]


def _batched(transform: tnn.Module, x: Tensor) -> Tensor:
    """kymatio's `scattering2d` (order 2) of `x` `[B, 28, 28]` with `transform`'s (a
    `ScatteringTorch2D`) padding and filters, each order's paths of one scale pair at once: the
    orientations are a tensor axis. Output `[B, C, h, w]` in kymatio's order: the low pass, the
    first order (j1, theta1), the second order (j1, theta1, j2 > j1, theta2)."""
    J = transform.J
    phi, psi = transform.load_filters()
    low = phi["levels"]

    def filters(j: int, level: int) -> Tensor:  # [L, M, N, 1]: scale j's wavelets at a resolution
        return torch.stack([f["levels"][level] for f in psi if f["j"] == j])

    def low_pass(u: Tensor, j: int) -> Tensor:  # the coefficients of a modulus at resolution j
        return _irfft(_subsample(u * low[j], 2 ** (J - j)))[..., 1:-1, 1:-1, 0]

    u0 = _rfft(transform.pad(x))  # [B, M, N, 2]
    first, second = [], []
    for j1 in range(J):
        u1 = u0[:, None] * filters(j1, 0)
        u1 = _rfft(_modulus(_ifft(_subsample(u1, 2**j1) if j1 else u1)))  # [B, L, M / 2^j1, N / 2^j1, 2]
        first.append(low_pass(u1, j1))
        per_j2 = []
        for j2 in range(j1 + 1, J):
            u2 = _subsample(u1[:, :, None] * filters(j2, j1), 2 ** (j2 - j1))
            per_j2.append(low_pass(_rfft(_modulus(_ifft(u2))), j2))  # [B, L, L, h, w]
        if per_j2:
            second.append(torch.cat(per_j2, dim=2).flatten(1, 2))
    return torch.cat([low_pass(u0, 0)[:, None], *first, *second], dim=1)


def features(images: Tensor, kind: str = "scattering", *, chunk: int = CHUNK) -> Tensor:
    """The features of transform `kind` of every image of `images` (uint8 `[N, 28, 28]`): float32
    `[N, *shape(kind)]` on their device, computed `chunk` images at a time (no graph recorded)."""
    transform = Scattering(kind).to(images.device)
    with torch.no_grad():
        return torch.cat([transform(images[i : i + chunk]) for i in range(0, len(images), chunk)])
