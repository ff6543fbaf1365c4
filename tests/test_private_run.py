"""Private training (DP-SGD) from the command line: what a run reports and records, how it
resumes, sweeps and ensembles, and data parallel under torchrun.

The step itself (parity with Opacus, the noise, the clipping) is tests/test_privacy.py's; the
Poisson batches are tests/test_poisson.py's. Here every run is dpcnn of width 8 on 2000
training and 200 validation images, expected batch 256 (sample rate 0.128, 8 steps an epoch),
SGD, compile off, in process (`parse_train_args` + `app.train`, or `main_train`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
from reference import assert_tree_equal  # tests/ is on sys.path under pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fashion_func import checkpoint, data, privacy
from fashion_func.cli import app
from fashion_func.cli.train import main_train, parse_train_args
from fashion_func.loop import FitResult

pytest.importorskip("opacus", reason="private training's accounting needs Opacus")
try:
    data.locate(download=False)
except data.DataError:
    pytest.skip("Fashion-MNIST is not installed", allow_module_level=True)

N, BATCH, STEPS = 2000, 256, 8  # steps per epoch: round(N / BATCH)
TARGET = 3.0
ARGS = [
    "--model", "dpcnn", "--width", "8", "--limit-train", str(N), "--limit-val", "200",
    "--batch-size", str(BATCH), "--optimizer", "sgd", "--lr", "0.5", "--seed", "0", "--device", "cpu",
    "--compile", "off", "--no-progress",
]  # fmt: skip
PRIVACY_KEYS = {"epsilon", "delta", "sample_rate", "noise_multiplier", "max_grad_norm", "steps", "accountant"}


def train(argv: list[str], **kw: Any) -> FitResult:
    cfg, _ = parse_train_args(argv)
    return app.train(cfg, **kw)


def history(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "history.json").read_text())


def meta(out: Path, name: str = "last") -> dict[str, Any]:
    return checkpoint.read_metadata(out / "checkpoints" / f"{name}.safetensors")


def recomputed(record: dict[str, Any], steps: int, sigma: float | None = None) -> float:
    """The epsilon of `steps` steps from what the run recorded, asked of the accountant anew."""
    return privacy.epsilon(
        steps,
        sample_rate=record["sample_rate"],
        noise_multiplier=record["noise_multiplier"] if sigma is None else sigma,
        delta=record["delta"],
        accountant=record["accountant"],
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FitResult]:
    """Two epochs towards epsilon 3, TensorBoard on, a checkpoint each epoch."""
    out = tmp_path_factory.mktemp("private") / "straight"
    argv = [*ARGS, "--dp-target-epsilon", str(TARGET), "--epochs", "2", "--save-best-only", "false"]
    result = train([*argv, "--out", str(out)])
    assert result.stop_reason == "completed"
    return out, result


def test_epsilon_each_epoch_is_the_accountants_for_the_steps_taken(straight) -> None:
    out, _ = straight
    rows, record = history(out), meta(out)["privacy"]
    assert record["sample_rate"] == BATCH / N and record["delta"] == 1e-5 and record["accountant"] == "rdp"
    assert record["max_grad_norm"] == 1.0 and record["steps"] == 2 * STEPS
    # sigma chosen once, for the two epochs' steps, so that they end at the target
    assert record["noise_multiplier"] == privacy.noise_multiplier_for(
        TARGET, delta=1e-5, sample_rate=BATCH / N, steps=2 * STEPS
    )
    eps = [r["epsilon"] for r in rows]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= TARGET
    assert eps == [recomputed(record, STEPS * r["epoch"]) for r in rows]
    assert eps[1] == record["epsilon"]


def test_the_log_and_tensorboard_report_epsilon(straight) -> None:
    out, _ = straight
    log = (out / "train.log").read_text()
    line = next(x for x in log.splitlines() if "private training (DP-SGD)" in x)
    sigma = meta(out)["privacy"]["noise_multiplier"]
    parts = (
        f"Poisson sampling rate {BATCH / N:.4g}", f"{STEPS} steps per epoch", "max grad norm 1,",
        f"noise multiplier {sigma:.4g}", "delta 1e-05", "accountant rdp", f"target epsilon {TARGET}",
    )  # fmt: skip
    for part in parts:
        assert part in line, (part, line)
    logged = [float(m) for m in re.findall(r"^.*epoch \d+/2 .* epsilon (\d+\.\d+)", log, flags=re.M)]
    assert logged == pytest.approx([r["epsilon"] for r in history(out)], abs=1e-4)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("epsilon")
    assert [s.value for s in scalars] == pytest.approx([r["epsilon"] for r in history(out)], rel=1e-6)
    assert [s.step for s in scalars] == [1, 2]  # by epoch, as every scalar


def test_every_weights_file_records_the_guarantee_of_its_steps(straight) -> None:
    out, _ = straight
    rows = history(out)
    files = ["best", "last", "epoch-001", "epoch-002"]
    for name in files:
        m = meta(out, name)
        record = m["privacy"]
        assert PRIVACY_KEYS <= set(record), (name, record)
        assert record["steps"] == STEPS * m["epoch"]
        assert record["epsilon"] == rows[m["epoch"] - 1]["epsilon"] == recomputed(record, record["steps"])
        assert record["target_epsilon"] == TARGET and record["sampling"] == "poisson"


def test_an_exported_weights_file_keeps_the_guarantee(straight, tmp_path) -> None:
    from fashion_func.cli.export import main as export_main

    out, _ = straight
    exported = tmp_path / "shared.safetensors"
    best = out / "checkpoints" / "best.safetensors"
    assert export_main(["--weights", str(best), "--format", "torch", "--out", str(exported)]) == 0
    assert checkpoint.read_metadata(exported)["privacy"] == meta(out, "best")["privacy"]


def test_a_resume_past_the_budget_stops_before_the_epoch(straight, tmp_path, capsys) -> None:
    """--epochs 4 on a run that spent its epsilon in 2: epoch 3 would pass the target, so the
    run stops before it, no step taken, the weights as they were; sigma stays the one chosen."""
    out = tmp_path / "more"
    shutil.copytree(straight[0], out)
    before = meta(out)
    code = main_train(["--resume", "auto", "--out", str(out), "--epochs", "4"])
    stdout = capsys.readouterr().out
    assert code == 0
    eps3 = recomputed(before["privacy"], 3 * STEPS)
    assert eps3 > TARGET
    reason = f"privacy budget: epoch 3 would take epsilon to {eps3:.3f}, past the target {TARGET}"
    assert f"stopping: {reason}" in stdout
    after = meta(out)
    assert after["privacy"]["steps"] == 2 * STEPS and after["epoch"] == 2
    assert after["privacy"]["noise_multiplier"] == before["privacy"]["noise_multiplier"]
    assert len(history(out)) == 2
    cfg, _ = parse_train_args(["--resume", "auto", "--out", str(out), "--epochs", "4"])
    again = app.train(cfg, resume="auto")
    assert again.stop_reason.startswith("privacy budget: epoch 3 would take epsilon to")
    assert int(again.state.step) == 2 * STEPS
    assert_tree_equal(again.state.params, straight[1].state.params)


def test_a_resume_inside_an_epoch_is_exact(straight, tmp_path) -> None:
    """Cut after step 11 (inside epoch 2) as a crash would, resumed: bitwise the straight run's
    parameters and optimizer state (the same Poisson batches, the same noise)."""
    out = tmp_path / "cut"
    argv = [*ARGS, "--dp-target-epsilon", str(TARGET), "--epochs", "2", "--save-best-only", "false",
            "--no-tensorboard", "--out", str(out)]  # fmt: skip
    cut = train(argv, max_steps=11)
    assert cut.stop_reason == "max_steps 11 reached"
    assert meta(out)["in_epoch"]["batch"] == 11 - STEPS
    resumed = train(argv, resume="auto")
    assert resumed.stop_reason == "completed"
    assert_tree_equal(resumed.state, straight[1].state)
    assert [r["epsilon"] for r in history(out)] == [r["epsilon"] for r in history(straight[0])]


def test_a_sweep_over_noise_multipliers_reports_each_members_epsilon(tmp_path) -> None:
    out = tmp_path / "sweep"
    result = train([*ARGS, "--sweep", "dp_noise_multiplier=0.8,1.5", "--epochs", "1", "--no-tensorboard",
                    "--out", str(out)])  # fmt: skip
    assert result.stop_reason == "completed"
    (row,) = history(out)
    record = meta(out)["privacy"]
    assert record["noise_multiplier"] == [0.8, 1.5]
    assert row["epsilon_m0"] == recomputed(record, STEPS, 0.8)
    assert row["epsilon_m1"] == recomputed(record, STEPS, 1.5)
    assert row["epsilon_m1"] < row["epsilon_m0"] == row["epsilon"]  # more noise, less epsilon
    assert record["epsilon"] == [row["epsilon_m0"], row["epsilon_m1"]]
    # the members share one init and one batch order: only the noise differs
    p = result.state.params
    assert all(not bool((v[0] == v[1]).all()) for v in p.values())


def test_an_ensemble_trains_privately(tmp_path) -> None:
    """Two members, each with its own init and its own noise, one accountant (the same sigma)."""
    out = tmp_path / "ensemble"
    result = train([*ARGS, "--ensemble", "2", "--dp-noise-multiplier", "1", "--epochs", "1",
                    "--no-tensorboard", "--out", str(out)])  # fmt: skip
    assert result.stop_reason == "completed" and not result.diverged
    (row,) = history(out)
    record = meta(out)["privacy"]
    assert record["noise_multiplier"] == 1.0 and record["steps"] == STEPS
    assert row["epsilon"] == record["epsilon"] == recomputed(record, STEPS)
    assert all(v.shape[0] == 2 and not bool((v[0] == v[1]).all()) for v in result.state.params.values())


@pytest.mark.distributed
def test_two_processes_train_privately_like_one(straight, tmp_path) -> None:
    """torchrun, 2 gloo ranks: each clips and sums its half of every Poisson batch, the sums are
    added over the ranks and the same noise is added once, so the run is the 1-process run's
    up to float rounding of the sums (tolerance as tests/test_distributed.py's); epsilon, a
    function of the steps alone, is equal."""
    from test_distributed import finish, free_port, torchrun

    argv = [*ARGS, "--dp-target-epsilon", str(TARGET), "--epochs", "2", "--save-best-only", "false",
            "--no-tensorboard", "--out", "run"]  # fmt: skip
    launcher = ["--nproc-per-node", "2", "--master-port", str(free_port())]
    code, _, err = finish(torchrun(launcher, argv, tmp_path))
    assert code == 0, err[-3000:]
    one, two = straight[0], tmp_path / "run"
    for name in ("epoch-001", "epoch-002"):
        a = safetensors.torch.load_file(one / "checkpoints" / f"{name}.safetensors")
        b = safetensors.torch.load_file(two / "checkpoints" / f"{name}.safetensors")
        assert a and a.keys() == b.keys()  # the weights files: the parameters alone
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-4, (name, worst)
        assert meta(two, name)["privacy"] == meta(one, name)["privacy"]
    h1, h2 = history(one), history(two)
    assert [r["epsilon"] for r in h2] == [r["epsilon"] for r in h1]
    for r1, r2 in zip(h1, h2, strict=True):
        for k in ("train_loss", "train_clipped", "val_loss"):
            assert r2[k] == pytest.approx(r1[k], abs=1e-4), k
        for k in ("train_acc", "val_acc"):  # an example's near-tie may flip: one in ~2000 or 200
            assert r2[k] == pytest.approx(r1[k], abs=1.01 / 200), k


def test_group_norm_and_the_prv_accountant(tmp_path) -> None:
    """dpcnn with group norm (per example: private), sigma chosen by Opacus's PRV accountant for
    a target at delta 1e-4; the epsilon reported is PRV's and ends within the target."""
    out = tmp_path / "prv"
    argv = ["--model", "dpcnn", "--width", "4", "--groups", "2", "--limit-train", "500", "--limit-val", "100",
            "--batch-size", "100", "--dp-target-epsilon", "2", "--dp-accountant", "prv", "--dp-delta", "1e-4",
            "--epochs", "2", "--device", "cpu", "--compile", "off", "--no-progress", "--no-tensorboard",
            "--out", str(out)]  # fmt: skip
    assert train(argv).stop_reason == "completed"
    record = meta(out)["privacy"]
    assert (record["accountant"], record["delta"], record["sample_rate"], record["steps"]) == (
        "prv",
        1e-4,
        0.2,
        10,
    )
    assert record["noise_multiplier"] == privacy.noise_multiplier_for(
        2.0, delta=1e-4, sample_rate=0.2, steps=10, accountant="prv"
    )
    eps = [r["epsilon"] for r in history(out)]
    assert eps == [recomputed(record, 5), recomputed(record, 10)] and eps[0] < eps[1] <= 2.0
    assert meta(out)["model_hparams"] == {"num_classes": 10, "width": 4, "groups": 2}  # --groups reached it
    assert "Model: dpcnn {'num_classes': 10, 'width': 4, 'groups': 2}" in (out / "train.log").read_text()


def test_the_readme_private_training_block_runs_as_written(tmp_path) -> None:
    """The README's "Private training" Python block, run exactly as written in a fresh folder."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Private training", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "private.py"
    script.write_text(blocks[0])
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"epsilon ([0-9.]+) val_acc ([0-9.]+)", proc.stdout)
    assert found, proc.stdout
    eps, acc = float(found.group(1)), float(found.group(2))
    q = 256 / 4096
    assert eps == pytest.approx(
        privacy.epsilon(2 * round(1 / q), sample_rate=q, noise_multiplier=1.0, delta=1e-5)
    )
    assert acc > 0.3  # two private epochs of 4096 images: well above chance (0.1)
