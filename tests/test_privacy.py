"""DP-SGD (`privacy.clip_and_noise`, `make_train_step(per_example=)`) against the real clients:
the updates equal Opacus's `make_private` step, the noise has the stated scale and is
independent across steps and members, clipping holds (hypothesis, against a float64 loop),
epsilon equals Opacus's accountants and agrees with Google's dp_accounting, masked examples
contribute nothing, a resumed run is bitwise the same, the compile modes agree, misuse is a
one-line error, and an ensemble's members are their solo runs."""

from __future__ import annotations

import math
import warnings

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from reference import assert_tree_close, assert_tree_equal

from fashion_func import checkpoint, ensemble, interop, models, nn, optim, privacy, step
from fashion_func import state as state_lib

B = 16  # examples per batch in the parity tests
STEPS = 10


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float NCHW inputs (what both our `preprocess=None` step and the module take), labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _dpcnn(groups: int = 0, seed: int = 3):
    model = models.get("dpcnn", groups=groups)
    return model, model.init(torch.Generator().manual_seed(seed))


def _median_norm(model, params, x, y) -> float:
    """The median per-example gradient norm at `params`: a clipping bound that clips about half.
    Rounded to float32, as the step holds it (Opacus takes the Python float)."""
    grads = step.per_example_grads(model, params, (x, y), preprocess=None)
    return float(step.per_example_grad_norms(grads).median().float())


def _opacus_run(params, groups, make_opt, x, y, max_norm, *, masks=None, expected=None):
    """The module's params after Opacus's DP-SGD (noise 0) on the batches of `B` of (x, y) in
    order; with `masks`, each step sees only the kept examples and divides by `expected`."""
    module = interop.DPCNN(groups=groups)
    module.load_state_dict(params)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B, shuffle=False)
    with warnings.catch_warnings():
        # Opacus's advice (its secure RNG is for production noise; here the noise is 0), and
        # its hooks firing on the module's output when the input needs no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        dp_module, dp_opt, loader = PrivacyEngine().make_private(
            module=module, optimizer=make_opt(module.parameters()), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=max_norm, poisson_sampling=False,
        )  # fmt: skip
        if expected is not None:
            dp_opt.expected_batch_size = expected
        for i, (xb, yb) in enumerate(loader):
            if masks is not None:
                xb, yb = xb[masks[i]], yb[masks[i]]
            dp_opt.zero_grad()
            F.cross_entropy(dp_module(xb), yb).backward()
            dp_opt.step()
    return {k.removeprefix("_module."): v.detach() for k, v in dp_module.state_dict().items()}


