"""dpcnn, the tempered-sigmoid CNN of DP-SGD: stateless, per-example (vmap) and NHWC forwards and
gradients equal to the plain nn.Module's; group norm as F.group_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import DPCNN
from torch.func import functional_call, grad, vmap

from fashion_func import data, interop, models, nn, preprocess

GROUPS = [0, 4]


def _setup(groups: int, dtype=torch.float32):
    model = models.get("dpcnn", groups=groups)
    params = model.init(torch.Generator().manual_seed(3), dtype=dtype)
    module = DPCNN(groups=groups).to(dtype).eval()
    module.load_state_dict(params)
    return model, params, module


def test_dpcnn_shapes_and_size_follow_the_recipe():
    model = models.get("dpcnn")
    assert not model.stateful and model.init_state() == {} and model.input_shape == (1, 28, 28)
    params = model.init(torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in params.items() if k.endswith("weight")} == {
        "conv1.weight": (16, 1, 8, 8),
        "conv2.weight": (32, 16, 4, 4),
        "fc1.weight": (32, 512),
        "fc2.weight": (10, 32),
    }
    x = torch.randn(2, 1, 28, 28)
    shapes = []
    for stage in model.stages:
        x = stage.fn(params, x, False, None)
        shapes.append((stage.name, tuple(x.shape[1:])))
    assert shapes == [
        ("conv1", (16, 14, 14)), ("conv1.tanh", (16, 14, 14)), ("pool1", (16, 13, 13)),
        ("conv2", (32, 5, 5)), ("conv2.tanh", (32, 5, 5)), ("pool2", (32, 4, 4)),
        ("fc1", (32,)), ("fc1.tanh", (32,)), ("fc2", (10,)),
    ]  # fmt: skip


@pytest.mark.cross_path
@pytest.mark.parametrize("groups", GROUPS)
def test_vmap_over_single_examples_equals_the_module(groups):
    model, params, module = _setup(groups, torch.float64)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    per_example = vmap(lambda xi: model.apply(params, xi[None])[0])(x)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(per_example, expected, rtol=1e-12, atol=1e-12)
    # group norm normalises each example by itself: an example's logits ignore the rest of the batch
    torch.testing.assert_close(model.apply(params, x[:1]), expected[:1], rtol=1e-12, atol=1e-12)


@pytest.mark.cross_path
@pytest.mark.parametrize("groups", GROUPS)
def test_per_example_gradients_by_vmap_equal_autograd_through_the_module(groups):
    model, params, module = _setup(groups, torch.float64)
    g = torch.Generator().manual_seed(5)
    x, y = (
        torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=g),
        torch.randint(0, 10, (3,), generator=g),
    )

    def loss(p, xi, yi):
        return F.cross_entropy(model.apply(p, xi[None]), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert set(grads) == set(params)
    for i in range(3):
        module.zero_grad()
        F.cross_entropy(module(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in module.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.cross_path
@pytest.mark.parametrize("groups", GROUPS)
def test_the_default_preprocess_nhwc_input_gives_the_modules_logits(groups):
    model, params, module = _setup(groups)
    images = data.load("test", limit=16).images
    x = preprocess.NormalizeImages(channels_last=True)(images)
    assert x.stride(1) == 1  # one channel: NHWC shows in the strides only
    h = x
    for stage in model.stages[: [s.name for s in model.stages].index("fc1")]:
        h = stage.fn(params, h, False, None)
    # the activations stay NHWC up to fc1 (the (h w c) path of its flatten), group norm included
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    got = model.apply(params, x)
    with torch.no_grad():
        expected = module(x.contiguous())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the gradient through the NHWC path is the NCHW one
    g_nhwc = grad(lambda p: model.apply(p, x).square().sum())(params)
    g_nchw = grad(lambda p: model.apply(p, x.contiguous()).square().sum())(params)
    for k in params:
        torch.testing.assert_close(g_nhwc[k], g_nchw[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.cross_path
def test_interop_dpcnn_is_the_same_network():
    for groups in GROUPS:
        _, params, reference = _setup(groups, torch.float64)
        module = interop.DPCNN(groups=groups).double().eval()
        x = torch.randn(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            got = functional_call(module, params, (x,))
            torch.testing.assert_close(got, reference(x), rtol=1e-12, atol=1e-12)
        torch.manual_seed(9)
        drawn = interop.DPCNN(groups=groups).state_dict()
        assert list(drawn) == list(models.get("dpcnn", groups=groups).init(torch.Generator().manual_seed(9)))


@pytest.mark.cross_path
def test_group_norm_is_f_group_norm_and_keeps_nhwc():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    y = nn.group_norm(x, 4, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.group_norm(x.contiguous(), 4, w, b, 1e-5))
    # by hand: each example's group of 2 channels has mean 0 and variance 1 before the affine
    z = (y - b[:, None, None]) / w[:, None, None]
    grouped = z.reshape(3, 4, -1)
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.var(-1, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)
    low = nn.group_norm(x.bfloat16(), 4, w, b)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), y, atol=0.05, rtol=0.02)
    assert torch.equal(nn.tanh(x), torch.tanh(x))


@pytest.mark.parametrize("groups", GROUPS)
def test_flax_files_of_dpcnn_reorder_fc1_as_the_model_flattens(tmp_path, groups):
    import json

    from safetensors import safe_open

    from fashion_func.interop import flax_io

    hparams = (("groups", groups), ("num_classes", 10), ("width", 16))
    assert flax_io._flatten_inputs("dpcnn", hparams) == {"fc1": (32, 4, 4)}
    params = models.get("dpcnn", groups=groups).init(torch.Generator().manual_seed(0))
    assert interop.identify(params) == "dpcnn"  # as save_flax recognises a file without a model name
    path = tmp_path / "dpcnn.safetensors"
    interop.save_flax(path, params)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["flatten"] == "hwc" and json.loads(meta["flatten_layers"]) == {"fc1": [32, 4, 4]}
    back = interop.load_flax(path)
    assert set(back) == set(params) and all(torch.equal(back[k], params[k]) for k in params)


def test_export_keeps_the_group_count_that_the_shapes_do_not_say(tmp_path, capsys):
    from fashion_func import checkpoint
    from fashion_func.cli import export

    model = models.get("dpcnn", width=8, groups=2)
    params = model.init(torch.Generator().manual_seed(0))
    src, out = tmp_path / "best.safetensors", tmp_path / "exported.safetensors"
    checkpoint.save_weights(src, params, metadata={"model": "dpcnn", "model_hparams": model.hparams})
    assert export.main(["--weights", str(src), "--format", "torch", "--out", str(out)]) == 0
    capsys.readouterr()
    loaded, weights, _ = interop.load_weights_file(out)
    assert loaded.hparams == {"num_classes": 10, "width": 8, "groups": 2}
    assert all(torch.equal(weights[k], params[k]) for k in params)


@pytest.mark.cross_path
@pytest.mark.parametrize("groups", [0, 1, 4])
def test_from_module_reads_the_group_count_off_the_module(groups):
    torch.manual_seed(0)
    module = interop.DPCNN(groups=groups)
    with torch.no_grad():  # a trained affine: group norm is then far from the identity
        for name, p in module.named_parameters():
            if name.startswith("gn"):
                p.normal_()
    params = interop.from_module(module)  # checks the forward against models.dpcnn(groups=...)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(models.get("dpcnn", groups=groups).apply(params, x), module(x))


# Every pooling kind nn.max_pool routes: overlapping windows (stride < kernel) on a contiguous
# NCHW CPU tensor take the channels-last kernel; the rest call F.max_pool2d as they are.
POOLS = [(2, 1), (3, 1), (3, 2), (2, 2), (3, 3)]
POOL_INPUTS = ["random", "ties", "nan", "channels_last", "one_channel"]


def _pool_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 1 if kind == "one_channel" else 5, 9, 8, generator=g)
    if kind == "ties":  # quantised: most windows hold their maximum twice or more
        x = (x * 2).round() / 2
    if kind == "nan":
        x[0, 1, 2, 3] = float("nan")
    if kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.cross_path
@pytest.mark.parametrize("kind", POOL_INPUTS)
@pytest.mark.parametrize("kernel,stride", POOLS)
def test_max_pool_equals_f_max_pool2d_in_values_and_gradients(kernel, stride, kind):
    x = _pool_input(kind)
    upstream = torch.randn(F.max_pool2d(x, kernel, stride).shape, generator=torch.Generator().manual_seed(2))
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = nn.max_pool(ours_in, kernel, stride), F.max_pool2d(ref_in, kernel, stride)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)  # the same maxima, bitwise
    (ours * upstream).nansum().backward()
    (ref * upstream).nansum().backward()
    # the same element chosen in each window (ties: the first, in row-major order); overlapping
    # windows add their gradients in each kernel's own order
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-6, atol=1e-6, equal_nan=True)
    # and per example, under vmap(grad) as the DP-SGD step differentiates it
    per = vmap(grad(lambda xi, ui: (nn.max_pool(xi[None], kernel, stride)[0] * ui).nansum()))(x, upstream)
    torch.testing.assert_close(per, ref_in.grad, rtol=1e-6, atol=1e-6, equal_nan=True)
