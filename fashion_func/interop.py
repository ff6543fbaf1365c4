"""Weights that load anywhere: plain `torch.nn.Module`s, JAX/Flax, numpy, DLPack.

- `to_module(name, params)` / `from_module(module)`: our params <-> a plain PyTorch module of a
  known architecture (same `state_dict` keys, forward equal to `Model.apply`).
- `functionalize(module)`: any research `nn.Module` as a `Model` (through
  `torch.func.functional_call`), so `make_train_step` / `make_eval_step` drive it.
- `to_flax` / `from_flax` / `save_flax` / `load_flax`: Flax layout and naming
  (`{"conv1": {"kernel": HWIO, "bias"}}`, dense kernels `[in, out]`), stored as safetensors with
  dotted keys (`conv1.kernel`) that `safetensors.flax` and `safetensors.numpy` read.
- `simplenet_jax`: a pure-JAX SimpleNet forward that runs on the exported weights.
- `to_jax` / `from_jax`: zero-copy tensor exchange through DLPack where both sides allow.
- `load_weights_file`: a validated weights file plus the model its metadata names.

JAX is an optional extra (`pip install fashion_func[jax]`): it is imported only inside the
functions that need it. Nothing in the core imports this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch import nn as tnn

from fashion_func import checkpoint, models
from fashion_func.models import Model, Params, Stage

__all__ = [
    "BF16_AS",
    "FLAX_LAYOUT",
    "MLP",
    "AlexNet",
    "SimpleNet",
    "from_flax",
    "from_jax",
    "from_module",
    "functionalize",
    "identify",
    "load_flax",
    "load_weights_file",
    "save_flax",
    "save_numpy",
    "simplenet_jax",
    "to_flax",
    "to_jax",
    "to_module",
    "to_numpy",
]

Bf16As = Literal["float32", "uint16", "bfloat16"]
BF16_AS: tuple[str, ...] = ("float32", "uint16", "bfloat16")
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


_MODULES: dict[str, type[tnn.Module]] = {"mlp": MLP, "simplenet": SimpleNet, "alexnet": AlexNet}


def _hparams_from_params(name: str, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """The constructor arguments a params dict implies (class counts, widths), read off its shapes."""
    try:
        if name == "mlp":
            h, d_in = params["linear1.weight"].shape
            return {"D_in": d_in, "H": h, "D_out": params["linear2.weight"].shape[0]}
        if name == "simplenet":
            return {"num_classes": params["fc2.weight"].shape[0]}
        if name == "alexnet":
            return {"num_classes": params["fc3.weight"].shape[0]}
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
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in params]
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"params do not match {name}: missing keys {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, shape in expected.items():
        if tuple(params[k].shape) != shape:
            raise ValueError(
                f"params do not match {name}: {k!r} has shape {list(params[k].shape)}, not {list(shape)}"
            )


def _template(name: str, hparams: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> Params:
    """Meta tensors with the names, order and shapes of the model's parameters (nothing drawn)."""
    return {
        k: torch.empty(v.shape, dtype=dtype, device="meta")
        for k, v in _build(name, hparams).state_dict().items()
    }


def identify(params: Mapping[str, Tensor]) -> str:
    """The name of the known architecture whose parameter names and shapes `params` has.

    Raises ValueError when no model in `models.MODELS` matches.
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
    """Params (detached copies) of a module whose architecture is known (see `identify`).

    The architecture is recognised by parameter names and shapes; with `check` the module's
    forward is also compared with `Model.apply` on a fixed input (in eval mode), so a module
    with the same names but a different computation is refused (ValueError).
    """
    sd = module.state_dict()
    name = identify(sd)
    hparams = _hparams_from_params(name, sd)
    model = models.get(name, **hparams)
    params = {k: sd[k].detach().clone() for k in _template(name, hparams)}
    if check:
        p0 = next(iter(params.values()))
        shape = (2, *model.input_shape)
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(p0.device, p0.dtype)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                got, expected = module(x), model.apply(params, x)
        finally:
            module.train(was_training)
        tol = 1e-3 if p0.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol):
            raise ValueError(
                f"{type(module).__name__} has the parameters of {name} but computes something else; "
                "use interop.functionalize(module) to run it as it is"
            )
    return params


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
    """(model, params, metadata) of a weights file, validated against the model's parameters.

    The model is `model_name` if given, else the `model` entry of the file's metadata (as
    `fit` writes into best.safetensors). Weights stored in another floating dtype (bf16, fp16)
    are accepted and returned as stored. Raises `checkpoint.CheckpointError` (one line) for a
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
    float_dtypes = {dt for dt, _ in info.tensors.values() if dt.is_floating_point}
    dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    template = _template(model.name, model.hparams, dtype)
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


