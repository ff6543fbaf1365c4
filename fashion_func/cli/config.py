"""The run configuration: one frozen dataclass, validated on construction.

Values come from, in rising priority: the defaults here, the config saved in a checkpoint
being resumed, a `--config FILE` (JSON or TOML), and command-line flags
(`cli.parse_train_args`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fashion_func.safeio import FileError, display, read_regular, short_repr

__all__ = [
    "MAX_MEMBERS",
    "Config",
    "ConfigError",
    "infer_mode",
    "load_file",
    "load_preset",
    "parse_sweep",
    "presets",
]

MODELS = ("simplenet", "simplenet_bn", "alexnet", "mlp", "resnet")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
SCHEDULES = ("constant", "step", "cosine", "plateau", "onecycle")
NORMALIZE = ("dataset", "tutorial")
COMPILE = ("auto", "on", "off", "update")
MONITORS = ("val_loss", "val_acc", "train_loss", "train_acc")  # and val_top{K} / train_top{K}
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; /dev/zero must not fill memory
MAX_SEED = 2**63 - 1  # seeds travel as int64 tensors and torch.Generator seeds
MAX_MEMBERS = 1024  # models in one step (--ensemble, a sweep's combinations); memory is checked too


def infer_mode(monitor: str) -> str | None:
    """The direction a metric should move: `*_loss` falls (min), accuracies rise (max)."""
    if monitor.endswith("_loss"):
        return "min"
    if monitor.endswith("_acc") or "_top" in monitor:
        return "max"
    return None


class ConfigError(ValueError):
    """A configuration value is invalid (a usage error: exit code 2)."""


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run (written to `<out>/config.json`)."""

    model: str = "simplenet"
    width: int | None = None  # resnet's base width (channels of its first conv; default 16)
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False  # sgd only
    clip_norm: float | None = None
    label_smoothing: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    out: str | None = None
    device: str = "auto"
    compile: str = "auto"  # auto: the whole step on CUDA, the update on CPU; on; off; update
    precision: str = "fp32"
    normalize: str = "dataset"
    limit_train: int | None = None
    limit_val: int | None = None
    val_split: int = 0  # >0: hold out the last N training images for validation; test once at the end
    eval_batch_size: int = 1000
    # callbacks (the tutorial's config items)
    monitor: str = "val_loss"
    mode: str | None = None  # None: inferred from the monitor (min for *_loss, max for accuracies)
    patience: int | None = None
    min_delta: float = 0.0
    save_best_only: bool = True
    topk: int = 5  # the tutorial's Accuracy(topK): train_top{K} / val_top{K} in the history
    save_top_k: int | None = None  # epoch files kept; None: 1 with save_best_only, else all (-1)
    every_n_epochs: int = 1  # --save-every
    lr_schedule: str = "constant"
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0  # onecycle: epochs of linear warm-up from lr/10 (then linear to 0)
    # quality: augmentation in the train step, a moving average of the weights, flip-averaged eval
    crop_padding: int = 0  # random crop after zero padding by this many pixels
    flip: bool = False  # random horizontal flips
    cutout: int = 0  # a random square of this side blanked (Cutout / random erasing)
    ema: float | None = None  # decay of a moving average of the weights, evaluated and saved
    tta: bool = False  # evaluation averages the image's and its mirror image's probabilities
    tensorboard: bool = True
    progress: bool = True
    # many models in one vmapped step (fashion_func.ensemble)
    ensemble: int = 1  # K independently initialised members
    sweep: str | None = None  # "lr=1e-3,3e-4 weight_decay=0,5e-4": one member per combination

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # compile=True/False (API, JSON files) means on/off
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        errors = self.validate()
        if errors:
            raise ConfigError(errors[0])
        # frozen dataclass: the sanctioned way to fill derived defaults, recorded in config.json
        if self.mode is None:
            object.__setattr__(self, "mode", infer_mode(self.monitor) or "min")
        if self.save_top_k is None:
            object.__setattr__(self, "save_top_k", 1 if self.save_best_only else -1)

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
        if self.mode is not None:
            choice("mode", self.mode, ("min", "max"))
        for name in ("epochs", "batch_size", "eval_batch_size", "every_n_epochs", "lr_step_size"):
            if getattr(self, name) < 1:
                e.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        e.extend(self._float_errors())
        if not 0 <= self.seed <= MAX_SEED:
            e.append(f"--seed must be in [0, 2**63 - 1], got {short_repr(self.seed)}")
        for name in ("out", "data_dir"):
            if getattr(self, name) == "":
                e.append(f"--{name.replace('_', '-')} must not be empty (leave it out for the default)")
        if self.out is not None and self.out.strip("/") == "" and self.out:
            e.append("--out / is the root directory; give a run directory of its own")
        monitors = (*MONITORS, f"val_top{self.topk}", f"train_top{self.topk}")
        if self.monitor not in monitors:
            e.append(f"--monitor must be one of {', '.join(monitors)}, not {self.monitor!r}")
        elif self.mode in ("min", "max") and infer_mode(self.monitor) not in (None, self.mode):
            e.append(
                f"--mode {self.mode} contradicts --monitor {self.monitor}, which should "
                f"{'fall' if infer_mode(self.monitor) == 'min' else 'rise'}; leave --mode out to infer it"
            )
        for name in ("limit_train", "limit_val"):
            v = getattr(self, name)
            if v is not None and v < 1:
                e.append(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.patience is not None and self.patience < 1:
            e.append(f"--patience must be at least 1, got {self.patience}")
        if self.topk < 1:
            e.append(f"--topk must be at least 1, got {self.topk}")
        if self.save_top_k is not None and (self.save_top_k < -1 or self.save_top_k == 0):
            e.append(f"--save-top-k must be -1 (keep all) or at least 1, got {self.save_top_k}")
        e += self._member_errors()
        e += self._quality_errors()
        return e

    def _quality_errors(self) -> list[str]:
        e: list[str] = []
        if self.width is not None and (self.model != "resnet" or self.width < 1):
            e.append(
                "--width sets resnet's width (at least 1)"
                if self.model == "resnet"
                else f"--width applies to --model resnet, not {self.model}"
            )
        for name in ("val_split", "crop_padding", "cutout"):
            if getattr(self, name) < 0:
                e.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.crop_padding > 14 or self.cutout > 28:
            e.append("--crop-padding must be at most 14 and --cutout at most 28 (images are 28x28)")
        if self.ema is not None and not 0 < self.ema < 1:
            e.append(f"--ema is a decay in (0, 1), got {self.ema}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            e.append(f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}")
        elif self.warmup_epochs and self.lr_schedule != "onecycle":
            e.append("--warmup-epochs needs --lr-schedule onecycle")
        if self.nesterov and self.optimizer != "sgd":
            e.append("--nesterov applies to --optimizer sgd")
        return e

    def _member_errors(self) -> list[str]:
        if self.ensemble < 1:
            return [f"--ensemble must be at least 1, got {self.ensemble}"]
        if self.sweep is None:
            return []
        if self.ensemble > 1:
            return ["--sweep and --ensemble are exclusive: a sweep's members differ only in hyperparameters"]
        try:
            grid = parse_sweep(self.sweep)
        except ConfigError as exc:
            return [str(exc)]
        if "lr" in grid[0] and self.lr != Config.lr:
            return ["--lr and --sweep lr=... contradict each other: the sweep sets each member's lr"]
        if "lr" in grid[0] and self.lr_schedule not in ("constant", "onecycle"):
            # onecycle multiplies each member's own lr; the others set one lr for all
            return [
                f"--sweep lr needs --lr-schedule constant or onecycle "
                f"(a {self.lr_schedule} schedule sets one lr for all)"
            ]
        return []

    @property
    def members(self) -> int:
        """How many models one step trains: the ensemble's size or the sweep's combinations."""
        return len(parse_sweep(self.sweep)) if self.sweep else self.ensemble

    def _float_errors(self) -> list[str]:
        # `not x > 0` style tests: NaN compares false with everything, so it fails each range
        e: list[str] = []
        for name in ("lr", "clip_norm"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                e.append(f"--{name.replace('_', '-')} must be a finite positive number, got {v}")
        for name in ("weight_decay", "min_delta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                e.append(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        for name in ("momentum", "label_smoothing"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                e.append(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if not 0 < self.lr_gamma <= 1:
            e.append(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        elif self.lr_schedule == "plateau" and self.lr_gamma == 1:
            e.append("--lr-gamma must be below 1 with --lr-schedule plateau")
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
                    e.append(f"{flag} must be an integer, got {short_repr(value)}")
            elif "float" in kind:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    e.append(f"{flag} must be a number, got {short_repr(value)}")
            elif "bool" in kind:
                if not isinstance(value, bool):
                    e.append(f"{flag} must be true or false, got {short_repr(value)}")
            elif "str" in kind and not isinstance(value, str):
                e.append(f"{flag} must be a string, got {short_repr(value)}")
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


SWEEPABLE = ("lr", "weight_decay")


def parse_sweep(text: str) -> list[dict[str, float]]:
    """The members of a sweep, one dict of hyperparameters each, in grid order (the last name
    varies fastest): `"lr=1e-3,3e-4 weight_decay=0,5e-4"` gives four members."""
    axes: dict[str, list[float]] = {}
    for part in text.replace(";", " ").split():
        name, eq, values = part.partition("=")
        name = name.replace("-", "_")
        if not eq or name not in SWEEPABLE:
            raise ConfigError(
                f"--sweep takes NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}, not {part!r}"
            )
        if name in axes:
            raise ConfigError(f"--sweep names {name} twice")
        try:
            floats = [float(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--sweep {name}: values must be numbers, got {values!r}") from None
        low = 0.0 if name == "weight_decay" else math.nextafter(0.0, 1.0)
        if not all(math.isfinite(v) and v >= low for v in floats):
            raise ConfigError(f"--sweep {name}: values must be finite and {'>= 0' if low == 0 else '> 0'}")
        axes[name] = floats
    if not axes:
        raise ConfigError("--sweep is empty; give NAME=V1,V2,... (e.g. lr=1e-3,3e-4)")
    # counted before the grid is built: 30,000 values on each of two axes are 9x10^8 members
    count = math.prod(len(v) for v in axes.values())
    if count > MAX_MEMBERS:
        sizes = " x ".join(str(len(v)) for v in axes.values())
        raise ConfigError(
            f"--sweep has {count} combinations ({sizes}); at most {MAX_MEMBERS} members train at once"
        )
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def presets() -> list[str]:
    """The names of the presets shipped in the package (`fashion_func/cli/presets/*.toml`)."""
    folder = resources.files("fashion_func.cli") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The settings of the preset `name`, read as package data (works from an installed wheel)."""
    if name not in presets():
        raise ConfigError(f"--preset must be one of {', '.join(presets())}, not {name!r}")
    text = (resources.files("fashion_func.cli") / "presets" / f"{name}.toml").read_text(encoding="utf-8")
    values = {k.replace("-", "_"): v for k, v in tomllib.loads(text).items()}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Config)})
    if unknown:  # a packaging mistake, caught by the tests
        raise ConfigError(f"preset {name} has unknown keys: {', '.join(unknown)}")
    return values


def load_file(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a JSON or TOML config file (keys may use - or _)."""
    p = Path(path)
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        text = read_regular(p, limit=MAX_CONFIG_BYTES, what="config file").decode()
    except FileError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {display(p)} is not a text file") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {display(p)} is not valid {kind}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {display(p)} is not valid {kind}: nested too deeply") from None
    except ValueError:  # Python's limit on int() of huge digit strings
        raise ConfigError(
            f"config file {display(p)} is not valid {kind}: an integer of more than "
            f"{sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {display(p)} must hold a table/object of settings")
    return {k.replace("-", "_"): v for k, v in raw.items()}
