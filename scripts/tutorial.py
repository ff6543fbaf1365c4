#!/usr/bin/env python
"""The classic PyTorch tutorial's first half, written with fashion_func's pure functions.

Run: `python scripts/tutorial.py [--dtype float32|float64] [--steps 500] [--every 50] [--seed 0]
[--reduction tutorial|mean|sum]` (`--log-every` is the same flag as `--every`).

Every example is run twice, as the tutorial's imperative code and in functional form, and the
script asserts that the two agree. A failed check ends the script with exit status 1 and one
line on stderr (`check failed: ...`).

(t) tensors: creation (empty, rand, zeros, tensor, new_ones), the legacy `torch.FloatTensor`
    constructors and their `dtype=` equivalents, `size()`, addition in its four forms
    (`x + y`, `torch.add`, `out=`, in-place `y.add_(x)` against the functional `torch.add`,
    which leaves `y` alone), indexing (views written through against `index_fill` /
    `index_put`), transpose / view / reshape (and `einops.rearrange`), the numpy bridge (shared
    memory against copies), and CUDA where a device is present.
(a) autograd: `x = torch.ones(2, 2, requires_grad=True); out = (3 * (x + 2) ** 2).mean();
    out.backward()` gives 4.5 everywhere, as does `torch.func.grad`; the vector
    `y = (a + b) * 8` at a = [3, 2], b = [4, 7] backpropagated with the given gradient [1, 1]
    gives [8, 8], as does `torch.func.vjp` (and any other given gradient v gives 8 v); `b`,
    which does not require grad, keeps `b.grad is None`, just as a closed-over constant gets
    no gradient from `torch.func.grad`; `detach`, `torch.no_grad` and their meaning inside
    `torch.func.grad`.
(b) exercise 1: a two-layer net `nn.Sequential(Linear, ReLU, Linear)` (N=64, D_in=1000, H=100,
    D_out=10) on random x, y, loss `nn.MSELoss()` as the tutorial writes it here (the mean over
    all N * D_out outputs; this script's earlier version used the sum, now `--reduction sum`),
    `torch.optim.Adam` lr 1e-4, 500 steps; beside it `models.get("mlp")`, `losses.mse` and
    `optim.adam(1e-4)`.
(c) exercise 2: the tutorial's `TwoLayerNet` module (ReLU as `clamp(min=0)`) trained with
    `torch.optim.SGD` lr 1e-4 on `nn.MSELoss(reduction="sum")` (SGD's lr 1e-4 is sized for
    the sum: on the mean the steps are 640 times smaller and the loss hardly moves); beside it
    a plain function over `fashion_func.nn.linear` and `optim.sgd(1e-4)`.
    `--reduction mean|sum` runs both exercises on one reduction instead.

For (b) and (c) the imperative side is the tutorial's code as written, after
`torch.manual_seed(seed)` (in a forked RNG, so importing this file changes no global state);
it draws x, y and the weights that `init_problem(seed)` draws from a `torch.Generator(seed)`
(a check; float64 weights may differ by one rounding of the init bound, so the module is then
given the functional weights). Both then train in lock step: each step's loss and, after each
step, the largest parameter difference are compared. Tolerances (`TOLERANCES`):
- float64: loss rtol 1e-9, parameters atol 1e-10 (observed over 500 steps: 1e-12 and 2e-16);
- float32: loss rtol 1e-3 plus atol 1e-6 of the first loss, parameters atol 1e-3. Seeds 0-3 of
  both exercises pass with tolerances 10 times tighter; the parameters differ by up to 7e-5,
  and the loss by up to 4e-2 relative but only once it has fallen below 1e-8 of its start (the
  atol term), because Adam's normalised steps amplify rounding once the gradients are tiny.
`tests/test_tutorial.py` runs every section in float64.

The loss is printed every `--every` steps (default 50; `--every 1` prints each step, as the
tutorial does). The params are a flat dict (`linear1.weight`, ...), each step is a pure
function `(params, opt_state, x, y) -> (params, opt_state, loss)`; nothing is updated in place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fashion_func import losses, models, optim
from fashion_func import nn as fnn

N, D_IN, H, D_OUT = 64, 1000, 100, 10  # batch size, input, hidden and output widths (the tutorial's)
LR = 1e-4
DTYPES = {"float32": torch.float32, "float64": torch.float64}
REDUCTIONS = ("tutorial", "mean", "sum")

Params = dict[str, Tensor]
Forward = Callable[[Params, Tensor], Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]
Step = Callable[[Params, optim.State, Tensor, Tensor], tuple[Params, optim.State, Tensor]]


# -- checks ---------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A functional result disagreed with the imperative code it stands for."""


