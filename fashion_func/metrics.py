"""Classification metrics as pure tensor functions that stay on the device.

Nothing here calls `.item()` or branches on tensor values, so every function traces under
`torch.compile`; results come to the host when the caller decides (once per epoch).

Ties are broken the way `torch.argmax` breaks them: among equal logits the lowest class index
ranks first. A row containing NaN counts as wrong (a diverged model is not accurate).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

__all__ = [
    "accuracy",
    "confusion_matrix",
    "precision_recall",
    "rank_of_label",
    "topk_accuracy",
    "topk_correct",
]


def _rank_single(logits: Tensor, label: Tensor) -> Tensor:
    # logits [C], label 0-d -> 0-d int64: how many classes rank above the label
    classes = torch.arange(logits.shape[-1], device=logits.device)
    target = logits.gather(-1, label.to(torch.int64).reshape(1))  # [1]
    above = (logits > target) | ((logits == target) & (classes < label))
    return above.sum()


def rank_of_label(logits: Tensor, labels: Tensor) -> Tensor:
    """0-based rank of the true class among the logits: [B,C], [B] -> [B] int64 (0 = argmax)."""
    return vmap(_rank_single)(logits, labels)


def topk_correct(logits: Tensor, labels: Tensor, k: int = 1) -> Tensor:
    """Whether the true class is among the k highest logits: [B,C], [B] -> [B] bool (vmap over
    single examples); k >= C makes every finite row correct."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return vmap(lambda z, y: (_rank_single(z, y) < k) & ~torch.isnan(z).any())(logits, labels)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Fraction of examples whose true class is among the k highest logits (0-d float32)."""
    return topk_correct(logits, labels, k).to(torch.float32).mean()


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of examples whose argmax is the true class (0-d float32)."""
    return topk_accuracy(logits, labels, 1)


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int = 10) -> Tensor:
    """Counts [C,C] int64: row = true class, column = predicted class. `preds` is [B] class
    indices or [B,C] logits (argmax taken); values must lie in 0..C-1. A scatter_add into a
    fixed-size buffer (not bincount, whose output size depends on the data)."""
    if preds.ndim == 2:  # a shape, known at trace time
        preds = preds.argmax(-1)
    index = labels.to(torch.int64) * num_classes + preds.to(torch.int64)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=index.device)
    counts = counts.scatter_add(0, index, torch.ones_like(index))
    return counts.reshape(num_classes, num_classes)


def precision_recall(cm: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class (precision [C], recall [C]) from a confusion matrix (rows true, columns
    predicted); a class never predicted has precision 0, one absent from the labels recall 0."""
    cm = cm.to(torch.float32)
    hits = torch.diagonal(cm)
    predicted = cm.sum(0)  # column sums: how often each class was predicted
    actual = cm.sum(1)  # row sums: how often each class was the truth
    precision = torch.where(predicted > 0, hits / predicted.clamp_min(1.0), torch.zeros_like(hits))
    recall = torch.where(actual > 0, hits / actual.clamp_min(1.0), torch.zeros_like(hits))
    return precision, recall
