"""The named optimizers, `chain`s of small transforms that follow `torch.optim.SGD` / `Adam` /
`AdamW` step for step (same formulas, same order of operations where it matters for rounding)."""

from __future__ import annotations

from fashion_func.optim.base import GradientTransformation, chain
from fashion_func.optim.transforms import (
    add_decayed_weights,
    add_l2_to_grads,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from fashion_func.optim.wrappers import Mask

__all__ = ["adam", "adamw", "sgd"]


def sgd(
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    """`torch.optim.SGD`: L2 weight decay, optional (Nesterov) momentum, then `-lr`.

    The weight-decay transform is always present (so `weight_decay` can be set later);
    the momentum buffer only when `momentum != 0`, as torch.optim keeps none then.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)")
    parts = [add_l2_to_grads(weight_decay)]
    if momentum != 0:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> GradientTransformation:
    """`torch.optim.Adam`: `weight_decay` is the L2 form, added to the gradient before the moments."""
    return chain(add_l2_to_grads(weight_decay), scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))


def adamw(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Mask | None = None,
) -> GradientTransformation:
    """`torch.optim.AdamW`: decoupled weight decay, `p -= lr * (adam_update + weight_decay * p)`.

    `mask` (optax's): decay only the parameters it marks True, e.g. not biases and norms:
    `mask=lambda p: {k: v.dim() > 1 for k, v in p.items()}`; their weight-decay state is then
    a `MaskedState`.
    """
    return chain(
        scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr)
    )