class Checks:
    """Asserts one named check at a time and keeps the names of those that passed."""

    def __init__(self) -> None:
        self.passed: list[str] = []

    def __call__(self, ok: bool | Tensor, what: str, detail: str = "") -> None:
        """Record `what` as passed if `ok`, else raise CheckFailed("what: detail")."""
        if not bool(ok):
            raise CheckFailed(f"{what}: {detail}" if detail else what)
        self.passed.append(what)

    def equal(self, actual: Tensor, expected: Tensor, what: str) -> None:
        """Same shape, dtype and values, bit for bit."""
        ok = actual.shape == expected.shape and actual.dtype == expected.dtype
        self(ok and torch.equal(actual, expected), what, f"{_show(actual)} != {_show(expected)}")

    def close(self, actual: Tensor, expected: Tensor, what: str, *, rtol: float, atol: float = 0.0) -> None:
        """Same shape and dtype, values within `atol + rtol * |expected|`."""
        ok = actual.shape == expected.shape and actual.dtype == expected.dtype
        ok = ok and torch.allclose(actual, expected, rtol=rtol, atol=atol)
        self(ok, what, f"{_show(actual)} not within rtol {rtol:g}, atol {atol:g} of {_show(expected)}")


def _show(t: Tensor) -> str:
    values = t.detach().flatten()[:4].tolist()
    return f"{t.dtype} {list(t.shape)} {values}{' ...' if t.numel() > 4 else ''}"


# -- (t) tensors -----------------------------------------------------------------------