def _our_run(model, params, tx, x, y, dp, *, compile=False, masks=None):
    """(final state, [metrics]) of our per-example step on the same batches."""
    train_step = step.make_train_step(model, tx, preprocess=None, compile=compile, per_example=dp)
    st_, history = state_lib.create(params, tx, seed=0), []
    for i in range(len(y) // B):
        batch = (x[i * B : (i + 1) * B], y[i * B : (i + 1) * B])
        st_, m = train_step(st_, batch if masks is None else (*batch, masks[i]))
        history.append(m)
    return st_, history


# -- 1. parity with Opacus (noise 0) -----------------------------------------------------------


@pytest.mark.cross_path
@pytest.mark.parametrize(
    "groups, compile", [(0, False), (4, False), (0, "update")]
)  # update mode compiles the noise and the update alone: the group norm stays in the eager stage
def test_sgd_updates_equal_opacus(groups, compile):
    model, params = _dpcnn(groups)
    x, y = _images(B * STEPS, seed=1)
    c = _median_norm(model, params, x[:B], y[:B])
    # lr 0.1: at 0.5 the group-norm model's loss climbs and runs 1e-8 apart after a step are
    # 7e-6 apart after ten (float64 likewise)
    ours, history = _our_run(
        model, params, optim.sgd(0.1), x, y, privacy.clip_and_noise(c, 0.0), compile=compile
    )
    theirs = _opacus_run(params, groups, lambda p: torch.optim.SGD(p, lr=0.1), x, y, c)
    clipped = sum(int(m["clipped_sum"]) for m in history)
    assert 0 < clipped < B * STEPS  # the bound clips some examples and leaves others
    assert all(int(m["count"]) == B for m in history)
    # measured: 3e-8
    assert_tree_close(ours.params, theirs, rtol=0, atol=1e-6)
    moved = max(float((ours.params[k] - params[k]).abs().max()) for k in params)
    assert moved > 1e-3  # the parity is not that of two runs that did nothing


@pytest.mark.cross_path
@pytest.mark.parametrize(
    "ours_tx, torch_opt",
    [
        (optim.sgd(0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        (optim.adam(1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
    ],
    ids=["momentum", "adam"],
)
def test_stateful_optimizer_is_applied_after_the_clipped_mean(ours_tx, torch_opt):
    model, params = _dpcnn()
    x, y = _images(B * STEPS, seed=2)
    c = _median_norm(model, params, x[:B], y[:B])
    ours, history = _our_run(model, params, ours_tx, x, y, privacy.clip_and_noise(c, 0.0))
    theirs = _opacus_run(params, 0, torch_opt, x, y, c)
    assert sum(int(m["clipped_sum"]) for m in history) > 0
    assert_tree_close(ours.params, theirs, rtol=0, atol=1e-6)


@pytest.mark.cross_path
def test_masked_batches_equal_opacus_on_the_kept_examples_over_the_expected_size():
    model, params = _dpcnn()
    x, y = _images(B * STEPS, seed=4)
    g = torch.Generator().manual_seed(5)
    masks = [torch.rand(B, generator=g) < 0.6 for _ in range(STEPS)]
    for m in masks:
        m[0] = True  # Opacus takes no empty batch
    expected = 12.0  # Poisson sampling's q * N, not the batch's size nor its kept count
    c = _median_norm(model, params, x[:B], y[:B])
    dp = privacy.clip_and_noise(c, 0.0, expected_batch_size=expected)
    ours, history = _our_run(model, params, optim.sgd(0.5), x, y, dp, masks=masks)
    theirs = _opacus_run(
        params, 0, lambda p: torch.optim.SGD(p, lr=0.5), x, y, c, masks=masks, expected=expected
    )
    assert [int(m["count"]) for m in history] == [int(m.sum()) for m in masks]
    assert sum(int(m["clipped_sum"]) for m in history) > 0
    assert_tree_close(ours.params, theirs, rtol=0, atol=1e-6)


# -- 2. the noise --------------------------------------------------------------------------------

N_NOISE = 120_000
# the sample correlation of n independent pairs is about N(0, 1/n): 5 standard errors
R_BOUND = 5 / math.sqrt(N_NOISE)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _assert_gaussian(noise: torch.Tensor, std: float) -> None:
    z = noise.double().reshape(-1)
    n = z.numel()
    assert n >= 100_000
    assert abs(float(z.std()) / std - 1) < 0.02
    assert abs(float(z.mean())) < 5 * std / math.sqrt(n)  # 5 standard errors of the mean
    # a normal, not just any distribution of that scale: 68.27% within one sigma (SE 0.13%)
    assert abs(float((z.abs() < std).double().mean()) - 0.6827) < 0.01


@pytest.mark.cross_path
def test_add_noise_on_a_zero_sum_has_the_stated_scale_and_is_a_function_of_the_key():
    zeros = {"a": torch.zeros(300, 200), "b": torch.zeros(N_NOISE - 60_000)}
    c, sigma, size = 0.7, 1.3, 32.0
    key = nn.fold_in(torch.tensor(7), 3)
    out = privacy.add_noise(zeros, key, c, sigma, size)
    flat = torch.cat([out["a"].reshape(-1), out["b"]])
    _assert_gaussian(flat, sigma * c / size)
    # the documented draw: one nn.normal over all leaves, in their order
    torch.testing.assert_close(flat, nn.normal(key, (N_NOISE,)) * (sigma * c) / size, rtol=1e-6, atol=0)
    assert_tree_equal(privacy.add_noise(zeros, key, c, sigma, size), out)  # pure
    other = privacy.add_noise(zeros, nn.fold_in(key, 1), c, sigma, size)
    assert abs(_corr(flat, torch.cat([other["a"].reshape(-1), other["b"]]))) < R_BOUND
    # and a clipped sum of zero gradients is zero, so the whole stage is the noise
    total, clipped = privacy.clipped_sum({k: v[None].expand(4, *v.shape) for k, v in zeros.items()}, c)
    assert int(clipped) == 0 and all(not t.any() for t in total.values())


def _linear_with_idle(p, x):
    """A linear model with a parameter `idle` the loss does not depend on: its gradient is 0, so
    what a step does to it (SGD, lr 1) is minus the noise."""
    return x.flatten(1) @ p["w"] + p["b"] + 0.0 * p["idle"].sum()


def _idle_params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(8, 10, generator=g) * 0.1, "b": torch.zeros(10), "idle": torch.zeros(N_NOISE)}


@pytest.mark.cross_path
def test_step_noise_has_the_stated_scale_and_is_independent_across_steps():
    c, sigma, size = 0.5, 1.1, 8.0
    tx = optim.sgd(1.0)
    train_step = step.make_train_step(
        _linear_with_idle, tx, preprocess=None, compile=False, per_example=privacy.clip_and_noise(c, sigma)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    st_ = state_lib.create(_idle_params(), tx, seed=5)
    noises = []
    for _ in range(3):
        before = st_.params["idle"]
        st_, _ = train_step(st_, (x, y))
        noises.append(before - st_.params["idle"])
    for z in noises:
        _assert_gaussian(z, sigma * c / size)
    assert abs(_corr(noises[0], noises[1])) < R_BOUND and abs(_corr(noises[1], noises[2])) < R_BOUND
    # drawn from fold_in(fold_in(rng, step), NOISE_SALT), as the step's docstring says
    key = nn.fold_in(nn.fold_in(torch.tensor(5), 1), privacy.NOISE_SALT)
    w_b = 8 * 10 + 10  # the leaves before `idle`, in the params' order
    expected = nn.normal(key, (w_b + N_NOISE,))[w_b:] * (sigma * c) / size
    torch.testing.assert_close(noises[1], expected, rtol=1e-5, atol=1e-7)


def test_ensemble_members_draw_independent_noise_and_a_sweep_the_same_standardized_noise():
    tx = optim.sgd(1.0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)

    def idle_moves(seeds, sigmas):
        dp = privacy.clip_and_noise(0.5, sigmas)
        ens_step = ensemble.make_train_step(
            _linear_with_idle, tx, preprocess=None, compile=False, per_example=dp
        )
        ens = ensemble.stack([state_lib.create(_idle_params(), tx, seed=s) for s in seeds])
        out, _ = ens_step(ens, (x, y))
        return ens.params["idle"] - out.params["idle"]  # [K, N]

    members = idle_moves((0, 1), 1.0)  # an ensemble: each member its own rng
    for z in members:
        _assert_gaussian(z, 1.0 * 0.5 / 8)
    assert abs(_corr(members[0], members[1])) < R_BOUND
    # a sweep (ensemble.init(same_init=True)): one rng, so the same standardized noise, each
    # member at its own scale (documented in ensemble.make_train_step)
    sweep = idle_moves((0, 0), (1.0, 2.0))
    assert torch.equal(sweep[1], 2 * sweep[0])
    assert torch.equal(sweep[0], members[0])


@pytest.mark.cross_path
def test_an_ensembles_private_step_with_the_update_compiled_equals_eager():
    """compile="update" (the CPU's default) compiles the noise's draw with the update, inside the
    ensemble's vmap: the same members' steps as eager, to float32 rounding."""
    tx = optim.sgd(1.0, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    mask = torch.rand(8, generator=g) < 0.7
    dp = privacy.clip_and_noise(0.5, (1.0, 2.0), expected_batch_size=6.0)
    start = ensemble.stack([state_lib.create(_idle_params(), tx, seed=s) for s in (0, 1)])
    ends = {}
    for mode in (False, "update"):
        ens_step = ensemble.make_train_step(
            _linear_with_idle, tx, preprocess=None, compile=mode, per_example=dp
        )
        st, m = start, None
        for _ in range(2):
            st, m = ens_step(st, (x, y, mask))
        ends[mode] = (st, m)
    assert_tree_close(ends["update"][0].params, ends[False][0].params, rtol=1e-5, atol=1e-6)
    assert int(ends["update"][1]["count"].sum()) == int(ends[False][1]["count"].sum()) == 2 * int(mask.sum())


# -- 3. clipping -----------------------------------------------------------------------------------


@pytest.mark.cross_path
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 9),
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=3),
    max_norm=st.floats(1e-3, 1e3),
    log_scale=st.floats(-4, 4),
    use_mask=st.booleans(),
)
def test_clipping_property(seed, batch, shapes, max_norm, log_scale, use_mask):
    g = torch.Generator().manual_seed(seed)
    # each example at its own scale around max_norm: some clipped, some not
    scales = max_norm * 10 ** (log_scale + torch.randn(batch, generator=g, dtype=torch.float64))
    grads64 = {
        f"p{i}": torch.randn(batch, *shape, generator=g, dtype=torch.float64)
        * scales.reshape(-1, *[1] * len(shape))
        / math.sqrt(math.prod(shape) * len(shapes))
        for i, shape in enumerate(shapes)
    }
    grads = {k: v.float() for k, v in grads64.items()}
    mask = torch.rand(batch, generator=g) < 0.7 if use_mask else None

    total, clipped = privacy.clipped_sum(grads, max_norm, mask)

    # a plain loop in float64, with Opacus's formula
    expected = {k: torch.zeros(v.shape[1:], dtype=torch.float64) for k, v in grads.items()}
    over = 0
    for i in range(batch):
        if mask is not None and not mask[i]:
            continue
        g_i = {k: v[i].double() for k, v in grads.items()}
        norm = math.sqrt(sum(float((t**2).sum()) for t in g_i.values()))
        factor = min(1.0, max_norm / (norm + privacy.CLIP_EPS))
        over += norm > max_norm
        for k in expected:
            expected[k] += factor * g_i[k]
        # each example alone: clipped to at most max_norm; one below it comes back unchanged
        alone, _ = privacy.clipped_sum({k: v[i : i + 1] for k, v in grads.items()}, max_norm)
        alone_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in alone.values()))
        assert alone_norm <= max_norm * (1 + 1e-5)
        if norm + privacy.CLIP_EPS <= max_norm * (1 - 1e-6):
            assert_tree_equal(alone, {k: v[i] for k, v in grads.items()})
    assert int(clipped) == over
    for k in expected:
        bound = 1e-5 * max_norm * (batch + 1)  # float32 rounding of a sum of <= B norms
        torch.testing.assert_close(total[k].double(), expected[k], rtol=1e-5, atol=bound)


# -- 4. accounting ---------------------------------------------------------------------------------

ACCOUNTING = [  # (sample rate, noise multiplier, steps, delta)
    (256 / 60000, 1.1, 2340, 1e-5),  # Fashion-MNIST, batch 256, 10 epochs
    (0.01, 0.8, 1000, 1e-5),
    (0.1, 2.0, 100, 1e-6),
    (1.0, 5.0, 10, 1e-5),  # full batches
]


# q = 1 with sigma = 5: the best RDP order is above Opacus's largest (63), which it says; its
# PRV takes log(0) for q = 1 (log(1 - q)), a numpy warning, and still agrees with the PLD
@pytest.mark.cross_path
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("q, sigma, steps, delta", ACCOUNTING)
def test_epsilon_equals_opacus_and_agrees_with_dp_accounting(q, sigma, steps, delta):
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    for name, opacus_cls, google, rtol in [
        # the same RDP bound over (nearly) the same orders: measured 1e-4
        ("rdp", RDPAccountant, dp_accounting.rdp.RdpAccountant(), 1e-3),
        # PRV (Gopi et al.) and the privacy-loss distribution are two numerical estimates of
        # the same optimal epsilon: measured 0.2 to 1.1% apart
        ("prv", PRVAccountant, dp_accounting.pld.PLDAccountant(), 2e-2),
    ]:
        ours = privacy.epsilon(steps, sample_rate=q, noise_multiplier=sigma, delta=delta, accountant=name)
        reference = opacus_cls()
        for _ in range(steps):  # Opacus's own bookkeeping: one step() per step
            reference.step(noise_multiplier=sigma, sample_rate=q)
        assert ours == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-12)
        acc = privacy.Accountant(q, sigma, delta, accountant=name)
        assert acc.epsilon(steps) == ours
        assert ours == pytest.approx(google.compose(event, steps).get_epsilon(delta), rel=rtol)


