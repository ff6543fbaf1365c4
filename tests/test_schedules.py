"""Every schedule of `fashion_func.schedules`, one table: the same value on a Python int (a
callback, per epoch), on a 0-d tensor (eager) and inside a compiled step
(`optim.scale_by_schedule` in `make_train_step(compile=True)` and `compile="update"`), and the
value of the equivalent `torch.optim.lr_scheduler` where there is one.

A schedule added to `schedules.__all__` fails `test_the_table_covers_every_schedule` until it
has a row here, and then goes through every test below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as tls

from fashion_func import callbacks, optim, schedules
from fashion_func import state as state_lib
from fashion_func.step import make_train_step

NOT_SCHEDULES = {"Schedule"}  # the names of schedules.__all__ that are not schedule factories
STEPS = 13  # steps run through the compiled train step: every row below is defined on 0..12


@dataclass(frozen=True)
class Row:
    id: str
    name: str  # the factory's name in schedules.__all__
    make: Callable[[], schedules.Schedule]
    steps: int  # the int steps 0..steps-1 checked (>= STEPS)
    base_lr: float = 1.0  # the torch optimizer's lr for the reference
    torch_ref: Callable[[torch.optim.Optimizer], Any] | None = None
    ref_steps: int | None = None  # compare with torch on 0..ref_steps-1 only (default: steps)


def _warmup_cosine_ref(o: torch.optim.Optimizer) -> Any:
    # linear warm-up to the full lr at step 2, then the cosine over steps 3..12 (held after 12)
    warm = tls.LinearLR(o, start_factor=1 / 3, end_factor=1.0, total_iters=2)
    return tls.SequentialLR(o, [warm, tls.CosineAnnealingLR(o, T_max=9, eta_min=0.05)], milestones=[3])


def _triangle_ref(o: torch.optim.Optimizer) -> Any:
    # linear 0.1 -> 1 over steps 0..3, then linear to 0 at step 10: OneCycleLR, linear, 11 steps
    return tls.OneCycleLR(
        o, max_lr=1.0, total_steps=11, pct_start=4 / 11, anneal_strategy="linear",
        div_factor=10.0, final_div_factor=math.inf,
    )  # fmt: skip


ROWS = [
    Row("constant", "constant", lambda: schedules.constant(0.3), 20, 0.3, lambda o: tls.ConstantLR(o, 1.0)),
    Row(
        "step_lr", "step_lr", lambda: schedules.step_lr(0.1, 3, 0.5), 20, 0.1,
        lambda o: tls.StepLR(o, 3, 0.5),
    ),
    Row(
        "cosine", "cosine", lambda: schedules.cosine(0.1, 8, 0.01), 24, 0.1,
        lambda o: tls.CosineAnnealingLR(o, 8, 0.01),
    ),
    Row(
        "onecycle", "onecycle", lambda: schedules.onecycle(0.5, 20, pct_start=0.25), 20, 0.5,
        lambda o: tls.OneCycleLR(o, max_lr=0.5, total_steps=20, pct_start=0.25),
    ),
    Row(
        "onecycle-3-linear", "onecycle",
        lambda: schedules.onecycle(0.5, 20, three_phase=True, anneal_strategy="linear", div_factor=10.0),
        20, 0.5,
        lambda o: tls.OneCycleLR(
            o, max_lr=0.5, total_steps=20, three_phase=True, anneal_strategy="linear", div_factor=10.0
        ),
    ),
    Row(
        "linear_warmup", "linear_warmup", lambda: schedules.linear_warmup(1.0, 4), 16, 1.0,
        lambda o: tls.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=3),
    ),
    Row(
        "warmup_cosine", "warmup_cosine", lambda: schedules.warmup_cosine(1.0, 3, 12, 0.05), 13, 1.0,
        _warmup_cosine_ref,
    ),
    Row("triangle", "triangle", lambda: schedules.triangle(10, 3), 16, 1.0, _triangle_ref, 11),
    Row(
        "piecewise_linear", "piecewise_linear",
        lambda: schedules.piecewise_linear([(0, 0.1), (3, 1.0), (10, 0.0)]), 16, 1.0, _triangle_ref, 11,
    ),
]  # fmt: skip
IDS = [r.id for r in ROWS]


def torch_lrs(make_sched: Callable[[torch.optim.Optimizer], object], n: int, lr: float = 0.1) -> list[float]:
    """The lr a torch scheduler puts in the param group before each of `n` epochs/steps."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    sched = make_sched(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no grad: a no-op that keeps the scheduler's call-order check quiet
        sched.step()
    return out


