"""Interop: plain modules, research modules, Flax/numpy files, a pure-JAX forward, DLPack, export CLI."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn as tnn

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before any jax import: CPU unless told otherwise

from reference import briefly_trained_simplenet

from fashion_func import checkpoint, data, export, interop, models, optim, step
from fashion_func import state as state_lib


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """SimpleNet after a few Adam steps on real images (logits of a few units, not init's ~0.1)."""
    return briefly_trained_simplenet(limit=768, lr=3e-3)


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    """256 real test images, normalised, NCHW."""
    return step.normalize_images(data.load("test", limit=256).images)


@pytest.fixture(scope="module")
def weights_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "best.safetensors"
    checkpoint.save_weights(path, trained, metadata={"model": "simplenet", "epoch": 1})
    return path


# -- nn.Module <-> params ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hparams"), [("mlp", {"H": 32}), ("simplenet", {}), ("alexnet", {})])
def test_to_module_has_the_same_keys_and_forward(name, hparams):
    model = models.get(name, **hparams)
    params = model.init(torch.Generator().manual_seed(1))
    module = interop.to_module(name, params)
    assert isinstance(module, tnn.Module) and not module.training
    assert list(module.state_dict()) == list(params)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(module(x), model.apply(params, x), rtol=0, atol=1e-6)
    # the module owns its tensors: training it leaves the caller's params alone
    before = {k: v.clone() for k, v in params.items()}
    with torch.no_grad():
        next(module.parameters()).add_(1.0)
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert interop.identify(params) == name


def test_from_module_takes_a_module_trained_with_torch_optim():
    module = interop.SimpleNet()  # initialised by torch itself
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    F.cross_entropy(module(x), y).backward()
    opt.step()
    params = interop.from_module(module)
    assert list(params) == [
        f"{layer}.{kind}" for layer in ("conv1", "conv2", "fc1", "fc2") for kind in ("weight", "bias")
    ]
    assert all(not p.requires_grad for p in params.values())
    with torch.no_grad():
        torch.testing.assert_close(models.get("simplenet").apply(params, x), module(x), rtol=0, atol=1e-6)
    params["fc2.bias"].add_(1.0)  # copies: the module is untouched
    assert not torch.equal(params["fc2.bias"], module.fc2.bias.detach())


def test_from_module_refuses_unknown_or_impostor_modules():
    with pytest.raises(ValueError, match="functionalize"):
        interop.from_module(tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 10)))

    class AvgPoolNet(interop.SimpleNet):  # SimpleNet's names and shapes, another computation
        def forward(self, x):
            x = F.avg_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    impostor = AvgPoolNet()
    with pytest.raises(ValueError, match="computes something else"):
        interop.from_module(impostor)
    assert impostor.training  # the check restored its mode
    with pytest.raises(ValueError, match="do not match simplenet"):
        interop.to_module("simplenet", {"conv1.weight": torch.zeros(32, 1, 3, 3)})


