"""Ensembles and sweeps (`fashion_func.ensemble`, fit's per-member metrics, --ensemble/--sweep,
predict.py --weights A B): every member of a vmapped run is compared with the solo run of the
same member, the ensemble's prediction with a plain loop over the members.

Tiny and mostly eager (CPU, a few steps, at most 512 training examples); one test compiles
the "update" mode. Float64 comparisons are near-exact; float32 tolerances are measured and
stated where they are used.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from reference import (
    SimpleNetBN,
    TwoLayerNet,
    assert_argmax_agrees,
    assert_tree_close,
    assert_tree_equal,
    clone_tree,
)

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, data, ensemble, loop, losses, models, nn, optim, step
from fashion_func import state as state_lib
from fashion_func.cli import predict
from fashion_func.cli import train as cli
from fashion_func.loop import resume as resume_lib

# -- helpers -----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8_images(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def _float_images(seed: int, n: int = 8, dtype: torch.dtype = torch.float64):
    g = _gen(seed)
    x = torch.randn(n, 1, 28, 28, generator=g, dtype=dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


def _solo_state(model, tx, seed: int, *, init_seed: int | None = None, dtype=torch.float32):
    """A solo state as `ensemble.init` builds member k's (init and dropout keys from `seed`)."""
    params = model.init(_gen(seed if init_seed is None else init_seed), dtype=dtype)
    return state_lib.create(params, tx, seed=seed, model_state=model.init_state(dtype=dtype))


def _run_both(model, tx, ens, batches, *, preprocess=step.FASHION_MNIST, compile=False):
    """(stacked state after `batches` with the ensemble step, [solo states of each member after
    the same batches with the ordinary step], [K] metrics of each ensemble step, solo metrics)."""
    ens_step = ensemble.make_train_step(model, tx, preprocess=preprocess, compile=compile, topk=3)
    solo_step = step.make_train_step(model, tx, preprocess=preprocess, compile=False, topk=3)
    solos = ensemble.unstack(ens)
    ens_metrics, solo_metrics = [], []
    for batch in batches:
        ens, m = ens_step(ens, batch)
        ens_metrics.append(m)
        row = []
        for k, s in enumerate(solos):
            solos[k], ms = solo_step(s, batch)
            row.append(ms)
        solo_metrics.append(row)
    return ens, solos, ens_metrics, solo_metrics


# Float32 members against their solo runs. The ensemble's convolutions are batched over the
# members (NCHW) and the solo step's are plain (NHWC on the CPU), so gradients differ in the
# last bits; Adam divides by sqrt(v) + 1e-8, which turns the relative error of a tiny gradient
# into up to a step (lr = 1e-3) for that weight. Measured after 1-4 steps: at most 7.5e-5
# (simplenet, alexnet), mean 1e-9. Asserted: max 5e-4 (half a step), mean 1e-7.
FLOAT32_TOL = 5e-4
FLOAT32_MEAN_TOL = 1e-7


def assert_members_close(a, b) -> None:
    assert_tree_close(a, b, rtol=0, atol=FLOAT32_TOL)
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().reshape(-1) for k in a])
    assert float(diffs.mean()) <= FLOAT32_MEAN_TOL, float(diffs.mean())


# -- 1. stack / unstack / member ----------------------------------------------------------------


def test_stack_unstack_and_member_round_trip_bitwise():
    model, tx = models.get("simplenet_bn"), optim.adam(1e-3)
    states = [_solo_state(model, tx, s) for s in (3, 4, 5)]
    before = [clone_tree(s) for s in states]
    ens = ensemble.stack(states)

    assert ensemble.size(ens) == 3
    assert ens.params["conv1.weight"].shape == (3, 32, 1, 3, 3)
    assert ens.model_state["bn1.running_mean"].shape == (3, 32)
    assert ens.step.shape == (3,) and ens.rng.tolist() == [3, 4, 5]
    assert ens.opt_state[1].mu["fc2.bias"].shape == (3, 10)
    for k, s in enumerate(states):
        assert_tree_equal(ensemble.member(ens, k), s)
    for a, b in zip(ensemble.unstack(ens), states, strict=True):
        assert_tree_equal(a, b)
    assert_tree_equal(ensemble.stack(ensemble.unstack(ens)), ens)
    for s, b in zip(states, before, strict=True):
        assert_tree_equal(s, b)  # stacking copies: the inputs are untouched


