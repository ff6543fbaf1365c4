"""scripts/bench.py's arithmetic on made-up timing records, against answers worked out by hand.

The real benchmark runs in tests/test_bench.py only check the table's shape: its numbers are
measured there, so only a record whose numbers are chosen here can check the sums.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

EPOCH_FLOPS = 1.2e12  # one model's training FLOPs over an epoch's images (made up)

# what the children report: seconds per epoch, the first being the warm-up
RECORD = [
    {"row": "fashion_func (fp32)", "precision": "fp32", "times": [9.0, 2.0, 4.0, 3.0], "acc": 0.8,
     "peak_mb": 500.0, "eval_s": 0.6, "total_s": 20.0},
    {"row": "fashion_func (bf16)", "precision": "bf16", "times": [1.0, 2.0, 2.0], "acc": 0.8,
     "peak_mb": 400.0},
    {"row": "tutorial", "precision": "fp32", "times": [5.0, 5.0, 7.0], "acc": 0.7, "peak_mb": 300.0},
    {"row": "eager", "precision": "fp32", "skipped": "failed: boom"},
    {"row": "ensemble 2 (fp32)", "precision": "fp32", "times": [20.0, 4.0, 4.0], "acc": 0.8, "peak_mb": 900.0,
     "members": 2, "total_s": 30.0},
    {"row": "gemm (fp32)", "precision": "fp32", "gemm_gflops": 1000.0},
    {"row": "gemm (bf16)", "precision": "bf16", "skipped": "failed: no bf16"},
]  # fmt: skip


def test_table_rows_from_a_made_up_record() -> None:
    before = copy.deepcopy(RECORD)
    rows, gemm = bench.table_rows(RECORD, EPOCH_FLOPS)
    assert RECORD == before  # pure: the record is left as it was
    by = {r["row"]: r for r in rows}
    assert list(by) == [r["row"] for r in RECORD[:5]]  # the GEMM rows are not table rows
    assert gemm == {"fp32": RECORD[5], "bf16": RECORD[6]}

    ff = by["fashion_func (fp32)"]
    assert ff["steady_s"] == 3.0  # median of 2, 4, 3 (the 9 s warm-up left out)
    assert ff["warmup_s"] == 9.0
    assert ff["vs_tutorial"] == pytest.approx(2.0)  # tutorial 6 s / 3 s
    assert ff["gflops"] == pytest.approx(400.0)  # 1.2e12 / 3 s / 1e9
    assert ff["pct_gemm"] == pytest.approx(40.0)  # 100 x 400 / 1000
    assert ff["eval_pct"] == pytest.approx(20.0)  # 100 x 0.6 s / 3 s

    tut = by["tutorial"]
    assert tut["steady_s"] == 6.0  # median of two epochs, 5 and 7: their mean
    assert tut["warmup_s"] == 5.0
    assert tut["vs_tutorial"] == pytest.approx(1.0)
    assert tut["gflops"] == pytest.approx(200.0)  # 1.2e12 / 6 s / 1e9
    assert tut["pct_gemm"] == pytest.approx(20.0)  # 100 x 200 / 1000
    assert "eval_pct" not in tut and "per_model_throughput" not in tut

    ens = by["ensemble 2 (fp32)"]
    assert ens["steady_s"] == 4.0 and ens["warmup_s"] == 20.0
    assert ens["vs_tutorial"] == pytest.approx(1.5)  # 6 s / 4 s
    assert ens["gflops"] == pytest.approx(600.0)  # 2 models x 1.2e12 / 4 s / 1e9
    assert ens["pct_gemm"] == pytest.approx(60.0)  # 100 x 600 / 1000
    assert ens["solo_steady_s"] == 3.0  # the fp32 solo row's, not the bf16 one's 2 s
    assert ens["per_model_throughput"] == pytest.approx(1.5)  # 2 x 3 s / 4 s

    bf16 = by["fashion_func (bf16)"]
    assert bf16["steady_s"] == 2.0 and bf16["vs_tutorial"] == pytest.approx(3.0)  # 6 s / 2 s
    assert bf16["gflops"] == pytest.approx(600.0)  # 1.2e12 / 2 s / 1e9
    assert "pct_gemm" not in bf16  # its GEMM run failed: no share of an unmeasured rate

    assert by["eager"] == {"row": "eager", "precision": "fp32", "skipped": "failed: boom"}


def test_table_rows_without_a_tutorial_or_solo_row() -> None:
    record = [
        {"row": "ensemble 3 (fp32)", "precision": "fp32", "times": [1.0, 5.0, 5.0, 5.0], "members": 3},
        {"row": "gemm (fp32)", "precision": "fp32", "gemm_gflops": 100.0},
    ]
    (ens,), _ = bench.table_rows(record, 1e11)
    assert ens["steady_s"] == 5.0 and ens["vs_tutorial"] is None
    assert ens["gflops"] == pytest.approx(60.0)  # 3 models x 1e11 / 5 s / 1e9
    assert ens["pct_gemm"] == pytest.approx(60.0)  # 100 x 60 / 100
    assert "per_model_throughput" not in ens  # no solo row to compare with


def test_dp_step_record_from_made_up_step_times() -> None:
    record = bench.dp_step_record([3.0, 1.0, 0.5, 0.25, 0.75], warmup=2, batch=100)
    assert record == {
        "times": [0.5, 0.25, 0.75],  # the steps after the two warm-up steps
        "warmup_s": 4.0,  # 3 + 1
        "step_s": 0.5,  # median of 0.5, 0.25, 0.75
        "examples_per_s": 200.0,  # 100 examples / 0.5 s
    }
    assert bench.dp_step_record([1.0, 0.2, 0.4], warmup=1, batch=30)["step_s"] == pytest.approx(0.3)


def test_dp_ratios_from_made_up_throughputs() -> None:
    rows = [
        {"row": "private", "examples_per_s": 200.0},
        {"row": "opacus", "examples_per_s": 50.0},
        {"row": "nonprivate", "examples_per_s": 400.0},
        {"row": "private_compiled", "examples_per_s": 300.0},
        {"row": "nonprivate_compiled", "skipped": "failed: boom"},
    ]
    assert bench.dp_ratios(rows) == {
        "ours/opacus throughput (private, update)": 4.0,  # 200 / 50
        "private/non-private throughput (update)": 0.5,  # 200 / 400
        "ours/opacus throughput (private, compiled)": 6.0,  # 300 / 50; no compiled non-private rate
    }
    assert bench.dp_ratios([{"row": "private", "examples_per_s": 1.0}]) == {}  # nothing to compare with


def test_dp_merge_rounds_takes_each_rows_median_over_the_rounds() -> None:
    def rec(row, step_s, warm=1.0, peak=10.0):
        return {"row": row, "step_s": step_s, "examples_per_s": 100 / step_s, "warmup_s": warm,
                "peak_mb": peak, "times": [step_s]}  # fmt: skip

    rounds = [
        [rec("private", 0.5, peak=12.0), rec("opacus", 1.0), {"row": "nonprivate", "skipped": "failed: a"}],
        [rec("private", 0.1), rec("opacus", 2.0, warm=3.0), rec("nonprivate", 0.2)],
        [rec("private", 0.3), rec("opacus", 1.5), {"row": "nonprivate", "skipped": "failed: c"}],
    ]
    private, opacus, plain = bench.dp_merge_rounds(rounds, batch=100)
    assert private["step_s"] == 0.3 and private["examples_per_s"] == pytest.approx(100 / 0.3)  # median
    assert private["peak_mb"] == 12.0 and private["times"] == [0.5, 0.1, 0.3]
    assert opacus["step_s"] == 1.5 and opacus["warmup_s"] == 1.0
    assert plain == {"row": "nonprivate", "skipped": "failed: a"}  # skipped in a round: skipped
    # one round: the record as it was
    assert bench.dp_merge_rounds([rounds[1]], batch=100)[0]["step_s"] == 0.1
