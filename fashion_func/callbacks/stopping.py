"""Stopping callbacks: `EarlyStopping` (no improvement for `patience` epochs) and
`TerminateOnNaN` (a non-finite metric)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fashion_func.callbacks.protocol import (
    Action,
    Callback,
    CbState,
    EpochEnd,
    Event,
    Mode,
    Stop,
    check_mode,
    decode_float,
    encode_float,
    improved,
    metric,
)

__all__ = ["EarlyStopping", "TerminateOnNaN"]


@dataclass(frozen=True)
class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs (Keras semantics):

    * An epoch improves when `improved(value, best, mode, min_delta)`; NaN never improves.
    * `wait` counts epochs since the last improvement; Stop when a non-improving epoch brings it
      to `patience` (patience 0 and 1 both stop at the first bad epoch).
    * `baseline`: an epoch resets `wait` only if it also beats the baseline (by `min_delta`), so
      training stops after `patience` epochs that never beat it, even while improving.
    * `check_finite`: Stop at once when the monitored value is NaN or infinite.
    * State: {"best": encoded float | None, "best_epoch": int | None, "wait": int}.
    """

    monitor: str = "val_loss"
    mode: Mode = "min"
    patience: int = 5
    min_delta: float = 0.0
    baseline: float | None = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_mode(self.mode)
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")

    def init(self) -> CbState:
        return {"best": None, "best_epoch": None, "wait": 0}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if not isinstance(event, EpochEnd):
            return cb_state, []
        value = metric(self, event.metrics, self.monitor)
        if self.check_finite and not math.isfinite(value):
            return dict(cb_state), [Stop(f"{self.monitor} is {value} at epoch {event.epoch}")]
        best = decode_float(cb_state["best"])
        wait = cb_state["wait"] + 1
        state = dict(cb_state)
        if improved(value, best, self.mode, self.min_delta):
            state["best"] = encode_float(value)
            state["best_epoch"] = event.epoch
            # Keras: only restart the count if we beat both the previous best and the baseline
            if self.baseline is None or improved(value, self.baseline, self.mode, self.min_delta):
                state["wait"] = 0
                return state, []
        state["wait"] = wait
        if wait >= self.patience:
            new_best = decode_float(state["best"])
            if self.baseline is not None and (
                new_best is None or not improved(new_best, self.baseline, self.mode, self.min_delta)
            ):
                why = f"did not beat baseline {self.baseline} for {wait} epochs"
            else:
                why = f"did not improve for {wait} epochs"
            best = f"best {state['best']} at epoch {state['best_epoch']}"
            return state, [Stop(f"{self.monitor} {why} ({best}), epoch {event.epoch}")]
        return state, []


@dataclass(frozen=True)
class TerminateOnNaN(Callback):
    """Stop as soon as `monitor` is NaN or infinite, checked on `EpochEnd` (a missing key is an error;
    the loop itself stops at a non-finite step loss). Stateless."""

    monitor: str = "train_loss"

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if not isinstance(event, EpochEnd):
            return cb_state, []
        value = metric(self, event.metrics, self.monitor)
        if math.isfinite(value):
            return cb_state, []
        return cb_state, [Stop(f"{self.monitor} is {value} at epoch {event.epoch}")]
