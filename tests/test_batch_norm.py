"""Batch norm: `nn.batch_norm` equals `nn.BatchNorm{1,2}d` (float64, state threaded), is pure,
differentiates like autograd, vmaps and compiles; `simplenet_bn` equals its reference module."""

from __future__ import annotations

import pytest
import torch
from reference import SimpleNetBN
from torch import nn as tnn

from fashion_func import models, nn

F64 = torch.float64
C = 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(layout: str, seed: int) -> torch.Tensor:
    """A batch with a per-channel offset and scale, so the statistics are far from (0, 1)."""
    g = _gen(seed)
    if layout == "2d":  # [B, C], BatchNorm1d's input
        return torch.randn(16, C, dtype=F64, generator=g) * 3.0 + torch.arange(C, dtype=F64)
    x = torch.randn(4, C, 5, 7, dtype=F64, generator=g) * 3.0 + torch.arange(C, dtype=F64).reshape(1, C, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _reference(layout: str, momentum: float) -> tnn.Module:
    """A BatchNorm module with non-trivial affine parameters (float64)."""
    cls = tnn.BatchNorm1d if layout == "2d" else tnn.BatchNorm2d
    module = cls(C, momentum=momentum).double()
    with torch.no_grad():
        module.weight.copy_(torch.rand(C, dtype=F64, generator=_gen(100)) + 0.5)
        module.bias.copy_(torch.randn(C, dtype=F64, generator=_gen(101)))
    return module


def _state_of(module: tnn.Module) -> nn.BatchNormState:
    return nn.BatchNormState(
        module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone()
    )


def _assert_state_equal(state: nn.BatchNormState, module: tnn.Module) -> None:
    torch.testing.assert_close(state.running_mean, module.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.running_var, module.running_var, rtol=1e-12, atol=1e-12)
    assert state.num_batches_tracked.dtype == torch.int64 and state.num_batches_tracked.shape == ()
    assert torch.equal(state.num_batches_tracked, module.num_batches_tracked)


# -- nn.batch_norm against torch.nn ------------------------------------------------------------------


@pytest.mark.cross_path
@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_batch_norm_equals_torch_batch_norm_float64(layout, momentum):
    module = _reference(layout, momentum)
    weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
    _, _, state = nn.init_batch_norm(C, dtype=F64)
    module.train()
    for i in range(4):  # successive batches, the state threaded through
        x = _input(layout, seed=i)
        y, state = nn.batch_norm(x, weight, bias, state, train=True, momentum=momentum)
        with torch.no_grad():
            expected = module(x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        _assert_state_equal(state, module)
    assert int(state.num_batches_tracked) == 4
    module.eval()
    x = _input(layout, seed=10)
    y, after = nn.batch_norm(x, weight, bias, state, train=False, momentum=momentum)
    with torch.no_grad():
        torch.testing.assert_close(y, module(x), rtol=1e-12, atol=1e-12)
    assert all(a is b for a, b in zip(after, state, strict=True))  # inference: state unchanged
    if layout == "channels_last":  # the output keeps the input's memory layout
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cross_path
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_batch_norm_gradients_equal_autograd(layout, train):
    module = _reference(layout, 0.1).train(train)
    with torch.no_grad():  # eval mode must use statistics that are not (0, 1)
        module.running_mean.copy_(torch.randn(C, dtype=F64, generator=_gen(5)))
        module.running_var.copy_(torch.rand(C, dtype=F64, generator=_gen(6)) + 0.5)
    state = _state_of(module)
    x = _input(layout, seed=3)
    cotangent = torch.randn(x.shape, dtype=F64, generator=_gen(4))  # a generic loss direction

    def loss(x, w, b):
        y, _ = nn.batch_norm(x, w, b, state, train=train)
        return (y * cotangent).sum()

    weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
    gx, gw, gb = torch.func.grad(loss, argnums=(0, 1, 2))(x, weight, bias)
    x_ref = x.clone().requires_grad_(True)
    (module(x_ref) * cotangent).sum().backward()
    torch.testing.assert_close(gx, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, module.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, module.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_never_writes_its_inputs(train):
    x = _input("nchw", seed=0)
    weight, bias, state = nn.init_batch_norm(C, dtype=F64)
    state = nn.BatchNormState(torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5, torch.tensor(7))
    before = [t.clone() for t in (x, weight, bias, *state)]
    _, new = nn.batch_norm(x, weight, bias, state, train=train)
    for t, b in zip((x, weight, bias, *state), before, strict=True):
        assert torch.equal(t, b)
    if train:  # new tensors, not the old ones written over
        assert all(n.data_ptr() != o.data_ptr() for n, o in zip(new, state, strict=True))
        assert int(new.num_batches_tracked) == 8


@pytest.mark.cross_path
def test_batch_norm_vmaps_over_a_stack_of_states():
    # an ensemble of E batch-norm layers, each with its own batch, parameters and statistics
    E = 3
    g = _gen(7)
    xs = torch.randn(E, 4, C, 5, 5, dtype=F64, generator=g) * 2 + 1
    weights = torch.rand(E, C, dtype=F64, generator=g) + 0.5
    biases = torch.randn(E, C, dtype=F64, generator=g)
    states = nn.BatchNormState(
        torch.randn(E, C, dtype=F64, generator=g),
        torch.rand(E, C, dtype=F64, generator=g) + 0.5,
        torch.tensor([0, 3, 9]),
    )
    for train in (True, False):

        def one(x, w, b, mean, var, count, train=train):
            y, s = nn.batch_norm(x, w, b, nn.BatchNormState(mean, var, count), train=train)
            return y, *s

        y, mean, var, count = torch.func.vmap(one)(xs, weights, biases, *states)
        for e in range(E):
            state_e = nn.BatchNormState(*(s[e] for s in states))
            y_e, new_e = nn.batch_norm(xs[e], weights[e], biases[e], state_e, train=train)
            torch.testing.assert_close(y[e], y_e, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(mean[e], new_e.running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var[e], new_e.running_var, rtol=1e-12, atol=1e-12)
            assert torch.equal(count[e], new_e.num_batches_tracked)
        assert count.dtype == torch.int64
        assert torch.equal(count, states.num_batches_tracked + (1 if train else 0))


@pytest.mark.cross_path
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_batch_norm_compiles_to_one_graph_equal_to_eager(backend):
    x = _input("nchw", seed=1).float()
    weight, bias, state = nn.init_batch_norm(C)
    weight = weight + torch.arange(C) * 0.1

    def two_steps(x, weight, bias, state):
        # train then eval on the new statistics: the state flows through the compiled graph
        y, s = nn.batch_norm(x, weight, bias, state, train=True)
        z, s2 = nn.batch_norm(x * 0.5, weight, bias, s, train=False)
        return y, z, s2

    torch._dynamo.reset()
    compiled = torch.compile(two_steps, backend=backend, fullgraph=True)
    got, expected = compiled(x, weight, bias, state), two_steps(x, weight, bias, state)
    y, z, s = got
    torch.testing.assert_close(y, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, expected[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(s, expected[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert s.num_batches_tracked.dtype == torch.int64 and int(s.num_batches_tracked) == 1


# -- simplenet_bn against its reference module -------------------------------------------------------


def test_simplenet_bn_size_and_buffers():
    model = models.get("simplenet_bn")
    assert model.stateful and not models.get("simplenet").stateful
    params = model.init(_gen(0))
    assert models.num_params(params) == 1_200_074
    state = model.init_state()
    assert list(state) == [f"bn{i}.{b}" for i in (1, 2) for b in models.BN_BUFFERS]
    assert state["bn2.running_var"].shape == (64,) and state["bn1.num_batches_tracked"].dtype == torch.int64
    assert model.init_state(dtype=F64)["bn1.running_mean"].dtype == F64


@pytest.mark.parametrize("seed", [0, 123])
def test_simplenet_bn_init_draws_like_the_module(seed):
    torch.manual_seed(seed)  # nn.Module draws from the global RNG; BatchNorm2d draws nothing
    module = SimpleNetBN()
    model = models.get("simplenet_bn")
    params, state = model.init(_gen(seed)), model.init_state()
    assert list(params) == [k for k, _ in module.named_parameters()]
    assert list(state) == [k for k, _ in module.named_buffers()]
    reference = module.state_dict()
    for k, v in {**params, **state}.items():
        assert v.dtype == reference[k].dtype and torch.equal(v, reference[k]), k


@pytest.mark.cross_path
def test_simplenet_bn_equals_the_module_in_train_and_eval_float64():
    model = models.get("simplenet_bn")
    params = model.init(_gen(1), dtype=F64)
    state = model.init_state(dtype=F64)
    module = SimpleNetBN().double()
    module.load_state_dict({**params, **state}, strict=True)
    module.train()
    for i in range(3):  # training steps: the running statistics threaded through
        x = torch.randn(8, 1, 28, 28, dtype=F64, generator=_gen(10 + i)) * 2 + 0.5
        logits, state = model.apply(params, x, train=True, state=state)
        with torch.no_grad():
            expected = module(x)
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
        assert list(state) == [k for k, _ in module.named_buffers()]
        for k, v in module.named_buffers():
            torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-12)
    assert int(state["bn2.num_batches_tracked"]) == 3
    module.eval()
    x = torch.randn(5, 1, 28, 28, dtype=F64, generator=_gen(20))
    logits, after = model.apply(params, x, train=False, state=state)
    with torch.no_grad():
        torch.testing.assert_close(logits, module(x), rtol=1e-10, atol=1e-10)
    assert all(after[k] is state[k] for k in state)  # eval mode: the state comes back unchanged
    # an NHWC input computes the same logits
    nhwc, _ = model.apply(params, x.contiguous(memory_format=torch.channels_last), state=state)
    torch.testing.assert_close(nhwc, logits, rtol=1e-10, atol=1e-10)


@pytest.mark.cross_path
def test_simplenet_bn_train_gradients_equal_autograd_float64():
    model = models.get("simplenet_bn")
    params = model.init(_gen(2), dtype=F64)
    state = model.init_state(dtype=F64)
    module = SimpleNetBN().double().train()
    module.load_state_dict({**params, **state}, strict=True)
    x = torch.randn(6, 1, 28, 28, dtype=F64, generator=_gen(3))
    y = torch.arange(6) % 10

    def loss(p):
        logits, _ = model.apply(p, x, train=True, state=state)
        return torch.nn.functional.cross_entropy(logits, y)

    grads = torch.func.grad(loss)(params)
    torch.nn.functional.cross_entropy(module(x), y).backward()
    for k, p in module.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-9, atol=1e-12)


def test_state_is_required_by_stateful_and_refused_by_stateless_models():
    x = torch.randn(2, 1, 28, 28)
    bn = models.get("simplenet_bn")
    with pytest.raises(ValueError, match="stateful"):
        bn.apply(bn.init(_gen(0)), x)
    plain = models.get("simplenet")
    with pytest.raises(ValueError, match="stateless"):
        plain.apply(plain.init(_gen(0)), x, state=bn.init_state())
    assert plain.apply(plain.init(_gen(0)), x, state={}).shape == (2, 10)  # empty state: fine
