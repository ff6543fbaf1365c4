"""Interop: plain modules, research modules, Flax/numpy files, a pure-JAX forward, DLPack, export CLI."""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn as tnn

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before any jax import: CPU unless told otherwise

from reference import assert_argmax_agrees, briefly_trained_simplenet

from fashion_func import checkpoint, data, interop, models, optim, preprocess, step
from fashion_func import state as state_lib
from fashion_func.cli import export
from fashion_func.interop import flax_io


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """SimpleNet after a few Adam steps on real images (logits of a few units, not init's ~0.1)."""
    return briefly_trained_simplenet(limit=768, lr=3e-3)


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    """256 real test images, normalised, NCHW."""
    return preprocess.normalize(data.load("test", limit=256).images)


@pytest.fixture(scope="module")
def weights_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "best.safetensors"
    checkpoint.save_weights(path, trained, metadata={"model": "simplenet", "epoch": 1})
    return path


# -- nn.Module <-> params ------------------------------------------------------------------------


@pytest.mark.cross_path
@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("mlp", {"H": 32}),
        ("simplenet", {}),
        ("alexnet", {}),
        ("dpcnn", {"groups": 0}),
        ("dpcnn", {"groups": 4}),
    ],
)
def test_to_module_has_the_same_keys_and_forward(name, hparams):
    model = models.get(name, **hparams)
    params = model.init(torch.Generator().manual_seed(1))
    # dpcnn's group count is not in its shapes: given (the others' hparams are read off the shapes)
    module = interop.to_module(name, params, **({"groups": hparams["groups"]} if name == "dpcnn" else {}))
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


@pytest.mark.cross_path
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


