"""The run directory: lock, preparation, stale temp files, logger, JSON, plots, TensorBoard.

Everything `fit` writes goes through a `RunDir`; without one it writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_func import callbacks as cbs
from fashion_func import checkpoint

__all__ = [
    "BEST",
    "LAST",
    "RUN_ARTIFACTS",
    "RunDir",
    "RunError",
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
)


class RunError(Exception):
    """The run cannot start or go on (a user-facing problem: exit code 2)."""


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically."""
    checkpoint.atomic_write(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def plot_history(records: Sequence[dict[str, Any]], out: Path) -> None:
    """loss.png and accuracy.png (train and validation curves per epoch) into `out`."""
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
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        checkpoint.atomic_write(out / ("loss.png" if name == "loss" else "accuracy.png"), buf.getvalue())


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[str | None]:
    """Hold `<out>/.lock` for the run; a second run into the same directory is refused.

    flock is released by the kernel when the holder dies, so a lock left by a killed
    run is never mistaken for a live one. Yields the pid a dead holder left in the file
    (a stale lock, now taken over), or None.
    """
    path = out / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"cannot write to run directory {out}: {exc.strerror}") from None
    try:
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip() or None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"run directory {out} is in use by process {previous or '(unknown)'}; "
                "wait for it to finish or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield previous
        finally:
            # a clean exit empties the file: a pid found in it later was left by a killed run
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temp files a killed run left mid-write (`.<name>.<pid>.tmp`); we hold the lock."""
    stale = [p for d in (out, out / "checkpoints") for p in d.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prepare_out_dir(out: Path, *, resume: Any, overwrite: bool) -> None:
    """Create the run directory; refuse to reuse one unless resuming or overwriting."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise RunError(
            f"run directory {out} already holds a run; pass --resume auto to continue it or --overwrite"
        )
    if overwrite and not resume:
        for name in existing:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to run directory {out}: {exc.strerror}") from None


def _make_logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"fashion_func.run.{out.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    _close_logger(log)
    fh = logging.FileHandler(out / "train.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    ch = logging.StreamHandler(sys.stdout)
    ch.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(fh)
    log.addHandler(ch)
    return log


def _close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


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
        if out.exists() and not out.is_dir():
            raise RunError(f"--out {out} exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create run directory {out}: {exc.strerror}") from None
        # Lock before looking inside: a refused second run must not touch, let alone
        # --overwrite, the files of the run that holds the directory.
        with run_lock(out) as stale_lock:
            prepare_out_dir(out, resume=resume, overwrite=overwrite)
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
        """`<run>/<name>`, atomically."""
        checkpoint.atomic_write(self.path / name, data)

    def tensorboard(self, purge_step: int) -> Any:
        """The run's TensorBoard `SummaryWriter` (`<run>/tensorboard`), made on first use.

        purge_step: events at steps >= it, left by an earlier attempt (one that died after
        logging an epoch but before its last.safetensors), are dropped, not shown twice.
        """
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=purge_step)
        return self._writer

    def close_tensorboard(self) -> None:
        """Flush and close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
