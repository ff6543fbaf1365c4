"""Callbacks as pure event handlers: `(cb_state, event) -> (cb_state, actions)`.

The tutorial's stateful callbacks (TensorBoard writer, ModelCheckpoint, EarlyStopping,
TrainingMonitor, StepLR) are rebuilt here so that they *describe* what should happen and
never do it: a callback reads an event, returns a new state and a list of actions (plain
data), and the loop (`fashion_func.loop`) carries the actions out (writes files, stops,
changes the learning rate in the optimizer state). This module therefore touches no files,
no clock, no device and no tensors, and it imports neither `checkpoint` nor `loop`.

Protocol
--------
* Events: `TrainBegin`, `EpochEnd`, `TrainEnd` (frozen dataclasses). Epochs are 1-based;
  `TrainBegin.start_epoch` is the first epoch about to run (> 1 after a resume). There is no
  per-step event: the step runs compiled on the device with no host sync, and a non-finite
  loss is caught there, at its step, by the loop itself.
* Actions: `Stop`, `SaveCheckpoint`, `DeleteCheckpoint`, `KeptBest`, `SetHyperparam`,
  `LogScalars`, `WriteHistory`, `PlotHistory`, `LogMessage` (frozen dataclasses).
* A callback is a frozen dataclass whose fields are its hyperparameters, with
  `init() -> cb_state` and `on_event(cb_state, event) -> (cb_state, list[Action])`.
  `cb_state` is a JSON-serialisable dict (finite floats only, so
  `json.dumps(state, allow_nan=False)` works; non-finite floats are stored as the strings
  "nan", "inf", "-inf", see `encode_float`). The incoming state is never mutated.
  `callback.name` keys its state in the checkpoint; it defaults to the class name and can be
  overridden (`EarlyStopping(monitor="val_acc", mode="max", name="es_acc")`) when one class
  is used twice.

Contract with the loop (what makes resume exact)
------------------------------------------------
* The loop calls `dispatch` and only then executes the actions, in list order. The
  callback states that go into a checkpoint requested by `SaveCheckpoint` are the *new*
  states `dispatch` returned for that same event.
* Actions from several callbacks are concatenated in callback order; when two set the same
  hyperparameter the later one wins.
* `DeleteCheckpoint` of a file that does not exist is a no-op (after a crash an eviction
  can be replayed, see `ModelCheckpoint`).
* Learning-rate callbacks emit `SetHyperparam("lr", ...)` at `TrainBegin` too, so a resumed
  run gets the learning rate its schedule prescribes whatever the checkpointed optimizer
  state holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from fashion_func import schedules

__all__ = [
    "TB_TAGS",
    "Action",
    "Callback",
    "CallbackLike",
    "CosineLR",
    "DeleteCheckpoint",
    "EarlyStopping",
    "EpochEnd",
    "Event",
    "KeptBest",
    "LRSchedule",
    "LogEpoch",
    "LogMessage",
    "LogScalars",
    "ModelCheckpoint",
    "PlotHistory",
    "ReduceLROnPlateau",
    "SaveCheckpoint",
    "SetHyperparam",
    "StepLR",
    "Stop",
    "TensorBoardLogger",
    "TerminateOnNaN",
    "TrainBegin",
    "TrainEnd",
    "TrainingMonitor",
    "WriteHistory",
    "decode_float",
    "dispatch",
    "encode_float",
    "fold",
    "history_record",
    "improved",
    "init_states",
    "scan",
]

CbState = dict[str, Any]
Mode = Literal["min", "max"]


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainBegin:
    """Training is about to run epochs `start_epoch..total_epochs` (1-based, inclusive)."""

    start_epoch: int
    total_epochs: int


@dataclass(frozen=True)
class EpochEnd:
    """Epoch `epoch` (1-based) finished; `metrics` holds train_loss, train_acc, val_loss,
    val_acc, lr, epoch_time_s and possibly more, as host floats."""

    epoch: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class TrainEnd:
    """Training ended after epoch `epoch` (0 if none ran) because of `reason`."""

    epoch: int
    reason: str


Event = TrainBegin | EpochEnd | TrainEnd


# --------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    """Stop training after the current epoch (or step)."""

    reason: str


@dataclass(frozen=True)
class SaveCheckpoint:
    """Write a checkpoint of the current state.

    kind "last": last.safetensors (full TrainState + callback states, the resume point);
    kind "best": best.safetensors (weights only, metadata epoch/monitor/value);
    kind "epoch": a per-epoch file kept by `ModelCheckpoint`'s top-k retention.
    member: for "best" and "epoch" in an ensemble, the member whose weights to write (as a
    plain single-model file under `checkpoints/member-<k>/`); None: the whole state.
    """

    kind: Literal["last", "best", "epoch"]
    epoch: int
    monitor: str | None = None
    value: float | None = None
    member: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("last", "best", "epoch"):
            raise ValueError(f"SaveCheckpoint kind must be 'last', 'best' or 'epoch', got {self.kind!r}")


@dataclass(frozen=True)
class DeleteCheckpoint:
    """Delete the per-epoch checkpoint of `epoch` (of ensemble `member`, if given; a missing
    file is not an error)."""

    kind: Literal["epoch"]
    epoch: int
    member: int | None = None

    def __post_init__(self) -> None:
        if self.kind != "epoch":
            raise ValueError(f"DeleteCheckpoint kind must be 'epoch', got {self.kind!r}")


@dataclass(frozen=True)
class KeptBest:
    """The best weights already on disk (from before a resume) are those of `epoch`, where
    `monitor` was `value`: the loop reports them as the run's best until a better one comes.
    Writes nothing."""

    epoch: int
    monitor: str
    value: float
    member: int | None = None


@dataclass(frozen=True)
class SetHyperparam:
    """Set an optimizer hyperparameter (e.g. "lr") to `value` from now on."""

    name: str
    value: float


@dataclass(frozen=True)
class LogScalars:
    """Write `scalars` (tag -> value) to TensorBoard at global step `step` (the epoch)."""

    step: int
    scalars: Mapping[str, float]


@dataclass(frozen=True)
class WriteHistory:
    """Write the whole per-epoch history (history.json). Values may be encoded floats,
    see `decode_float`."""

    records: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class PlotHistory:
    """Draw loss.png / accuracy.png from the whole per-epoch history."""

    records: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class LogMessage:
    """Write one line to train.log and the console."""

    text: str


Action = (
    Stop
    | SaveCheckpoint
    | DeleteCheckpoint
    | KeptBest
    | SetHyperparam
    | LogScalars
    | WriteHistory
    | PlotHistory
    | LogMessage
)


# --------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------


def encode_float(x: float | None) -> float | str | None:
    """A float as JSON-safe data: finite floats stay floats, non-finite become "nan"/"inf"/"-inf"."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def decode_float(x: float | str | None) -> float | None:
    """Inverse of `encode_float` (None stays None)."""
    if x is None:
        return None
    return float(x)  # float("nan"), float("inf"), float("-inf") all parse


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (Keras semantics).

    mode "min": value < best - min_delta; mode "max": value > best + min_delta.
    `best=None` means no best yet (the worst possible value, +inf for min, -inf for max), so
    any value except NaN and the worst infinity improves on it. NaN never improves, and a
    NaN best is beaten by nothing (comparisons with NaN are false).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    value = float(value)
    if math.isnan(value):
        return False
    if best is None:
        best = math.inf if mode == "min" else -math.inf
    min_delta = abs(float(min_delta))
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


