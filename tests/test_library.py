"""`fashion_func` as a library driven by research code: `ff.fit` over lists, DataLoaders and
callables, equal to calling the step by hand; callbacks; a run directory and exact resume of a
stateful model; the lazy public surface.

Each run is small (the mlp on a few random float batches, or simplenet_bn on 32 training
images in batches of 16, eager on the CPU). What is compared is exact where the same
operations run in the same order: parameters bitwise, history values equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fashion_func as ff
from fashion_func import checkpoint, data, loop, optim, step, tree

# -- helpers -----------------------------------------------------------------------------------


def _float_batches(seed: int, count: int, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
        for _ in range(count)
    ]


def _mlp(lr: float = 1e-3, seed: int = 0):
    model = ff.models.get("mlp")
    tx = ff.optim.adam(lr)
    st = ff.state.create(model.init(torch.Generator().manual_seed(seed)), tx, seed=seed)
    train_step = ff.make_train_step(model, tx, preprocess=None, compile=False)
    eval_step = ff.make_eval_step(model, preprocess=None, compile=False)
    return st, train_step, eval_step


def _assert_tree_equal(a, b) -> None:
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def _without_clock(history):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]


def _manual_epoch(state, train_step, batches):
    """One epoch by hand: the step over `batches`, its metrics summed as tensors."""
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        state, m = train_step(state, batch)
        sums = {k: sums[k] + v if k in sums else v for k, v in m.items()}
    count = int(sums["count"])
    record = {"train_loss": float(sums["loss_sum"].double()) / count}
    if "correct" in sums:
        record["train_acc"] = int(sums["correct"]) / count
    return state, record


def _manual_eval(state, eval_step, batches):
    outs = [eval_step(state, b) for b in batches]
    cat = {k: torch.cat([o[k] for o in outs]).double() for k in ("loss", "correct", "top5_correct")}
    return {
        "val_loss": float(cat["loss"].mean()),
        "val_acc": float(cat["correct"].mean()),
        "val_top5": float(cat["top5_correct"].mean()),
    }


def _assert_records_match(history, manual) -> None:
    assert [r["epoch"] for r in history] == [r["epoch"] for r in manual]
    for got, want in zip(history, manual, strict=True):
        assert list(got) == [*want, "lr", "epoch_time_s"]  # the order fit writes them
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (got["epoch"], k)
        assert got["lr"] == 1e-3 and got["epoch_time_s"] > 0


# -- 6. fit over the user's data, equal to a hand loop ---------------------------------------------


def test_fit_over_a_list_of_float_batches_equals_calling_the_step_in_a_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val = _float_batches(0, 3), _float_batches(1, 2)
    st, train_step, eval_step = _mlp()
    given = tree.map(torch.clone, st)

    result = ff.fit(st, train_step, train, epochs=3, eval_step=eval_step, val_data=val)

    assert isinstance(result, ff.FitResult)
    assert result.epochs_run == 3 and result.stop_reason == "completed" and result.out_dir is None
    manual, s = [], st
    for epoch in (1, 2, 3):
        s, record = _manual_epoch(s, train_step, train)
        manual.append({"epoch": epoch, **record, **_manual_eval(s, eval_step, val)})
    _assert_records_match(result.history, manual)
    _assert_tree_equal(result.state, s)
    assert int(result.state.step) == 9
    _assert_tree_equal(st, given)  # fit leaves its input state alone
    assert list(tmp_path.iterdir()) == []


def test_fit_over_a_dataloader_of_float_images_equals_a_loop_over_the_same_loader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(80, 1, 28, 28, generator=g), torch.randint(0, 10, (80,), generator=g)
    dataset = TensorDataset(images, labels)

    def loader(seed: int) -> DataLoader:  # shuffled: a new order each epoch, from its own generator
        return DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))

    val_loader = DataLoader(TensorDataset(images[:40], labels[:40]), batch_size=16)
    st, train_step, eval_step = _mlp()
    result = ff.fit(st, train_step, loader(7), epochs=2, eval_step=eval_step, val_data=val_loader)

    manual, s, same = [], st, loader(7)
    for epoch in (1, 2):
        s, record = _manual_epoch(s, train_step, same)  # iterating the loader again reshuffles
        manual.append({"epoch": epoch, **record, **_manual_eval(s, eval_step, val_loader)})
    _assert_records_match(result.history, manual)
    _assert_tree_equal(result.state, s)
    assert int(result.state.step) == 6  # 3 batches (32, 32, 16) per epoch
    assert list(tmp_path.iterdir()) == []


def test_fit_over_a_callable_gets_each_epoch_number(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pool = _float_batches(3, 4)
    asked: list[int] = []

    def train_data(epoch: int):  # a different selection of batches each epoch
        asked.append(epoch)
        return [pool[(epoch + i) % 4] for i in range(2 + epoch % 2)]

    val = _float_batches(4, 1)
    st, train_step, eval_step = _mlp()
    result = ff.fit(st, train_step, train_data, epochs=3, eval_step=eval_step, val_data=lambda epoch: val)

    assert asked == [1, 2, 3]
    manual, s = [], st
    for epoch in (1, 2, 3):
        s, record = _manual_epoch(s, train_step, [pool[(epoch + i) % 4] for i in range(2 + epoch % 2)])
        manual.append({"epoch": epoch, **record, **_manual_eval(s, eval_step, val)})
    _assert_records_match(result.history, manual)
    _assert_tree_equal(result.state, s)
    assert int(result.state.step) == 3 + 2 + 3
    assert list(tmp_path.iterdir()) == []


def test_fit_of_a_regression_reports_the_loss_and_no_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(2, 4, generator=g) * 0.1, "b": torch.zeros(2)}
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(2)]
    linear = lambda p, x: x @ p["w"].T + p["b"]  # a plain function as the model
    tx = optim.sgd(0.1)
    train_step = ff.make_train_step(
        linear, tx, loss=ff.losses.mse_per_example, preprocess=None, compile=False
    )
    eval_step = ff.make_eval_step(linear, loss=ff.losses.mse_per_example, preprocess=None, compile=False)
    st = ff.state.create(params, tx)
    result = ff.fit(st, train_step, batches, epochs=2, eval_step=eval_step, val_data=batches)

    s = st
    for record in result.history:
        s, manual = _manual_epoch(s, train_step, batches)
        assert set(record) == {"epoch", "train_loss", "val_loss", "lr", "epoch_time_s"}
        assert record["train_loss"] == pytest.approx(manual["train_loss"], rel=1e-12)
        want = torch.cat([((linear(s.params, x) - t) ** 2).mean(-1) for x, t in batches]).double().mean()
        assert record["val_loss"] == pytest.approx(float(want), rel=1e-6)
    _assert_tree_equal(result.state, s)


def test_fit_without_a_run_dir_writes_nothing_whatever_the_callbacks(tmp_path, monkeypatch):
    st, train_step, eval_step = _mlp()
    # torch's first torch.func.grad imports dynamo, which makes its own cache directory in the temp
    # dir; one step first, so that what is checked below is what fit itself writes
    train_step(st, _float_batches(6, 1)[0])
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    callbacks = [
        ff.callbacks.TrainingMonitor(),  # would write history.json and the plots
        ff.callbacks.ModelCheckpoint(monitor="val_loss", save_best_only=False, save_top_k=-1),
        ff.callbacks.TensorBoardLogger(),
        ff.callbacks.LogEpoch(),
    ]
    result = ff.fit(st, train_step, _float_batches(6, 2), epochs=2, eval_step=eval_step,
                    val_data=_float_batches(7, 1), callbacks=callbacks)  # fmt: skip
    assert result.epochs_run == 2 and result.out_dir is None
    assert result.best is not None and result.best["path"] is None  # decided, not written
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["temp", "work"]


@pytest.mark.parametrize("kind", ["iterator", "empty"])
def test_fit_refuses_data_that_gives_an_epoch_no_batches(kind):
    st, train_step, _ = _mlp()
    source = iter(_float_batches(8, 2)) if kind == "iterator" else []
    with pytest.raises((TypeError, ValueError)):
        ff.fit(st, train_step, source, epochs=2)


# -- 7. library callbacks change what fit does -----------------------------------------------------


def test_step_lr_sets_the_lr_each_epoch_like_torch_step_lr():
    train = _float_batches(9, 2)
    st, train_step, _ = _mlp(lr=1e-2)
    cb = ff.callbacks.StepLR(base_lr=1e-2, step_size=2, gamma=0.5)
    result = ff.fit(st, train_step, train, epochs=5, callbacks=[cb])

    # torch's scheduler, stepped once per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    expected = []
    for _ in range(5):
        expected.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in result.history] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in result.history] == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3]
    # no eval_step: the train metrics only
    assert all(set(r) == {"epoch", "train_loss", "train_acc", "lr", "epoch_time_s"} for r in result.history)

    # and the steps really ran with those rates
    s = st
    for lr in expected:
        s = s.replace(opt_state=optim.set_hyperparam(s.opt_state, "lr", lr))
        s, _ = _manual_epoch(s, train_step, train)
    _assert_tree_equal(result.state.params, s.params)
    _assert_tree_equal(result.state.opt_state[1], s.opt_state[1])  # Adam's moments
    # at the last EpochEnd StepLR already set the lr of the epoch that would come next
    final_lr = optim.get_hyperparam(result.state.opt_state, "lr")
    assert final_lr.dtype == torch.float32 and float(final_lr) == pytest.approx(cb.lr_at(6), rel=1e-6)
    assert cb.lr_at(6) == 2.5e-3 and cb.lr_at(7) == 1.25e-3


def _scripted_eval(values: list[float]):
    """An eval step whose validation loss follows a script, one value per evaluation."""
    calls = iter(values)

    def eval_step(state, batch):
        return {"loss": torch.full((4,), next(calls), dtype=torch.float64)}

    return eval_step


@pytest.mark.parametrize(
    "patience, script, stop_after",
    [(1, [1.0, 0.5, 0.7, 0.4, 0.3], 3), (2, [1.0, 0.5, 0.7, 0.4, 0.6, 0.65, 0.1], 6)],
)
def test_early_stopping_stops_on_a_scripted_val_loss(patience, script, stop_after):
    train = _float_batches(10, 2)
    st, train_step, _ = _mlp()
    cb = ff.callbacks.EarlyStopping(monitor="val_loss", patience=patience)
    result = ff.fit(st, train_step, train, epochs=len(script), eval_step=_scripted_eval(script),
                    val_data=[None], callbacks=[cb])  # fmt: skip

    assert result.epochs_run == stop_after
    assert [r["val_loss"] for r in result.history] == script[:stop_after]
    assert "val_loss" in result.stop_reason and "did not improve" in result.stop_reason
    s = st
    for _ in range(stop_after):
        s, _ = _manual_epoch(s, train_step, train)
    _assert_tree_equal(result.state, s)


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_on_the_train_loss_in_max_mode_waits_patience_epochs(patience):
    train = _float_batches(5, 2)
    st, train_step, _ = _mlp()
    stopper = ff.callbacks.EarlyStopping(monitor="train_loss", mode="max", patience=patience)
    result = ff.fit(st, train_step, train, epochs=5, callbacks=[stopper])
    # training lowers the loss, which in "max" mode is no improvement
    losses = [r["train_loss"] for r in result.history]
    assert result.epochs_run == len(losses) == 1 + patience
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == len(losses)
    assert "did not improve" in result.stop_reason and "train_loss" in result.stop_reason
    s = st
    for _ in range(1 + patience):
        s, _ = _manual_epoch(s, train_step, train)
    _assert_tree_equal(result.state, s)


# -- 8. run directory and exact resume of a stateful model ----------------------------------------

# simplenet_bn eager on a shared 2-core CPU takes ~0.6 s per step (mostly the eager Adam update of
# 1.2M parameters, whatever the batch size): 32 examples in batches of 16 keep a 4-epoch run (8
# steps) near 5 s; the 512 / 128 of a full-size check would take ~30 s per run
BN_LIMIT, BN_BATCH = 32, 16


@pytest.fixture(scope="module")
def bn_setup():
    model = ff.models.get("simplenet_bn")
    tx = ff.optim.adam(1e-3)
    train_step = ff.make_train_step(model, tx, compile=False)
    eval_step = ff.make_eval_step(model, compile=False)
    train = data.EpochBatches(data.load("train", limit=BN_LIMIT), BN_BATCH, seed=0)
    val = data.EpochBatches(data.load("test", limit=32), 32, shuffle=False)

    def fresh():
        params = model.init(torch.Generator().manual_seed(0))
        return ff.state.create(params, tx, seed=0, model_state=model.init_state())

    def run(out, epochs, **kw):
        # StepLR and EarlyStopping keep state that a resume has to restore
        callbacks = [
            ff.callbacks.TrainingMonitor(),
            ff.callbacks.StepLR(base_lr=1e-3, step_size=2, gamma=0.5),
            ff.callbacks.EarlyStopping(monitor="val_loss", patience=10),
        ]
        return ff.fit(fresh(), train_step, train, epochs=epochs, eval_step=eval_step, val_data=val,
                      callbacks=callbacks, run_dir=out, **kw)  # fmt: skip

    return fresh, run


@pytest.fixture(scope="module")
def straight(bn_setup, tmp_path_factory):
    _, run = bn_setup
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, run(out, 4)


def _assert_same_run(a, b) -> None:
    _assert_tree_equal(a.state.params, b.state.params)
    _assert_tree_equal(a.state.opt_state, b.state.opt_state)
    _assert_tree_equal(a.state.model_state, b.state.model_state)
    assert int(a.state.step) == int(b.state.step) and int(a.state.rng) == int(b.state.rng)
    assert _without_clock(a.history) == _without_clock(b.history)


def test_a_run_dir_holds_the_log_the_history_and_the_last_checkpoint(bn_setup, straight):
    fresh, _ = bn_setup
    out, result = straight
    assert result.out_dir == out and result.epochs_run == 4 and result.stop_reason == "completed"
    assert (out / "train.log").is_file() and (out / "checkpoints" / "last.safetensors").is_file()
    assert json.loads((out / "history.json").read_text()) == result.history
    assert [r["lr"] for r in result.history] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert int(result.state.step) == 8
    assert int(result.state.model_state["bn2.num_batches_tracked"]) == 8
    # last.safetensors is the final state, buffers included
    saved, meta = checkpoint.load_state(out / "checkpoints" / "last.safetensors", fresh())
    _assert_tree_equal(saved, result.state)
    assert meta["epoch"] == 4 and _without_clock(meta["history"]) == _without_clock(result.history)


def test_two_plus_two_epochs_resumed_equal_four_straight_bitwise(bn_setup, straight, tmp_path):
    _, run = bn_setup
    _, four = straight
    out = tmp_path / "run"
    first = run(out, 2)
    assert first.epochs_run == 2 and int(first.state.step) == 4
    assert _without_clock(first.history) == _without_clock(four.history[:2])
    second = run(out, 4, resume="auto")
    assert second.epochs_run == 2
    _assert_same_run(second, four)
    assert json.loads((out / "history.json").read_text()) == second.history
    assert "resumed from" in (out / "train.log").read_text()


def test_a_max_steps_cut_inside_an_epoch_then_resume_equals_straight_bitwise(bn_setup, straight, tmp_path):
    _, run = bn_setup
    _, four = straight
    out = tmp_path / "run"
    cut = run(out, 4, max_steps=3)  # epoch 2, after the first of its two batches
    assert int(cut.state.step) == 3 and cut.stop_reason == "max_steps 3 reached"
    assert [r["epoch"] for r in cut.history] == [1]
    resumed = run(out, 4, resume="auto")
    _assert_same_run(resumed, four)
    assert "batch 1" in (out / "train.log").read_text()


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize("source", ["list", "dataloader"])
@pytest.mark.parametrize("max_steps", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_max_steps_cut_then_resume_over_user_batches_is_bitwise_exact(source, max_steps, tmp_path):
    fixed = _float_batches(6, 3, n=16)  # 3 batches per epoch
    if source == "list":
        train = fixed
    else:
        xs, ys = torch.cat([x for x, _ in fixed]), torch.cat([y for _, y in fixed])
        train = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=False)
    _, train_step, eval_step = _mlp()
    kw = {"eval_step": eval_step, "val_data": _float_batches(98, 1, n=16), "epochs": 3}
    straight = ff.fit(_mlp()[0], train_step, train, run_dir=tmp_path / "a", **kw)
    assert _files(tmp_path / "a") == {"checkpoints/last.safetensors", "train.log"}  # no callbacks
    cut = ff.fit(_mlp()[0], train_step, train, run_dir=tmp_path / "b", max_steps=max_steps, **kw)
    assert int(cut.state.step) == max_steps
    assert cut.stop_reason == f"max_steps {max_steps} reached"
    # neither a list nor a DataLoader gives a position: allowed, the seen batches are drawn again
    # and dropped, exact here as the order repeats (unshuffled)
    resumed = ff.fit(
        _mlp()[0], train_step, train, run_dir=tmp_path / "b", resume="auto", allow_inexact_resume=True, **kw
    )
    _assert_same_run(straight, resumed)


@pytest.mark.parametrize("start_at", [0, 4], ids=["max_steps-0", "rerun-of-a-cut-run"])
def test_max_steps_already_reached_takes_no_step(start_at, tmp_path):
    st, train_step, _ = _mlp()
    batches = _float_batches(6, 3, n=16)
    out = tmp_path / "run"
    if start_at:  # a run cut at step 4, then the same command again (resume, same max_steps)
        ff.fit(st, train_step, batches, epochs=3, run_dir=out, max_steps=start_at)
        again = ff.fit(st, train_step, batches, epochs=3, run_dir=out, resume="auto", max_steps=start_at)
    else:
        again = ff.fit(st, train_step, batches, epochs=3, max_steps=0)
    assert int(again.state.step) == start_at


def test_max_steps_at_the_end_of_an_epoch_still_ends_that_epoch():
    st, train_step, eval_step = _mlp()
    batches = _float_batches(6, 3, n=16)  # 3 batches per epoch: step 6 ends epoch 2
    result = ff.fit(st, train_step, batches, epochs=3, max_steps=6, eval_step=eval_step,
                    val_data=_float_batches(98, 1, n=16))  # fmt: skip
    assert int(result.state.step) == 6
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.epochs_run == 2 and "val_loss" in result.history[-1]


# -- 9. the public surface ------------------------------------------------------------------------


def test_every_public_name_resolves_to_the_module_that_defines_it():
    for name in ff.__all__:
        assert getattr(ff, name) is not None, name
    assert set(ff.__all__) <= set(dir(ff))
    assert ff.fit is loop.fit and ff.FitResult is loop.FitResult
    assert ff.make_train_step is step.make_train_step and ff.make_eval_step is step.make_eval_step
    assert ff.per_example_grads is step.per_example_grads
    assert ff.per_example_grad_norms is step.per_example_grad_norms
    assert ff.TrainState is ff.state.TrainState
    assert ff.optim is optim and ff.data is data and ff.checkpoint is checkpoint
    for module in ("callbacks", "losses", "metrics", "models", "nn", "schedules", "tree"):
        assert getattr(ff, module).__name__ == f"fashion_func.{module}"
    assert isinstance(ff.__version__, str)
    with pytest.raises(AttributeError, match="no_such_name"):
        ff.no_such_name  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, fashion_func as ff\n"
        "v = ff.__version__\n"
        "print('torch' in sys.modules)\n"
        "ff.make_train_step\n"
        "print('torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)  # fmt: skip
    assert out.stdout.split() == ["False", "True"]
