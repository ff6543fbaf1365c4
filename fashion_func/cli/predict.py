"""The predictor: evaluate a weights file on the test set, or classify image files.

`python scripts/predict.py --weights runs/a/checkpoints/best.safetensors [--out DIR] [--json]`
reads the model name and config from the file's metadata (`--model` overrides), evaluates on
the Fashion-MNIST test set and reports accuracy, top-k accuracy, per-class precision/recall and
the confusion matrix. With `--out DIR` it also writes `confusion_matrix.png`, `samples.png` (a
grid of test images with true and predicted classes), `most_confused.png` and
`most_confused.json` (the test examples the model gets most confidently wrong: candidates for
label noise), and `report.json`. With `--json` the last line on stdout is one JSON object.
`--tta` predicts from the mean of the probabilities of each image and its mirror image (for
several weights files, within each member before the ensemble's mean).

`--images FILE_OR_DIR ...` classifies PNG/JPEG files instead (see `images.prepare_image` for how
a picture becomes a 28x28 Fashion-MNIST image) and prints each one's top-3 classes.

This module is the command line and the evaluation; reading pictures lives in `images`, the
report, its text and its files in `report` (their public names are re-exported here).

Exit codes: 0 success; 2 usage or input error (missing or bad weights file, wrong model,
missing data, unreadable image), reported in one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fashion_func import atomic, checkpoint, data, ensemble, interop, losses, models
from fashion_func.cli import words
from fashion_func.cli.args import EXIT_USAGE, Parser, UsageError, add_version, int_arg, interruptible
from fashion_func.cli.device import resolve_device
from fashion_func.cli.images import (
    MAX_IMAGE_PIXELS,
    ImageError,
    find_images,
    prepare_image,  # noqa: F401  (importable here by module path; not in __all__)
    read_image,
)
from fashion_func.cli.report import (
    REPORT_FILES,
    build_report,
    format_report,
    member_report,
    most_confident_mistakes,
    write_outputs,
)
from fashion_func.loop import RunError
from fashion_func.models import Model, ModelState, Params
from fashion_func.safeio import FileError, check_output, display, short_repr, strict_json
from fashion_func.scattering import FEATURE_MODELS, Scattering, ScatteringUnavailable
from fashion_func.step import NormalizeImages, make_eval_step

__all__ = ["main"]


# -- arguments ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of `scripts/predict.py`."""
    p = Parser(
        prog="predict.py", description="Evaluate fashion_func weights on Fashion-MNIST or classify images."
    )
    add_version(p)
    p.add_argument(
        "--weights",
        required=True,
        nargs="+",
        help="weights file (best.safetensors or a torch export); several: evaluate their ensemble "
        "(mean of probabilities) and report each member too",
    )
    p.add_argument("--model", help="model name, overriding the file's metadata")
    p.add_argument("--data-dir", help="folder holding the Fashion-MNIST IDX files")
    p.add_argument(
        "--out",
        help="test-set mode: write confusion_matrix.png, samples.png, most_confused.{png,json}, report.json",
    )
    p.add_argument("--json", action="store_true", help="end stdout with one line of JSON")
    p.add_argument("--images", nargs="+", metavar="FILE_OR_DIR", help="classify these PNG/JPEG files instead")
    p.add_argument("--invert", action="store_true", help="images are dark objects on a light background")
    p.add_argument(
        "--max-image-pixels",
        type=int_arg,
        default=MAX_IMAGE_PIXELS,
        help=f"refuse images with more pixels than this before decoding them (default {MAX_IMAGE_PIXELS})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto (CUDA if present)"
    )
    p.add_argument("--batch-size", type=int_arg, default=1000, help="evaluation batch size (default 1000)")
    p.add_argument("--limit", type=int_arg, help="evaluate on the first N test examples")
    p.add_argument("--topk", type=int_arg, default=5, help="k of the top-k accuracy (default 5)")
    p.add_argument(
        "--num-confused", type=int_arg, default=16, help="how many confident mistakes to show (default 16)"
    )
    p.add_argument("--num-samples", type=int_arg, default=32, help="test images in samples.png (default 32)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the evaluation step (slower to start)"
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the probabilities of each image and its mirror image "
        "(each ensemble member's)",
    )
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "topk", "num_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_confused < 0:
        raise UsageError(f"--num-confused must not be negative, got {args.num_confused}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.max_image_pixels < 1:
        raise UsageError(f"--max-image-pixels must be at least 1, got {args.max_image_pixels}")
    if args.out is not None:
        _check_out_dir(Path(args.out), args)
    return args


def _check_out_dir(out: Path, args: argparse.Namespace) -> None:
    """--out must be (or become) a directory, and each report file in it a safe target."""
    if not str(out):
        raise UsageError("--out must not be empty")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} exists and is not a directory")
    _check_creatable(out)
    for name in REPORT_FILES:
        try:
            check_output(out / name, overwrite=args.overwrite, inputs=args.weights, what="--out file")
        except FileError as e:
            raise UsageError(words.message(e)) from None


