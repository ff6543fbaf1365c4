"""The environment values the package reads, parsed and range-checked like flags.

Every variable read anywhere in `fashion_func` is listed in `VARIABLES` (name -> what it
holds); each is read through one of the functions here, which give the value, or None when
the variable is unset (an empty value counts as unset), or raise `ValueError` with one line
naming the variable, what it got and what it takes. Callers turn that into their own error
(DataError, WorldError, RunError), so a bad value is a usage error, never a traceback.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from fashion_func.safeio import short_repr

__all__ = ["VARIABLES"]

VARIABLES: dict[str, str] = {
    "FASHION_MNIST_DIR": "directory holding the four Fashion-MNIST IDX files (fashion_func.data)",
    "FASHION_FUNC_DIST_TIMEOUT": "seconds a collective waits for the other processes (fashion-func train)",
    "RANK": "this process's rank, set by torchrun",
    "LOCAL_RANK": "this process's rank on its machine, set by torchrun",
    "WORLD_SIZE": "the number of processes, set by torchrun",
    "MASTER_ADDR": "the rendezvous host, set by torchrun",
    "MASTER_PORT": "the rendezvous port, set by torchrun",
}

_INT = re.compile(r"[0-9]{1,19}")  # ASCII digits only: int() also takes "1_0", "٣" and " 3 "
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def _raw(name: str) -> str | None:
    if name not in VARIABLES:  # every variable read is in the table (tests go over it)
        raise KeyError(f"{name} is not one of the environment variables fashion_func reads")
    value = os.environ.get(name)
    return value if value else None


def number(name: str, *, lo: float, hi: float) -> float | None:
    """A finite number of `name` in [lo, hi], or None when unset."""
    if (text := _raw(name)) is None:
        return None
    try:
        value = float(text.strip()) if _PRINTABLE.fullmatch(text.strip() or "x") else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, got {short_repr(text)}")
    return value


def integer(name: str, *, lo: int, hi: int) -> int | None:
    """An integer (plain ASCII digits) of `name` in [lo, hi], or None when unset."""
    if (text := _raw(name)) is None:
        return None
    value = int(text) if _INT.fullmatch(text) else None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {short_repr(text)}")
    return value


def text(name: str, *, limit: int = 255) -> str | None:
    """A printable ASCII word (no spaces or control characters) of at most `limit` characters."""
    if (value := _raw(name)) is None:
        return None
    if len(value) > limit or not _PRINTABLE.fullmatch(value):
        raise ValueError(
            f"{name} must be a printable word of at most {limit} characters, got {short_repr(value)}"
        )
    return value


def directory(name: str) -> Path | None:
    """An existing directory named by `name`, or None when unset."""
    if (value := _raw(name)) is None:
        return None
    if "\x00" in value:
        raise ValueError(f"{name} must name a directory, got {short_repr(value)}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"{name}={short_repr(value)} does not exist or is not a directory")
    return path
