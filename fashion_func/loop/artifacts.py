"""The files a run writes (`RUN_ARTIFACTS`), found, checked and removed without following links."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fashion_func.loop.errors import RunError
from fashion_func.safeio import describe, display

__all__: list[str] = []

LAST = "last.safetensors"
BEST = "best.safetensors"
# Every file and folder a run writes into its directory (the library's and its clients'):
# checked before training starts, removed by `overwrite`; `RunDir` writes no other name.
RUN_ARTIFACTS = (
    "config.json",
    "train.log",
    "summary.txt",
    "history.json",
    "loss.png",
    "accuracy.png",
    "tensorboard",
    "checkpoints",
    "members.json",
    "test.json",
)
FOLDERS = frozenset({"tensorboard", "checkpoints"})  # the artifacts that are folders


MARKER = ".fashion-func-run"  # JSON {"run_id": ..., "created": ...}: this directory is a run's
_WEIGHT_FILE = re.compile(r"(last|best|epoch-\d+)\.safetensors")
_EVENTS_FILE = re.compile(r"events\.out\.tfevents\..+")
_MEMBER_DIR = re.compile(r"member-\d+")  # checkpoints/member-<k>/: an ensemble member's weights
_TEMP = re.compile(r"\.(?P<name>.+)\.\d+\.tmp")  # atomic.write_bytes' temp names: .<name>.<pid>.tmp


def our_temp(directory: Path, name: str) -> bool:
    m = _TEMP.fullmatch(name)
    if m is None:
        return False
    inner = m.group("name")
    if directory.name == "checkpoints" or _MEMBER_DIR.fullmatch(directory.name):
        return bool(_WEIGHT_FILE.fullmatch(inner))
    return inner in RUN_ARTIFACTS or inner == MARKER


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temp files a killed run left mid-write (we hold the lock): only our writer's names
    (`.<file>.<pid>.tmp` for a file a run writes) and only regular files (a user's `.notes.tmp` stays)."""
    stale = []
    for d in (out, out / "checkpoints", *member_dirs(out / "checkpoints")):
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if our_temp(d, p.name) and stat.S_ISREG(p.lstat().st_mode):
                p.unlink(missing_ok=True)
                stale.append(p)
    return stale


def member_dirs(checkpoints: Path) -> list[Path]:
    """The ensemble members' folders in `checkpoints` that are real folders (links excluded)."""
    if not checkpoints.is_dir() or checkpoints.is_symlink():
        return []
    found = [p for p in checkpoints.iterdir() if _MEMBER_DIR.fullmatch(p.name)]
    return sorted(p for p in found if p.is_dir() and not p.is_symlink())


def member_folder(checkpoints: Path, member: int) -> Path:
    """`checkpoints/member-<kk>/`, created if missing; RunError (one line) for a link or a file
    of another kind there: a run's files are never reached through a link."""
    folder = checkpoints / f"member-{member:02d}"
    st = lstat(folder)
    if st is None:
        folder.mkdir()
    elif not stat.S_ISDIR(st.st_mode):
        raise RunError(f"{display(folder)} is {describe(st.st_mode)}, not the member's folder; remove it")
    return folder


def lstat(path: Path) -> os.stat_result | None:
    """`path`'s own status (a link not followed), or None when there is nothing there (also
    when a parent is a file: `checkpoints` as a file has no `checkpoints/last.safetensors`)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def removable(out: Path) -> list[Path]:
    """What `overwrite=True` deletes: the files a run writes, found without following any link;
    RunError, before anything is deleted, for a link or a file of another kind under such a name."""
    found: list[Path] = []
    for name in RUN_ARTIFACTS:
        p = out / name
        st = lstat(p)
        if st is None:
            continue
        if name in ("checkpoints", "tensorboard"):
            if not stat.S_ISDIR(st.st_mode):
                raise RunError(
                    kind="overwrite_refused", path=p, what=f"{describe(st.st_mode)}, not the run's folder"
                )
            if name == "checkpoints":
                found += _removable_members(p)
            # the folder itself is removed at the end if nothing of the user's is left in it
            found += [*_our_files(p, _WEIGHT_FILE if name == "checkpoints" else _EVENTS_FILE), p]
        elif stat.S_ISREG(st.st_mode):
            found.append(p)
        else:
            raise RunError(kind="overwrite_refused", path=p, what=f"{describe(st.st_mode)}, not a run's file")
    return found


def _removable_members(checkpoints: Path) -> list[Path]:
    """The ensemble members' weight files and folders under `checkpoints` (never through a link)."""
    found: list[Path] = []
    for folder in sorted(checkpoints.iterdir()):
        if not _MEMBER_DIR.fullmatch(folder.name):
            continue
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise RunError(kind="overwrite_refused", path=folder, what=describe(st.st_mode))
        found += [*_our_files(folder, _WEIGHT_FILE), folder]  # the folder: removed if left empty
    return found


