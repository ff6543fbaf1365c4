"""Small gradient transforms, each a `GradientTransformation` with a NamedTuple state: weight
decay, momentum, Adam's and Lion's preconditioners, learning rate and schedule, clipping,
gradient noise, zeroing, and the parameters' moving average. Each is `described` by its own
name and the arguments it was built with."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from fashion_func import nn, tree
from fashion_func.optim.base import (
    GradientTransformation,
    Params,
    State,
    counter,
    described,
    find_states,
    hyper,
    map_states,
    need_params,
)
from fashion_func.optim.wrappers import Mask, masked

__all__ = [
    "AddDecayedWeightsState",
    "AddNoiseState",
    "ClipByGlobalNormState",
    "EmaState",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByLionState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "add_l2_to_grads",
    "add_noise",
    "clip_by_global_norm",
    "ema",
    "ema_params",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_schedule",
    "set_noise_key",
    "set_to_zero",
    "trace",
]


class AddDecayedWeightsState(NamedTuple):
    """The state of `add_decayed_weights`: its weight decay, settable with `set_hyperparam`."""

    weight_decay: Tensor  # 0-d, float


class TraceState(NamedTuple):
    """The state of `trace` (momentum): the update count, the momentum buffer and its hyperparameters."""

    count: Tensor  # 0-d int64, number of updates done
    trace: Params  # momentum buffer, like params
    momentum: Tensor  # 0-d, float
    dampening: Tensor  # 0-d, float


class ScaleByAdamState(NamedTuple):
    """The state of `scale_by_adam`: the update count and the first and second moments."""

    count: Tensor  # 0-d int64
    mu: Params  # first moment (torch: exp_avg)
    nu: Params  # second moment (torch: exp_avg_sq)


class ScaleByLionState(NamedTuple):
    """The state of `scale_by_lion`: the update count and the momentum."""

    count: Tensor  # 0-d int64
    mu: Params  # the momentum, like params


class EmaState(NamedTuple):
    """The state of `ema`: the decay, the updates averaged so far and the parameters' moving average."""

    decay: Tensor  # 0-d float (settable with set_hyperparam)
    count: Tensor  # 0-d int64, updates averaged so far
    ema: Params  # the moving average of the parameters


class ScaleByLearningRateState(NamedTuple):
    """The state of `scale_by_learning_rate`: the learning rate, settable with `set_hyperparam`."""

    lr: Tensor  # 0-d, float


class ScaleByScheduleState(NamedTuple):
    """The state of `scale_by_schedule`: the updates scaled so far (the schedule's step)."""

    count: Tensor  # 0-d int64, updates scaled so far


class ClipByGlobalNormState(NamedTuple):
    """The state of `clip_by_global_norm`: the norm the gradients are clipped to."""

    max_norm: Tensor  # 0-d, float


class AddNoiseState(NamedTuple):
    """The state of `add_noise`: the updates noised so far and the noise's key."""

    count: Tensor  # 0-d int64, updates noised so far
    key: Tensor  # 0-d int64, the noise's key (optax: rng_key); [K] in a stacked state


def _one_hyper(
    name: str, state_cls: type, value: float, fn: Callable[[Params, Tensor, Params | None], Params]
) -> GradientTransformation:
    """A transform `name` whose state `state_cls` is one settable hyperparameter, `value` at init
    (described under its field's name), and whose update is `fn(updates, hyperparameter, params)`."""

    def init(params: Params) -> State:
        return state_cls(hyper(value, params))

    def update(updates: Params, state: State, params: Params | None = None) -> tuple[Params, State]:
        return fn(updates, state[0], params), state

    return described(init, update, name, **{state_cls._fields[0]: value})


def _weight_decay_transform(weight_decay: float, who: str) -> GradientTransformation:
    def decay(updates: Params, wd: Tensor, params: Params | None) -> Params:
        # torch: grad.add(param, alpha=weight_decay)
        return tree.map(lambda u, p: u + wd * p, updates, need_params(params, who))

    return _one_hyper(who, AddDecayedWeightsState, weight_decay, decay)


def add_decayed_weights(weight_decay: float = 0.0, mask: Mask | None = None) -> GradientTransformation:
    """`updates + weight_decay * params`, placed after the preconditioner (decoupled, AdamW-style).
    `mask` (optax's): decay only the parameters it marks True (a dict of bools like the params,
    or a function `params -> dict`); the state is then a `MaskedState`."""
    tx = _weight_decay_transform(weight_decay, "add_decayed_weights")
    return tx if mask is None else masked(tx, mask)


def add_l2_to_grads(weight_decay: float = 0.0) -> GradientTransformation:
    """`grads + weight_decay * params`, placed first in a chain: the L2 form used by
    `torch.optim.SGD` and `torch.optim.Adam`'s `weight_decay` (the arithmetic of
    `add_decayed_weights`; the name records where it sits)."""
    return _weight_decay_transform(weight_decay, "add_l2_to_grads")


