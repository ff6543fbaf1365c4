"""Our train state as an Orbax checkpoint directory of optax / Flax structures, and back.

`save_orbax(directory, source, tx)` writes `{"params", "opt_state", "batch_stats", "step"}` as
`to_optax` / `flax_train_state` make them with `orbax.checkpoint.StandardCheckpointer`, so
`StandardCheckpointer().restore(directory, target)` with a target of that structure gives back
optax's own NamedTuples; `load_orbax(directory, like, tx)` restores one into our `TrainState`.
orbax-checkpoint is imported only inside the functions (the optional `jax` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fashion_func import optim
from fashion_func.interop import optax_io
from fashion_func.state import TrainState

__all__ = ["load_orbax", "save_orbax"]


def _tree(source: TrainState | str | os.PathLike[str], tx: optim.GradientTransformation) -> dict[str, Any]:
    import jax.numpy as jnp

    ts = optax_io.flax_train_state(source, tx)
    step = jnp.asarray(int(ts.step), dtype=jnp.int64 if jnp.result_type(int) == jnp.int64 else jnp.int32)
    return {"params": ts.params, "opt_state": ts.opt_state, "batch_stats": ts.batch_stats, "step": step}


def save_orbax(
    directory: str | os.PathLike[str],
    source: TrainState | str | os.PathLike[str],
    tx: optim.GradientTransformation,
) -> None:
    """Write our state (a `TrainState` or `last.safetensors`, optimizer `tx`) as an Orbax checkpoint
    directory (which must not exist yet) of `{"params", "opt_state", "batch_stats", "step"}`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(directory).absolute(), _tree(source, tx))
        ckptr.wait_until_finished()


def load_orbax(
    directory: str | os.PathLike[str],
    like: TrainState | str | os.PathLike[str],
    tx: optim.GradientTransformation,
) -> TrainState:
    """Our `TrainState` from an Orbax checkpoint of `save_orbax`'s structure (trained on in JAX):
    restored against the structure `like` converts to, then `from_optax`. A checkpoint of
    another structure is a one-line ValueError."""
    import jax
    import orbax.checkpoint as ocp

    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(like, tx))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            got = ckptr.restore(Path(directory).absolute(), target)
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{directory}: not an Orbax checkpoint of this state: {first}") from None
    stats = got["batch_stats"] or None
    return optax_io.from_optax(
        got["params"], got["opt_state"], like, tx, step=int(got["step"]), batch_stats=stats
    )
