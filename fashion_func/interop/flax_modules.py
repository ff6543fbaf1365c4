"""Our models as idiomatic `flax.linen` modules, for the weights `flax_io` writes; `FLAX_MODELS`
names the models that have one. flax is an optional extra (`pip install fashion_func[jax]`): the
classes are defined on first use.
"""

from __future__ import annotations

import functools
from typing import Any

from fashion_func import models

__all__ = ["FLAX_MODELS", "flax_module"]

# the models `flax_module` has a module for (the keys of `_flax_classes`, known without flax)
FLAX_MODELS = ("mlp", "simplenet", "simplenet_bn", "alexnet", "resnet", "dpcnn")


@functools.cache
def _flax_classes() -> dict[str, Any]:
    """The `flax.linen` modules of our models (defined on first use: flax is an optional extra)."""
    import flax.linen as fnn

    norm = _torch_batch_norm(fnn)
    simplenet, simplenet_bn = _simplenet(fnn, norm)
    return {"mlp": _mlp(fnn), "simplenet": simplenet, "simplenet_bn": simplenet_bn,
            "alexnet": _alexnet(fnn), "resnet": _resnet(fnn, norm), "dpcnn": _dpcnn(fnn)}  # fmt: skip


def _torch_batch_norm(fnn: Any) -> type:
    """`flax.linen.BatchNorm`'s variables (`scale`, `bias`; `batch_stats` `mean`, `var`), with
    the running variance moved towards the *unbiased* batch variance, as `nn.BatchNorm2d` does
    (Flax's own layer uses the biased one), so training continued in Flax keeps torch's statistics."""
    import jax.numpy as jnp
    from jax import lax

    class TorchBatchNorm(fnn.Module):
        use_running_average: bool = True
        momentum: float = 0.9  # Flax's convention: the weight of the old statistics
        epsilon: float = 1e-5

        @fnn.compact
        def __call__(self, x: Any) -> Any:
            c = x.shape[-1]
            scale = self.param("scale", fnn.initializers.ones, (c,))
            bias = self.param("bias", fnn.initializers.zeros, (c,))
            ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), x.dtype))
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), x.dtype))
            if self.use_running_average:
                mean, var = ra_mean.value, ra_var.value
            else:
                axes = tuple(range(x.ndim - 1))
                mean = x.mean(axes)
                var = ((x - mean) ** 2).mean(axes)  # biased: what the batch is normalised with
                if not self.is_initializing():
                    n = x.size // c
                    m = self.momentum
                    ra_mean.value = m * ra_mean.value + (1 - m) * mean
                    ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
            return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias

    return TorchBatchNorm


