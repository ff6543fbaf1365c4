"""The pure, compiled training and evaluation steps.

`train_step(state, batch) -> (state, metrics)`: batch is `(images uint8 [B, 28, 28],
labels int64 [B])` already on the device; normalisation, the forward pass, the
gradient (`torch.func.grad_and_value`) and the optimizer update all happen inside one
compiled function. Metrics are 0-d device tensors (sums, not means) that the caller
accumulates; nothing in here synchronises with the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from fashion_func import nn
from fashion_func.models import Model, Params
from fashion_func.state import TrainState

__all__ = ["PRECISIONS", "cross_entropy_per_example", "make_eval_step", "make_train_step", "normalize_images"]

# Fashion-MNIST train-set statistics (equal to data.MEAN / data.STD; the step may not
# import the data module, a test keeps the two in sync).
MEAN = 0.2860
STD = 0.3530
PRECISIONS = ("fp32", "tf32", "bf16")

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def cross_entropy_per_example(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """The steps' default loss: per-example cross-entropy `[B]`, computed in float32."""
    return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)


def normalize_images(
    images: Tensor, mean: float = MEAN, std: float = STD, *, channels_last: bool = False
) -> Tensor:
    """uint8 `[B, 28, 28]` -> float32 `[B, 1, 28, 28]`, `(x / 255 - mean) / std`.

    channels_last: lay the result out NHWC in memory (same shape and values); the
    convolutions then keep that layout, which oneDNN runs faster on CPU.
    """
    # NHWC: [B, H, W, 1] in memory viewed as [B, 1, H, W], stride 1 along C, which
    # nn.conv2d reads as a request for NHWC outputs (one channel is otherwise ambiguous)
    if channels_last:
        x = rearrange(rearrange(images, "b h w -> b h w 1"), "b h w c -> b c h w")
    else:
        x = rearrange(images, "b h w -> b 1 h w")
    return (x.to(torch.float32) * (1.0 / 255.0) - mean) * (1.0 / std)


def _autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


COMPILE_MODES = (True, False, "update")


def make_train_step(
    model: Model,
    loss_fn: LossFn | None,
    optimizer: Any,
    *,
    compile: bool | str = True,
    precision: str = "fp32",
    mean: float = MEAN,
    std: float = STD,
    channels_last: bool = False,
    device_type: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """A pure `train_step(state, batch) -> (new_state, metrics)`.

    loss_fn: `(logits [B, C], labels [B]) -> per-example losses [B]`; cross-entropy if None.
    optimizer: a `GradientTransformation` (`init`, `update`).
    compile: True compiles the whole step; "update" compiles only the optimizer update
        (forward and backward run eagerly: on CPU the convolutions are oneDNN's either
        way, while the update's dozen elementwise passes fuse into one); False: eager.
    precision: "fp32"; "tf32" (the caller enables TF32 matmuls on CUDA); "bf16" autocast.
    channels_last: NHWC activations (faster convolutions on CPU; parameters keep their layout).
    metrics: `loss_sum`, `correct`, `count` as 0-d device tensors (sums over the batch).
    """
    _check_precision(precision)
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or 'update', not {compile!r}")
    per_example = loss_fn or cross_entropy_per_example
    from fashion_func import optim  # local: optim is a sibling, imported lazily to keep import cheap

    def gradients(params: Params, step: Tensor, rng: Tensor, images: Tensor, labels: Tensor):
        key = nn.fold_in(rng, step)
        x = normalize_images(images, mean, std, channels_last=channels_last)
        dev = device_type or images.device.type

        def loss_and_aux(p: Params):
            with _autocast(precision, dev):
                logits = model.apply(p, x, train=True, key=key)
            losses = per_example(logits.float(), labels)  # [B]
            return losses.mean(), (losses, logits)

        grads, (_, (losses, logits)) = torch.func.grad_and_value(loss_and_aux, has_aux=True)(params)
        metrics = {
            "loss_sum": losses.detach().sum(),
            "correct": (logits.detach().argmax(-1) == labels).sum(),
            "count": torch.full((), labels.shape[0], dtype=torch.int64, device=labels.device),
        }
        return grads, metrics

    def update(params: Params, grads: Params, opt_state: Any, step: Tensor):
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), new_opt_state, step + 1

    def core(params: Params, opt_state: Any, step: Tensor, rng: Tensor, images: Tensor, labels: Tensor):
        grads, metrics = gradients(params, step, rng, images, labels)
        return (*update(params, grads, opt_state, step), metrics)

    if compile is True:
        fn = torch.compile(core)
    elif compile == "update":
        fast_update = torch.compile(update)

        def fn(params, opt_state, step, rng, images, labels):
            grads, metrics = gradients(params, step, rng, images, labels)
            return (*fast_update(params, grads, opt_state, step), metrics)
    else:
        fn = core

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        images, labels = batch
        params, opt_state, step, metrics = fn(
            state.params, state.opt_state, state.step, state.rng, images, labels
        )
        return state.replace(params=params, opt_state=opt_state, step=step), metrics

    return train_step


def make_eval_step(
    model: Model,
    loss_fn: LossFn | None = None,
    *,
    compile: bool = True,
    precision: str = "fp32",
    mean: float = MEAN,
    std: float = STD,
    channels_last: bool = False,
    topk: int = 5,
) -> Callable[[Params, Batch], dict[str, Tensor]]:
    """A pure `eval_step(params, batch) -> per-example metrics`.

    Returns `loss` [B] float32, `correct` [B] bool, `topk_correct` [B] bool (label among
    the `topk` highest logits), `pred` [B] int64 and `logits` [B, C] float32.
    """
    _check_precision(precision)
    per_example = loss_fn or cross_entropy_per_example

    def core(params: Params, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        x = normalize_images(images, mean, std, channels_last=channels_last)
        with torch.no_grad(), _autocast(precision, images.device.type):
            logits = model.apply(params, x, train=False).float()
        k = min(topk, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        pred = top[:, 0]
        return {
            "loss": per_example(logits, labels),
            "correct": pred == labels,
            "topk_correct": (top == labels[:, None]).any(-1),
            "pred": pred,
            "logits": logits,
        }

    fn = torch.compile(core) if compile else core

    def eval_step(params: Params, batch: Batch) -> dict[str, Tensor]:
        return fn(params, *batch)

    return eval_step
