"""Weights that load anywhere: plain `torch.nn.Module`s, JAX/Flax, numpy, DLPack.

- `to_module(name, params)` / `from_module(module)`: our params <-> a plain PyTorch module of a
  known architecture (same `state_dict` keys, forward equal to `Model.apply`).
- Stateful models (batch norm: `simplenet_bn`): their *weights* are params and buffers in one
  flat dict under the module's `state_dict` names (`bn1.weight`, `bn1.running_mean`,
  `bn1.num_batches_tracked`), as `best.safetensors` holds them, so
  `module.load_state_dict(safetensors.torch.load_file(p), strict=True)` works. `split_state` /
  `merge_state` go between that dict and `(params, model_state)` for `Model.apply`.
- `functionalize(module)`: any research `nn.Module` as a `Model` (through
  `torch.func.functional_call`), so `make_train_step` / `make_eval_step` drive it.
- `to_flax` / `from_flax` / `save_flax` / `load_flax`: Flax layout and naming
  (`{"conv1": {"kernel": HWIO, "bias"}}`, dense kernels `[in, out]`, batch norm `scale`, `bias`,
  `mean`, `var`), stored as safetensors with dotted keys (`conv1.kernel`) that `safetensors.flax`
  and `safetensors.numpy` read; `flax_variables` splits a tree into Flax's `params` and
  `batch_stats` collections. The dense layer after a conv stack gets its rows in the (h w c)
  order of an NHWC `x.reshape((B, -1))` (metadata `flatten: "hwc"`; older files: torch's "chw").
- `flax_module(name)`: our models as idiomatic `flax.linen` modules for those weights.
- `simplenet_jax`: a pure-JAX SimpleNet forward that runs on the exported weights.
- `save_onnx`: an ONNX model (uint8 images in, normalisation inside, logits out) for ONNX
  Runtime; `normalization(metadata)`: the (mean, std) a weights file's model was trained with.
- `to_jax` / `from_jax`: zero-copy tensor exchange through DLPack where both sides allow.
- `load_weights_file`: a validated weights file plus the model its metadata names.

JAX/Flax and ONNX are optional extras (`pip install fashion_func[jax]`, `fashion_func[onnx]`):
they are imported only inside the functions that need them. Nothing in the core imports this module.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch import nn as tnn

from fashion_func import checkpoint, data, models
from fashion_func.models import Model, ModelState, Params, Stage

__all__ = [
    "BF16_AS",
    "FLATTEN_ORDERS",
    "FLAX_LAYOUT",
    "MLP",
    "ONNX_INPUT",
    "ONNX_OUTPUT",
    "AlexNet",
    "ResNet",
    "SimpleNet",
    "SimpleNetBN",
    "flax_module",
    "flax_variables",
    "from_flax",
    "from_jax",
    "from_module",
    "functionalize",
    "identify",
    "known_normalization",
    "load_flax",
    "load_weights_file",
    "merge_state",
    "normalization",
    "save_flax",
    "save_numpy",
    "save_onnx",
    "simplenet_jax",
    "split_state",
    "to_flax",
    "to_jax",
    "to_module",
    "to_numpy",
]

Bf16As = Literal["float32", "uint16", "bfloat16"]
BF16_AS: tuple[str, ...] = ("float32", "uint16", "bfloat16")
# row order of the dense layer after a conv stack in Flax layout: (h w c) as an NHWC reshape
# gives (the default, recorded as `flatten: "hwc"`), or torch's (c h w) of files written before
Flatten = Literal["hwc", "chw"]
FLATTEN_ORDERS: tuple[str, ...] = ("hwc", "chw")
FLAX_LAYOUT = "flax"  # the `layout` metadata value of files written by `save_flax`


# -- plain PyTorch modules with our parameter names ------------------------------------------


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

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 32, 3)
        self.conv2 = tnn.Conv2d(32, 64, 3)
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))  # [B, 32, 26, 26]
        x = F.relu(self.conv2(x))  # [B, 64, 24, 24]
        x = torch.flatten(F.max_pool2d(x, 2), 1)  # [B, 64*12*12], (c h w) order
        return self.fc2(F.relu(self.fc1(x)))


class SimpleNetBN(tnn.Module):
    """SimpleNet with batch norm after each convolution, before its ReLU, as `models.simplenet_bn`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 32, 3)
        self.bn1 = tnn.BatchNorm2d(32)
        self.conv2 = tnn.Conv2d(32, 64, 3)
        self.bn2 = tnn.BatchNorm2d(64)
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, 32, 26, 26]
        x = F.relu(self.bn2(self.conv2(x)))  # [B, 64, 24, 24]
        x = torch.flatten(F.max_pool2d(x, 2), 1)  # [B, 64*12*12], (c h w) order
        return self.fc2(F.relu(self.fc1(x)))


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


_MODULES: dict[str, type[tnn.Module]] = {
    "mlp": MLP,
    "simplenet": SimpleNet,
    "simplenet_bn": SimpleNetBN,
    "alexnet": AlexNet,
    "resnet": ResNet,
}


def _hparams_from_params(name: str, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """The constructor arguments a params dict implies (class counts, widths), read off its shapes."""
    try:
        if name == "mlp":
            h, d_in = params["linear1.weight"].shape
            return {"D_in": d_in, "H": h, "D_out": params["linear2.weight"].shape[0]}
        if name in ("simplenet", "simplenet_bn"):
            return {"num_classes": params["fc2.weight"].shape[0]}
        if name == "alexnet":
            return {"num_classes": params["fc3.weight"].shape[0]}
        if name == "resnet":
            return {"num_classes": params["fc.weight"].shape[0], "width": params["prep.conv.weight"].shape[0]}
    except (KeyError, ValueError):
        pass  # wrong keys or ranks: the shape check in _build names the problem
    return {}


def _build(name: str, hparams: Mapping[str, Any]) -> tnn.Module:
    """An un-initialised module (meta device: no memory, no draws from the global RNG)."""
    if name not in _MODULES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(_MODULES))}")
    with torch.device("meta"):
        return _MODULES[name](**hparams)


