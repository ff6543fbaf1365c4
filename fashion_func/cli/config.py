"""The run configuration: one frozen dataclass, validated on construction, and `layered`, the
priority of its sources. `KEYS` describes every key (its check, its resume rule and what depends
on it). `--sweep`'s text becomes a `Sweep` as the config is built; config.json keeps the text.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from fashion_func.cli.words import flag
from fashion_func.safeio import FileError, display, read_regular, short_repr

__all__ = ["KEYS", "Config", "ConfigError", "Sweep", "load_file", "load_preset", "presets"]

# MODELS, WIDE_MODELS, PRECISIONS and ACCOUNTANTS copy core facts so that this module imports no
# torch (a usage error exits before torch loads); tests/test_public_face.py keeps each equal to the core
MODELS = (
    "simplenet",
    "simplenet_bn",
    "alexnet",
    "mlp",
    "resnet",
    "dpcnn",
    "scatternet",
    "scatternet_ms",
    "scatternet_ms3",
)
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
SCHEDULES = ("constant", "step", "cosine", "plateau", "onecycle")
NORMALIZE = ("dataset", "tutorial")
COMPILE = ("auto", "on", "off", "update")
ACCOUNTANTS = ("rdp", "prv")  # privacy.ACCOUNTANTS (this module imports no torch)
DP_MAX_GRAD_NORM = 1.0  # private training's clipping norm when --dp-max-grad-norm is not given
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


@dataclass(frozen=True, repr=False)
class Sweep:
    """A parsed `--sweep`: its axes, each a hyperparameter and its values, in the order given.

    Equal when the values are (`lr=1e-3,1e-2` is `lr=0.001,0.01`); `str()` and `repr()` give
    the text it was parsed from (what config.json records and messages show).
    """

    axes: tuple[tuple[str, tuple[float, ...]], ...]
    text: str = field(default="", compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The swept hyperparameters."""
        return tuple(name for name, _ in self.axes)

    def members(self) -> list[dict[str, float]]:
        """One dict of hyperparameters per member, in grid order (the last name varies fastest)."""
        values = (v for _, v in self.axes)
        return [dict(zip(self.names, combo, strict=True)) for combo in itertools.product(*values)]

    def __len__(self) -> int:
        return math.prod(len(v) for _, v in self.axes)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return repr(self.text)


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run (written to `<out>/config.json`).

    Each field's type, allowed values, the keys it depends on and what it does on `--resume`
    are in `KEYS`, the one table `validate` walks.
    """

    model: str = "simplenet"
    width: int | None = None  # resnet's / dpcnn's base width (channels of its first conv; default 16)
    groups: int | None = None  # dpcnn's group norm: groups per conv (0 or None: no group norm)
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
    sweep: Sweep | None = None  # "lr=1e-3,3e-4 weight_decay=0,5e-4" (parsed): one member per combination
    # private training (DP-SGD, fashion_func.privacy): on when a dp_ key below other than
    # delta / accountant is given (or a sweep over one); Poisson sampling of --batch-size / N
    dp_max_grad_norm: float | None = None  # C: each example's gradient clipped to it (default 1.0)
    dp_noise_multiplier: float | None = None  # sigma: Gaussian noise of std sigma * C on the sum
    dp_target_epsilon: float | None = None  # or sigma chosen so that --epochs end at this epsilon
    dp_delta: float = 1e-5  # the delta epsilon is computed at (below 1 / training examples)
    dp_accountant: str = "rdp"  # Opacus's accountant: rdp or prv

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # compile=True/False (API, JSON files) means on/off
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        # the one parse; a text that fails stays, and `_sweep` words it
        object.__setattr__(self, "sweep", _as_sweep(self.sweep))
        errors = self.validate()
        if errors:
            raise ConfigError(errors[0])
        # frozen dataclass: the sanctioned way to fill derived defaults, recorded in config.json
        if self.mode is None:
            object.__setattr__(self, "mode", infer_mode(self.monitor) or "min")
        if self.save_top_k is None:
            object.__setattr__(self, "save_top_k", 1 if self.save_best_only else -1)

    def validate(self) -> list[str]:
        """Every problem with the values, as one-line messages (empty when valid).

        Types first (the ranges assume them), then each key's own range or choices, then
        the rules that involve other keys, each in `KEYS` order.
        """
        values = {name: getattr(self, name) for name in KEYS}
        errors = [f"{flag(n)} {p}" for n, key in KEYS.items() if (p := key.type_problem(values[n]))]
        if errors:
            return errors
        errors = [f"{flag(n)} {p}" for n, key in KEYS.items() if (p := key.value_problem(values[n]))]
        return errors + [p for key in KEYS.values() if key.needs and (p := key.needs(self))]

    @property
    def members(self) -> int:
        """How many models one step trains: the ensemble's size or the sweep's combinations."""
        return len(self.sweep) if isinstance(self.sweep, Sweep) else self.ensemble

    @property
    def out_dir(self) -> Path:
        """The run directory: `--out`, or `output/<model>`."""
        return Path(self.out) if self.out else Path("output") / self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (a sweep as its text), as config.json holds them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "sweep": None if self.sweep is None else str(self.sweep)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A Config from a dict; unknown keys are a ConfigError."""
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


