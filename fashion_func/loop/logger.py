"""The run's logger: train.log and stdout, control characters escaped."""

from __future__ import annotations

import logging
import stat
import sys
from pathlib import Path

from fashion_func.loop.artifacts import lstat
from fashion_func.loop.errors import RunError
from fashion_func.safeio import describe, display, os_reason

__all__: list[str] = []


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


def make_logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"fashion_func.run.{out.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    close_logger(log)
    log_path = out / "train.log"
    st = lstat(log_path)
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


def close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
