"""A run continued in optax / Flax and back (`interop.to_optax`, `flax_train_state`, `from_optax`,
`save_resume`, `save_orbax`): checked with optax, flax and orbax-checkpoint themselves against
the same run done here throughout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from einops import rearrange

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before any jax import: CPU unless told otherwise
pytest.importorskip("optax", reason="the jax extra is not installed: pip install 'fashion_func[jax]'")

import jax
import jax.numpy as jnp
import optax

from fashion_func import checkpoint, interop, models, optim, schedules, step
from fashion_func import state as state_lib

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, tx, dtype: torch.dtype, hparams=None, n: int = 20):
    """(model, ours step, batches, first state): random batches of 8 images, float `dtype`."""
    model = models.get(name, **(hparams or {}))
    cast = lambda d: {k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()}
    params = cast(model.init(torch.Generator().manual_seed(0)))
    st = state_lib.create(params, tx, seed=0, model_state=cast(model.init_state()))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (8,), generator=g))
               for _ in range(n)]  # fmt: skip
    return step.make_train_step(model, tx, compile=False, preprocess=None), batches, st


def _ours(train_step, st, batches):
    for b in batches:
        st, _ = train_step(st, b)
    return st


def _flax(ts, batches):
    """`batches` in a plain Flax/optax loop on the Flax TrainState `ts`."""

    @jax.jit
    def train_step(ts, x, y):
        def loss(p):
            variables = {"params": p, "batch_stats": ts.batch_stats}
            logits, upd = ts.apply_fn(variables, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        grads, upd = jax.grad(loss, has_aux=True)(ts.params)
        return ts.apply_gradients(grads=grads, batch_stats=upd["batch_stats"])

    for x, y in batches:
        ts = train_step(ts, jnp.asarray(rearrange(x, "b c h w -> b h w c").numpy()), jnp.asarray(y.numpy()))
    return ts


def _max_diff(a: state_lib.TrainState, b: state_lib.TrainState) -> float:
    assert int(a.step) == int(b.step)
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape for x, y in zip(la, lb, strict=True)
    )
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(la, lb, strict=True) if x.numel())


CASES = {
    "simplenet": ("simplenet", lambda: optim.adam(1e-3, weight_decay=1e-2), None),
    "simplenet_bn": ("simplenet_bn", lambda: optim.adam(1e-3), None),
    "resnet": (
        "resnet",
        lambda: optim.chain(
            optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
            optim.scale_by_schedule(schedules.triangle(60, 15)),
        ),
        {"width": 4},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float64_20_steps_here_20_in_flax_20_here_equal_60_here(case, x64):
    name, make_tx, hparams = CASES[case]
    tx = make_tx()
    train_step, batches, st0 = _run(name, tx, torch.float64, hparams, n=60)
    at20 = _ours(train_step, st0, batches[:20])
    at40 = _ours(train_step, at20, batches[20:40])
    at60 = _ours(train_step, at40, batches[40:])

    ts = interop.flax_train_state(at20, tx)
    assert ts.params["conv1" if name != "resnet" else "prep"] is not None
    ts = _flax(ts, batches[20:40])
    there = interop.from_flax_train_state(ts, at20)
    # two computations (XLA's and ATen's float64 sums) through Adam: 1.1e-10 measured with
    # ATEN_CPU_CAPABILITY=default's scalar kernels (it passed 1e-10 with the vector ones); a
    # float32 difference would be about 1e-6
    assert _max_diff(there, at40) < 1e-9
    back = _ours(train_step, there, batches[40:])
    assert _max_diff(back, at60) < 1e-9
    if name != "simplenet":  # batch statistics moved in Flax as here, counter included
        assert int(there.model_state[next(k for k in there.model_state if k.endswith("tracked"))]) == 40


def test_float32_to_1e_5_and_the_optax_state_is_optax_own():
    tx = optim.adamw(1e-3, weight_decay=1e-2)
    train_step, batches, st0 = _run("simplenet", tx, torch.float32, n=40)
    at20 = _ours(train_step, st0, batches[:20])
    params, opt_state = interop.to_optax(at20, tx)
    assert type(opt_state[0]) is optax.ScaleByAdamState and int(opt_state[0].count) == 20
    assert params["conv1"]["kernel"].shape == (3, 3, 1, 32)  # HWIO
    there = interop.from_flax_train_state(_flax(interop.flax_train_state(at20, tx), batches[20:]), at20)
    assert _max_diff(there, _ours(train_step, at20, batches[20:])) < 1e-5


@pytest.mark.cross_path
def test_optax_chain_computes_our_update(x64):
    """One update of each optimizer from the same state: optax's chain against ours."""
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    sgd = optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for tx in (sgd, optim.adam(1e-2, weight_decay=0.1), optim.adamw(1e-2), optim.sgd(0.1)):
        s = tx.init(params)
        for _ in range(3):
            upd, s = tx.update(grads, s, params)
        otx = interop.optax_optimizer(tx)
        jp = {k: jnp.asarray(v.numpy()) for k, v in params.items()}
        jg = {k: jnp.asarray(v.numpy()) for k, v in grads.items()}
        os_ = otx.init(jp)
        for _ in range(3):
            oupd, os_ = otx.update(jg, os_, jp)
        for k in params:  # every element, float64
            np.testing.assert_allclose(np.asarray(oupd[k]), upd[k].numpy(), rtol=1e-12, atol=1e-14)


