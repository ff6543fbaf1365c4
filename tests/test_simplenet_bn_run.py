"""`train.py --model simplenet_bn`: a stateful model through the command line, end to end.

It trains, resumes exactly (buffers included), and its best.safetensors loads strictly into a
plain `nn.Module` with `BatchNorm2d` layers that reproduces predict.py's accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reference import SimpleNetBN

from fashion_func import checkpoint, data
from fashion_func.cli import predict
from fashion_func.cli.train import main_train

ARGS = [
    "--model", "simplenet_bn", "--device", "cpu", "--compile", "off", "--no-progress", "--no-tensorboard",
    "--limit-train", "384", "--limit-val", "300", "--batch-size", "64", "--seed", "3",
]  # fmt: skip


def _history(out: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "epoch_time_s"}
        for r in json.loads((out / "history.json").read_text())
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bn")
    straight, resumed = tmp / "straight", tmp / "resumed"
    assert main_train([*ARGS, "--epochs", "2", "--out", str(straight)]) == 0
    assert main_train([*ARGS, "--epochs", "1", "--out", str(resumed)]) == 0
    assert main_train(["--resume", "auto", "--out", str(resumed), "--epochs", "2"]) == 0
    return straight, resumed


def test_resume_is_exact_buffers_included(runs):
    straight, resumed = runs
    a = safetensors.torch.load_file(straight / "checkpoints" / "last.safetensors")
    b = safetensors.torch.load_file(resumed / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    buffers = [k for k in a if "running_" in k or "num_batches_tracked" in k]
    assert len(buffers) == 6, sorted(a)  # bn1/bn2: mean, var, count travel in the train state
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _history(straight) == _history(resumed)
    assert [r["epoch"] for r in _history(straight)] == [1, 2]


def test_best_weights_load_strictly_into_a_plain_module_and_match_predict(runs, capsys):
    straight, _ = runs
    best = straight / "checkpoints" / "best.safetensors"
    weights = safetensors.torch.load_file(best)
    assert weights["bn2.num_batches_tracked"].dtype == torch.int64
    assert int(weights["bn2.num_batches_tracked"]) > 0  # trained statistics, not the initial ones
    module = SimpleNetBN()
    module.load_state_dict(weights, strict=True)
    module.eval()
    test = data.load("test", limit=300)
    with torch.no_grad():
        logits = module(data.normalize(test.images))
    module_acc = (logits.argmax(-1) == test.labels).double().mean().item()

    capsys.readouterr()
    assert predict.main(["--weights", str(best), "--limit", "300", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "simplenet_bn"
    assert report["accuracy"] == pytest.approx(module_acc, abs=1 / 300 + 1e-12)  # at most one tie flips
    meta_epoch = checkpoint.read_metadata(best)["epoch"]
    assert _history(straight)[meta_epoch - 1]["val_acc"] == pytest.approx(report["accuracy"], abs=1e-12)
