"""The tutorial's `trainer.summary()`: parameters, stage output shapes, FLOPs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fashion_func.models import Model, ModelState, Params, num_params

__all__ = ["flops_per_example", "summary"]


def flops_per_example(model: Model, params: Params, model_state: ModelState | None = None) -> int:
    """Forward FLOPs for one example, counted by `torch.utils.flop_counter` (a multiply-add is 2)."""
    x = torch.zeros((1, *model.input_shape), device=next(iter(params.values())).device)
    kwargs = {"state": model_state or model.init_state(device=x.device)} if model.stateful else {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.apply(params, x, **kwargs)
    return int(counter.get_total_flops())


def summary(model: Model, params: Params, model_state: ModelState | None = None) -> str:
    """A text table of parameter names/shapes/counts, each stage's output shape, totals.

    A stateful model's buffers are listed after the parameters (not counted as parameters).
    """
    lines = [f"Model: {model.name} {model.hparams}", "", f"{'parameter':<20}{'shape':<24}{'count':>12}"]
    lines.append("-" * 56)
    for name, p in params.items():
        lines.append(f"{name:<20}{list(p.shape)!s:<24}{p.numel():>12,}")
    x = torch.zeros((1, *model.input_shape), device=next(iter(params.values())).device)
    state = dict(model_state or model.init_state(device=x.device))
    if state:
        lines += ["", f"{'buffer':<20}{'shape':<24}", "-" * 56]
        lines += [f"{name:<20}{list(b.shape)!s:<24}" for name, b in state.items()]
    lines += ["", f"{'stage':<20}{'output shape':<36}", "-" * 56]
    with torch.no_grad():
        lines.append(f"{'input':<20}{['B', *x.shape[1:]]!s:<36}")
        for stage in model.stages:
            x, _ = stage.run(params, state, x, False, None)
            lines.append(f"{stage.name:<20}{['B', *x.shape[1:]]!s:<36}")
    flops = flops_per_example(model, params, state)
    lines += [
        "-" * 56,
        f"total parameters: {num_params(params):,}",
        f"forward FLOPs per example: {flops:,} ({flops / 1e6:.1f} MFLOP)",
    ]
    return "\n".join(lines) + "\n"
