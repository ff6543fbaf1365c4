"""`loop.fit` in process: the run directory it writes, the actions it carries out, and exact resume.

Every run is tiny (192-512 training examples, 200 validation examples, CPU) and most are
eager; one test compiles (the mlp, to keep compile time down). What is compared is exact:
parameters bitwise, history metric values equal (only epoch_time_s is a clock reading).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from reference import SimpleNet

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, data, loop, models, optim, tree
from fashion_func.cli import app
from fashion_func.cli.config import Config
from fashion_func.step import make_eval_step

# SimpleNet, eager: 3 steps of 64 per epoch; StepLR halving the lr each epoch, top-2 epoch
# files, early stopping armed (patience far away), so every callback state has to survive
# a resume.
SIMPLE = dict(
    model="simplenet",
    epochs=4,
    batch_size=64,
    limit_train=192,
    limit_val=200,
    device="cpu",
    compile=False,
    progress=False,
    seed=7,
    lr_schedule="step",
    lr_step_size=1,
    lr_gamma=0.5,
    save_best_only=False,
    save_top_k=2,
    patience=10,
)
# the mlp: a few milliseconds per step, for tests about the loop's mechanics
MLP = dict(
    model="mlp",
    epochs=3,
    batch_size=128,
    limit_train=256,
    limit_val=200,
    device="cpu",
    compile=False,
    progress=False,
    tensorboard=False,
    seed=1,
)
TB_TAGS = {
    "train/loss": "train_loss",
    "train/acc": "train_acc",
    "val/loss": "val_loss",
    "val/acc": "val_acc",
    "lr": "lr",
    "epoch_time_s": "epoch_time_s",
}


# -- helpers ---------------------------------------------------------------------------------


def cfg_at(out: Path, base: dict[str, Any], **changes: Any) -> Config:
    return Config(**{**base, "out": str(out), **changes})


def metrics_only(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History records without the clock reading."""
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]


def read_history(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "history.json").read_text())


def assert_states_equal(a: Any, b: Any) -> None:
    """Two TrainStates bitwise equal: step, rng, params and every optimizer tensor."""
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert fa.keys() == fb.keys()
    unequal = [k for k in fa if not torch.equal(fa[k], fb[k])]
    assert not unequal, f"differ: {unequal[:5]}"


def last_meta(out: Path) -> dict[str, Any]:
    return checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")


def callback_states(out: Path) -> dict[str, Any]:
    """The callback states in last.safetensors, without the clock readings in the history."""
    states = json.loads(json.dumps(last_meta(out)["callbacks"]))
    states["TrainingMonitor"]["history"] = metrics_only(states["TrainingMonitor"]["history"])
    return states


def epoch_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("epoch-*.safetensors"))


def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's own reader sees the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def png_pixels(path: Path) -> Any:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


# -- shared runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Config, loop.FitResult]:
    """SimpleNet trained 4 epochs in one go: the reference the other runs are compared to."""
    cfg = cfg_at(tmp_path_factory.mktemp("straight") / "run", SIMPLE)
    return cfg, app.train(cfg)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Config, loop.FitResult, dict[str, Any]]:
    """The same run cut after epoch 2 (a separate fit with --epochs 2), then --resume auto to 4.

    Also returns what the directory held after the first part, for before/after checks.
    """
    cfg2 = cfg_at(tmp_path_factory.mktemp("resumed") / "run", SIMPLE, epochs=2)
    first = app.train(cfg2)
    out = cfg2.out_dir
    after_first = {
        "loss.png": (out / "loss.png").read_bytes(),
        "state": first.state,
        "log": (out / "train.log").read_text(),
        "epoch_files": epoch_files(out),
    }
    cfg4 = dataclasses.replace(cfg2, epochs=4)
    return cfg4, app.train(cfg4, resume="auto"), after_first


# -- the run directory -----------------------------------------------------------------------


