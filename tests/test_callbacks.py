"""Callbacks as pure functions: replay event lists, compare with torch's schedulers and with
reference models of the rules. No files, no clock, no device."""

from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fashion_func import callbacks as cbm
from fashion_func.callbacks import (
    CosineLR,
    DeleteCheckpoint,
    EarlyStopping,
    EpochEnd,
    KeptBest,
    LogEpoch,
    LogMessage,
    LogScalars,
    ModelCheckpoint,
    PlotHistory,
    ReduceLROnPlateau,
    SaveCheckpoint,
    SetHyperparam,
    StepLR,
    Stop,
    TensorBoardLogger,
    TerminateOnNaN,
    TrainBegin,
    TrainEnd,
    TrainingMonitor,
    WriteHistory,
    decode_float,
    dispatch,
    encode_float,
    fold,
    improved,
    init_states,
    scan,
)

NAN = float("nan")
INF = float("inf")


def epochs(values, key="val_loss", start=1, **extra):
    """EpochEnd events with `key` taking `values`, starting at epoch `start`."""
    return [EpochEnd(start + i, {key: v, **extra}) for i, v in enumerate(values)]


def full_metrics(e: int, val_loss: float) -> dict[str, float]:
    return {
        "train_loss": 1.0 / e,
        "train_acc": 1.0 - 0.5 / e,
        "val_loss": val_loss,
        "val_acc": 1.0 - val_loss / 4,
        "lr": 1e-3,
        "epoch_time_s": 12.25,
    }


def stop_epochs(cb, events) -> list[int]:
    """Epochs at which `cb` emitted Stop."""
    _, per_event = scan(cb, events)
    return [
        ev.epoch for ev, acts in zip(events, per_event, strict=True) if any(isinstance(a, Stop) for a in acts)
    ]


def json_roundtrip(state):
    return json.loads(json.dumps(state, allow_nan=False))


def norm(actions) -> list[str]:
    # repr, because NaN != NaN would make equal actions compare unequal
    return [repr(a) for a in actions]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "best", "mode", "min_delta", "expected"),
    [
        (1.0, None, "min", 0.0, True),
        (1.0, None, "max", 0.0, True),
        (INF, None, "min", 0.0, False),  # the worst value cannot improve on "no best"
        (-INF, None, "max", 0.0, False),
        (NAN, None, "min", 0.0, False),
        (NAN, 1.0, "max", 0.0, False),
        (1.0, NAN, "min", 0.0, False),
        (0.9, 1.0, "min", 0.0, True),
        (1.0, 1.0, "min", 0.0, False),  # equal is not better
        (0.95, 1.0, "min", 0.1, False),  # not by more than min_delta
        (0.89, 1.0, "min", 0.1, True),
        (0.89, 1.0, "min", -0.1, True),  # sign of min_delta ignored, like Keras' abs()
        (1.2, 1.0, "max", 0.1, True),
        (1.05, 1.0, "max", 0.1, False),
        (0.9, 1.0, "max", 0.0, False),
    ],
)
def test_improved(value, best, mode, min_delta, expected):
    assert improved(value, best, mode, min_delta) is expected


def test_improved_rejects_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        improved(1.0, None, "minimum", 0.0)


@pytest.mark.parametrize("x", [0.0, -1.5, 1e300, NAN, INF, -INF, None])
def test_encode_decode_float_roundtrip(x):
    enc = encode_float(x)
    json.dumps(enc, allow_nan=False)
    dec = decode_float(json_roundtrip(enc))
    if x is None:
        assert dec is None
    elif math.isnan(x):
        assert math.isnan(dec)
    else:
        assert dec == x


