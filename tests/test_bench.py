"""scripts/bench.py runs its rows in one call and reports ratios against the tutorial row."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="needs the Fashion-MNIST files"
)
def test_bench_quick_run_prints_table_and_json():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--limit-train", "256", "--limit-val", "500",
           "--epochs", "3",
           "--rows", "fashion_func,tutorial,eager", "--no-compile", "--json", "--ensemble", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"fashion_func (fp32)", "tutorial", "eager", "ensemble 2 (fp32)"}
    for r in rows.values():
        assert len(r["times"]) == 3 and all(t > 0 for t in r["times"])
        assert min(r["times"][1:]) <= r["steady_s"] <= max(r["times"][1:])  # median of the timed epochs
        assert 0.0 <= r["acc"] <= 1.0 and r["peak_mb"] > 0
    table = "\n".join(lines)
    assert "vs tutorial" in table and "1.00x" in table  # the tutorial row is the baseline
    assert "evaluating 500 test images" in table
    # the ensemble row is measured against the solo row of the same call
    ens, solo = rows["ensemble 2 (fp32)"], rows["fashion_func (fp32)"]
    assert ens["members"] == 2
    assert ens["per_model_throughput"] == pytest.approx(2 * solo["steady_s"] / ens["steady_s"])
    assert "per-model throughput" in table
    # the roofline: the GEMM rate measured in the same call, each row's share of it
    flops, rate = report["train_flops_per_image"], report["gemm_gflops"]["fp32"]
    assert 6e7 < flops < 8e7  # SimpleNet: about 24 MFLOP forward, x3 with the backward
    for r in rows.values():
        assert r["gflops"] == pytest.approx(r.get("members", 1) * 256 * flops / r["steady_s"] / 1e9)
        assert r["pct_gemm"] == pytest.approx(100 * r["gflops"] / rate)
    assert "% GEMM" in table and "GEMM fp32:" in table


def test_bench_rejects_too_few_epochs(capsys):
    # in this process: argparse's usage error is SystemExit(2), which a script's exit status is
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as info:
        bench.main(["--epochs", "1"])
    assert info.value.code == 2
    assert "at least 3" in capsys.readouterr().err


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="needs the Fashion-MNIST files"
)
def test_bench_dp_quick_run_prints_the_ratios():
    # tiny settings and no fully compiled rows (a cold compile is a minute): the rows and the
    # ratios are computed and printed, their speed is not asserted
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--dp", "--dp-batch", "16", "--dp-steps", "3",
           "--dp-warmup", "1", "--rows", "private,opacus,nonprivate", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"private", "opacus", "nonprivate"}
    for r in rows.values():
        assert len(r["times"]) == 3 and all(t > 0 for t in r["times"])
        assert r["step_s"] == sorted(r["times"])[1]  # the median of the timed steps
        assert r["examples_per_s"] == pytest.approx(16 / r["step_s"])
        assert r["warmup_s"] > 0 and r["peak_mb"] > 0
    rate = {name: r["examples_per_s"] for name, r in rows.items()}
    assert report["ratios"] == pytest.approx({
        "ours/opacus throughput (private, update)": rate["private"] / rate["opacus"],
        "private/non-private throughput (update)": rate["private"] / rate["nonprivate"],
    })  # fmt: skip
    table = "\n".join(lines[:-1])
    assert "ours/opacus throughput (private, update): " in table
    assert "private/non-private throughput (update): " in table
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert report["device"] == bench._cpu_name() and bench._cpu_name() in table


def test_bench_dp_rejects_unknown_rows(capsys):
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as info:
        bench.main(["--dp", "--rows", "private,tutorial"])
    assert info.value.code == 2
    assert "unknown --dp rows: tutorial" in capsys.readouterr().err