def _metric(cb: Any, metrics: Mapping[str, float], key: str) -> float:
    """`metrics[key]` as a float, with an error that says which callback wanted what."""
    try:
        return float(metrics[key])
    except KeyError:
        raise KeyError(
            f"{type(cb).__name__} {getattr(cb, 'name', '')!r} monitors {key!r}, "
            f"but the event's metrics have {sorted(metrics)}"
        ) from None


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


# --------------------------------------------------------------------------------------
# Callback base and driving helpers
# --------------------------------------------------------------------------------------


@runtime_checkable
class CallbackLike(Protocol):
    """What `dispatch` and `fold` need: a name and two pure methods."""

    name: str

    def init(self) -> CbState: ...

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]: ...


@dataclass(frozen=True)
class Callback:
    """Base class: a frozen dataclass of hyperparameters with a `name` (keyword-only).

    `name` defaults to the class name; it keys the callback's state in checkpoints, so give
    two instances of one class different names.
    """

    name: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        if not self.name:
            # frozen dataclass: the one sanctioned way to fill a derived default
            object.__setattr__(self, "name", type(self).__name__)

    def init(self) -> CbState:
        """The state before any event."""
        return {}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        """Handle one event; the default ignores everything."""
        return cb_state, []


def fold(
    callback: CallbackLike, events: Iterable[Event], state: CbState | None = None
) -> tuple[CbState, list[Action]]:
    """Replay `events` through `callback` from `state` (default `callback.init()`).

    Returns the final state and all actions, concatenated in order.
    """
    state, per_event = scan(callback, events, state)
    return state, [a for acts in per_event for a in acts]


