"""`fashion-func train` / `scripts/train.py`: the train parser, config merging and the entry point."""

from __future__ import annotations

import argparse
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
    Config,
    ConfigError,
    layered,
    load_file,
    load_preset,
)
from fashion_func.safeio import display

__all__ = ["finish_rank", "main_train"]


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of `scripts/train.py`; every option defaults to 'not given'."""
    p = Parser(
        prog="train.py",
        description="Train a model on Fashion-MNIST with fashion_func.",
        argument_default=argparse.SUPPRESS,
    )
    add_version(p)
    _add_training_args(p)
    _add_run_args(p)
    _add_checkpoint_args(p)
    _add_schedule_and_member_args(p)
    _add_quality_args(p)
    _add_privacy_args(p)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="skip TensorBoard")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a last.safetensors (auto: <out>'s, if any) with the settings saved in it; "
        "flags given override them (--epochs is the new total)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    return p


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """Where the settings come from, the model and the optimizer."""
    p.add_argument(
        "--preset", help="a config shipped with the package (tutorial); --config and flags override it"
    )
    p.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} (default simplenet)")
    p.add_argument(
        "--width",
        type=int_arg,
        help="resnet's / dpcnn's base width, its first conv's channels (default 16)",
    )
    p.add_argument("--groups", type=int_arg, help="dpcnn: group norm, N groups (default 0: none)")
    p.add_argument(
        "--epochs", type=int_arg, help="total epochs (a resumed run trains what remains; default 4)"
    )
    p.add_argument("--batch-size", type=int_arg, help="default 128")
    p.add_argument("--lr", type=float_arg, help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default adam)")
    p.add_argument("--weight-decay", type=float_arg, help="L2 for adam/sgd, decoupled for adamw (default 0)")
    p.add_argument("--momentum", type=float_arg, help="sgd momentum (default 0.9)")
    _switch(p, "--nesterov", "sgd with Nesterov momentum")
    p.add_argument("--clip-norm", type=float_arg, help="clip gradients to this global norm")
    p.add_argument("--label-smoothing", type=float_arg, help="cross-entropy label smoothing (default 0)")
    p.add_argument("--seed", type=int_arg, help="seed for init, batch order and dropout (default 0)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Data, output, device and speed."""
    p.add_argument("--data-dir", help="folder holding the four Fashion-MNIST IDX files (.gz or raw)")
    p.add_argument("--out", help="run directory (default output/<model>)")
    p.add_argument("--device", help=f"one of {', '.join(DEVICES)} (default auto: CUDA if present)")
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off", "update"),
        help="torch.compile the step: on, off, update (only the optimizer update; forward and backward "
        "eager); default auto: on with CUDA, update on the CPU",
    )
    p.add_argument(
        "--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off"
    )
    p.add_argument("--precision", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    p.add_argument("--normalize", help="dataset (mean/std of the train set, default) or tutorial (0.5/0.5)")
    p.add_argument("--limit-train", type=int_arg, help="use the first N training examples")
    p.add_argument("--limit-val", type=int_arg, help="use the first N validation (test-set) examples")
    p.add_argument("--eval-batch-size", type=int_arg, help="default 1000")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The tutorial's monitor, early stopping, metrics and checkpoint retention."""
    p.add_argument(
        "--monitor",
        help="metric for best checkpoint / early stopping: val_loss (default), val_acc, val_topK, ...",
    )
    p.add_argument("--mode", help="min or max (default: inferred, min for *_loss, max for accuracies)")
    p.add_argument("--patience", type=int_arg, help="early-stopping patience in epochs (default: off)")
    p.add_argument("--min-delta", type=float_arg, help="smallest change that counts as improvement")
    p.add_argument(
        "--save-best-only",
        type=_bool,
        metavar="{true,false}",
        help="true (default): only best.safetensors; false: a checkpoint every epoch (or every --save-every)",
    )
    p.add_argument(
        "--topk", type=int_arg, help="K of the top-K accuracy reported as train_topK/val_topK (default 5)"
    )
    p.add_argument(
        "--save-top-k",
        type=int_arg,
        help="epoch checkpoints kept, best first (-1: all; default 1, all without best-only)",
    )
    p.add_argument(
        "--save-every",
        "--every-n-epochs",
        dest="every_n_epochs",
        type=int_arg,
        help="epoch checkpoint interval (default 1)",
    )


def _add_schedule_and_member_args(p: argparse.ArgumentParser) -> None:
    """The learning-rate schedule, and many models in one step (ensembles, sweeps)."""
    p.add_argument("--lr-schedule", help=f"one of {', '.join(SCHEDULES)} (default constant)")
    p.add_argument(
        "--lr-step-size", type=int_arg, help="StepLR: epochs between decays (sets --lr-schedule step)"
    )
    p.add_argument("--lr-gamma", type=float_arg, help="StepLR / plateau decay factor (default 0.1)")
    p.add_argument(
        "--warmup-epochs",
        type=float_arg,
        help="onecycle: epochs (may be fractional) of linear warm-up from lr/10 to lr, then linear to 0 "
        "at the last step (default 0)",
    )
    p.add_argument(
        "--ensemble",
        type=int_arg,
        help="train K independently initialised models in one vmapped step (default 1)",
    )
    p.add_argument(
        "--sweep",
        help="train one model per hyperparameter combination in one vmapped step, "
        "e.g. 'lr=1e-3,3e-4,1e-4' or 'lr=1e-3,3e-4 weight_decay=0,5e-4'",
    )


def _add_quality_args(p: argparse.ArgumentParser) -> None:
    """Model selection on held-out data, augmentation, weight averaging, test-time flips."""
    p.add_argument(
        "--val-split",
        type=int_arg,
        help="hold out the last N training images for validation (model selection, early stopping); "
        "the test set is then measured once, at the end, as test_acc (default 0: validate on the test set)",
    )
    p.add_argument(
        "--crop-padding", type=int_arg, help="random crops after zero padding by N pixels (default 0)"
    )
    _switch(p, "--flip", "random horizontal flips in training")
    p.add_argument(
        "--cutout", type=int_arg, help="blank a random NxN square of each training image (default 0)"
    )
    p.add_argument(
        "--ema",
        type=float_arg,
        help="evaluate and save a moving average of the weights with this decay, e.g. 0.99",
    )
    _switch(p, "--tta", "evaluate on the mean of each image's and its mirror image's probabilities")


def _add_privacy_args(p: argparse.ArgumentParser) -> None:
    """Private training (DP-SGD): per-example clipping, noise, Poisson sampling, accounting."""
    p.add_argument(
        "--dp-max-grad-norm",
        type=float_arg,
        metavar="C",
        help="private training: clip each example's gradient to this L2 norm (default 1.0)",
    )
    p.add_argument(
        "--dp-noise-multiplier",
        type=float_arg,
        metavar="S",
        help="private training: Gaussian noise of std S*C on the summed clipped gradients",
    )
    p.add_argument(
        "--dp-target-epsilon",
        type=float_arg,
        metavar="E",
        help="private training: pick S so that --epochs end at epsilon E; stop before passing it",
    )
    p.add_argument(
        "--dp-delta", type=float_arg, metavar="D", help="the delta epsilon is computed at (default 1e-5)"
    )
    p.add_argument("--dp-accountant", help="Opacus's accountant: rdp (default) or prv")


def _switch(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    """`--flag` (on) or `--flag true|false`: a preset's setting can be turned off again."""
    p.add_argument(
        flag, type=_bool, nargs="?", const=True, metavar="{true,false}", help=f"{what} (default off)"
    )


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
    """(Config, run-control options {resume, overwrite}).

    Values come from, in rising priority: the defaults, the config saved in the checkpoint
    being resumed (`--resume`; none for `auto` before the first checkpoint), a `--preset`, a
    `--config` file, the flags given (`config.layered`: a value that depends on a key given
    by a higher source is derived again). So `--resume auto --out X` continues X's run as it
    was set up, and `--resume auto --out X --epochs 10` only raises its epoch count. Whether
    the run can continue so is decided as it starts (`app.train`, `resume.compatible`).
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

    # where `auto` looks: the --out given, else the default for the model given
    out = Config.from_dict({k: values[k] for k in ("out", "model") if k in values}).out_dir
    try:
        path = loop.resume_path(out, resume)
        if path is None:  # `auto` before any checkpoint: a fresh run from the flags
            return None
        saved = loop.saved_config(path)
    except (loop.RunError, checkpoint.CheckpointError) as exc:
        raise UsageError(words.message(exc)) from None
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


def _fail(prog: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"{prog}: error: {display(message)}", file=sys.stderr)
    return code


def main_train(argv: Sequence[str] | None = None, *, prog: str = "train.py") -> int:
    """Entry point of `scripts/train.py`; returns the process exit code. `prog` names the
    command in its messages (`fashion-func train` from the installed command)."""
    try:
        config, run = parse_train_args(argv)
    except (UsageError, ConfigError) as exc:
        return _fail(prog, str(exc))
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
