"""optim's optax-style wrappers (masked, multi_transform, set_to_zero, MultiSteps, add_noise,
adamw(mask=)) against optax itself, in float64; through make_train_step (eager, compile="update",
compile=True) and through a checkpoint round trip; their hyperparameters by name."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import fashion_func as ff
from fashion_func import checkpoint, nn, optim, step, tree
from fashion_func import state as state_lib
from fashion_func.nn import normal

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")


# JAX in 64-bit mode for each test here (conftest's x64): other files in the same worker run
# float32 JAX and may switch it off between this file's tests
pytestmark = pytest.mark.usefixtures("x64")


STEPS = 20
TOL = {"rtol": 1e-10, "atol": 1e-12}
SHAPES = {"w1": (5, 4), "b1": (5,), "w2": (3, 5), "b2": (3,)}
MATRICES = {"w1": True, "b1": False, "w2": True, "b2": False}  # decay the matrices only
LABELS = {"w1": "body", "b1": "body", "w2": "head", "b2": "frozen"}


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _grads(seed: int = 1, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(steps)
    ]


def _ours(tx: optim.GradientTransformation, params, grads) -> list[dict[str, torch.Tensor]]:
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optim.apply_updates(params, updates)
        out.append(params)
    return out


def _theirs(tx, params, grads) -> list[dict[str, np.ndarray]]:
    params = {k: jnp.asarray(v.numpy()) for k, v in params.items()}
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v.numpy()) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out


def _assert_same_trajectory(ours, theirs) -> None:
    assert len(ours) == len(theirs) == STEPS
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for k in a:
            assert a[k].dtype == torch.float64
            np.testing.assert_allclose(a[k].numpy(), b[k], **TOL, err_msg=f"step {t}, {k}")


def _matrices(p):
    return {k: v.ndim > 1 for k, v in p.items()}


CASES = {
    "masked_adamw": (
        lambda: optim.masked(optim.adamw(1e-2, weight_decay=0.1), MATRICES),
        lambda: optax.masked(optax.adamw(1e-2, weight_decay=0.1), MATRICES),
    ),
    "masked_fn_sgd": (
        lambda: optim.masked(optim.sgd(0.05, momentum=0.9), _matrices),
        lambda: optax.masked(optax.sgd(0.05, momentum=0.9), _matrices),
    ),
    "multi_transform": (
        lambda: optim.multi_transform(
            {"body": optim.adam(1e-2), "head": optim.sgd(0.1, momentum=0.5), "frozen": optim.set_to_zero()},
            LABELS,
        ),
        lambda: optax.multi_transform(
            {"body": optax.adam(1e-2), "head": optax.sgd(0.1, momentum=0.5), "frozen": optax.set_to_zero()},
            LABELS,
        ),
    ),
    "multi_transform_fn": (
        lambda: optim.multi_transform(
            {"w": optim.adamw(3e-3, weight_decay=0.2), "b": optim.sgd(0.1)},
            lambda p: {k: "w" if v.ndim > 1 else "b" for k, v in p.items()},
        ),
        lambda: optax.multi_transform(
            {"w": optax.adamw(3e-3, weight_decay=0.2), "b": optax.sgd(0.1)},
            lambda p: {k: "w" if v.ndim > 1 else "b" for k, v in p.items()},
        ),
    ),
    "set_to_zero_after_adam": (
        lambda: optim.chain(
            optim.adamw(1e-2, weight_decay=0.1), optim.masked(optim.set_to_zero(), {**MATRICES, "w1": False})
        ),
        lambda: optax.chain(
            optax.adamw(1e-2, weight_decay=0.1), optax.masked(optax.set_to_zero(), {**MATRICES, "w1": False})
        ),
    ),
    "multi_steps_mean": (
        lambda: optim.MultiSteps(optim.adam(1e-2), 3),
        lambda: optax.MultiSteps(
            optax.adam(1e-2), 3, accumulator_dtype=jnp.float64
        ).gradient_transformation(),
    ),
    "multi_steps_sum": (
        lambda: optim.MultiSteps(optim.sgd(0.02, momentum=0.9), 4, use_grad_mean=False),
        lambda: optax.MultiSteps(
            optax.sgd(0.02, momentum=0.9), 4, use_grad_mean=False, accumulator_dtype=jnp.float64
        ).gradient_transformation(),
    ),
    "adamw_mask_dict": (
        lambda: optim.adamw(1e-2, weight_decay=0.3, mask=MATRICES),
        lambda: optax.adamw(1e-2, weight_decay=0.3, mask=MATRICES),
    ),
    "adamw_mask_fn": (
        lambda: optim.adamw(1e-2, weight_decay=0.3, mask=_matrices),
        lambda: optax.adamw(1e-2, weight_decay=0.3, mask=_matrices),
    ),
}


@pytest.mark.cross_path
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_equals_optax(case: str) -> None:
    ours, theirs = CASES[case]
    params, grads = _params(), _grads()
    a, b = _ours(ours(), params, grads), _theirs(theirs(), params, grads)
    _assert_same_trajectory(a, b)
    assert not torch.allclose(a[-1]["w1"], params["w1"], atol=1e-3) or case == "set_to_zero_after_adam"


@pytest.mark.cross_path
def test_nested_params_and_a_prefix_mask_equal_optax() -> None:
    flat = _params()
    nested = {"enc": {"w": flat["w1"], "b": flat["b1"]}, "head": {"w": flat["w2"], "b": flat["b2"]}}
    mask = {"enc": False, "head": {"w": True, "b": False}}
    ours_tx = optim.masked(optim.adamw(1e-2, weight_decay=0.1), mask)
    theirs_tx = optax.masked(optax.adamw(1e-2, weight_decay=0.1), mask)
    state, params = ours_tx.init(nested), nested
    jparams = jax.tree.map(lambda v: jnp.asarray(v.numpy()), nested)
    jstate = theirs_tx.init(jparams)
    for g in _grads(steps=5):
        g_nested = {"enc": {"w": g["w1"], "b": g["b1"]}, "head": {"w": g["w2"], "b": g["b2"]}}
        updates, state = ours_tx.update(g_nested, state, params)
        params = optim.apply_updates(params, updates)
        jupdates, jstate = theirs_tx.update(
            jax.tree.map(lambda v: jnp.asarray(v.numpy()), g_nested), jstate, jparams
        )
        jparams = optax.apply_updates(jparams, jupdates)
    for path, leaf in tree.flatten_with_paths(params).items():
        part, name = path.split("/")
        np.testing.assert_allclose(leaf.numpy(), np.asarray(jparams[part][name]), **TOL)
    # the inner adamw keeps moments of the masked parameter only
    assert set(tree.flatten_with_paths(state.inner_state[0].mu)) == {"head/w"}


# --------------------------------------------------------------------------- freezing


def test_frozen_parameters_stay_bitwise_unchanged_under_adam_weight_decay() -> None:
    params, grads = _params(), _grads(steps=8)
    frozen = {"w1": True, "b1": True, "w2": False, "b2": False}
    with_group = optim.multi_transform(
        {"train": optim.adam(1e-2, weight_decay=0.1), "frozen": optim.set_to_zero()},
        {k: "frozen" if f else "train" for k, f in frozen.items()},
    )
    with_mask = optim.chain(optim.adam(1e-2, weight_decay=0.1), optim.masked(optim.set_to_zero(), frozen))
    for tx in (with_group, with_mask):
        last = _ours(tx, params, grads)[-1]
        assert torch.equal(last["w1"], params["w1"]) and torch.equal(last["b1"], params["b1"])
        assert not torch.allclose(last["w2"], params["w2"], atol=1e-3)
    # the trap the wrappers avoid: zeroed gradients still move a parameter through weight decay
    zeroed = [{k: torch.zeros_like(v) if frozen[k] else v for k, v in g.items()} for g in grads]
    moved = _ours(optim.adam(1e-2, weight_decay=0.1), params, zeroed)[-1]
    assert not torch.equal(moved["w1"], params["w1"])


# --------------------------------------------------------------------------- add_noise


def _std(eta: float, gamma: float, count: int) -> float:
    return math.sqrt(eta / (1 + count) ** gamma)  # optax's add_noise schedule


@pytest.mark.cross_path
def test_add_noise_is_the_gradient_plus_std_times_its_keyed_normal_draws() -> None:
    eta, gamma, seed = 0.3, 0.55, 7
    tx = optim.add_noise(eta, gamma, seed)
    state, grads = tx.init(_params()), _grads(steps=6)
    for count, g in enumerate(grads):
        assert int(state.count) == count
        noised, state = tx.update(g, state)
        step_key = nn.fold_in(torch.tensor(seed), count)
        for i, (k, v) in enumerate(g.items()):
            expect = v + _std(eta, gamma, count) * normal(nn.fold_in(step_key, i), v.shape, dtype=v.dtype)
            torch.testing.assert_close(noised[k], expect, rtol=1e-15, atol=1e-15)


@pytest.mark.cross_path
@pytest.mark.parametrize("count", [0, 3, 40])
def test_add_noise_variance_schedule_equals_optax(count: int) -> None:
    eta, gamma, n = 0.5, 0.55, 200_000
    zeros = {"x": torch.zeros(n, dtype=torch.float64)}
    ours_tx, theirs_tx = optim.add_noise(eta, gamma, 1), optax.add_noise(eta, gamma, key=1)
    state = ours_tx.init(zeros)._replace(count=torch.tensor(count))
    ours = ours_tx.update(zeros, state)[0]["x"].numpy()
    jstate = theirs_tx.init({"x": jnp.zeros(n)})._replace(count=jnp.asarray(count, dtype=jnp.int32))
    theirs = np.asarray(theirs_tx.update({"x": jnp.zeros(n)}, jstate)[0]["x"])
    expect = _std(eta, gamma, count) ** 2
    # the sample variance of n normal draws has a relative standard error of sqrt(2 / n) = 0.3%
    assert ours.var() == pytest.approx(expect, rel=0.015)
    assert theirs.var() == pytest.approx(expect, rel=0.015)


def test_add_noise_draws_are_standard_normal_and_independent() -> None:
    n = 100_000
    zeros = {"a": torch.zeros(n, dtype=torch.float64), "b": torch.zeros(n, dtype=torch.float64)}
    tx = optim.add_noise(1.0, 0.0, 3)  # std 1 at every step
    first, state = tx.update(zeros, tx.init(zeros))
    second, _ = tx.update(zeros, state)
    a = first["a"].numpy()
    assert abs(a.mean()) < 5 / math.sqrt(n)
    assert a.var() == pytest.approx(1.0, rel=0.02)
    assert stats.kstest(a, "norm").pvalue > 1e-4
    assert stats.kstest(first["b"].numpy().astype(np.float32), "norm").pvalue > 1e-4
    for other in (first["b"], second["a"]):  # another leaf, the next step: uncorrelated
        assert abs(np.corrcoef(a, other.numpy())[0, 1]) < 5 / math.sqrt(n)


def test_add_noise_is_deterministic_and_seeded() -> None:
    params, grads = _params(), _grads(steps=4)
    a = _ours(optim.add_noise(0.1, 0.55, 0), params, grads)
    b = _ours(optim.add_noise(0.1, 0.55, 0), params, grads)
    c = _ours(optim.add_noise(0.1, 0.55, 1), params, grads)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert not torch.equal(a[-1]["w1"], c[-1]["w1"])


@pytest.mark.cross_path
def test_add_noise_members_of_a_stacked_state_draw_from_their_own_keys() -> None:
    params, g = _params(), _grads(steps=1)[0]
    tx = optim.add_noise(0.2, 0.55, 0)
    solo = [tx.update(g, optim.set_noise_key(tx.init(params), key))[0] for key in (11, 12)]
    stacked = optim.set_noise_key(
        tree.map(lambda t: torch.stack([t, t]), tx.init(params)), torch.tensor([11, 12])
    )
    batched, _ = torch.func.vmap(tx.update, in_dims=(None, 0))(g, stacked)
    for k in g:  # vmapped vs solo: log1p and cos may take another (vector/scalar) kernel, a few float64 ulps
        torch.testing.assert_close(batched[k][0], solo[0][k], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(batched[k][1], solo[1][k], rtol=1e-14, atol=1e-14)
    assert not torch.equal(solo[0]["w1"], solo[1]["w1"])


# --------------------------------------------------------------------------- through make_train_step


def mlp(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A dict MLP `[B, 4] -> [B, 3]`."""
    return torch.tanh(x @ params["w1"].T + params["b1"]) @ params["w2"].T + params["b2"]


