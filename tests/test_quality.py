"""The quality recipe's pieces: the onecycle multiplier (schedules.piecewise_linear / triangle,
optim.scale_by_schedule) against numpy.interp and torch.optim with LambdaLR in float64; the
new flags' validation and presets; and, end to end on tiny data (resnet width 4, CPU, eager),
--val-split with the test set measured once (test.json), --ema's saved weights and metrics,
and exact resume with augmentation + onecycle + ema + Nesterov.

Every run's numbers are recomputed independently: best.safetensors loaded into the reference
nn.Module of tests/reference.py (float64, eval mode), run on the images normalised as the run
does, with the mirror image's probabilities averaged in under --tta.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from reference import ResNet

from fashion_func import checkpoint, data, ensemble, optim, schedules, tree
from fashion_func.cli import app
from fashion_func.cli import train as cli
from fashion_func.cli.config import Config, ConfigError, load_preset, presets

WIDTH = 4
# resnet width 4 on the CPU, eager; --limit-train 320 --val-split 64: 256 training images,
# 2 steps of 128 per epoch, the last 64 of the 320 images held out for validation
TINY = dict(
    model="resnet",
    width=WIDTH,
    batch_size=128,
    limit_train=320,
    val_split=64,
    limit_val=100,
    device="cpu",
    compile="off",
    progress=False,
    tensorboard=False,
)


# -- helpers ---------------------------------------------------------------------------------


def one_error_line(err: str, prefix: str = "train.py: error: ") -> str:
    """The single line of a usage error on stderr (and nothing else, no traceback)."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(prefix), err
    return err