def _check_creatable(out: Path) -> None:
    """UsageError unless `out` can be created (or written): its nearest existing folder must be
    a directory this process may write in. Checked before the test set is evaluated."""
    existing = next(p for p in (out, *out.absolute().parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise UsageError(
            f"--out {display(str(out))} cannot be created: {display(str(existing))} is not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {display(str(out))} cannot be written: no permission to write in {display(str(existing))}"
        )


# -- evaluation ----------------------------------------------------------------------------------


def classify_images(
    model: Model,
    params: Params,
    images: Tensor,
    *,
    mean: float = data.MEAN,
    std: float = data.STD,
    k: int = 3,
    model_state: ModelState | None = None,
    sort: bool = True,
    tta: bool = False,
) -> tuple[Tensor, Tensor]:
    """(top-k probabilities [N, k], classes [N, k]) for uint8 images [N, 28, 28], best first;
    `sort=False`: all probabilities [N, C] in class order (and the class indices).

    `tta`: each image's probabilities are the mean of its own and its mirror image's.
    """
    eval_step = make_eval_step(model, compile=False, preprocess=_inputs(model, mean, std, images), tta=tta)
    labels = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)  # unused
    probs = torch.softmax(eval_step(params, (images, labels), model_state)["logits"], dim=-1)
    if not sort:
        return probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return top.values, top.indices


def per_example_outputs(
    model: Model,
    params: Params,
    split: data.Split,
    *,
    batch_size: int = 1000,
    topk: int = 5,
    mean: float = data.MEAN,
    std: float = data.STD,
    compile: bool = False,
    model_state: ModelState | None = None,
    tta: bool = False,
) -> dict[str, Tensor]:
    """Per-example `loss`, `correct`, `top{k}_correct`, `pred`, `logits` over the split, on its device.

    A stateful model (batch norm) needs its `model_state` (inference mode: running statistics).
    `tta`: test-time augmentation, each prediction the mean of the probabilities of the image
    and its left-right mirror image (`logits` the log of that mean; `step.make_eval_step`).
    """
    preprocess = _inputs(model, mean, std, split.images)
    eval_step = make_eval_step(model, compile=compile, preprocess=preprocess, topk=topk, tta=tta)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, split.labels.shape[0], batch_size):
        batch = (split.images[start : start + batch_size], split.labels[start : start + batch_size])
        parts.append(eval_step(params, batch, model_state))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _inputs(model: Model, mean: float, std: float, images: Tensor) -> Any:
    """How uint8 `images` become `model`'s inputs: the normalisation it was trained with, or the
    fixed ScatterNet features (on the images' device) for a model of them (`FEATURE_MODELS`)."""
    if model.name in FEATURE_MODELS:
        return Scattering().to(images.device)
    return NormalizeImages(mean, std)


# -- entry point ------------------------------------------------------------------------------


def _fail(prog: str, message: str) -> int:
    _err(f"{prog}: error: {message}")
    return EXIT_USAGE


def _err(line: str) -> None:
    print(display(" ".join(line.split())), file=sys.stderr)


@dataclass(frozen=True)
class Member:
    """One weights file loaded for prediction: its model, weights and normalisation."""

    path: str
    model: Model
    params: Params
    model_state: ModelState
    mean: float
    std: float
    metadata: dict[str, Any]


def load_member(path: str, model_name: str | None, device: torch.device) -> Member:
    """A weights file ready to predict with (CheckpointError, one line, for a bad file)."""
    model, weights, metadata = interop.load_weights_file(path, model_name, device=device)
    classes = models.num_classes(model)
    images = model.input_shape in ((1, 28, 28), (28 * 28,)) or model.name in FEATURE_MODELS
    if classes != len(data.CLASS_NAMES) or not images:
        shape = "x".join(map(str, model.input_shape))
        raise checkpoint.CheckpointError(
            f"{path}: a {model.name} of {classes} classes over inputs of {shape}; predict takes a "
            f"{len(data.CLASS_NAMES)}-class classifier of 28x28 images (Fashion-MNIST)"
        )
    # bf16/fp16 files evaluate in fp32; a batch count stays an integer
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    params, model_state = interop.split_state(model, weights)  # batch-norm buffers, if any
    mean, std = interop.normalization(metadata)  # what the weights were trained with
    return Member(str(path), model, params, model_state, mean, std, metadata)


