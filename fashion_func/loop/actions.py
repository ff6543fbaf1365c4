"""The actions the callbacks return, carried out: save, set a hyperparameter, write, log, stop.

`Actions` is a part `fit`'s driver holds: the callbacks, their states and the best records;
it carries out what they return on the state it is given, and saves last.safetensors through
the driver (`save_last`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, optim
from fashion_func.loop import plots
from fashion_func.loop.artifacts import BEST

__all__: list[str] = []

_FILE_ACTIONS = (cbs.LogScalars, cbs.WriteHistory, cbs.PlotHistory, cbs.DeleteCheckpoint)


class Actions:
    """The callbacks, their states and the best records, and their actions carried out.

    run, log, metadata, weights_of: as `fit` was given them (`weights`). save_last: `(state,
    epoch) -> path` writes last.safetensors (the driver's). run_meta: `member -> metadata` that
    every file written now records beside `metadata` (a member's file: its own figures).
    """

    def __init__(
        self, callbacks: Sequence[Any], run: Any, log: Any, metadata: dict[str, Any],
        weights_of: Callable[[Any], dict[str, Any]] | None, save_last: Callable[[Any, int], Path | None],
        run_meta: Callable[[int | None], dict[str, Any]],
    ) -> None:  # fmt: skip
        self.callbacks = list(callbacks)
        self.cb_states: dict[str, Any] = cbs.init_states(self.callbacks)
        self.run, self.log, self.metadata = run, log, metadata
        # by default a stateful model's buffers travel with its weights, under nn.Module's names
        self.weights_of = weights_of or (lambda state: {**state.params, **state.model_state})
        self.save_last, self.run_meta = save_last, run_meta
        self.start_epoch = 1  # TensorBoard purges what a resumed run writes again from here
        self.best: dict[str, Any] | None = None
        self.member_best: dict[int, dict[str, Any]] = {}
        self.state: Any = None  # the state the actions apply to, while `dispatch` runs

    def _weights_path(self, kind: str, epoch: int, member: int | None) -> Path | None:
        if self.run is None:
            return None
        folder = self.run.checkpoints if member is None else self.run.checkpoints / f"member-{member:02d}"
        return folder / (BEST if kind == "best" else f"epoch-{epoch:03d}.safetensors")

    def _record_best(self, epoch: int, monitor: str | None, value: float | None, member: int | None) -> None:
        path = self._weights_path("best", epoch, member)
        record = {"epoch": epoch, "monitor": monitor, "value": value, "path": str(path) if path else None}
        if member is None:
            self.best = record
        else:
            self.member_best[member] = record

    def _save_weights(self, a: cbs.SaveCheckpoint) -> None:
        if a.kind == "best":
            self._record_best(a.epoch, a.monitor, a.value, a.member)
        path = self._weights_path(a.kind, a.epoch, a.member)
        if path is None:
            return
        weights = self.weights_of(self.state)
        meta = {**self.metadata, **self.run_meta(a.member), "epoch": a.epoch, "monitor": a.monitor,
                "value": a.value}  # fmt: skip
        # the folder (made for a member on first use) checked to be the run's own at this write
        _, folder_id = self.run.checkpoint_folder(a.member)
        if a.member is not None:  # one member of an ensemble: a plain single-model file
            weights = {k: v[a.member] for k, v in weights.items()}
            meta["member"] = a.member
        checkpoint.save_weights(path, weights, metadata=meta, folder=folder_id)
        self.log.info(f"saved {path} ({a.monitor} {a.value})")

    def dispatch(self, event: Any, epoch: int, state: Any, finite: bool = True) -> tuple[Any, str | None]:
        """Send `event` to the callbacks, then carry out their actions on `state`; (the state,
        with the hyperparameters they set, and a stop reason or None).

        With a run directory every finished epoch ends in last.safetensors (exact resume
        whatever the callbacks): written here when no callback asked for it.
        """
        self.cb_states, actions = cbs.dispatch(self.callbacks, self.cb_states, event)
        if self.run is not None and isinstance(event, cbs.EpochEnd):
            if not any(isinstance(a, cbs.SaveCheckpoint) and a.kind == "last" for a in actions):
                actions = [*actions, cbs.SaveCheckpoint("last", event.epoch)]
        self.state = state
        try:
            reason = self.carry_out(actions, epoch, finite)
            return self.state, reason
        finally:
            self.state = None

    def carry_out(self, actions: list[Any], epoch: int, finite: bool) -> str | None:
        """Apply actions in list order, except hyperparameters first and Stop last (the last
        stop reason wins); those that only write files are skipped without a run directory.

        List order matters: ModelCheckpoint saves a newcomer before deleting the file it
        evicts and writes "last" after everything else, so a crash in between never loses a
        kept file nor records an unwritten one. Hyperparameters go first so that a checkpoint
        written for this event holds the lr its callback states already record.
        """
        order = {cbs.SetHyperparam: 0, cbs.Stop: 2}
        reason, run = None, self.run
        for a in sorted(actions, key=lambda a: order.get(type(a), 1)):  # stable: list order kept
            match type(a):
                case cbs.Stop:
                    reason = a.reason or reason
                case cbs.SetHyperparam:
                    opt_state = optim.set_hyperparam(self.state.opt_state, a.name, a.value)
                    self.state = self.state.replace(opt_state=opt_state)
                case cbs.LogMessage:
                    self.log.info(a.text)
                case cbs.SaveCheckpoint if not finite:
                    self.log.warning(
                        f"not saving {a.kind} checkpoint for epoch {epoch}: parameters are not finite"
                    )
                case cbs.SaveCheckpoint if a.kind == "last":
                    self.save_last(self.state, epoch)
                case cbs.SaveCheckpoint:
                    self._save_weights(a)
                case cbs.KeptBest:
                    self._record_best(a.epoch, a.monitor, a.value, a.member)
                case t if t in _FILE_ACTIONS and run is None:
                    pass  # they only write files: nothing to do without a run directory
                case cbs.LogScalars:
                    run.log_scalars(dict(a.scalars), a.step, purge_step=self.start_epoch)
                case cbs.WriteHistory:
                    run.write_json("history.json", [dict(r) for r in a.records])
                case cbs.PlotHistory:
                    plots.plot_history(a.records, run.path, folder=run.same_folder(run.path))
                case cbs.DeleteCheckpoint:
                    self._delete_weights(a)
                case _:
                    raise TypeError(
                        f"fit cannot carry out {a!r}: not one of the actions of fashion_func.callbacks"
                    )
        return reason

    def _delete_weights(self, a: cbs.DeleteCheckpoint) -> None:
        self.run.checkpoint_folder(a.member)  # never a file reached through a link swapped in
        path = self._weights_path("epoch", a.epoch, a.member)
        if path is not None:
            path.unlink(missing_ok=True)