# What a key given again on `--resume` does (KEYS[name].resume):
RUN = "run"  # run control: where and how this process runs (out, device, epochs, ...); takes effect
APPLIED = "applied"  # built again from the config on every start, or written into the state (Key.hyper)
REFUSED = "refused"  # fixed by what was trained (model, optimizer, seed, ...): another value is refused
SPLIT = "split"  # chooses the images: refused when it would change the split identity

Problem = Callable[[Any], "str | None"]
_KINDS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number")}
DROP = object()  # Key.derived's answer for "back to the default"


@dataclass(frozen=True)
class Key:
    """One config key: its type, its own range or choices, the rule it shares with other keys
    (`needs`, which names `follows`), and what giving it again on `--resume` does."""

    kind: type  # int, float, bool, str or Sweep; None is allowed where the field's default is None
    optional: bool
    check: Problem | None = None  # the value's own rule: what is wrong with it, or None
    needs: Callable[[Config], str | None] | None = None  # a rule involving the keys in `follows`
    follows: tuple[str, ...] = ()  # a lower source's value is derived again when these are given
    derived: Callable[[Mapping[str, Any]], Any] | None = None  # the value then, from the others
    # (None, or DROP returned: the field's default, or what __post_init__ infers from the others)
    resume: str = APPLIED
    hyper: str | None = None  # the optimizer state's hyperparameter an APPLIED key is written to
    # what `resume.compatible` compares: a REFUSED key's value as the run uses it, and whether it
    # decides the stack of members; whether a `hyper` key's value gives the state a part for it
    as_run: Callable[[Any], Any] = lambda v: v
    members: bool = False
    part: Callable[[Mapping[str, Any]], bool] | None = None

    def type_problem(self, value: Any) -> str | None:
        """What is wrong with the type of `value` (files arrive untyped: 64.0 is no batch size)."""
        if value is None and self.optional:
            return None
        # a str, or a Sweep (given as its text), else the kind's own; a bool is no number
        accepted, what = _KINDS.get(self.kind, ((str, self.kind), "a string"))
        ok = isinstance(value, accepted) and (self.kind is bool or not isinstance(value, bool))
        return None if ok else f"must be {what}, got {short_repr(value)}"

    def value_problem(self, value: Any) -> str | None:
        """What is wrong with `value` on its own (type already right), or None."""
        if value is None or self.check is None:
            return None
        return self.check(value)


def _rule(ok: Callable[[Any], bool], says: str) -> Problem:
    """A check: `ok(value)` or "{says}, got {value}". NaN fails every `ok` written as a
    positive test (`x > 0`), since it compares false with everything."""
    return lambda v: None if ok(v) else f"{says}, got {short_repr(v)}"


def _choice(options: tuple[str, ...]) -> Problem:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}, not {v!r}"


