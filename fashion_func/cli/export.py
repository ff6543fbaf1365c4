"""`python scripts/export.py --weights W --format F --out FILE`: a weights file for use elsewhere.

Formats (their layouts: README "Predict and export" and each writer's docstring): `torch`,
safetensors with `nn.Module` names and layout, bf16 kept (`checkpoint.save_weights`); `flax`, Flax
layout and names (`interop.save_flax`); `numpy`, torch layout in plain numpy dtypes, safetensors or
`.npz` (`interop.save_numpy`); `onnx`, a graph of uint8 `[B, 28, 28]` images that normalises them
itself (`interop.save_onnx`, the onnx extra). `--bf16-as` says what bf16 weights become in flax and
numpy files: `float32` (exact, the default), `uint16` (the bit patterns) or `bfloat16` (flax only).

Every output's metadata records `model`, `model_hparams`, `source`, the input's `epoch`, `config`
and `privacy`, and `normalize_mean` / `normalize_std` (numbers) where the input says how it was
normalised (`checkpoint.encode_metadata`). A stateful model's buffers travel in every format.
Exit code 2 with one line on stderr for a missing, bad or mismatched weights file.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fashion_func import atomic, checkpoint, interop
from fashion_func.cli import words
from fashion_func.cli.args import Parser, UsageError, add_version, fail, interruptible
from fashion_func.interop.flax_modules import FLAX_MODELS
from fashion_func.safeio import FileError, check_output, display

__all__ = ["main"]

# each --format, with the suffixes its --out may end in
SUFFIXES = dict(
    torch=(".safetensors",), flax=(".safetensors",), numpy=(".safetensors", ".npz"), onnx=(".onnx",)
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `scripts/export.py`."""
    p = Parser(
        prog="export.py", description="Export fashion_func weights for PyTorch, JAX/Flax, numpy or ONNX."
    )
    add_version(p)
    p.add_argument("--weights", required=True, help="weights file (best.safetensors)")
    p.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="torch, flax, numpy or onnx")
    p.add_argument(
        "--out", required=True, help="file to write (.safetensors; .npz also for numpy; .onnx for onnx)"
    )
    p.add_argument("--model", help="model name, overriding the file's metadata")
    p.add_argument("--overwrite", action="store_true", help="replace an existing regular file at --out")
    p.add_argument(
        "--bf16-as",
        default="float32",
        choices=interop.BF16_AS,
        help="what bf16 weights become in flax/numpy files (default float32)",
    )
    return p


def export(
    weights: str | Path,
    fmt: str,
    out: str | Path,
    *,
    model: str | None = None,
    bf16_as: str = "float32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `weights` to `out` in format `fmt` (a key of `SUFFIXES`); returns a summary (model,
    format, tensors, path). `out` is checked by `safeio.check_output` (the format's suffixes; an
    existing regular file, not the input, replaced only with `overwrite`). Raises CheckpointError
    for a bad input file, ValueError for an impossible request (bfloat16 into a numpy file, an unsafe
    `out`, flax for a model no Flax module reads), ImportError for onnx without the onnx extra.
    """
    try:
        check_output(out, overwrite=overwrite, inputs=[weights], suffixes=SUFFIXES[fmt], what="--out")
    except FileError as e:
        raise ValueError(words.message(e)) from None
    loaded, params, metadata = interop.load_weights_file(weights, model)
    if fmt == "flax" and loaded.name not in FLAX_MODELS:  # a file no `interop.flax_module` would read
        raise ValueError(
            f"--format flax: no Flax module reads a {loaded.name} yet (those of {', '.join(FLAX_MODELS)}); "
            "export it as torch, numpy or onnx"
        )
    # what travels with the weights: model_hparams (what the shapes do not say: dpcnn's group
    # count) and a private run's privacy guarantee
    meta: dict[str, Any] = {"model": loaded.name, "model_hparams": loaded.hparams, "source": str(weights)}
    meta.update({key: metadata[key] for key in ("epoch", "config", "privacy") if key in metadata})
    if (known := interop.known_normalization(metadata)) is not None:
        meta["normalize_mean"], meta["normalize_std"] = known
    if fmt == "onnx":
        mean, std = interop.normalization(metadata)
        interop.save_onnx(out, loaded.name, params, mean=mean, std=std, metadata=meta, hparams=loaded.hparams)
    elif fmt == "torch":
        checkpoint.save_weights(out, params, metadata=meta)
    elif fmt == "flax":
        interop.save_flax(out, params, bf16_as=bf16_as, metadata=meta)
    else:
        interop.save_numpy(out, params, bf16_as=bf16_as, metadata=meta)
    return {"model": loaded.name, "format": fmt, "tensors": len(params), "out": str(out)}


def main(argv: Sequence[str] | None = None, *, prog: str = "export.py") -> int:
    """Entry point of `scripts/export.py` (`prog` names the command in its messages); returns
    the process exit code. SIGINT / SIGTERM end it in one line, 130 / 143 (`args.interruptible`)."""
    return interruptible(prog, lambda: _main(argv, prog))


def _main(argv: Sequence[str] | None, prog: str) -> int:
    try:
        args = build_parser().parse_args(argv)
        summary = export(
            args.weights,
            args.format,
            args.out,
            model=args.model,
            bf16_as=args.bf16_as,
            overwrite=args.overwrite,
        )
    except (UsageError, checkpoint.CheckpointError, atomic.WriteError, ValueError, OSError, ImportError) as e:
        return fail(prog, words.message(e))
    line = f"wrote {summary['out']}: {summary['model']} weights ({summary['tensors']} tensors), {args.format}"
    with contextlib.suppress(BrokenPipeError):
        print(display(line), flush=True)
    return 0