def tensor_basics(checks: Checks | None = None, *, seed: int = 0) -> Checks:
    """The tutorial's tensor examples, each beside its functional or explicit equivalent."""
    checks = checks if checks is not None else Checks()
    gen = torch.Generator().manual_seed(seed)

    # creation. `torch.empty` leaves the memory as it was: a pure program never reads it,
    # so only its shape and dtype are checked.
    x = torch.empty(5, 3)
    checks(x.shape == (5, 3) and x.dtype == torch.float32, "torch.empty(5, 3) is float32 [5, 3]")
    # `torch.rand` draws from the global generator; the explicit generator gives the same
    # numbers for the same seed, without touching global state.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x_global = torch.rand(5, 3)
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(seed))
    checks.equal(x, x_global, "torch.rand(5, 3) after manual_seed == torch.rand(5, 3, generator=)")
    checks(bool(((x >= 0) & (x < 1)).all()), "torch.rand draws from [0, 1)")
    checks.equal(torch.zeros(5, 3, dtype=torch.long), torch.full((5, 3), 0), "torch.zeros(dtype=long)")
    checks.equal(torch.tensor([5.5, 3]), torch.stack([torch.tensor(5.5), torch.tensor(3.0)]), "torch.tensor")
    checks.equal(x.new_ones(5, 3, dtype=torch.double), torch.ones(5, 3, dtype=torch.float64), "new_ones")

    # the legacy typed constructors and their dtype= equivalents
    legacy = torch.FloatTensor(5, 3)  # uninitialised, like torch.empty
    checks(legacy.shape == (5, 3) and legacy.dtype == torch.float32, "torch.FloatTensor(5, 3) == empty")
    checks.equal(
        torch.FloatTensor([[1, 2], [3, 4]]),
        torch.tensor([[1, 2], [3, 4]], dtype=torch.float32),
        "torch.FloatTensor(data)",
    )
    checks.equal(torch.DoubleTensor([1, 2]), torch.tensor([1, 2], dtype=torch.float64), "DoubleTensor(data)")
    checks.equal(torch.LongTensor([1, 2]), torch.tensor([1, 2], dtype=torch.int64), "torch.LongTensor(data)")
    checks.equal(x.type(torch.DoubleTensor), x.to(torch.float64), "x.type(torch.DoubleTensor) == x.to")

    # size: a torch.Size is a tuple
    checks(x.size() == x.shape == (5, 3) and isinstance(x.size(), tuple), "x.size() == x.shape == (5, 3)")
    checks(x.size(0) == 5 and x.size(-1) == 3 and x.numel() == 15, "x.size(dim), x.numel()")

    # addition, in its forms
    y = torch.rand(5, 3, generator=gen)
    total = x + y
    checks.equal(torch.add(x, y), total, "torch.add(x, y) == x + y")
    result = torch.empty(5, 3)
    returned = torch.add(x, y, out=result)  # writes into `result`
    checks(returned is result, "torch.add(out=result) returns result itself")
    checks.equal(result, total, "torch.add(x, y, out=result) == x + y")
    y_before = y.clone()
    y_functional = torch.add(y, x)  # a new tensor; y is left alone
    checks.equal(y, y_before, "functional torch.add(y, x) leaves y unchanged")
    returned = y.add_(x)  # in place: y itself changes
    checks(returned is y, "y.add_(x) returns y itself")
    checks.equal(y, y_functional, "in-place y.add_(x) == functional torch.add(y, x)")
    checks(not torch.equal(y, y_before), "y.add_(x) changed y")

    # indexing: a basic index is a view, so writing into it writes into x;
    # the functional forms return a new tensor and leave x alone
    x = torch.rand(5, 3, generator=gen)
    column = torch.tensor([1])
    checks.equal(x[:, 1], x.select(1, 1), "x[:, 1] == x.select(1, 1)")
    checks.equal(x[:, 1], x.index_select(1, column).squeeze(1), "x[:, 1] == x.index_select(1, [1])")
    x_before = x.clone()
    filled = x.index_fill(1, column, 0.0)
    checks.equal(x, x_before, "x.index_fill leaves x unchanged")
    view = x[:, 1]
    checks(view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), "x[:, 1] is a view into x")
    view.fill_(0.0)  # imperative: writes through the view
    checks.equal(x, filled, "x[:, 1].fill_(0) == x.index_fill(1, [1], 0)")
    put = x.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(7.0))
    x[0, 0] = 7.0
    checks.equal(x, put, "x[0, 0] = 7 == x.index_put(([0], [0]), 7)")
    checks(torch.tensor([3.5]).item() == 3.5, "one-element tensor .item() is a Python number")

    # transpose, view, reshape (and einops for shape changes that mean something)
    x = torch.randn(4, 4, generator=gen)
    checks.equal(x.view(16), rearrange(x, "a b -> (a b)"), "x.view(16) == rearrange 'a b -> (a b)'")
    checks(x.view(16).data_ptr() == x.data_ptr(), "x.view(16) shares x's memory")
    z = x.view(-1, 8)
    checks(z.size() == (2, 8), "x.view(-1, 8) is [2, 8]")
    checks.equal(z, rearrange(x, "(a r) b -> a (r b)", r=2), "x.view(-1, 8) == rearrange")
    checks.equal(x.reshape(2, 8), z, "x.reshape(2, 8) == x.view(-1, 8)")
    checks.equal(x.t(), x.transpose(0, 1), "x.t() == x.transpose(0, 1)")
    checks.equal(x.t(), rearrange(x, "a b -> b a"), "x.t() == rearrange 'a b -> b a'")
    try:  # a transposed tensor is not contiguous: view refuses, reshape copies
        x.t().view(16)
        refused = False
    except RuntimeError:
        refused = True
    checks(refused and not x.t().is_contiguous(), "x.t().view(16) refuses a non-contiguous tensor")
    checks.equal(x.t().reshape(16), x.t().contiguous().view(16), "x.t().reshape(16) == contiguous().view")

    # the numpy bridge: .numpy() and from_numpy share memory; the functional forms copy
    a = torch.ones(5)
    b = a.numpy()
    a_plus_one = a + 1  # functional: a and b unchanged
    checks(bool((b == 1).all()), "a + 1 leaves a.numpy() unchanged")
    a.add_(1)  # imperative: b sees the change
    checks(bool((b == 2).all()) and torch.equal(a, a_plus_one), "a.add_(1) shows through a.numpy()")
    array = np.ones(5)
    shared = torch.from_numpy(array)
    copied = torch.tensor(array)
    np.add(array, 1, out=array)
    checks(shared.dtype == torch.float64, "torch.from_numpy keeps numpy's float64")
    checks.equal(shared, torch.full((5,), 2.0, dtype=torch.float64), "from_numpy shares the array's memory")
    checks.equal(copied, torch.ones(5, dtype=torch.float64), "torch.tensor(array) copies")
    checks(np.array_equal(a.numpy(), np.full(5, 2.0, dtype=np.float32)), "tensor -> numpy values")

    # CUDA, where present
    if torch.cuda.is_available():
        device = torch.device("cuda")
        x = torch.rand(5, 3, generator=gen)
        ones = torch.ones_like(x, device=device)  # directly on the device
        on_device = x.to(device) + ones
        checks(on_device.device.type == "cuda", "x.to('cuda') + ones_like(device='cuda') is on CUDA")
        back = on_device.to("cpu", torch.double)
        checks.close(back, (x + 1).double(), "CUDA x + 1, back as cpu double", rtol=0.0, atol=0.0)
    return checks