def test_stack_member_and_size_errors():
    tx = optim.adam(1e-3)
    a = _solo_state(models.get("mlp"), tx, 0)
    b = _solo_state(models.get("simplenet"), tx, 0)
    with pytest.raises(ValueError, match="state 1 differs in structure"):
        ensemble.stack([a, b])
    with pytest.raises(ValueError, match="at least one state"):
        ensemble.stack([])
    with pytest.raises(ValueError, match="not a stacked state"):
        ensemble.size(a)
    with pytest.raises(ValueError, match="not a stacked state"):
        ensemble.member(a, 0)
    ens = ensemble.stack([a, a])
    for k in (2, -1):
        with pytest.raises(IndexError, match=f"member {k} out of range for an ensemble of 2"):
            ensemble.member(ens, k)


def test_init_draws_each_member_from_its_member_seed():
    model, tx = models.get("mlp"), optim.adam(1e-3)
    assert ensemble.member_seed(7, 0) == 7
    seeds = [ensemble.member_seed(7, k) for k in range(3)]
    assert len(set(seeds)) == 3 and ensemble.member_seed(8, 1) not in seeds
    assert seeds[1] == int(nn.fold_in(7, 1))
    ens = ensemble.init(model, tx, members=3, seed=7)
    for k, s in enumerate(seeds):
        assert_tree_equal(ensemble.member(ens, k), _solo_state(model, tx, s))
    with pytest.raises(ValueError, match="at least one member"):
        ensemble.init(model, tx, members=0)
    with pytest.raises(ValueError, match="hyperparams has 1 entries for 2 members"):
        ensemble.init(model, tx, members=2, hyperparams=[{"lr": 1e-3}])


# -- 2. member k of a vmapped run == the solo run of member k ------------------------------------


@pytest.mark.cross_path
def test_float64_stateful_members_equal_their_solo_runs():
    """simplenet_bn in float64 (preprocess=None): params, Adam moments, batch-norm statistics
    and metrics of each member equal the solo run's after 3 steps."""
    model, tx = models.get("simplenet_bn"), optim.adam(1e-3)
    ens = ensemble.stack([_solo_state(model, tx, s, dtype=torch.float64) for s in (0, 1)])
    before = clone_tree(ens)
    batches = [_float_images(s, n=4) for s in (10, 11, 12)]
    out, solos, em, sm = _run_both(model, tx, ens, batches, preprocess=None)

    assert_tree_equal(ens, before)  # the step is pure
    assert out.step.tolist() == [3, 3] and out.rng.tolist() == [0, 1]
    for m, row in zip(em, sm, strict=True):
        assert set(m) == {"loss_sum", "count", "correct", "top3_correct"}
        assert m["loss_sum"].shape == (2,) and m["count"].tolist() == [4, 4]
        torch.testing.assert_close(
            m["loss_sum"], torch.stack([r["loss_sum"] for r in row]), rtol=0, atol=1e-12
        )
        assert m["correct"].tolist() == [int(r["correct"]) for r in row]
        assert m["top3_correct"].tolist() == [int(r["top3_correct"]) for r in row]
    for k, solo in enumerate(solos):
        got = ensemble.member(out, k)
        assert int(got.step) == 3
        # measured: params 2e-15 but for the conv biases before a batch norm: their gradient
        # is 0 in exact arithmetic, so it is rounding noise that Adam scales up to
        # lr * |g| / eps (1.5e-10 here; the batched and plain batch-norm kernels round apart);
        # statistics 2e-12, optimizer state 1e-15 (batched vs plain convolutions)
        pre_bn = {"conv1.bias", "conv2.bias"}
        assert_tree_close(
            {k: v for k, v in got.params.items() if k not in pre_bn},
            {k: v for k, v in solo.params.items() if k not in pre_bn},
            rtol=0,
            atol=1e-12,
        )
        assert_tree_close(
            {k: got.params[k] for k in pre_bn}, {k: solo.params[k] for k in pre_bn}, rtol=0, atol=1e-9
        )
        assert_tree_close(got.opt_state, solo.opt_state, rtol=1e-8, atol=1e-12)
        assert_tree_close(got.model_state, solo.model_state, rtol=0, atol=1e-10)
    # the members really differ (else the comparison above would prove little)
    assert not torch.allclose(out.params["fc2.weight"][0], out.params["fc2.weight"][1])