def test_module_imports_only_stdlib():
    """callbacks must not import checkpoint, loop, torch or anything doing I/O or timing; of
    the package only `schedules`, itself plain Python, and its own modules."""
    package_dir = Path(cbm.__file__).parent
    files = sorted(package_dir.glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "protocol", "stopping", "checkpointing", "lr", "logs"}
    imported, package = set(), set()
    for file in files:
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level == 0, f"{file.name}: relative import"
                imported.add(module.split(".")[0])
                if module == "fashion_func":
                    package |= {a.name for a in node.names}
                elif module.startswith("fashion_func."):
                    package.add(module.split(".")[1])
    assert imported <= {"__future__", "math", "collections", "dataclasses", "typing", "fashion_func"}, (
        imported
    )
    assert package <= {"schedules", "callbacks"}, package
    sched = ast.parse((package_dir.parent / "schedules.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(sched) if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in ast.walk(sched) if isinstance(n, ast.ImportFrom)}
    stdlib = {"__future__", "collections", "dataclasses", "itertools", "math", "typing"}
    assert roots <= stdlib, roots


# --------------------------------------------------------------------------------------
# EarlyStopping
# --------------------------------------------------------------------------------------


def test_early_stopping_patience():
    cb = EarlyStopping(patience=3)
    # best at epoch 2, then 3 epochs without improvement: stop at epoch 5
    events = epochs([1.0, 0.5, 0.6, 0.5, 0.7, 0.4])
    assert stop_epochs(cb, events) == [5]
    state, per_event = scan(cb, events[:5])
    assert [bool(acts) for acts in per_event] == [False, False, False, False, True]
    stop = per_event[4][0]
    assert isinstance(stop, Stop) and "val_loss" in stop.reason and "epoch 5" in stop.reason
    assert state == {"best": 0.5, "best_epoch": 2, "wait": 3}


def test_early_stopping_improvement_resets_wait():
    cb = EarlyStopping(patience=2)
    events = epochs([1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.86, 0.87])
    assert stop_epochs(cb, events)[0] == 7


def test_early_stopping_min_delta():
    cb = EarlyStopping(patience=2, min_delta=0.1)
    # each step improves by 0.05 only: not an improvement with min_delta 0.1
    events = epochs([1.0, 0.95, 0.9, 0.85])
    assert stop_epochs(cb, events)[0] == 3
    state, _ = fold(cb, events[:3])
    assert state["best"] == 1.0  # best only moves on a real improvement
    # without min_delta it never stops
    assert stop_epochs(EarlyStopping(patience=2), events) == []


def test_early_stopping_mode_max():
    cb = EarlyStopping(monitor="val_acc", mode="max", patience=2)
    events = epochs([0.5, 0.6, 0.7, 0.65, 0.7, 0.8, 0.79, 0.78], key="val_acc")
    assert stop_epochs(cb, events)[0] == 5
    assert stop_epochs(EarlyStopping(monitor="val_acc", mode="min", patience=2), events)[0] == 3


def test_early_stopping_baseline():
    # improving but never beating the baseline: stop after `patience` epochs (Keras)
    cb = EarlyStopping(patience=3, baseline=0.5)
    events = epochs([0.9, 0.8, 0.7, 0.6, 0.4])
    assert stop_epochs(cb, events)[0] == 3
    _, acts = fold(cb, events[:3])
    assert "baseline" in acts[0].reason
    # beating the baseline restarts the count
    events = epochs([0.9, 0.45, 0.46, 0.47, 0.48])
    assert stop_epochs(cb, events) == [5]
    # mode max
    cb = EarlyStopping(monitor="val_acc", mode="max", patience=2, baseline=0.9)
    assert stop_epochs(cb, epochs([0.5, 0.95, 0.94, 0.93], key="val_acc")) == [4]
    assert stop_epochs(cb, epochs([0.5, 0.6, 0.7], key="val_acc")) == [2, 3]


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_early_stopping_non_finite(bad):
    cb = EarlyStopping(patience=5)
    events = epochs([1.0, 0.9, bad, 0.8])
    assert stop_epochs(cb, events)[0] == 3
    _, acts = fold(cb, events[:3])
    assert "epoch 3" in acts[0].reason
    # with check_finite off NaN is just a non-improving epoch; state stays JSON-safe
    cb = EarlyStopping(patience=2, check_finite=False)
    state, acts = fold(cb, epochs([1.0, NAN, NAN]))
    assert [type(a) for a in acts] == [Stop]
    assert state["best"] == 1.0 and state["wait"] == 2
    json.dumps(state, allow_nan=False)


def test_states_stay_json_safe_with_infinite_best():
    # check_finite off: -inf becomes the best; it must be stored encoded
    state, _ = fold(EarlyStopping(patience=2, check_finite=False), epochs([1.0, -INF, 0.5]))
    assert json_roundtrip(state) == state == {"best": "-inf", "best_epoch": 2, "wait": 1}
    state, acts = fold(ModelCheckpoint(save_top_k=2, save_last=False), epochs([1.0, -INF]))
    assert json_roundtrip(state) == state and state["best"] == "-inf"
    assert acts[-2:] == [
        SaveCheckpoint("best", 2, "val_loss", -INF),
        SaveCheckpoint("epoch", 2, "val_loss", -INF),
    ]
    state, _ = fold(ReduceLROnPlateau(base_lr=0.1), epochs([1.0, -INF]))
    assert json_roundtrip(state) == state and state["best"] == "-inf"


def test_early_stopping_patience_zero_and_missing_key():
    assert stop_epochs(EarlyStopping(patience=0), epochs([1.0, 0.9, 0.95])) == [3]
    with pytest.raises(KeyError, match="val_loss"):
        fold(EarlyStopping(), [EpochEnd(1, {"train_loss": 1.0})])
    with pytest.raises(ValueError):
        EarlyStopping(mode="low")
    with pytest.raises(ValueError):
        EarlyStopping(patience=-1)


def reference_early_stop(values, patience, min_delta, mode):
    """Independent model: stop at the first epoch ending a run of max(patience, 1)
    consecutive epochs none of which improved on the best before it."""
    best = math.inf if mode == "min" else -math.inf
    run = 0
    for i, v in enumerate(values, start=1):
        better = (v < best - min_delta) if mode == "min" else (v > best + min_delta)
        if better:  # NaN compares false
            best, run = v, 0
        else:
            run += 1
            if run >= max(patience, 1):
                return i
    return None


def _tracked_best(values, mode, min_delta):
    best = None
    for v in values:
        if improved(v, best, mode, min_delta):
            best = v
    return best


finite_or_nan = st.one_of(st.floats(-10, 10, allow_nan=False), st.just(NAN))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(finite_or_nan, min_size=1, max_size=30),
    patience=st.integers(0, 6),
    min_delta=st.sampled_from([0.0, 0.01, 0.5]),
    mode=st.sampled_from(["min", "max"]),
)
def test_early_stopping_property(values, patience, min_delta, mode):
    cb = EarlyStopping(patience=patience, min_delta=min_delta, mode=mode, check_finite=False)
    stops = stop_epochs(cb, epochs(values))
    expected = reference_early_stop(values, patience, min_delta, mode)
    assert (stops[0] if stops else None) == expected
    if stops:
        # never before `patience` non-improving epochs: each of the last max(patience, 1)
        # epochs up to the stop failed to improve on the best seen before it
        k = stops[0]
        p = max(patience, 1)
        assert k >= p
        for i in range(k - p, k):
            assert not improved(values[i], _tracked_best(values[:i], mode, min_delta), mode, min_delta)


# --------------------------------------------------------------------------------------
# ModelCheckpoint
# --------------------------------------------------------------------------------------


def test_checkpoint_best_and_last_order():
    cb = ModelCheckpoint()
    _, per_event = scan(cb, epochs([1.0, 0.8, 0.9, 0.7]))
    assert per_event == [
        [SaveCheckpoint("best", 1, "val_loss", 1.0), SaveCheckpoint("last", 1)],
        [SaveCheckpoint("best", 2, "val_loss", 0.8), SaveCheckpoint("last", 2)],
        [SaveCheckpoint("last", 3)],
        [SaveCheckpoint("best", 4, "val_loss", 0.7), SaveCheckpoint("last", 4)],
    ]
    # no last file wanted, mode max
    cb = ModelCheckpoint(monitor="val_acc", mode="max", save_last=False)
    _, acts = fold(cb, epochs([0.5, 0.4, 0.6], key="val_acc"))
    assert acts == [SaveCheckpoint("best", 1, "val_acc", 0.5), SaveCheckpoint("best", 3, "val_acc", 0.6)]


def test_checkpoint_nan_never_best():
    state, acts = fold(ModelCheckpoint(save_last=False), epochs([NAN, 1.0, NAN, INF, 0.5]))
    assert acts == [SaveCheckpoint("best", 2, "val_loss", 1.0), SaveCheckpoint("best", 5, "val_loss", 0.5)]
    assert state["best"] == 0.5 and state["best_epoch"] == 5


def kept_epochs(state) -> list[int]:
    return sorted(e for e, _ in state["kept"])


def test_checkpoint_top_k_eviction():
    cb = ModelCheckpoint(save_top_k=2, save_last=True)
    _, per_event = scan(cb, epochs([0.5, 0.4, 0.6, 0.3, 0.45]))
    assert per_event[0] == [
        SaveCheckpoint("best", 1, "val_loss", 0.5),
        SaveCheckpoint("epoch", 1, "val_loss", 0.5),
        SaveCheckpoint("last", 1),
    ]
    assert per_event[1] == [
        SaveCheckpoint("best", 2, "val_loss", 0.4),
        SaveCheckpoint("epoch", 2, "val_loss", 0.4),
        SaveCheckpoint("last", 2),
    ]
    # 0.6 is worse than both kept: not saved at all
    assert per_event[2] == [SaveCheckpoint("last", 3)]
    # 0.3 enters, evicts epoch 1 (0.5); the new file is written before the old one goes
    assert per_event[3] == [
        SaveCheckpoint("best", 4, "val_loss", 0.3),
        SaveCheckpoint("epoch", 4, "val_loss", 0.3),
        DeleteCheckpoint("epoch", 1),
        SaveCheckpoint("last", 4),
    ]
    # 0.45 is worse than 0.4 and 0.3: nothing
    assert per_event[4] == [SaveCheckpoint("last", 5)]


def test_checkpoint_top_k_matches_sorting():
    values = [0.9, 0.3, 0.7, 0.1, 0.5, 0.2, 0.8, 0.05, 0.6, 0.4]
    for k in (1, 2, 3, 5):
        state, acts = fold(ModelCheckpoint(save_top_k=k, save_best_only=False), epochs(values))
        expected = sorted(sorted(range(1, 11), key=lambda e: values[e - 1])[:k])
        assert kept_epochs(state) == expected
        # every epoch file saved and not deleted is exactly the kept set
        saved = {a.epoch for a in acts if isinstance(a, SaveCheckpoint) and a.kind == "epoch"}
        deleted = {a.epoch for a in acts if isinstance(a, DeleteCheckpoint)}
        assert sorted(saved - deleted) == expected
        assert deleted <= saved


def test_checkpoint_top_k_nan_ties_and_mode_max():
    # NaN is ranked worst and is the first to go
    state, acts = fold(ModelCheckpoint(save_top_k=2, save_last=False), epochs([NAN, 0.5, 0.4]))
    assert DeleteCheckpoint("epoch", 1) in acts and kept_epochs(state) == [2, 3]
    json.dumps(state, allow_nan=False)
    # a NaN newcomer never enters a full list
    state, acts = fold(ModelCheckpoint(save_top_k=2, save_last=False), epochs([0.5, 0.4, NAN]))
    assert kept_epochs(state) == [1, 2] and not any(isinstance(a, DeleteCheckpoint) for a in acts)
    # ties: a newcomer equal to the worst does not enter; among equal worst the older is evicted
    state, _ = fold(ModelCheckpoint(save_top_k=2, save_last=False), epochs([0.5, 0.5, 0.5]))
    assert kept_epochs(state) == [1, 2]
    state, acts = fold(ModelCheckpoint(save_top_k=2, save_last=False), epochs([0.5, 0.5, 0.4]))
    assert kept_epochs(state) == [2, 3] and DeleteCheckpoint("epoch", 1) in acts
    # mode max keeps the largest
    cb = ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=2, save_last=False)
    state, _ = fold(cb, epochs([0.1, 0.9, 0.5, 0.7], key="val_acc"))
    assert kept_epochs(state) == [2, 4]


