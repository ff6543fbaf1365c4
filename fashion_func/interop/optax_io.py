"""A training run across frameworks: our train state <-> optax / Flax, and back.

`optax_optimizer(tx)` is the optax chain computing our optimizer's update, built from `tx`'s
`description` (data, never code); `to_optax` / `flax_train_state` carry a state over,
`from_optax` / `from_flax_train_state` bring it back, `save_resume` writes a resumable
`last.safetensors`.

Where optax and torch.optim differ, the chain computes the same update: torch's L2 weight decay
is `optax.add_decayed_weights` *before* the preconditioner, AdamW's after it. What optax cannot
compute (SGD dampening, our clipping's `+ 1e-6`, the weights' moving average, our noise's
generator, a transform without a description) is refused in one line naming the difference.
jax, flax and optax are imported only inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator, Mapping
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
from fashion_func.loop.artifacts import MARKER
from fashion_func.loop.lock import LOCK, Lock
from fashion_func.loop.resume import RunRecord
from fashion_func.schedules import DescribedSchedule
from fashion_func.state import TrainState

__all__ = [
    "flax_train_state",
    "from_flax_train_state",
    "from_optax",
    "load_for_optax",
    "load_train_state",
    "optax_optimizer",
    "save_resume",
    "to_optax",
]


# Our transforms by the name in their description: those whose state is a chain's tuple of
# their parts' states, those optax computes alike, and those it cannot (with the reason).
_CHAINS = frozenset({"chain", "sgd", "adam", "adamw", "lion"})
_SUPPORTED = ("chain", "sgd", "adam", "adamw", "lion", "add_decayed_weights", "add_l2_to_grads", "trace",
              "scale_by_adam", "scale_by_lion", "scale_by_learning_rate", "scale_by_schedule")  # fmt: skip
_REFUSED = {
    "clip_by_global_norm": "clip_by_global_norm scales by max_norm / (norm + 1e-6) as torch does, "
    "optax's by max_norm / norm only when the norm exceeds it; no optax transform computes ours",
    "ema": "ema keeps a moving average of the weights, which no optax transform does "
    "(optax.ema averages the updates)",
    "add_noise": "add_noise draws from this library's keyed generator, not JAX's PRNG",
}


def _description(desc: optim.Description | None) -> optim.Description:
    """The description of our transform, checked to be one optax computes alike (ValueError, one line,
    for one it cannot, one this module does not know, or one written without a description)."""
    if desc is None:
        raise ValueError(
            "no optax equivalent known for a transform without a description (one written as "
            f"GradientTransformation(init, update)); known: {', '.join(_SUPPORTED)}"
        )
    if desc.name in _REFUSED:
        raise ValueError(f"no optax equivalent: {_REFUSED[desc.name]}")
    if desc.name not in _SUPPORTED:
        raise ValueError(
            f"no optax equivalent known for transform {desc.name!r}; known: {', '.join(_SUPPORTED)}"
        )
    for child in desc.children.values():
        _description(child)
    if desc.name == "scale_by_schedule":
        _knots(desc.hyperparams["schedule"])
    return desc


def _knots(schedule: Any) -> tuple[tuple[float, float], ...]:
    """The knots of a `schedules.piecewise_linear` (or `triangle`) multiplier, from its description."""
    desc = schedule.description if isinstance(schedule, DescribedSchedule) else None
    if desc is None or desc.name != "piecewise_linear":
        which = f"schedule {desc.name}" if desc is not None else "a schedule without a description"
        raise ValueError(
            f"no optax equivalent known for scale_by_schedule with {which}; "
            "schedules.piecewise_linear and schedules.triangle convert"
        )
    return tuple(desc.hyperparams["knots"])


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


def _optax_chain(desc: optim.Description, state: Any) -> Any:
    """The optax transform of `desc`, its state-held hyperparameters read from our `state`."""
    import optax

    fixed = desc.hyperparams
    if desc.name in _CHAINS:  # the parts' roles are "0", "1", ...
        parts = [desc.children[str(i)] for i in range(len(desc.children))]
        return optax.chain(*(_optax_chain(p, s) for p, s in zip(parts, state, strict=True)))
    if desc.name in ("add_decayed_weights", "add_l2_to_grads"):
        # either placement is optax's add_decayed_weights at the same place in the chain: first
        # (torch's L2 in the gradient) or after the preconditioner (AdamW's decoupled decay)
        return optax.add_decayed_weights(_scalar(state.weight_decay))
    if desc.name == "trace":
        if _scalar(state.dampening) != 0:
            raise ValueError("no optax equivalent: SGD dampening (optax.trace has none)")
        return optax.trace(decay=_scalar(state.momentum), nesterov=bool(fixed["nesterov"]))
    if desc.name == "scale_by_adam":
        b1, b2, eps, eps_root = (float(fixed[k]) for k in ("b1", "b2", "eps", "eps_root"))
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    if desc.name == "scale_by_lion":
        return optax.scale_by_lion(b1=float(fixed["b1"]), b2=float(fixed["b2"]))
    if desc.name == "scale_by_learning_rate":
        return optax.scale_by_learning_rate(_scalar(state.lr))
    return optax.scale_by_schedule(_jax_piecewise_linear(_knots(fixed["schedule"])))


def _scalar(t: Tensor) -> float:
    if t.dim() != 0:
        raise ValueError(
            "a stacked (ensemble or sweep) optimizer state does not convert to optax; convert one member"
        )
    return float(t)


def optax_optimizer(tx: optim.GradientTransformation, opt_state: Any | None = None) -> Any:
    """The `optax.GradientTransformation` that computes `tx`'s updates, with the hyperparameters
    our state holds (lr, weight_decay, momentum) taken from `opt_state` (what a run last set),
    else `tx`'s initial ones, as constants of the chain. ValueError (one line) for what optax
    cannot compute the same way."""
    if opt_state is None:
        opt_state = tx.init({"_": torch.zeros((), dtype=torch.float64)})  # float64: the values as written
    return _optax_chain(_description(tx.description), opt_state)


def load_train_state(
    path: str | os.PathLike[str], tx: optim.GradientTransformation
) -> tuple[TrainState, dict]:
    """The `TrainState` and metadata of a train state file (`last.safetensors`) whose optimizer is
    `tx`, read against a template of the file's own names, shapes and dtypes and `tx.init` (a
    `tx` of another structure: `CheckpointError`). `load_for_optax` is the same function."""
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


load_for_optax = load_train_state


def _source(
    source: TrainState | str | os.PathLike[str], tx: optim.GradientTransformation
) -> tuple[TrainState, dict]:
    if isinstance(source, TrainState):
        return source, {}
    return load_train_state(source, tx)


def _model(state: TrainState, metadata: Mapping[str, Any], model: str | None) -> tuple[str, dict[str, Any]]:
    """(name, hparams) of the model: `model`, the file's metadata, else recognised from the weights."""
    weights = merge_state(state.params, state.model_state)
    name = model or metadata.get("model") or identify(weights)
    hparams = metadata.get("model_hparams") if name == metadata.get("model") else None
    return name, dict(hparams or hparams_from_params(name, weights))