@pytest.mark.cross_path
def test_float32_members_with_uint8_images_equal_their_solo_runs():
    """Default preprocess (uint8 -> normalised float32, NCHW in the ensemble, NHWC solo on the
    CPU): after 4 Adam steps each member is within FLOAT32_TOL of its solo run."""
    model, tx = models.get("simplenet"), optim.adam(1e-3)
    ens = ensemble.init(model, tx, members=2, seed=0)
    batches = [_uint8_images(s, n=16) for s in (20, 21, 22, 23)]
    out, solos, em, sm = _run_both(model, tx, ens, batches)
    for m, row in zip(em, sm, strict=True):
        torch.testing.assert_close(
            m["loss_sum"], torch.stack([r["loss_sum"] for r in row]), rtol=1e-5, atol=1e-5
        )
    for k, solo in enumerate(solos):
        assert_members_close(ensemble.member(out, k).params, solo.params)


@pytest.mark.cross_path
def test_dropout_members_draw_their_own_masks_and_equal_their_solo_runs():
    """alexnet (two dropout layers): two members with the same params but different rng
    (dropout keys) move apart after one step; each equals the solo run of its own key; with
    the same rng as well they stay identical."""
    model, tx = models.get("alexnet"), optim.adam(1e-3)
    params = model.init(_gen(0))
    a = state_lib.create(params, tx, seed=0)
    b = state_lib.create(params, tx, seed=1)
    batch = _uint8_images(30, n=8)

    out, solos, _, _ = _run_both(model, tx, ensemble.stack([a, b]), [batch])
    m0, m1 = ensemble.unstack(out)
    assert not torch.equal(m0.params["fc1.weight"], m1.params["fc1.weight"])
    # the dropout masks differ: the fc2 update differs by far more than rounding
    assert float((m0.params["fc2.weight"] - m1.params["fc2.weight"]).abs().max()) > 1e-4
    for got, solo in zip((m0, m1), solos, strict=True):
        assert_members_close(got.params, solo.params)

    same, _ = ensemble.make_train_step(model, tx, compile=False)(ensemble.stack([a, a]), batch)
    s0, s1 = ensemble.unstack(same)
    assert_tree_equal(s0.params, s1.params)


@pytest.mark.cross_path
def test_update_compile_mode_members_equal_their_solo_runs():
    """The CPU default ("update": optimizer passes compiled, vmapped) on the mlp."""
    model, tx = models.get("mlp"), optim.adam(1e-3)
    ens = ensemble.init(model, tx, members=3, seed=1)
    batches = [_uint8_images(s, n=32) for s in (40, 41, 42)]
    out, solos, em, sm = _run_both(model, tx, ens, batches, compile="update")
    assert out.step.tolist() == [3, 3, 3]
    for m, row in zip(em, sm, strict=True):
        torch.testing.assert_close(
            m["loss_sum"], torch.stack([r["loss_sum"] for r in row]), rtol=1e-5, atol=1e-5
        )
    for k, solo in enumerate(solos):
        assert_members_close(ensemble.member(out, k).params, solo.params)
        assert_tree_close(ensemble.member(out, k).opt_state, solo.opt_state, rtol=1e-4, atol=1e-7)


# -- 3. a sweep: one init, each member its own hyperparameters -----------------------------------


