"""scripts/bench.py runs its rows in one call and prints their table (its arithmetic:
test_bench_bookkeeping.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _bench():
    """scripts/bench.py as a module, in this process."""
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _numbers(row: dict, keys: tuple[str, ...]) -> list[float]:
    return [row[k] for k in keys] + list(row["times"])


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="needs the Fashion-MNIST files"
)
def test_bench_quick_run_prints_the_table():
    """One short real run: the table's shape, and finite positive numbers in it. The arithmetic
    behind them is checked on made-up records (tests/test_bench_bookkeeping.py)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--limit-train", "256", "--limit-val", "100",
           "--epochs", "3", "--rows", "fashion_func,tutorial", "--no-compile", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["fashion_func (fp32)", "tutorial"]
    keys = ("steady_s", "warmup_s", "vs_tutorial", "peak_mb", "gflops", "pct_gemm")
    for r in rows.values():
        assert len(r["times"]) == 3
        assert all(math.isfinite(v) and v > 0 for v in _numbers(r, keys)), r
        assert 0.0 <= r["acc"] <= 1.0
    assert math.isfinite(rows["fashion_func (fp32)"]["eval_pct"])
    assert report["gemm_gflops"]["fp32"] > 0 and report["train_flops_per_image"] > 0
    # the table: a header of 8 columns, a rule, then one line of 8 fields per row
    header = next(i for i, line in enumerate(lines) if line.startswith("row "))
    assert lines[header].split() == ["row", "s/epoch", "vs", "tutorial", "warm-up", "s", "test", "acc",
                                     "peak", "MB", "GFLOP/s", "%", "GEMM"]  # fmt: skip
    assert set(lines[header + 1]) == {"-"}
    table = [line.split() for line in lines[header + 2 : header + 4]]
    assert [line[0] for line in table] == ["fashion_func", "tutorial"]
    assert [len(line) for line in table] == [9, 8]  # "fashion_func (fp32)" is two words
    assert table[1][2] == "1.00x"  # the tutorial is its own baseline
    assert lines[header + 4].startswith("GEMM fp32: ") and "evaluating 100 test images" in proc.stdout


def test_bench_rejects_too_few_epochs(capsys):
    # in this process: argparse's usage error is SystemExit(2), which a script's exit status is
    with pytest.raises(SystemExit) as info:
        _bench().main(["--epochs", "1"])
    assert info.value.code == 2
    assert "at least 3" in capsys.readouterr().err


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="needs the Fashion-MNIST files"
)
def test_bench_dp_quick_run_prints_the_table():
    """One short real --dp run: the table's shape and finite positive numbers (the arithmetic:
    tests/test_bench_bookkeeping.py). Tiny settings, and torch.compile off (TORCHDYNAMO_DISABLE):
    compiling is seconds per row and its speed is not what this checks."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--dp", "--dp-batch", "16", "--dp-steps", "3",
           "--dp-warmup", "1", "--rows", "private,opacus,nonprivate", "--json"]  # fmt: skip
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["private", "opacus", "nonprivate"]
    assert report["rounds"] == 1  # rounds are merged by dp_merge_rounds (test_bench_bookkeeping.py)
    for r in rows.values():
        assert len(r["times"]) == 3
        assert all(math.isfinite(v) and v > 0 for v in _numbers(r, ("step_s", "examples_per_s", "warmup_s",
                                                                    "peak_mb"))), r  # fmt: skip
    assert list(report["ratios"]) == [
        "ours/opacus throughput (private, update)",
        "private/non-private throughput (update)",
    ]
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    header = next(i for i, line in enumerate(lines) if line.startswith("row "))
    assert lines[header].split() == ["row", "ms/step", "examples/s", "warm-up", "s", "peak", "MB"]
    table = [line.split() for line in lines[header + 2 : header + 5]]
    assert [line[0] for line in table] == list(rows) and all(len(line) == 5 for line in table)
    assert [line.split(": ")[0] for line in lines[header + 5 : header + 7]] == list(report["ratios"])
    assert report["device"] == _bench()._cpu_name() and report["device"] in lines[header - 1]


def test_bench_dp_rejects_unknown_rows(capsys):
    bench = _bench()
    with pytest.raises(SystemExit) as info:
        bench.main(["--dp", "--rows", "private,tutorial"])
    assert info.value.code == 2
    assert "unknown --dp rows: tutorial" in capsys.readouterr().err
