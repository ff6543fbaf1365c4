"""The members of an ensemble or sweep that diverge: marked, left out of what is reduced, quieted.

Rule: in a stacked run (a state whose step is `[K]`), a member whose loss becomes non-finite
(or whose parameters do) is marked diverged; from then on its per-member metrics read NaN,
it leaves the means, the standard deviations and the ensemble's own validation (evaluated
over the other members), and the others go on. The run counts as diverged (exit 3 on the
command line) only when every member has. The marks travel in the checkpoint's metadata
(`diverged_members`), so a resumed run leaves out the same members.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fashion_func import ensemble, tree
from fashion_func.loop.result import StopReason
from fashion_func.state import TrainState

__all__: list[str] = []

META_KEY = "diverged_members"


def note_bad(first_bad: Tensor, loss_sum: Tensor, step: Tensor) -> Tensor:
    """The first step whose loss was not finite, on the device (no sync); -1: none yet.

    One model: a 0-d tensor. A stack (`loss_sum` `[K]`): one entry per member, so that one
    member's divergence says nothing about the others."""
    bad = (first_bad < 0) & ~torch.isfinite(loss_sum)
    return torch.where(bad, step.reshape(-1)[0], first_bad)


def finite_members(params: Mapping[str, Tensor], k: int) -> list[bool]:
    """Per member of a stack: whether all its parameters are finite (one host sync)."""
    flags = [torch.isfinite(p).reshape(k, -1).all(1) for p in params.values()]
    return torch.stack(flags).all(0).tolist() if flags else [True] * k


def mean_std(values: Sequence[float], dead: Collection[int] = ()) -> tuple[float, float]:
    """Mean and sample standard deviation of the members not in `dead` (NaN when none is
    left; std 0 for one; NaN when a value is not finite, where `statistics.stdev` raises)."""
    vals = [float(v) for k, v in enumerate(values) if k not in dead]
    if not vals:
        return math.nan, math.nan
    if not all(math.isfinite(v) for v in vals):  # nan, inf or -inf: what plain arithmetic gives
        return sum(v / len(vals) for v in vals), math.nan if len(vals) > 1 else 0.0
    try:
        mean = statistics.fmean(vals)
    except OverflowError:  # an intermediate sum past float range
        mean = sum(v / len(vals) for v in vals)
    if len(vals) == 1:
        return mean, 0.0
    try:
        return mean, statistics.stdev(vals)
    except OverflowError:
        return mean, math.inf


def with_dead(values: Sequence[float], live: Sequence[int], k: int) -> list[float]:
    """`values` (one per live member) spread back over all `k` members, NaN for the others."""
    out = [math.nan] * k
    for i, v in zip(live, values, strict=True):
        out[i] = v
    return out


def live_state(state: TrainState, live: Sequence[int]) -> TrainState:
    """The stack cut down to the `live` members (every per-member tensor: weights, optimizer
    state such as a moving average of them, model state, step, rng)."""
    k = ensemble.size(state)
    idx = torch.tensor(list(live), dtype=torch.long, device=state.step.device)

    def cut(x: Any) -> Any:
        return x.index_select(0, idx) if isinstance(x, Tensor) and x.dim() and x.shape[0] == k else x

    return tree.map(cut, state)


def quiet(state: TrainState, dead: Collection[int]) -> TrainState:
    """The dead members' non-finite numbers set to 0 (in parameters, optimizer and model
    state), so that the state can be checkpointed (loading refuses non-finite tensors) and a
    resumed run holds the very same numbers. The live members are untouched."""
    if not dead:
        return state
    k = ensemble.size(state)
    mask = torch.zeros(k, dtype=torch.bool, device=state.step.device)
    mask[list(dead)] = True

    def fix(x: Any) -> Any:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[0] != k:
            return x
        m = mask.reshape(k, *([1] * (x.dim() - 1)))
        return torch.where(m, torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), x)

    return state.replace(
        params=tree.map(fix, state.params),
        opt_state=tree.map(fix, state.opt_state),
        model_state=tree.map(fix, state.model_state),
    )


