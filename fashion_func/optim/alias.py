"""The named optimizers, `chain`s of small transforms that follow `torch.optim.SGD` / `Adam` /
`AdamW` step for step (same formulas, same order of operations where it matters for rounding),
and optax's `lion`. Each is described by its own name and arguments, its parts as children."""

from __future__ import annotations

from fashion_func.optim.base import GradientTransformation, named_chain
from fashion_func.optim.transforms import (
    add_decayed_weights,
    add_l2_to_grads,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    trace,
)
from fashion_func.optim.wrappers import Mask

__all__ = ["adam", "adamw", "lion", "sgd"]


def sgd(
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    """`torch.optim.SGD`: L2 weight decay, optional (Nesterov) momentum, then `-lr`. The
    weight-decay transform is always present (so `weight_decay` can be set later); the momentum
    buffer only when `momentum != 0`, as torch.optim keeps none then."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)")
    parts = [add_l2_to_grads(weight_decay)]
    if momentum != 0:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(lr))
    return named_chain(
        "sgd", parts, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        dampening=dampening,
    )  # fmt: skip


def adam(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """`torch.optim.Adam`: `weight_decay` is the L2 form, added to the gradient before the moments.
    `eps_root`: optax's (see `scale_by_adam`); > 0 keeps meta-gradients finite at zero gradients."""
    parts = (add_l2_to_grads(weight_decay), scale_by_adam(b1, b2, eps, eps_root), scale_by_learning_rate(lr))
    return named_chain(
        "adam", parts, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, eps_root=eps_root
    )


def adamw(
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Mask | None = None,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """`torch.optim.AdamW`: decoupled weight decay, `p -= lr * (adam_update + weight_decay * p)`.
    `mask` (as `add_decayed_weights`'s): decay only the parameters it marks True, e.g. not
    biases and norms: `mask=lambda p: {k: v.dim() > 1 for k, v in p.items()}`. `eps_root`:
    optax's (see `scale_by_adam`)."""
    adam_part = scale_by_adam(b1, b2, eps, eps_root)
    parts = (adam_part, add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))
    return named_chain(
        "adamw", parts, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask, eps_root=eps_root
    )


def lion(
    lr: float,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Mask | None = None,
) -> GradientTransformation:
    """Lion (optax's `lion`, Chen et al., 2023): `scale_by_lion(b1, b2)`, decoupled weight decay
    (`mask` as in `adamw`), then `-lr`: `p -= lr * (sign(c) + weight_decay * p)`. Take an lr
    3-10x smaller than AdamW's and a weight decay 3-10x larger."""
    parts = (scale_by_lion(b1, b2), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))
    return named_chain("lion", parts, lr=lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
