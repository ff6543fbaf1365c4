"""scripts/speedrun.py in process: N seeded runs of a preset, one line each, the mean ± std
line and the JSON summary agreeing with each other, runs that repeat exactly, and one-line
usage errors with exit 2.

Tiny: the quality preset at width 4 for one epoch of 384 images (one step of 256 with the
script's drop_last), measured on 256 test images, eager.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import ResNet

from fashion_func import data
from fashion_func.cli import app, speedrun
from fashion_func.cli.config import Config, load_preset

ROOT = Path(__file__).resolve().parents[1]


BASE = [
    "--preset", "quality", "--device", "cpu", "--width", "4", "--epochs", "1", "--warmup-epochs", "0",
    "--limit-train", "512", "--val-split", "128", "--limit-val", "256", "--compile", "off",
]  # fmt: skip
RUN_LINE = re.compile(r"^run (\d+): seed (\d+) test_acc (\d\.\d{4}) train (\d+\.\d\d) s$")
MEAN_LINE = re.compile(
    r"^test_acc (\d\.\d{4}) ± (\d\.\d{4}) over (\d+) runs; train (\d+\.\d\d) s per run "
    r"\(max (\d+\.\d\d)\); warm-up (\d+\.\d) s$"
)


def run_script(argv: list[str]) -> tuple[int, str, str]:
    """`speedrun.py argv` in process: (exit code, stdout, stderr); a SystemExit counts as its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = speedrun.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def two_runs() -> tuple[int, list[str], dict[str, Any]]:
    code, out, err = run_script([*BASE, "--runs", "2", "--json"])
    assert code == 0, err[-3000:]
    lines = out.strip().splitlines()
    return code, lines, json.loads(lines[-1])


