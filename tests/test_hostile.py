"""Careless or hostile input at the command line: run directories that are not ours, links, FIFOs and
devices where files are expected, huge or malformed data, images and metadata, a diverged run.

Each test goes through the command-line entry points in this process and checks the promise of
README.md's "Guarantees" table: one line on stderr and exit 2 for bad input, nothing written outside
`--out`, nothing of the user's touched. Bad flag and config values are one table in
tests/test_usage_errors.py, bad checkpoints in tests/test_checkpoint.py; the property-based fuzz of
the three commands is in tests/test_fuzz_cli.py.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data import make_dataset  # tests/ is on sys.path under pytest
from test_reliability import one_error_line

from fashion_func import callbacks as cbs
from fashion_func import checkpoint
from fashion_func.cli import app
from fashion_func.cli import train as cli
from fashion_func.cli.config import Config, ConfigError, load_file
from fashion_func.cli.train import main_train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, devices, O_NOFOLLOW")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "data"
    make_dataset(d, n_train=64, n_test=16)
    return d


def tiny_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "mlp", "--epochs", "1", "--batch-size", "32", "--data-dir", str(data_dir),
        "--out", str(out), "--device", "cpu", "--no-compile", "--no-tensorboard", "--no-progress", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- config values


def test_config_file_is_bounded_and_must_be_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20) + b"{}")
    for path, match in (
        (Path("/dev/zero"), "not a regular file (a character device)"),
        (fifo, "not a regular file (a named pipe (FIFO))"),
        (tmp_path, "not a regular file (a directory)"),
        (big, "more than the 1048576 allowed"),
    ):
        with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
            load_file(path)


def test_lr_step_size_in_a_config_file_turns_step_decay_on_like_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr_step_size": 2}))
    cfg, _ = cli.parse_train_args(["--config", str(path)])
    assert (cfg.lr_schedule, cfg.lr_step_size) == ("step", 2)
    assert cli.parse_train_args(["--lr-step-size", "2"])[0] == cfg
    path.write_text(json.dumps({"lr_step_size": 2, "lr_schedule": "cosine"}))  # an explicit one wins
    assert cli.parse_train_args(["--config", str(path)])[0].lr_schedule == "cosine"


def test_config_values_are_checked_in_the_library_too() -> None:
    with pytest.raises(ConfigError, match="--momentum must be in"):
        Config(momentum=float("nan"))
    with pytest.raises(ConfigError, match="--seed must be in"):
        Config(seed=2**64)
    assert Config(seed=2**63 - 1).seed == 2**63 - 1


# --------------------------------------------------------------------------- the run directory


def tree_bytes(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root` (links as their target text, files as bytes), for before/after."""
    found: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            found[key] = f"-> {os.readlink(p)}"
        elif p.is_file():
            found[key] = p.read_bytes()
        else:
            found[key] = "dir"
    return found


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main_train(argv)
    return code, capsys.readouterr().err


