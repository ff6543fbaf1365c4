"""atomic.write_bytes names the file the user asked for, whichever step fails: a read-only
folder (simulated: the tests run as root) fails on the temp file, whose name must not leak into
the one-line error; the old file is kept and no temp file is left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fashion_func import atomic


def _failing(real, errno_code: int, *, on: str):
    """`real` (os.open, os.unlink, os.replace, os.fsync) raising errno_code the way the OS does
    (strerror and the temp file's name) when its first argument's name matches `on`."""

    def fake(first, *args, **kwargs):
        name = str(first) if not isinstance(first, int) else f"fd {first}"
        if on in name:
            raise OSError(errno_code, os.strerror(errno_code), name)
        return real(first, *args, **kwargs)

    return fake


# (what fails, function patched, errno, which argument triggers it)
STEPS = {
    "stale temp unlink on a read-only filesystem": ("unlink", errno.EROFS, ".tmp"),
    "temp file creation in a read-only folder": ("open", errno.EACCES, ".tmp"),
    "fsync of the temp file": ("fsync", errno.EIO, "fd"),
    "rename over the target": ("replace", errno.EPERM, ".tmp"),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_every_failing_step_names_the_destination_not_the_temp_file(tmp_path: Path, monkeypatch, step):
    name, code, on = STEPS[step]
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, name, _failing(getattr(os, name), code, on=on))
    with pytest.raises(atomic.WriteError) as info:
        atomic.write_bytes(target, b"new", what="report file")
    monkeypatch.undo()
    message = str(info.value)
    assert message == f"cannot write report file {target}: {os.strerror(code)}"
    assert ".tmp" not in message
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_an_oserror_without_strerror_that_names_the_temp_file_is_rewritten(tmp_path: Path, monkeypatch):
    target = tmp_path / "out.bin"
    real = os.replace

    def fails(src, dst):
        raise OSError(f"cannot move {src}")

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(atomic.WriteError) as info:
        atomic.write_bytes(target, b"x")
    monkeypatch.setattr(os, "replace", real)
    assert str(info.value) == f"cannot write file {target}: cannot move {target}"


def test_a_directory_that_cannot_be_synced_names_the_file(tmp_path: Path, monkeypatch):
    target = tmp_path / "out.bin"
    real_open = os.open

    def dir_fails(path, flags, *args):
        if Path(path) == tmp_path:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", dir_fails)
    with pytest.raises(atomic.WriteError) as info:
        atomic.write_bytes(target, b"x")
    assert str(info.value).startswith(f"cannot write file {target}: cannot sync its directory: ")
