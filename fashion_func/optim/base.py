"""The optimizer's contract: `GradientTransformation(init, update, description)`, `chain`,
`apply_updates`, and the helpers every transform uses to build its state (hyperparameters as
0-d tensors) and its description."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fashion_func import tree
from fashion_func.schedules import Description

__all__ = [
    "Description",
    "GradientTransformation",
    "Params",
    "State",
    "apply_updates",
    "chain",
    "find_states",
    "map_states",
]

Params = Any  # a tree of tensors; in this library a flat dict[str, Tensor]
State = Any  # a NamedTuple of tensors / trees, or a tuple of such (chain)


class GradientTransformation(NamedTuple):
    """A pair of pure functions, and what they are: `init(params) -> state`; `update(grads,
    state, params=None) -> (updates, state)`; `description`, the `Description` that every
    transform `optim` builds carries (`None` for one written by hand,
    `GradientTransformation(init, update)`)."""

    init: Callable[[Params], State]
    update: Callable[..., tuple[Params, State]]
    description: Description | None = None


def described(
    init: Callable[[Params], State],
    update: Callable[..., tuple[Params, State]],
    name: str,
    children: Mapping[str, GradientTransformation] | None = None,
    **hyperparams: Any,
) -> GradientTransformation:
    """`GradientTransformation(init, update)` described as `name(**hyperparams)` wrapping `children`."""
    kids = {role: tx.description for role, tx in (children or {}).items()}
    return GradientTransformation(init, update, Description(name, hyperparams, kids))


def hyper_spec(params: Params) -> tuple[torch.dtype, torch.device]:
    """Dtype and device for hyperparameter tensors: the params' device, float64 if
    any param is float64 else float32 (half-precision params still get a float32 lr)."""
    floats = [t for t in tree.leaves(params) if isinstance(t, Tensor) and t.is_floating_point()]
    if not floats:
        return torch.float32, torch.device("cpu")
    return tree.widest_float(floats), floats[0].device


def hyper(value: float | Tensor, params: Params) -> Tensor:
    """A settable hyperparameter: a 0-d float tensor on the params' device (`hyper_spec`).
    A tensor `value` keeps its autograd graph (a hyperparameter one differentiates by)."""
    dtype, device = hyper_spec(params)
    if isinstance(value, Tensor):
        return value.to(dtype=dtype, device=device).reshape(())
    return torch.tensor(float(value), dtype=dtype, device=device)


def counter(params: Params, start: int = 0) -> Tensor:
    """A 0-d int64 tensor on the params' device."""
    _, device = hyper_spec(params)
    return torch.full((), start, dtype=torch.int64, device=device)


def need_params(params: Params | None, who: str) -> Params:
    """`params`, or a ValueError saying that transform `who` needs them."""
    if params is None:
        raise ValueError(f"{who} needs `params`: call update(grads, state, params)")
    return params


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply `transforms` one after the other; the state is the tuple of their states."""
    return named_chain("chain", transforms)


def named_chain(name: str, transforms: Any, **hyperparams: Any) -> GradientTransformation:
    """`chain(*transforms)` described as `name(**hyperparams)` (a named optimizer: `adam`, `sgd`)."""
    txs = tuple(transforms)

    def init(params: Params) -> tuple[State, ...]:
        return tuple(tx.init(params) for tx in txs)

    def update(grads: Params, state: tuple[State, ...], params: Params | None = None) -> tuple[Params, State]:
        if len(state) != len(txs):
            raise ValueError(f"chain of {len(txs)} transforms got a state of length {len(state)}")
        new_states = []
        for tx, s in zip(txs, state, strict=True):
            grads, s = tx.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return described(init, update, name, {str(i): tx for i, tx in enumerate(txs)}, **hyperparams)


def apply_updates(params: Params, updates: Params) -> Params:
    """A new tree `params + updates`, each leaf kept in its param's dtype."""
    return tree.map(lambda p, u: (p + u).to(p.dtype), params, updates)


def map_states(opt_state: State, cls: type, fn: Callable[[Any], Any]) -> State:
    """`opt_state` rebuilt with `fn(s)` in place of each sub-state `s` of type `cls`, found
    through chains' tuples and wrappers' states (NamedTuple fields, multi_transform's dict)."""
    if isinstance(opt_state, cls):
        return fn(opt_state)
    if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
        return type(opt_state)(*(map_states(v, cls, fn) for v in opt_state))
    if isinstance(opt_state, (tuple, list)):
        return type(opt_state)(map_states(v, cls, fn) for v in opt_state)
    if isinstance(opt_state, dict):
        return {k: map_states(v, cls, fn) for k, v in opt_state.items()}
    return opt_state


def find_states(opt_state: State, cls: type) -> list[Any]:
    """Every sub-state of type `cls` in `opt_state`, outermost first, as `map_states` finds them."""
    found: list[Any] = []
    map_states(opt_state, cls, lambda s: found.append(s) or s)
    return found