# -- (a) autograd ----------------------------------------------------------------------


def autograd_example() -> Tensor:
    """d/da of ((a + b) * 8).sum() at a = [3, 2], b = [4, 7]: [8, 8]."""
    a = torch.tensor([3.0, 2.0])
    b = torch.tensor([4.0, 7.0])
    return torch.func.grad(lambda a: ((a + b) * 8).sum())(a)


def autograd_examples(checks: Checks | None = None) -> dict[str, Tensor]:
    """The tutorial's autograd examples, `.backward()` beside `torch.func`; returns the results."""
    checks = checks if checks is not None else Checks()
    out: dict[str, Tensor] = {}

    # x = ones(2, 2); y = x + 2; z = y * y * 3; out = z.mean(); out.backward() -> x.grad = 4.5
    x = torch.ones(2, 2, requires_grad=True)
    y = x + 2
    z = y * y * 3
    mean = z.mean()
    checks(x.grad_fn is None and y.grad_fn is not None, "y = x + 2 has a grad_fn, the leaf x none")
    checks(mean.item() == 27.0, "out = (3 (x + 2)^2).mean() == 27 at x = ones")
    mean.backward()
    out["x.grad"] = x.grad

    def f(x: Tensor) -> Tensor:
        y = x + 2
        return (y * y * 3).mean()

    out["grad(f)"] = torch.func.grad(f)(torch.ones(2, 2))
    checks.equal(x.grad, torch.full((2, 2), 4.5), "out.backward() gives x.grad = 4.5")
    checks.equal(out["grad(f)"], x.grad, "torch.func.grad(f)(ones) == x.grad")

    # y = (a + b) * 8 is a vector: backward needs the gradient of the loss w.r.t. y, here
    # [1, 1] (i.e. of y.sum()); a's gradient is the vector-Jacobian product v^T dy/da = 8 v.
    b = torch.tensor([4.0, 7.0])  # does not require grad

    def g(a: Tensor) -> Tensor:
        return (a + b) * 8  # b: a constant closed over

    for v, name in ((torch.ones(2), "[1, 1]"), (torch.tensor([0.1, 1.0]), "[0.1, 1]")):
        a = torch.tensor([3.0, 2.0], requires_grad=True)
        g(a).backward(v)
        _, vjp_fn = torch.func.vjp(g, torch.tensor([3.0, 2.0]))
        (vjp,) = vjp_fn(v)
        checks.equal(vjp, a.grad, f"torch.func.vjp with v = {name} == y.backward(v)")
        checks.equal(vjp, 8 * v, f"the vector-Jacobian product with v = {name} is 8 v")
        out[f"vjp {name}"] = vjp
    checks(b.grad is None and not b.requires_grad, "b, which does not require grad, has b.grad None")
    out["[8, 8]"] = autograd_example()
    checks.equal(out["[8, 8]"], out["vjp [1, 1]"], "grad of ((a + b) * 8).sum() == vjp with [1, 1]")
    # what makes b a constant in functional form is that f is not differentiated w.r.t. it:
    _, grad_b = torch.func.grad(lambda a, b: ((a + b) * 8).sum(), argnums=(0, 1))(torch.tensor([3.0, 2.0]), b)
    checks.equal(grad_b, torch.full((2,), 8.0), "grad(argnums=(0, 1)) gives b a gradient only when asked")

    # detach: the detached copy is a constant
    xs = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    ys = xs * xs
    const = ys.detach()
    checks(ys.requires_grad and not const.requires_grad, "y.detach() does not require grad")
    (const * xs).sum().backward()
    out["detach"] = torch.func.grad(lambda x: ((x * x).detach() * x).sum())(torch.tensor([1.0, 2.0, 3.0]))
    checks.equal(xs.grad, const, "d/dx sum(detach(x^2) x) = x^2 with backward")
    checks.equal(out["detach"], xs.grad, "detach inside torch.func.grad is a stop-gradient too")

    # torch.no_grad: nothing inside is recorded
    xs = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with torch.no_grad():
        inside = xs**2
    checks(
        xs.requires_grad and not inside.requires_grad, "(x ** 2) under torch.no_grad() does not require grad"
    )
    (xs - inside).sum().backward()

    def h(x: Tensor) -> Tensor:
        with torch.no_grad():  # inside the function: x ** 2 is a constant, as above
            c = x**2
        return (x - c).sum()

    out["no_grad inside"] = torch.func.grad(h)(torch.tensor([1.0, 2.0, 3.0]))
    checks.equal(out["no_grad inside"], xs.grad, "torch.no_grad inside torch.func.grad == under backward")
    checks.equal(xs.grad, torch.ones(3), "d/dx sum(x - no_grad(x^2)) = 1")
    with torch.no_grad():  # outside: torch.func.grad still differentiates its function
        out["no_grad outside"] = torch.func.grad(lambda x: (x**2).sum())(torch.tensor([1.0, 2.0, 3.0]))
    checks.equal(out["no_grad outside"], torch.tensor([2.0, 4.0, 6.0]), "torch.func.grad under no_grad")
    return out


