"""scripts/tutorial.py against the classic tutorial's nn.Module + torch.optim code, step for step."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tutorial.py"
STEPS = 60  # enough for the loss to fall by orders of magnitude; small enough for a shared CPU


def load_tutorial() -> ModuleType:
    # scripts/ is not a package: load the file as a module
    spec = importlib.util.spec_from_file_location("fashion_func_tutorial", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tutorial = load_tutorial()


class TwoLayerNet(nn.Module):
    """The tutorial's custom module (exercise 2)."""

    def __init__(self, d_in: int, h: int, d_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, h)
        self.linear2 = nn.Linear(h, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x).clamp(min=0))


def reference_losses(
    module: nn.Module, make_opt, x: torch.Tensor, y: torch.Tensor, steps: int
) -> list[float]:
    """The tutorial's loop: forward, loss, zero_grad, backward, step."""
    loss_fn = nn.MSELoss(reduction="sum")
    opt = make_opt(module.parameters())
    losses = []
    for _ in range(steps):
        loss = loss_fn(module(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_autograd_example_gives_eight_eight() -> None:
    grad = tutorial.autograd_example()
    assert grad.tolist() == [8.0, 8.0]
    # and it agrees with the tutorial's .backward() form
    a = torch.tensor([3.0, 2.0], requires_grad=True)
    ((a + torch.tensor([4.0, 7.0])) * 8).sum().backward()
    assert torch.equal(grad, a.grad)


def test_exercise1_sequential_adam_matches_torch() -> None:
    problem = tutorial.init_problem(0, torch.float64)
    seq = nn.Sequential(nn.Linear(1000, 100), nn.ReLU(), nn.Linear(100, 10)).to(torch.float64)
    p = problem.params
    seq.load_state_dict(
        {
            "0.weight": p["linear1.weight"],
            "0.bias": p["linear1.bias"],
            "2.weight": p["linear2.weight"],
            "2.bias": p["linear2.bias"],
        }
    )
    ref = reference_losses(seq, lambda ps: torch.optim.Adam(ps, lr=1e-4), problem.x, problem.y, STEPS)
    ours = tutorial.run_exercise("adam", STEPS, torch.float64)
    assert ours == pytest.approx(ref, rel=1e-10)
    assert ours[-1] < ours[0] / 3  # it trains


def test_exercise2_two_layer_net_sgd_matches_torch() -> None:
    problem = tutorial.init_problem(0, torch.float64)
    net = TwoLayerNet(1000, 100, 10).to(torch.float64)
    net.load_state_dict(problem.params)  # same names: linear1.weight, ...
    ref = reference_losses(net, lambda ps: torch.optim.SGD(ps, lr=1e-4), problem.x, problem.y, STEPS)
    ours = tutorial.run_exercise("sgd", STEPS, torch.float64)
    assert ours == pytest.approx(ref, rel=1e-10)
    assert ours[-1] < ours[0] / 10


def test_init_problem_is_a_pure_function_of_the_seed() -> None:
    a, b, c = (tutorial.init_problem(s, torch.float64) for s in (3, 3, 4))
    assert torch.equal(a.x, b.x) and torch.equal(a.params["linear2.weight"], b.params["linear2.weight"])
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (64, 1000) and a.y.shape == (64, 10)
    assert {k: tuple(v.shape) for k, v in a.params.items()} == {
        "linear1.weight": (100, 1000),
        "linear1.bias": (100,),
        "linear2.weight": (10, 100),
        "linear2.bias": (10,),
    }
    with pytest.raises(ValueError, match="optimizer"):
        tutorial.make_optimizer("rmsprop")


def test_script_runs_and_prints_losses() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "4", "--log-every", "2", "--dtype", "float64"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "(a) autograd: grad of ((a + b) * 8).sum() w.r.t. a = [8.0, 8.0]"
    logged = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step\s+(\d+)\s+loss (\S+)$", out, re.M)]
    assert [s for s, _ in logged] == [2, 4, 2, 4]  # two exercises, every 2nd step
    expected = tutorial.run_exercise("adam", 4, torch.float64) + tutorial.run_exercise(
        "sgd", 4, torch.float64
    )
    for (_, got), want in zip(logged, [expected[1], expected[3], expected[5], expected[7]], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert sum("final loss" in line for line in lines) == 2
    assert any(line.startswith("(b) exercise 1") for line in lines)
    assert any(line.startswith("(c) exercise 2") for line in lines)
