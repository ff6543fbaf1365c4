"""`fit`: the only impure driver, a library function over the user's own objects.

It runs the user's `train_step` over each epoch's batches, evaluates, sends events to the
callbacks and carries out the actions they return (`actions`). With a run directory,
everything needed to continue after a restart goes into `checkpoints/last.safetensors`;
without one it writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fashion_func import callbacks as cbs
from fashion_func import checkpoint
from fashion_func import privacy as privacy_lib
from fashion_func.loop import collective as coll
from fashion_func.loop import members as members_lib
from fashion_func.loop import resume as resume_lib
from fashion_func.loop import rngs
from fashion_func.loop.actions import Actions
from fashion_func.loop.artifacts import LAST
from fashion_func.loop.batches import Data, encode_state, epoch_batches, num_batches, resume_kind
from fashion_func.loop.collective import Collective
from fashion_func.loop.errors import NOTES, RunError
from fashion_func.loop.lr import lr_metrics
from fashion_func.loop.reduce import evaluate, expand_members, sum_over_ranks, to_host, train_metrics
from fashion_func.loop.result import FitResult, StopReason
from fashion_func.loop.rundir import RunDir
from fashion_func.loop.signals import Interrupted, signals_to_flag
from fashion_func.privacy import Accountant
from fashion_func.safeio import Note
from fashion_func.state import TrainState

__all__ = ["FitResult", "StopReason", "evaluate", "fit"]


def _host_step(step: Tensor) -> int:
    """The step as an int; an ensemble's members all stand at the same step."""
    return int(step.reshape(-1)[0])


class _After(enum.Enum):
    """What follows a step: the epoch goes on, ends (a cut on its last batch) or is cut."""

    GO_ON, LAST_BATCH, CUT = range(3)


@dataclass
class _Epoch:
    """The running sums of the epoch in progress (device tensors) and where it started."""

    epoch: int
    first_batch: int
    sums: dict[str, Tensor]
    first_bad: Tensor
    elapsed_before: float
    data_state: Any = None  # a stateful train_data's position at first_batch (resumed)
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0