def test_accountant_per_member_epsilons_and_target():
    q, delta = 0.01, 1e-5
    acc = privacy.Accountant(q, (0.8, 1.6), delta, target_epsilon=2.0)
    eps = acc.epsilon(500)
    assert isinstance(eps, list) and len(eps) == 2 and eps[0] > eps[1]
    assert eps == [privacy.epsilon(500, sample_rate=q, noise_multiplier=s, delta=delta) for s in (0.8, 1.6)]
    assert acc.exceeds(500) == eps[0] and eps[0] > 2.0
    assert acc.exceeds(1) is None
    assert acc.record(500)["epsilon"] == eps
    assert privacy.epsilon(0, sample_rate=q, noise_multiplier=1.0, delta=delta) == 0.0
    assert privacy.epsilon(10, sample_rate=q, noise_multiplier=0.0, delta=delta) == math.inf


@pytest.mark.parametrize("q, sigma, steps, delta", ACCOUNTING[:3])
def test_noise_multiplier_for_a_target_stays_within_it_and_close(q, sigma, steps, delta):
    target = 2.0
    found = privacy.noise_multiplier_for(target, delta=delta, sample_rate=q, steps=steps)
    eps = privacy.epsilon(steps, sample_rate=q, noise_multiplier=found, delta=delta)
    assert target - 0.02 < eps <= target  # Opacus's search stops within 0.01 of the target


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: privacy.epsilon(10, sample_rate=0.0, noise_multiplier=1.0, delta=1e-5), "sample_rate"),
        (lambda: privacy.epsilon(10, sample_rate=1.5, noise_multiplier=1.0, delta=1e-5), "sample_rate"),
        (lambda: privacy.epsilon(10, sample_rate=0.1, noise_multiplier=1.0, delta=0.0), "delta"),
        (lambda: privacy.epsilon(10, sample_rate=0.1, noise_multiplier=1.0, delta=1.0), "delta"),
        (lambda: privacy.epsilon(10, sample_rate=0.1, noise_multiplier=1.0, delta=1e-5, accountant="gdp"),
         "unknown accountant"),
        (lambda: privacy.noise_multiplier_for(0.0, delta=1e-5, sample_rate=0.1, steps=10), "target_epsilon"),
        (lambda: privacy.noise_multiplier_for(1.0, delta=1e-5, sample_rate=0.1, steps=0), "steps"),
        (lambda: privacy.noise_multiplier_for(1.0, delta=2.0, sample_rate=0.1, steps=10), "delta"),
        (lambda: privacy.Accountant(0.1, float("nan"), 1e-5), "noise_multiplier"),
        (lambda: privacy.Accountant(0.1, (), 1e-5), "noise_multiplier"),
        (lambda: privacy.Accountant(0.1, 1.0, 1e-5, target_epsilon=-1.0), "target_epsilon"),
        (lambda: privacy.Accountant(0.1, 1.0, 1e-5, accountant="moments"), "unknown accountant"),
    ],
)  # fmt: skip
def test_bad_accounting_inputs_are_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# -- 5. masked examples contribute nothing -----------------------------------------------------------


