"""Property-based fuzz of the three commands (issue 17, item 12), run in this process.

Random flag sets and config files for `train` (wrong types, out of range, huge, empty,
unicode, paths to odd kinds of file: FIFOs, symlinks, devices, directories), random flags for
`predict` and `export`, and random metadata (every field's type and range) in otherwise
valid checkpoints for `--resume`, `predict` and `export`. Every call must end in exit 0, or in
one line on stderr with a documented status (2 usage/input, 3 diverged), never a traceback,
and touch no file outside its `--out`. Hypothesis runs derandomized, so the suite sees the same
cases every run (at least 200 in all: see the `max_examples` below).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import make_dataset  # tests/ is on sys.path under pytest

from fashion_func import checkpoint, models
from fashion_func import state as state_lib
from fashion_func.cli import app, export, predict
from fashion_func.cli.config import Config
from fashion_func.cli.train import main_train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs and devices")

FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
DOCUMENTED = {"train.py": {0, 2, 3}, "predict.py": {0, 2}, "export.py": {0, 2}}

# values of every kind: right, wrong type, out of range, huge, empty, unicode, control characters
WILD = st.one_of(
    st.sampled_from(["0", "1", "-1", "3", "0.5", "1e-3", "nan", "inf", "-inf", "1e999", "", " ", "true"]),
    st.sampled_from(["9" * 30, "9" * 5000, "x\x1b[31m", "ünï", "\ud800", "--lr", "/", "auto"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)
TRAIN_FLAGS = {
    "--model": st.sampled_from(["mlp", "simplenet", "resnet900", ""]),
    "--batch-size": WILD, "--lr": WILD, "--optimizer": st.sampled_from(["adam", "adamw", "sgd", "lion"]),
    "--weight-decay": WILD, "--momentum": WILD, "--clip-norm": WILD, "--label-smoothing": WILD,
    "--seed": WILD, "--monitor": st.sampled_from(["val_loss", "val_acc", "val_top5", "train_top3", "bogus"]),
    "--mode": st.sampled_from(["min", "max", "sideways"]), "--patience": WILD, "--min-delta": WILD,
    "--topk": WILD, "--save-top-k": WILD, "--save-every": WILD, "--save-best-only": WILD,
    "--lr-schedule": st.sampled_from(["constant", "step", "cosine", "plateau", "warp"]),
    "--lr-step-size": WILD, "--lr-gamma": WILD, "--normalize": st.sampled_from(["dataset", "tutorial", "x"]),
    "--eval-batch-size": WILD, "--precision": st.sampled_from(["fp32", "bf16", "fp8"]),
    "--resume": st.sampled_from(["auto", "KIND", "nope.safetensors"]),
    "--preset": st.sampled_from(["tutorial", "x"]),
}  # fmt: skip
SWITCHES = ["--overwrite", "--no-tensorboard", "--help", "--version", "--bogus"]
KINDS = ["new", "fifo", "symlink", "file", "device", "dir", "run", "user"]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, Any]:
    """Every entry under `root` except those under `skip`: kind and content, links unfollowed."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            if p.is_symlink():
                found[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                found[str(p)] = ("file", p.read_bytes())
            else:
                found[str(p)] = ("other", p.stat().st_mode)
    return found


def make_kind(box: Path, kind: str, ref: Path) -> Path:
    """A path of the given kind inside the sandbox `box` (`ref`: a finished run to copy)."""
    p = box / f"target-{kind}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "symlink":
        (box / "victim").write_text("the user's")
        p.symlink_to(box / "victim")
    elif kind == "file":
        p.write_text("the user's")
    elif kind == "device":
        p.symlink_to("/dev/null")
    elif kind == "dir":
        p.mkdir()
    elif kind == "run":
        shutil.copytree(ref, p, symlinks=True)
    elif kind == "user":
        (p / "checkpoints").mkdir(parents=True)
        (p / "train.log").write_text("the user's")
    return p


def check_ending(prog: str, code: int, err: str) -> None:
    assert "Traceback" not in err and "Logging error" not in err, err
    assert code in DOCUMENTED[prog], (code, err)
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err


def call(
    main: Callable[[Sequence[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # --help / --version
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    make_dataset(root / "data", n_train=32, n_test=8)
    cfg = Config(
        model="mlp", epochs=1, batch_size=16, data_dir=str(root / "data"), out=str(root / "run"),
        device="cpu", compile=False, tensorboard=False, progress=False,
    )  # fmt: skip
    app.train(cfg)
    return {"root": root, "data": root / "data", "run": root / "run"}


@contextlib.contextmanager
def sandbox(world: dict[str, Path]) -> Iterator[Path]:
    """A fresh folder under the world's root for one example, removed after it: each example
    snapshots the whole root twice, which must stay the world's size, not grow by every box
    so far (a copied run is about 1.3 MB; 220 examples would read hundreds of MB each)."""
    box = Path(tempfile.mkdtemp(prefix="box-", dir=world["root"]))
    try:
        yield box
    finally:
        shutil.rmtree(box, ignore_errors=True)


FIXED = [
    "--limit-train",
    "32",
    "--limit-val",
    "8",
    "--epochs",
    "1",
    "--no-compile",
    "--no-progress",
    "--device",
    "cpu",
]


@settings(max_examples=120, **FUZZ)
@given(
    flags=st.dictionaries(st.sampled_from(sorted(TRAIN_FLAGS)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: TRAIN_FLAGS[k] for k in keys})
    ),
    switches=st.lists(st.sampled_from(SWITCHES), max_size=2),
    out_kind=st.sampled_from(KINDS),
    config=st.none()
    | st.dictionaries(
        st.sampled_from(["lr", "seed", "out", "lr_step_size", "model", "x"]), JSONISH, max_size=3
    ),
)
def test_fuzz_train_flags_and_config_files(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], flags: dict[str, str], switches: list[str],
    out_kind: str, config: dict[str, Any] | None,
) -> None:  # fmt: skip
    with sandbox(world) as box:
        out = make_kind(box, out_kind, world["run"])
        argv: list[str] = []
        for flag, value in flags.items():
            value = (
                str(make_kind(box, "run", world["run"]) / "checkpoints" / "last.safetensors")
                if value == "KIND"
                else value
            )
            argv += [flag, value]
        if config is not None:
            try:
                (box / "c.json").write_text(json.dumps(config))
            except (ValueError, UnicodeEncodeError):
                (box / "c.json").write_text("{")
            argv += ["--config", str(box / "c.json")]
        argv += [*switches, "--out", str(out), "--data-dir", str(world["data"]), "--no-tensorboard", *FIXED]
        before = snapshot(world["root"], skip=out)
        code, err = call(main_train, argv, capsys)
        check_ending("train.py", code, err)
        assert snapshot(world["root"], skip=out) == before


# private training's flags, alone and together, with the wild values and a few that train: each
# ends in exit 0 or one line, within a time bound (a search for sigma or PRV's grid never hangs)
PRIVACY_FLAGS = {
    "--dp-noise-multiplier": WILD | st.sampled_from(["1.0", "1e-300", "1e308", "0.05"]),
    "--dp-target-epsilon": WILD | st.sampled_from(["3", "1e-6", "1e9"]),
    "--dp-max-grad-norm": WILD | st.sampled_from(["1.0", "0.1"]),
    "--dp-delta": WILD | st.sampled_from(["1e-5", "0.5"]),
    "--dp-accountant": st.sampled_from(["rdp", "prv", "pld", ""]),
    "--model": st.sampled_from(["mlp", "dpcnn", "simplenet_bn"]),
    "--batch-size": st.sampled_from(["1", "8", "0"]),
}  # fmt: skip


@settings(max_examples=25, **FUZZ)
@given(
    flags=st.dictionaries(st.sampled_from(sorted(PRIVACY_FLAGS)), st.none(), min_size=1, max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: PRIVACY_FLAGS[k] for k in keys})
    ),
)
def test_fuzz_privacy_flags(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], flags: dict[str, str]
) -> None:
    with sandbox(world) as box:
        argv = [item for flag, value in flags.items() for item in (flag, value)]
        argv += ["--out", str(box / "run"), "--data-dir", str(world["data"]), "--no-tensorboard", *FIXED]
        before = snapshot(world["root"], skip=box)
        start = time.monotonic()
        code, err = call(main_train, argv, capsys)
        assert time.monotonic() - start < 60, (argv, "took over a minute")
        check_ending("train.py", code, err)
        assert snapshot(world["root"], skip=box) == before


