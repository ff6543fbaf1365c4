"""`fashion_func.fit` driven by research code: lists, DataLoaders and callables of float batches,
library callbacks, exact resume in a run directory, and the lazy public surface."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fashion_func
from fashion_func import callbacks, data, loop, losses, models, optim, step, tree
from fashion_func import state as state_lib

REPO = Path(__file__).resolve().parents[1]
# simplenet_bn runs for the resume tests: 3 batches per epoch. 384 examples in batches of 128
# measured about 2 s a step on the shared 2-core test machine (25 s per 4-epoch run); a
# quarter of each keeps the same 3-batch epochs and the same code paths.
BN_LIMIT, BN_BATCH = 96, 32


def _float_batches(seed: int, n_batches: int = 3, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(n, 1, 28, 28, generator=g)
        out.append((x, torch.randint(0, 10, (n,), generator=g)))
    return out


def _mlp_state(tx=None):
    model = models.get("mlp")
    tx = tx or optim.sgd(0.05, momentum=0.9)
    return model, tx, state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=1)


def _assert_tree_equal(a, b) -> None:
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def _by_hand(st, train_step, batches_of_epoch, epochs):
    """The same steps `fit` should take, run in a plain loop; (state, per-epoch metric sums)."""
    sums = []
    for epoch in range(1, epochs + 1):
        total: dict[str, torch.Tensor] = {}
        for batch in batches_of_epoch(epoch):
            st, m = train_step(st, batch)
            total = {k: total[k] + v if k in total else v for k, v in m.items()}
        sums.append({k: float(v.double()) for k, v in total.items()})
    return st, sums


def _check_history(history, sums, *, val: bool) -> None:
    assert [r["epoch"] for r in history] == list(range(1, len(sums) + 1))
    for rec, s in zip(history, sums, strict=True):
        expected = {"epoch", "train_loss", "train_acc", "lr", "epoch_time_s"}
        if val:
            expected |= {"val_loss", "val_acc", "val_top5"}
        assert set(rec) == expected
        assert rec["train_loss"] == pytest.approx(s["loss_sum"] / s["count"], rel=1e-6)
        assert rec["train_acc"] == pytest.approx(s["correct"] / s["count"], rel=1e-12)


# -- 6. fit over user data -----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["list", "dataloader", "callable"])
def test_fit_over_user_batches_equals_calling_the_step_in_a_loop(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tx, st = _mlp_state()
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    eval_step = step.make_eval_step(model, preprocess=None, compile=False)
    fixed = _float_batches(0)
    val = _float_batches(99, n_batches=2, n=8)

    if source == "list":
        train_data, of_epoch = fixed, lambda epoch: fixed
    elif source == "dataloader":
        xs = torch.cat([x for x, _ in fixed])
        ys = torch.cat([y for _, y in fixed])
        train_data = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=False)
        of_epoch = lambda epoch: fixed  # the loader yields the same 16-example slices

    else:  # a function of the epoch: other batches each epoch

        def train_data(epoch):
            return _float_batches(epoch, n_batches=2 + epoch % 2)

        of_epoch = train_data

    result = fashion_func.fit(st, train_step, train_data, epochs=3, eval_step=eval_step, val_data=val)
    expect, sums = _by_hand(st, train_step, of_epoch, 3)

    assert isinstance(result, fashion_func.FitResult)
    assert result.epochs_run == 3 and result.stop_reason == "completed" and result.out_dir is None
    _assert_tree_equal(result.state.params, expect.params)
    _assert_tree_equal(result.state.opt_state, expect.opt_state)
    assert int(result.state.step) == int(expect.step) == sum(len(list(of_epoch(e))) for e in (1, 2, 3))
    _check_history(result.history, sums, val=True)
    assert all(r["lr"] == 0.05 for r in result.history)

    # the last epoch's validation metrics are those of the final state
    out = [eval_step(expect, b) for b in val]
    n = sum(o["loss"].shape[0] for o in out)
    last = result.history[-1]
    assert last["val_loss"] == pytest.approx(sum(float(o["loss"].double().sum()) for o in out) / n, rel=1e-9)
    assert last["val_acc"] == pytest.approx(sum(int(o["correct"].sum()) for o in out) / n)
    assert last["val_top5"] == pytest.approx(sum(int(o["top5_correct"].sum()) for o in out) / n)

    assert list(tmp_path.iterdir()) == []  # run_dir=None writes nothing


def test_fit_without_eval_step_has_only_train_metrics_and_leaves_its_input_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tx, st = _mlp_state()
    before = tree.map(lambda t: t.clone(), st)
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    batches = _float_batches(3, n_batches=2)
    result = fashion_func.fit(st, train_step, batches, epochs=2)
    _, sums = _by_hand(st, train_step, lambda e: batches, 2)
    _check_history(result.history, sums, val=False)
    _assert_tree_equal(st, before)
    assert list(tmp_path.iterdir()) == []


def test_fit_on_a_regression_reports_loss_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(2, 5, generator=g), "b": torch.zeros(2)}

    def linear(p, x):
        return x @ p["w"].T + p["b"]

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        return [(torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(2)]

    tx = optim.sgd(0.1)
    st = state_lib.create(params, tx)
    train_step = step.make_train_step(linear, tx, loss=losses.mse_per_example, preprocess=None, compile=False)
    eval_step = step.make_eval_step(linear, loss=losses.mse_per_example, preprocess=None, compile=False)
    train, val = batches(0), batches(1)
    result = fashion_func.fit(st, train_step, train, epochs=2, eval_step=eval_step, val_data=val)
    expect, sums = _by_hand(st, train_step, lambda e: train, 2)
    _assert_tree_equal(result.state.params, expect.params)
    for rec, s in zip(result.history, sums, strict=True):
        assert set(rec) == {"epoch", "train_loss", "val_loss", "lr", "epoch_time_s"}
        assert rec["train_loss"] == pytest.approx(s["loss_sum"] / s["count"], rel=1e-6)
    val_loss = torch.cat([((linear(expect.params, x) - t) ** 2).mean(-1) for x, t in val]).double().mean()
    assert result.history[-1]["val_loss"] == pytest.approx(float(val_loss), rel=1e-6)
    assert list(tmp_path.iterdir()) == []


# -- 7. library callbacks ------------------------------------------------------------------------


def _lr_recording(train_step, seen):
    def recording_step(st, batch):
        seen.append(float(optim.get_hyperparam(st.opt_state, "lr")))
        return train_step(st, batch)

    return recording_step


def test_step_lr_callback_halves_the_lr_each_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tx, st = _mlp_state(optim.sgd(0.1))
    seen: list[float] = []
    train_step = _lr_recording(step.make_train_step(model, tx, preprocess=None, compile=False), seen)
    batches = _float_batches(4, n_batches=2)
    result = fashion_func.fit(
        st, train_step, batches, epochs=3, callbacks=[callbacks.StepLR(base_lr=0.1, step_size=1, gamma=0.5)]
    )
    assert [r["lr"] for r in result.history] == pytest.approx([0.1, 0.05, 0.025], rel=1e-12)
    # the lr each step actually ran with (float32 in the optimizer state)
    assert seen == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-7)
    # after the last epoch the state holds the lr of the epoch that would come next
    final_lr = optim.get_hyperparam(result.state.opt_state, "lr")
    assert final_lr.dtype == torch.float32
    assert float(final_lr) == pytest.approx(0.0125, rel=1e-7)
    assert list(tmp_path.iterdir()) == []


def test_early_stopping_on_train_loss_in_max_mode_stops_after_epoch_two(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tx, st = _mlp_state()
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    batches = _float_batches(5, n_batches=2)
    stopper = callbacks.EarlyStopping(monitor="train_loss", mode="max", patience=1)
    result = fashion_func.fit(st, train_step, batches, epochs=5, callbacks=[stopper])
    assert len(result.history) == 2 and result.epochs_run == 2
    # training lowers the loss, which in "max" mode is no improvement
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert "did not improve" in result.stop_reason and "train_loss" in result.stop_reason
    assert int(result.state.step) == 4
    expect, _ = _by_hand(st, train_step, lambda e: batches, 2)
    _assert_tree_equal(result.state.params, expect.params)


def test_early_stopping_patience_two_waits_one_epoch_more(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tx, st = _mlp_state()
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    batches = _float_batches(5, n_batches=2)
    stopper = callbacks.EarlyStopping(monitor="train_loss", mode="max", patience=2)
    result = fashion_func.fit(st, train_step, batches, epochs=5, callbacks=[stopper])
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]


# -- 8. resume in a run directory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_setup():
    model = models.get("simplenet_bn")
    tx = optim.adam(1e-3)
    train_step = step.make_train_step(model, tx, compile=False)
    train = data.EpochBatches(data.load("train", limit=BN_LIMIT), BN_BATCH, seed=0)

    def fresh():
        params = model.init(torch.Generator().manual_seed(0))
        return state_lib.create(params, tx, seed=0, model_state=model.init_state())

    return fresh, train_step, train


@pytest.fixture(scope="module")
def straight(bn_setup, tmp_path_factory):
    fresh, train_step, train = bn_setup
    out = tmp_path_factory.mktemp("straight") / "a"
    return out, fashion_func.fit(fresh(), train_step, train, epochs=4, run_dir=out)


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _assert_same_run(a, b) -> None:
    _assert_tree_equal(a.state.params, b.state.params)
    _assert_tree_equal(a.state.opt_state, b.state.opt_state)
    _assert_tree_equal(a.state.model_state, b.state.model_state)
    assert int(a.state.step) == int(b.state.step)
    assert int(a.state.rng) == int(b.state.rng)
    drop = lambda h: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h]
    assert drop(a.history) == drop(b.history)


def test_straight_run_writes_only_the_last_checkpoint_and_the_log(straight):
    out, result = straight
    assert result.out_dir == out and result.epochs_run == 4 and result.stop_reason == "completed"
    assert int(result.state.step) == 12
    assert int(result.state.model_state["bn1.num_batches_tracked"]) == 12
    assert _files(out) == {"checkpoints/last.safetensors", "train.log"}
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert all({"train_loss", "train_acc", "lr", "epoch_time_s"} <= set(r) for r in result.history)


def test_resume_at_an_epoch_boundary_is_bitwise_exact(bn_setup, straight, tmp_path):
    fresh, train_step, train = bn_setup
    _, a = straight
    out = tmp_path / "b"
    first = fashion_func.fit(fresh(), train_step, train, epochs=2, run_dir=out)
    assert first.epochs_run == 2 and int(first.state.step) == 6
    resumed = fashion_func.fit(fresh(), train_step, train, epochs=4, run_dir=out, resume="auto")
    assert resumed.epochs_run == 2
    _assert_same_run(a, resumed)
    assert _files(out) == {"checkpoints/last.safetensors", "train.log"}
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "step 6" in log


def test_max_steps_cut_inside_an_epoch_then_resume_is_bitwise_exact(bn_setup, straight, tmp_path):
    fresh, train_step, train = bn_setup
    _, a = straight
    out = tmp_path / "c"
    cut = fashion_func.fit(fresh(), train_step, train, epochs=4, run_dir=out, max_steps=5)
    assert int(cut.state.step) == 5  # epoch 2, after its second of three batches
    assert cut.stop_reason == "max_steps 5 reached"
    assert [r["epoch"] for r in cut.history] == [1]
    resumed = fashion_func.fit(fresh(), train_step, train, epochs=4, run_dir=out, resume="auto")
    _assert_same_run(a, resumed)
    assert _files(out) == {"checkpoints/last.safetensors", "train.log"}
    assert "batch 2" in (out / "train.log").read_text()


@pytest.mark.parametrize("source", ["list", "dataloader"])
@pytest.mark.parametrize("max_steps", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_max_steps_cut_then_resume_over_user_batches_is_bitwise_exact(source, max_steps, tmp_path):
    model, tx, _ = _mlp_state()
    fresh = lambda: _mlp_state()[2]
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    eval_step = step.make_eval_step(model, preprocess=None, compile=False)
    fixed = _float_batches(6)  # 3 batches per epoch
    if source == "list":
        train = fixed
    else:
        xs, ys = torch.cat([x for x, _ in fixed]), torch.cat([y for _, y in fixed])
        train = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=False)
    val = _float_batches(98, n_batches=1)
    kw = {"eval_step": eval_step, "val_data": val, "epochs": 3}
    straight = fashion_func.fit(fresh(), train_step, train, run_dir=tmp_path / "a", **kw)
    cut = fashion_func.fit(fresh(), train_step, train, run_dir=tmp_path / "b", max_steps=max_steps, **kw)
    assert int(cut.state.step) == max_steps
    assert cut.stop_reason == f"max_steps {max_steps} reached"
    # neither a list nor a DataLoader gives a position: allowed, the seen batches are drawn again
    # and dropped, exact here as the order repeats (unshuffled)
    resumed = fashion_func.fit(
        fresh(), train_step, train, run_dir=tmp_path / "b", resume="auto", allow_inexact_resume=True, **kw
    )
    _assert_same_run(straight, resumed)


@pytest.mark.parametrize("start_at", [0, 4], ids=["max_steps-0", "rerun-of-a-cut-run"])
def test_max_steps_already_reached_takes_no_step(start_at, tmp_path):
    model, tx, st = _mlp_state()
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    batches = _float_batches(6)
    out = tmp_path / "run"
    if start_at:  # a run cut at step 4, then the same command again (resume, same max_steps)
        fashion_func.fit(st, train_step, batches, epochs=3, run_dir=out, max_steps=start_at)
        again = fashion_func.fit(
            st, train_step, batches, epochs=3, run_dir=out, resume="auto", max_steps=start_at
        )
    else:
        again = fashion_func.fit(st, train_step, batches, epochs=3, max_steps=0)
    assert int(again.state.step) == start_at


def test_max_steps_at_the_end_of_an_epoch_still_ends_that_epoch():
    model, tx, st = _mlp_state()
    train_step = step.make_train_step(model, tx, preprocess=None, compile=False)
    eval_step = step.make_eval_step(model, preprocess=None, compile=False)
    batches = _float_batches(6)  # 3 batches per epoch: step 6 ends epoch 2
    result = fashion_func.fit(
        st, train_step, batches, epochs=3, max_steps=6, eval_step=eval_step, val_data=_float_batches(98, 1)
    )
    assert int(result.state.step) == 6
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.epochs_run == 2 and "val_loss" in result.history[-1]


# -- 9. the public surface -----------------------------------------------------------------------


def test_every_public_name_resolves():
    for name in fashion_func.__all__:
        assert getattr(fashion_func, name) is not None, name
    assert set(fashion_func.__all__) <= set(dir(fashion_func))
    assert fashion_func.fit is loop.fit
    assert fashion_func.make_train_step is step.make_train_step
    assert fashion_func.per_example_grads is step.per_example_grads
    with pytest.raises(AttributeError):
        fashion_func.no_such_name  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, fashion_func; print('torch' in sys.modules)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False", out.stderr
