"""Many models in one step: ensembles and hyperparameter sweeps over a stacked `TrainState`.

A stacked state is an ordinary `TrainState` whose every tensor has a leading member axis of
size K: `params[name]` is `[K, *shape]`, the optimizer's hyperparameters are `[K]` (so
members may differ in learning rate or weight decay), `step` and `rng` are `[K]`. The train
step built here is the ordinary step's pure core vmapped over that axis with the batch
shared, compiled once: K models cost one step's dispatch, and member k's trajectory is the
solo run of `member(state, k)` on the same batches (its own init, its own dropout keys).

    states = [state.create(model.init(torch.Generator().manual_seed(member_seed(0, k))), tx,
                           seed=member_seed(0, k)) for k in range(4)]
    ens = stack(states)
    step = make_train_step(model, tx)            # metrics: [K] sums, one per member
    ens, metrics = step(ens, (images, labels))
    evaluate = make_eval_step(model)             # the ensemble's own metrics + each member's
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from fashion_func import nn, optim
from fashion_func.augment import Augment
from fashion_func.models import Model, ModelState, Params
from fashion_func.preprocess import NormalizeImages
from fashion_func.state import TrainState
from fashion_func.state import create as create_state
from fashion_func.step import (
    CoreIn,
    EvalStep,
    LossFn,
    MetricsFn,
    Preprocess,
    StepOptions,
    TrainStep,
    stages,
    stages_of,
)

__all__ = [
    "combine",
    "init",
    "make_eval_step",
    "make_train_step",
    "member",
    "member_seed",
    "size",
    "stack",
    "unstack",
]


def stack(states: Sequence[TrainState]) -> TrainState:
    """One state with a leading member axis from `states` (all of one structure)."""
    if not states:
        raise ValueError("stack needs at least one state")
    leaves = [pytree.tree_flatten(s) for s in states]
    spec = leaves[0][1]
    for i, (_, other) in enumerate(leaves[1:], 1):
        if other != spec:
            raise ValueError(f"state {i} differs in structure from state 0; members must be alike")
    stacked = [torch.stack(group) for group in zip(*(flat for flat, _ in leaves), strict=True)]
    return pytree.tree_unflatten(stacked, spec)


def size(state: TrainState) -> int:
    """The number of members of a stacked state (its step has one entry per member)."""
    if state.step.dim() != 1:
        raise ValueError(f"not a stacked state: step has shape {list(state.step.shape)}, expected [K]")
    return int(state.step.shape[0])


def member(state: TrainState, k: int) -> TrainState:
    """Member `k` of a stacked state, as the solo `TrainState` it would be."""
    n = size(state)
    if not 0 <= k < n:
        raise IndexError(f"member {k} out of range for an ensemble of {n}")
    return pytree.tree_map(lambda t: t[k], state)


def unstack(state: TrainState) -> list[TrainState]:
    """The members of a stacked state, in order."""
    return [member(state, k) for k in range(size(state))]


def member_seed(seed: int, k: int) -> int:
    """The seed of member `k` of an ensemble seeded `seed`: member 0 is the solo run's seed,
    the others are hashed from (seed, k) so that runs with nearby seeds share no member."""
    if k == 0:
        return seed
    return int(nn.fold_in(seed, k))


def init(
    model: Model | Callable[..., Any],
    optimizer: optim.GradientTransformation,
    *,
    members: int,
    seed: int = 0,
    hyperparams: Sequence[Mapping[str, float]] | None = None,
    same_init: bool = False,
    device: torch.device | str | None = None,
    init: Callable[[torch.Generator], Params] | None = None,
    init_state: ModelState | Callable[[], ModelState] | None = None,
) -> TrainState:
    """A stacked state of `members` fresh members.

    Member k is initialised, and draws its dropout keys, from `member_seed(seed, k)`, or from
    `seed` for every member when `same_init` (a sweep, where only the hyperparameters should
    differ). hyperparams: one mapping per member, e.g. `[{"lr": 1e-3}, {"lr": 3e-4}]`, set
    in that member's optimizer state (names as `optim.hyperparams` lists them). An
    `optim.add_noise` in the optimizer draws from the member's seed too (`optim.set_noise_key`),
    so members get independent gradient noise (a sweep's, like its initialisation, the same).

    model: a `Model` (its `init` and `init_state` are used), or a plain function as the steps
    take it, with `init`: `generator -> params` (given each member's generator) and, for a
    stateful function, `init_state`: its initial model state (a dict, or a function returning
    one), the same for every member. `init` / `init_state` also override a `Model`'s.
    """
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {members}")
    if hyperparams is not None and len(hyperparams) != members:
        raise ValueError(f"hyperparams has {len(hyperparams)} entries for {members} members")
    if init is None and not isinstance(model, Model):
        raise TypeError(
            f"ensemble.init of a plain function ({getattr(model, '__name__', type(model).__name__)}) "
            "needs init=, a function generator -> params (and init_state= for a stateful one)"
        )

    def draw(g: torch.Generator) -> Params:
        if init is None:
            return model.init(g, device=device)
        params = init(g)
        return {k: v.to(device) for k, v in params.items()} if device is not None else dict(params)

    def first_state() -> ModelState:
        if init_state is None:
            return model.init_state(device=device) if isinstance(model, Model) else {}
        st = init_state() if callable(init_state) else init_state
        return {k: v.to(device) if device is not None else v.clone() for k, v in st.items()}

    states = []
    for k in range(members):
        s = seed if same_init else member_seed(seed, k)
        st = create_state(
            draw(torch.Generator().manual_seed(s)), optimizer, seed=s, model_state=first_state()
        )
        for name, value in (hyperparams[k] if hyperparams else {}).items():
            st = st.replace(opt_state=optim.set_hyperparam(st.opt_state, name, value))
        if not same_init:  # gradient noise (`optim.add_noise`) from the member's own stream too
            st = st.replace(opt_state=optim.set_noise_key(st.opt_state, s))
        states.append(st)
    return stack(states)


def _nchw(preprocess: Preprocess | None) -> Preprocess | None:
    # vmap cannot carry a channels-last memory format through its batched convolutions
    # (PyTorch raises NYI), so the ensemble's images are laid out NCHW
    if isinstance(preprocess, NormalizeImages) and preprocess.channels_last is not False:
        return dataclasses.replace(preprocess, channels_last=False)
    if isinstance(preprocess, Augment):
        return dataclasses.replace(preprocess, base=_nchw(preprocess.base))
    return preprocess


def make_train_step(
    model: Model | Callable[..., Any], optimizer: optim.GradientTransformation, **options: Any
) -> TrainStep:
    """`step(stacked_state, batch) -> (stacked_state, metrics)`: `step.make_train_step` vmapped
    over the members, the batch shared; options as there but class_output and num_classes.
    Each metric is `[K]`, one sum per member (`fit` reports each member's, their mean and std).
    per_example: DP-SGD, its `max_norm` / `noise_multiplier` one value or one per member (a
    sweep over them); each member draws its noise from its own `rng` (a sweep's share one)."""
    opts = StepOptions.of("ensemble.make_train_step", options, train=True, ensemble=True)
    built = stages_of(model, optimizer, opts.replace(preprocess=_nchw(opts.preprocess)))
    # each member its own params, model state, step, key and DP hyperparameters; the batch (and
    # its mask) and opt_state as given (the gradients ignore opt_state; vmapping it would need
    # every leaf to be a tensor)
    # (a non-private step's `private` is None: vmap takes no dimension of a None)
    dims = CoreIn(params=0, model_state=0, opt_state=None, step=0, rng=0, inputs=None, targets=None,
                  mask=None, private=0 if opts.per_example is not None else None)  # fmt: skip
    built = built.replace(
        gradients=torch.func.vmap(built.gradients, in_dims=(dims,)),
        update=torch.func.vmap(built.update),
        noise=torch.func.vmap(built.noise, in_dims=(0, dims)) if built.noise is not None else None,
    )
    # size(): a clear error for an unstacked state
    return built.train_step(compile=opts.compile, reduce_grads=opts.reduce_grads, check=size)


def combine(
    member_out: Mapping[str, Tensor],
    y: Tensor,
    loss: LossFn | None = None,
    topk: int = 5,
    metrics: MetricsFn | None = None,
) -> dict[str, Tensor]:
    """The ensemble's own per-example outputs, `[B]` as `step.make_eval_step`'s (its `logits` the
    log of the mean of the members' probabilities; `loss`, `correct`, extra outputs... from the
    loss and `metrics`), beside each member's `member_<name>` `[K, B]` (`member_out`)."""
    # log of the mean probability, computed stably: logsumexp of log-probs minus log K (a
    # Python float, so that it takes the logits' dtype: a float32 log K put 4e-9 into float64)
    log_probs = torch.log_softmax(member_out["logits"], dim=-1)
    logits = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    own = stages(lambda params, x: x, loss=loss, metrics=metrics, preprocess=None, topk=topk).outputs
    out = own(logits, y)
    out.update({f"member_{name}": v for name, v in member_out.items() if name != "logits"})
    out["member_logits"] = member_out["logits"]
    return out


def make_eval_step(model: Model | Callable[..., Any], **options: Any) -> EvalStep:
    """`eval_step(stacked_state_or_params, batch, model_state=None) -> per-example outputs`:
    `combine`d, the ensemble's prediction the mean of its members' probabilities.

    Options as `step.make_eval_step` but class_output and num_classes; with tta each member's
    prediction averages the image and its mirror image.
    """
    opts = StepOptions.of("ensemble.make_eval_step", options, train=False, ensemble=True)
    built = stages_of(model, None, opts.replace(preprocess=_nchw(opts.preprocess)))
    members = torch.func.vmap(built.evaluate, in_dims=(0, 0, None, None))

    def evaluate(params: Params, model_state: ModelState, inputs: Tensor, y: Tensor) -> dict[str, Tensor]:
        return combine(members(params, model_state, inputs, y), y, opts.loss, opts.topk, opts.metrics)

    return built.replace(evaluate=evaluate).eval_step(compile=opts.compile)
