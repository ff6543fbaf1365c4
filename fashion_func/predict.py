"""The predictor: evaluate a weights file on the test set, or classify image files.

`python scripts/predict.py --weights runs/a/checkpoints/best.safetensors [--out DIR] [--json]`
reads the model name and config from the file's metadata (`--model` overrides), evaluates on
the Fashion-MNIST test set and reports accuracy, top-k accuracy, per-class precision/recall and
the confusion matrix. With `--out DIR` it also writes `confusion_matrix.png`, `samples.png` (a
grid of test images with true and predicted classes), `most_confused.png` and
`most_confused.json` (the test examples the model gets most confidently wrong: candidates for
label noise), and `report.json`. With `--json` the last line on stdout is one JSON object.

`--images FILE_OR_DIR ...` classifies PNG/JPEG files instead (see `prepare_image` for how a
picture becomes a 28x28 Fashion-MNIST image) and prints each one's top-3 classes.

Exit codes: 0 success; 2 usage or input error (missing or bad weights file, wrong model,
missing data, unreadable image), reported in one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from fashion_func import checkpoint, data, ensemble, interop, losses, metrics
from fashion_func.cli import Parser, UsageError, add_version, int_arg
from fashion_func.loop import RunError, resolve_device
from fashion_func.models import Model, ModelState, Params
from fashion_func.safeio import (
    FileError,
    check_output,
    describe,
    display,
    open_regular,
    short_repr,
    strict_json,
)
from fashion_func.step import NormalizeImages, make_eval_step

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageError",
    "build_parser",
    "classify_images",
    "evaluate",
    "find_images",
    "main",
    "most_confident_mistakes",
    "prepare_image",
]

EXIT_USAGE = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIZE = 28
# Trim tolerance: pixels within 5% of full scale of the background colour count as background
# (the threshold of step 2 of the Fashion-MNIST conversion, Xiao et al. 2017).
TRIM_TOLERANCE = 0.05 * 255
# 25 megapixels (a 5000x5000 photo, ~100 MB as RGBA while converting); a small PNG can declare
# far more, and decoding it would take gigabytes. PIL refuses above ~179 M pixels in any case.
MAX_IMAGE_PIXELS = 25_000_000
REPORT_FILES = (
    "confusion_matrix.png",
    "samples.png",
    "most_confused.png",
    "most_confused.json",
    "report.json",
)


class ImageError(Exception):
    """An image file could not be found or read (one line naming the file)."""


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
    for name in REPORT_FILES:
        try:
            check_output(out / name, overwrite=args.overwrite, inputs=args.weights, what="--out file")
        except FileError as e:
            raise UsageError(str(e)) from None


def _normalization(metadata: dict[str, Any]) -> tuple[float, float]:
    """(mean, std) the weights were trained with: the recorded numbers, else the run config's
    `normalize`, else the dataset's (`interop.normalization`)."""
    return interop.normalization(metadata)


# -- images -------------------------------------------------------------------------------------


def find_images(paths: Sequence[str], errors: list[str] | None = None) -> list[Path]:
    """The image files named, with directories expanded to their PNG/JPEG files (sorted).

    A path that cannot be used (missing, a device, a FIFO, an empty directory) raises
    ImageError, or, with `errors` given, is described there and skipped.
    """
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        try:
            found.extend(_images_at(path))
        except ImageError as e:
            if errors is None:
                raise
            errors.append(str(e))
    return found


def _images_at(path: Path) -> list[Path]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise ImageError(f"{path}: no such file or directory") from None
    if stat.S_ISDIR(mode):
        inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not inside:
            raise ImageError(f"{path}: directory holds no {'/'.join(IMAGE_SUFFIXES)} files")
        return inside
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path}: not a regular file ({describe(mode)})")
    return [path]