@pytest.mark.cross_path
def test_sweep_members_start_identical_and_each_follows_its_own_lr():
    model = models.get("mlp")
    lrs = [1e-3, 1e-4]
    ens = ensemble.init(
        model, optim.adam(1e-3), members=2, seed=3, hyperparams=[{"lr": lr} for lr in lrs], same_init=True
    )
    m0, m1 = ensemble.unstack(ens)
    assert_tree_equal(m0.params, m1.params)
    assert_tree_equal(m0.params, model.init(_gen(3)))
    assert ens.rng.tolist() == [3, 3]
    lr = optim.get_hyperparam(ens.opt_state, "lr")
    assert lr.shape == (2,) and lr.dtype == torch.float32
    assert lr.tolist() == torch.tensor(lrs, dtype=torch.float32).tolist()
    assert resume_lib.host_lr(ens.opt_state) == lrs  # the floats the user wrote

    ens_step = ensemble.make_train_step(model, optim.adam(1e-3), compile=False)
    solos = [_solo_state(model, optim.adam(lr), 3) for lr in lrs]
    solo_steps = [step.make_train_step(model, optim.adam(lr), compile=False) for lr in lrs]
    for seed in (60, 61, 62):
        batch = _uint8_images(seed, n=32)
        ens, _ = ens_step(ens, batch)
        solos = [f(s, batch)[0] for f, s in zip(solo_steps, solos, strict=True)]
    for k, solo in enumerate(solos):
        assert_members_close(ensemble.member(ens, k).params, solo.params)
        assert_tree_close(ensemble.member(ens, k).opt_state, solo.opt_state, rtol=1e-4, atol=1e-7)
    # Adam moves each weight by about lr per step: member 1 has moved about a tenth as far
    start = model.init(_gen(3))["linear2.weight"]
    moved = [float((ensemble.member(ens, k).params["linear2.weight"] - start).abs().max()) for k in (0, 1)]
    assert 8 < moved[0] / moved[1] < 12


def test_set_hyperparam_on_a_stacked_state():
    ens = ensemble.init(models.get("mlp"), optim.adam(1e-3), members=3, seed=0)
    assert resume_lib.host_lr(ens.opt_state) == 1e-3  # one value shared by all: a float
    every = optim.set_hyperparam(ens.opt_state, "lr", 0.01)
    assert optim.get_hyperparam(every, "lr").tolist() == [pytest.approx(0.01)] * 3
    each = optim.set_hyperparam(ens.opt_state, "lr", torch.tensor([1e-2, 1e-3, 1e-4], dtype=torch.float64))
    got = optim.get_hyperparam(each, "lr")
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert resume_lib.host_lr(each) == [1e-2, 1e-3, 1e-4]
    assert optim.get_hyperparam(ens.opt_state, "lr").tolist() == [pytest.approx(1e-3)] * 3  # untouched


# -- 4. the ensemble's eval step -----------------------------------------------------------------


