"""The run directory: lock, preparation, stale temp files, logger, JSON, plots, TensorBoard.

Everything `fit` writes goes through a `RunDir`; without one it writes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_func import atomic, checkpoint
from fashion_func import callbacks as cbs
from fashion_func.safeio import describe, display, os_reason

__all__ = [
    "BEST",
    "LAST",
    "MARKER",
    "RUN_ARTIFACTS",
    "RunDir",
    "RunError",
    "member_folder",
    "plot_history",
    "prepare_out_dir",
    "run_lock",
    "write_json",
]

LAST = "last.safetensors"
BEST = "best.safetensors"
RUN_ARTIFACTS = (
    "config.json",
    "train.log",
    "summary.txt",
    "history.json",
    "loss.png",
    "accuracy.png",
    "tensorboard",
    "checkpoints",
    "members.json",
)


class RunError(Exception):
    """The run cannot start or go on (a user-facing problem: exit code 2)."""


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """A run file that cannot be written stops the run: `atomic.WriteError` becomes `RunError`."""
    try:
        yield
    except atomic.WriteError as e:
        raise RunError(str(e)) from e


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically (RunError when it cannot be)."""
    with _writing():
        atomic.write_json(path, obj, what="run file")


def plot_history(records: Sequence[dict[str, Any]], out: Path) -> None:
    """loss.png and accuracy.png (train and validation curves per epoch) into `out` (RunError when
    they cannot be written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    for name, ylabel in (("loss", "loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for split in ("train", "val"):
            key = f"{split}_{name}"
            if any(key in r for r in records):
                values = [cbs.decode_float(r.get(key)) for r in records]
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 ticks
        ax.set_ylabel(ylabel)
        ax.set_title(f"{'Loss' if name == 'loss' else 'Accuracy'} per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
        with _writing():
            atomic.write_figure(out / ("loss.png" if name == "loss" else "accuracy.png"), fig, what="plot")


MARKER = ".fashion-func-run"  # JSON {"run_id": ..., "created": ...}: this directory is a run's
LOCK = ".lock"
_WEIGHT_FILE = re.compile(r"(last|best|epoch-\d+)\.safetensors")
_EVENTS_FILE = re.compile(r"events\.out\.tfevents\..+")
_MEMBER_DIR = re.compile(r"member-\d+")  # checkpoints/member-<k>/: an ensemble member's weights
_TEMP = re.compile(r"\.(?P<name>.+)\.\d+\.tmp")  # atomic.write_bytes' temp names: .<name>.<pid>.tmp
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC


class _Lock:
    """`<out>/.lock`, held with flock for the run.

    Opened without following links and without blocking (a FIFO or a symlink planted there
    is refused, never opened through), and only a regular file with one link is used. The
    pid goes in only once the caller has accepted the directory (`claim`), so a refused run
    changes nothing in it.
    """

    def __init__(self, out: Path) -> None:
        self.path, self.created = out / LOCK, False
        try:
            try:
                self.fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
                self.created = True
            except FileExistsError:
                self.fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise RunError(
                    f"{display(self.path)} is a directory, not a lock file of ours; remove it"
                ) from None
            if exc.errno == errno.ELOOP:
                raise RunError(
                    f"{display(self.path)} is a symbolic link; remove it (it is never followed)"
                ) from None
            raise RunError(f"cannot write to run directory {display(out)}: {os_reason(exc)}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(self.fd)
            what = describe(st.st_mode) if not stat.S_ISREG(st.st_mode) else "a file with other hard links"
            raise RunError(f"{display(self.path)} is {what}, not a lock file of ours; remove it")
        self.previous = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunError(
                f"run directory {display(out)} is in use by process {self.previous or '(unknown)'}; "
                "wait for it to finish or use another --out"
            ) from None

    def claim(self) -> None:
        """Record our pid (the directory was accepted as a run directory)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self, *, remove: bool = False) -> None:
        """Unlock; a clean exit empties the file (a pid found later was left by a killed run)."""
        try:
            if remove and self.created:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[str | None]:
    """Hold `<out>/.lock` for the run; a second run into the same directory is refused.

    flock is released by the kernel when the holder dies, so a lock left by a killed
    run is never mistaken for a live one. Yields the pid a dead holder left in the file
    (a stale lock, now taken over), or None.
    """
    lock = _Lock(out)
    try:
        lock.claim()
        yield lock.previous
    finally:
        lock.release()


