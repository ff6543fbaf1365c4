"""Reference `nn.Module`s written out independently of the library, for the tests to compare with.

SimpleNet is the README's reference network; SimpleNetBN the same with `nn.BatchNorm2d` after
each convolution (before its ReLU); TwoLayerNet the tutorial's; AlexNet the
28x28x1 adaptation documented in `fashion_func.models.alexnet`.
"""

from __future__ import annotations

import torch
from torch import nn as tnn

from fashion_func import data, models, optim, step, tree
from fashion_func import state as state_lib


def briefly_trained_simplenet(limit: int, lr: float) -> dict[str, torch.Tensor]:
    """SimpleNet params after one epoch of Adam on the first `limit` training images."""
    model = models.get("simplenet")
    tx = optim.adam(lr)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0)
    train_step = step.make_train_step(model, tx, compile=False)
    for batch in data.batches(data.load("train", limit=limit), 128, seed=0, epoch=1):
        st, _ = train_step(st, batch)
    return st.params


def clone_tree(t):
    """A deep copy of a tree of tensors (to check that a step left its input untouched)."""
    return tree.map(lambda x: x.clone(), t)


def assert_tree_equal(a, b) -> None:
    """Same paths, bitwise-equal leaves."""
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def assert_tree_close(a, b, **tol) -> None:
    """Same paths, leaves equal within `tol` (torch.testing.assert_close), naming the leaf."""
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def assert_argmax_agrees(pred, scores, tol: float) -> None:
    """`pred` is `scores.argmax(-1)` wherever the top two scores differ by more than `tol`: two
    computations of the scores, each within `tol/2` of the other, may only swap a closer pair."""
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > tol
    assert float(clear.double().mean()) >= 0.9, "too many near-ties to check the argmax"
    assert torch.equal(pred[clear], scores.argmax(-1)[clear]), int((pred != scores.argmax(-1))[clear].sum())


class TwoLayerNet(tnn.Module):
    def __init__(self, D_in: int, H: int, D_out: int) -> None:
        super().__init__()
        self.linear1 = tnn.Linear(D_in, H)
        self.linear2 = tnn.Linear(H, D_out)

    def forward(self, x):
        return self.linear2(self.linear1(torch.flatten(x, 1)).clamp(min=0))


class SimpleNet(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 32, 3)
        self.conv2 = tnn.Conv2d(32, 64, 3)
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.flatten(torch.max_pool2d(x, 2), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class AlexNet(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = tnn.Conv2d(64, 192, 3, padding=1)
        self.conv3 = tnn.Conv2d(192, 384, 3, padding=1)
        self.conv4 = tnn.Conv2d(384, 256, 3, padding=1)
        self.conv5 = tnn.Conv2d(256, 256, 3, padding=1)
        self.fc1 = tnn.Linear(2304, 1024)
        self.fc2 = tnn.Linear(1024, 1024)
        self.fc3 = tnn.Linear(1024, 10)
        self.drop = tnn.Dropout(0.5)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.conv4(x))
        x = torch.max_pool2d(torch.relu(self.conv5(x)), 2)
        x = self.drop(torch.flatten(x, 1))
        x = self.drop(torch.relu(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


class SimpleNetBN(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 32, 3)
        self.bn1 = tnn.BatchNorm2d(32)
        self.conv2 = tnn.Conv2d(32, 64, 3)
        self.bn2 = tnn.BatchNorm2d(64)
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(torch.max_pool2d(x, 2), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class ResNet(tnn.Module):
    """Written from models.resnet's docstring, independently of interop.ResNet: conv-bn-ReLU
    blocks (pool between conv and bn in layer1-3), residual branches after layer1 and layer3."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        names = [("prep", 1, w), ("layer1", w, 2 * w), ("layer1.res1", 2 * w, 2 * w),
                 ("layer1.res2", 2 * w, 2 * w), ("layer2", 2 * w, 4 * w), ("layer3", 4 * w, 8 * w),
                 ("layer3.res1", 8 * w, 8 * w), ("layer3.res2", 8 * w, 8 * w)]  # fmt: skip
        self.blocks = tnn.ModuleDict()
        for name, c_in, c_out in names:
            self.blocks[name.replace(".", "_")] = tnn.Sequential(
                tnn.Conv2d(c_in, c_out, 3, padding=1), tnn.BatchNorm2d(c_out)
            )
        self.fc = tnn.Linear(8 * w, num_classes)

    def _block(self, name, x, pool=False):
        conv, bn = self.blocks[name]
        x = conv(x)
        return torch.relu(bn(torch.max_pool2d(x, 2) if pool else x))

    def forward(self, x):
        x = self._block("prep", x)
        x = self._block("layer1", x, pool=True)
        x = x + self._block("layer1_res2", self._block("layer1_res1", x))
        x = self._block("layer2", x, pool=True)
        x = self._block("layer3", x, pool=True)
        x = x + self._block("layer3_res2", self._block("layer3_res1", x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_max_pool2d(x, 1), 1))

    @staticmethod
    def key(name: str) -> str:
        """Our parameter name -> this module's state_dict name."""
        if name.startswith("fc."):
            return name
        layer, kind, leaf = name.rsplit(".", 2)
        return f"blocks.{layer.replace('.', '_')}.{0 if kind == 'conv' else 1}.{leaf}"


class DPCNN(tnn.Module):
    """Written from models.dpcnn's docstring, independently of interop.DPCNN: Papernot et al.'s
    tempered-sigmoid CNN (Opacus's MNIST SampleConvNet with tanh), group norm when `groups`."""

    def __init__(self, num_classes: int = 10, width: int = 16, groups: int = 0) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, width, 8, 2, padding=3)
        if groups:
            self.gn1 = tnn.GroupNorm(groups, width)
        self.conv2 = tnn.Conv2d(width, 2 * width, 4, 2)
        if groups:
            self.gn2 = tnn.GroupNorm(groups, 2 * width)
        self.fc1 = tnn.Linear(2 * width * 4 * 4, 32)
        self.fc2 = tnn.Linear(32, num_classes)
        self.groups = groups

    def forward(self, x):
        x = self.conv1(x)
        x = torch.max_pool2d(torch.tanh(self.gn1(x) if self.groups else x), 2, 1)
        x = self.conv2(x)
        x = torch.max_pool2d(torch.tanh(self.gn2(x) if self.groups else x), 2, 1)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))