def metrics_only(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History records without the clock reading."""
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]


def assert_trees_bitwise(a: Any, b: Any) -> None:
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    unequal = [k for k in fa if not torch.equal(fa[k], fb[k])]
    assert not unequal, f"differ: {unequal[:5]}"


def held_out(limit_train: int, val_split: int) -> data.Split:
    """The last `val_split` of the first `limit_train` training images, loaded afresh."""
    train = data.load("train", limit=limit_train)
    return data.Split(train.images[-val_split:], train.labels[-val_split:], train.source)


def reference_eval(weights: dict[str, torch.Tensor], split: data.Split, *, tta: bool) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `weights` (params and BN buffers) on `split`, by the
    reference ResNet in float64 and eval mode; `near_ties`: examples whose two highest
    probabilities are within 1e-4 (the only ones float32 rounding may decide otherwise)."""
    net = ResNet(WIDTH).double()
    net.load_state_dict(
        {ResNet.key(k): v.double() if v.is_floating_point() else v for k, v in weights.items()}, strict=True
    )
    net.eval()
    x = ((split.images.double() / 255 - data.MEAN) / data.STD).unsqueeze(1)
    with torch.no_grad():
        p = net(x).softmax(-1)
        if tta:
            p = (p + net(x.flip(-1)).softmax(-1)) / 2
    y = split.labels
    top2 = p.topk(2, dim=1).values
    return {
        "acc": (p.argmax(1) == y).double().mean().item(),
        "loss": -p[torch.arange(len(y)), y].log().mean().item(),
        "near_ties": int(((top2[:, 0] - top2[:, 1]) < 1e-4).sum()),
        "n": len(y),
    }


def assert_matches_reference(acc: float, loss: float, ref: dict[str, float]) -> None:
    """The run's accuracy equals the reference's up to near ties, its loss to float32 rounding."""
    flips = abs(acc - ref["acc"]) * ref["n"]
    assert flips == pytest.approx(round(flips), abs=1e-9)  # a count of examples out of n
    assert round(flips) <= ref["near_ties"], (acc, ref)
    assert loss == pytest.approx(ref["loss"], rel=1e-4)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`train.py argv` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main_train(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- 1. schedules.piecewise_linear / triangle ------------------------------------------------


KNOTS = [
    [(0, 0.1), (3, 1.0), (10, 0.0)],
    [(-1.5, 2.0), (0.5, -1.0), (4.0, 3.0), (7.25, 3.0), (9.0, 0.5)],
    [(2, 5.0)],  # one knot: a constant
    [(0, 1.0), (1e-3, 0.0), (1e6, 7.0)],
]
POINTS = [*range(-4, 16), *np.linspace(-5.0, 15.0, 161).tolist(), 0.25, 2.999999, 1e-4, 1e7, -1e7]


@pytest.mark.cross_path
@pytest.mark.parametrize("knots", KNOTS, ids=["triangle", "five", "one", "steep"])
def test_piecewise_linear_equals_numpy_interp_for_floats_ints_and_0d_tensors(knots):
    f = schedules.piecewise_linear(knots)
    xs, ys = [float(x) for x, _ in knots], [float(y) for _, y in knots]
    for t in POINTS:
        expected = float(np.interp(t, xs, ys))  # held at the end values outside the knots
        value = f(t)
        assert isinstance(value, float)
        assert value == pytest.approx(expected, abs=1e-12), t
        tensor = f(torch.tensor(t, dtype=torch.float64))
        assert isinstance(tensor, torch.Tensor) and tensor.dim() == 0 and tensor.dtype == torch.float64
        assert tensor.item() == pytest.approx(value, abs=1e-15), t  # the same formula either way
    # a batch of steps: elementwise, as numpy
    steps = torch.tensor(POINTS, dtype=torch.float64)
    np.testing.assert_allclose(f(steps).numpy(), np.interp(POINTS, xs, ys), rtol=0, atol=1e-12)


def test_triangle_rises_from_start_to_one_over_the_warmup_then_falls_to_end():
    f = schedules.triangle(10, 3)
    assert [f(t) for t in (0, 3, 10, 11, 100)] == pytest.approx([0.1, 1.0, 0.0, 0.0, 0.0], abs=1e-15)
    assert f(1.5) == pytest.approx(0.55) and f(6.5) == pytest.approx(0.5) and f(-2) == pytest.approx(0.1)
    for t in np.linspace(-1, 12, 53):
        assert f(float(t)) == pytest.approx(np.interp(t, [0, 3, 10], [0.1, 1.0, 0.0]), abs=1e-12)
    flat_start = schedules.triangle(8, 0)  # no warm-up: 1 at step 0, then down to 0
    assert [flat_start(t) for t in (0, 2, 4, 8)] == pytest.approx([1.0, 0.75, 0.5, 0.0], abs=1e-15)
    custom = schedules.triangle(20, 5, start=0.5, end=0.2)
    assert [custom(t) for t in (0, 5, 20, 25)] == pytest.approx([0.5, 1.0, 0.2, 0.2], abs=1e-15)
    count = torch.tensor(4, dtype=torch.int64)
    assert f(count.to(torch.float64)).item() == pytest.approx(f(4), abs=1e-15)


@pytest.mark.parametrize(
    "make",
    [
        lambda: schedules.piecewise_linear([]),
        lambda: schedules.piecewise_linear([(0, 1.0), (0, 2.0)]),
        lambda: schedules.piecewise_linear([(1, 0.0), (0, 1.0)]),
        lambda: schedules.piecewise_linear([(0, 0.0), (5, 1.0), (4, 2.0)]),
        lambda: schedules.triangle(0, 0),
        lambda: schedules.triangle(10, 10),
        lambda: schedules.triangle(10, 11),
        lambda: schedules.triangle(10, -1),
    ],
    ids=[
        "empty",
        "repeated",
        "decreasing",
        "decreasing-later",
        "no-steps",
        "warmup=total",
        "warmup>total",
        "negative-warmup",
    ],
)
def test_bad_knots_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


# -- 2. scale_by_schedule against torch.optim + LambdaLR -----------------------------------

T_STEPS, WARMUP = 30, 7


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"linear1.weight": (6, 5), "linear1.bias": (6,), "linear2.weight": (3, 6), "linear2.bias": (3,)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


_G = torch.Generator().manual_seed(1)
_X, _Y = (
    torch.randn(16, 5, generator=_G, dtype=torch.float64),
    torch.randn(16, 3, generator=_G, dtype=torch.float64),
)


def _loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
    h = torch.tanh(_X @ params["linear1.weight"].T + params["linear1.bias"])
    return ((h @ params["linear2.weight"].T + params["linear2.bias"] - _Y) ** 2).mean()


def _ours(tx: optim.GradientTransformation) -> list[dict[str, torch.Tensor]]:
    params, traj = _params(), []
    state = tx.init(params)
    for _ in range(T_STEPS):
        updates, state = tx.update(torch.func.grad(_loss)(params), state, params)
        params = optim.apply_updates(params, updates)
        traj.append(params)
    return traj


def _torch(make_opt, scheduled: bool = True) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    ps = {k: v.clone().requires_grad_() for k, v in _params().items()}
    opt = make_opt(list(ps.values()))
    tri = schedules.triangle(T_STEPS, WARMUP)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: float(tri(t))) if scheduled else None
    traj, lrs = [], []
    for _ in range(T_STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        _loss(ps).backward()
        opt.step()
        if sched is not None:
            sched.step()
        traj.append({k: v.detach().clone() for k, v in ps.items()})
    return traj, lrs


OPTIMIZERS = {
    "sgd-nesterov": (
        lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
        0.1,
    ),
    "adamw": (
        lambda: optim.adamw(0.05, weight_decay=0.3),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.3),
        0.05,
    ),
    "adam-l2": (
        lambda: optim.adam(0.05, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
        0.05,
    ),
}


@pytest.mark.cross_path
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scale_by_schedule_follows_torch_optim_with_lambda_lr_in_float64(name):
    ours_tx, torch_opt, lr = OPTIMIZERS[name]
    ours = _ours(optim.chain(ours_tx(), optim.scale_by_schedule(schedules.triangle(T_STEPS, WARMUP))))
    theirs, lrs = _torch(torch_opt)
    tri = schedules.triangle(T_STEPS, WARMUP)
    assert lrs == pytest.approx([lr * tri(t) for t in range(T_STEPS)], rel=1e-15)  # torch's lr per step
    assert lrs[0] == pytest.approx(lr * 0.1) and lrs[WARMUP] == pytest.approx(lr)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for k in a:
            assert a[k].dtype == torch.float64
            torch.testing.assert_close(
                a[k], b[k], rtol=1e-12, atol=1e-12, msg=lambda m, k=k, s=step: f"{s} {k}: {m}"
            )
    # not vacuous: the schedule changed the trajectory, and the params moved
    unscheduled, _ = _torch(torch_opt, scheduled=False)
    assert (ours[-1]["linear1.weight"] - unscheduled[-1]["linear1.weight"]).abs().max() > 1e-4
    assert (ours[-1]["linear1.weight"] - _params()["linear1.weight"]).abs().max() > 1e-3


@pytest.mark.cross_path
def test_scale_by_schedule_counts_its_own_steps_and_resumes_from_the_count():
    """The multiplier comes from the state's counter: a state carried over continues the
    schedule where it was (what makes onecycle resume exactly)."""
    tx = optim.chain(optim.sgd(0.1), optim.scale_by_schedule(schedules.triangle(T_STEPS, WARMUP)))
    params = _params()
    state = tx.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    tri = schedules.triangle(T_STEPS, WARMUP)
    for t in range(T_STEPS + 2):
        updates, state = tx.update(grads, state, params)
        # sgd without momentum: -lr * 1 * multiplier(t); held at 0 after the last step
        expected = -0.1 * tri(t)
        for u in updates.values():
            torch.testing.assert_close(u, torch.full_like(u, expected), rtol=1e-15, atol=1e-17)
    assert int(state[1].count) == T_STEPS + 2


# -- 3. config: the new flags ---------------------------------------------------------------


ONECYCLE = ["--lr-schedule", "onecycle"]
WARM_RANGE = "--warmup-epochs must be in [0, --epochs)"
BAD = [
    (["--width", "8"], "--width applies to --model resnet or dpcnn, not simplenet"),
    (["--model", "mlp", "--width", "8"], "--width applies to --model resnet or dpcnn, not mlp"),
    (["--model", "resnet", "--width", "0"], "--width sets resnet's width (at least 1)"),
    (["--model", "resnet", "--width", "-3"], "--width sets resnet's width (at least 1)"),
    (["--nesterov"], "--nesterov applies to --optimizer sgd"),
    (["--optimizer", "adamw", "--nesterov", "true"], "--nesterov applies to --optimizer sgd"),
    (["--val-split", "-1"], "--val-split must be >= 0, got -1"),
    (["--cutout", "-1"], "--cutout must be >= 0, got -1"),
    (["--crop-padding", "-2"], "--crop-padding must be >= 0, got -2"),
    (["--crop-padding", "15"], "--crop-padding must be at most 14"),
    (["--cutout", "29"], "--cutout must be at most 28"),
    (["--ema", "0"], "--ema is a decay in (0, 1), got 0.0"),
    (["--ema", "1"], "--ema is a decay in (0, 1), got 1.0"),
    (["--ema", "1.5"], "--ema is a decay in (0, 1)"),
    (["--ema", "nan"], "--ema is a decay in (0, 1)"),
    (["--warmup-epochs", "1"], "--warmup-epochs needs --lr-schedule onecycle"),
    ([*ONECYCLE, "--epochs", "3", "--warmup-epochs", "3"], f"{WARM_RANGE}, got 3.0"),
    ([*ONECYCLE, "--epochs", "3", "--warmup-epochs", "7.5"], WARM_RANGE),
    ([*ONECYCLE, "--warmup-epochs", "-0.5"], WARM_RANGE),
    ([*ONECYCLE, "--warmup-epochs", "inf"], WARM_RANGE),
    ([*ONECYCLE, "--warmup-epochs", "nan"], WARM_RANGE),
    ([*ONECYCLE, "--sweep", "lr=0.1,0.05", "--lr", "0.2"], "--lr and --sweep lr=... contradict"),
    (["--lr-schedule", "cosine", "--sweep", "lr=0.1"], "--sweep lr needs --lr-schedule constant or onecycle"),
    (["--flip", "maybe"], "expected true or false, got 'maybe'"),
    (["--tta", "2"], "expected true or false"),
    (["--width", "wide"], "expected an integer"),
    (["--val-split", "1.5"], "expected an integer"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_new_flags_are_one_line_usage_errors_with_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 2
    assert message in one_error_line(err)
    assert stdout == "" and not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"width": 8}, "--width applies to --model resnet"),
        ({"model": "resnet", "width": 0}, "--width sets resnet's width"),
        ({"model": "resnet", "width": 8.0}, "--width must be an integer"),
        ({"nesterov": True, "optimizer": "adam"}, "--nesterov applies to --optimizer sgd"),
        ({"nesterov": 1, "optimizer": "sgd"}, "--nesterov must be true or false"),
        ({"val_split": -5}, "--val-split must be >= 0"),
        ({"cutout": -1}, "--cutout must be >= 0"),
        ({"crop_padding": -1}, "--crop-padding must be >= 0"),
        ({"ema": 0.0}, "--ema is a decay in (0, 1)"),
        ({"ema": 1.0}, "--ema is a decay in (0, 1)"),
        ({"ema": "0.9"}, "--ema must be a number"),
        ({"flip": "yes"}, "--flip must be true or false"),
        ({"warmup_epochs": 1.0}, "--warmup-epochs needs --lr-schedule onecycle"),
        ({"lr_schedule": "onecycle", "epochs": 2, "warmup_epochs": 2}, WARM_RANGE),
        ({"lr_schedule": "onecycle_"}, "--lr-schedule must be one of"),
    ],
)  # fmt: skip
def test_bad_new_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_dict(values)