def test_checkpoint_every_n_and_keep_all():
    cb = ModelCheckpoint(save_best_only=False, save_top_k=-1, every_n_epochs=3, save_last=False)
    state, acts = fold(cb, epochs([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    epoch_saves = [a.epoch for a in acts if isinstance(a, SaveCheckpoint) and a.kind == "epoch"]
    assert epoch_saves == [3, 6] and kept_epochs(state) == [3, 6]
    # best is still checked every epoch
    assert [a.epoch for a in acts if isinstance(a, SaveCheckpoint) and a.kind == "best"] == [1]
    assert not any(isinstance(a, DeleteCheckpoint) for a in acts)
    # save_best_only=True, save_top_k=1 (the default): no epoch files
    _, acts = fold(ModelCheckpoint(), epochs([3.0, 2.0, 1.0]))
    assert {a.kind for a in acts} == {"best", "last"}
    # save_best_only=False with top-1: one epoch file, replaced as the best moves
    state, acts = fold(ModelCheckpoint(save_best_only=False, save_last=False), epochs([3.0, 2.0, 4.0]))
    assert kept_epochs(state) == [2] and DeleteCheckpoint("epoch", 1) in acts
    with pytest.raises(ValueError):
        ModelCheckpoint(every_n_epochs=0)
    with pytest.raises(ValueError):
        ModelCheckpoint(save_top_k=-2)


def test_checkpoint_last_is_always_final_action():
    cb = ModelCheckpoint(save_top_k=3, save_best_only=False)
    _, per_event = scan(cb, epochs([0.9, 0.3, 0.7, 0.1, 0.5, 0.2, 0.8, 0.05]))
    for acts in per_event:
        assert acts[-1] == SaveCheckpoint("last", acts[-1].epoch)
        assert sum(isinstance(a, SaveCheckpoint) and a.kind == "last" for a in acts) == 1


def test_checkpoint_rerun_after_crash_replays_same_decisions():
    """A crash after the best/epoch files but before last: the resumed run redoes the epoch
    from the previous state and asks for the same files (deletions included)."""
    cb = ModelCheckpoint(save_top_k=2, save_best_only=False)
    evs = epochs([0.5, 0.4, 0.3])
    state2, _ = fold(cb, evs[:2])
    _, first = cb.on_event(state2, evs[2])
    _, again = cb.on_event(json_roundtrip(state2), evs[2])
    assert first == again and DeleteCheckpoint("epoch", 1) in again


# --------------------------------------------------------------------------------------
# LR schedules against torch.optim.lr_scheduler
# --------------------------------------------------------------------------------------


def torch_epoch_lrs(make_sched, base_lr: float, n_epochs: int, metrics=None) -> list[float]:
    """The lr each 1-based epoch runs with under a torch scheduler stepped once per epoch."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = make_sched(opt)
    lrs = []
    for e in range(n_epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no grads: a no-op, but torch warns when a scheduler steps before the optimizer
        if metrics is None:
            sched.step()
        else:
            sched.step(metrics[e])
    lrs.append(opt.param_groups[0]["lr"])  # the lr after the last step (epoch n + 1)
    return lrs


def our_epoch_lrs(cb, n_epochs: int, metrics=None) -> list[float]:
    """Lr per epoch as set by `cb`'s SetHyperparam actions (TrainBegin, then each EpochEnd)."""
    events = [TrainBegin(1, n_epochs)] + [
        EpochEnd(e, {"val_loss": metrics[e - 1] if metrics else 0.0, "val_acc": 0.0})
        for e in range(1, n_epochs + 1)
    ]
    lr = None
    lrs = []
    state = cb.init()
    for ev in events:
        state, acts = cb.on_event(state, ev)
        for a in acts:
            if isinstance(a, SetHyperparam):
                assert a.name == "lr"
                lr = a.value
        lrs.append(lr)
        assert decode_float(state["lr"]) == lr
    return lrs


@pytest.mark.cross_path
@pytest.mark.parametrize(("base_lr", "step_size", "gamma"), [(0.1, 3, 0.1), (1e-3, 7, 0.5), (0.05, 1, 0.9)])
def test_step_lr_matches_torch(base_lr, step_size, gamma):
    n = 20
    ref = torch_epoch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma), base_lr, n)
    ours = our_epoch_lrs(StepLR(base_lr, step_size, gamma), n)
    assert len(ours) == len(ref) == n + 1
    for e, (a, b) in enumerate(zip(ours, ref, strict=True), start=1):
        assert math.isclose(a, b, rel_tol=1e-12), (e, a, b)
    assert ours[step_size] == pytest.approx(base_lr * gamma)  # epoch step_size + 1 is the first decayed


@pytest.mark.cross_path
@pytest.mark.parametrize(("base_lr", "t_max", "eta_min"), [(0.1, 20, 0.0), (0.1, 7, 1e-3), (1e-3, 5, 0.0)])
def test_cosine_lr_matches_torch(base_lr, t_max, eta_min):
    n = 20  # with t_max < 20 this also covers torch's rise after t_max
    ref = torch_epoch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, t_max, eta_min), base_lr, n)
    ours = our_epoch_lrs(CosineLR(base_lr, t_max, eta_min), n)
    for e, (a, b) in enumerate(zip(ours, ref, strict=True), start=1):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15), (e, a, b)
    assert ours[t_max] == pytest.approx(eta_min, abs=1e-15)  # epoch t_max + 1 is at the bottom


