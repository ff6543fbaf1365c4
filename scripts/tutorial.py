#!/usr/bin/env python
"""The classic PyTorch tutorial's examples, written with fashion_func's pure functions.

Run: `python scripts/tutorial.py [--dtype float32|float64] [--steps 500] [--log-every 50] [--seed 0]`

(a) autograd: for a = [3, 2], b = [4, 7], the gradient of ((a + b) * 8).sum() with
    respect to a is [8, 8]; here it comes from `torch.func.grad` instead of `.backward()`.
(b) exercise 1: a two-layer net (N=64, D_in=1000, H=100, D_out=10) on random x, y,
    trained with Adam, lr 1e-4, for 500 steps; the loss is printed every 50 steps.
(c) exercise 2: the same network as the tutorial's `TwoLayerNet` class, trained with
    SGD, lr 1e-4.

The loss is the tutorial's `torch.nn.MSELoss(reduction="sum")`: the *sum* of squared
errors over all N * D_out outputs (not the mean), which is why lr 1e-4 suits both
optimizers. The params are a flat dict (`linear1.weight`, ...), the model is
`models.get("mlp", ...)`, and each step is a pure function
`(params, opt_state, x, y) -> (params, opt_state, loss)`; nothing is updated in place.
`tests/test_tutorial.py` checks both exercises against `nn.Module` + `torch.optim`,
step for step, in float64.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fashion_func import models, optim

N, D_IN, H, D_OUT = 64, 1000, 100, 10  # batch size, input, hidden and output widths (the tutorial's)
LR = 1e-4
# exercise number -> (optimizer name, what the tutorial called it)
EXERCISES = {1: ("adam", "two-layer net with nn.Sequential + Adam"), 2: ("sgd", "TwoLayerNet module + SGD")}
DTYPES = {"float32": torch.float32, "float64": torch.float64}

Params = dict[str, Tensor]
Step = Callable[[Params, optim.State, Tensor, Tensor], tuple[Params, optim.State, Tensor]]


def autograd_example() -> Tensor:
    """d/da of ((a + b) * 8).sum() at a = [3, 2], b = [4, 7]: [8, 8]."""
    a = torch.tensor([3.0, 2.0])
    b = torch.tensor([4.0, 7.0])
    return torch.func.grad(lambda a: ((a + b) * 8).sum())(a)


def sum_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Sum of squared errors, `nn.MSELoss(reduction="sum")` (the classic tutorial's loss)."""
    return ((pred - target) ** 2).sum()


class Problem(NamedTuple):
    """One exercise's starting point: the model, its initial params and the data."""

    model: models.Model
    params: Params
    x: Tensor  # [N, D_in]
    y: Tensor  # [N, D_out]


def init_problem(seed: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    """Random x, y and fresh params, all drawn from one `torch.Generator(seed)` (x, y, then the
    layers in `nn.Module` order), so the same seed gives the same problem in any process."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=gen, dtype=dtype)
    y = torch.randn(N, D_OUT, generator=gen, dtype=dtype)
    model = models.get("mlp", D_in=D_IN, H=H, D_out=D_OUT)
    return Problem(model, model.init(gen, dtype=dtype), x, y)


def make_optimizer(name: str, lr: float = LR) -> optim.GradientTransformation:
    """`"adam"` or `"sgd"` with the tutorial's settings (no momentum, no weight decay)."""
    builders = {"adam": optim.adam, "sgd": optim.sgd}
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(builders)}")
    return builders[name](lr)


def make_step(model: models.Model, tx: optim.GradientTransformation) -> Step:
    """A pure training step: the loss at the current params, and the params after one update."""

    def loss_fn(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return sum_squared_error(model.apply(params, x), y)

    def step(
        params: Params, opt_state: optim.State, x: Tensor, y: Tensor
    ) -> tuple[Params, optim.State, Tensor]:
        grads, loss = torch.func.grad_and_value(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, loss

    return step


def run_exercise(
    optimizer_name: str,
    steps: int = 500,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train the two-layer net with `optimizer_name` for `steps` steps; the loss before each update.

    `log_every > 0` logs `step <k> loss <value>` after every `log_every`-th step (k counts from 1).
    """
    problem = init_problem(seed, dtype)
    tx = make_optimizer(optimizer_name)
    step = make_step(problem.model, tx)
    params, opt_state = problem.params, tx.init(problem.params)
    losses: list[Tensor] = []  # 0-d tensors: the host reads them only at log points and at the end
    for t in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, problem.x, problem.y)
        losses.append(loss)
        if log_every > 0 and t % log_every == 0:
            log(f"step {t:4d}  loss {loss.item():.6e}")
    return torch.stack(losses).tolist() if losses else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=500, help="training steps per exercise (default 500)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every this many steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator for data and params")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    dtype = DTYPES[args.dtype]

    grad = autograd_example()
    print(f"(a) autograd: grad of ((a + b) * 8).sum() w.r.t. a = {grad.tolist()}")
    for number, (name, title) in EXERCISES.items():
        print(f"({'bc'[number - 1]}) exercise {number}: {title} (optimizer {name}, lr {LR:g}, {args.dtype})")
        losses = run_exercise(name, args.steps, dtype, seed=args.seed, log_every=args.log_every)
        if losses:
            print(f"exercise {number} final loss {losses[-1]:.6e} after {len(losses)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
