"""fashion_func.optim against torch.optim, step for step, in float64."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import Tensor

from fashion_func import optim, schedules, tree

STEPS = 50
TOL = {"rtol": 1e-12, "atol": 1e-14}


def make_params(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """A small model-like params dict: two layers' weights and biases."""
    g = torch.Generator().manual_seed(0)
    shapes = {"linear1.weight": (6, 5), "linear1.bias": (6,), "linear2.weight": (3, 6), "linear2.bias": (3,)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def make_data(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


X, Y = make_data()


def loss_fn(params: dict[str, Tensor], x: Tensor = X, y: Tensor = Y) -> Tensor:
    # a fixed non-quadratic loss, so the gradients change along the trajectory
    h = torch.tanh(x @ params["linear1.weight"].T + params["linear1.bias"])
    out = h @ params["linear2.weight"].T + params["linear2.bias"]
    return ((out - y) ** 2).mean()


def run_ours(tx: optim.GradientTransformation, params: dict[str, Tensor], steps: int = STEPS) -> list[dict]:
    x, y = X.to(next(iter(params.values())).dtype), Y.to(next(iter(params.values())).dtype)
    state = tx.init(params)
    traj = []
    for _ in range(steps):
        grads = torch.func.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        traj.append(params)
    return traj


def run_torch(
    make_opt: Callable[[Iterable[Tensor]], torch.optim.Optimizer],
    params: dict[str, Tensor],
    steps: int = STEPS,
) -> list[dict]:
    x, y = X.to(next(iter(params.values())).dtype), Y.to(next(iter(params.values())).dtype)
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = make_opt(ps.values())
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ps, x, y).backward()
        opt.step()
        traj.append({k: v.detach().clone() for k, v in ps.items()})
    return traj


def assert_same_trajectory(ours: list[dict], ref: list[dict], **tol: float) -> None:
    tol = tol or TOL
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k, s=step: f"step {s} {k}: {m}")
    # the run must actually have moved the params, or equality proves nothing
    start = make_params(ours[0]["linear1.weight"].dtype)
    assert not torch.allclose(ours[-1]["linear1.weight"], start["linear1.weight"], atol=1e-3)


SGD_CASES = {
    "plain": ({"lr": 0.1}, {"lr": 0.1}),
    "momentum": ({"lr": 0.05, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.9}),
    "nesterov": (
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    ),
    "weight_decay": (
        {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1},
        {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1},
    ),
    "plain_weight_decay": ({"lr": 0.1, "weight_decay": 0.05}, {"lr": 0.1, "weight_decay": 0.05}),
    "dampening": (
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
    ),
}


@pytest.mark.cross_path
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch(case: str) -> None:
    ours_kw, torch_kw = SGD_CASES[case]
    params = make_params()
    assert_same_trajectory(
        run_ours(optim.sgd(**ours_kw), params), run_torch(lambda p: torch.optim.SGD(p, **torch_kw), params)
    )


ADAM_CASES = {
    "adam": (optim.adam, torch.optim.Adam, {"lr": 1e-2}),
    "adam_betas_eps": (optim.adam, torch.optim.Adam, {"lr": 3e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6}),
    "adam_l2": (optim.adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw": (optim.adamw, torch.optim.AdamW, {"lr": 1e-2}),
    "adamw_strong": (optim.adamw, torch.optim.AdamW, {"lr": 2e-2, "weight_decay": 0.3, "b2": 0.95}),
}


def _torch_kw(kw: dict) -> dict:
    kw = dict(kw)
    b1, b2 = kw.pop("b1", 0.9), kw.pop("b2", 0.999)
    return {**kw, "betas": (b1, b2)}


@pytest.mark.cross_path
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_family_matches_torch(case: str) -> None:
    ours, ref, kw = ADAM_CASES[case]
    params = make_params()
    assert_same_trajectory(run_ours(ours(**kw), params), run_torch(lambda p: ref(p, **_torch_kw(kw)), params))


def test_adam_and_adamw_weight_decay_differ() -> None:
    # guards against both being wired the same way (the comparison above would still pass for one of them)
    params = make_params()
    a = run_ours(optim.adam(lr=1e-2, weight_decay=0.1), params, steps=5)[-1]
    w = run_ours(optim.adamw(lr=1e-2, weight_decay=0.1), params, steps=5)[-1]
    assert not torch.allclose(a["linear1.weight"], w["linear1.weight"], atol=1e-6)


@pytest.mark.cross_path
def test_adam_float32_close_to_torch() -> None:
    params = make_params(torch.float32)
    ours = run_ours(optim.adam(lr=1e-2, weight_decay=1e-2), params)
    ref = run_torch(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2), params)
    assert ours[-1]["linear1.weight"].dtype == torch.float32
    assert_same_trajectory(ours, ref, rtol=1e-5, atol=1e-5)