def test_the_new_flags_reach_the_config():
    cfg, run = cli.parse_train_args(
        [
            "--model", "resnet", "--width", "24", "--optimizer", "sgd", "--nesterov", "--val-split", "500",
            "--crop-padding", "3", "--flip", "--cutout", "6", "--ema", "0.99", "--tta", "true",
            "--lr-schedule", "onecycle", "--warmup-epochs", "1.5", "--epochs", "5", "--compile", "update",
        ]
    )  # fmt: skip
    expected = Config(
        model="resnet", width=24, optimizer="sgd", nesterov=True, val_split=500, crop_padding=3,
        flip=True, cutout=6, ema=0.99, tta=True, lr_schedule="onecycle", warmup_epochs=1.5, epochs=5,
        compile="update",
    )  # fmt: skip
    assert cfg == expected and run == {"resume": None, "overwrite": False}
    # the defaults: all of it off
    plain = Config()
    assert (plain.width, plain.nesterov, plain.val_split, plain.crop_padding, plain.flip) == (
        None,
        False,
        0,
        0,
        False,
    )
    assert (plain.cutout, plain.ema, plain.tta, plain.warmup_epochs) == (0, None, False, 0.0)
    # --flag false spelled out, and the other spellings of _bool
    cfg, _ = cli.parse_train_args(["--optimizer", "sgd", "--nesterov", "off", "--flip", "0", "--tta", "no"])
    assert (cfg.nesterov, cfg.flip, cfg.tta) == (False, False, False)
    cfg, _ = cli.parse_train_args(["--flip", "YES", "--tta", "1"])
    assert (cfg.flip, cfg.tta) == (True, True)