def _check_shapes(name: str, module: tnn.Module, params: Mapping[str, Tensor]) -> None:
    """ValueError unless `params` has exactly the module's `state_dict` names, shapes and kinds."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in params]
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        buffers = {k for k, _ in module.named_buffers()}
        hint = (
            "; a stateful model's weights hold its buffers too: pass interop.merge_state(params, model_state)"
            if missing and set(missing) <= buffers
            else ""
        )
        raise ValueError(
            f"params do not match {name}: missing keys {missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    for k, v in expected.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise ValueError(
                f"params do not match {name}: {k!r} has shape {list(params[k].shape)}, not {list(v.shape)}"
            )
        # a float counter would load (assign=True takes the given tensor) and then count in floats
        if params[k].is_floating_point() != v.is_floating_point():
            raise ValueError(f"params do not match {name}: {k!r} has dtype {params[k].dtype}, not {v.dtype}")


def _template(
    name: str,
    hparams: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    buffer_dtype: torch.dtype | None = None,
) -> Params:
    """Meta tensors with the names, order, shapes and dtypes of the model's weights (nothing drawn).

    Weights are the module's `state_dict`: parameters, then for a stateful model its buffers too.
    Floating parameters get `dtype`, floating buffers (running statistics) `buffer_dtype`
    (default `dtype`); integer buffers (`num_batches_tracked`, int64) keep their own dtype.
    """
    module = _build(name, hparams)
    buffers = {k for k, _ in module.named_buffers()}

    def dtype_of(k: str, v: Tensor) -> torch.dtype:
        if not v.is_floating_point():
            return v.dtype
        return (buffer_dtype or dtype) if k in buffers else dtype

    return {
        k: torch.empty(v.shape, dtype=dtype_of(k, v), device="meta") for k, v in module.state_dict().items()
    }


def split_state(model: Model, weights: Mapping[str, Tensor]) -> tuple[Params, ModelState]:
    """`(params, model_state)` of a weights dict holding both (a stateful model's weights file).

    The state is the entries named like `model.init_state()`'s keys (`bn1.running_mean`, ...),
    the params everything else, each in `weights`' order; nothing is copied. A stateless model
    gives `(dict(weights), {})`. ValueError when a buffer of a stateful model is missing.
    """
    state_keys = model.init_state(device="meta").keys()  # names only: nothing allocated
    missing = [k for k in state_keys if k not in weights]
    if missing:
        raise ValueError(
            f"weights of {model.name} lack its buffers {missing[:5]}: a stateful model's weights hold "
            "params and buffers together ({**params, **model_state})"
        )
    params = {k: v for k, v in weights.items() if k not in state_keys}
    return params, {k: v for k, v in weights.items() if k in state_keys}


def merge_state(params: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> Params:
    """One weights dict `{**params, **model_state}`, as a weights file holds it.

    The inverse of `split_state`. ValueError when a name is in both (a buffer would silently
    replace a param).
    """
    both = sorted(set(params) & set(model_state))
    if both:
        raise ValueError(f"names both in params and model_state: {both[:5]}")
    return {**params, **model_state}


def identify(params: Mapping[str, Tensor]) -> str:
    """The name of the known architecture whose weight names and shapes `params` has.

    For a stateful model `params` are its weights, buffers included (`bn1.running_mean`, as the
    module's `state_dict`), which also tells `simplenet_bn` from `simplenet`. Raises ValueError
    when no model in `models.MODELS` matches.
    """
    for name in _MODULES:
        try:
            _check_shapes(name, _build(name, _hparams_from_params(name, params)), params)
        except (ValueError, TypeError):
            continue
        return name
    shown = ", ".join(list(params)[:6])
    raise ValueError(
        f"parameters [{shown}] match none of the known models ({', '.join(_MODULES)}); "
        "use interop.functionalize(module) for other architectures"
    )


def to_module(model_name: str, params: Mapping[str, Tensor], **hparams: Any) -> tnn.Module:
    """A plain PyTorch module (eval mode) holding copies of `params`, whose forward equals `apply`.

    For a stateful model `params` are its weights: params and buffers in one dict (`merge_state`),
    loaded strictly, so the module's eval-mode forward equals `apply(..., state=)`.
    Hyperparameters (class count, widths) are read off the parameter shapes unless given.
    The module owns its tensors: training it never changes `params`.
    """
    hp = {**_hparams_from_params(model_name, params), **hparams}
    module = _build(model_name, hp)
    _check_shapes(model_name, module, params)
    # assign=True swaps the meta tensors for real ones; the clones keep the caller's params out
    # of reach of in-place optimizers working on the module.
    module.load_state_dict({k: v.detach().clone() for k, v in params.items()}, strict=True, assign=True)
    return module.eval()


def from_module(module: tnn.Module, *, check: bool = True) -> Params:
    """Weights (detached copies) of a module whose architecture is known (see `identify`).

    For a stateless model these are its params; for a stateful one (batch norm) params and
    buffers together, under the module's `state_dict` names (`split_state` separates them).
    The architecture is recognised by weight names and shapes; with `check` the module's
    forward is also compared with `Model.apply` on a fixed input (in eval mode, so with the
    running statistics), and a module with the same names but another computation is refused
    (ValueError).
    """
    sd = module.state_dict()
    name = identify(sd)
    hparams = _hparams_from_params(name, sd)
    model = models.get(name, **hparams)
    weights = {k: sd[k].detach().clone() for k in _template(name, hparams)}
    if check:
        _check_forward(module, name, model, weights)
    return weights


def _check_forward(module: tnn.Module, name: str, model: Model, weights: Params) -> None:
    """ValueError unless the module's eval-mode forward equals `model.apply` on a fixed input.

    A stateful model is compared with its own buffers and again with perturbed running statistics
    (through `functional_call`, so the module is not written): freshly initialised statistics
    (mean 0, var 1) make eval-mode batch norm nearly the identity, which would hide a module that
    normalises in another place.
    """
    params, state = split_state(model, weights)
    p0 = next(iter(params.values()))
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, *model.input_shape), generator=g).to(p0.device, p0.dtype)
    trials = [state]
    if state:
        perturbed = dict(state)
        for k, v in state.items():
            if k.endswith(".running_mean"):
                perturbed[k] = v + torch.randn(v.shape, generator=g).to(v)
            elif k.endswith(".running_var"):  # stays positive: scaled by U(0.5, 2)
                perturbed[k] = v * (0.5 + 1.5 * torch.rand(v.shape, generator=g).to(v))
        trials.append(perturbed)
    tol = 1e-3 if p0.dtype in (torch.float16, torch.bfloat16) else 1e-5
    was_training = module.training
    module.eval()
    try:
        for buffers in trials:
            with torch.no_grad():
                if model.stateful:
                    got = torch.func.functional_call(module, buffers, (x,))
                    expected, _ = model.apply(params, x, state=buffers)
                else:
                    got, expected = module(x), model.apply(params, x)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol):
                raise ValueError(
                    f"{type(module).__name__} has the parameters of {name} but computes something else; "
                    "use interop.functionalize(module) to run it as it is"
                )
    finally:
        module.train(was_training)


def functionalize(module: tnn.Module, *, name: str | None = None) -> tuple[Model, Params]:
    """Any `nn.Module` as a `Model` plus copies of its parameters, via `torch.func.functional_call`.

    For research code that keeps its own module: `make_train_step(model, ...)` then trains the
    returned params functionally. `apply(params, x, train=...)` runs the module's own forward
    with `params` swapped in and the module in train/eval mode for the call. Buffers are read from
    the module as constants (not trained); a module that writes its buffers in training (batch
    norm's running statistics) writes into its own, so use eval mode or a `models` model for those.
    Randomness inside the module (dropout) draws from torch's global RNG, not from `key`.
    `init` ignores its generator and returns copies of the module's current parameters.
    """
    params = {k: p.detach().clone() for k, p in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def forward(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        was_training = module.training
        module.train(train)
        try:
            return torch.func.functional_call(module, (p, buffers), (x,), strict=True)
        finally:
            module.train(was_training)

    def init(generator: torch.Generator, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Params:
        return {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).clone()
            for k, v in params.items()
        }

    model = Model(name or type(module).__name__, {}, init, (Stage("module", forward),))
    return model, {k: v.clone() for k, v in params.items()}


# -- loading a weights file -----------------------------------------------------------------


def load_weights_file(
    path: str | os.PathLike[str], model_name: str | None = None, *, device: torch.device | str = "cpu"
) -> tuple[Model, Params, dict[str, Any]]:
    """(model, weights, metadata) of a weights file, validated against the model's weights.

    The model is `model_name` if given, else the `model` entry of the file's metadata (as
    `fit` writes into best.safetensors). The weights are the model's params, and for a stateful
    model its buffers too (one dict, as the file holds them; `split_state` separates them).
    Weights stored in another floating dtype (bf16, fp16) are accepted and returned as stored;
    a stateful model's floating buffers may be stored in a dtype of their own (float32 running
    statistics beside bf16 params). Raises `checkpoint.CheckpointError` (one line) for a
    missing or bad file, a train-state file, an unknown model or weights of another model.
    """
    info = checkpoint.inspect(path)  # validates the header; CheckpointError if missing or bad
    if info.format == checkpoint.STATE_FORMAT:
        raise checkpoint.CheckpointError(
            f"{path}: is a whole train state (last.safetensors), not a weights file; "
            "pass a weights file such as checkpoints/best.safetensors"
        )
    name = model_name or info.metadata.get("model")
    if not isinstance(name, str) or not name:
        raise checkpoint.CheckpointError(f"{path}: no model name in the file's metadata; pass --model NAME")
    try:
        model = models.get(name)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{path}: {e}") from None
    state_keys = model.init_state(device="meta").keys()

    def stored_dtype(buffers: bool) -> torch.dtype:
        # Only floating tensors say what the weights were saved in: num_batches_tracked is int64
        # whatever the precision. A file of mixed float dtypes is checked against float32 and
        # refused with a message naming the first mismatch.
        found = {
            dt for k, (dt, _) in info.tensors.items() if dt.is_floating_point and (k in state_keys) == buffers
        }
        return found.pop() if len(found) == 1 else torch.float32

    template = _template(model.name, model.hparams, stored_dtype(False), stored_dtype(True))
    params, metadata = checkpoint.load_weights(path, template=template, device=device)
    return model, params, metadata


# -- numpy and Flax layout ------------------------------------------------------------------


def _check_bf16_as(bf16_as: str) -> None:
    if bf16_as not in BF16_AS:
        raise ValueError(f"bf16_as must be one of {', '.join(BF16_AS)}, not {bf16_as!r}")


def _ml_bfloat16() -> Any:
    try:
        import ml_dtypes  # comes with jax; numpy itself has no bfloat16
    except ImportError:
        raise ValueError("bf16_as='bfloat16' needs the ml_dtypes package (installed with jax)") from None
    return ml_dtypes.bfloat16


def _tensor_to_numpy(t: Tensor, bf16_as: str) -> np.ndarray:
    """A C-contiguous host copy; bfloat16 becomes float32 (exact), its uint16 bits, or ml_dtypes bf16."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype != torch.bfloat16:
        return t.numpy().copy()
    if bf16_as == "float32":
        return t.float().numpy()
    bits = t.view(torch.int16).numpy().view(np.uint16).copy()  # the raw bf16 bit patterns
    return bits if bf16_as == "uint16" else bits.view(_ml_bfloat16())


def _numpy_to_tensor(a: Any, *, bf16_bits: bool = False) -> Tensor:
    """A torch copy of a numpy/JAX array; uint16 bit patterns back to bfloat16 when `bf16_bits`."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes: torch.from_numpy does not know it
        a, bf16_bits = a.view(np.uint16), True
    if bf16_bits:
        if a.dtype != np.uint16:
            raise ValueError(f"bf16 bit patterns must be uint16, got {a.dtype}")
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def to_numpy(params: Mapping[str, Tensor], *, bf16_as: Bf16As = "float32") -> dict[str, np.ndarray]:
    """Params as numpy arrays, same names and (torch) layout; see `to_flax` for `bf16_as`."""
    _check_bf16_as(bf16_as)
    return {k: _tensor_to_numpy(v, bf16_as) for k, v in params.items()}


# torch buffer / Flax leaf names of a batch-norm layer's running statistics (Flax keeps them in
# the `batch_stats` collection, the affine `scale` and `bias` in `params`)
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_BN_STATS_BACK = {v: k for k, v in _BN_STATS.items()}
_COUNTER = "num_batches_tracked"  # nn.BatchNorm's step counter: no Flax counterpart


def _flax_leaf(key: str, t: Tensor) -> tuple[list[str], Tensor] | None:
    """(Flax path, array) of one torch tensor: `conv1.weight` -> (["conv1", "kernel"], HWIO).

    None for `num_batches_tracked`, which Flax's BatchNorm does not have.
    """
    *path, leaf = key.split(".")
    if leaf == _COUNTER and t.ndim == 0:
        return None
    if leaf == "bias" and t.ndim == 1:
        return [*path, "bias"], t
    if leaf == "weight" and t.ndim == 1:
        # a norm layer's affine weight: flax.linen.BatchNorm / LayerNorm call it `scale`
        return [*path, "scale"], t
    if leaf in _BN_STATS and t.ndim == 1:
        return [*path, _BN_STATS[leaf]], t
    if leaf == "weight" and t.ndim == 4:
        # nn.Conv2d's OIHW -> Flax/lax HWIO (used with dimension_numbers NHWC, HWIO, NHWC)
        return [*path, "kernel"], rearrange(t, "o i h w -> h w i o")
    if leaf == "weight" and t.ndim == 2:
        # nn.Linear computes x @ W.T with W [out, in]; flax.linen.Dense computes x @ kernel, [in, out]
        return [*path, "kernel"], rearrange(t, "o i -> i o")
    raise ValueError(f"no Flax equivalent known for parameter {key!r} of shape {list(t.shape)}")


def _check_flatten(flatten: str) -> None:
    if flatten not in FLATTEN_ORDERS:
        raise ValueError(f"flatten must be one of {', '.join(FLATTEN_ORDERS)}, not {flatten!r}")


@functools.lru_cache(maxsize=32)
def _flatten_inputs(name: str, hparams: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, int, int]]:
    """`{dense layer: (c, h, w)}` of the model's dense layers that take a flattened conv feature map.

    Read off the model itself: its stages run on meta tensors (shapes only, nothing computed),
    and a stage named like a dense layer (`fc1.weight` 2-D) that receives a `[B, C, H, W]`
    input flattens it. simplenet and simplenet_bn: `{"fc1": (64, 12, 12)}`; alexnet:
    `{"fc1": (256, 3, 3)}`; mlp: `{}` (no conv).
    """
    model = models.get(name, **dict(hparams))
    weights = _template(name, dict(hparams))
    state = model.init_state(device="meta")
    x = torch.empty((1, *model.input_shape), device="meta")
    found: dict[str, tuple[int, int, int]] = {}
    for stage in model.stages:
        w = weights.get(f"{stage.name}.weight")
        if x.dim() == 4 and w is not None and w.dim() == 2:
            c, h, w_ = x.shape[1:]
            found[stage.name] = (int(c), int(h), int(w_))
        x, _ = stage.run(weights, state, x, False, None)
    return found


def _flatten_layers(params: Mapping[str, Tensor], model: str | None) -> dict[str, tuple[int, int, int]]:
    """The flatten-then-dense layers of `params`' architecture (`model`, else `identify`d); {} if unknown."""
    if model is None:
        try:
            model = identify(params)
        except ValueError:
            return {}  # not a known architecture: no layer is known to follow a flatten
    hparams = _hparams_from_params(model, params)
    _check_shapes(model, _build(model, hparams), params)
    return _flatten_inputs(model, tuple(sorted(models.get(model, **hparams).hparams.items())))


def to_flax(
    params: Mapping[str, Tensor],
    *,
    bf16_as: Bf16As = "float32",
    flatten: Flatten = "hwc",
    model: str | None = None,
) -> dict[str, Any]:
    """Weights in Flax layout and naming, as nested dicts of numpy arrays.

    `conv1.weight` OIHW -> `{"conv1": {"kernel": HWIO}}`, `fc1.weight` [out, in] ->
    `{"fc1": {"kernel": [in, out]}}`, biases unchanged.

    The first dense layer after a conv stack (fc1 of simplenet, simplenet_bn, alexnet) takes a
    flattened feature map. Torch flattens `[B, C, H, W]` channel-major, (c h w); a Flax module
    flattens NHWC with `x.reshape((B, -1))`, (h w c). With `flatten="hwc"` (the default) that
    kernel's rows are written in (h w c) order, so the idiomatic Flax module (`flax_module`)
    computes the torch logits; `flatten="chw"` keeps torch's order (files written before this
    option), for code that flattens with `rearrange(x, "b h w c -> b (c h w)")`. The feature
    map's (c, h, w) comes from the architecture, `model` or else recognised from the names and
    shapes (`identify`); weights of an unknown architecture are converted layer by layer with
    no row reordering.

    Batch norm (a stateful model's weights, buffers included) maps to `flax.linen.BatchNorm`'s
    names, all under the layer's key in this one tree:

        bn1.weight -> bn1.scale    bn1.running_mean -> bn1.mean    bn1.num_batches_tracked: dropped
        bn1.bias   -> bn1.bias     bn1.running_var  -> bn1.var     (Flax has no step counter)

    Flax keeps `scale`/`bias` in the `params` collection and `mean`/`var` in `batch_stats`;
    `flax_variables(tree)` makes that split. In eval mode (`use_running_average=True`, epsilon
    1e-5 as torch) the layer then computes what `nn.BatchNorm2d.eval()` does. To keep training
    in Flax as torch did, use `momentum=0.9` (Flax's is the weight of the old statistics, torch's
    0.1 that of the new batch); Flax updates `var` with the biased batch variance, torch with the
    unbiased one.

    numpy has no bfloat16, so bf16 tensors become, by `bf16_as`: "float32" (exact upcast, loads
    everywhere; the default), "uint16" (the raw bit patterns, half the size; reinterpret with
    `a.view(ml_dtypes.bfloat16)` or `jax.lax.bitcast_convert_type(a, jnp.bfloat16)`), or
    "bfloat16" (ml_dtypes' numpy bfloat16, which needs ml_dtypes wherever it is read).
    """
    _check_bf16_as(bf16_as)
    _check_flatten(flatten)
    permute = _flatten_layers(params, model) if flatten == "hwc" else {}
    tree: dict[str, Any] = {}
    for key, t in params.items():
        leaf = _flax_leaf(key, t)
        if leaf is None:
            continue
        path, arr = leaf
        layer = key.rsplit(".", 1)[0]
        if layer in permute and key.endswith(".weight"):
            c, h, w = permute[layer]
            # torch's [out, (c h w)] -> Flax's [(h w c), out]: rows in the order of an NHWC reshape
            arr = rearrange(t, "o (c h w) -> (h w c) o", c=c, h=h, w=w)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _tensor_to_numpy(arr, bf16_as)
    return tree


def flax_variables(tree: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flax's variable collections from a `to_flax` tree: `{"params": ..., "batch_stats": ...}`.

    `tree` is nested or flat with dotted keys (as `safetensors.flax.load_file` returns). Batch-norm
    statistics (`mean`, `var` leaves) go to `batch_stats`, everything else to `params`; a model
    without batch norm gets `{"params": ...}` only. The result is what `module.apply(variables, x)`
    of the matching `flax.linen` module takes. The arrays are not copied.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, a in _flatten_dotted(tree).items():
        *path, leaf = key.split(".")
        node = out.setdefault("batch_stats" if leaf in _BN_STATS_BACK else "params", {})
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = a
    return {k: out[k] for k in ("params", "batch_stats") if k in out}


def _flatten_dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten_dotted(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def from_flax(
    tree: Mapping[str, Any],
    *,
    bf16_keys: tuple[str, ...] | list[str] = (),
    num_batches_tracked: Mapping[str, int] | None = None,
    flatten: Flatten = "hwc",
    model: str | None = None,
) -> Params:
    """Torch-layout weights from Flax-layout arrays (numpy or JAX), the inverse of `to_flax`.

    `tree` is nested (`{"conv1": {"kernel": ...}}`) or flat with dotted keys (`conv1.kernel`, as
    `safetensors.flax.load_file` returns); not split into collections (merge `params` and
    `batch_stats` of a Flax model first). `bf16_keys` lists dotted keys holding bf16 bit
    patterns as uint16 (`bf16_as="uint16"`); they come back as bfloat16.

    `flatten` is the row order of the dense layer after the conv stack in `tree`: "hwc" (what
    `to_flax` writes and a Flax module's `x.reshape((B, -1))` implies; the default) is put back
    into torch's (c h w); "chw" is taken as it is. The architecture is `model` or recognised
    from the result's names and shapes, as in `to_flax`.

    A batch-norm layer (`scale`, `bias`, `mean`, `var`) comes back as `weight`, `bias`,
    `running_mean`, `running_var` plus `num_batches_tracked` (0-d int64, right after
    `running_var`), so the result loads strictly into the `nn.Module`. Flax does not count
    batches: the count is `num_batches_tracked[layer]` if given (`load_flax` reads it from the
    file's metadata), else 0. It matters only to `nn.BatchNorm2d(momentum=None)`.
    """
    counts = dict(num_batches_tracked or {})
    params: Params = {}
    for key, a in _flatten_dotted(tree).items():
        *path, leaf = key.split(".")
        t = _numpy_to_tensor(a, bf16_bits=key in bf16_keys)
        if leaf == "bias" and t.ndim == 1:
            name = "bias"
        elif leaf == "scale" and t.ndim == 1:
            name = "weight"
        elif leaf in _BN_STATS_BACK and t.ndim == 1:
            name = _BN_STATS_BACK[leaf]
        elif leaf == "kernel" and t.ndim == 4:
            name, t = "weight", rearrange(t, "h w i o -> o i h w")
        elif leaf == "kernel" and t.ndim == 2:
            name, t = "weight", rearrange(t, "i o -> o i")
        else:
            raise ValueError(f"no torch equivalent known for Flax parameter {key!r} of shape {list(t.shape)}")
        params[".".join([*path, name])] = t.contiguous()
        if leaf == "var":  # var is the last of a Flax BatchNorm's leaves in to_flax's and sorted order
            layer = ".".join(path)
            params[f"{layer}.{_COUNTER}"] = torch.tensor(int(counts.get(layer, 0)), dtype=torch.int64)
    _check_flatten(flatten)
    if flatten == "hwc":
        for layer, (c, h, w) in _flatten_layers(params, model).items():
            key = f"{layer}.weight"  # [out, (h w c)] after the transpose above -> torch's (c h w)
            params[key] = rearrange(params[key], "o (h w c) -> o (c h w)", c=c, h=h, w=w).contiguous()
    return params


def _bf16_keys(arrays: Mapping[str, Tensor], rename: Callable[[str, Tensor], str | None]) -> list[str]:
    names = (rename(k, t) for k, t in arrays.items() if t.dtype == torch.bfloat16)
    return [n for n in names if n is not None]


def _save_numpy_arrays(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    """Arrays as safetensors, atomically; metadata in `checkpoint`'s convention (strings plain)."""
    from safetensors.numpy import save as st_save

    checkpoint.atomic_write(path, st_save(dict(arrays), metadata=checkpoint.encode_metadata(meta)))


def save_flax(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    bf16_as: Bf16As = "float32",
    flatten: Flatten = "hwc",
    model: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write `to_flax(params)` as safetensors with dotted keys (`conv1.kernel`), atomically.

    Read it with `flax.traverse_util.unflatten_dict(safetensors.flax.load_file(p), sep=".")`
    (then `flax_variables(...)` for a model with batch norm) and run it with `flax_module(name)`,
    with `safetensors.numpy.load_file(p)`, or back into torch layout with `load_flax`. The
    metadata records `layout` ("flax"), `flatten` (the dense-after-conv row order, "hwc" unless
    asked otherwise; see `to_flax`), `bf16_as` and which keys were bf16 (`bf16_keys`), for batch
    norm the dropped `num_batches_tracked` counts (`{layer: count}`), plus `metadata`'s entries.
    Strings are stored as they are, other values as JSON, as `checkpoint.encode_metadata` does
    (`checkpoint.read_metadata(p)` decodes them).
    """
    flat = _flatten_dotted(to_flax(params, bf16_as=bf16_as, flatten=flatten, model=model))

    def dotted(k: str, t: Tensor) -> str | None:
        leaf = _flax_leaf(k, t)
        return None if leaf is None else ".".join(leaf[0])

    meta: dict[str, Any] = dict(metadata or {})
    meta.update(layout=FLAX_LAYOUT, flatten=flatten, bf16_as=bf16_as, bf16_keys=_bf16_keys(params, dotted))
    counts = {k.rsplit(".", 1)[0]: int(t) for k, t in params.items() if k.rsplit(".", 1)[-1] == _COUNTER}
    if counts:  # the file is for Flax, which has no counter: keep it beside, not in, the arrays
        meta["num_batches_tracked"] = counts
    _save_numpy_arrays(path, flat, meta)


def save_numpy(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    bf16_as: Literal["float32", "uint16"] = "float32",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write weights with torch names and layout in dtypes plain numpy reads, atomically.

    A `.npz` path gives `numpy.savez` output (read with `numpy.load(p)`, no pickle needed);
    anything else a safetensors file for `safetensors.numpy.load_file(p)`. bf16 tensors become
    float32 or their uint16 bit patterns (`bf16_as`); bfloat16 itself is refused, as numpy has none.
    A stateful model's buffers are kept as they are (`bn1.num_batches_tracked` stays int64).
    The metadata (safetensors only) records `layout` ("torch"), `bf16_as`, `bf16_keys` and
    `metadata`'s entries, strings as they are and other values as JSON (`checkpoint.encode_metadata`).
    """
    if bf16_as not in ("float32", "uint16"):
        raise ValueError(f"numpy has no bfloat16: bf16_as must be float32 or uint16, not {bf16_as!r}")
    arrays = to_numpy(params, bf16_as=bf16_as)
    if str(path).endswith(".npz"):
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        checkpoint.atomic_write(path, buf.getvalue())
        return
    meta: dict[str, Any] = dict(metadata or {})
    meta.update(layout="torch", bf16_as=bf16_as, bf16_keys=_bf16_keys(params, lambda k, t: k))
    _save_numpy_arrays(path, arrays, meta)


def load_flax(path: str | os.PathLike[str]) -> Params:
    """Torch-layout weights from a file written by `save_flax` (uint16 bf16 bits restored).

    Batch-norm layers get back their `num_batches_tracked` from the file's metadata (0 where
    the file has none, e.g. one written by Flax code), so the result equals what was saved.
    The dense-after-conv row order is the file's `flatten` metadata; files written before it
    was recorded have none and hold torch's (c h w) order, so a missing `flatten` means "chw".
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("layout") != FLAX_LAYOUT:
        raise ValueError(
            f"{path}: not a Flax-layout file written by save_flax (layout {meta.get('layout')!r})"
        )
    # bf16_keys and num_batches_tracked are JSON in files of either metadata convention (old
    # files JSON-encoded every value; new ones all but strings), layout and bf16_as plain in both
    bf16_keys = json.loads(meta.get("bf16_keys", "[]")) if meta.get("bf16_as") == "uint16" else []
    counts = json.loads(meta.get("num_batches_tracked", "{}"))
    flatten = meta.get("flatten", "chw")
    if flatten not in FLATTEN_ORDERS:
        raise ValueError(f"{path}: unknown flatten order {flatten!r} in the metadata")
    tensors = load_file(str(path))
    # torch uint16 has few kernels; go through numpy so the bit reinterpretation is plain
    arrays = {
        k: v.view(torch.int16).numpy().view(np.uint16) if k in bf16_keys else v.numpy()
        for k, v in tensors.items()
    }
    return from_flax(arrays, bf16_keys=bf16_keys, num_batches_tracked=counts, flatten=flatten)


# -- Flax modules ---------------------------------------------------------------------------


@functools.cache
def _flax_classes() -> dict[str, Any]:
    """The `flax.linen` modules of our models (defined on first use: flax is an optional extra)."""
    import flax.linen as fnn

    def flat(x: Any) -> Any:
        return x.reshape((x.shape[0], -1))  # NHWC flattened as it lies: (h w c), as to_flax writes

    def pool(x: Any) -> Any:
        return fnn.max_pool(x, (2, 2), strides=(2, 2))  # floor, as torch's max_pool2d(x, 2)

    class MLP(fnn.Module):
        """The tutorial's TwoLayerNet: flatten, `linear1`, ReLU, `linear2`."""

        D_in: int = 784
        H: int = 100
        D_out: int = 10

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1] or [B, D_in]
            x = flat(x)
            if x.shape[-1] != self.D_in:
                raise ValueError(f"MLP expects {self.D_in} features per example, got {x.shape[-1]}")
            x = fnn.relu(fnn.Dense(self.H, name="linear1")(x))
            return fnn.Dense(self.D_out, name="linear2")(x)

    class SimpleNet(fnn.Module):
        """The reference network, NHWC: conv 1->32, conv 32->64, max-pool 2, fc 9216->128, fc."""

        num_classes: int = 10

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            x = fnn.relu(fnn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))  # [B, 26, 26, 32]
            x = fnn.relu(fnn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))  # [B, 24, 24, 64]
            x = flat(pool(x))  # [B, 9216]
            x = fnn.relu(fnn.Dense(128, name="fc1")(x))
            return fnn.Dense(self.num_classes, name="fc2")(x)

    class SimpleNetBN(fnn.Module):
        """SimpleNet with batch norm after each convolution, before its ReLU (`batch_stats`)."""

        num_classes: int = 10

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            # Flax's momentum is the weight of the old statistics: torch's 0.1 of the new is 0.9 here
            def norm(name: str) -> Any:
                return fnn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)

            x = fnn.relu(norm("bn1")(fnn.Conv(32, (3, 3), padding="VALID", name="conv1")(x)))
            x = fnn.relu(norm("bn2")(fnn.Conv(64, (3, 3), padding="VALID", name="conv2")(x)))
            x = flat(pool(x))  # [B, 9216]
            x = fnn.relu(fnn.Dense(128, name="fc1")(x))
            return fnn.Dense(self.num_classes, name="fc2")(x)

    class AlexNet(fnn.Module):
        """AlexNet for 28x28x1 inputs (3x3 kernels, padding 1), dropout before fc1 and fc2."""

        num_classes: int = 10
        dropout: float = 0.5

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            def conv(features: int, name: str) -> Any:
                return fnn.Conv(features, (3, 3), padding=1, name=name)

            x = pool(fnn.relu(conv(64, "conv1")(x)))  # [B, 14, 14, 64]
            x = pool(fnn.relu(conv(192, "conv2")(x)))  # [B, 7, 7, 192]
            x = fnn.relu(conv(384, "conv3")(x))
            x = fnn.relu(conv(256, "conv4")(x))
            x = pool(fnn.relu(conv(256, "conv5")(x)))  # [B, 3, 3, 256]
            x = fnn.Dropout(self.dropout, deterministic=not train)(flat(x))  # [B, 2304]
            x = fnn.Dropout(self.dropout, deterministic=not train)(fnn.relu(fnn.Dense(1024, name="fc1")(x)))
            x = fnn.relu(fnn.Dense(1024, name="fc2")(x))
            return fnn.Dense(self.num_classes, name="fc3")(x)

    return {"mlp": MLP, "simplenet": SimpleNet, "simplenet_bn": SimpleNetBN, "alexnet": AlexNet}


def flax_module(name: str, **hparams: Any) -> Any:
    """The `flax.linen.Module` of model `name`, written the Flax way, for weights from `to_flax`.

    NHWC inputs (`[B, 28, 28, 1]`, normalised as for `Model.apply`; mlp also takes `[B, 784]`),
    `nn.Conv` / `nn.Dense` / `nn.BatchNorm` under our layer names, the conv features flattened
    with `x.reshape((B, -1))`; called as `module.apply(variables, x, train=False)`, where
    `variables = flax_variables(unflatten_dict(safetensors.flax.load_file(p), sep="."))` for a
    file from `save_flax` (or `flax_variables(to_flax(weights))`). Its eval-mode logits equal
    `models.get(name).apply`'s. simplenet_bn keeps its running statistics in Flax's
    `batch_stats` collection: `nn.BatchNorm(use_running_average=not train, momentum=0.9,
    epsilon=1e-5)`, so train with `mutable=["batch_stats"]`; alexnet's dropout is active when
    `train=True` and then needs `rngs={"dropout": key}`. `hparams` are the model's
    (`num_classes`; mlp `D_in`, `H`, `D_out`; alexnet `dropout`). Needs the optional `jax` extra.
    """
    model = models.get(name, **hparams)  # ValueError naming the choices, TypeError for a bad hparam
    classes = _flax_classes()
    if model.name not in classes:
        raise ValueError(
            f"no Flax module for model {model.name!r} yet; Flax modules: {', '.join(sorted(classes))}"
        )
    return classes[model.name](**model.hparams)


# -- JAX ------------------------------------------------------------------------------------

_SIMPLENET_JIT: Callable[..., Any] | None = None


def _simplenet_forward(params: Mapping[str, Any], x: Any) -> Any:
    import jax
    import jax.numpy as jnp
    from jax import lax

    hi = lax.Precision.HIGHEST  # full fp32 on accelerators (no TF32/bf16 passes)

    def conv(x: Any, p: Mapping[str, Any]) -> Any:
        y = lax.conv_general_dilated(
            x, p["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi
        )
        return y + p["bias"]

    def dense(x: Any, p: Mapping[str, Any]) -> Any:
        return jnp.dot(x, p["kernel"], precision=hi) + p["bias"]

    x = jax.nn.relu(conv(x, params["conv1"]))  # [B, 26, 26, 32]
    x = jax.nn.relu(conv(x, params["conv2"]))  # [B, 24, 24, 64]
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # [B, 12, 12, 64]
    # the features flattened as they lie, (h w c): fc1's kernel rows are in that order (to_flax)
    x = x.reshape((x.shape[0], -1))  # [B, 9216]
    x = jax.nn.relu(dense(x, params["fc1"]))  # [B, 128]
    return dense(x, params["fc2"])  # [B, classes]


def simplenet_jax(params: Mapping[str, Any], x: Any) -> Any:
    """SimpleNet logits [B, classes] in pure JAX (jitted) from Flax-layout params (`to_flax`).

    `params` have fc1's rows in (h w c) order (`to_flax`'s default, files with `flatten: "hwc"`);
    a file written with the old (c h w) order converts with `to_flax(load_flax(p))`. `x` is
    float32 NHWC `[B, 28, 28, 1]`, normalised as for `Model.apply`; from our NCHW input use
    `rearrange(x, "b c h w -> b h w c")`. Needs the optional `jax` extra.
    """
    global _SIMPLENET_JIT  # a cache of the compiled function, not state that changes results
    if _SIMPLENET_JIT is None:
        import jax

        _SIMPLENET_JIT = jax.jit(_simplenet_forward)
    return _SIMPLENET_JIT(params, x)


def to_jax(tensor: Tensor) -> Any:
    """A JAX array of `tensor`'s values, sharing its memory through DLPack where both sides allow.

    Sharing needs the tensor's device to be one JAX runs on (CPU, or a GPU that jax was built
    for); otherwise, and for dtypes DLPack cannot carry, the values are copied through the host.
    A tensor that requires grad is detached first (DLPack carries no autograd). Do not write to
    the tensor while the array is in use: JAX assumes its arrays never change.
    """
    import jax.numpy as jnp

    t = tensor.detach()
    try:
        return jnp.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError, ValueError):
        # e.g. a CUDA tensor with a CPU-only jax: go through host memory
        if t.dtype == torch.bfloat16:
            import jax

            bits = jnp.asarray(t.cpu().view(torch.int16).numpy().view(np.uint16))
            return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
        return jnp.asarray(t.cpu().numpy())


def from_jax(array: Any) -> Tensor:
    """A torch tensor of a JAX array's values, sharing its memory through DLPack where possible.

    JAX arrays are immutable: writing to the returned tensor in place is undefined behaviour
    (clone it first if you must).
    """
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return _numpy_to_tensor(np.asarray(array))


# -- normalisation and ONNX -------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def known_normalization(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    """(mean, std) a weights file's (decoded) metadata says its model was trained with, or None.

    The numbers `normalize_mean` / `normalize_std` where the file records them; else the run
    config's `normalize` ("tutorial": `data.TUTORIAL_MEAN/STD`, "dataset": `data.MEAN/STD`);
    None when the metadata says nothing (no numbers, no config).
    """
    mean, std = metadata.get("normalize_mean"), metadata.get("normalize_std")
    if _number(mean) and _number(std) and std > 0:
        return float(mean), float(std)
    config = metadata.get("config")
    if isinstance(config, Mapping):
        if config.get("normalize") == "tutorial":
            return data.TUTORIAL_MEAN, data.TUTORIAL_STD
        return data.MEAN, data.STD  # "dataset", the config's default
    return None


def normalization(metadata: Mapping[str, Any]) -> tuple[float, float]:
    """(mean, std) to normalise inputs with for a weights file: `known_normalization`, else the dataset's."""
    return known_normalization(metadata) or (data.MEAN, data.STD)


class _ImagesToLogits(tnn.Module):
    """uint8 images `[B, 28, 28]` -> logits `[B, classes]`, normalising inside as `data.normalize`."""

    def __init__(self, module: tnn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.module = module
        self.mean, self.std = float(mean), float(std)

    def forward(self, images: Tensor) -> Tensor:
        return self.module(data.normalize(images, self.mean, self.std))  # [B, 1, 28, 28] float32


ONNX_INPUT = "images"  # uint8 [B, 28, 28], raw pixel values 0..255
ONNX_OUTPUT = "logits"  # float32 [B, classes]


def save_onnx(
    path: str | os.PathLike[str],
    model_name: str,
    weights: Mapping[str, Tensor],
    *,
    mean: float = data.MEAN,
    std: float = data.STD,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write the model with `weights` as an ONNX file that ONNX Runtime runs, atomically.

    Input `images`: uint8 `[B, 28, 28]`, raw Fashion-MNIST pixels (batch size free); the graph
    normalises them itself, `(x / 255 - mean) / std` as `data.normalize` (pass the `mean`, `std`
    the weights were trained with: `normalization(metadata)`). Output `logits`: float32
    `[B, classes]`. The model is `to_module(model_name, weights)` in eval mode (batch norm with
    its running statistics, dropout off), exported by `torch.onnx.export(dynamo=True)`; weights
    in bf16/fp16 are upcast to float32 (exact). The ONNX model's `metadata_props` say so:
    `model`, `input` ("uint8 [B,28,28]"), `output`, `normalize_mean`, `normalize_std`,
    `normalization`, `classes` (JSON list of class names, for 10 classes), plus `metadata`'s
    entries (strings as they are, others JSON, as `checkpoint.encode_metadata`). Needs the
    optional `onnx` extra (onnx, onnxscript; onnxruntime to run it): ImportError otherwise.

        session = onnxruntime.InferenceSession(path)
        logits = session.run(None, {"images": uint8_images})[0]
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail here with the fix)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the onnx extra: pip install 'fashion_func[onnx]' ({e})"
        ) from None
    if not (_number(mean) and _number(std) and std > 0):
        raise ValueError(f"normalisation mean {mean!r} and std {std!r} must be finite numbers, std > 0")
    cpu32 = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in weights.items()
    }
    module = to_module(model_name, cpu32)
    model = models.get(model_name, **_hparams_from_params(model_name, cpu32))
    if model.input_shape not in ((1, 28, 28), (28 * 28,)):
        raise ValueError(f"{model_name} takes inputs {list(model.input_shape)}, not 28x28 images")
    wrapped = _ImagesToLogits(module, mean, std).eval()
    example = torch.zeros((2, 28, 28), dtype=torch.uint8)  # 2, not 1: export would fix a size-1 axis
    with torch.no_grad():
        num_classes = int(wrapped(example).shape[-1])
        program = torch.onnx.export(
            wrapped,
            (example,),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    props = {
        "model": model_name,
        "input": "uint8 [B,28,28]",
        "input_name": ONNX_INPUT,
        "output": f"float32 logits [B,{num_classes}]",
        "output_name": ONNX_OUTPUT,
        "normalize_mean": repr(float(mean)),
        "normalize_std": repr(float(std)),
        "normalization": "in the graph: x = (images / 255 - normalize_mean) / normalize_std, [B,1,28,28]",
    }
    if num_classes == len(data.CLASS_NAMES):
        props["classes"] = json.dumps(list(data.CLASS_NAMES))
    user = checkpoint.encode_metadata({k: v for k, v in (metadata or {}).items() if k not in props})
    existing = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **user, **props})
    proto.doc_string = (
        f"fashion_func {model_name}: uint8 Fashion-MNIST images [B,28,28] -> logits [B,{num_classes}]"
    )
    checkpoint.atomic_write(path, proto.SerializeToString())