@pytest.mark.cross_path
def test_combine_is_the_log_of_the_mean_member_probability_float64():
    g = _gen(0)
    logits = 4 * torch.randn(4, 6, 10, generator=g, dtype=torch.float64)  # [K, B, C]
    y = torch.randint(0, 10, (6,), generator=g)
    member_out = {
        "loss": torch.stack([F.cross_entropy(m, y, reduction="none") for m in logits]),
        "logits": logits,
        "correct": logits.argmax(-1) == y,
    }
    out = ensemble.combine(member_out, y, losses.cross_entropy_per_example, topk=3)
    mean_prob = sum(torch.softmax(m, dim=-1) for m in logits) / 4
    torch.testing.assert_close(out["logits"], mean_prob.log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(out["loss"], -mean_prob[torch.arange(6), y].log(), rtol=0, atol=1e-12)
    assert_argmax_agrees(out["pred"], mean_prob, 1e-10)  # float64 within 1e-12 of the mean
    assert torch.equal(out["correct"], out["pred"] == y)
    top3 = mean_prob.topk(3, dim=-1).indices
    assert torch.equal(out["top3_correct"], (top3 == y[:, None]).any(-1))
    assert torch.equal(out["member_loss"], member_out["loss"])
    assert torch.equal(out["member_correct"], member_out["correct"])
    assert torch.equal(out["member_logits"], logits)


@pytest.mark.cross_path
def test_ensemble_eval_step_equals_a_loop_over_the_members():
    """simplenet_bn (running statistics after one step), float32: the ensemble's logits are
    log(mean of member softmax) of the solo eval steps' logits; member metrics are theirs."""
    model, tx = models.get("simplenet_bn"), optim.adam(1e-3)
    ens = ensemble.init(model, tx, members=3, seed=0)
    ens, _ = ensemble.make_train_step(model, tx, compile=False)(ens, _uint8_images(70, n=16))
    images, labels = _uint8_images(71, n=32)
    out = ensemble.make_eval_step(model, compile=False, topk=3)(ens, (images, labels))
    solo_eval = step.make_eval_step(model, compile=False, topk=3)
    solos = [solo_eval(ensemble.member(ens, k), (images, labels)) for k in range(3)]

    mean_prob = sum(torch.softmax(o["logits"].double(), dim=-1) for o in solos) / 3
    assert out["logits"].shape == (32, 10) and out["loss"].shape == (32,)
    assert out["member_loss"].shape == (3, 32) and out["member_logits"].shape == (3, 32, 10)
    # float32 logits of batched (NCHW) vs plain (NHWC) convolutions: measured 5e-7
    torch.testing.assert_close(out["logits"].double(), mean_prob.log(), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out["loss"].double(), -mean_prob[torch.arange(32), labels].log(), rtol=0, atol=1e-5
    )
    assert_argmax_agrees(out["pred"], mean_prob, 1e-5)  # the logits' tolerance above
    assert torch.equal(out["correct"], out["pred"] == labels)
    for k, o in enumerate(solos):
        torch.testing.assert_close(out["member_logits"][k], o["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(out["member_loss"][k], o["loss"], rtol=0, atol=1e-5)
        assert_argmax_agrees(out["member_pred"][k], o["logits"], 1e-5)  # batched vs solo logits: 1e-5
        assert torch.equal(out["member_correct"][k], out["member_pred"][k] == labels)
    # the members disagree somewhere, so the ensemble is not any one of them
    assert not torch.equal(out["member_pred"][0], out["member_pred"][1])
    with pytest.raises(ValueError, match="stateful"):
        ensemble.make_eval_step(model, compile=False)(ens.params, (images, labels))


# -- 5. fit with an ensemble step ----------------------------------------------------------------


def _fit(
    run_dir, model_name: str, members: int, *, epochs: int, limit: int = 256, batch_size: int = 64, **kw
) -> loop.FitResult:
    model, tx = models.get(model_name), optim.adam(1e-3)
    callbacks = [
        cbs.ModelCheckpoint(monitor=f"val_loss_m{k}", save_last=False, member=k, name=f"ModelCheckpoint_m{k}")
        for k in range(members)
    ]
    return loop.fit(
        ensemble.init(model, tx, members=members, seed=5),
        ensemble.make_train_step(model, tx, compile=False),
        data.EpochBatches(data.load("train", limit=limit), batch_size, seed=5),
        epochs=epochs,
        eval_step=ensemble.make_eval_step(model, compile=False),
        val_data=data.EpochBatches(data.load("test", limit=200), 100, shuffle=False),
        callbacks=callbacks,
        run_dir=run_dir,
        **kw,
    )


def _metrics_only(history):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, loop.FitResult]:
    """simplenet_bn, 2 members, 2 epochs of 2 steps (128 examples, batch 64), eager."""
    out = tmp_path_factory.mktemp("fit") / "run"
    return out, _fit(out, "simplenet_bn", 2, epochs=2, limit=128, batch_size=64)


@pytest.mark.cross_path
def test_fit_history_has_each_member_their_mean_std_and_the_ensemble(fitted):
    _, res = fitted
    assert [r["epoch"] for r in res.history] == [1, 2]
    for r in res.history:
        for name in ("val_loss", "val_acc", "val_top5", "train_loss", "train_acc"):
            vals = [r[f"{name}_m0"], r[f"{name}_m1"]]
            assert r[f"{name}_mean"] == statistics.fmean(vals), name
            assert r[f"{name}_std"] == statistics.stdev(vals), name
        assert r["train_loss"] == statistics.fmean([r["train_loss_m0"], r["train_loss_m1"]])
        assert r["train_acc"] == r["train_acc_mean"]
        assert r["lr"] == 1e-3
        # the ensemble's own: cross-entropy is convex, so the averaged prediction's loss is at
        # most the members' mean (and differs from it: it is not the mean)
        assert r["val_loss"] < r["val_loss_mean"]
        assert r["val_loss_std"] > 0

    # the last epoch's validation numbers against solo evaluations of the final members
    model = models.get("simplenet_bn")
    val = data.load("test", limit=200)
    solo_eval = step.make_eval_step(model, compile=False)
    solos = [solo_eval(ensemble.member(res.state, k), (val.images, val.labels)) for k in (0, 1)]
    last = res.history[-1]
    for k, o in enumerate(solos):
        assert last[f"val_loss_m{k}"] == pytest.approx(float(o["loss"].double().mean()), abs=1e-5)
        # vmapped vs solo logits (1e-5 apart): a near tie may flip one of the 200 predictions
        solo_acc = float(o["correct"].double().mean())
        assert last[f"val_acc_m{k}"] == pytest.approx(solo_acc, abs=1 / 200 + 1e-12)
    mean_prob = sum(torch.softmax(o["logits"].double(), dim=-1) for o in solos) / 2
    assert last["val_loss"] == pytest.approx(
        float(-mean_prob[torch.arange(200), val.labels].log().mean()), abs=1e-5
    )
    expected_acc = float((mean_prob.argmax(-1) == val.labels).double().mean())
    assert last["val_acc"] == pytest.approx(expected_acc, abs=1 / 200 + 1e-12)  # a near tie may flip one


@pytest.mark.cross_path
def test_fit_train_metrics_are_each_members_solo_run(fitted):
    """Epoch 1's train_loss_m{k} / train_acc_m{k} are those of the solo run of member k."""
    _, res = fitted
    model, tx = models.get("simplenet_bn"), optim.adam(1e-3)
    train = data.EpochBatches(data.load("train", limit=128), 64, seed=5)
    solo_step = step.make_train_step(model, tx, compile=False)
    first = res.history[0]
    for k in (0, 1):
        s = ensemble.member(ensemble.init(model, tx, members=2, seed=5), k)
        loss, correct, count = 0.0, 0, 0
        for batch in train(1):
            s, m = solo_step(s, batch)
            loss, correct, count = (
                loss + float(m["loss_sum"]),
                correct + int(m["correct"]),
                count + int(m["count"]),
            )
        assert count == 128
        # float32: the batched batch-norm kernel rounds apart from the plain one, and Adam's
        # first step (about lr * sign(g)) amplifies that: measured 5.5e-5 on a loss of 2.3
        assert first[f"train_loss_m{k}"] == pytest.approx(loss / count, abs=3e-4)
        # the same rounding apart: a near tie may flip one of the 128 predictions
        assert first[f"train_acc_m{k}"] == pytest.approx(correct / count, abs=1 / count + 1e-12)


def test_fit_writes_each_members_best_weights_as_a_plain_model(fitted):
    out, res = fitted
    best = res.member_best
    assert sorted(best) == [0, 1]
    assert not (out / "checkpoints" / "best.safetensors").exists()
    assert (out / "checkpoints" / "last.safetensors").exists()
    for k in (0, 1):
        path = out / "checkpoints" / f"member-{k:02d}" / "best.safetensors"
        # val_loss_m{k} fell in epoch 2, so the file holds the final member
        assert best[k]["epoch"] == 2 and best[k]["path"] == str(path)
        assert best[k]["monitor"] == f"val_loss_m{k}"
        assert best[k]["value"] == res.history[-1][f"val_loss_m{k}"]
        weights = safetensors.torch.load_file(path)
        module = SimpleNetBN()
        module.load_state_dict(weights, strict=True)
        final = ensemble.member(res.state, k)
        assert_tree_equal(weights, {**final.params, **final.model_state})
        meta = checkpoint.read_metadata(path)
        assert meta["member"] == k and meta["epoch"] == 2 and meta["monitor"] == f"val_loss_m{k}"


def test_fit_resume_of_an_ensemble_cut_mid_epoch_is_exact(tmp_path):
    """mlp, 2 members, 2 epochs of 4 steps: cut at step 6 (epoch 2, batch 2), then resumed ==
    the straight run, bitwise (params, optimizer state, rng, per-member history)."""
    straight = _fit(tmp_path / "straight", "mlp", 2, epochs=2)
    cut = _fit(tmp_path / "cut", "mlp", 2, epochs=2, max_steps=6)
    assert cut.state.step.tolist() == [6, 6] and cut.stop_reason == "max_steps 6 reached"
    assert [r["epoch"] for r in cut.history] == [1]
    res = _fit(tmp_path / "cut", "mlp", 2, epochs=2, resume="auto")
    assert res.state.step.tolist() == [8, 8]
    assert_tree_equal(res.state, straight.state)
    assert _metrics_only(res.history) == _metrics_only(straight.history)
    assert "val_loss_m1" in res.history[-1]
    for k in (0, 1):
        a = tmp_path / "cut" / "checkpoints" / f"member-{k:02d}" / "best.safetensors"
        b = tmp_path / "straight" / "checkpoints" / f"member-{k:02d}" / "best.safetensors"
        assert_tree_equal(safetensors.torch.load_file(a), safetensors.torch.load_file(b))


# -- 6. the command line -------------------------------------------------------------------------

TINY = [
    "--model", "mlp", "--epochs", "1", "--limit-train", "512", "--limit-val", "200",
    "--compile", "off", "--no-progress", "--no-tensorboard",
]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main_train([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """train.py --ensemble 2 (mlp, 512 examples, one epoch, eager)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main_train([*TINY, "--ensemble", "2", "--out", str(out)]) == 0
    return out


def test_cli_ensemble_writes_members_json_and_each_members_best(cli_run):
    rows = json.loads((cli_run / "members.json").read_text())
    history = json.loads((cli_run / "history.json").read_text())
    assert [r["member"] for r in rows] == [0, 1]
    for k, r in enumerate(rows):
        path = cli_run / "checkpoints" / f"member-{k:02d}" / "best.safetensors"
        assert path.is_file() and Path(r["weights"]) == path
        assert r["seed"] == ensemble.member_seed(0, k)
        assert (r["monitor"], r["epoch"]) == ("val_loss", 1)
        assert r["best"] == history[-1][f"val_loss_m{k}"]
        module = TwoLayerNet(784, 100, 10)
        module.load_state_dict(safetensors.torch.load_file(path), strict=True)
    assert "val_loss_std" in history[-1] and "train_acc_m1" in history[-1]
    cfg = json.loads((cli_run / "config.json").read_text())
    assert cfg["ensemble"] == 2 and cfg["sweep"] is None


def test_cli_sweep_rows_carry_their_lr(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli([*TINY, "--limit-train", "256", "--sweep", "lr=1e-3,1e-4", "--out", out], capsys)
    assert code == 0, err
    rows = json.loads((out / "members.json").read_text())
    assert [(r["member"], r["lr"]) for r in rows] == [(0, 1e-3), (1, 1e-4)]
    assert all("seed" not in r for r in rows)
    last = json.loads((out / "history.json").read_text())[-1]
    assert (last["lr_m0"], last["lr_m1"]) == (1e-3, 1e-4)
    # one init: both members started from the seed's weights
    state, _ = checkpoint.load_state(
        out / "checkpoints" / "last.safetensors",
        ensemble.init(models.get("mlp"), optim.adam(1e-3), members=2, seed=0, same_init=True),
    )
    assert optim.get_hyperparam(state.opt_state, "lr").tolist() == torch.tensor([1e-3, 1e-4]).tolist()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--ensemble", "0"], "--ensemble must be at least 1"),
        (["--sweep", "foo=1"], "--sweep takes NAME=V1,V2,..."),
        (["--sweep", "lr=x"], "--sweep lr: values must be numbers"),
        (["--sweep", "lr=1e-3", "--ensemble", "2"], "--sweep and --ensemble are exclusive"),
        (["--sweep", "lr=1e-3,1e-4", "--lr-schedule", "step"], "--sweep lr needs --lr-schedule constant"),
        (["--sweep", "lr=1e-3,1e-4", "--lr", "0.01"], "--lr and --sweep lr=... contradict"),
    ],
)
def test_cli_bad_member_flags_are_one_line_usage_errors(tmp_path, capsys, flags, says):
    code, err = run_cli([*TINY, *flags, "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and says in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_resume_with_other_members_is_refused(cli_run, capsys):
    last = cli_run / "checkpoints" / "last.safetensors"
    before = last.read_bytes()
    for flags in (["--ensemble", "3"], ["--ensemble", "1"]):
        code, err = run_cli(["--resume", "auto", "--out", cli_run, "--epochs", "2", *flags], capsys)
        assert code == 2
        assert err.count("\n") == 1 and "resume it with the same members" in err, err
    assert last.read_bytes() == before
    # a refused resume undoes only what it added: the members' best files stay
    assert all((cli_run / "checkpoints" / f"member-{k:02d}" / "best.safetensors").is_file() for k in (0, 1))


def test_a_resume_that_finds_no_better_epoch_still_reports_every_members_best(tmp_path):
    first = _fit(tmp_path / "run", "mlp", 2, epochs=1)
    again = _fit(tmp_path / "run", "mlp", 2, epochs=1, resume="auto")  # nothing left to train
    assert first.member_best and again.epochs_run == 0
    assert again.member_best == first.member_best


def test_overwrite_removes_the_members_files_and_a_linked_member_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*TINY, "--ensemble", "2", "--out", out], capsys)[0] == 0
    code, err = run_cli([*TINY, "--out", out, "--overwrite"], capsys)  # a solo run in its place
    assert code == 0, err
    assert not (out / "members.json").exists()
    assert not any((out / "checkpoints").glob("member-*"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = tmp_path / "run2"
    assert run_cli([*TINY, "--ensemble", "2", "--out", other], capsys)[0] == 0
    target = other / "checkpoints" / "member-01"
    for f in target.iterdir():
        f.unlink()
    target.rmdir()
    target.symlink_to(elsewhere, target_is_directory=True)
    code, err = run_cli(["--resume", "auto", "--out", other, "--epochs", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "symbolic link" in err, err
    assert not any(elsewhere.iterdir())  # nothing written through the link


# -- 7. predict.py --weights A B -----------------------------------------------------------------


def _predict(capsys, *argv) -> dict:
    capsys.readouterr()
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.cross_path
def test_predict_of_the_members_is_the_ensemble_training_validated(cli_run, capsys):
    """predict.py --weights m0 m1 on the 200 validation examples of the run: the ensemble's
    accuracy is the run's val_acc, each member's the run's val_acc_m{k} and its own predict."""
    files = [cli_run / "checkpoints" / f"member-{k:02d}" / "best.safetensors" for k in (0, 1)]
    history = json.loads((cli_run / "history.json").read_text())[-1]
    both = _predict(capsys, "--weights", *files, "--limit", 200, "--json", "--device", "cpu")
    assert both["weights"] == [str(f) for f in files]
    assert both["num_examples"] == 200
    assert both["accuracy"] == history["val_acc"]
    assert both["loss"] == pytest.approx(history["val_loss"], abs=1e-5)
    assert [m["weights"] for m in both["members"]] == [str(f) for f in files]
    for k, (f, m) in enumerate(zip(files, both["members"], strict=True)):
        alone = _predict(capsys, "--weights", f, "--limit", 200, "--json", "--device", "cpu")
        assert alone["weights"] == str(f) and "members" not in alone
        assert m["accuracy"] == history[f"val_acc_m{k}"]
        # vmapped vs solo logits: a near tie may flip one of the 200 predictions
        assert alone["accuracy"] == pytest.approx(m["accuracy"], abs=1 / 200 + 1e-12)
        assert m["loss"] == pytest.approx(alone["loss"], abs=1e-9)
        assert m["loss"] == pytest.approx(history[f"val_loss_m{k}"], abs=1e-5)


def test_members_draw_independent_gradient_noise_and_a_sweeps_the_same():
    """`add_noise` in an ensemble's optimizer: each member's key from its own seed."""
    params = {"w": torch.zeros(64, dtype=torch.float64)}
    tx = optim.chain(optim.add_noise(0.1, 0.0, seed=7), optim.sgd(1.0))
    fn = lambda p, x: x @ p["w"][:, None].expand(64, 10)
    ens = ensemble.init(fn, tx, members=3, seed=0, init=lambda g: dict(params))
    same = ensemble.init(fn, tx, members=2, seed=0, init=lambda g: dict(params), same_init=True)
    grads = {"w": torch.zeros(3, 64, dtype=torch.float64)}
    upd, _ = torch.func.vmap(tx.update)(grads, ens.opt_state, ens.params)
    assert not torch.equal(upd["w"][0], upd["w"][1]) and not torch.equal(upd["w"][1], upd["w"][2])
    upd2, _ = torch.func.vmap(tx.update)({"w": grads["w"][:2]}, same.opt_state, same.params)
    assert torch.equal(upd2["w"][0], upd2["w"][1])
