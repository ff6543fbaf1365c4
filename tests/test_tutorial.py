"""scripts/tutorial.py against the classic tutorial's nn.Module + torch.optim code, step for step."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from fashion_func import losses, optim
from fashion_func.state import create
from fashion_func.step import make_train_step

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matmuls, shared 2-core CPU: one intra-op thread is 2x faster than two that wait
    on each other (the suite's setting is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TwoLayerNet(nn.Module):
    """The tutorial's custom module (exercise 2)."""

    def __init__(self, d_in: int, h: int, d_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, h)
        self.linear2 = nn.Linear(h, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x).clamp(min=0))


def reference_losses(
    module: nn.Module, make_opt, x: torch.Tensor, y: torch.Tensor, steps: int, reduction: str = "sum"
) -> list[float]:
    """The tutorial's loop: forward, loss, zero_grad, backward, step."""
    loss_fn = nn.MSELoss(reduction=reduction)
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


def sequential_from(params: dict[str, torch.Tensor]) -> nn.Sequential:
    seq = nn.Sequential(nn.Linear(1000, 100), nn.ReLU(), nn.Linear(100, 10)).to(torch.float64)
    seq.load_state_dict(
        {
            "0.weight": params["linear1.weight"],
            "0.bias": params["linear1.bias"],
            "2.weight": params["linear2.weight"],
            "2.bias": params["linear2.bias"],
        }
    )
    return seq


@pytest.mark.cross_path
def test_exercise1_sequential_adam_matches_torch() -> None:
    # run_exercise's default reduction is the sum (`--reduction sum`); the tutorial's mean is below
    problem = tutorial.init_problem(0, torch.float64)
    seq = sequential_from(problem.params)
    ref = reference_losses(seq, lambda ps: torch.optim.Adam(ps, lr=1e-4), problem.x, problem.y, STEPS)
    ours = tutorial.run_exercise("adam", STEPS, torch.float64)
    assert ours == pytest.approx(ref, rel=1e-10)
    assert ours[-1] < ours[0] / 3  # it trains


@pytest.mark.cross_path
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
    with pytest.raises(ValueError, match="reduction"):
        tutorial.run_exercise("adam", 1, reduction="max")


