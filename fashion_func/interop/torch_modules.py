"""Plain `torch.nn.Module`s with our parameter names, one per architecture of `models`: their
`state_dict` and eval-mode forward equal our weights and `Model.apply`, so a weights file loads
with `module.load_state_dict(safetensors.torch.load_file(p))`. `build` makes one on the meta
device, `hparams_from_params` reads its constructor arguments off a weights dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn as tnn

from fashion_func import models, scattering

__all__ = [
    "DPCNN",
    "MLP",
    "AlexNet",
    "ResNet",
    "ScatterNet",
    "ScatterNetMS",
    "ScatterNetMS3",
    "SimpleNet",
    "SimpleNetBN",
]


class MLP(tnn.Module):
    """The tutorial's TwoLayerNet: flatten, `linear1`, ReLU, `linear2`."""

    def __init__(self, D_in: int = 784, H: int = 100, D_out: int = 10) -> None:
        super().__init__()
        self.linear1 = tnn.Linear(D_in, H)
        self.linear2 = tnn.Linear(H, D_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.relu(self.linear1(torch.flatten(x, 1))))


class SimpleNet(tnn.Module):
    """The reference network: conv 1->32, conv 32->64, max-pool 2, fc 9216->128, fc 128->classes."""

    _batch_norm = False

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # registered in this order: the `state_dict` names come conv1, bn1, conv2, bn2, fc1, fc2
        self.conv1 = tnn.Conv2d(1, 32, 3)
        self.bn1 = tnn.BatchNorm2d(32) if self._batch_norm else None
        self.conv2 = tnn.Conv2d(32, 64, 3)
        self.bn2 = tnn.BatchNorm2d(64) if self._batch_norm else None
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = F.relu(x if self.bn1 is None else self.bn1(x))  # [B, 32, 26, 26]
        x = self.conv2(x)
        x = F.relu(x if self.bn2 is None else self.bn2(x))  # [B, 64, 24, 24]
        x = torch.flatten(F.max_pool2d(x, 2), 1)  # [B, 64*12*12], (c h w) order
        return self.fc2(F.relu(self.fc1(x)))


class SimpleNetBN(SimpleNet):
    """SimpleNet with batch norm after each convolution, before its ReLU, as `models.simplenet_bn`."""

    _batch_norm = True


class AlexNet(tnn.Module):
    """AlexNet for 28x28x1 inputs, as `models.alexnet` (dropout before fc1 and fc2)."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = tnn.Conv2d(64, 192, 3, padding=1)
        self.conv3 = tnn.Conv2d(192, 384, 3, padding=1)
        self.conv4 = tnn.Conv2d(384, 256, 3, padding=1)
        self.conv5 = tnn.Conv2d(256, 256, 3, padding=1)
        self.fc1 = tnn.Linear(2304, 1024)
        self.fc2 = tnn.Linear(1024, 1024)
        self.fc3 = tnn.Linear(1024, num_classes)
        self.drop = tnn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [B, 64, 14, 14]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 192, 7, 7]
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.max_pool2d(F.relu(self.conv5(x)), 2)  # [B, 256, 3, 3]
        x = self.drop(torch.flatten(x, 1))
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc3(F.relu(self.fc2(x)))


class _ConvBN(tnn.Module):
    """conv 3x3 (padding 1), optional max-pool 2, batch norm, ReLU."""

    def __init__(self, c_in: int, c_out: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = tnn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = tnn.BatchNorm2d(c_out)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(self.bn(F.max_pool2d(x, 2) if self.pool else x))


class _Layer(tnn.Module):
    """A pooled conv-bn-ReLU, then `x + res2(res1(x))` when `residual`."""

    def __init__(self, c_in: int, c_out: int, residual: bool) -> None:
        super().__init__()
        self.conv = tnn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = tnn.BatchNorm2d(c_out)
        self.res1 = _ConvBN(c_out, c_out) if residual else None
        self.res2 = _ConvBN(c_out, c_out) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(F.max_pool2d(self.conv(x), 2)))
        return x if self.res1 is None else x + self.res2(self.res1(x))


class ResNet(tnn.Module):
    """The ResNet-9-style network of `models.resnet(width)`, as a plain module."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.prep = _ConvBN(1, w)
        self.layer1 = _Layer(w, 2 * w, residual=True)
        self.layer2 = _Layer(2 * w, 4 * w, residual=False)
        self.layer3 = _Layer(4 * w, 8 * w, residual=True)
        self.fc = tnn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.amax(x, dim=(-2, -1)))


class DPCNN(tnn.Module):
    """The tempered-sigmoid CNN of `models.dpcnn` (Opacus's MNIST `SampleConvNet` with tanh), with an
    optional `nn.GroupNorm(groups, channels)` after each conv (`gn1`, `gn2`) when `groups` > 0."""

    def __init__(self, num_classes: int = 10, width: int = 16, groups: int = 0) -> None:
        super().__init__()
        w = width
        self.conv1 = tnn.Conv2d(1, w, 8, stride=2, padding=3)
        self.gn1 = tnn.GroupNorm(groups, w) if groups else None
        self.conv2 = tnn.Conv2d(w, 2 * w, 4, stride=2)
        self.gn2 = tnn.GroupNorm(groups, 2 * w) if groups else None
        self.fc1 = tnn.Linear(2 * w * 4 * 4, 32)
        self.fc2 = tnn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # [B, w, 14, 14]
        x = F.max_pool2d(torch.tanh(x if self.gn1 is None else self.gn1(x)), 2, 1)  # [B, w, 13, 13]
        x = self.conv2(x)  # [B, 2w, 5, 5]
        x = F.max_pool2d(torch.tanh(x if self.gn2 is None else self.gn2(x)), 2, 1)  # [B, 2w, 4, 4]
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))  # (c h w) order