@pytest.mark.cross_path
def test_masked_out_examples_contribute_nothing():
    model, params = _dpcnn()
    tx = optim.sgd(0.3, momentum=0.9)
    x, y = _images(12, seed=6)
    mask = torch.tensor([True, False, True, True, False, False, True, True, False, True, True, False])
    c = _median_norm(model, params, x, y)
    start = state_lib.create(params, tx, seed=4)

    def run(batch, sigma):
        dp = privacy.clip_and_noise(c, sigma, expected_batch_size=10.0, chunk_size=5)
        return step.make_train_step(model, tx, preprocess=None, compile=False, per_example=dp)(start, batch)

    masked, m = run((x, y, mask), 0.0)
    kept, mk = run((x[mask], y[mask]), 0.0)
    assert int(m["count"]) == int(mask.sum()) == int(mk["count"]) == 7
    assert int(m["clipped_sum"]) == int(mk["clipped_sum"])
    assert abs(int(m["correct"]) - int(mk["correct"])) <= 1  # masked vs sliced batch: a near tie may flip one
    torch.testing.assert_close(m["loss_sum"], mk["loss_sum"], rtol=1e-6, atol=0)
    assert_tree_close(masked.params, kept.params, rtol=0, atol=1e-7)
    # what the masked-out slots hold changes nothing, bitwise, noise on
    g = torch.Generator().manual_seed(7)
    x2, y2 = x.clone(), y.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 1, 28, 28, generator=g) * 10
    y2[~mask] = (y[~mask] + 3) % 10
    a, ma = run((x, y, mask), 1.0)
    b, mb = run((x2, y2, mask), 1.0)
    assert_tree_equal(a, b)
    assert_tree_equal(ma, mb)


