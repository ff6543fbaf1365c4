"""Issue 17, reliability round two: what a careless or hostile user still broke.

Each test reproduces one case of the issue (numbered as there) through the command-line entry
points in this process, and checks the promise of README.md's "Guarantees" table: one line on
stderr and exit 2 for bad input, nothing written outside `--out`, nothing of the user's
touched. The property-based fuzz of the three commands is in tests/test_fuzz_cli.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_data import make_dataset  # tests/ is on sys.path under pytest

from fashion_func import cli
from fashion_func.cli import main_train
from fashion_func.config import Config, ConfigError, load_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, devices, O_NOFOLLOW")


def one_error_line(err: str) -> str:
    """stderr must be exactly one line, no traceback; returns it."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


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


# --------------------------------------------------------------------------- 4, 6, 7: config values


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
        (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--momentum", "nan"], "--momentum must be in [0, 1), got nan"),
        (["--min-delta", "nan"], "--min-delta must be a finite number >= 0, got nan"),
        (["--label-smoothing", "nan"], "--label-smoothing must be in [0, 1), got nan"),
        (["--clip-norm", "inf"], "--clip-norm must be a finite positive number, got inf"),
        (["--lr-gamma", "nan"], "--lr-gamma must be in (0, 1], got nan"),
        (["--out", ""], "--out must not be empty"),
        (["--data-dir", ""], "--data-dir must not be empty"),
        (["--out", "/"], "--out / is the root directory"),
        (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**63 - 1]"),
        (["--seed", "-1"], "--seed must be in [0, 2**63 - 1]"),
        (["--seed", "9" * 5000], "--seed: expected an integer of at most 4300 digits"),
    ],
)
def test_out_of_range_flags_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    # a missing --data-dir: were a value let through, the run would fail fast, not train
    assert main_train(["--model", "mlp", "--data-dir", "nowhere", *argv]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert match in line, line
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


@pytest.mark.parametrize(
    ("text", "suffix", "match"),
    [
        ('{"lr": 1e999}', ".json", "--lr must be a finite positive number, got inf"),
        ("lr = inf", ".toml", "--lr must be a finite positive number, got inf"),
        ("lr = nan", ".toml", "--lr must be a finite positive number, got nan"),
        ('{"seed": 99999999999999999999999}', ".json", "--seed must be in [0, 2**63 - 1]"),
        ('{"seed": ' + "9" * 5000 + "}", ".json", "integer of more than 4300 digits"),
        ("seed = " + "9" * 5000, ".toml", "integer of more than 4300 digits"),
        ("[" * 100_000 + "]" * 100_000, ".json", "nested too deeply"),
        ("a = " + "[" * 100_000 + "]" * 100_000, ".toml", "nested too deeply"),
        ("{\"optimizer\": " + "[" * 500 + "]" * 500 + "}", ".json", "--optimizer must be a string, got a list"),
        ('{"out": ""}', ".json", "--out must not be empty"),
    ],
)
def test_bad_config_files_are_one_line_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, suffix: str, match: str
) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    out = tmp_path / "run"
    flags = [] if '"out"' in text else ["--out", str(out)]  # a flag would override the file
    assert main_train(["--config", str(path), *flags, "--model", "mlp", "--data-dir", "nowhere"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert match in line, line
    assert not out.exists()


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
