"""The batches of an epoch, from what the user passed as `train_data` / `val_data`."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Data", "epoch_batches", "num_batches"]

Data = Iterable[Any] | Callable[..., Iterable[Any]]


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


def num_batches(source: Data) -> int | None:
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None
