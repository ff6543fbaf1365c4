"""Optimizers as pairs of pure functions, in the style of optax.

An optimizer is a `GradientTransformation(init, update)`:

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

Nothing is modified in place: every call returns new trees. Named optimizers
(`sgd`, `adam`, `adamw`) are `chain(...)`s of small transforms and follow
`torch.optim.SGD` / `Adam` / `AdamW` step for step (same formulas, same order of
operations where it matters for rounding).

Hyperparameters that a training loop may change (learning rate, weight decay,
momentum, clipping norm) are 0-d tensors inside the optimizer state, created by
`init` on the params' device in the params' floating dtype (at least float32).
`set_hyperparam` swaps in a new tensor of the same dtype, device and shape, so a
`torch.compile`d step that takes the state as an argument never recompiles
because of a schedule. Counters are 0-d int64 tensors. `update` never calls
`.item()` or branches on tensor values, so it traces with `fullgraph=True`.

Schedules live in `fashion_func.schedules`: per epoch a callback feeds their value
to `set_hyperparam(opt_state, "lr", value)`; per step `scale_by_schedule` runs one inside
the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fashion_func import tree

__all__ = [
    "AddDecayedWeightsState",
    "ClipByGlobalNormState",
    "EmaState",
    "EmptyState",
    "GradientTransformation",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "add_l2_to_grads",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "ema",
    "ema_params",
    "get_hyperparam",
    "hyperparams",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "set_hyperparam",
    "sgd",
    "trace",
]

Params = Any  # a tree of tensors; in this library a flat dict[str, Tensor]
State = Any  # a NamedTuple of tensors / trees, or a tuple of such (chain)


class GradientTransformation(NamedTuple):
    """A pair of pure functions.

    `init(params) -> state`; `update(grads, state, params=None) -> (updates, state)`.
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Params, State]]


class EmptyState(NamedTuple):
    """State of a transform that keeps nothing."""


class AddDecayedWeightsState(NamedTuple):
    weight_decay: Tensor  # 0-d, float


class TraceState(NamedTuple):
    count: Tensor  # 0-d int64, number of updates done
    trace: Params  # momentum buffer, like params
    momentum: Tensor  # 0-d, float
    dampening: Tensor  # 0-d, float


class ScaleByAdamState(NamedTuple):
    count: Tensor  # 0-d int64
    mu: Params  # first moment (torch: exp_avg)
    nu: Params  # second moment (torch: exp_avg_sq)


class EmaState(NamedTuple):
    decay: Tensor  # 0-d float (settable with set_hyperparam)
    count: Tensor  # 0-d int64, updates averaged so far
    ema: Params  # the moving average of the parameters


class ScaleByLearningRateState(NamedTuple):
    lr: Tensor  # 0-d, float


class ScaleByScheduleState(NamedTuple):
    count: Tensor  # 0-d int64, updates scaled so far


class ClipByGlobalNormState(NamedTuple):
    max_norm: Tensor  # 0-d, float


# ---------------------------------------------------------------------------
# helpers


def _hyper_spec(params: Params) -> tuple[torch.dtype, torch.device]:
    """Dtype and device for hyperparameter tensors: the params' device, float64 if
    any param is float64 else float32 (half-precision params still get a float32 lr)."""
    floats = [t for t in tree.leaves(params) if isinstance(t, Tensor) and t.is_floating_point()]
    if not floats:
        return torch.float32, torch.device("cpu")
    dtype = _widest_float(floats)
    return dtype, floats[0].device


def _widest_float(leaves: list[Tensor]) -> torch.dtype:
    """float64 if any leaf is, else float32: the dtype scalar factors over `leaves` use."""
    return torch.float64 if any(t.dtype == torch.float64 for t in leaves) else torch.float32


def _hyper(value: float, params: Params) -> Tensor:
    dtype, device = _hyper_spec(params)
    return torch.tensor(float(value), dtype=dtype, device=device)


def _counter(params: Params) -> Tensor:
    _, device = _hyper_spec(params)
    return torch.zeros((), dtype=torch.int64, device=device)


def _need_params(params: Params | None, who: str) -> Params:
    if params is None:
        raise ValueError(f"{who} needs `params`: call update(grads, state, params)")
    return params


