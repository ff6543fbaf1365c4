"""Models: same logits as the equivalent nn.Module (float64), same init, pinned sizes."""

from __future__ import annotations

import pytest
import torch
from reference import DPCNN, AlexNet, SimpleNet, TwoLayerNet

from fashion_func import models, nn

CASES = [
    ("mlp", {}, lambda: TwoLayerNet(784, 100, 10), 79_510),
    ("simplenet", {}, SimpleNet, 1_199_882),
    ("alexnet", {}, AlexNet, 5_670_602),
    ("dpcnn", {}, DPCNN, 26_010),
    ("dpcnn", {"groups": 4}, lambda: DPCNN(groups=4), 26_106),
    ("dpcnn", {"num_classes": 3, "width": 6, "groups": 3}, lambda: DPCNN(3, 6, 3), 7_865),
]
IDS = [c[0] + "".join(f"-{k}{v}" for k, v in c[1].items()) for c in CASES]


@pytest.mark.cross_path
@pytest.mark.parametrize(("name", "hparams", "module_fn", "count"), CASES, ids=IDS)
def test_logits_equal_nn_module_float64(name, hparams, module_fn, count):
    model = models.get(name, **hparams)
    params = model.init(torch.Generator().manual_seed(1), dtype=torch.float64)
    assert models.num_params(params) == count
    module = module_fn().double().eval()
    module.load_state_dict(params)  # same names and shapes, strict
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module(x)
    got = model.apply(params, x)
    assert got.shape == (4, models.num_classes(model))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "hparams", "module_fn", "count"), CASES, ids=IDS)
def test_init_draws_like_nn_module(name, hparams, module_fn, count):
    # nn.Module draws from the global RNG; ours from an explicit generator with the same seed
    torch.manual_seed(123)
    module = module_fn()
    params = models.get(name, **hparams).init(torch.Generator().manual_seed(123))
    reference = module.state_dict()
    assert list(params) == list(reference)
    for k in params:
        assert torch.equal(params[k], reference[k]), k


def test_init_does_not_touch_global_rng():
    before = torch.random.get_rng_state()
    models.get("simplenet").init(torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.random.get_rng_state())


def test_unknown_model_names_the_choices():
    with pytest.raises(
        ValueError, match="alexnet, dpcnn, mlp, resnet, scatternet, scatternet_ms, scatternet_ms3, simplenet"
    ):
        models.get("resnet9000")


def test_the_config_offers_exactly_the_registered_models():
    """config.MODELS is a copy (the command line parses without importing torch): kept in sync."""
    from fashion_func.cli import config

    assert sorted(config.MODELS) == sorted(models.MODELS)


def test_the_config_offers_exactly_the_steps_precisions():
    """config.PRECISIONS is a copy for the same reason (config must not import the step)."""
    from fashion_func import step
    from fashion_func.cli import config

    assert config.PRECISIONS == step.PRECISIONS


def test_mlp_hparams_follow_the_tutorial():
    model = models.get("mlp", D_in=1000, H=100, D_out=10)
    params = model.init(torch.Generator().manual_seed(0))
    assert params["linear1.weight"].shape == (100, 1000)
    assert model.apply(params, torch.randn(64, 1000)).shape == (64, 10)


def test_alexnet_dropout_is_a_pure_function_of_the_key():
    model = models.get("alexnet")
    params = model.init(torch.Generator().manual_seed(0))
    x = torch.randn(3, 1, 28, 28)
    a = model.apply(params, x, train=True, key=torch.tensor(7))
    b = model.apply(params, x, train=True, key=torch.tensor(7))
    c = model.apply(params, x, train=True, key=torch.tensor(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, model.apply(params, x))  # eval mode: no dropout
    with pytest.raises(ValueError, match="needs a key"):
        model.apply(params, x, train=True)


def test_dropout_keeps_expected_fraction_and_scale():
    x = torch.ones(200_000)
    y = nn.dropout(x, 0.3, key=torch.tensor(5), train=True)
    kept = (y != 0).double().mean().item()
    assert abs(kept - 0.7) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))


def test_uniform_is_uniform_and_key_dependent():
    u = nn.uniform(torch.tensor(11), (100_000,))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.all((hist - 0.1).abs() < 0.005)
    assert not torch.equal(u, nn.uniform(torch.tensor(12), (100_000,)))
    assert not torch.equal(nn.fold_in(torch.tensor(1), 2), nn.fold_in(torch.tensor(2), 1))


@pytest.mark.cross_path
def test_one_channel_nhwc_input_keeps_the_network_nhwc():
    # [B, 1, H, W] is NCHW- and NHWC-contiguous at once; an explicit NHWC stride asks for NHWC
    x = torch.randn(2, 28, 28, 1).permute(0, 3, 1, 2)
    w, b = nn.init_conv2d(torch.Generator().manual_seed(0), 1, 4, 3)
    y = nn.conv2d(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x.reshape(2, 1, 28, 28).clone(), w, b))
    assert nn.conv2d(torch.randn(2, 1, 28, 28), w, b).is_contiguous()  # plain input, plain output


@pytest.mark.cross_path
def test_dropout_keeps_the_memory_layout():
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    y = nn.dropout(x, 0.5, key=torch.tensor(3), train=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.5)
