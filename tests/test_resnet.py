"""models.resnet against an independent nn.Module (tests/reference.py) and interop.ResNet."""

from __future__ import annotations

import pytest
import torch

from fashion_func import interop, models
from tests.reference import ResNet


def _model_and_weights(width: int = 4):
    model = models.get("resnet", width=width)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    state = model.init_state(dtype=torch.float64)
    return model, params, state


def _reference(params, state, width: int = 4) -> ResNet:
    ref = ResNet(width).double()
    ref.load_state_dict({ResNet.key(k): v for k, v in {**params, **state}.items()}, strict=True)
    return ref


@pytest.mark.cross_path
def test_resnet_train_and_eval_match_the_reference_module_in_float64():
    model, params, state = _model_and_weights()
    ref = _reference(params, state)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logits, new_state = model.apply(params, x, train=True, state=state)
    torch.testing.assert_close(logits, ref.train()(x), atol=1e-10, rtol=0)
    for k, v in new_state.items():  # the running statistics move as BatchNorm2d's do
        torch.testing.assert_close(v, ref.state_dict()[ResNet.key(k)], atol=1e-12, rtol=0)
    eval_logits, _ = model.apply(params, x, train=False, state=new_state)
    torch.testing.assert_close(eval_logits, ref.eval()(x), atol=1e-10, rtol=0)


@pytest.mark.cross_path
def test_resnet_gradients_match_autograd_through_the_reference():
    model, params, state = _model_and_weights()
    ref = _reference(params, state).train()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 9, 1, 4])

    def loss(p):
        logits, _ = model.apply(p, x, train=True, state=state)
        return torch.nn.functional.cross_entropy(logits, y)

    grads = torch.func.grad(loss)(params)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    named = dict(ref.named_parameters())
    for k, g in grads.items():
        torch.testing.assert_close(g, named[ResNet.key(k)].grad, atol=1e-10, rtol=0)


@pytest.mark.cross_path
def test_resnet_weights_load_strictly_into_interop_resnet_with_equal_logits():
    model, params, state = _model_and_weights(width=8)
    module = interop.ResNet(width=8).double()
    module.load_state_dict({**params, **state}, strict=True)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(model.apply(params, x, state=state)[0], module.eval()(x), atol=1e-10, rtol=0)
    # the init draws as the module does: same seed, same weights
    torch.manual_seed(5)
    fresh = interop.ResNet(width=8)
    ours = model.init(torch.Generator().manual_seed(5))
    for k, v in ours.items():
        assert torch.equal(v, fresh.state_dict()[k]), k