def test_history_json_one_record_per_epoch(straight):
    cfg, result = straight
    history = read_history(cfg.out_dir)
    assert isinstance(history, list) and [r["epoch"] for r in history] == [1, 2, 3, 4]
    for r in history:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s"):
            assert isinstance(r[key], float), (key, r)
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["val_acc"] <= 1
        assert 0 < r["epoch_time_s"] < 120
    assert history == result.history
    # 4 epochs of Adam on 256 examples: the training loss falls
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result.epochs_run == 4 and result.stop_reason == "completed"


def test_history_lr_is_the_step_schedule(straight):
    """--lr-step-size 1 --lr-gamma 0.5: history 'lr' equals StepLR's value exactly, and the
    optimizer state holds (as float32) the lr of the epoch that would come next."""
    cfg, result = straight
    sched = cbs.StepLR(base_lr=cfg.lr, step_size=1, gamma=0.5)
    assert [r["lr"] for r in result.history] == [sched.lr_at(e) for e in (1, 2, 3, 4)]
    lr_state = optim.get_hyperparam(result.state.opt_state, "lr")
    assert lr_state.dtype == torch.float32
    assert lr_state.item() == torch.tensor(sched.lr_at(5), dtype=torch.float32).item()


def test_metric_values_match_an_independent_evaluation(straight):
    """val_loss / val_acc in the history are what the final parameters give on the validation set."""
    cfg, result = straight
    val = data.load("test", device="cpu", limit=cfg.limit_val)
    ev = make_eval_step(models.get("simplenet"), compile=False)
    out = ev(result.state.params, (val.images, val.labels))
    assert result.history[-1]["val_acc"] == out["correct"].double().mean().item()
    assert result.history[-1]["val_loss"] == pytest.approx(out["loss"].double().mean().item(), rel=1e-6)


def test_config_json_and_summary(straight):
    cfg, _ = straight
    out = cfg.out_dir
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    text = (out / "summary.txt").read_text()
    for name, shape, count in [
        ("conv1.weight", [32, 1, 3, 3], 288),
        ("conv2.weight", [64, 32, 3, 3], 18432),
        ("fc1.weight", [128, 9216], 1179648),
        ("fc2.bias", [10], 10),
    ]:
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(str(shape))}\s+{count:,}$", text, re.M), name
    stages = [("conv1", [32, 26, 26]), ("conv2", [64, 24, 24]), ("pool", [64, 12, 12]),
              ("conv2.relu", [64, 12, 12]), ("fc1", [128]), ("fc2", [10])]  # fmt: skip
    for stage, shape in stages:  # fc1 flattens its input itself (no transposing copy for NHWC)
        assert re.search(rf"^{re.escape(stage)}\s+{re.escape(str(['B', *shape]))}", text, re.M), stage
    assert "total parameters: 1,199,882" in text
    # conv1 26*26*32*9*2 + conv2 24*24*64*32*9*2 + fc1 9216*128*2 + fc2 128*10*2 (multiply-add = 2)
    assert f"forward FLOPs per example: {389_376 + 21_233_664 + 2_359_296 + 2_560:,}" in text


def test_train_log_records_seed_data_device_epochs_and_checkpoints(straight):
    cfg, _result = straight
    log = (cfg.out_dir / "train.log").read_text()
    source = data.load("test", device="cpu", limit=1).source
    assert f"seed {cfg.seed}, device cpu, data {source}" in log
    for e in range(1, 5):
        assert re.search(
            rf"epoch {e}/4 train_loss \d\.\d{{4}} train_acc .* val_loss .* val_acc .*s$", log, re.M
        )
    ckpt = cfg.out_dir / "checkpoints"
    assert len(re.findall(rf"saved {re.escape(str(ckpt / 'last.safetensors'))} \(step \d+\)", log)) == 4
    assert f"saved {ckpt / 'best.safetensors'} (val_loss " in log
    for name in epoch_files(cfg.out_dir):
        assert f"saved {ckpt / name}" in log
    assert "training ended after epoch 4: completed" in log


