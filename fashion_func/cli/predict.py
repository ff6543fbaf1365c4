"""The predictor: evaluate weights files on the test set, or classify image files.

`python scripts/predict.py --weights W [W ...] [--out DIR] [--json] [--tta]` reads each file's model
and normalisation from its metadata (`--model` overrides), evaluates on the Fashion-MNIST test set
(several files: their ensemble, the mean of probabilities, and each member) and reports what
`report.build_report` holds; `--out DIR` also writes `report.REPORT_FILES`; with `--json` the last
line on stdout is one JSON object. `--images FILE_OR_DIR ...` prints each picture's top-3 classes
instead (`images.read_image`).

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

from fashion_func import atomic, data, ensemble, interop, losses, models
from fashion_func.checkpoint import CheckpointError
from fashion_func.cli import images, words
from fashion_func.cli import report as report_lib
from fashion_func.cli.args import EXIT_USAGE, Parser, UsageError, add_version, fail, int_arg, interruptible
from fashion_func.cli.device import resolve_device
from fashion_func.cli.images import ImageError, prepare_image  # noqa: F401  (prepare_image: importable here)
from fashion_func.loop import RunError
from fashion_func.models import Model, ModelState, Params
from fashion_func.safeio import FileError, check_output, display, short_repr, strict_json
from fashion_func.scattering import Scattering, ScatteringUnavailable
from fashion_func.step import NormalizeImages, make_eval_step

__all__ = ["main"]


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
        default=images.MAX_IMAGE_PIXELS,
        help="refuse images with more pixels than this before decoding them (default %(default)s)",
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


# the least value of each number flag (None: not given)
_LEAST = {"batch_size": 1, "topk": 1, "num_samples": 1, "num_confused": 0, "limit": 1, "max_image_pixels": 1}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, least in _LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            bound = f"must be at least {least}" if least else "must not be negative"
            raise UsageError(f"--{name.replace('_', '-')} {bound}, got {value}")
    if args.out is not None:  # --out must be (or become) a directory, each report file a safe target
        out = Path(args.out)
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise UsageError(f"--out {out} exists and is not a directory")
        _check_creatable(out)
        for name in report_lib.REPORT_FILES:
            try:
                check_output(out / name, overwrite=args.overwrite, inputs=args.weights, what="--out file")
            except FileError as e:
                raise UsageError(words.message(e)) from None
    return args


def _check_creatable(out: Path) -> None:
    """UsageError unless `out` can be created (or written): its nearest existing folder must be
    a directory this process may write in. Checked before the test set is evaluated."""
    existing = next(p for p in (out, *out.absolute().parents) if os.path.lexists(p))
    shown, folder = display(str(out)), display(str(existing))
    if not existing.is_dir():
        raise UsageError(f"--out {shown} cannot be created: {folder} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {shown} cannot be written: no permission to write in {folder}")


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
    images = model.input_shape in ((1, 28, 28), (28 * 28,)) or model.takes_features
    if classes != len(data.CLASS_NAMES) or not images:
        shape = "x".join(map(str, model.input_shape))
        raise CheckpointError(
            f"{path}: a {model.name} of {classes} classes over inputs of {shape}; predict takes a "
            f"{len(data.CLASS_NAMES)}-class classifier of 28x28 images (Fashion-MNIST)"
        )
    # bf16/fp16 files evaluate in fp32; a batch count stays an integer
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    params, model_state = interop.split_state(model, weights)  # batch-norm buffers, if any
    mean, std = interop.normalization(metadata)  # what the weights were trained with
    return Member(str(path), model, params, model_state, mean, std, metadata)


def per_example_outputs(m: Member, split: data.Split, batch_size: int, **options: Any) -> dict[str, Tensor]:
    """Per-example `loss`, `correct`, `top{k}_correct`, `pred`, `logits` over the split, on its device,
    in inference mode (running statistics); `options`: `make_eval_step`'s (`compile`, `topk`, `tta`).
    """
    # a model of ScatterNet features (`inputs` a `scattering.TRANSFORMS` name) takes them, not pixels
    if m.model.takes_features:
        preprocess: Any = Scattering(m.model.inputs).to(split.images.device)
    else:
        preprocess = NormalizeImages(m.mean, m.std)
    eval_step = make_eval_step(m.model, preprocess=preprocess, **options)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, split.labels.shape[0], batch_size):
        batch = (split.images[start : start + batch_size], split.labels[start : start + batch_size])
        parts.append(eval_step(m.params, batch, m.model_state))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _run_images(args: argparse.Namespace, members: Sequence[Member]) -> dict[str, Any]:
    """Classify every readable image (the members' mean probabilities); each one that cannot
    be read is one line on stderr."""
    errors: list[str] = []
    pictures, readable = [], []
    for f in images.find_images(args.images, errors):
        try:
            pictures.append(images.read_image(f, args.invert, args.max_image_pixels))
            readable.append(f)
        except ImageError as e:
            errors.append(str(e))
    for e in errors:
        fail(args.prog, e)
    results = []
    if pictures:
        labels = torch.zeros(len(pictures), dtype=torch.int64, device=args.device)  # unused
        split = data.Split(torch.stack(pictures).to(args.device), labels, "--images")
        outs = [per_example_outputs(m, split, len(pictures), compile=False, tta=args.tta) for m in members]
        probs = torch.stack([torch.softmax(o["logits"], dim=-1) for o in outs]).mean(0)
        top = probs.topk(min(3, probs.shape[-1]), dim=-1)
        for f, ps, cs in zip(readable, top.values.tolist(), top.indices.tolist(), strict=True):
            top3 = [{"class": c, "name": data.CLASS_NAMES[c], "prob": p} for p, c in zip(ps, cs, strict=True)]
            results.append({"path": str(f), "top3": top3})
            print(display(f"{f}: " + ", ".join(f"{t['name']} {t['prob']:.3f}" for t in top3)))
    return {"images": results, "errors": errors}


def _evaluate_test_set(args: argparse.Namespace, members: Sequence[Member]) -> dict[str, Any]:
    split = data.load("test", args.data_dir, device=args.device, limit=args.limit)
    print(display(f"test set: {split.labels.shape[0]} examples from {split.source}"))
    outs = [
        per_example_outputs(m, split, args.batch_size, compile=args.compile, topk=args.topk, tta=args.tta)
        for m in members
    ]
    if len(outs) == 1:
        result = outs[0]
    else:  # the ensemble: the mean of the members' probabilities, beside each one's (`member_*`)
        stacked = {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        result = ensemble.combine(stacked, split.labels, losses.cross_entropy_per_example, args.topk)
    report = {**report_lib.build_report(result, split.labels, args.topk), "tta": args.tta}
    report["most_confused"] = report_lib.most_confident_mistakes(
        result["logits"], split.labels, result["pred"], args.num_confused
    )
    if len(members) > 1:
        report["members"] = [
            report_lib.member_report(m.path, o, args.topk) for m, o in zip(members, outs, strict=True)
        ]
        for r in report["members"]:
            print(display(f"member {r['weights']}: accuracy {r['accuracy']:.4f}, loss {r['loss']:.4f}"))
        print(f"ensemble of {len(members)} (mean of probabilities):")
    if args.tta:
        print("test-time augmentation: each image and its mirror image, probabilities averaged")
    print(report_lib.format_report(report))
    if report["most_confused"]:
        print("\nmost confidently wrong (index: true -> predicted, confidence):")
        for c in report["most_confused"][:5]:
            print(f"  {c['index']}: {c['label_name']} -> {c['pred_name']} ({c['confidence']:.3f})")
    if args.out:
        written = report_lib.write_outputs(Path(args.out), split, result, report, args.num_samples)
        print(display("wrote " + ", ".join(str(p) for p in written)))
    return report


def _predict(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    args.device = resolve_device(args.device)
    members = [load_member(w, args.model, args.device) for w in args.weights]
    if args.tta and any(m.model.takes_features for m in members):  # it would mirror the features
        raise UsageError("--tta mirrors the model's inputs, which for a scatternet are features, not images")
    names = ", ".join(sorted({m.model.name for m in members}))
    summary: dict[str, Any] = {"weights": args.weights[0] if len(members) == 1 else list(args.weights),
                               "model": names, "tta": args.tta}  # fmt: skip
    for m in members:
        epoch = f", epoch {short_repr(m.metadata['epoch'])}" if "epoch" in m.metadata else ""
        print(display(f"weights {m.path} ({m.model.name}{epoch}), device {args.device}"))
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
    except (UsageError, RunError, CheckpointError, data.DataError, ImageError, atomic.WriteError) as e:
        return fail(prog, words.message(e))
    except ScatteringUnavailable as e:
        return fail(prog, str(e))
    except OSError as e:  # --out not writable and the like
        return fail(prog, f"{type(e).__name__}: {e}")
    return code
