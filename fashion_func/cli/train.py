"""`fashion-func train` / `scripts/train.py`: the train parser, config merging and the entry point."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fashion_func.cli import words
from fashion_func.cli.args import EXIT_USAGE, Parser, UsageError, add_version, float_arg, int_arg
from fashion_func.cli.config import (
    DEVICES,
    MODELS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    UNSETTABLE,
    Config,
    ConfigError,
    layered,
    load_file,
    load_preset,
    unset,
)
from fashion_func.safeio import display

__all__ = ["finish_rank", "main_train"]


def _switch(what: str) -> dict[str, Any]:
    """`--flag` (on) or `--flag true|false`: a preset's setting can be turned off again."""
    return dict(type=_bool, nargs="?", const=True, metavar="{true,false}", help=f"{what} (default off)")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_int = functools.partial(dict, type=int_arg)  # the keywords of an option taking an integer
_float = functools.partial(dict, type=float_arg)  # ... a number

# Every option of the train parser, in --help's order: its names (space-separated) -> argparse's keywords.
OPTIONS: dict[str, dict[str, Any]] = {
    # where the settings come from, the model and the optimizer
    "--preset": dict(help="a config shipped with the package (tutorial); --config and flags override it"),
    "--config": dict(help="JSON or TOML file of settings; flags override it"),
    "--model": dict(help=f"one of {', '.join(MODELS)} (default simplenet)"),
    "--width": _int(help="resnet's / dpcnn's base width, its first conv's channels (default 16)"),
    "--groups": _int(help="dpcnn: group norm, N groups (default 0: none)"),
    "--epochs": _int(help="total epochs (a resumed run trains what remains; default 4)"),
    "--batch-size": _int(help="default 128"),
    "--lr": _float(help="learning rate (default 1e-3)"),
    "--optimizer": dict(help=f"one of {', '.join(OPTIMIZERS)} (default adam)"),
    "--weight-decay": _float(help="L2 for adam/sgd, decoupled for adamw (default 0)"),
    "--momentum": _float(help="sgd momentum (default 0.9)"),
    "--nesterov": _switch("sgd with Nesterov momentum"),
    "--clip-norm": _float(help="clip gradients to this global norm"),
    "--label-smoothing": _float(help="cross-entropy label smoothing (default 0)"),
    "--seed": _int(help="seed for init, batch order and dropout (default 0)"),
    # data, output, device and speed
    "--data-dir": dict(help="folder holding the four Fashion-MNIST IDX files (.gz or raw)"),
    "--out": dict(help="run directory (default output/<model>)"),
    "--device": dict(help=f"one of {', '.join(DEVICES)} (default auto: CUDA if present)"),
    "--compile": dict(
        choices=("auto", "on", "off", "update"),
        help="torch.compile the step: on, off, update (only the optimizer update; forward and backward "
        "eager); default auto: on with CUDA, update on the CPU",
    ),
    "--no-compile": dict(dest="compile", action="store_const", const="off", help="same as --compile off"),
    "--precision": dict(help=f"one of {', '.join(PRECISIONS)} (default fp32)"),
    "--normalize": dict(help="dataset (mean/std of the train set, default) or tutorial (0.5/0.5)"),
    "--limit-train": _int(help="use the first N training examples"),
    "--limit-val": _int(help="use the first N validation (test-set) examples"),
    "--eval-batch-size": _int(help="default 1000"),
    # the tutorial's monitor, early stopping, metrics and checkpoint retention
    "--monitor": dict(
        help="metric for best checkpoint / early stopping: val_loss (default), val_acc, val_topK, ..."
    ),
    "--mode": dict(help="min or max (default: inferred, min for *_loss, max for accuracies)"),
    "--patience": _int(help="early-stopping patience in epochs (default: off)"),
    "--min-delta": _float(help="smallest change that counts as improvement"),
    "--save-best-only": dict(
        type=_bool,
        metavar="{true,false}",
        help="true (default): only best.safetensors; false: a checkpoint every epoch (or every --save-every)",
    ),
    "--topk": _int(help="K of the top-K accuracy reported as train_topK/val_topK (default 5)"),
    "--save-top-k": _int(
        help="epoch checkpoints kept, best first (-1: all; default 1, all without best-only)"
    ),
    "--save-every --every-n-epochs": _int(
        dest="every_n_epochs", help="epoch checkpoint interval (default 1)"
    ),
    # the learning-rate schedule, and many models in one step (ensembles, sweeps)
    "--lr-schedule": dict(help=f"one of {', '.join(SCHEDULES)} (default constant)"),
    "--lr-step-size": _int(help="StepLR: epochs between decays (sets --lr-schedule step)"),
    "--lr-gamma": _float(help="StepLR / plateau decay factor (default 0.1)"),
    "--warmup-epochs": _float(
        help="onecycle: epochs (may be fractional) of linear warm-up from lr/10 to lr, then linear to 0 "
        "at the last step (default 0)",
    ),
    "--ensemble": _int(help="train K independently initialised models in one vmapped step (default 1)"),
    "--sweep": dict(
        help="train one model per hyperparameter combination in one vmapped step, "
        "e.g. 'lr=1e-3,3e-4,1e-4' or 'lr=1e-3,3e-4 weight_decay=0,5e-4'"
    ),
    # model selection on held-out data, augmentation, weight averaging, test-time flips
    "--val-split": _int(
        help="hold out the last N training images for validation (model selection, early stopping); "
        "the test set is then measured once, at the end, as test_acc (default 0: validate on the test set)",
    ),
    "--crop-padding": _int(help="random crops after zero padding by N pixels (default 0)"),
    "--flip": _switch("random horizontal flips in training"),
    "--cutout": _int(help="blank a random NxN square of each training image (default 0)"),
    "--ema": _float(help="evaluate and save a moving average of the weights with this decay, e.g. 0.99"),
    "--tta": _switch("evaluate on the mean of each image's and its mirror image's probabilities"),
    # private training (DP-SGD): per-example clipping, noise, Poisson sampling, accounting
    "--dp-max-grad-norm": _float(
        metavar="C", help="private training: clip each example's gradient to this L2 norm (default 1.0)"
    ),
    "--dp-noise-multiplier": _float(
        metavar="S", help="private training: Gaussian noise of std S*C on the summed clipped gradients"
    ),
    "--dp-target-epsilon": _float(
        metavar="E", help="private training: pick S so that --epochs end at epsilon E; stop before passing it"
    ),
    "--dp-delta": _float(metavar="D", help="the delta epsilon is computed at (default 1e-5)"),
    "--dp-accountant": dict(help="Opacus's accountant: rdp (default) or prv"),
    # the run itself
    "--no-tensorboard": dict(dest="tensorboard", action="store_false", help="skip TensorBoard"),
    "--no-progress": dict(dest="progress", action="store_false", help="no progress bar"),
    "--resume": dict(
        metavar="PATH|auto",
        help="continue from a last.safetensors (auto: <out>'s, if any) with the settings saved in it; "
        "flags given override them (--epochs is the new total)",
    ),
    "--overwrite": dict(action="store_true", help="replace an existing run directory"),
}


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of `scripts/train.py` (`OPTIONS`); every option defaults to 'not given'."""
    p = Parser(
        prog="train.py",
        description="Train a model on Fashion-MNIST with fashion_func.",
        argument_default=argparse.SUPPRESS,
    )
    add_version(p)
    for names, keywords in OPTIONS.items():
        p.add_argument(*names.split(), **_unsettable(names, keywords))
    return p


def _unsettable(names: str, keywords: dict[str, Any]) -> dict[str, Any]:
    """`keywords`, taking `none` as well where the option's setting is `UNSETTABLE` (optional:
    off, inferred or the built-in default when absent; paths keep their text), so a flag can undo
    what a preset or a config file set (`--preset private_features --ema none`)."""
    dest = keywords.get("dest", names.split()[0].lstrip("-").replace("-", "_"))
    if dest not in UNSETTABLE or "action" in keywords:
        return keywords
    parse = keywords.get("type", str)

    def value(text: str) -> Any:
        return None if unset(dest, text) is None else parse(text)  # config's one spelling of "unset"

    return {**keywords, "type": value, "help": f"{keywords.get('help', '')} (none: unset)".lstrip()}


RUN_FLAGS = ("preset", "config", "resume", "overwrite")


def explicit_train_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings the user gave: `--preset` < `--config` file < flags, run-control options).

    Only what was given appears (the parser's default is SUPPRESS), so a resumed run can
    tell a flag the user typed from a default.
    """
    layers, run = _given_layers(argv)
    return layered(layers), run