def test_resume_from_a_copied_runs_checkpoint_never_writes_into_another_run(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's recipe: train A, copy it to B, train A on, then resume B's checkpoint."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert run_cli(tiny_argv(tiny_data, a), capsys)[0] == 0
    shutil.copytree(a, b, symlinks=True)
    assert run_cli(tiny_argv(tiny_data, a, "--epochs", "2", "--resume", "auto"), capsys)[0] == 0
    a_before = tree_bytes(a)
    b_last = b / "checkpoints" / "last.safetensors"
    # no --out: the run goes on in the checkpoint's own directory, B (its saved config says A)
    data_flags = ["--data-dir", str(tiny_data), "--no-progress"]
    assert run_cli(["--resume", str(b_last), "--epochs", "2", *data_flags], capsys)[0] == 0
    assert [r["epoch"] for r in json.loads((b / "history.json").read_text())] == [1, 2]
    assert tree_bytes(a) == a_before
    # pointing --out at A, which holds another run: refused, A untouched
    code, err = run_cli(["--resume", str(b_last), "--out", str(a), "--epochs", "3", *data_flags], capsys)
    assert code == 2 and "already holds another run" in one_error_line(err)
    assert tree_bytes(a) == a_before
    # a checkpoint outside any run directory needs --out
    loose = tmp_path / "loose.safetensors"
    shutil.copy(b_last, loose)
    code, err = run_cli(["--resume", str(loose), "--epochs", "3", *data_flags], capsys)
    assert code == 2 and "pass --out" in one_error_line(err)
    # ... and into a new directory it is fine
    assert (
        run_cli(["--resume", str(loose), "--out", str(tmp_path / "C"), "--epochs", "3", *data_flags], capsys)[
            0
        ]
        == 0
    )
    assert tree_bytes(a) == a_before


@pytest.mark.parametrize("kind", ["symlink", "fifo", "hardlink", "directory"])
def test_a_lock_that_is_not_our_regular_file_is_refused_and_nothing_is_truncated(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    out = tmp_path / "run"
    assert run_cli(tiny_argv(tiny_data, out), capsys)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = out / ".lock"
    lock.unlink()
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "hardlink":
        os.link(victim, lock)
    else:
        lock.mkdir()
    before = tree_bytes(out)
    code, err = run_cli(tiny_argv(tiny_data, out, "--epochs", "2", "--resume", "auto"), capsys)
    assert code == 2
    line = one_error_line(err)
    assert str(lock) in line and "remove it" in line, line
    assert victim.read_text() == "precious"
    assert tree_bytes(out) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "thesis"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "chapter1.pt").write_bytes(b"years of work")
    (mine / "train.log").write_text("my own log")
    before = tree_bytes(mine)
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        code, err = run_cli(tiny_argv(tiny_data, mine, *extra), capsys)
        assert code == 2 and "not a fashion_func run" in one_error_line(err), (extra, err)
        assert tree_bytes(mine) == before


@pytest.mark.parametrize("name", ["checkpoints", "tensorboard", "train.log"])
def test_overwrite_never_follows_a_link_out_of_the_run_directory(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / "run"
    assert run_cli(tiny_argv(tiny_data, out), capsys)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "last.safetensors").write_bytes(b"someone else's")
    (elsewhere / "events.out.tfevents.1").write_bytes(b"someone else's")
    target = out / name
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(elsewhere if name != "train.log" else elsewhere / "last.safetensors")
    before, outside = tree_bytes(out), tree_bytes(elsewhere)
    for extra in (["--overwrite"], ["--resume", "auto", "--epochs", "2"]):
        code, err = run_cli(tiny_argv(tiny_data, out, *extra), capsys)
        line = one_error_line(err)
        assert code == 2 and ("symbolic link" in line or "--resume" in extra), line
        assert tree_bytes(out) == before and tree_bytes(elsewhere) == outside


def test_overwrite_removes_only_what_a_run_wrote(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert run_cli(tiny_argv(tiny_data, out, "--save-best-only", "false"), capsys)[0] == 0
    (out / "notes.md").write_text("mine")
    (out / "checkpoints" / "notes.md").write_text("mine too")
    assert run_cli(tiny_argv(tiny_data, out, "--overwrite"), capsys)[0] == 0
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "checkpoints" / "notes.md").read_text() == "mine too"
    assert not (out / "checkpoints" / "epoch-001.safetensors").exists()  # the old run's, removed


def test_stale_temp_cleanup_removes_only_our_temp_names(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert run_cli(tiny_argv(tiny_data, out), capsys)[0] == 0
    users = [out / ".thesis.tmp", out / "checkpoints" / ".notes.tmp", out / ".draft.1234.tmp"]
    for p in users:
        p.write_text("the user's")
    ours = [out / ".history.json.99999.tmp", out / "checkpoints" / ".last.safetensors.99999.tmp"]
    for p in ours:
        p.write_bytes(b"half written")
    assert run_cli(tiny_argv(tiny_data, out, "--epochs", "2", "--resume", "auto"), capsys)[0] == 0
    assert all(p.read_text() == "the user's" for p in users)
    assert not any(p.exists() for p in ours)


def test_a_run_that_fails_validation_leaves_nothing_behind(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deep" / "run"
    code, err = run_cli(tiny_argv(tiny_data, out, "--limit-train", "100000"), capsys)
    assert code == 2 and "exceeds" in one_error_line(err)
    assert not (tmp_path / "deep").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(tiny_argv(tiny_data, empty, "--limit-train", "100000"), capsys)[0] == 2
    assert list(empty.iterdir()) == []
    assert run_cli(tiny_argv(tiny_data, out), capsys)[0] == 0  # nothing left to refuse the next run


def test_an_inherited_sigint_ignore_is_kept(tiny_data: Path, tmp_path: Path) -> None:
    """`cmd &` in a script starts with SIGINT ignored; training must not start honouring it."""

    @dataclasses.dataclass(frozen=True)
    class SendSigint(cbs.Callback):
        def on_event(self, cb_state: cbs.CbState, event: cbs.Event) -> tuple[cbs.CbState, list[cbs.Action]]:
            if isinstance(event, cbs.EpochEnd):
                os.kill(os.getpid(), signal.SIGINT)
            return cb_state, []

    cfg = Config(
        model="mlp", epochs=2, batch_size=32, data_dir=str(tiny_data), out=str(tmp_path / "run"),
        device="cpu", compile=False, tensorboard=False, progress=False,
    )  # fmt: skip
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = app.train(cfg, callbacks=[*app.build_callbacks(cfg), SendSigint()])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
    assert result.epochs_run == 2 and result.stop_reason == "completed"


# --------------------------------------------------------------------------- data files


def test_idx_sizes_are_checked_against_the_header_while_streaming(tmp_path: Path) -> None:
    from test_data import idx_bytes

    from fashion_func import data

    images = np.zeros((64, 28, 28), np.uint8)
    bomb = tmp_path / "bomb.gz"  # a valid header and 64 images, then 64 MB more of zeros
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        f.write(idx_bytes(images))
        for _ in range(64):
            f.write(bytes(1 << 20))
    with pytest.raises(data.DataError, match="too long"):
        data.read_idx(bomb, "images")
    huge = tmp_path / "huge"  # a header that declares 4 billion images
    huge.write_bytes(b"\0\0\x08\x03" + (2**32 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(data.DataError, match="declares 4294967295 examples, more than the 60000 allowed"):
        data.read_idx(huge, "images")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(data.DataError, match=r"not a regular file \(a named pipe"):
        data.read_idx(fifo)  # would block forever in open() if opened blindly


def test_idx_files_with_no_examples_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "data"
    make_dataset(d, n_train=0, n_test=0)
    code, err = run_cli(tiny_argv(d, tmp_path / "run"), capsys)
    assert code == 2 and "holds no examples" in one_error_line(err)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (mlp, adam): its best.safetensors for predict and export below."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = Config(
        model="mlp", epochs=1, batch_size=32, data_dir=str(tiny_data), out=str(out), device="cpu",
        compile=False, tensorboard=False, progress=False, patience=3, lr_schedule="plateau",
    )  # fmt: skip
    app.train(cfg)
    return out


def test_writes_never_replace_a_device_or_follow_a_link(tmp_path: Path) -> None:
    target = tmp_path / "link.safetensors"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target.symlink_to(victim)
    for path in (Path("/dev/null"), target, tmp_path):
        with pytest.raises(checkpoint.CheckpointWriteError, match="not a regular file"):
            checkpoint.atomic_write(path, b"data")
    assert victim.read_text() == "precious" and target.is_symlink()
    assert Path("/dev/null").is_char_device()


def test_disk_full_when_tensorboard_opens_its_event_file_is_one_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.summary.writer import event_file_writer

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(event_file_writer.tf.io.gfile, "GFile", full)
    argv = [a for a in tiny_argv(tiny_data, tmp_path / "run") if a != "--no-tensorboard"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert one_error_line(err).endswith("No space left on device")


# --------------------------------------------------------------------------- a diverged run


def test_a_diverged_run_exits_with_its_own_status(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(tiny_argv(tiny_data, tmp_path / "run", "--lr", "1e30", "--epochs", "3"), capsys)
    assert code == app.EXIT_DIVERGED == 3
    assert "training diverged (non-finite loss at step" in one_error_line(err)
    # early stopping and completion stay 0
    assert run_cli(tiny_argv(tiny_data, tmp_path / "ok", "--epochs", "3", "--patience", "1"), capsys)[0] == 0


# --------------------------------------------------------------------------- predict and export


@pytest.fixture(scope="module")
def best_weights(finished_run: Path) -> Path:
    return finished_run / "checkpoints" / "best.safetensors"


def run_main(
    main: Callable[[list[str]], int], argv: list[Any], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_out_refuses_devices_its_input_wrong_suffixes_and_existing_files(
    best_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fashion_func.cli import export

    copy = tmp_path / "w.safetensors"
    shutil.copy(best_weights, copy)
    before = copy.read_bytes()
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)
    cases = [
        ("/dev/full", "torch", "must end in .safetensors"),
        (tmp_path / "dev.safetensors", "torch", "exists and is a character device"),
        (copy, "torch", "is the input file"),
        (tmp_path / "x.txt", "torch", "must end in .safetensors"),
        (tmp_path / "x.npz", "flax", "must end in .safetensors"),
        (fifo, "flax", "exists and is a named pipe"),
        (tmp_path, "torch", "must end in .safetensors"),
    ]
    os.symlink("/dev/full", tmp_path / "dev.safetensors")
    cases[1] = (tmp_path / "dev.safetensors", "torch", "exists and is a symbolic link")
    for out, fmt, match in cases:
        code, _, err = run_main(export.main, ["--weights", copy, "--format", fmt, "--out", out], capsys)
        assert code == 2 and match in one_error_line(err), (out, err)
    assert copy.read_bytes() == before and Path("/dev/full").is_char_device() and fifo.is_fifo()
    out = tmp_path / "e.safetensors"
    assert run_main(export.main, ["--weights", copy, "--format", "torch", "--out", out], capsys)[0] == 0
    code, _, err = run_main(export.main, ["--weights", copy, "--format", "torch", "--out", out], capsys)
    assert code == 2 and "pass --overwrite" in one_error_line(err)
    assert (
        run_main(export.main, ["--weights", copy, "--format", "torch", "--out", out, "--overwrite"], capsys)[
            0
        ]
        == 0
    )


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_predict_and_export_refuse_a_fifo_or_directory_as_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from fashion_func.cli import export, predict

    w = tmp_path / "w.safetensors"
    os.mkfifo(w) if kind == "fifo" else w.mkdir()
    for main, extra in (
        (predict.main, []),
        (export.main, ["--format", "torch", "--out", tmp_path / "o.safetensors"]),
    ):
        code, _, err = run_main(main, ["--weights", w, *extra], capsys)
        assert code == 2 and "not a regular file" in one_error_line(err), err


def _png(path: Path, w: int, h: int) -> Path:
    from PIL import Image

    Image.new("L", (w, h)).save(path)
    return path


def test_one_bad_image_is_one_line_and_the_others_are_classified(
    best_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fashion_func.cli import predict

    good = _png(tmp_path / "good.png", 28, 28)
    big = _png(tmp_path / "big.png", 6000, 6000)  # 36 M pixels: over the default limit, a small file
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    weird = tmp_path / os.fsdecode(b"caf\xe9\x1b[31m.png")  # not UTF-8, and an ANSI escape
    shutil.copy(good, weird)
    argv = ["--weights", best_weights, "--images", good, big, fifo, "/dev/zero", weird, "--json"]
    code, out, err = run_main(predict.main, argv, capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    for needle in (
        "big.png: 6000x6000 pixels, more than --max-image-pixels",
        "pipe.png: not a regular file (a named pipe (FIFO))",
        "/dev/zero: not a regular file (a character device)",
    ):
        assert sum(needle in line for line in lines) == 1, (needle, err)
    assert "\x1b" not in out and "caf\\xe9\\x1b[31m.png" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert [Path(r["path"]).name for r in report["images"]] == ["good.png", "caf\\xe9\\x1b[31m.png"]
    out.encode("utf-8")  # strict: no lone surrogates anywhere
    code, out, err = run_main(predict.main, [*argv[:3], big, "--max-image-pixels", 40_000_000], capsys)
    assert code == 0, err


def test_a_huge_png_is_one_line_not_a_decompression_bomb_traceback(
    best_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fashion_func.cli import predict

    bomb = _png(tmp_path / "bomb.png", 20000, 20000)  # PIL's own DecompressionBombError territory
    code, _, err = run_main(
        predict.main, ["--weights", best_weights, "--images", bomb, "--max-image-pixels", 10**9], capsys
    )
    assert code == 2 and "bomb.png: too many pixels" in one_error_line(err)


def test_predict_json_is_strict_even_for_huge_weights_and_escapes_metadata(
    best_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fashion_func.cli import predict

    weights, meta = checkpoint.load_weights(best_weights)
    huge = {k: v * 1e30 for k, v in weights.items()}
    path = tmp_path / "huge.safetensors"
    checkpoint.save_weights(path, huge, metadata={**meta, "epoch": "\x1b]0;pwned\x07"})
    img = _png(tmp_path / "a.png", 28, 28)
    code, out, err = run_main(predict.main, ["--weights", path, "--images", img, "--json"], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out
    json.loads(out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_predict_out_refuses_to_replace_report_files_without_overwrite(
    best_weights: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fashion_func.cli import predict

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("the user's")
    argv = ["--weights", best_weights, "--data-dir", tiny_data, "--out", out]
    code, _, err = run_main(predict.main, argv, capsys)
    assert code == 2 and "pass --overwrite" in one_error_line(err)
    assert (out / "report.json").read_text() == "the user's"
    assert run_main(predict.main, [*argv, "--overwrite"], capsys)[0] == 0
    (out / "samples.png").unlink()
    (out / "samples.png").symlink_to("/dev/null")
    code, _, err = run_main(predict.main, [*argv, "--overwrite"], capsys)
    assert code == 2 and "is a symbolic link" in one_error_line(err)


def test_broken_pipe_under_head_is_a_normal_end(best_weights: Path, tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png", 28, 28)
    shots = tmp_path / "shots"
    shots.mkdir()
    for i in range(1000):  # more output than a pipe buffers, so the writer meets the closed pipe
        (shots / f"{i:04d}-a-long-name-for-a-long-line.png").symlink_to(img)
    script = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
    cmd = f"{sys.executable} {script} --weights {best_weights} --images {shots} | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1


# --------------------------------------------------------------------------- the best checkpoint


def test_best_checkpoint_of_a_run_monitoring_accuracy_is_its_most_accurate_epoch(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = tiny_argv(tiny_data, out, "--epochs", "4", "--monitor", "val_acc", "--lr", "0.05")
    assert run_cli([*argv, "--save-best-only", "false", "--save-top-k", "-1"], capsys)[0] == 0
    history = json.loads((out / "history.json").read_text())
    accs = [r["val_acc"] for r in history]
    best_epoch = accs.index(max(accs)) + 1  # the first epoch reaching the highest accuracy
    ckpts = out / "checkpoints"
    meta = checkpoint.read_metadata(ckpts / "best.safetensors")
    assert (meta["epoch"], meta["monitor"], meta["value"]) == (best_epoch, "val_acc", max(accs))
    best, _ = checkpoint.load_weights(ckpts / "best.safetensors")
    same, _ = checkpoint.load_weights(ckpts / f"epoch-{best_epoch:03d}.safetensors")
    assert all(torch.equal(best[k], same[k]) for k in best)