class _Driver:
    """One call of `fit`: the mutable run (state, lr, history) and the methods that move it on,
    with its `Actions` (the callbacks') and `members` policy (divergence)."""

    def __init__(self, state, train_step, train_data, *, epochs, eval_step, val_data, callbacks,
                 run, metadata, max_steps, progress, log, weights=None, group=None,
                 lr_schedule=None, allow_inexact_resume=False, privacy=None) -> None:  # fmt: skip
        self.state: TrainState = state
        self.train_step, self.train_data = train_step, train_data
        self.epochs, self.eval_step, self.val_data = epochs, eval_step, val_data
        self.run: RunDir | None = run
        self.metadata = dict(metadata or {})
        try:  # what every last.safetensors records before the run adds its own fields
            self.base = resume_lib.RunRecord.from_meta(self.metadata)
        except ValueError as exc:
            raise ValueError(f"metadata: {exc}") from None
        self.max_steps, self.progress = max_steps, progress
        self.log = log
        self.actions = Actions(callbacks, run, log, self.metadata, weights,
                               self.save_last, self.run_meta)  # fmt: skip
        self.start_epoch, self.in_epoch = 1, None
        self.history: list[dict[str, Any]] = []
        self.stop, self.stop_reason = StopReason.COMPLETED, "completed"
        self.diverged = False
        self.epochs_run = 0
        self.flag: dict[str, int | None] = {"signum": None}
        self.group: Collective | None = group
        self.lr_schedule: Callable[[Tensor], Tensor] | None = lr_schedule
        self.allow_inexact_resume = allow_inexact_resume
        self.privacy: Accountant | None = privacy
        # the global generators' states of a resumed checkpoint, set where the uncut run stood,
        # and a stateful train_data's position saved at an epoch's end (its sampler's generator)
        self.saved_rngs: dict[str, Any] | None = None
        self.saved_data_state: Any = None
        # the per-example stage the step enforces: what the privacy record's sigma and C come from
        self.per_example: privacy_lib.ClipAndNoise | None = getattr(train_step, "per_example", None)
        if privacy is not None:  # epsilon from what the run enforces, never from what a caller claims
            privacy_lib.check_accountant(privacy, self.per_example, getattr(train_data, "batching", None))
        # one model or a stack of members (an ensemble, a sweep): what divergence does to each
        self.members = members_lib.policy(state)

    def resume_from(self, point: resume_lib.ResumePoint) -> None:
        self.state = point.state
        acts = self.actions
        acts.cb_states = {cb.name: point.cb_states.get(cb.name, cb.init()) for cb in acts.callbacks}
        self.start_epoch, self.in_epoch = point.start_epoch, point.in_epoch
        acts.start_epoch = point.start_epoch
        self.saved_rngs = point.record.rng_states
        self.saved_data_state = point.record.data_state
        self.history = [r for r in point.history if r["epoch"] < point.start_epoch]
        try:
            self.members = self.members.resumed(point.record.diverged_members)
        except ValueError as exc:
            raise checkpoint.CheckpointError(f"{point.path}: {exc}") from None
        where = f"epoch {point.start_epoch}" + (
            f", batch {point.in_epoch['batch']}" if point.in_epoch else ""
        )
        self.log.info(f"resumed from {point.path} at step {_host_step(point.state.step)} ({where})")
        done = self.max_steps is not None and _host_step(point.state.step) >= self.max_steps
        done = done or point.start_epoch > self.epochs  # no step will be taken: nothing to continue
        if point.in_epoch and int(point.in_epoch["batch"]) > 0 and not done:
            self._check_exact_resume(point.in_epoch)
        if point.start_epoch > self.epochs:
            self.log.info(
                f"the run is already complete: it has trained {point.start_epoch - 1} epoch(s) and "
                f"epochs={self.epochs} is the total; nothing to train"
            )

    def _check_exact_resume(self, in_epoch: Mapping[str, Any]) -> None:
        """A mid-epoch resume continues exactly (`batches.resume_kind`), or is refused unless
        `allow_inexact_resume` (then the batches already seen are drawn again and dropped)."""
        kind = resume_kind(self.train_data)
        if kind == "start" or (kind == "state" and in_epoch.get("data_state") is not None):
            return
        epoch, batch, data = int(in_epoch["epoch"]), int(in_epoch["batch"]), type(self.train_data).__name__
        if not self.allow_inexact_resume:
            raise RunError(kind="inexact_resume", epoch=epoch, batch=batch, data=data)
        self.log.warning(
            f"resuming epoch {epoch} at batch {batch} inexactly (allow_inexact_resume=True): the {data} "
            f"gives no position to continue from, so its first {batch} batches are drawn again and dropped"
        )

    def save_last(
        self,
        state: TrainState,
        epoch_done: int,
        in_epoch: dict[str, Any] | None = None,
        rng_states: Any = None,
    ) -> Path | None:
        """Write `state` to last.safetensors with the run record after `epoch_done` epochs (and
        inside the next at `in_epoch`); with the global generators' states `rng_states` (taken
        where the data source's position was) or, without them, as they are now."""
        if self.run is None:
            return None
        folder, folder_id = self.run.checkpoint_folder()  # still the run's own, not a link swapped in
        record = dataclasses.replace(
            self.base, epoch=epoch_done, callbacks=self.actions.cb_states, history=self.history,
            rng_states=rng_states or rngs.capture(),
            lr=resume_lib.host_lr(state.opt_state),  # the base lr, as last set (not a copy)
            in_epoch=in_epoch or None,
            # at an epoch's end: where a stateful source's next epoch starts (its shuffle)
            data_state=None if in_epoch else self._data_state(),
            diverged_members=self.members.to_meta(),
            privacy=self.run_meta().get("privacy", self.base.privacy),
        )  # fmt: skip
        path = folder / LAST
        checkpoint.save_state(path, state, metadata=record.to_meta(), folder=folder_id)
        self.log.info(f"saved {path} (step {_host_step(state.step)})")
        return path

    def _begin_epoch(self, epoch: int) -> _Epoch:
        device = self.state.step.device
        ep = _Epoch(epoch, 0, {}, torch.full((), -1, dtype=torch.int64, device=device), 0.0)
        saved, self.in_epoch = self.in_epoch, None
        ep.data_state, self.saved_data_state = self.saved_data_state, None
        if saved and int(saved["epoch"]) == epoch:
            resume_lib.check_same_batches(saved, getattr(self.train_data, "batching", None))
            ep.first_batch = int(saved["batch"])
            saved = coll.sums_for_rank(self.group, saved)
            ep.sums = {
                k: torch.tensor(v, dtype=getattr(torch, saved["dtypes"][k]), device=device)
                for k, v in saved["sums"].items()
            }
            ep.first_bad = torch.tensor(int(saved["first_bad"]), dtype=torch.int64, device=device)
            ep.elapsed_before = float(saved["elapsed"])
            ep.data_state = saved.get("data_state")
        return ep

    def _bar(self, ep: _Epoch) -> Any:
        from tqdm import tqdm

        return tqdm(total=num_batches(self.train_data), initial=ep.first_batch, leave=False, unit="step",
                    desc=f"epoch {ep.epoch}/{self.epochs}", file=sys.stderr, dynamic_ncols=True,
                    disable=not self.progress)  # fmt: skip

    def train_epoch(self, epoch: int) -> bool:
        """Run one epoch; False when `max_steps` cut it short (a signal raises). A cut on the
        epoch's last batch still ends (records) the epoch."""
        ep = self._begin_epoch(epoch)
        bar = self._bar(ep)
        host_step = _host_step(self.state.step)  # mirrors state.step on the host: checking it costs no sync
        ep.t0 = time.perf_counter()
        mid_epoch = ep.first_batch > 0
        if not mid_epoch:  # resumed at an epoch's start: before the source draws its epoch's seed
            self._restore_rngs()
        source = epoch_batches(self.train_data, epoch, ep.first_batch, ep.data_state)
        if mid_epoch:  # inside an epoch: after, as the uncut run's source had drawn it long before
            self._restore_rngs()
        batches = enumerate(source, ep.first_batch)
        b = ep.first_batch - 1
        for b, batch in batches:
            self.state, m = self.train_step(self.state, batch)
            ep.sums = {k: ep.sums[k] + v if k in ep.sums else v for k, v in m.items()}
            if "loss_sum" in m:  # first step whose loss was not finite, on the device (no sync)
                ep.first_bad = members_lib.note_bad(ep.first_bad, m["loss_sum"], self.state.step)
            bar.update(1)
            host_step += 1
            after = self._check_stop(ep, batches, b, host_step, bar)
            if after is _After.LAST_BATCH:
                break  # the cut fell on the last batch: end the epoch below
            if after is _After.CUT:
                return False
        bar.close()
        if b < 0:  # not even one batch (resuming at an epoch's very end has b >= first_batch - 1 >= 0)
            raise ValueError(
                f"train_data gave no batches for epoch {epoch}; an iterator is used up after one epoch: "
                "pass a list, a DataLoader or a function epoch -> batches"
            )
        self._end_epoch(ep, steps=b + 1)
        if self.max_steps is not None and host_step >= self.max_steps and self.stop is StopReason.COMPLETED:
            self._stop_at_max_steps()
            return False
        return True

    def _check_stop(self, ep: _Epoch, batches: Any, b: int, host_step: int, bar: Any) -> _After:
        """After batch `b`: go on, end the epoch (a cut on its last batch) or cut it (the state
        saved mid-epoch; on a signal `Interrupted` is raised instead)."""
        cut = self.max_steps is not None and host_step >= self.max_steps
        signum = self._stop_signal(host_step)
        if not cut and signum is None:
            return _After.GO_ON
        data_state = self._data_state()  # before the look-ahead below draws one more batch
        rng_states = rngs.capture()  # likewise: the look-ahead may draw augmentation from them
        if cut and signum is None and next(batches, None) is None:
            return _After.LAST_BATCH
        bar.close()
        self._stop_mid_epoch(ep, b + 1, cut, data_state, rng_states)
        return _After.CUT

    def _restore_rngs(self) -> None:
        """The global generators set as the resumed checkpoint saved them (once)."""
        if self.saved_rngs is None:
            return
        done = rngs.restore(self.saved_rngs)
        self.saved_rngs = None
        self.log.info(f"restored the global random generators ({', '.join(done)}) from the checkpoint")

    def warn_inexact_source(self) -> None:
        """Name, at the start, a `train_data` that a mid-epoch checkpoint could not continue."""
        if self.run is None or self.allow_inexact_resume or resume_kind(self.train_data) is not None:
            return
        self.log.warning(
            f"train_data ({type(self.train_data).__name__}) cannot continue an epoch from a mid-epoch "
            "checkpoint: a run cut by a signal or max_steps will refuse to resume inside the epoch (use "
            "data.EpochBatches, a function epoch -> batches taking start=, or a torchdata "
            "StatefulDataLoader; or allow_inexact_resume=True)"
        )

    def _data_state(self) -> Any:
        """A stateful `train_data`'s position (its `state_dict()`, as JSON values), else None."""
        if resume_kind(self.train_data) != "state":
            return None
        return encode_state(self.train_data.state_dict())  # type: ignore[union-attr]

    def _stop_mid_epoch(
        self, ep: _Epoch, next_batch: int, cut: bool, data_state: Any = None, rng_states: Any = None
    ) -> None:
        """Save the state cut inside epoch `ep` (unless it diverged); raise Interrupted on a signal."""
        # a stack's member that went non-finite is marked now, the others are saved
        bad_steps = coll.first_bad(self.group, ep.first_bad).tolist()
        self.state, bad_step, finite = self.members.verdict(self.state, ep.epoch, bad_steps, self.log)
        ep.sums = dict(self.members.saved_sums(ep.sums))
        in_epoch = {
            "epoch": ep.epoch,
            "batch": next_batch,
            "batching": getattr(self.train_data, "batching", None),
            **coll.partial_sums(self.group, ep.sums),
            "first_bad": bad_step,
            "elapsed": ep.elapsed(),
            **({"data_state": data_state} if data_state is not None else {}),
        }
        saved, path = True, (self.run.checkpoints / LAST if self.run else None)
        if not finite:
            saved, self.diverged = False, True  # never replace the last good resume point with it
            where = f"at step {bad_step} " if bad_step >= 0 else ""
            self.log.error(f"training became non-finite {where}(epoch {ep.epoch}); "
                           f"not saving, {path} keeps the state from before it")  # fmt: skip
        else:
            path = self.save_last(self.state, ep.epoch - 1, in_epoch, rng_states)
        if cut:
            self._stop_at_max_steps()
            return
        if self.run is not None:
            self.log.info(Note(NOTES, "interrupted", out=self.run.path, path=path))
            self.run.close_tensorboard()
        raise Interrupted(self.flag["signum"], path or Path("."), saved=saved)

    def _end_epoch(self, ep: _Epoch, steps: int) -> None:
        # the epoch's sums (over all ranks, once per epoch, with a group), in one sync
        sums = to_host(
            {**sum_over_ranks(self.group, ep.sums), "first_bad": coll.first_bad(self.group, ep.first_bad)}
        )
        train_time = ep.elapsed()
        # a stack: members that diverged are marked and left out; it stops when all have
        self.state, bad, finite = self.members.verdict(self.state, ep.epoch, sums.pop("first_bad"), self.log)
        metrics: dict[str, Any] = train_metrics(sums, max(steps, 1), self.members.dead)
        if self.eval_step is not None and self.val_data is not None:
            batches = epoch_batches(self.val_data, ep.epoch)
            live = self.members.evaluated(finite)
            metrics.update(evaluate(self.eval_step, self.state, batches, group=self.group, live=live))
        metrics.update(lr_metrics(self.state.opt_state, self.lr_schedule))  # what the last step applied
        if self.privacy is not None:  # the guarantee after the steps taken so far
            metrics.update(self._epsilon())
        metrics["epoch_time_s"] = train_time
        metrics.update(self.members.metrics())
        if bad >= 0:
            metrics["first_nonfinite_step"] = bad
            self.log.error(f"loss became non-finite at step {bad} (epoch {ep.epoch}); stopping")
        self.history = [r for r in self.history if r["epoch"] < ep.epoch] + [
            cbs.history_record(ep.epoch, metrics)
        ]
        self.state, reason = self.actions.dispatch(
            cbs.EpochEnd(epoch=ep.epoch, metrics=metrics), ep.epoch, self.state, finite
        )
        self.epochs_run += 1
        self.diverged = self.diverged or not finite
        divergence = self.members.divergence(ep.epoch, bad, finite)  # names the step (TerminateOnNaN: epoch)
        if divergence is not None:
            self._stop_with(*divergence)
        elif reason:
            self._stop_with(StopReason.CALLBACK, reason)
        elif not finite:
            self._stop_with(StopReason.NON_FINITE, "non-finite parameters")

    def _stop_with(self, kind: StopReason, reason: str) -> None:
        self.stop, self.stop_reason = kind, reason
        self.log.info(f"stopping: {reason}")

    def _stop_at_max_steps(self) -> None:  # not logged: the saved checkpoint's line says it
        self.stop, self.stop_reason = StopReason.MAX_STEPS, f"max_steps {self.max_steps} reached"

    def _epsilon(self) -> dict[str, float]:
        assert self.privacy is not None
        eps = self.privacy.epsilon(_host_step(self.state.step))
        if isinstance(eps, list):  # a sweep over noise multipliers: `epsilon` is the largest
            return expand_members({"epsilon": eps}, {"epsilon": max(eps)})
        return {"epsilon": eps}

    def enforced(self) -> dict[str, Any] | None:
        """What a private run enforces, as its privacy record says it (None: not private)."""
        if self.privacy is None or self.per_example is None:
            return None
        acc = self.privacy
        return {"sample_rate": acc.sample_rate, "noise_multiplier": acc.noise_multiplier, "delta": acc.delta,
                "max_grad_norm": self.per_example.max_norm, "accountant": acc.accountant}  # fmt: skip

    def run_meta(self, member: int | None = None) -> dict[str, Any]:
        """With `privacy`: the guarantee of the steps taken so far (`Accountant.record`) and
        the step's clipping norm, over what `metadata["privacy"]` already says (a target); a
        member's file gets that member's own noise multiplier, norm and epsilon."""
        if self.privacy is None or self.per_example is None:
            return {}
        record = {**self.metadata.get("privacy", {}), **self.privacy.record(_host_step(self.state.step))}
        norms = self.per_example.max_norm
        record["max_grad_norm"] = norms[0] if len(norms) == 1 else list(norms)
        if member is not None:  # a sweep's lists: this member's entry
            for key in ("noise_multiplier", "max_grad_norm", "epsilon"):
                if isinstance(record.get(key), list):
                    record[key] = record[key][member]
            record["member"] = member
        return {"privacy": record}

    def _over_budget(self, epoch: int) -> bool:
        """Whether epoch `epoch`'s steps would take epsilon past the privacy budget (then the
        run stops before it, with that reason)."""
        n = num_batches(self.train_data)
        if self.privacy is None or self.privacy.target_epsilon is None or n is None:
            return False
        if self.in_epoch and int(self.in_epoch["epoch"]) == epoch:  # resumed inside it
            n -= int(self.in_epoch["batch"])
        after = self.privacy.exceeds(_host_step(self.state.step) + n)
        if after is None:
            return False
        self._stop_with(StopReason.PRIVACY_BUDGET, f"privacy budget: epoch {epoch} would take epsilon to "
                        f"{after:.3f}, past the target {self.privacy.target_epsilon}")  # fmt: skip
        return True

    def _stop_signal(self, host_step: int) -> int | None:
        """The signal to stop on after this step: this process's, or the one the ranks agreed."""
        if self.group is None:
            return self.flag["signum"]
        signum = coll.agreed_signal(self.group, self.flag["signum"], host_step)
        if signum is not None:  # a rank that got no signal raises Interrupted like the one that did
            self.flag["signum"] = signum
        return signum

    def run_epochs(self) -> FitResult:
        # Handlers go in before TrainBegin logs "training epochs": from that line on, a
        # signal is always honoured after the current step.
        with signals_to_flag(self.run is not None or self.group is not None) as self.flag:
            begin = cbs.TrainBegin(start_epoch=self.start_epoch, total_epochs=self.epochs)
            self.state, reason = self.actions.dispatch(begin, 0, self.state)
            if reason:
                self.stop, self.stop_reason = StopReason.CALLBACK, reason
            epoch = self.start_epoch
            if self.max_steps is not None and _host_step(self.state.step) >= self.max_steps:
                self._stop_at_max_steps()  # already there: no step taken
            while epoch <= self.epochs and self.stop is StopReason.COMPLETED:
                if self._over_budget(epoch):
                    break
                if not self.train_epoch(epoch):
                    break
                epoch += 1
        end = cbs.TrainEnd(epoch=epoch - 1, reason=self.stop_reason)
        self.state, _ = self.actions.dispatch(end, epoch - 1, self.state)
        return FitResult(
            self.state, self.history, self.epochs_run, self.stop_reason, self.run.path if self.run else None,
            self.actions.best, self.stop, self.diverged, dict(sorted(self.actions.member_best.items())),
            {m["member"]: m for m in self.members.to_meta()},
        )  # fmt: skip


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
    lr_schedule: Callable[[Tensor], Tensor] | None = None,
    allow_inexact_resume: bool = False,
    privacy: Accountant | None = None,
) -> FitResult:
    """Train `state` with `train_step` for `epochs` epochs; returns the final state and history.

    train_data, val_data: a function `epoch -> iterable of batches` (e.g. `data.EpochBatches`)
        or an iterable run through once per epoch (a `DataLoader`, a list of batches).
    train_step: `(state, batch) -> (state, metrics)`; metrics are 0-d device tensors, sums over
        the batch, added up over the epoch (and the ranks) and divided by the summed `count`
        (else the step count): `loss_sum` -> train_loss, `correct` -> train_acc,
        `top{k}_correct` -> train_top{k}, `<name>_sum` -> train_<name>, other keys ->
        train_<key>. An ensemble's `[K]` tensors are reported per member (`_m0`, ...), with
        their mean and std.
    eval_step: `(state, batch) -> per-example tensors` (`make_eval_step`), averaged over
        `val_data` after each epoch (`evaluate`: val_loss, val_acc, ...).
    callbacks: pure event handlers (`fashion_func.callbacks`); `fit` carries out their actions.
    run_dir: None writes nothing. A path (or an opened `RunDir`) is locked for the run and gets
        train.log, checkpoints/last.safetensors (every epoch) and what the callbacks ask for;
        SIGINT/SIGTERM then save mid-epoch and raise `Interrupted`.
    resume: "auto" (the run directory's last.safetensors, if any), a checkpoint path, or a
        loaded `ResumePoint`; the run continues exactly where it stopped.
    overwrite: start afresh in a run directory that already holds a run.
    metadata: JSON-serialisable values stored in every checkpoint.
    max_steps: stop (after saving last.safetensors) once the state reaches this step.
    progress: a tqdm progress bar of each epoch's steps on stderr.
    log: where messages go (default: the run's train.log and stdout, else `fashion_func`'s logger).
    weights: what best and per-epoch files hold, from the state (default: params and model
        state), e.g. `lambda st: {**optim.ema_params(st.opt_state), **st.model_state}`.
    group: data parallel (`fashion_func.distributed.Group`): `train_step` all-reduces the
        gradients and the data gives this rank's part; metric sums are added over the ranks
        once per epoch, a signal on any rank stops all after the same step, and only the rank
        given a `run_dir` (rank 0) writes.
    lr_schedule: the schedule of an `optim.scale_by_schedule` in the chain: the history's `lr`
        is then the one the epoch's last step applied; without it such a chain's `lr`
        hyperparameter is logged as `base_lr`.
    allow_inexact_resume: a mid-epoch checkpoint continues exactly only with `train_data` that
        can start there (`data.EpochBatches`, a function taking `start=`, or an object with
        `state_dict()` / `load_state_dict()`). Other data is warned about at the start and
        refused (RunError) on a mid-epoch resume unless this is True: then the batches already
        seen are drawn again and dropped. The global generators are saved and restored too.
    privacy: private training (`privacy.Accountant`): the metrics get `epsilon` after the steps
        so far (a sweep: `epsilon_m<k>`, `epsilon` the largest); with a `target_epsilon`, the
        run stops before an epoch that would pass it. It must describe the run
        (`privacy.check_accountant`, else ValueError), and a resumed checkpoint's record must
        match it (`privacy.check_record`, else `checkpoint.CheckpointError`).
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
                         progress=progress, log=logger, weights=weights, group=group,
                         lr_schedule=lr_schedule, allow_inexact_resume=allow_inexact_resume,
                         privacy=privacy)  # fmt: skip
        driver.warn_inexact_source()
        # the point checked against this run (`resume.compatible`): its model, images, privacy
        now = dataclasses.replace(driver.base, privacy=driver.enforced())
        out = run.path if run else None
        point = resume_lib.resume_point(resume, out, state, driver.actions.callbacks, logger, now)
        if point is not None:
            driver.resume_from(point)
        return driver.run_epochs()
