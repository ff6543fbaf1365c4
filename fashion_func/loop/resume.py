"""Resume: the run record a `last.safetensors` holds (`RunRecord`), and where a run continues from."""

from __future__ import annotations

import enum
import math
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fashion_func import checkpoint, optim, privacy
from fashion_func.loop import rngs
from fashion_func.loop.artifacts import LAST, lstat
from fashion_func.loop.errors import RunError
from fashion_func.safeio import describe, display, short_repr
from fashion_func.state import TrainState

__all__: list[str] = []


@dataclass(frozen=True)
class RunRecord:
    """What a run's `last.safetensors` records beside its state, read back whole on resume.

    The one place that knows the metadata keys (`to_meta` / `from_meta`; layout `VERSION`).
    settings: the caller's `metadata=`, as given. epoch: the epochs finished. splits: the images
    trained, selected and tested on. in_epoch: a cut epoch's batch to continue from, batching,
    partial sums, first non-finite step and time. data_state: a stateful source's position at
    an epoch's end. callbacks: states by name. history: one record per finished epoch.
    diverged_members: {member, epoch, step} each. privacy: `privacy.check_record`'s record.
    rng_states: the global generators' (`rngs`). lr: a copy for readers (the state is the truth).
    """

    VERSION: ClassVar[str] = checkpoint.FORMAT_VERSION
    settings: Mapping[str, Any] = field(default_factory=dict)
    epoch: int = 0
    splits: dict[str, Any] | None = None
    in_epoch: dict[str, Any] | None = None
    data_state: dict[str, Any] | None = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged_members: list[dict[str, int]] = field(default_factory=list)  # as saved: `Diverged` checks it
    privacy: dict[str, Any] | None = None  # as saved: `privacy.check_record` checks it
    rng_states: dict[str, Any] | None = None
    lr: float | list[float] | None = None
    # a client's settings as `compatible` compares them, by the client's names (not written):
    # held fixed; deciding the stack of members; (value, whether the optimizer state has a part
    # for it: a clipping stage, a moving average, a momentum buffer); the batch size, which a
    # private run's accounting fixes (its sampling rate)
    held: Mapping[str, Any] = field(default_factory=dict)
    members: Mapping[str, Any] = field(default_factory=dict)
    parts: Mapping[str, tuple[Any, bool]] = field(default_factory=dict)
    batch_size: int | None = None

    _KEYS: ClassVar[tuple[str, ...]] = ("privacy", "splits", "epoch", "callbacks", "history", "rng_states",
                                        "lr", "in_epoch", "data_state", "diverged_members")  # fmt: skip

    @property
    def batching(self) -> dict[str, Any] | None:
        """How a cut epoch's batches were drawn (batch size or sample rate), or None."""
        return self.in_epoch.get("batching") if self.in_epoch else None

    def to_meta(self) -> dict[str, Any]:
        """The checkpoint metadata of this record (JSON values): the settings, then each field
        under its key; an empty optional field is left out."""
        values = {k: getattr(self, k) for k in self._KEYS}
        values["diverged_members"] = self.diverged_members or None
        return {**self.settings, **{k: v for k, v in values.items() if v is not None}}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], callbacks: Sequence[Any] = ()) -> RunRecord:
        """The record a checkpoint's metadata holds, each field checked for its type and range
        (the states of `callbacks` among them); ValueError naming the first problem."""
        problem = _check_metadata(meta, callbacks)
        if problem:
            raise ValueError(problem)
        splits = meta.get("splits")
        return cls(
            settings={k: v for k, v in meta.items() if k not in cls._KEYS},
            epoch=int(meta.get("epoch", 0)),
            splits=splits if isinstance(splits, dict) else None,
            in_epoch=meta.get("in_epoch"),
            data_state=meta.get("data_state"),
            callbacks=dict(meta.get("callbacks", {})),
            history=[dict(r) for r in meta.get("history", [])],
            diverged_members=meta.get("diverged_members") or [],
            privacy=meta.get("privacy"),
            rng_states=meta.get("rng_states"),
            lr=meta.get("lr"),
        )


@dataclass(frozen=True)
class ResumePoint:
    """Everything `fit` needs to continue a run exactly where its checkpoint left it: the
    state and the run record it was saved with (`record`), the callbacks' states (saved, or
    `init()` for a callback without one) and the file it came from."""

    path: Path
    state: TrainState
    cb_states: dict[str, Any]
    record: RunRecord = field(repr=False)

    @property
    def start_epoch(self) -> int:
        """The first epoch still to run (1-based)."""
        return self.record.epoch + 1

    @property
    def in_epoch(self) -> dict[str, Any] | None:
        """For a checkpoint cut mid-epoch: the batch to continue from and the partial sums."""
        return self.record.in_epoch

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record.history

    def replace_lr(self, lr: float, cb_states: Mapping[str, Any] | None = None) -> ResumePoint:
        """This point with the optimizer's learning rate set to `lr`, and with `cb_states`
        (the callbacks' states, which a client may restart from that lr) if given."""
        st = self.state.replace(opt_state=optim.set_hyperparam(self.state.opt_state, "lr", lr))
        return replace(self, state=st, cb_states=dict(self.cb_states if cb_states is None else cb_states))