def test_hyperparams_are_0d_tensors_in_params_dtype_and_counters_int64() -> None:
    for dtype in (torch.float32, torch.float64):
        state = optim.adamw(lr=1e-3).init(make_params(dtype))
        for name in ("lr", "weight_decay"):
            h = optim.get_hyperparam(state, name)
            assert h.shape == () and h.dtype == dtype and h.device.type == "cpu"
        assert state[0].count.dtype == torch.int64 and state[0].count.shape == ()
    state = optim.sgd(0.1, momentum=0.9).init(make_params(torch.bfloat16))
    assert optim.get_hyperparam(state, "lr").dtype == torch.float32  # at least float32
    assert optim.get_hyperparam(state, "momentum").item() == pytest.approx(0.9)
    assert set(optim.hyperparams(state)) == {"lr", "momentum", "dampening", "weight_decay"}


@pytest.mark.cross_path
def test_set_hyperparam_matches_torch_lr_change_and_is_pure() -> None:
    params = make_params()
    tx = optim.adam(lr=1e-2)
    state = tx.init(params)
    p = params
    x = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(x.values(), lr=1e-2)
    for step in range(30):
        if step == 10:
            old = state
            state = optim.set_hyperparam(state, "lr", 3e-3)
            for group in opt.param_groups:
                group["lr"] = 3e-3
            # the old state is untouched; the new lr keeps dtype, device and shape
            assert optim.get_hyperparam(old, "lr").item() == 1e-2
            new_lr = optim.get_hyperparam(state, "lr")
            assert new_lr.item() == 3e-3 and new_lr.dtype == torch.float64 and new_lr.shape == ()
        updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
        p = optim.apply_updates(p, updates)
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        for k in p:
            torch.testing.assert_close(p[k], x[k].detach(), **TOL)


def test_set_hyperparam_through_nested_chains_and_errors() -> None:
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr=1e-3, weight_decay=0.1))
    state = tx.init(make_params())
    state2 = optim.set_hyperparam(state, "weight_decay", 0.5)
    state2 = optim.set_hyperparam(state2, "max_norm", torch.tensor(2.0, dtype=torch.float32))
    assert optim.get_hyperparam(state2, "weight_decay").item() == 0.5
    assert optim.get_hyperparam(state2, "max_norm").dtype == torch.float64  # value cast to the slot's dtype
    assert optim.get_hyperparam(state, "weight_decay").item() == pytest.approx(0.1)
    assert type(state2) is tuple and type(state2[1][1]) is optim.AddDecayedWeightsState
    with pytest.raises(KeyError, match="momentum"):
        optim.set_hyperparam(state, "momentum", 0.9)
    with pytest.raises(KeyError, match="nope"):
        optim.get_hyperparam(state, "nope")


def _clone(t: object) -> object:
    return tree.map(lambda x: x.clone(), t)


def _assert_tree_equal(a: object, b: object) -> None:
    la, lb = tree.leaves(a), tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "tx",
    [
        optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        optim.adam(1e-2, weight_decay=0.1),
        optim.adamw(1e-2),
        optim.chain(optim.clip_by_global_norm(0.1), optim.sgd(0.1, momentum=0.5, dampening=0.1)),
    ],
    ids=["sgd", "adam", "adamw", "clip_sgd"],
)
def test_update_does_not_modify_inputs(tx: optim.GradientTransformation) -> None:
    params = make_params()
    state = tx.init(params)
    for _ in range(2):  # second round: momentum buffers / moments are non-zero
        grads = torch.func.grad(loss_fn)(params)
        before = _clone((params, grads, state))
        updates, new_state = tx.update(grads, state, params)
        new_params = optim.apply_updates(params, updates)
        _assert_tree_equal((params, grads, state), before)
        assert not torch.equal(new_params["linear1.weight"], params["linear1.weight"])
        params, state = new_params, new_state


