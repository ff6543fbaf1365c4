"""SIGINT / SIGTERM during a run: a flag the loop checks after each step, and `Interrupted`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["Interrupted"]


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; the state was saved. `code` is the exit status to use."""

    def __init__(self, signum: int, path: Path, *, saved: bool = True) -> None:
        self.signum = signum
        self.path = path
        self.code = 128 + signum
        what = "state saved to" if saved else "diverged state not saved; the last good one is in"
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {what} {path}")


@contextlib.contextmanager
def signals_to_flag(enabled: bool) -> Iterator[dict[str, int | None]]:
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
