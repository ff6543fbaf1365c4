"""What a config key given again on `--resume` does, for EVERY key of the config's own table.

Each key of `config.KEYS` is classified there (`Key.resume`), and its outcome is stated here
again, in CASES, so that reclassifying a key fails a test: run control and applied keys
take effect (config.json, the new checkpoint's metadata and, for an optimizer hyperparameter,
the state all hold the new value); refused keys and keys that would change the split identity
end in one line and exit 2, leaving the run as it was. A key added to the config without a
case here fails `test_every_key_has_a_case`. Also: dependent values re-derived when a higher
source gives what they depend on, and the split identity recorded in the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_data import make_dataset  # tests/ is on sys.path under pytest

from fashion_func import checkpoint, data, optim
from fashion_func.cli import app
from fashion_func.cli.config import APPLIED, KEYS, REFUSED, RUN, SPLIT, Config, flag, layered
from fashion_func.cli.train import main_train, parse_train_args
from fashion_func.loop import resume as resume_lib

# the first run: small, but with every optional part present, so each key has something to change
BASE: dict[str, Any] = {
    "model": "mlp", "epochs": 1, "batch_size": 16, "lr": 0.01, "optimizer": "sgd", "momentum": 0.5,
    "clip_norm": 1.0, "ema": 0.9, "patience": 3, "limit_train": 48, "limit_val": 16, "device": "cpu",
    "compile": "off", "tensorboard": False, "progress": False,
}  # fmt: skip
ONECYCLE = {"lr_schedule": "onecycle"}  # first runs for the keys that need them
STEP = {"lr_schedule": "step", "lr_step_size": 1, "lr_gamma": 0.5}
DPCNN = {"model": "dpcnn", "groups": 0}
# private first runs: no --clip-norm (the batch's clipping is refused with the examples')
PRIVATE = {"dp_noise_multiplier": 1.0, "clip_norm": None}
TARGET = {"dp_target_epsilon": 5.0, "clip_norm": None}

# key: (what giving it on resume does, the first run's extra settings, the value given on resume).
# The outcome is stated here, not read from KEYS: reclassifying a key in the code fails its case.
# RUN and APPLIED: the new value takes effect; REFUSED, and SPLIT here (each value changes the
# images): exit 2 with one line, the run left as it was.
CASES: dict[str, tuple[str, dict[str, Any], Any]] = {
    "model": (REFUSED, {}, "simplenet"),
    "width": (REFUSED, {}, 8),  # only resnet and dpcnn have a width: refused for the mlp run
    "groups": (REFUSED, DPCNN, 4),
    "epochs": (RUN, {}, 3),
    "batch_size": (APPLIED, {}, 8),
    "lr": (APPLIED, {}, 0.02),
    "optimizer": (REFUSED, {}, "adam"),
    "weight_decay": (APPLIED, {}, 1e-4),
    "momentum": (APPLIED, {}, 0.7),
    "nesterov": (REFUSED, {}, True),
    "clip_norm": (APPLIED, {}, 2.0),
    "label_smoothing": (APPLIED, {}, 0.1),
    "seed": (REFUSED, {}, 1),
    "data_dir": (RUN, {}, "COPY"),  # the same files in another folder
    "out": (RUN, {}, "OTHER"),
    "device": (RUN, {}, "auto"),
    "compile": (RUN, {}, "update"),
    "precision": (RUN, {}, "bf16"),
    "normalize": (APPLIED, {}, "tutorial"),
    "limit_train": (SPLIT, {}, 32),
    "limit_val": (SPLIT, {}, 8),
    "val_split": (SPLIT, {}, 8),
    "eval_batch_size": (RUN, {}, 4),
    "monitor": (REFUSED, {}, "val_acc"),
    "mode": (REFUSED, {}, "max"),
    "patience": (APPLIED, {}, 5),
    "min_delta": (APPLIED, {}, 0.01),
    "save_best_only": (APPLIED, {}, False),
    "topk": (APPLIED, {}, 3),
    "save_top_k": (APPLIED, {}, 2),
    "every_n_epochs": (APPLIED, {}, 2),
    "lr_schedule": (REFUSED, {}, "cosine"),
    "lr_step_size": (APPLIED, STEP, 2),
    "lr_gamma": (APPLIED, STEP, 0.3),
    "warmup_epochs": (APPLIED, ONECYCLE, 0.5),
    "crop_padding": (APPLIED, {}, 2),
    "flip": (APPLIED, {}, True),
    "cutout": (APPLIED, {}, 4),
    "ema": (APPLIED, {}, 0.8),
    "tta": (APPLIED, {}, True),
    "tensorboard": (RUN, {}, True),
    "progress": (RUN, {}, True),
    "ensemble": (REFUSED, {}, 2),
    "sweep": (REFUSED, {}, "lr=0.1,0.01"),
    # the accountant assumes one clipping norm, noise, delta for the whole run
    "dp_max_grad_norm": (REFUSED, PRIVATE, 2.0),
    "dp_noise_multiplier": (REFUSED, PRIVATE, 0.5),
    "dp_target_epsilon": (REFUSED, TARGET, 8.0),
    "dp_delta": (REFUSED, PRIVATE, 1e-6),
    "dp_accountant": (REFUSED, PRIVATE, "prv"),
}
# the applied keys whose value the optimizer state holds: key -> its hyperparameter there
HELD = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "clip_norm": "max_norm",
        "ema": "decay"}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume-rules")
    make_dataset(root / "data", n_train=64, n_test=24)
    shutil.copytree(root / "data", root / "data-copy")
    return {"root": root, "firsts": {}}


def first_run(world: dict[str, Any], extra: dict[str, Any]) -> Path:
    """The finished first run with BASE + `extra` (one per distinct `extra`, reused)."""
    name = json.dumps(extra, sort_keys=True)
    if name not in world["firsts"]:
        out = world["root"] / f"first-{len(world['firsts'])}"
        app.train(Config(**{**BASE, **extra, "data_dir": str(world["root"] / "data"), "out": str(out)}))
        world["firsts"][name] = out
    return world["firsts"][name]


def resume_with(
    world: dict[str, Any], first: Path, case: str, values: dict[str, Any]
) -> tuple[Path, list[str]]:
    """A copy of `first` and the argv resuming it with `values` given in a --config file."""
    out = world["root"] / f"case-{case}"
    shutil.copytree(first, out)
    (world["root"] / f"{case}.json").write_text(json.dumps({"out": str(out), **values}))
    argv = [
        "--resume",
        str(out / "checkpoints" / "last.safetensors"),
        "--config",
        str(world["root"] / f"{case}.json"),
    ]
    return out, argv


def state_of(run: Path) -> Any:
    """The TrainState in `run`'s last.safetensors, read with its own config.json."""
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    train = data.load("train", cfg.data_dir, limit=cfg.limit_train)
    steps = data.num_batches(len(train.labels) - cfg.val_split, cfg.batch_size)
    model, tx = app.build_model(cfg), app.build_optimizer(cfg, steps)
    template = app.initial_state(cfg, model, tx, data.load("test", cfg.data_dir, limit=1).images.device)
    return resume_lib.load(run / "checkpoints" / "last.safetensors", template).state