class _ScatterNetHead(tnn.Module):
    """A linear classifier on the ScatterNet features of transform `kind` (`scattering.TRANSFORMS`),
    as `models.scatternet*` computes it: the features flattened (`c h w` order), each scale's block
    (`scattering.blocks`) viewed as `[B, groups, -1]` and normalised by
    `nn.GroupNorm(groups, groups, affine=False)` (each group of channels as one), then `fc`."""

    kind = "scattering"

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        sizes, groups = zip(*scattering.blocks(self.kind), strict=True)
        self.sizes = list(sizes)
        self.norms = tnn.ModuleList(tnn.GroupNorm(g, g, affine=False) for g in groups)  # no weights
        self.fc = tnn.Linear(sum(self.sizes), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        parts = torch.flatten(x, 1).split(self.sizes, dim=1)
        normed = [gn(p.unflatten(1, (gn.num_groups, -1))) for gn, p in zip(self.norms, parts, strict=True)]
        return self.fc(torch.cat([n.flatten(1) for n in normed], dim=1))


class ScatterNet(_ScatterNetHead):
    """`models.scatternet`: `[B, 81, 7, 7]` (J=2), the group norm in 27 groups of 3 channels, `fc`
    (`scattering.Scattering` makes the inputs)."""

    kind = "scattering"


class ScatterNetMS(_ScatterNetHead):
    """`models.scatternet_ms`: `[B, 117, 7, 7]` (J=2's 81 channels, J=1's 36), 27 and 3 groups."""

    kind = "scattering_ms"


class ScatterNetMS3(_ScatterNetHead):
    """`models.scatternet_ms3`: the flat `[B, 7686]` features of three scales (J=2, J=1, J=3: 27, 3
    and 7 groups)."""

    kind = "scattering_ms3"


_MODULES: dict[str, type[tnn.Module]] = {
    "mlp": MLP,
    "simplenet": SimpleNet,
    "simplenet_bn": SimpleNetBN,
    "alexnet": AlexNet,
    "resnet": ResNet,
    "dpcnn": DPCNN,
    "scatternet": ScatterNet,
    "scatternet_ms": ScatterNetMS,
    "scatternet_ms3": ScatterNetMS3,
}
NAMES: tuple[str, ...] = tuple(_MODULES)  # the architectures with a plain module, in matching order
_HEADS = {
    "simplenet": "fc2",
    "simplenet_bn": "fc2",
    "scatternet": "fc",
    "scatternet_ms": "fc",
    "scatternet_ms3": "fc",
    "alexnet": "fc3",
}  # output layer


def hparams_from_params(name: str, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """The constructor arguments (class counts, widths) a params dict's shapes imply. dpcnn's group
    count is not among them: group-norm weights read as `groups=1`, which gives the right shapes;
    pass the recorded `groups` (a file's `model_hparams`) where the forward matters."""
    try:
        if name == "mlp":
            h, d_in = params["linear1.weight"].shape
            return {"D_in": d_in, "H": h, "D_out": params["linear2.weight"].shape[0]}
        if name in _HEADS:
            return {"num_classes": params[f"{_HEADS[name]}.weight"].shape[0]}
        if name == "resnet":
            return {"num_classes": params["fc.weight"].shape[0], "width": params["prep.conv.weight"].shape[0]}
        if name == "dpcnn":
            groups = 1 if "gn1.weight" in params else 0  # 1: a stand-in, see above
            width = params["conv1.weight"].shape[0]
            return {"num_classes": params["fc2.weight"].shape[0], "width": width, "groups": groups}
    except (KeyError, ValueError):
        pass  # wrong keys or ranks: the shape check (`torch_io.check_shapes`) names the problem
    return {}


def hparams_from_module(name: str, module: tnn.Module) -> dict[str, Any]:
    """`hparams_from_params` of the module's `state_dict`, plus what only its layers say: the
    group count of a dpcnn-shaped module's `gn1` (a `GroupNorm`)."""
    hparams = hparams_from_params(name, module.state_dict())
    gn1 = getattr(module, "gn1", None)
    if name == "dpcnn" and isinstance(gn1, tnn.GroupNorm):
        hparams["groups"] = gn1.num_groups
    return hparams


def build(name: str, hparams: Mapping[str, Any]) -> tnn.Module:
    """An un-initialised module (meta device: no memory, no draws from the global RNG)."""
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(_MODULES))}")
    models.check_hparams(name, hparams)  # by name and kind: a width of 0.5 is no width
    with torch.device("meta"):
        return _MODULES[name](**hparams)