@pytest.mark.parametrize("cb", [StepLR(0.1, 3, 0.5), CosineLR(0.1, 10, 0.01)], ids=["step", "cosine"])
def test_schedule_resume_sets_lr_of_start_epoch(cb):
    _, acts = fold(cb, [TrainBegin(7, 20)])
    assert acts == [SetHyperparam("lr", cb.lr_at(7))]
    # the lr a resumed run sets equals the one the uninterrupted run set after epoch 6
    _, per_event = scan(cb, [TrainBegin(1, 20), *epochs([0.0] * 6)])
    assert per_event[-1] == acts
    assert fold(cb, [TrainEnd(3, "done")])[1] == []


def rop_configs():
    return [
        dict(),
        dict(patience=2),
        dict(patience=0, factor=0.5),
        dict(mode="max", patience=1, factor=0.5),
        dict(patience=1, cooldown=2, factor=0.5),
        dict(patience=0, factor=0.1, min_lr=1e-4),
        dict(patience=1, threshold=0.05, threshold_mode="abs"),
        dict(mode="max", patience=1, threshold=0.05, threshold_mode="abs", cooldown=1),
        dict(patience=1, threshold=0.1, threshold_mode="rel"),
        dict(patience=0, factor=0.5, min_lr=0.02, eps=1e-3),
        # rel and abs thresholds only differ visibly away from 1: see the "large" sequence
        dict(mode="max", patience=0, threshold=0.1, threshold_mode="rel", factor=0.5),
        dict(mode="max", patience=0, threshold=0.1, threshold_mode="abs", factor=0.5),
        dict(patience=0, threshold=0.1, threshold_mode="rel", factor=0.5),
    ]


