"""Memory bounded by what the user can see (fashion_func/cli/budget.py): size-like values are
capped, a sweep's grid is counted before it is built, and a run's bytes (parameters, optimizer
state, activations, data, for all members) are estimated on the meta device and refused above
the memory available: one line with the estimate and the flag behind it, exit 2, before any
file is written. A checkpoint's saved config goes through the same checks as the flags.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from fashion_func import checkpoint, data, models, optim
from fashion_func import state as state_lib
from fashion_func import step as step_lib
from fashion_func.cli import budget
from fashion_func.cli.config import MAX_MEMBERS, Config, ConfigError, load_preset, parse_sweep
from fashion_func.cli.train import main_train

GIB = 1 << 30
MACHINE = 24 * GIB  # the machine the issue measured on
CPU = torch.device("cpu")


def run_train(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main_train(argv)
    return code, err.getvalue()


def sweep_of(n: int) -> str:
    return "lr=" + ",".join(f"{(k + 1) * 1e-5:g}" for k in range(n))


def big_sweep_config(tmp_path: Path) -> Path:
    """The issue's config: a `sweep` of 30,000 x 30,000 = 9x10^8 combinations in ~200 KB."""
    values = ",".join(str(k + 1) for k in range(30_000))
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"sweep": f"lr={values} weight_decay={values}"}))
    assert 150_000 < path.stat().st_size < 1 << 20
    return path


