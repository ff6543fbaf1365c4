"""The learning rate the optimizer applied, read from its state (never a host-side copy)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fashion_func import optim
from fashion_func.loop.reduce import expand_members

__all__: list[str] = []


def _schedule_count(opt_state: Any) -> Tensor | None:
    """The update counter of the first `scale_by_schedule` in `opt_state`, or None."""
    found = optim.find_states(opt_state, optim.ScaleByScheduleState)
    return found[0].count if found else None


def applied_lr(
    opt_state: Any, schedule: Callable[[Tensor], Tensor] | None = None
) -> float | list[float] | None:
    """The learning rate of the optimizer's last update, from its state; None if it has no `lr`.

    The `lr` hyperparameter (as `optim.set_hyperparam` last set it), times `schedule` at the
    last update's count when the chain holds a `scale_by_schedule(schedule)`. Computed in
    float32 as the update is, and shown as the shortest float32 repr (0.001, not
    0.0010000000474974513). A stacked state (ensemble, sweep) gives one float when all members
    share it, else a list.
    """
    try:
        lr = optim.get_hyperparam(opt_state, "lr").detach()
    except KeyError:
        return None
    value = lr.float()
    if schedule is not None and (count := _schedule_count(opt_state)) is not None:
        last = (count.reshape(-1)[0] - 1).clamp(min=0)  # the counter counts updates done
        value = value * schedule(last.to(torch.float32)).to(torch.float32)
    floats = [float(str(np.float32(x))) for x in value.reshape(-1).tolist()]
    if value.dim() == 0 or len(set(floats)) == 1:
        return floats[0]
    return floats


def lr_metrics(opt_state: Any, schedule: Callable[[Tensor], Tensor] | None) -> dict[str, Any]:
    """The history's `applied_lr` ({} without one): "lr" if it is the rate the last update applied,
    "base_lr" if a `scale_by_schedule` that `fit` was not given (`lr_schedule=`) scales it per step
    (so "lr" never shows a rate that was not applied); a sweep's per member (`expand_members`)."""
    lr = applied_lr(opt_state, schedule)
    key = "base_lr" if schedule is None and _schedule_count(opt_state) is not None else "lr"
    if isinstance(lr, list):
        return expand_members({key: lr})
    return {} if lr is None else {key: lr}