ROP_SEQUENCES = {
    "plateau": [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.85, 0.85, 0.85],
    "noisy": [1.0, 0.8, 0.82, 0.79, 0.81, 0.78, 0.9, 0.77, 0.95, 0.96, 0.7, 0.71, 0.72, 0.73, 0.6, 0.8],
    "rising": [0.1 * i for i in range(1, 18)],
    "with_nan": [1.0, 0.5, NAN, NAN, 0.4, NAN, 0.45, 0.3, NAN, NAN, NAN, 0.2],
    "large": [10.0, 10.5, 10.8, 11.0, 12.0, 12.5, 9.0, 8.5, 8.0, 7.0, 14.0, 14.5, 30.0],
    "infinite": [1.0, -INF, 0.5, INF, -INF, 0.1],
    "negative": [-0.1, -0.2, -0.21, -0.5, -0.49, -0.48, -0.47, -0.6],
}


@pytest.mark.parametrize("seq_name", sorted(ROP_SEQUENCES))
@pytest.mark.parametrize(
    "cfg", rop_configs(), ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_reduce_on_plateau_matches_torch(cfg, seq_name):
    metrics = ROP_SEQUENCES[seq_name]
    base_lr = 0.1
    ref = torch_epoch_lrs(
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **cfg), base_lr, len(metrics), metrics
    )
    ours = our_epoch_lrs(ReduceLROnPlateau(**cfg, base_lr=base_lr), len(metrics), metrics)
    assert ours == ref  # same arithmetic: bit for bit


def test_reduce_on_plateau_state_and_messages():
    cb = ReduceLROnPlateau(patience=1, factor=0.5, base_lr=0.1)
    state, per_event = scan(cb, epochs([1.0, 1.0, 1.0]))
    assert per_event[0] == per_event[1] == []
    assert per_event[2][0] == SetHyperparam("lr", 0.05)
    assert isinstance(per_event[2][1], LogMessage) and "epoch 3" in per_event[2][1].text
    assert state == {"lr": 0.05, "best": 1.0, "num_bad_epochs": 0, "cooldown_counter": 0}
    # resume restores the reduced lr
    assert fold(cb, [TrainBegin(4, 10)], state)[1] == [SetHyperparam("lr", 0.05)]
    with pytest.raises(ValueError):
        ReduceLROnPlateau(factor=1.0, base_lr=0.1)
    with pytest.raises(TypeError):
        ReduceLROnPlateau()  # base_lr is required


