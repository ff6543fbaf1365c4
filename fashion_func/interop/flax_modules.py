"""Our models as idiomatic `flax.linen` modules, for the weights `flax_io` writes.

flax is an optional extra (`pip install fashion_func[jax]`): the classes are defined on first use.
"""

from __future__ import annotations

import functools
from typing import Any

from fashion_func import models

__all__ = ["FLAX_MODELS", "flax_module"]

# the models `flax_module` has a module for (the keys of `_flax_classes`, known without flax)
FLAX_MODELS = ("mlp", "simplenet", "simplenet_bn", "alexnet")


@functools.cache
def _flax_classes() -> dict[str, Any]:
    """The `flax.linen` modules of our models (defined on first use: flax is an optional extra)."""
    import flax.linen as fnn

    return {"mlp": _mlp(fnn), "simplenet": _simplenet(fnn), "simplenet_bn": _simplenet_bn(fnn),
            "alexnet": _alexnet(fnn)}  # fmt: skip


def _flat(x: Any) -> Any:
    return x.reshape((x.shape[0], -1))  # NHWC flattened as it lies: (h w c), as to_flax writes


def _pool(fnn: Any, x: Any) -> Any:
    return fnn.max_pool(x, (2, 2), strides=(2, 2))  # floor, as torch's max_pool2d(x, 2)


def _mlp(fnn: Any) -> type:
    class MLP(fnn.Module):
        """The tutorial's TwoLayerNet: flatten, `linear1`, ReLU, `linear2`."""

        D_in: int = 784
        H: int = 100
        D_out: int = 10

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1] or [B, D_in]
            x = _flat(x)
            if x.shape[-1] != self.D_in:
                raise ValueError(f"MLP expects {self.D_in} features per example, got {x.shape[-1]}")
            x = fnn.relu(fnn.Dense(self.H, name="linear1")(x))
            return fnn.Dense(self.D_out, name="linear2")(x)

    return MLP


def _simplenet(fnn: Any) -> type:
    class SimpleNet(fnn.Module):
        """The reference network, NHWC: conv 1->32, conv 32->64, max-pool 2, fc 9216->128, fc."""

        num_classes: int = 10

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            x = fnn.relu(fnn.Conv(32, (3, 3), padding="VALID", name="conv1")(x))  # [B, 26, 26, 32]
            x = fnn.relu(fnn.Conv(64, (3, 3), padding="VALID", name="conv2")(x))  # [B, 24, 24, 64]
            x = _flat(_pool(fnn, x))  # [B, 9216]
            x = fnn.relu(fnn.Dense(128, name="fc1")(x))
            return fnn.Dense(self.num_classes, name="fc2")(x)

    return SimpleNet


def _simplenet_bn(fnn: Any) -> type:
    class SimpleNetBN(fnn.Module):
        """SimpleNet with batch norm after each convolution, before its ReLU (`batch_stats`)."""

        num_classes: int = 10

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            # Flax's momentum is the weight of the old statistics: torch's 0.1 of the new is 0.9 here
            def norm(name: str) -> Any:
                return fnn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)

            x = fnn.relu(norm("bn1")(fnn.Conv(32, (3, 3), padding="VALID", name="conv1")(x)))
            x = fnn.relu(norm("bn2")(fnn.Conv(64, (3, 3), padding="VALID", name="conv2")(x)))
            x = _flat(_pool(fnn, x))  # [B, 9216]
            x = fnn.relu(fnn.Dense(128, name="fc1")(x))
            return fnn.Dense(self.num_classes, name="fc2")(x)

    return SimpleNetBN


def _alexnet(fnn: Any) -> type:
    class AlexNet(fnn.Module):
        """AlexNet for 28x28x1 inputs (3x3 kernels, padding 1), dropout before fc1 and fc2."""

        num_classes: int = 10
        dropout: float = 0.5

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            def conv(features: int, name: str) -> Any:
                return fnn.Conv(features, (3, 3), padding=1, name=name)

            x = _pool(fnn, fnn.relu(conv(64, "conv1")(x)))  # [B, 14, 14, 64]
            x = _pool(fnn, fnn.relu(conv(192, "conv2")(x)))  # [B, 7, 7, 192]
            x = fnn.relu(conv(384, "conv3")(x))
            x = fnn.relu(conv(256, "conv4")(x))
            x = _pool(fnn, fnn.relu(conv(256, "conv5")(x)))  # [B, 3, 3, 256]
            x = fnn.Dropout(self.dropout, deterministic=not train)(_flat(x))  # [B, 2304]
            x = fnn.Dropout(self.dropout, deterministic=not train)(fnn.relu(fnn.Dense(1024, name="fc1")(x)))
            x = fnn.relu(fnn.Dense(1024, name="fc2")(x))
            return fnn.Dense(self.num_classes, name="fc3")(x)

    return AlexNet


def flax_module(name: str, **hparams: Any) -> Any:
    """The `flax.linen.Module` of model `name`, written the Flax way, for weights from `to_flax`.

    NHWC inputs (`[B, 28, 28, 1]`, normalised as for `Model.apply`; mlp also takes `[B, 784]`),
    `nn.Conv` / `nn.Dense` / `nn.BatchNorm` under our layer names, the conv features flattened
    with `x.reshape((B, -1))`; called as `module.apply(variables, x, train=False)`, where
    `variables = flax_variables(unflatten_dict(safetensors.flax.load_file(p), sep="."))` for a
    file from `save_flax` (or `flax_variables(to_flax(weights))`). Its eval-mode logits equal
    `models.get(name).apply`'s. simplenet_bn keeps its running statistics in Flax's
    `batch_stats` collection: `nn.BatchNorm(use_running_average=not train, momentum=0.9,
    epsilon=1e-5)`, so train with `mutable=["batch_stats"]`; alexnet's dropout is active when
    `train=True` and then needs `rngs={"dropout": key}`. `hparams` are the model's
    (`num_classes`; mlp `D_in`, `H`, `D_out`; alexnet `dropout`). Needs the optional `jax` extra.
    """
    model = models.get(name, **hparams)  # ValueError naming the choices, TypeError for a bad hparam
    classes = _flax_classes()
    if model.name not in classes:
        raise ValueError(
            f"no Flax module for model {model.name!r} yet; Flax modules: {', '.join(sorted(classes))}"
        )
    return classes[model.name](**model.hparams)
