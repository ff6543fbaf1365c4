"""Logging callbacks: the per-epoch history (`TrainingMonitor`, `history_record`), TensorBoard
scalars (`TensorBoardLogger`, `TB_TAGS`) and the human line per epoch (`LogEpoch`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fashion_func.callbacks.protocol import (
    Action,
    Callback,
    CbState,
    EpochEnd,
    Event,
    LogMessage,
    LogScalars,
    PlotHistory,
    TrainBegin,
    TrainEnd,
    WriteHistory,
    encode_float,
)

__all__ = ["LogEpoch", "TensorBoardLogger", "TrainingMonitor"]


def history_record(epoch: int, metrics: Mapping[str, float]) -> dict[str, Any]:
    """One history row: epoch first, then the metrics in the order given, JSON-safe."""
    return {"epoch": epoch, **{k: encode_float(v) for k, v in metrics.items() if k != "epoch"}}


@dataclass(frozen=True)
class TrainingMonitor(Callback):
    """Keep the per-epoch history: each `EpochEnd` appends `history_record(epoch, metrics)` and emits
    `WriteHistory` and `PlotHistory` with the whole history. A resumed run continues the list (the
    state is checkpointed); the records of an epoch run again (after a crash, or `TrainBegin` at an
    earlier epoch) and of later ones are dropped first. State: {"history": [record, ...]}."""

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
    """On `EpochEnd(e)` emit `LogScalars(e, {tag: value})` for every metric, tagged as `TB_TAGS`
    says ("train/loss", "val/acc", ...: TensorBoard groups the curves by section). Stateless."""

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if not isinstance(event, EpochEnd):
            return cb_state, []
        scalars = {_tb_tag(k): float(v) for k, v in event.metrics.items()}
        return cb_state, [LogScalars(event.epoch, scalars)]


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
    """One human line per epoch: "epoch 3/10 train_loss 0.3012 train_acc 0.8911 val_loss 0.3304
    val_acc 0.8790 lr 1.0e-03 12.3s", other metrics after the known ones ("key 0.1234"), the time
    last; a line at `TrainBegin` ("training epochs 4..10 of 10"; none when no epoch is left) and at
    `TrainEnd`. State: {"total_epochs": int | None} from `TrainBegin`."""

    def init(self) -> CbState:
        return {"total_epochs": None}

    def on_event(self, cb_state: CbState, event: Event) -> tuple[CbState, list[Action]]:
        if isinstance(event, TrainBegin):
            start, total = event.start_epoch, event.total_epochs
            # nothing left to train (fit says so itself): never "resuming at epochs 3..1"
            text = f"{'resuming at' if start > 1 else 'training'} epochs {start}..{total} of {total}"
            return {**cb_state, "total_epochs": total}, [LogMessage(text)] if start <= total else []
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
