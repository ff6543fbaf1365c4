"""The tutorial's `trainer.summary()`: parameters, stage output shapes, FLOPs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fashion_func.models import Model, ModelState, Params, num_params

__all__: list[str] = []


def train_flops_per_example(
    model: Model, params: Params, model_state: ModelState | None = None, *, batch_size: int = 8
) -> float:
    """FLOPs of one training step per example: the forward pass and the backward pass that
    `torch.func.grad` runs (no input gradient for the first layer), counted by
    `torch.utils.flop_counter` (a multiply-add is 2) on a batch of `batch_size` and divided by it."""
    x = torch.zeros((batch_size, *model.input_shape), device=next(iter(params.values())).device)
    y = torch.zeros(batch_size, dtype=torch.int64, device=x.device)
    state = model_state or model.init_state(device=x.device)

    def loss(p: Params) -> torch.Tensor:
        kwargs = {"state": state} if model.stateful else {}
        out = model.apply(p, x, train=True, key=torch.zeros((), dtype=torch.int64), **kwargs)
        logits = out[0] if model.stateful else out
        return torch.nn.functional.cross_entropy(logits, y)

    with FlopCounterMode(display=False) as counter:
        torch.func.grad(loss)(params)
    return counter.get_total_flops() / batch_size


def summary(model: Model, params: Params, model_state: ModelState | None = None) -> str:
    """A text table of parameter names/shapes/counts, each stage's output shape, totals (forward
    FLOPs per example by `torch.utils.flop_counter`); a stateful model's buffers are listed after
    the parameters (not counted as parameters)."""
    x = torch.zeros((1, *model.input_shape), device=next(iter(params.values())).device)
    state = dict(model_state or model.init_state(device=x.device))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.apply(params, x, **({"state": state} if model.stateful else {}))
    flops = int(counter.get_total_flops())
    # the name column fits the longest name (resnet's run past 20 characters)
    w = max(20, *(len(n) + 2 for n in (*params, *state, *(st.name for st in model.stages))))
    rule = "-" * (w + 36)
    header = f"{'parameter':<{w}}{'shape':<24}{'count':>12}"
    lines = [f"Model: {model.name} {model.hparams}", "", header, rule]
    for name, p in params.items():
        lines.append(f"{name:<{w}}{list(p.shape)!s:<24}{p.numel():>12,}")
    if state:
        lines += ["", f"{'buffer':<{w}}{'shape':<24}", rule]
        lines += [f"{name:<{w}}{list(b.shape)!s:<24}" for name, b in state.items()]
    lines += ["", f"{'stage':<{w}}{'output shape':<36}", rule]
    with torch.no_grad():
        lines.append(f"{'input':<{w}}{['B', *x.shape[1:]]!s:<36}")
        for stage in model.stages:
            x, _ = stage.run(params, state, x, False, None)
            lines.append(f"{stage.name:<{w}}{['B', *x.shape[1:]]!s:<36}")
    lines += [
        rule,
        f"total parameters: {num_params(params):,}",
        f"forward FLOPs per example: {flops:,} ({flops / 1e6:.1f} MFLOP)",
    ]
    return "\n".join(lines) + "\n"