def _our_files(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The files in `folder` a run writes (named by `pattern`, or our temp names); RunError for
    one that is not a regular file."""
    found = []
    for child in sorted(folder.iterdir()):
        if pattern.fullmatch(child.name) or our_temp(folder, child.name):
            mode = child.lstat().st_mode
            if not stat.S_ISREG(mode):
                raise RunError(kind="overwrite_refused", path=child, what=describe(mode))
            found.append(child)
    return found


def remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):  # a user's own file in it: keep the folder
                p.rmdir()
        else:
            p.unlink(missing_ok=True)


def refuse_links(out: Path) -> None:
    """A run's files are never reached through a symbolic link (it could lead out of `out`), and
    each is what a run writes there: a regular file, or a folder for `FOLDERS` (RunError)."""
    checkpoints = out / "checkpoints"
    members = [] if lstat(checkpoints) is None or checkpoints.is_symlink() or not checkpoints.is_dir() else [
        p for p in checkpoints.iterdir() if _MEMBER_DIR.fullmatch(p.name)
    ]  # fmt: skip
    # the weight files too: a last.safetensors linked into another run is never read or replaced
    real = [d for d in (checkpoints, *members) if d.is_dir() and not d.is_symlink()]
    weights = [p for d in real for p in d.iterdir() if _WEIGHT_FILE.fullmatch(p.name)]
    for path in [*(out / name for name in RUN_ARTIFACTS), *members, *weights]:
        st = lstat(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise RunError(kind="link", path=path)
        folder = path.name in FOLDERS or (path.parent != out and not _WEIGHT_FILE.fullmatch(path.name))
        if st is not None and not (stat.S_ISDIR if folder else stat.S_ISREG)(st.st_mode):
            expected = "a folder" if folder else "a regular file"
            raise RunError(kind="wrong_kind", path=path, what=describe(st.st_mode), expected=expected)


@dataclass(frozen=True)
class Snapshot:
    """What a run directory held when a run opened it, to undo a run that fails to start."""

    names: frozenset[str]  # in out, out/checkpoints and its member-<k> folders, relative to out
    last: tuple[int, int] | None  # last.safetensors' (inode, mtime): a new save changes it

    @classmethod
    def take(cls, out: Path) -> Snapshot:
        names = {p.name for p in out.iterdir()}
        ck = out / "checkpoints"
        if ck.is_dir() and not ck.is_symlink():
            names |= {f"checkpoints/{p.name}" for p in ck.iterdir()}
        for folder in member_dirs(ck):  # an ensemble's per-member weights
            names |= {f"checkpoints/{folder.name}/{p.name}" for p in folder.iterdir()}
        return cls(frozenset(names), _identity(ck / LAST))

    def undo(self, out: Path) -> None:
        """Remove what a run that saved no resume point added (it failed before training)."""
        if _identity(out / "checkpoints" / LAST) != self.last:
            return  # a resume point was saved: keep everything that goes with it
        with contextlib.suppress(OSError, RunError):
            new = [p for p in removable(out) if p.relative_to(out).as_posix() not in self.names]
            marker = out / MARKER
            remove([*new, *([marker] if MARKER not in self.names else [])])


def _identity(path: Path) -> tuple[int, int] | None:
    st = lstat(path)
    return None if st is None else (st.st_ino, st.st_mtime_ns)