def _weights_argv(box: Path, world: dict[str, Path], kind: str) -> Path:
    if kind == "run":
        return world["run"] / "checkpoints" / "best.safetensors"
    (box / "weights").mkdir()
    return make_kind(box / "weights", kind, world["run"])


@settings(max_examples=40, **FUZZ)
@given(
    weights_kind=st.sampled_from(["run", "fifo", "dir", "device", "file", "new"]),
    out_kind=st.sampled_from(KINDS),
    fmt=st.sampled_from(["torch", "flax", "numpy", "onnx", "zip"]),
    suffix=st.sampled_from([".safetensors", ".npz", ".txt", ""]),
    extra=st.lists(
        st.sampled_from(["--overwrite", "--model", "mlp", "--bf16-as", "uint16", "--bogus"]), max_size=3
    ),
    images=st.lists(st.sampled_from(["fifo", "device", "dir", "file", "new", "png"]), max_size=3),
    predict_flags=st.dictionaries(
        st.sampled_from(["--limit", "--topk", "--batch-size", "--max-image-pixels", "--num-confused"]),
        WILD,
        max_size=3,
    ),
)
def test_fuzz_predict_and_export(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], weights_kind: str, out_kind: str, fmt: str,
    suffix: str, extra: list[str], images: list[str], predict_flags: dict[str, str],
) -> None:  # fmt: skip
    from PIL import Image

    with sandbox(world) as box:
        weights = _weights_argv(box, world, weights_kind)
        target = make_kind(box, out_kind, world["run"])
        out = target.with_name(target.name + suffix) if out_kind == "new" else target
        before = snapshot(world["root"], skip=out)
        code, err = call(
            export.main, ["--weights", str(weights), "--format", fmt, "--out", str(out), *extra], capsys
        )
        check_ending("export.py", code, err)
        assert snapshot(world["root"], skip=out) == before

        paths = []
        for i, kind in enumerate(images):
            if kind == "png":
                Image.new("L", (40, 30), 200).save(box / f"{i}.png")
                paths.append(str(box / f"{i}.png"))
            else:
                (box / f"img{i}").mkdir()
                paths.append(
                    str(make_kind(box / f"img{i}", kind, world["run"])) if kind != "device" else "/dev/zero"
                )
        argv = ["--weights", str(weights), "--data-dir", str(world["data"]), "--json"]
        argv += [x for kv in predict_flags.items() for x in kv] + (["--images", *paths] if paths else [])
        if out_kind != "new":
            argv += ["--out", str(out)]
        before = snapshot(world["root"], skip=out)
        code, err = call(predict.main, argv, capsys)
        check_ending("predict.py", code, err) if not paths or code == 0 else None
        if paths and code != 0:  # one line per unusable image, each naming it
            assert (
                "Traceback" not in err
                and code == 2
                and all(line.startswith("predict.py: ") for line in err.splitlines())
            )
        assert snapshot(world["root"], skip=out) == before