class Research(tnn.Module):
    """Research code with its own module: a buffer, nested submodules, dropout-free."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 32), tnn.Tanh(), tnn.Linear(32, 10))
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, x):
        return self.body(x) / self.temperature


def test_functionalize_trains_a_research_module_like_torch_optim():
    torch.manual_seed(0)  # the test's own module init, not the library's
    module = Research()
    reference = copy.deepcopy(module)
    model, params = interop.functionalize(module)
    assert set(params) == {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}  # no buffer
    tx = optim.adam(1e-2)
    st = state_lib.create(params, tx, seed=0)
    train_step = step.make_train_step(model, tx, compile=False)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    train = data.load("train", limit=96)
    for images, labels in data.batches(train, 32, seed=0, epoch=1):
        st, _ = train_step(st, (images, labels))
        opt.zero_grad()
        F.cross_entropy(reference(step.normalize_images(images)), labels).backward()
        opt.step()
    for k, v in reference.named_parameters():
        torch.testing.assert_close(st.params[k], v.detach(), rtol=1e-5, atol=1e-6)
    # the wrapped module itself was never changed, and its buffer was not trained
    torch.manual_seed(0)
    fresh = Research()
    assert module.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in module.state_dict().items())
    x = step.normalize_images(train.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(model.apply(st.params, x), reference(x), rtol=1e-5, atol=1e-6)
    assert module.training  # apply(train=False) restored the mode


# -- Flax layout and numpy ------------------------------------------------------------------------


def test_flax_layout_names_and_round_trip(trained):
    tree = interop.to_flax(trained)
    assert {k: {kk: v.shape for kk, v in d.items()} for k, d in tree.items()} == {
        "conv1": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "conv2": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "fc1": {"kernel": (9216, 128), "bias": (128,)},
        "fc2": {"kernel": (128, 10), "bias": (10,)},
    }
    w = trained["conv2.weight"].numpy()  # OIHW
    assert np.array_equal(tree["conv2"]["kernel"], w.transpose(2, 3, 1, 0))  # HWIO
    assert np.array_equal(tree["fc1"]["kernel"], trained["fc1.weight"].numpy().T)
    assert all(a.flags.c_contiguous for d in tree.values() for a in d.values())
    back = interop.from_flax(tree)
    assert list(back) == list(trained) and all(torch.equal(back[k], trained[k]) for k in trained)


def test_flax_file_loads_with_safetensors_flax_and_numpy(trained, tmp_path):
    pytest.importorskip("jax")
    from flax.traverse_util import unflatten_dict
    from safetensors.flax import load_file as flax_load

    path = tmp_path / "flax.safetensors"
    interop.save_flax(path, trained, metadata={"model": "simplenet"})
    expected = interop.to_flax(trained)
    loaded = unflatten_dict(flax_load(path), sep=".")
    assert set(loaded) == set(expected)
    for layer, leaves in expected.items():
        for leaf, value in leaves.items():
            assert np.array_equal(np.asarray(loaded[layer][leaf]), value)
    flat_np = safetensors.numpy.load_file(path)
    assert flat_np.keys() == {f"{a}.{b}" for a in expected for b in expected[a]}
    assert np.array_equal(flat_np["fc1.kernel"], expected["fc1"]["kernel"])
    back = interop.load_flax(path)
    assert all(torch.equal(back[k], trained[k]) for k in trained)


def test_bf16_weights_become_float32_or_bits_and_come_back(trained, tmp_path):
    bf16 = {k: v.bfloat16() for k, v in trained.items()}
    as_f32 = interop.to_flax(bf16)
    assert as_f32["fc2"]["kernel"].dtype == np.float32
    assert np.array_equal(as_f32["fc2"]["kernel"], bf16["fc2.weight"].float().numpy().T)  # exact upcast
    bits = interop.to_flax(bf16, bf16_as="uint16")
    assert bits["conv1"]["bias"].dtype == np.uint16
    assert np.array_equal(bits["conv1"]["bias"], bf16["conv1.bias"].view(torch.int16).numpy().view(np.uint16))

    path = tmp_path / "bits.safetensors"
    interop.save_flax(path, bf16, bf16_as="uint16")
    assert safetensors.numpy.load_file(path)["conv1.bias"].dtype == np.uint16  # plain numpy reads it
    back = interop.load_flax(path)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], bf16[k]) for k in bf16)

    numpy_path = tmp_path / "np.safetensors"
    interop.save_numpy(numpy_path, bf16)
    loaded = safetensors.numpy.load_file(numpy_path)
    assert loaded["fc1.weight"].dtype == np.float32
    assert np.array_equal(loaded["fc1.weight"], bf16["fc1.weight"].float().numpy())
    with pytest.raises(ValueError, match="no bfloat16"):
        interop.save_numpy(tmp_path / "x.safetensors", bf16, bf16_as="bfloat16")


# -- JAX --------------------------------------------------------------------------------------------


def test_jax_simplenet_matches_apply_on_real_test_images(trained, test_x, tmp_path):
    pytest.importorskip("jax")
    import jax.numpy as jnp
    from einops import rearrange
    from flax.traverse_util import unflatten_dict
    from safetensors.flax import load_file as flax_load

    path = tmp_path / "simplenet_flax.safetensors"
    interop.save_flax(path, trained)
    params = unflatten_dict(flax_load(path), sep=".")  # what a JAX user does with the file
    x_nhwc = jnp.asarray(rearrange(test_x, "b c h w -> b h w c").numpy())
    got = np.asarray(interop.simplenet_jax(params, x_nhwc))
    with torch.no_grad():
        expected = models.get("simplenet").apply(trained, test_x).numpy()
    assert got.shape == expected.shape == (256, 10)
    assert np.abs(expected).max() > 2.0  # trained logits, not init's near-zero ones
    assert np.abs(got - expected).max() <= 1e-4
    assert np.array_equal(got.argmax(1), expected.argmax(1))


def test_dlpack_exchange_shares_memory_on_cpu():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = interop.to_jax(t)
    assert a.shape == (3, 4) and a.dtype == jnp.float32
    assert a.unsafe_buffer_pointer() == t.data_ptr()  # zero-copy
    assert np.array_equal(np.asarray(a), t.numpy())

    b = jnp.linspace(0.0, 1.0, 16).reshape(4, 4)
    u = interop.from_jax(b)
    assert u.data_ptr() == b.unsafe_buffer_pointer()
    assert np.array_equal(u.numpy(), np.asarray(b))

    g = torch.ones(5, requires_grad=True)  # DLPack carries no autograd: detached, still shared
    assert interop.to_jax(g).unsafe_buffer_pointer() == g.data_ptr()
    bf = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    assert interop.to_jax(bf).dtype == jnp.bfloat16
    assert torch.equal(interop.from_jax(interop.to_jax(bf)), bf)


# -- weights files and the export CLI --------------------------------------------------------------


def test_load_weights_file_uses_metadata_and_accepts_bf16(weights_file, tmp_path):
    model, params, meta = interop.load_weights_file(weights_file)
    assert model.name == "simplenet" and meta["epoch"] == 1
    bf16_path = tmp_path / "bf16.safetensors"
    checkpoint.save_weights(
        bf16_path, {k: v.bfloat16() for k, v in params.items()}, metadata={"model": "simplenet"}
    )
    _, p16, _ = interop.load_weights_file(bf16_path)
    assert p16["fc1.weight"].dtype == torch.bfloat16
    with pytest.raises(checkpoint.CheckpointError, match="weights do not match"):
        interop.load_weights_file(weights_file, "alexnet")


def test_export_cli_writes_each_format(capsys, weights_file, trained, test_x, tmp_path):
    out = {f: tmp_path / f"w_{f}.safetensors" for f in export.FORMATS}
    for fmt, path in out.items():
        assert export.main(["--weights", str(weights_file), "--format", fmt, "--out", str(path)]) == 0
        assert f"wrote {path}: simplenet" in capsys.readouterr().out
    # torch: a plain module loads it with nothing but safetensors
    module = interop.SimpleNet().eval()
    module.load_state_dict(safetensors.torch.load_file(out["torch"]))
    with torch.no_grad():
        torch.testing.assert_close(module(test_x[:8]), models.get("simplenet").apply(trained, test_x[:8]))
    assert checkpoint.read_metadata(out["torch"])["model"] == "simplenet"
    # flax: layout recorded; numpy: torch layout, plain numpy dtypes
    assert json.loads(checkpoint.read_metadata(out["flax"])["model"]) == "simplenet"
    assert np.array_equal(safetensors.numpy.load_file(out["flax"])["conv1.kernel"],
                          trained["conv1.weight"].numpy().transpose(2, 3, 1, 0))  # fmt: skip
    as_np = safetensors.numpy.load_file(out["numpy"])
    assert all(np.array_equal(as_np[k], v.numpy()) for k, v in trained.items())
    npz = tmp_path / "w.npz"
    assert export.main(["--weights", str(weights_file), "--format", "numpy", "--out", str(npz)]) == 0
    with np.load(npz, allow_pickle=False) as z:
        assert all(np.array_equal(z[k], v.numpy()) for k, v in trained.items())
    capsys.readouterr()


def test_export_cli_errors_are_one_line(capsys, weights_file, tmp_path):
    state = tmp_path / "last.safetensors"
    st = state_lib.create(models.get("mlp").init(torch.Generator()), optim.sgd(0.1), seed=0)
    checkpoint.save_state(state, st, metadata={"model": "mlp"})
    cases = [
        (["--weights", str(tmp_path / "none.safetensors"), "--format", "torch"], "no such file"),
        (["--weights", str(state), "--format", "flax"], "train state"),
        (["--weights", str(weights_file), "--format", "numpy", "--bf16-as", "bfloat16"], "no bfloat16"),
        (["--weights", str(weights_file), "--format", "onnx"], "invalid choice"),
        (["--weights", str(weights_file), "--format", "torch", "--model", "mlp"], "do not match"),
    ]
    for argv, needle in cases:
        assert export.main([*argv, "--out", str(tmp_path / "o.safetensors")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("export.py: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.safetensors").exists()
