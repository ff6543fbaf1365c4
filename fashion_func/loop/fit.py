"""`fit`: the only impure driver, a library function over the user's own objects.

It runs the user's `train_step` over each epoch's batches, evaluates, sends events to the
callbacks and carries out the actions they return (save a checkpoint, set the learning
rate, write history and plots, log, stop). With a run directory, everything needed to
continue after a restart goes into `checkpoints/last.safetensors`; without one it writes
nothing.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import re
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, optim
from fashion_func.loop import collective as coll
from fashion_func.loop import resume as resume_lib
from fashion_func.loop import rundir
from fashion_func.loop.collective import Collective
from fashion_func.loop.rundir import BEST, LAST, RunDir, RunError
from fashion_func.state import TrainState

__all__ = ["FitResult", "Interrupted", "epoch_batches", "evaluate", "expand_members", "fit"]

Data = Iterable[Any] | Callable[..., Iterable[Any]]


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; the state was saved. `code` is the exit status to use."""

    def __init__(self, signum: int, path: Path, *, saved: bool = True) -> None:
        self.signum = signum
        self.path = path
        self.code = 128 + signum
        what = "state saved to" if saved else "diverged state not saved; the last good one is in"
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {what} {path}")


@dataclass
class FitResult:
    """What a finished run leaves: the final state, its history and why it ended."""

    state: TrainState
    history: list[dict[str, Any]]
    epochs_run: int
    stop_reason: str
    out_dir: Path | None
    best: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False  # stopped by a non-finite loss or non-finite parameters


# -- data ------------------------------------------------------------------------------------


def _accepts_start(fn: Callable[..., Any]) -> bool:
    try:
        return "start" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def epoch_batches(source: Data, epoch: int, start: int = 0) -> Iterator[Any]:
    """The batches of `epoch` from batch `start` on.

    `source` is a function `epoch -> iterable` (given `start=` too when it takes it, as
    `data.EpochBatches` does; otherwise the first `start` batches are drawn and dropped),
    or an iterable run through once per epoch (a `DataLoader`, a list of batches).
    """
    skip = start
    if callable(source) and not hasattr(source, "__iter__"):
        if _accepts_start(source):
            it, skip = source(epoch, start=start), 0
        else:
            it = source(epoch)
    else:
        it = source
    it = iter(it)
    return itertools.islice(it, skip, None) if skip else it


def _num_batches(source: Data) -> int | None:
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None


def evaluate(
    eval_step: Callable[..., Mapping[str, Tensor]],
    state: Any,
    batches: Iterable[Any],
    *,
    group: Collective | None = None,
) -> dict[str, float]:
    """Validation metrics over `batches`, one host sync at the end.

    `eval_step(state, batch)` returns per-example tensors (as `make_eval_step`'s). Every output
    of the shape of `loss` (`[B]`) but `pred` is averaged over the examples: `loss` ->
    val_loss, `correct` -> val_acc, `top{k}_correct` -> val_top{k}, any other `<name>` ->
    val_<name>; an ensemble's `member_<name>` (`[K, B]`) the same per member. `logits`, `pred`
    and outputs of other shapes are not reduced. `state` is a TrainState or what the eval
    step takes. group: each rank evaluated its own part of the data; the sums and counts are
    added over the ranks, so every rank gets the same numbers (every rank needs a batch).
    """
    sums: dict[str, Tensor] = {}
    count = 0
    for batch in batches:
        out = eval_step(state, batch)
        count += int(out["loss"].shape[-1])  # a shape: no sync
        for key in _per_example_keys(out):
            part = out[key].double().sum(-1)
            sums[key] = part if key not in sums else sums[key] + part
    if group is not None and sums:  # this rank's part: the sums and the count added over the ranks
        anchor = next(iter(sums.values()))
        sums = _sum_over_ranks(group, {**sums, "_count": anchor.new_tensor(float(count))})
    values = _to_host(sums)  # the one sync
    count = int(values.pop("_count", count))
    own = {k: v for k, v in values.items() if not k.startswith("member_")}
    scalars = {_val_name(k): v / count for k, v in own.items()}
    members = {_val_name(k[7:]): [x / count for x in v] for k, v in values.items() if k not in own}
    return expand_members(members, scalars)


