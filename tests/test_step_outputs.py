"""One vocabulary for the steps, their extra per-example outputs end to end, plain (stateful)
function models, and the default preprocess's dtype check (step, ensemble, fit)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fashion_func as ff
from fashion_func import data, ensemble, losses, models, optim, preprocess, step
from fashion_func import state as state_lib
from fashion_func.loop.fit import evaluate


def _uint8(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def _margin_loss(logits, labels):
    per_example = losses.cross_entropy_per_example(logits, labels)
    top2 = logits.topk(2, dim=-1).values
    return per_example, {"margin": top2[:, 0] - top2[:, 1]}


def _confident(logits, labels):
    return {"confident": logits.softmax(-1).amax(-1) > 0.2}


def _mlp_state(seed: int = 0, tx=None):
    model, tx = models.get("mlp"), tx or optim.sgd(0.1)
    return model, tx, state_lib.create(model.init(torch.Generator().manual_seed(seed)), tx, seed=seed)


# -- 1. one vocabulary ------------------------------------------------------------------------------


@pytest.mark.cross_path
@pytest.mark.parametrize("compile", [False, "update"])
def test_every_step_maker_takes_the_three_compile_modes(compile):
    model, tx, st = _mlp_state()
    batch = _uint8(0)
    want = step.make_eval_step(model, compile=False)(st, batch)
    out = step.make_eval_step(model, compile=compile)(st, batch)
    assert torch.equal(out["loss"], want["loss"])  # "update": no update to compile, eager
    out = ensemble.make_eval_step(model, compile=compile)(ensemble.stack([st, st]), batch)
    torch.testing.assert_close(out["member_loss"], torch.stack([want["loss"]] * 2))  # vmapped: not bitwise
    for make in (
        step.make_train_step,
        step.make_eval_step,
        ensemble.make_train_step,
        ensemble.make_eval_step,
    ):
        args = (model, tx) if "train" in make.__name__ else (model,)
        with pytest.raises(ValueError, match="compile must be True, False or 'update', not 'on'"):
            make(*args, compile="on")


def test_the_cli_passes_its_resolved_compile_mode_to_both_steps(monkeypatch):
    from fashion_func.cli import app, device
    from fashion_func.cli.config import Config

    seen = []
    monkeypatch.setattr(app, "make_train_step", lambda *a, **k: seen.append(("train", k["compile"])))
    monkeypatch.setattr(app, "make_eval_step", lambda *a, **k: seen.append(("eval", k["compile"])))
    cfg = Config(model="mlp", compile="update")
    app.build_steps(cfg, models.get("mlp"), optim.sgd(0.1), torch.device("cpu"))
    assert seen == [("train", "update"), ("eval", "update")]
    assert device.resolve_compile("update", torch.device("cpu")) == "update"
    assert device.resolve_compile("auto", torch.device("cpu")) == "update"
    assert device.resolve_compile("on", torch.device("cpu")) is True
    assert device.resolve_compile("off", torch.device("cpu")) is False


def test_per_example_grads_takes_loss_and_preprocess_as_keywords_with_the_steps_defaults():
    model, _, st = _mlp_state()
    images, labels = _uint8(1, n=4)
    by_default = step.per_example_grads(model, st.params, (images, labels))
    explicit = step.per_example_grads(
        model,
        st.params,
        (data.normalize(images), labels),
        loss=losses.cross_entropy_per_example,
        preprocess=None,
    )
    for k in st.params:
        assert torch.equal(by_default[k], explicit[k])
    with pytest.raises(TypeError):  # loss is no longer positional
        step.per_example_grads(model, None, st.params, (images, labels))


def test_topk_has_one_name_in_the_train_and_eval_steps_and_in_fit():
    model, tx, st = _mlp_state()
    batch = _uint8(2)
    _, m = step.make_train_step(model, tx, compile=False, topk=3)(st, batch)
    eval_step = step.make_eval_step(model, compile=False, topk=3)
    out = eval_step(st, batch)
    assert "top3_correct" in m and "top3_correct" in out and "topk_correct" not in out
    assert not hasattr(eval_step, "topk")
    top3 = model.apply(st.params, data.normalize(batch[0])).topk(3, -1).indices
    assert torch.equal(out["top3_correct"], (top3 == batch[1][:, None]).any(-1))
    result = ff.fit(st, step.make_train_step(model, tx, compile=False, topk=3), [batch], epochs=1,
                    eval_step=eval_step, val_data=[batch])  # fmt: skip
    assert "train_top3" in result.history[0] and "val_top3" in result.history[0]
    assert result.history[0]["val_top3"] == pytest.approx(
        float(eval_step(result.state, batch)["top3_correct"].double().mean())
    )


def test_the_step_core_is_a_named_tuple_and_private_helpers_are_gone():
    assert step.CoreIn._fields == ("params", "model_state", "opt_state", "step", "rng", "inputs", "targets",
                                   "mask", "private")  # fmt: skip
    assert step.CoreOut._fields == ("params", "model_state", "opt_state", "step", "metrics")
    for gone in ("train_core", "eval_core", "step_from_core", "eval_step_from_core", "normalize_images"):
        assert not hasattr(step, gone), gone
    assert "stages" in step.__all__ and "Stages" in step.__all__


# -- 2. extra per-example outputs, end to end ------------------------------------------------------


@pytest.mark.cross_path
def test_extra_outputs_of_the_loss_and_of_metrics_are_summed_in_the_train_step():
    model, tx, st = _mlp_state()
    images, labels = _uint8(3)
    _, m = step.make_train_step(model, tx, loss=_margin_loss, metrics=_confident, compile=False)(
        st, (images, labels)
    )
    logits = model.apply(st.params, data.normalize(images))  # the logits the step differentiated
    want_loss, extra = _margin_loss(logits, labels)
    assert set(m) == {"loss_sum", "count", "correct", "margin_sum", "confident_sum"}
    torch.testing.assert_close(m["loss_sum"], want_loss.sum())
    torch.testing.assert_close(m["margin_sum"], extra["margin"].sum())
    assert int(m["confident_sum"]) == int(_confident(logits, labels)["confident"].sum())


def test_fit_reports_extra_outputs_as_train_and_val_means(tmp_path):
    model, tx, st = _mlp_state()
    train, val = [_uint8(10 + i) for i in range(3)], [_uint8(20 + i, n=8) for i in range(2)]
    kw = {"loss": _margin_loss, "metrics": _confident, "compile": False}
    train_step, eval_step = step.make_train_step(model, tx, **kw), step.make_eval_step(model, **kw)
    result = ff.fit(
        st, train_step, train, epochs=1, eval_step=eval_step, val_data=val, run_dir=tmp_path / "run",
        callbacks=[ff.callbacks.TrainingMonitor(), ff.callbacks.LogEpoch(), ff.callbacks.TensorBoardLogger()],
    )  # fmt: skip
    record = result.history[0]
    # by hand: the same steps, their sums over the epoch divided by the examples
    s, sums = st, {}
    for b in train:
        s, m = train_step(s, b)
        sums = {k: sums.get(k, 0) + float(v) for k, v in m.items()}
    assert record["train_margin"] == pytest.approx(sums["margin_sum"] / sums["count"], rel=1e-6)
    assert record["train_confident"] == pytest.approx(sums["confident_sum"] / sums["count"])
    outs = [eval_step(result.state, b) for b in val]
    assert record["val_margin"] == pytest.approx(
        float(torch.cat([o["margin"] for o in outs]).double().mean())
    )
    assert record["val_confident"] == pytest.approx(
        float(torch.cat([o["confident"] for o in outs]).double().mean())
    )
    assert "val_pred" not in record and "val_logits" not in record
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train_margin" in log and "val_confident" in log
    assert (
        json.loads((tmp_path / "run" / "history.json").read_text())[0]["val_margin"] == record["val_margin"]
    )
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/margin", "train/confident", "val/margin", "val/confident"} <= set(events.Tags()["scalars"])


def test_evaluate_averages_every_per_example_output_of_a_users_eval_step():
    def eval_step(state, batch):
        x, y = batch
        return {
            "loss": x.double(),
            "pred": y,
            "logits": x[:, None],
            "width": x * 2,
            "embedding": x[:, None].repeat(1, 3),
        }

    batches = [(torch.tensor([1.0, 2.0]), torch.tensor([7, 7])), (torch.tensor([3.0]), torch.tensor([9]))]
    assert evaluate(eval_step, None, batches) == {"val_loss": 2.0, "val_width": 4.0}


@pytest.mark.cross_path
def test_ensemble_steps_report_extra_outputs_per_member():
    model, tx = models.get("mlp"), optim.sgd(0.1)
    ens = ensemble.init(model, tx, members=2, seed=0)
    kw = {"loss": _margin_loss, "metrics": _confident, "compile": False}
    batches = [_uint8(30 + i) for i in range(2)]
    result = ff.fit(ens, ensemble.make_train_step(model, tx, **kw), batches, epochs=1,
                    eval_step=ensemble.make_eval_step(model, **kw), val_data=batches[:1])  # fmt: skip
    record = result.history[0]
    for k in range(2):  # each member's numbers are its solo run's
        solo = state_lib.create(model.init(torch.Generator().manual_seed(ensemble.member_seed(0, k))), tx,
                                seed=ensemble.member_seed(0, k))  # fmt: skip
        solo_result = ff.fit(solo, step.make_train_step(model, tx, **kw), batches, epochs=1,
                             eval_step=step.make_eval_step(model, **kw), val_data=batches[:1])  # fmt: skip
        for name in ("train_margin", "train_confident", "val_margin", "val_confident"):
            assert record[f"{name}_m{k}"] == pytest.approx(solo_result.history[0][name], rel=1e-5), name
    out = ensemble.make_eval_step(model, **kw)(result.state, batches[0])
    _, own = _margin_loss(out["logits"], batches[0][1])  # the ensemble's own, of its averaged prediction
    torch.testing.assert_close(out["margin"], own["margin"])
    assert record["val_margin"] == pytest.approx(float(out["margin"].double().mean()))
    assert out["member_margin"].shape == (2, 16)


def test_extra_outputs_are_summed_over_the_ranks():
    class TwoRanks:  # each rank saw the same data: the sums double, the means do not change
        rank, world_size, stop_check_every = 0, 2, 1

        def is_main(self):
            return True

        def sum(self, values):
            return values * 2

    model, _, st = _mlp_state()
    eval_step = step.make_eval_step(model, loss=_margin_loss, compile=False)
    batches = [_uint8(40, n=8)]
    alone, both = evaluate(eval_step, st, batches), evaluate(eval_step, st, batches, group=TwoRanks())
    assert both == pytest.approx(alone) and "val_margin" in both


@pytest.mark.parametrize(
    ("loss", "error", "match"),
    [
        (
            lambda z, y: (losses.cross_entropy_per_example(z, y), 3),
            TypeError,
            r"\(values \[B\], \{name: \[B\]\}\)",
        ),
        (lambda z, y: (z, {}), ValueError, r"shape \[B\] = \[16\], got a tensor of shape \[16, 10\]"),
        (lambda z, y: (z.sum(-1), {"m": z}), ValueError, "loss output 'm' must be per-example"),
        (lambda z, y: (z.sum(-1), {"loss": z.sum(-1)}), ValueError, "'loss' is taken"),
        (lambda z, y: {"a": z}, TypeError, "loss must return per-example values"),
    ],
)
def test_a_loss_that_returns_the_wrong_thing_is_a_one_line_error_on_the_first_call(loss, error, match):
    model, tx, st = _mlp_state()
    for make in (lambda: step.make_train_step(model, tx, loss=loss, compile=False),
                 lambda: step.make_eval_step(model, loss=loss, compile=False)):  # fmt: skip
        with pytest.raises(error, match=match) as info:
            make()(st, _uint8(4))
        assert "\n" not in str(info.value)


def test_metrics_that_return_the_wrong_thing_are_one_line_errors():
    model, tx, st = _mlp_state()
    with pytest.raises(TypeError, match=r"metrics must return \{name: per-example values \[B\]\}"):
        step.make_eval_step(model, metrics=lambda z, y: z, compile=False)(st, _uint8(5))
    with pytest.raises(ValueError, match="metrics and the loss both return 'margin'"):
        step.make_train_step(
            model, tx, loss=_margin_loss, metrics=lambda z, y: {"margin": z[:, 0]}, compile=False
        )(st, _uint8(5))


# -- 3. a plain function with its own batch norm -------------------------------------------------


def _bn_params(g: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {
        "w1": torch.randn(784, 32, generator=g, dtype=dtype) * 784**-0.5, "b1": torch.zeros(32, dtype=dtype),
        "gamma": torch.ones(32, dtype=dtype), "beta": torch.zeros(32, dtype=dtype),
        "w2": torch.randn(32, 10, generator=g, dtype=dtype) * 32**-0.5, "b2": torch.zeros(10, dtype=dtype),
    }  # fmt: skip


def _bn_init_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"mean": torch.zeros(32, dtype=dtype), "var": torch.ones(32, dtype=dtype)}


def bn_mlp(params, x, *, train, key, state):
    """A user's own batch norm: batch statistics in training (running averages updated),
    the running averages in inference."""
    h = x.flatten(1) @ params["w1"] + params["b1"]
    if train:
        mean, var = h.mean(0), h.var(0, correction=0)
        n = h.shape[0]
        new_state = {"mean": 0.9 * state["mean"] + 0.1 * mean.detach(),
                     "var": 0.9 * state["var"] + 0.1 * var.detach() * n / (n - 1)}  # fmt: skip
    else:
        mean, var, new_state = state["mean"], state["var"], state
    h = torch.relu((h - mean) / torch.sqrt(var + 1e-5) * params["gamma"] + params["beta"])
    return h @ params["w2"] + params["b2"], new_state


def _bn_run(run_dir, *, max_steps=None, resume=None):
    tx = optim.adam(1e-3)
    st = state_lib.create(
        _bn_params(torch.Generator().manual_seed(0)), tx, seed=0, model_state=_bn_init_state()
    )
    train, val = data.load("train", limit=640), data.load("test", limit=200)
    return ff.fit(
        st, step.make_train_step(bn_mlp, tx, compile=False, loss=_margin_loss),
        data.EpochBatches(train, 64, seed=0), epochs=2, run_dir=run_dir, max_steps=max_steps, resume=resume,
        eval_step=step.make_eval_step(bn_mlp, compile=False),
        val_data=data.EpochBatches(val, 100, shuffle=False),
    )  # fmt: skip


def test_a_plain_stateful_function_trains_through_fit_and_resumes_mid_epoch_bitwise(tmp_path):
    whole = _bn_run(tmp_path / "whole")
    cut = _bn_run(tmp_path / "cut", max_steps=13)  # mid-epoch 2 (10 batches an epoch)
    assert int(cut.state.step) == 13
    resumed = _bn_run(tmp_path / "cut", resume="auto")
    for a, b in (
        (whole.state.params, resumed.state.params),
        (whole.state.model_state, resumed.state.model_state),
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(whole.state.model_state["mean"], torch.zeros(32))  # the running stats moved
    drop = ("epoch_time_s",)
    clean = [{k: v for k, v in r.items() if k not in drop} for r in whole.history]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == clean
    assert whole.history[-1]["val_acc"] > 0.5 and "train_margin" in whole.history[-1]


@pytest.mark.cross_path
def test_an_ensemble_of_plain_stateful_functions_is_its_members_solo_runs():
    tx = optim.sgd(0.05, momentum=0.9)
    init = lambda g: _bn_params(g, torch.float64)
    ens = ensemble.init(
        bn_mlp, tx, members=3, seed=5, init=init, init_state=lambda: _bn_init_state(torch.float64)
    )
    g = torch.Generator().manual_seed(6)
    shape = (16, 1, 28, 28)
    batches = [
        (torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
        for _ in range(3)
    ]
    ens_step = ensemble.make_train_step(bn_mlp, tx, preprocess=None, compile=False)
    solo_step = step.make_train_step(bn_mlp, tx, preprocess=None, compile=False)
    solos = ensemble.unstack(ens)
    for b in batches:
        ens, _ = ens_step(ens, b)
        solos = [solo_step(s, b)[0] for s in solos]
    for k, solo in enumerate(solos):
        got = ensemble.member(ens, k)
        for a, b in ((got.params, solo.params), (got.model_state, solo.model_state)):
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-13)
    assert not torch.equal(solos[0].params["w1"], solos[1].params["w1"])  # members of their own init
    out = ensemble.make_eval_step(bn_mlp, preprocess=None, compile=False)(ens, batches[0])
    assert out["member_loss"].shape == (3, 16)
    with pytest.raises(TypeError, match="needs init="):
        ensemble.init(bn_mlp, tx, members=2)


def _stateless(params, x):
    return x.flatten(1) @ params["w1"][:, :10]


def test_a_plain_function_with_the_wrong_signature_or_return_is_a_one_line_typeerror():
    tx = optim.sgd(0.1)
    params = _bn_params(torch.Generator().manual_seed(0))
    x = _uint8(7)
    stateless_st = state_lib.create(params, tx)
    stateful_st = state_lib.create(params, tx, model_state=_bn_init_state())
    cases = [
        (bn_mlp, stateless_st, r"model bn_mlp takes state=: give its initial model state"),
        (_stateless, stateful_st, r"model _stateless takes no state=; a stateful function is "
                                  r"_stateless\(params, x, \*, train, key, state\) -> \(logits, new_state\)"),
        (lambda p, x, *, train, key, state: bn_mlp(p, x, train=train, key=key, state=state)[0], stateful_st,
         r"expected <lambda>\(params, x, \*, train, key, state\) -> \(logits, new_state\), got a tensor"),
        (lambda p, x, *, train, key, state: (bn_mlp(p, x, train=train, key=key, state=state)[0], {}),
         stateful_st, r"new_state keeping the state's keys; missing \['mean', 'var'\]"),
        (lambda p, x: (p["w1"], {}), stateless_st, r"must return logits \(a tensor\)"),
    ]  # fmt: skip
    for fn, st, match in cases:
        for built in (step.make_train_step(fn, tx, compile=False), step.make_eval_step(fn, compile=False)):
            with pytest.raises(TypeError, match=match) as info:
                built(st, x)
            assert "\n" not in str(info.value)


# -- 4. the default preprocess takes uint8 only; one normalisation everywhere --------------------------


@pytest.mark.cross_path
@pytest.mark.parametrize("compile", [False, True])
def test_the_default_preprocess_refuses_a_float_batch(compile):
    model, tx, st = _mlp_state()
    images, labels = _uint8(8)
    floats = (data.normalize(images), labels)
    train_step = step.make_train_step(model, tx, compile=compile)
    with pytest.raises(TypeError, match="got a float32 batch; pass preprocess=None") as info:
        train_step(st, floats)
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="pass preprocess=None"):
        step.make_eval_step(model, compile=False)(st, floats)
    with pytest.raises(TypeError, match="pass preprocess=None"):
        step.per_example_grads(model, st.params, floats)
    new, _ = train_step(st, (images, labels))  # uint8: as before
    plain, _ = step.make_train_step(model, tx, compile=False, preprocess=None)(st, floats)
    for k in new.params:  # the default's normalisation is data.normalize's, to the bit
        torch.testing.assert_close(new.params[k], plain.params[k], rtol=0, atol=0 if not compile else 1e-6)


def test_one_normalisation_shared_by_data_step_and_onnx_constants():
    assert (data.MEAN, data.STD, data.TUTORIAL_MEAN, data.TUTORIAL_STD) == (
        preprocess.MEAN, preprocess.STD, preprocess.TUTORIAL_MEAN, preprocess.TUTORIAL_STD)  # fmt: skip
    assert data.normalize is preprocess.normalize and step.NormalizeImages is preprocess.NormalizeImages
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).repeat(2, 1, 1)
    x = preprocess.normalize(images)
    assert torch.equal(x, (images[:, None].float() / 255.0 - 0.2860) / 0.3530)
    assert torch.equal(step.FASHION_MNIST(images), x) and torch.equal(
        torch.compile(preprocess.normalize)(images), x
    )
    assert math.isclose(float(preprocess.normalize(images, 0.5, 0.5)[0, 0, 15, 15]), 1.0)


@pytest.mark.cross_path
def test_per_example_grads_of_a_convnet_with_the_default_preprocess_on_cpu():
    """The default preprocess lays images out NHWC on CPU, which vmap's convolutions refuse:
    per_example_grads takes them NCHW, and equals the float path."""
    model = models.get("simplenet")
    params = model.init(torch.Generator().manual_seed(0))
    images, labels = _uint8(9, n=3)
    got = step.per_example_grads(model, params, (images, labels))
    want = step.per_example_grads(model, params, (data.normalize(images), labels), preprocess=None)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