def _finite(ok: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and ok(v)


AT_LEAST_1 = _rule(lambda v: v >= 1, "must be at least 1")
NOT_NEGATIVE = _rule(lambda v: v >= 0, "must be >= 0")
POSITIVE = _rule(_finite(lambda v: v > 0), "must be a finite positive number")
FINITE_NOT_NEGATIVE = _rule(_finite(lambda v: v >= 0), "must be a finite number >= 0")
FRACTION = _rule(lambda v: 0 <= v < 1, "must be in [0, 1)")


def _pixels(limit: int) -> Problem:
    """A size in pixels of a 28x28 image: >= 0 and at most `limit`."""
    return lambda v: (
        NOT_NEGATIVE(v) or (None if v <= limit else f"must be at most {limit} (images are 28x28), got {v}")
    )


def _path(v: str) -> str | None:
    return "must not be empty (leave it out for the default)" if v == "" else None


def _out(v: str) -> str | None:
    if v and v.strip("/") == "":
        return "/ is the root directory; give a run directory of its own"
    return _path(v)


def _monitor(c: Config) -> str | None:
    monitors = (*MONITORS, f"val_top{c.topk}", f"train_top{c.topk}")
    if c.monitor not in monitors:
        return f"--monitor must be one of {', '.join(monitors)}, not {c.monitor!r}"
    return None


def _mode(c: Config) -> str | None:
    want = infer_mode(c.monitor)
    if c.mode is None or want in (None, c.mode) or _monitor(c):
        return None
    return (
        f"--mode {c.mode} contradicts --monitor {c.monitor}, which should "
        f"{'fall' if want == 'min' else 'rise'}; leave --mode out to infer it"
    )


WIDE_MODELS = ("resnet", "dpcnn")  # the models with a width hparam


def has_batch_norm(model: str) -> bool:
    """Whether the core's model `model` has batch norm (it is stateful), which mixes a batch's examples."""
    from fashion_func import models  # the core's own record; imported here, as it imports torch

    return model in models.MODELS and models.get(model).stateful


def _width(c: Config) -> str | None:
    if c.width is None:
        return None
    if c.model not in WIDE_MODELS:
        return f"--width applies to --model {' or '.join(WIDE_MODELS)}, not {c.model}"
    return None if c.width >= 1 else f"--width sets {c.model}'s width (at least 1)"


def _groups(c: Config) -> str | None:
    if c.groups is None:
        return None
    if c.model != "dpcnn":
        return f"--groups applies to --model dpcnn, not {c.model}"
    width = c.width or 16
    if c.groups and (width % c.groups or _width(c)):
        return f"--groups {c.groups} must divide dpcnn's width ({width})"
    return None


DP_KEYS = ("dp_max_grad_norm", "dp_noise_multiplier", "dp_target_epsilon")  # any given: private


def is_private(c: Config) -> bool:
    """Whether the config trains privately."""
    swept = c.sweep.names if isinstance(c.sweep, Sweep) else ()
    return any(getattr(c, k) is not None for k in DP_KEYS) or any(n.startswith("dp_") for n in swept)


def _private(c: Config) -> str | None:
    if not is_private(c):
        for name in ("dp_delta", "dp_accountant"):
            if getattr(c, name) != getattr(Config, name):
                return f"{flag(name)} needs private training (--dp-noise-multiplier or --dp-target-epsilon)"
        return None
    swept = c.sweep.names if isinstance(c.sweep, Sweep) else ()
    sigma_given = c.dp_noise_multiplier is not None or "dp_noise_multiplier" in swept
    if sigma_given == (c.dp_target_epsilon is not None):
        return ("private training takes --dp-noise-multiplier S or --dp-target-epsilon E "
                "(which picks S for --epochs), one of them")  # fmt: skip
    if has_batch_norm(c.model):
        return (f"--model {c.model} has batch norm, which mixes the examples of a batch: private "
                "training needs a model without it (--model dpcnn, --groups N for group norm)")  # fmt: skip
    if c.clip_norm is not None:
        return ("--clip-norm clips the batch's gradient; private training clips each example's "
                "(--dp-max-grad-norm)")  # fmt: skip
    return None


def _warmup(c: Config) -> str | None:
    if not (math.isfinite(c.warmup_epochs) and 0 <= c.warmup_epochs < c.epochs):
        return f"--warmup-epochs must be in [0, --epochs), got {c.warmup_epochs}"
    if c.warmup_epochs and c.lr_schedule != "onecycle":
        return "--warmup-epochs needs --lr-schedule onecycle"
    return None


def _nesterov(c: Config) -> str | None:
    if c.nesterov and c.optimizer != "sgd":
        return "--nesterov applies to --optimizer sgd"
    if c.nesterov and c.momentum == 0:  # torch.optim.SGD refuses it too
        return "--nesterov needs a --momentum above 0"
    return None


def _plateau_gamma(c: Config) -> str | None:
    if c.lr_schedule == "plateau" and c.lr_gamma == 1:
        return "--lr-gamma must be below 1 with --lr-schedule plateau"
    return None


def _sweep(c: Config) -> str | None:
    if c.sweep is None:
        return None
    if c.ensemble > 1:
        return "--sweep and --ensemble are exclusive: a sweep's members differ only in hyperparameters"
    try:  # a Sweep, or a text __post_init__ could not parse: its problem, worded
        names = c.sweep.names if isinstance(c.sweep, Sweep) else parse_sweep(c.sweep).names
    except ConfigError as exc:
        return str(exc)
    given = [n for n in SWEEPABLE if n in names and getattr(c, n) != getattr(Config, n)]
    if given:
        name = given[0]
        return (
            f"{flag(name)} and --sweep {name}=... contradict each other: the sweep sets each member's {name}"
        )
    if "lr" in names and c.lr_schedule not in ("constant", "onecycle"):
        # onecycle multiplies each member's own lr; the others set one lr for all
        return (
            f"--sweep lr needs --lr-schedule constant or onecycle "
            f"(a {c.lr_schedule} schedule sets one lr for all)"
        )
    return None


def _keep_if_wide(v: Mapping[str, Any]) -> Any:
    return v.get("width", DROP) if v.get("model", Config.model) in WIDE_MODELS else DROP


def _keep_if_dpcnn(v: Mapping[str, Any]) -> Any:
    return v.get("groups", DROP) if v.get("model", Config.model) == "dpcnn" else DROP


def _keep_if_momentum(v: Mapping[str, Any]) -> Any:
    sgd = v.get("optimizer", Config.optimizer) == "sgd" and v.get("momentum", Config.momentum) != 0
    return v.get("nesterov", DROP) if sgd else DROP


def _keep_if_onecycle(v: Mapping[str, Any]) -> Any:
    warmup, epochs = v.get("warmup_epochs", DROP), v.get("epochs", Config.epochs)
    fits = v.get("lr_schedule", Config.lr_schedule) == "onecycle" and _is_below(warmup, epochs)
    return warmup if fits else DROP


def _is_below(a: Any, b: Any) -> bool:
    try:
        return bool(a < b)
    except TypeError:  # untyped file values (or DROP): validation names them
        return True


def _momentum_buffer(v: Mapping[str, Any]) -> bool:
    return v.get("optimizer", Config.optimizer) == "sgd" and v["momentum"] != 0  # adam keeps none


def _norm(v: Any) -> Any:
    return DP_MAX_GRAD_NORM if v is None else v  # left out is the default norm: giving it is no change


def _as_sweep(value: Any) -> Any:
    """A sweep's text as a `Sweep`; anything else (a text that does not parse) as it is."""
    if isinstance(value, str):
        try:
            return parse_sweep(value)
        except ConfigError:
            pass
    return value


_SEED = _rule(lambda v: 0 <= v <= MAX_SEED, "must be in [0, 2**63 - 1]")
_SAVE_TOP_K = _rule(lambda v: v == -1 or v >= 1, "must be -1 (keep all) or at least 1")
_GAMMA = _rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
_EMA = _rule(lambda v: 0 < v < 1, "is a decay in (0, 1)")
_DELTA = _rule(lambda v: 0 < v < 1, "must be in (0, 1)")


def _keys() -> dict[str, Key]:
    """The table: one `Key` per `Config` field, in field order."""
    k: dict[str, dict[str, Any]] = {
        "model": dict(check=_choice(MODELS), resume=REFUSED),
        "width": dict(needs=_width, follows=("model",), derived=_keep_if_wide, resume=REFUSED),
        "groups": dict(
            check=NOT_NEGATIVE, needs=_groups, follows=("model",), derived=_keep_if_dpcnn, resume=REFUSED
        ),
        "epochs": dict(check=AT_LEAST_1, resume=RUN),
        "batch_size": dict(check=AT_LEAST_1),
        "lr": dict(check=POSITIVE, hyper="lr"),
        "optimizer": dict(check=_choice(OPTIMIZERS), resume=REFUSED),
        "weight_decay": dict(check=FINITE_NOT_NEGATIVE, hyper="weight_decay"),
        "momentum": dict(check=FRACTION, hyper="momentum", part=_momentum_buffer),
        "nesterov": dict(
            needs=_nesterov, follows=("optimizer", "momentum"), derived=_keep_if_momentum, resume=REFUSED
        ),
        "clip_norm": dict(check=POSITIVE, hyper="max_norm", part=lambda v: v["clip_norm"] is not None),
        "label_smoothing": dict(check=FRACTION),
        "seed": dict(check=_SEED, resume=REFUSED),
        "data_dir": dict(check=_path, resume=RUN),
        "out": dict(check=_out, resume=RUN),
        "device": dict(check=_choice(DEVICES), resume=RUN),
        "compile": dict(check=_choice(COMPILE), resume=RUN),
        "precision": dict(check=_choice(PRECISIONS), resume=RUN),
        "normalize": dict(check=_choice(NORMALIZE)),
        "limit_train": dict(check=AT_LEAST_1, resume=SPLIT),
        "limit_val": dict(check=AT_LEAST_1, resume=SPLIT),
        "val_split": dict(check=NOT_NEGATIVE, resume=SPLIT),
        "eval_batch_size": dict(check=AT_LEAST_1, resume=RUN),
        "monitor": dict(needs=_monitor, resume=REFUSED),
        "mode": dict(check=_choice(("min", "max")), needs=_mode, follows=("monitor",), resume=REFUSED),
        "patience": dict(check=AT_LEAST_1),
        "min_delta": dict(check=FINITE_NOT_NEGATIVE),
        "save_best_only": dict(),
        "topk": dict(check=AT_LEAST_1),
        "save_top_k": dict(check=_SAVE_TOP_K, follows=("save_best_only",)),
        "every_n_epochs": dict(check=AT_LEAST_1),
        "lr_schedule": dict(
            check=_choice(SCHEDULES), follows=("lr_step_size",), derived=lambda v: "step", resume=REFUSED
        ),
        "lr_step_size": dict(check=AT_LEAST_1),
        "lr_gamma": dict(check=_GAMMA, needs=_plateau_gamma),
        "warmup_epochs": dict(needs=_warmup, follows=("lr_schedule", "epochs"), derived=_keep_if_onecycle),
        "crop_padding": dict(check=_pixels(14)),
        "flip": dict(),
        "cutout": dict(check=_pixels(28)),
        "ema": dict(check=_EMA, hyper="decay", part=lambda v: v["ema"] is not None),
        "tta": dict(),
        "tensorboard": dict(resume=RUN),
        "progress": dict(resume=RUN),
        "ensemble": dict(check=AT_LEAST_1, resume=REFUSED, members=True),
        "sweep": dict(needs=_sweep, resume=REFUSED, members=True, as_run=_as_sweep),
        # the accountant assumes one sigma, C and sampling rate for the whole run: fixed on resume
        "dp_max_grad_norm": dict(check=POSITIVE, needs=_private, resume=REFUSED, as_run=_norm),
        "dp_noise_multiplier": dict(check=FINITE_NOT_NEGATIVE, resume=REFUSED),
        "dp_target_epsilon": dict(check=POSITIVE, resume=REFUSED),
        "dp_delta": dict(check=_DELTA, resume=REFUSED),
        "dp_accountant": dict(check=_choice(ACCOUNTANTS), resume=REFUSED),
    }
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert list(k) == list(fields), "KEYS must list every Config field, in order"
    hints = typing.get_type_hints(Config)  # the real types (`X | None`: X)
    kinds = {name: next(t for t in (*typing.get_args(hints[name]), hints[name]) if t is not type(None))
             for name in fields}  # fmt: skip
    return {name: Key(kind=kinds[name], optional=fields[name].default is None, **spec)
            for name, spec in k.items()}  # fmt: skip


KEYS: dict[str, Key] = _keys()
# the settings a flag or a config file may unset with `none` (back to off, inferred or the built-in
# default), undoing a lower source: every optional one except the paths, since a folder may be
# called "none" (TOML has no null; JSON's null unsets any optional setting)
UNSETTABLE = frozenset(name for name, key in KEYS.items() if key.optional) - {"data_dir", "out"}


def unset(name: str, value: Any) -> Any:
    """None where setting `name` is `UNSETTABLE` and `value` is the text `none` (any case), else `value`."""
    return None if name in UNSETTABLE and isinstance(value, str) and value.lower() == "none" else value


def layered(layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The values of `layers`, lowest priority first (a saved checkpoint's config < preset <
    config file < flags), a later layer's value winning.

    A key that depends on another (`Key.follows`: mode on monitor, lr_schedule on
    lr_step_size, width on model, ...) and comes from a lower layer than the key it depends on
    is derived again (`Key.derived`, or its default / inferred value): a preset's `mode = "min"`
    gives way to `--monitor val_acc`, which the user gave, instead of contradicting it.
    """
    values: dict[str, Any] = {}
    source: dict[str, int] = {}
    for rank, layer in enumerate(layers):
        for name, value in layer.items():
            values[name], source[name] = value, rank
    for name, key in KEYS.items():  # in table order: a key follows only keys listed before it
        top = max((source[d] for d in key.follows if d in source), default=None)
        if top is None or source.get(name, -1) >= top:
            continue
        value = DROP if key.derived is None else key.derived(values)
        if value is DROP:
            values.pop(name, None)
        else:
            values[name] = value
        source[name] = top
    return values


SWEEPABLE = ("lr", "weight_decay", "dp_noise_multiplier", "dp_max_grad_norm")
_SWEEP_FLOOR = {"weight_decay": 0.0, "dp_noise_multiplier": 0.0}  # the others must be > 0


def parse_sweep(text: str) -> Sweep:
    """The sweep `text` (`"lr=1e-3,3e-4 weight_decay=0,5e-4"`: four members) as a `Sweep`;
    ConfigError, in one line, for a text that is not one."""
    axes: dict[str, tuple[float, ...]] = {}
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
            floats = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ConfigError(f"--sweep {name}: values must be numbers, got {values!r}") from None
        low = _SWEEP_FLOOR.get(name, math.nextafter(0.0, 1.0))
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
    return Sweep(tuple(axes.items()), text)


def presets() -> list[str]:
    """The names of the presets shipped in the package (`fashion_func/cli/presets/*.toml`)."""
    folder = resources.files("fashion_func.cli") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The settings of the preset `name`, read as package data (works from an installed wheel)."""
    if name not in presets():
        raise ConfigError(f"--preset must be one of {', '.join(presets())}, not {name!r}")
    text = (resources.files("fashion_func.cli") / "presets" / f"{name}.toml").read_text(encoding="utf-8")
    return _settings(tomllib.loads(text), f"preset {name}")  # its keys checked as the Config is built


def load_file(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a JSON or TOML config file (keys may use - or _)."""
    if not os.fspath(path):  # Path("") is ".", which would be blamed for being a directory
        raise ConfigError("--config is an empty path; give a JSON or TOML file")
    p = Path(path)
    kind = "TOML" if p.suffix == ".toml" else "JSON"
    try:
        text = read_regular(p, limit=MAX_CONFIG_BYTES, what="config file").decode()
    except FileError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {display(p)} is not a text file") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text, object_pairs_hook=_no_twice)
    except _Twice as exc:
        raise ConfigError(f"config file {display(p)} gives {exc} twice") from None
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
    return _settings(raw, f"config file {display(p)}")


class _Twice(Exception):
    """A JSON object names a key twice (json.loads would keep the last one silently)."""


def _no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Twice(repr(display(key)))
        seen[key] = value
    return seen


def _settings(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`raw`'s keys with - made _, refused (ConfigError) when two spellings name one key
    (`"dp-noise-multiplier"` and `dp_noise_multiplier`): neither silently wins. `"none"` unsets an
    `UNSETTABLE` setting (`unset`)."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in values:
            raise ConfigError(
                f"{where} gives {name} twice (as {spelled[name]!r} and {display(key)!r}); keep one"
            )
        values[name], spelled[name] = unset(name, value), display(key)
    return values