def _per_example_keys(out: Mapping[str, Tensor]) -> list[str]:
    """The outputs `evaluate` averages: the ones shaped like `loss` (`member_loss`), but `pred`."""
    shapes = {"": out["loss"].shape, "member_": out["member_loss"].shape if "member_loss" in out else None}
    keys = []
    for key, value in out.items():
        prefix = "member_" if key.startswith("member_") else ""
        if key.removeprefix(prefix) not in ("pred", "logits") and value.shape == shapes[prefix]:
            keys.append(key)
    return keys


def _val_name(key: str) -> str:
    """`loss` -> val_loss, `correct` -> val_acc, `top5_correct` -> val_top5, `x` -> val_x."""
    if key == "correct":
        return "val_acc"
    return "val_" + (key.removesuffix("_correct") if re.fullmatch(r"top\d+_correct", key) else key)


def _to_host(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Floats (0-d tensors) and lists of floats (one per member, [K]) in one host sync."""
    if not tensors:
        return {}
    flat = torch.cat([t.double().reshape(-1) for t in tensors.values()]).tolist()
    out: dict[str, Any] = {}
    i = 0
    for k, t in tensors.items():
        n = t.numel()
        out[k] = flat[i] if t.dim() == 0 else flat[i : i + n]
        i += n
    return out


def _sum_over_ranks(group: Collective | None, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` added over the ranks in one collective (unchanged without a group)."""
    if group is None or not tensors:
        return dict(tensors)
    total = group.sum(torch.cat([t.double().reshape(-1) for t in tensors.values()]))
    out, i = {}, 0
    for k, t in tensors.items():
        out[k] = total[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def expand_members(
    members: Mapping[str, Sequence[float]], own: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Flat metrics from per-member lists: `x` -> `x_m0, x_m1, ...`, `x_mean`, `x_std` (sample
    standard deviation over members, 0 for one member), and `x` itself: the ensemble's own
    value where `own` has it (validation of the averaged prediction), else the members' mean."""
    out = dict(own or {})
    for name, values in members.items():
        vals = list(values)
        out.setdefault(name, statistics.fmean(vals))
    for name, values in members.items():
        vals = list(values)
        out[f"{name}_mean"] = statistics.fmean(vals)
        out[f"{name}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.update({f"{name}_m{k}": v for k, v in enumerate(vals)})
    return out


def _host_step(step: Tensor) -> int:
    """The step as an int; an ensemble's members all stand at the same step."""
    return int(step.reshape(-1)[0])


# -- the driver --------------------------------------------------------------------------------


def _train_metrics(sums: Mapping[str, Any], steps: int) -> dict[str, float]:
    """Epoch means from summed step metrics: `loss_sum` -> train_loss, `correct` -> train_acc,
    `top5_correct` -> train_top5, `x_sum` -> train_x, anything else -> train_<key>; per
    example when `count` is given. Per-member sums (lists, from an ensemble step) become
    per-member means, expanded by `expand_members`."""
    count = sums.get("count", steps) or 1
    denom = count[0] if isinstance(count, list) else count  # members see the same batches
    scalars: dict[str, float] = {}
    members: dict[str, list[float]] = {}
    for k, v in sums.items():
        if k in ("count", "first_bad"):
            continue
        name = "train_" + ("acc" if k == "correct" else k.removesuffix("_sum").removesuffix("_correct"))
        if isinstance(v, list):
            members[name] = [x / denom for x in v]
        else:
            scalars[name] = v / denom
    order = {"train_loss": 0, "train_acc": 1}
    scalars = dict(sorted(scalars.items(), key=lambda kv: order.get(kv[0], 2)))
    members = dict(sorted(members.items(), key=lambda kv: order.get(kv[0], 2)))
    return expand_members(members, scalars)


@contextlib.contextmanager
def _signals_to_flag(enabled: bool) -> Iterator[dict[str, int | None]]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (the step finishes first)."""
    flag: dict[str, int | None] = {"signum": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag["signum"] = signum

    # an inherited ignore (`cmd &` in a script starts with SIGINT ignored) is the caller's choice: keep it
    kept = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in kept}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Epoch:
    """The running sums of the epoch in progress (device tensors) and where it started."""

    epoch: int
    first_batch: int
    sums: dict[str, Tensor]
    first_bad: Tensor
    elapsed_before: float
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


def _params_and_buffers(state: TrainState) -> dict[str, Tensor]:
    # a stateful model's buffers travel with its weights, under nn.Module's names
    return {**state.params, **state.model_state}


_FILE_ACTIONS = (cbs.LogScalars, cbs.WriteHistory, cbs.PlotHistory, cbs.DeleteCheckpoint)


def _no_reason(write: Callable[[Any], Any]) -> Callable[[Any, int, bool], None]:
    """A handler that carries out an action and never stops the run, whatever `write` returns."""

    def handler(a: Any, epoch: int, finite: bool) -> None:
        write(a)

    return handler


class _Driver:
    """One call of `fit`: the mutable run (state, callback states, lr, history) and the
    methods that move it on. Small methods over shared fields instead of nested closures."""

    def __init__(self, state, train_step, train_data, *, epochs, eval_step, val_data, callbacks,
                 run, metadata, max_steps, progress, log, weights=None, group=None) -> None:  # fmt: skip
        self.state: TrainState = state
        self.train_step, self.train_data = train_step, train_data
        self.epochs, self.eval_step, self.val_data = epochs, eval_step, val_data
        self.callbacks = list(callbacks)
        self.run: RunDir | None = run
        self.metadata = dict(metadata or {})
        self.max_steps, self.progress = max_steps, progress
        self.weights_of: Callable[[TrainState], dict[str, Tensor]] = weights or _params_and_buffers
        self.log = log
        self.cb_states = cbs.init_states(self.callbacks)
        self.start_epoch, self.in_epoch = 1, None
        self.lr = resume_lib.host_lr(state.opt_state)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.member_best: dict[int, dict[str, Any]] = {}
        self.stop_reason = "completed"
        self.diverged = False
        self.epochs_run = 0
        self.flag: dict[str, int | None] = {"signum": None}
        self.group: Collective | None = group

    # -- resume and files ----------------------------------------------------------------------

    def resume_from(self, point: resume_lib.ResumePoint) -> None:
        self.state = point.state
        self.cb_states = {cb.name: point.cb_states.get(cb.name, cb.init()) for cb in self.callbacks}
        self.start_epoch, self.in_epoch = point.start_epoch, point.in_epoch
        self.lr = point.lr
        self.history = [r for r in point.history if r["epoch"] < point.start_epoch]
        where = f"epoch {point.start_epoch}" + (
            f", batch {point.in_epoch['batch']}" if point.in_epoch else ""
        )
        self.log.info(f"resumed from {point.path} at step {_host_step(point.state.step)} ({where})")
        if point.start_epoch > self.epochs:
            self.log.info(f"the checkpoint is past epoch {self.epochs} (epochs); nothing to train")

    def _meta(self, epoch_done: int, in_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        m = {**self.metadata, "epoch": epoch_done, "callbacks": self.cb_states, "history": self.history}
        if self.lr is not None:
            m["lr"] = self.lr
        if in_epoch:
            m["in_epoch"] = in_epoch
        return m

    def save_last(self, epoch_done: int, in_epoch: dict[str, Any] | None = None) -> Path | None:
        if self.run is None:
            return None
        path = self.run.checkpoints / LAST
        checkpoint.save_state(path, self.state, metadata=self._meta(epoch_done, in_epoch))
        self.log.info(f"saved {path} (step {_host_step(self.state.step)})")
        return path

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
        meta = {**self.metadata, "epoch": a.epoch, "monitor": a.monitor, "value": a.value}
        if a.member is not None:  # one member of an ensemble: a plain single-model file
            rundir.member_folder(path.parent.parent, a.member)
            weights = {k: v[a.member] for k, v in weights.items()}
            meta["member"] = a.member
        checkpoint.save_weights(path, weights, metadata=meta)
        self.log.info(f"saved {path} ({a.monitor} {a.value})")

    # -- events and actions --------------------------------------------------------------------

    def dispatch(self, event: Any, epoch: int, finite: bool = True) -> str | None:
        """Send `event` to the callbacks, then carry out their actions; a stop reason or None.

        With a run directory every finished epoch ends in last.safetensors (exact resume
        whatever the callbacks): written here when no callback asked for it.
        """
        self.cb_states, actions = cbs.dispatch(self.callbacks, self.cb_states, event)
        if self.run is not None and isinstance(event, cbs.EpochEnd):
            if not any(isinstance(a, cbs.SaveCheckpoint) and a.kind == "last" for a in actions):
                actions = [*actions, cbs.SaveCheckpoint("last", event.epoch)]
        return self.carry_out(actions, epoch, finite)

    def carry_out(self, actions: list[Any], epoch: int, finite: bool) -> str | None:
        """Apply actions in list order, except hyperparameters first and Stop last; each
        action type has one handler (`_handlers`), and file-writing ones run only with a
        run directory.

        List order matters: ModelCheckpoint saves a newcomer before deleting the file it
        evicts and writes "last" after everything else, so a crash in between never loses a
        kept file nor records an unwritten one. Hyperparameters go first so that a checkpoint
        written for this event holds the lr its callback states already record.
        """
        order = {cbs.SetHyperparam: 0, cbs.Stop: 2}
        reason = None
        for a in sorted(actions, key=lambda a: order.get(type(a), 1)):  # stable: list order kept
            handler = self._handlers.get(type(a))
            if handler is None:
                raise TypeError(
                    f"fit cannot carry out {a!r}: not one of the actions of fashion_func.callbacks"
                )
            reason = handler(a, epoch, finite) or reason
        return reason

    @functools.cached_property
    def _handlers(self) -> dict[type, Callable[[Any, int, bool], str | None]]:
        """One handler per action type: `(action, epoch, finite) -> stop reason or None`."""
        handlers: dict[type, Callable[[Any, int, bool], str | None]] = {
            cbs.Stop: lambda a, epoch, finite: a.reason,
            cbs.SetHyperparam: _no_reason(self._set_hyperparam),
            cbs.LogMessage: _no_reason(lambda a: self.log.info(a.text)),
            cbs.SaveCheckpoint: self._save,
            cbs.KeptBest: _no_reason(lambda a: self._record_best(a.epoch, a.monitor, a.value, a.member)),
        }
        run = self.run
        if run is None:  # the actions that only write files: nothing to do without a run directory
            return {**handlers, **dict.fromkeys(_FILE_ACTIONS, lambda a, epoch, finite: None)}
        writers: dict[type, Callable[[Any], Any]] = {
            cbs.LogScalars: lambda a: run.log_scalars(dict(a.scalars), a.step, purge_step=self.start_epoch),
            cbs.WriteHistory: lambda a: run.write_json("history.json", [dict(r) for r in a.records]),
            cbs.PlotHistory: lambda a: rundir.plot_history(a.records, run.path),
            cbs.DeleteCheckpoint: lambda a: self._weights_path("epoch", a.epoch, a.member).unlink(
                missing_ok=True
            ),
        }
        return {**handlers, **{t: _no_reason(w) for t, w in writers.items()}}

    def _set_hyperparam(self, a: cbs.SetHyperparam) -> None:
        self.state = self.state.replace(opt_state=optim.set_hyperparam(self.state.opt_state, a.name, a.value))
        if a.name == "lr":
            self.lr = float(a.value)

    def _save(self, a: cbs.SaveCheckpoint, epoch: int, finite: bool) -> None:
        if not finite:
            self.log.warning(f"not saving {a.kind} checkpoint for epoch {epoch}: parameters are not finite")
        elif a.kind == "last":
            self.save_last(epoch)
        else:
            self._save_weights(a)

    # -- epochs --------------------------------------------------------------------------------

    def _begin_epoch(self, epoch: int) -> _Epoch:
        device = self.state.step.device
        ep = _Epoch(epoch, 0, {}, torch.full((), -1, dtype=torch.int64, device=device), 0.0)
        saved, self.in_epoch = self.in_epoch, None
        if saved and int(saved["epoch"]) == epoch:
            resume_lib.check_same_batches(saved, getattr(self.train_data, "batching", None))
            if "sums" not in saved:  # written before fit took any step's metrics
                saved = {**saved, "sums": {k: saved[k] for k in ("loss_sum", "correct", "count")},
                         "dtypes": {"loss_sum": "float32", "correct": "int64", "count": "int64"}}  # fmt: skip
            ep.first_batch = int(saved["batch"])
            saved = coll.sums_for_rank(self.group, saved)
            ep.sums = {
                k: torch.tensor(v, dtype=getattr(torch, saved["dtypes"][k]), device=device)
                for k, v in saved["sums"].items()
            }
            ep.first_bad = torch.tensor(int(saved["first_bad"]), dtype=torch.int64, device=device)
            ep.elapsed_before = float(saved["elapsed"])
        return ep

    def _bar(self, ep: _Epoch) -> Any:
        if not self.progress:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=_num_batches(self.train_data), initial=ep.first_batch, leave=False, unit="step",
                    desc=f"epoch {ep.epoch}/{self.epochs}", file=sys.stderr, dynamic_ncols=True)  # fmt: skip

    def train_epoch(self, epoch: int) -> bool:
        """Run one epoch; False when it was cut short by `max_steps` (a signal raises).

        A cut that falls on the epoch's last batch still ends the epoch (evaluation, history,
        callbacks), so it is never left finished but unrecorded.
        """
        ep = self._begin_epoch(epoch)
        bar = self._bar(ep)
        host_step = _host_step(
            self.state.step
        )  # mirrors state.step on the host, so checking it costs no sync
        ep.t0 = time.perf_counter()
        batches = enumerate(epoch_batches(self.train_data, epoch, ep.first_batch), ep.first_batch)
        b = ep.first_batch - 1
        for b, batch in batches:
            self.state, m = self.train_step(self.state, batch)
            ep.sums = {k: ep.sums[k] + v if k in ep.sums else v for k, v in m.items()}
            if "loss_sum" in m:  # first step whose loss was not finite, tracked on the device (no sync)
                # (any member's, in an ensemble: every member is at the same step)
                bad = (ep.first_bad < 0) & ~torch.isfinite(m["loss_sum"]).all()
                ep.first_bad = torch.where(bad, self.state.step.reshape(-1)[0], ep.first_bad)
            bar.update(1)
            host_step += 1
            cut = self.max_steps is not None and host_step >= self.max_steps
            signum = self._stop_signal(host_step)
            if cut and signum is None and next(batches, None) is None:
                break  # the cut fell on the last batch: end the epoch below
            if signum is not None or cut:
                bar.close()
                self._stop_mid_epoch(ep, b + 1, cut)
                return False
        bar.close()
        if b < 0:  # not even one batch (resuming at an epoch's very end has b >= first_batch - 1 >= 0)
            raise ValueError(
                f"train_data gave no batches for epoch {epoch}; an iterator is used up after one epoch: "
                "pass a list, a DataLoader or a function epoch -> batches"
            )
        self._end_epoch(ep, steps=b + 1)
        if self.max_steps is not None and host_step >= self.max_steps and self.stop_reason == "completed":
            self.stop_reason = f"max_steps {self.max_steps} reached"
            return False
        return True

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.state.params.values())

    def _stop_mid_epoch(self, ep: _Epoch, next_batch: int, cut: bool) -> None:
        """Save the state cut inside epoch `ep` (unless it diverged); raise Interrupted on a signal."""
        bad_step = int(self._first_bad(ep))
        in_epoch = {
            "epoch": ep.epoch,
            "batch": next_batch,
            "batching": getattr(self.train_data, "batching", None),
            **self._partial_sums(ep),
            "first_bad": bad_step,
            "elapsed": ep.elapsed(),
        }
        saved, path = True, (self.run.checkpoints / LAST if self.run else None)
        if bad_step >= 0 or not self._params_finite():
            saved, self.diverged = False, True  # never replace the last good resume point with it
            where = f"at step {bad_step} " if bad_step >= 0 else ""
            self.log.error(f"training became non-finite {where}(epoch {ep.epoch}); "
                           f"not saving, {path} keeps the state from before it")  # fmt: skip
        else:
            path = self.save_last(ep.epoch - 1, in_epoch)
        if cut:
            self.stop_reason = f"max_steps {self.max_steps} reached"
            return
        if self.run is not None:
            self.log.info(
                f"interrupted: resume with --resume auto --out {self.run.path} (or --resume {path})"
            )
            self.run.close_tensorboard()
        raise Interrupted(self.flag["signum"], path or Path("."), saved=saved)

    def _end_epoch(self, ep: _Epoch, steps: int) -> None:
        # the epoch's sums (over all ranks, once per epoch, with a group), in one sync
        sums = _to_host(
            {**_sum_over_ranks(self.group, ep.sums), "first_bad": self._first_bad(ep).reshape(())}
        )
        bad = int(sums.pop("first_bad"))
        train_time = ep.elapsed()
        finite = bad < 0 and self._params_finite()
        metrics: dict[str, Any] = _train_metrics(sums, max(steps, 1))
        if self.eval_step is not None and self.val_data is not None:
            batches = epoch_batches(self.val_data, ep.epoch)
            metrics.update(evaluate(self.eval_step, self.state, batches, group=self.group))
        if isinstance(self.lr, list):  # a sweep's members each have their own
            metrics.update(expand_members({"lr": self.lr}))
        elif self.lr is not None:
            metrics["lr"] = self.lr
        metrics["epoch_time_s"] = train_time
        if bad >= 0:
            metrics["first_nonfinite_step"] = bad
            self.log.error(f"loss became non-finite at step {bad} (epoch {ep.epoch}); stopping")
        self.history = [r for r in self.history if r["epoch"] < ep.epoch] + [
            cbs.history_record(ep.epoch, metrics)
        ]
        reason = self.dispatch(cbs.EpochEnd(epoch=ep.epoch, metrics=metrics), ep.epoch, finite)
        self.epochs_run += 1
        if bad >= 0:  # this reason names the step; TerminateOnNaN's names only the epoch
            reason = f"non-finite loss at step {bad} (epoch {ep.epoch})"
        elif not finite and reason is None:
            reason = "non-finite parameters"
        self.diverged = self.diverged or not finite
        if reason:
            self.stop_reason = reason
            self.log.info(f"stopping: {reason}")

    # -- data parallel: the host-side collectives (none without a group) ----------------------

    def _stop_signal(self, host_step: int) -> int | None:
        """The signal to stop on after this step: this process's, or the one the ranks agreed."""
        if self.group is None:
            return self.flag["signum"]
        signum = coll.agreed_signal(self.group, self.flag["signum"], host_step)
        if signum is not None:  # a rank that got no signal raises Interrupted like the one that did
            self.flag["signum"] = signum
        return signum

    def _first_bad(self, ep: _Epoch) -> Tensor:
        """The epoch's first non-finite step (-1: none) over all ranks, as float64 `[1]`."""
        if self.group is None:
            return ep.first_bad.double().reshape(1)
        return coll.first_bad_over_ranks(self.group, ep.first_bad)

    def _partial_sums(self, ep: _Epoch) -> dict[str, Any]:
        """A cut epoch's sums for the checkpoint: global, and with a group each rank's own."""
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in ep.sums.items()}
        if self.group is None:
            return {"sums": {k: v.tolist() for k, v in ep.sums.items()}, "dtypes": dtypes}
        per_rank = coll.rank_sums(self.group, ep.sums)
        total = {k: sum(r[k] for r in per_rank) for k in ep.sums}
        return {"sums": total, "rank_sums": per_rank, "dtypes": dtypes}

    def run_epochs(self) -> FitResult:
        # Handlers go in before TrainBegin logs "training epochs": from that line on, a
        # signal is always honoured after the current step.
        with _signals_to_flag(self.run is not None or self.group is not None) as self.flag:
            reason = self.dispatch(cbs.TrainBegin(start_epoch=self.start_epoch, total_epochs=self.epochs), 0)
            if reason:
                self.stop_reason = reason
            epoch = self.start_epoch
            if self.max_steps is not None and _host_step(self.state.step) >= self.max_steps:
                self.stop_reason = f"max_steps {self.max_steps} reached"  # already there: no step taken
            while epoch <= self.epochs and self.stop_reason == "completed":
                if not self.train_epoch(epoch):
                    break
                epoch += 1
        self.dispatch(cbs.TrainEnd(epoch=epoch - 1, reason=self.stop_reason), epoch - 1)
        out = self.run.path if self.run else None
        extra = {"member_best": dict(sorted(self.member_best.items()))} if self.member_best else {}
        return FitResult(
            self.state,
            self.history,
            self.epochs_run,
            self.stop_reason,
            out,
            self.best,
            extra,
            diverged=self.diverged,
        )


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Tensor]]],
    train_data: Data,
    *,
    epochs: int,
    eval_step: Callable[..., Mapping[str, Tensor]] | None = None,
    val_data: Data | None = None,
    callbacks: Sequence[cbs.CallbackLike] = (),
    run_dir: str | Path | RunDir | None = None,
    resume: str | Path | resume_lib.ResumePoint | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    progress: bool = False,
    log: logging.Logger | None = None,
    weights: Callable[[TrainState], Mapping[str, Tensor]] | None = None,
    group: Collective | None = None,
) -> FitResult:
    """Train `state` with `train_step` for `epochs` epochs; returns the final state and history.

    train_data, val_data: a function `epoch -> iterable of batches` (e.g. `data.EpochBatches`)
        or an iterable run through once per epoch (a `DataLoader`, a list of batches).
    train_step: `(state, batch) -> (state, metrics)`; metrics are 0-d device tensors, sums
        over the batch, added up over the epoch on the device (and over the ranks with a
        group) and divided by the summed `count` (by the number of steps without one):
        `loss_sum` -> train_loss, `correct` -> train_acc, `top{k}_correct` -> train_top{k},
        `<name>_sum` -> train_<name>, any other key -> train_<key>. `[K]` tensors from an
        ensemble step are reported per member (`_m0`, ...), with their mean and std.
    eval_step: `(state, batch) -> per-example tensors` (`make_eval_step`), run on `val_data`
        after each epoch and averaged over it (`evaluate`): val_loss, val_acc, val_top{k},
        val_<name> for each other `[B]` output. Every metric goes to the history, the log
        and TensorBoard alike.
    callbacks: pure event handlers (`fashion_func.callbacks`); `fit` carries out their actions.
    run_dir: None writes nothing. A path (or an opened `RunDir`) is locked for the run and
        receives train.log and checkpoints/last.safetensors (exact resume, every epoch), and
        what the callbacks ask for: history.json and the plots (TrainingMonitor),
        tensorboard/ (TensorBoardLogger), best and per-epoch weights (ModelCheckpoint);
        SIGINT/SIGTERM then save mid-epoch and raise `Interrupted`.
    resume: "auto" (the run directory's last.safetensors, if any), a checkpoint path, or a
        `ResumePoint` already loaded; the run continues exactly where it stopped.
    overwrite: start afresh in a run directory that already holds a run.
    metadata: JSON-serialisable values stored in every checkpoint (e.g. a config, a model name).
    max_steps: stop (after saving last.safetensors) once the state reaches this step.
    log: where messages go (default: the run's train.log and stdout, else `fashion_func`'s logger).
    weights: what best and per-epoch files hold, from the state (default: params and model
        state); e.g. `lambda st: {**optim.ema_params(st.opt_state), **st.model_state}` keeps
        the moving average of an `optim.ema` transform.
    group: data parallel (`fashion_func.distributed.Group`): this process is one of the ranks
        training one model; `train_step` all-reduces the gradients and `train_data` /
        `val_data` give this rank's part. The epoch's metric sums are added over the ranks
        once per epoch, a signal on any rank stops all of them after the same step (checked
        every `group.stop_check_every` steps), and only the rank given a `run_dir` (rank 0)
        writes: the others pass None.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}")
    if isinstance(run_dir, RunDir) or run_dir is None:
        ctx: contextlib.AbstractContextManager[RunDir | None] = contextlib.nullcontext(run_dir)
    else:
        ctx = RunDir.open(run_dir, resume=resume, overwrite=overwrite)
    with ctx as run:
        logger = log or (run.log if run else logging.getLogger("fashion_func"))
        driver = _Driver(state, train_step, train_data, epochs=epochs, eval_step=eval_step, val_data=val_data,
                         callbacks=callbacks, run=run, metadata=metadata, max_steps=max_steps,
                         progress=progress, log=logger, weights=weights, group=group)  # fmt: skip
        point = _resume_point(resume, run, state, driver.callbacks, logger)
        if point is not None:
            driver.resume_from(point)
        return driver.run_epochs()


def _resume_point(
    resume: Any, run: RunDir | None, state: TrainState, callbacks: Sequence[Any], log: logging.Logger
) -> resume_lib.ResumePoint | None:
    if resume is None or isinstance(resume, resume_lib.ResumePoint):
        return resume
    if resume == "auto" and run is None:
        raise RunError("resume='auto' needs a run_dir to look in")
    path = resume_lib.resume_path(run.path if run else Path("."), resume)
    if path is None:
        log.info(f"no checkpoint in {run.checkpoints if run else '.'}; starting fresh")
        return None
    return resume_lib.load(path, state, callbacks)
