"""safetensors files read defensively and written from tensors; nothing here knows a TrainState.

`read` (a regular file, its length prefix checked before reading on) and `parse_header` (as
strict as the reference implementation) check a header as fully alone as in a file loaded;
`decode_tensors` also refuses non-finite values; `check_template` compares a header with what is
expected. `host_copies` and `to_bytes` write. Every problem is a one-line `CheckpointError`
naming the file; nothing unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from fashion_func.safeio import FileError, Worded, one_line, open_regular, os_reason

__all__ = ["CheckpointError"]

# The safetensors reference implementation refuses headers above 100 MB; so do we, before
# allocating anything, so a text or pickle file read as a length prefix fails fast.
_MAX_HEADER = 100_000_000
METADATA = "__metadata__"  # the header's metadata entry (never a tensor name)
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

# safetensors dtype names and the torch dtypes safetensors.torch decodes them to (all of them
# exist from torch 2.4, the oldest this package supports).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
_SAVABLE = frozenset(DTYPES.values())


class CheckpointError(Worded):
    """A checkpoint file could not be read, validated or written; the message is one line naming it.
    `kind` (most have none: a plain message) marks the ones a client words itself (`WORDS`)."""

    WORDS: ClassVar[Mapping[str, str]] = {
        "no_model_name": "{path}: no model name in the file's metadata; pass model_name=NAME",
        "privacy_record": "{path}: {detail}",  # a resume point's privacy record (`loop.resume.compatible`)
    }


@dataclass(frozen=True)
class Entry:
    """One tensor of a validated header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offsets relative to the start of the data region
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: the tensors and the raw metadata strings."""

    entries: dict[str, Entry]
    metadata: dict[str, str]


def fail(name: str, what: str) -> CheckpointError:
    """The one-line `CheckpointError` "{name}: {what}" (to raise)."""
    return CheckpointError(one_line(f"{name}: {what}"))


def name_list(keys: list[str], limit: int = 5) -> str:
    """The first `limit` keys, quoted, and how many more, for a message."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def _to_host(name: str, leaf: Any) -> Tensor:
    if not isinstance(leaf, Tensor):
        raise TypeError(f"cannot save {name!r}: leaves must be tensors, got {type(leaf).__name__}")
    if leaf.layout != torch.strided:
        raise TypeError(f"cannot save {name!r}: only dense tensors are supported, got {leaf.layout}")
    if leaf.dtype not in _SAVABLE:
        raise TypeError(f"cannot save {name!r}: dtype {leaf.dtype} has no safetensors encoding")
    if leaf.is_meta:
        raise ValueError(f"cannot save {name!r}: it is a meta tensor without data")
    # A fresh contiguous CPU buffer in one copy: never the caller's storage, never shared
    # between entries (safetensors refuses shared storage).
    return torch.empty(leaf.shape, dtype=leaf.dtype, device="cpu").copy_(leaf.detach())


def host_copies(flat: Mapping[str, Any]) -> dict[str, Tensor]:
    """Fresh contiguous CPU copies of the tensors `flat`: TypeError for a leaf that is not a dense
    tensor of a dtype safetensors encodes, ValueError for a meta tensor or one named `__metadata__`."""
    if METADATA in flat:
        raise ValueError(f"{METADATA!r} cannot be a tensor name")
    return {name: _to_host(name, leaf) for name, leaf in flat.items()}


