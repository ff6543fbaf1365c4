"""`interop.flax_module`: our models as idiomatic `flax.linen` modules, run with Flax's own API on
weights read from a `save_flax` file the way a Flax user reads it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.flax
import torch
from einops import rearrange

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before any jax import: CPU unless told otherwise

pytest.importorskip(
    "flax", reason="the jax extra (jax, flax) is not installed: pip install 'fashion_func[jax]'"
)

import jax
import jax.numpy as jnp
from flax.traverse_util import unflatten_dict

from fashion_func import data, interop, models, optim, step
from fashion_func import state as state_lib

NAMES = ("mlp", "simplenet", "simplenet_bn", "alexnet", "resnet", "dpcnn")
_TRAINED: dict[str, dict[str, torch.Tensor]] = {}


def trained_weights(name: str) -> dict[str, torch.Tensor]:
    """Weights (params, plus buffers for simplenet_bn) after a few Adam steps on real images."""
    if name not in _TRAINED:
        model = models.get(name)
        tx = optim.adam(3e-3)
        st = state_lib.create(
            model.init(torch.Generator().manual_seed(0)), tx, seed=0, model_state=model.init_state()
        )
        train_step = step.make_train_step(model, tx, compile=False)
        batch = 32 if name == "alexnet" else 64  # alexnet is ~10x the FLOPs: keep the CPU time small
        for b in data.batches(data.load("train", limit=3 * batch), batch, seed=0, epoch=1):
            st, _ = train_step(st, b)
        if model.stateful:
            counts = [int(v) for k, v in st.model_state.items() if k.endswith("num_batches_tracked")]
            assert counts and set(counts) == {3}  # running statistics moved
        _TRAINED[name] = interop.merge_state(st.params, st.model_state)
    return _TRAINED[name]


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    """64 real test images, normalised, NCHW float32."""
    return data.normalize(data.load("test", limit=64).images)


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(rearrange(x, "b c h w -> b h w c").numpy())


def torch_logits(name: str, weights: dict[str, torch.Tensor], x: torch.Tensor, **kw) -> torch.Tensor:
    model = models.get(name)
    params, state = interop.split_state(model, weights)
    with torch.no_grad():
        if model.stateful:
            return model.apply(params, x, state=state, **kw)[0]
        return model.apply(params, x, **kw)


def flax_file_variables(weights: dict[str, torch.Tensor], path) -> dict:
    """What a Flax user does with an exported file: safetensors.flax, unflatten, collections."""
    interop.save_flax(path, weights)
    return interop.flax_variables(unflatten_dict(safetensors.flax.load_file(str(path)), sep="."))


def shapes(tree) -> dict:
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name", NAMES)
def test_flax_module_reproduces_the_torch_logits(name, test_x, tmp_path):
    weights = trained_weights(name)
    variables = flax_file_variables(weights, tmp_path / f"{name}_flax.safetensors")
    module = interop.flax_module(name)
    x = nhwc(test_x)
    # the file holds exactly the variables Flax itself creates for the module
    assert shapes(jax.eval_shape(module.init, jax.random.PRNGKey(0), x[:1])) == shapes(variables)
    stateful = models.get(name).stateful
    assert set(variables) == ({"params", "batch_stats"} if stateful else {"params"})
    got = np.asarray(module.apply(variables, x))  # eval mode: train=False is the default
    expected = torch_logits(name, weights, test_x).numpy()
    assert got.shape == expected.shape == (64, 10)
    assert np.abs(expected).max() > 0.1  # trained weights (alexnet and resnet start with small logits)
    assert np.abs(got - expected).max() <= 1e-4
    if name not in ("mlp", "resnet"):  # the tolerance means something: fc1 in torch's row order is off
        chw = interop.flax_variables(interop.to_flax(weights, flatten="chw"))
        assert np.abs(np.asarray(module.apply(chw, x)) - expected).max() > 1e-2


def test_the_flatten_order_is_what_makes_the_idiomatic_module_right(test_x, tmp_path):
    weights = trained_weights("simplenet")
    old = tmp_path / "chw.safetensors"  # the old layout: fc1 rows in torch's (c h w) order
    interop.save_flax(old, weights, flatten="chw")
    wrong = interop.flax_variables(unflatten_dict(safetensors.flax.load_file(str(old)), sep="."))
    x = nhwc(test_x[:16])
    expected = torch_logits("simplenet", weights, test_x[:16]).numpy()
    assert np.abs(np.asarray(interop.flax_module("simplenet").apply(wrong, x)) - expected).max() > 0.1
    # the same file through load_flax (which reads its `flatten`) and to_flax is right again
    right = interop.flax_variables(interop.to_flax(interop.load_flax(old)))
    assert np.abs(np.asarray(interop.flax_module("simplenet").apply(right, x)) - expected).max() <= 1e-4


def test_simplenet_bn_trains_its_batch_stats_in_flax(test_x, tmp_path):
    weights = trained_weights("simplenet_bn")
    variables = flax_file_variables(weights, tmp_path / "bn.safetensors")
    module = interop.flax_module("simplenet_bn")
    logits, updates = module.apply(variables, nhwc(test_x), train=True, mutable=["batch_stats"])
    model = models.get("simplenet_bn")
    params, state = interop.split_state(model, weights)
    with torch.no_grad():
        expected, new_state = model.apply(params, test_x, train=True, state=state)
    # batch statistics normalise in both; momentum 0.9 in Flax is torch's 0.1
    assert np.abs(np.asarray(logits) - expected.numpy()).max() <= 1e-4
    for layer in ("bn1", "bn2"):
        got_mean = np.asarray(updates["batch_stats"][layer]["mean"])
        assert np.abs(got_mean - new_state[f"{layer}.running_mean"].numpy()).max() <= 1e-5
    assert not np.allclose(got_mean, np.asarray(variables["batch_stats"]["bn2"]["mean"]))


def test_alexnet_dropout_follows_the_train_flag(test_x, tmp_path):
    variables = flax_file_variables(trained_weights("alexnet"), tmp_path / "alexnet.safetensors")
    module = interop.flax_module("alexnet")
    x = nhwc(test_x[:8])
    eval_logits = np.asarray(module.apply(variables, x, train=False))
    assert np.array_equal(eval_logits, np.asarray(module.apply(variables, x)))
    dropped = np.asarray(module.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    assert dropped.shape == eval_logits.shape and not np.allclose(dropped, eval_logits)
    assert interop.flax_module("alexnet", dropout=0.0, num_classes=3).dropout == 0.0


def test_flax_module_hparams_and_errors():
    mlp = interop.flax_module("mlp", H=16)
    assert (mlp.D_in, mlp.H, mlp.D_out) == (784, 16, 10)
    params = mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    flat_in = mlp.apply(params, jnp.ones((2, 784)))
    assert np.array_equal(np.asarray(flat_in), np.asarray(mlp.apply(params, jnp.ones((2, 28, 28, 1)))))
    assert interop.flax_module("simplenet", num_classes=5).num_classes == 5
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        interop.flax_module("nope")
    assert interop.flax_module("resnet", width=4).width == 4  # its training: tests/test_optax_interop.py
    with pytest.raises(ValueError, match="torch_bn applies to models with batch norm"):
        interop.flax_module("simplenet", torch_bn=True)
    with pytest.raises(TypeError):
        interop.flax_module("simplenet", width=3)


def test_export_flax_of_a_dpcnn_with_group_norm_runs_in_flax(test_x, tmp_path, capsys):
    """`export --format flax` of a trained dpcnn whose file records groups=4: Flax's GroupNorm
    (scale, bias from gn1, gn2) and the hwc-ordered fc1 reproduce our logits."""
    from fashion_func import checkpoint
    from fashion_func.cli import export

    model = models.get("dpcnn", groups=4)
    tx = optim.adam(1e-2)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0)
    train_step = step.make_train_step(model, tx, compile=False)
    for b in data.batches(data.load("train", limit=192), 64, seed=0, epoch=1):
        st, _ = train_step(st, b)
    assert not torch.equal(st.params["gn2.weight"], torch.ones(32))  # the affine is trained
    src, out = tmp_path / "best.safetensors", tmp_path / "dpcnn_flax.safetensors"
    checkpoint.save_weights(src, st.params, metadata={"model": "dpcnn", "model_hparams": model.hparams})
    assert export.main(["--weights", str(src), "--format", "flax", "--out", str(out)]) == 0
    capsys.readouterr()
    variables = interop.flax_variables(unflatten_dict(safetensors.flax.load_file(str(out)), sep="."))
    assert set(variables["params"]["gn1"]) == {"scale", "bias"}
    module = interop.flax_module("dpcnn", groups=4)
    x = nhwc(test_x)
    assert shapes(jax.eval_shape(module.init, jax.random.PRNGKey(0), x[:1])) == shapes(variables)
    got = np.asarray(module.apply(variables, x))
    with torch.no_grad():
        expected = model.apply(st.params, test_x).numpy()
    assert np.abs(expected).max() > 0.5
    assert np.abs(got - expected).max() <= 1e-4
    # the group count matters: the same file read with one group is off
    other = np.asarray(interop.flax_module("dpcnn", groups=1).apply(variables, x))
    assert np.abs(other - expected).max() > 1e-2