@pytest.mark.cross_path
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
        F.cross_entropy(reference(preprocess.normalize(images)), labels).backward()
        opt.step()
    for k, v in reference.named_parameters():
        torch.testing.assert_close(st.params[k], v.detach(), rtol=1e-5, atol=1e-6)
    # the wrapped module itself was never changed, and its buffer was not trained
    torch.manual_seed(0)
    fresh = Research()
    assert module.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in module.state_dict().items())
    x = preprocess.normalize(train.images[:4])
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
    assert np.array_equal(tree["fc2"]["kernel"], trained["fc2.weight"].numpy().T)
    # fc1 follows the flatten of the [64, 12, 12] feature map: its rows in NHWC (h w c) order
    fc1 = trained["fc1.weight"].numpy().reshape(128, 64, 12, 12)  # [out, c, h, w]
    assert np.array_equal(tree["fc1"]["kernel"], fc1.transpose(2, 3, 1, 0).reshape(9216, 128))
    assert all(a.flags.c_contiguous for d in tree.values() for a in d.values())
    back = interop.from_flax(tree)
    assert list(back) == list(trained) and all(torch.equal(back[k], trained[k]) for k in trained)
    # the old layout on request: torch's (c h w) rows, a plain transpose
    chw = interop.to_flax(trained, flatten="chw")
    assert np.array_equal(chw["fc1"]["kernel"], trained["fc1.weight"].numpy().T)
    assert all(torch.equal(interop.from_flax(chw, flatten="chw")[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match="flatten must be"):
        interop.to_flax(trained, flatten="whc")


def test_flatten_shapes_come_from_the_models():
    assert flax_io._flatten_inputs("simplenet", (("num_classes", 10),)) == {"fc1": (64, 12, 12)}
    assert flax_io._flatten_inputs("simplenet_bn", (("num_classes", 10),)) == {"fc1": (64, 12, 12)}
    assert flax_io._flatten_inputs("alexnet", (("dropout", 0.5), ("num_classes", 10))) == {"fc1": (256, 3, 3)}
    assert flax_io._flatten_inputs("mlp", (("D_in", 784), ("D_out", 10), ("H", 100))) == {}
    # mlp: no conv, its dense kernels are plain transposes; alexnet: fc1 only
    mlp = models.get("mlp", H=16).init(torch.Generator().manual_seed(0))
    assert np.array_equal(interop.to_flax(mlp)["linear1"]["kernel"], mlp["linear1.weight"].numpy().T)
    alex = models.get("alexnet").init(torch.Generator().manual_seed(0))
    tree = interop.to_flax(alex)
    w = alex["fc1.weight"].numpy().reshape(1024, 256, 3, 3)
    assert np.array_equal(tree["fc1"]["kernel"], w.transpose(2, 3, 1, 0).reshape(2304, 1024))
    assert np.array_equal(tree["fc2"]["kernel"], alex["fc2.weight"].numpy().T)
    assert all(torch.equal(interop.from_flax(tree)[k], v) for k, v in alex.items())
    # weights of no known architecture: layer by layer, nothing reordered
    assert np.array_equal(interop.to_flax({"fc.weight": torch.ones(2, 3)})["fc"]["kernel"], np.ones((3, 2)))


def test_flax_file_loads_with_safetensors_flax_and_numpy(trained, tmp_path):
    pytest.importorskip("jax")
    from flax.traverse_util import unflatten_dict
    from safetensors.flax import load_file as flax_load

    path = tmp_path / "flax.safetensors"
    interop.save_flax(path, trained, metadata={"model": "simplenet", "epoch": 2})
    raw = safetensors.safe_open(str(path), "np").metadata()
    assert raw["model"] == "simplenet" and raw["flatten"] == "hwc" and raw["layout"] == "flax"
    assert checkpoint.read_metadata(path)["epoch"] == 2
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


def test_flax_files_written_before_the_flatten_order_still_load(trained, tmp_path):
    """A file as save_flax wrote it before: fc1 rows (c h w), no `flatten`, metadata all JSON."""
    tree = interop.to_flax(trained, flatten="chw")
    flat = {f"{a}.{b}": v for a, d in tree.items() for b, v in d.items()}
    meta = {"model": json.dumps("simplenet"), "layout": "flax", "bf16_as": "float32", "bf16_keys": "[]"}
    old = tmp_path / "old_flax.safetensors"
    old.write_bytes(safetensors.numpy.save(flat, metadata=meta))
    back = interop.load_flax(old)
    assert all(torch.equal(back[k], trained[k]) for k in trained)
    # and a file written now in the old order on request says so
    chw = tmp_path / "chw.safetensors"
    interop.save_flax(chw, trained, flatten="chw")
    assert checkpoint.read_metadata(chw)["flatten"] == "chw"
    assert all(torch.equal(interop.load_flax(chw)[k], trained[k]) for k in trained)


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


@pytest.mark.cross_path
def test_jax_simplenet_matches_apply_on_real_test_images(trained, test_x, tmp_path):
    pytest.importorskip("jax")
    import jax.numpy as jnp
    from einops import rearrange
    from flax.traverse_util import unflatten_dict
    from safetensors.flax import load_file as flax_load

    path = tmp_path / "simplenet_flax.safetensors"
    interop.save_flax(path, trained)
    params = unflatten_dict(flax_load(path), sep=".")  # what a JAX user does with the file
    old = tmp_path / "old.safetensors"  # an old (c h w) file converts with to_flax(load_flax(p))
    interop.save_flax(old, trained, flatten="chw")
    converted = interop.to_flax(interop.load_flax(old))
    assert all(
        np.array_equal(converted[a][b], np.asarray(params[a][b])) for a in converted for b in converted[a]
    )
    x_nhwc = jnp.asarray(rearrange(test_x, "b c h w -> b h w c").numpy())
    got = np.asarray(interop.simplenet_jax(params, x_nhwc))
    with torch.no_grad():
        expected = models.get("simplenet").apply(trained, test_x).numpy()
    assert got.shape == expected.shape == (256, 10)
    assert np.abs(expected).max() > 2.0  # trained logits, not init's near-zero ones
    assert np.abs(got - expected).max() <= 1e-4
    assert_argmax_agrees(torch.from_numpy(got.argmax(1)), torch.from_numpy(expected), 2e-4)  # the 1e-4 above


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


SAFETENSORS_FORMATS = ("torch", "flax", "numpy")  # onnx: tests/test_onnx.py


@pytest.mark.cross_path
def test_export_cli_writes_each_format(capsys, weights_file, trained, test_x, tmp_path):
    out = {f: tmp_path / f"w_{f}.safetensors" for f in SAFETENSORS_FORMATS}
    for fmt, path in out.items():
        assert export.main(["--weights", str(weights_file), "--format", fmt, "--out", str(path)]) == 0
        assert f"wrote {path}: simplenet" in capsys.readouterr().out
    # torch: a plain module loads it with nothing but safetensors
    module = interop.SimpleNet().eval()
    module.load_state_dict(safetensors.torch.load_file(out["torch"]))
    with torch.no_grad():
        torch.testing.assert_close(module(test_x[:8]), models.get("simplenet").apply(trained, test_x[:8]))
    assert checkpoint.read_metadata(out["torch"])["model"] == "simplenet"
    for path in out.values():  # any safetensors reader sees the model name as it is
        assert safetensors.safe_open(str(path), "np").metadata()["model"] == "simplenet"
    # the source file has no config: how inputs were normalised is unknown, so not written
    assert "normalize_mean" not in checkpoint.read_metadata(out["torch"])
    # flax: layout recorded; numpy: torch layout, plain numpy dtypes
    assert checkpoint.read_metadata(out["flax"])["model"] == "simplenet"
    assert np.array_equal(safetensors.numpy.load_file(out["flax"])["conv1.kernel"],
                          trained["conv1.weight"].numpy().transpose(2, 3, 1, 0))  # fmt: skip
    as_np = safetensors.numpy.load_file(out["numpy"])
    assert all(np.array_equal(as_np[k], v.numpy()) for k, v in trained.items())
    npz = tmp_path / "w.npz"
    assert export.main(["--weights", str(weights_file), "--format", "numpy", "--out", str(npz)]) == 0
    with np.load(npz, allow_pickle=False) as z:
        assert all(np.array_equal(z[k], v.numpy()) for k, v in trained.items())
    capsys.readouterr()


def test_normalization_comes_from_the_weights_metadata():
    assert interop.known_normalization({"model": "simplenet"}) is None
    assert interop.normalization({}) == (data.MEAN, data.STD)
    assert interop.normalization({"config": {"normalize": "tutorial"}}) == (0.5, 0.5)
    assert interop.normalization({"config": {"normalize": "dataset"}}) == (data.MEAN, data.STD)
    assert interop.known_normalization({"config": {"lr": 1.0}}) == (data.MEAN, data.STD)  # config default
    # recorded numbers win over the config's name; nonsense numbers are ignored
    meta = {"normalize_mean": 0.25, "normalize_std": 0.5, "config": {"normalize": "tutorial"}}
    assert interop.normalization(meta) == (0.25, 0.5)
    assert interop.normalization({"normalize_mean": 0.2, "normalize_std": 0.0}) == (data.MEAN, data.STD)
    assert interop.normalization({"normalize_mean": True, "normalize_std": 1}) == (data.MEAN, data.STD)


def test_export_records_the_normalisation_as_numbers(capsys, trained, tmp_path):
    src = tmp_path / "best.safetensors"
    checkpoint.save_weights(
        src, trained, metadata={"model": "simplenet", "config": {"normalize": "tutorial"}}
    )
    for fmt in SAFETENSORS_FORMATS:
        out = tmp_path / f"{fmt}.safetensors"
        assert export.main(["--weights", str(src), "--format", fmt, "--out", str(out)]) == 0
        meta = checkpoint.read_metadata(out)
        assert (meta["normalize_mean"], meta["normalize_std"]) == (0.5, 0.5), fmt
        raw = safetensors.safe_open(str(out), "np").metadata()
        assert (raw["normalize_mean"], raw["normalize_std"], raw["model"]) == ("0.5", "0.5", "simplenet")
    capsys.readouterr()


def test_onnx_export_without_the_extra_says_what_to_install(capsys, weights_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    out = tmp_path / "m.onnx"
    assert export.main(["--weights", str(weights_file), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fashion_func[onnx]'" in err, err
    assert not out.exists()


def test_export_cli_errors_are_one_line(capsys, weights_file, tmp_path):
    state = tmp_path / "last.safetensors"
    st = state_lib.create(models.get("mlp").init(torch.Generator()), optim.sgd(0.1), seed=0)
    checkpoint.save_state(state, st, metadata={"model": "mlp"})
    cases = [
        (["--weights", str(tmp_path / "none.safetensors"), "--format", "torch"], "no such file"),
        (["--weights", str(state), "--format", "flax"], "train state"),
        (["--weights", str(weights_file), "--format", "numpy", "--bf16-as", "bfloat16"], "no bfloat16"),
        (["--weights", str(weights_file), "--format", "tflite"], "invalid choice"),
        (["--weights", str(weights_file), "--format", "torch", "--model", "mlp"], "do not match"),
    ]
    for argv, needle in cases:
        assert export.main([*argv, "--out", str(tmp_path / "o.safetensors")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("export.py: error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.safetensors").exists()


# -- stateful models (batch norm): weights are params and buffers together ---------------------------


@pytest.fixture(scope="module")
def trained_bn() -> dict[str, torch.Tensor]:
    """simplenet_bn weights (params + buffers) after a few Adam steps: running statistics moved."""
    model = models.get("simplenet_bn")
    tx = optim.adam(3e-3)
    st = state_lib.create(
        model.init(torch.Generator().manual_seed(0)), tx, seed=0, model_state=model.init_state()
    )
    train_step = step.make_train_step(model, tx, compile=False)
    for batch in data.batches(data.load("train", limit=768), 128, seed=0, epoch=1):
        st, _ = train_step(st, batch)
    assert int(st.model_state["bn1.num_batches_tracked"]) == 6
    return interop.merge_state(st.params, st.model_state)


@pytest.fixture(scope="module")
def bn_weights_file(trained_bn, tmp_path_factory):
    path = tmp_path_factory.mktemp("bn") / "best.safetensors"
    checkpoint.save_weights(path, trained_bn, metadata={"model": "simplenet_bn", "epoch": 2})
    return path


def _bn_logits(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of simplenet_bn weights (running statistics), through `Model.apply`."""
    model = models.get("simplenet_bn")
    params, state = interop.split_state(model, weights)
    with torch.no_grad():
        logits, _ = model.apply(params, x, state=state)
    return logits


def test_split_and_merge_state():
    model = models.get("simplenet_bn")
    params, state = model.init(torch.Generator().manual_seed(0)), model.init_state()
    weights = interop.merge_state(params, state)
    assert list(weights) == [*params, *state]
    p, s = interop.split_state(model, weights)
    assert list(p) == list(params) and list(s) == list(state)
    assert all(p[k] is params[k] for k in p) and all(s[k] is state[k] for k in s)  # no copies
    plain = models.get("simplenet")
    plain_params = plain.init(torch.Generator().manual_seed(0))
    assert interop.split_state(plain, plain_params) == (plain_params, {})
    with pytest.raises(ValueError, match="lack its buffers"):
        interop.split_state(model, params)
    with pytest.raises(ValueError, match="both in params and model_state"):
        interop.merge_state(params, {"bn1.weight": torch.ones(32)})


def test_identify_tells_simplenet_from_simplenet_bn(trained, trained_bn):
    assert interop.identify(trained) == "simplenet"
    assert interop.identify(trained_bn) == "simplenet_bn"
    assert interop.identify(interop.SimpleNetBN().state_dict()) == "simplenet_bn"
    params, _ = interop.split_state(models.get("simplenet_bn"), trained_bn)
    with pytest.raises(ValueError, match="match none"):  # buffers belong to the weights
        interop.identify(params)


@pytest.mark.cross_path
def test_simplenet_bn_weights_load_strictly_into_plain_modules(trained_bn, bn_weights_file, test_x):
    from reference import SimpleNetBN as ReferenceBN

    expected = _bn_logits(trained_bn, test_x)
    assert expected.abs().max() > 2.0  # trained logits
    module = interop.to_module("simplenet_bn", trained_bn)
    assert isinstance(module, interop.SimpleNetBN) and not module.training
    assert list(module.state_dict()) == list(interop.from_module(module))
    assert module.bn1.num_batches_tracked.dtype == torch.int64 and int(module.bn1.num_batches_tracked) == 6
    # a weights file needs nothing but safetensors and the module, strict load included
    for cls in (interop.SimpleNetBN, ReferenceBN):
        plain = cls().eval()
        plain.load_state_dict(safetensors.torch.load_file(bn_weights_file), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(plain(test_x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(module(test_x), expected, rtol=1e-5, atol=1e-5)
        module.bn1.running_mean.add_(1.0)  # the module owns its buffers
    assert not torch.equal(trained_bn["bn1.running_mean"], module.bn1.running_mean)
    params, _ = interop.split_state(models.get("simplenet_bn"), trained_bn)
    with pytest.raises(ValueError, match="merge_state"):  # params alone: the buffers are missing
        interop.to_module("simplenet_bn", params)
    float_count = {**trained_bn, "bn1.num_batches_tracked": torch.tensor(6.0)}
    with pytest.raises(ValueError, match="dtype"):
        interop.to_module("simplenet_bn", float_count)


@pytest.mark.cross_path
def test_from_module_of_a_torch_trained_simplenet_bn():
    torch.manual_seed(0)  # the module's own init, drawn by torch
    module = interop.SimpleNetBN()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # train mode: the running statistics move, the counter counts
        x, y = torch.randn(8, 1, 28, 28, generator=g) * 2 + 1, torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    weights = interop.from_module(module)
    assert module.training  # the eval-mode check restored the mode
    sd = module.state_dict()
    assert list(weights) == list(sd)
    assert all(torch.equal(weights[k], sd[k]) and weights[k].dtype == sd[k].dtype for k in sd)
    assert all(not w.requires_grad for w in weights.values())
    assert int(weights["bn2.num_batches_tracked"]) == 3
    x = torch.randn(4, 1, 28, 28, generator=g)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(_bn_logits(weights, x), module(x), rtol=1e-5, atol=1e-5)
    weights["bn1.running_var"].mul_(2.0)  # detached copies: the module is untouched
    assert not torch.equal(weights["bn1.running_var"], module.bn1.running_var)

    class NormAfterRelu(interop.SimpleNetBN):  # SimpleNetBN's names and shapes, another computation
        def forward(self, x):
            x = self.bn2(F.relu(self.conv2(self.bn1(F.relu(self.conv1(x))))))
            return self.fc2(F.relu(self.fc1(torch.flatten(F.max_pool2d(x, 2), 1))))

    with pytest.raises(ValueError, match="computes something else"):
        interop.from_module(NormAfterRelu())


def test_load_weights_file_of_simplenet_bn(trained_bn, bn_weights_file, tmp_path):
    model, weights, meta = interop.load_weights_file(bn_weights_file)
    assert model.name == "simplenet_bn" and meta["epoch"] == 2
    assert list(weights) == list(interop.SimpleNetBN().state_dict())
    assert all(torch.equal(weights[k], trained_bn[k]) for k in trained_bn)
    assert weights["bn1.num_batches_tracked"].dtype == torch.int64
    # bf16 params beside float32 running statistics (and the int64 counter): accepted as stored
    mixed = {
        k: v.bfloat16() if k in interop.split_state(model, weights)[0] else v for k, v in weights.items()
    }
    path = tmp_path / "bf16.safetensors"
    checkpoint.save_weights(path, mixed, metadata={"model": "simplenet_bn"})
    _, w16, _ = interop.load_weights_file(path)
    assert w16["fc1.weight"].dtype == torch.bfloat16 and w16["bn1.running_var"].dtype == torch.float32
    # a file without the buffers, or simplenet weights named simplenet_bn, is refused
    no_buffers = tmp_path / "no_buffers.safetensors"
    checkpoint.save_weights(
        no_buffers, interop.split_state(model, weights)[0], metadata={"model": "simplenet_bn"}
    )
    with pytest.raises(checkpoint.CheckpointError, match="missing 6 keys"):
        interop.load_weights_file(no_buffers)
    with pytest.raises(checkpoint.CheckpointError, match="weights do not match"):
        interop.load_weights_file(bn_weights_file, "simplenet")


def test_flax_layout_of_batch_norm_and_round_trip(trained_bn, tmp_path):
    tree = interop.to_flax(trained_bn)
    assert {k: {kk: v.shape for kk, v in d.items()} for k, d in tree.items() if k.startswith("bn")} == {
        "bn1": {"scale": (32,), "bias": (32,), "mean": (32,), "var": (32,)},
        "bn2": {"scale": (64,), "bias": (64,), "mean": (64,), "var": (64,)},
    }
    assert np.array_equal(tree["bn2"]["var"], trained_bn["bn2.running_var"].numpy())
    variables = interop.flax_variables(tree)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]["bn1"]) == {"scale", "bias"}
    assert {k: set(v) for k, v in variables["batch_stats"].items()} == {
        "bn1": {"mean", "var"},
        "bn2": {"mean", "var"},
    }
    assert set(interop.flax_variables(interop.to_flax({"fc.weight": torch.ones(2, 3)}))) == {"params"}
    # from_flax: the counter is not in the Flax tree; it comes back as 0 (or as given)
    back = interop.from_flax(tree)
    module_order = list(interop.SimpleNetBN().state_dict())  # counters right after running_var
    assert list(back) == module_order
    assert int(back["bn1.num_batches_tracked"]) == 0 and back["bn1.num_batches_tracked"].dtype == torch.int64
    assert all(
        torch.equal(back[k], trained_bn[k]) for k in trained_bn if not k.endswith("num_batches_tracked")
    )
    counted = interop.from_flax(tree, num_batches_tracked={"bn1": 6, "bn2": 6})
    assert all(torch.equal(counted[k], trained_bn[k]) for k in trained_bn)
    # save_flax keeps the counts in the metadata, so load_flax is exact
    path = tmp_path / "bn_flax.safetensors"
    interop.save_flax(path, trained_bn)
    flat = safetensors.numpy.load_file(path)
    assert not any("num_batches_tracked" in k for k in flat) and "bn1.mean" in flat
    assert checkpoint.read_metadata(path)["num_batches_tracked"] == {"bn1": 6, "bn2": 6}
    loaded = interop.load_flax(path)
    assert loaded.keys() == trained_bn.keys()  # in the file's (sorted) order
    assert all(torch.equal(loaded[k], trained_bn[k]) for k in trained_bn)
    bits = tmp_path / "bn_bits.safetensors"  # bf16 keys skip the dropped counter
    interop.save_flax(bits, {k: v.bfloat16() if v.is_floating_point() else v for k, v in trained_bn.items()},
                      bf16_as="uint16")  # fmt: skip
    assert "bn1.mean" in checkpoint.read_metadata(bits)["bf16_keys"]


@pytest.mark.cross_path
def test_export_cli_writes_simplenet_bn_in_each_format(capsys, trained_bn, bn_weights_file, test_x, tmp_path):
    out = {f: tmp_path / f"bn_{f}.safetensors" for f in SAFETENSORS_FORMATS}
    for fmt, path in out.items():
        assert export.main(["--weights", str(bn_weights_file), "--format", fmt, "--out", str(path)]) == 0
        assert f"wrote {path}: simplenet_bn weights (18 tensors)" in capsys.readouterr().out
    expected = _bn_logits(trained_bn, test_x[:16])
    module = interop.SimpleNetBN().eval()
    module.load_state_dict(safetensors.torch.load_file(out["torch"]), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(module(test_x[:16]), expected)
    as_np = safetensors.numpy.load_file(out["numpy"])
    assert as_np.keys() == trained_bn.keys()
    assert as_np["bn2.num_batches_tracked"].dtype == np.int64 and as_np["bn2.num_batches_tracked"].shape == ()
    assert all(np.array_equal(as_np[k], v.numpy()) for k, v in trained_bn.items())
    npz = tmp_path / "bn.npz"
    assert export.main(["--weights", str(bn_weights_file), "--format", "numpy", "--out", str(npz)]) == 0
    with np.load(npz, allow_pickle=False) as z:
        assert all(np.array_equal(z[k], v.numpy()) for k, v in trained_bn.items())
    flax_flat = safetensors.numpy.load_file(out["flax"])
    assert {k for k in flax_flat if k.startswith("bn1.")} == {"bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"}
    loaded = interop.load_flax(out["flax"])
    assert all(torch.equal(loaded[k], trained_bn[k]) for k in trained_bn)
    capsys.readouterr()


@pytest.mark.cross_path
def test_flax_linen_simplenet_bn_matches_eval_logits(trained_bn, test_x, tmp_path):
    pytest.importorskip("flax", reason="the jax extra (jax, flax) is not installed")
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp
    from einops import rearrange
    from flax.traverse_util import unflatten_dict
    from safetensors.flax import load_file as flax_load

    class FlaxSimpleNetBN(fnn.Module):
        """simplenet_bn written the Flax way: NHWC, nn.Conv / nn.BatchNorm / nn.Dense."""

        num_classes: int = 10

        @fnn.compact
        def __call__(self, x):  # [B, 28, 28, 1]
            norm = lambda name: fnn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, name=name)
            x = fnn.relu(norm("bn1")(fnn.Conv(32, (3, 3), padding="VALID", name="conv1")(x)))
            x = fnn.relu(norm("bn2")(fnn.Conv(64, (3, 3), padding="VALID", name="conv2")(x)))
            x = fnn.max_pool(x, (2, 2), strides=(2, 2))  # [B, 12, 12, 64]
            x = x.reshape((x.shape[0], -1))  # flattened as Flax code does: (h w c), as the file's fc1
            x = fnn.relu(fnn.Dense(128, name="fc1")(x))
            return fnn.Dense(self.num_classes, name="fc2")(x)

    path = tmp_path / "bn_flax.safetensors"
    interop.save_flax(path, trained_bn)
    variables = interop.flax_variables(unflatten_dict(flax_load(path), sep="."))
    x_nhwc = jnp.asarray(rearrange(test_x, "b c h w -> b h w c").numpy())
    net = FlaxSimpleNetBN()
    # the file's names and shapes are exactly the variables Flax itself would create
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x_nhwc[:1])
    assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == jax.tree_util.tree_map(
        lambda a: a.shape, variables
    )
    got = np.asarray(net.apply(variables, x_nhwc))
    expected = _bn_logits(trained_bn, test_x).numpy()
    assert got.shape == expected.shape == (256, 10)
    assert np.abs(got - expected).max() <= 1e-4
    assert_argmax_agrees(torch.from_numpy(got.argmax(1)), torch.from_numpy(expected), 2e-4)  # the 1e-4 above
