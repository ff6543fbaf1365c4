"""Files written whole or not at all (bytes, JSON, figures): a crash or a full disk leaves either
the old file or the new one, never a torn one. Every failure is a `WriteError` whose one-line
message names what was being written ("cannot write plot runs/x/loss.png: No space left on
device"). This module imports only `safeio`, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from fashion_func.safeio import describe, one_line, os_reason, strict_json

__all__ = ["WriteError", "write_bytes"]

FolderId = tuple[int, int]  # a folder's (st_dev, st_ino): which folder it is, whatever its path


def folder_id(path: str | os.PathLike[str]) -> FolderId:
    """The identity of the folder `path` (links followed): `write_bytes(..., folder=)` checks it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


class WriteError(Exception):
    """A file could not be written (disk full, not writable, ...); the previous file is untouched."""


def write_bytes(
    path: str | os.PathLike[str], data: bytes, *, what: str = "file", folder: FolderId | None = None
) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one: to
    `.{name}.{pid}.tmp` beside it (the same filesystem: the rename is atomic), fsynced, `os.replace`d
    over `path`, the directory fsynced so the rename survives a power cut. On any OSError the temp
    file is removed, the old file left as it was, and `WriteError` ("cannot write {what} {path}:
    reason", never the temp name) raised. A target that is not a regular file is never replaced.
    `folder`: the identity (`folder_id`) `path`'s folder must still have, checked before the temp
    file is made and just before the rename (a folder swapped for a link is never written into)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        target = os.lstat(path)
    except OSError:
        target = None
    if target is not None and not stat.S_ISREG(target.st_mode):
        # os.replace would put a regular file in place of a device, FIFO or link: never
        raise WriteError(
            one_line(f"cannot write {what} {path}: it is {describe(target.st_mode)}, not a regular file")
        )
    _check_folder(path, folder, what)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # our own name, left by a killed process of the same pid (EROFS: read-only)
        # "x" (O_EXCL) and O_NOFOLLOW: a link planted under the temp name is never written through
        with open(tmp, "xb", opener=_nofollow) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _check_folder(path, folder, what)  # swapped while the bytes were written? just before the rename
        os.replace(tmp, path)
    except BaseException as e:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            reason = os_reason(e).replace(str(tmp), str(path))  # an OSError without strerror names it
            raise WriteError(one_line(f"cannot write {what} {path}: {reason}")) from e
        raise
    _fsync_dir(path, what)


def write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    what: str = "file",
    strict: bool = False,
    folder: FolderId | None = None,
) -> None:
    """`obj` as indented JSON plus a newline, written atomically (`write_bytes`, `folder` too):
    `strict`, strict JSON (`safeio.strict_json`) for files other programs read; otherwise Python's,
    which writes NaN and infinities as `NaN` / `Infinity`."""
    text = strict_json(obj, indent=2) if strict else json.dumps(obj, indent=2, allow_nan=True)
    write_bytes(path, (text + "\n").encode(), what=what, folder=folder)


def write_figure(
    path: str | os.PathLike[str],
    fig: Any,
    *,
    what: str = "plot",
    folder: FolderId | None = None,
    **savefig: Any,
) -> None:
    """A matplotlib figure as PNG, written atomically (`write_bytes`, `folder` too); the figure
    is closed. `savefig` goes to `fig.savefig` (e.g. `bbox_inches="tight"`).
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **savefig)
    finally:
        plt.close(fig)
    write_bytes(path, buf.getvalue(), what=what, folder=folder)


def _check_folder(path: Path, folder: FolderId | None, what: str) -> None:
    """WriteError unless `path`'s folder is still `folder` (None: no check)."""
    if folder is None:
        return
    try:
        now: FolderId | None = folder_id(path.parent)
    except OSError:
        now = None
    if now != folder:
        raise WriteError(
            one_line(
                f"cannot write {what} {path}: its folder {path.parent} is no longer the one opened for it "
                "(replaced by a link or another folder); refusing to write outside it"
            )
        )


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)


def _fsync_dir(path: Path, what: str) -> None:
    """fsync the directory holding `path` (just renamed into place); errors name `path`."""
    directory = path.parent
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:  # Windows: directories cannot be opened; the rename is as durable as it gets
        return
    try:
        fd = os.open(directory, os.O_RDONLY | flag)
    except OSError as e:
        raise WriteError(
            one_line(f"cannot write {what} {path}: cannot sync its directory: {os_reason(e)}")
        ) from e
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; the file itself is already in place.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise WriteError(
                one_line(f"{what} {path}: renamed into place but cannot sync its directory: {os_reason(e)}")
            ) from e
    finally:
        os.close(fd)