def _given_layers(argv: Sequence[str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """([preset values, config file values, flags], run-control options), lowest priority first."""
    args = vars(build_train_parser().parse_args(argv))
    preset = load_preset(args["preset"]) if "preset" in args else {}
    given = load_file(args["config"]) if "config" in args else {}
    flags = {k: v for k, v in args.items() if k not in RUN_FLAGS}
    run = {"resume": args.get("resume"), "overwrite": args.get("overwrite", False)}
    return [preset, given, flags], run


def parse_train_args(argv: Sequence[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """(Config, run-control options {resume, overwrite}), layered (`config.layered`) over the
    config saved in the checkpoint `--resume` names (none for `auto` before the first one):
    `--resume auto --out X --epochs 10` continues X's run as it was set up, to 10 epochs.
    Whether it can continue so is decided as it starts (`app.train`, `resume.compatible`).
    """
    layers, run = _given_layers(argv)
    saved = _checkpoint_config(layered(layers), run["resume"]) if run["resume"] else None
    if saved is None:
        return Config.from_dict(layered(layers)), run
    config, out = saved
    values = layered([config, *layers])
    values["out"] = out
    return Config.from_dict(values), run


def _checkpoint_config(values: dict[str, Any], resume: str) -> tuple[dict[str, Any], str] | None:
    """(the config saved in the checkpoint `resume` names, the run directory to write), or None
    for `auto` before the first checkpoint."""
    # heavy imports (torch) only on this path: reading a checkpoint needs them anyway
    from fashion_func import checkpoint, loop
    from fashion_func.loop import resume as resume_lib

    # where `auto` looks: the --out given, else the default for the model given
    out = Config.from_dict({k: values[k] for k in ("out", "model") if k in values}).out_dir
    try:
        path = resume_lib.resume_path(out, resume)
        if path is None:  # `auto` before any checkpoint: a fresh run from the flags
            return None
        saved = resume_lib.read_record(path).settings.get("config")
    except (loop.RunError, checkpoint.CheckpointError) as exc:
        raise UsageError(words.message(exc)) from None
    if not isinstance(saved, dict):
        raise UsageError(f"checkpoint {path} holds no run config; it was not written by train.py")
    # A run writes only where the user pointed, never where a checkpoint's saved config says
    # (a copied run's checkpoint names the original's directory).
    return saved, str(out) if resume == "auto" or "out" in values else _run_dir_of(path)


def _run_dir_of(checkpoint_path: Path) -> str:
    """The run directory a `<run>/checkpoints/<file>` belongs to; UsageError for another place."""
    folder = checkpoint_path.absolute().parent
    if checkpoint_path.is_symlink():  # a link's own folder is not where its run is
        raise UsageError(
            f"--resume {display(str(checkpoint_path))} is a symbolic link; pass --out, the run directory "
            "to continue in (a run never writes through a link into another run)"
        )
    if folder.name != "checkpoints":
        raise UsageError(
            f"--resume {display(str(checkpoint_path))} is not in a run's checkpoints/ folder; "
            "pass --out, the run directory to continue in"
        )
    return str(folder.parent)


def main_train(argv: Sequence[str] | None = None, *, prog: str = "train.py") -> int:
    """Entry point of `scripts/train.py`; returns the process exit code. `prog` names the
    command in its messages (`fashion-func train` from the installed command)."""
    try:
        config, run = parse_train_args(argv)
    except (UsageError, ConfigError) as exc:
        print(f"{prog}: error: {display(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from fashion_func.cli import app  # heavy imports only once the arguments are known good

        return app.main(config, resume=run["resume"], overwrite=run["overwrite"], prog=prog)
    except KeyboardInterrupt:
        # SIGINT outside the loop's handler (importing, loading data): nothing half-done to save
        print(
            f"{prog}: interrupted by SIGINT outside a training step; the run directory keeps "
            "its last saved checkpoint (continue with --resume auto)",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT


def finish_rank(code: int) -> int:
    """`code`, or, in a process torchrun started that trained, the end of the process with it.

    A torchrun rank that has left its process group ends with `os._exit` after flushing its
    logs and streams: in the interpreter's own teardown gloo's threads can abort the process
    ("terminate called without an active exception", SIGABRT) after the exit code was decided,
    and torchrun would then report a failed job.
    """
    distributed = sys.modules.get("fashion_func.distributed")  # imported only if training began
    if distributed is None or not distributed.launched():
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