def test_flip_false_turns_off_a_presets_flip_and_flags_override_presets():
    on, _ = cli.parse_train_args(["--preset", "quality"])
    assert on.flip is True and on.tta is True and on.nesterov is True
    off, _ = cli.parse_train_args(["--preset", "quality", "--flip", "false", "--tta", "false"])
    assert (off.flip, off.tta) == (False, False)
    assert off == dataclasses.replace(on, flip=False, tta=False)
    narrow, _ = cli.parse_train_args(["--preset", "best", "--width", "4", "--ema", "0.5", "--cutout", "0"])
    assert (narrow.width, narrow.ema, narrow.cutout) == (4, 0.5, 0)


@pytest.mark.parametrize("name", ["quality", "speedrun", "best"])
def test_the_quality_presets_load_validate_and_build(name):
    assert name in presets()
    values = load_preset(name)
    cfg = Config.from_dict(values)
    assert cli.parse_train_args(["--preset", name])[0] == cfg
    for key, value in values.items():
        assert getattr(cfg, key) == value, key
    # the recipe the README describes: a resnet trained with Nesterov SGD on a onecycle schedule,
    # crop + flip, label smoothing, flip-averaged evaluation
    assert (cfg.model, cfg.optimizer, cfg.nesterov, cfg.lr_schedule) == ("resnet", "sgd", True, "onecycle")
    assert cfg.crop_padding == 2 and cfg.flip and cfg.tta and cfg.label_smoothing == 0.1
    assert 0 < cfg.warmup_epochs < cfg.epochs
    expected = {
        "quality": {
            "width": 12,
            "epochs": 18,
            "val_split": 5000,
            "ema": None,
            "cutout": 0,
            "monitor": "val_acc",
        },
        "speedrun": {
            "width": 32,
            "epochs": 10,
            "val_split": 0,
            "ema": None,
            "cutout": 0,
            "precision": "bf16",
        },
        "best": {
            "width": 64,
            "epochs": 40,
            "val_split": 5000,
            "ema": 0.999,
            "cutout": 8,
            "precision": "bf16",
        },
    }[name]
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    # its objects build: the width reaches the model, onecycle and ema the optimizer
    model = app.build_model(cfg)
    params = model.init(torch.Generator().manual_seed(0))
    assert params["prep.conv.weight"].shape == (cfg.width, 1, 3, 3)
    assert params["fc.weight"].shape == (10, 8 * cfg.width)
    tx = app.build_optimizer(cfg, steps_per_epoch=3)
    state = tx.init(params)
    assert float(optim.get_hyperparam(state, "lr")) == pytest.approx(cfg.lr)
    assert any(isinstance(s, optim.ScaleByScheduleState) for s in state)
    if cfg.ema is None:
        with pytest.raises(KeyError):
            optim.ema_params(state)
    else:
        assert optim.ema_params(state).keys() == params.keys()
    with pytest.raises(ValueError, match="steps per epoch"):
        app.build_optimizer(cfg)