def _to_gray(image: Any, background: int) -> np.ndarray:
    """8-bit grayscale as a uint8 array; transparency composited over `background`."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float grayscale: PIL's convert("L") would clip, so scale the full range instead
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" else max(float(arr.max()), 1.0)
        return np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(canvas, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()  # ITU-R 601-2 luma for colour


def prepare_image(image: Any, *, invert: bool = False) -> Tensor:
    """A PIL image as a Fashion-MNIST image: uint8 `[28, 28]`, a light object on a black background.

    The steps follow the dataset's own conversion (Xiao et al. 2017: trim, resize the longest
    edge to 28, extend the shorter edge to 28 with the object centred, negate, 8-bit grayscale):

    1. orientation from EXIF applied; transparency composited over the background colour
       (black, or white with `invert`, so that it ends up black either way);
    2. 8-bit grayscale (ITU-R 601-2 luma for colour; 16-bit images scaled, not clipped);
    3. with `invert`, x -> 255 - x: the dataset holds light garments on black, while product
       photos are usually dark on white (the dataset's pipeline negates for the same reason);
    4. an image that is now 28x28 is returned as it is: it is already in the dataset's frame,
       so a test image saved as PNG comes back bit for bit;
    5. trim: crop to the box of pixels that differ from the background (the median of the four
       corner pixels) by more than 5% of full scale;
    6. pad the shorter side on both sides with the background to a square, so the object is
       centred and keeps its aspect ratio;
    7. resize to 28x28: area averaging (box filter, antialiased) when shrinking, bilinear when
       enlarging (no overshoot, which step 8 would turn into a darker object);
    8. levels: subtract the background and stretch so the brightest pixel is 255, as the
       dataset's images have a 0 background and full-scale highlights.
    """
    from PIL import Image

    gray = _to_gray(image, 255 if invert else 0)
    if invert:
        gray = 255 - gray
    if gray.shape == (SIZE, SIZE):
        return torch.from_numpy(gray)
    h, w = gray.shape
    corners = np.array([gray[0, 0], gray[0, w - 1], gray[h - 1, 0], gray[h - 1, w - 1]], dtype=np.float64)
    background = float(np.median(corners))
    rows, cols = np.nonzero(np.abs(gray.astype(np.float64) - background) > TRIM_TOLERANCE)
    if rows.size:  # a blank picture keeps its frame
        gray = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = gray.shape
    side = max(h, w)
    square = np.full((side, side), round(background), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = gray
    resample = Image.Resampling.BOX if side >= SIZE else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), resample), dtype=np.float64)
    small = np.clip(small - background, 0.0, None)
    peak = small.max()
    if peak > 0:
        small = small * (255.0 / peak)
    return torch.from_numpy(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def _read_image(path: Path, invert: bool, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """The image file as a Fashion-MNIST image; ImageError (one line naming it) when it cannot be.

    Only a regular file is opened, and its pixel count is checked from the header before
    anything is decoded: a 164 KB PNG can declare 13000x13000 pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open_regular(path, what="image") as f, warnings.catch_warnings():
            # our own limit is checked below; PIL's warning for large images would be an error under -W error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"{path}: {image.width}x{image.height} pixels, "
                        f"more than --max-image-pixels {max_pixels}"
                    )
                image.load()
                return prepare_image(image, invert=invert)
    except FileError as e:
        raise ImageError(str(e).removeprefix("image ")) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too many pixels to decode safely ({_one_line(e)})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read (PNG or JPEG expected)") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:  # truncated or corrupt files
        raise ImageError(f"{path}: cannot read image: {_one_line(e)}") from None


def _one_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


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
) -> tuple[Tensor, Tensor]:
    """(top-k probabilities [N, k], classes [N, k]) for uint8 images [N, 28, 28], best first;
    `sort=False`: all probabilities [N, C] in class order (and the class indices)."""
    eval_step = make_eval_step(model, compile=False, preprocess=NormalizeImages(mean, std))
    labels = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)  # unused
    probs = torch.softmax(eval_step(params, (images, labels), model_state)["logits"], dim=-1)
    if not sort:
        return probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return top.values, top.indices


# -- test-set evaluation ---------------------------------------------------------------------


