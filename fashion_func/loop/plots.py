"""The training curves: loss.png and accuracy.png from a run's history."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fashion_func import atomic
from fashion_func import callbacks as cbs
from fashion_func.loop.errors import writing

__all__: list[str] = []


def plot_history(
    records: Sequence[dict[str, Any]], out: Path, *, folder: atomic.FolderId | None = None
) -> None:
    """loss.png and accuracy.png (train and validation curves per epoch) into `out` (RunError when
    they cannot be written; `folder`: the identity `out` must still have, `atomic.write_bytes`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    for name, label in (("loss", "loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for split in ("train", "val"):
            key = f"{split}_{name}"
            if any(key in r for r in records):
                values = [cbs.decode_float(r.get(key)) for r in records]
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 ticks
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
        with writing():
            atomic.write_figure(out / f"{label}.png", fig, what="plot", folder=folder)
