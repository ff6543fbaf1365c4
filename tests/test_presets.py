"""The tutorial's run from the command line: `--preset tutorial`, top-K accuracy, per-epoch
checkpoints with `--save-best-only false`, and a monitored accuracy that keeps its best epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_func import checkpoint
from fashion_func.cli.train import main_train

SMALL = ["--limit-train", "384", "--limit-val", "300", "--device", "cpu", "--compile", "off", "--no-progress"]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def test_preset_tutorial_with_topk_3_reports_top3_everywhere(tmp_path, capsys):
    out = tmp_path / "tut"
    assert main_train(["--preset", "tutorial", "--topk", "3", "--epochs", "2", "--model", "mlp",
                       "--out", str(out), *SMALL]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["seed"], config["normalize"], config["topk"], config["lr_schedule"]) == (
        1024, "tutorial", 3, "step",
    )  # fmt: skip
    assert config["patience"] is not None and config["weight_decay"] > 0
    history = _history(out)
    for r in history:
        assert 0 <= r["train_acc"] <= r["train_top3"] <= 1 and 0 <= r["val_acc"] <= r["val_top3"] <= 1
        assert "val_top5" not in r
    assert "val_top3" in capsys.readouterr().out  # the epoch log line
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    top3 = [e.value for e in events.Scalars("val/top3")]
    assert top3 == pytest.approx([r["val_top3"] for r in history], rel=1e-6)
    assert "train/top3" in events.Tags()["scalars"]


def test_save_best_only_false_writes_a_checkpoint_every_epoch_or_every_n(tmp_path):
    every = tmp_path / "every"
    assert main_train(["--model", "mlp", "--epochs", "3", "--save-best-only", "false", "--out", str(every),
                       "--no-tensorboard", *SMALL]) == 0  # fmt: skip
    names = sorted(p.name for p in (every / "checkpoints").glob("epoch-*.safetensors"))
    assert names == ["epoch-001.safetensors", "epoch-002.safetensors", "epoch-003.safetensors"]
    second = tmp_path / "second"
    assert main_train(["--model", "mlp", "--epochs", "3", "--save-best-only", "false", "--save-every", "2",
                       "--out", str(second), "--no-tensorboard", *SMALL]) == 0  # fmt: skip
    assert sorted(p.name for p in (second / "checkpoints").glob("epoch-*.safetensors")) == [
        "epoch-002.safetensors"
    ]


def test_monitoring_accuracy_keeps_the_most_accurate_epoch(tmp_path):
    out = tmp_path / "acc"
    # sgd at a high lr: accuracy jumps around, so the last epoch is not always the best
    assert main_train(["--model", "mlp", "--epochs", "4", "--monitor", "val_acc", "--optimizer", "sgd",
                       "--lr", "0.5", "--out", str(out), "--no-tensorboard", *SMALL]) == 0  # fmt: skip
    history = _history(out)
    best_epoch = max(history, key=lambda r: r["val_acc"])["epoch"]  # first of equals, as ModelCheckpoint
    meta = checkpoint.read_metadata(out / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == best_epoch and meta["monitor"] == "val_acc"
    assert json.loads((out / "config.json").read_text())["mode"] == "max"


def test_a_contradicting_mode_is_a_usage_error(tmp_path, capsys):
    assert main_train(["--monitor", "val_acc", "--mode", "min", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mode min contradicts --monitor val_acc" in err
    assert not (tmp_path / "x").exists()
