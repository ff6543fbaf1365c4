"""Losses as pure functions of tensors, each with a per-example form.

The per-example forms are `torch.func.vmap` over a single-example function, so the same code
gives per-example losses, and `vmap(grad(...))` of the single-example form gives per-example
gradients. No `.item()`, no branching on tensor values: everything traces under `torch.compile`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

__all__ = [
    "cross_entropy",
    "cross_entropy_per_example",
    "cross_entropy_single",
    "mse",
    "mse_per_example",
    "mse_single",
]


def cross_entropy_single(logits: Tensor, label: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of one example: logits [C], label 0-d int -> 0-d. With smoothing s the
    target is (1 - s) * one_hot(label) + s / C, as in F.cross_entropy(label_smoothing=s)."""
    log_probs = torch.log_softmax(logits, dim=-1)  # [C]
    # gather (not log_probs[label]) so the index may be a vmapped tensor
    nll = -log_probs.gather(-1, label.to(torch.int64).reshape(1)).squeeze(-1)
    if label_smoothing == 0.0:  # a Python float: decided at trace time, not on the device
        return nll
    uniform = -log_probs.mean(-1)  # cross-entropy against the uniform target 1/C
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def cross_entropy_per_example(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Per-example cross-entropy: logits [B,C], labels [B] int64 -> [B] (the steps' default loss).
    The values of `vmap(cross_entropy_single)`, computed by `F.cross_entropy(reduction="none")`:
    one fused kernel instead of a gather and a mean per example; it composes with `vmap` and `grad`."""
    return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)


def cross_entropy(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the batch (0-d); equals torch.nn.functional.cross_entropy."""
    return cross_entropy_per_example(logits, labels, label_smoothing=label_smoothing).mean()


def mse_single(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of one example (any shape) -> 0-d."""
    return ((pred - target) ** 2).mean()


def mse_per_example(pred: Tensor, target: Tensor) -> Tensor:
    """Per-example mean squared error: [B, ...] twice -> [B]."""
    return vmap(mse_single)(pred, target)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements (0-d); equals torch.nn.functional.mse_loss."""
    return mse_per_example(pred, target).mean()
