"""Property-based fuzz of resume pairs: a short first run with config A (a private run and a
sweep among them), then `--resume` with config B, two to four keys drawn over every config key,
the data keys, the `dp_` keys and the sweep's spellings included.

Each pair must end in exit 0 with B's values in effect (config.json, the new checkpoint's
metadata, and the optimizer state for the hyperparameters it holds) and the split identity
unchanged, or in exit 2 with one line on stderr and the run left as it was; never a traceback,
never a file touched outside --out. The first runs are made once per A and copied for each
pair. Hypothesis runs derandomized (the same cases every run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import make_dataset  # tests/ is on sys.path under pytest
from test_fuzz_cli import snapshot
from test_resume_rules import state_of

from fashion_func import checkpoint, optim
from fashion_func.cli import app
from fashion_func.cli.config import KEYS, Config
from fashion_func.cli.train import main_train

TINY = {"model": "mlp", "epochs": 1, "batch_size": 16, "device": "cpu", "compile": "off",
        "tensorboard": False, "progress": False}  # fmt: skip
FIRSTS = [  # the A configs
    {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "clip_norm": 1.0, "ema": 0.9, "limit_train": 48,
     "limit_val": 16},
    {"optimizer": "adam", "val_split": 8},
    {"optimizer": "sgd", "lr": 0.05, "nesterov": True, "lr_schedule": "onecycle", "limit_train": 48,
     "val_split": 8, "monitor": "val_acc"},
    # a private run: its checkpoint holds a privacy record that every B is held to
    {"optimizer": "sgd", "lr": 0.1, "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0, "limit_train": 48},
    # a sweep: B may spell its values otherwise (compared as values)
    {"optimizer": "sgd", "sweep": "lr=0.1,0.01", "limit_train": 48},
]  # fmt: skip
# B's values, every key; the data folder: "SAME" or "COPY" (the same files elsewhere)
VALUES: dict[str, list[Any]] = {
    "model": ["mlp", "simplenet"], "width": [None, 8], "epochs": [2, 3], "batch_size": [8, 16, 32],
    "lr": [0.001, 0.01, 0.02], "optimizer": ["sgd", "adam", "adamw"], "weight_decay": [0.0, 1e-4],
    "momentum": [0.0, 0.5, 0.9], "nesterov": [False, True], "clip_norm": [None, 1.0, 2.0],
    "label_smoothing": [0.0, 0.1], "seed": [0, 1], "data_dir": ["SAME", "COPY"], "out": ["OUT"],
    "device": ["cpu", "auto"], "compile": ["off"], "precision": ["fp32", "bf16"],
    "normalize": ["dataset", "tutorial"], "limit_train": [None, 32, 48], "limit_val": [None, 8, 16],
    "val_split": [0, 8], "eval_batch_size": [4, 1000], "monitor": ["val_loss", "val_acc"],
    "mode": ["min", "max"], "patience": [None, 2], "min_delta": [0.0, 0.01], "save_best_only": [True, False],
    "topk": [3, 5], "save_top_k": [-1, 1, 2], "every_n_epochs": [1, 2],
    "lr_schedule": ["constant", "step", "cosine", "onecycle"], "lr_step_size": [1, 30],
    "lr_gamma": [0.1, 0.5],
    "warmup_epochs": [0.0, 0.5], "crop_padding": [0, 2], "flip": [False, True], "cutout": [0, 4],
    "ema": [None, 0.8, 0.9], "tta": [False, True], "tensorboard": [False, True], "progress": [False],
    "ensemble": [1, 2], "sweep": [None, "lr=0.1,0.01", "lr=1e-1,1e-2"], "groups": [None, 2],
    "dp_max_grad_norm": [None, 1.0], "dp_noise_multiplier": [None, 1.0], "dp_target_epsilon": [None, 3.0],
    "dp_delta": [1e-5, 1e-3], "dp_accountant": ["rdp", "prv"],
}  # fmt: skip
FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz-resume")
    make_dataset(root / "data", n_train=64, n_test=24)
    shutil.copytree(root / "data", root / "data-copy")
    firsts = []
    for k, extra in enumerate(FIRSTS):
        out = root / f"first-{k}"
        app.train(Config(**{**TINY, **extra, "data_dir": str(root / "data"), "out": str(out)}))
        firsts.append(out)
    return {"root": root, "firsts": firsts, "pairs": 0, "codes": []}


def test_values_cover_every_key() -> None:
    assert set(VALUES) == set(KEYS), "give each new config key values to fuzz here"


def _b_file(world: dict[str, Any], out: Path, b: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    root = world["root"]
    folders = {"SAME": str(root / "data"), "COPY": str(root / "data-copy"), "OUT": str(out)}
    values = {k: folders.get(v, v) if isinstance(v, str) else v for k, v in b.items()}
    values["out"] = str(out)
    values.setdefault("epochs", 2)  # one more epoch: the new checkpoint records what ran
    path = root / f"b-{out.name}.json"
    path.write_text(json.dumps(values))
    return values, path


def _check_applied(out: Path, first: Path, values: dict[str, Any]) -> None:
    recorded = json.loads((out / "config.json").read_text())
    meta = checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")
    for key, value in values.items():
        if key == "sweep" and value is not None:  # a sweep is compared as values, not as its spelling
            assert Config(sweep=recorded[key]).sweep == Config(sweep=value).sweep, (recorded[key], value)
            assert Config(sweep=meta["config"][key]).sweep == Config(sweep=value).sweep, key
            continue
        assert recorded[key] == value, (key, recorded[key], value)
        assert meta["config"][key] == value, key
    held = optim.hyperparams(state_of(out).opt_state)
    swept = Config(sweep=recorded["sweep"]).sweep.names if recorded.get("sweep") else ()
    for key, value in values.items():
        hyper = KEYS[key].hyper
        if (
            hyper in held
            and value is not None
            and key not in swept  # each member holds its own value of a swept key
            and not (key == "lr" and recorded["lr_schedule"] != "constant")
        ):
            assert held[hyper].reshape(-1)[0].item() == pytest.approx(value, rel=1e-6), key
    assert meta["splits"] == checkpoint.read_metadata(first / "checkpoints" / "last.safetensors")["splits"]


# B gives two keys or more: each key alone, on a run that has what it changes, is a case of
# test_resume_rules's table; what the fuzz adds is keys together and other first runs
@settings(max_examples=60, **FUZZ)
@given(
    a=st.integers(0, len(FIRSTS) - 1),
    b=st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), min_size=2, max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.sampled_from(VALUES[k]) for k in keys})
    ),
)
def test_fuzz_resume_pairs(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, a: int,
    b: dict[str, Any],
) -> None:  # fmt: skip
    world["pairs"] += 1
    first, out = world["firsts"][a], world["root"] / f"pair-{world['pairs']}"
    shutil.copytree(first, out)
    values, b_path = _b_file(world, out, b)
    monkeypatch.chdir(world["root"])  # a stray relative path would land in the snapshot
    before = snapshot(world["root"], skip=out)
    last = out / "checkpoints" / "last.safetensors"
    last_bytes, config_json = last.read_bytes(), (out / "config.json").read_bytes()
    code = main_train(["--resume", str(last), "--config", str(b_path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert snapshot(world["root"], skip=out) == before
    assert code in (0, 2), (code, err)
    world["codes"].append(code)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
        assert last.read_bytes() == last_bytes and (out / "config.json").read_bytes() == config_json
    else:
        _check_applied(out, first, values)
    shutil.rmtree(out)


def test_the_pairs_ended_both_ways(world: dict[str, Any]) -> None:
    """Run after the fuzz (file order): a fuzz that only ever refused, or only ever ran, tests half."""
    if len(world["codes"]) < 60:
        pytest.fail("run the whole file: the fuzz above must run first")
    assert world["codes"].count(0) >= 15 and world["codes"].count(2) >= 15, world["codes"]