@settings(max_examples=60, deadline=None)
@given(
    metrics=st.lists(
        st.sampled_from([1.0, 0.99999, 0.9, 0.8, 0.5, 1.2, 10.0, 11.0, -3.0, NAN, INF, -INF]),
        min_size=1,
        max_size=25,
    ),
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(0, 3),
    cooldown=st.integers(0, 2),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 1e-4, 0.05, 0.2]),
    min_lr=st.sampled_from([0.0, 1e-3]),
)
def test_reduce_on_plateau_matches_torch_property(
    metrics, mode, patience, cooldown, threshold_mode, threshold, min_lr
):
    cfg = dict(
        mode=mode,
        patience=patience,
        cooldown=cooldown,
        threshold_mode=threshold_mode,
        threshold=threshold,
        min_lr=min_lr,
        factor=0.5,
    )
    ref = torch_epoch_lrs(
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **cfg), 0.1, len(metrics), metrics
    )
    assert our_epoch_lrs(ReduceLROnPlateau(**cfg, base_lr=0.1), len(metrics), metrics) == ref


# --------------------------------------------------------------------------------------
# TrainingMonitor, TensorBoardLogger, TerminateOnNaN, LogEpoch
# --------------------------------------------------------------------------------------


def test_training_monitor_history():
    cb = TrainingMonitor()
    events = [EpochEnd(e, {**full_metrics(e, 1.0 / e), "top5_acc": 0.99}) for e in (1, 2, 3)]
    state, per_event = scan(cb, events)
    hist = state["history"]
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[1] == {"epoch": 2, **full_metrics(2, 0.5), "top5_acc": 0.99}
    last = per_event[-1]
    assert [type(a) for a in last] == [WriteHistory, PlotHistory]
    assert list(last[0].records) == hist and list(last[1].records) == hist
    assert len(per_event[0][0].records) == 1
    # what the loop receives is a copy: changing it does not reach the state
    last[0].records[0]["epoch"] = 99
    assert state["history"][0]["epoch"] == 1


def test_training_monitor_resume_and_rerun():
    cb = TrainingMonitor()
    events = [EpochEnd(e, full_metrics(e, 1.0 / e)) for e in range(1, 6)]
    full, _ = fold(cb, events)
    # resume from the state saved after epoch 3 continues the list
    s3, _ = fold(cb, events[:3])
    resumed, _ = fold(cb, [TrainBegin(4, 5), *events[3:]], json_roundtrip(s3))
    assert resumed == full
    # epochs 4 and 5 ran, then the run restarts at epoch 4 (state from a later save):
    # records >= 4 are replaced, never duplicated
    rerun_events = [EpochEnd(e, full_metrics(e, 2.0)) for e in (4, 5)]
    rerun, _ = fold(cb, rerun_events, full)
    assert [r["epoch"] for r in rerun["history"]] == [1, 2, 3, 4, 5]
    assert rerun["history"][3]["val_loss"] == 2.0
    # TrainBegin at an earlier epoch drops the records that will be recomputed
    begun, _ = fold(cb, [TrainBegin(3, 5)], full)
    assert [r["epoch"] for r in begun["history"]] == [1, 2]


def test_training_monitor_non_finite_is_json_safe():
    state, acts = fold(TrainingMonitor(), [EpochEnd(1, {"train_loss": NAN, "val_loss": INF})])
    json.dumps(state, allow_nan=False)
    json.dumps(list(acts[0].records), allow_nan=False)
    assert state["history"][0] == {"epoch": 1, "train_loss": "nan", "val_loss": "inf"}


def test_tensorboard_tags():
    metrics = {**full_metrics(2, 0.4), "val_top5_acc": 0.99, "grad_norm": 3.0, "test_acc": 0.8}
    _, acts = fold(TensorBoardLogger(), [TrainBegin(1, 3), EpochEnd(2, metrics), TrainEnd(2, "done")])
    assert acts == [
        LogScalars(
            2,
            {
                "train/loss": 0.5,
                "train/acc": 0.75,
                "val/loss": 0.4,
                "val/acc": 0.9,
                "lr": 1e-3,
                "epoch_time_s": 12.25,
                "val/top5_acc": 0.99,
                "grad_norm": 3.0,
                "test/acc": 0.8,
            },
        )
    ]


def test_terminate_on_nan():
    cb = TerminateOnNaN()
    events = [
        TrainBegin(1, 3),
        EpochEnd(1, {"train_loss": 1.0}),
        EpochEnd(2, {"train_loss": NAN}),
        EpochEnd(3, {"train_loss": INF}),
    ]
    _, per_event = scan(cb, events)
    assert per_event[:2] == [[], []]
    assert per_event[2] == [Stop("train_loss is nan at epoch 2")]
    assert per_event[3] == [Stop("train_loss is inf at epoch 3")]
    with pytest.raises(KeyError):
        fold(cb, [EpochEnd(1, {"val_loss": 1.0})])


def test_model_checkpoint_reports_the_kept_best_on_a_resumed_start():
    cb = ModelCheckpoint(monitor="val_loss", member=2)
    st, _ = fold(cb, [TrainBegin(1, 5), *epochs([0.9, 0.5, 0.7])])
    assert fold(cb, [TrainBegin(1, 5)])[1] == []  # a fresh run has no best yet
    _, acts = cb.on_event(st, TrainBegin(4, 5))
    assert acts == [KeptBest(2, "val_loss", 0.5, 2)]