# -- (b), (c) the two-layer nets --------------------------------------------------------


class Exercise(NamedTuple):
    """One of the tutorial's two training exercises."""

    optimizer: str  # "adam" or "sgd"
    reduction: str  # the tutorial's nn.MSELoss reduction: "mean" or "sum"
    title: str


EXERCISES = {
    1: Exercise("adam", "mean", "two-layer net with nn.Sequential + MSELoss() + Adam"),
    2: Exercise("sgd", "sum", "TwoLayerNet module (clamp(min=0)) + MSELoss(reduction='sum') + SGD"),
}


class Tolerance(NamedTuple):
    """|loss - torch's| <= loss_rtol * |torch's| + loss_atol * (first loss); |param diff| <= param_atol."""

    loss_rtol: float
    loss_atol: float
    param_atol: float


TOLERANCES = {torch.float64: Tolerance(1e-9, 1e-12, 1e-10), torch.float32: Tolerance(1e-3, 1e-6, 1e-3)}


def sum_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Sum of squared errors, `nn.MSELoss(reduction="sum")`."""
    return ((pred - target) ** 2).sum()


LOSSES: dict[str, Loss] = {"mean": losses.mse, "sum": sum_squared_error}  # reduction -> loss


def two_layer_net(params: Params, x: Tensor) -> Tensor:
    """The tutorial's `TwoLayerNet.forward` as a pure function: `linear2(linear1(x).clamp(min=0))`."""
    h_relu = fnn.linear(x, params["linear1.weight"], params["linear1.bias"]).clamp(min=0)
    return fnn.linear(h_relu, params["linear2.weight"], params["linear2.bias"])


