"""Transforms and schedules that say what they are: each `tx.description` (name, hyperparameters,
children) rebuilds the transform through the public function it names, and the optax export
built from it alone computes our updates (optax itself, float64). `lion` and Adam's `eps_root`
follow `optax.lion` / `optax.adam` step for step."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fashion_func import optim, schedules

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before any jax import
optax = pytest.importorskip("optax", reason="the jax extra is not installed: pip install 'fashion_func[jax]'")
import jax.numpy as jnp  # noqa: E402

from fashion_func import interop  # noqa: E402

F64 = torch.float64
STEPS = 20
RTOL, ATOL = 1e-12, 1e-14  # float64, ours against optax, every element of every step

# optimizers whose description must round-trip to an optax transformation computing our updates
EXPORTED = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd_nesterov_l2": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: optim.adam(1e-2, weight_decay=0.1),
    "adam_eps_root": lambda: optim.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8),
    "adamw": lambda: optim.adamw(1e-2, eps_root=1e-10),
    "lion": lambda: optim.lion(1e-3, b1=0.95, b2=0.98, weight_decay=0.1),
    "triangle": lambda: optim.chain(optim.adam(1e-2), optim.scale_by_schedule(schedules.triangle(10, 3))),
    "chain_of_parts": lambda: optim.chain(
        optim.add_l2_to_grads(0.01),
        optim.scale_by_lion(),
        optim.add_decayed_weights(0.1),
        optim.scale_by_learning_rate(0.5),
    ),
}
MASK = {"w": True, "b": False}
# every transform optim builds, wrappers included, for the rebuild test
DESCRIBED = {
    **EXPORTED,
    "adamw_mask": lambda: optim.adamw(mask=MASK),
    "clip": lambda: optim.clip_by_global_norm(1.0),
    "noise": lambda: optim.add_noise(0.1, 0.55, seed=1),
    "ema": lambda: optim.ema(0.9),
    "zero": lambda: optim.set_to_zero(),
    "masked": lambda: optim.masked(optim.trace(0.5), MASK),
    "multi": lambda: optim.multi_transform({"a": optim.adam(), "b": optim.sgd(0.1)}, {"w": "a", "b": "b"}),
    "multisteps": lambda: optim.MultiSteps(optim.sgd(0.1), 3, use_grad_mean=False),
}


def _rebuild(desc: optim.Description) -> optim.GradientTransformation:
    """The transform `desc` describes, built again by the public function it names."""
    kids = {role: _rebuild(d) for role, d in desc.children.items()}  # type: ignore[arg-type]
    make = getattr(optim, desc.name)
    if desc.name == "chain":
        return make(*(kids[str(i)] for i in range(len(kids))))
    if desc.name in ("masked", "MultiSteps"):
        return make(kids["inner"], **desc.hyperparams)
    if desc.name == "multi_transform":
        return make(kids, **desc.hyperparams)
    return make(**desc.hyperparams)  # a leaf, or a named optimizer (its parts follow from its arguments)


@pytest.mark.parametrize("name", sorted(DESCRIBED))
def test_a_description_rebuilds_its_transform(name):
    tx = DESCRIBED[name]()
    assert tx.description is not None
    assert _rebuild(tx.description).description == tx.description


def _problem() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64)}
    targets = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(STEPS)]
    return params, targets


def _trajectories(tx: optim.GradientTransformation, otx) -> None:
    """STEPS steps of `tx` and of optax's `otx` on the gradient `p - target_k`; every update equal."""
    params, targets = _problem()
    jparams = {k: jnp.asarray(v.numpy()) for k, v in params.items()}
    state, ostate = tx.init(params), otx.init(jparams)
    for k, target in enumerate(targets):
        grads = {n: params[n] - target[n] for n in params}
        jgrads = {n: jparams[n] - jnp.asarray(target[n].numpy()) for n in params}
        updates, state = tx.update(grads, state, params)
        oupdates, ostate = otx.update(jgrads, ostate, jparams)
        for n in params:
            np.testing.assert_allclose(
                np.asarray(oupdates[n]), updates[n].numpy(), rtol=RTOL, atol=ATOL, err_msg=f"step {k} {n}"
            )
        params, jparams = optim.apply_updates(params, updates), optax.apply_updates(jparams, oupdates)


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_the_description_exports_to_optax_computing_our_updates(name, x64):
    tx = EXPORTED[name]()
    _trajectories(tx, interop.optax_optimizer(tx))


def test_lion_is_optax_lion(x64):
    _trajectories(optim.lion(3e-3, weight_decay=0.05), optax.lion(3e-3, weight_decay=0.05))
    _trajectories(optim.lion(1e-3, b1=0.95, b2=0.98), optax.lion(1e-3, b1=0.95, b2=0.98))


def test_adam_eps_root_is_optax_adam(x64):
    _trajectories(optim.adam(1e-2, eps_root=1e-8), optax.adam(1e-2, eps_root=1e-8))
    ours = optim.adamw(1e-2, eps_root=1e-3, weight_decay=0.1)
    _trajectories(ours, optax.adamw(1e-2, eps_root=1e-3, weight_decay=0.1))


def test_eps_root_zero_is_todays_adam():
    params, targets = _problem()
    a, b = optim.adam(1e-2), optim.adam(1e-2, eps_root=0.0)
    sa, sb = a.init(params), b.init(params)
    for target in targets[:3]:
        grads = {n: params[n] - target[n] for n in params}
        ua, sa = a.update(grads, sa, params)
        ub, sb = b.update(grads, sb, params)
        assert all(torch.equal(ua[n], ub[n]) for n in params)
    with pytest.raises(ValueError, match="eps_root must be >= 0"):
        optim.scale_by_adam(eps_root=-1.0)


def test_what_has_no_description_is_refused_in_one_line():
    own = optim.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))
    for tx, words in (
        (own, "without a description"),
        (optim.chain(optim.adam(), own), "without a description"),
        (optim.scale_by_schedule(schedules.cosine(1.0, 10)), "schedule cosine"),
        (optim.chain(optim.add_noise(0.1, 0.5), optim.sgd(0.1)), "keyed generator"),
        (optim.MultiSteps(optim.sgd(0.1), 2), "'MultiSteps'"),
    ):
        with pytest.raises(ValueError, match=words) as e:
            interop.optax_optimizer(tx)
        assert "\n" not in str(e.value)


def test_every_schedule_is_described():
    made = [
        schedules.constant(0.1), schedules.step_lr(0.1, 3), schedules.cosine(0.1, 10),
        schedules.onecycle(0.1, 10),
        schedules.linear_warmup(0.1, 3), schedules.warmup_cosine(0.1, 2, 10),
        schedules.piecewise_linear([(0, 1.0), (5, 0.0)]), schedules.triangle(10, 3),
    ]  # fmt: skip
    names = {s.description.name for s in made}  # type: ignore[attr-defined]
    assert names == set(schedules.__all__) - {"Schedule", "triangle"}  # triangle is a piecewise_linear
    for s in made:  # the description's arguments rebuild an equal schedule
        d = s.description  # type: ignore[attr-defined]
        again = getattr(schedules, d.name)(**d.hyperparams)
        assert again.description == d and [again(t) for t in range(10)] == [s(t) for t in range(10)]


def test_the_export_reads_no_code():
    """interop.optax_io imports no `inspect` and reads no `__qualname__` or closure."""
    source = Path(interop.optax_io.__file__).read_text()
    imported = {
        alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }  # fmt: skip
    assert "inspect" not in imported
    assert "__qualname__" not in source and "getclosurevars" not in source and "__closure__" not in source