def scan(
    callback: CallbackLike, events: Iterable[Event], state: CbState | None = None
) -> tuple[CbState, list[list[Action]]]:
    """Like `fold`, but keeps the actions of each event apart (one list per event)."""
    if state is None:
        state = callback.init()
    per_event: list[list[Action]] = []
    for event in events:
        state, actions = callback.on_event(state, event)
        per_event.append(list(actions))
    return state, per_event


def init_states(callbacks: Sequence[CallbackLike]) -> dict[str, CbState]:
    """Initial states of `callbacks`, keyed by name (ValueError on duplicate names)."""
    _check_unique(callbacks)
    return {cb.name: cb.init() for cb in callbacks}


def _check_unique(callbacks: Sequence[CallbackLike]) -> None:
    names = [cb.name for cb in callbacks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"callback names must be unique, repeated: {dupes}; pass name=... to tell them apart"
        )


def dispatch(
    callbacks: Sequence[CallbackLike], states: Mapping[str, CbState], event: Event
) -> tuple[dict[str, CbState], list[Action]]:
    """Send `event` to every callback in order; return the new states and all actions.

    A callback with no entry in `states` starts from its `init()` (e.g. one added on
    resume). States of names not in `callbacks` pass through unchanged. `states` itself is
    not modified.
    """
    _check_unique(callbacks)
    new_states = dict(states)
    actions: list[Action] = []
    for cb in callbacks:
        st = states[cb.name] if cb.name in states else cb.init()
        new_st, acts = cb.on_event(st, event)
        new_states[cb.name] = new_st
        actions.extend(acts)
    return new_states, actions


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EarlyStopping(Callback):
    """Stop when `monitor` has not improved for `patience` epochs (Keras semantics).

    * An epoch improves when `improved(value, best, mode, min_delta)`; NaN never improves.
    * `wait` counts epochs since the last improvement; Stop when a non-improving epoch
      brings it to `patience` (patience 0 and 1 both stop at the first bad epoch).
    * `baseline`: an epoch only resets `wait` if it also beats the baseline (by
      `min_delta`), so training stops after `patience` epochs that never beat it, even
      while the monitored value is improving.
    * `check_finite`: Stop at once when the monitored value is NaN or infinite.

    State: {"best": encoded float | None, "best_epoch": int | None, "wait": int}.
    """

    monitor: str = "val_loss"
    mode: Mode = "min"
    patience: int = 5
    min_delta: float = 0.0
    baseline: float | None = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_mode(self.mode)
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")

    def init(self) -> CbState:
        return {"best": None, "best_epoch": None, "wait": 0}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if not isinstance(event, EpochEnd):
            return cb_state, []
        value = _metric(self, event.metrics, self.monitor)
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
            best_epoch = state["best_epoch"]
            return state, [
                Stop(
                    f"{self.monitor} {why} (best {state['best']} at epoch {best_epoch}), epoch {event.epoch}"
                )
            ]
        return state, []