def _norm(fnn: Any, torch_norm: type, torch_bn: bool, train: bool, name: str) -> Any:
    """A batch-norm layer as torch's defaults (momentum 0.1 of the new batch, epsilon 1e-5):
    Flax's own, or with `torch_bn` the one whose running variance follows torch's."""
    # Flax's momentum is the weight of the old statistics: torch's 0.1 of the new is 0.9 here
    layer = torch_norm if torch_bn else fnn.BatchNorm
    return layer(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


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


def _simplenet(fnn: Any, torch_norm: type) -> tuple[type, type]:
    class SimpleNet(fnn.Module):
        """The reference network, NHWC: conv 1->32, conv 32->64, max-pool 2, fc 9216->128, fc."""

        num_classes: int = 10
        batch_norm = False  # a class constant, not a field: SimpleNetBN's is True

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            for i, features in ((1, 32), (2, 64)):  # [B, 26, 26, 32], then [B, 24, 24, 64]
                x = fnn.Conv(features, (3, 3), padding="VALID", name=f"conv{i}")(x)
                if self.batch_norm:
                    x = _norm(fnn, torch_norm, self.torch_bn, train, f"bn{i}")(x)
                x = fnn.relu(x)
            x = _flat(_pool(fnn, x))  # [B, 9216]
            x = fnn.relu(fnn.Dense(128, name="fc1")(x))
            return fnn.Dense(self.num_classes, name="fc2")(x)

    class SimpleNetBN(SimpleNet):
        """SimpleNet with batch norm after each convolution, before its ReLU (`batch_stats`)."""

        torch_bn: bool = False
        batch_norm = True

    return SimpleNet, SimpleNetBN


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


def _resnet(fnn: Any, torch_norm: type) -> type:
    class ConvBN(fnn.Module):
        """conv 3x3 (padding 1), optional max-pool 2, batch norm, ReLU; then, with `residual`,
        `x + res2(res1(x))` (`layer1`, `layer3`)."""

        features: int
        pool: bool = False
        residual: bool = False
        torch_bn: bool = False

        @fnn.compact
        def __call__(self, x: Any, train: bool) -> Any:
            x = fnn.Conv(self.features, (3, 3), padding=1, name="conv")(x)
            x = _pool(fnn, x) if self.pool else x
            x = fnn.relu(_norm(fnn, torch_norm, self.torch_bn, train, "bn")(x))
            if self.residual:
                y = ConvBN(self.features, torch_bn=self.torch_bn, name="res1")(x, train)
                x = x + ConvBN(self.features, torch_bn=self.torch_bn, name="res2")(y, train)
            return x

    class ResNet(fnn.Module):
        """The ResNet-9-style network, NHWC: prep, layer1 (+ residual), layer2, layer3 (+ residual),
        global max-pool, fc."""

        num_classes: int = 10
        width: int = 16
        torch_bn: bool = False

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            w, bn = self.width, self.torch_bn
            x = ConvBN(w, torch_bn=bn, name="prep")(x, train)  # [B, 28, 28, w]
            x = ConvBN(2 * w, pool=True, residual=True, torch_bn=bn, name="layer1")(x, train)  # 14x14
            x = ConvBN(4 * w, pool=True, torch_bn=bn, name="layer2")(x, train)  # [B, 7, 7, 4w]
            x = ConvBN(8 * w, pool=True, residual=True, torch_bn=bn, name="layer3")(x, train)  # 3x3
            return fnn.Dense(self.num_classes, name="fc")(x.max(axis=(1, 2)))

    return ResNet


def _dpcnn(fnn: Any) -> type:
    class DPCNN(fnn.Module):
        """The tempered-sigmoid CNN of differentially private training, NHWC: conv 8x8 stride 2,
        [group norm], tanh, max-pool 2 stride 1; conv 4x4 stride 2, [group norm], tanh, max-pool
        2 stride 1; fc1 32w->32, tanh; fc2. Stateless (group norm has no running statistics)."""

        num_classes: int = 10
        width: int = 16
        groups: int = 0  # 0: no group norm

        @fnn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:  # [B, 28, 28, 1]
            def block(x: Any, features: int, kernel: int, padding: int, i: int) -> Any:
                x = fnn.Conv(features, (kernel, kernel), strides=(2, 2), padding=padding, name=f"conv{i}")(x)
                if self.groups:  # torch's eps; the groups are runs of consecutive channels, as torch's
                    x = fnn.GroupNorm(num_groups=self.groups, epsilon=1e-5, name=f"gn{i}")(x)
                return fnn.max_pool(fnn.tanh(x), (2, 2), strides=(1, 1))

            x = block(x, self.width, 8, 3, 1)  # [B, 13, 13, w]
            x = block(x, 2 * self.width, 4, 0, 2)  # [B, 4, 4, 2w]
            x = fnn.tanh(fnn.Dense(32, name="fc1")(_flat(x)))  # [B, 32]
            return fnn.Dense(self.num_classes, name="fc2")(x)

    return DPCNN


def flax_module(name: str, *, torch_bn: bool = False, **hparams: Any) -> Any:
    """The `flax.linen.Module` of model `name`, written the Flax way, for weights from `to_flax`:
    NHWC inputs (`[B, 28, 28, 1]`, normalised as for `Model.apply`; mlp also `[B, 784]`), our layer
    names, the conv features flattened with `x.reshape((B, -1))`: its eval-mode logits equal
    `models.get(name).apply`'s, as `module.apply(variables, x, train=False)` with `variables =
    flax_variables(unflatten_dict(safetensors.flax.load_file(p), sep="."))` for a `save_flax` file.
    Batch norm keeps its statistics in `batch_stats` (`nn.BatchNorm(momentum=0.9, epsilon=1e-5)`:
    train with `mutable=["batch_stats"]`); alexnet's dropout is active when `train=True`, with
    `rngs={"dropout": key}`. `hparams` are `models.get`'s (dpcnn's group norm is
    `nn.GroupNorm(num_groups=groups, epsilon=1e-5)`).

    `torch_bn=True` (simplenet_bn, resnet): training moves the running variance towards the
    unbiased batch variance, as `nn.BatchNorm2d` does (Flax's uses the biased one), for a run
    continued in Flax and resumed here (`interop.flax_train_state`). Needs the `jax` extra.
    """
    model = models.get(name, **hparams)  # ValueError naming the choices, TypeError for a bad hparam
    classes = _flax_classes()
    if model.name not in classes:
        raise ValueError(
            f"no Flax module for model {model.name!r} yet; Flax modules: {', '.join(sorted(classes))}"
        )
    if torch_bn and not model.stateful:
        raise ValueError(f"torch_bn applies to models with batch norm; {model.name} has none")
    return classes[model.name](**model.hparams, **({"torch_bn": True} if torch_bn else {}))
