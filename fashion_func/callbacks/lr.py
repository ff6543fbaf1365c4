"""Learning-rate callbacks: `LRSchedule` drives the lr from any `fashion_func.schedules`
schedule once per epoch (`StepLR`, `CosineLR` are it with a named schedule);
`ReduceLROnPlateau` follows the monitored metric."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fashion_func import schedules
from fashion_func.callbacks.protocol import (
    Action,
    Callback,
    CbState,
    EpochEnd,
    Event,
    LogMessage,
    Mode,
    SetHyperparam,
    TrainBegin,
    check_mode,
    decode_float,
    encode_float,
    metric,
)

__all__ = ["CosineLR", "LRSchedule", "ReduceLROnPlateau", "StepLR"]


@dataclass(frozen=True)
class LRSchedule(Callback):
    """Drive the learning rate from any schedule of `fashion_func.schedules`, once per epoch: epoch e
    (1-based) runs with `schedule(e - 1)`, as a torch scheduler stepped once per epoch gives
    (`LRSchedule(schedule=schedules.onecycle(0.1, total_steps=epochs))`). Emits `SetHyperparam("lr",
    ...)` at `TrainBegin` for the start epoch (a resumed run gets its lr back) and at `EpochEnd(e)`
    for epoch e + 1; the value depends on the epoch alone, so resume is exact. State: {"lr": last set}."""

    schedule: schedules.Schedule | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.make_schedule()  # a bad argument fails here, not at the first epoch

    def lr_at(self, epoch: int) -> float:
        """The learning rate epoch `epoch` (1-based) runs with."""
        return float(self.make_schedule()(epoch - 1))

    def make_schedule(self) -> schedules.Schedule:
        """The schedule this callback follows (a named convenience builds it from its fields)."""
        if self.schedule is None:
            raise ValueError("LRSchedule needs a schedule, e.g. schedules.cosine(1e-3, t_max=30)")
        return self.schedule

    def init(self) -> CbState:
        return {"lr": encode_float(self.lr_at(1))}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if isinstance(event, TrainBegin):
            lr = self.lr_at(event.start_epoch)
        elif isinstance(event, EpochEnd):
            lr = self.lr_at(event.epoch + 1)
        else:
            return cb_state, []
        return {**cb_state, "lr": encode_float(lr)}, [SetHyperparam("lr", lr)]


@dataclass(frozen=True)
class StepLR(LRSchedule):
    """The tutorial's StepLr, a named `LRSchedule(schedule=schedules.step_lr(base_lr,
    step_size, gamma))`: lr = base_lr * gamma ** ((epoch - 1) // step_size), equal to
    torch.optim.lr_scheduler.StepLR stepped once per epoch."""

    base_lr: float
    step_size: int
    gamma: float = 0.1

    def make_schedule(self) -> schedules.Schedule:
        return schedules.step_lr(self.base_lr, self.step_size, self.gamma)


@dataclass(frozen=True)
class CosineLR(LRSchedule):
    """A named `LRSchedule(schedule=schedules.cosine(base_lr, t_max, eta_min))`: lr = eta_min + (base_lr
    - eta_min) * (1 + cos(pi * (epoch - 1) / t_max)) / 2, torch's CosineAnnealingLR(T_max=t_max)
    stepped once per epoch (its rise again after t_max included)."""

    base_lr: float
    t_max: int
    eta_min: float = 0.0

    def make_schedule(self) -> schedules.Schedule:
        return schedules.cosine(self.base_lr, self.t_max, self.eta_min)


@dataclass(frozen=True)
class ReduceLROnPlateau(Callback):
    """Multiply the lr by `factor` when `monitor` stops improving, with the arithmetic of
    torch.optim.lr_scheduler.ReduceLROnPlateau (one param group): an epoch is better when value <
    best * (1 - threshold) (mode min, threshold_mode rel), value < best - threshold (min, abs),
    value > best * (1 + threshold) (max, rel) or value > best + threshold (max, abs); NaN never is.
    After more than `patience` bad epochs lr becomes max(lr * factor, min_lr), unless that changes
    it by <= eps; then `cooldown` epochs ignore bad epochs.

    `base_lr` (keyword-only, required) is the optimizer's starting lr. Emits `SetHyperparam("lr",
    lr)` at `TrainBegin` (restoring a reduced lr on resume) and, with a `LogMessage`, whenever the lr
    changes. State: {"lr", "best" (encoded, None: no best yet), "num_bad_epochs", "cooldown_counter"}.
    """

    monitor: str = "val_loss"
    mode: Mode = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8
    base_lr: float = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_mode(self.mode)
        if self.threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {self.threshold_mode!r}")
        if not self.factor < 1.0:
            raise ValueError(f"factor must be < 1.0, got {self.factor}")

    def init(self) -> CbState:
        return {"lr": encode_float(self.base_lr), "best": None, "num_bad_epochs": 0, "cooldown_counter": 0}

    def _is_better(self, a: float, best: float | None) -> bool:
        # written exactly as torch's `_is_better`, so the float results agree bit for bit
        if best is None:
            best = math.inf if self.mode == "min" else -math.inf
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if isinstance(event, TrainBegin):
            return dict(cb_state), [SetHyperparam("lr", decode_float(cb_state["lr"]))]
        if not isinstance(event, EpochEnd):
            return cb_state, []
        current = metric(self, event.metrics, self.monitor)
        state = dict(cb_state)
        best = decode_float(cb_state["best"])
        if self._is_better(current, best):
            state["best"] = encode_float(current)
            state["num_bad_epochs"] = 0
        else:
            state["num_bad_epochs"] = cb_state["num_bad_epochs"] + 1
        if state["cooldown_counter"] > 0:
            state["cooldown_counter"] -= 1
            state["num_bad_epochs"] = 0  # bad epochs in cooldown do not count
        actions: list[Action] = []
        if state["num_bad_epochs"] > self.patience:
            old_lr = decode_float(cb_state["lr"])
            new_lr = max(old_lr * self.factor, self.min_lr)
            if old_lr - new_lr > self.eps:
                state["lr"] = encode_float(new_lr)
                text = f"epoch {event.epoch}: {self.monitor} plateaued, lr {old_lr:.3e} -> {new_lr:.3e}"
                actions += [SetHyperparam("lr", new_lr), LogMessage(text)]
            state["cooldown_counter"] = self.cooldown
            state["num_bad_epochs"] = 0
        return state, actions