@dataclass(frozen=True)
class ModelCheckpoint(Callback):
    """Decide which checkpoints to write after each epoch.

    On `EpochEnd(epoch)` the actions come in this order:

    1. `SaveCheckpoint("best", epoch, monitor, value)` when `monitor` improved on the best so
       far (strictly; NaN never improves): best.safetensors, the weights to keep.
    2. Per-epoch files, when `save_best_only=False` or `save_top_k > 1` (or -1), every
       `every_n_epochs` epochs: `SaveCheckpoint("epoch", epoch, monitor, value)` if the
       epoch ranks among the `save_top_k` best by `monitor` (all if -1), then
       `DeleteCheckpoint("epoch", e)` for the epoch it pushed out. Ranking: NaN is worst; a
       newcomer must be strictly better than the worst kept to enter a full list; among
       equal worst the older epoch is evicted. `save_best_only=False, save_top_k=-1` is the
       tutorial's save-every-epoch.
    3. `SaveCheckpoint("last", epoch)` when `save_last`.

    Why "last" goes last: last.safetensors carries this callback's state (best value, kept
    epochs) and is where a resumed run starts. Writing it only after the best/epoch files
    (and deletions) means it never records an effect that had not reached the disk. If the
    process dies in between, "last" still holds the previous epoch; the resumed run redoes
    this epoch deterministically, from the old state reaches the same decisions and rewrites
    the same files (a replayed deletion of a file already gone is a no-op for the loop).
    The other order could leave a "last" claiming a best.safetensors that was never written.

    On `TrainBegin` of a resumed run whose state records a best epoch: `KeptBest`, so the
    loop reports the best file already on disk.

    member: in an ensemble, keep member k's weights (monitor its own metric, e.g.
    `val_loss_m{k}`, and give each member's callback its own name); its files go to
    `checkpoints/member-<k>/` as plain single-model weights.

    State: {"best": encoded float | None, "best_epoch": int | None,
    "kept": [[epoch, encoded value], ...]} (the per-epoch files on disk).
    """

    monitor: str = "val_loss"
    mode: Mode = "min"
    save_best_only: bool = True
    every_n_epochs: int = 1
    save_top_k: int = 1
    save_last: bool = True
    member: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_mode(self.mode)
        if self.every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {self.every_n_epochs}")
        if self.save_top_k < -1:
            raise ValueError(f"save_top_k must be -1 (keep all) or >= 0, got {self.save_top_k}")

    @property
    def saves_epoch_files(self) -> bool:
        """Whether per-epoch files are written at all."""
        return self.save_top_k != 0 and (
            not self.save_best_only or self.save_top_k == -1 or self.save_top_k > 1
        )

    def init(self) -> CbState:
        return {"best": None, "best_epoch": None, "kept": []}

    def _rank_key(self, value: float | None) -> float:
        """Smaller is better; NaN ranks worst."""
        if value is None or math.isnan(value):
            return math.inf
        return value if self.mode == "min" else -value

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if isinstance(event, TrainBegin) and cb_state["best_epoch"] is not None:
            # a resumed run: its best file is on disk already, and is the best until beaten
            best = decode_float(cb_state["best"])
            return cb_state, [KeptBest(cb_state["best_epoch"], self.monitor, best, self.member)]
        if not isinstance(event, EpochEnd):
            return cb_state, []
        epoch = event.epoch
        value = _metric(self, event.metrics, self.monitor)
        state = dict(cb_state)
        actions: list[Action] = []

        if improved(value, decode_float(cb_state["best"]), self.mode):
            state["best"] = encode_float(value)
            state["best_epoch"] = epoch
            actions.append(SaveCheckpoint("best", epoch, self.monitor, value, self.member))

        if self.saves_epoch_files and epoch % self.every_n_epochs == 0:
            # a re-run epoch (resume after a crash) replaces its own entry
            kept = [list(e) for e in cb_state["kept"] if e[0] != epoch]
            if self.save_top_k == -1 or len(kept) < self.save_top_k:
                kept.append([epoch, encode_float(value)])
                actions.append(SaveCheckpoint("epoch", epoch, self.monitor, value, self.member))
            else:
                # worst = largest rank key; ties -> the older epoch (smaller number) goes
                worst = max(kept, key=lambda e: (self._rank_key(decode_float(e[1])), -e[0]))
                if self._rank_key(value) < self._rank_key(decode_float(worst[1])):
                    kept = [e for e in kept if e is not worst]
                    kept.append([epoch, encode_float(value)])
                    # save the newcomer before deleting, so a crash leaves k + 1 files, never k - 1
                    actions.append(SaveCheckpoint("epoch", epoch, self.monitor, value, self.member))
                    actions.append(DeleteCheckpoint("epoch", worst[0], self.member))
            state["kept"] = kept

        if self.save_last:
            actions.append(SaveCheckpoint("last", epoch))
        return state, actions