# A dropped row is left out by its clip scale of 0 when it is finite and selected out (a copy)
# when it is not: every kind of row a dropped slot can hold, eager and under vmap (an ensemble).
# "large": finite with a finite norm (no copy); "overflow": finite values whose norm is inf (a copy)
DROPPED_ROWS = {"finite": 3.0, "large": 1e18, "overflow": 3e38, "inf": math.inf, "-inf": -math.inf,
                "nan": math.nan}  # fmt: skip


@pytest.mark.parametrize("under_vmap", [False, True])
@pytest.mark.parametrize("row", sorted(DROPPED_ROWS))
def test_a_dropped_row_of_any_value_adds_nothing(row, under_vmap):
    g = torch.Generator().manual_seed(5)
    grads = {"w": torch.randn(6, 3, 4, generator=g), "b": torch.randn(6, 4, generator=g)}
    mask = torch.tensor([True, False, True, True, False, True])
    poisoned = {k: v.clone() for k, v in grads.items()}
    for v in poisoned.values():
        v[~mask] = DROPPED_ROWS[row]
    zeroed = {k: torch.where(mask.view(-1, *[1] * (v.dim() - 1)), v, 0.0) for k, v in grads.items()}

    def total(gr):
        if under_vmap:  # two members, as ensemble steps vmap the stage
            stacked = {k: torch.stack([v, v]) for k, v in gr.items()}
            return {k: v[1] for k, v in torch.func.vmap(lambda t: privacy.clipped_sum(t, 0.5, mask)[0])(
                stacked).items()}  # fmt: skip
        return privacy.clipped_sum(gr, 0.5, mask)[0]

    assert_tree_equal(total(poisoned), total(zeroed))
    assert all(bool(torch.isfinite(v).all()) for v in total(poisoned).values())


