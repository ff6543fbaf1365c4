"""Optimizers as pairs of pure functions, in the style of optax.

An optimizer is a `GradientTransformation(init, update)`:

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

Nothing is modified in place: every call returns new trees. Named optimizers (`sgd`, `adam`,
`adamw`, `lion`) are `chain(...)`s of small transforms; every transform carries a `Description`
(`tx.description`), data that exports read (`interop.optax_optimizer`). The wrappers `masked`,
`multi_transform`, `set_to_zero`, `MultiSteps` and the transform `add_noise` have optax's
semantics (tested against optax itself, float64). Each state is a NamedTuple of tensors, so
`checkpoint` saves and restores it like any other and resume is exact.

Differentiable by default: `update` never detaches, and a tensor given to `set_hyperparam` (or
as a hyperparameter to a constructor) keeps its autograd graph, so MAML-style meta-gradients
and hypergradients flow through every public transform (`tests/test_differentiable.py` checks
each against finite differences). Adam's `eps_root > 0` keeps them finite where a gradient
entry is exactly 0.

Hyperparameters that a training loop may change (learning rate, weight decay, momentum,
clipping norm) are 0-d tensors inside the optimizer state, created by `init` on the params'
device in the params' floating dtype (at least float32). `set_hyperparam` swaps in a new
tensor of the same dtype, device and shape, so a `torch.compile`d step that takes the state as
an argument never recompiles because of a schedule. Counters are 0-d int64 tensors. `update`
never calls `.item()` or branches on tensor values, so it traces with `fullgraph=True`.
Schedules (`fashion_func.schedules`) feed `set_hyperparam` per epoch, or run inside the update
per step (`scale_by_schedule`).

The package's rooms: `base` (GradientTransformation, chain, apply_updates, the `Params` and
`State` types), `transforms`, `wrappers`, `alias` (the named optimizers), `hyper`
(hyperparameters in the state); every public name is re-exported here, `optim.X`.
"""

from __future__ import annotations

from fashion_func.optim.alias import adam, adamw, lion, sgd
from fashion_func.optim.base import (
    Description,
    GradientTransformation,
    Params,
    State,
    apply_updates,
    chain,
    find_states,
    map_states,
)
from fashion_func.optim.hyper import get_hyperparam, hyperparams, set_hyperparam
from fashion_func.optim.transforms import (
    AddDecayedWeightsState,
    AddNoiseState,
    ClipByGlobalNormState,
    EmaState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByLionState,
    ScaleByScheduleState,
    TraceState,
    add_decayed_weights,
    add_l2_to_grads,
    add_noise,
    clip_by_global_norm,
    ema,
    ema_params,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_schedule,
    set_noise_key,
    set_to_zero,
    trace,
)
from fashion_func.optim.wrappers import (
    MaskedState,
    MultiSteps,
    MultiStepsState,
    MultiTransformState,
    masked,
    multi_transform,
)

__all__ = [
    "AddDecayedWeightsState",
    "AddNoiseState",
    "ClipByGlobalNormState",
    "Description",
    "EmaState",
    "GradientTransformation",
    "MaskedState",
    "MultiSteps",
    "MultiStepsState",
    "MultiTransformState",
    "Params",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByLionState",
    "ScaleByScheduleState",
    "State",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "add_l2_to_grads",
    "add_noise",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "ema",
    "ema_params",
    "find_states",
    "get_hyperparam",
    "hyperparams",
    "lion",
    "map_states",
    "masked",
    "multi_transform",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_schedule",
    "set_hyperparam",
    "set_noise_key",
    "set_to_zero",
    "sgd",
    "trace",
]
