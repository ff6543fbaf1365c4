"""Metric sums -> epoch means, over an ensemble's members and a data-parallel group's ranks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fashion_func import ensemble
from fashion_func.loop import members as members_lib
from fashion_func.loop.collective import Collective

__all__ = ["evaluate"]


def evaluate(
    eval_step: Callable[..., Mapping[str, Tensor]],
    state: Any,
    batches: Iterable[Any],
    *,
    group: Collective | None = None,
    live: Sequence[int] | None = None,
) -> dict[str, float]:
    """Validation metrics over `batches`, one host sync at the end.

    `eval_step(state, batch)` (`state`: a TrainState or what the step takes) returns per-example
    tensors (as `make_eval_step`'s); each output shaped like `loss` (`[B]`) but `pred` and
    `logits` is averaged over the examples: `loss` -> val_loss, `correct` -> val_acc,
    `top{k}_correct` -> val_top{k}, any other `<name>` -> val_<name>; an ensemble's
    `member_<name>` (`[K, B]`) the same per member. group: each rank evaluated its own part of
    the data and gets the totals over the ranks (every rank needs a batch). live: of a stacked
    state, the members to evaluate (the others diverged: their per-member values are NaN, the
    ensemble's own metrics are those of the live members).
    """
    k = ensemble.size(state) if live is not None else 0
    if live is not None:
        state = members_lib.live_state(state, live)
    sums: dict[str, Tensor] = {}
    count = 0
    for batch in batches:
        with torch.no_grad():  # validation takes no gradient, even of params that require one
            out = eval_step(state, batch)
        count += int(out["loss"].shape[-1])  # a shape: no sync
        for key in _per_example_keys(out):
            part = out[key].double().sum(-1)
            sums[key] = part if key not in sums else sums[key] + part
    if group is not None and sums:  # this rank's part: the sums and the count added over the ranks
        anchor = next(iter(sums.values()))
        sums = sum_over_ranks(group, {**sums, "_count": anchor.new_tensor(float(count))})
    values = to_host(sums)  # the one sync
    count = int(values.pop("_count", count))
    own = {k: v for k, v in values.items() if not k.startswith("member_")}
    scalars = {_val_name(k): v / count for k, v in own.items()}
    members = {_val_name(n[7:]): [x / count for x in v] for n, v in values.items() if n not in own}
    if live is not None:
        members = {n: members_lib.with_dead(v, live, k) for n, v in members.items()}
        return expand_members(members, scalars, dead=[i for i in range(k) if i not in live])
    return expand_members(members, scalars)


def _per_example_keys(out: Mapping[str, Tensor]) -> list[str]:
    """The outputs `evaluate` averages: the ones shaped like `loss` (`member_loss`), but `pred`."""
    shapes = {"": out["loss"].shape, "member_": out["member_loss"].shape if "member_loss" in out else None}
    keys = []
    for key, value in out.items():
        prefix = "member_" if key.startswith("member_") else ""
        if key.removeprefix(prefix) not in ("pred", "logits") and value.shape == shapes[prefix]:
            keys.append(key)
    return keys


def _val_name(key: str) -> str:
    """`loss` -> val_loss, `correct` -> val_acc, `top5_correct` -> val_top5, `x` -> val_x."""
    if key == "correct":
        return "val_acc"
    return "val_" + (key.removesuffix("_correct") if re.fullmatch(r"top\d+_correct", key) else key)


def to_host(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Floats (0-d tensors) and lists of floats (one per member, [K]) in one host sync."""
    if not tensors:
        return {}
    flat = torch.cat([t.double().reshape(-1) for t in tensors.values()]).tolist()
    out: dict[str, Any] = {}
    i = 0
    for k, t in tensors.items():
        n = t.numel()
        out[k] = flat[i] if t.dim() == 0 else flat[i : i + n]
        i += n
    return out


def sum_over_ranks(group: Collective | None, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` added over the ranks in one collective (unchanged without a group)."""
    if group is None or not tensors:
        return dict(tensors)
    total = group.sum(torch.cat([t.double().reshape(-1) for t in tensors.values()]))
    out, i = {}, 0
    for k, t in tensors.items():
        out[k] = total[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def expand_members(
    members: Mapping[str, Sequence[float]],
    own: Mapping[str, float] | None = None,
    *,
    dead: Collection[int] = (),
) -> dict[str, float]:
    """Flat metrics from per-member lists: `x` -> `x_m0, x_m1, ...`, `x_mean`, `x_std` (sample
    standard deviation over members, 0 for one member), and `x` itself: the ensemble's own
    value where `own` has it (validation of the averaged prediction), else the members' mean.
    `dead`: diverged members, NaN in `x_m<k>` and left out of the mean and std."""
    out = dict(own or {})
    for name, values in members.items():
        out.setdefault(name, members_lib.mean_std(values, dead)[0])
    for name, values in members.items():
        out[f"{name}_mean"], out[f"{name}_std"] = members_lib.mean_std(values, dead)
        out.update({f"{name}_m{k}": math.nan if k in dead else v for k, v in enumerate(values)})
    return out


def train_metrics(sums: Mapping[str, Any], steps: int, dead: Collection[int] = ()) -> dict[str, float]:
    """Epoch means from summed step metrics, per example when `count` is given, named as `fit`
    says (train_loss, train_acc, ...); per-member sums (lists) expanded by `expand_members`."""
    count = sums.get("count", steps) or 1
    denom = count[0] if isinstance(count, list) else count  # members see the same batches
    scalars: dict[str, float] = {}
    members: dict[str, list[float]] = {}
    for k, v in sums.items():
        if k in ("count", "first_bad"):
            continue
        name = "train_" + ("acc" if k == "correct" else k.removesuffix("_sum").removesuffix("_correct"))
        if isinstance(v, list):
            members[name] = [x / denom for x in v]
        else:
            scalars[name] = v / denom
    order = {"train_loss": 0, "train_acc": 1}
    scalars = dict(sorted(scalars.items(), key=lambda kv: order.get(kv[0], 2)))
    members = dict(sorted(members.items(), key=lambda kv: order.get(kv[0], 2)))
    return expand_members(members, scalars, dead=dead)
