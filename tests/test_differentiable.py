"""Differentiable by default: every public transform of `fashion_func.optim`, differentiated
through against central finite differences in float64.

Two derivatives per row of `CASES`, each through 3 inner steps of `tx` on a small tanh
regression: the MAML-style meta-gradient d(outer loss after the steps)/d(initial params)
(second order: the inner steps take `torch.func.grad`), and every hyperparameter's
hypergradient, the value given by `set_hyperparam` as a tensor. The meta-objective also sums
the squares of the final optimizer state's float leaves, so a detached moment, buffer or
average fails too. `CASES` names every entry of `optim.__all__`: a transform added there fails
`test_the_table_covers_optim` until it has a row (or a reason why it is not one). No transform
needed a "raises when differentiated" row: each differentiates correctly (`lion`'s sign has
derivative 0 where it has one, which finite differences confirm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from fashion_func import optim, schedules, tree

F64 = torch.float64
STEPS = 3  # inner steps
FD_EPS = 1e-6  # central differences: truncation ~1e-12, rounding ~1e-10 in float64
RTOL = 1e-6  # |autograd - FD| <= RTOL * (1 + max |FD|)


@dataclass(frozen=True)
class Case:
    make: Callable[[], optim.GradientTransformation]


# not a transform: why the name has no Case
Reason = str

LR = optim.scale_by_learning_rate
HEAD = lambda p: {k: "head" if k == "b" else "body" for k in p}  # multi_transform labels

CASES: dict[str, Case | Reason] = {
    "sgd": Case(lambda: optim.sgd(0.1, weight_decay=0.01)),
    "adam": Case(lambda: optim.adam(0.05, weight_decay=0.01, eps_root=1e-10)),
    "adamw": Case(lambda: optim.adamw(0.05, eps_root=1e-10)),
    "lion": Case(lambda: optim.lion(0.01, weight_decay=0.1)),
    "chain": Case(lambda: optim.chain(optim.trace(0.5), optim.scale_by_learning_rate(0.1))),
    "trace": Case(lambda: optim.chain(optim.trace(0.9, nesterov=True), LR(0.1))),
    "scale_by_adam": Case(lambda: optim.chain(optim.scale_by_adam(eps_root=1e-10), LR(0.05))),
    "scale_by_lion": Case(lambda: optim.chain(optim.scale_by_lion(), LR(0.01))),
    "scale_by_learning_rate": Case(lambda: optim.scale_by_learning_rate(0.1)),
    "scale_by_schedule": Case(
        lambda: optim.chain(optim.sgd(0.1), optim.scale_by_schedule(schedules.warmup_cosine(1.0, 1, 4)))
    ),
    "add_decayed_weights": Case(lambda: optim.chain(optim.add_decayed_weights(0.1), LR(0.1))),
    "add_l2_to_grads": Case(lambda: optim.chain(optim.add_l2_to_grads(0.1), optim.sgd(0.1, momentum=0.5))),
    "clip_by_global_norm": Case(lambda: optim.chain(optim.clip_by_global_norm(0.05), optim.sgd(0.5))),
    "add_noise": Case(lambda: optim.chain(optim.add_noise(0.01, 0.55, seed=3), optim.sgd(0.1))),
    "set_to_zero": Case(
        lambda: optim.chain(optim.sgd(0.1), optim.masked(optim.set_to_zero(), {"w": False, "b": True}))
    ),
    "ema": Case(lambda: optim.chain(optim.sgd(0.1, momentum=0.9, dampening=0.1), optim.ema(0.8))),
    "masked": Case(
        lambda: optim.chain(optim.masked(optim.trace(0.9), {"w": True, "b": False}), optim.sgd(0.1))
    ),
    "multi_transform": Case(
        lambda: optim.multi_transform({"body": optim.adam(0.05, eps_root=1e-10), "head": LR(0.1)}, HEAD)
    ),
    "MultiSteps": Case(lambda: optim.MultiSteps(optim.sgd(0.2, momentum=0.9), every_k=2)),
    # not transforms
    "GradientTransformation": "the contract every Case is an instance of",
    "Description": "a transform's description: data, not a transform",
    "Params": "a type alias",
    "State": "a type alias",
    "apply_updates": "used by every Case (params + updates)",
    "set_hyperparam": "used by every hypergradient below",
    "get_hyperparam": "reads a state; no update to differentiate",
    "hyperparams": "lists a state's hyperparameters (the hypergradient test takes each)",
    "map_states": "a state helper; no update to differentiate",
    "find_states": "a state helper; no update to differentiate",
    "ema_params": "reads ema's average, which the meta-objective includes (state leaves)",
    "set_noise_key": "sets add_noise's integer key: nothing continuous to differentiate",
    **{name: "a state type" for name in optim.__all__ if name.endswith("State") and name != "State"},
}

ROWS = sorted(name for name, case in CASES.items() if isinstance(case, Case))


def test_the_table_covers_optim():
    assert set(CASES) == set(optim.__all__)
    for name in ROWS:  # each row builds a described transform
        assert isinstance(CASES[name].make(), optim.GradientTransformation)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- the inner problem

_G = torch.Generator().manual_seed(0)
XS = torch.randn(STEPS + 1, 6, 3, generator=_G, dtype=F64)  # STEPS inner batches, then the outer one
YS = torch.randn(STEPS + 1, 6, 2, generator=_G, dtype=F64)
P0 = {"w": torch.randn(3, 2, generator=_G, dtype=F64), "b": torch.randn(2, generator=_G, dtype=F64)}


def _loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()


def _objective(tx: optim.GradientTransformation, p0: dict[str, Tensor], hyper: tuple[str, Tensor] | None,
               xs: Tensor = XS) -> Tensor:  # fmt: skip
    """The outer loss after STEPS inner steps of `tx` from `p0`, plus the final state's float
    leaves squared; `hyper` = (name, value) is set into the initial state."""
    state = tx.init(p0)
    if hyper is not None:
        state = optim.set_hyperparam(state, *hyper)
    p = p0
    for i in range(STEPS):
        g = torch.func.grad(_loss)(p, xs[i], YS[i])
        updates, state = tx.update(g, state, p)
        p = optim.apply_updates(p, updates)
    leaves = [t for t in tree.leaves(state) if isinstance(t, Tensor) and t.is_floating_point()]
    return _loss(p, xs[STEPS], YS[STEPS]) + 0.1 * sum(t.pow(2).sum() for t in leaves)


def _central(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Central finite differences of the scalar `f` at `x`, entry by entry."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = FD_EPS
        out[i] = (f((flat + step).reshape(x.shape)) - f((flat - step).reshape(x.shape))) / (2 * FD_EPS)
    return out.reshape(x.shape)


def _close(got: Tensor, want: Tensor, what: str) -> None:
    assert torch.isfinite(got).all(), f"{what}: not finite: {got}"
    err = (got - want).abs().max().item()
    assert err <= RTOL * (1 + want.abs().max().item()), f"{what}: autograd {got} vs finite differences {want}"


@pytest.mark.parametrize("name", ROWS)
def test_meta_gradient_through_three_steps(name):
    tx = CASES[name].make()  # type: ignore[union-attr]
    got = torch.func.grad(lambda p: _objective(tx, p, None))(P0)
    for k in P0:

        def along(v: Tensor, k: str = k) -> Tensor:
            return _objective(tx, {**P0, k: v}, None)

        _close(got[k], _central(along, P0[k]), f"{name} d/d{k}")
    assert any(got[k].abs().max() > 0 for k in P0)


@pytest.mark.parametrize("name", ROWS)
def test_hypergradient_of_every_hyperparameter(name):
    tx = CASES[name].make()  # type: ignore[union-attr]
    names = sorted(optim.hyperparams(tx.init(P0)))
    if name != "add_noise" and name != "MultiSteps":
        assert names  # only wrappers of no settable value may have none
    for h in names:
        h0 = optim.get_hyperparam(tx.init(P0), h).clone()
        f = lambda v, h=h: _objective(tx, P0, (h, v))
        _close(torch.func.grad(f)(h0), _central(f, h0), f"{name} d/d{h}")


def test_set_hyperparam_keeps_the_graph_issue_34():
    tx, p = optim.sgd(0.1), {"w": torch.ones(3)}

    def f(lr: Tensor) -> Tensor:
        u, _ = tx.update({"w": torch.ones(3)}, optim.set_hyperparam(tx.init(p), "lr", lr), p)
        return optim.apply_updates(p, u)["w"].sum()

    assert torch.func.grad(f)(torch.tensor(0.1)).item() == -3.0
    # and through autograd, for a learning rate given to the constructor as a tensor
    lr = torch.tensor(0.1, requires_grad=True)
    tx = optim.sgd(lr)
    u, _ = tx.update({"w": torch.ones(3)}, tx.init(p), p)
    optim.apply_updates(p, u)["w"].sum().backward()
    assert lr.grad is not None and lr.grad.item() == -3.0


def test_eps_root_makes_adams_meta_gradient_finite_at_zero_gradients():
    """A zero input column makes a row of w's gradient exactly 0 (yet on the graph): sqrt(v)'s
    derivative at v = 0 is infinite, so the meta-gradient is NaN without eps_root, and finite
    and equal to finite differences with it."""
    xs = XS.clone()
    xs[:STEPS, :, 0] = 0.0  # inner batches: w[0] gets a gradient of exact zeros
    plain = optim.adam(0.05)
    nan = torch.func.grad(lambda p: _objective(plain, p, None, xs))(P0)
    assert torch.isnan(nan["w"]).any()
    tx = optim.adam(0.05, eps_root=1e-12)
    got = torch.func.grad(lambda p: _objective(tx, p, None, xs))(P0)
    want = _central(lambda v: _objective(tx, {**P0, "w": v}, None, xs), P0["w"])
    _close(got["w"], want, "adam eps_root d/dw")
