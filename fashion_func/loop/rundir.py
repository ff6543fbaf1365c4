"""The run directory: claiming it, the overwrite policy, and `RunDir` (files, logger, TensorBoard).
Everything `fit` writes goes through a `RunDir`; without one it writes nothing. The files a run
writes are listed in `artifacts.RUN_ARTIFACTS`; the lock is `lock`, the logger `logger`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_func import atomic
from fashion_func.loop.artifacts import (
    FOLDERS,
    LAST,
    MARKER,
    RUN_ARTIFACTS,
    Snapshot,
    lstat,
    member_folder,
    our_temp,
    refuse_links,
    removable,
    remove,
    remove_stale_temps,
)
from fashion_func.loop.errors import RunError, writing
from fashion_func.loop.lock import LOCK, Lock
from fashion_func.loop.logger import close_logger, make_logger
from fashion_func.safeio import describe, display, os_reason

__all__ = ["RunError"]


def _claim_directory(out: Path) -> None:
    """Accept `out` as ours, writing the marker, or refuse it (RunError): ours is a directory with our
    marker, or an empty one (a `.lock` aside); anything else holds someone else's files."""
    marker = out / MARKER
    st = lstat(marker)
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise RunError(f"{display(marker)} is {describe(st.st_mode)}, not our marker; remove it")
        return
    others = [p.name for p in out.iterdir() if p.name != LOCK and not our_temp(out, p.name)]
    if others:
        raise RunError(kind="not_ours", out=out, marker=MARKER)
    identity = {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with writing():
        atomic.write_json(marker, identity, what="run file")


def _resumes_elsewhere(out: Path, resume: Any) -> bool:
    """`resume` names a checkpoint other than `out`'s own last.safetensors."""
    if not resume or resume == "auto":
        return False
    try:
        return not os.path.samefile(resume, out / "checkpoints" / LAST)
    except OSError:
        return True


def prepare_out_dir(out: Path, *, resume: Any, overwrite: bool) -> None:
    """Claim the run directory; refuse to reuse one unless resuming it or overwriting. `resume`
    "auto" continues `out`'s own run; a checkpoint path continues in `out` only when it is `out`'s
    own last.safetensors or `out` holds no run (`overwrite` clears it first, a checkpoint inside it
    excepted). `overwrite` deletes only the files a run writes."""
    _claim_directory(out)
    refuse_links(out)
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    elsewhere = _resumes_elsewhere(out, resume)
    if existing and elsewhere:
        if not overwrite:
            raise RunError(kind="resumes_elsewhere", out=out, resume=str(resume))
        if Path(resume).resolve().is_relative_to(out.resolve()):
            raise RunError(kind="overwrite_resumed", resume=str(resume))
    if existing and not resume and not overwrite:
        raise RunError(kind="holds_run", out=out)
    if overwrite and (not resume or elsewhere):
        remove(removable(out))
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to run directory {display(out)}: {os_reason(exc)}") from None


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
    """An opened, locked run directory: where `fit` writes its files, and its logger. Open it with
    `RunDir.open(path, resume=..., overwrite=...)` (a context manager); `fit` does so when handed a path."""

    path: Path
    log: logging.Logger
    _writer: Any = field(default=None, repr=False)
    # the identity of each folder the run writes into, recorded when the run opened it (or
    # made it): every write checks its folder is still that one, not a link swapped in since
    _folders: dict[Path, atomic.FolderId] = field(default_factory=dict, repr=False)

    @property
    def checkpoints(self) -> Path:
        """`<run>/checkpoints`."""
        return self.path / "checkpoints"

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, path: str | os.PathLike[str], *, resume: Any = None, overwrite: bool = False
    ) -> Iterator[RunDir]:
        """Create and lock `path`, clean what a killed run left, and log to `train.log`. A directory
        holding a run is refused unless `resume` (continue it) or `overwrite` (delete its files first)
        is given; one locked by a live run is refused always."""
        out = Path(path)
        if out.resolve() == Path(out.anchor or "/").resolve():
            raise RunError(kind="root", out=out)
        if out.exists() and not out.is_dir():
            raise RunError(kind="not_a_directory", out=out)
        created = _missing_parents(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create run directory {display(out)}: {os_reason(exc)}") from None
        failed = True
        try:
            # Lock before looking inside: a refused second run must not touch, let alone
            # --overwrite, the files of the run that holds the directory.
            lock = Lock(out)
            try:
                before = Snapshot.take(out)
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
        run = cls(out, make_logger(out))
        try:
            run._folders.update(
                {out: atomic.folder_id(out), run.checkpoints: atomic.folder_id(run.checkpoints)}
            )
            if stale_lock and stale_lock != str(os.getpid()):
                run.log.info(
                    f"process {stale_lock} died holding {out / '.lock'} (killed?); taking the lock over"
                )
            for p in remove_stale_temps(out):
                run.log.info(f"removed {p}, left by an interrupted write")
            yield run
        finally:
            run.close_tensorboard()
            close_logger(run.log)

    def same_folder(self, folder: Path) -> atomic.FolderId:
        """The identity `folder` (the run directory, `checkpoints/`, a member's) had when the run opened
        it, checked to be its identity still (RunError for one swapped for a link or another folder):
        pass it on to the write (`atomic.write_bytes(..., folder=)`), which checks again before its rename."""
        expected = self._folders[folder]
        st = lstat(folder)
        try:
            now = atomic.folder_id(folder)
        except OSError:
            now = None
        if now != expected or (folder != self.path and (st is None or stat.S_ISLNK(st.st_mode))):
            raise RunError(kind="replaced", folder=folder)
        return expected

    def checkpoint_folder(self, member: int | None = None) -> tuple[Path, atomic.FolderId]:
        """(`checkpoints/`, or member `member`'s `checkpoints/member-<kk>/`, made on first use;
        its identity), checked to be the folder the run opened (`same_folder`)."""
        checkpoints = self.checkpoints
        self.same_folder(checkpoints)
        if member is None:
            return checkpoints, self.same_folder(checkpoints)
        folder = member_folder(checkpoints, member)
        if folder not in self._folders:
            self.same_folder(checkpoints)  # still ours when the member's folder was made in it
            self._folders[folder] = atomic.folder_id(folder)
        return folder, self.same_folder(folder)

    def write_json(self, name: str, obj: Any) -> None:
        """`<run>/<name>` as JSON, atomically; `name` is one of `RUN_ARTIFACTS`."""
        path = self._artifact(name)
        with writing():
            atomic.write_json(path, obj, what="run file", folder=self.same_folder(self.path))

    def write_bytes(self, name: str, data: bytes) -> None:
        """`<run>/<name>`, atomically (RunError when it cannot be); `name` is one of `RUN_ARTIFACTS`."""
        path = self._artifact(name)
        with writing():
            atomic.write_bytes(path, data, what="run file", folder=self.same_folder(self.path))

    def _artifact(self, name: str) -> Path:
        # a name outside the list would be neither checked at start nor removed by overwrite
        if name not in RUN_ARTIFACTS or name in FOLDERS:
            raise ValueError(f"{name!r} is not one of the files a run writes (loop.RUN_ARTIFACTS)")
        return self.path / name

    def tensorboard(self, purge_step: int) -> Any:
        """The run's TensorBoard `SummaryWriter` (`<run>/tensorboard`), made on first use; events at
        steps >= `purge_step`, left by an attempt that died before its last.safetensors, are dropped."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.path / "tensorboard"
            self.same_folder(self.path)
            st = lstat(folder)  # made on first use, after the check at start: never through a link
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise RunError(kind="link", path=folder)
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
