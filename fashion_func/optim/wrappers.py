"""Transforms that wrap others, with optax's semantics: `masked` (an inner transform on some
parameters), `multi_transform` (one transform per labelled group), `MultiSteps` (gradient
accumulation over k micro-batches).

Masks and labels are dicts shaped like the params (flat, as this library's params are, or
nested), or a prefix of them (a value at a sub-dict covers all of it), or a function
`params -> such a dict`, called with the params at `init` and with the updates at `update`,
as optax does. The inner transform sees only its own parameters: a sub-dict of the params, so
its state holds only theirs and is saved by `checkpoint` under its own keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fashion_func import tree
from fashion_func.optim.base import GradientTransformation, Params, State, counter, described

__all__ = ["MaskedState", "MultiSteps", "MultiStepsState", "MultiTransformState", "masked", "multi_transform"]

Mask = Mapping[str, Any] | Callable[[Params], Mapping[str, Any]]  # bools (or sub-dicts) like params
Labels = Mapping[str, Any] | Callable[[Params], Mapping[str, Any]]  # str labels (or sub-dicts)


class MaskedState(NamedTuple):
    """The state of `masked`: the inner transform's state over the masked parameters."""

    inner_state: State  # the inner transform's state, over the masked parameters only


class MultiTransformState(NamedTuple):
    """The state of `multi_transform`: each label's transform state."""

    inner_states: dict[str, State]  # label -> that group's transform state (optax: PartitionState)


class MultiStepsState(NamedTuple):
    """The state of `MultiSteps`: micro-batch count, inner state, gradients so far."""

    mini_step: Tensor  # 0-d int64, micro-batches accumulated since the last update (0..k-1)
    gradient_step: Tensor  # 0-d int64, updates the inner optimizer has made
    inner_opt_state: State  # the inner optimizer's state, changed only every k-th call
    acc_grads: Params  # the running mean (or sum) of this cycle's gradients


def _resolve(spec: Any, values: Params) -> Any:
    return spec(values) if callable(spec) else spec