def test_sweep_lr_is_accepted_with_onecycle_and_sets_each_members_peak():
    cfg, _ = cli.parse_train_args(
        ["--model", "mlp", "--optimizer", "sgd", "--nesterov", "--lr-schedule", "onecycle",
         "--warmup-epochs", "1", "--sweep", "lr=0.1,0.05,0.01"]
    )  # fmt: skip
    assert cfg.members == 3 and cfg.lr_schedule == "onecycle"
    model, tx = app.build_model(cfg), app.build_optimizer(cfg, steps_per_epoch=5)
    st = app.initial_state(cfg, model, tx, torch.device("cpu"))
    torch.testing.assert_close(
        optim.get_hyperparam(st.opt_state, "lr"), torch.tensor([0.1, 0.05, 0.01]), rtol=0, atol=0
    )
    # one init for all the members of a sweep: only the lr differs
    assert torch.equal(
        ensemble.member(st, 0).params["linear1.weight"], ensemble.member(st, 2).params["linear1.weight"]
    )


def test_a_warmup_that_rounds_up_to_every_step_still_trains(tmp_path, capsys):
    """Config accepts --warmup-epochs 0.9 with --epochs 1 (it is < --epochs); with one step per
    epoch the warm-up rounds to 1 step == all the steps. The run must train (a warm-up of
    every step but the last) or refuse in one line, never crash with a traceback."""
    out = tmp_path / "run"
    argv = ["--model", "mlp", "--epochs", "1", "--batch-size", "128", "--limit-train", "128",
            "--limit-val", "100", "--lr-schedule", "onecycle", "--warmup-epochs", "0.9",
            "--device", "cpu", "--compile", "off", "--no-progress", "--no-tensorboard",
            "--out", str(out)]  # fmt: skip
    Config.from_dict(cli.explicit_train_args(argv)[0])  # valid
    code, _, err = run_cli(argv, capsys)
    if code != 0:
        assert code == 2
        one_error_line(err)


