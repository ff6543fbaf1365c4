"""The CUDA path: the quality pieces compiled on the GPU, the ensemble step there, and a whole
run of the command line on CUDA. Marked `cuda`: skipped where no CUDA device is present (run
them on the lent GPU machine: `pytest -m cuda`)."""

from __future__ import annotations

import json

import pytest
import torch

from fashion_func import ensemble, models, optim, schedules, step, tree
from fashion_func import state as state_lib
from fashion_func.augment import Augment
from fashion_func.cli import app
from fashion_func.cli import train as cli
from fashion_func.cli.config import Config

pytestmark = pytest.mark.cuda


def _batch(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    return x.cuda(), torch.randint(0, 10, (n,), generator=g).cuda()


def _quality_tx() -> optim.GradientTransformation:
    return optim.chain(
        optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        optim.scale_by_schedule(schedules.triangle(10, 3)),
        optim.ema(0.9),
    )


@pytest.mark.cross_path
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_compiled_quality_step_matches_eager_on_cuda(precision):
    """resnet (batch norm) + augmentation + onecycle + EMA: the fully compiled CUDA step
    follows the eager one (the same augmentation draws, the same schedule)."""
    model, tx = models.resnet(width=4), _quality_tx()
    params = model.init(torch.Generator().manual_seed(0), device=torch.device("cuda"))
    st = state_lib.create(params, tx, seed=3, model_state=model.init_state(device=torch.device("cuda")))
    pre = Augment(step.NormalizeImages(), crop_padding=2, flip=True, cutout=6)
    eager = step.make_train_step(model, tx, preprocess=pre, compile=False, precision=precision)
    fast = step.make_train_step(model, tx, preprocess=pre, compile=True, precision=precision)
    a = b = st
    for i in range(4):
        a, _ = eager(a, _batch(i))
        b, _ = fast(b, _batch(i))
    tol = {"fp32": 1e-3, "tf32": 2e-2}[precision]
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=tol, atol=tol)
    ema_a, ema_b = optim.ema_params(a.opt_state), optim.ema_params(b.opt_state)
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=tol, atol=tol)
    assert int(b.step) == 4 and b.params["fc.weight"].is_cuda


@pytest.mark.cross_path
def test_ensemble_member_equals_solo_run_on_cuda():
    model, tx = models.simplenet_bn(), optim.adam(1e-3)
    stacked = ensemble.init(model, tx, members=3, seed=5, device=torch.device("cuda"))
    ens_step = ensemble.make_train_step(model, tx, compile=True)
    solo_step = step.make_train_step(model, tx, compile=True)
    solo = ensemble.member(stacked, 1)
    for i in range(3):
        stacked, _ = ens_step(stacked, _batch(10 + i))
        solo, _ = solo_step(solo, _batch(10 + i))
    tree.map(
        lambda x, y: torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4),
        ensemble.member(stacked, 1).params,
        solo.params,
    )


def test_train_py_quality_flags_run_on_cuda(tmp_path, capsys):
    """A short run of the quality recipe's flags on CUDA: held-out validation, the test set
    measured once at the end with the best (averaged) weights, written to test.json."""
    out = tmp_path / "run"
    argv = ["--preset", "quality", "--device", "cuda", "--width", "4", "--epochs", "2",
            "--limit-train", "2048", "--val-split", "512", "--limit-val", "1000", "--ema", "0.9",
            "--cutout", "6", "--warmup-epochs", "0.5", "--out", str(out), "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    assert cli.main_train(argv) == 0
    report = json.loads((out / "test.json").read_text())
    assert report["examples"] == 1000 and 0.0 <= report["test_acc"] <= 1.0
    assert report["weights"].startswith("best weights")
    assert "test_acc" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["device"] == "cuda" and cfg["ema"] == 0.9
    assert app.build_model(Config.from_dict(cfg)).hparams["width"] == 4