def test_log_epoch_lines():
    cb = LogEpoch()
    m = {**full_metrics(3, 0.33), "top5_acc": 0.995}
    state, per_event = scan(cb, [TrainBegin(1, 10), EpochEnd(3, m), TrainEnd(3, "early stopping")])
    assert state == {"total_epochs": 10}
    assert per_event[0] == [LogMessage("training epochs 1..10 of 10")]
    assert per_event[1] == [
        LogMessage(
            "epoch 3/10 train_loss 0.3333 train_acc 0.8333 val_loss 0.3300 val_acc 0.9175 lr 1.0e-03 "
            "top5_acc 0.9950 12.2s"
        )
    ]
    assert "early stopping" in per_event[2][0].text
    assert fold(cb, [TrainBegin(4, 10)])[1] == [LogMessage("resuming at epochs 4..10 of 10")]
    # no TrainBegin seen: no total; missing metrics are skipped
    assert fold(cb, [EpochEnd(2, {"train_loss": 0.5})])[1] == [LogMessage("epoch 2 train_loss 0.5000")]


# --------------------------------------------------------------------------------------
# Properties shared by all callbacks: purity, JSON states, resume
# --------------------------------------------------------------------------------------


ALL_CALLBACKS = [
    EarlyStopping(patience=3),
    EarlyStopping(monitor="val_acc", mode="max", patience=2, baseline=0.7, min_delta=0.01, name="es_acc"),
    EarlyStopping(patience=2, check_finite=False, name="es_nan"),
    ModelCheckpoint(),
    ModelCheckpoint(save_top_k=3, save_best_only=False, every_n_epochs=2, name="mc_top3"),
    ModelCheckpoint(monitor="val_acc", mode="max", save_top_k=-1, name="mc_all"),
    StepLR(0.1, 4, 0.5),
    CosineLR(0.1, 8, 1e-3),
    ReduceLROnPlateau(patience=1, factor=0.5, cooldown=1, base_lr=0.1),
    TrainingMonitor(),
    TensorBoardLogger(),
    TerminateOnNaN(),
    LogEpoch(),
]


def run_events(val_losses) -> list:
    n = len(val_losses)
    events = [TrainBegin(1, n)]
    for e, v in enumerate(val_losses, start=1):
        events.append(EpochEnd(e, full_metrics(e, v)))
    events.append(TrainEnd(n, "finished"))
    return events


FIXED_LOSSES = [1.0, 0.8, 0.85, 0.7, 0.72, 0.75, 0.71, 0.6, NAN, 0.65, 0.66, 0.5]


def test_names_unique_and_overridable():
    assert EarlyStopping().name == "EarlyStopping"
    assert EarlyStopping(name="x").name == "x"
    assert len({cb.name for cb in ALL_CALLBACKS}) == len(ALL_CALLBACKS)
    with pytest.raises(ValueError, match="unique"):
        init_states([EarlyStopping(), EarlyStopping(monitor="val_acc")])


@pytest.mark.parametrize("cb", ALL_CALLBACKS, ids=lambda cb: cb.name)
def test_states_json_and_inputs_not_mutated(cb):
    state = cb.init()
    for ev in run_events(FIXED_LOSSES):
        before_state, before_event = copy.deepcopy(state), copy.deepcopy(ev)
        new_state, actions = cb.on_event(state, ev)
        assert state == before_state
        assert repr(ev) == repr(before_event)
        assert isinstance(actions, list)
        # JSON round trip is lossless
        assert json_roundtrip(new_state) == new_state
        state = new_state


@pytest.mark.parametrize("cb", ALL_CALLBACKS, ids=lambda cb: cb.name)
@pytest.mark.parametrize("split", [1, 4, 9, 13, 16])
def test_resume_from_roundtripped_state(cb, split):
    events = run_events(FIXED_LOSSES)
    full_state, per_event = scan(cb, events)
    mid_state, _ = scan(cb, events[:split])
    # replaying the rest from a JSON-restored state gives the same actions and final state
    end_state, rest = scan(cb, events[split:], json_roundtrip(mid_state))
    assert [norm(a) for a in rest] == [norm(a) for a in per_event[split:]]
    assert json_roundtrip(end_state) == json_roundtrip(full_state)


@pytest.mark.parametrize("cb", ALL_CALLBACKS, ids=lambda cb: cb.name)
@pytest.mark.parametrize("k", [1, 5, 8])
def test_resume_with_train_begin(cb, k):
    """A real resume: state saved at the end of epoch k, new process sends TrainBegin(k+1)."""
    losses = FIXED_LOSSES
    n = len(losses)
    events = run_events(losses)
    end_k = next(i for i, ev in enumerate(events) if isinstance(ev, EpochEnd) and ev.epoch == k) + 1
    full_state, per_event = scan(cb, events)
    saved, _ = scan(cb, events[:end_k])
    resumed_state, resumed = scan(cb, [TrainBegin(k + 1, n), *events[end_k:]], json_roundtrip(saved))
    assert [norm(a) for a in resumed[1:]] == [norm(a) for a in per_event[end_k:]]
    assert json_roundtrip(resumed_state) == json_roundtrip(full_state)
    # lr restored at TrainBegin is the one the uninterrupted run set after epoch k
    lr_sets = [a for a in resumed[0] if isinstance(a, SetHyperparam)]
    if lr_sets:
        expected = [a for a in per_event[end_k - 1] if isinstance(a, SetHyperparam)]
        if expected:
            assert lr_sets == expected
        else:
            assert lr_sets[0].value == decode_float(saved["lr"])


