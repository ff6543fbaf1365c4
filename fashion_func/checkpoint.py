"""Train states and weights <-> safetensors files, written atomically and validated on load.

Two kinds of file, told apart by the ``format`` key of the safetensors metadata:

- ``fashion_func.train_state``: a whole pytree (``TrainState``: step, params, opt_state,
  model_state, rng) flattened to keys such as ``params/conv1.weight`` or
  ``opt_state/1/mu/conv1.weight``; read back with `load_state` against a template of the
  same structure (a freshly initialised state) for exact resume.
- ``fashion_func.weights``: a flat ``dict[str, Tensor]`` with plain ``nn.Module`` names, so
  ``module.load_state_dict(safetensors.torch.load_file(p))`` works without this library.

User metadata is a ``dict[str, Any]``; safetensors metadata is ``dict[str, str]``, so
(format version 2) a string value is stored as it is (``"model": "simplenet"``, readable by
any safetensors client), every other value JSON-encoded (numbers as their decimal text,
``"epoch": "3"``; dicts and lists as JSON), and the reserved key ``__json__`` holds the JSON
list of the keys that are JSON, so decoding is unambiguous (``"3"`` the string vs 3 the
number). Files of format version 1 (every value JSON, no ``__json__``) still load, decoded as
before. `encode_metadata` / `decode_metadata` are the two directions, for other writers
(`interop`'s Flax and numpy files follow the same convention).

Files are written to a temp file in the same directory, fsynced and ``os.replace``d, so a
crash or a full disk leaves either the old file or the new one, never a torn one. Loading
checks everything (header layout, offsets, dtypes, format, keys, shapes, dtypes against the
template, finiteness) before returning anything, and every problem with a file is raised as
a `CheckpointError` with a one-line message naming the file. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from fashion_func import tree
from fashion_func.safeio import FileError, describe, open_regular

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "FORMAT_VERSION_KEY",
    "JSON_KEYS_KEY",
    "STATE_FORMAT",
    "WEIGHTS_FORMAT",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWriteError",
    "atomic_write",
    "decode_metadata",
    "encode_metadata",
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
# version 1 stored every metadata value JSON-encoded; version 2 strings as they are (see above)
_ALL_JSON_VERSIONS = frozenset({"1"})
_SUPPORTED_VERSIONS = frozenset({"1", FORMAT_VERSION})

# The safetensors reference implementation refuses headers above 100 MB; so do we, before
# allocating anything, so a text or pickle file read as a length prefix fails fast.
_MAX_HEADER = 100_000_000
_METADATA = "__metadata__"
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

# safetensors dtype names that safetensors.torch can decode on this torch build.
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
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
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    }.items()
    if dtype is not None
}
_SAVABLE = frozenset(_DTYPES.values())


class CheckpointError(Exception):
    """A checkpoint file could not be read, validated or written; the message is one line naming it."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, not writable, ...); the previous file is untouched."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a file's header says, without reading tensor data (see `inspect`).

    ``format``/``format_version`` are None for safetensors files written by other tools;
    ``tensors`` maps each name to ``(dtype, shape)``; ``metadata`` is as `read_metadata` returns it.
    """

    format: str | None
    format_version: str | None
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offsets relative to the start of the data region
    end: int


@dataclass(frozen=True)
class _Header:
    entries: dict[str, _Entry]
    metadata: dict[str, str]
    data_start: int  # 8 + header length


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(name: str, what: str) -> CheckpointError:
    return CheckpointError(_one_line(f"{name}: {what}"))


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one.

    The bytes go to ``.{name}.{pid}.tmp`` in the same directory (same filesystem, so the
    rename is atomic), are flushed and fsynced, then ``os.replace``d over `path`, and the
    directory is fsynced so the rename itself survives a power cut. On any OSError the temp
    file is removed, the old file is left as it was, and `CheckpointWriteError` is raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        target = os.lstat(path)
    except OSError:
        target = None
    if target is not None and not stat.S_ISREG(target.st_mode):
        # os.replace would put a regular file in place of a device, FIFO or link: never
        raise CheckpointWriteError(
            _one_line(f"cannot write checkpoint {path}: it is {describe(target.st_mode)}, not a regular file")
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # our own name, left by a killed process of the same pid
    try:
        # "x" (O_EXCL) and O_NOFOLLOW: a link planted under the temp name is never written through
        with open(tmp, "xb", opener=_nofollow) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointWriteError(_one_line(f"cannot write checkpoint {path}: {_reason(e)}")) from e
        raise
    _fsync_dir(path.parent)


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)


def _reason(e: OSError) -> str:
    if e.strerror:
        return e.strerror
    code = e.errno
    if code is None and len(e.args) == 1 and isinstance(e.args[0], int):
        code = e.args[0]  # OSError(errno.ENOSPC) with one argument leaves .errno unset
    if code:
        return os.strerror(code)
    return str(e) or type(e).__name__


def _fsync_dir(directory: Path) -> None:
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:  # Windows: directories cannot be opened; the rename is as durable as it gets
        return
    try:
        fd = os.open(directory, os.O_RDONLY | flag)
    except OSError as e:
        raise CheckpointWriteError(_one_line(f"cannot sync directory {directory}: {_reason(e)}")) from e
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; the file itself is already in place.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise CheckpointWriteError(
                _one_line(f"checkpoint {directory}: renamed but cannot sync directory: {_reason(e)}")
            ) from e
    finally:
        os.close(fd)


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """User metadata as safetensors metadata strings (format version 2's convention).

    A `str` value is stored as it is; any other value (numbers, booleans, None, dicts, lists)
    JSON-encoded, and ``__json__`` lists those keys as a JSON array (always present, ``[]``
    when none), so `decode_metadata` gives back exactly `metadata`. TypeError for a non-str
    key or a value JSON cannot encode; ValueError for a reserved key (``format``,
    ``format_version``, ``__json__``).
    """
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


def _encode_metadata(metadata: Mapping[str, Any] | None, fmt: str) -> dict[str, str]:
    out = encode_metadata(metadata)
    out[FORMAT_KEY] = fmt
    out[FORMAT_VERSION_KEY] = FORMAT_VERSION
    return out


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


def _serialize(flat: Mapping[str, Any], metadata: Mapping[str, Any] | None, fmt: str) -> bytes:
    if _METADATA in flat:
        raise ValueError(f"{_METADATA!r} cannot be a tensor name")
    tensors = {name: _to_host(name, leaf) for name, leaf in flat.items()}
    return _st_save(tensors, metadata=_encode_metadata(metadata, fmt))


def _flat_state(state: Any, what: str) -> dict[str, Any]:
    flat = tree.flatten_with_paths(state)
    n_leaves = len(tree.leaves(state))
    if len(flat) != n_leaves:
        # Two leaves with the same "a/b" path (e.g. a dict key containing "/") would
        # silently overwrite each other in the file.
        raise ValueError(f"{what} has {n_leaves} leaves but only {len(flat)} distinct key paths")
    return flat


def save_state(path: str | os.PathLike[str], state: Any, *, metadata: dict[str, Any] | None = None) -> None:
    """Save a whole pytree of tensors (a ``TrainState``) to `path` atomically.

    Keys are the leaves' paths (``params/conv1.weight``, ``opt_state/1/mu/conv1.weight``,
    ``step``); tensors are copied to contiguous CPU buffers. `metadata` values must be
    JSON-serialisable. Raises `CheckpointWriteError` if the file cannot be written.
    """
    atomic_write(path, _serialize(_flat_state(state, "state"), metadata, STATE_FORMAT))


def save_weights(
    path: str | os.PathLike[str], params: Mapping[str, Tensor], *, metadata: dict[str, Any] | None = None
) -> None:
    """Save flat params (``nn.Module`` state-dict names) to `path` atomically.

    The file loads into a plain module with ``load_state_dict(safetensors.torch.load_file(p))``.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a flat dict of tensors, got {type(params).__name__}")
    atomic_write(path, _serialize(dict(params), metadata, WEIGHTS_FORMAT))


