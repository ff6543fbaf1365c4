"""Hyperparameters inside an optimizer state: listed, read and replaced by name.

A hyperparameter is a float field of one of the states' NamedTuples, 0-d (or `[K]` in a
stacked ensemble state). Inside `multi_transform` a group's hyperparameters also answer to
`"label/name"` (`"head/lr"`, `"outer/inner/lr"` for nested groups): `"lr"` names every `lr`,
all groups included, `"head/lr"` only those in group `head` (and groups nested in it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fashion_func.optim.base import State
from fashion_func.optim.wrappers import MultiTransformState

__all__ = ["get_hyperparam", "hyperparams", "set_hyperparam"]

Visit = Callable[[tuple[str, ...], str, Tensor], Tensor]  # (groups, field, value) -> new value


def _is_hyper(value: Any) -> bool:
    # 0-d, or [K] in a stacked (ensemble) state: one value per member
    return isinstance(value, Tensor) and value.dim() <= 1 and value.is_floating_point()


def _walk(state: Any, fn: Visit, groups: tuple[str, ...] = ()) -> Any:
    """Rebuild `state` with every 0-d float field of a NamedTuple passed through `fn(groups, name,
    value)`. Recurses through plain tuples/lists (chain states), NamedTuple fields that are
    themselves tuples (wrapping transforms), and `multi_transform`'s groups (adding their label to
    `groups`); anything else (param-shaped dicts, counters) is left alone."""
    if isinstance(state, MultiTransformState):
        return MultiTransformState(
            {label: _walk(s, fn, (*groups, label)) for label, s in state.inner_states.items()}
        )
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        fields = zip(state._fields, state, strict=True)
        return type(state)(*(fn(groups, n, v) if _is_hyper(v) else _walk(v, fn, groups) for n, v in fields))
    if isinstance(state, (tuple, list)):
        return type(state)(_walk(s, fn, groups) for s in state)
    return state


def _matches(name: str) -> Callable[[tuple[str, ...], str], bool]:
    """Whether a field `field` in `groups` answers to `name` ("lr", "head/lr", "a/b/lr")."""
    *prefix, target = name.split("/")
    return lambda groups, field: field == target and list(groups[: len(prefix)]) == prefix


def hyperparams(opt_state: State) -> dict[str, Tensor]:
    """All settable hyperparameters of `opt_state` by name: each bare name's first occurrence,
    and within `multi_transform` groups each under `"label/name"` too."""
    found: dict[str, Tensor] = {}

    def visit(groups: tuple[str, ...], name: str, value: Tensor) -> Tensor:
        found.setdefault(name, value)
        if groups:
            found.setdefault("/".join((*groups, name)), value)
        return value

    _walk(opt_state, visit)
    return found


def get_hyperparam(opt_state: State, name: str) -> Tensor:
    """The hyperparameter `name` ("lr", "weight_decay", "head/lr", ...) of `opt_state`: its
    first occurrence; KeyError if absent."""
    matches = _matches(name)
    hits: list[Tensor] = []

    def visit(groups: tuple[str, ...], field: str, value: Tensor) -> Tensor:
        if matches(groups, field):
            hits.append(value)
        return value

    _walk(opt_state, visit)
    if not hits:
        raise KeyError(
            f"no hyperparameter {name!r} in the optimizer state; it has {sorted(hyperparams(opt_state))}"
        )
    return hits[0]


def set_hyperparam(opt_state: State, name: str, value: float | Tensor) -> State:
    """A new state with every hyperparameter `name` set to `value`, keeping its dtype,
    device and shape (so compiled steps do not recompile). The old state is untouched.
    `"lr"` sets every lr, `"head/lr"` those of `multi_transform` group `head` only.
    In a stacked state (`[K]` per member) a float sets every member and a `[K]` tensor
    each its own. A tensor keeps its autograd graph (as optax's `inject_hyperparams`): a
    hypergradient flows through it. KeyError if `name` is absent."""
    matches = _matches(name)
    hits = 0

    def replace(groups: tuple[str, ...], field: str, old: Tensor) -> Tensor:
        nonlocal hits
        if not matches(groups, field):
            return old
        hits += 1
        if isinstance(value, Tensor):
            # no detach: the value may be what a hypergradient is taken with respect to
            return value.to(dtype=old.dtype, device=old.device).reshape(old.shape).clone()
        return torch.full_like(old, float(value))

    new_state = _walk(opt_state, replace)
    if hits == 0:
        have = sorted(hyperparams(opt_state))
        raise KeyError(f"no hyperparameter {name!r} in the optimizer state; it has {have}")
    return new_state
