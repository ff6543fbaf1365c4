"""The tutorial's `trainer.summary()`: parameters, stage output shapes, FLOPs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fashion_func.models import Model, Params, num_params

__all__ = ["flops_per_example", "summary"]


def flops_per_example(model: Model, params: Params) -> int:
    """Forward FLOPs for one example, counted by `torch.utils.flop_counter` (a multiply-add is 2)."""
    x = torch.zeros((1, *model.input_shape), device=next(iter(params.values())).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.apply(params, x)
    return int(counter.get_total_flops())


def summary(model: Model, params: Params) -> str:
    """A text table of parameter names/shapes/counts, each stage's output shape, totals."""
    lines = [f"Model: {model.name} {model.hparams}", "", f"{'parameter':<20}{'shape':<24}{'count':>12}"]
    lines.append("-" * 56)
    for name, p in params.items():
        lines.append(f"{name:<20}{list(p.shape)!s:<24}{p.numel():>12,}")
    lines += ["", f"{'stage':<20}{'output shape':<36}", "-" * 56]
    x = torch.zeros((1, *model.input_shape), device=next(iter(params.values())).device)
    with torch.no_grad():
        lines.append(f"{'input':<20}{['B', *x.shape[1:]]!s:<36}")
        for stage in model.stages:
            x = stage.fn(params, x, False, None)
            lines.append(f"{stage.name:<20}{['B', *x.shape[1:]]!s:<36}")
    flops = flops_per_example(model, params)
    lines += [
        "-" * 56,
        f"total parameters: {num_params(params):,}",
        f"forward FLOPs per example: {flops:,} ({flops / 1e6:.1f} MFLOP)",
    ]
    return "\n".join(lines) + "\n"