def row_torch_lrs(row: Row, n: int) -> list[float]:
    """The lr the row's torch scheduler gives at steps 0..n-1."""
    return torch_lrs(row.torch_ref, n, lr=row.base_lr)


def int_values(row: Row) -> list[float]:
    f = row.make()
    values = [f(t) for t in range(row.steps)]
    assert all(type(v) is float for v in values), values
    return values


def test_the_table_covers_every_schedule():
    assert {r.name for r in ROWS} == set(schedules.__all__) - NOT_SCHEDULES
    assert all(r.steps >= STEPS for r in ROWS)


@pytest.mark.cross_path
@pytest.mark.parametrize("row", [r for r in ROWS if r.torch_ref], ids=lambda r: r.id)
def test_int_steps_give_torch_schedulers_values(row):
    ours = int_values(row)
    ref = row_torch_lrs(row, row.ref_steps or row.steps)
    if row.name == "constant":
        assert set(ref) == {0.3}
    else:
        assert len(set(ref)) > 2  # the reference really varies
    for t, b in enumerate(ref):
        assert ours[t] == pytest.approx(b, rel=1e-12, abs=1e-15), f"step {t}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_tensor_steps_give_the_int_values_eagerly(row, dtype):
    f, ints = row.make(), int_values(row)
    tol = {"rel": 1e-12, "abs": 1e-15} if dtype == torch.float64 else {"rel": 2e-6, "abs": 1e-7}
    for t, expected in enumerate(ints):
        value = f(torch.tensor(t, dtype=torch.int64).to(dtype))  # as scale_by_schedule reads its count
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == dtype, value
        assert value.item() == pytest.approx(expected, **tol), f"step {t}"
    batch = f(torch.arange(row.steps, dtype=dtype))  # elementwise over a vector of steps too
    assert batch.tolist() == pytest.approx(ints, **tol)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_lr_schedule_callback_drives_every_schedule_per_epoch(row):
    cb = callbacks.LRSchedule(schedule=row.make(), name=row.id)
    ints = int_values(row)
    state, actions = cb.on_event(cb.init(), callbacks.TrainBegin(start_epoch=1, total_epochs=row.steps))
    for epoch in range(1, row.steps):
        assert actions == [callbacks.SetHyperparam("lr", ints[epoch - 1])]
        state, actions = cb.on_event(state, callbacks.EpochEnd(epoch=epoch, metrics={}))
    resumed = cb.on_event(cb.init(), callbacks.TrainBegin(start_epoch=4, total_epochs=row.steps))[1]
    assert resumed == [callbacks.SetHyperparam("lr", ints[3])]  # resume: the epoch's own lr


