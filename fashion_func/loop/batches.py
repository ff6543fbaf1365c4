"""The batches of an epoch, from what the user passed as `train_data` / `val_data`."""

from __future__ import annotations

import base64
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__: list[str] = []

Data = Iterable[Any] | Callable[..., Iterable[Any]]


def _accepts_start(fn: Callable[..., Any]) -> bool:
    try:
        return "start" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def epoch_batches(source: Data, epoch: int, start: int = 0, state: Any = None) -> Iterator[Any]:
    """The batches of `epoch` from batch `start` on.

    `source` is a function `epoch -> iterable` (given `start=` too when it takes it, as
    `data.EpochBatches` does; otherwise the first `start` batches are drawn and dropped),
    or an iterable run through once per epoch (a `DataLoader`, a list of batches). `state`:
    a stateful source's `state_dict()` (`encode_state`d) taken at batch `start`, loaded first.
    """
    kind = resume_kind(source)
    if state is not None and kind == "state":
        source.load_state_dict(decode_state(state))  # type: ignore[union-attr]
        return iter(source)  # type: ignore[call-overload]
    if kind == "start":
        return iter(source(epoch, start=start))  # type: ignore[operator]
    it = iter(source(epoch) if callable(source) and not hasattr(source, "__iter__") else source)
    return itertools.islice(it, start, None) if start else it


def num_batches(source: Data) -> int | None:
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None


def resume_kind(source: Data) -> str | None:
    """How `source` continues an epoch exactly from a batch: "start" (a function taking
    `start=`, as `data.EpochBatches`), "state" (an object with `state_dict()` and
    `load_state_dict()`, as torchdata's `StatefulDataLoader`), or None (only by drawing the
    batches already seen again and dropping them: exact only if the order repeats)."""
    if callable(source) and not hasattr(source, "__iter__") and _accepts_start(source):
        return "start"
    if callable(getattr(source, "state_dict", None)) and callable(getattr(source, "load_state_dict", None)):
        return "state"
    return None


def encode_state(obj: Any) -> Any:
    """A loader's `state_dict()` as JSON values: tensors (a generator's state) as base64 bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = base64.b64encode(t.numpy().tobytes()).decode("ascii")
        return {"__tensor__": raw, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(obj, dict):
        return {str(k): encode_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_state(v) for v in obj]
    return obj


def decode_state(obj: Any) -> Any:
    """`encode_state`'s inverse."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        dtype = getattr(torch, obj["dtype"])
        flat = torch.frombuffer(bytearray(base64.b64decode(obj["__tensor__"])), dtype=dtype)
        return flat.reshape(obj["shape"]).clone()
    if isinstance(obj, dict):
        return {k: decode_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    return obj
