"""Weights that load anywhere: plain `torch.nn.Module`s, JAX/Flax, numpy, DLPack, ONNX.

One module per ecosystem, every public name re-exported here (`interop.to_module`, ...):
`torch_modules` (plain modules whose `state_dict` and eval-mode forward equal our weights and
`Model.apply`), `torch_io` (params <-> those modules, any `nn.Module` as a `Model`),
`weights_file` (a validated weights file and its model), `numpy_io`, `flax_io` (Flax layout and
naming), `flax_modules` (our models as `flax.linen` modules), `jax_io` (a pure-JAX SimpleNet),
`dlpack_io` (zero-copy tensor exchange), `optax_io` (a run continued in optax / Flax and back),
`orbax_io` (that state as an Orbax checkpoint) and `onnx_io` (an ONNX model of images to logits).
JAX/Flax and ONNX are optional extras (`pip install fashion_func[jax]`, `fashion_func[onnx]`),
imported only inside the functions that need them. Nothing in the core imports this package.
"""

from __future__ import annotations

from fashion_func.interop.dlpack_io import from_jax, to_jax
from fashion_func.interop.flax_io import flax_variables, from_flax, load_flax, save_flax, to_flax
from fashion_func.interop.flax_modules import flax_module
from fashion_func.interop.jax_io import simplenet_jax

# importable here by module path for the app and the tests; not in __all__
from fashion_func.interop.numpy_io import BF16_AS, save_numpy, to_numpy  # noqa: F401
from fashion_func.interop.onnx_io import save_onnx
from fashion_func.interop.optax_io import (
    flax_train_state,
    from_flax_train_state,
    from_optax,
    load_for_optax,
    load_train_state,
    optax_optimizer,
    save_resume,
    to_optax,
)
from fashion_func.interop.orbax_io import load_orbax, save_orbax
from fashion_func.interop.torch_io import (  # noqa: F401
    from_module,
    functionalize,
    identify,
    merge_state,
    split_state,
    to_module,
)
from fashion_func.interop.torch_modules import (
    DPCNN,
    MLP,
    AlexNet,
    ResNet,
    ScatterNet,
    ScatterNetMS,
    ScatterNetMS3,
    SimpleNet,
    SimpleNetBN,
)
from fashion_func.interop.weights_file import known_normalization, load_weights_file, normalization  # noqa: F401

__all__ = [
    "DPCNN",
    "MLP",
    "AlexNet",
    "ResNet",
    "ScatterNet",
    "ScatterNetMS",
    "ScatterNetMS3",
    "SimpleNet",
    "SimpleNetBN",
    "flax_module",
    "flax_train_state",
    "flax_variables",
    "from_flax",
    "from_flax_train_state",
    "from_jax",
    "from_module",
    "from_optax",
    "functionalize",
    "load_flax",
    "load_for_optax",
    "load_orbax",
    "load_train_state",
    "load_weights_file",
    "optax_optimizer",
    "save_flax",
    "save_numpy",
    "save_onnx",
    "save_orbax",
    "save_resume",
    "simplenet_jax",
    "to_flax",
    "to_jax",
    "to_module",
    "to_numpy",
    "to_optax",
]
