"""Models as pure functions over flat parameter dicts.

A `Model` is data: a name, its hyperparameters, an `init(generator) -> Params` and an
`apply(params, x, *, train=False, key=None) -> logits`. Parameter names and shapes are
those of the equivalent `nn.Module`'s `state_dict`, so weights move between the two
with `load_state_dict` / `state_dict()` and nothing else.

A *stateful* model (batch norm) says so (`model.stateful`): `init_state()` gives its
buffers under `nn.Module`'s buffer names (`bn1.running_mean`), and `apply` takes `state=` and
returns `(logits, new_state)`. Nothing is written in place; in inference mode the state comes
back unchanged.

Each model is also a list of named `Stage`s; `apply` runs them in order and the trainer's
summary runs them one at a time to report shapes.

`MODELS` maps each model's name to its builder (what `get` takes); `Params` and `ModelState`
are flat `{name: tensor}` dicts, keyed like the `nn.Module`'s `state_dict`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from fashion_func import nn, scattering
from fashion_func.safeio import short_repr

__all__ = ["MODELS", "Model", "ModelState", "Params", "Stage", "get", "num_params"]

Params = dict[str, Tensor]
ModelState = dict[str, Tensor]
StageFn = Callable[..., Any]


@dataclass(frozen=True)
class Stage:
    """One named step of a model's forward pass. fn: `(params, x, train, key) -> x`; with
    `stateful=True` `(params, state, x, train, key) -> (x, {buffer name: new value})`."""

    name: str
    fn: StageFn
    stateful: bool = False

    def run(
        self, params: Params, state: ModelState, x: Tensor, train: bool, key: Tensor | None
    ) -> tuple[Tensor, ModelState]:
        """`(output, state updates)`, whatever kind of stage this is."""
        if self.stateful:
            return self.fn(params, state, x, train, key)
        return self.fn(params, x, train, key), {}


@dataclass(frozen=True)
class Model:
    """A model as two pure functions plus the data that describes it."""

    name: str
    hparams: dict[str, Any]
    init_fn: Callable[..., Params] = field(repr=False)
    stages: tuple[Stage, ...] = field(repr=False)
    input_shape: tuple[int, ...] = (1, 28, 28)
    # `(dtype=, device=) -> ModelState` for a stateful model; None: the model has no state
    init_state_fn: Callable[..., ModelState] | None = field(default=None, repr=False)
    # what its inputs are: "images" (pixels, normalised by the step's preprocess), or the name of a
    # fixed transform of the images computed once, outside the step (`scattering.TRANSFORMS`: "scattering",
    # "scattering_ms", "scattering_ms3"; `scattering.features`)
    inputs: str = "images"

    @property
    def takes_features(self) -> bool:
        """Whether its inputs are a fixed transform of the images (`inputs`), not the images."""
        return self.inputs != "images"

    @property
    def stateful(self) -> bool:
        """Whether `apply` takes `state=` and returns `(logits, new_state)`."""
        return self.init_state_fn is not None

    def init(self, generator: torch.Generator, *, dtype: torch.dtype = torch.float32, device=None) -> Params:
        """Fresh parameters, drawn from `generator` exactly as the `nn.Module` would draw them."""
        return self.init_fn(generator, dtype=dtype, device=device)

    def init_state(self, *, dtype: torch.dtype = torch.float32, device=None) -> ModelState:
        """The initial model state (the `nn.Module`'s buffers); `{}` for a stateless model."""
        return {} if self.init_state_fn is None else self.init_state_fn(dtype=dtype, device=device)

    def apply(
        self,
        params: Params,
        x: Tensor,
        *,
        train: bool = False,
        key: Tensor | None = None,
        state: ModelState | None = None,
    ) -> Any:
        """Logits `[B, classes]` for inputs `x` (`[B, *input_shape]`). A stateful model needs
        `state` and returns `(logits, new_state)`; `new_state` holds every entry of `state`, the
        ones the forward pass changed (train mode) replaced."""
        if not self.stateful and state:
            raise ValueError(f"model {self.name} is stateless; it takes no state")
        if self.stateful and state is None:
            raise ValueError(f"model {self.name} is stateful: pass state= (from model.init_state())")
        new_state = dict(state or {})
        for stage in self.stages:
            x, updates = stage.run(params, new_state, x, train, key)
            new_state.update(updates)
        return (x, new_state) if self.stateful else x

    def __call__(self, params: Params, x: Tensor, **kwargs: Any) -> Any:
        return self.apply(params, x, **kwargs)


def num_params(params: Params) -> int:
    """Total number of scalar parameters."""
    return sum(p.numel() for p in params.values())


def _map(name: str, fn: Callable[[Tensor], Tensor]) -> Stage:
    """A stage without parameters: `x -> fn(x)`."""
    return Stage(name, lambda p, x, train, key: fn(x))


def _conv(name: str, padding: int = 0, *, relu: bool = True, stride: int = 1) -> Stage:
    def fn(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        y = nn.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], stride=stride, padding=padding)
        return nn.relu(y) if relu else y

    return Stage(name, fn)


