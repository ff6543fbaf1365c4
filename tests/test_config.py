"""Config validation: every bad value is one ConfigError naming the flag."""

from __future__ import annotations

import pytest

from fashion_func.config import Config, ConfigError, load_file


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 64.0}, "--batch-size must be an integer"),
        ({"limit_train": 100.0}, "--limit-train must be an integer"),
        ({"epochs": True}, "--epochs must be an integer"),
        ({"lr": "fast"}, "--lr must be a number"),
        ({"tensorboard": 1}, "--tensorboard must be true or false"),
        ({"out": 3}, "--out must be a string"),
        ({"monitor": "val_los"}, "--monitor must be one of"),
        ({"lr_schedule": "plateau", "lr_gamma": 1.0}, "below 1 with --lr-schedule plateau"),
        ({"compile": "maybe"}, "--compile must be one of"),
        ({"colour": "red"}, "unknown config keys: colour"),
    ],
)
def test_bad_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(values)


def test_good_values_pass_and_compile_booleans_mean_on_off():
    cfg = Config.from_dict({"lr": 1, "clip_norm": None, "limit_val": 500, "compile": False})
    assert cfg.lr == 1 and cfg.compile == "off"
    assert Config(compile=True).compile == "on" and Config().compile == "auto"


def test_binary_config_file_is_a_config_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="not a text file"):
        load_file(p)