def _flax(
    tree: Mapping[str, Tensor], model_state: Mapping[str, Tensor], name: str, collection: str = "params"
) -> Any:
    """A param-shaped tree (params, a moment, a momentum buffer) and the model state as one of
    Flax's collections of `jax.Array`s (`params`, `batch_stats`: {} without batch norm)."""
    import jax
    import jax.numpy as jnp

    out = flax_variables(to_flax(merge_state(tree, model_state), model=name)).get(collection, {})
    if not jax.config.jax_enable_x64 and any(a.dtype == np.float64 for a in jax.tree.leaves(out)):
        raise ValueError(
            "a float64 state needs jax in 64-bit mode: jax.config.update('jax_enable_x64', True)"
        )
    return jax.tree.map(jnp.asarray, out)


# our state types -> optax's state type (of the transform `optax_optimizer` makes) and the fields
# carried across; weight decay and lr keep their values in the optax chain, not its state
_CARRIED: dict[type, tuple[str, tuple[str, ...]]] = {
    optim.ScaleByAdamState: ("ScaleByAdamState", ("count", "mu", "nu")),
    optim.ScaleByLionState: ("ScaleByLionState", ("count", "mu")),
    optim.TraceState: ("TraceState", ("trace",)),
    optim.ScaleByScheduleState: ("ScaleByScheduleState", ("count",)),
    optim.AddDecayedWeightsState: ("EmptyState", ()),
    optim.ScaleByLearningRateState: ("EmptyState", ()),
}


