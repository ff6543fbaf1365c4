"""scripts/train.py's command line: where settings come from, resuming from a checkpoint's own
config, the run-directory rule, and the issue's acceptance run as one subprocess.

Everything but the acceptance run calls `cli.main_train` in process (no interpreter start-up)
on the mlp with a few hundred examples.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reference import SimpleNet

from fashion_func import checkpoint, data
from fashion_func.cli import app
from fashion_func.cli import train as cli
from fashion_func.cli.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--model", "mlp", "--epochs", "1", "--batch-size", "128", "--limit-train", "256",
    "--limit-val", "200", "--device", "cpu", "--no-compile", "--no-progress", "--no-tensorboard",
]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`train.py argv` in process: (exit code, stderr)."""
    capsys.readouterr()
    code = cli.main_train(argv)
    return code, capsys.readouterr().err


# -- settings --------------------------------------------------------------------------------


def test_help_lists_every_flag_of_the_issues():
    text = cli.build_train_parser().format_help()
    for flag in (
        "--model", "--epochs", "--batch-size", "--lr", "--optimizer", "--weight-decay", "--seed",
        "--data-dir", "--out", "--device", "--no-compile", "--limit-train", "--limit-val",
        "--monitor", "--mode", "--patience", "--save-best-only", "--topk", "--lr-step-size",
        "--lr-gamma", "--resume", "--config", "--overwrite", "--no-tensorboard", "--preset",
        "--save-top-k", "--save-every", "--version",
    ):  # fmt: skip
        assert re.search(rf"(^|\s){re.escape(flag)}\b", text), flag


def test_flags_become_the_config():
    cfg, run = cli.parse_train_args(
        [
            "--model", "alexnet", "--epochs", "2", "--batch-size", "64", "--lr", "0.01",
            "--optimizer", "sgd", "--weight-decay", "1e-4", "--seed", "3", "--data-dir", "/d",
            "--device", "cpu", "--no-compile", "--limit-train", "100", "--limit-val", "50",
            "--monitor", "val_acc", "--mode", "max", "--patience", "3", "--save-best-only", "false",
            "--topk", "3", "--lr-step-size", "2", "--lr-gamma", "0.5", "--no-tensorboard",
            "--save-top-k", "2", "--save-every", "2",
        ]
    )  # fmt: skip
    expected = Config(
        model="alexnet", epochs=2, batch_size=64, lr=0.01, optimizer="sgd", weight_decay=1e-4,
        seed=3, data_dir="/d", device="cpu", compile=False, limit_train=100, limit_val=50,
        monitor="val_acc", mode="max", patience=3, save_best_only=False, topk=3, save_top_k=2,
        every_n_epochs=2,
        lr_schedule="step", lr_step_size=2, lr_gamma=0.5, tensorboard=False,
    )  # fmt: skip
    assert cfg == expected
    assert cfg.out_dir == Path("output/alexnet")  # the default --out
    assert run == {"resume": None, "overwrite": False}
    assert cli.parse_train_args([])[0] == Config()


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_values_are_overridden_by_flags(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"model": "mlp", "epochs": 7, "lr": 0.01, "batch-size": 32}))
    else:
        path.write_text('model = "mlp"\nepochs = 7\nlr = 0.01\nbatch-size = 32\n')
    cfg, _ = cli.parse_train_args(["--config", str(path), "--epochs", "3"])
    assert cfg == Config(model="mlp", epochs=3, lr=0.01, batch_size=32)


def test_bad_config_file_is_a_one_line_usage_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"modle": "mlp"}))
    code, err = run_cli(["--config", str(path)], capsys)
    assert code == 2 and err.strip() == "train.py: error: unknown config keys: modle"
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        cli.parse_train_args(["--epochs", "0"])


# -- resume from the checkpoint's own config ---------------------------------------------------


def test_resume_auto_continues_the_run_as_it_was_set_up(tmp_path, capsys):
    """`--resume auto --out X --epochs 3` alone: model, seed, schedule ... come from X's
    checkpoint, --epochs raises the total, and the result equals a straight 3-epoch run."""
    out = tmp_path / "run"
    first = [*SMALL, "--seed", "5", "--lr-step-size", "1", "--lr-gamma", "0.5", "--out", str(out)]
    assert run_cli(first, capsys)[0] == 0
    saved = json.loads((out / "config.json").read_text())

    cfg, run = cli.parse_train_args(["--resume", "auto", "--out", str(out), "--epochs", "3"])
    assert cfg == Config.from_dict({**saved, "epochs": 3})
    assert (cfg.model, cfg.seed, cfg.lr_schedule, cfg.lr_gamma) == ("mlp", 5, "step", 0.5)
    assert run["resume"] == "auto"

    assert run_cli(["--resume", "auto", "--out", str(out), "--epochs", "3"], capsys)[0] == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == [1e-3, 5e-4, 2.5e-4]  # StepLR carried on
    assert json.loads((out / "config.json").read_text()) == {**saved, "epochs": 3}

    straight = app.train(Config.from_dict({**saved, "epochs": 3, "out": str(tmp_path / "straight")}))
    resumed, _ = checkpoint.load_state(out / "checkpoints" / "last.safetensors", straight.state)
    assert all(torch.equal(resumed.params[k], straight.state.params[k]) for k in straight.state.params)
    assert [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history] == [
        {k: v for k, v in r.items() if k != "epoch_time_s"} for r in straight.history
    ]