@settings(max_examples=40, deadline=None)
@given(
    losses=st.lists(
        st.one_of(st.floats(0.0, 3.0), st.sampled_from([NAN, INF, 0.5])), min_size=2, max_size=14
    ),
    data=st.data(),
)
def test_resume_property_random_runs(losses, data):
    events = run_events(losses)
    split = data.draw(st.integers(0, len(events)))
    for cb in ALL_CALLBACKS:
        full_state, per_event = scan(cb, events)
        mid, _ = scan(cb, events[:split])
        json.dumps(mid, allow_nan=False)
        end, rest = scan(cb, events[split:], json_roundtrip(mid))
        assert [norm(a) for a in rest] == [norm(a) for a in per_event[split:]], cb.name
        assert json_roundtrip(end) == json_roundtrip(full_state), cb.name


# --------------------------------------------------------------------------------------
# fold / scan / dispatch
# --------------------------------------------------------------------------------------


def test_fold_is_flattened_scan():
    cb = ModelCheckpoint(save_top_k=2)
    events = run_events(FIXED_LOSSES)
    s1, acts = fold(cb, events)
    s2, per_event = scan(cb, events)
    assert s1 == s2 and acts == [a for x in per_event for a in x]
    # starting from a given state
    mid, _ = fold(cb, events[:5])
    assert fold(cb, events[5:], mid)[0] == s1


def test_dispatch_order_states_and_purity():
    cbs = [EarlyStopping(patience=1), ModelCheckpoint(), StepLR(0.1, 1, 0.5)]
    states = init_states(cbs)
    states["Removed"] = {"kept": True}  # a callback no longer present: passes through
    del states["StepLR"]  # a callback added on resume: starts from init()
    frozen = copy.deepcopy(states)
    new_states, actions = dispatch(cbs, states, EpochEnd(1, {"val_loss": 1.0}))
    assert states == frozen
    assert set(new_states) == {"EarlyStopping", "ModelCheckpoint", "StepLR", "Removed"}
    assert new_states["Removed"] == {"kept": True}
    # actions concatenated in callback order
    assert actions == [
        SaveCheckpoint("best", 1, "val_loss", 1.0),
        SaveCheckpoint("last", 1),
        SetHyperparam("lr", 0.05),
    ]
    new_states, actions = dispatch(cbs, new_states, EpochEnd(2, {"val_loss": 2.0}))
    assert isinstance(actions[0], Stop) and actions[1:] == [
        SaveCheckpoint("last", 2),
        SetHyperparam("lr", 0.025),
    ]
    # each callback's state equals its own fold
    for cb in cbs:
        own, _ = fold(cb, [EpochEnd(1, {"val_loss": 1.0}), EpochEnd(2, {"val_loss": 2.0})])
        assert new_states[cb.name] == own
    with pytest.raises(ValueError, match="unique"):
        dispatch([StepLR(0.1, 1), StepLR(0.2, 1)], {}, TrainBegin(1, 2))


def test_actions_and_events_are_frozen():
    with pytest.raises(AttributeError):
        Stop("x").reason = "y"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        EarlyStopping().patience = 2  # type: ignore[misc]
    with pytest.raises(ValueError):
        SaveCheckpoint("sometimes", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DeleteCheckpoint("best", 1)  # type: ignore[arg-type]


@pytest.mark.cross_path
def test_lr_schedule_drives_any_schedule_per_epoch_like_torch_onecycle_stepped_per_epoch():
    """One callback for every schedule: epoch e runs with schedule(e - 1), as a torch scheduler
    stepped once per epoch; StepLR and CosineLR are it with their schedule."""
    import torch

    from fashion_func import schedules

    cb = cbm.LRSchedule(schedule=schedules.onecycle(0.1, total_steps=10), name="onecycle")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    state, actions = cb.on_event(cb.init(), cbm.TrainBegin(start_epoch=1, total_epochs=9))
    for epoch in range(1, 10):
        assert actions == [cbm.SetHyperparam("lr", cb.lr_at(epoch))]
        assert cb.lr_at(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        torch_sched.step()
        state, actions = cb.on_event(state, cbm.EpochEnd(epoch=epoch, metrics={}))
    assert isinstance(cbm.StepLR(base_lr=0.1, step_size=2), cbm.LRSchedule)
    assert cbm.StepLR(base_lr=0.1, step_size=2).lr_at(3) == schedules.step_lr(0.1, 2)(2)
    assert cbm.CosineLR(base_lr=0.1, t_max=4).lr_at(2) == schedules.cosine(0.1, 4)(1)
    with pytest.raises(ValueError, match="needs a schedule"):
        cbm.LRSchedule()
