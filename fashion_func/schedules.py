"""Learning-rate schedules: pure functions `step -> lr`, each usable two ways.

* On a Python int (an epoch or a step) a schedule returns a Python float:
  `callbacks.LRSchedule` calls it once per epoch and sets the optimizer's lr to the value.
* On a 0-d float tensor (an optimizer's step counter) it returns a 0-d tensor of that dtype,
  built from arithmetic, `cos`, clamps and selections alone: no branch on the tensor's value,
  no host sync, so it runs inside a compiled step (`optim.scale_by_schedule`).

Both ways compute one formula (torch's closed form where there is one), so a value depends on
the step alone. A negative step (for `onecycle` also one past its end) is a ValueError on ints;
tensors are not checked (that would sync the host). The module never imports torch.

Each schedule (of type `Schedule`) is a `DescribedSchedule` whose `description` is data an export
reads (`interop.optax_optimizer`); `Description` is public as `optim.Description`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "linear_warmup",
    "onecycle",
    "piecewise_linear",
    "step_lr",
    "triangle",
    "warmup_cosine",
]

Step = Any  # a Python int (an epoch or a step), or a 0-d float tensor (an optimizer's counter)
Schedule = Callable[[Step], Any]  # int -> float; 0-d tensor -> 0-d tensor of its dtype


@dataclass(frozen=True)
class Description:
    """What a schedule or an optimizer transform is, as data. `name`: the public function that
    built it (`"piecewise_linear"`, `"scale_by_adam"`, `"adam"`); `hyperparams`: the arguments it
    was built with, by parameter name (a transform's state may hold later values of some:
    `optim.set_hyperparam`); `children`: the descriptions of the transforms it wraps, by role
    (`"0"`, `"1"`, ... in a chain, `"inner"` in a wrapper, the group's label in
    `multi_transform`), `None` for one written by hand without a description."""

    name: str
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    children: Mapping[str, Description | None] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class DescribedSchedule:
    """A schedule that says what it is: called as `fn`, described by `description`."""

    fn: Callable[[Step], Any]
    description: Description

    def __call__(self, t: Step) -> Any:
        return self.fn(t)


def _described(fn: Callable[[Step], Any], name: str, **hyperparams: Any) -> DescribedSchedule:
    return DescribedSchedule(fn, Description(name, hyperparams))


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "clamp")


def _check_step(t: Step) -> Step:
    """`t`, after a ValueError if it is a negative int (a tensor passes unchecked: no sync)."""
    if not _is_tensor(t) and t < 0:
        raise ValueError(f"schedule step must be >= 0, got {t}")
    return t


def _cos(x: Any) -> Any:
    return x.cos() if _is_tensor(x) else math.cos(x)


def _clamp(x: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """`x` clamped to [lo, hi] (either bound may be None): a float, or a tensor elementwise."""
    if _is_tensor(x):
        return x.clamp(lo, hi)
    if lo is not None:
        x = max(x, lo)
    return min(x, hi) if hi is not None else x


def _where(cond: Any, a: Any, b: Any) -> Any:
    """`a` if `cond` else `b`: a Python choice for a bool; for a bool tensor an elementwise
    selection (no branch), where `a` or `b` is a tensor."""
    if not _is_tensor(cond):
        return a if cond else b
    return a.where(cond, b) if _is_tensor(a) else b.where(~cond, a)


def constant(lr: float) -> Schedule:
    """`lr` at every step."""
    lr = float(lr)
    return _described(lambda t: _check_step(t) * 0.0 + lr, "constant", lr=lr)


def step_lr(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """`lr * gamma ** (epoch // step_size)`, the values of `torch.optim.lr_scheduler.StepLR`."""
    if step_size <= 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return _described(
        lambda t: lr * gamma ** (_check_step(t) // step_size),
        "step_lr", lr=lr, step_size=step_size, gamma=gamma,
    )  # fmt: skip


def cosine(lr: float, t_max: int, eta_min: float = 0.0) -> Schedule:
    """`eta_min + (lr - eta_min) * (1 + cos(pi * t / t_max)) / 2`, the values of
    `torch.optim.lr_scheduler.CosineAnnealingLR` (which, past `t_max`, rises again likewise)."""
    if t_max <= 0:
        raise ValueError(f"t_max must be positive, got {t_max}")
    return _described(
        lambda t: eta_min + (lr - eta_min) * (1 + _cos(math.pi * _check_step(t) / t_max)) / 2,
        "cosine", lr=lr, t_max=t_max, eta_min=eta_min,
    )  # fmt: skip


def _onecycle_phases(
    max_lr: float, total_steps: int, pct_start: float, div_factor: float, final_div_factor: float, three: bool
) -> list[tuple[float, float, float, float]]:
    """torch's OneCycleLR phase table as (start_step, end_step, start_lr, end_lr)."""
    initial_lr = max_lr / div_factor
    ends = [(float(pct_start * total_steps) - 1, initial_lr, max_lr)]
    if three:
        ends.append((float(2 * pct_start * total_steps) - 2, max_lr, initial_lr))
    ends.append((total_steps - 1, ends[-1][2], initial_lr / final_div_factor))
    starts = [0.0] + [end for end, _, _ in ends[:-1]]
    return [(s, e, a, b) for s, (e, a, b) in zip(starts, ends, strict=True)]


def onecycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The learning rates of `torch.optim.lr_scheduler.OneCycleLR` (per step, 0..total_steps):
    warm up from `max_lr / div_factor` to `max_lr` over `pct_start` of the steps, then anneal
    to `max_lr / div_factor / final_div_factor` (`three_phase`: back to the start first). A
    phase of no steps (where torch divides by zero) counts as done."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= pct_start <= 1:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    phases = _onecycle_phases(max_lr, total_steps, pct_start, div_factor, final_div_factor, three_phase)

    def phase_value(t: Step, start_step: float, end_step: float, start: float, end: float) -> Any:
        span = end_step - start_step
        pct = (t - start_step) / span if span else t * 0.0 + 1.0
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (_cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(t: Step) -> Any:
        if not _is_tensor(_check_step(t)) and t > total_steps:
            raise ValueError(f"onecycle schedule has {total_steps} steps, asked for step {t}")
        # torch takes the first phase whose end is not before t (the last one otherwise):
        # every phase's value, selected from the last back to the first, without a branch
        value = phase_value(t, *phases[-1])
        for phase in reversed(phases[:-1]):
            value = _where(t <= phase[1], phase_value(t, *phase), value)
        return value

    return _described(
        schedule, "onecycle", max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
        anneal_strategy=anneal_strategy, div_factor=div_factor, final_div_factor=final_div_factor,
        three_phase=three_phase,
    )  # fmt: skip


def linear_warmup(lr: float, warmup_steps: int) -> Schedule:
    """`lr * min(1, (t + 1) / warmup_steps)`: step 0 already moves (at `lr / warmup_steps`),
    full `lr` from step `warmup_steps - 1` on; `torch.optim.lr_scheduler.LinearLR` from
    `1 / warmup_steps` over `warmup_steps - 1` steps."""
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")
    return _described(
        lambda t: lr * _clamp((_check_step(t) + 1) / warmup_steps, hi=1.0),
        "linear_warmup", lr=lr, warmup_steps=warmup_steps,
    )  # fmt: skip


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, eta_min: float = 0.0) -> Schedule:
    """`linear_warmup` for `warmup_steps`, then a cosine from `lr` to `eta_min` at `total_steps`
    (held at `eta_min` afterwards)."""
    if not 0 < warmup_steps < total_steps:
        raise ValueError(f"need 0 < warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    warm = linear_warmup(lr, warmup_steps)
    decay = total_steps - warmup_steps

    def schedule(t: Step) -> Any:
        frac = _clamp((_check_step(t) - warmup_steps) / decay, 0.0, 1.0)
        annealed = eta_min + (lr - eta_min) * (1 + _cos(math.pi * frac)) / 2
        return _where(t < warmup_steps, warm(t), annealed)

    return _described(
        schedule, "warmup_cosine", lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, eta_min=eta_min
    )


def piecewise_linear(knots: Sequence[tuple[float, float]]) -> Schedule:
    """Linear interpolation through `knots` `[(step, value), ...]` (steps increasing), held
    at the end values outside them (any real step, negative ones too)."""
    if not knots:
        raise ValueError("piecewise_linear needs at least one knot")
    xs = [float(x) for x, _ in knots]
    ys = [float(y) for _, y in knots]
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise ValueError(f"piecewise_linear knots must have increasing steps, got {xs}")

    def schedule(t: Step) -> Any:
        # y0 plus each segment's rise times how far along it t is
        value: Any = ys[0] + 0.0 * t
        for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
            value = value + _clamp((t - x0) / (x1 - x0), 0.0, 1.0) * (y1 - y0)
        return value

    return _described(schedule, "piecewise_linear", knots=tuple(zip(xs, ys, strict=True)))


def triangle(total_steps: int, warmup_steps: int, start: float = 0.1, end: float = 0.0) -> Schedule:
    """A one-cycle multiplier: linear from `start` to 1 over `warmup_steps`, then linear to
    `end` at `total_steps` (the triangular schedule of fast CIFAR-10 recipes): a
    `piecewise_linear`, and described as the one it is (its knots)."""
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    knots = [(0, start), (warmup_steps, 1.0)] if warmup_steps else [(0, 1.0)]
    return piecewise_linear([*knots, (total_steps, end)])