def test_every_key_has_a_case() -> None:
    assert list(CASES) == list(KEYS), "give each new config key a case here (and a resume class in KEYS)"
    assert {k.resume for k in KEYS.values()} == {RUN, APPLIED, REFUSED, SPLIT}


def test_the_table_classifies_each_key_as_stated_here() -> None:
    """KEYS's classes are the outcomes stated in CASES (the cases below show the behaviour), and
    its optimizer hyperparameters are HELD's."""
    assert {k: key.resume for k, key in KEYS.items()} == {k: case[0] for k, case in CASES.items()}
    assert {k: key.hyper for k, key in KEYS.items() if key.hyper} == HELD


@pytest.mark.parametrize("key", list(CASES))
def test_a_key_given_on_resume_takes_effect_or_is_refused(
    world: dict[str, Any], key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, extra, value = CASES[key]
    if key == "compile":  # what is recorded is checked, not the compiler (seconds of inductor)
        monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    first = first_run(world, extra)
    if value == "COPY":
        value = str(world["root"] / "data-copy")
    if value == "OTHER":
        value = str(world["root"] / f"other-{key}")
    out, argv = resume_with(world, first, key, {"epochs": 2, key: value} if key != "epochs" else {key: value})
    out = Path(value) if key == "out" else out
    before = (first / "checkpoints" / "last.safetensors").read_bytes()
    code = main_train(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if outcome in (REFUSED, SPLIT):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), err
        names = [flag(key)] + (["--sweep"] if key == "sweep" else [])
        assert any(n in lines[0] for n in names), lines[0]
        assert (out / "checkpoints" / "last.safetensors").read_bytes() == before  # the run as it was
        assert (
            json.loads((out / "config.json").read_text())[key]
            == json.loads((first / "config.json").read_text())[key]
        )
        return
    assert code == 0, err
    recorded = json.loads((out / "config.json").read_text())
    assert recorded[key] == value
    meta = checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")
    assert meta["config"][key] == value
    assert meta["epoch"] == (3 if key == "epochs" else 2)
    if key in HELD:
        held = optim.get_hyperparam(state_of(out).opt_state, HELD[key])
        assert held.item() == pytest.approx(value, rel=1e-6)
    assert meta["splits"] == checkpoint.read_metadata(first / "checkpoints" / "last.safetensors")["splits"]


def test_a_data_dir_with_other_images_is_refused(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A run on all of its dataset resumed over a smaller one trains on other images: the split
    identity says so (a --limit-train larger than the dataset is an error of its own)."""
    make_dataset(world["root"] / "data-small", n_train=40, n_test=24)
    _, argv = resume_with(
        world,
        first_run(world, {"limit_train": None, "limit_val": None}),
        "small",
        {"epochs": 2, "data_dir": str(world["root"] / "data-small")},
    )
    assert main_train(argv) == 2
    line = capsys.readouterr().err.strip()
    assert (
        "\n" not in line
        and "was trained on other images (train 64, held_out 0, test 24; now train 40" in line
    )
    assert "--limit-train" in line


def test_split_identity_names_counts_and_indices() -> None:
    import torch

    def split(n: int) -> data.Split:
        return data.Split(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64), "x")

    whole = app.split_identity(split(48), split(16), None)
    held = app.split_identity(*data.hold_out(split(48), 8), split(16))
    assert {k: whole[k] for k in ("train", "held_out", "test")} == {"train": 48, "held_out": 0, "test": 16}
    assert {k: held[k] for k in ("train", "held_out", "test")} == {"train": 40, "held_out": 8, "test": 16}
    # the same counts over other indices differ in the digest: 40 + 8 held out vs 40 + 8 more test
    assert whole["digest"] != held["digest"]
    assert app.split_identity(split(48), split(16), None) == whole


# (key, the key it depends on): argv where a lower source (preset, config file, saved run) gave
# the key and a flag gives what it depends on, and the value the key then has
DEPENDENT = [
    ("mode", "monitor", ["--preset", "tutorial", "--monitor", "val_acc"], "max"),
    ("width", "model", ["--preset", "quality", "--model", "mlp"], None),
    ("groups", "model", ["--config", "DPCNN.json", "--model", "mlp"], None),
    ("nesterov", "optimizer", ["--preset", "quality", "--optimizer", "adam"], False),
    ("nesterov", "momentum", ["--preset", "quality", "--momentum", "0"], False),
    ("save_top_k", "save_best_only", ["--config", "SAVE.json", "--save-best-only", "false"], -1),
    ("lr_schedule", "lr_step_size", ["--preset", "quality", "--lr-step-size", "5"], "step"),
    ("warmup_epochs", "lr_schedule", ["--preset", "quality", "--lr-schedule", "cosine"], 0.0),
    ("warmup_epochs", "epochs", ["--preset", "quality", "--epochs", "2"], 0.0),
]
# the same with the dependent value still consistent: it is kept
KEPT = [
    ("nesterov", ["--preset", "quality", "--momentum", "0.8"], True),
    ("warmup_epochs", ["--preset", "quality", "--epochs", "3"], 2.0),
    ("width", ["--preset", "quality", "--model", "resnet"], 12),
    ("groups", ["--config", "DPCNN.json", "--model", "dpcnn"], 4),
]


def test_every_dependent_pair_has_a_case() -> None:
    pairs = {(name, dep) for name, key in KEYS.items() for dep in key.follows}
    assert {(k, d) for k, d, _, _ in DEPENDENT} == pairs


def _argv(argv: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "SAVE.json").write_text(json.dumps({"save_best_only": True, "save_top_k": 3}))
    (tmp_path / "DPCNN.json").write_text(json.dumps({"model": "dpcnn", "groups": 4}))
    return [str(tmp_path / a) if a in ("SAVE.json", "DPCNN.json") else a for a in argv]


@pytest.mark.parametrize(("key", "dep", "argv", "want"), DEPENDENT)
def test_a_dependent_value_is_derived_again(
    tmp_path: Path, key: str, dep: str, argv: list[str], want: Any
) -> None:
    cfg, _ = parse_train_args(_argv(argv, tmp_path))
    assert getattr(cfg, key) == want


@pytest.mark.parametrize(("key", "argv", "want"), KEPT)
def test_a_dependent_value_still_consistent_is_kept(
    tmp_path: Path, key: str, argv: list[str], want: Any
) -> None:
    cfg, _ = parse_train_args(_argv(argv, tmp_path))
    assert getattr(cfg, key) == want


def test_both_values_from_one_source_still_contradict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_train(["--monitor", "val_acc", "--mode", "min", "--out", "never"]) == 2
    assert "--mode min contradicts --monitor val_acc" in capsys.readouterr().err
    # a saved run's config < flags: --monitor on resume re-derives the saved mode
    assert layered([{"monitor": "val_loss", "mode": "min"}, {"monitor": "val_acc"}]) == {"monitor": "val_acc"}


def test_nesterov_without_momentum_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main_train(["--optimizer", "sgd", "--nesterov", "--momentum", "0", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err == "train.py: error: --nesterov needs a --momentum above 0\n"
    assert not (tmp_path / "x").exists()


def test_a_private_run_keeps_its_batch_size_and_takes_its_default_norm_given(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A private run's --batch-size is its sampling rate (accounted): a changed one is refused,
    though batch_size is applied for other runs. Its clipping norm, left at the default, may
    be given as that default on resume: the same run."""
    first = first_run(world, PRIVATE)
    out, argv = resume_with(world, first, "private-batch", {"epochs": 2, "batch_size": 8})
    assert main_train(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line == (
        "train.py: error: --batch-size 8 differs from the resumed private run's 16: its sampling rate "
        "is part of the privacy accounting; resume it with the same --batch-size"
    )
    assert not (out / "checkpoints" / "epoch-002.safetensors").exists()
    out, argv = resume_with(world, first, "private-norm", {"epochs": 2, "dp_max_grad_norm": 1.0})
    assert main_train(argv) == 0, capsys.readouterr().err
    meta = checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")
    assert meta["epoch"] == 2 and meta["privacy"]["max_grad_norm"] == 1.0


# the optional settings that give the optimizer state a part (`Key.part`): unset on the command
# line (`none`, tests/test_config.py) or set where the first run had none, each is refused in the
# command line's words, the unset side named `none`
PARTS = {"clip_norm": 2.0, "ema": 0.5}


def test_every_optional_part_has_a_case() -> None:
    assert {k for k, key in KEYS.items() if key.part and key.optional} == set(PARTS)


@pytest.mark.parametrize("key", sorted(PARTS))
@pytest.mark.parametrize("direction", ["unset", "set"])
def test_a_part_given_or_taken_on_resume_is_refused_naming_none(
    world: dict[str, Any], key: str, direction: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = first_run(world, {} if direction == "unset" else {key: None})
    out = tmp_path / "run"
    shutil.copytree(first, out)
    given = "none" if direction == "unset" else str(PARTS[key])
    saved = json.loads((first / "config.json").read_text())[key]
    argv = ["--resume", str(out / "checkpoints" / "last.safetensors"), "--epochs", "2", flag(key), given]
    assert main_train(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "None" not in lines[0], lines
    shown = "none" if saved is None else str(saved)
    assert f"{flag(key)} {given} cannot replace the resumed run's {shown}" in lines[0], lines[0]