def test_plots_are_valid_pngs(straight):
    cfg, _ = straight
    for name in ("loss.png", "accuracy.png"):
        path = cfg.out_dir / name
        assert png_size(path) == (600, 400)  # figsize 6x4 at 100 dpi
        assert path.stat().st_size > 5000
        pixels = png_pixels(path)
        assert pixels.shape[:2] == (400, 600) and pixels.std() > 0.01  # something is drawn


def test_tensorboard_scalars_equal_history(straight):
    cfg, result = straight
    scalars = tb_scalars(cfg.out_dir)
    assert set(TB_TAGS) <= set(scalars)
    for tag, key in TB_TAGS.items():
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
        # TensorBoard stores float32
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in result.history], rel=1e-6)


def test_checkpoints_best_last_and_top_k(straight):
    """best.safetensors: the weights of the best epoch with epoch/monitor/value/model/config;
    --save-top-k 2 --save-best-only false keeps exactly the two best epoch files."""
    cfg, result = straight
    ckpt = cfg.out_dir / "checkpoints"
    losses = {r["epoch"]: r["val_loss"] for r in result.history}
    best_epoch = min(losses, key=losses.get)
    two_best = sorted(losses, key=losses.get)[:2]
    assert epoch_files(cfg.out_dir) == [f"epoch-{e:03d}.safetensors" for e in sorted(two_best)]

    params, meta = checkpoint.load_weights(ckpt / "best.safetensors")
    assert meta == {
        "epoch": best_epoch,
        "monitor": "val_loss",
        "value": losses[best_epoch],
        "model": "simplenet",
        "model_hparams": {"num_classes": 10},
        "config": cfg.to_dict(),
        "normalize_mean": data.MEAN,
        "normalize_std": data.STD,
        "splits": meta["splits"],  # the data's identity (tests/test_resume_rules.py checks its values)
    }
    assert set(meta["splits"]) == {"train", "held_out", "test", "digest"}
    same_epoch, _ = checkpoint.load_weights(ckpt / f"epoch-{best_epoch:03d}.safetensors")
    assert params.keys() == same_epoch.keys()
    assert all(torch.equal(params[k], same_epoch[k]) for k in params)
    assert result.best is not None and result.best["epoch"] == best_epoch

    # plain names: loads into a plain nn.Module without this library
    net = SimpleNet()
    net.load_state_dict(safetensors.torch.load_file(ckpt / "best.safetensors"))

    last, lmeta = checkpoint.load_state(ckpt / "last.safetensors", result.state)
    assert_states_equal(last, result.state)
    assert lmeta["epoch"] == 4 and lmeta["model"] == "simplenet" and lmeta["config"] == cfg.to_dict()
    assert "in_epoch" not in lmeta
    json.dumps(lmeta["callbacks"], allow_nan=False)  # callback states are plain JSON
    assert lmeta["callbacks"]["EarlyStopping"]["best_epoch"] == best_epoch


def test_same_seed_gives_identical_history(tmp_path):
    """Two runs with one seed: the same history.json metric values and parameters; another seed
    gives other values (so the comparison can fail)."""
    runs = [
        app.train(cfg_at(tmp_path / name, MLP, seed=seed, epochs=2))
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    ]
    a, b, c = (metrics_only(read_history(tmp_path / name)) for name in "abc")
    assert a == b and a != c
    assert_states_equal(runs[0].state, runs[1].state)


# -- exact resume ----------------------------------------------------------------------------


def test_resume_at_epoch_boundary_is_exact(straight, resumed):
    """4 epochs straight == 2 epochs, then --resume auto with --epochs 4: bitwise parameters,
    optimizer state, step and rng; equal history, callback states and checkpoint files."""
    cfg, ref = straight
    rcfg, res, _before = resumed
    assert res.epochs_run == 2 and res.stop_reason == "completed"
    assert_states_equal(res.state, ref.state)
    assert metrics_only(read_history(rcfg.out_dir)) == metrics_only(read_history(cfg.out_dir))
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]  # the history is continued
    assert callback_states(rcfg.out_dir) == callback_states(cfg.out_dir)
    assert epoch_files(rcfg.out_dir) == epoch_files(cfg.out_dir)
    best_r, meta_r = checkpoint.load_weights(rcfg.out_dir / "checkpoints" / "best.safetensors")
    best_s, meta_s = checkpoint.load_weights(cfg.out_dir / "checkpoints" / "best.safetensors")
    assert all(torch.equal(best_r[k], best_s[k]) for k in best_s)
    assert {k: v for k, v in meta_r.items() if k != "config"} == {
        k: v for k, v in meta_s.items() if k != "config"
    }