class ProblemKind(enum.Enum):
    """Why a checkpoint's run cannot continue as the run now set up (its error's kind)."""

    MODEL = "other_model"  # the settings name another model
    SPLITS = "other_splits"  # trained on other images
    PRIVACY = "privacy_record"  # the privacy record is not what the run enforces
    SETTING = "other_setting"  # a setting held fixed has another value
    MEMBERS = "other_members"  # the stack of members would change
    PART_ADDED = "part_added"  # a setting needs a part the optimizer state has not
    PART_REMOVED = "part_removed"  # ... or leaves a part it holds unused
    SAMPLING = "other_sampling"  # a private run's batches, whose rate is accounted, would change


@dataclass(frozen=True)
class Problem:
    """One reason `compatible` gives: its kind, the setting (`key`), the saved and the current
    value, and (the privacy record's) what `privacy.check_record` said."""

    kind: ProblemKind
    key: str
    saved: Any
    now: Any
    detail: str = ""

    def error(self, path: Path) -> Exception:
        """The error of its kind, with the values it speaks of (splits as their counts, a
        setting's values as bounded reprs, an unset one as None): a bad privacy record is the file's
        (CheckpointError), the others the run's (RunError); a client words each by its kind."""

        def shown(v: Any) -> Any:
            if self.kind is ProblemKind.SPLITS:
                return ", ".join(f"{k} {v.get(k)}" for k in ("train", "held_out", "test"))
            if v is None or self.kind in (ProblemKind.MODEL, ProblemKind.PRIVACY):
                return v  # None as itself: a client words "not set" its own way (the CLI: none)
            return short_repr(v)

        error = checkpoint.CheckpointError if self.kind is ProblemKind.PRIVACY else RunError
        saved, now = shown(self.saved), shown(self.now)
        return error(
            kind=self.kind.value, path=path, setting=self.key, saved=saved, now=now, detail=self.detail
        )


def compatible(saved: RunRecord, now: RunRecord, *, steps: int | None = None) -> list[Problem]:
    """Why the run recorded in `saved` cannot continue as the run `now` (empty: it can), at
    most one problem per setting: another model or splits (where both record one), a privacy
    record that is not what `now` enforces (over `steps` steps: `privacy.check_record`), a
    private run's batch size, a `held` or `members` setting changed, an optimizer part added
    or removed.
    """
    problems = []
    old, new = saved.settings.get("model"), now.settings.get("model")
    if old is not None and new is not None and old != new:
        problems.append(Problem(ProblemKind.MODEL, "model", old, new))
    if isinstance(saved.splits, dict) and now.splits is not None and saved.splits != now.splits:
        problems.append(Problem(ProblemKind.SPLITS, "splits", saved.splits, now.splits))
    if now.privacy is not None:
        p = now.privacy
        try:
            privacy.check_record(
                saved.privacy, steps=steps, sample_rate=p.get("sample_rate"), delta=p.get("delta"),
                max_norm=p.get("max_grad_norm"), noise_multiplier=p.get("noise_multiplier"),
                accountant=p.get("accountant"),
            )  # fmt: skip
        except ValueError as exc:
            problems.append(Problem(ProblemKind.PRIVACY, "privacy", saved.privacy, p, str(exc)))
    if saved.privacy is not None and None not in (saved.batch_size, now.batch_size):
        if saved.batch_size != now.batch_size:
            problems.append(Problem(ProblemKind.SAMPLING, "batch_size", saved.batch_size, now.batch_size))
    fixed = {ProblemKind.SETTING: (saved.held, now.held), ProblemKind.MEMBERS: (saved.members, now.members)}
    for kind, (was, will) in fixed.items():
        problems += [Problem(kind, k, was[k], v) for k, v in will.items() if k in was and was[k] != v]
    for k, (value, part) in now.parts.items():
        if k in saved.parts and saved.parts[k][1] != part:
            kind = ProblemKind.PART_ADDED if part else ProblemKind.PART_REMOVED
            problems.append(Problem(kind, k, saved.parts[k][0], value))
    return [p for i, p in enumerate(problems) if p.key not in {q.key for q in problems[:i]}]