@dataclass(frozen=True)
class LRSchedule(Callback):
    """Drive the learning rate from a schedule (`fashion_func.schedules`, also in `optim`),
    once per epoch: epoch e (1-based) runs with `schedule(e - 1)`, as a torch scheduler
    stepped once per epoch gives.

    Emits `SetHyperparam("lr", ...)` at `TrainBegin` for the start epoch (so a resumed run
    gets its lr back) and at `EpochEnd(e)` for epoch e + 1. The value depends on the epoch
    alone (closed forms, not torch's recursive updates), so resume is exact.
    State: {"lr": last value set}.
    """

    schedule: schedules.Schedule | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self) is LRSchedule and self.schedule is None:
            raise ValueError("LRSchedule needs a schedule, e.g. schedules.cosine(1e-3, t_max=30)")

    def lr_at(self, epoch: int) -> float:
        """The learning rate epoch `epoch` (1-based) runs with."""
        return float(self.make_schedule()(epoch - 1))

    def make_schedule(self) -> schedules.Schedule:
        """The schedule of this callback (subclasses build theirs from their fields)."""
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
    """The tutorial's StepLr: lr = base_lr * gamma ** ((epoch - 1) // step_size), per epoch
    (`schedules.step_lr`); equals torch.optim.lr_scheduler.StepLR stepped once per epoch."""

    base_lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")

    def make_schedule(self) -> schedules.Schedule:
        return schedules.step_lr(self.base_lr, self.step_size, self.gamma)


@dataclass(frozen=True)
class CosineLR(LRSchedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * (epoch - 1) / t_max)) / 2, per epoch
    (`schedules.cosine`); equals torch.optim.lr_scheduler.CosineAnnealingLR(T_max=t_max) stepped
    once per epoch (including its rise again after t_max)."""

    base_lr: float
    t_max: int
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_max < 1:
            raise ValueError(f"t_max must be >= 1, got {self.t_max}")

    def make_schedule(self) -> schedules.Schedule:
        return schedules.cosine(self.base_lr, self.t_max, self.eta_min)


@dataclass(frozen=True)
class ReduceLROnPlateau(Callback):
    """Multiply the lr by `factor` when `monitor` stops improving; torch semantics exactly.

    Same arithmetic as torch.optim.lr_scheduler.ReduceLROnPlateau (single param group): an
    epoch is better when value < best * (1 - threshold) (mode min, threshold_mode rel),
    value < best - threshold (min, abs), value > best * (1 + threshold) (max, rel) or
    value > best + threshold (max, abs); NaN is never better. After more than `patience`
    bad epochs lr becomes max(lr * factor, min_lr), unless that changes it by <= eps; then
    `cooldown` epochs ignore bad epochs.

    `base_lr` (keyword-only, required) is the optimizer's starting lr. Emits
    `SetHyperparam("lr", lr)` at `TrainBegin` (restoring the reduced lr on resume) and
    whenever the lr changes, with a `LogMessage`.

    State: {"lr": float, "best": encoded float | None (None = no best yet),
    "num_bad_epochs": int, "cooldown_counter": int}.
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
        _check_mode(self.mode)
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
        current = _metric(self, event.metrics, self.monitor)
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
                actions.append(SetHyperparam("lr", new_lr))
                actions.append(
                    LogMessage(
                        f"epoch {event.epoch}: {self.monitor} plateaued, lr {old_lr:.3e} -> {new_lr:.3e}"
                    )
                )
            state["cooldown_counter"] = self.cooldown
            state["num_bad_epochs"] = 0
        return state, actions


def history_record(epoch: int, metrics: Mapping[str, float]) -> dict[str, Any]:
    """One history row: epoch first, then the metrics in the order given, JSON-safe."""
    rec: dict[str, Any] = {"epoch": epoch}
    for k, v in metrics.items():
        if k != "epoch":
            rec[k] = encode_float(v)
    return rec


@dataclass(frozen=True)
class TrainingMonitor(Callback):
    """Keep the per-epoch history; ask the loop to write history.json and draw the plots.

    Each `EpochEnd` appends {"epoch": e, train_loss, train_acc, val_loss, val_acc, lr,
    epoch_time_s, ...every other metric given} (non-finite values encoded, see
    `encode_float`) and emits `WriteHistory` and `PlotHistory` with the whole history. The
    state is checkpointed, so a resumed run continues the list; records for an epoch that
    is run again (a re-run after a crash, or `TrainBegin` at an earlier epoch) and all later
    ones are dropped first, so the history never holds an epoch twice.

    State: {"history": [record, ...]}.
    """

    def init(self) -> CbState:
        return {"history": []}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if isinstance(event, TrainBegin):
            history = [r for r in cb_state["history"] if r["epoch"] < event.start_epoch]
            return {**cb_state, "history": history}, []
        if not isinstance(event, EpochEnd):
            return cb_state, []
        history = [r for r in cb_state["history"] if r["epoch"] < event.epoch]
        history.append(history_record(event.epoch, event.metrics))
        # the actions get copies: whatever the loop does with them cannot reach the state
        return {**cb_state, "history": history}, [
            WriteHistory(tuple(dict(r) for r in history)),
            PlotHistory(tuple(dict(r) for r in history)),
        ]


