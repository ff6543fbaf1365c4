"""The steps beyond Fashion-MNIST: float inputs of any shape, user models, regression, the [B] loss
contract, per-example gradients, and stateful (batch-norm) models, each against plain PyTorch.

References are written with `torch.nn` modules, `torch.optim` and `torch.func` directly (never
through the library), on small random batches; float64 where rounding would blur the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    SimpleNet,
    SimpleNetBN,
    assert_argmax_agrees,
    assert_tree_close,
    assert_tree_equal,
    clone_tree,
)
from torch import nn as tnn

from fashion_func import data, ensemble, interop, losses, models, nn, optim, step, tree
from fashion_func import state as state_lib
from fashion_func.models import Model, Stage

# -- helpers -----------------------------------------------------------------------------------


def _uint8_images(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def _float_images(seed: int, n: int = 8, dtype: torch.dtype = torch.float32):
    """Float images [n, 1, 28, 28] (standard normal) and int64 labels [n]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


def _features(seed: int, n: int = 8, d: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _module_params(module: tnn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# -- 1. float [B, 1, 28, 28] images with preprocess=None ------------------------------------------


@pytest.mark.cross_path
def test_float_images_train_simplenet_as_a_module_and_torch_adam_do():
    model = models.get("simplenet")
    tx = optim.adam(1e-3)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0)
    module = SimpleNet()
    module.load_state_dict(st.params, strict=True)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)

    x, y = _float_images(1)
    new, metrics = train_step(st, (x, y))
    opt.zero_grad()
    logits = module(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()

    assert set(metrics) == {"loss_sum", "count", "correct"}
    torch.testing.assert_close(metrics["loss_sum"] / 8, loss.detach(), rtol=1e-6, atol=1e-6)
    assert int(metrics["count"]) == 8 and int(new.step) == 1
    assert abs(int(metrics["correct"]) - int((logits.argmax(-1) == y).sum())) <= 1  # float32 paths: one tie
    # Adam's first move is about lr = 1e-3 per weight: 1e-6 is a thousandth of it
    assert_tree_close(new.params, _module_params(module), rtol=0, atol=1e-6)
    adam = new.opt_state[1]
    for k, p in module.named_parameters():
        torch.testing.assert_close(adam.mu[k], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(adam.nu[k], opt.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-14)


@pytest.mark.cross_path
def test_a_float64_model_trains_in_float64_like_torch_adam():
    model = models.get("simplenet")
    tx = optim.adam(1e-3)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    st = state_lib.create(params, tx, seed=0)
    module = SimpleNet().double()
    module.load_state_dict(params, strict=True)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    for seed in (1, 2):
        x, y = _float_images(seed, dtype=torch.float64)
        st, metrics = train_step(st, (x, y))
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        assert metrics["loss_sum"].dtype == torch.float64
        torch.testing.assert_close(metrics["loss_sum"] / 8, loss.detach(), rtol=1e-12, atol=1e-12)
    # float64 all the way (the loss too): agreement to rounding, 1e-14 measured; with a float32
    # loss fc1.weight was 2e-6 off (Adam turns the loss's rounding into moves where |grad| ~ eps)
    assert_tree_close(st.params, _module_params(module), rtol=0, atol=1e-10)
    out = step.make_eval_step(model, preprocess=None, compile=False)(st, (x, y))
    assert out["loss"].dtype == out["logits"].dtype == torch.float64


@pytest.mark.cross_path
def test_default_preprocess_on_uint8_equals_preprocess_none_on_normalized_images():
    model = models.get("simplenet")
    tx = optim.sgd(0.1, momentum=0.9)  # SGD: a comparison of inputs, not of Adam's rounding gain
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0)
    default = step.make_train_step(model, tx, compile=False)
    plain = step.make_train_step(model, tx, preprocess=None, compile=False)
    a = b = st
    for seed in (3, 4):
        images, labels = _uint8_images(seed)
        a, ma = default(a, (images, labels))
        b, mb = plain(b, (data.normalize(images), labels))
        torch.testing.assert_close(ma["loss_sum"], mb["loss_sum"], rtol=1e-5, atol=1e-5)
        assert abs(int(ma["correct"]) - int(mb["correct"])) <= 1  # logits ulps apart: a near tie may flip one
    assert_tree_close(a.params, b.params, rtol=1e-4, atol=1e-6)

    images, labels = _uint8_images(5)
    ea = step.make_eval_step(model, compile=False)(a, (images, labels))
    eb = step.make_eval_step(model, preprocess=None, compile=False)(a, (data.normalize(images), labels))
    torch.testing.assert_close(ea["logits"], eb["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ea["loss"], eb["loss"], rtol=1e-5, atol=1e-5)


# -- 2. user models on [B, D] features; regression -----------------------------------------------


def _sequential(d: int = 6, h: int = 5, out: int = 3) -> tnn.Sequential:
    """Linear, tanh, Linear with weights drawn from a local generator (the global RNG is not used)."""
    module = tnn.Sequential(tnn.Linear(d, h), tnn.Tanh(), tnn.Linear(h, out))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.empty_like(p).uniform_(-0.6, 0.6, generator=g))
    return module


def _sequential_as_function(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The same network as `_sequential`, written by hand over its state_dict names."""
    return F.linear(torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


def _hand_built_model() -> Model:
    """A `models.Model` assembled from stages, with its own init (state_dict names of `_sequential`)."""

    def init(generator, *, dtype=torch.float32, device=None):
        w0, b0 = nn.init_linear(generator, 6, 5, dtype=dtype, device=device)
        w2, b2 = nn.init_linear(generator, 5, 3, dtype=dtype, device=device)
        return {"0.weight": w0, "0.bias": b0, "2.weight": w2, "2.bias": b2}

    stages = (
        Stage("0", lambda p, x, train, key: nn.linear(x, p["0.weight"], p["0.bias"])),
        Stage("1", lambda p, x, train, key: torch.tanh(x)),
        Stage("2", lambda p, x, train, key: nn.linear(x, p["2.weight"], p["2.bias"])),
    )
    return Model("hand_built", {}, init, stages, input_shape=(6,))


def _reference_run(module: tnn.Module, batches, loss_fn, lr: float = 1e-2):
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses_seen = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(module(x), y)
        loss.backward()
        opt.step()
        losses_seen.append(loss.detach())
    return _module_params(module), losses_seen


@pytest.mark.cross_path
@pytest.mark.parametrize("kind", ["function", "hand_built", "functionalize"])
def test_user_model_on_feature_vectors_trains_like_the_module(kind):
    module = _sequential()
    if kind == "function":
        model, params = _sequential_as_function, _module_params(module)
    elif kind == "hand_built":
        model = _hand_built_model()
        params = model.init(torch.Generator().manual_seed(1))
        module.load_state_dict(params, strict=True)
    else:
        model, params = interop.functionalize(_sequential())
        assert params.keys() == module.state_dict().keys()
    given = clone_tree(params)
    tx = optim.adam(1e-2)
    st = state_lib.create(params, tx, seed=0)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    batches = [_features(10 + i) for i in range(3)]
    for x, y in batches:
        st, metrics = train_step(st, (x, y))
    ref_params, ref_losses = _reference_run(module, batches, F.cross_entropy)

    assert int(st.step) == 3 and set(metrics) == {"loss_sum", "count", "correct"}
    torch.testing.assert_close(metrics["loss_sum"] / 8, ref_losses[-1], rtol=1e-5, atol=1e-6)
    assert_tree_close(st.params, ref_params, rtol=1e-5, atol=1e-6)
    # the caller's params are untouched
    assert_tree_equal(params, given)
    out = step.make_eval_step(model, preprocess=None, compile=False, topk=2)(st, batches[0])
    with torch.no_grad():
        logits = module(batches[0][0])
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out["loss"], F.cross_entropy(logits, batches[0][1], reduction="none"), rtol=1e-5, atol=1e-6
    )


def test_a_function_model_is_given_train_and_key_only_where_it_takes_them():
    seen: list[tuple[bool, bool]] = []

    def with_flags(params, x, train=False, key=None):
        seen.append((train, key is not None))
        return _sequential_as_function(params, x)

    params = _module_params(_sequential())
    tx = optim.sgd(0.1)
    batch = _features(0, n=4)
    step.make_train_step(with_flags, tx, preprocess=None, compile=False)(state_lib.create(params, tx), batch)
    step.make_eval_step(with_flags, preprocess=None, compile=False)(params, batch)
    assert seen == [(True, True), (False, False)]


@pytest.mark.cross_path
def test_regression_with_mse_per_example_and_float_targets():
    module = _sequential(out=2)
    params = _module_params(module)
    tx = optim.adam(1e-2)
    st = state_lib.create(params, tx, seed=0)
    train_step = step.make_train_step(
        _sequential_as_function, tx, loss=losses.mse_per_example, preprocess=None, compile=False
    )
    g = torch.Generator().manual_seed(20)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    for x, t in batches:
        st, metrics = train_step(st, (x, t))
    ref_params, ref_losses = _reference_run(module, batches, F.mse_loss)

    assert set(metrics) == {"loss_sum", "count"}  # no `correct` without class labels
    torch.testing.assert_close(metrics["loss_sum"] / 8, ref_losses[-1], rtol=1e-5, atol=1e-6)
    assert_tree_close(st.params, ref_params, rtol=1e-5, atol=1e-6)

    x, t = batches[0]
    out = step.make_eval_step(_sequential_as_function, loss=losses.mse_per_example, preprocess=None,
                              compile=False)(st.params, (x, t))  # fmt: skip
    assert set(out) == {"loss", "logits"}
    with torch.no_grad():
        pred = module(x)
    torch.testing.assert_close(out["loss"], ((pred - t) ** 2).mean(-1), rtol=1e-5, atol=1e-6)


# -- 3. the [B] loss contract ---------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, "update", True])
@pytest.mark.parametrize(
    "bad_loss, shape",
    [
        (lambda logits, y: F.cross_entropy(logits, y), "[]"),  # a mean, 0-d
        (lambda logits, y: F.cross_entropy(logits, y, reduction="none")[:, None], "[8, 1]"),
    ],
    ids=["mean", "B1"],
)
def test_a_loss_that_is_not_per_example_is_a_valueerror_on_the_first_call(compile, bad_loss, shape):
    model = models.get("mlp", D_in=6, H=5, D_out=3)
    tx = optim.sgd(0.1)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx)
    before = clone_tree(st)
    train_step = step.make_train_step(
        model, tx, loss=bad_loss, preprocess=None, compile=compile
    )  # no error yet
    with pytest.raises(ValueError, match=r"\[B\]") as info:
        train_step(st, _features(0))
    assert shape in str(info.value)
    assert_tree_equal(st, before)


def test_the_eval_step_checks_the_loss_shape_too():
    model = models.get("mlp", D_in=6, H=5, D_out=3)
    params = model.init(torch.Generator().manual_seed(0))
    bad = lambda logits, y: F.cross_entropy(logits, y, reduction="none")[:, None]
    eval_step = step.make_eval_step(model, loss=bad, preprocess=None, compile=False)
    with pytest.raises(ValueError, match=r"\[B\]"):
        eval_step(params, _features(0))


# -- 4. per-example gradients ---------------------------------------------------------------------


def _loop_of_single_grads(module: tnn.Module, params, buffers, x, y):
    """{name: [B, ...]} from one `torch.func.grad` per example, through the module itself."""

    def loss_of(p, xi, yi):
        logits = torch.func.functional_call(module, (p, buffers), (xi[None],))
        return F.cross_entropy(logits, yi[None])

    per = [torch.func.grad(loss_of)(params, x[i], y[i]) for i in range(x.shape[0])]
    return {k: torch.stack([g[k] for g in per]) for k in params}


@pytest.mark.cross_path
def test_per_example_grads_of_the_mlp_equal_a_loop_of_single_example_grads():
    model = models.get("mlp", D_in=12, H=7, D_out=4)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    module = tnn.Sequential()
    module.linear1, module.relu, module.linear2 = tnn.Linear(12, 7), tnn.ReLU(), tnn.Linear(7, 4)
    module = module.double()

    grads = step.per_example_grads(model, params, (x, y), preprocess=None)
    expected = _loop_of_single_grads(module, params, {}, x, y)
    assert {k: v.shape for k, v in grads.items()} == {k: (5, *p.shape) for k, p in params.items()}
    assert_tree_close(grads, expected, rtol=1e-10, atol=1e-12)

    norms = step.per_example_grad_norms(grads)
    by_hand = torch.stack([torch.sqrt(sum((expected[k][i] ** 2).sum() for k in params)) for i in range(5)])
    torch.testing.assert_close(norms, by_hand, rtol=1e-10, atol=1e-12)
    # the mean of the per-example gradients is the batch gradient
    batch_grad = torch.func.grad(lambda p: F.cross_entropy(model.apply(p, x), y))(params)
    assert_tree_close(tree.map(lambda t: t.mean(0), grads), batch_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.cross_path
def test_per_example_grads_of_simplenet_bn_in_inference_mode_use_the_running_stats():
    model = models.get("simplenet_bn")
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    ms = model.init_state(dtype=torch.float64)
    ms = {  # statistics as after some training: away from (0, 1), so using them matters
        k: (torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3 if "running_mean" in k
            else torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5 if "running_var" in k
            else v + 7)
        for k, v in ms.items()
    }  # fmt: skip
    before = clone_tree(ms)
    x, y = _float_images(3, n=3, dtype=torch.float64)
    module = SimpleNetBN().double().eval()

    grads = step.per_example_grads(
        model, params, (x, y), loss=losses.cross_entropy_per_example, preprocess=None, model_state=ms
    )
    expected = _loop_of_single_grads(module, params, ms, x, y)
    assert_tree_close(grads, expected, rtol=1e-9, atol=1e-12)
    norms = step.per_example_grad_norms(grads)
    by_hand = torch.stack([torch.sqrt(sum((expected[k][i] ** 2).sum() for k in params)) for i in range(3)])
    torch.testing.assert_close(norms, by_hand, rtol=1e-10, atol=1e-12)
    assert_tree_equal(ms, before)  # inference mode: the state is read, never written


@pytest.mark.cross_path
def test_per_example_grads_with_the_default_preprocess_on_uint8():
    model = models.get("mlp")
    params = model.init(torch.Generator().manual_seed(0))
    images, labels = _uint8_images(8, n=4)
    grads = step.per_example_grads(model, params, (images, labels))  # default: step.FASHION_MNIST
    x = data.normalize(images)

    def loss_of(p, i):
        return F.cross_entropy(model.apply(p, x[i : i + 1]), labels[i : i + 1])

    per = [torch.func.grad(loss_of)(params, i) for i in range(4)]
    assert_tree_close(grads, {k: torch.stack([g[k] for g in per]) for k in params}, rtol=1e-4, atol=1e-6)


def test_per_example_grads_of_a_stateful_model_without_its_state_is_a_clear_valueerror():
    model = models.get("simplenet_bn")
    params = model.init(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stateful"):
        step.per_example_grads(model, params, _float_images(4, n=2), preprocess=None)


# -- 5. stateful models ---------------------------------------------------------------------------


def _bn_state(seed: int = 0, tx=None, dtype=torch.float64):
    model = models.get("simplenet_bn")
    tx = tx or optim.adam(1e-3)
    params = model.init(torch.Generator().manual_seed(seed), dtype=dtype)
    return model, tx, state_lib.create(params, tx, seed=seed, model_state=model.init_state(dtype=dtype))


@pytest.mark.cross_path
@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_simplenet_bn_steps_thread_the_running_stats_like_batchnorm2d_and_torch_optim(opt_name):
    # float64: a conv bias right before batch norm has a true gradient of 0, and in float32 its
    # rounding noise becomes whole +-lr Adam steps in arbitrary directions; in float64 it stays ~1e-12
    tx = optim.adam(1e-3) if opt_name == "adam" else optim.sgd(0.05, momentum=0.9)
    model, tx, st = _bn_state(tx=tx)
    assert model.stateful
    module = SimpleNetBN().double().train()
    module.load_state_dict({**st.params, **st.model_state}, strict=True)  # params and buffers by name
    if opt_name == "adam":
        opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    before = clone_tree(st)

    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    s = st
    for seed in (30, 31, 32):
        x, y = _float_images(seed, dtype=torch.float64)
        s, metrics = train_step(s, (x, y))
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        assert metrics["loss_sum"].dtype == torch.float64
        torch.testing.assert_close(metrics["loss_sum"] / 8, loss.detach(), rtol=1e-12, atol=1e-12)

    assert_tree_equal(st, before)  # the input state is not modified
    assert int(s.step) == 3
    ref = module.state_dict()
    # params: 1e-8 is a hundred-thousandth of one Adam move (measured: 3e-10, the pre-BN conv
    # biases, whose float64 gradient noise Adam still scales up a little)
    for k, v in s.params.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")
    assert s.model_state.keys() == {k for k in ref if "running" in k or "tracked" in k}
    for k, v in s.model_state.items():
        if k.endswith("num_batches_tracked"):
            assert v.dtype == torch.int64 and int(v) == int(ref[k]) == 3, k
        else:
            assert v.dtype == torch.float64
            torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
            assert not torch.equal(v, st.model_state[k]), k  # the statistics did move

    # eval: the running statistics, as the module in eval mode
    module.load_state_dict({**s.params, **s.model_state}, strict=True)
    module.eval()
    x, y = _float_images(33, dtype=torch.float64)
    eval_step = step.make_eval_step(model, preprocess=None, compile=False)
    out = eval_step(s, (x, y))
    with torch.no_grad():
        logits = module(x)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-10, atol=1e-10)
    assert_argmax_agrees(out["pred"], logits, 2e-10)  # ours vs the module: the 1e-10 above
    assert torch.equal(eval_step(s.params, (x, y), s.model_state)["logits"], out["logits"])
    with pytest.raises(ValueError, match="stateful"):
        eval_step(s.params, (x, y))


def _tiny_bn_model(d: int = 6, h: int = 5, classes: int = 3) -> Model:
    """Linear (no bias) -> batch norm -> ReLU -> Linear on [B, d], named like the nn.Sequential
    `_tiny_bn_module`: small enough to compile in seconds, stateful like simplenet_bn."""

    def init(generator, *, dtype=torch.float32, device=None):
        w0, _ = nn.init_linear(generator, d, h, dtype=dtype, device=device)
        w3, b3 = nn.init_linear(generator, h, classes, dtype=dtype, device=device)
        g1, b1, _ = nn.init_batch_norm(h, dtype=dtype, device=device)
        return {"0.weight": w0, "1.weight": g1, "1.bias": b1, "3.weight": w3, "3.bias": b3}

    def init_state(*, dtype=torch.float32, device=None):
        _, _, s = nn.init_batch_norm(h, dtype=dtype, device=device)
        return {"1.running_mean": s.running_mean, "1.running_var": s.running_var,
                "1.num_batches_tracked": s.num_batches_tracked}  # fmt: skip

    def bn(p, s, x, train, key):
        buffers = nn.BatchNormState(s["1.running_mean"], s["1.running_var"], s["1.num_batches_tracked"])
        y, new = nn.batch_norm(x, p["1.weight"], p["1.bias"], buffers, train=train)
        return y, {"1.running_mean": new.running_mean, "1.running_var": new.running_var,
                   "1.num_batches_tracked": new.num_batches_tracked}  # fmt: skip

    stages = (
        Stage("0", lambda p, x, train, key: nn.linear(x, p["0.weight"])),
        Stage("1", bn, stateful=True),
        Stage("2", lambda p, x, train, key: nn.relu(x)),
        Stage("3", lambda p, x, train, key: nn.linear(x, p["3.weight"], p["3.bias"])),
    )
    return Model("tiny_bn", {}, init, stages, input_shape=(d,), init_state_fn=init_state)


def _tiny_bn_module(d: int = 6, h: int = 5, classes: int = 3) -> tnn.Sequential:
    return tnn.Sequential(
        tnn.Linear(d, h, bias=False), tnn.BatchNorm1d(h), tnn.ReLU(), tnn.Linear(h, classes)
    )


@pytest.mark.cross_path
def test_compiled_stateful_steps_equal_eager_and_batchnorm1d():
    # simplenet_bn takes 20-30 s to compile on a 2-core CPU; this stateful model exercises the
    # same threading of model_state through the compiled graph in a few seconds
    model = _tiny_bn_model()
    tx = optim.adam(1e-2)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0,
                          model_state=model.init_state())  # fmt: skip
    before = clone_tree(st)
    module = _tiny_bn_module().train()
    module.load_state_dict({**st.params, **st.model_state}, strict=True)
    batches = [_features(40 + i) for i in range(3)]
    ref_params, _ = _reference_run(module, batches, F.cross_entropy)
    ref = module.state_dict()

    results = {}
    for mode in (False, "update", True):
        train_step = step.make_train_step(model, tx, preprocess=None, compile=mode)
        s = st
        for batch in batches:
            s, _ = train_step(s, batch)
        results[mode] = s
        assert_tree_equal(st, before)  # compiled or not, the input state is left alone
        assert_tree_close(s.params, ref_params, rtol=1e-5, atol=1e-6)
        for k, v in s.model_state.items():
            torch.testing.assert_close(
                v, ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k, mode=mode: f"{mode} {k}: {m}"
            )
        assert int(s.model_state["1.num_batches_tracked"]) == 3
    for mode in ("update", True):
        assert_tree_close(results[mode], results[False], rtol=1e-5, atol=1e-6)

    module.eval()
    x, y = _features(49)
    out = step.make_eval_step(model, preprocess=None, compile=True)(results[True], (x, y))
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cross_path
def test_vmap_of_the_train_step_over_two_stacked_stateful_states_equals_two_runs():
    model, tx, s1 = _bn_state(seed=0)
    _, _, s2 = _bn_state(seed=1, tx=tx)
    assert not torch.equal(s1.params["fc2.weight"], s2.params["fc2.weight"])
    stacked = tree.map(lambda *xs: torch.stack(xs), s1, s2)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    ensemble_step = torch.func.vmap(train_step, in_dims=(0, None))

    a, b, s = s1, s2, stacked
    for seed in (50, 51):
        batch = _float_images(seed, dtype=torch.float64)
        a, ma = train_step(a, batch)
        b, mb = train_step(b, batch)
        s, ms = ensemble_step(s, batch)
        torch.testing.assert_close(ms["loss_sum"], torch.stack([ma["loss_sum"], mb["loss_sum"]]))
        assert ms["correct"].tolist() == [int(ma["correct"]), int(mb["correct"])]
    for i, single in enumerate((a, b)):
        member = tree.map(lambda t, i=i: t[i], s)
        assert int(member.step) == 2 and int(member.rng) == int(single.rng)
        # float64; measured 2e-11 (params: pre-BN conv biases through Adam), 1e-12 (statistics)
        assert_tree_close(member.params, single.params, rtol=0, atol=1e-8)
        assert_tree_close(member.opt_state, single.opt_state, rtol=1e-10, atol=1e-12)
        assert_tree_close(member.model_state, single.model_state, rtol=0, atol=1e-9)


# -- the builders' keywords: one StepOptions ------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "keyword", "value"),
    [
        (lambda **kw: step.make_train_step(_linear, optim.sgd(0.1), **kw), "tta", True),
        (lambda **kw: step.make_train_step(_linear, optim.sgd(0.1), **kw), "lr", 0.1),
        (lambda **kw: step.make_eval_step(_linear, **kw), "per_example", None),
        (lambda **kw: step.make_eval_step(_linear, **kw), "reduce_grads", None),
        (lambda **kw: step.stages(_linear, **kw), "compile", False),
        (lambda **kw: ensemble.make_eval_step(_linear, **kw), "class_output", "logits"),
    ],
)
def test_a_builder_refuses_an_option_it_does_not_take_in_one_line(build, keyword, value):
    """Each builder takes the `StepOptions` meant for it; another is an unknown keyword, as Python says
    it (an eval step given the DP stage would otherwise ignore it)."""
    with pytest.raises(TypeError, match=f"got an unexpected keyword argument '{keyword}'$"):
        build(**{keyword: value})


def _linear(params, x):
    return x @ params["w"]


def test_the_options_are_checked_once_and_the_eval_step_counts_the_top_5_by_default():
    with pytest.raises(ValueError, match=r"^unknown precision 'fp8'; choose from fp32, tf32, bf16$"):
        step.make_eval_step(_linear, precision="fp8")
    with pytest.raises(TypeError, match=r"^per_example must be a privacy\.clip_and_noise"):
        step.make_train_step(_linear, optim.sgd(0.1), per_example=losses.cross_entropy_per_example)
    with pytest.raises(ValueError, match=r"^num_classes must be a positive integer, not 0$"):
        step.StepOptions(num_classes=0)
    assert step.StepOptions.of("make_eval_step", {}, train=False).topk == 5
    assert step.StepOptions.of("make_train_step", {}, train=True).topk is None
    x, y = _features(0, d=6, classes=7)
    out = step.make_eval_step(_linear, preprocess=None, compile=False)({"w": torch.randn(6, 7)}, (x, y))
    assert "top5_correct" in out and "top3_correct" not in out


def test_combine_takes_its_loss_as_loss_not_per_example():
    """`per_example=` is the DP stage everywhere; `combine`'s loss is `loss=` (the old name refused)."""
    member_out = {"logits": torch.randn(2, 4, 3)}
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match="unexpected keyword argument 'per_example'"):
        ensemble.combine(member_out, y, per_example=losses.cross_entropy_per_example)
    out = ensemble.combine(member_out, y, loss=lambda logits, t: (logits * 0).sum(-1), topk=2)
    assert torch.equal(out["loss"], torch.zeros(4))