# ---------------------------------------------------------------------------
# composition


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply `transforms` one after the other; the state is the tuple of their states."""
    txs = tuple(transforms)

    def init(params: Params) -> tuple[State, ...]:
        return tuple(tx.init(params) for tx in txs)

    def update(grads: Params, state: tuple[State, ...], params: Params | None = None) -> tuple[Params, State]:
        if len(state) != len(txs):
            raise ValueError(f"chain of {len(txs)} transforms got a state of length {len(state)}")
        new_states = []
        for tx, s in zip(txs, state, strict=True):
            grads, s = tx.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Params) -> Params:
    """A new tree `params + updates`, each leaf kept in its param's dtype."""
    return tree.map(lambda p, u: (p + u).to(p.dtype), params, updates)


# ---------------------------------------------------------------------------
# transforms


def _weight_decay_transform(weight_decay: float, who: str) -> GradientTransformation:
    def init(params: Params) -> AddDecayedWeightsState:
        return AddDecayedWeightsState(_hyper(weight_decay, params))

    def update(
        updates: Params, state: AddDecayedWeightsState, params: Params | None = None
    ) -> tuple[Params, AddDecayedWeightsState]:
        params = _need_params(params, who)
        wd = state.weight_decay
        # torch: grad.add(param, alpha=weight_decay)
        return tree.map(lambda u, p: u + wd * p, updates, params), state

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float = 0.0) -> GradientTransformation:
    """`updates + weight_decay * params`, placed after the preconditioner (decoupled, AdamW-style).

    The state holds `weight_decay` as a 0-d tensor (settable with `set_hyperparam`).
    """
    return _weight_decay_transform(weight_decay, "add_decayed_weights")


def add_l2_to_grads(weight_decay: float = 0.0) -> GradientTransformation:
    """`grads + weight_decay * params`, placed first in a chain: the L2 form used by
    `torch.optim.SGD` and `torch.optim.Adam`'s `weight_decay`.

    The arithmetic is that of `add_decayed_weights`; the name records where it sits.
    """
    return _weight_decay_transform(weight_decay, "add_l2_to_grads")


def trace(momentum: float = 0.9, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Momentum as in `torch.optim.SGD`: the first buffer is the gradient itself, then
    `buf = momentum * buf + (1 - dampening) * g`; the update is `buf`, or
    `g + momentum * buf` with `nesterov=True`."""
    if nesterov and dampening != 0:
        raise ValueError("nesterov momentum requires dampening=0 (as torch.optim.SGD)")

    def init(params: Params) -> TraceState:
        return TraceState(
            count=_counter(params),
            trace=tree.zeros_like(params),
            momentum=_hyper(momentum, params),
            dampening=_hyper(dampening, params),
        )

    def update(grads: Params, state: TraceState, params: Params | None = None) -> tuple[Params, TraceState]:
        del params
        m, d = state.momentum, state.dampening
        # torch special-cases the first step (buffer = clone(grad)); a where keeps it branch-free
        first = state.count == 0
        buf = tree.map(lambda b, g: torch.where(first, g, b * m + (1 - d) * g), state.trace, grads)
        if nesterov:
            updates = tree.map(lambda g, b: g + m * b, grads, buf)
        else:
            updates = buf
        return updates, TraceState(state.count + 1, buf, m, d)

    return GradientTransformation(init, update)


def _scalar_dtype(device: torch.device) -> torch.dtype:
    # Bias corrections are scalars; torch.optim computes them in Python doubles.
    # float64 everywhere it exists (MPS has none) keeps float32 runs close to torch too.
    return torch.float32 if device.type == "mps" else torch.float64


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's preconditioner, `m_hat / (sqrt(v_hat) + eps)`, with torch.optim.Adam's
    bias correction: `(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`."""

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(_counter(params), tree.zeros_like(params), tree.zeros_like(params))

    def update(
        grads: Params, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Params, ScaleByAdamState]:
        del params
        count = state.count + 1
        # torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        mu = tree.map(lambda m, g: torch.lerp(m, g, 1 - b1), state.mu, grads)
        nu = tree.map(lambda v, g: v * b2 + (1 - b2) * g * g, state.nu, grads)
        t = count.to(_scalar_dtype(count.device))
        bc1 = 1 - b1**t
        bc2_sqrt = (1 - b2**t).sqrt()

        def precondition(m: Tensor, v: Tensor) -> Tensor:
            denom = v.sqrt() / bc2_sqrt.to(v.dtype) + eps
            return (m / bc1.to(m.dtype)) / denom

        return tree.map(precondition, mu, nu), ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: float) -> GradientTransformation:
    """`updates * -lr` (descent); `lr` lives in the state as a 0-d tensor."""

    def init(params: Params) -> ScaleByLearningRateState:
        return ScaleByLearningRateState(_hyper(lr, params))

    def update(
        updates: Params, state: ScaleByLearningRateState, params: Params | None = None
    ) -> tuple[Params, ScaleByLearningRateState]:
        del params
        neg_lr = -state.lr
        return tree.map(lambda u: u * neg_lr, updates), state

    return GradientTransformation(init, update)


