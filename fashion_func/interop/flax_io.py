"""Weights in Flax layout and naming (`{"conv1": {"kernel": HWIO, "bias"}}`, dense kernels
`[in, out]`, batch norm `scale`, `bias`, `mean`, `var`), and safetensors files of them with dotted
keys (`conv1.kernel`) that `safetensors.flax` and `safetensors.numpy` read. The dense layer after
a conv stack gets its rows in the (h w c) order of an NHWC `x.reshape((B, -1))`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from fashion_func import models
from fashion_func.interop import numpy_io
from fashion_func.interop.numpy_io import Bf16As, check_bf16_as, numpy_to_tensor, tensor_to_numpy
from fashion_func.interop.torch_io import check_shapes, identify, template
from fashion_func.interop.torch_modules import build, hparams_from_params
from fashion_func.models import Params

__all__ = ["flax_variables", "from_flax", "load_flax", "save_flax", "to_flax"]

# row order of the dense layer after a conv stack in Flax layout: "hwc" as an NHWC reshape gives
# (the default), or torch's "chw"; recorded "none": no layer was known to follow a flatten. A
# mapping `{layer: (c, h, w)}` names the layers to reorder for an architecture of the caller's own.
Flatten = Literal["hwc", "chw"] | Mapping[str, tuple[int, int, int]]
FLATTEN_ORDERS: tuple[str, ...] = ("hwc", "chw", "none")
FLAX_LAYOUT = "flax"  # the `layout` metadata value of files written by `save_flax`

# (torch leaf, rank, Flax leaf, torch's layout, Flax's): a norm layer's affine weight is Flax's
# `scale`; batch norm's running statistics its `mean` and `var`, in the `batch_stats` collection;
# nn.Conv2d's OIHW kernel is Flax/lax's HWIO; nn.Linear computes x @ W.T with W [out, in],
# flax.linen.Dense x @ kernel with [in, out]. nn.BatchNorm's step counter has no counterpart.
_LEAVES = (
    ("bias", 1, "bias", "", ""),
    ("weight", 1, "scale", "", ""),
    ("running_mean", 1, "mean", "", ""),
    ("running_var", 1, "var", "", ""),
    ("weight", 4, "kernel", "o i h w", "h w i o"),
    ("weight", 2, "kernel", "o i", "i o"),
)
_BN_STATS = ("mean", "var")
_COUNTER = "num_batches_tracked"


def _convert(key: str, t: Tensor, *, to_flax: bool) -> tuple[list[str], Tensor]:
    """(path, tensor) of one leaf in the other layout: `conv1.weight` OIHW <-> (["conv1", "kernel"], HWIO)."""
    *path, leaf = key.split(".")
    for torch_leaf, rank, flax_leaf, torch_axes, flax_axes in _LEAVES:
        if leaf == (torch_leaf if to_flax else flax_leaf) and t.ndim == rank:
            src, dst = (torch_axes, flax_axes) if to_flax else (flax_axes, torch_axes)
            name = flax_leaf if to_flax else torch_leaf
            return [*path, name], rearrange(t, f"{src} -> {dst}") if src else t
    which = "Flax equivalent known for parameter" if to_flax else "torch equivalent known for Flax parameter"
    raise ValueError(f"no {which} {key!r} of shape {list(t.shape)}")


def _flax_leaf(key: str, t: Tensor) -> tuple[list[str], Tensor] | None:
    """(Flax path, array) of one torch tensor; None for `num_batches_tracked` (Flax has none)."""
    return None if key.rsplit(".", 1)[-1] == _COUNTER and t.ndim == 0 else _convert(key, t, to_flax=True)


def _permutation(
    params: Mapping[str, Tensor], flatten: Flatten, model: str | None
) -> dict[str, tuple[int, int, int]]:
    """The dense layers whose rows go between torch's (c h w) and Flax's (h w c) order; ValueError
    for a `flatten` other than "hwc", "chw" or `{layer: (c, h, w)}` of the dense kernels there."""
    if not isinstance(flatten, Mapping):
        if flatten not in ("hwc", "chw"):
            raise ValueError(f"flatten must be 'hwc', 'chw' or {{layer: (c, h, w)}}, not {flatten!r}")
        return _flatten_layers(params, model) if flatten == "hwc" else {}
    for layer, chw in flatten.items():
        ok = isinstance(chw, (tuple, list)) and len(chw) == 3
        if not (isinstance(layer, str) and ok and all(isinstance(n, int) and n >= 1 for n in chw)):
            raise ValueError(
                f"flatten: expected {{layer: (c, h, w)}} of positive ints, got {layer!r}: {chw!r}"
            )
        c, h, w = chw
        weight = params.get(f"{layer}.weight")
        if weight is None or weight.dim() != 2 or weight.shape[1] != c * h * w:
            raise ValueError(f"flatten: {layer}.weight is not a dense kernel over {c}*{h}*{w} inputs")
    return {k: (int(c), int(h), int(w)) for k, (c, h, w) in flatten.items()}


@functools.lru_cache(maxsize=32)
def _flatten_inputs(name: str, hparams: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, int, int]]:
    """`{dense layer: (c, h, w)}` of the model's dense layers that take a flattened conv feature map,
    read off the model's stages run on meta tensors (a 2-D `.weight` stage receiving `[B, C, H, W]`):
    simplenet's `{"fc1": (64, 12, 12)}`, alexnet's `{"fc1": (256, 3, 3)}`, mlp's `{}`."""
    model = models.get(name, **dict(hparams))
    weights = template(name, dict(hparams))
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
    hparams = hparams_from_params(model, params)
    check_shapes(model, build(model, hparams), params)
    return _flatten_inputs(model, tuple(sorted(models.get(model, **hparams).hparams.items())))