def test_resume_continues_plots_log_and_tensorboard(straight, resumed):
    cfg, _ref = straight
    rcfg, _res, before = resumed
    out = rcfg.out_dir
    # the plots were redrawn with all four epochs: pixel for pixel the straight run's
    assert (out / "loss.png").read_bytes() != before["loss.png"]
    for name in ("loss.png", "accuracy.png"):
        assert (png_pixels(out / name) == png_pixels(cfg.out_dir / name)).all(), name
    # the log is appended to, not replaced
    log = (out / "train.log").read_text()
    assert log.startswith(before["log"])
    assert "resumed from" in log and "at step 6 (epoch 3)" in log
    assert re.search(r"epoch 2/2 train_loss", log) and re.search(r"epoch 4/4 train_loss", log)
    # TensorBoard: each epoch once, across the two runs' event files
    scalars, ref_scalars = tb_scalars(out), tb_scalars(cfg.out_dir)
    for tag in TB_TAGS:
        if tag != "epoch_time_s":
            assert scalars[tag] == ref_scalars[tag], tag


def test_resume_mid_epoch_is_exact(straight, tmp_path):
    """fit(max_steps=5) stops in epoch 2 (3 steps an epoch) after saving last.safetensors with
    in_epoch metadata; resuming from it gives the straight run bitwise."""
    cfg, ref = straight
    cut_cfg = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    cut = app.train(cut_cfg, max_steps=5)
    assert int(cut.state.step) == 5 and cut.stop_reason == "max_steps 5 reached"
    meta = last_meta(cut_cfg.out_dir)
    assert meta["epoch"] == 1
    assert meta["in_epoch"]["epoch"] == 2 and meta["in_epoch"]["batch"] == 2
    assert [r["epoch"] for r in read_history(cut_cfg.out_dir)] == [1]

    res = app.train(cut_cfg, resume="auto")
    assert int(res.state.step) == 12
    assert_states_equal(res.state, ref.state)
    assert metrics_only(res.history) == metrics_only(ref.history)
    assert callback_states(cut_cfg.out_dir) == callback_states(cfg.out_dir)
    assert "in_epoch" not in last_meta(cut_cfg.out_dir)
    assert "(epoch 2, batch 2)" in (cut_cfg.out_dir / "train.log").read_text()


def test_resume_with_compile_is_exact(tmp_path):
    """The same with the compiled step (mlp, to keep compile time down): 2 epochs straight ==
    1 + resume to 2 == cut in epoch 2 + resume."""
    base = {**MLP, "compile": True, "epochs": 2, "limit_train": 384}  # 3 steps an epoch
    ref = app.train(cfg_at(tmp_path / "straight", base))
    one = cfg_at(tmp_path / "one", base, epochs=1)
    app.train(one)
    by_epoch = app.train(dataclasses.replace(one, epochs=2), resume="auto")
    mid = cfg_at(tmp_path / "mid", base)
    app.train(mid, max_steps=4)
    by_step = app.train(mid, resume="auto")
    for res in (by_epoch, by_step):
        assert_states_equal(res.state, ref.state)
        assert metrics_only(res.history) == metrics_only(ref.history)


