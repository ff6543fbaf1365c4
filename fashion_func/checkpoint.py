"""Train states and weights <-> safetensors files, written atomically and validated on load.

Two kinds of file, told apart by the ``format`` metadata key: ``fashion_func.train_state``, a
whole pytree (``TrainState``) under its leaves' paths (``params/conv1.weight``,
``opt_state/1/mu/conv1.weight``), read back with `load_state` against a template of the same
structure for exact resume; ``fashion_func.weights``, a flat dict under plain ``nn.Module`` names,
so ``module.load_state_dict(safetensors.torch.load_file(p))`` works without this library.

Metadata (format version 2, the only one read): `encode_metadata` / `decode_metadata`. Writes
are atomic (`atomic.write_bytes`); loading checks format, template and finiteness before
returning anything, every problem a one-line `CheckpointError` naming the file. Nothing here
unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fashion_func import atomic, tree
from fashion_func.safetensors_io import (
    CheckpointError,
    Header,
    check_template,
    decode_tensors,
    fail,
    host_copies,
    name_list,
    parse_header,
    read,
    to_bytes,
)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWriteError",
    "inspect",
    "load_state",
    "load_weights",
    "read_metadata",
    "save_state",
    "save_weights",
]

FORMAT_VERSION = "2"
FORMAT_KEY = "format"
FORMAT_VERSION_KEY = "format_version"
JSON_KEYS_KEY = "__json__"  # metadata key: JSON list of the keys whose values are JSON-encoded
STATE_FORMAT = "fashion_func.train_state"
WEIGHTS_FORMAT = "fashion_func.weights"
_RESERVED = frozenset({FORMAT_KEY, FORMAT_VERSION_KEY, JSON_KEYS_KEY})
_OURS = frozenset({STATE_FORMAT, WEIGHTS_FORMAT})


class CheckpointWriteError(CheckpointError, atomic.WriteError):
    """Writing a checkpoint failed (disk full, not writable, ...); the previous file is untouched."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a file's header says (`inspect`): ``format``/``format_version`` (None for other tools'
    files), ``tensors`` (name -> ``(dtype, shape)``) and ``metadata`` (as `read_metadata` gives it)."""

    format: str | None
    format_version: str | None
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    metadata: dict[str, Any]


def atomic_write(path: str | os.PathLike[str], data: bytes, *, folder: atomic.FolderId | None = None) -> None:
    """Write checkpoint bytes with `atomic.write_bytes` (`folder`: the identity `path`'s folder must
    still have); a failure is `CheckpointWriteError` and leaves the old file as it was."""
    try:
        atomic.write_bytes(path, data, what="checkpoint", folder=folder)
    except atomic.WriteError as e:
        raise CheckpointWriteError(str(e)) from e.__cause__


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """User metadata as safetensors metadata strings (format version 2's convention): a `str` value as
    it is, any other JSON-encoded, and ``__json__`` (always present) the JSON list of those keys, so
    `decode_metadata` gives back exactly `metadata`. TypeError for a non-str key or a value JSON
    cannot encode; ValueError for a reserved key (``format``, ``format_version``, ``__json__``)."""
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r}")
        if key in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved by fashion_func.checkpoint")
        if isinstance(value, str):
            out[key] = str(value)  # a str subclass (an enum) is stored, and read back, as its text
            continue
        try:
            out[key] = json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata value for {key!r} is not JSON-serialisable: {e}") from e
        json_keys.append(key)
    out[JSON_KEYS_KEY] = json.dumps(json_keys)
    return out


def _serialize(flat: Mapping[str, Any], metadata: Mapping[str, Any] | None, fmt: str) -> bytes:
    tensors = host_copies(flat)
    return to_bytes(
        tensors, {**encode_metadata(metadata), FORMAT_KEY: fmt, FORMAT_VERSION_KEY: FORMAT_VERSION}
    )


def _flat_state(state: Any, what: str) -> dict[str, Any]:
    flat = tree.flatten_with_paths(state)
    n_leaves = len(tree.leaves(state))
    if len(flat) != n_leaves:
        # Two leaves with the same "a/b" path (e.g. a dict key containing "/") would
        # silently overwrite each other in the file.
        raise ValueError(f"{what} has {n_leaves} leaves but only {len(flat)} distinct key paths")
    return flat


def save_state(
    path: str | os.PathLike[str],
    state: Any,
    *,
    metadata: dict[str, Any] | None = None,
    folder: atomic.FolderId | None = None,
) -> None:
    """Save a whole pytree of tensors (a ``TrainState``) to `path` atomically, under its leaves'
    paths; `metadata` values must be JSON-serialisable. `CheckpointWriteError` if the file cannot
    be written (`folder`: see `atomic_write`)."""
    atomic_write(path, _serialize(_flat_state(state, "state"), metadata, STATE_FORMAT), folder=folder)


def save_weights(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    metadata: dict[str, Any] | None = None,
    folder: atomic.FolderId | None = None,
) -> None:
    """Save flat params (``nn.Module`` state-dict names) to `path` atomically, a file for
    ``load_state_dict(safetensors.torch.load_file(p))`` (`folder`: see `atomic_write`)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a flat dict of tensors, got {type(params).__name__}")
    atomic_write(path, _serialize(dict(params), metadata, WEIGHTS_FORMAT), folder=folder)


def _check_format(header: Header, name: str, expected: str) -> None:
    """CheckpointError unless the ``format`` metadata is `expected` (a weights file's: or not ours)."""
    fmt = header.metadata.get(FORMAT_KEY)
    if fmt == expected:
        return
    if fmt == STATE_FORMAT:
        raise fail(name, "is a train state checkpoint, not a weights file; use load_state")
    if fmt == WEIGHTS_FORMAT:
        raise fail(name, "is a weights file, not a train state checkpoint; use load_weights")
    if expected == STATE_FORMAT:
        got = "no format in its metadata" if fmt is None else f"format {fmt!r}"
        raise fail(name, f"not a fashion_func train state: {got}, expected {expected!r}")


def _json_value(key: str, value: str, name: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise fail(name, f"metadata value for {key!r} is not valid JSON: {e}") from None


def _json_keys(raw: Mapping[str, str], name: str) -> set[str]:
    """The keys ``__json__`` names, checked: a JSON list of strings naming user metadata keys."""
    keys = _json_value(JSON_KEYS_KEY, raw[JSON_KEYS_KEY], name)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise fail(name, f"metadata {JSON_KEYS_KEY!r} is not a JSON list of key names")
    bad = sorted({k for k in keys if k not in raw or k in _RESERVED})
    if bad:
        raise fail(name, f"metadata {JSON_KEYS_KEY!r} names keys {name_list(bad)} that hold no user value")
    return set(keys)


def _decode_raw(raw: Mapping[str, str], name: str) -> dict[str, Any]:
    """The user metadata of `raw`; for our files, the one check of the format version."""
    ours = raw.get(FORMAT_KEY) in _OURS
    version = raw.get(FORMAT_VERSION_KEY)
    if ours and version != FORMAT_VERSION:
        raise fail(
            name, f"format_version {version!r} is not supported (this fashion_func reads {FORMAT_VERSION!r})"
        )
    if JSON_KEYS_KEY not in raw:
        if ours:
            raise fail(
                name, f"metadata lacks {JSON_KEYS_KEY!r}, which format_version {FORMAT_VERSION} requires"
            )
        # Files from other tools carry free-form strings ("format": "pt"); pass them through.
        return dict(raw)
    json_keys = _json_keys(raw, name)
    # the format keys are ours only in our files; a foreign file's "format" is its own data
    reserved = _RESERVED if ours else {JSON_KEYS_KEY}
    return {k: _json_value(k, v, name) if k in json_keys else v for k, v in raw.items() if k not in reserved}


def decode_metadata(raw: Mapping[str, str], *, name: str = "<metadata>") -> dict[str, Any]:
    """User metadata from a safetensors file's raw metadata strings (`safe_open(p).metadata()`),
    the inverse of `encode_metadata`, without the reserved keys. Our files must be of the current
    format version; another tool's (neither our ``format`` nor ``__json__``) is returned as it is.
    `CheckpointError` (naming `name`) for malformed metadata."""
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise fail(name, f"metadata entry {k!r} is not a string")
    return _decode_raw(raw, name)


def _decode(
    data: bytes,
    name: str,
    header: Header | None,
    expected: str,
    template: Mapping[str, Tensor] | None,
    what: str,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and user metadata of the whole file `data` (`header`: already validated by `read`)."""
    header = header or parse_header(data, len(data), name)
    _check_format(header, name, expected)
    metadata = _decode_raw(header.metadata, name)
    if template is not None:
        check_template(header, template, name, what)
    return decode_tensors(data, name), metadata


def _target(device: torch.device | str | None, leaf: Tensor) -> torch.device:
    if device is not None:
        return torch.device(device)
    # A template built on the meta device has no data to match; real tensors go to the CPU.
    return torch.device("cpu") if leaf.is_meta else leaf.device


def _load_state_bytes(
    data: bytes,
    template: Any,
    *,
    device: torch.device | str | None = None,
    name: str = "<bytes>",
    header: Header | None = None,
) -> tuple[Any, dict[str, Any]]:
    flat_template = _flat_state(template, "template")
    tensors, metadata = _decode(
        data, name, header, STATE_FORMAT, flat_template, "checkpoint does not match the train state"
    )
    flat = {k: tensors[k].to(_target(device, leaf)) for k, leaf in flat_template.items()}
    return tree.unflatten_like(template, flat), metadata


def load_state(
    path: str | os.PathLike[str], template: Any, *, device: torch.device | str | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(state, metadata)`` of a file `save_state` wrote, validated against `template`, a pytree
    of the same structure (a freshly initialised ``TrainState``): keys, shapes and dtypes must
    match it exactly, floating tensors be finite. Leaves go to `device`, by default each template
    leaf's. `CheckpointError` for any problem with the file."""
    header, data, name = read(path, header_only=False)
    return _load_state_bytes(data, template, device=device, name=name, header=header)


def _load_weights_bytes(
    data: bytes,
    *,
    template: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    name: str = "<bytes>",
    header: Header | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, metadata = _decode(data, name, header, WEIGHTS_FORMAT, template, "weights do not match model")
    order = list(template) if template is not None else sorted(tensors)
    return {k: tensors[k].to(torch.device(device)) for k in order}, metadata


def load_weights(
    path: str | os.PathLike[str],
    *,
    template: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(params, metadata)`` of a weights file, validated (against `template` when given), params
    in the template's key order, else sorted by name. Another tool's safetensors file is accepted
    (its metadata as `decode_metadata` gives it); a train state file is refused."""
    header, data, name = read(path, header_only=False)
    return _load_weights_bytes(data, template=template, device=device, name=name, header=header)


def _info(header: Header, name: str) -> CheckpointInfo:
    metadata = _decode_raw(header.metadata, name)  # checks our files' format version
    ours = header.metadata.get(FORMAT_KEY) in _OURS
    return CheckpointInfo(
        format=header.metadata[FORMAT_KEY] if ours else None,
        format_version=FORMAT_VERSION if ours else None,
        tensors={k: (e.dtype, e.shape) for k, e in header.entries.items()},
        metadata=metadata,
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The user metadata (as `decode_metadata` gives it) of a checkpoint or weights file, reading
    and validating only its header: tensor data is neither read nor checked."""
    header, _, name = read(path, header_only=True)
    return _info(header, name).metadata


def inspect(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Format, tensor names/dtypes/shapes and metadata of a file, from its validated header only."""
    header, _, name = read(path, header_only=True)
    return _info(header, name)
