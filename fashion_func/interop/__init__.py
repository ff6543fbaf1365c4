"""Weights that load anywhere: plain `torch.nn.Module`s, JAX/Flax, numpy, DLPack, ONNX.

One module per ecosystem, every public name re-exported here (`interop.to_module`, ...):

- `torch_modules`: the plain modules (`SimpleNet`, `SimpleNetBN`, `ResNet`, ...) whose
  `state_dict` names, shapes and eval-mode forward equal our weights and `Model.apply`.
- `torch_io`: `to_module(name, params)` / `from_module(module)` between our params and those
  modules; `identify(params)`; `split_state` / `merge_state` between a stateful model's weights
  (params and buffers in one flat dict under the module's `state_dict` names, as
  `best.safetensors` holds them) and `(params, model_state)`; `functionalize(module)`: any
  research `nn.Module` as a `Model` (through `torch.func.functional_call`).
- `weights_file`: `load_weights_file`, a validated weights file plus the model its metadata
  names; `normalization(metadata)`: the (mean, std) its model was trained with.
- `numpy_io`: `to_numpy` / `save_numpy`, torch names and layout in dtypes numpy has.
- `flax_io`: `to_flax` / `from_flax` / `save_flax` / `load_flax` / `flax_variables`, Flax layout
  and naming (`{"conv1": {"kernel": HWIO, "bias"}}`, dense kernels `[in, out]`, batch norm
  `scale`, `bias`, `mean`, `var`), stored as safetensors with dotted keys.
- `flax_modules`: `flax_module(name)`, our models as idiomatic `flax.linen` modules.
- `jax_io`: `simplenet_jax`, a pure-JAX SimpleNet forward on the exported weights.
- `dlpack_io`: `to_jax` / `from_jax`, zero-copy tensor exchange where both sides allow.
- `optax_io`: a run continued in optax / Flax and back: `to_optax(state_or_path, tx)` ->
  `(params, opt_state)` as optax's NamedTuples, `optax_optimizer(tx)` the optax chain computing
  our update, `flax_train_state`, `from_optax` / `from_flax_train_state`, and `save_resume`, a
  `last.safetensors` that the command line's resume continues; `load_train_state(path, tx)`, a
  run's `TrainState` and metadata read without a template (old name: `load_for_optax`).
- `orbax_io`: `save_orbax` / `load_orbax`, that state as an Orbax checkpoint directory.
- `onnx_io`: `save_onnx`, an ONNX model (uint8 images in, normalisation inside, logits out).

JAX/Flax and ONNX are optional extras (`pip install fashion_func[jax]`, `fashion_func[onnx]`):
they are imported only inside the functions that need them. Nothing in the core imports this package.
"""

from __future__ import annotations

from fashion_func.interop.dlpack_io import from_jax, to_jax
from fashion_func.interop.flax_io import (
    flax_variables,
    from_flax,
    load_flax,
    save_flax,
    to_flax,
)
from fashion_func.interop.flax_modules import flax_module
from fashion_func.interop.jax_io import simplenet_jax

# importable here by module path for the app and the tests; not in __all__
from fashion_func.interop.numpy_io import (
    BF16_AS,  # noqa: F401
    save_numpy,
    to_numpy,
)
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
from fashion_func.interop.torch_modules import DPCNN, MLP, AlexNet, ResNet, ScatterNet, SimpleNet, SimpleNetBN
from fashion_func.interop.weights_file import known_normalization, load_weights_file, normalization  # noqa: F401

__all__ = [
    "DPCNN",
    "MLP",
    "AlexNet",
    "ResNet",
    "ScatterNet",
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
