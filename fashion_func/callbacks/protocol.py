"""The callback protocol (the package docstring says the contract): events, actions (an `Event`
is one of the event classes, an `Action` one of the action classes), the `Callback` base, and
the pure helpers that drive callbacks (`fold`, `scan`, `dispatch`, `init_states`) or keep their
state JSON-safe (`encode_float`, `decode_float`, `improved`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "Action",
    "Callback",
    "CallbackLike",
    "DeleteCheckpoint",
    "EpochEnd",
    "Event",
    "KeptBest",
    "LogMessage",
    "LogScalars",
    "PlotHistory",
    "SaveCheckpoint",
    "SetHyperparam",
    "Stop",
    "TrainBegin",
    "TrainEnd",
    "WriteHistory",
    "dispatch",
    "fold",
    "init_states",
    "scan",
]

CbState = dict[str, Any]
Mode = Literal["min", "max"]


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


@dataclass(frozen=True)
class Stop:
    """Stop training after the current epoch (or step)."""

    reason: str


@dataclass(frozen=True)
class SaveCheckpoint:
    """Write a checkpoint: kind "last", last.safetensors (the resume point); "best",
    best.safetensors (weights, metadata epoch/monitor/value); "epoch", a per-epoch file of
    `ModelCheckpoint`'s top-k. member: an ensemble member's weights alone (under
    `checkpoints/member-<k>/`); None: the whole state."""

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


def encode_float(x: float | None) -> float | str | None:
    """A float as JSON-safe data: finite floats stay floats, non-finite become "nan"/"inf"/"-inf"."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else repr(x)  # repr: "nan", "inf" or "-inf"


def decode_float(x: float | str | None) -> float | None:
    """Inverse of `encode_float` (None stays None)."""
    return None if x is None else float(x)  # float("nan"), float("inf"), float("-inf") all parse


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (Keras semantics): mode "min", value <
    best - min_delta; "max", value > best + min_delta. `best=None` (no best yet) is the worst
    value, so anything but NaN and the worst infinity beats it; NaN never improves, and a NaN best
    is beaten by nothing."""
    check_mode(mode)
    value = float(value)
    if math.isnan(value):
        return False
    if best is None:
        best = math.inf if mode == "min" else -math.inf
    min_delta = abs(float(min_delta))
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


def metric(cb: Any, metrics: Mapping[str, float], key: str) -> float:
    """`metrics[key]` as a float, with an error that says which callback wanted what."""
    try:
        return float(metrics[key])
    except KeyError:
        raise KeyError(
            f"{type(cb).__name__} {getattr(cb, 'name', '')!r} monitors {key!r}, "
            f"but the event's metrics have {sorted(metrics)}"
        ) from None


def check_mode(mode: str) -> None:
    """ValueError unless `mode` is "min" or "max"."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


@runtime_checkable
class CallbackLike(Protocol):
    """What `dispatch` and `fold` need: a name and two pure methods."""

    name: str

    def init(self) -> CbState: ...

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]: ...


@dataclass(frozen=True)
class Callback:
    """Base class: a frozen dataclass of hyperparameters with a keyword-only `name`, by default the
    class name; it keys the callback's state in checkpoints (give two instances of a class two)."""

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
    """Replay `events` through `callback` from `state` (default `callback.init()`): the final state
    and all actions, in order."""
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
    """Send `event` to every callback in order: the new states and all actions. A callback without an
    entry in `states` starts from its `init()` (one added on resume); others' states pass through
    unchanged; `states` itself is not modified."""
    _check_unique(callbacks)
    new_states = dict(states)
    actions: list[Action] = []
    for cb in callbacks:
        st = states[cb.name] if cb.name in states else cb.init()
        new_st, acts = cb.on_event(st, event)
        new_states[cb.name] = new_st
        actions.extend(acts)
    return new_states, actions