def test_cosine_schedule_in_history(tmp_path):
    """--lr-schedule cosine: history 'lr' equals CosineAnnealingLR's value (t_max = --epochs).

    (Cosine's period is --epochs, so raising --epochs on resume changes the schedule from
    there on; the exact-resume tests use StepLR or a constant lr.)
    """
    res = app.train(cfg_at(tmp_path / "run", MLP, lr_schedule="cosine", epochs=3))
    sched = cbs.CosineLR(base_lr=1e-3, t_max=3)
    # the lr the optimizer applied: its float32 state, not the float64 the callback computed
    assert [np.float32(r["lr"]) for r in res.history] == [np.float32(sched.lr_at(e)) for e in (1, 2, 3)]
    assert len({r["lr"] for r in res.history}) == 3


def test_resume_keeps_early_stopping_patience(tmp_path):
    """The patience counter survives a resume: stopping happens at the same epoch either way.

    Monitoring train_loss with a min_delta larger than the loss never improves after epoch 1,
    so with patience 2 the run stops after epoch 3, whether or not it was restarted after epoch 2.
    """
    base = {**MLP, "monitor": "train_loss", "min_delta": 100.0, "patience": 2, "epochs": 10}
    ref = app.train(cfg_at(tmp_path / "straight", base))
    assert ref.epochs_run == 3 and "did not improve for 2 epochs" in ref.stop_reason
    cut = cfg_at(tmp_path / "cut", base, epochs=2)
    app.train(cut)
    assert last_meta(cut.out_dir)["callbacks"]["EarlyStopping"]["wait"] == 1
    res = app.train(dataclasses.replace(cut, epochs=10), resume="auto")
    assert res.epochs_run == 1 and res.stop_reason == ref.stop_reason
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
    assert_states_equal(res.state, ref.state)


def test_resume_auto_fresh_then_nothing_left_then_other_model_then_new_lr(tmp_path):
    """--resume auto before any checkpoint starts fresh; at --epochs already reached it trains
    nothing (and still reports the history); another model is refused; an --lr given on
    resume replaces the checkpoint's."""
    cfg = cfg_at(tmp_path / "run", MLP, epochs=1)
    first = app.train(cfg, resume="auto")
    assert first.epochs_run == 1 and int(first.state.step) == 2
    log = cfg.out_dir / "train.log"
    assert "starting fresh" in log.read_text()

    again = app.train(cfg, resume="auto")
    assert again.epochs_run == 0
    assert_states_equal(again.state, first.state)
    assert again.history == first.history  # reported from the checkpoint, not lost
    assert "nothing to train" in log.read_text()

    with pytest.raises(loop.RunError, match=r"holds a mlp model, not simplenet"):
        app.train(dataclasses.replace(cfg, model="simplenet", epochs=2), resume="auto")

    res = app.train(dataclasses.replace(cfg, epochs=2, lr=1e-4), resume="auto")
    assert [r["lr"] for r in res.history] == [1e-3, 1e-4]
    assert optim.get_hyperparam(res.state.opt_state, "lr").item() == pytest.approx(1e-4, rel=1e-7)
    assert "lr set to 0.0001" in log.read_text()


def test_tensorboard_after_a_replayed_epoch_shows_it_once(tmp_path):
    """A run that died after logging epoch 2 but before its last.safetensors is resumed from
    epoch 1's checkpoint: TensorBoard must not show epoch 2 twice."""
    cfg = cfg_at(tmp_path / "run", MLP, epochs=1, tensorboard=True)
    app.train(cfg)
    last = cfg.out_dir / "checkpoints" / "last.safetensors"
    shutil.copy(last, tmp_path / "epoch1.safetensors")
    app.train(dataclasses.replace(cfg, epochs=2), resume="auto")
    shutil.copy(tmp_path / "epoch1.safetensors", last)  # as if epoch 2's save never happened
    res = app.train(dataclasses.replace(cfg, epochs=2), resume="auto")
    scalars = tb_scalars(cfg.out_dir)
    assert [s for s, _ in scalars["val/loss"]] == [1, 2]
    assert scalars["val/loss"][-1][1] == pytest.approx(res.history[-1]["val_loss"], rel=1e-6)
    assert [r["epoch"] for r in read_history(cfg.out_dir)] == [1, 2]