# (flags, what the one line says): each refused before anything is allocated or written
REFUSED: dict[str, tuple[list[str], str]] = {
    "ensemble 1000": (["--ensemble", "1000"], "--ensemble 1000 needs about "),
    "ensemble above the cap": (["--ensemble", "5000"], f"--ensemble must be at most {MAX_MEMBERS}, got 5000"),
    "sweep of 1000": (["--sweep", sweep_of(1000)], "--sweep (1000 members) needs about "),
    "sweep above the cap": (
        ["--sweep", sweep_of(MAX_MEMBERS + 1)],
        f"--sweep has {MAX_MEMBERS + 1} combinations",
    ),
    "resnet width 100000": (["--model", "resnet", "--width", "100000"], "--width must be at most 65536"),
    "resnet width 60000": (["--model", "resnet", "--width", "60000"], "--width 60000 needs about "),
    "batch above the cap": (["--batch-size", "100000"], "--batch-size must be at most 60000"),
    "alexnet batch 60000": (
        ["--model", "alexnet", "--batch-size", "60000"],
        "--batch-size 60000 needs about ",
    ),
    "eval batch above the cap": (["--eval-batch-size", str(10**12)], "--eval-batch-size must be at most"),
}


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees the issue's 24 GiB machine, whatever it runs on."""
    monkeypatch.setattr(budget, "available", lambda device: MACHINE)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_run_too_large_is_one_line_exit_2_naming_the_flag(machine, tmp_path: Path, case: str) -> None:
    argv, message = REFUSED[case]
    out = tmp_path / "run"
    code, err = run_train([*argv, "--out", str(out), "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: "), err
    assert message in err
    if "needs about" in message:  # the estimate is given, against what the machine has
        assert " GB (parameters and optimizer state " in err and "more than the 25.8 GB available" in err
    assert not out.exists()  # refused before the run directory was opened


def test_the_issues_config_with_a_9e8_sweep_is_refused_while_it_is_checked(machine, tmp_path: Path) -> None:
    config = big_sweep_config(tmp_path)
    code, err = run_train(["--config", str(config), "--out", str(tmp_path / "run")])
    assert code == 2 and err.count("\n") == 1
    assert "--sweep has 900000000 combinations (30000 x 30000); at most 1024" in err


@pytest.mark.parametrize(
    ("spec", "count"),
    [("lr=1e-3", 1), (sweep_of(MAX_MEMBERS), MAX_MEMBERS), ("lr=" + ",".join(["1e-3"] * 32)
     + " weight_decay=" + ",".join(["0"] * 32), 1024), (sweep_of(MAX_MEMBERS + 1), MAX_MEMBERS + 1),
     ("lr=" + ",".join(["1e-3"] * 32) + " weight_decay=" + ",".join(["0"] * 33), 1056)],
    ids=["one", "cap-one-axis", "cap-two-axes", "cap+1", "two-axes-over"],
)  # fmt: skip
def test_a_sweep_is_counted_before_its_grid_is_built(spec: str, count: int) -> None:
    if count <= MAX_MEMBERS:
        assert len(parse_sweep(spec)) == count
    else:
        with pytest.raises(ConfigError, match=f"--sweep has {count} combinations"):
            parse_sweep(spec)


@pytest.mark.parametrize("name", sorted(budget.CAPS))
def test_every_size_like_value_is_capped(name: str) -> None:
    cap = budget.CAPS[name]
    extra = {"model": "resnet"} if name == "width" else {}
    budget.check_caps(Config(**extra, **{name: cap}))
    with pytest.raises(budget.BudgetError, match=f"--{name.replace('_', '-')} must be at most {cap}, got"):
        budget.check_caps(Config(**extra, **{name: cap + 1}))


def _last_with_config(tmp_path: Path, saved: dict) -> Path:
    """A valid last.safetensors (a tiny mlp state) whose metadata holds `saved` as its config."""
    model = models.get("mlp", H=4)
    tx = optim.adam(1e-3)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=0)
    path = tmp_path / "old" / "checkpoints" / "last.safetensors"
    path.parent.mkdir(parents=True)
    checkpoint.save_state(path, st, metadata={"config": saved, "model": saved.get("model", "simplenet")})
    return path


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"ensemble": 1000}, "--ensemble 1000 needs about "),
        ({"ensemble": 5000}, "--ensemble must be at most 1024"),
        ({"model": "resnet", "width": 100000}, "--width must be at most 65536"),
        ({"model": "resnet", "width": 60000}, "--width 60000 needs about "),
        ({"sweep": "lr=" + ",".join(["1e-3"] * 30_000) + " weight_decay=" + ",".join(["0"] * 30_000)},
         "--sweep has 900000000 combinations"),
    ],
    ids=["ensemble-1000", "ensemble-cap", "width-cap", "width-memory", "sweep-9e8"],
)  # fmt: skip
def test_a_checkpoint_whose_config_says_so_goes_through_the_same_checks(
    machine, tmp_path: Path, saved: dict, message: str
) -> None:
    last = _last_with_config(tmp_path, {**saved, "device": "cpu"})
    out = tmp_path / "run"
    code, err = run_train(["--resume", str(last), "--out", str(out)])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "values",
    [*({"preset": name} for name in ("tutorial", "quality", "speedrun", "best")), {"ensemble": 4}],
    ids=["tutorial", "quality", "speedrun", "best", "ensemble-4"],
)
def test_the_ordinary_presets_and_a_small_ensemble_fit_the_machine(values: dict) -> None:
    preset = load_preset(values.pop("preset")) if "preset" in values else {}
    cfg = Config.from_dict({**preset, **values})
    est = budget.check(cfg, CPU, limit=MACHINE)
    assert 0 < est.total < MACHINE // 2
    physical = budget.os.sysconf("SC_PHYS_PAGES") * budget.os.sysconf("SC_PAGE_SIZE")
    assert est.total < physical


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_the_state_estimate_counts_the_real_parameters_and_slots(name: str) -> None:
    """The estimate's parameter count is the real init's; its state bytes are parameters,
    gradients and slots (adam 2, sgd with momentum 1, +1 for --ema), twice for the next step."""
    hp = {"width": 4} if name == "resnet" else {}
    model = models.get(name, **hp)
    real = model.init(torch.Generator().manual_seed(0))
    p = models.num_params(real)
    b = sum(t.numel() for t in model.init_state().values())
    assert budget._model_sizes(model)[:2] == (p, b)
    base = {"model": name, **hp, "limit_train": 256, "limit_val": 256}
    for extra, slots in (({}, 2), ({"optimizer": "sgd"}, 1), ({"optimizer": "sgd", "momentum": 0.0}, 0),
                         ({"ema": 0.9}, 3), ({"ensemble": 3}, 2)):  # fmt: skip
        cfg = Config(**base, **extra)
        assert budget.estimate(cfg).state == cfg.members * 4 * (2 * (p * (1 + slots) + b) + p)