# -- 6. determinism and resume -----------------------------------------------------------------------


def test_noise_is_a_function_of_rng_and_step_so_resume_is_bitwise(tmp_path):
    model, params = _dpcnn(groups=2)
    tx = optim.sgd(0.2, momentum=0.9)
    dp = privacy.clip_and_noise(1.0, 1.2, expected_batch_size=8.0, chunk_size=3)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False, per_example=dp)
    x, y = _images(32, seed=8)
    g = torch.Generator().manual_seed(9)
    batches = [
        (x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8], torch.rand(8, generator=g) < 0.8) for i in range(4)
    ]

    straight = state_lib.create(params, tx, seed=11)
    for batch in batches:
        straight, _ = train_step(straight, batch)

    first = state_lib.create(params, tx, seed=11)
    for batch in batches[:2]:
        first, _ = train_step(first, batch)
    checkpoint.save_state(tmp_path / "s.safetensors", first)
    resumed, _ = checkpoint.load_state(tmp_path / "s.safetensors", state_lib.create(params, tx, seed=0))
    for batch in batches[2:]:
        resumed, _ = train_step(resumed, batch)
    assert int(resumed.step) == 4
    assert_tree_equal(resumed, straight)
    # another seed, other noise
    other = state_lib.create(params, tx, seed=12)
    for batch in batches:
        other, _ = train_step(other, batch)
    assert not torch.equal(other.params["fc2.weight"], straight.params["fc2.weight"])