def _pool(name: str, k: int = 2, stride: int | None = None) -> Stage:
    return _map(name, lambda x: nn.max_pool(x, k, stride))


def _conv_pool_relu(name: str, pool: str, padding: int = 0) -> tuple[Stage, ...]:
    # relu(max_pool(x)) == max_pool(relu(x)) exactly (both are monotone), so pool first:
    # the ReLU and its backward then touch a 4x smaller tensor.
    return (_conv(name, padding, relu=False), _pool(pool), _map(f"{name}.relu", nn.relu))


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _batch_norm(name: str, *, momentum: float = 0.1, eps: float = 1e-5) -> Stage:
    def fn(p: Params, s: ModelState, x: Tensor, train: bool, key: Tensor | None):
        buffers = nn.BatchNormState(*(s[f"{name}.{b}"] for b in BN_BUFFERS))
        y, new = nn.batch_norm(
            x, p[f"{name}.weight"], p[f"{name}.bias"], buffers, train=train, momentum=momentum, eps=eps
        )
        return y, {f"{name}.{b}": v for b, v in zip(BN_BUFFERS, new, strict=True)}

    return Stage(name, fn, stateful=True)


def _group_norm(name: str, num_groups: int) -> Stage:
    def fn(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        return nn.group_norm(x, num_groups, p[f"{name}.weight"], p[f"{name}.bias"])

    return Stage(name, fn)


def _dense(name: str, *, relu: bool, flatten: bool = False) -> Stage:
    """A dense layer; with `flatten`, of `[B, C, H, W]` flattened in C-major order (as
    `torch.flatten(x, 1)`) in the same stage, so that NHWC activations never need a transposing
    copy: for a channels-last input the weight's columns are reordered to (h w c) instead, a
    view of the activation meets a small weight copy, and the gradient flows back NHWC as well."""

    def fn(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        weight, bias = p[f"{name}.weight"], p[f"{name}.bias"]
        nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if flatten and nhwc:
            _, c, h, w = x.shape
            weight = rearrange(weight, "o (c h w) -> o (h w c)", c=c, h=h, w=w)
            x = rearrange(x, "b c h w -> b (h w c)")
        elif flatten:
            x = rearrange(x, "b ... -> b (...)")
        y = nn.linear(x, weight, bias)
        return nn.relu(y) if relu else y

    return Stage(name, fn)


def _dropout(name: str, rate: float, salt: int) -> Stage:
    def fn(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        # each dropout layer draws from its own stream: key folded with a layer salt
        sub = nn.fold_in(key, salt) if key is not None else None
        return nn.dropout(x, rate, key=sub, train=train)

    return Stage(name, fn)


def _init_layers(layers: Mapping[str, tuple[int, ...]]) -> Callable[..., Params]:
    """An init drawing each layer in order, as `nn.Module.__init__` builds them. A layer's
    dims say what it is: `(in, out, k)` a k x k conv, `(in, out)` a linear layer, `(channels,)`
    a norm (weight 1, bias 0, no draws: `nn.BatchNorm2d`, `nn.GroupNorm`)."""

    def init(generator: torch.Generator, *, dtype: torch.dtype = torch.float32, device=None) -> Params:
        params: Params = {}
        for name, dims in layers.items():
            if len(dims) == 3:
                w, b = nn.init_conv2d(generator, *dims, dtype=dtype, device=device)
            elif len(dims) == 1:
                w, b, _ = nn.init_batch_norm(*dims, dtype=dtype, device=device or generator.device)
            else:
                w, b = nn.init_linear(generator, *dims, dtype=dtype, device=device)
            params[f"{name}.weight"], params[f"{name}.bias"] = w, b
        return params

    return init


def _init_bn_state(layers: Mapping[str, int]) -> Callable[..., ModelState]:
    """The buffers of the batch norms `{name: channels}`, as `nn.BatchNorm2d` initialises them."""

    def init_state(*, dtype: torch.dtype = torch.float32, device=None) -> ModelState:
        out: ModelState = {}
        for name, channels in layers.items():
            _, _, buffers = nn.init_batch_norm(channels, dtype=dtype, device=device)
            out.update({f"{name}.{b}": v for b, v in zip(BN_BUFFERS, buffers, strict=True)})
        return out

    return init_state


def mlp(D_in: int = 784, H: int = 100, D_out: int = 10) -> Model:
    """The tutorial's TwoLayerNet: `linear1` (D_in->H), ReLU, `linear2` (H->D_out). Images are
    flattened first, so it also takes `[B, 1, 28, 28]` with D_in=784."""
    # [B, C, H, W] -> [B, C*H*W] in C-major order, as torch.flatten(x, 1) does
    flatten = _map("flatten", lambda x: rearrange(x, "b ... -> b (...)"))
    stages = (flatten, _dense("linear1", relu=True), _dense("linear2", relu=False))
    init = _init_layers({"linear1": (D_in, H), "linear2": (H, D_out)})
    return Model("mlp", {"D_in": D_in, "H": H, "D_out": D_out}, init, stages, input_shape=(D_in,))


def simplenet(num_classes: int = 10) -> Model:
    """The reference network (README, Architecture): 1,199,882 parameters for 10 classes.

    conv1 3x3 1->32, ReLU [B,32,26,26]; conv2 3x3 32->64 [B,64,24,24]; max-pool 2,
    ReLU [B,64,12,12] (pool and ReLU commute; this order is cheaper); fc1: flatten [B,9216],
    9216->128, ReLU; fc2 128->classes.
    """
    stages = (
        _conv("conv1"),
        *_conv_pool_relu("conv2", "pool"),
        _dense("fc1", relu=True, flatten=True),
        _dense("fc2", relu=False),
    )
    layers = {"conv1": (1, 32, 3), "conv2": (32, 64, 3), "fc1": (9216, 128), "fc2": (128, num_classes)}
    return Model("simplenet", {"num_classes": num_classes}, _init_layers(layers), stages)


def simplenet_bn(num_classes: int = 10) -> Model:
    """SimpleNet with batch norm after each convolution, before its ReLU (stateful).

    conv1 3x3 1->32, bn1, ReLU [B,32,26,26]; conv2 3x3 32->64, bn2 [B,64,24,24]; max-pool 2,
    ReLU [B,64,12,12]; fc1 9216->128, ReLU; fc2 128->classes. 1,200,074 parameters plus the
    buffers `bn{1,2}.running_mean`, `.running_var`, `.num_batches_tracked`.
    Pool before ReLU is exact here too: ReLU and max-pool commute, and both come after bn2.
    """
    stages = (
        _conv("conv1", relu=False),
        _batch_norm("bn1"),
        _map("bn1.relu", nn.relu),
        _conv("conv2", relu=False),
        _batch_norm("bn2"),
        _pool("pool"),
        _map("pool.relu", nn.relu),
        _dense("fc1", relu=True, flatten=True),
        _dense("fc2", relu=False),
    )
    convs = {"conv1": (1, 32, 3), "bn1": (32,), "conv2": (32, 64, 3), "bn2": (64,)}
    init = _init_layers({**convs, "fc1": (9216, 128), "fc2": (128, num_classes)})
    bn_state = _init_bn_state({"bn1": 32, "bn2": 64})
    return Model("simplenet_bn", {"num_classes": num_classes}, init, stages, init_state_fn=bn_state)


def alexnet(num_classes: int = 10, dropout: float = 0.5) -> Model:
    """AlexNet adapted to 28x28x1 inputs (3x3 kernels, padding 1, three 2x2 pools).

    conv1 1->64, ReLU, pool [B,64,14,14]; conv2 64->192, ReLU, pool [B,192,7,7];
    conv3 192->384, ReLU; conv4 384->256, ReLU; conv5 256->256, ReLU, pool [B,256,3,3];
    flatten [B,2304]; dropout; fc1 2304->1024, ReLU; dropout; fc2 1024->1024, ReLU;
    fc3 1024->classes.
    """
    stages = (
        *_conv_pool_relu("conv1", "pool1", padding=1),
        *_conv_pool_relu("conv2", "pool2", padding=1),
        _conv("conv3", padding=1),
        _conv("conv4", padding=1),
        *_conv_pool_relu("conv5", "pool3", padding=1),
        # dropout before the flatten is the same elementwise mask (logical index order)
        _dropout("dropout1", dropout, salt=1),
        _dense("fc1", relu=True, flatten=True),
        _dropout("dropout2", dropout, salt=2),
        _dense("fc2", relu=True),
        _dense("fc3", relu=False),
    )
    layers = {"conv1": (1, 64, 3), "conv2": (64, 192, 3), "conv3": (192, 384, 3), "conv4": (384, 256, 3)}
    layers |= {"conv5": (256, 256, 3), "fc1": (2304, 1024), "fc2": (1024, 1024), "fc3": (1024, num_classes)}
    init = _init_layers(layers)
    return Model("alexnet", {"num_classes": num_classes, "dropout": dropout}, init, stages)


def _residual(name: str, blocks: Sequence[Stage]) -> Stage:
    """`x + blocks(x)`: the blocks run in order on the branch, their state updates collected."""

    def fn(p: Params, s: ModelState, x: Tensor, train: bool, key: Tensor | None):
        y, changed = x, {}
        for block in blocks:
            y, updates = block.run(p, s, y, train, key)
            changed.update(updates)
        return x + y, changed

    return Stage(name, fn, stateful=True)


def _conv_bn_relu(name: str, *, pool: bool = False) -> tuple[Stage, ...]:
    """conv 3x3 (padding 1), [max-pool 2], batch norm, ReLU; named `<name>.conv`, `<name>.bn`."""
    pooled = (_pool(f"{name}.pool"),) if pool else ()
    conv, relu = _conv(f"{name}.conv", 1, relu=False), _map(f"{name}.relu", nn.relu)
    return (conv, *pooled, _batch_norm(f"{name}.bn"), relu)


def resnet(num_classes: int = 10, width: int = 16) -> Model:
    """A ResNet-9-style network with batch norm for 28x28x1 images (stateful).

    prep: conv 1->w, bn, ReLU [B,w,28,28]; layer1: conv w->2w, pool, bn, ReLU [B,2w,14,14],
    plus a residual branch of two conv-bn-ReLU (`layer1.res1`, `layer1.res2`); layer2: conv
    2w->4w, pool, bn, ReLU [B,4w,7,7]; layer3: conv 4w->8w, pool, bn, ReLU [B,8w,3,3], plus
    a residual branch; global max-pool [B,8w]; fc 8w->classes. Parameter names are those of
    the plain module `interop.ResNet(width)`.
    """
    w = width
    convs = [("prep", 1, w), ("layer1", w, 2 * w), ("layer1.res1", 2 * w, 2 * w),
             ("layer1.res2", 2 * w, 2 * w), ("layer2", 2 * w, 4 * w), ("layer3", 4 * w, 8 * w),
             ("layer3.res1", 8 * w, 8 * w), ("layer3.res2", 8 * w, 8 * w)]  # fmt: skip
    stages = (
        *_conv_bn_relu("prep"),
        *_conv_bn_relu("layer1", pool=True),
        _residual("layer1.res", (*_conv_bn_relu("layer1.res1"), *_conv_bn_relu("layer1.res2"))),
        *_conv_bn_relu("layer2", pool=True),
        *_conv_bn_relu("layer3", pool=True),
        _residual("layer3.res", (*_conv_bn_relu("layer3.res1"), *_conv_bn_relu("layer3.res2"))),
        _map("pool", lambda x: x.amax(dim=(-2, -1))),  # global max-pool
        _dense("fc", relu=False),
    )
    layers: dict[str, tuple[int, ...]] = {}
    for name, c_in, c_out in convs:  # as the module builds them: each conv, then its bn
        layers |= {f"{name}.conv": (c_in, c_out, 3), f"{name}.bn": (c_out,)}
    init = _init_layers({**layers, "fc": (8 * w, num_classes)})
    bn_state = _init_bn_state({f"{name}.bn": c_out for name, _, c_out in convs})
    return Model("resnet", {"num_classes": num_classes, "width": width}, init, stages, init_state_fn=bn_state)


def dpcnn(num_classes: int = 10, width: int = 16, groups: int = 0) -> Model:
    """The tempered-sigmoid CNN of differentially private training (Papernot et al. 2021: the
    layers of Opacus's MNIST example with tanh) for 28x28x1 images. Stateless, so per-example
    gradients are a `vmap` over single examples.

    conv1 8x8 stride 2 padding 3, 1->w [B,w,14,14], [gn1], tanh, max-pool 2 stride 1
    [B,w,13,13]; conv2 4x4 stride 2, w->2w [B,2w,5,5], [gn2], tanh, max-pool 2 stride 1
    [B,2w,4,4]; fc1: flatten [B,32w], 32w->32, tanh; fc2 32->classes. 26,010 parameters for
    w=16 and 10 classes. `groups` > 0 puts group norm (`groups` groups, each example
    normalised by itself; weight 1, bias 0) after each conv; it must divide w. Parameter
    names are those of the plain module `interop.DPCNN`.
    """
    w = width
    gn1 = (_group_norm("gn1", groups),) if groups else ()
    gn2 = (_group_norm("gn2", groups),) if groups else ()
    stages = (
        _conv("conv1", 3, relu=False, stride=2), *gn1, _map("conv1.tanh", nn.tanh), _pool("pool1", 2, 1),
        _conv("conv2", relu=False, stride=2), *gn2, _map("conv2.tanh", nn.tanh), _pool("pool2", 2, 1),
        _dense("fc1", relu=False, flatten=True), _map("fc1.tanh", nn.tanh),
        _dense("fc2", relu=False),
    )  # fmt: skip
    layers = {"conv1": (1, w, 8), "gn1": (w,), "conv2": (w, 2 * w, 4), "gn2": (2 * w,)}
    layers |= {"fc1": (2 * w * 4 * 4, 32), "fc2": (32, num_classes)}
    init = _init_layers({k: v for k, v in layers.items() if groups or not k.startswith("gn")})
    hparams = {"num_classes": num_classes, "width": width, "groups": groups}
    return Model("dpcnn", hparams, init, stages)


def _scattering_norm(kind: str) -> Callable[[Tensor], Tensor]:
    """Per-example group norm of each scale's block of transform `kind`'s features
    (`scattering.blocks`: the J=2 channels in groups of 3, J=1's in groups of 3 of its 14x14
    channels, J=3's in groups of 31), no affine parameters, no running statistics: `[B, *shape]` ->
    `[B, features]`. A group is contiguous in the flattened features, so each block is viewed
    `[B, groups, features / groups]` and normalised with one channel per group."""
    sizes, groups = zip(*scattering.blocks(kind), strict=True)

    def norm(x: Tensor) -> Tensor:
        parts = torch.flatten(x, 1).split(list(sizes), dim=1)
        normed = [
            nn.group_norm(rearrange(p, "b (g f) -> b g f", g=g), g)
            for p, g in zip(parts, groups, strict=True)
        ]
        return torch.cat([n.flatten(1) for n in normed], dim=1)

    return norm


def _scatternet(name: str, kind: str, num_classes: int) -> Model:
    """The linear classifier of transform `kind`'s features: `_scattering_norm`, then `fc`."""
    init = _init_layers({"fc": (sum(size for size, _ in scattering.blocks(kind)), num_classes)})
    stages = (_map("gn", _scattering_norm(kind)), _dense("fc", relu=False, flatten=True))
    hparams = {"num_classes": num_classes}
    return Model(name, hparams, init, stages, input_shape=scattering.shape(kind), inputs=kind)


def scatternet(num_classes: int = 10) -> Model:
    """A linear classifier on ScatterNet features (Tramèr & Boneh 2021; `scattering.features`),
    stateless and per-example. Takes `[B, 81, 7, 7]`: group norm (27 groups of 3 channels, each
    example by itself, no affine parameters, no running statistics), flatten [B, 3969], `fc`
    3969->classes. 39,700 parameters for 10 classes; the plain module is `interop.ScatterNet`."""
    return _scatternet("scatternet", "scattering", num_classes)


def scatternet_ms(num_classes: int = 10) -> Model:
    """`scatternet` on multi-scale ScatterNet features (`scattering.features(..., "scattering_ms")`):
    the J=2 scattering's 81 channels of 7x7 and the J=1 scattering's 9 channels of 14x14 (as 36 of
    7x7). Takes `[B, 117, 7, 7]`: per-example group norm of each scale (the 81 J=2 channels in 27
    groups, the 36 J=1 ones in 3), flatten [B, 5733], `fc` 5733->classes. 57,340 parameters for 10
    classes; the plain module is `interop.ScatterNetMS`."""
    return _scatternet("scatternet_ms", "scattering_ms", num_classes)


def scatternet_ms3(num_classes: int = 10) -> Model:
    """`scatternet_ms` with the coarser J=3 scale too (`"scattering_ms3"`: its 217 channels of 3x3).
    Takes the flat `[B, 7686]` (J=2's 3969, J=1's 1764, J=3's 1953 features): per-example group
    norm of each scale (27, 3 and 7 groups), `fc` 7686->classes. 76,870 parameters for 10 classes;
    the plain module is `interop.ScatterNetMS3`."""
    return _scatternet("scatternet_ms3", "scattering_ms3", num_classes)


MODELS: dict[str, Callable[..., Model]] = {
    "mlp": mlp,
    "simplenet": simplenet,
    "simplenet_bn": simplenet_bn,
    "alexnet": alexnet,
    "resnet": resnet,
    "dpcnn": dpcnn,
    "scatternet": scatternet,
    "scatternet_ms": scatternet_ms,
    "scatternet_ms3": scatternet_ms3,
}


# Each model's hyperparameters by name and kind (`check_hparams` holds what a file or a caller
# passes to it): a "classes" count is at least 2 (one class is no classifier), a dropout "rate"
# below 1 (a rate of 1 drops everything), a group norm's "groups" count divides the width.
HPARAMS: dict[str, dict[str, str]] = {
    "mlp": {"D_in": "size", "H": "size", "D_out": "classes"},
    "simplenet": {"num_classes": "classes"},
    "simplenet_bn": {"num_classes": "classes"},
    "alexnet": {"num_classes": "classes", "dropout": "rate"},
    "resnet": {"num_classes": "classes", "width": "size"},
    "dpcnn": {"num_classes": "classes", "width": "size", "groups": "groups"},
    "scatternet": {"num_classes": "classes"},
    "scatternet_ms": {"num_classes": "classes"},
    "scatternet_ms3": {"num_classes": "classes"},
}
MAX_SIZE = 1 << 16  # a width or class count beyond any model of ours: refused, never allocated
NUM_CLASSES = {"mlp": "D_out"}  # the hparam that counts the classes, where it is not num_classes


def check_hparams(name: str, hparams: Mapping[str, Any]) -> None:
    """ValueError (one line, naming the hparam) unless every hparam of `hparams` is of its kind
    (`HPARAMS`); TypeError, as for any unknown keyword, for one model `name` does not take."""
    kinds = HPARAMS.get(name)
    if kinds is None:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    for key, value in hparams.items():
        kind = kinds.get(key)
        if kind is None:
            takes = ", ".join(kinds)
            raise TypeError(f"model {name} has no hyperparameter {short_repr(key)} (it takes {takes})")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if kind == "rate":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
            want = "a number in [0, 1)"
        else:
            lo = {"classes": 2, "groups": 0}.get(kind, 1)
            ok, want = is_int and lo <= value <= MAX_SIZE, f"an integer from {lo} to {MAX_SIZE}"
            want += " (0: no group norm)" if kind == "groups" else ""
        if not ok:
            raise ValueError(f"model {name}: {key} must be {want}, got {short_repr(value)}")
    _check_groups(name, kinds, hparams)


def _check_groups(name: str, kinds: Mapping[str, str], hparams: Mapping[str, Any]) -> None:
    """ValueError unless a group count divides the width (and so 2*width: both convs' channels)."""
    defaults = inspect.signature(MODELS[name]).parameters
    for key in (k for k, kind in kinds.items() if kind == "groups"):
        groups, width = (hparams.get(k, defaults[k].default) for k in (key, "width"))
        if groups and width % groups:
            raise ValueError(
                f"model {name}: {key} must divide width ({width}) and 2*width, got {short_repr(groups)}"
            )


def num_classes(model: Model) -> int:
    """The number of classes `model` predicts."""
    return int(model.hparams[NUM_CLASSES.get(model.name, "num_classes")])


def get(name: str, **hparams: Any) -> Model:
    """The model called `name` built with `hparams`; ValueError naming the choices, or the
    hyperparameter that is not of its kind (`check_hparams`), otherwise."""
    check_hparams(name, hparams)  # an unknown name too: HPARAMS has a row for each model
    return MODELS[name](**hparams)