@dataclass
class Stack:
    """A stack of `k` members (an ensemble or sweep) and its diverged ones, member -> {"epoch":
    e, "step": s} (step -1: the loss stayed finite but the parameters did not): a member that
    diverges is marked and left out; the run stops when every member has (the module's rule)."""

    k: int
    marks: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def dead(self) -> list[int]:
        return sorted(self.marks)

    @property
    def live(self) -> list[int]:
        return [i for i in range(self.k) if i not in self.marks]

    def message(self, i: int) -> str:
        m = self.marks[i]
        what = f"non-finite loss at step {m['step']}" if m["step"] >= 0 else "non-finite parameters"
        left = len(self.live)
        tail = f"{left} of {self.k} go on" if left else "no member is left"
        return (
            f"member {i} diverged: {what} (epoch {m['epoch']}); left out of the means and the monitor, {tail}"
        )

    def to_meta(self) -> list[dict[str, int]]:
        return [{"member": i, **self.marks[i]} for i in self.dead]

    @classmethod
    def from_meta(cls, value: Any, k: int) -> Stack:
        """The marks a checkpoint saved; ValueError naming what is wrong with them."""
        out = cls(k)
        if value is None:
            return out
        if not isinstance(value, list):
            raise ValueError(f"{META_KEY} must be a list, not {type(value).__name__}")
        for row in value:
            ok = isinstance(row, dict) and set(row) == {"member", "epoch", "step"}
            ok = ok and all(isinstance(row[n], int) and not isinstance(row[n], bool) for n in row)
            if not ok or not 0 <= row["member"] < k or row["epoch"] < 1 or row["step"] < -1:
                raise ValueError(f"{META_KEY}: {row!r} is not {{member: 0..{k - 1}, epoch >= 1, step >= -1}}")
            if row["member"] in out.marks:
                raise ValueError(f"{META_KEY}: member {row['member']} is listed twice")
            out.marks[row["member"]] = {"epoch": row["epoch"], "step": row["step"]}
        return out

    def resumed(self, saved: Any) -> Stack:
        """The marks a checkpoint saved (ValueError naming what is wrong with them)."""
        return Stack.from_meta(saved, self.k)

    def verdict(self, state: TrainState, epoch: int, bad_steps: Sequence[float], log: Any) -> tuple[
        TrainState, int, bool]:  # fmt: skip
        """Members whose loss or parameters went non-finite marked (logged) and the state
        quieted (`quiet`); (state, first non-finite step, finite) of the stack as a whole:
        (state, -1, True) while any member is left."""
        steps = [int(x) for x in bad_steps] if len(bad_steps) == self.k else [int(bad_steps[0])] * self.k
        finite = finite_members(state.params, self.k)
        new = [i for i in self.live if steps[i] >= 0 or not finite[i]]
        for i in new:  # all marked before any is logged: each message counts the members left
            self.marks[i] = {"epoch": epoch, "step": steps[i]}
        for i in new:
            log.error(self.message(i))
        if len(self.marks) == self.k:  # kept as it is, like one model's diverged state: never saved
            steps = [m["step"] for m in self.marks.values() if m["step"] >= 0]
            return state, min(steps) if steps else -1, False  # the first non-finite loss's step
        return quiet(state, self.dead), -1, True

    def saved_sums(self, sums: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Running metric sums with non-finite entries (a diverged member's, never read) set to 0,
        so that a checkpoint's in-epoch sums are plain JSON numbers."""
        return {n: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) if v.is_floating_point() else v
                for n, v in sums.items()}  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        return {"members_diverged": len(self.marks)}

    def evaluated(self, finite: bool) -> list[int] | None:
        """The members to evaluate: all (None) until one is marked."""
        return self.live if self.marks and finite else None

    def divergence(self, epoch: int, bad: int, finite: bool) -> tuple[StopReason, str] | None:
        if finite:
            return None
        reason = f"every member diverged by epoch {epoch} (the first at step {bad})"
        return StopReason.MEMBERS_DIVERGED, reason


# The members policy: what `fit` does with one model or with a stack, chosen once.
class Single:
    """One model (its step is 0-d): a non-finite loss or non-finite parameters are the run's."""

    @property
    def dead(self) -> list[int]:
        return []

    def resumed(self, saved: Any) -> Single:
        return self

    def verdict(self, state: TrainState, epoch: int, bad_steps: Sequence[float], log: Any) -> tuple[
        TrainState, int, bool]:  # fmt: skip
        """(state, first non-finite step or -1, finite) after the steps whose first
        non-finite one is `bad_steps[0]`."""
        bad = int(bad_steps[0])
        return state, bad, bad < 0 and all(bool(torch.isfinite(p).all()) for p in state.params.values())

    def saved_sums(self, sums: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        return sums

    def metrics(self) -> dict[str, Any]:
        return {}

    def evaluated(self, finite: bool) -> list[int] | None:
        return None

    def divergence(self, epoch: int, bad: int, finite: bool) -> tuple[StopReason, str] | None:
        """Why the run stops on what `verdict` found, before any callback's reason (it names the step)."""
        return (StopReason.NON_FINITE, f"non-finite loss at step {bad} (epoch {epoch})") if bad >= 0 else None

    def to_meta(self) -> list[dict[str, int]]:
        return []


def policy(state: TrainState) -> Single | Stack:
    """What `fit` does with `state`'s members: `Stack` for a stack (its step is `[K]`), else `Single`."""
    return Stack(ensemble.size(state)) if state.step.dim() == 1 else Single()
