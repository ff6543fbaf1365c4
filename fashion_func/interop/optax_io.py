"""A training run across frameworks: our train state <-> optax / Flax, and back.

- `optax_optimizer(tx, opt_state=None)`: the optax chain that computes our optimizer's update
  (`optim.sgd` with (Nesterov) momentum, `adam`, `adamw`, `scale_by_schedule` with a
  `schedules.piecewise_linear` / `triangle` multiplier, chains of them). Hyperparameters held
  in the state (lr, weight decay, momentum) are read from `opt_state` when given (what the
  run last set), else from `tx`'s own; the fixed ones (b1, b2, eps, nesterov, the schedule)
  from `tx`.
- `to_optax(source, tx)`: `(params, opt_state)`, params as Flax's `params` collection
  (`to_flax` layout), the state as optax's own NamedTuples (`ScaleByAdamState`, `TraceState`,
  `ScaleByScheduleState`, tuples for chains) of `jax.Array`s.
- `flax_train_state(source, tx)`: a `flax.training.train_state.TrainState` of the model's Flax
  module (`flax_module(name, torch_bn=True)`) with `batch_stats` for batch norm.
- `from_optax(params, opt_state, like, ...)` / `from_flax_train_state(ts, like)`: our
  `TrainState` again; `save_resume(path, state, like)`: a `last.safetensors` that
  `scripts/train.py` resumes.

Where optax and torch.optim differ, the chain is chosen to compute the same update: torch's L2
weight decay (`optim.adam(weight_decay=)`, `optim.sgd`) is `optax.add_decayed_weights` placed
*before* the preconditioner, AdamW's after it; the bias correction and `eps` outside the square
root are optax's `scale_by_adam` (`eps_root=0`) up to rounding. What optax cannot compute is
refused with one line naming the difference (SGD dampening, our gradient clipping's `+ 1e-6`,
the moving average of the weights). jax, flax and optax are imported only inside functions.
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fashion_func import checkpoint, models, optim
from fashion_func.interop.flax_io import flax_variables, from_flax, to_flax
from fashion_func.interop.flax_modules import flax_module
from fashion_func.interop.torch_io import identify, merge_state
from fashion_func.interop.torch_modules import hparams_from_params
from fashion_func.state import TrainState

__all__ = [
    "Transform",
    "describe",
    "flax_train_state",
    "from_flax_train_state",
    "from_optax",
    "load_for_optax",
    "optax_optimizer",
    "save_resume",
    "to_optax",
]


@dataclass(frozen=True)
class Transform:
    """One of our transforms as read off its closures: `kind` (its function's name), the
    fixed hyperparameters, and for a chain its parts."""

    kind: str
    fixed: dict[str, Any] = field(default_factory=dict)
    parts: tuple[Transform, ...] = ()


_SUPPORTED = ("chain", "add_decayed_weights", "add_l2_to_grads", "trace", "scale_by_adam",
              "scale_by_learning_rate", "scale_by_schedule")  # fmt: skip
_REFUSED = {
    "clip_by_global_norm": "clip_by_global_norm scales by max_norm / (norm + 1e-6) as torch does, "
    "optax's by max_norm / norm only when the norm exceeds it; no optax transform computes ours",
    "ema": "ema keeps a moving average of the weights, which no optax transform does "
    "(optax.ema averages the updates)",
}


def describe(tx: optim.GradientTransformation) -> Transform:
    """Our transform `tx` as a `Transform` tree, read off the closures of its `update`.

    ValueError (one line) for a transform optax cannot reproduce or one this module does not know.
    """
    fn = tx.update
    kind = fn.__qualname__.split(".<locals>")[0]
    names = inspect.getclosurevars(fn).nonlocals
    if kind == "_weight_decay_transform":
        kind = names["who"]
    if kind in _REFUSED:
        raise ValueError(f"no optax equivalent: {_REFUSED[kind]}")
    if kind not in _SUPPORTED:
        raise ValueError(f"no optax equivalent known for transform {kind!r}; known: {', '.join(_SUPPORTED)}")
    if kind == "chain":
        return Transform(kind, parts=tuple(describe(t) for t in names["txs"]))
    if kind == "trace":
        return Transform(kind, {"nesterov": bool(names["nesterov"])})
    if kind == "scale_by_adam":
        return Transform(kind, {k: float(names[k]) for k in ("b1", "b2", "eps")})
    if kind == "scale_by_schedule":
        return Transform(kind, {"knots": _knots(names["schedule"])})
    return Transform(kind)


def _knots(schedule: Callable[..., Any]) -> tuple[tuple[float, float], ...]:
    """The knots of a `schedules.piecewise_linear` (or `triangle`) multiplier."""
    if getattr(schedule, "__qualname__", "").split(".<locals>")[0] != "piecewise_linear":
        raise ValueError(
            "no optax equivalent known for scale_by_schedule with this schedule; "
            "schedules.piecewise_linear and schedules.triangle convert"
        )
    names = inspect.getclosurevars(schedule).nonlocals
    return tuple(zip(names["xs"], names["ys"], strict=True))


def _jax_piecewise_linear(knots: tuple[tuple[float, float], ...]) -> Callable[[Any], Any]:
    """`schedules.piecewise_linear(knots)` on a jax count, the same formula in the same order."""
    import jax.numpy as jnp

    def schedule(count: Any) -> Any:
        t = jnp.asarray(count, dtype=jnp.result_type(float))  # float64 under jax_enable_x64
        value = knots[0][1] + 0.0 * t
        for (x0, y0), (x1, y1) in itertools.pairwise(knots):
            value = value + jnp.clip((t - x0) / (x1 - x0), 0.0, 1.0) * (y1 - y0)
        return value

    return schedule


def _hypers(tx: optim.GradientTransformation, opt_state: Any | None) -> Any:
    """The state whose hyperparameters the optax chain takes: `opt_state`, else `tx`'s initial one."""
    if opt_state is not None:
        return opt_state
    return tx.init({"_": torch.zeros((), dtype=torch.float64)})  # float64: the values as written


def _optax_chain(spec: Transform, state: Any) -> Any:
    """The optax transform of `spec`, its state-held hyperparameters read from our `state`."""
    import optax

    if spec.kind == "chain":
        return optax.chain(*(_optax_chain(p, s) for p, s in zip(spec.parts, state, strict=True)))
    if spec.kind in ("add_decayed_weights", "add_l2_to_grads"):
        # either placement is optax's add_decayed_weights at the same place in the chain: first
        # (torch's L2 in the gradient) or after the preconditioner (AdamW's decoupled decay)
        return optax.add_decayed_weights(_scalar(state.weight_decay))
    if spec.kind == "trace":
        if _scalar(state.dampening) != 0:
            raise ValueError("no optax equivalent: SGD dampening (optax.trace has none)")
        return optax.trace(decay=_scalar(state.momentum), nesterov=spec.fixed["nesterov"])
    if spec.kind == "scale_by_adam":
        f = spec.fixed
        return optax.scale_by_adam(b1=f["b1"], b2=f["b2"], eps=f["eps"], eps_root=0.0)
    if spec.kind == "scale_by_learning_rate":
        return optax.scale_by_learning_rate(_scalar(state.lr))
    return optax.scale_by_schedule(_jax_piecewise_linear(spec.fixed["knots"]))


def _scalar(t: Tensor) -> float:
    if t.dim() != 0:
        raise ValueError(
            "a stacked (ensemble or sweep) optimizer state does not convert to optax; convert one member"
        )
    return float(t)


def optax_optimizer(tx: optim.GradientTransformation, opt_state: Any | None = None) -> Any:
    """The `optax.GradientTransformation` that computes `tx`'s updates.

    Hyperparameters our state holds (lr, weight_decay, momentum) come from `opt_state` when given
    (the values a run last set: a plateau schedule's lr), else `tx`'s initial ones; they are
    constants of the optax chain (rebuild it to change one). ValueError (one line) for what
    optax cannot compute the same way.
    """
    return _optax_chain(describe(tx), _hypers(tx, opt_state))


# --------------------------------------------------------------------------- our state -> optax


def load_for_optax(path: str | os.PathLike[str], tx: optim.GradientTransformation) -> tuple[TrainState, dict]:
    """The `TrainState` and metadata of a train state file (`last.safetensors`) whose optimizer is `tx`.

    The template is built from the file's own names, shapes and dtypes and `tx.init`, so only the
    optimizer must be told; a `tx` of another structure is a `CheckpointError` naming the file.
    """
    info = checkpoint.inspect(path)

    def part(prefix: str) -> dict[str, Tensor]:
        return {
            k[len(prefix) :]: torch.zeros(s, dtype=d)
            for k, (d, s) in info.tensors.items()
            if k.startswith(prefix)
        }

    params = part("params/")
    zero = torch.zeros((), dtype=torch.int64)
    template = TrainState(zero, params, tx.init(params), part("model_state/"), zero)
    return checkpoint.load_state(path, template)


def _source(
    source: TrainState | str | os.PathLike[str], tx: optim.GradientTransformation
) -> tuple[TrainState, dict]:
    if isinstance(source, TrainState):
        return source, {}
    return load_for_optax(source, tx)


def _model(state: TrainState, metadata: Mapping[str, Any], model: str | None) -> tuple[str, dict[str, Any]]:
    """(name, hparams) of the model: `model`, the file's metadata, else recognised from the weights."""
    weights = merge_state(state.params, state.model_state)
    name = model or metadata.get("model") or identify(weights)
    hparams = metadata.get("model_hparams") if name == metadata.get("model") else None
    return name, dict(hparams or hparams_from_params(name, weights))


def _jax_tree(tree: Any) -> Any:
    import jax
    import jax.numpy as jnp

    if not jax.config.jax_enable_x64 and any(a.dtype == np.float64 for a in jax.tree.leaves(tree)):
        raise ValueError(
            "a float64 state needs jax in 64-bit mode: jax.config.update('jax_enable_x64', True)"
        )
    return jax.tree.map(jnp.asarray, tree)


def _flax_params(tree: Mapping[str, Tensor], model_state: Mapping[str, Tensor], name: str) -> Any:
    """A param-shaped tree (params, a moment, a momentum buffer) as Flax's `params` collection."""
    return _jax_tree(flax_variables(to_flax(merge_state(tree, model_state), model=name))["params"])


def _batch_stats(model_state: Mapping[str, Tensor], params: Mapping[str, Tensor], name: str) -> Any:
    return _jax_tree(
        flax_variables(to_flax(merge_state(params, model_state), model=name)).get("batch_stats", {})
    )


def _fill(ostate: Any, ours: Any, conv: Callable[[Any], Any]) -> Any:
    """optax's initial state `ostate` with the moments, buffers and counts of our state `ours`."""
    import jax.numpy as jnp

    if isinstance(ours, optim.ScaleByAdamState):
        count = jnp.asarray(int(ours.count), dtype=jnp.int32)
        return ostate._replace(count=count, mu=conv(ours.mu), nu=conv(ours.nu))
    if isinstance(ours, optim.TraceState):
        return ostate._replace(trace=conv(ours.trace))
    if isinstance(ours, optim.ScaleByScheduleState):
        return ostate._replace(count=jnp.asarray(int(ours.count), dtype=jnp.int32))
    if isinstance(ours, tuple) and not hasattr(ours, "_fields"):
        return tuple(_fill(o, s, conv) for o, s in zip(ostate, ours, strict=True))
    return ostate  # weight decay and lr: optax keeps them in the chain, not the state


def to_optax(
    source: TrainState | str | os.PathLike[str], tx: optim.GradientTransformation, *, model: str | None = None
) -> tuple[Any, Any]:
    """`(params, opt_state)` for optax: our state (a `TrainState`, or a `last.safetensors` path)
    whose optimizer is `tx`.

    `params` is Flax's `params` collection of the model (`to_flax` layout: HWIO kernels, dense
    `[in, out]`, batch-norm `scale`/`bias`); `opt_state` is what `optax_optimizer(tx, ...).init`
    makes, holding our moments and counters (`ScaleByAdamState(count, mu, nu)`, `TraceState`,
    `ScaleByScheduleState`; tuples for chains). Continue with
    `optax_optimizer(tx, state.opt_state)` (or `flax_train_state`). The model is `model`, the
    file's metadata, else recognised from the weights' names and shapes. float64 states need
    `jax_enable_x64`.
    """
    state, meta = _source(source, tx)
    if state.step.dim() != 0:
        raise ValueError("a stacked (ensemble or sweep) state does not convert to optax; convert one member")
    name, _ = _model(state, meta, model)
    params = _flax_params(state.params, state.model_state, name)
    opt = optax_optimizer(tx, state.opt_state)
    conv = lambda tree: _flax_params(tree, state.model_state, name)
    return params, _fill(opt.init(params), state.opt_state, conv)


def flax_train_state(
    source: TrainState | str | os.PathLike[str], tx: optim.GradientTransformation, *, model: str | None = None
) -> Any:
    """A `flax.training.train_state.TrainState` continuing our state: `apply_fn` the model's Flax
    module (`flax_module(name, torch_bn=True)`), `params`, `tx` the optax chain, `opt_state`,
    `step`, and `batch_stats` (`{}` without batch norm). Train it with
    `apply_fn({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])`."""
    from flax.training import train_state

    class FlaxTrainState(train_state.TrainState):
        batch_stats: Any = None

    state, meta = _source(source, tx)
    name, hparams = _model(state, meta, model)
    params, opt_state = to_optax(state, tx, model=name)
    module = flax_module(name, torch_bn=models.get(name, **hparams).stateful, **hparams)
    return FlaxTrainState(
        step=int(state.step), apply_fn=module.apply, params=params, tx=optax_optimizer(tx, state.opt_state),
        opt_state=opt_state, batch_stats=_batch_stats(state.model_state, state.params, name),
    )  # fmt: skip


# --------------------------------------------------------------------------- optax -> our state


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _torch_tree(
    flax_tree: Any, stats: Any, like: Mapping[str, Tensor], name: str, counts: dict[str, int]
) -> dict:
    """A Flax `params`-shaped tree back as our flat dict with `like`'s names, order and dtypes
    (the batch statistics `stats` only complete the layout; their entries are dropped)."""
    import jax

    if not isinstance(flax_tree, Mapping):
        raise ValueError(
            f"expected a Flax params tree (nested dicts of arrays), got {type(flax_tree).__name__}"
        )
    host = jax.tree.map(np.asarray, _deep_merge(flax_tree, stats))
    back = from_flax(host, model=name, num_batches_tracked=counts)
    missing = sorted(set(like) - set(back))
    if missing:
        raise ValueError(f"the Flax tree lacks {missing[:5]}; it does not hold this model's parameters")
    for k, t in like.items():
        if back[k].dtype != t.dtype or back[k].shape != t.shape:
            raise ValueError(
                f"{k}: {back[k].dtype} {list(back[k].shape)} from JAX, {t.dtype} {list(t.shape)} here"
            )
    return {k: back[k].to(t.device) for k, t in like.items()}


_EMPTY = (optim.AddDecayedWeightsState, optim.ScaleByLearningRateState)


def _unfill(ours: Any, ostate: Any, back: Callable[[Any], Any], step: Tensor, where: str) -> Any:
    """Our state `ours` (the template) with the moments, buffers and counts of optax's `ostate`."""
    expected = type(ours).__name__ if hasattr(ours, "_fields") else "a tuple (chain)"
    got = type(ostate).__name__
    fields = getattr(ostate, "_fields", None)

    def count(c: Any) -> Tensor:
        return torch.tensor(int(c), dtype=torch.int64, device=ours.count.device)

    if isinstance(ours, tuple) and not hasattr(ours, "_fields"):
        if isinstance(ostate, (tuple, list)) and fields is None and len(ostate) == len(ours):
            return tuple(
                _unfill(s, o, back, step, f"{where}/{i}")
                for i, (s, o) in enumerate(zip(ours, ostate, strict=True))
            )
    elif isinstance(ours, optim.ScaleByAdamState) and got == "ScaleByAdamState":
        return optim.ScaleByAdamState(count(ostate.count), back(ostate.mu), back(ostate.nu))
    elif isinstance(ours, optim.TraceState) and got == "TraceState" and fields == ("trace",):
        return ours._replace(count=step.clone(), trace=back(ostate.trace))
    elif isinstance(ours, optim.ScaleByScheduleState) and got == "ScaleByScheduleState":
        return optim.ScaleByScheduleState(count(ostate.count))
    elif isinstance(ours, _EMPTY) and fields == ():
        return ours
    shown = f"{got} of length {len(ostate)}" if isinstance(ostate, (tuple, list)) else got
    raise ValueError(
        f"optax state {where}: expected {expected}, got {shown}; it is not the state of optax_optimizer(tx)"
    )


def _counts(ostate: Any) -> list[int]:
    """The update counters an optax state holds (Adam's, the schedule's)."""
    if getattr(ostate, "_fields", None) and "count" in ostate._fields:
        return [int(ostate.count)]
    if isinstance(ostate, (tuple, list)) and not hasattr(ostate, "_fields"):
        return [c for s in ostate for c in _counts(s)]
    return []


def from_optax(
    params: Any,
    opt_state: Any,
    like: TrainState | str | os.PathLike[str],
    tx: optim.GradientTransformation | None = None,
    *,
    step: int | None = None,
    batch_stats: Any = None,
    model: str | None = None,
) -> TrainState:
    """Our `TrainState` from optax's `(params, opt_state)` (as `to_optax` made them, trained on).

    `like` is the state (or `last.safetensors`, then with its optimizer `tx`) the run was
    converted from: it gives the names, dtypes, hyperparameters and rng. `step` defaults to
    the optax state's update count; `batch_stats` (Flax's collection) becomes the model state,
    `num_batches_tracked` advanced by the steps taken. ValueError (one line) for a tree or
    state of another structure.
    """
    if not isinstance(like, TrainState) and tx is None:
        raise ValueError("from_optax with a checkpoint path as `like` needs its optimizer `tx`")
    base, meta = _source(like, tx)  # type: ignore[arg-type]
    name, _ = _model(base, meta, model)
    if step is None:
        found = _counts(opt_state)
        if not found:
            raise ValueError("the optax state holds no update count: pass step=")
        step = found[0]
    taken = int(step) - int(base.step)
    counts = {
        k.rsplit(".", 1)[0]: int(v) + taken
        for k, v in base.model_state.items()
        if k.endswith(".num_batches_tracked")
    }
    stats = _batch_stats(base.model_state, base.params, name) if batch_stats is None else batch_stats
    back = lambda tree: _torch_tree(tree, stats, base.params, name, counts)
    new_params = back(params)
    model_state = base.model_state
    if batch_stats is not None:
        merged = _torch_tree(params, batch_stats, merge_state(base.params, base.model_state), name, counts)
        model_state = {k: merged[k] for k in base.model_state}
    step_t = torch.tensor(int(step), dtype=torch.int64, device=base.step.device)
    opt = _unfill(base.opt_state, opt_state, back, step_t, "opt_state")
    return base.replace(step=step_t, params=new_params, opt_state=opt, model_state=model_state)


def from_flax_train_state(ts: Any, like: TrainState | str | os.PathLike[str], tx: Any = None) -> TrainState:
    """Our `TrainState` from a Flax `TrainState` (`flax_train_state`'s, trained on); see `from_optax`."""
    stats = getattr(ts, "batch_stats", None)
    return from_optax(ts.params, ts.opt_state, like, tx, step=int(ts.step), batch_stats=stats or None)


def save_resume(
    path: str | os.PathLike[str], state: TrainState, like: str | os.PathLike[str], *, epochs: int = 0
) -> None:
    """Write `state` as a `last.safetensors` that `scripts/train.py` resumes from.

    `like` is the checkpoint the run was converted from: its metadata (config, callback states,
    history) is kept, with `epochs` more epochs counted as done (the whole epochs trained
    elsewhere) and the state's lr. A checkpoint cut mid-epoch is refused: continue from one
    written at the end of an epoch. So is a private run's (`metadata["privacy"]`): its epsilon
    would not cover the steps trained elsewhere (`privacy.check_record` refuses such a state too).
    """
    meta = checkpoint.read_metadata(like)
    if meta.get("privacy") is not None:  # epsilon only for steps our per-example stage took
        raise ValueError(
            f"{like} is a private run's checkpoint: steps trained outside fashion_func's DP-SGD step "
            "are neither clipped nor noised, so no epsilon holds for them; it cannot be resumed privately"
        )
    if meta.get("in_epoch") is not None:
        raise ValueError(f"{like} was cut mid-epoch; convert a checkpoint written at the end of an epoch")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    meta["epoch"] = int(meta.get("epoch", 0)) + epochs
    try:
        meta["lr"] = float(optim.get_hyperparam(state.opt_state, "lr"))
    except KeyError:
        meta.pop("lr", None)
    checkpoint.save_state(Path(path), state, metadata=meta)