# -- 4. --val-split end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def val_split_run(tmp_path_factory):
    """2 epochs of the resnet on 256 images, the next 64 held out, --tta: the command line in process."""
    out = tmp_path_factory.mktemp("val_split") / "run"
    argv = [
        "--model", "resnet", "--width", str(WIDTH), "--epochs", "2", "--batch-size", "128",
        "--limit-train", "320", "--val-split", "64", "--limit-val", "100", "--optimizer", "sgd",
        "--nesterov", "--lr", "0.05", "--lr-schedule", "onecycle", "--warmup-epochs", "1",
        "--crop-padding", "2", "--flip", "--tta", "--monitor", "val_acc", "--device", "cpu",
        "--compile", "off", "--no-progress", "--no-tensorboard", "--out", str(out),
    ]  # fmt: skip
    code = cli.main_train(argv)
    return code, out


def test_val_split_holds_out_the_last_n_training_images_and_logs_the_sizes(val_split_run, capsys):
    code, out = val_split_run
    assert code == 0
    log = (out / "train.log").read_text()
    sizes = "train 256 examples, validation 64 (held out of the train split), test 100"
    assert f"{sizes} (measured once, at the end)" in log
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    best_epoch = max(history, key=lambda r: r["val_acc"])["epoch"]  # first of equals, as ModelCheckpoint
    meta = checkpoint.read_metadata(out / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == best_epoch and meta["config"]["val_split"] == 64
    # the validation metrics are those of the best weights on images 256..319 of the train split
    weights = safetensors.torch.load_file(out / "checkpoints" / "best.safetensors")
    ref = reference_eval(weights, held_out(320, 64), tta=True)
    record = history[best_epoch - 1]
    for r in history:
        assert r["val_acc"] * 64 == pytest.approx(round(r["val_acc"] * 64), abs=1e-9)  # k out of 64
    assert_matches_reference(record["val_acc"], record["val_loss"], ref)


def test_val_split_measures_the_test_set_once_with_the_best_weights(val_split_run, capsys):
    code, out = val_split_run
    assert code == 0
    report = json.loads((out / "test.json").read_text())
    history = json.loads((out / "history.json").read_text())
    best_epoch = max(history, key=lambda r: r["val_acc"])["epoch"]
    assert report["examples"] == 100
    assert report["weights"] == f"best weights (epoch {best_epoch})"
    assert Path(report["path"]) == out / "checkpoints" / "best.safetensors"
    assert set(report) >= {"test_acc", "test_loss", "test_top5"}
    assert not any(k.startswith("val_") for k in report)
    # independently: best.safetensors in the reference module on the first 100 test images,
    # normalised with the dataset's mean/std, the mirror image's probabilities averaged in
    weights = safetensors.torch.load_file(out / "checkpoints" / "best.safetensors")
    ref = reference_eval(weights, data.load("test", limit=100), tta=True)
    assert_matches_reference(report["test_acc"], report["test_loss"], ref)
    # without the flip average the numbers differ: --tta reached the evaluation
    plain = reference_eval(weights, data.load("test", limit=100), tta=False)
    assert plain["loss"] != pytest.approx(ref["loss"], rel=1e-4)
    log = (out / "train.log").read_text()
    assert f"test set (100 images, best weights (epoch {best_epoch})): " in log
    assert f"test_acc {report['test_acc']:.4f}" in log
    assert log.count("test set (") == 1  # measured once


def test_val_split_not_below_the_train_size_is_a_one_line_usage_error(tmp_path, capsys):
    for split in ("256", "300"):
        out = tmp_path / f"run{split}"
        code, _, err = run_cli(
            ["--model", "mlp", "--epochs", "1", "--limit-train", "256", "--val-split", split,
             "--limit-val", "100", "--device", "cpu", "--compile", "off", "--no-progress",
             "--no-tensorboard", "--out", str(out)],
            capsys,
        )  # fmt: skip
        assert code == 2
        assert f"--val-split {split} leaves no training images (the train split has 256)" in one_error_line(
            err
        )
        assert not out.exists()  # nothing left behind: the same --out can be used again


def test_without_val_split_there_is_no_test_json(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        ["--model", "mlp", "--epochs", "1", "--limit-train", "256", "--limit-val", "100", "--device", "cpu",
         "--compile", "off", "--no-progress", "--no-tensorboard", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0 and not (out / "test.json").exists() and "test_acc" not in stdout
    assert "train 256 examples, validation 100 (test set)" in (out / "train.log").read_text()


# -- 5. --ema -------------------------------------------------------------------------------


EMA_CFG = dict(
    TINY,
    epochs=2,
    optimizer="sgd",
    nesterov=True,
    lr=0.05,
    ema=0.8,
    flip=True,
    crop_padding=2,
    monitor="val_acc",
    save_best_only=False,  # every epoch's file: the best is one of them
)


def _replay(cfg: Config) -> tuple[list[Any], list[list[dict[str, torch.Tensor]]]]:
    """The run's steps again with the library's objects, outside fit: the state after each
    epoch, and the params after each step of each epoch."""
    device = torch.device("cpu")
    train = data.load("train", limit=cfg.limit_train)
    cut = cfg.limit_train - cfg.val_split
    train = data.Split(train.images[:cut], train.labels[:cut], train.source)
    spe = data.num_batches(cut, cfg.batch_size)
    model, tx = app.build_model(cfg), app.build_optimizer(cfg, spe)
    train_step, _ = app.build_steps(cfg, model, tx, device)
    st = app.initial_state(cfg, model, tx, device)
    batches = data.EpochBatches(train, cfg.batch_size, seed=cfg.seed)
    states, params = [], []
    for epoch in range(1, cfg.epochs + 1):
        params.append([])
        for batch in batches(epoch):
            st, _ = train_step(st, batch)
            params[-1].append({k: v.clone() for k, v in st.params.items()})
        states.append(st)
    return states, params


@pytest.mark.cross_path
def test_ema_best_and_epoch_files_hold_the_moving_average_and_val_acc_is_its_accuracy(tmp_path):
    cfg = Config(**EMA_CFG, out=str(tmp_path / "run"))
    result = app.train(cfg)
    states, step_params = _replay(cfg)
    assert_trees_bitwise(result.state, states[-1])  # the replay is the run

    # the moving average from the params after each step, in float64: the first step copies
    decay, avg = cfg.ema, None
    for epoch, epoch_params in enumerate(step_params, start=1):
        for p in epoch_params:
            p64 = {k: v.double() for k, v in p.items()}
            avg = p64 if avg is None else {k: decay * avg[k] + (1 - decay) * p64[k] for k in avg}
        st = states[epoch - 1]
        saved = safetensors.torch.load_file(
            tmp_path / "run" / "checkpoints" / f"epoch-{epoch:03d}.safetensors"
        )
        assert saved.keys() == {**st.params, **st.model_state}.keys()
        for k, v in optim.ema_params(st.opt_state).items():
            assert torch.equal(saved[k], v), k  # optim.ema_params of the state at that epoch
            torch.testing.assert_close(saved[k].double(), avg[k], rtol=1e-5, atol=1e-6)
        for k, v in st.model_state.items():  # the batch-norm statistics of the training weights
            assert torch.equal(saved[k], v), k
        assert not torch.equal(saved["prep.conv.weight"], st.params["prep.conv.weight"])  # an average

    history = result.history
    best_epoch = max(history, key=lambda r: r["val_acc"])["epoch"]
    assert result.best["epoch"] == best_epoch
    best = safetensors.torch.load_file(tmp_path / "run" / "checkpoints" / "best.safetensors")
    same_epoch = safetensors.torch.load_file(
        tmp_path / "run" / "checkpoints" / f"epoch-{best_epoch:03d}.safetensors"
    )
    assert_trees_bitwise(best, same_epoch)

    # each epoch's val metrics are those of the averaged weights (not the raw ones)
    val = held_out(cfg.limit_train, cfg.val_split)
    for epoch, record in enumerate(history, start=1):
        weights = safetensors.torch.load_file(
            tmp_path / "run" / "checkpoints" / f"epoch-{epoch:03d}.safetensors"
        )
        assert_matches_reference(
            record["val_acc"], record["val_loss"], reference_eval(weights, val, tta=False)
        )
        raw = {**states[epoch - 1].params, **states[epoch - 1].model_state}
        assert reference_eval(raw, val, tta=False)["loss"] != pytest.approx(record["val_loss"], rel=1e-4)

    # the test set, once, with best.safetensors: the averaged weights
    report = json.loads((tmp_path / "run" / "test.json").read_text())
    assert report["weights"] == f"best weights (epoch {best_epoch})" and report["examples"] == cfg.limit_val
    ref = reference_eval(best, data.load("test", limit=cfg.limit_val), tta=False)
    assert_matches_reference(report["test_acc"], report["test_loss"], ref)


# -- 6. exact resume with everything on ----------------------------------------------------


RESUME_CFG = dict(
    TINY,
    limit_train=448,  # 384 training images: 3 steps of 128 per epoch
    epochs=2,
    optimizer="sgd",
    nesterov=True,
    lr=0.05,
    weight_decay=5e-4,
    label_smoothing=0.1,
    lr_schedule="onecycle",
    warmup_epochs=0.5,
    ema=0.9,
    crop_padding=2,
    flip=True,
    cutout=6,
    tta=True,
    monitor="val_acc",
)


def test_a_run_cut_mid_epoch_then_resumed_equals_the_uninterrupted_run_bitwise(tmp_path, capsys):
    straight = app.train(Config(**RESUME_CFG, out=str(tmp_path / "straight")))
    out = tmp_path / "cut"
    cut = app.train(Config(**RESUME_CFG, out=str(out)), max_steps=4)  # epoch 2, after its first batch
    assert int(cut.state.step) == 4 and cut.stop_reason == "max_steps 4 reached"
    meta = checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 1 and meta["in_epoch"]["epoch"] == 2 and meta["in_epoch"]["batch"] == 1

    # the command line, with the settings saved in the checkpoint
    code, stdout, err = run_cli(["--resume", "auto", "--out", str(out)], capsys)
    assert code == 0, err
    assert "test_acc" in stdout
    resumed, _ = checkpoint.load_state(out / "checkpoints" / "last.safetensors", straight.state)
    assert int(resumed.step) == 6
    assert_trees_bitwise(resumed, straight.state)  # params, BN statistics, momentum, counters, rng
    assert_trees_bitwise(optim.ema_params(resumed.opt_state), optim.ema_params(straight.state.opt_state))
    history = json.loads((out / "history.json").read_text())
    assert metrics_only(history) == metrics_only(straight.history)
    assert_trees_bitwise(
        safetensors.torch.load_file(out / "checkpoints" / "best.safetensors"),
        safetensors.torch.load_file(tmp_path / "straight" / "checkpoints" / "best.safetensors"),
    )
    a = json.loads((out / "test.json").read_text())
    b = json.loads((tmp_path / "straight" / "test.json").read_text())
    assert {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}
    # everything was on: the schedule's counter ran with the steps, the average is not the params
    counts = [s.count for s in straight.state.opt_state if isinstance(s, optim.ScaleByScheduleState)]
    assert [int(c) for c in counts] == [6]
    assert not torch.equal(
        optim.ema_params(straight.state.opt_state)["fc.weight"], straight.state.params["fc.weight"]
    )
    assert math.isfinite(straight.history[-1]["train_loss"])