def per_param_schedules(rows: list[Row]) -> optim.GradientTransformation:
    """`scale_by_schedule(row's schedule)` on parameter `row.id` alone, for every row: one
    compiled step runs them all."""
    txs = {r.id: optim.scale_by_schedule(r.make()) for r in rows}

    def init(params: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        return tuple(tx.init({k: params[k]}) for k, tx in txs.items())

    def update(updates: dict[str, torch.Tensor], state: tuple[Any, ...], params: Any = None) -> Any:
        out, new_state = {}, []
        for (k, tx), st in zip(txs.items(), state, strict=True):
            u, st = tx.update({k: updates[k]}, st)
            out.update(u)
            new_state.append(st)
        return out, tuple(new_state)

    return optim.GradientTransformation(init, update)


def _model(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # the mean loss is mean(x[:, 0]) * sum(params): with x = 1 every gradient is exactly 1
    return x[:, :1] * sum(params.values())


@pytest.mark.parametrize("compile", [False, True, "update"], ids=["eager", "compiled", "update-compiled"])
def test_every_schedule_runs_inside_the_train_step_with_its_int_values(compile):
    """sgd(lr=1) then each row's scale_by_schedule on its own parameter: from params 0 with
    gradient 1, a step leaves each parameter at -schedule(count), the count going 0, 1, 2..."""
    torch._dynamo.reset()
    tx = optim.chain(optim.sgd(1.0), per_param_schedules(ROWS))
    zeros = {r.id: torch.zeros(1, dtype=torch.float64) for r in ROWS}
    st = state_lib.create(zeros, tx)
    step = make_train_step(_model, tx, loss=lambda out, y: out[:, 0], preprocess=None, compile=compile)
    batch = (torch.ones(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.int64))
    ints = {r.id: int_values(r) for r in ROWS}
    for t in range(STEPS):
        st, _ = step(st.replace(params={k: v.clone() for k, v in zeros.items()}), batch)
        for k, p in st.params.items():
            assert p.dtype == torch.float64
            assert -p.item() == pytest.approx(ints[k][t], rel=1e-12, abs=1e-15), f"{k} at step {t}"


# -- more settings of the schedules that torch has, on Python ints --------------------------


def assert_schedule(ours: schedules.Schedule, ref: list[float]) -> None:
    got = [ours(t) for t in range(len(ref))]
    assert all(isinstance(v, float) for v in got)
    assert len(set(ref)) > 2  # the reference really varies
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"step {t}: {a} != {b}"


@pytest.mark.parametrize(("step_size", "gamma"), [(3, 0.1), (10, 0.5), (1, 0.9)])
def test_step_lr_matches_torch(step_size: int, gamma: float) -> None:
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=gamma), 40)
    assert_schedule(schedules.step_lr(0.1, step_size, gamma), ref)


@pytest.mark.parametrize(("t_max", "eta_min"), [(10, 0.0), (25, 1e-3)])
def test_cosine_matches_torch(t_max: int, eta_min: float) -> None:
    # three periods: torch's recursive form rises again after t_max; so does ours
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=t_max, eta_min=eta_min), 3 * t_max
    )
    assert_schedule(schedules.cosine(0.1, t_max, eta_min), ref)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pct_start": 0.25, "anneal_strategy": "linear"},
        {"three_phase": True, "div_factor": 10.0, "final_div_factor": 100.0},
        {"pct_start": 0.1},
    ],
)
def test_onecycle_matches_torch(kw: dict) -> None:
    total = 97
    ref = torch_lrs(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=total, **kw), total
    )
    sched = schedules.onecycle(0.5, total, **kw)
    assert_schedule(sched, ref)
    with pytest.raises(ValueError, match="steps"):
        sched(total + 1)


def test_simple_schedules() -> None:
    assert [schedules.constant(0.3)(t) for t in (0, 5, 1000)] == [0.3, 0.3, 0.3]
    warm = schedules.linear_warmup(1.0, 4)
    assert [warm(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    wc = schedules.warmup_cosine(1.0, 2, 12)
    assert wc(0) == 0.5 and wc(1) == 1.0 and wc(2) == 1.0
    assert wc(7) == pytest.approx(0.5) and wc(12) == pytest.approx(0.0) and wc(50) == pytest.approx(0.0)
    assert all(wc(t) >= wc(t + 1) for t in range(2, 12))
    with pytest.raises(ValueError):
        schedules.step_lr(0.1, 3)(-1)
    with pytest.raises(ValueError):
        schedules.cosine(0.1, 0)