def to_flax(
    params: Mapping[str, Tensor],
    *,
    bf16_as: Bf16As = "float32",
    flatten: Flatten = "hwc",
    model: str | None = None,
) -> dict[str, Any]:
    """Weights in Flax layout and naming, as nested dicts of numpy arrays: `conv1.weight` OIHW ->
    `{"conv1": {"kernel": HWIO}}`, `fc1.weight` [out, in] -> `{"fc1": {"kernel": [in, out]}}`,
    biases unchanged; batch norm as `flax.linen.BatchNorm`'s `scale`, `bias`, `mean`, `var`,
    without `num_batches_tracked`.

    flatten: "hwc" (default) reorders the rows of the first dense layer after a conv stack to
    a Flax NHWC flatten's (h w c), so `flax_module` computes the torch logits; "chw" keeps
    torch's; `{layer: (c, h, w)}` names them for an architecture neither `model` nor `identify`
    knows (otherwise not reordered). bf16_as: "float32" (exact, default), "uint16" (the bit
    patterns) or "bfloat16" (ml_dtypes').
    """
    check_bf16_as(bf16_as)
    permute = _permutation(params, flatten, model)
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
        node[path[-1]] = tensor_to_numpy(arr, bf16_as)
    return tree


def flax_variables(tree: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flax's variable collections of a `to_flax` tree, nested or flat with dotted keys (as
    `safetensors.flax.load_file` returns), for `module.apply(variables, x)`: batch norm's `mean`
    and `var` in `batch_stats` (only with batch norm), the rest in `params`. Nothing is copied."""
    out: dict[str, dict[str, Any]] = {}
    for key, a in _flatten_dotted(tree).items():
        *path, leaf = key.split(".")
        node = out.setdefault("batch_stats" if leaf in _BN_STATS else "params", {})
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
    """Torch-layout weights from Flax-layout arrays (numpy or JAX), the inverse of `to_flax`. `tree` is
    nested or flat with dotted keys (as `safetensors.flax.load_file` returns), one tree (merge a Flax
    model's `params` and `batch_stats` first); `bf16_keys`: dotted keys of bf16 bit patterns as
    uint16, returned as bfloat16; `flatten` and `model` as in `to_flax` ("hwc" rows go back to
    torch's (c h w)). Batch norm gets back `num_batches_tracked` (0-d int64, right after
    `running_var`, so the result loads strictly): `num_batches_tracked[layer]` if given, else 0."""
    counts = dict(num_batches_tracked or {})
    params: Params = {}
    for key, a in _flatten_dotted(tree).items():
        path, t = _convert(key, numpy_to_tensor(a, bf16_bits=key in bf16_keys), to_flax=False)
        params[".".join(path)] = t.contiguous()
        if path[-1] == "running_var":  # the last of a BatchNorm's leaves in to_flax's and sorted order
            layer = ".".join(path[:-1])
            params[f"{layer}.{_COUNTER}"] = torch.tensor(int(counts.get(layer, 0)), dtype=torch.int64)
    for layer, (c, h, w) in _permutation(params, flatten, model).items():
        key = f"{layer}.weight"  # [out, (h w c)] after the transpose above -> torch's (c h w)
        params[key] = rearrange(params[key], "o (h w c) -> o (c h w)", c=c, h=h, w=w).contiguous()
    return params


def save_flax(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    bf16_as: Bf16As = "float32",
    flatten: Flatten = "hwc",
    model: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write `to_flax(params)` as safetensors with dotted keys (`conv1.kernel`), atomically: for
    `flax.traverse_util.unflatten_dict(safetensors.flax.load_file(p), sep=".")` (then
    `flax_variables`) and `flax_module(name)`, `safetensors.numpy.load_file(p)`, or `load_flax`.
    The metadata (`checkpoint.encode_metadata`'s convention) records `layout` ("flax"), `flatten`
    ("hwc" with `flatten_layers` `{layer: [c, h, w]}` naming the reordered layers, "chw" when asked
    to keep torch's, "none" when no layer was known to follow a flatten), `bf16_as`, `bf16_keys`,
    batch norm's dropped `num_batches_tracked` (`{layer: count}`) and `metadata`."""
    flat = _flatten_dotted(to_flax(params, bf16_as=bf16_as, flatten=flatten, model=model))

    def dotted(k: str, t: Tensor) -> str | None:
        leaf = _flax_leaf(k, t)
        return None if leaf is None else ".".join(leaf[0])

    meta: dict[str, Any] = dict(metadata or {})
    meta.update(layout=FLAX_LAYOUT, bf16_as=bf16_as, bf16_keys=numpy_io.bf16_keys(params, dotted))
    permute = _permutation(params, flatten, model)
    if permute:
        meta.update(flatten="hwc", flatten_layers={k: list(v) for k, v in permute.items()})
    else:
        meta["flatten"] = "chw" if flatten == "chw" else "none"
    counts = {k.rsplit(".", 1)[0]: int(t) for k, t in params.items() if k.rsplit(".", 1)[-1] == _COUNTER}
    if counts:  # the file is for Flax, which has no counter: keep it beside, not in, the arrays
        meta["num_batches_tracked"] = counts
    numpy_io.save_arrays(path, flat, meta)


def load_flax(path: str | os.PathLike[str]) -> Params:
    """Torch-layout weights from a file written by `save_flax`: uint16 bf16 bits restored, batch
    norm's `num_batches_tracked` from the metadata (0 where it has none), the rows in the file's
    `flatten` order (without one: torch's (c h w))."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("layout") != FLAX_LAYOUT:
        raise ValueError(
            f"{path}: not a Flax-layout file written by save_flax (layout {meta.get('layout')!r})"
        )
    # bf16_keys and num_batches_tracked are JSON-encoded, layout and bf16_as plain strings
    bf16_keys = json.loads(meta.get("bf16_keys", "[]")) if meta.get("bf16_as") == "uint16" else []
    counts = json.loads(meta.get("num_batches_tracked", "{}"))
    flatten: Any = meta.get("flatten", "chw")
    if flatten not in FLATTEN_ORDERS:
        raise ValueError(f"{path}: unknown flatten order {flatten!r} in the metadata")
    if flatten == "none":
        flatten = "chw"  # nothing was reordered: take the rows as they are
    elif flatten == "hwc" and "flatten_layers" in meta:  # exactly the layers that were reordered
        try:
            flatten = {k: tuple(v) for k, v in json.loads(meta["flatten_layers"]).items()}
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{path}: flatten_layers in the metadata is not {{layer: [c, h, w]}}") from None
    tensors = load_file(str(path))
    # torch uint16 has few kernels; go through numpy so the bit reinterpretation is plain
    arrays = {
        k: v.view(torch.int16).numpy().view(np.uint16) if k in bf16_keys else v.numpy()
        for k, v in tensors.items()
    }
    return from_flax(arrays, bf16_keys=bf16_keys, num_batches_tracked=counts, flatten=flatten)