def test_resume_path_without_out_goes_on_in_the_checkpoints_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*SMALL, "--out", str(out)], capsys)[0] == 0
    last = out / "checkpoints" / "last.safetensors"
    cfg, _ = cli.parse_train_args(["--resume", str(last), "--epochs", "2", "--no-progress"])
    assert cfg.out_dir == out and cfg.model == "mlp" and cfg.epochs == 2


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*SMALL, "--out", str(out)], capsys)[0] == 0
    before = (out / "checkpoints" / "last.safetensors").read_bytes()
    code, err = run_cli(["--resume", "auto", "--out", str(out), "--model", "simplenet"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train.py: error: --model simplenet does not match")
    assert "mlp" in err
    assert (out / "checkpoints" / "last.safetensors").read_bytes() == before


def test_resume_auto_before_any_checkpoint_uses_the_flags(tmp_path):
    cfg, run = cli.parse_train_args(["--resume", "auto", "--out", str(tmp_path / "new"), "--model", "mlp"])
    assert cfg == Config(model="mlp", out=str(tmp_path / "new")) and run["resume"] == "auto"


def test_resume_of_a_missing_file_is_a_usage_error(tmp_path, capsys):
    code, err = run_cli(["--resume", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such checkpoint file" in err


def test_existing_run_directory_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*SMALL, "--out", str(out)]
    assert run_cli(argv, capsys)[0] == 0
    first = (out / "checkpoints" / "last.safetensors").read_bytes()
    code, err = run_cli(argv, capsys)
    assert code == 2 and "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert (out / "checkpoints" / "last.safetensors").read_bytes() == first
    assert run_cli([*argv, "--overwrite"], capsys)[0] == 0  # a fresh run in its place
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1]


# -- the acceptance run ----------------------------------------------------------------------


def test_train_py_one_epoch_acceptance(tmp_path):
    """The one-epoch command finishes with validation accuracy >= 75%, and best.safetensors loads
    into a plain SimpleNet nn.Module that reproduces that accuracy (speed: scripts/bench.py)."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--epochs", "1", "--limit-train", "6000"]
    cmd += ["--limit-val", "1000", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]

    # console: the progress bar on stderr, the epoch line and the summary on stdout
    # the progress bar (stderr): 6000 / 128 -> 47 steps; tqdm redraws at most every 0.1 s,
    # so the last count it shows before clearing itself varies: check the total instead
    assert "epoch 1/1" in proc.stderr and re.search(r"\d+/47 \[", proc.stderr)
    line = re.search(
        r"epoch 1/1 train_loss (\S+) train_acc (\S+) val_loss (\S+) val_acc (\S+) .* (\S+)s$",
        proc.stdout,
        re.M,
    )
    assert line, proc.stdout[-2000:]
    assert "done: 1 epoch(s), completed" in proc.stdout

    (record,) = json.loads((out / "history.json").read_text())
    assert record["val_acc"] >= 0.75
    assert float(line.group(4)) == pytest.approx(record["val_acc"], abs=5e-5)

    best = out / "checkpoints" / "best.safetensors"
    meta = checkpoint.read_metadata(best)
    assert meta["model"] == "simplenet" and meta["config"]["model"] == "simplenet" and meta["epoch"] == 1
    net = SimpleNet()
    net.load_state_dict(safetensors.torch.load_file(best))  # strict: every name and shape
    net.eval()
    val = data.load("test", limit=1000)
    x = (val.images.float().unsqueeze(1) / 255 - data.MEAN) / data.STD
    with torch.no_grad():
        logits = net(x)
    acc = (logits.argmax(1) == val.labels).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, val.labels).item()
    assert acc == pytest.approx(record["val_acc"], abs=0.002)  # at most 2 of 1000 flip
    assert loss == pytest.approx(record["val_loss"], rel=1e-4)
    assert (out / "checkpoints" / "last.safetensors").exists()


def test_resume_path_typed_inside_checkpoints_names_the_run_directory(tmp_path, monkeypatch):
    """`--resume last.safetensors` typed inside <run>/checkpoints continues <run>, not '.'."""
    from fashion_func.cli import train as cli

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    assert Path(cli._run_dir_of(Path("last.safetensors"))) == tmp_path / "run"
