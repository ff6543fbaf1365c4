"""Helpers over trees of tensors (dicts, tuples, NamedTuples, registered dataclasses).

Everything here is pure: inputs are never modified, new containers are returned.
A *tree* is anything `torch.utils._pytree` can flatten; a *leaf* is usually a Tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = [
    "add",
    "cast",
    "flatten",
    "flatten_with_paths",
    "global_norm",
    "leaves",
    "map",
    "scale",
    "sub",
    "to",
    "unflatten",
    "unflatten_like",
    "zeros_like",
]

SEP = "/"


def map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:  # noqa: A001 - mirrors jax.tree.map
    """Apply `fn` leaf-wise over one or more trees of the same structure."""
    return pytree.tree_map(fn, tree, *rest)


def leaves(tree: Any) -> list[Any]:
    """The leaves of `tree`, in flattening order."""
    return pytree.tree_leaves(tree)


def zeros_like(tree: Any) -> Any:
    """A tree of zeros with the shapes, dtypes and devices of `tree`."""
    return map(torch.zeros_like, tree)


def add(a: Any, b: Any) -> Any:
    """Leaf-wise `a + b`."""
    return map(torch.add, a, b)


def sub(a: Any, b: Any) -> Any:
    """Leaf-wise `a - b`."""
    return map(torch.sub, a, b)


def scale(tree: Any, s: float | Tensor) -> Any:
    """Every leaf multiplied by `s`."""
    return map(lambda t: t * s, tree)


def widest_float(leaves: list[Tensor]) -> torch.dtype:
    """float64 if any leaf is, else float32: the dtype scalar factors over `leaves` use."""
    return torch.float64 if any(t.dtype == torch.float64 for t in leaves) else torch.float32


def global_norm(tree: Any) -> Tensor:
    """The L2 norm of all leaves taken together, as a 0-d tensor (no host sync): the norm of the
    per-leaf norms (as `torch.nn.utils.clip_grad_norm_` takes it), computed in the widest leaf
    dtype, at least float32 (bf16 leaves are upcast first); 0 for no leaves. The library's one
    global norm (clipping, per-example norms, DP-SGD)."""
    ts = leaves(tree)
    dtype = widest_float(ts)
    if not ts:
        return torch.zeros((), dtype=dtype)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.to(dtype)) for t in ts]))


def cast(tree: Any, dtype: torch.dtype) -> Any:
    """Floating-point leaves converted to `dtype`; integer leaves (counters) are kept."""
    return map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def to(tree: Any, device: torch.device | str) -> Any:
    """Every leaf moved to `device`."""
    return map(lambda t: t.to(device), tree)


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """A nested dict of tensors as a flat dict with `a/b/c` keys."""
    flat: dict[str, Tensor] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + SEP))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """Inverse of `flatten`: `a/b/c` keys back into nested dicts."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(SEP)
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return nested


def _key_name(entry: Any) -> str:
    # pytree key entries: MappingKey(key), SequenceKey(idx), GetAttrKey(name)
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_with_paths(tree: Any) -> dict[str, Any]:
    """Any tree as a flat dict `{"opt_state/1/mu/conv1.weight": leaf}`, in flattening order."""
    pairs, _ = pytree.tree_flatten_with_path(tree)
    return {SEP.join(_key_name(k) for k in path): leaf for path, leaf in pairs}


def unflatten_like(template: Any, flat: Mapping[str, Any]) -> Any:
    """Rebuild a tree with `template`'s structure from `flatten_with_paths`-style keys; KeyError
    naming missing or unexpected keys (shapes are the caller's to check)."""
    pairs, spec = pytree.tree_flatten_with_path(template)
    names = [SEP.join(_key_name(k) for k in path) for path, _ in pairs]
    missing = [n for n in names if n not in flat]
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        raise KeyError(f"missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    return pytree.tree_unflatten([flat[n] for n in names], spec)