# -- 7. compile modes (compiling the whole step takes about a minute cold on the CPU) ---------------


@pytest.mark.cross_path
def test_eager_and_compiled_steps_agree():
    model, params = _dpcnn()
    tx = optim.sgd(0.2, momentum=0.9)
    dp = privacy.clip_and_noise(0.5, 1.0, expected_batch_size=8.0)  # one chunk: one trace to compile
    x, y = _images(24, seed=10)
    g = torch.Generator().manual_seed(11)
    batches = [
        (x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8], torch.rand(8, generator=g) < 0.8) for i in range(3)
    ]
    results = {}
    # "update" compiles the noise's draw and the optimizer's update; True, the whole step
    for mode in (False, "update", True):
        train_step = step.make_train_step(model, tx, preprocess=None, compile=mode, per_example=dp)
        s, history = state_lib.create(params, tx, seed=1), []
        for batch in batches:
            s, m = train_step(s, batch)
            history.append(m)
        results[mode] = (s, history)
    eager, eager_history = results[False]
    for mode in ("update", True):
        s, history = results[mode]
        assert_tree_close(s.params, eager.params, rtol=1e-5, atol=1e-5)
        assert_tree_close(s.opt_state, eager.opt_state, rtol=1e-5, atol=1e-5)
        for m, e in zip(history, eager_history, strict=True):
            assert set(m) == set(e)
            for k in ("count", "clipped_sum", "correct"):
                assert int(m[k]) == int(e[k]), (mode, k)
            torch.testing.assert_close(m["loss_sum"], e["loss_sum"], rtol=1e-5, atol=1e-5)


# -- 8. refusals ---------------------------------------------------------------------------------------


def all_reduce_mean(grads):  # named as distributed's averaging all-reduce
    return grads


def _dp_step(**kwargs):
    return step.make_train_step(models.get("dpcnn"), optim.sgd(0.1), preprocess=None, compile=False, **kwargs)


def _call_dp_step(per_example, batch_extra=()):
    _, params = _dpcnn()
    x, y = _images(4, seed=0)
    s = state_lib.create(params, optim.sgd(0.1))
    return _dp_step(per_example=per_example)(s, (x, y, *batch_extra))


def _call_ensemble(per_example, members=2):
    model = models.get("dpcnn")
    tx = optim.sgd(0.1)
    ens = ensemble.init(model, tx, members=members)
    x, y = _images(4, seed=0)
    return ensemble.make_train_step(model, tx, preprocess=None, compile=False, per_example=per_example)(
        ens, (x, y)
    )


def _call_without_per_example_on_a_masked_batch():
    _, params = _dpcnn()
    x, y = _images(4, seed=0)
    return _dp_step()(state_lib.create(params, optim.sgd(0.1)), (x, y, torch.ones(4, dtype=torch.bool)))


