"""`save_flax` says what it did to the rows of a dense layer after a flatten, for any model.

A Flax module flattens NHWC maps in (h w c) order, torch in (c h w): the library reorders the
rows of such a layer where it knows the architecture (ours) or where the caller names the
layer and its map's shape (`flatten={layer: (c, h, w)}`), and the metadata records exactly
that; an unknown architecture with no shapes given is written as it is, recorded "none".
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fashion_func import interop, models

flax = pytest.importorskip("flax")
jnp = pytest.importorskip("jax.numpy")
import flax.linen as fnn  # noqa: E402
from flax.traverse_util import unflatten_dict  # noqa: E402
from safetensors.flax import load_file as flax_load_file  # noqa: E402


def _own_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g) * 0.3,
        "conv.bias": torch.randn(4, generator=g) * 0.1,
        "head.weight": torch.randn(10, 4 * 13 * 13, generator=g) * 0.05,
        "head.bias": torch.zeros(10),
    }


def _own_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # x: [B, 1, 28, 28]
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv.weight"], p["conv.bias"])), 2)  # [B, 4, 13, 13]
    return F.linear(h.flatten(1), p["head.weight"], p["head.bias"])  # torch's (c h w) flatten


class OwnFlax(fnn.Module):
    """The same network written the Flax way: NHWC, `x.reshape((B, -1))`."""

    @fnn.compact
    def __call__(self, x):
        x = fnn.relu(fnn.Conv(4, (3, 3), padding="VALID", name="conv")(x))
        x = fnn.max_pool(x, (2, 2), strides=(2, 2))
        return fnn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return f.metadata()


def test_an_unknown_architecture_is_recorded_as_not_reordered_and_round_trips(tmp_path):
    params = _own_params()
    path = tmp_path / "own.safetensors"
    interop.save_flax(path, params)  # no shapes given: nothing is known to follow a flatten
    meta = _meta(path)
    assert meta["flatten"] == "none" and "flatten_layers" not in meta
    back = interop.load_flax(path)
    assert all(torch.equal(back[k], params[k]) for k in params)


@pytest.mark.cross_path
def test_flatten_shapes_from_the_caller_make_a_flax_module_compute_our_logits(tmp_path):
    params = _own_params()
    path = tmp_path / "own.safetensors"
    interop.save_flax(path, params, flatten={"head": (4, 13, 13)})
    meta = _meta(path)
    assert meta["flatten"] == "hwc" and json.loads(meta["flatten_layers"]) == {"head": [4, 13, 13]}
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    variables = {"params": unflatten_dict(flax_load_file(str(path)), sep=".")}
    logits = OwnFlax().apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_allclose(np.asarray(logits), _own_forward(params, x).numpy(), atol=1e-5)
    back = interop.load_flax(path)  # the recorded layers are put back in torch's order
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_our_architectures_record_the_layers_they_reordered(tmp_path):
    params = models.get("simplenet").init(torch.Generator().manual_seed(0))
    path = tmp_path / "simplenet.safetensors"
    interop.save_flax(path, params)
    assert json.loads(_meta(path)["flatten_layers"]) == {"fc1": [64, 12, 12]}
    interop.save_flax(path, params, flatten="chw")
    assert _meta(path)["flatten"] == "chw" and "flatten_layers" not in _meta(path)


@pytest.mark.parametrize(
    "flatten",
    ["hcw", {"head": (4, 13)}, {"head": (4, 13, 0)}, {"head": (4, 12, 13)}, {"nothere": (4, 13, 13)}],
)
def test_bad_flatten_shapes_are_one_line_errors(flatten):
    with pytest.raises(ValueError) as err:
        interop.to_flax(_own_params(), flatten=flatten)
    assert "flatten" in str(err.value) and "\n" not in str(err.value)
