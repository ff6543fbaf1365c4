"""Installed like any package: build the wheel, install it without dependencies into a
temporary target, and from outside the repository train, predict and export with the
installed `fashion-func` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    tmp = tmp_path_factory.mktemp("install")
    # build from a copy, so the build leaves no build/ or egg-info in the checkout
    src = tmp / "src"
    shutil.copytree(ROOT / "fashion_func", src / "fashion_func", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the PEP 517 hooks pip would call; -W error: a metadata or packaging warning fails the build
    dist = tmp / "dist"
    hooks = f"import setuptools.build_meta as b; b.build_wheel({str(dist)!r}); b.build_sdist({str(dist)!r})"
    _run([sys.executable, "-W", "error", "-c", hooks], src, env)
    (wheel,) = dist.glob("fashion_func-*.whl")
    assert len(list(dist.glob("fashion_func-*.tar.gz"))) == 1
    target = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], tmp, env)
    return target, {**env, "PYTHONPATH": str(target)}, wheel


def test_wheel_holds_the_package_its_license_and_type_marker(installed):
    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "fashion_func/py.typed" in names and "fashion_func/cli/presets/tutorial.toml" in names
    assert "fashion_func/loop/fit.py" in names and "fashion_func/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fashion-func = fashion_func.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


@pytest.mark.slow
def test_installed_command_trains_predicts_and_exports_outside_the_repository(installed, tmp_path):
    target, env, _ = installed
    command = [str(target / "bin" / "fashion-func")]
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = "import fashion_func; print(fashion_func.__file__, fashion_func.__version__)"
    where = _run([sys.executable, "-c", probe], work, env).stdout.split()
    assert Path(where[0]).is_relative_to(target) and where[1] == "0.1.0"  # the installed copy
    assert _run([*command, "--version"], work, env).stdout.strip() == "fashion-func 0.1.0"
    for sub in ("train", "predict", "export"):
        assert _run([*command, sub, "--version"], work, env).stdout.strip() == "fashion_func 0.1.0"

    train = [
        "train",
        "--preset",
        "tutorial",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--limit-train",
        "512",
        "--limit-val",
        "200",
        "--device",
        "cpu",
        "--compile",
        "off",
        "--no-progress",
        "--out",
        "run",
    ]
    _run([*command, *train], work, env)  # fmt: skip
    best = work / "run" / "checkpoints" / "best.safetensors"
    history = json.loads((work / "run" / "history.json").read_text())
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["seed"] == 1024  # the preset, read as package data of the installed copy
    assert [r["epoch"] for r in history] == [1] and history[0]["val_acc"] > 0.3

    out = _run([*command, "predict", "--weights", str(best), "--limit", "200", "--json", "--device", "cpu"],
               work, env).stdout  # fmt: skip
    report = json.loads(out.strip().splitlines()[-1])
    assert report["model"] == "mlp" and report["accuracy"] == pytest.approx(history[0]["val_acc"], abs=1e-12)

    _run([*command, "export", "--weights", str(best), "--format", "numpy", "--out", "w.npz"], work, env)
    _run([sys.executable, "-m", "fashion_func", "export", "--weights", str(best), "--format", "torch",
          "--out", "w.safetensors"], work, env)  # fmt: skip
    exported = safetensors.torch.load_file(work / "w.safetensors")
    assert set(exported) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}
    assert (work / "w.npz").stat().st_size > 0
    assert sorted(p.name for p in work.iterdir()) == ["run", "w.npz", "w.safetensors"]  # nothing else written