def scale_by_schedule(schedule: Callable[[Tensor], Tensor]) -> GradientTransformation:
    """`updates * schedule(count)`, count the updates done before this one (0 first).

    A per-step learning-rate multiplier computed inside the step from the state's counter
    (optax's `scale_by_schedule`): no host work per step, exact on resume, and the base lr
    stays a settable hyperparameter (sweeps). `schedule`: any of `fashion_func.schedules`
    (they take the 0-d float counter and never branch on its value), e.g.
    `schedules.triangle(total, warm)` or `schedules.warmup_cosine(1.0, warm, total)`.
    Put it after the optimizer in a `chain` (before `ema`).
    """

    def init(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(_counter(params))

    def update(
        updates: Params, state: ScaleByScheduleState, params: Params | None = None
    ) -> tuple[Params, ScaleByScheduleState]:
        del params
        leaves = tree.leaves(updates)
        if not leaves:
            return updates, ScaleByScheduleState(state.count + 1)
        factor = schedule(state.count.to(_widest_float(leaves)))
        return tree.map(lambda u: u * factor.to(u.dtype), updates), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.

    The norm is that of the per-leaf L2 norms, computed in the widest leaf dtype (at
    least float32); the scaling is a clamp, never a branch, so nothing syncs the host.
    """

    def init(params: Params) -> ClipByGlobalNormState:
        return ClipByGlobalNormState(_hyper(max_norm, params))

    def update(
        updates: Params, state: ClipByGlobalNormState, params: Params | None = None
    ) -> tuple[Params, ClipByGlobalNormState]:
        del params
        leaves = tree.leaves(updates)
        if not leaves:
            return updates, state
        dtype = _widest_float(leaves)
        norms = torch.stack([torch.linalg.vector_norm(t).to(dtype) for t in leaves])
        total = torch.linalg.vector_norm(norms)
        coef = torch.clamp(state.max_norm.to(dtype) / (total + 1e-6), max=1.0)
        return tree.map(lambda t: t * coef.to(t.dtype), updates), state

    return GradientTransformation(init, update)


def ema(decay: float = 0.999) -> GradientTransformation:
    """Keep an exponential moving average of the parameters in the optimizer state; the
    updates pass through unchanged. Put it last in a `chain`, so it averages the parameters
    each step produces: the first step copies them, then `ema.lerp_(new, 1 - decay)`, as
    `torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`
    with `update_parameters` after every step. `ema_params(opt_state)` reads it; it is saved
    with the state, so resume stays exact.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")

    def init(params: Params) -> EmaState:
        return EmaState(
            _hyper(decay, params), _counter(params), tree.map(lambda p: p.detach().clone(), params)
        )

    def update(updates: Params, state: EmaState, params: Params | None = None) -> tuple[Params, EmaState]:
        params = _need_params(params, "ema")
        first = state.count == 0

        def average(avg: Tensor, p: Tensor, u: Tensor) -> Tensor:
            new = (p + u).to(p.dtype)  # the parameters after this step, as apply_updates makes them
            weight = (1 - state.decay).to(avg.dtype)
            return torch.where(first, new, torch.lerp(avg, new, weight))

        averaged = {k: average(state.ema[k], params[k], updates[k]) for k in state.ema}
        return updates, EmaState(state.decay, state.count + 1, averaged)

    return GradientTransformation(init, update)


def ema_params(opt_state: State) -> Params:
    """The moving average kept by an `ema` transform in `opt_state` (KeyError if none)."""
    found: list[Params] = []

    def visit(state: Any) -> None:
        if isinstance(state, EmaState):
            found.append(state.ema)
        elif isinstance(state, (tuple, list)) and not hasattr(state, "_fields"):
            for s in state:
                visit(s)

    visit(opt_state)
    if not found:
        raise KeyError("no ema transform in the optimizer state; chain optim.ema(decay) after the optimizer")
    return found[0]


# ---------------------------------------------------------------------------
# named optimizers


def sgd(
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    """`torch.optim.SGD`: L2 weight decay, optional (Nesterov) momentum, then `-lr`.

    The weight-decay transform is always present (so `weight_decay` can be set later);
    the momentum buffer only when `momentum != 0`, as torch.optim keeps none then.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)")
    parts = [add_l2_to_grads(weight_decay)]
    if momentum != 0:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> GradientTransformation:
    """`torch.optim.Adam`: `weight_decay` is the L2 form, added to the gradient before the moments."""
    return chain(add_l2_to_grads(weight_decay), scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))


def adamw(
    lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2
) -> GradientTransformation:
    """`torch.optim.AdamW`: decoupled weight decay, `p -= lr * (adam_update + weight_decay * p)`."""
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(lr))


# ---------------------------------------------------------------------------
# hyperparameters in the state


def _is_hyper(value: Any) -> bool:
    # 0-d, or [K] in a stacked (ensemble) state: one value per member
    return isinstance(value, Tensor) and value.dim() <= 1 and value.is_floating_point()


def _walk(state: Any, fn: Callable[[Any, str, Tensor], Any]) -> Any:
    """Rebuild `state` with every 0-d float field of a NamedTuple passed through `fn(owner, name, value)`.

    Recurses through plain tuples/lists (chain states) and NamedTuple fields that are
    themselves tuples (wrapping transforms); dicts (param-shaped trees) are left alone.
    """
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        values = {}
        for name in state._fields:
            value = getattr(state, name)
            if _is_hyper(value):
                values[name] = fn(state, name, value)
            elif isinstance(value, (tuple, list)):
                values[name] = _walk(value, fn)
            else:
                values[name] = value
        return type(state)(**values)
    if isinstance(state, (tuple, list)):
        return type(state)(_walk(s, fn) for s in state)
    return state


def hyperparams(opt_state: State) -> dict[str, Tensor]:
    """All settable hyperparameters of `opt_state` by name (the first occurrence of each)."""
    found: dict[str, Tensor] = {}

    def visit(owner: Any, name: str, value: Tensor) -> Tensor:
        found.setdefault(name, value)
        return value

    _walk(opt_state, visit)
    return found


def get_hyperparam(opt_state: State, name: str) -> Tensor:
    """The 0-d tensor hyperparameter `name` ("lr", "weight_decay", ...) of `opt_state`; KeyError if absent."""
    found = hyperparams(opt_state)
    if name not in found:
        raise KeyError(f"no hyperparameter {name!r} in the optimizer state; it has {sorted(found)}")
    return found[name]


def set_hyperparam(opt_state: State, name: str, value: float | Tensor) -> State:
    """A new state with every hyperparameter `name` set to `value`, keeping its dtype,
    device and shape (so compiled steps do not recompile). The old state is untouched.
    In a stacked state (`[K]` per member) a float sets every member and a `[K]` tensor
    each its own. KeyError if `name` is absent."""
    hits = 0

    def replace(owner: Any, field: str, old: Tensor) -> Tensor:
        nonlocal hits
        if field != name:
            return old
        hits += 1
        if isinstance(value, Tensor):
            return value.detach().to(dtype=old.dtype, device=old.device).reshape(old.shape).clone()
        return torch.full_like(old, float(value))

    new_state = _walk(opt_state, replace)
    if hits == 0:
        have = sorted(hyperparams(opt_state))
        raise KeyError(f"no hyperparameter {name!r} in the optimizer state; it has {have}")
    return new_state