def test_two_runs_print_one_line_each_and_a_mean_std_line_that_the_json_agrees_with(two_runs):
    _, lines, report = two_runs
    assert lines[0].startswith(
        "quality: resnet on cpu (CPU), 384 training images, 1 epochs; warm-up/compile "
    )
    runs = report["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    run_lines = [RUN_LINE.match(line) for line in lines if line.startswith("run ")]
    assert len(run_lines) == 2 and all(run_lines), lines
    for k, (m, r) in enumerate(zip(run_lines, runs, strict=True)):
        assert (int(m.group(1)), int(m.group(2))) == (k, k)
        assert m.group(3) == f"{r['test_acc']:.4f}" and m.group(4) == f"{r['train_s']:.2f}"
        # each run is one step (384 images, batch 256, drop_last) measured on 256 test images
        assert r["steps"] == 1 and r["stop"] == "completed" and r["train_s"] > 0
        assert 0 <= r["test_acc"] <= 1 and r["test_acc"] * 256 == pytest.approx(round(r["test_acc"] * 256))
    accs = [r["test_acc"] for r in runs]
    (mean_line,) = [MEAN_LINE.match(line) for line in lines if line.startswith("test_acc ")]
    assert mean_line, lines
    assert mean_line.group(1) == f"{statistics.mean(accs):.4f}"
    assert mean_line.group(2) == f"{statistics.stdev(accs):.4f}"
    assert mean_line.group(3) == "2"
    assert report["test_acc_mean"] == statistics.mean(accs)
    assert report["test_acc_std"] == statistics.stdev(accs)
    times = [r["train_s"] for r in runs]
    assert report["train_s_mean"] == pytest.approx(statistics.mean(times))
    assert mean_line.group(4) == f"{statistics.mean(times):.2f}" and mean_line.group(5) == f"{max(times):.2f}"
    assert mean_line.group(6) == f"{report['warmup_s']:.1f}"
    # the JSON object comes last, after the lines, and records the recipe with the flags applied
    assert MEAN_LINE.match(lines[-2]) and report["preset"] == "quality" and report["device"] == "CPU"
    cfg = report["config"]
    assert (cfg["model"], cfg["width"], cfg["epochs"], cfg["val_split"], cfg["warmup_epochs"]) == (
        "resnet", 4, 1, 128, 0.0,
    )  # fmt: skip
    assert (cfg["nesterov"], cfg["lr_schedule"], cfg["flip"], cfg["tta"]) == (True, "onecycle", True, True)


def test_a_runs_test_acc_is_that_of_its_seeds_training_measured_independently(two_runs):
    """Seed 0's run again with the library's objects (one epoch of the first 384 images, the
    128 after them held out and unused, the last short batch dropped); its final weights in
    the reference nn.Module, float64, on the first 256 test images with the mirror image's
    probabilities averaged in (the preset's --tta) give the run's test_acc and test_loss."""
    _, _, report = two_runs
    cfg = Config.from_dict({**report["config"], "seed": 0})
    cpu = torch.device("cpu")
    train = data.load("train", limit=512)
    train = data.Split(train.images[:384], train.labels[:384], train.source)
    model, tx = app.build_model(cfg), app.build_optimizer(cfg, data.num_batches(384, 256, drop_last=True))
    train_step, _ = app.build_steps(cfg, model, tx, cpu)
    st = app.initial_state(cfg, model, tx, cpu)
    for batch in data.batches(train, cfg.batch_size, seed=0, epoch=1, drop_last=True):
        st, _ = train_step(st, batch)
    assert int(st.step) == report["runs"][0]["steps"] == 1

    net = ResNet(4).double()
    weights = {**st.params, **st.model_state}
    net.load_state_dict(
        {ResNet.key(k): v.double() if v.is_floating_point() else v for k, v in weights.items()}, strict=True
    )
    net.eval()
    test = data.load("test", limit=256)
    x = ((test.images.double() / 255 - data.MEAN) / data.STD).unsqueeze(1)
    with torch.no_grad():
        p = (net(x).softmax(-1) + net(x.flip(-1)).softmax(-1)) / 2
    acc = (p.argmax(1) == test.labels).double().mean().item()
    loss = -p[torch.arange(256), test.labels].log().mean().item()
    top2 = p.topk(2, dim=1).values
    near_ties = int(((top2[:, 0] - top2[:, 1]) < 1e-4).sum())
    run = report["runs"][0]
    assert round(abs(run["test_acc"] - acc) * 256) <= near_ties, (run, acc)
    assert run["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_the_runs_differ_by_seed_and_a_seed_run_again_repeats_exactly(two_runs):
    _, _, report = two_runs
    first, second = report["runs"]
    assert first["test_loss"] != second["test_loss"]  # seeds 0 and 1: other inits, other batches
    code, out, err = run_script([*BASE, "--runs", "1", "--seed", "1", "--json"])
    assert code == 0, err[-3000:]
    again = json.loads(out.strip().splitlines()[-1])
    (rerun,) = again["runs"]
    assert rerun["seed"] == 1
    assert (rerun["test_acc"], rerun["test_loss"], rerun["steps"]) == (
        second["test_acc"], second["test_loss"], second["steps"],
    )  # fmt: skip
    assert again["test_acc_std"] == 0.0  # one run: no spread
    assert "run 0: seed 1 test_acc " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "0"], "--runs must be at least 1, got 0"),
        (["--runs", "-2"], "--runs must be at least 1"),
        (["--width", "0"], "--width sets resnet's width"),
        (["--preset", "nope"], "--preset must be one of"),
        (["--ema", "1"], "--ema is a decay in (0, 1)"),
        (["--bogus-flag"], "--bogus-flag"),
        (["--runs", "x"], "--runs"),
        (["--val-split", "512"], "--val-split 512"),  # every training image held out
        (["--val-split", "600"], "--val-split 600"),  # more than there are
    ],
    ids=[
        "runs-0",
        "runs-negative",
        "width-0",
        "preset",
        "ema",
        "unknown-flag",
        "runs-not-int",
        "val-split-all",
        "val-split-more",
    ],
)
def test_a_bad_flag_is_one_line_on_stderr_and_exit_2(argv, message):
    code, out, err = run_script([*BASE, "--runs", "1", *argv])
    assert code == 2, (out[-1000:], err[-3000:])
    assert err.count("\n") == 1 and err.startswith("speedrun.py: error: "), err[-3000:]
    assert message in err
    assert "run 0:" not in out  # nothing trained


def test_fewer_training_images_than_one_batch_is_refused_or_still_trains():
    """The script drops the last short batch (one shape for the compiled step): with fewer
    images than --batch-size there is no step at all. That must be a one-line usage error,
    or a run that still trains, never a traceback."""
    code, out, err = run_script([*BASE, "--runs", "1", "--val-split", "0", "--limit-train", "200", "--json"])
    if code == 0:
        assert json.loads(out.strip().splitlines()[-1])["runs"][0]["steps"] >= 1
    else:
        assert code == 2 and err.count("\n") == 1 and err.startswith("speedrun.py: error: "), err[-3000:]


def test_the_schedule_counts_the_steps_of_the_images_left_after_the_held_out_ones(monkeypatch):
    """--val-split 128 of 512 images, batch 256, drop_last: onecycle's total is 1 step an epoch,
    counted from the 384 training images, not the 512 loaded."""
    seen = []
    build = app.build_optimizer
    monkeypatch.setattr(
        speedrun.app, "build_optimizer", lambda cfg, steps: seen.append(steps) or build(cfg, steps)
    )
    small = {"device": "cpu", "width": 4, "epochs": 1, "warmup_epochs": 0.0, "limit_train": 512,
             "val_split": 128, "compile": "off"}  # fmt: skip
    cfg = Config.from_dict({**load_preset("quality"), **small})
    recipe = speedrun.Recipe(cfg)
    assert len(recipe.train.labels) == 384 and seen == [1]
