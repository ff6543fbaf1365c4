"""The run directory's lock: `<out>/.lock`, held with flock for the run."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from fashion_func.loop.errors import RunError
from fashion_func.safeio import describe, display, os_reason

__all__: list[str] = []

LOCK = ".lock"
_REFUSED = {  # what a failed open found where the lock goes
    errno.EISDIR: "is a directory, not a lock file of ours; remove it",
    errno.ELOOP: "is a symbolic link; remove it (it is never followed)",
}
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC


class Lock:
    """`<out>/.lock`, held with flock for the run.

    Opened without following links and without blocking (a FIFO or a symlink planted there
    is refused, never opened through), and only a regular file with one link is used. The
    pid goes in only once the caller has accepted the directory (`claim`), so a refused run
    changes nothing in it.
    """

    def __init__(self, out: Path) -> None:
        self.path, self.created = out / LOCK, False
        try:
            try:
                self.fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
                self.created = True
            except FileExistsError:
                self.fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno in _REFUSED:
                raise RunError(f"{display(self.path)} {_REFUSED[exc.errno]}") from None
            raise RunError(f"cannot write to run directory {display(out)}: {os_reason(exc)}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(self.fd)
            what = describe(st.st_mode) if not stat.S_ISREG(st.st_mode) else "a file with other hard links"
            raise RunError(f"{display(self.path)} is {what}, not a lock file of ours; remove it")
        self.previous = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunError(kind="in_use", out=out, pid=self.previous or "(unknown)") from None

    def claim(self) -> None:
        """Record our pid (the directory was accepted as a run directory)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self, *, remove: bool = False) -> None:
        """Unlock; a clean exit empties the file (a pid found later was left by a killed run)."""
        try:
            if remove and self.created and self._still_ours():
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)

    def _still_ours(self) -> bool:
        """The path still names the file we locked (not one reached through a folder swapped since)."""
        try:
            st, ours = os.lstat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[str | None]:
    """Hold `<out>/.lock` for the run; a second run into the same directory is refused.

    flock is released by the kernel when the holder dies, so a lock left by a killed
    run is never mistaken for a live one. Yields the pid a dead holder left in the file
    (a stale lock, now taken over), or None.
    """
    lock = Lock(out)
    try:
        lock.claim()
        yield lock.previous
    finally:
        lock.release()