@pytest.mark.cross_path
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e3])
def test_clip_by_global_norm_matches_clip_grad_norm(max_norm: float) -> None:
    params = make_params()
    grads = torch.func.grad(loss_fn)(params)
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    for k, p in ps.items():
        p.grad = grads[k].clone()
    torch.nn.utils.clip_grad_norm_(list(ps.values()), max_norm)
    tx = optim.clip_by_global_norm(max_norm)
    clipped, _ = tx.update(grads, tx.init(params), params)
    for k in ps:
        torch.testing.assert_close(clipped[k], ps[k].grad, rtol=1e-14, atol=0)
    norm = torch.sqrt(sum((g**2).sum() for g in clipped.values()))
    assert norm.item() <= max_norm + 1e-9
    if max_norm == 1e3:  # below the limit: untouched
        for k in grads:
            assert torch.equal(clipped[k], grads[k])


@pytest.mark.cross_path
def test_clipped_sgd_trajectory_matches_torch() -> None:
    params = make_params()
    tx = optim.chain(optim.clip_by_global_norm(0.2), optim.sgd(0.1, momentum=0.9))
    ours = run_ours(tx, params)
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(ps.values(), lr=0.1, momentum=0.9)
    ref = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(ps).backward()
        torch.nn.utils.clip_grad_norm_(list(ps.values()), 0.2)
        opt.step()
        ref.append({k: v.detach().clone() for k, v in ps.items()})
    assert_same_trajectory(ours, ref)


def _step_fn(tx: optim.GradientTransformation) -> Callable:
    def step(params: dict, grads: dict, state: object) -> tuple[dict, object]:
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize(
    "tx",
    [
        optim.adam(1e-2, weight_decay=1e-3),
        optim.adamw(1e-2),
        optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9, dampening=0.1)),
    ],
    ids=["adam", "adamw", "sgd_nesterov", "clip_sgd"],
)
def test_compiled_update_does_not_recompile_when_hyperparams_change(tx: optim.GradientTransformation) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(_step_fn(tx), backend=counter, fullgraph=True)
    params = make_params()
    state = tx.init(params)
    for i in range(4):
        grads = torch.func.grad(loss_fn)(params)
        params, state = step(params, grads, state)
        state = optim.set_hyperparam(state, "lr", 1e-3 * (i + 1))
        if i == 1:
            state = optim.set_hyperparam(state, "weight_decay", 0.05)
        if i == 2 and "momentum" in optim.hyperparams(state):
            state = optim.set_hyperparam(state, "momentum", 0.5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.cross_path
def test_compiled_update_equals_eager() -> None:
    # aot_eager traces and functionalizes the update like inductor would, without a C++ build
    tx = optim.adamw(1e-2, weight_decay=0.1)
    torch._dynamo.reset()
    step = torch.compile(_step_fn(tx), backend="aot_eager", fullgraph=True)
    eager = _step_fn(tx)
    p1 = p2 = make_params()
    s1 = s2 = tx.init(p1)
    for _ in range(5):
        g = torch.func.grad(loss_fn)(p1)
        p1, s1 = step(p1, g, s1)
        p2, s2 = eager(p2, g, s2)
        s1 = optim.set_hyperparam(s1, "lr", 5e-3)
        s2 = optim.set_hyperparam(s2, "lr", 5e-3)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], **TOL)
    torch._dynamo.reset()


# -- a schedule driving the optimizer (the schedules themselves: tests/test_schedules.py) ---


@pytest.mark.cross_path
def test_schedule_drives_set_hyperparam_like_torch_steplr() -> None:
    # the loop's pattern: set lr from the schedule at each epoch start, vs torch StepLR
    params = make_params()
    sched = schedules.step_lr(0.05, step_size=2, gamma=0.5)
    tx = optim.sgd(0.05, momentum=0.9)
    state = tx.init(params)
    p = params
    x = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(x.values(), lr=0.05, momentum=0.9)
    tsched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for epoch in range(6):
        state = optim.set_hyperparam(state, "lr", sched(epoch))
        for _ in range(3):
            updates, state = tx.update(torch.func.grad(loss_fn)(p), state, p)
            p = optim.apply_updates(p, updates)
            opt.zero_grad()
            loss_fn(x).backward()
            opt.step()
        tsched.step()
    for k in p:
        torch.testing.assert_close(p[k], x[k].detach(), **TOL)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        optim.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        optim.trace(0.9, nesterov=True, dampening=0.1)
    tx = optim.adamw(1e-3)
    state = tx.init(make_params())
    with pytest.raises(ValueError, match="params"):
        tx.update(make_params(), state)
    assert math.isfinite(schedules.onecycle(0.1, 10)(10))
