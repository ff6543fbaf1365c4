"""Research use of the steps: float inputs, function models, regression, the [B] loss contract,
per-example gradients and a stateful (batch-norm) model, each checked against plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import SimpleNet, SimpleNetBN, assert_tree_close, assert_tree_equal, clone_tree

import fashion_func
from fashion_func import data, losses, models, optim, step
from fashion_func import state as state_lib


def _uint8_batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def _float_batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float images [n, 1, 28, 28] and int64 labels [n]."""
    images, labels = _uint8_batch(seed, n)
    return data.normalize(images), labels


# -- 1. float [B, 1, 28, 28] inputs with preprocess=None ------------------------------------------


def test_float_images_step_equals_reference_simplenet_and_torch_adam():
    model = models.get("simplenet")
    tx = optim.adam(1e-3)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0)
    module = SimpleNet()
    module.load_state_dict(st.params)  # strict: same names and shapes
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    x, y = _float_batch(1, n=16)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    new, metrics = train_step(st, (x, y))

    opt.zero_grad()
    logits = module(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()

    torch.testing.assert_close(metrics["loss_sum"] / 16, loss.detach(), rtol=1e-6, atol=1e-6)
    assert int(metrics["correct"]) == int((logits.argmax(-1) == y).sum())
    assert int(metrics["count"]) == 16 and int(new.step) == 1
    ref = dict(module.named_parameters())
    for k, p in new.params.items():
        # Adam's first update is lr * g / (|g| + eps): 1e-6 is a thousandth of one update
        torch.testing.assert_close(p, ref[k].detach(), rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the moments too (torch: exp_avg, exp_avg_sq)
    adam_state = new.opt_state[1]
    for k, p in ref.items():
        torch.testing.assert_close(adam_state.mu[k], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(adam_state.nu[k], opt.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-12)


def test_default_preprocess_on_uint8_equals_preprocess_none_on_normalized_images():
    model = models.get("simplenet")
    tx = optim.sgd(0.05, momentum=0.9)
    st = state_lib.create(model.init(torch.Generator().manual_seed(1)), tx, seed=0)
    on_uint8 = step.make_train_step(model, tx, compile=False)  # default: step.FASHION_MNIST
    on_float = step.make_train_step(model, tx, preprocess=None, compile=False)
    a = b = st
    for i in range(2):
        images, labels = _uint8_batch(10 + i)
        a, ma = on_uint8(a, (images, labels))
        b, mb = on_float(b, (data.normalize(images), labels))
        torch.testing.assert_close(ma["loss_sum"], mb["loss_sum"], rtol=1e-6, atol=1e-6)
        assert int(ma["correct"]) == int(mb["correct"])
    assert_tree_close(a.params, b.params, rtol=1e-5, atol=1e-6)

    images, labels = _uint8_batch(30)
    ea = step.make_eval_step(model, compile=False)(a, (images, labels))
    eb = step.make_eval_step(model, preprocess=None, compile=False)(a, (data.normalize(images), labels))
    torch.testing.assert_close(ea["logits"], eb["logits"], rtol=1e-5, atol=1e-5)


# -- 2. a plain-function model on [B, D] features, and a regression ---------------------------------


def _function_params(d: int = 6, h: int = 8, k: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(h, d, generator=g) * 0.5,
        "b1": torch.randn(h, generator=g) * 0.1,
        "w2": torch.randn(k, h, generator=g) * 0.5,
        "b2": torch.randn(k, generator=g) * 0.1,
    }


def two_layer(params, x):
    """A plain function `(params, x [B, D]) -> [B, k]`; no train/key in its signature."""
    return torch.tanh(x @ params["w1"].T + params["b1"]) @ params["w2"].T + params["b2"]


def _hand_sgd(params, x, y, loss_fn, lr):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = loss_fn(two_layer(leaves, x), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    new = {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
    return new, loss.detach()


def test_function_model_on_feature_vectors_equals_a_hand_sgd_step():
    params = _function_params()
    tx = optim.sgd(0.1)
    st = state_lib.create(params, tx)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)

    train_step = step.make_train_step(two_layer, tx, preprocess=None, compile=False)
    new, metrics = train_step(st, (x, y))
    expect, loss = _hand_sgd(params, x, y, F.cross_entropy, 0.1)

    assert set(metrics) == {"loss_sum", "count", "correct"}
    torch.testing.assert_close(metrics["loss_sum"] / 12, loss, rtol=1e-6, atol=1e-7)
    assert int(metrics["correct"]) == int((two_layer(params, x).argmax(-1) == y).sum())
    assert_tree_close(new.params, expect, rtol=1e-6, atol=1e-7)

    out = step.make_eval_step(two_layer, preprocess=None, compile=False, topk=2)(new.params, (x, y))
    torch.testing.assert_close(out["logits"], two_layer(new.params, x))
    torch.testing.assert_close(out["loss"], F.cross_entropy(two_layer(new.params, x), y, reduction="none"))


def test_function_model_is_given_train_and_key_only_where_it_takes_them():
    seen: list[tuple[bool, bool]] = []

    def with_flags(params, x, train=False, key=None):
        seen.append((train, key is not None))
        return two_layer(params, x)

    params = _function_params()
    tx = optim.sgd(0.1)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    step.make_train_step(with_flags, tx, preprocess=None, compile=False)(state_lib.create(params, tx), (x, y))
    step.make_eval_step(with_flags, preprocess=None, compile=False)(params, (x, y))
    assert seen == [(True, True), (False, False)]


def test_regression_with_mse_per_example_equals_a_hand_sgd_step():
    params = _function_params(k=3)
    tx = optim.sgd(0.05)
    st = state_lib.create(params, tx)
    g = torch.Generator().manual_seed(7)
    x, targets = torch.randn(10, 6, generator=g), torch.randn(10, 3, generator=g)

    train_step = step.make_train_step(
        two_layer, tx, loss=losses.mse_per_example, preprocess=None, compile=False
    )
    a, metrics = train_step(st, (x, targets))
    expect, loss = _hand_sgd(params, x, targets, F.mse_loss, 0.05)

    assert set(metrics) == {"loss_sum", "count"}  # float targets: no `correct`
    assert int(metrics["count"]) == 10
    torch.testing.assert_close(metrics["loss_sum"] / 10, loss, rtol=1e-6, atol=1e-7)
    assert_tree_close(a.params, expect, rtol=1e-6, atol=1e-7)

    # a second step from there agrees too (the state carries on)
    a, _ = train_step(a, (x, targets))
    expect, _ = _hand_sgd(expect, x, targets, F.mse_loss, 0.05)
    assert_tree_close(a.params, expect, rtol=1e-6, atol=1e-7)

    out = step.make_eval_step(two_layer, loss=losses.mse_per_example, preprocess=None, compile=False)(
        a.params, (x, targets)
    )
    assert set(out) == {"loss", "logits"}
    torch.testing.assert_close(out["loss"], ((two_layer(a.params, x) - targets) ** 2).mean(-1))


def test_a_float64_function_model_trains_in_float64():
    params = {k: v.double() for k, v in _function_params().items()}
    tx = optim.sgd(0.1)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    new, metrics = step.make_train_step(two_layer, tx, preprocess=None, compile=False)(
        state_lib.create(params, tx), (x, y)
    )
    expect, loss = _hand_sgd(params, x, y, F.cross_entropy, 0.1)
    out = step.make_eval_step(two_layer, preprocess=None, compile=False)(params, (x, y))
    assert metrics["loss_sum"].dtype == torch.float64
    assert out["logits"].dtype == torch.float64
    torch.testing.assert_close(metrics["loss_sum"] / 12, loss, rtol=1e-12, atol=1e-14)
    assert_tree_close(new.params, expect, rtol=1e-12, atol=1e-14)


# -- 3. the [B] loss contract --------------------------------------------------------------------


def _mean_loss(logits, y):
    return F.cross_entropy(logits, y)  # 0-d: wrong


def _column_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="none")[:, None]  # [B, 1]: wrong


@pytest.mark.parametrize("compile", [False, "update", True], ids=["eager", "update", "compiled"])
@pytest.mark.parametrize("bad_loss", [_mean_loss, _column_loss], ids=["mean", "column"])
def test_a_loss_that_is_not_per_example_is_a_valueerror_naming_B_on_the_first_call(compile, bad_loss):
    if compile is True:  # compile a tiny function model, not the 79k-parameter mlp
        model, params = two_layer, _function_params()
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    else:
        model = models.get("mlp")
        params = model.init(torch.Generator().manual_seed(0))
        x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    tx = optim.sgd(0.1)
    st = state_lib.create(params, tx)
    before = clone_tree(st)
    train_step = step.make_train_step(model, tx, loss=bad_loss, preprocess=None, compile=compile)
    with pytest.raises(ValueError, match=r"\[B\]"):
        train_step(st, (x, y))
    assert_tree_equal(st, before)


def test_eval_step_checks_the_loss_shape_too():
    model = models.get("mlp")
    params = model.init(torch.Generator().manual_seed(0))
    eval_step = step.make_eval_step(model, loss=_column_loss, preprocess=None, compile=False)
    with pytest.raises(ValueError, match=r"\[B\]"):
        eval_step(params, (torch.randn(4, 784), torch.randint(0, 10, (4,))))


# -- 4. per-example gradients --------------------------------------------------------------------


def _loop_grads(model, params, x, y, model_state=None):
    """Each example's gradient, one at a time, with torch.func.grad."""
    out = []
    for i in range(x.shape[0]):

        def loss_i(p, i=i):
            if model.stateful:
                logits, _ = model.apply(p, x[i : i + 1], train=False, state=model_state)
            else:
                logits = model.apply(p, x[i : i + 1])
            return F.cross_entropy(logits, y[i : i + 1])

        out.append(torch.func.grad(loss_i)(params))
    return {k: torch.stack([g[k] for g in out]) for k in params}


def _loop_norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    b = next(iter(per_example.values())).shape[0]
    return torch.stack([torch.sqrt(sum((g[i] ** 2).sum() for g in per_example.values())) for i in range(b)])


def test_per_example_grads_equal_a_loop_of_single_example_grads_mlp():
    model = models.get("mlp")
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)

    grads = fashion_func.per_example_grads(model, params, (x, y), preprocess=None)
    expect = _loop_grads(model, params, x, y)
    assert grads.keys() == params.keys()
    for k in params:
        assert grads[k].shape == (6, *params[k].shape) and grads[k].dtype == torch.float64
        torch.testing.assert_close(
            grads[k], expect[k], rtol=1e-12, atol=1e-14, msg=lambda m, k=k: f"{k}: {m}"
        )
    norms = fashion_func.per_example_grad_norms(grads)
    assert norms.shape == (6,)
    torch.testing.assert_close(norms, _loop_norms(expect), rtol=1e-12, atol=1e-14)
    # the mean of the per-example gradients is the batch gradient
    batch_grad = torch.func.grad(lambda p: F.cross_entropy(model.apply(p, x), y))(params)
    for k in params:
        torch.testing.assert_close(grads[k].mean(0), batch_grad[k], rtol=1e-10, atol=1e-13)


def test_per_example_grads_of_simplenet_bn_in_inference_mode_with_its_state():
    model = models.get("simplenet_bn")
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    ms = model.init_state(dtype=torch.float64)
    # running statistics away from (0, 1), so that using them (or not) shows
    for name in ("bn1", "bn2"):
        c = ms[f"{name}.running_mean"].shape[0]
        ms[f"{name}.running_mean"] = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
        ms[f"{name}.running_var"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        ms[f"{name}.num_batches_tracked"] = torch.tensor(7)
    x = torch.randn(3, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=g)
    before = clone_tree(ms)

    grads = step.per_example_grads(
        model, params, (x, y), loss=losses.cross_entropy_per_example, preprocess=None, model_state=ms
    )
    expect = _loop_grads(model, params, x, y, model_state=ms)
    for k in params:
        torch.testing.assert_close(
            grads[k], expect[k], rtol=1e-10, atol=1e-13, msg=lambda m, k=k: f"{k}: {m}"
        )
    torch.testing.assert_close(
        step.per_example_grad_norms(grads), _loop_norms(expect), rtol=1e-10, atol=1e-13
    )
    assert_tree_equal(ms, before)  # inference mode: the state is read, never written


def test_per_example_grads_with_the_default_preprocess_on_uint8():
    model = models.get("mlp")
    params = model.init(torch.Generator().manual_seed(0))
    images, labels = _uint8_batch(8, n=4)
    grads = step.per_example_grads(model, params, (images, labels))  # default: step.FASHION_MNIST
    expect = _loop_grads(model, params, data.normalize(images), labels)
    for k in params:
        torch.testing.assert_close(grads[k], expect[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# -- 5. a stateful model (batch norm) --------------------------------------------------------------


def _bn_state(seed: int = 0, tx=None):
    model = models.get("simplenet_bn")
    tx = tx or optim.adam(1e-3)
    params = model.init(torch.Generator().manual_seed(seed))
    return model, tx, state_lib.create(params, tx, seed=seed, model_state=model.init_state())


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_stateful_train_steps_match_a_batchnorm_module_and_torch_optim(opt_name):
    if opt_name == "adam":
        model, tx, st = _bn_state(tx=optim.adam(1e-3))
    else:
        model, tx, st = _bn_state(tx=optim.sgd(0.05, momentum=0.9))
    assert model.stateful
    module = SimpleNetBN()
    module.load_state_dict({**st.params, **st.model_state})  # strict: names of params and buffers
    module.train()
    if opt_name == "adam":
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    before = clone_tree(st)

    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    batches = [_float_batch(40 + i) for i in range(3)]
    s = st
    for x, y in batches:
        s, metrics = train_step(s, (x, y))
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        torch.testing.assert_close(metrics["loss_sum"] / 16, loss.detach(), rtol=1e-5, atol=1e-6)

    assert_tree_equal(st, before)  # the input state is untouched
    assert int(s.step) == 3
    ref = module.state_dict()
    pre_bn_bias = ("conv1.bias", "conv2.bias")
    for k, v in s.params.items():
        if opt_name == "adam" and k in pre_bn_bias:
            # A bias right before batch norm is subtracted out again: its true gradient is 0 and
            # both sides see only rounding noise, which Adam's m / sqrt(v) turns into whole
            # +-lr steps in arbitrary directions. Only the bound on the move is comparable
            # (the SGD case below checks these biases, and the running means, tightly).
            for moved in (v - st.params[k], ref[k] - st.params[k]):
                assert float(moved.abs().max()) <= 3 * 1e-3 * (1 + 1e-4), k
            continue
        # fp32 Adam amplifies rounding where gradients are near zero (m / sqrt(v)); 1e-4 is a
        # tenth of one update
        tol = {"rtol": 0, "atol": 1e-4} if opt_name == "adam" else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close(v, ref[k], msg=lambda m, k=k: f"{k}: {m}", **tol)
    buffers = {k for k in ref if k.startswith("bn") and ("running" in k or "tracked" in k)}
    assert s.model_state.keys() == buffers
    for k, v in s.model_state.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and int(v) == int(ref[k]) == 3, k
        elif opt_name == "adam" and k.endswith("running_mean"):
            # moves with the noisy pre-BN bias above: at most 0.1 * (0.9 * 2 lr + 4 lr) apart
            torch.testing.assert_close(v, ref[k], rtol=0, atol=6e-4, msg=lambda m, k=k: f"{k}: {m}")
        else:  # running_var does not see a bias; with SGD everything is tight
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(s.model_state["bn2.running_var"], st.model_state["bn2.running_var"])

    # eval: running statistics, as the module in eval mode
    module.load_state_dict({**s.params, **s.model_state})
    module.eval()
    x, y = _float_batch(50)
    out = step.make_eval_step(model, preprocess=None, compile=False)(s, (x, y))
    with torch.no_grad():
        logits = module(x)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out["loss"], F.cross_entropy(logits, y, reduction="none"), rtol=1e-5, atol=1e-5
    )
    # a params dict plus model_state gives the same as the TrainState
    out2 = step.make_eval_step(model, preprocess=None, compile=False)(s.params, (x, y), s.model_state)
    torch.testing.assert_close(out2["logits"], out["logits"], rtol=0, atol=0)


def test_stateful_compile_update_equals_eager():
    model, tx, st = _bn_state(tx=optim.sgd(0.05, momentum=0.9))
    eager = step.make_train_step(model, tx, preprocess=None, compile=False)
    fast = step.make_train_step(model, tx, preprocess=None, compile="update")
    before = clone_tree(st)
    a = b = st
    for i in range(3):
        batch = _float_batch(60 + i)
        a, ma = eager(a, batch)
        b, mb = fast(b, batch)
        torch.testing.assert_close(ma["loss_sum"], mb["loss_sum"], rtol=1e-5, atol=1e-6)
    assert_tree_equal(st, before)
    assert_tree_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    assert_tree_close(a.opt_state, b.opt_state, rtol=1e-5, atol=1e-6)
    assert_tree_close(a.model_state, b.model_state, rtol=1e-5, atol=1e-6)
    assert int(b.model_state["bn1.num_batches_tracked"]) == int(b.step) == 3


def test_vmap_over_two_stacked_stateful_members_equals_two_runs():
    model, tx, s1 = _bn_state(seed=0, tx=optim.sgd(0.05, momentum=0.9))
    _, _, s2 = _bn_state(seed=1, tx=tx)
    stacked = fashion_func.tree.map(lambda *xs: torch.stack(xs), s1, s2)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    ensemble_step = torch.func.vmap(train_step, in_dims=(0, None))

    batches = [_float_batch(70 + i, n=8) for i in range(2)]
    a, b, s = s1, s2, stacked
    for batch in batches:
        a, ma = train_step(a, batch)
        b, mb = train_step(b, batch)
        s, ms = ensemble_step(s, batch)
        torch.testing.assert_close(ms["loss_sum"], torch.stack([ma["loss_sum"], mb["loss_sum"]]))
        assert ms["correct"].tolist() == [int(ma["correct"]), int(mb["correct"])]
    for i, single in enumerate((a, b)):
        member = fashion_func.tree.map(lambda t, i=i: t[i], s)
        assert_tree_close(member.params, single.params, rtol=1e-5, atol=1e-6)
        assert_tree_close(member.opt_state, single.opt_state, rtol=1e-5, atol=1e-6)
        assert_tree_close(member.model_state, single.model_state, rtol=1e-5, atol=1e-6)
        assert int(member.step) == 2