def _our_temp(directory: Path, name: str) -> bool:
    m = _TEMP.fullmatch(name)
    if m is None:
        return False
    inner = m.group("name")
    if directory.name == "checkpoints" or _MEMBER_DIR.fullmatch(directory.name):
        return bool(_WEIGHT_FILE.fullmatch(inner))
    return inner in RUN_ARTIFACTS or inner == MARKER


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temp files a killed run left mid-write; we hold the lock.

    Only the names our writer makes (`.<file>.<pid>.tmp` for a file a run writes) and only
    regular files: a user's own `.notes.tmp` is not ours to delete.
    """
    stale = []
    for d in (out, out / "checkpoints", *_member_dirs(out / "checkpoints")):
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if _our_temp(d, p.name) and stat.S_ISREG(p.lstat().st_mode):
                p.unlink(missing_ok=True)
                stale.append(p)
    return stale


def _member_dirs(checkpoints: Path) -> list[Path]:
    """The ensemble members' folders in `checkpoints` that are real folders (links excluded)."""
    if not checkpoints.is_dir() or checkpoints.is_symlink():
        return []
    return sorted(
        p
        for p in checkpoints.iterdir()
        if _MEMBER_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )


def member_folder(checkpoints: Path, member: int) -> Path:
    """`checkpoints/member-<kk>/`, created if missing; RunError (one line) for a link or a file
    of another kind there: a run's files are never reached through a link."""
    folder = checkpoints / f"member-{member:02d}"
    st = _lstat(folder)
    if st is None:
        folder.mkdir()
    elif not stat.S_ISDIR(st.st_mode):
        raise RunError(f"{display(folder)} is {describe(st.st_mode)}, not the member's folder; remove it")
    return folder


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _removable(out: Path) -> list[Path]:
    """What `--overwrite` deletes: the files a run writes, found without following any link.

    RunError, before anything is deleted, for a symbolic link or a file of another kind
    under a name a run writes.
    """
    found: list[Path] = []
    for name in RUN_ARTIFACTS:
        p = out / name
        st = _lstat(p)
        if st is None:
            continue
        if name in ("checkpoints", "tensorboard"):
            if not stat.S_ISDIR(st.st_mode):
                raise RunError(
                    f"--overwrite: {display(p)} is {describe(st.st_mode)}, not the run's folder; remove it"
                )
            pattern = _WEIGHT_FILE if name == "checkpoints" else _EVENTS_FILE
            if name == "checkpoints":
                found += _removable_members(p)
            for child in sorted(p.iterdir()):
                if pattern.fullmatch(child.name) or _our_temp(p, child.name):
                    cst = child.lstat()
                    if not stat.S_ISREG(cst.st_mode):
                        raise RunError(f"--overwrite: {display(child)} is {describe(cst.st_mode)}; remove it")
                    found.append(child)
            found.append(p)  # removed at the end if nothing of the user's is left in it
        elif stat.S_ISREG(st.st_mode):
            found.append(p)
        else:
            raise RunError(
                f"--overwrite: {display(p)} is {describe(st.st_mode)}, not a run's file; remove it"
            )
    return found


def _removable_members(checkpoints: Path) -> list[Path]:
    """The ensemble members' weight files and folders under `checkpoints` (never through a link)."""
    found: list[Path] = []
    for folder in sorted(checkpoints.iterdir()):
        if not _MEMBER_DIR.fullmatch(folder.name):
            continue
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise RunError(f"--overwrite: {display(folder)} is {describe(st.st_mode)}; remove it")
        for child in sorted(folder.iterdir()):
            if _WEIGHT_FILE.fullmatch(child.name) or _our_temp(folder, child.name):
                if not stat.S_ISREG(child.lstat().st_mode):
                    raise RunError(
                        f"--overwrite: {display(child)} is {describe(child.lstat().st_mode)}; remove it"
                    )
                found.append(child)
        found.append(folder)  # removed if nothing of the user's is left in it
    return found


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):  # a user's own file in it: keep the folder
                p.rmdir()
        else:
            p.unlink(missing_ok=True)


