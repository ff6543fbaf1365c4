"""Optimizers as pairs of pure functions, in the style of optax.

An optimizer is a `GradientTransformation(init, update)`:

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

Nothing is modified in place: every call returns new trees. Named optimizers
(`sgd`, `adam`, `adamw`) are `chain(...)`s of small transforms and follow
`torch.optim.SGD` / `Adam` / `AdamW` step for step (same formulas, same order of
operations where it matters for rounding); `lion` is optax's.

Every transform says what it is: `tx.description` is a `Description` (the function that
built it, its arguments, the descriptions of the transforms it wraps), data that exports read
(`interop.optax_optimizer`). Differentiable by default: `update` never detaches, and a
tensor given to `set_hyperparam` (or as a hyperparameter to a constructor) keeps its
autograd graph, so MAML-style meta-gradients and hypergradients flow through every public
transform (`tests/test_differentiable.py` checks each against finite differences). Adam's
`eps_root > 0` keeps them finite where a gradient entry is exactly 0.

The package's rooms: `base` (GradientTransformation, chain, apply_updates), `transforms`
(trace, scale_by_adam, clip_by_global_norm, add_noise, set_to_zero, ema, ...), `wrappers`
(masked, multi_transform, MultiSteps), `alias` (sgd, adam, adamw, lion), `hyper` (hyperparameters
in the state); every public name is re-exported here, `optim.X`.

Transforms with optax's semantics (tested against optax itself, float64):

- `masked(inner, mask)`: `inner` on the parameters `mask` marks True, the others' updates
  passed through. `mask` (and `multi_transform`'s labels) is a dict like the params (or a
  prefix of them), or a function `params -> dict`.
- `multi_transform({label: tx}, labels)`: one transform per group; `"label/lr"` names a
  group's hyperparameter (`set_hyperparam(s, "head/lr", 1e-2)`; plain `"lr"` sets them all).
- `set_to_zero()`: zero updates. Freezing: `chain(adam(...), masked(set_to_zero(), frozen))`
  or `multi_transform({"train": adam(...), "frozen": set_to_zero()}, labels)` keeps frozen
  parameters bitwise unchanged, weight decay included (zeroing their gradients does not).
- `MultiSteps(tx, every_k)`: gradient accumulation; k micro-batches of a mean loss give the
  update of one k-times-larger batch, zero updates in between.
- `add_noise(eta, gamma, seed)`: Gaussian gradient noise of variance `eta / (1 + count)**gamma`,
  drawn from a key in the state (resume is bitwise; `set_noise_key` gives ensemble members
  their own streams). Not JAX's draws: its statistics are what match.
- `adamw(..., mask=)` / `add_decayed_weights(wd, mask=)`: weight decay on the masked parameters.

Every new state is a NamedTuple of tensors (`MaskedState`, `MultiTransformState`,
`MultiStepsState`, `AddNoiseState`; `set_to_zero`'s is `()`), so `checkpoint` saves and
restores it like any other and resume is exact.

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