DP = privacy.clip_and_noise(1.0, 1.0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: step.make_train_step(models.get("simplenet_bn"), optim.sgd(0.1), per_example=DP),
         ValueError, "batch norm"),
        (lambda: ensemble.make_train_step(models.get("simplenet_bn"), optim.sgd(0.1), per_example=DP),
         ValueError, "batch norm"),
        (_call_without_per_example_on_a_masked_batch, ValueError, "per_example"),
        (lambda: _dp_step(per_example=DP, reduce_grads=all_reduce_mean), ValueError, "all_reduce_sum"),
        (lambda: _dp_step(per_example={"max_norm": 1.0}), TypeError, "clip_and_noise"),
        (lambda: privacy.clip_and_noise(0.0, 1.0), ValueError, "max_norm must be > 0"),
        (lambda: privacy.clip_and_noise(-1.0, 1.0), ValueError, "max_norm must be > 0"),
        (lambda: privacy.clip_and_noise(float("inf"), 1.0), ValueError, "max_norm must be a finite"),
        (lambda: privacy.clip_and_noise("1", 1.0), ValueError, "max_norm must be a finite"),
        (lambda: privacy.clip_and_noise(True, 1.0), ValueError, "max_norm must be a finite"),
        (lambda: privacy.clip_and_noise([], 1.0), ValueError, "max_norm needs at least one"),
        (lambda: privacy.clip_and_noise(1.0, -0.5), ValueError, "noise_multiplier must be >= 0"),
        (lambda: privacy.clip_and_noise(1.0, float("nan")), ValueError, "noise_multiplier must be a finite"),
        (lambda: privacy.clip_and_noise(1.0, 1.0, expected_batch_size=0), ValueError, "expected_batch_size"),
        (lambda: privacy.clip_and_noise(1.0, 1.0, chunk_size=0), ValueError, "chunk_size"),
        # per-member values: one per member, or one for all
        (lambda: _call_dp_step(privacy.clip_and_noise((1.0, 2.0), 1.0)), ValueError,
         "2 values of max_norm for one"),
        (lambda: _call_ensemble(privacy.clip_and_noise((1.0, 2.0, 3.0), 1.0)), ValueError,
         "3 values of max_norm for 2 members"),
        (lambda: _call_ensemble(privacy.clip_and_noise(1.0, (1.0, 2.0, 3.0))), ValueError,
         "3 values of noise_multiplier for 2 members"),
    ],
)  # fmt: skip
def test_refusals_are_one_line_errors(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# -- 9. ensembles --------------------------------------------------------------------------------------


@pytest.mark.cross_path
def test_ensemble_members_equal_their_solo_runs_with_their_own_clip_and_noise():
    model = models.get("dpcnn", groups=2)
    tx = optim.sgd(0.2, momentum=0.9)
    seeds, norms, sigmas = (0, 1, 2), (0.3, 1.0, 50.0), (0.5, 1.0, 0.0)
    x, y = _images(24, seed=12)
    g = torch.Generator().manual_seed(13)
    batches = [
        (x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8], torch.rand(8, generator=g) < 0.8) for i in range(3)
    ]
    solos = [state_lib.create(model.init(torch.Generator().manual_seed(s)), tx, seed=s) for s in seeds]
    ens = ensemble.stack(solos)
    dp = privacy.clip_and_noise(norms, sigmas, expected_batch_size=8.0, chunk_size=3)
    ens_step = ensemble.make_train_step(model, tx, preprocess=None, compile=False, per_example=dp)
    ens_metrics = []
    for batch in batches:
        ens, m = ens_step(ens, batch)
        ens_metrics.append(m)
    for k, s in enumerate(solos):
        solo_dp = privacy.clip_and_noise(norms[k], sigmas[k], expected_batch_size=8.0, chunk_size=3)
        solo_step = step.make_train_step(model, tx, preprocess=None, compile=False, per_example=solo_dp)
        for batch, m in zip(batches, ens_metrics, strict=True):
            s, ms = solo_step(s, batch)
            assert {name: v[k] for name, v in m.items()}.keys() == ms.keys()
            for name in ms:  # vmapped vs solo sum in another order: a sum of 8 float32 losses, 8 ulps
                assert_tree_close({name: m[name][k]}, {name: ms[name]}, rtol=1e-6, atol=0)
        # after 3 steps each float32 path is within 1.6e-7 of float64 (|p| <= 1.2): 1e-6 bounds two
        assert_tree_close(ensemble.member(ens, k), s, rtol=0, atol=1e-6)
    # the members' clipping differs: the tight bound clips every kept example, the loose one fewer
    assert ens_metrics[0]["clipped_sum"][0] == ens_metrics[0]["count"][0]
    assert ens_metrics[0]["clipped_sum"][2] < ens_metrics[0]["count"][2]
