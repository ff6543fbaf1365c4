"""Resume: where a run continues from, read from a `last.safetensors`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, optim
from fashion_func.loop.rundir import LAST, RunError
from fashion_func.state import TrainState

__all__ = ["ResumePoint", "check_same_batches", "host_lr", "load", "resume_path", "saved_config"]


@dataclass(frozen=True)
class ResumePoint:
    """Everything `fit` needs to continue a run exactly where its checkpoint left it.

    start_epoch: the first epoch still to run (1-based). in_epoch: for a checkpoint cut
    mid-epoch, the batch to continue from and the epoch's partial sums; else None.
    lr: the learning rate as last set (host float), if the optimizer has one.
    """

    path: Path
    state: TrainState
    cb_states: dict[str, Any]
    start_epoch: int
    in_epoch: dict[str, Any] | None
    lr: float | list[float] | None
    history: list[dict[str, Any]]
    metadata: dict[str, Any] = field(repr=False)

    def replace_lr(self, lr: float, callbacks: Sequence[Any] = ()) -> ResumePoint:
        """This point with the learning rate set to `lr` (schedules restart from it too)."""
        states = dict(self.cb_states)
        for cb in callbacks:  # ReduceLROnPlateau carries its lr in its state: restart it there too
            if isinstance(cb, cbs.ReduceLROnPlateau) and cb.name in states:
                states[cb.name] = {**states[cb.name], "lr": cbs.encode_float(lr)}
        st = self.state.replace(opt_state=optim.set_hyperparam(self.state.opt_state, "lr", lr))
        return replace(self, state=st, cb_states=states, lr=lr)


def resume_path(out: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (`auto` without one)."""
    if not resume:
        return None
    if resume == "auto":
        p = out / "checkpoints" / LAST
        return p if p.exists() else None
    p = Path(resume)
    if not p.is_file():
        raise RunError(f"--resume {resume}: no such checkpoint file")
    return p


def saved_config(path: Path) -> dict[str, Any]:
    """The config values a checkpoint was written with (its metadata 'config').

    Reads only the file's header. CheckpointError for a bad file, RunError when it has
    no config (not written by the command line).
    """
    values = checkpoint.read_metadata(path).get("config")
    if not isinstance(values, dict):
        raise RunError(f"checkpoint {path} holds no run config; it was not written by train.py")
    return values


def _history(meta: Mapping[str, Any], cb_states: Mapping[str, Any]) -> list[dict[str, Any]]:
    if isinstance(meta.get("history"), list):
        return [dict(r) for r in meta["history"]]
    # checkpoints written before fit kept its own history: the TrainingMonitor's copy
    for s in cb_states.values():
        if isinstance(s, dict) and isinstance(s.get("history"), list):
            return [dict(r) for r in s["history"]]
    return []


def load(path: str | Path, template: TrainState, callbacks: Sequence[Any] = ()) -> ResumePoint:
    """The resume point stored in `path`, its state validated against `template`.

    Callbacks with no saved state start from `init()`. CheckpointError for a bad file.
    """
    path = Path(path)
    st, meta = checkpoint.load_state(path, template)
    saved = meta.get("callbacks", {})
    cb_states = {cb.name: saved.get(cb.name, cb.init()) for cb in callbacks}
    if "lr" in meta:
        lr: float | list[float] | None = (
            [float(x) for x in meta["lr"]] if isinstance(meta["lr"], list) else float(meta["lr"])
        )
    else:
        lr = host_lr(st.opt_state)
    return ResumePoint(
        path=path,
        state=st,
        cb_states=cb_states,
        start_epoch=int(meta.get("epoch", 0)) + 1,
        in_epoch=meta.get("in_epoch"),
        lr=lr,
        history=_history(meta, cb_states),
        metadata=meta,
    )


def host_lr(opt_state: Any) -> float | list[float] | None:
    """The optimizer's learning rate as the float it was set from, or None if it has none.

    The state holds it as a float32 tensor (0.0010000000474974513); its shortest float32
    repr is what the user wrote (0.001), which is what logs and history should show. A
    stacked state (ensemble, sweep) gives one float when all members share it, else a list.
    """
    try:
        value = optim.get_hyperparam(opt_state, "lr")
    except KeyError:
        return None
    floats = value.reshape(-1).tolist()
    if value.dtype == torch.float32:
        floats = [float(str(np.float32(x))) for x in floats]
    if value.dim() == 0 or len(set(floats)) == 1:
        return floats[0]
    return floats


def check_same_batches(in_epoch: Mapping[str, Any], batching: Mapping[str, Any] | None) -> None:
    """A mid-epoch checkpoint continues only with the batches it was cut from."""
    saved = in_epoch.get("batching")
    if saved is None or batching is None:
        return
    now = dict(batching)
    if saved != now:
        diff = ", ".join(f"{k} {saved.get(k)} (now {now.get(k)})" for k in now if saved.get(k) != now.get(k))
        raise RunError(
            f"the checkpoint was cut mid-epoch with {diff}; resume with the same batches "
            "(--batch-size, --limit-train and --seed)"
        )
