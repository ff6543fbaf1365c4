"""The pure, compiled training and evaluation steps, and per-example research helpers.

`train_step(state, batch) -> (state, metrics)`: `batch` is `(inputs, targets)` already on
the device. Preprocessing (by default Fashion-MNIST's uint8 images normalised to float;
`preprocess=None` takes the inputs as they are, any shape), the forward pass, the loss, the
gradient (`torch.func.grad_and_value`) and the optimizer update all happen inside one
compiled function. A stateful model (batch norm) has its `TrainState.model_state` threaded
through. Metrics are 0-d device tensors (sums, not means) that the caller accumulates;
nothing in here synchronises with the host.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from fashion_func import losses, nn, optim, tree
from fashion_func import metrics as metrics_lib
from fashion_func.models import Model, ModelState, Params, Stage
from fashion_func.state import TrainState

__all__ = [
    "COMPILE_MODES",
    "FASHION_MNIST",
    "PRECISIONS",
    "NormalizeImages",
    "as_model",
    "check_per_example",
    "eval_core",
    "eval_step_from_core",
    "make_eval_step",
    "make_train_step",
    "normalize_images",
    "per_example_grad_norms",
    "per_example_grads",
    "step_from_core",
    "train_core",
]

# Fashion-MNIST train-set statistics (equal to data.MEAN / data.STD; the step may not
# import the data module, a test keeps the two in sync).
MEAN = 0.2860
STD = 0.3530
PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = (True, False, "update")

LossFn = Callable[[Tensor, Tensor], Tensor]
Preprocess = Callable[[Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def normalize_images(
    images: Tensor, mean: float = MEAN, std: float = STD, *, channels_last: bool = False
) -> Tensor:
    """uint8 `[B, 28, 28]` (or `[B, 1, H, W]`) -> float32 `[B, 1, H, W]`, `(x / 255 - mean) / std`.

    channels_last: lay the result out NHWC in memory (same shape and values); the
    convolutions then keep that layout, which oneDNN runs faster on CPU.
    """
    if images.dim() == 4:  # already [B, 1, H, W]: drop the channel axis, add it back below
        images = rearrange(images, "b 1 h w -> b h w")
    # NHWC: [B, H, W, 1] in memory viewed as [B, 1, H, W], stride 1 along C, which
    # nn.conv2d reads as a request for NHWC outputs (one channel is otherwise ambiguous)
    if channels_last:
        x = rearrange(rearrange(images, "b h w -> b h w 1"), "b h w c -> b c h w")
    else:
        x = rearrange(images, "b h w -> b 1 h w")
    return (x.to(torch.float32) * (1.0 / 255.0) - mean) * (1.0 / std)


@dataclass(frozen=True)
class NormalizeImages:
    """The default preprocess: uint8 grayscale images -> normalised float `[B, 1, H, W]`.

    channels_last: None (auto) lays activations out NHWC when the images are on the CPU,
    where oneDNN's convolutions run faster that way; on CUDA it measured no different.
    """

    mean: float = MEAN
    std: float = STD
    channels_last: bool | None = None

    def __call__(self, images: Tensor) -> Tensor:
        nhwc = images.device.type == "cpu" if self.channels_last is None else self.channels_last
        return normalize_images(images, self.mean, self.std, channels_last=nhwc)


FASHION_MNIST = NormalizeImages()


def _autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def check_per_example(values: Tensor, batch_size: int) -> None:
    # shapes are static: this runs once per trace, never on tensor values
    if tuple(values.shape) != (batch_size,):
        raise ValueError(
            f"loss must return per-example values of shape [B] = [{batch_size}], got "
            f"{list(values.shape)}; use a per-example loss such as losses.cross_entropy_per_example"
        )


def as_model(model: Model | Callable[..., Tensor]) -> Model:
    """`model` itself, or a plain function `f(params, x[, train=..., key=...]) -> logits` as a
    stateless `Model` (it is given `train` / `key` only where its signature takes them)."""
    if isinstance(model, Model):
        return model
    if not callable(model):
        raise TypeError(f"expected a Model or a function (params, x) -> logits, got {type(model).__name__}")
    try:
        accepted = inspect.signature(model).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    wanted = [k for k in ("train", "key") if takes_all or k in accepted]

    def stage(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        given = {"train": train, "key": key}
        return model(p, x, **{k: given[k] for k in wanted})

    def no_init(*args: Any, **kwargs: Any) -> Params:
        raise TypeError("a model given as a function has no init: create its params yourself")

    name = getattr(model, "__name__", type(model).__name__)
    return Model(name, {}, no_init, (Stage(name, stage),), input_shape=())


def _forward(
    model: Model, params: Params, x: Tensor, model_state: ModelState, *, train: bool, key: Tensor | None
) -> tuple[Tensor, ModelState]:
    """(logits, new model state) for stateless and stateful models alike."""
    if model.stateful:
        return model.apply(params, x, train=train, key=key, state=model_state)
    return model.apply(params, x, train=train, key=key), model_state


def _at_least_float32(t: Tensor) -> Tensor:
    # bf16/fp16 outputs (autocast) are raised to float32 for the loss; float64 stays float64
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _is_classification(logits: Tensor, labels: Tensor) -> bool:
    return logits.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point()


def _preprocess(preprocess: Preprocess | None, x: Tensor, key: Tensor | None = None) -> Tensor:
    """`preprocess(x)`; given a `key` (the caller checked `_takes_key`), `preprocess(x, key=...)`
    with the augmentation's own stream of it."""
    if preprocess is None:
        return x
    if key is not None:
        return preprocess(x, key=nn.fold_in(key, _AUGMENT_SALT))
    return preprocess(x)