def refuse(path: Path, problems: list[Problem]) -> None:
    """The first of `problems` raised as its error (`Problem.error`), if any."""
    if problems:
        raise problems[0].error(path)


def read_record(path: Path) -> RunRecord:
    """The run record in `path`'s header (the state is not read); CheckpointError for a bad one."""
    try:
        return RunRecord.from_meta(checkpoint.read_metadata(path))
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"{display(path)}: not a valid resume point: {exc}") from None


def resume_path(out: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (`auto` without one)."""
    if not resume:
        return None
    if resume == "auto":
        # the run's own resume point: refused before it is read when it (or checkpoints/) is a
        # link (into another run, say); any other kind of file is the reader's to refuse
        p = out / "checkpoints" / LAST
        for path in (p.parent, p):
            st = lstat(path)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise RunError(kind="link", path=path)
        return p if p.exists() else None
    p = Path(resume)
    try:
        mode = os.stat(p).st_mode
    except OSError:
        raise RunError(kind="no_checkpoint", resume=str(resume)) from None
    if not stat.S_ISREG(mode):
        raise RunError(kind="checkpoint_not_regular", resume=str(resume), what=describe(mode))
    return p


def _is_int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_nums(x: Any) -> bool:
    """A number, or a non-empty list of them (an ensemble's, one per member)."""
    return _is_num(x) or (isinstance(x, list) and bool(x) and all(_is_num(v) for v in x))


def _is_lr(x: Any) -> bool:
    return _is_nums(x) and all(v > 0 for v in (x if isinstance(x, list) else [x]))


def _is_encoded_float(x: Any) -> bool:  # callbacks.encode_float's forms
    return x is None or _is_num(x) or x in ("nan", "inf", "-inf")


# Callback state keys with a known meaning, whatever the callback: what each must hold.
_CB_FIELDS: dict[str, Callable[[Any], bool]] = {
    "best": _is_encoded_float,
    "lr": lambda x: _is_num(x) and x > 0,
    "best_epoch": lambda x: x is None or _is_int(x, 0),
    "total_epochs": lambda x: x is None or _is_int(x, 0),
    "wait": lambda x: _is_int(x, 0),
    "num_bad_epochs": lambda x: _is_int(x, 0),
    "cooldown_counter": lambda x: _is_int(x, 0),
    "kept": lambda x: (
        isinstance(x, list)
        and all(
            isinstance(e, list) and len(e) == 2 and _is_int(e[0], 1) and _is_encoded_float(e[1]) for e in x
        )
    ),
    "history": lambda x: _is_history(x),
}
_SUM_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32"})


def _is_history(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(r, dict) and _is_int(r.get("epoch"), 1) for r in x)


def _in_epoch_problem(x: Any) -> str | None:
    if not isinstance(x, dict):
        return "is not an object"
    if not (
        isinstance(x.get("sums"), dict)
        and all(_is_nums(v) for v in x["sums"].values())
        and isinstance(x.get("dtypes"), dict)
        and set(x["dtypes"]) == set(x["sums"])
        and all(v in _SUM_DTYPES for v in x["dtypes"].values())
    ):
        return "has malformed sums or dtypes"
    checks = {
        "epoch": _is_int(x.get("epoch"), 1),
        "batch": _is_int(x.get("batch"), 0),
        "first_bad": _is_int(x.get("first_bad"), -1),
        "elapsed": _is_num(x.get("elapsed")) and x["elapsed"] >= 0,
        "batching": x.get("batching") is None or isinstance(x.get("batching"), dict),
        "data_state": x.get("data_state") is None or isinstance(x.get("data_state"), dict),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"has a missing or malformed {', '.join(bad)}" if bad else None


def _check_metadata(meta: Mapping[str, Any], callbacks: Sequence[Any]) -> str | None:
    """What is wrong with a resume point's metadata (types and ranges of every field), or None."""
    if "epoch" in meta and not _is_int(meta["epoch"], 0):
        return f"epoch must be an integer >= 0, not {short_repr(meta['epoch'])}"
    if meta.get("lr") is not None and not _is_lr(meta["lr"]):
        return f"lr must be a finite number > 0, not {short_repr(meta['lr'])}"
    if meta.get("in_epoch") is not None:
        problem = _in_epoch_problem(meta["in_epoch"])
        if problem:
            return f"in_epoch {problem}"
        if "epoch" in meta and meta["in_epoch"]["epoch"] != meta["epoch"] + 1:
            return "in_epoch.epoch must be the epoch after the last finished one"
    if meta.get("data_state") is not None and not isinstance(meta["data_state"], dict):
        return f"data_state must be an object, not {short_repr(meta['data_state'])}"
    if "rng_states" in meta and rngs.check(meta["rng_states"]):
        return f"rng_states {rngs.check(meta['rng_states'])}"
    if "history" in meta and not _is_history(meta["history"]):
        return "history must be a list of records with an epoch >= 1"
    saved = meta.get("callbacks", {})
    if not isinstance(saved, dict):
        return f"callbacks must be an object of callback states, not {short_repr(saved)}"
    for cb in callbacks:
        if cb.name not in saved:
            continue
        state, fresh = saved[cb.name], cb.init()
        if not isinstance(state, dict) or (isinstance(fresh, dict) and set(fresh) - set(state)):
            return f"the state of callback {cb.name} does not have the keys {sorted(fresh)}"
        bad = [k for k, ok in _CB_FIELDS.items() if k in state and k in fresh and not ok(state[k])]
        if bad:
            return f"the state of callback {cb.name} has a malformed {', '.join(bad)}"
    return None


# optimizer hyperparameters a loaded state may hold, and the range each must be in
_HYPER_RANGES: dict[str, Callable[[float], bool]] = {
    "lr": lambda v: v > 0,
    "weight_decay": lambda v: v >= 0,
    "momentum": lambda v: 0 <= v < 1,
    "dampening": lambda v: 0 <= v <= 1,
    "max_norm": lambda v: v > 0,
    "decay": lambda v: 0 <= v <= 1,
}


def _check_state(st: TrainState) -> str | None:
    """What is out of range in a loaded state's scalars (finiteness was checked on load), or None."""
    # an ensemble's scalars are [K], one per member: each must be in range
    if int(st.step.min()) < 0:
        return f"step must be >= 0, not {int(st.step.min())}"
    for name, value in optim.hyperparams(st.opt_state).items():
        ok = _HYPER_RANGES.get(name)
        bad = [v for v in value.reshape(-1).tolist() if ok is not None and not ok(v)]
        if bad:
            return f"the optimizer's {name} {bad[0]} is out of range"
    return None


def resume_point(
    resume: str | Path | ResumePoint | None, out: Path | None, template: TrainState,
    callbacks: Sequence[Any], log: Any, now: RunRecord | None = None,
) -> ResumePoint | None:  # fmt: skip
    """Where a run continues: `resume` ("auto": the run directory `out`'s last.safetensors, if
    any; a path) loaded (`load`, checked against `now`), or None to start fresh. A point
    already loaded is returned as it is, once checked against `now`."""
    if isinstance(resume, ResumePoint):
        if now is not None:
            refuse(resume.path, compatible(resume.record, now, steps=int(resume.state.step.reshape(-1)[0])))
        return resume
    if resume is None:
        return None
    if resume == "auto" and out is None:
        raise RunError("resume='auto' needs a run_dir to look in")
    path = resume_path(out or Path("."), resume)
    if path is None:
        log.info(f"no checkpoint in {out / 'checkpoints' if out else '.'}; starting fresh")
        return None
    return load(path, template, callbacks, now)


def load(
    path: str | Path, template: TrainState, callbacks: Sequence[Any] = (), now: RunRecord | None = None
) -> ResumePoint:
    """The resume point stored in `path`: its state validated against `template`, its record
    and scalars checked (else a one-line CheckpointError); callbacks without a saved state get
    `init()`. With `now`, `compatible`'s first problem is raised, before the state is read and
    again with its step count.
    """
    path = Path(path)
    if now is not None:
        refuse(path, compatible(read_record(path), now))
    st, meta = checkpoint.load_state(path, template)
    try:
        record = RunRecord.from_meta(meta, callbacks)
        problem = _check_state(st)
    except ValueError as exc:
        problem = str(exc)
    if problem:
        raise checkpoint.CheckpointError(f"{display(path)}: not a valid resume point: {problem}")
    if now is not None:
        refuse(path, compatible(record, now, steps=int(st.step.reshape(-1)[0])))
    cb_states = {cb.name: record.callbacks.get(cb.name, cb.init()) for cb in callbacks}
    return ResumePoint(path=path, state=st, cb_states=cb_states, record=record)


def host_lr(opt_state: Any) -> float | list[float] | None:
    """The optimizer's learning rate as the float it was set from (float32 0.00100000004 ->
    0.001), None if it has none; a stacked state's one float when all members share it, else
    a list."""
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
    saved, now = in_epoch.get("batching"), dict(batching or {})
    if saved is not None and batching is not None and saved != now:
        diff = ", ".join(f"{k} {saved.get(k)} (now {now.get(k)})" for k in now if saved.get(k) != now.get(k))
        raise RunError(kind="other_batches", diff=diff)
