"""Config validation: good values, defaults that follow other values, config files and presets.
The table of bad values (flags, config files, dicts) is tests/test_usage_errors.py."""

from __future__ import annotations

import pytest

from fashion_func.cli.config import Config, ConfigError, layered, load_file


def test_good_values_pass_and_compile_booleans_mean_on_off():
    cfg = Config.from_dict({"lr": 1, "clip_norm": None, "limit_val": 500, "compile": False})
    assert cfg.lr == 1 and cfg.compile == "off"
    assert Config(compile=True).compile == "on" and Config().compile == "auto"


def test_binary_config_file_is_a_config_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="not a text file"):
        load_file(p)


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ("val_loss", "min"),
        ("train_loss", "min"),
        ("val_acc", "max"),
        ("train_acc", "max"),
        ("val_top3", "max"),
    ],
)
def test_mode_follows_the_monitored_metric_unless_given(monitor, mode):
    assert Config(monitor=monitor, topk=3).mode == mode


@pytest.mark.parametrize(("monitor", "mode"), [("val_acc", "min"), ("val_loss", "max"), ("val_top5", "min")])
def test_a_mode_contradicting_the_metric_is_a_usage_error(monitor, mode):
    with pytest.raises(ConfigError, match=f"--mode {mode} contradicts --monitor {monitor}"):
        Config(monitor=monitor, mode=mode)


def test_topk_is_the_accuracy_k_and_retention_is_save_top_k():
    assert Config().topk == 5 and Config().save_top_k == 1  # best only: one kept
    assert Config(save_best_only=False).save_top_k == -1  # the tutorial's: every epoch kept
    assert Config(save_best_only=False, save_top_k=3).save_top_k == 3
    with pytest.raises(ConfigError, match="--topk must be at least 1"):
        Config(topk=0)
    with pytest.raises(ConfigError, match="--save-top-k must be -1"):
        Config(save_top_k=0)
    with pytest.raises(ConfigError, match="--monitor must be one of"):
        Config(monitor="val_top5", topk=3)  # only the K being measured can be monitored


def test_the_tutorial_preset_is_package_data_and_flags_override_it():
    from fashion_func.cli import train as cli
    from fashion_func.cli.config import load_preset, presets

    assert "tutorial" in presets()
    values = load_preset("tutorial")
    assert values["seed"] == 1024 and values["normalize"] == "tutorial"
    cfg, _ = cli.parse_train_args(["--preset", "tutorial", "--topk", "3", "--epochs", "2"])
    assert (cfg.seed, cfg.normalize, cfg.topk, cfg.epochs) == (1024, "tutorial", 3, 2)
    assert (cfg.patience, cfg.lr_schedule, cfg.save_best_only) == (values["patience"], "step", True)
    assert cfg.weight_decay == values["weight_decay"] > 0
    choices = "best, private, private_features, quality, speedrun, tutorial"
    with pytest.raises(ConfigError, match=f"--preset must be one of {choices}"):
        load_preset("nope")


# One valid value for every optional setting (`Key.optional`), with what it needs beside it.
_SET = {
    "width": ({"width": 32}, {"model": "resnet"}),
    "groups": ({"groups": 4}, {"model": "dpcnn"}),
    "clip_norm": ({"clip_norm": 1.0}, {}),
    "limit_train": ({"limit_train": 100}, {}),
    "limit_val": ({"limit_val": 100}, {}),
    "mode": ({"mode": "max"}, {"monitor": "val_acc"}),
    "patience": ({"patience": 3}, {}),
    "save_top_k": ({"save_top_k": 2}, {}),
    "sweep": ({"sweep": "lr=1e-3,3e-4"}, {}),
    "ema": ({"ema": 0.99}, {}),
    "dp_max_grad_norm": ({"dp_max_grad_norm": 0.5}, {"dp_noise_multiplier": 1.0}),
    "dp_noise_multiplier": ({"dp_noise_multiplier": 1.0}, {}),
    "dp_target_epsilon": ({"dp_target_epsilon": 3.0}, {}),
}


def _unsettable_flags() -> dict[str, str]:
    """{setting: its flag} for every optional setting the train parser takes, paths aside."""
    from fashion_func.cli import train as cli
    from fashion_func.cli.config import KEYS

    return {
        a.dest: a.option_strings[0]
        for a in cli.build_train_parser()._actions
        if a.dest in KEYS and KEYS[a.dest].optional and a.dest not in ("data_dir", "out")
    }


def test_every_optional_setting_is_in_the_unset_table():
    from fashion_func.cli.config import UNSETTABLE

    assert set(_unsettable_flags()) == set(_SET) == UNSETTABLE


@pytest.mark.parametrize("name", sorted(_SET))
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_none_in_a_config_file_undoes_what_the_preset_set(name, suffix, tmp_path):
    """TOML has no null: the text "none" unsets there, as on the command line (JSON's null too)."""
    import json

    from fashion_func.cli import train as cli

    value, beside = _SET[name]
    below = tmp_path / "below.json"
    below.write_text(json.dumps({**value, **beside}))
    above = tmp_path / f"above{suffix}"
    above.write_text(f'{name} = "none"\n' if suffix == ".toml" else json.dumps({name: None}))
    base = cli._given_layers(["--config", str(below)])[0]
    unset = cli._given_layers(["--config", str(above)])[0][1]
    assert unset == {name: None}
    values = layered([base[1], unset])
    assert Config.from_dict(values) == Config.from_dict(dict(beside))


def test_a_path_named_none_stays_a_path(tmp_path):
    from fashion_func.cli import train as cli

    config = tmp_path / "c.toml"
    config.write_text('out = "none"\ndata_dir = "None"\n')
    cfg, _ = cli.parse_train_args(["--config", str(config), "--data-dir", "none"])
    assert (cfg.out, cfg.data_dir) == ("none", "none")


@pytest.mark.parametrize("name", sorted(_SET))
def test_none_on_the_command_line_undoes_what_a_config_file_set(name, tmp_path):
    import json

    from fashion_func.cli import train as cli

    value, beside = _SET[name]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**value, **beside}))
    flag = _unsettable_flags()[name]
    set_, _ = cli.parse_train_args(["--config", str(path)])
    unset, _ = cli.parse_train_args(["--config", str(path), flag, "None"])
    default = Config.from_dict(dict(beside))
    if name != "mode":  # a mode given must agree with the one inferred, so only it looks the same
        assert getattr(set_, name) != getattr(default, name)  # the file's value took effect
    assert getattr(unset, name) == getattr(default, name)  # and `none` gave the default back


def test_none_turns_off_the_private_features_weight_average():
    from fashion_func.cli import train as cli

    assert cli.parse_train_args(["--preset", "private_features"])[0].ema == 0.99
    assert cli.parse_train_args(["--preset", "private_features", "--ema", "none"])[0].ema is None
