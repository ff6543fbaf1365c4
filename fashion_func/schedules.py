"""Learning-rate schedules: host-side pure functions `step_or_epoch -> lr` (plain Python,
no torch), the values of torch's schedulers in closed form, so a value depends on the step
alone (exact resume). `optim` re-exports them; `callbacks.LRSchedule` drives the optimizer's
learning rate from one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
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

Schedule = Callable[[int], float]


def _check_step(t: int) -> int:
    if t < 0:
        raise ValueError(f"schedule step must be >= 0, got {t}")
    return t


def constant(lr: float) -> Schedule:
    """`lr` at every step."""

    def schedule(t: int) -> float:
        _check_step(t)
        return float(lr)

    return schedule


def step_lr(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """`lr * gamma ** (epoch // step_size)`, the values of `torch.optim.lr_scheduler.StepLR`."""
    if step_size <= 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return lambda t: lr * gamma ** (_check_step(t) // step_size)


def cosine(lr: float, t_max: int, eta_min: float = 0.0) -> Schedule:
    """`eta_min + (lr - eta_min) * (1 + cos(pi * t / t_max)) / 2`, the values of
    `torch.optim.lr_scheduler.CosineAnnealingLR` (which, past `t_max`, rises again likewise)."""
    if t_max <= 0:
        raise ValueError(f"t_max must be positive, got {t_max}")
    return lambda t: eta_min + (lr - eta_min) * (1 + math.cos(math.pi * _check_step(t) / t_max)) / 2


def onecycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The learning rates of `torch.optim.lr_scheduler.OneCycleLR` (per step, 0..total_steps).

    Warm up from `max_lr / div_factor` to `max_lr` over `pct_start` of the steps, then anneal
    to `max_lr / div_factor / final_div_factor` (`three_phase`: back to the start first).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= pct_start <= 1:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    # (end_step, start_lr, end_lr), exactly torch's phase table
    if three_phase:
        phases = [
            (float(pct_start * total_steps) - 1, initial_lr, max_lr),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial_lr),
            (total_steps - 1, initial_lr, min_lr),
        ]
    else:
        phases = [(float(pct_start * total_steps) - 1, initial_lr, max_lr), (total_steps - 1, max_lr, min_lr)]

    def anneal(start: float, end: float, pct: float) -> float:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(t: int) -> float:
        _check_step(t)
        if t > total_steps:
            raise ValueError(f"onecycle schedule has {total_steps} steps, asked for step {t}")
        start_step = 0.0
        for i, (end_step, start, end) in enumerate(phases):
            if t <= end_step or i == len(phases) - 1:
                return anneal(start, end, (t - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable")

    return schedule


def linear_warmup(lr: float, warmup_steps: int) -> Schedule:
    """`lr * min(1, (t + 1) / warmup_steps)`: step 0 already moves (at `lr / warmup_steps`),
    full `lr` from step `warmup_steps - 1` on."""
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")
    return lambda t: lr * min(1.0, (_check_step(t) + 1) / warmup_steps)


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, eta_min: float = 0.0) -> Schedule:
    """`linear_warmup` for `warmup_steps`, then a cosine from `lr` to `eta_min` at `total_steps`
    (held at `eta_min` afterwards)."""
    if not 0 < warmup_steps < total_steps:
        raise ValueError(f"need 0 < warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    warm = linear_warmup(lr, warmup_steps)
    decay = total_steps - warmup_steps

    def schedule(t: int) -> float:
        if _check_step(t) < warmup_steps:
            return warm(t)
        frac = min(1.0, (t - warmup_steps) / decay)
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * frac)) / 2

    return schedule


def _clamp01(v: Any) -> Any:
    """`v` clamped to [0, 1]: a float, or a tensor (elementwise, no host sync)."""
    return v.clamp(0.0, 1.0) if hasattr(v, "clamp") else min(max(v, 0.0), 1.0)


def piecewise_linear(knots: Sequence[tuple[float, float]]) -> Callable[[Any], Any]:
    """Linear interpolation through `knots` `[(step, value), ...]` (steps increasing), held
    at the end values outside them.

    Unlike the schedules above, the function also takes a tensor step (e.g. an optimizer's
    0-d count) and then returns a tensor built from clamps alone, so it runs inside a
    compiled step (`optim.scale_by_schedule`) with no branch on a tensor value.
    """
    if not knots:
        raise ValueError("piecewise_linear needs at least one knot")
    xs = [float(x) for x, _ in knots]
    ys = [float(y) for _, y in knots]
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise ValueError(f"piecewise_linear knots must have increasing steps, got {xs}")

    def schedule(t: Any) -> Any:
        # y0 plus each segment's rise times how far along it t is: the same formula for
        # floats and tensors
        value: Any = ys[0] + 0.0 * t
        for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
            value = value + _clamp01((t - x0) / (x1 - x0)) * (y1 - y0)
        return value

    return schedule


def triangle(
    total_steps: int, warmup_steps: int, start: float = 0.1, end: float = 0.0
) -> Callable[[Any], Any]:
    """A one-cycle multiplier: linear from `start` to 1 over `warmup_steps`, then linear to
    `end` at `total_steps` (the triangular schedule of fast CIFAR-10 recipes). A
    `piecewise_linear`, so it also takes a tensor step."""
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    knots = (
        [(0, start), (warmup_steps, 1.0), (total_steps, end)]
        if warmup_steps
        else [(0, 1.0), (total_steps, end)]
    )
    return piecewise_linear(knots)
