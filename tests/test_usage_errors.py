"""Bad command-line input, as flags or in a config file: exit 2, one line naming the flag, and nothing
created. One table: each row is the input and the whole message after `train.py: error: `.

Values given as a dict are checked twice: through `Config.from_dict` (a ConfigError, for library
callers) and written to a JSON config file for the command line. The property-based fuzz of the
commands is in tests/test_fuzz_cli.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_reliability import one_error_line  # tests/ is on sys.path under pytest

from fashion_func.cli.config import Config, ConfigError
from fashion_func.cli.train import main_train

MODELS = "simplenet, simplenet_bn, alexnet, mlp, resnet, dpcnn, scatternet, scatternet_ms, scatternet_ms3"
DEEP = "[" * 100_000 + "]" * 100_000
ONE_OF_THEM = ("private training takes --dp-noise-multiplier S or --dp-target-epsilon E (which picks S for "
               "--epochs), one of them")  # fmt: skip
BATCH_NORM = ("--model {} has batch norm, which mixes the examples of a batch: private training needs a "
              "model without it (--model dpcnn, --groups N for group norm)")  # fmt: skip

# (kind, input, message): kind "argv" is a list of flags; "json" / "toml" the text of a config file;
# "values" a dict of config values
BAD_INPUT: list[tuple[str, Any, str]] = [
    ("argv", ["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    ("argv", ["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    ("argv", ["--lr", "0"], "--lr must be a finite positive number, got 0.0"),
    ("argv", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    ("argv", ["--momentum", "nan"], "--momentum must be in [0, 1), got nan"),
    ("argv", ["--min-delta", "nan"], "--min-delta must be a finite number >= 0, got nan"),
    ("argv", ["--label-smoothing", "nan"], "--label-smoothing must be in [0, 1), got nan"),
    ("argv", ["--clip-norm", "inf"], "--clip-norm must be a finite positive number, got inf"),
    ("argv", ["--lr-gamma", "nan"], "--lr-gamma must be in (0, 1], got nan"),
    ("argv", ["--out", ""], "--out must not be empty (leave it out for the default)"),
    ("argv", ["--data-dir", ""], "--data-dir must not be empty (leave it out for the default)"),
    ("argv", ["--out", "/"], "--out / is the root directory; give a run directory of its own"),
    ("argv", ["--seed", "9" * 23], "--seed must be in [0, 2**63 - 1], got " + "9" * 23),
    ("argv", ["--seed", "-1"], "--seed must be in [0, 2**63 - 1], got -1"),
    ("argv", ["--seed", "9" * 5000], "argument --seed: expected an integer of at most 4300 digits"),
    ("argv", ["--epochs", "-1"], "--epochs must be at least 1, got -1"),
    ("argv", ["--epochs", "three"], "argument --epochs: expected an integer, got 'three'"),
    ("argv", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("argv", ["--model", "resnet900"], f"--model must be one of {MODELS}, not 'resnet900'"),
    ("argv", ["--optimizer", "lion"], "--optimizer must be one of adam, adamw, sgd, not 'lion'"),
    ("argv", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("json", '{"lr": 1e999}', "--lr must be a finite positive number, got inf"),
    ("toml", "lr = inf", "--lr must be a finite positive number, got inf"),
    ("toml", "lr = nan", "--lr must be a finite positive number, got nan"),
    ("json", '{"seed": 99999999999999999999999}', "--seed must be in [0, 2**63 - 1]"),
    ("json", '{"seed": ' + "9" * 5000 + "}", "integer of more than 4300 digits"),
    ("toml", "seed = " + "9" * 5000, "integer of more than 4300 digits"),
    ("json", DEEP, "nested too deeply"),
    ("toml", "a = " + DEEP, "nested too deeply"),
    ("json", '{"optimizer": ' + "[" * 500 + "]" * 500 + "}", "--optimizer must be a string, got a list"),
    ("json", '{"out": ""}', "--out must not be empty"),
    ("values", {"batch_size": 64.0}, "--batch-size must be an integer, got 64.0"),
    ("values", {"limit_train": 100.0}, "--limit-train must be an integer, got 100.0"),
    ("values", {"epochs": True}, "--epochs must be an integer, got True"),
    ("values", {"lr": "fast"}, "--lr must be a number, got 'fast'"),
    ("values", {"tensorboard": 1}, "--tensorboard must be true or false, got 1"),
    ("values", {"out": 3}, "--out must be a string"),
    ("values", {"monitor": "val_los"}, "--monitor must be one of val_loss, val_acc, train_loss, train_acc"),
    ("values", {"lr_schedule": "plateau", "lr_gamma": 1.0}, "--lr-gamma must be below 1 with --lr-schedule"),
    ("values", {"compile": "maybe"}, "--compile must be one of auto, on, off, update, not 'maybe'"),
    ("values", {"colour": "red"}, "unknown config keys: colour"),
    # private training (DP-SGD)
    ("argv", ["--dp-max-grad-norm", "0"], "--dp-max-grad-norm must be a finite positive number, got 0.0"),
    ("argv", ["--dp-max-grad-norm", "-1"], "--dp-max-grad-norm must be a finite positive number, got -1.0"),
    ("argv", ["--dp-max-grad-norm", "nan"], "--dp-max-grad-norm must be a finite positive number, got nan"),
    ("argv", ["--dp-noise-multiplier", "-1"], "--dp-noise-multiplier must be a finite number >= 0, got -1.0"),
    ("argv", ["--dp-noise-multiplier", "inf"], "--dp-noise-multiplier must be a finite number >= 0, got inf"),
    ("argv", ["--dp-target-epsilon", "0"], "--dp-target-epsilon must be a finite positive number, got 0.0"),
    ("argv", ["--dp-delta", "0"], "--dp-delta must be in (0, 1), got 0.0"),
    ("argv", ["--dp-delta", "1"], "--dp-delta must be in (0, 1), got 1.0"),
    (
        "argv",
        ["--dp-noise-multiplier", "1", "--dp-accountant", "bogus"],
        "--dp-accountant must be one of rdp, prv, not 'bogus'",
    ),
    ("argv", ["--dp-noise-multiplier", "1", "--dp-target-epsilon", "3"], ONE_OF_THEM),
    ("argv", ["--dp-max-grad-norm", "1"], ONE_OF_THEM),  # a norm alone: no noise to speak of
    (
        "argv",
        ["--dp-delta", "1e-6"],
        "--dp-delta needs private training (--dp-noise-multiplier or --dp-target-epsilon)",
    ),
    (
        "argv",
        ["--dp-accountant", "prv"],
        "--dp-accountant needs private training (--dp-noise-multiplier or --dp-target-epsilon)",
    ),
    ("argv", ["--model", "simplenet_bn", "--dp-noise-multiplier", "1"], BATCH_NORM.format("simplenet_bn")),
    ("argv", ["--model", "resnet", "--dp-target-epsilon", "3"], BATCH_NORM.format("resnet")),
    ("argv", ["--model", "resnet", "--sweep", "dp_noise_multiplier=1,2"], BATCH_NORM.format("resnet")),
    (
        "argv",
        ["--dp-noise-multiplier", "1", "--clip-norm", "1"],
        "--clip-norm clips the batch's gradient; private training clips each example's (--dp-max-grad-norm)",
    ),
    ("argv", ["--model", "simplenet", "--groups", "2"], "--groups applies to --model dpcnn, not simplenet"),
    ("argv", ["--model", "dpcnn", "--groups", "3"], "--groups 3 must divide dpcnn's width (16)"),
    (
        "argv",
        ["--model", "dpcnn", "--width", "8", "--groups", "16"],
        "--groups 16 must divide dpcnn's width (8)",
    ),
    ("argv", ["--model", "dpcnn", "--groups", "-1"], "--groups must be >= 0, got -1"),
    (
        "argv",
        ["--model", "simplenet", "--width", "8"],
        "--width applies to --model resnet or dpcnn, not simplenet",
    ),
    (
        "argv",
        ["--model", "dpcnn", "--sweep", "dp_noise_multiplier=0.5,1", "--dp-target-epsilon", "3"],
        ONE_OF_THEM,
    ),
    (
        "argv",
        ["--model", "dpcnn", "--sweep", "dp_noise_multiplier=-1,1"],
        "--sweep dp_noise_multiplier: values must be finite and >= 0",
    ),
    (
        "argv",
        ["--model", "dpcnn", "--dp-noise-multiplier", "1", "--sweep", "dp_max_grad_norm=0,1"],
        "--sweep dp_max_grad_norm: values must be finite and > 0",
    ),
    (
        "argv",
        ["--model", "dpcnn", "--sweep", "dp_noise_multiplier=0.5,1", "--dp-noise-multiplier", "2"],
        "--dp-noise-multiplier and --sweep dp_noise_multiplier=... contradict each other: the sweep sets "
        "each member's dp_noise_multiplier",
    ),
    ("argv", ["--model", "dpcnn", "--sweep", "dp_max_grad_norm=0.5,1"], ONE_OF_THEM),
    ("values", {"dp_delta": 0}, "--dp-delta must be in (0, 1), got 0"),
    ("values", {"dp_noise_multiplier": 1, "dp_target_epsilon": 3}, ONE_OF_THEM),
    ("values", {"dp_accountant": "moments"}, "--dp-accountant must be one of rdp, prv, not 'moments'"),
]


def _row_id(row: tuple[str, Any, str]) -> str:
    kind, given, _ = row
    text = " ".join(given) if kind == "argv" else given if isinstance(given, str) else json.dumps(given)
    return f"{kind}:{text[:40]}"


@pytest.mark.parametrize(("kind", "given", "message"), BAD_INPUT, ids=[_row_id(r) for r in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    given: Any,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if kind == "values":
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config.from_dict(given)
        kind, given = "json", json.dumps(given)
    # a missing --data-dir: were a value let through, the run would fail fast, not train
    argv = ["--model", "mlp", "--data-dir", "nowhere"]
    if kind == "argv":
        argv += ["--out", str(tmp_path / "run"), *given]
    else:
        config = tmp_path / f"c.{kind}"
        config.write_text(given)
        out = [] if '"out"' in given else ["--out", str(tmp_path / "run")]  # a flag overrides the file
        argv += ["--config", str(config), *out]
    assert main_train(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("train.py: error: ") and message in line, line
    if kind == "argv":
        assert line == f"train.py: error: {message}"
    assert [p.name for p in tmp_path.iterdir()] == ([] if kind == "argv" else [f"c.{kind}"])


def test_a_delta_of_at_least_one_over_n_is_one_line_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """delta >= 1/N (known once the data is loaded: N = 2000 here) would allow publishing an
    example outright: refused at run time, one line, exit 2, no run directory."""
    from fashion_func import data

    try:
        data.locate(download=False)
    except data.DataError:
        pytest.skip("Fashion-MNIST is not installed")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "dpcnn", "--dp-noise-multiplier", "1", "--dp-delta", "0.001", "--limit-train", "2000",
            "--device", "cpu", "--no-compile", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main_train(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == "train.py: error: --dp-delta 0.001 must be below 1/N = 0.0005 (N = 2000 training examples)"
    assert list(tmp_path.iterdir()) == []
