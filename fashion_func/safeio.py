"""Safe handling of user paths and user-visible text, in one place for every command.

Inputs: `open_regular` / `read_regular` refuse anything but a regular file (a FIFO would
block, `/dev/zero` never ends). Outputs: `check_output` is the rule for a file a command writes
on the user's behalf (export's and predict's). Text: `display` makes a path or metadata string
safe to print, `strict_json` a value strict JSON, `one_line` and `os_reason` an error message
one bounded line that says why. This module imports nothing from the package, so every layer
may use it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

__all__ = ["FileError"]

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def word(template: str, fields: Mapping[str, Any]) -> str:
    """`template` filled with `fields`; text and paths among them made safe to print (`display`)."""
    safe = {k: display(v) if isinstance(v, (str, os.PathLike)) else v for k, v in fields.items()}
    return template.format(**safe)


class Worded(Exception):
    """A user-facing error with a `kind` and the values it speaks of (`fields`). `str()` words it in
    the library's terms (`WORDS[kind]`: `run_dir`, `overwrite=True`); a client with words of its own
    (the command line's flags) words each kind from `kind` and `fields`. Raised with a plain
    message instead, it has no kind. Kinds are unique across the library's errors."""

    WORDS: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str | None = None, *, kind: str | None = None, **fields: Any) -> None:
        if (message is None) == (kind is None):
            raise TypeError(f"{type(self).__name__} takes a message or a kind, one of the two")
        self.kind, self.fields = kind, fields
        super().__init__(message if kind is None else word(self.WORDS[kind], fields))


class Note:
    """A log message with a kind and fields, worded like `Worded` (a client may reword it)."""

    def __init__(self, words: Mapping[str, str], kind: str, **fields: Any) -> None:
        self.words, self.kind, self.fields = words, kind, fields

    def __str__(self) -> str:
        return word(self.words[self.kind], self.fields)


class FileError(Worded):
    """A user path cannot be used as asked; the message is one line naming it."""

    WORDS: ClassVar[Mapping[str, str]] = {
        "output_exists": "{what} {path} exists; pass overwrite=True to replace it",
    }


def describe(mode: int) -> str:
    """What kind of file `mode` (an `st_mode`) is, as words for a message."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    for test, words in kinds:
        if test(mode):
            return words
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def display(text: str | os.PathLike[str]) -> str:
    """`text` safe to print on any terminal and stdout encoding: undecodable bytes of a file name
    (lone surrogates from `os.fsdecode`) and control characters (ESC, CR, BEL, C1, DEL,
    bidirectional overrides) become `\\xNN` / `\\uNNNN` escapes, so metadata cannot drive the terminal."""
    s = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if any("\udc80" <= c <= "\udcff" for c in s):  # surrogateescape'd bytes: back to bytes, escaped
        s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    out = []
    for c in s:
        o = ord(c)
        if o < 0x20 or 0x7F <= o < 0xA0 or 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:  # any other lone surrogate cannot be encoded either
            out.append(f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)


def one_line(text: object, limit: int = 300) -> str:
    """`text` with its whitespace runs (newlines too) made single spaces, cut to `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_reason(e: OSError) -> str:
    """Why an OSError happened, in words (`strerror`; the errno's text when only a number was given)."""
    if e.strerror:
        return e.strerror
    code = e.errno
    if code is None and len(e.args) == 1 and isinstance(e.args[0], int):
        code = e.args[0]  # OSError(errno.ENOSPC) with one argument leaves .errno unset
    if code:
        return os.strerror(code)
    return str(e) or type(e).__name__


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded, one-line repr of a user value for an error message; never fails (integers of
    thousands of digits and deeply nested lists are described instead of printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (list, dict, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    text = display(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stat_regular(path: Path, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileError(f"{what} {display(path)}: no such file") from None
    except OSError as e:
        raise FileError(f"{what} {display(path)}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{what} {display(path)}: not a regular file ({describe(st.st_mode)})")
    return st


def open_regular(path: str | os.PathLike[str], *, what: str = "file") -> BinaryIO:
    """`path` opened for reading in binary, refused (`FileError`) unless it is a regular file: checked
    before opening (opening a device can have effects) and again on the descriptor, opened
    non-blocking so a FIFO swapped in between cannot hang the process."""
    p = Path(path)
    _stat_regular(p, what)
    try:
        fd = os.open(p, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except OSError as e:
        raise FileError(f"{what} {display(p)}: cannot read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileError(f"{what} {display(p)}: not a regular file ({describe(st.st_mode)})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike[str], *, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, refused (`FileError`) when it holds more than `limit`."""
    with open_regular(path, what=what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileError(f"{what} {display(path)}: {size} bytes, more than the {limit} allowed")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise FileError(f"{what} {display(path)}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:  # grew since fstat
        raise FileError(f"{what} {display(path)}: more than the {limit} bytes allowed")
    return data


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    suffixes: Sequence[str] | None = None,
    what: str = "output",
) -> None:
    """Refuse (`FileError`) to write `path` unless it is safe and what the user asked for: a suffix
    outside `suffixes`, an existing target that is not a regular file (never replaced, never
    followed), one of `inputs`, or an existing regular file without `overwrite` is refused."""
    if not os.fspath(path):  # Path("") is "."
        raise FileError(f"{what} is empty; give a file name")
    p = Path(path)
    if not p.name or p.name in (".", ".."):
        raise FileError(f"{what} {display(p)!r} does not name a file")
    if suffixes is not None and p.name.lower() in suffixes:  # ".safetensors": a suffix, no name
        raise FileError(
            f"{what} {display(p)} has an empty name before {p.name}; give a name such as w{p.name}"
        )
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise FileError(f"{what} {display(p)} must end in {' or '.join(suffixes)}")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    except OSError as e:
        raise FileError(f"{what} {display(p)}: cannot use: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{what} {display(p)} exists and is {describe(st.st_mode)}; refusing to replace it")
    for source in inputs:
        try:
            if _same_file(st, os.stat(source)):
                raise FileError(f"{what} {display(p)} is the input file {display(source)}; choose another")
        except OSError:
            continue
    if not overwrite:
        raise FileError(kind="output_exists", what=what, path=p)


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        if any("\ud800" <= c <= "\udfff" for c in value):
            return display(value)
        return value
    if isinstance(value, dict):
        return {_strict(str(k)): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that always gives strict JSON: non-finite floats become null and strings
    with undecodable bytes (lone surrogates) are escaped as `display` does."""
    return json.dumps(_strict(value), allow_nan=False, **kwargs)
