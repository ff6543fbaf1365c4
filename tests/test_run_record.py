"""The run record a checkpoint holds (`RunRecord`), `fit`'s typed result and why a run stopped."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

from fashion_func import checkpoint, optim, state
from fashion_func.loop import FitResult, StopReason, fit
from fashion_func.loop.resume import Problem, ProblemKind, RunRecord, compatible, load

# a last.safetensors's metadata as the current format writes it (keys in the order written)
SAVED = {
    "config": {"model": "simplenet", "epochs": 4, "batch_size": 8},
    "model": "simplenet",
    "privacy": {"noise_multiplier": 1.1, "sample_rate": 0.01, "epsilon": 0.5, "steps": 30},
    "splits": {"train": 96, "held_out": 0, "test": 32, "digest": "0123456789abcdef"},
    "epoch": 1,
    "callbacks": {"EarlyStopping": {"best": 0.5, "wait": 1, "best_epoch": 1}},
    "history": [{"epoch": 1, "train_loss": 0.7}],
    "rng_states": None,
    "lr": 0.001,
    "in_epoch": {
        "epoch": 2,
        "batch": 3,
        "batching": {"batch_size": 8},
        "sums": {"loss_sum": 1.5, "count": 24},
        "dtypes": {"loss_sum": "float32", "count": "int64"},
        "first_bad": -1,
        "elapsed": 0.25,
    },
    "diverged_members": [{"member": 1, "epoch": 1, "step": 5}],
}


def test_existing_metadata_reads_into_a_record_and_writes_back_the_same_json():
    meta = {k: v for k, v in SAVED.items() if v is not None}
    record = RunRecord.from_meta(meta)
    assert record.epoch == 1 and record.settings == {"config": SAVED["config"], "model": "simplenet"}
    assert record.batching == {"batch_size": 8} and record.privacy == SAVED["privacy"]
    assert json.dumps(record.to_meta()) == json.dumps(meta)  # same keys, same order, same values


def test_a_record_round_trips_through_metadata_and_json():
    record = RunRecord(
        settings={"model": "simplenet", "config": {"lr": 0.01}}, epoch=3, splits={"train": 10},
        callbacks={"A": {"wait": 0}}, history=[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}],
        diverged_members=[{"member": 0, "epoch": 2, "step": 7}], privacy={"epsilon": 1.0},
        data_state={"seed": 4}, lr=[0.1, 0.2],
    )  # fmt: skip
    assert RunRecord.from_meta(json.loads(json.dumps(record.to_meta()))) == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.epoch = 4  # type: ignore[misc]


def test_a_malformed_record_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="epoch must be an integer"):
        RunRecord.from_meta({"epoch": -1})
    with pytest.raises(ValueError, match="history"):
        RunRecord.from_meta({"history": [{"epoch": 0}]})


def _tiny_run(tmp_path: Path, **kw: typing.Any) -> FitResult:
    torch.manual_seed(0)
    params = {"w": torch.zeros(2)}
    st = state.create(params, optim.sgd(0.1), seed=0)

    def step(s: state.TrainState, batch: torch.Tensor) -> tuple[state.TrainState, dict[str, torch.Tensor]]:
        return s.replace(step=s.step + 1), {"loss_sum": batch.sum(), "count": torch.tensor(batch.numel())}

    batches = [torch.ones(2)] * 3
    return fit(st, step, batches, epochs=2, run_dir=tmp_path / "run", metadata={"model": "toy"}, **kw)


def test_fit_result_is_typed_and_says_why_it_stopped(tmp_path):
    hints = typing.get_type_hints(FitResult)
    assert hints["stop"] is StopReason and hints["diverged"] is bool
    assert hints["member_best"] == dict[int, dict[str, typing.Any]]
    assert "extra" not in hints  # no untyped dict read by key
    done = _tiny_run(tmp_path)
    assert done.stop is StopReason.COMPLETED and done.stop_reason == "completed" and done.epochs_run == 2
    assert done.member_best == {} and done.diverged_members == {}
    cut = _tiny_run(tmp_path / "cut", max_steps=4)
    assert cut.stop is StopReason.MAX_STEPS and cut.stop_reason == "max_steps 4 reached"
    meta = checkpoint.read_metadata(tmp_path / "cut" / "run" / "checkpoints" / "last.safetensors")
    record = RunRecord.from_meta(meta)
    assert record.settings == {"model": "toy"} and record.epoch == 1 and record.in_epoch["batch"] == 1
    assert record.to_meta() == meta
    st = state.create({"w": torch.zeros(2)}, optim.sgd(0.1), seed=0)
    point = load(tmp_path / "cut" / "run" / "checkpoints" / "last.safetensors", st)
    assert point.record == record and point.start_epoch == 2


def test_stop_reasons_are_the_ways_a_run_ends():
    assert {r.value for r in StopReason} == {
        "completed", "max_steps", "callback", "non_finite", "members_diverged", "privacy_budget",
    }  # fmt: skip


# (saved, now) -> the kinds of problem `compatible` finds; each row says why
_PRIV = {"sample_rate": 0.01, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5,
         "accountant": "rdp"}  # fmt: skip
_REC = {**_PRIV, "epsilon": 0.5, "steps": 30, "sampling": "poisson"}
_SPLITS = {"train": 96, "held_out": 0, "test": 32, "digest": "0123456789abcdef"}
COMPATIBLE = {
    "the same run": (RunRecord({"model": "mlp"}), RunRecord({"model": "mlp"}), []),
    "another model": (RunRecord({"model": "mlp"}), RunRecord({"model": "simplenet"}), [ProblemKind.MODEL]),
    "no model named now": (RunRecord({"model": "mlp"}), RunRecord(), []),
    "other images": (
        RunRecord(splits=_SPLITS),
        RunRecord(splits={**_SPLITS, "train": 40}),
        [ProblemKind.SPLITS],
    ),
    "no splits saved": (RunRecord(), RunRecord(splits=_SPLITS), []),
    "the same privacy record": (RunRecord(privacy=_REC), RunRecord(privacy=_PRIV), []),
    "a private run from a record-less file": (RunRecord(), RunRecord(privacy=_PRIV), [ProblemKind.PRIVACY]),
    "another noise multiplier": (
        RunRecord(privacy=_REC),
        RunRecord(privacy={**_PRIV, "noise_multiplier": 2.0}),
        [ProblemKind.PRIVACY],
    ),
    "a record on a non-private run is not judged": (RunRecord(privacy=_REC), RunRecord(), []),
    "two at once": (
        RunRecord({"model": "mlp"}, splits=_SPLITS),
        RunRecord({"model": "cnn"}, splits={**_SPLITS, "digest": "x"}),
        [ProblemKind.MODEL, ProblemKind.SPLITS],
    ),
}


@pytest.mark.parametrize("case", COMPATIBLE)
def test_compatible_finds_the_problems_of_each_pair(case):
    saved, now, kinds = COMPATIBLE[case]
    problems = compatible(saved, now)
    assert [p.kind for p in problems] == kinds
    for p in problems:
        assert isinstance(p, Problem) and p.now is not None and p.key in ("model", "splits", "privacy")


def test_the_steps_a_private_record_counts_are_the_states():
    assert compatible(RunRecord(privacy=_REC), RunRecord(privacy=_PRIV), steps=30) == []
    (problem,) = compatible(RunRecord(privacy=_REC), RunRecord(privacy=_PRIV), steps=31)
    assert problem.kind is ProblemKind.PRIVACY and "31" in problem.detail
    assert isinstance(problem.error(Path("last.safetensors")), checkpoint.CheckpointError)
    (model,) = compatible(RunRecord({"model": "mlp"}), RunRecord({"model": "cnn"}))
    assert "holds a mlp model, not cnn" in str(model.error(Path("x")))


# the settings a client compares (held fixed, deciding the members, optimizer parts, a private
# run's batch size): (saved, now) -> the kinds of problem `compatible` finds
SETTINGS = {
    "a held setting": (RunRecord(held={"seed": 0}), RunRecord(held={"seed": 1}), [ProblemKind.SETTING]),
    "a setting one side lacks": (RunRecord(), RunRecord(held={"seed": 1}), []),
    "other members": (
        RunRecord(members={"ensemble": 2}),
        RunRecord(members={"ensemble": 3}),
        [ProblemKind.MEMBERS],
    ),
    "a part added": (
        RunRecord(parts={"ema": (None, False)}),
        RunRecord(parts={"ema": (0.9, True)}),
        [ProblemKind.PART_ADDED],
    ),
    "a part removed": (
        RunRecord(parts={"ema": (0.9, True)}),
        RunRecord(parts={"ema": (None, False)}),
        [ProblemKind.PART_REMOVED],
    ),
    "a part's value changed": (
        RunRecord(parts={"ema": (0.9, True)}),
        RunRecord(parts={"ema": (0.8, True)}),
        [],
    ),
    "a private run's batch size": (
        RunRecord(privacy=_REC, batch_size=16),
        RunRecord(batch_size=8),
        [ProblemKind.SAMPLING],
    ),
    "a batch size without a privacy record": (RunRecord(batch_size=16), RunRecord(batch_size=8), []),
    "one problem per setting": (
        RunRecord({"model": "mlp"}, held={"model": "mlp"}),
        RunRecord({"model": "cnn"}, held={"model": "cnn"}),
        [ProblemKind.MODEL],
    ),
}


@pytest.mark.parametrize("case", SETTINGS)
def test_compatible_compares_the_settings_a_client_holds(case):
    saved, now, kinds = SETTINGS[case]
    assert [p.kind for p in compatible(saved, now)] == kinds


def test_the_command_line_words_each_setting_with_its_flag():
    from fashion_func.cli import words

    (held,) = compatible(RunRecord(held={"lr_schedule": "step"}), RunRecord(held={"lr_schedule": "cosine"}))
    err = held.error(Path("last.safetensors"))
    assert str(err) == "checkpoint last.safetensors was trained with lr_schedule 'step', not 'cosine'"
    assert words.message(err) == (
        "--lr-schedule 'cosine' differs from the resumed run's 'step', which it was trained with; "
        "resume it with the same --lr-schedule (or leave it out)"
    )
