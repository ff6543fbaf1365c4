"""Checkpointing callback: `ModelCheckpoint` decides which checkpoints to write and delete
(best, top-k per epoch, last); the loop writes them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fashion_func.callbacks.protocol import (
    Action,
    Callback,
    CbState,
    DeleteCheckpoint,
    EpochEnd,
    Event,
    KeptBest,
    Mode,
    SaveCheckpoint,
    TrainBegin,
    check_mode,
    decode_float,
    encode_float,
    improved,
    metric,
)

__all__ = ["ModelCheckpoint"]


@dataclass(frozen=True)
class ModelCheckpoint(Callback):
    """Decide which checkpoints to write after each epoch: on `EpochEnd(epoch)`, in this order,

    1. `SaveCheckpoint("best", epoch, monitor, value)` when `monitor` improved on the best so far
       (strictly; NaN never improves): best.safetensors, the weights to keep.
    2. Per-epoch files, when `save_best_only=False` or `save_top_k > 1` (or -1), every
       `every_n_epochs` epochs: `SaveCheckpoint("epoch", ...)` if the epoch ranks among the
       `save_top_k` best (all if -1), then `DeleteCheckpoint("epoch", e)` for the epoch it pushed
       out. NaN ranks worst; a newcomer must beat the worst kept to enter a full list; of equal
       worst the older epoch goes. `save_best_only=False, save_top_k=-1` saves every epoch.
    3. `SaveCheckpoint("last", epoch)` when `save_last`: last, because last.safetensors carries this
       callback's state and is where a resumed run starts, so it must never record an effect that
       had not reached the disk. A crash in between leaves the previous "last"; the resumed run
       redoes the epoch deterministically and rewrites the same files (a replayed deletion of a
       file already gone is a no-op).

    On `TrainBegin` of a resumed run whose state records a best epoch: `KeptBest`, so the loop
    reports the best file already on disk. `member`: in an ensemble, member k's weights (monitor
    its own metric, e.g. `val_loss_m{k}`, under a name of its own), written to
    `checkpoints/member-<k>/` as plain single-model weights. State: {"best": encoded float | None,
    "best_epoch": int | None, "kept": [[epoch, encoded value], ...]} (the epoch files on disk).
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
        check_mode(self.mode)
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
        value = metric(self, event.metrics, self.monitor)
        state = dict(cb_state)
        actions: list[Action] = []

        if improved(value, decode_float(cb_state["best"]), self.mode):
            state["best"] = encode_float(value)
            state["best_epoch"] = epoch
            actions.append(SaveCheckpoint("best", epoch, self.monitor, value, self.member))

        if self.saves_epoch_files and epoch % self.every_n_epochs == 0:
            # a re-run epoch (resume after a crash) replaces its own entry
            kept = [list(e) for e in cb_state["kept"] if e[0] != epoch]
            full = self.save_top_k != -1 and len(kept) >= self.save_top_k
            # worst = largest rank key; ties -> the older epoch (smaller number) goes
            worst = max(kept, key=lambda e: (self._rank_key(decode_float(e[1])), -e[0])) if full else None
            if worst is None or self._rank_key(value) < self._rank_key(decode_float(worst[1])):
                kept = [e for e in kept if e is not worst] + [[epoch, encode_float(value)]]
                # save the newcomer before deleting, so a crash leaves k + 1 files, never k - 1
                actions.append(SaveCheckpoint("epoch", epoch, self.monitor, value, self.member))
                if worst is not None:
                    actions.append(DeleteCheckpoint("epoch", worst[0], self.member))
            state["kept"] = kept

        if self.save_last:
            actions.append(SaveCheckpoint("last", epoch))
        return state, actions