def _flax_leaf(key: str, t: Tensor) -> tuple[list[str], Tensor]:
    """(Flax path, array) of one torch parameter: `conv1.weight` -> (["conv1", "kernel"], HWIO)."""
    *path, leaf = key.split(".")
    if leaf == "bias" and t.ndim == 1:
        return [*path, "bias"], t
    if leaf == "weight" and t.ndim == 4:
        # nn.Conv2d's OIHW -> Flax/lax HWIO (used with dimension_numbers NHWC, HWIO, NHWC)
        return [*path, "kernel"], rearrange(t, "o i h w -> h w i o")
    if leaf == "weight" and t.ndim == 2:
        # nn.Linear computes x @ W.T with W [out, in]; flax.linen.Dense computes x @ kernel, [in, out]
        return [*path, "kernel"], rearrange(t, "o i -> i o")
    raise ValueError(f"no Flax equivalent known for parameter {key!r} of shape {list(t.shape)}")


def to_flax(params: Mapping[str, Tensor], *, bf16_as: Bf16As = "float32") -> dict[str, Any]:
    """Params in Flax layout and naming, as nested dicts of numpy arrays.

    `conv1.weight` OIHW -> `{"conv1": {"kernel": HWIO}}`, `fc1.weight` [out, in] ->
    `{"fc1": {"kernel": [in, out]}}`, biases unchanged. The first dense layer after a conv stack
    keeps torch's flatten order: its input rows are indexed (c h w), so NHWC features must be
    flattened with `rearrange(x, "b h w c -> b (c h w)")` (as `simplenet_jax` does), not with
    `x.reshape(B, -1)`.

    numpy has no bfloat16, so bf16 tensors become, by `bf16_as`: "float32" (exact upcast, loads
    everywhere; the default), "uint16" (the raw bit patterns, half the size; reinterpret with
    `a.view(ml_dtypes.bfloat16)` or `jax.lax.bitcast_convert_type(a, jnp.bfloat16)`), or
    "bfloat16" (ml_dtypes' numpy bfloat16, which needs ml_dtypes wherever it is read).
    """
    _check_bf16_as(bf16_as)
    tree: dict[str, Any] = {}
    for key, t in params.items():
        path, arr = _flax_leaf(key, t)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _tensor_to_numpy(arr, bf16_as)
    return tree