META_KEYS = [
    "epoch",
    "lr",
    "in_epoch",
    "callbacks",
    "history",
    "config",
    "model",
    "normalize_mean",
    "monitor",
]


@settings(max_examples=60, **FUZZ)
@given(
    edits=st.dictionaries(
        st.sampled_from(META_KEYS), st.none() | JSONISH.map(lambda v: ("set", v)), min_size=1, max_size=3
    ),
    config_edits=st.dictionaries(
        st.sampled_from(["lr", "seed", "out", "epochs", "momentum", "model", "batch_size"]),
        JSONISH,
        max_size=2,
    ),
    command=st.sampled_from(["resume-auto", "resume-path", "predict", "export"]),
)
def test_fuzz_metadata_of_valid_checkpoints(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], edits: dict[str, Any],
    config_edits: dict[str, Any], command: str,
) -> None:  # fmt: skip
    with sandbox(world) as box:
        run = make_kind(box, "run", world["run"])
        name = "best.safetensors" if command in ("predict", "export") else "last.safetensors"
        path = run / "checkpoints" / name
        meta = checkpoint.read_metadata(path)
        for key, edit in edits.items():
            if edit is None:
                meta.pop(key, None)
            else:
                meta[key] = edit[1]
        if isinstance(meta.get("config"), dict):
            meta["config"] = {**meta["config"], **config_edits}
        try:
            json.dumps(meta)
        except (ValueError, TypeError):
            return  # not storable as metadata: nothing to load
        if name == "last.safetensors":
            params = models.get("mlp").init(torch.Generator().manual_seed(0))
            template = state_lib.create(params, app.build_optimizer(Config(model="mlp")), seed=0)
            checkpoint.save_state(path, checkpoint.load_state(path, template)[0], metadata=meta)
        else:
            checkpoint.save_weights(path, checkpoint.load_weights(path)[0], metadata=meta)
        if command.startswith("resume"):
            resume = "auto" if command == "resume-auto" else str(path)
            prog, main = "train.py", main_train
            argv = [
                "--resume",
                resume,
                "--out",
                str(run),
                "--data-dir",
                str(world["data"]),
                "--epochs",
                "2",
                "--no-progress",
            ]
            out = run
        elif command == "predict":
            prog, main, out = "predict.py", predict.main, box / "report"
            argv = ["--weights", str(path), "--data-dir", str(world["data"]), "--json", "--out", str(out)]
        else:
            prog, main, out = "export.py", export.main, box / "e.safetensors"
            argv = ["--weights", str(path), "--format", "flax", "--out", str(out)]
        before = snapshot(world["root"], skip=out)
        code, err = call(main, argv, capsys)
        check_ending(prog, code, err)
        assert snapshot(world["root"], skip=out) == before
