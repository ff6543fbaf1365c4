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


# -- train.py's promises: one line for what the machine cannot run, strict JSON, diverged runs
# reported as such (reliability round three) ------------------------------------------------


@pytest.mark.parametrize("preset", ["speedrun", "best"])
def test_a_cuda_recipe_without_cuda_is_one_line_exit_2(monkeypatch, preset):
    """The speedrun and best presets say --device cuda: without CUDA that is refused (never a
    traceback, never silently moved to the CPU) before any data is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded"))
    code, out, err = run_script(["--preset", preset, "--runs", "1"])
    assert code == 2 and err.count("\n") == 1, err[-3000:]
    assert err.startswith("speedrun.py: error: --device cuda asked for, but no CUDA device")
    assert "pass --device cpu (or auto)" in err and out == ""


class Reached(Exception):
    pass


@pytest.mark.parametrize(
    ("seed", "runs", "refused"),
    [(2**63 - 1, 1, False), (2**63 - 1, 2, True), (2**63 - 2, 2, False), (2**63 - 2, 3, True),
     (2**63 - 10, 11, True), (2**63 - 10, 10, False), (0, 10, False)],
)  # fmt: skip
def test_every_seed_of_the_runs_stays_in_the_seed_range(monkeypatch, seed, runs, refused):
    """Run k trains from --seed + k: the last must be at most 2**63 - 1, checked before training."""

    def reached(cfg):
        raise Reached(cfg.seed)

    monkeypatch.setattr(speedrun, "Recipe", reached)
    if refused:
        code, out, err = run_script([*BASE, "--seed", str(seed), "--runs", str(runs)])
        assert code == 2 and err.count("\n") == 1 and out == "", err
        assert f"--seed {seed} with --runs {runs} runs seeds up to {seed + runs - 1}, beyond 2**63 - 1" in err
    else:
        with pytest.raises(Reached):
            speedrun.main([*BASE, "--seed", str(seed), "--runs", str(runs)])


def strict(line: str) -> dict[str, Any]:
    """`line` parsed as strict JSON: NaN, Infinity and -Infinity are refused."""
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def test_runs_that_diverge_are_reported_left_out_exit_3_and_the_json_stays_strict():
    """A learning rate of 1e30 sends the weights to non-finite values in one step: each run is
    marked diverged (its test loss null, not NaN), the mean has nothing left, exit 3."""
    code, out, err = run_script([*BASE, "--runs", "2", "--lr", "1e30", "--json"])
    assert code == 3, err[-3000:]
    lines = out.strip().splitlines()
    report = strict(lines[-1])
    assert [r["diverged"] for r in report["runs"]] == [True, True]
    assert all(r["test_loss"] is None for r in report["runs"])
    assert report["test_acc_mean"] is None and report["test_acc_std"] is None and report["diverged"] == 2
    assert [line for line in lines if line.startswith("run ")] == [
        f"run {k}: seed {k} diverged ({report['runs'][k]['stop']}) train {report['runs'][k]['train_s']:.2f} s"
        for k in range(2)
    ]
    assert lines[-2].startswith("test_acc n/a: all 2 runs diverged")
    assert err.strip().splitlines()[-1] == "speedrun.py: error: 2 of 2 runs diverged (seeds 0, 1); exit 3"


def test_a_diverged_run_among_good_ones_is_left_out_of_the_mean(monkeypatch):
    """The second timed run's fit reports a non-finite loss: the mean and std are those of the
    other runs, the run is listed as diverged, the exit status is 3."""
    import dataclasses

    real_fit, calls = speedrun.fit, []

    def fit(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the warm-up, run 0, then run 1
            return dataclasses.replace(
                result, diverged=True, stop_reason="non-finite loss at step 1 (epoch 1)"
            )
        return result

    monkeypatch.setattr(speedrun, "fit", fit)
    code, out, err = run_script([*BASE, "--runs", "3", "--json"])
    assert code == 3, err[-3000:]
    lines = out.strip().splitlines()
    report = strict(lines[-1])
    assert [r["diverged"] for r in report["runs"]] == [False, True, False]
    live = [report["runs"][0]["test_acc"], report["runs"][2]["test_acc"]]
    assert report["test_acc_mean"] == statistics.mean(live) and report["test_acc_std"] == statistics.stdev(
        live
    )
    assert report["diverged"] == 1
    mean = MEAN_LINE.match(lines[-2].replace(" (1 diverged, left out)", ""))
    assert mean and mean.group(1) == f"{statistics.mean(live):.4f}" and mean.group(3) == "2", lines[-2]
    assert "run 1: seed 1 diverged (non-finite loss at step 1 (epoch 1))" in out
    assert err.strip().splitlines()[-1] == "speedrun.py: error: 1 of 3 runs diverged (seeds 1); exit 3"


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--ensemble", "1000"], "--ensemble 1000 needs about "),
     (["--width", "100000"], "--width must be at most"),
     (["--sweep", "lr=" + ",".join(["1e-3"] * 2000)], "--sweep has 2000 combinations")],
    ids=["ensemble", "width-cap", "sweep-cap"],
)  # fmt: skip
def test_a_recipe_too_large_for_the_memory_is_one_line_exit_2(monkeypatch, argv, message):
    from fashion_func.cli import budget

    monkeypatch.setattr(budget, "available", lambda device: 24 << 30)
    code, out, err = run_script([*BASE, "--runs", "1", *argv])
    assert code == 2 and err.count("\n") == 1 and message in err, err[-3000:]
    assert out == ""