def test_what_optax_cannot_compute_is_one_line():
    for tx, words in (
        (optim.sgd(0.1, momentum=0.9, dampening=0.1), "dampening"),
        (optim.chain(optim.clip_by_global_norm(1.0), optim.adam()), "1e-6"),
        (optim.chain(optim.adam(), optim.ema(0.99)), "moving average"),
        (optim.scale_by_schedule(lambda t: t * 0 + 1), "piecewise_linear"),
    ):
        with pytest.raises(ValueError, match=words) as e:
            interop.optax_optimizer(tx)
        assert "\n" not in str(e.value)


def test_an_unknown_jax_state_is_a_one_line_error():
    tx = optim.adam(1e-3)
    _, _, st0 = _run("simplenet", tx, torch.float32, n=1)
    params, opt_state = interop.to_optax(st0, tx)
    foreign = optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(params)  # not our structure
    with pytest.raises(
        ValueError, match=r"optax state opt_state: expected a tuple \(chain\), got tuple of length 2"
    ) as e:
        interop.from_optax(params, foreign, st0)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="Flax params tree") as e:
        interop.from_optax([1, 2], opt_state, st0)
    with pytest.raises(ValueError, match="missing keys") as e:
        interop.from_optax({"fc2": params["fc2"]}, opt_state, st0)


def test_orbax_checkpoint_restores_into_optax_structures_and_back(tmp_path):
    import orbax.checkpoint as ocp

    tx = optim.adam(1e-3)
    train_step, batches, st0 = _run("simplenet_bn", tx, torch.float32, n=3)
    st = _ours(train_step, st0, batches)
    interop.save_orbax(tmp_path / "orbax", st, tx)
    params, opt_state = interop.to_optax(st, tx)
    stats = interop.flax_train_state(st, tx).batch_stats
    target = {"params": params, "opt_state": opt_state, "batch_stats": stats, "step": jnp.asarray(3)}
    with ocp.StandardCheckpointer() as ckptr:  # what a JAX user does, no code of ours
        got = ckptr.restore(tmp_path / "orbax", jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
    assert type(got["opt_state"][1]) is optax.ScaleByAdamState and int(got["opt_state"][1].count) == 3
    assert jnp.array_equal(got["opt_state"][1].mu["conv1"]["kernel"], opt_state[1].mu["conv1"]["kernel"])
    assert _max_diff(interop.load_orbax(tmp_path / "orbax", st, tx), st) == 0.0


def _readme_blocks() -> tuple[list[str], list[str]]:
    text = (ROOT / "README.md").read_text().split("### A run continued in optax, and back", 1)[1]
    section = text.split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S), re.findall(
        r"```python\n(.*?)```", section, flags=re.S
    )


@pytest.mark.slow
def test_readme_train_then_optax_epoch_then_resume(tmp_path):
    """The README's example as written: train.py, an epoch in optax, --resume; equal to 3 epochs here."""
    sh, py = _readme_blocks()
    assert len(sh) == 2 and len(py) == 1
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    (tmp_path / "optax_epoch.py").write_text(py[0])
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "JAX_PLATFORMS": "cpu",
    }
    ref = sh[0].replace("--epochs 1", "--epochs 3").replace("runs/x", "runs/ref")
    for command in (sh[0], "python optax_epoch.py", sh[1], ref):
        proc = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "runs" / "x" / "checkpoints" / "last.safetensors"
    template = interop.load_for_optax(
        tmp_path / "runs" / "ref" / "checkpoints" / "last.safetensors", optim.adam(1e-3)
    )
    crossed, meta = checkpoint.load_state(last, template[0])
    assert int(crossed.step) == 12 and meta["epoch"] == 3
    assert [r["epoch"] for r in meta["history"]] == [1, 3]  # epoch 2 ran in optax
    assert _max_diff(crossed, template[0]) < 2e-4  # float32 XLA vs oneDNN rounding, through Adam
