"""Our train state as an Orbax checkpoint directory of optax / Flax structures, and back.

`save_orbax` writes `{"params", "opt_state", "batch_stats", "step"}` as `flax_train_state` makes
them, so `orbax.checkpoint.StandardCheckpointer().restore(directory, target)` gives back optax's
own NamedTuples, and a manifest (`MANIFEST`: the SHA-256 of every file it wrote) that
`load_orbax` checks (one flipped byte is a one-line ValueError naming the file); a checkpoint of
JAX code (no manifest) and ours must restore to `like`'s shapes and dtypes, every float finite.
orbax-checkpoint (the optional `jax` extra) is imported only when called.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fashion_func import atomic, optim, tree
from fashion_func.interop import optax_io
from fashion_func.state import TrainState

__all__ = ["load_orbax", "save_orbax"]

MANIFEST = "fashion_func.sha256.json"  # {"sha256": {relative path: hex digest}} of save_orbax's files
_CHUNK = 1 << 20


def _digests(directory: Path) -> dict[str, str]:
    """The SHA-256 of every regular file under `directory` (the manifest left out), by relative path."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.name == MANIFEST or p.is_symlink() or not p.is_file():
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out[p.relative_to(directory).as_posix()] = h.hexdigest()
    return out


def _check_manifest(directory: Path) -> None:
    """ValueError (one line) when a file `save_orbax` wrote is missing or differs from its digest."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return  # written by JAX code, not save_orbax: the values are still checked after restore
    try:
        expected = json.loads(manifest.read_text())["sha256"]
        assert isinstance(expected, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise ValueError(f"{directory}: {MANIFEST} is not a manifest save_orbax wrote") from None
    found = _digests(directory)
    for name, digest in expected.items():
        if found.get(name) != digest:
            what = "is missing" if name not in found else "differs from what save_orbax wrote (corrupted?)"
            raise ValueError(f"{directory}: {name} {what}; not restoring it")


def _check_values(state: TrainState, like: TrainState, directory: str | os.PathLike[str]) -> None:
    """ValueError (one line) unless `state` has `like`'s shapes and dtypes, every float finite."""
    wanted = tree.flatten_with_paths(like)
    for path, got in tree.flatten_with_paths(state).items():
        want = wanted[path]  # from_optax builds `like`'s structure
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"{directory}: {path} restored as {got.dtype} {tuple(got.shape)}, "
                f"not {want.dtype} {tuple(want.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ValueError(f"{directory}: {path} has {bad} non-finite values (NaN or inf)")


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
    directory (which must not exist yet) of `{"params", "opt_state", "batch_stats", "step"}`,
    with `MANIFEST` (the SHA-256 of each file) that `load_orbax` checks."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, _tree(source, tx))
        ckptr.wait_until_finished()
    atomic.write_json(directory / MANIFEST, {"sha256": _digests(directory)}, what="Orbax manifest")


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

    _check_manifest(Path(directory))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(like, tx))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            got = ckptr.restore(Path(directory).absolute(), target)
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{directory}: not an Orbax checkpoint of this state: {first}") from None
    stats = got["batch_stats"] or None
    state = optax_io.from_optax(
        got["params"], got["opt_state"], like, tx, step=int(got["step"]), batch_stats=stats
    )
    _check_values(
        state, like if isinstance(like, TrainState) else optax_io.load_for_optax(like, tx)[0], directory
    )
    return state