class TwoLayerNet(torch.nn.Module):
    """The tutorial's custom module (exercise 2), as written there."""

    def __init__(self, D_in: int, H: int, D_out: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.linear1 = torch.nn.Linear(D_in, H, dtype=dtype)
        self.linear2 = torch.nn.Linear(H, D_out, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h_relu = self.linear1(x).clamp(min=0)
        return self.linear2(h_relu)


def tutorial_module(number: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Exercise `number`'s `nn.Module`, built as the tutorial builds it (global RNG)."""
    if number == 1:
        return torch.nn.Sequential(
            torch.nn.Linear(D_IN, H, dtype=dtype), torch.nn.ReLU(), torch.nn.Linear(H, D_OUT, dtype=dtype)
        )
    return TwoLayerNet(D_IN, H, D_OUT, dtype=dtype)


def module_names(number: int) -> dict[str, str]:
    """Our param name -> the module's state_dict name (`nn.Sequential` numbers its layers)."""
    names = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
    if number == 1:
        return dict(zip(names, ("0.weight", "0.bias", "2.weight", "2.bias"), strict=True))
    return {name: name for name in names}


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


def tutorial_problem(
    number: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Tensor, Tensor]:
    """`(module, x, y)` from the tutorial's code as written, after `torch.manual_seed(seed)`,
    in a forked RNG (the caller's global RNG state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = torch.randn(N, D_IN, dtype=dtype)
        y = torch.randn(N, D_OUT, dtype=dtype)
        module = tutorial_module(number, dtype)
    return module, x, y


def make_optimizer(name: str, lr: float = LR) -> optim.GradientTransformation:
    """`"adam"` or `"sgd"` with the tutorial's settings (no momentum, no weight decay)."""
    builders = {"adam": optim.adam, "sgd": optim.sgd}
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(builders)}")
    return builders[name](lr)


def make_torch_optimizer(name: str, params, lr: float = LR) -> torch.optim.Optimizer:
    """The imperative counterpart of `make_optimizer`."""
    return {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name](params, lr=lr)


def make_step(
    model: models.Model | Forward, tx: optim.GradientTransformation, loss: Loss = sum_squared_error
) -> Step:
    """A pure training step: the loss at the current params, and the params after one update."""

    def loss_fn(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss(model(params, x), y)

    def step(
        params: Params, opt_state: optim.State, x: Tensor, y: Tensor
    ) -> tuple[Params, optim.State, Tensor]:
        grads, value = torch.func.grad_and_value(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, value

    return step


def _check_reduction(reduction: str) -> None:
    if reduction not in LOSSES:
        raise ValueError(f"unknown reduction {reduction!r}; choose from {sorted(LOSSES)}")


def run_exercise(
    optimizer_name: str,
    steps: int = 500,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    reduction: str = "sum",
    forward: Forward | None = None,
) -> list[float]:
    """Train the two-layer net (functional form only) with `optimizer_name` for `steps` steps on
    the `reduction` ("sum" or "mean") of squared errors; the loss before each update.

    forward: the model as a function `(params, x) -> out`; default `models.get("mlp")`.
    `log_every > 0` logs `step <k> loss <value>` after every `log_every`-th step (k counts from 1).
    """
    _check_reduction(reduction)
    problem = init_problem(seed, dtype)
    tx = make_optimizer(optimizer_name)
    step = make_step(forward or problem.model, tx, LOSSES[reduction])
    params, opt_state = problem.params, tx.init(problem.params)
    losses_: list[Tensor] = []  # 0-d tensors: the host reads them only at log points and at the end
    for t in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, problem.x, problem.y)
        losses_.append(loss)
        if log_every > 0 and t % log_every == 0:
            log(f"step {t:4d}  loss {loss.item():.6e}")
    return torch.stack(losses_).tolist() if losses_ else []


class Comparison(NamedTuple):
    """An exercise trained both ways; every field was checked against `tolerance`."""

    losses: list[float]  # functional, before each update
    torch_losses: list[float]  # nn.Module + torch.optim, before each update
    max_loss_rel_diff: float  # max over steps of |loss - torch's| / |torch's|
    max_param_diff: float  # max over steps and params of |param - torch's|, after each update
    tolerance: Tolerance


def compare_exercise(
    number: int,
    steps: int = 500,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    reduction: str | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Exercise `number` as the tutorial's imperative code and in functional form, in lock step.

    Raises `CheckFailed` (naming the first step that disagrees) where the two differ by more
    than `TOLERANCES[dtype]`. reduction: the loss's; None: the tutorial's for this exercise.
    """
    exercise = EXERCISES[number]
    reduction = reduction or exercise.reduction
    _check_reduction(reduction)
    tol = TOLERANCES[dtype]
    checks = Checks()

    # the same starting point both ways
    problem = init_problem(seed, dtype)
    module, x, y = tutorial_problem(number, seed, dtype)
    checks.equal(x, problem.x, f"exercise {number}: torch.randn x after manual_seed == init_problem's")
    checks.equal(y, problem.y, f"exercise {number}: torch.randn y after manual_seed == init_problem's")
    names = module_names(number)
    theirs = module.state_dict()
    for ours, their in names.items():
        # nn.Linear's bound is gain * sqrt(3 / fan_in), ours 1 / sqrt(fan_in): one rounding apart
        checks.close(
            theirs[their],
            problem.params[ours],
            f"exercise {number}: the module's initial {their} == init_problem's {ours}",
            rtol=4 * torch.finfo(dtype).eps,
        )
    module.load_state_dict({their: problem.params[ours] for ours, their in names.items()})

    # imperative: the tutorial's loop
    loss_fn = torch.nn.MSELoss(reduction=reduction)
    optimizer = make_torch_optimizer(exercise.optimizer, module.parameters())
    # functional: model, loss and optimizer as pure functions
    forward: Forward = problem.model if number == 1 else two_layer_net
    tx = make_optimizer(exercise.optimizer)
    step = make_step(forward, tx, LOSSES[reduction])
    params, opt_state = problem.params, tx.init(problem.params)

    ours_: list[Tensor] = []
    theirs_: list[Tensor] = []
    param_diffs: list[Tensor] = []
    for t in range(1, steps + 1):
        y_pred = module(x)
        loss = loss_fn(y_pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        params, opt_state, our_loss = step(params, opt_state, problem.x, problem.y)
        ours_.append(our_loss)
        theirs_.append(loss.detach())
        with torch.no_grad():
            current = module.state_dict()
            param_diffs.append(
                torch.stack([(params[k] - current[names[k]]).abs().max() for k in names]).max()
            )
        if log_every > 0 and t % log_every == 0:
            log(f"step {t:4d}  loss {our_loss.item():.6e}")

    if not steps:
        return Comparison([], [], 0.0, 0.0, tol)
    ours_t, theirs_t, diffs_t = torch.stack(ours_), torch.stack(theirs_), torch.stack(param_diffs)
    allowed = tol.loss_rtol * theirs_t.abs() + tol.loss_atol * theirs_t[0].abs()
    bad = ((ours_t - theirs_t).abs() > allowed).nonzero()
    if len(bad):
        t = int(bad[0]) + 1
        raise CheckFailed(
            f"exercise {number}: step {t} loss {ours_t[t - 1].item():.17g} != torch's "
            f"{theirs_t[t - 1].item():.17g} (rtol {tol.loss_rtol:g} + atol {tol.loss_atol:g} x first loss)"
        )
    bad = (diffs_t > tol.param_atol).nonzero()
    if len(bad):
        t = int(bad[0]) + 1
        raise CheckFailed(
            f"exercise {number}: after step {t} the params differ from torch's by "
            f"{diffs_t[t - 1].item():.3g} > atol {tol.param_atol:g}"
        )
    rel = ((ours_t - theirs_t).abs() / theirs_t.abs().clamp_min(torch.finfo(dtype).tiny)).max()
    return Comparison(ours_t.tolist(), theirs_t.tolist(), rel.item(), diffs_t.max().item(), tol)


# -- the script ------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """Every section in the tutorial's order; raises CheckFailed on the first disagreement."""
    dtype = DTYPES[args.dtype]
    checks = tensor_basics(seed=args.seed)
    cuda = "present, checked" if torch.cuda.is_available() else "not present"
    print(f"(t) tensors: {len(checks.passed)} checks passed (CUDA {cuda})")

    checks = Checks()
    results = autograd_examples(checks)
    print(f"(a) autograd: grad of ((a + b) * 8).sum() w.r.t. a = {results['[8, 8]'].tolist()}")
    print(
        f"(a) autograd: out = (3 (x + 2)^2).mean(), out.backward(): x.grad = {results['x.grad'].tolist()}"
        f" == torch.func.grad; {len(checks.passed)} checks passed"
    )

    for number, exercise in EXERCISES.items():
        reduction = exercise.reduction if args.reduction == "tutorial" else args.reduction
        print(
            f"({'bc'[number - 1]}) exercise {number}: {exercise.title} (optimizer {exercise.optimizer}, "
            f"lr {LR:g}, loss {reduction}, {args.dtype})"
        )
        result = compare_exercise(
            number, args.steps, dtype, seed=args.seed, reduction=reduction, log_every=args.every
        )
        if result.losses:
            print(
                f"exercise {number} final loss {result.losses[-1]:.6e} after {len(result.losses)} steps; "
                f"nn.Module + torch.optim agree step for step (max loss rel. diff "
                f"{result.max_loss_rel_diff:.1e}, max param diff {result.max_param_diff:.1e})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=500, help="training steps per exercise (default 500)")
    parser.add_argument(
        "--every",
        "--log-every",
        dest="every",
        type=int,
        default=50,
        help="print the loss every this many steps (default 50; 1: each step, as the tutorial; 0: never)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator for data and params")
    parser.add_argument(
        "--reduction",
        choices=REDUCTIONS,
        default="tutorial",
        help="the MSE loss's reduction; tutorial: mean for exercise 1, sum for exercise 2",
    )
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    try:
        run(args)
    except CheckFailed as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"check failed: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
