"""The process's global random number generators, saved with a run's checkpoint and restored.

The library's own randomness is explicit (the state's seed and step), but a user's data
pipeline may draw from the global generators: a dataset whose `__getitem__` augments with
`torch.rand`, `numpy.random` or `random`. A run directory's `last.safetensors` records their
states beside the data source's position, so a resumed run draws what the uncut run drew (at
an epoch's end too, where torchdata draws one more seed from torch's as it loads the position).

Stored as JSON values in the checkpoint's metadata, nothing pickled: torch's states (CPU, and
each CUDA device's where CUDA is in use) are uint8 tensors (`batches.encode_state`); numpy's
legacy global MT19937 state is its 624 words and position; Python's `random` its 625 words.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fashion_func.loop.batches import decode_state, encode_state

__all__: list[str] = []


def capture() -> dict[str, Any]:
    """The global generators' states as JSON values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, words, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": encode_state(torch.get_rng_state()),
        "numpy": {
            "name": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "words": list(words), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # not initialised here to save it
        states["cuda"] = [encode_state(s) for s in torch.cuda.get_rng_state_all()]
    return states


def check(states: Any) -> str | None:
    """What is malformed in saved states (as `capture` writes them), or None."""
    if not isinstance(states, dict):
        return "is not an object"
    try:
        _setters(states)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"is malformed ({type(exc).__name__}: {exc})"
    return None


def _setters(states: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """What `restore` sets, by generator name: every state decoded and checked first (an error
    names the first malformed one); CUDA's only where the same number of devices is in use."""
    out: dict[str, Callable[[], None]] = {}
    if "torch" in states:
        t = decode_state(states["torch"])
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError("torch's state is not a uint8 tensor")
        out["torch"] = lambda: torch.set_rng_state(t)
    if "cuda" in states:
        cuda = [decode_state(s) for s in states["cuda"]]
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise TypeError("a CUDA state is not a uint8 tensor")
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            out["cuda"] = lambda: torch.cuda.set_rng_state_all(cuda)
    if "numpy" in states:
        n = states["numpy"]
        keys = np.asarray(n["keys"], dtype=np.uint32)
        if n["name"] != "MT19937" or keys.shape != (624,):
            raise ValueError("numpy's state is not an MT19937 state of 624 words")
        state = (n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["gauss"]))
        out["numpy"] = lambda: np.random.set_state(state)
    if "python" in states:
        p = states["python"]
        words = tuple(int(w) for w in p["words"])
        if len(words) != 625:
            raise ValueError("Python's random state is not 625 words")
        py_state = (int(p["version"]), words, None if p["gauss"] is None else float(p["gauss"]))
        out["random"] = lambda: random.setstate(py_state)
    return out


def restore(states: dict[str, Any]) -> list[str]:
    """Set the global generators to `states` (from `capture`); the names of those restored."""
    setters = _setters(states)
    for set_state in setters.values():
        set_state()
    return list(setters)