# --------------------------------------------------------------------------- reading


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
        raise _fail(name, "not a safetensors file: the file is empty")
    if file_size < 8:
        raise _fail(name, f"not a safetensors file: only {file_size} bytes, too short for a header")
    n = int.from_bytes(prefix[:8], "little")
    if n > _MAX_HEADER or n > file_size - 8:
        hint = ""
        if prefix[:4] == b"PK\x03\x04":
            hint = " (it looks like a zip archive, e.g. a torch.save file; only safetensors files are read)"
        elif prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            hint = " (it looks like a pickle file; fashion_func never unpickles)"
        raise _fail(
            name, f"not a safetensors file: header length {n} exceeds the file size {file_size} bytes{hint}"
        )
    if n < 2:
        raise _fail(name, f"not a safetensors file: header length {n} is too small for a JSON object")
    return n


def _parse_header(prefix: bytes, file_size: int, name: str) -> _Header:
    """Validate the header at the start of `prefix` against a file of `file_size` bytes.

    Checks layout only (it needs the header bytes, not the data): JSON object, metadata
    str->str, known dtypes, shapes, offsets consistent with shapes and covering the data
    region exactly, in the way the safetensors reference implementation requires.
    """
    n = _header_length(prefix, file_size, name)
    raw = prefix[8 : 8 + n]
    if len(raw) != n:
        raise _fail(name, f"truncated: header of {n} bytes but only {len(raw)} present")
    if raw[:1] != b"{":
        raise _fail(name, "not a safetensors file: header does not start with '{'")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(name, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _fail(name, f"header is not a JSON object but {type(obj).__name__}")

    metadata = obj.pop(_METADATA, {})
    if not isinstance(metadata, dict):
        raise _fail(name, f"header {_METADATA} is not an object but {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise _fail(name, f"metadata value for {k!r} is not a string but {type(v).__name__}")

    data_size = file_size - 8 - n
    entries: dict[str, _Entry] = {}
    for key, info in obj.items():
        if not isinstance(info, dict):
            raise _fail(name, f"tensor {key!r}: entry is not an object")
        if set(info) != _TENSOR_FIELDS:
            missing = sorted(_TENSOR_FIELDS - set(info))
            extra = sorted(set(info) - _TENSOR_FIELDS)
            raise _fail(name, f"tensor {key!r}: fields missing {missing}, unexpected {extra}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise _fail(name, f"tensor {key!r}: unknown dtype {dtype_name!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
            raise _fail(name, f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            truncated = (
                isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= data_size < offsets[1]
            )
            hint = " (truncated file?)" if truncated else ""
            raise _fail(
                name,
                f"tensor {key!r}: data_offsets {offsets!r} outside the data region "
                f"of {data_size} bytes{hint}",
            )
        dtype = _DTYPES[dtype_name]
        nbytes = _nbytes(shape, dtype.itemsize, data_size)
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(
                name,
                f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes "
                f"but {dtype_name} {shape} needs {nbytes}",
            )
        entries[key] = _Entry(dtype, tuple(shape), offsets[0], offsets[1])

    # The entries must tile the data region exactly: no overlap (two tensors aliasing the
    # same bytes), no gaps, nothing after the last tensor.
    end = 0
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != end:
            what = "overlaps the previous tensor" if e.start < end else f"leaves a gap at byte {end}"
            raise _fail(name, f"tensor {key!r}: data_offsets [{e.start}, {e.end}] {what}")
        end = e.end
    if end != data_size:
        raise _fail(name, f"data region is {data_size} bytes but the tensors cover {end}")
    return _Header(entries, metadata, 8 + n)


def _check_format(header: _Header, name: str, expected: str, *, allow_foreign: bool) -> bool:
    """Check the ``format`` metadata (and our files' version); returns whether the file is one of ours."""
    fmt = header.metadata.get(FORMAT_KEY)
    ours = fmt in (STATE_FORMAT, WEIGHTS_FORMAT)
    if fmt != expected:
        if fmt == STATE_FORMAT:
            raise _fail(name, "is a train state checkpoint, not a weights file; use load_state")
        if fmt == WEIGHTS_FORMAT:
            raise _fail(name, "is a weights file, not a train state checkpoint; use load_weights")
        if not allow_foreign:
            got = "no format in its metadata" if fmt is None else f"format {fmt!r}"
            raise _fail(name, f"not a fashion_func train state: {got}, expected {expected!r}")
    if ours:
        version = header.metadata.get(FORMAT_VERSION_KEY)
        if version not in _SUPPORTED_VERSIONS:
            raise _fail(
                name,
                f"format_version {version!r} is not supported (this fashion_func reads "
                f"{sorted(_SUPPORTED_VERSIONS)})",
            )
    return ours


def _json_value(key: str, value: str, name: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise _fail(name, f"metadata value for {key!r} is not valid JSON: {e}") from None


def _json_keys(raw: Mapping[str, str], name: str) -> set[str]:
    """The keys ``__json__`` names, checked: a JSON list of strings naming user metadata keys."""
    keys = _json_value(JSON_KEYS_KEY, raw[JSON_KEYS_KEY], name)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _fail(name, f"metadata {JSON_KEYS_KEY!r} is not a JSON list of key names")
    bad = sorted({k for k in keys if k not in raw or k in _RESERVED})
    if bad:
        raise _fail(name, f"metadata {JSON_KEYS_KEY!r} names keys {_names(bad)} that hold no user value")
    return set(keys)


def _decode_raw(raw: Mapping[str, str], name: str) -> dict[str, Any]:
    fmt = raw.get(FORMAT_KEY)
    ours = fmt in (STATE_FORMAT, WEIGHTS_FORMAT)
    version = raw.get(FORMAT_VERSION_KEY)
    if ours and version not in _SUPPORTED_VERSIONS:
        raise _fail(name, f"format_version {version!r} is not supported")
    if ours and version in _ALL_JSON_VERSIONS:
        # version 1: every value JSON-encoded, no __json__ (a user key of that name is data)
        return {
            k: _json_value(k, v, name) for k, v in raw.items() if k not in (FORMAT_KEY, FORMAT_VERSION_KEY)
        }
    if JSON_KEYS_KEY not in raw:
        if ours:
            raise _fail(
                name, f"metadata lacks {JSON_KEYS_KEY!r}, which format_version {FORMAT_VERSION} requires"
            )
        # Files from other tools carry free-form strings ("format": "pt"); pass them through.
        return dict(raw)
    json_keys = _json_keys(raw, name)
    # the format keys are ours only in our files; a foreign file's "format" is its own data
    reserved = _RESERVED if ours else {JSON_KEYS_KEY}
    return {k: _json_value(k, v, name) if k in json_keys else v for k, v in raw.items() if k not in reserved}


def decode_metadata(raw: Mapping[str, str], *, name: str = "<metadata>") -> dict[str, Any]:
    """User metadata from a safetensors file's raw metadata strings (`safe_open(p).metadata()`).

    The inverse of `encode_metadata`: keys listed in ``__json__`` are JSON-decoded, the others
    are the strings they are. Our files of format version 1 (every value JSON) are decoded as
    they were written; a file with neither our ``format`` nor ``__json__`` (another tool's) is
    returned as it is. The reserved keys are left out. `CheckpointError` (naming `name`) for
    malformed metadata.
    """
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _fail(name, f"metadata entry {k!r} is not a string")
    return _decode_raw(raw, name)


def _check_template(header: _Header, template: Mapping[str, Tensor], name: str, what: str) -> None:
    names = list(template)
    missing = [k for k in names if k not in header.entries]
    unexpected = sorted(set(header.entries) - set(names))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys {_names(unexpected)}")
        raise _fail(name, f"{what}: {', '.join(parts)}")
    for key, leaf in template.items():
        if not isinstance(leaf, Tensor):
            raise TypeError(f"template leaf {key!r} is {type(leaf).__name__}, not a tensor")
        e = header.entries[key]
        if e.shape != tuple(leaf.shape):
            raise _fail(
                name, f"{what}: {key!r} has shape {list(e.shape)} in the file, {list(leaf.shape)} expected"
            )
        if e.dtype != leaf.dtype:
            raise _fail(name, f"{what}: {key!r} has dtype {e.dtype} in the file, {leaf.dtype} expected")


def _decode_tensors(data: bytes, header: _Header, name: str) -> dict[str, Tensor]:
    try:
        tensors = _st_load(data)
    except Exception as e:  # the decoder is a foreign library: any failure is a bad file
        raise _fail(name, f"safetensors cannot decode the file: {type(e).__name__}: {e}") from None
    # Belt and braces: what was decoded is exactly what the validated header promised.
    if set(tensors) != set(header.entries):
        raise _fail(name, "decoded tensors differ from the header")
    for key, t in tensors.items():
        e = header.entries[key]
        if t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise _fail(name, f"tensor {key!r} decoded as {t.dtype} {list(t.shape)}, header says otherwise")
        if t.is_floating_point() or t.is_complex():
            # isfinite is not implemented for float8 types; widening is exact
            check = t.float() if t.element_size() == 1 else t
            if not bool(torch.isfinite(check).all()):
                bad = int((~torch.isfinite(check)).sum())
                raise _fail(name, f"tensor {key!r} has {bad} non-finite values (NaN or inf)")
    return tensors


def _read(path: str | os.PathLike[str], *, header_only: bool) -> tuple[bytes, int, str]:
    """(bytes, file size, name): the whole file, or only its length prefix and header.

    The length prefix is checked before anything else is read: a multi-gigabyte file
    that is not a safetensors file fails without being read.
    """
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
        raise _fail(name, reason) from None
    except OSError as e:
        raise _fail(name, f"cannot read: {_reason(e)}") from None
    return data, st.st_size, name


def _read_file(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    data, _, name = _read(path, header_only=False)
    return data, name


def _decode(
    data: bytes,
    name: str,
    *,
    expected: str,
    allow_foreign: bool,
    template: Mapping[str, Tensor] | None,
    what: str,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    header = _parse_header(data, len(data), name)
    _check_format(header, name, expected, allow_foreign=allow_foreign)
    metadata = _decode_raw(header.metadata, name)
    if template is not None:
        _check_template(header, template, name, what)
    return _decode_tensors(data, header, name), metadata


def _target(device: torch.device | str | None, leaf: Tensor) -> torch.device:
    if device is not None:
        return torch.device(device)
    # A template built on the meta device has no data to match; real tensors go to the CPU.
    return torch.device("cpu") if leaf.is_meta else leaf.device


def _load_state_bytes(
    data: bytes, template: Any, *, device: torch.device | str | None = None, name: str = "<bytes>"
) -> tuple[Any, dict[str, Any]]:
    flat_template = _flat_state(template, "template")
    tensors, metadata = _decode(
        data,
        name,
        expected=STATE_FORMAT,
        allow_foreign=False,
        template=flat_template,
        what="checkpoint does not match the train state",
    )
    flat = {k: tensors[k].to(_target(device, leaf)) for k, leaf in flat_template.items()}
    return tree.unflatten_like(template, flat), metadata


def load_state(
    path: str | os.PathLike[str], template: Any, *, device: torch.device | str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load a train state saved by `save_state`, validated against `template`.

    `template` is a pytree of the same structure (e.g. a freshly initialised ``TrainState``);
    keys, shapes and dtypes must match it exactly and floating tensors must be finite.
    Leaves go to `device`, by default each template leaf's device. Returns
    ``(state, metadata)`` with the user metadata decoded (`decode_metadata`). Raises `CheckpointError`.
    """
    data, name = _read_file(path)
    return _load_state_bytes(data, template, device=device, name=name)


def _load_weights_bytes(
    data: bytes,
    *,
    template: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    name: str = "<bytes>",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, metadata = _decode(
        data,
        name,
        expected=WEIGHTS_FORMAT,
        allow_foreign=True,
        template=template,
        what="weights do not match model",
    )
    order = list(template) if template is not None else sorted(tensors)
    target = torch.device(device)
    return {k: tensors[k].to(target) for k in order}, metadata


def load_weights(
    path: str | os.PathLike[str],
    *,
    template: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load flat params from a weights file, validated (against `template` when given).

    Plain safetensors files from other tools (no fashion_func ``format``) are accepted and
    their metadata is returned as the raw strings (decoded where the file has ``__json__``,
    as `interop`'s files do); a train state file is refused. Returns
    ``(params, metadata)``; params are in the template's key order, else sorted by name.
    """
    data, name = _read_file(path)
    return _load_weights_bytes(data, template=template, device=device, name=name)


def _read_header(path: str | os.PathLike[str]) -> tuple[_Header, str]:
    prefix, size, name = _read(path, header_only=True)
    return _parse_header(prefix, size, name), name


def _info(header: _Header, name: str) -> CheckpointInfo:
    fmt = header.metadata.get(FORMAT_KEY)
    ours = fmt in (STATE_FORMAT, WEIGHTS_FORMAT)
    if ours:
        _check_format(header, name, fmt, allow_foreign=False)
    return CheckpointInfo(
        format=fmt if ours else None,
        format_version=header.metadata.get(FORMAT_VERSION_KEY) if ours else None,
        tensors={k: (e.dtype, e.shape) for k, e in header.entries.items()},
        metadata=_decode_raw(header.metadata, name),
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The user metadata of a checkpoint or weights file, reading and validating only its header.

    Decoded (`decode_metadata`) and without the reserved keys for fashion_func files (and files
    following their convention, with ``__json__``); raw strings for safetensors files from other
    tools. Tensor data is neither read nor checked.
    """
    header, name = _read_header(path)
    return _info(header, name).metadata


def inspect(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Format, tensor names/dtypes/shapes and metadata of a file, from its validated header only."""
    header, name = _read_header(path)
    return _info(header, name)