def ensemble_outputs(outs: Sequence[dict[str, Tensor]], labels: Tensor, topk: int) -> dict[str, Tensor]:
    """The per-example outputs of the ensemble of several models' outputs (`evaluate`'s), its
    prediction the mean of their probabilities, beside each one's (`member_*`, `[K, N]`)."""
    stacked = {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return ensemble.combine(stacked, labels, losses.cross_entropy_per_example, topk)


def _run_images(args: argparse.Namespace, members: Sequence[Member]) -> dict[str, Any]:
    """Classify every readable image (the members' mean probabilities); each one that cannot
    be read is one line on stderr."""
    errors: list[str] = []
    files = find_images(args.images, errors)
    images, readable = [], []
    for f in files:
        try:
            images.append(read_image(f, args.invert, args.max_image_pixels))
            readable.append(f)
        except ImageError as e:
            errors.append(str(e))
    for e in errors:
        _err(f"{args.prog}: error: {e}")
    results = []
    if images:
        batch = torch.stack(images).to(params_device(members[0].params))
        probs = torch.stack([
            classify_images(m.model, m.params, batch, mean=m.mean, std=m.std, model_state=m.model_state,
                            sort=False, tta=args.tta)[0]
            for m in members
        ]).mean(0)  # fmt: skip
        top = probs.topk(min(3, probs.shape[-1]), dim=-1)
        for f, ps, cs in zip(readable, top.values.tolist(), top.indices.tolist(), strict=True):
            top3 = [{"class": c, "name": data.CLASS_NAMES[c], "prob": p} for p, c in zip(ps, cs, strict=True)]
            results.append({"path": str(f), "top3": top3})
            print(display(f"{f}: " + ", ".join(f"{t['name']} {t['prob']:.3f}" for t in top3)))
    return {"images": results, "errors": errors}


def _evaluate_test_set(args: argparse.Namespace, members: Sequence[Member]) -> dict[str, Any]:
    split = data.load("test", args.data_dir, device=params_device(members[0].params), limit=args.limit)
    print(display(f"test set: {split.labels.shape[0]} examples from {split.source}"))
    outs = [
        per_example_outputs(m.model, m.params, split, batch_size=args.batch_size, topk=args.topk,
                            mean=m.mean, std=m.std, compile=args.compile, model_state=m.model_state,
                            tta=args.tta)
        for m in members
    ]  # fmt: skip
    result = outs[0] if len(outs) == 1 else ensemble_outputs(outs, split.labels, args.topk)
    report = {**build_report(result, split.labels, args.topk), "tta": args.tta}
    report["most_confused"] = most_confident_mistakes(
        result["logits"], split.labels, result["pred"], args.num_confused
    )
    if len(members) > 1:
        report["members"] = [member_report(m.path, o, args.topk) for m, o in zip(members, outs, strict=True)]
        for r in report["members"]:
            print(display(f"member {r['weights']}: accuracy {r['accuracy']:.4f}, loss {r['loss']:.4f}"))
        print(f"ensemble of {len(members)} (mean of probabilities):")
    if args.tta:
        print("test-time augmentation: each image and its mirror image, probabilities averaged")
    print(format_report(report))
    if report["most_confused"]:
        print("\nmost confidently wrong (index: true -> predicted, confidence):")
        for c in report["most_confused"][:5]:
            print(f"  {c['index']}: {c['label_name']} -> {c['pred_name']} ({c['confidence']:.3f})")
    if args.out:
        written = write_outputs(Path(args.out), split, result, report, args.num_samples)
        print(display("wrote " + ", ".join(str(p) for p in written)))
    return report


def params_device(params: Params) -> torch.device:
    """The device the weights are on."""
    return next(iter(params.values())).device


def _predict(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    device = resolve_device(args.device)
    members = [load_member(w, args.model, device) for w in args.weights]
    if args.tta and any(m.model.name in FEATURE_MODELS for m in members):  # it would mirror the features
        raise UsageError("--tta mirrors the model's inputs, which for a scatternet are features, not images")
    names = ", ".join(sorted({m.model.name for m in members}))
    summary: dict[str, Any] = {"weights": args.weights[0] if len(members) == 1 else list(args.weights),
                               "model": names, "tta": args.tta}  # fmt: skip
    for m in members:
        epoch = f", epoch {short_repr(m.metadata['epoch'])}" if "epoch" in m.metadata else ""
        print(display(f"weights {m.path} ({m.model.name}{epoch}), device {device}"))
    if args.images:
        summary.update(_run_images(args, members))
        return summary, EXIT_USAGE if summary["errors"] else 0
    summary.update(_evaluate_test_set(args, members))
    return summary, 0


def main(argv: Sequence[str] | None = None, *, prog: str = "predict.py") -> int:
    """Entry point of `scripts/predict.py` (`prog` names the command in its messages); returns
    the process exit code. SIGINT / SIGTERM end it in one line, 130 / 143 (`args.interruptible`)."""
    return interruptible(prog, lambda: _main(argv, prog))


def _main(argv: Sequence[str] | None, prog: str) -> int:
    try:
        args = _parse(argv)
        args.prog = prog
        summary, code = _predict(args)
        if args.json:
            print(strict_json(summary), flush=True)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`| head -1`): a normal end; stop Python's exit flush from complaining
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except (
        UsageError,
        RunError,
        checkpoint.CheckpointError,
        data.DataError,
        ImageError,
        atomic.WriteError,
        ScatteringUnavailable,
    ) as e:
        return _fail(prog, words.message(e))
    except OSError as e:  # --out not writable and the like
        return _fail(prog, f"{type(e).__name__}: {e}")
    return code