def test_activations_cover_the_forward_and_scale_with_batch_and_members() -> None:
    """simplenet's per-example activations are at least its layers' outputs (conv1 32x26x26,
    conv2 64x24x24, pool 64x12x12, fc1 128, fc2 10 floats); the training estimate is that
    times batch times 2 (backward) times members."""
    per_example = budget._model_sizes(models.get("simplenet"))[2]
    assert per_example >= 4 * (32 * 26 * 26 + 64 * 24 * 24 + 64 * 12 * 12 + 128 + 10)
    assert per_example < 4 * 4 * (32 * 26 * 26 + 64 * 24 * 24 + 64 * 12 * 12 + 128 + 10)
    one = budget.estimate(Config(batch_size=64, eval_batch_size=1)).activations
    assert one == per_example * 64 * budget.BACKWARD
    assert budget.estimate(Config(batch_size=64, eval_batch_size=1, ensemble=5)).activations == 5 * one
    eval_heavy = Config(batch_size=1, eval_batch_size=1000, tta=True)
    assert budget.estimate(eval_heavy).activations == per_example * 1000 * 2


def test_estimating_a_huge_model_allocates_nothing() -> None:
    """resnet at width 65536 has about 1.4x10^11 parameters: shapes only, on the meta device
    (a real allocation of them would fail here)."""
    est = budget.estimate(Config(model="resnet", width=models.MAX_SIZE))
    assert est.state > 1e12
    data_bytes = (data.MAX_EXAMPLES["train"] + data.MAX_EXAMPLES["test"]) * (28 * 28 + 8)
    assert est.data == data_bytes


@pytest.mark.parametrize(
    ("values", "flag"),
    [({"ensemble": 200}, "--ensemble 200"), ({"sweep": sweep_of(300)}, "--sweep (300 members)"),
     ({"model": "resnet", "width": 2000}, "--width 2000"),
     ({"model": "alexnet", "batch_size": 40000}, "--batch-size 40000"),
     ({"model": "alexnet", "eval_batch_size": 60000, "val_split": 50000}, "--eval-batch-size 60000"),
     ({"model": "resnet", "width": 1000, "ensemble": 2}, "--width 1000")],
    ids=["ensemble", "sweep", "width", "batch", "eval-batch", "width-over-ensemble"],
)  # fmt: skip
def test_the_refusal_names_the_flag_whose_default_shrinks_it_most(values: dict, flag: str) -> None:
    cfg = Config(**values)
    with pytest.raises(budget.BudgetError) as info:
        budget.check(cfg, CPU, limit=4 * GIB)
    assert str(info.value).startswith(f"{flag} needs about ") and "\n" not in str(info.value)
    assert f"lower {flag.split()[0]} (without it: about " in str(info.value)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_the_data_estimate_counts_what_each_model_keeps_per_example(name: str) -> None:
    """Every model keeps the uint8 images and int64 labels of both splits; a model of ScatterNet
    features also keeps their float32 features (81x7x7 per image for scatternet, 117x7x7 for
    scatternet_ms)."""
    model = models.get(name, **({"width": 4} if name == "resnet" else {}))
    cfg = Config(model=name, **({"width": 4} if name == "resnet" else {}), limit_train=300, limit_val=200)
    per_image = 8 + math.prod(model.input_shape)
    if model.takes_features:
        per_image = 8 + 28 * 28 + 4 * math.prod(model.input_shape)
    assert budget.estimate(cfg).data == 500 * per_image
    assert model.takes_features == name.startswith("scatternet")  # the features models, counted above


@pytest.mark.parametrize("batch", [1, 256, 2048])
@pytest.mark.parametrize("name", ["dpcnn", "scatternet", "scatternet_ms", "scatternet_ms3", "simplenet"])
def test_a_private_run_counts_one_chunk_of_per_example_gradients(name: str, batch: int) -> None:
    """A private run's batches are Poisson batches padded to their capacity, and its step holds
    `[chunk, parameters]` float32 gradients at once (step's chunking: at most 512 examples and
    256 MiB); the same run without DP-SGD has neither."""
    base = {"model": name, "batch_size": batch, "eval_batch_size": 1, "limit_train": 4096}
    plain, private = Config(**base), Config(**base, dp_max_grad_norm=1.0, dp_noise_multiplier=1.0)
    n, _, per_example = budget._model_sizes(models.get(name))
    padded = data.poisson_capacity(4096, batch / 4096)
    assert batch <= padded <= 4096
    chunk = max(1, min(padded, 512, (256 << 20) // (4 * n)))
    extra = budget.estimate(private).activations - budget.estimate(plain).activations
    assert extra == per_example * (padded - batch) * budget.BACKWARD + chunk * n * 4
    # the estimate bounds the chunk the step really takes for a padded batch and these parameters
    params = models.get(name).init(torch.Generator().manual_seed(0))
    assert step_lib._auto_chunk(padded, params) <= chunk
