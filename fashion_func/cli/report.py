"""What an evaluation found, for people and programs: the report (accuracy, top-k, per-class
precision/recall, confusion matrix, the most confident mistakes), its text form, and its
pictures and JSON files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from fashion_func import atomic, data, metrics

__all__: list[str] = []

REPORT_FILES = (  # what `write_outputs` may write into --out
    "confusion_matrix.png",
    "samples.png",
    "most_confused.png",
    "most_confused.json",
    "report.json",
)


def _confidence_if_wrong(logits: Tensor, label: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    # one example: logits [C], label and pred 0-d -> (softmax prob of the predicted class where
    # the prediction is wrong, else -1; prob of the true class)
    probs = torch.softmax(logits, dim=-1)
    confidence = probs.gather(0, pred.reshape(1)).squeeze(0)
    label_prob = probs.gather(0, label.reshape(1)).squeeze(0)
    return torch.where(pred != label, confidence, torch.full_like(confidence, -1.0)), label_prob


def most_confident_mistakes(logits: Tensor, labels: Tensor, preds: Tensor, n: int) -> list[dict[str, Any]]:
    """The up to `n` wrongly predicted examples with the highest predicted-class probability, each
    index, label, pred (with class names), confidence (the softmax probability of the prediction)
    and label_prob (that of the true class); scored per example by `vmap`, on the host once.
    """
    scores, label_probs = vmap(_confidence_if_wrong)(logits, labels, preds)
    values, picked = scores.topk(min(n, scores.shape[0]))  # n = 0: no rows
    columns = (picked, values, labels[picked], preds[picked], label_probs[picked])
    rows = torch.stack([c.double() for c in columns], dim=1).tolist()  # the one host sync
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


def build_report(out: dict[str, Tensor], labels: Tensor, topk: int) -> dict[str, Any]:
    """The report of per-example outputs (`predict.per_example_outputs`'s) against the labels: counts,
    accuracy, top-k accuracy, mean loss, per-class precision/recall/support, confusion matrix."""
    num_classes = out["logits"].shape[-1]
    cm = metrics.confusion_matrix(out["pred"], labels, num_classes=num_classes)
    precision, recall = metrics.precision_recall(cm)
    n = labels.shape[0]
    correct, topk_correct = int(out["correct"].sum()), int(out[f"top{topk}_correct"].sum())
    keys = ("class", "name", "precision", "recall", "support")
    columns = (range(num_classes), data.CLASS_NAMES, precision.tolist(), recall.tolist(), cm.sum(1).tolist())
    per_class = [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=False)]
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


def format_report(r: dict[str, Any]) -> str:
    """The report as text: the headline numbers, a per-class table and the confusion matrix."""
    lines = [
        f"accuracy {r['accuracy']:.4f} ({r['correct']}/{r['num_examples']}), "
        f"top-{r['topk']} accuracy {r['topk_accuracy']:.4f}, loss {r['loss']:.4f}",
        "",
        f"{'class':<14}{'precision':>10}{'recall':>8}{'support':>9}",
    ]
    for c in r["per_class"]:
        lines.append(f"{c['name']:<14}{c['precision']:>10.4f}{c['recall']:>8.4f}{c['support']:>9d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    lines.append(" " * 12 + "".join(f"{name[:7]:>8}" for name in r["class_names"]))
    for name, row in zip(r["class_names"], r["confusion_matrix"], strict=True):
        lines.append(f"{name[:12]:<12}" + "".join(f"{v:>8d}" for v in row))
    return "\n".join(lines)


def member_report(path: str, out: dict[str, Tensor], topk: int) -> dict[str, Any]:
    """One ensemble member's headline numbers (accuracy, top-k accuracy, loss)."""
    return {
        "weights": path,
        "accuracy": float(out["correct"].double().mean()),
        "topk_accuracy": float(out[f"top{topk}_correct"].double().mean()),
        "loss": float(out["loss"].double().mean()),
    }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: Sequence[Sequence[int]], path: Path) -> None:
    """A heat map of the confusion matrix with counts and class names, as PNG."""
    plt = _pyplot()
    counts = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(counts, cmap="Blues")
    names = data.CLASS_NAMES[: counts.shape[0]]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix")
    half = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            color = "white" if counts[i, j] > half else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    atomic.write_figure(path, fig, what="plot", bbox_inches="tight")


_CAPTION = {"fontsize": 5.5, "va": "top", "ha": "left"}  # plot_grid's captions, on a translucent box
_BOX = {"facecolor": "white", "alpha": 0.75, "pad": 0.6, "linewidth": 0}


def plot_grid(images: Tensor, captions: Sequence[str], colors: Sequence[str], path: Path, title: str) -> None:
    """uint8 images [N, 28, 28] tiled with `torchvision.utils.make_grid`, a caption over each, as PNG."""
    from torchvision.utils import make_grid

    plt = _pyplot()
    nrow, pad = 8, 2
    grid = make_grid(images.cpu()[:, None].float() / 255.0, nrow=nrow, padding=pad, pad_value=1.0)
    rows = -(-images.shape[0] // nrow)
    fig, ax = plt.subplots(figsize=(1.3 * nrow, 1.45 * rows + 0.4), dpi=150)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")  # grid: [3, H, W]
    cell = images.shape[-1] + pad  # 28 + pad for Fashion-MNIST images
    for i, (caption, color) in enumerate(zip(captions, colors, strict=True)):
        x, y = (i % nrow) * cell + pad, (i // nrow) * cell + pad
        ax.text(x + 0.5, y + 0.5, caption, color=color, bbox=_BOX, **_CAPTION)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    atomic.write_figure(path, fig, what="plot", bbox_inches="tight")


def write_outputs(
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
        atomic.write_json(written[-1], obj, what="report file", strict=True)
    return written