# metric key -> TensorBoard tag. Keys not listed map by prefix: "train_x" -> "train/x",
# "val_x" -> "val/x", "test_x" -> "test/x"; anything else keeps its key as the tag.
TB_TAGS: Mapping[str, str] = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "lr": "lr",
    "epoch_time_s": "epoch_time_s",
}


def _tb_tag(key: str) -> str:
    if key in TB_TAGS:
        return TB_TAGS[key]
    for prefix in ("train", "val", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return key


@dataclass(frozen=True)
class TensorBoardLogger(Callback):
    """On `EpochEnd(e)` emit `LogScalars(e, {tag: value})` for every metric.

    Tags (`TB_TAGS`): train_loss -> "train/loss", train_acc -> "train/acc",
    val_loss -> "val/loss", val_acc -> "val/acc", lr -> "lr", epoch_time_s -> "epoch_time_s";
    other "train_*"/"val_*"/"test_*" keys become "train/*" etc., the rest keep their name.
    Grouping by "train/" and "val/" puts the curves in TensorBoard sections. Stateless.
    """

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if not isinstance(event, EpochEnd):
            return cb_state, []
        scalars = {_tb_tag(k): float(v) for k, v in event.metrics.items()}
        return cb_state, [LogScalars(event.epoch, scalars)]


@dataclass(frozen=True)
class TerminateOnNaN(Callback):
    """Stop as soon as `monitor` is NaN or infinite.

    Checked on `EpochEnd` (the message names the epoch; a missing key is an error). The
    loop itself stops at a non-finite step loss and names the step. Stateless.
    """

    monitor: str = "train_loss"

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if not isinstance(event, EpochEnd):
            return cb_state, []
        value = _metric(self, event.metrics, self.monitor)
        where = f"epoch {event.epoch}"
        if math.isfinite(value):
            return cb_state, []
        return cb_state, [Stop(f"{self.monitor} is {value} at {where}")]


# the summary line's fixed part: metric key -> format; other metrics follow as "key 0.1234"
_LOG_FORMATS: Mapping[str, str] = {
    "train_loss": "train_loss {:.4f}",
    "train_acc": "train_acc {:.4f}",
    "val_loss": "val_loss {:.4f}",
    "val_acc": "val_acc {:.4f}",
    "lr": "lr {:.1e}",
}


@dataclass(frozen=True)
class LogEpoch(Callback):
    """One human line per epoch, e.g.
    "epoch 3/10 train_loss 0.3012 train_acc 0.8911 val_loss 0.3304 val_acc 0.8790 lr 1.0e-03 12.3s".

    Known metrics come first in that order, any others after them ("key 0.1234"), the
    epoch time last. Also a line at `TrainBegin` ("training epochs 4..10 of 10") and at
    `TrainEnd`. State: {"total_epochs": int | None} from `TrainBegin`.
    """

    def init(self) -> CbState:
        return {"total_epochs": None}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if isinstance(event, TrainBegin):
            verb = "resuming at" if event.start_epoch > 1 else "training"
            text = f"{verb} epochs {event.start_epoch}..{event.total_epochs} of {event.total_epochs}"
            return {**cb_state, "total_epochs": event.total_epochs}, [LogMessage(text)]
        if isinstance(event, TrainEnd):
            return cb_state, [LogMessage(f"training ended after epoch {event.epoch}: {event.reason}")]
        if not isinstance(event, EpochEnd):
            return cb_state, []
        total = cb_state.get("total_epochs")
        parts = [f"epoch {event.epoch}" + (f"/{total}" if total is not None else "")]
        m = event.metrics
        parts += [fmt.format(float(m[k])) for k, fmt in _LOG_FORMATS.items() if k in m]
        parts += [
            f"{k} {float(v):.4f}" for k, v in m.items() if k not in _LOG_FORMATS and k != "epoch_time_s"
        ]
        if "epoch_time_s" in m:
            parts.append(f"{float(m['epoch_time_s']):.1f}s")
        return cb_state, [LogMessage(" ".join(parts))]