def trace(momentum: float = 0.9, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Momentum as in `torch.optim.SGD`: the first buffer is the gradient itself, then
    `buf = momentum * buf + (1 - dampening) * g`; the update is `buf`, or
    `g + momentum * buf` with `nesterov=True`."""
    if nesterov and dampening != 0:
        raise ValueError("nesterov momentum requires dampening=0 (as torch.optim.SGD)")

    def init(params: Params) -> TraceState:
        return TraceState(
            count=counter(params),
            trace=tree.zeros_like(params),
            momentum=hyper(momentum, params),
            dampening=hyper(dampening, params),
        )

    def update(grads: Params, state: TraceState, params: Params | None = None) -> tuple[Params, TraceState]:
        del params
        m, d = state.momentum, state.dampening
        # torch special-cases the first step (buffer = clone(grad)); a where keeps it branch-free
        first = state.count == 0
        buf = tree.map(lambda b, g: torch.where(first, g, b * m + (1 - d) * g), state.trace, grads)
        updates = tree.map(lambda g, b: g + m * b, grads, buf) if nesterov else buf
        return updates, TraceState(state.count + 1, buf, m, d)

    return described(init, update, "trace", momentum=momentum, nesterov=nesterov, dampening=dampening)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam's preconditioner, `m_hat / (sqrt(v_hat) + eps)`, with torch.optim.Adam's bias
    correction. `eps_root` (optax's): `m_hat / (sqrt(v_hat + eps_root) + eps)`; > 0 keeps a
    meta-gradient through Adam finite where a gradient entry is 0; 0 (default) is torch's."""
    if eps_root < 0:
        raise ValueError(f"scale_by_adam eps_root must be >= 0, got {eps_root}")

    def init(params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(counter(params), tree.zeros_like(params), tree.zeros_like(params))

    def update(
        grads: Params, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Params, ScaleByAdamState]:
        del params
        count = state.count + 1
        # torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        mu = tree.map(lambda m, g: torch.lerp(m, g, 1 - b1), state.mu, grads)
        nu = tree.map(lambda v, g: v * b2 + (1 - b2) * g * g, state.nu, grads)
        # Bias corrections are scalars; torch.optim computes them in Python doubles.
        # float64 everywhere it exists (MPS has none) keeps float32 runs close to torch too.
        t = count.to(torch.float32 if count.device.type == "mps" else torch.float64)
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        bc2_sqrt = bc2.sqrt()

        def precondition(m: Tensor, v: Tensor) -> Tensor:
            if eps_root:  # optax: sqrt(nu_hat + eps_root), nu_hat = v / bc2
                denom = (v / bc2.to(v.dtype) + eps_root).sqrt() + eps
            else:
                denom = v.sqrt() / bc2_sqrt.to(v.dtype) + eps
            return (m / bc1.to(m.dtype)) / denom

        return tree.map(precondition, mu, nu), ScaleByAdamState(count, mu, nu)

    return described(init, update, "scale_by_adam", b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """Lion's direction (optax's `scale_by_lion`, Chen et al., 2023): the update is
    `sign((1 - b1) * g + b1 * mu)`, then the momentum `mu = (1 - b2) * g + b2 * mu`. `sign` has
    derivative 0 (where it has one), so a meta-gradient through Lion flows only through what is
    chained after it (weight decay, the learning rate)."""

    def init(params: Params) -> ScaleByLionState:
        return ScaleByLionState(counter(params), tree.zeros_like(params))

    def update(
        grads: Params, state: ScaleByLionState, params: Params | None = None
    ) -> tuple[Params, ScaleByLionState]:
        del params
        updates = tree.map(lambda g, m: torch.sign((1.0 - b1) * g + b1 * m), grads, state.mu)
        mu = tree.map(lambda g, m: (1 - b2) * g + b2 * m, grads, state.mu)
        return updates, ScaleByLionState(state.count + 1, mu)

    return described(init, update, "scale_by_lion", b1=b1, b2=b2)


def scale_by_learning_rate(lr: float) -> GradientTransformation:
    """`updates * -lr` (descent); `lr` lives in the state as a 0-d tensor."""

    def descend(updates: Params, lr: Tensor, params: Params | None) -> Params:
        neg_lr = -lr
        return tree.map(lambda u: u * neg_lr, updates)

    return _one_hyper("scale_by_learning_rate", ScaleByLearningRateState, lr, descend)


def scale_by_schedule(schedule: Callable[[Tensor], Tensor]) -> GradientTransformation:
    """`updates * schedule(count)`, count the updates before this one (0 first): optax's per-step
    lr multiplier, computed in the step from the state's counter (exact on resume; the base lr
    stays settable). `schedule`: any of `fashion_func.schedules`. Chain it after the optimizer
    (before `ema`)."""

    def init(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(counter(params))

    def update(
        updates: Params, state: ScaleByScheduleState, params: Params | None = None
    ) -> tuple[Params, ScaleByScheduleState]:
        del params
        leaves = tree.leaves(updates)
        if not leaves:
            return updates, ScaleByScheduleState(state.count + 1)
        factor = schedule(state.count.to(tree.widest_float(leaves)))
        return tree.map(lambda u: u * factor.to(u.dtype), updates), ScaleByScheduleState(state.count + 1)

    return described(init, update, "scale_by_schedule", schedule=schedule)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`,
    the norm `tree.global_norm`'s; the scaling is a clamp, never a branch, so nothing syncs the host."""

    def clip(updates: Params, max_norm: Tensor, params: Params | None) -> Params:
        if not tree.leaves(updates):
            return updates
        total = tree.global_norm(updates)
        coef = torch.clamp(max_norm.to(total.dtype) / (total + 1e-6), max=1.0)
        return tree.map(lambda t: t * coef.to(t.dtype), updates)

    return _one_hyper("clip_by_global_norm", ClipByGlobalNormState, max_norm, clip)


def set_to_zero() -> GradientTransformation:
    """Updates of zeros (optax's `set_to_zero`): with `masked` or `multi_transform`, the
    parameters it gets stay bitwise unchanged, weight decay and momentum included. Its state
    is the empty tuple."""

    def init(params: Params) -> tuple[()]:
        del params
        return ()

    def update(updates: Params, state: tuple[()], params: Params | None = None) -> tuple[Params, tuple[()]]:
        del params
        return tree.zeros_like(updates), state

    return described(init, update, "set_to_zero")


def add_noise(eta: float, gamma: float, seed: int = 0) -> GradientTransformation:
    """`updates + std * N(0, 1)` with optax's schedule `std = sqrt(eta / (1 + count)**gamma)`,
    count the updates noised before this one (Neelakantan et al., 2015). The draws are a pure
    function of the state's `key` (`seed` at init), the count and the leaf's position, so a
    resumed run draws the same noise; a stack's members draw from their own keys
    (`set_noise_key`). They cannot equal JAX's PRNG draws."""
    if eta < 0:
        raise ValueError(f"add_noise eta (the noise's variance) must be >= 0, got {eta}")

    def init(params: Params) -> AddNoiseState:
        return AddNoiseState(counter(params), counter(params, seed & 0xFFFFFFFF))

    def update(
        updates: Params, state: AddNoiseState, params: Params | None = None
    ) -> tuple[Params, AddNoiseState]:
        del params
        leaves = tree.leaves(updates)
        next_state = AddNoiseState(state.count + 1, state.key)
        if not leaves:
            return updates, next_state
        dtype = tree.widest_float(leaves)
        std = torch.sqrt(eta / (state.count.to(dtype) + 1) ** gamma)
        step_key = nn.fold_in(state.key, state.count)
        flat, spec = pytree.tree_flatten(updates)
        noised = [
            u + std.to(u.dtype) * nn.normal(nn.fold_in(step_key, i), u.shape, dtype=u.dtype)
            for i, u in enumerate(flat)
        ]
        return pytree.tree_unflatten(noised, spec), next_state

    return described(init, update, "add_noise", eta=eta, gamma=gamma, seed=seed)


def set_noise_key(opt_state: State, key: int | Tensor) -> State:
    """A new state with the key of every `add_noise` in `opt_state` set to `key`: an int, or in
    a stacked state a `[K]` int64 tensor of one key per member (so ensemble members draw
    independent noise)."""

    def rekeyed(state: AddNoiseState) -> AddNoiseState:
        new = torch.as_tensor(key, dtype=torch.int64).to(state.key.device)
        return AddNoiseState(state.count, (new & 0xFFFFFFFF).expand(state.key.shape).clone())

    return map_states(opt_state, AddNoiseState, rekeyed)


def ema(decay: float = 0.999) -> GradientTransformation:
    """Keep an exponential moving average of the parameters in the optimizer state, the updates
    unchanged. Last in a `chain`: the first step copies the new parameters, then
    `ema.lerp_(new, 1 - decay)`, as torch's `AveragedModel` with `get_ema_multi_avg_fn(decay)`.
    `ema_params(opt_state)` reads it."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")

    def init(params: Params) -> EmaState:
        # a copy, not detached: the average stays differentiable with respect to the params
        return EmaState(hyper(decay, params), counter(params), tree.map(lambda p: p.clone(), params))

    def update(updates: Params, state: EmaState, params: Params | None = None) -> tuple[Params, EmaState]:
        params = need_params(params, "ema")
        first = state.count == 0

        def average(avg: Tensor, p: Tensor, u: Tensor) -> Tensor:
            new = (p + u).to(p.dtype)  # the parameters after this step, as apply_updates makes them
            weight = (1 - state.decay).to(avg.dtype)
            return torch.where(first, new, torch.lerp(avg, new, weight))

        averaged = {k: average(state.ema[k], params[k], updates[k]) for k in state.ema}
        return updates, EmaState(state.decay, state.count + 1, averaged)

    return described(init, update, "ema", decay=decay)


def ema_params(opt_state: State) -> Params:
    """The moving average kept by an `ema` transform in `opt_state` (KeyError if none)."""
    found = find_states(opt_state, EmaState)  # through chains and wrappers' states
    if not found:
        raise KeyError("no ema transform in the optimizer state; chain optim.ema(decay) after the optimizer")
    return found[0].ema
