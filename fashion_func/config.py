"""The run configuration: one frozen dataclass, validated on construction.

Values come from, in rising priority: the defaults here, the config saved in a checkpoint
being resumed, a `--config FILE` (JSON or TOML), and command-line flags
(`cli.parse_train_args`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

__all__ = ["Config", "ConfigError", "load_file"]

MODELS = ("simplenet", "simplenet_bn", "alexnet", "mlp")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
SCHEDULES = ("constant", "step", "cosine", "plateau")
NORMALIZE = ("dataset", "tutorial")
COMPILE = ("auto", "on", "off")
MONITORS = ("val_loss", "val_acc", "val_top5", "train_loss", "train_acc")


class ConfigError(ValueError):
    """A configuration value is invalid (a usage error: exit code 2)."""


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run (written to `<out>/config.json`)."""

    model: str = "simplenet"
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip_norm: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    out: str | None = None
    device: str = "auto"
    compile: str = "auto"  # auto: the whole step on CUDA, the optimizer update on CPU; on; off
    precision: str = "fp32"
    normalize: str = "dataset"
    limit_train: int | None = None
    limit_val: int | None = None
    eval_batch_size: int = 1000
    # callbacks (the tutorial's config items)
    monitor: str = "val_loss"
    mode: str = "min"
    patience: int | None = None
    min_delta: float = 0.0
    save_best_only: bool = True
    topk: int = 1
    every_n_epochs: int = 1
    lr_schedule: str = "constant"
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # compile=True/False (API, JSON files) means on/off
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        errors = self.validate()
        if errors:
            raise ConfigError(errors[0])

    def validate(self) -> list[str]:
        """Every problem with the values, as one-line messages (empty when valid)."""
        e = self._type_errors()
        if e:  # ranges below assume the types are right
            return e

        def choice(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                e.append(f"--{name.replace('_', '-')} must be one of {', '.join(options)}, not {value!r}")

        choice("model", self.model, MODELS)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("device", self.device, DEVICES)
        choice("precision", self.precision, PRECISIONS)
        choice("lr_schedule", self.lr_schedule, SCHEDULES)
        choice("normalize", self.normalize, NORMALIZE)
        choice("compile", self.compile, COMPILE)
        choice("mode", self.mode, ("min", "max"))
        for name in ("epochs", "batch_size", "eval_batch_size", "every_n_epochs", "lr_step_size"):
            if getattr(self, name) < 1:
                e.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            e.append(f"--lr must be positive, got {self.lr}")
        for name in ("weight_decay", "momentum", "min_delta", "label_smoothing"):
            if getattr(self, name) < 0:
                e.append(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.label_smoothing >= 1:
            e.append(f"--label-smoothing must be below 1, got {self.label_smoothing}")
        if not 0 < self.lr_gamma <= 1:
            e.append(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        elif self.lr_schedule == "plateau" and self.lr_gamma == 1:
            e.append("--lr-gamma must be below 1 with --lr-schedule plateau")
        if self.monitor not in MONITORS:
            e.append(f"--monitor must be one of {', '.join(MONITORS)}, not {self.monitor!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            e.append(f"--clip-norm must be positive, got {self.clip_norm}")
        for name in ("limit_train", "limit_val"):
            v = getattr(self, name)
            if v is not None and v < 1:
                e.append(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.patience is not None and self.patience < 1:
            e.append(f"--patience must be at least 1, got {self.patience}")
        if self.topk < -1 or self.topk == 0:
            e.append(f"--topk must be -1 (keep all) or at least 1, got {self.topk}")
        return e

    def _type_errors(self) -> list[str]:
        # values from JSON/TOML files arrive untyped: 64.0 is not a batch size
        e: list[str] = []
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type
            flag = f"--{f.name.replace('_', '-')}"
            optional = "None" in kind
            if value is None and optional:
                continue
            if "int" in kind and "float" not in kind:
                if isinstance(value, bool) or not isinstance(value, int):
                    e.append(f"{flag} must be an integer, got {value!r}")
            elif "float" in kind:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    e.append(f"{flag} must be a number, got {value!r}")
            elif "bool" in kind:
                if not isinstance(value, bool):
                    e.append(f"{flag} must be true or false, got {value!r}")
            elif "str" in kind and not isinstance(value, str):
                e.append(f"{flag} must be a string, got {value!r}")
        return e

    @property
    def out_dir(self) -> Path:
        """The run directory: `--out`, or `output/<model>`."""
        return Path(self.out) if self.out else Path("output") / self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config from a dict; unknown keys are a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as exc:  # a wrong type compared in validate()
            raise ConfigError(f"invalid config value: {exc}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a JSON or TOML config file (keys may use - or _)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not a text file") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a table/object of settings")
    return {k.replace("-", "_"): v for k, v in raw.items()}