_AUGMENT_SALT = 0xA116  # augmentation draws from its own stream of the step's key


def _takes_key(fn: Callable[..., Any]) -> bool:
    try:
        return "key" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_train_step(
    model: Model | Callable[..., Tensor],
    optimizer: optim.GradientTransformation,
    *,
    loss: LossFn | None = None,
    preprocess: Preprocess | None = FASHION_MNIST,
    precision: str = "fp32",
    compile: bool | str = True,
    device_type: str | None = None,
    topk: int | None = None,
    reduce_grads: Callable[[Params], Params] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """A pure `train_step(state, (inputs, targets)) -> (new_state, metrics)`.

    model: a `Model`, or a plain function `(params, x[, train, key]) -> logits` (`as_model`).
    optimizer: a `GradientTransformation` (`init`, `update`).
    loss: `(outputs [B, ...], targets [B, ...]) -> per-example losses [B]` (a ValueError
        naming the shape on the first call otherwise); cross-entropy if None. The step
        minimises its mean.
    preprocess: a pure function of the input tensor, run inside the compiled step; the default
        turns Fashion-MNIST uint8 `[B, 28, 28]` into normalised float (NHWC on CPU); None uses
        the inputs as given (`[B, C, H, W]`, `[B, D]`, ...). One that takes a `key` keyword
        (`augment.Augment`) is given a key derived from (rng, step): augmentation is then a
        pure function of the seed and the step, and resume stays exact.
    precision: "fp32"; "tf32" (the caller enables TF32 matmuls on CUDA); "bf16" autocast.
        Master weights, the loss and the optimizer stay float32.
    compile: True compiles the whole step; "update" compiles only the optimizer update
        (forward and backward run eagerly: on CPU the convolutions are oneDNN's either
        way, while the update's dozen elementwise passes fuse into one); False: eager.
    topk: also count `top{k}_correct` (label among the `topk` highest logits; `fit` reports
        it as train_top{k}).
    reduce_grads: a pure stage between the gradient and the update, `grads -> grads` (the
        data-parallel all-reduce, `fashion_func.distributed`); compiled with the step.
    metrics: `loss_sum` and `count` (and `correct`, `top{k}_correct` for class labels) as 0-d
        device tensors, sums over the batch.
    """
    core = train_core(
        as_model(model), optimizer, loss=loss, preprocess=preprocess, precision=precision,
        compile=compile, device_type=device_type, topk=topk, reduce_grads=reduce_grads,
    )  # fmt: skip
    return step_from_core(core)


def step_from_core(
    core: Callable[..., tuple[Any, ...]], check: Callable[[TrainState], Any] | None = None
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """`train_step(state, batch)` around a `train_core` (`check(state)` first, if given)."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        if check is not None:
            check(state)
        inputs, y = batch
        params, opt_state, step, model_state, metrics = core(
            state.params, state.model_state, state.opt_state, state.step, state.rng, inputs, y
        )
        new = state.replace(params=params, opt_state=opt_state, step=step, model_state=model_state)
        return new, metrics

    return train_step


def train_core(
    model: Model,
    optimizer: optim.GradientTransformation,
    *,
    loss: LossFn | None,
    preprocess: Preprocess | None,
    precision: str,
    compile: bool | str,
    device_type: str | None,
    topk: int | None,
    reduce_grads: Callable[[Params], Params] | None = None,
    members: bool = False,
) -> Callable[..., tuple[Any, ...]]:
    """The pure, compiled `(params, model_state, opt_state, step, rng, inputs, y) ->
    (params, opt_state, step, model_state, metrics)` behind a train step.

    Three stages: gradients, `reduce_grads` (e.g. a data-parallel all-reduce), the optimizer
    update. members: the state carries a leading member axis (an ensemble): the gradient and
    update stages are vmapped over it, the batch is shared, and `reduce_grads` sees the
    stacked gradients.
    """
    _check_precision(precision)
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or 'update', not {compile!r}")
    gradients = _gradients_fn(
        model, loss or losses.cross_entropy_per_example, preprocess, precision, device_type, topk
    )

    def update(params: Params, grads: Params, opt_state: Any, step: Tensor):
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), new_opt_state, step + 1

    if members:
        gradients = torch.func.vmap(gradients, in_dims=(0, 0, 0, 0, None, None))
        update = torch.func.vmap(update)
    # "update": forward and backward eager, the optimizer's elementwise passes fused
    fast_update = torch.compile(update) if compile == "update" else update

    def core(params, model_state, opt_state, step, rng, inputs, y):
        grads, new_model_state, metrics = gradients(params, model_state, step, rng, inputs, y)
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        return (*fast_update(params, grads, opt_state, step), new_model_state, metrics)

    return torch.compile(core) if compile is True else core


def _gradients_fn(
    model: Model,
    per_example: LossFn,
    preprocess: Preprocess | None,
    precision: str,
    device_type: str | None,
    topk: int | None,
) -> Callable[..., tuple[Params, ModelState, dict[str, Tensor]]]:
    """`(params, model_state, step, rng, inputs, y) -> (grads, new model state, metric sums)`:
    the part of the train step before the optimizer update."""
    keyed = preprocess is not None and _takes_key(preprocess)  # here: inspect is not traceable

    def gradients(
        params: Params, model_state: ModelState, step: Tensor, rng: Tensor, inputs: Tensor, y: Tensor
    ):
        key = nn.fold_in(rng, step)
        x = _preprocess(preprocess, inputs, key if keyed else None)
        dev = device_type or inputs.device.type

        def loss_and_aux(p: Params):
            with _autocast(precision, dev):
                logits, new_state = _forward(model, p, x, model_state, train=True, key=key)
            values = per_example(_at_least_float32(logits), y)  # [B]
            check_per_example(values, y.shape[0])
            return values.mean(), (values, logits, new_state)

        grads, (_, (values, logits, new_state)) = torch.func.grad_and_value(loss_and_aux, has_aux=True)(
            params
        )
        logits = logits.detach()
        metrics = {
            "loss_sum": values.detach().sum(),
            "count": torch.full((), y.shape[0], dtype=torch.int64, device=y.device),
        }
        if _is_classification(logits, y):
            metrics["correct"] = (logits.argmax(-1) == y).sum()
            if topk is not None:
                metrics[f"top{topk}_correct"] = metrics_lib.topk_correct(logits, y, topk).sum()
        return grads, {k: v.detach() for k, v in new_state.items()}, metrics

    return gradients


def eval_core(
    model: Model,
    per_example: LossFn,
    preprocess: Preprocess | None,
    precision: str,
    topk: int,
    tta: bool = False,
) -> Callable[[Params, ModelState, Tensor, Tensor], dict[str, Tensor]]:
    """The pure `(params, model_state, inputs, y) -> per-example metrics` behind an eval step
    (uncompiled, so that it can be vmapped over ensemble members first)."""
    _check_precision(precision)

    def forward(params: Params, model_state: ModelState, x: Tensor) -> Tensor:
        with torch.no_grad(), _autocast(precision, x.device.type):
            logits, _ = _forward(model, params, x, model_state, train=False, key=None)
        return _at_least_float32(logits)

    def core(params: Params, model_state: ModelState, inputs: Tensor, y: Tensor) -> dict[str, Tensor]:
        x = _preprocess(preprocess, inputs)
        logits = forward(params, model_state, x)
        if tta:  # the mean of the probabilities of the image and its mirror image
            mirrored = forward(params, model_state, x.flip(-1))
            both = torch.stack([logits.log_softmax(-1), mirrored.log_softmax(-1)])
            logits = torch.logsumexp(both, dim=0) - math.log(2.0)
        values = per_example(logits, y)
        check_per_example(values, y.shape[0])
        out = {"loss": values, "logits": logits}
        if _is_classification(logits, y):
            pred = logits.argmax(-1)
            out.update(correct=pred == y, topk_correct=metrics_lib.topk_correct(logits, y, topk), pred=pred)
        return out

    return core


def make_eval_step(
    model: Model | Callable[..., Tensor],
    *,
    loss: LossFn | None = None,
    preprocess: Preprocess | None = FASHION_MNIST,
    precision: str = "fp32",
    compile: bool = True,
    topk: int = 5,
    tta: bool = False,
) -> Callable[..., dict[str, Tensor]]:
    """A pure `eval_step(params_or_state, batch, model_state=None) -> per-example metrics`.

    tta: test-time augmentation, the prediction is the mean of the probabilities of each
    image and its left-right mirror image (`logits` is then the log of that mean).

    The first argument is a `TrainState` (its params and model state are used) or a params
    dict; a stateful model then needs `model_state` and runs in inference mode (running
    statistics). Returns `loss` [B] float32 and `logits` [B, C] float32; for class labels
    also `correct` [B] bool, `topk_correct` [B] bool (label among the `topk` highest logits)
    and `pred` [B] int64.
    """
    model = as_model(model)
    core = eval_core(model, loss or losses.cross_entropy_per_example, preprocess, precision, topk, tta)
    return eval_step_from_core(model, torch.compile(core) if compile else core, topk)


def eval_step_from_core(
    model: Model, fn: Callable[..., dict[str, Tensor]], topk: int
) -> Callable[..., dict[str, Tensor]]:
    """`eval_step(params_or_state, batch, model_state=None)` around an `eval_core`."""

    def eval_step(params: Params | TrainState, batch: Batch, model_state: ModelState | None = None):
        if isinstance(params, TrainState):
            params, model_state = params.params, params.model_state
        if model.stateful and not model_state:
            raise ValueError(f"model {model.name} is stateful: pass its model_state (or a TrainState)")
        return fn(params, model_state or {}, *batch)

    eval_step.topk = topk  # type: ignore[attr-defined]  # fit names the metric val_top{k}
    return eval_step


# -- research helpers -------------------------------------------------------------------------


def per_example_grads(
    model: Model | Callable[..., Tensor],
    loss: LossFn | None,
    params: Params,
    batch: Batch,
    *,
    preprocess: Preprocess | None = None,
    model_state: ModelState | None = None,
    train: bool = False,
    key: Tensor | None = None,
) -> Params:
    """The gradient of each example's loss: `{name: [B, *param.shape]}`, by `vmap(grad(...))`.

    Each example is run as a batch of one, so a stateful model in `train=True` mode would
    normalise every example by itself; the default `train=False` differentiates the
    inference-mode function (running statistics, no dropout).
    """
    model = as_model(model)
    if model.stateful and not model_state:
        raise ValueError(f"model {model.name} is stateful: pass its model_state")
    per_example = loss or losses.cross_entropy_per_example
    inputs, targets = batch
    x = _preprocess(preprocess, inputs)
    state = dict(model_state or {})

    def single(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
        logits, _ = _forward(model, p, xi[None], state, train=train, key=key)  # a batch of one
        return per_example(logits, yi[None])[0]

    return torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(params, x, targets)


def per_example_grad_norms(grads: Params) -> Tensor:
    """The global L2 norm of each example's gradient `[B]`, over all parameters: `tree.global_norm`
    of each example's slice."""
    return torch.func.vmap(tree.global_norm)(grads)