def _is_chain(state: Any) -> bool:
    return isinstance(state, (tuple, list)) and not hasattr(state, "_fields")


def _carry(dst: Any, src: Any, fields: tuple[str, ...], count: Callable[[Any], Any], tree: Callable) -> Any:
    """The NamedTuple `dst` with `src`'s `fields`, counts through `count`, trees through `tree`."""
    return dst._replace(**{f: (count if f == "count" else tree)(getattr(src, f)) for f in fields})


def _fill(ostate: Any, ours: Any, conv: Callable[[Any], Any]) -> Any:
    """optax's initial state `ostate` with the moments, buffers and counts of our state `ours`."""
    import jax.numpy as jnp

    if _is_chain(ours):
        return tuple(_fill(o, s, conv) for o, s in zip(ostate, ours, strict=True))
    fields = _CARRIED.get(type(ours), ("", ()))[1]
    return _carry(ostate, ours, fields, lambda c: jnp.asarray(int(c), dtype=jnp.int32), conv)


def to_optax(
    source: TrainState | str | os.PathLike[str], tx: optim.GradientTransformation, *, model: str | None = None
) -> tuple[Any, Any]:
    """`(params, opt_state)` for optax of our state (a `TrainState`, or a `last.safetensors` path)
    whose optimizer is `tx`: Flax's `params` collection (`to_flax` layout) and the state
    `optax_optimizer(tx, ...).init` makes, holding our moments and counters. The model is
    `model`, the file's metadata's, else recognised from the weights. float64 needs
    `jax_enable_x64`."""
    state, meta = _source(source, tx)
    if state.step.dim() != 0:
        raise ValueError("a stacked (ensemble or sweep) state does not convert to optax; convert one member")
    name, _ = _model(state, meta, model)
    params = _flax(state.params, state.model_state, name)
    opt = optax_optimizer(tx, state.opt_state)
    conv = lambda tree: _flax(tree, state.model_state, name)
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
        opt_state=opt_state, batch_stats=_flax(state.params, state.model_state, name, "batch_stats"),
    )  # fmt: skip


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


def _unfill(ours: Any, ostate: Any, back: Callable[[Any], Any], step: Tensor, where: str) -> Any:
    """Our state `ours` (the template) with the moments, buffers and counts of optax's `ostate`,
    matched by type; ValueError (one line) for a state of another structure."""
    import optax

    chain = _is_chain(ours)
    optax_type, fields = _CARRIED.get(type(ours), ("", ()))
    if chain:
        if _is_chain(ostate) and len(ostate) == len(ours):
            pairs = enumerate(zip(ours, ostate, strict=True))
            return tuple(_unfill(s, o, back, step, f"{where}/{i}") for i, (s, o) in pairs)
    elif optax_type and isinstance(ostate, getattr(optax, optax_type)):
        count = lambda c: torch.tensor(int(c), dtype=torch.int64, device=ours.count.device)
        new = _carry(ours, ostate, fields, count, back)
        # optax's trace counts nothing: ours counts the steps taken
        return new._replace(count=step.clone()) if isinstance(ours, optim.TraceState) else new
    expected = "a tuple (chain)" if chain else type(ours).__name__
    got = type(ostate).__name__
    shown = f"{got} of length {len(ostate)}" if isinstance(ostate, (tuple, list)) else got
    raise ValueError(
        f"optax state {where}: expected {expected}, got {shown}; it is not the state of optax_optimizer(tx)"
    )