# -- the loop carries out what callbacks ask ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scripted(cbs.Callback):
    """Emits the actions `script[epoch]` at EpochEnd(epoch); counts the events it saw."""

    script: dict[int, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def init(self) -> dict[str, Any]:
        return {"events": 0}

    def on_event(self, cb_state, event):
        state = {"events": cb_state["events"] + 1}
        if isinstance(event, cbs.EpochEnd):
            return state, list(self.script.get(event.epoch, ()))
        return state, []


def keep_all() -> cbs.ModelCheckpoint:
    return cbs.ModelCheckpoint(save_best_only=False, save_top_k=-1)


def test_set_hyperparam_changes_the_lr_the_step_uses(tmp_path):
    """lr set to 0 after epoch 1: epoch 2 leaves the parameters exactly where they were."""
    cfg = cfg_at(tmp_path / "run", MLP, epochs=2)
    callbacks = [Scripted(script={1: (cbs.SetHyperparam("lr", 0.0),)}), cbs.TrainingMonitor(), keep_all()]
    res = app.train(cfg, callbacks=callbacks)
    assert [r["lr"] for r in res.history] == [1e-3, 0.0]
    ckpt = cfg.out_dir / "checkpoints"
    p1, _ = checkpoint.load_weights(ckpt / "epoch-001.safetensors")
    p2, _ = checkpoint.load_weights(ckpt / "epoch-002.safetensors")
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert all(torch.equal(p1[k], res.state.params[k]) for k in p1)
    assert int(res.state.step) == 4  # the steps did run
    # the checkpoint written for epoch 1 already holds the new lr (actions: lr first)
    assert last_meta(cfg.out_dir)["lr"] == 0.0


def test_stop_comes_after_the_epochs_checkpoints(tmp_path, monkeypatch):
    """A Stop from the first callback still lets ModelCheckpoint's saves of that epoch happen;
    the plots are redrawn every epoch."""
    cfg = cfg_at(tmp_path / "run", MLP, epochs=5)
    drawn: list[list[int]] = []
    from fashion_func.loop import plots

    real_plot = plots.plot_history
    monkeypatch.setattr(
        plots,
        "plot_history",
        lambda records, out, **kw: (
            drawn.append([r["epoch"] for r in records]),
            real_plot(records, out, **kw),
        ),
    )
    callbacks = [
        Scripted(script={2: (cbs.Stop("scripted stop"), cbs.LogMessage("scripted message"))}),
        cbs.TrainingMonitor(),
        keep_all(),
    ]
    res = app.train(cfg, callbacks=callbacks)
    assert res.epochs_run == 2 and res.stop_reason == "scripted stop"
    assert drawn == [[1], [1, 2]]
    assert [r["epoch"] for r in read_history(cfg.out_dir)] == [1, 2]
    assert last_meta(cfg.out_dir)["epoch"] == 2
    assert epoch_files(cfg.out_dir) == ["epoch-001.safetensors", "epoch-002.safetensors"]
    # TrainBegin, EpochEnd x2, TrainEnd reached the callback; its state went into last
    assert last_meta(cfg.out_dir)["callbacks"]["Scripted"] == {"events": 3}
    log = (cfg.out_dir / "train.log").read_text()
    assert "scripted message" in log and "stopping: scripted stop" in log


def test_new_epoch_file_is_written_before_the_evicted_one_is_deleted(tmp_path, monkeypatch):
    """Actions run in list order: save epoch e, then delete epoch e - 1, so a crash between
    the two leaves an extra file, never a missing one."""
    cfg = cfg_at(tmp_path / "run", MLP, epochs=3)
    script = {
        e: (cbs.SaveCheckpoint("epoch", e, "val_loss", 0.0), cbs.DeleteCheckpoint("epoch", e - 1))
        for e in (1, 2, 3)
    }
    present_at_save: list[list[str]] = []
    real_save = checkpoint.save_weights

    def spy(path, params, *, metadata=None, **kw):
        present_at_save.append(epoch_files(cfg.out_dir))
        real_save(path, params, metadata=metadata, **kw)

    monkeypatch.setattr(checkpoint, "save_weights", spy)
    app.train(cfg, callbacks=[Scripted(script=script)])
    assert present_at_save == [[], ["epoch-001.safetensors"], ["epoch-002.safetensors"]]
    assert epoch_files(cfg.out_dir) == ["epoch-003.safetensors"]


def test_reduce_lr_on_plateau_from_the_config(tmp_path):
    """--lr-schedule plateau: the lr each epoch ran with is what ReduceLROnPlateau decided,
    replayed over the run's own history; at lr 1e-7 train_loss moves by far less than the
    plateau threshold (1e-4 relative), so it does not improve and the lr drops."""
    cfg = cfg_at(tmp_path / "run", MLP, epochs=5, lr=1e-7, lr_schedule="plateau", monitor="train_loss")
    plateau = next(cb for cb in app.build_callbacks(cfg) if isinstance(cb, cbs.ReduceLROnPlateau))
    assert (plateau.monitor, plateau.mode, plateau.factor, plateau.base_lr) == (
        "train_loss",
        "min",
        0.1,
        1e-7,
    )
    res = app.train(cfg)
    state, expected = plateau.init(), []
    for r in res.history:
        expected.append(cbs.decode_float(state["lr"]))
        state, _ = plateau.on_event(state, cbs.EpochEnd(r["epoch"], r))
    assert [r["lr"] for r in res.history] == expected
    assert expected[-1] < expected[0]  # it did reduce


def test_no_tensorboard_and_non_finite_stop(tmp_path):
    """A diverging run (sgd, lr 1e6) stops after the epoch whose loss turned non-finite and
    writes no checkpoint of that epoch's non-finite weights; with tensorboard off there is
    no tensorboard/."""
    cfg = cfg_at(tmp_path / "run", MLP, optimizer="sgd", lr=1e6, momentum=0.0, epochs=5)
    res = app.train(cfg)
    bad_epoch = res.epochs_run
    assert bad_epoch < 5 and res.stop_reason.startswith("non-finite loss at step")
    assert res.history[-1]["epoch"] == bad_epoch and "first_nonfinite_step" in res.history[-1]
    last = cfg.out_dir / "checkpoints" / "last.safetensors"
    if last.exists():  # written by an earlier, finite epoch
        assert last_meta(cfg.out_dir)["epoch"] < bad_epoch
    assert "parameters are not finite" in (cfg.out_dir / "train.log").read_text()
    assert not (cfg.out_dir / "tensorboard").exists()


def test_label_smoothing_changes_the_training_loss_only(tmp_path):
    plain = app.train(cfg_at(tmp_path / "plain", MLP, epochs=1))
    smooth = app.train(cfg_at(tmp_path / "smooth", MLP, epochs=1, label_smoothing=0.2))
    # same first batch, different objective: the smoothed loss is larger on a fresh model
    assert smooth.history[0]["train_loss"] > plain.history[0]["train_loss"]
    assert not torch.equal(smooth.state.params["linear1.weight"], plain.state.params["linear1.weight"])


def test_mid_epoch_resume_refuses_other_batches(tmp_path):
    out = tmp_path / "run"
    app.train(cfg_at(out, MLP, batch_size=64, epochs=2), max_steps=2)  # cut inside epoch 1 (4 steps)
    with pytest.raises(loop.RunError, match="batch_size 64 \\(now 32\\)"):
        app.train(cfg_at(out, MLP, batch_size=32, epochs=2), resume="auto")
    resumed = app.train(cfg_at(out, MLP, batch_size=64, epochs=2), resume="auto")
    assert resumed.epochs_run == 2


def test_plateau_lr_given_on_resume_is_the_lr_used(tmp_path):
    out = tmp_path / "run"
    base = {**MLP, "lr_schedule": "plateau", "epochs": 1}
    app.train(cfg_at(out, base))
    resumed = app.train(cfg_at(out, base, epochs=2, lr=5e-4), resume="auto")
    assert resumed.history[-1]["lr"] == pytest.approx(5e-4)