def to_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a safetensors file of `host_copies` and the metadata strings."""
    return _st_save(dict(tensors), metadata=dict(metadata))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    # Stop multiplying once past `limit`: a header with many huge dims must not make us
    # compute an enormous integer (the reference implementation rejects usize overflow).
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return total
    return total


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _header_length(prefix: bytes, file_size: int, name: str) -> int:
    if file_size == 0:
        raise fail(name, "not a safetensors file: the file is empty")
    if file_size < 8:
        raise fail(name, f"not a safetensors file: only {file_size} bytes, too short for a header")
    n = int.from_bytes(prefix[:8], "little")
    if n > _MAX_HEADER or n > file_size - 8:
        hint = ""
        if prefix[:4] == b"PK\x03\x04":
            hint = " (it looks like a zip archive, e.g. a torch.save file; only safetensors files are read)"
        elif prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            hint = " (it looks like a pickle file; fashion_func never unpickles)"
        raise fail(
            name, f"not a safetensors file: header length {n} exceeds the file size {file_size} bytes{hint}"
        )
    if n < 2:
        raise fail(name, f"not a safetensors file: header length {n} is too small for a JSON object")
    return n


def _header_object(raw: bytes, n: int, name: str) -> dict[str, Any]:
    """The header's JSON object: strict JSON, no duplicate keys, no NaN/Infinity constants."""
    if len(raw) != n:
        raise fail(name, f"truncated: header of {n} bytes but only {len(raw)} present")
    if raw[:1] != b"{":
        raise fail(name, "not a safetensors file: header does not start with '{'")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail(name, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise fail(name, f"header is not a JSON object but {type(obj).__name__}")
    return obj


def _header_metadata(obj: dict[str, Any], name: str) -> dict[str, str]:
    """The `__metadata__` entry, taken out of `obj`: an object of strings ({} when absent)."""
    metadata = obj.pop(METADATA, {})
    if not isinstance(metadata, dict):
        raise fail(name, f"header {METADATA} is not an object but {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise fail(name, f"metadata value for {k!r} is not a string but {type(v).__name__}")
    return metadata


def _int_pair(offsets: Any) -> bool:
    return isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)


def _entry(key: str, info: Any, data_size: int, name: str) -> Entry:
    """One tensor's header entry, checked: its fields, dtype, shape, and offsets that fit both."""
    if not isinstance(info, dict):
        raise fail(name, f"tensor {key!r}: entry is not an object")
    if set(info) != _TENSOR_FIELDS:
        missing = sorted(_TENSOR_FIELDS - set(info))
        extra = sorted(set(info) - _TENSOR_FIELDS)
        raise fail(name, f"tensor {key!r}: fields missing {missing}, unexpected {extra}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise fail(name, f"tensor {key!r}: unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise fail(name, f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
    if not (_int_pair(offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
        # a start inside the data region and an end past it: most likely a cut-off file
        truncated = _int_pair(offsets) and 0 <= offsets[0] <= data_size < offsets[1]
        hint = " (truncated file?)" if truncated else ""
        raise fail(
            name,
            f"tensor {key!r}: data_offsets {offsets!r} outside the data region of {data_size} bytes{hint}",
        )
    dtype = DTYPES[dtype_name]
    nbytes = _nbytes(shape, dtype.itemsize, data_size)
    if offsets[1] - offsets[0] != nbytes:
        raise fail(
            name,
            f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes "
            f"but {dtype_name} {shape} needs {nbytes}",
        )
    return Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(entries: Mapping[str, Entry], data_size: int, name: str) -> None:
    """The entries tile the data region exactly: no overlap (two tensors aliasing the same
    bytes), no gaps, nothing after the last tensor."""
    end = 0
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != end:
            what = "overlaps the previous tensor" if e.start < end else f"leaves a gap at byte {end}"
            raise fail(name, f"tensor {key!r}: data_offsets [{e.start}, {e.end}] {what}")
        end = e.end
    if end != data_size:
        raise fail(name, f"data region is {data_size} bytes but the tensors cover {end}")


def parse_header(prefix: bytes, file_size: int, name: str) -> Header:
    """The header at the start of `prefix`, validated against a file of `file_size` bytes (its
    layout only: the data is not needed)."""
    return _parse(prefix, _header_length(prefix, file_size, name), file_size, name)


def _parse(prefix: bytes, n: int, file_size: int, name: str) -> Header:
    """`parse_header` once the length prefix `n` has been checked."""
    obj = _header_object(prefix[8 : 8 + n], n, name)
    metadata = _header_metadata(obj, name)
    data_size = file_size - 8 - n
    entries = {key: _entry(key, info, data_size, name) for key, info in obj.items()}
    _check_tiling(entries, data_size, name)
    return Header(entries, metadata)


def check_template(header: Header, template: Mapping[str, Tensor], name: str, what: str) -> None:
    """CheckpointError ("{name}: {what}: ...") unless the header has exactly the template's
    names, shapes and dtypes; TypeError for a template leaf that is not a tensor."""
    names = list(template)
    missing = [k for k in names if k not in header.entries]
    unexpected = sorted(set(header.entries) - set(names))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys {name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys {name_list(unexpected)}")
        raise fail(name, f"{what}: {', '.join(parts)}")
    for key, leaf in template.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(f"template leaf {key!r} is {type(leaf).__name__}, not a tensor")
        e = header.entries[key]
        if e.shape != tuple(leaf.shape):
            raise fail(
                name, f"{what}: {key!r} has shape {list(e.shape)} in the file, {list(leaf.shape)} expected"
            )
        if e.dtype != leaf.dtype:
            raise fail(name, f"{what}: {key!r} has dtype {e.dtype} in the file, {leaf.dtype} expected")


def decode_tensors(data: bytes, name: str) -> dict[str, Tensor]:
    """The tensors of the whole file `data`, whose header `parse_header` validated, all finite
    (safetensors refuses what `parse_header` does, so only non-finite values are checked here)."""
    try:
        tensors = _st_load(data)
    except Exception as e:  # the decoder is a foreign library: any failure is a bad file
        raise fail(name, f"safetensors cannot decode the file: {type(e).__name__}: {e}") from None
    for key, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            # isfinite is not implemented for float8 types; widening is exact
            check = t.float() if t.element_size() == 1 else t
            if not bool(torch.isfinite(check).all()):
                bad = int((~torch.isfinite(check)).sum())
                raise fail(name, f"tensor {key!r} has {bad} non-finite values (NaN or inf)")
    return tensors


def read(path: str | os.PathLike[str], *, header_only: bool) -> tuple[Header, bytes, str]:
    """(validated header, bytes, name): the bytes are the whole file, or only its length prefix
    and header; the prefix is checked before anything else is read."""
    name = str(path)
    try:
        # a regular file only, checked before opening and opened without blocking: a FIFO
        # named as a checkpoint must not hang the process
        with open_regular(path, what="checkpoint") as f:
            st = os.fstat(f.fileno())
            first = f.read(8)
            n = _header_length(first, st.st_size, name)
            data = first + (f.read(n) if header_only else f.read())
    except FileError as e:
        reason = str(e).split(": ", 1)[-1]
        raise fail(name, reason) from None
    except OSError as e:
        raise fail(name, f"cannot read: {os_reason(e)}") from None
    return _parse(data, n, st.st_size, name), data, name