def _everything() -> optim.GradientTransformation:
    """Every new transform in one optimizer: noise, groups (one frozen), a masked decay, accumulation."""
    groups = optim.multi_transform(
        {
            "body": optim.adamw(1e-2, weight_decay=0.1, mask=_matrices),
            "head": optim.chain(optim.add_noise(0.01, 0.55, 5), optim.sgd(0.1, momentum=0.9)),
            "frozen": optim.set_to_zero(),
        },
        LABELS,
    )
    return optim.MultiSteps(optim.chain(groups, optim.masked(optim.trace(0.5), {**MATRICES, "b1": True})), 2)


def _batches(n: int, size: int = 8, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def _train(tx, batches, compile, st=None):
    st = st if st is not None else state_lib.create(_params(), tx)
    train_step = step.make_train_step(mlp, tx, preprocess=None, compile=compile)
    for batch in batches:
        st, _ = train_step(st, batch)
    return st


@pytest.mark.cross_path
@pytest.mark.parametrize("compile", ["update", True])
def test_every_new_transform_through_a_compiled_train_step(compile) -> None:
    tx, batches = _everything(), _batches(6)
    eager, compiled = _train(tx, batches, False), _train(tx, batches, compile)
    for k in SHAPES:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-12, atol=1e-14)
    for a, b in zip(tree.leaves(compiled.opt_state), tree.leaves(eager.opt_state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(compiled.params["b2"], _params()["b2"])  # the frozen group
    assert not torch.allclose(compiled.params["w2"], _params()["w2"], atol=1e-3)
    assert int(compiled.opt_state.gradient_step) == 3


@pytest.mark.cross_path
@pytest.mark.parametrize("k", [2, 4])
def test_k_accumulated_micro_batches_make_the_update_of_one_k_times_larger_batch(k: int) -> None:
    micro = _batches(2 * k, size=6)
    big = [
        (torch.cat([x for x, _ in micro[i : i + k]]), torch.cat([y for _, y in micro[i : i + k]]))
        for i in (0, k)
    ]
    accumulated = _train(optim.MultiSteps(optim.adamw(1e-2, weight_decay=0.1), k), micro, False)
    one_batch = _train(optim.adamw(1e-2, weight_decay=0.1), big, False)
    for name in SHAPES:
        torch.testing.assert_close(accumulated.params[name], one_batch.params[name], rtol=1e-12, atol=1e-14)
    # between updates the parameters do not move
    half = _train(optim.MultiSteps(optim.adamw(1e-2, weight_decay=0.1), k), micro[: k + 1], False)
    torch.testing.assert_close(
        half.params["w1"], _train(optim.adamw(1e-2, weight_decay=0.1), big[:1], False).params["w1"]
    )


def test_checkpoint_round_trip_of_the_new_states_resumes_bitwise(tmp_path: Path) -> None:
    tx, batches = _everything(), _batches(7)
    straight = _train(tx, batches, False)
    half = _train(tx, batches[:3], False)  # mid-accumulation: mini_step 1, acc_grads non-zero
    assert int(half.opt_state.mini_step) == 1
    checkpoint.save_state(tmp_path / "last.safetensors", half)
    template = state_lib.create(_params(), tx)
    keys = set(checkpoint.inspect(tmp_path / "last.safetensors").tensors)
    assert "opt_state/acc_grads/w1" in keys and "opt_state/mini_step" in keys
    assert any("inner_states/head" in key and key.endswith("/key") for key in keys)  # the noise key
    assert any("inner_states/body/1/inner_state/weight_decay" in key for key in keys)  # adamw's mask
    loaded, _ = checkpoint.load_state(tmp_path / "last.safetensors", template)
    for a, b in zip(tree.leaves(loaded), tree.leaves(half), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    resumed = _train(tx, batches[3:], False, st=loaded)
    for a, b in zip(tree.leaves(resumed), tree.leaves(straight), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- hyperparameters by name


@pytest.mark.cross_path
def test_two_learning_rates_under_multi_transform_answer_to_label_slash_name() -> None:
    tx = optim.MultiSteps(
        optim.multi_transform(
            {"body": optim.adam(1e-3), "head": optim.sgd(0.1, momentum=0.9)}, LABELS | {"b2": "head"}
        ),
        2,
    )
    st = tx.init(_params())
    found = optim.hyperparams(st)
    assert {"lr", "body/lr", "head/lr", "head/momentum", "momentum"} <= set(found)
    assert found["body/lr"].item() == pytest.approx(1e-3) and found["head/lr"].item() == pytest.approx(0.1)
    only_head = optim.set_hyperparam(st, "head/lr", 0.5)
    assert optim.get_hyperparam(only_head, "head/lr").item() == 0.5
    assert optim.get_hyperparam(only_head, "body/lr").item() == pytest.approx(1e-3)
    both = optim.set_hyperparam(st, "lr", 0.25)  # a bare name sets every group's
    assert (
        optim.get_hyperparam(both, "head/lr").item() == optim.get_hyperparam(both, "body/lr").item() == 0.25
    )
    assert optim.get_hyperparam(st, "head/lr").item() == pytest.approx(0.1)  # the old state is untouched
    with pytest.raises(KeyError, match="'tail/lr'"):
        optim.set_hyperparam(st, "tail/lr", 1.0)
    # the new value reaches the update: a head step at lr 0.5 is five times one at 0.1
    g = _grads(steps=2)
    u_slow, u_fast = (
        tx.update(g[1], tx.update(g[0], s, _params())[1], _params())[0] for s in (st, only_head)
    )
    torch.testing.assert_close(u_fast["w2"], 5 * u_slow["w2"], rtol=1e-12, atol=0)
    torch.testing.assert_close(u_fast["w1"], u_slow["w1"], rtol=0, atol=0)


def test_hyperparams_inside_masked_and_adamw_mask() -> None:
    st = optim.adamw(1e-3, weight_decay=0.1, mask=MATRICES).init(_params())
    assert optim.get_hyperparam(st, "weight_decay").item() == pytest.approx(0.1)
    assert optim.get_hyperparam(optim.set_hyperparam(st, "weight_decay", 0.0), "weight_decay").item() == 0.0


# --------------------------------------------------------------------------- mistakes


def test_mistakes_are_one_line_errors() -> None:
    params = _params()
    with pytest.raises(ValueError, match=r"do not match the params: missing \['w2'\]"):
        optim.masked(optim.sgd(0.1), {"w1": True, "b1": True, "b2": True}).init(params)
    with pytest.raises(TypeError, match="Python bools"):
        optim.masked(optim.sgd(0.1), {k: 1 for k in params}).init(params)
    with pytest.raises(ValueError, match=r"labelled \['frozen'\] have no transform"):
        optim.multi_transform({"body": optim.sgd(0.1), "head": optim.sgd(0.1)}, LABELS).init(params)
    with pytest.raises(ValueError, match="without '/'"):
        optim.multi_transform({"a/b": optim.sgd(0.1)}, {k: "a/b" for k in params})
    with pytest.raises(ValueError, match="every_k must be an int >= 1"):
        optim.MultiSteps(optim.sgd(0.1), 0)
    with pytest.raises(ValueError, match="eta"):
        optim.add_noise(-1.0, 0.55)


def test_the_package_reexports_its_rooms() -> None:
    assert ff.optim.MultiSteps is optim.wrappers.MultiSteps and ff.optim.masked is optim.wrappers.masked
    assert optim.adamw is optim.alias.adamw and optim.chain is optim.base.chain
    assert optim.set_hyperparam is optim.hyper.set_hyperparam and optim.ema is optim.transforms.ema
    assert not hasattr(optim, "EmptyState")