def _select(values: Mapping[str, Any], spec: Any, keep: Callable[[Any], bool], path: str = "") -> dict:
    """The sub-dict of `values` whose entries `keep(spec leaf)` holds for; `spec` is a dict
    with the same keys as `values` at each level, or a leaf covering the whole sub-dict."""
    if not isinstance(values, Mapping):
        raise TypeError(f"masked/multi_transform need params as a dict, got {type(values).__name__}")
    if not isinstance(spec, Mapping):
        return dict(values) if keep(spec) else {}
    if set(spec) != set(values):
        missing, extra = sorted(set(values) - set(spec)), sorted(set(spec) - set(values))
        raise ValueError(
            f"mask/labels{' at ' + path if path else ''} do not match the params: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            sub = _select(value, spec[key], keep, f"{path}{key}/")
            if sub:
                out[key] = sub
        elif isinstance(spec[key], Mapping):
            raise ValueError(f"mask/labels have a dict at {path}{key}, where the params have a leaf")
        elif keep(spec[key]):
            out[key] = value
    return out


def _merge(full: Mapping[str, Any], part: Mapping[str, Any]) -> dict:
    """`full` with the entries of `part` (a sub-dict of it, as `_select` makes) replaced."""
    out = dict(full)
    for key, value in part.items():
        out[key] = _merge(full[key], value) if isinstance(value, Mapping) else value
    return out


def _is_true(flag: Any) -> bool:
    if not isinstance(flag, bool):
        raise TypeError(f"mask values must be Python bools (or dicts of them), got {flag!r}")
    return flag


def _label_leaves(labels: Any) -> set[Any]:
    if isinstance(labels, Mapping):
        return set().union(*(_label_leaves(v) for v in labels.values()))
    return {labels}


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """`inner` applied to the parameters `mask` marks True; the others' updates pass through
    unchanged (optax's `masked`). E.g. weight decay on matrices only:
    `masked(add_decayed_weights(1e-4), lambda p: {k: v.dim() > 1 for k, v in p.items()})`. To
    freeze parameters, zero their updates: `chain(adam(...), masked(set_to_zero(), frozen))`."""

    def init(params: Params) -> MaskedState:
        return MaskedState(inner.init(_select(params, _resolve(mask, params), _is_true)))

    def update(
        updates: Params, state: MaskedState, params: Params | None = None
    ) -> tuple[Params, MaskedState]:
        spec = _resolve(mask, updates)
        part = _select(updates, spec, _is_true)
        part_params = None if params is None else _select(params, spec, _is_true)
        new_part, inner_state = inner.update(part, state.inner_state, part_params)
        return _merge(updates, new_part), MaskedState(inner_state)

    return described(init, update, "masked", {"inner": inner}, mask=mask)


def multi_transform(
    transforms: Mapping[str, GradientTransformation], labels: Labels
) -> GradientTransformation:
    """One transform per group of parameters (optax's `multi_transform` / `partition`):
    `labels` gives each parameter the name of its group (a dict like the params, or a function
    `params -> dict`), and `transforms[label]` updates that group only. E.g. frozen features
    and a faster head: `multi_transform({"body": set_to_zero(), "head": adam(1e-2)}, lambda p:
    {k: "head" if k.startswith("fc2.") else "body" for k in p})`. Labels are str without "/"
    (they name the groups' hyperparameters: "head/lr", see `set_hyperparam`); every label used
    must have a transform (ValueError at `init`)."""
    txs = dict(transforms)
    for label in txs:
        if not isinstance(label, str) or not label or "/" in label:
            raise ValueError(f"multi_transform labels must be non-empty str without '/', got {label!r}")

    def group(label: str) -> Callable[[Any], bool]:
        return lambda leaf: leaf == label

    def init(params: Params) -> MultiTransformState:
        spec = _resolve(labels, params)
        unknown = _label_leaves(spec) - set(txs)
        if unknown:
            raise ValueError(
                f"parameters labelled {sorted(map(str, unknown))} have no transform in {sorted(txs)}"
            )
        return MultiTransformState({lb: tx.init(_select(params, spec, group(lb))) for lb, tx in txs.items()})

    def update(
        updates: Params, state: MultiTransformState, params: Params | None = None
    ) -> tuple[Params, MultiTransformState]:
        spec = _resolve(labels, updates)
        new_states = {}
        for label, tx in txs.items():
            part = _select(updates, spec, group(label))
            part_params = None if params is None else _select(params, spec, group(label))
            new_part, new_states[label] = tx.update(part, state.inner_states[label], part_params)
            updates = _merge(updates, new_part)
        return updates, MultiTransformState(new_states)

    return described(init, update, "multi_transform", txs, labels=labels)


def _accumulator_dtype(p: Tensor) -> torch.dtype:
    # bf16/fp16 params accumulate in float32, wider ones in their own dtype
    return torch.promote_types(p.dtype, torch.float32) if p.is_floating_point() else p.dtype


def MultiSteps(  # optax's name (a class there) for the same wrapper
    inner: GradientTransformation, every_k: int, *, use_grad_mean: bool = True
) -> GradientTransformation:
    """Gradient accumulation (optax's `MultiSteps(opt, every_k_schedule=k).gradient_transformation()`):
    each call adds the gradients to a running mean (`acc + (g - acc) / (n + 1)`, or a sum with
    `use_grad_mean=False`) and returns zero updates, except every `every_k`-th call, which
    feeds the accumulated gradients to `inner`, returns its updates and starts a new mean. With
    a mean loss, k micro-batches then make the update of one k-times-larger batch. The choice is
    a `torch.where`, not a branch, so the step compiles: `inner.update` runs on every call and
    its result is kept only on the k-th (an elementwise optimizer is cheap beside the forward
    and backward passes). `TrainState.step` counts micro-batches; the inner optimizer's counters
    (and `scale_by_schedule`) count updates."""
    if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
        raise ValueError(f"MultiSteps every_k must be an int >= 1, got {every_k!r}")

    def init(params: Params) -> MultiStepsState:
        acc = tree.map(lambda p: torch.zeros_like(p, dtype=_accumulator_dtype(p)), params)
        return MultiStepsState(counter(params), counter(params), inner.init(params), acc)

    def update(
        grads: Params, state: MultiStepsState, params: Params | None = None
    ) -> tuple[Params, MultiStepsState]:
        n = state.mini_step
        if use_grad_mean:  # Welford's running mean, as optax
            acc = tree.map(lambda a, g: a + (g.to(a.dtype) - a) / (n + 1), state.acc_grads, grads)
        else:
            acc = tree.map(lambda a, g: a + g.to(a.dtype), state.acc_grads, grads)
        summed = tree.map(lambda a, g: a.to(g.dtype), acc, grads)
        final, new_inner = inner.update(summed, state.inner_opt_state, params)
        emit = n == every_k - 1
        keep_inner = tree.map(lambda new, old: torch.where(emit, new, old), new_inner, state.inner_opt_state)
        updates = tree.map(lambda u: torch.where(emit, u, torch.zeros_like(u)), final)
        acc = tree.map(lambda a: torch.where(emit, torch.zeros_like(a), a), acc)
        new_state = MultiStepsState(
            (n + 1) % every_k, state.gradient_step + emit.to(n.dtype), keep_inner, acc
        )
        return updates, new_state

    return described(
        init, update, "MultiSteps", {"inner": inner}, every_k=every_k, use_grad_mean=use_grad_mean
    )
