"""The functional payoff (issue 34): the eval step differentiates, models with several outputs,
resume that restores the global generators, the loss as a function of the parameters, and
per-example gradients in bounded memory.

References: central finite differences in float64, `torch.linalg.eigvalsh` of the full Hessian,
JAX on the library's Flax module, and plain computations of the accuracies.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fashion_func as ff
from fashion_func import callbacks, checkpoint, interop, loop, models, nn, optim, step, tree
from fashion_func import state as state_lib

D, H, C = 6, 5, 4  # a tiny MLP: inputs, hidden units, classes


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mlp_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (D, H), "b1": (H,), "w2": (H, C), "b2": (C,)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def data(n: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=dtype), torch.randint(0, C, (n,), generator=g)


def directional_fd(f, p, v, eps: float = 1e-6):
    """(f(p + eps v) - f(p - eps v)) / 2 eps: a central difference, error O(eps^2)."""
    return (f(tree.map(lambda a, b: a + eps * b, p, v)) - f(tree.map(lambda a, b: a - eps * b, p, v))) / (
        2 * eps
    )


def dot(a, b) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


# -- 1. the eval step differentiates ----------------------------------------------------------


def test_eval_step_and_stages_evaluate_differentiate_as_finite_differences():
    p, (x, y), v = mlp_params(), data(16), mlp_params(seed=2)
    ev = step.make_eval_step(mlp, preprocess=None, compile=False, topk=2)
    evaluate = step.stages(mlp, preprocess=None, topk=2).evaluate

    def eval_loss(q):
        return ev(q, (x, y))["loss"].mean()

    def stage_loss(q):
        return evaluate(q, {}, x, y)["loss"].mean()

    for f in (eval_loss, stage_loss):
        g = torch.func.grad(f)(p)
        assert dot(g, v).abs() > 1e-3  # not the zeros of an eval step under no_grad
        torch.testing.assert_close(dot(g, v), directional_fd(f, p, v), rtol=1e-7, atol=1e-10)
    # a plain call records no graph: the outputs need no gradient
    assert not ev(p, (x, y))["loss"].requires_grad


# -- 2. models with several outputs -----------------------------------------------------------

AUX = 1  # the aux head's width


def two_heads(p, x):
    """10... here C class logits and an aux output (the label's parity), from one trunk."""
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return {"logits": h @ p["w2"] + p["b2"], "aux": h @ p["wa"] + p["ba"]}


def two_heads_params(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    p = mlp_params(dtype)
    return {**p, "wa": torch.randn(H, AUX, generator=g, dtype=dtype), "ba": torch.zeros(AUX, dtype=dtype)}


def multitask_loss(out, y):
    parity = (y % 2).to(out["aux"].dtype)
    aux = F.binary_cross_entropy_with_logits(out["aux"][:, 0], parity, reduction="none")
    return F.cross_entropy(out["logits"], y, reduction="none") + aux, {"aux_loss": aux}


def plain_acc(p, x, y, k: int = 1) -> float:
    logits = two_heads(p, x)["logits"]
    return float((logits.topk(k, -1).indices == y[:, None]).any(-1).double().mean())


def test_two_head_model_accuracies_read_the_class_head(tmp_path):
    x, y = data(96, torch.float32)
    xv, yv = data(64, torch.float32, seed=5)
    tx = optim.sgd(0.5)
    kw = {"loss": multitask_loss, "preprocess": None, "topk": 2}
    train_step = step.make_train_step(two_heads, tx, compile=False, **kw)
    eval_step = step.make_eval_step(two_heads, compile=False, **kw)
    st = state_lib.create(two_heads_params(), tx)

    # the train step's correct / top2_correct are those of the class logits before the update
    before = st.params
    _, m = train_step(st, (x[:32], y[:32]))
    assert int(m["correct"]) == round(plain_acc(before, x[:32], y[:32]) * 32)
    assert int(m["top2_correct"]) == round(plain_acc(before, x[:32], y[:32], 2) * 32)
    assert float(m["aux_loss_sum"]) > 0

    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    ckpt = callbacks.ModelCheckpoint(monitor="val_acc", mode="max")
    result = loop.fit(st, train_step, batches, epochs=4, eval_step=eval_step, val_data=[(xv, yv)],
                      callbacks=[ckpt], run_dir=tmp_path / "run")  # fmt: skip
    last = result.history[-1]
    assert last["val_acc"] == pytest.approx(plain_acc(result.state.params, xv, yv), abs=1e-12)
    assert last["val_top2"] == pytest.approx(plain_acc(result.state.params, xv, yv, 2), abs=1e-12)
    # the checkpoint chosen by val_acc holds the weights whose class-head accuracy is the best
    weights, _ = checkpoint.load_weights(tmp_path / "run" / "checkpoints" / "best.safetensors")
    accs = [r["val_acc"] for r in result.history]
    assert plain_acc(weights, xv, yv) == pytest.approx(max(accs), abs=1e-12)
    assert len(set(accs)) > 1  # the choice was not trivial


def test_tuple_outputs_and_class_output_by_name_or_index():
    x, y = data(8, torch.float32)
    p = two_heads_params()

    def as_tuple(q, xx):
        out = two_heads(q, xx)
        return out["aux"], out["logits"]

    def renamed(q, xx):
        out = two_heads(q, xx)
        return {"cls": out["logits"], "aux": out["aux"]}

    want = two_heads(p, x)["logits"].argmax(-1) == y
    for fn, head in ((as_tuple, 1), (renamed, "cls")):
        out = step.make_eval_step(fn, preprocess=None, compile=False, class_output=head)(p, (x, y))
        assert torch.equal(out["correct"], want)  # the default loss is the class head's cross-entropy
        torch.testing.assert_close(
            out["loss"], F.cross_entropy(two_heads(p, x)["logits"], y, reduction="none")
        )
    with pytest.raises(ValueError, match=r"none is the class head 'logits': name it with class_output="):
        step.make_eval_step(renamed, preprocess=None, compile=False)(p, (x, y))
    with pytest.raises(ValueError, match="class_output must be the index"):
        step.make_eval_step(as_tuple, preprocess=None, compile=False, class_output="cls")(p, (x, y))


def test_logits_wider_than_the_classes_are_refused_at_the_first_call():
    """The trial's model: the aux logit concatenated to the class logits."""
    x, y = data(8, torch.float32)
    p = two_heads_params()

    def concatenated(q, xx):
        out = two_heads(q, xx)
        return torch.cat([out["logits"], out["aux"]], -1)

    msg = rf"the class head has {C + AUX} columns but there are {C} classes"
    with pytest.raises(ValueError, match=msg):
        step.make_eval_step(concatenated, preprocess=None, compile=False, num_classes=C)(p, (x, y))
    tx = optim.sgd(0.1)
    with pytest.raises(ValueError, match=msg):
        step.make_train_step(concatenated, tx, preprocess=None, compile=False, num_classes=C)(
            state_lib.create(p, tx), (x, y)
        )
    # a Model knows its class count: simplenet(num_classes=10) giving 11 columns is refused
    model = models.mlp(D_in=D, H=H, D_out=C + 1)
    model = models.Model("mlp", {**model.hparams, "num_classes": C}, model.init_fn, model.stages, (D,))
    params = model.init(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=msg):
        step.make_eval_step(model, preprocess=None, compile=False)(params, (x, y))


# -- 3. resume restores the global generators --------------------------------------------------


class Augmented(Dataset):
    """Draws its augmentation from the global generators: torch's, numpy's and Python's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, torch_noise: bool = True) -> None:
        self.x, self.y, self.torch_noise = x, y, torch_noise

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        noise = float(np.random.uniform(-0.1, 0.1)) + random.gauss(0, 0.1)
        if self.torch_noise:
            noise = noise + 0.1 * torch.randn(self.x.shape[1])
        return self.x[i] + noise, self.y[i]


StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
X32, Y32 = data(40, torch.float32)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def run(tmp_path, name: str, torch_noise: bool = True, **kw):
    seed_all(0)
    dataset = Augmented(X32, Y32, torch_noise)
    loader = StatefulDataLoader(dataset, batch_size=4, shuffle=True)  # 10 batches an epoch
    tx = optim.adam(0.01)
    train_step = step.make_train_step(mlp, tx, preprocess=None, compile=False)
    st = state_lib.create(mlp_params(torch.float32), tx)
    cb = [callbacks.ModelCheckpoint(monitor="train_loss")]
    return loop.fit(st, train_step, loader, epochs=3, callbacks=cb, run_dir=tmp_path / name, **kw)


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
@pytest.mark.parametrize(("cut", "torch_noise"), [(3, True), (13, True), (20, False)])
def test_a_cut_run_resumes_to_the_same_weights_bitwise(tmp_path, cut, torch_noise):
    """Cut inside epoch 1 and 2 (augmentation from torch's, numpy's and Python's generators),
    and at the end of epoch 2 (numpy's and Python's: torchdata draws one more seed from torch's
    generator when it loads a finished epoch's state than a fresh loader does)."""
    whole = run(tmp_path, "whole", torch_noise)
    part = run(tmp_path, "cut", torch_noise, max_steps=cut)
    assert int(part.state.step) == cut
    seed_all(1234)  # another process: its generators stand elsewhere
    resumed = run(tmp_path, "cut", torch_noise, resume="auto")
    assert int(resumed.state.step) == 30
    for k in whole.state.params:
        assert torch.equal(resumed.state.params[k], whole.state.params[k]), k
    assert (
        "restored the global random generators (torch, numpy, random) from the checkpoint"
        in (tmp_path / "cut" / "train.log").read_text()
    )


def test_the_global_generators_round_trip_through_json_and_bad_states_are_named():
    import json

    from fashion_func.loop import rngs

    saved = json.loads(json.dumps(rngs.capture()))  # what the checkpoint's metadata holds
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert rngs.restore(saved)[:3] == ["torch", "numpy", "random"]
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert rngs.check(saved) is None
    assert "malformed" in rngs.check({**saved, "numpy": {**saved["numpy"], "keys": [1, 2]}})
    assert "malformed" in rngs.check({**saved, "python": {"version": 3}})
    assert rngs.check([1]) == "is not an object"


def test_a_source_that_cannot_resume_mid_epoch_is_named_at_the_start(tmp_path):
    tx = optim.sgd(0.1)
    train_step = step.make_train_step(mlp, tx, preprocess=None, compile=False)
    st = state_lib.create(mlp_params(torch.float32), tx)
    shuffled = DataLoader(TensorDataset(X32, Y32), batch_size=8, shuffle=True)
    loop.fit(st, train_step, shuffled, epochs=1, run_dir=tmp_path / "a")
    named = [
        line for line in (tmp_path / "a" / "train.log").read_text().splitlines() if "cannot continue" in line
    ]
    assert len(named) == 1 and "WARNING" in named[0] and "train_data (DataLoader)" in named[0]
    # at the start, before the first step: the run's first line
    assert "cannot continue" in (tmp_path / "a" / "train.log").read_text().splitlines()[0]
    for kw in ({"allow_inexact_resume": True}, {}):
        data_ok = shuffled if kw else (lambda epoch, start=0: [(X32[:8], Y32[:8])])
        loop.fit(st, train_step, data_ok, epochs=1, run_dir=tmp_path / f"b{len(kw)}", **kw)
        assert "cannot continue" not in (tmp_path / f"b{len(kw)}" / "train.log").read_text()


# -- 4. the loss as a function of the parameters ----------------------------------------------


def flat_hessian(f, p) -> torch.Tensor:
    """The full Hessian of `f` over the flattened parameters `[n, n]`."""
    names = list(p)
    sizes = [p[k].numel() for k in names]

    def of_flat(v):
        parts = torch.split(v, sizes)
        return f({k: t.reshape(p[k].shape) for k, t in zip(names, parts, strict=True)})

    return torch.func.hessian(of_flat)(torch.cat([p[k].reshape(-1) for k in names]))


def lanczos_top(hvp, p, steps: int, tol: float) -> tuple[float, float]:
    """The largest eigenvalue of the symmetric operator `hvp` by Lanczos with full
    reorthogonalisation: (the top Ritz value, its residual bound |beta_m * s_m|)."""
    names = list(p)
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in names])
    sizes = [p[k].numel() for k in names]
    unflat = lambda v: {k: t.reshape(p[k].shape) for k, t in zip(names, torch.split(v, sizes), strict=True)}
    q = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    qs, alphas, betas = [q / q.norm()], [], []
    for _ in range(steps):
        w = flat(hvp(unflat(qs[-1])))
        alphas.append(float(w @ qs[-1]))
        for qi in qs:  # full reorthogonalisation (twice is enough)
            w = w - (w @ qi) * qi
        for qi in qs:
            w = w - (w @ qi) * qi
        beta = float(w.norm())
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        for i, b in enumerate(betas):
            t[i, i + 1] = t[i + 1, i] = b
        evals, evecs = torch.linalg.eigh(t)
        residual = abs(beta * float(evecs[-1, -1]))
        if residual < tol or beta < 1e-14:
            return float(evals[-1]), residual
        betas.append(beta)
        qs.append(w / beta)
    return float(evals[-1]), residual


JVP_WARNING = "ignore:`torch.jit.script` is deprecated:FutureWarning"  # torch's jvp decompositions load


@pytest.mark.filterwarnings(JVP_WARNING)
def test_loss_fn_hvp_and_top_eigenvalue_against_finite_differences_and_eigvalsh():
    p, batch, v = mlp_params(), data(32), mlp_params(seed=4)
    f = ff.loss_fn(mlp, preprocess=None)
    torch.testing.assert_close(f(p, batch), F.cross_entropy(mlp(p, batch[0]), batch[1]))

    def hvp(u):
        return torch.func.jvp(torch.func.grad(lambda q: f(q, batch)), (p,), (u,))[1]

    got = hvp(v)
    fd = directional_fd(
        lambda q: torch.cat([g.reshape(-1) for g in torch.func.grad(f)(q, batch).values()]), p, v
    )
    want = dict(zip(p, torch.split(fd, [t.numel() for t in p.values()]), strict=True))
    for k in p:
        torch.testing.assert_close(got[k], want[k].reshape(p[k].shape), rtol=1e-6, atol=1e-9)

    full = flat_hessian(lambda q: f(q, batch), p)
    top = float(torch.linalg.eigvalsh(full)[-1])
    tol = 1e-9
    value, residual = lanczos_top(hvp, p, steps=full.shape[0], tol=tol)
    assert residual < tol
    assert value == pytest.approx(top, rel=1e-8, abs=tol)


def test_loss_fn_composes_with_vmap_and_equals_the_train_steps_loss():
    p = mlp_params(torch.float32)
    x, y = data(24, torch.float32)
    f = ff.loss_fn(mlp, preprocess=None)
    stacked = (x.reshape(3, 8, D), y.reshape(3, 8))
    per_batch = torch.func.vmap(f, in_dims=(None, 0))(p, stacked)
    torch.testing.assert_close(per_batch, torch.stack([f(p, (x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8]))
                                                         for i in range(3)]))  # fmt: skip
    tx = optim.sgd(0.1)
    st = state_lib.create(p, tx)
    _, m = step.make_train_step(mlp, tx, preprocess=None, compile=False)(st, (x, y))
    key = nn.fold_in(st.rng, st.step)
    ft = ff.loss_fn(mlp, preprocess=None, train=True)
    torch.testing.assert_close(ft(p, (x, y), key=key), m["loss_sum"] / m["count"])


def test_loss_fn_of_a_stateful_model_returns_its_state():
    def scaled(p, x, *, train, key, state):
        new = {"n": state["n"] + 1} if train else state
        return x @ p["w"] * state["scale"], {**state, **new}

    p = {"w": torch.randn(D, C, dtype=torch.float64)}
    ms = {"scale": torch.tensor(2.0, dtype=torch.float64), "n": torch.tensor(0.0, dtype=torch.float64)}
    batch = data(8)
    f = step.loss_fn(scaled, preprocess=None, train=True)
    g, new = torch.func.grad(f, has_aux=True)(p, batch, ms)
    assert float(new["n"]) == 1.0
    want = torch.func.grad(lambda q: F.cross_entropy(2 * batch[0] @ q["w"], batch[1]))(p)
    torch.testing.assert_close(g["w"], want["w"])
    with pytest.raises(ValueError, match="is stateful: pass its model_state"):
        f(p, batch, {})


@pytest.mark.filterwarnings(JVP_WARNING)
def test_hvp_equals_jax_on_the_flax_module():
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    import jax.numpy as jnp
    import optax

    model = models.mlp(D_in=D, H=H, D_out=C)
    p = model.init(torch.Generator().manual_seed(0))
    v = model.init(torch.Generator().manual_seed(1))
    x, y = data(16, torch.float32)
    f = ff.loss_fn(model, preprocess=None)
    ours = torch.func.jvp(torch.func.grad(lambda q: f(q, (x, y))), (p,), (v,))[1]

    module = interop.flax_module("mlp", D_in=D, H=H, D_out=C)
    variables = interop.flax_variables(interop.to_flax(p, model="mlp"))
    tangent = interop.flax_variables(interop.to_flax(v, model="mlp"))
    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

    def loss(params):
        logits = module.apply({"params": params}, xj, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yj).mean()

    _, theirs = jax.jvp(jax.grad(loss), (variables["params"],), (tangent["params"],))
    ours_flax = interop.flax_variables(interop.to_flax(ours, model="mlp"))["params"]
    for layer, leaves in theirs.items():
        for name, value in leaves.items():
            np.testing.assert_allclose(np.asarray(value), ours_flax[layer][name], rtol=1e-4, atol=1e-6)


# -- 5. per-example gradients in bounded memory -----------------------------------------------


def test_chunked_per_example_grads_and_streamed_norms_equal_the_unchunked():
    p, (x, y) = mlp_params(), data(21)
    whole = step.per_example_grads(mlp, p, (x, y), preprocess=None, chunk_size=21)
    chunked = ff.per_example_grads(mlp, p, (x, y), preprocess=None, chunk_size=4)
    for k in p:  # the same per-example computations, vmapped over other batch sizes
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-12, atol=1e-14)
    # each example's gradient, against a plain loop
    one = torch.func.grad(lambda q, i: F.cross_entropy(mlp(q, x[i : i + 1]), y[i : i + 1]))(p, 5)
    for k in p:
        torch.testing.assert_close(whole[k][5], one[k], rtol=1e-12, atol=1e-14)
    norms = ff.per_example_grad_norms(whole)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    for source in (batches, DataLoader(TensorDataset(x, y), batch_size=10), (x, y)):
        streamed = ff.streamed_grad_norms(mlp, p, source, preprocess=None, chunk_size=3)
        torch.testing.assert_close(streamed, norms, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        step.per_example_grads(mlp, p, (x, y), preprocess=None, chunk_size=0)


# -- 6. small ------------------------------------------------------------------------------------


def test_step_is_an_attribute_and_load_train_state_is_the_old_load_for_optax():
    assert ff.step is step and "step" in ff.__all__
    assert interop.load_train_state is interop.load_for_optax