def test_script_runs_and_prints_losses() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "4", "--log-every", "2", "--dtype", "float64"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as one_thread
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    lines = out.splitlines()
    cuda = "present, checked" if torch.cuda.is_available() else "not present"
    assert re.fullmatch(rf"\(t\) tensors: \d+ checks passed \(CUDA {cuda}\)", lines[0])
    assert lines[1] == "(a) autograd: grad of ((a + b) * 8).sum() w.r.t. a = [8.0, 8.0]"
    assert lines[2].startswith(
        "(a) autograd: out = (3 (x + 2)^2).mean(), out.backward(): x.grad = [[4.5, 4.5]"
    )
    logged = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step\s+(\d+)\s+loss (\S+)$", out, re.M)]
    assert [s for s, _ in logged] == [2, 4, 2, 4]  # two exercises, every 2nd step
    # the tutorial's losses: MSELoss() (mean) for exercise 1, MSELoss(reduction="sum") for 2
    expected = tutorial.run_exercise("adam", 4, torch.float64, reduction="mean") + tutorial.run_exercise(
        "sgd", 4, torch.float64
    )
    for (_, got), want in zip(logged, [expected[1], expected[3], expected[5], expected[7]], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert sum("final loss" in line and "agree step for step" in line for line in lines) == 2
    assert any(line.startswith("(b) exercise 1") for line in lines)
    assert any(line.startswith("(c) exercise 2") for line in lines)


# -- the sections the script checks itself, asserted here against code written independently --


def test_tensor_basics_pass_and_cover_the_tutorial() -> None:
    passed = tutorial.tensor_basics().passed
    assert len(passed) >= 40
    text = "\n".join(passed)
    for topic in (
        "torch.empty",
        "torch.rand",
        "torch.zeros",
        "torch.tensor",
        "torch.FloatTensor(5, 3)",
        "x.size()",
        "x + y",
        "out=result",
        "y.add_(x)",
        "x[:, 1]",
        "x.view(16)",
        "x.t()",
        "reshape",
        "a.numpy()",
        "from_numpy",
    ):
        assert topic in text, topic
    assert ("CUDA" in text) == torch.cuda.is_available()


def test_a_failed_check_raises_naming_it() -> None:
    checks = tutorial.Checks()
    checks.equal(torch.ones(2), torch.ones(2), "same")
    with pytest.raises(tutorial.CheckFailed, match=r"^differs: torch.float32 \[2\] \[1.0, 1.0\] != "):
        checks.equal(torch.ones(2), torch.zeros(2), "differs")
    with pytest.raises(tutorial.CheckFailed, match="dtype"):  # dtypes must match too
        checks.equal(torch.ones(2), torch.ones(2, dtype=torch.float64), "dtype")
    with pytest.raises(tutorial.CheckFailed, match="rtol 1e-06"):
        checks.close(torch.tensor([1.0]), torch.tensor([1.001]), "close", rtol=1e-6)
    assert checks.passed == ["same"]


def test_autograd_examples_match_backward() -> None:
    results = tutorial.autograd_examples()
    # the classic: x = ones(2, 2, requires_grad=True); out = (3 (x + 2)^2).mean(); d out/dx = 6 (x + 2) / 4
    x = torch.ones(2, 2, requires_grad=True)
    ((x + 2) * (x + 2) * 3).mean().backward()
    assert torch.equal(results["x.grad"], torch.full((2, 2), 4.5))
    assert torch.equal(results["grad(f)"], x.grad)
    # [8, 8]: the vector (a + b) * 8 backpropagated with the given gradient [1, 1]; any v gives 8 v
    for name, v in (("[1, 1]", [1.0, 1.0]), ("[0.1, 1]", [0.1, 1.0])):
        a = torch.tensor([3.0, 2.0], requires_grad=True)
        ((a + torch.tensor([4.0, 7.0])) * 8).backward(torch.tensor(v))
        assert torch.equal(results[f"vjp {name}"], a.grad)
    assert results["vjp [1, 1]"].tolist() == results["[8, 8]"].tolist() == [8.0, 8.0]
    # detach / no_grad make constants: d/dx sum(stop(x^2) x) = x^2, d/dx sum(x - stop(x^2)) = 1
    assert results["detach"].tolist() == [1.0, 4.0, 9.0]
    assert results["no_grad inside"].tolist() == [1.0, 1.0, 1.0]
    assert results["no_grad outside"].tolist() == [2.0, 4.0, 6.0]  # torch.func.grad ignores an outer no_grad


@pytest.mark.cross_path
def test_exercise1_tutorial_mse_mean_adam_step_for_step() -> None:
    """The tutorial's exercise 1 as written (MSELoss(), mean), float64, against the script's check."""
    result = tutorial.compare_exercise(1, STEPS, torch.float64)
    problem = tutorial.init_problem(0, torch.float64)
    ref = reference_losses(
        sequential_from(problem.params),
        lambda ps: torch.optim.Adam(ps, lr=1e-4),
        problem.x,
        problem.y,
        STEPS,
        reduction="mean",
    )
    assert result.torch_losses == pytest.approx(ref, rel=1e-12)  # the script's imperative side is torch's
    assert result.losses == pytest.approx(ref, rel=1e-10)
    assert result.max_loss_rel_diff <= 1e-10 and result.max_param_diff <= 1e-12
    assert result.tolerance == tutorial.TOLERANCES[torch.float64]
    assert result.losses[-1] < result.losses[0] / 3  # it trains
    # the same functional form through the library's train step (per-example MSE, its mean minimised)
    tx = optim.adam(1e-4)
    train_step = make_train_step(
        problem.model, tx, loss=losses.mse_per_example, preprocess=None, compile=False
    )
    state = create(problem.params, tx)
    step_losses = []
    for _ in range(20):  # a prefix is enough here, and keeps the test quick on a shared CPU
        state, metrics = train_step(state, (problem.x, problem.y))
        step_losses.append(metrics["loss_sum"] / metrics["count"])
    assert torch.stack(step_losses).tolist() == pytest.approx(ref[:20], rel=1e-10)


@pytest.mark.cross_path
def test_exercise2_two_layer_net_clamp_sgd_step_for_step() -> None:
    result = tutorial.compare_exercise(2, STEPS, torch.float64)
    problem = tutorial.init_problem(0, torch.float64)
    net = TwoLayerNet(1000, 100, 10).to(torch.float64)
    net.load_state_dict(problem.params)
    ref = reference_losses(net, lambda ps: torch.optim.SGD(ps, lr=1e-4), problem.x, problem.y, STEPS)
    assert result.losses == pytest.approx(ref, rel=1e-10)
    assert result.max_param_diff <= 1e-12
    assert result.losses[-1] < result.losses[0] / 10
    # the functional forward is TwoLayerNet.forward, bit for bit
    fresh = TwoLayerNet(1000, 100, 10).to(torch.float64)
    fresh.load_state_dict(problem.params)
    with torch.no_grad():
        assert torch.equal(tutorial.two_layer_net(problem.params, problem.x), fresh(problem.x))


def test_every_and_reduction_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """--every (alias --log-every) 1 prints each step as the tutorial does; --reduction sum; float32."""
    assert tutorial.main(["--steps", "3", "--every", "1", "--reduction", "sum"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    logged = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step\s+(\d+)\s+loss (\S+)$", out, re.M)]
    assert [s for s, _ in logged] == [1, 2, 3, 1, 2, 3]
    expected = tutorial.run_exercise("adam", 3) + tutorial.run_exercise("sgd", 3)  # both on the sum
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-6)
    assert out.count("loss sum, float32)") == 2


def test_a_failed_check_exits_nonzero_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A functional side that differs from torch's (here: lr doubled) fails the script's check."""
    make = tutorial.make_optimizer
    monkeypatch.setattr(tutorial, "make_optimizer", lambda name, lr=tutorial.LR: make(name, 2 * lr))
    assert tutorial.main(["--steps", "3", "--every", "0", "--dtype", "float64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    # step 1's loss is before any update; step 2's is the first to see the different lr
    assert err.startswith("check failed: exercise 1: step 2 loss ")


@pytest.mark.cuda
def test_tensor_basics_on_cuda() -> None:
    passed = tutorial.tensor_basics().passed
    assert "x.to('cuda') + ones_like(device='cuda') is on CUDA" in passed