def _refuse_links(out: Path) -> None:
    """A run's files are never reached through a symbolic link (it could lead out of `out`)."""
    checkpoints = out / "checkpoints"
    members = [] if _lstat(checkpoints) is None or checkpoints.is_symlink() or not checkpoints.is_dir() else [
        p for p in checkpoints.iterdir() if _MEMBER_DIR.fullmatch(p.name)
    ]  # fmt: skip
    for path in [*(out / name for name in RUN_ARTIFACTS), *members]:
        st = _lstat(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise RunError(
                f"{display(path)} is a symbolic link; a run never follows links out of its "
                "directory: remove it or use another --out"
            )


def _looks_like_legacy_run(out: Path) -> bool:
    """A run directory written before markers existed: its last.safetensors is one of our states."""
    last = out / "checkpoints" / LAST
    st = _lstat(last)
    if st is None or not stat.S_ISREG(st.st_mode):
        return False
    try:
        return checkpoint.inspect(last).format == checkpoint.STATE_FORMAT
    except checkpoint.CheckpointError:
        return False


def _claim_directory(out: Path) -> None:
    """Accept `out` as ours, writing the marker, or refuse it (RunError).

    Ours: a directory with our marker, an empty one (a `.lock` aside), or a run directory
    written before markers existed. Anything else holds someone else's files.
    """
    marker = out / MARKER
    st = _lstat(marker)
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise RunError(f"{display(marker)} is {describe(st.st_mode)}, not our marker; remove it")
        return
    others = [p.name for p in out.iterdir() if p.name != LOCK and not _our_temp(out, p.name)]
    if others and not _looks_like_legacy_run(out):
        raise RunError(
            f"--out {display(out)} holds files that are not a fashion_func run's (no {MARKER} marker); "
            "use a new or empty directory"
        )
    identity = {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(marker, identity)


def _resumes_elsewhere(out: Path, resume: Any) -> bool:
    """`resume` names a checkpoint other than `out`'s own last.safetensors."""
    if not resume or resume == "auto":
        return False
    own = out / "checkpoints" / LAST
    try:
        return not os.path.samefile(resume, own)
    except OSError:
        return True


def prepare_out_dir(out: Path, *, resume: Any, overwrite: bool) -> None:
    """Claim the run directory; refuse to reuse one unless resuming it or overwriting.

    `resume` "auto" continues `out`'s own run; a checkpoint path continues in `out` only when
    it is `out`'s own last.safetensors or `out` holds no run (`overwrite` clears it first, a
    checkpoint inside it excepted). `overwrite` deletes only the files a run writes.
    """
    _claim_directory(out)
    _refuse_links(out)
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    elsewhere = _resumes_elsewhere(out, resume)
    if existing and elsewhere:
        if not overwrite:
            raise RunError(
                f"run directory {display(out)} already holds another run; --resume {display(str(resume))} "
                "continues only in its own run directory or a new --out (or pass --overwrite)"
            )
        if Path(resume).resolve().is_relative_to(out.resolve()):
            raise RunError(f"--overwrite would delete {display(str(resume))}, the checkpoint being resumed")
    if existing and not resume and not overwrite:
        raise RunError(
            f"run directory {display(out)} already holds a run; "
            "pass --resume auto to continue it or --overwrite"
        )
    if overwrite and (not resume or elsewhere):
        _remove(_removable(out))
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to run directory {display(out)}: {os_reason(exc)}") from None


class _Escaped(logging.Formatter):
    """Messages with terminal control characters and undecodable bytes escaped (`display`)."""

    def format(self, record: logging.LogRecord) -> str:
        return display(super().format(record))


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """stdout that may go away: once its reader closes the pipe (`| head`), stop writing to it
    (train.log keeps everything) instead of printing a "Logging error" per message."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.closed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.closed:
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
            self.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.closed = True


def _make_logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"fashion_func.run.{out.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    _close_logger(log)
    log_path = out / "train.log"
    st = _lstat(log_path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RunError(f"{display(log_path)} is {describe(st.st_mode)}, not a log file; remove it")
    try:
        fh = logging.FileHandler(log_path, encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        raise RunError(f"cannot write {display(log_path)}: {os_reason(exc)}") from None
    fh.setFormatter(_Escaped("%(asctime)s %(levelname)s %(message)s"))
    ch = _Stdout()
    ch.setFormatter(_Escaped("%(message)s"))
    log.addHandler(fh)
    log.addHandler(ch)
    return log


def _close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


@dataclass(frozen=True)
class _Snapshot:
    """What a run directory held when a run opened it, to undo a run that fails to start."""

    names: frozenset[str]  # in out, out/checkpoints and its member-<k> folders, relative to out
    last: tuple[int, int] | None  # last.safetensors' (inode, mtime): a new save changes it

    @classmethod
    def take(cls, out: Path) -> _Snapshot:
        names = {p.name for p in out.iterdir()}
        ck = out / "checkpoints"
        if ck.is_dir() and not ck.is_symlink():
            names |= {f"checkpoints/{p.name}" for p in ck.iterdir()}
        for folder in _member_dirs(ck):  # an ensemble's per-member weights
            names |= {f"checkpoints/{folder.name}/{p.name}" for p in folder.iterdir()}
        return cls(frozenset(names), _identity(ck / LAST))

    def undo(self, out: Path) -> None:
        """Remove what a run that saved no resume point added (it failed before training)."""
        if _identity(out / "checkpoints" / LAST) != self.last:
            return  # a resume point was saved: keep everything that goes with it
        with contextlib.suppress(OSError, RunError):
            new = [p for p in _removable(out) if _rel(out, p) not in self.names]
            marker = out / MARKER
            _remove([*new, *([marker] if MARKER not in self.names else [])])


def _identity(path: Path) -> tuple[int, int] | None:
    st = _lstat(path)
    return None if st is None else (st.st_ino, st.st_mtime_ns)


def _rel(out: Path, p: Path) -> str:
    return p.relative_to(out).as_posix()


def _missing_parents(out: Path) -> list[Path]:
    """`out` and its ancestors that do not exist yet, deepest first (what mkdir creates)."""
    missing = []
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


@dataclass
class RunDir:
    """An opened, locked run directory: where `fit` writes its files, and its logger.

    Open it with `RunDir.open(path, resume=..., overwrite=...)` (a context manager); `fit`
    does so itself when handed a path.
    """

    path: Path
    log: logging.Logger
    _writer: Any = field(default=None, repr=False)

    @property
    def checkpoints(self) -> Path:
        """`<run>/checkpoints`."""
        return self.path / "checkpoints"

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, path: str | os.PathLike[str], *, resume: Any = None, overwrite: bool = False
    ) -> Iterator[RunDir]:
        """Create and lock `path`, clean what a killed run left, and log to `train.log`.

        A directory holding a run is refused unless `resume` (continue it) or `overwrite`
        (delete its files first) is given; a directory locked by a live run is refused always.
        """
        out = Path(path)
        if out.resolve() == Path(out.anchor or "/").resolve():
            raise RunError(f"--out {display(out)} is the root directory; give a run directory of its own")
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {display(out)} exists and is not a directory")
        created = _missing_parents(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create run directory {display(out)}: {os_reason(exc)}") from None
        failed = True
        try:
            # Lock before looking inside: a refused second run must not touch, let alone
            # --overwrite, the files of the run that holds the directory.
            lock = _Lock(out)
            try:
                before = _Snapshot.take(out)
                try:
                    prepare_out_dir(out, resume=resume, overwrite=overwrite)
                    lock.claim()
                    with cls._opened(out, lock.previous) as run:
                        yield run
                except BaseException:
                    before.undo(out)  # a run that fails before saving anything leaves nothing
                    raise
                failed = False
            finally:
                lock.release(remove=failed)
        finally:
            if failed:
                for p in created:  # ... not even the directory it created
                    with contextlib.suppress(OSError):
                        p.rmdir()

    @classmethod
    @contextlib.contextmanager
    def _opened(cls, out: Path, stale_lock: str | None) -> Iterator[RunDir]:
        run = cls(out, _make_logger(out))
        try:
            if stale_lock and stale_lock != str(os.getpid()):
                run.log.info(
                    f"process {stale_lock} died holding {out / '.lock'} (killed?); taking the lock over"
                )
            for p in remove_stale_temps(out):
                run.log.info(f"removed {p}, left by an interrupted write")
            yield run
        finally:
            run.close_tensorboard()
            _close_logger(run.log)

    def write_json(self, name: str, obj: Any) -> None:
        """`<run>/<name>` as JSON, atomically."""
        write_json(self.path / name, obj)

    def write_bytes(self, name: str, data: bytes) -> None:
        """`<run>/<name>`, atomically (RunError when it cannot be)."""
        with _writing():
            atomic.write_bytes(self.path / name, data, what="run file")

    def tensorboard(self, purge_step: int) -> Any:
        """The run's TensorBoard `SummaryWriter` (`<run>/tensorboard`), made on first use.

        purge_step: events at steps >= it, left by an earlier attempt (one that died after
        logging an epoch but before its last.safetensors), are dropped, not shown twice.
        """
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.path / "tensorboard"
            try:
                self._writer = SummaryWriter(str(folder), purge_step=purge_step)
            except OSError as exc:  # disk full, a file in the folder's place, ...
                why = os_reason(exc)
                raise RunError(f"cannot write TensorBoard events to {display(folder)}: {why}") from None
        return self._writer

    def log_scalars(self, scalars: dict[str, float], step: int, purge_step: int) -> None:
        """Write `scalars` at `step` to TensorBoard and flush; RunError when that fails."""
        writer = self.tensorboard(purge_step)
        try:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            writer.flush()
        except OSError as exc:
            why = os_reason(exc)
            raise RunError(f"cannot write TensorBoard events to {display(self.path)}: {why}") from None

    def close_tensorboard(self) -> None:
        """Flush and close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(OSError):  # closing after a failure: the error is already told
                writer.close()