def _flatten_dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten_dotted(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def from_flax(tree: Mapping[str, Any], *, bf16_keys: tuple[str, ...] | list[str] = ()) -> Params:
    """Torch-layout params from Flax-layout arrays (numpy or JAX), the inverse of `to_flax`.

    `tree` is nested (`{"conv1": {"kernel": ...}}`) or flat with dotted keys (`conv1.kernel`, as
    `safetensors.flax.load_file` returns). `bf16_keys` lists dotted keys holding bf16 bit
    patterns as uint16 (`bf16_as="uint16"`); they come back as bfloat16.
    """
    params: Params = {}
    for key, a in _flatten_dotted(tree).items():
        *path, leaf = key.split(".")
        t = _numpy_to_tensor(a, bf16_bits=key in bf16_keys)
        if leaf == "bias" and t.ndim == 1:
            name = "bias"
        elif leaf == "kernel" and t.ndim == 4:
            name, t = "weight", rearrange(t, "h w i o -> o i h w")
        elif leaf == "kernel" and t.ndim == 2:
            name, t = "weight", rearrange(t, "i o -> o i")
        else:
            raise ValueError(f"no torch equivalent known for Flax parameter {key!r} of shape {list(t.shape)}")
        params[".".join([*path, name])] = t.contiguous()
    return params


def _bf16_keys(arrays: Mapping[str, Tensor], rename: Callable[[str, Tensor], str]) -> list[str]:
    return [rename(k, t) for k, t in arrays.items() if t.dtype == torch.bfloat16]


def _save_numpy_arrays(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: dict[str, str]
) -> None:
    from safetensors.numpy import save as st_save

    checkpoint.atomic_write(path, st_save(dict(arrays), metadata=meta))


def save_flax(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    bf16_as: Bf16As = "float32",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write `to_flax(params)` as safetensors with dotted keys (`conv1.kernel`), atomically.

    Read it with `flax.traverse_util.unflatten_dict(safetensors.flax.load_file(p), sep=".")`,
    with `safetensors.numpy.load_file(p)`, or back into torch layout with `load_flax`. The
    metadata (strings) records `layout`, `bf16_as` and which keys were bf16 (`bf16_keys`, JSON),
    plus `metadata`'s entries JSON-encoded.
    """
    flat = _flatten_dotted(to_flax(params, bf16_as=bf16_as))

    def dotted(k: str, t: Tensor) -> str:
        return ".".join(_flax_leaf(k, t)[0])

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(layout=FLAX_LAYOUT, bf16_as=bf16_as, bf16_keys=json.dumps(_bf16_keys(params, dotted)))
    _save_numpy_arrays(path, flat, meta)


def save_numpy(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    bf16_as: Literal["float32", "uint16"] = "float32",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write params with torch names and layout in dtypes plain numpy reads, atomically.

    A `.npz` path gives `numpy.savez` output (read with `numpy.load(p)`, no pickle needed);
    anything else a safetensors file for `safetensors.numpy.load_file(p)`. bf16 tensors become
    float32 or their uint16 bit patterns (`bf16_as`); bfloat16 itself is refused, as numpy has none.
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
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(layout="torch", bf16_as=bf16_as, bf16_keys=json.dumps(_bf16_keys(params, lambda k, t: k)))
    _save_numpy_arrays(path, arrays, meta)


def load_flax(path: str | os.PathLike[str]) -> Params:
    """Torch-layout params from a file written by `save_flax` (uint16 bf16 bits restored)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("layout") != FLAX_LAYOUT:
        raise ValueError(
            f"{path}: not a Flax-layout file written by save_flax (layout {meta.get('layout')!r})"
        )
    bf16_keys = json.loads(meta.get("bf16_keys", "[]")) if meta.get("bf16_as") == "uint16" else []
    tensors = load_file(str(path))
    # torch uint16 has few kernels; go through numpy so the bit reinterpretation is plain
    arrays = {
        k: v.view(torch.int16).numpy().view(np.uint16) if k in bf16_keys else v.numpy()
        for k, v in tensors.items()
    }
    return from_flax(arrays, bf16_keys=bf16_keys)


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
    # fc1's input rows follow torch's flatten of [B, C, H, W]: channel-major (c h w), so reorder
    # the NHWC features before flattening rather than reshaping them as they lie.
    x = rearrange(x, "b h w c -> b (c h w)")  # [B, 9216]
    x = jax.nn.relu(dense(x, params["fc1"]))  # [B, 128]
    return dense(x, params["fc2"])  # [B, classes]


def simplenet_jax(params: Mapping[str, Any], x: Any) -> Any:
    """SimpleNet logits [B, classes] in pure JAX (jitted) from Flax-layout params (`to_flax`).

    `x` is float32 NHWC `[B, 28, 28, 1]`, normalised as for `Model.apply`; from our NCHW input use
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