def evaluate(
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
) -> dict[str, Tensor]:
    """Per-example `loss`, `correct`, `topk_correct`, `pred`, `logits` over the split, on its device.

    A stateful model (batch norm) needs its `model_state` (inference mode: running statistics).
    """
    eval_step = make_eval_step(model, compile=compile, preprocess=NormalizeImages(mean, std), topk=topk)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, split.labels.shape[0], batch_size):
        batch = (split.images[start : start + batch_size], split.labels[start : start + batch_size])
        parts.append(eval_step(params, batch, model_state))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _confidence_if_wrong(logits: Tensor, label: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    # one example: logits [C], label and pred 0-d -> (softmax prob of the predicted class where
    # the prediction is wrong, else -1; prob of the true class)
    probs = torch.softmax(logits, dim=-1)
    confidence = probs.gather(0, pred.reshape(1)).squeeze(0)
    label_prob = probs.gather(0, label.reshape(1)).squeeze(0)
    return torch.where(pred != label, confidence, torch.full_like(confidence, -1.0)), label_prob


def most_confident_mistakes(logits: Tensor, labels: Tensor, preds: Tensor, n: int) -> list[dict[str, Any]]:
    """The up to `n` wrongly predicted examples with the highest predicted-class probability.

    Per-example scores come from `torch.func.vmap` over a single-example function; the results
    come to the host once. Each entry: index, label, pred (with class names), confidence (the
    softmax probability of the prediction) and label_prob (that of the true class).
    """
    scores, label_probs = vmap(_confidence_if_wrong)(logits, labels, preds)
    k = min(n, scores.shape[0])
    if k == 0:
        return []
    top = scores.topk(k)
    rows = torch.stack(
        [
            top.indices.double(),
            top.values.double(),
            labels[top.indices].double(),
            preds[top.indices].double(),
            label_probs[top.indices].double(),
        ],
        dim=1,
    ).tolist()  # the one host sync
    out = []
    for index, confidence, label, pred, label_prob in rows:
        if confidence < 0:  # fewer mistakes than asked for
            break
        out.append(
            {
                "index": int(index),
                "label": int(label),
                "label_name": data.CLASS_NAMES[int(label)],
                "pred": int(pred),
                "pred_name": data.CLASS_NAMES[int(pred)],
                "confidence": confidence,
                "label_prob": label_prob,
            }
        )
    return out


def _report(out: dict[str, Tensor], labels: Tensor, topk: int) -> dict[str, Any]:
    num_classes = out["logits"].shape[-1]
    cm = metrics.confusion_matrix(out["pred"], labels, num_classes=num_classes)
    precision, recall = metrics.precision_recall(cm)
    n = labels.shape[0]
    correct, topk_correct = int(out["correct"].sum()), int(out["topk_correct"].sum())
    support = cm.sum(1)
    per_class = [
        {
            "class": c,
            "name": data.CLASS_NAMES[c],
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "support": int(support[c]),
        }
        for c in range(num_classes)
    ]
    return {
        "num_examples": n,
        "correct": correct,
        "accuracy": correct / n,
        "topk": topk,
        "topk_accuracy": topk_correct / n,
        "loss": float(out["loss"].double().mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": list(data.CLASS_NAMES),
    }


def _format_report(r: dict[str, Any]) -> str:
    n = r["num_examples"]
    lines = [
        f"accuracy {r['accuracy']:.4f} ({r['correct']}/{n}), "
        f"top-{r['topk']} accuracy {r['topk_accuracy']:.4f}, loss {r['loss']:.4f}",
        "",
        f"{'class':<14}{'precision':>10}{'recall':>8}{'support':>9}",
    ]
    for c in r["per_class"]:
        lines.append(f"{c['name']:<14}{c['precision']:>10.4f}{c['recall']:>8.4f}{c['support']:>9d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    short = [name[:7] for name in r["class_names"]]
    lines.append(" " * 12 + "".join(f"{s:>8}" for s in short))
    for name, row in zip(r["class_names"], r["confusion_matrix"], strict=True):
        lines.append(f"{name[:12]:<12}" + "".join(f"{v:>8d}" for v in row))
    return "\n".join(lines)


# -- pictures ------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    checkpoint.atomic_write(path, buf.getvalue())


def plot_confusion_matrix(cm: Sequence[Sequence[int]], path: Path) -> None:
    """A heat map of the confusion matrix with counts and class names, as PNG."""
    plt = _pyplot()
    counts = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(counts, cmap="Blues")
    names = data.CLASS_NAMES[: counts.shape[0]]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    half = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if counts[i, j] > half else "black",
            )
    _save_figure(fig, path)


def plot_grid(images: Tensor, captions: Sequence[str], colors: Sequence[str], path: Path, title: str) -> None:
    """uint8 images [N, 28, 28] tiled with `torchvision.utils.make_grid`, a caption over each, as PNG."""
    from torchvision.utils import make_grid

    plt = _pyplot()
    nrow, pad = 8, 2
    grid = make_grid(
        images.cpu()[:, None].float() / 255.0, nrow=nrow, padding=pad, pad_value=1.0
    )  # [3, H, W]
    rows = -(-images.shape[0] // nrow)
    fig, ax = plt.subplots(figsize=(1.3 * nrow, 1.45 * rows + 0.4), dpi=150)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    cell = SIZE + pad
    for i, (caption, color) in enumerate(zip(captions, colors, strict=True)):
        x, y = (i % nrow) * cell + pad, (i // nrow) * cell + pad
        ax.text(
            x + 0.5,
            y + 0.5,
            caption,
            fontsize=5.5,
            color=color,
            va="top",
            ha="left",
            bbox={"facecolor": "white", "alpha": 0.75, "pad": 0.6, "linewidth": 0},
        )
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    _save_figure(fig, path)


def _write_outputs(
    out_dir: Path, split: data.Split, result: dict[str, Tensor], report: dict[str, Any], num_samples: int
) -> list[Path]:
    """Write the report's pictures and JSON files into `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = data.CLASS_NAMES
    written = [out_dir / "confusion_matrix.png", out_dir / "samples.png"]
    plot_confusion_matrix(report["confusion_matrix"], written[0])

    k = min(num_samples, split.labels.shape[0])
    labels, preds = split.labels[:k].tolist(), result["pred"][:k].tolist()
    plot_grid(
        split.images[:k],
        [f"true {names[t]}\npred {names[p]}" for t, p in zip(labels, preds, strict=True)],
        ["green" if t == p else "red" for t, p in zip(labels, preds, strict=True)],
        written[1],
        f"First {k} test images: true and predicted class (red: wrong)",
    )
    confused = report["most_confused"]
    if confused:  # a perfect model has no picture to show
        index = torch.tensor([c["index"] for c in confused], device=split.images.device)
        written.append(out_dir / "most_confused.png")
        plot_grid(
            split.images[index],
            [
                f"#{c['index']} true {c['label_name']}\npred {c['pred_name']} {c['confidence']:.2f}"
                for c in confused
            ],
            ["red"] * len(confused),
            written[-1],
            "Most confidently wrong test examples (label-noise candidates)",
        )
    for name, obj in (("most_confused.json", confused), ("report.json", report)):
        written.append(out_dir / name)
        checkpoint.atomic_write(written[-1], (strict_json(obj, indent=2) + "\n").encode())
    return written


# -- entry point ------------------------------------------------------------------------------


def _fail(message: str) -> int:
    _err(f"predict.py: error: {message}")
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
    # bf16/fp16 files evaluate in fp32; a batch count stays an integer
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    params, model_state = interop.split_state(model, weights)  # batch-norm buffers, if any
    mean, std = _normalization(metadata)
    return Member(str(path), model, params, model_state, mean, std, metadata)


def ensemble_outputs(outs: Sequence[dict[str, Tensor]], labels: Tensor, topk: int) -> dict[str, Tensor]:
    """The per-example outputs of the ensemble of several models' outputs (`evaluate`'s), its
    prediction the mean of their probabilities, beside each one's (`member_*`, `[K, N]`)."""
    keys = ("loss", "logits", "correct", "topk_correct", "pred")
    stacked = {k: torch.stack([o[k] for o in outs]) for k in keys}
    return ensemble.combine(stacked, labels, losses.cross_entropy_per_example, topk)


def _member_report(path: str, out: dict[str, Tensor]) -> dict[str, Any]:
    return {
        "weights": path,
        "accuracy": float(out["correct"].double().mean()),
        "topk_accuracy": float(out["topk_correct"].double().mean()),
        "loss": float(out["loss"].double().mean()),
    }


def _run_images(args: argparse.Namespace, members: Sequence[Member]) -> dict[str, Any]:
    """Classify every readable image (the members' mean probabilities); each one that cannot
    be read is one line on stderr."""
    errors: list[str] = []
    files = find_images(args.images, errors)
    images, readable = [], []
    for f in files:
        try:
            images.append(_read_image(f, args.invert, args.max_image_pixels))
            readable.append(f)
        except ImageError as e:
            errors.append(str(e))
    for e in errors:
        _err(f"predict.py: error: {e}")
    results = []
    if images:
        batch = torch.stack(images).to(params_device(members[0].params))
        probs = torch.stack([
            classify_images(m.model, m.params, batch, mean=m.mean, std=m.std, model_state=m.model_state,
                            sort=False)[0]
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
        evaluate(m.model, m.params, split, batch_size=args.batch_size, topk=args.topk, mean=m.mean, std=m.std,
                 compile=args.compile, model_state=m.model_state)
        for m in members
    ]  # fmt: skip
    result = outs[0] if len(outs) == 1 else ensemble_outputs(outs, split.labels, args.topk)
    report = _report(result, split.labels, args.topk)
    report["most_confused"] = most_confident_mistakes(
        result["logits"], split.labels, result["pred"], args.num_confused
    )
    if len(members) > 1:
        report["members"] = [_member_report(m.path, o) for m, o in zip(members, outs, strict=True)]
        for r in report["members"]:
            print(display(f"member {r['weights']}: accuracy {r['accuracy']:.4f}, loss {r['loss']:.4f}"))
        print(f"ensemble of {len(members)} (mean of probabilities):")
    print(_format_report(report))
    if report["most_confused"]:
        print("\nmost confidently wrong (index: true -> predicted, confidence):")
        for c in report["most_confused"][:5]:
            print(f"  {c['index']}: {c['label_name']} -> {c['pred_name']} ({c['confidence']:.3f})")
    if args.out:
        written = _write_outputs(Path(args.out), split, result, report, args.num_samples)
        print(display("wrote " + ", ".join(str(p) for p in written)))
    return report


def params_device(params: Params) -> torch.device:
    """The device the weights are on."""
    return next(iter(params.values())).device


def _predict(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    device = resolve_device(args.device)
    members = [load_member(w, args.model, device) for w in args.weights]
    names = ", ".join(sorted({m.model.name for m in members}))
    summary: dict[str, Any] = {"weights": args.weights[0] if len(members) == 1 else list(args.weights),
                               "model": names}  # fmt: skip
    for m in members:
        epoch = f", epoch {short_repr(m.metadata['epoch'])}" if "epoch" in m.metadata else ""
        print(display(f"weights {m.path} ({m.model.name}{epoch}), device {device}"))
    if args.images:
        summary.update(_run_images(args, members))
        return summary, EXIT_USAGE if summary["errors"] else 0
    summary.update(_evaluate_test_set(args, members))
    return summary, 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `scripts/predict.py`; returns the process exit code."""
    try:
        args = _parse(argv)
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
    except (UsageError, RunError, checkpoint.CheckpointError, data.DataError, ImageError) as e:
        return _fail(str(e))
    except OSError as e:  # --out not writable and the like
        return _fail(f"{type(e).__name__}: {e}")
    return code
