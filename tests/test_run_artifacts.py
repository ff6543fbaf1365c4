"""Every file a run writes is in `loop.RUN_ARTIFACTS`: checked before training, removed by overwrite."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from fashion_func import loop
from fashion_func.loop import RUN_ARTIFACTS, RunDir, RunError
from fashion_func.loop.artifacts import FOLDERS, MARKER

PKG = Path(__file__).resolve().parents[1] / "fashion_func"


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (links not followed) with what it is or holds."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = (
                f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes().hex()
            )
    return out


def a_run(tmp_path: Path) -> Path:
    """A run directory holding every artifact, as a finished run leaves it."""
    out = tmp_path / "run"
    with RunDir.open(out):
        pass
    for name in RUN_ARTIFACTS:
        p = out / name
        if name in FOLDERS:
            p.mkdir(exist_ok=True)
            (p / ("epoch-001.safetensors" if name == "checkpoints" else "events.out.tfevents.1")).write_bytes(
                b"x"
            )
        else:
            p.write_bytes(b"written by a run")
    return out


def test_the_list_holds_what_the_command_line_writes():
    assert "test.json" in RUN_ARTIFACTS and "members.json" in RUN_ARTIFACTS
    written = set()
    for path in (PKG / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("write_json", "write_bytes")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                written.add(node.args[0].value)
    assert {"test.json", "config.json", "summary.txt", "members.json"} <= written
    assert written <= set(RUN_ARTIFACTS), written - set(RUN_ARTIFACTS)


def test_a_run_directory_writes_no_name_outside_the_list(tmp_path: Path):
    with RunDir.open(tmp_path / "run") as run:
        run.write_json("test.json", {"ok": 1})
        with pytest.raises(ValueError, match="RUN_ARTIFACTS"):
            run.write_json("notes.json", {})
        with pytest.raises(ValueError, match="RUN_ARTIFACTS"):
            run.write_bytes("checkpoints", b"")
    assert (tmp_path / "run" / "test.json").read_text().strip().startswith("{")
    assert not (tmp_path / "run" / "notes.json").exists()


@pytest.mark.parametrize("name", RUN_ARTIFACTS)
@pytest.mark.parametrize("how", [{"resume": "auto"}, {"overwrite": True}])
def test_a_link_in_an_artifacts_place_is_refused_before_anything(tmp_path: Path, name: str, how: dict):
    out = a_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"someone else's")
    target = out / name
    if name in FOLDERS:
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    target.symlink_to(elsewhere if name in FOLDERS else elsewhere / "keep")
    before, outside = tree(out), tree(elsewhere)
    with pytest.raises(RunError) as info:
        with RunDir.open(out, **how):
            pytest.fail("the run started")
    assert info.value.kind == "link" and str(target) in str(info.value)
    assert tree(out) == before and tree(elsewhere) == outside


@pytest.mark.parametrize("name", RUN_ARTIFACTS)
@pytest.mark.parametrize("how", [{"resume": "auto"}, {"overwrite": True}])
def test_the_wrong_kind_of_file_in_an_artifacts_place_is_refused(tmp_path: Path, name: str, how: dict):
    out = a_run(tmp_path)
    target = out / name
    if name in FOLDERS:  # a file where the run keeps a folder
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
        target.write_bytes(b"a file")
    else:  # a folder where the run writes a file
        target.unlink()
        target.mkdir()
        (target / "inside").write_bytes(b"the user's")
    before = tree(out)
    with pytest.raises(RunError) as info:
        with RunDir.open(out, **how):
            pytest.fail("the run started")
    assert info.value.kind == "wrong_kind", info.value
    assert str(target) in str(info.value) and ("a folder" if name in FOLDERS else "a regular file") in str(
        info.value
    )
    assert tree(out) == before


def test_overwrite_removes_every_artifact_and_only_them(tmp_path: Path):
    out = a_run(tmp_path)
    (out / "notes.md").write_bytes(b"mine")
    with RunDir.open(out, overwrite=True) as run:
        left = sorted(p.name for p in out.iterdir())
        assert left == sorted([".lock", MARKER, "checkpoints", "notes.md", "train.log"])
        assert list(run.checkpoints.iterdir()) == []
        assert (out / "train.log").read_bytes() != b"written by a run"  # the new run's own log
    assert (out / "notes.md").read_bytes() == b"mine"


def test_the_package_exports_the_list():
    assert loop.RUN_ARTIFACTS is RUN_ARTIFACTS