def _counts(ostate: Any) -> list[int]:
    """The update counters an optax state holds (Adam's, the schedule's)."""
    if getattr(ostate, "_fields", None) and "count" in ostate._fields:
        return [int(ostate.count)]
    if _is_chain(ostate):
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
    `like` is the state (or `last.safetensors`, then with its optimizer `tx`) the run was converted
    from: names, dtypes, hyperparameters and rng. `step` defaults to the optax state's update count;
    `batch_stats` (Flax's) becomes the model state, `num_batches_tracked` advanced by the steps
    taken. ValueError (one line) for a tree or state of another structure."""
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
    stats = _flax(base.params, base.model_state, name, "batch_stats") if batch_stats is None else batch_stats
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
    path: str | os.PathLike[str], state: TrainState, like: str | os.PathLike[str], *, epochs: int
) -> None:
    """Write `state` as a `last.safetensors` that `scripts/train.py` resumes from: `like`'s (the
    resume point converted from) metadata, with `epochs` (>= 1, trained elsewhere) more done and
    the state's lr. ValueError (one line) unless the state stands where those epochs end, and for
    a mid-epoch or private `like`. In a run directory `path` is written holding the run's lock
    (`loop.RunError` while a run trains there)."""
    record = RunRecord.from_meta(_resume_point_of(state, like, epochs))  # the checked record
    try:
        lr: float | None = float(optim.get_hyperparam(state.opt_state, "lr"))
    except KeyError:
        lr = None
    with _run_locked(Path(path)):
        meta = dataclasses.replace(record, epoch=record.epoch + epochs, lr=lr).to_meta()
        checkpoint.save_state(Path(path), state, metadata=meta)


def _resume_point_of(state: TrainState, like: str | os.PathLike[str], epochs: Any) -> dict[str, Any]:
    """`like`'s metadata, once `save_resume`'s arguments are checked against it (ValueError)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(
            f"epochs must be the whole epochs trained since {like} (an integer >= 1), got {epochs!r}"
        )
    info = checkpoint.inspect(like)
    if info.format != checkpoint.STATE_FORMAT:
        raise ValueError(
            f"like={like} is not a resume point (a last.safetensors train state) but a "
            f"{info.format or 'foreign'} file; pass the last.safetensors the run was converted from"
        )
    meta = info.metadata
    if meta.get("privacy") is not None:  # epsilon only for steps our per-example stage took
        raise ValueError(
            f"{like} is a private run's checkpoint: steps trained outside fashion_func's DP-SGD step "
            "are neither clipped nor noised, so no epsilon holds for them; it cannot be resumed privately"
        )
    if meta.get("in_epoch") is not None:
        raise ValueError(f"{like} was cut mid-epoch; convert a checkpoint written at the end of an epoch")
    step = int(state.step.reshape(-1)[0])  # an ensemble's members stand at the same step
    done, then = meta.get("epoch"), int(checkpoint.load_state(like, state)[0].step.reshape(-1)[0])
    if isinstance(done, bool) or not isinstance(done, int) or done < 1 or then % done:
        raise ValueError(
            f"{like} does not end an epoch (epoch {done!r} at step {then}); its steps per epoch are unknown"
        )
    per_epoch = then // done
    if step != then + epochs * per_epoch:
        raise ValueError(
            f"the state is at step {step}, but {like} ends epoch {done} at step {then} and {epochs} more "
            f"epoch(s) of {per_epoch} steps end at step {then + epochs * per_epoch}; pass the epochs the "
            "state trained"
        )
    return meta


@contextlib.contextmanager
def _run_locked(path: Path) -> Iterator[None]:
    """Hold the lock of the run directory `path` is in (`<run>/checkpoints/<file>`), if it is one."""
    folder = path.absolute().parent
    run = folder.parent
    if folder.name != "checkpoints" or not ((run / LOCK).exists() or (run / MARKER).exists()):
        yield
        return
    lock = Lock(run)  # RunError "in use by process N" while a run trains there
    try:
        yield
    finally:
        lock.release(remove=lock.created)
