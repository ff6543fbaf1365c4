"""The immutable training state: everything a step reads and writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["TrainState", "create"]


@dataclass(frozen=True)
class TrainState:
    """One point of a training run; every step returns a new one.

    step:        0-d int64, optimizer steps taken so far.
    params:      flat dict of tensors, `nn.Module` state_dict names.
    opt_state:   the optimizer's state (NamedTuples of tensors; hyperparameters included).
    model_state: stateful layers' buffers (batch-norm statistics); `{}` for our models.
    rng:         0-d int64 seed; dropout keys are `fold_in(rng, step)`, so resume is exact.
    """

    step: Tensor
    params: dict[str, Tensor]
    opt_state: Any
    model_state: dict[str, Tensor]
    rng: Tensor

    def replace(self, **changes: Any) -> TrainState:
        """A copy with `changes` applied (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)


pytree.register_dataclass(TrainState)


def create(params: dict[str, Tensor], optimizer: Any, *, seed: int = 0, model_state=None) -> TrainState:
    """A fresh state at step 0 for `params`, with `optimizer.init(params)`."""
    device = next(iter(params.values())).device
    return TrainState(
        step=torch.zeros((), dtype=torch.int64, device=device),
        params=dict(params),
        opt_state=optimizer.init(params),
        model_state=dict(model_state or {}),
        rng=torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=device),
    )
