"""A member of an ensemble or sweep that diverges is marked, left out, and the others go on
(`fashion_func.loop.members`, fit's member reduction, the members table, exit codes)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from reference import assert_tree_equal

from fashion_func import checkpoint, ensemble, models, optim
from fashion_func.cli import app
from fashion_func.cli.train import main_train, parse_train_args
from fashion_func.loop import members as members_lib
from fashion_func.loop.fit import expand_members

TINY = ["--model", "mlp", "--epochs", "2", "--limit-train", "256", "--limit-val", "100",
        "--compile", "off", "--no-progress", "--no-tensorboard"]  # fmt: skip

# every kind of value a member's metric can take, finite or not
VALUES = [0.5, 1.0, -2.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("a", VALUES)
@pytest.mark.parametrize("b", VALUES)
@pytest.mark.parametrize("dead", [(), (0,), (1,), (0, 1)])
def test_member_reduction_never_raises_and_leaves_the_dead_out(a, b, dead):
    out = expand_members({"x": [a, b, 0.25]}, dead=dead)
    live = [v for k, v in enumerate([a, b, 0.25]) if k not in dead]
    for k, v in enumerate([a, b, 0.25]):
        got = out[f"x_m{k}"]
        assert math.isnan(got) if k in dead else (got == v or (math.isnan(got) and math.isnan(v)))
    if all(math.isfinite(v) for v in live):
        try:
            want = statistics.fmean(live)
        except OverflowError:
            want = sum(v / len(live) for v in live)
        assert out["x_mean"] == pytest.approx(want) and out["x"] == out["x_mean"]
        if len(live) > 1 and all(abs(v) < 1e300 for v in live):
            assert out["x_std"] == pytest.approx(statistics.stdev(live))
    else:  # a live non-finite value: the mean says so, the spread is unknown
        assert not math.isfinite(out["x_mean"]) and math.isnan(out["x_std"])


def test_no_live_member_gives_nan_not_an_error():
    out = expand_members({"x": [1.0, 2.0]}, dead=(0, 1))
    assert all(math.isnan(out[k]) for k in ("x", "x_mean", "x_std", "x_m0", "x_m1"))


@pytest.mark.parametrize(
    "meta",
    [{"member": 0}, [{"member": 2, "epoch": 1, "step": 0}], [{"member": 0, "epoch": 0, "step": 0}],
     [{"member": 0, "epoch": 1, "step": -2}], [{"member": True, "epoch": 1, "step": 0}],
     [{"member": 0, "epoch": 1, "step": 1}, {"member": 0, "epoch": 2, "step": 9}], ["x"]],
)  # fmt: skip
def test_saved_marks_are_validated(meta):
    with pytest.raises(ValueError, match="diverged_members"):
        members_lib.Stack.from_meta(meta, 2)


def test_quiet_zeroes_only_the_dead_members_non_finite_numbers():
    st = ensemble.init(models.get("mlp"), optim.adam(1e-3), members=3, seed=0)
    bad = {k: v.clone() for k, v in st.params.items()}
    for v in bad.values():
        v[1] = math.nan
    st2 = members_lib.quiet(st.replace(params=bad), [1])
    for k, v in st2.params.items():
        assert torch.equal(v[0], st.params[k][0]) and torch.equal(v[2], st.params[k][2])
        assert torch.equal(v[1], torch.zeros_like(v[1]))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main_train([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_a_sweep_member_that_diverges_is_left_out_and_the_others_go_on(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run([*TINY, "--sweep", "lr=1e-3,1e30", "--out", out], capsys)
    assert code == 0, err
    rows = json.loads((out / "members.json").read_text())
    assert rows[0]["diverged"] is None and rows[0]["best"] is not None
    assert rows[1]["diverged"]["epoch"] == 1 and rows[1]["diverged"]["step"] >= 1 and rows[1]["best"] is None
    history = json.loads((out / "history.json").read_text())
    for rec in history:
        assert rec["members_diverged"] == 1 and rec["val_loss_m1"] == "nan"
        assert rec["val_loss_mean"] == rec["val_loss_m0"] and rec["val_loss_std"] == 0.0
        # the sweep's own train_loss is the live members' mean
        assert rec["train_loss"] == rec["train_loss_m0"]
    assert "member 1 diverged" in (out / "train.log").read_text()


def test_an_ensemble_whose_members_all_diverge_exits_3_in_one_line(tmp_path, capsys):
    code, err = _run([*TINY, "--ensemble", "2", "--lr", "1e30", "--out", tmp_path / "run"], capsys)
    assert code == 3 and "Traceback" not in err
    assert (
        err.strip().splitlines()[-1].startswith("train.py: error: training diverged (every member diverged")
    )
    rows = json.loads((tmp_path / "run" / "members.json").read_text())
    assert all(r["diverged"] for r in rows)


def test_a_stacks_own_validation_and_test_leave_the_diverged_member_out(tmp_path, capsys):
    """The ensemble's own validation (mean of probabilities) is that of the live members: with
    one of two left, it equals that member's."""
    out = tmp_path / "run"
    code, err = _run([*TINY, "--sweep", "lr=1e30,1e-3", "--val-split", "50", "--out", out], capsys)
    assert code == 0, err
    rec = json.loads((out / "history.json").read_text())[-1]
    assert rec["val_loss_m0"] == "nan" and rec["val_loss_mean"] == rec["val_loss_m1"]
    test = json.loads((out / "test.json").read_text())
    assert math.isfinite(test["test_loss"]) and "did not diverge" in test["weights"]


def test_resume_with_a_diverged_member_is_exact(tmp_path):
    """Cut mid-epoch 2 (after member 1 diverged in epoch 1), resumed == the straight run."""
    argv = [*TINY, "--sweep", "lr=1e-3,1e30", "--limit-train", "256", "--batch-size", "64"]
    straight_cfg, _ = parse_train_args([*argv, "--out", str(tmp_path / "straight")])
    cut_cfg, _ = parse_train_args([*argv, "--out", str(tmp_path / "cut")])
    straight = app.train(straight_cfg)
    cut = app.train(cut_cfg, max_steps=6)
    assert cut.stop_reason == "max_steps 6 reached"
    meta = checkpoint.read_metadata(tmp_path / "cut" / "checkpoints" / "last.safetensors")
    assert [m["member"] for m in meta["diverged_members"]] == [1]
    res = app.train(cut_cfg, resume="auto")
    assert_tree_equal(res.state, straight.state)
    strip = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in res.history]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in straight.history]
    assert res.diverged_members == straight.diverged_members
    assert not res.diverged and Path(res.out_dir).is_dir()
