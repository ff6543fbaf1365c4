"""The run's user-facing error: `RunError` (exit code 2 on the command line)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fashion_func import atomic

__all__ = ["RunError", "writing"]


class RunError(Exception):
    """The run cannot start or go on (a user-facing problem: exit code 2)."""


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """A run file that cannot be written stops the run: `atomic.WriteError` becomes `RunError`."""
    try:
        yield
    except atomic.WriteError as e:
        raise RunError(str(e)) from e
