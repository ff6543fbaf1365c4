"""Export a weights file for use elsewhere: `python scripts/export.py --weights W --format F --out FILE`.

Formats:

- `torch`: safetensors with `nn.Module` names and layout (bf16 kept), for
  `module.load_state_dict(safetensors.torch.load_file(FILE))` or `interop.to_module`.
- `flax`: Flax layout and naming (`conv1.kernel` HWIO, dense kernels `[in, out]`) as
  safetensors; `flax.traverse_util.unflatten_dict(safetensors.flax.load_file(FILE), sep=".")`
  gives `{"conv1": {"kernel", "bias"}, ...}` for `interop.flax_module(name)` (or your own
  `flax.linen` module with the same layer names), or `interop.simplenet_jax`. The dense layer
  after the conv stack (fc1) has its rows in the (h w c) order of an NHWC `x.reshape((B, -1))`
  (metadata `flatten: "hwc"`). Batch norm becomes `bn1.scale`, `bn1.bias`, `bn1.mean`,
  `bn1.var` (`interop.flax_variables` splits them into Flax's `params` and `batch_stats`);
  `num_batches_tracked` is left out of the arrays (Flax has none) and kept in the metadata.
- `numpy`: torch names and layout in dtypes plain numpy reads: safetensors for
  `safetensors.numpy.load_file(FILE)`, or `numpy.savez` output when FILE ends in `.npz`.
- `onnx`: an ONNX model for `onnxruntime.InferenceSession(FILE)`. Input `images`: **uint8
  `[B, 28, 28]`**, raw pixels, any batch size; the normalisation `(x / 255 - mean) / std` is
  inside the graph, with the mean/std the weights were trained with (the weights file's
  `normalize_mean`/`normalize_std`, else its config's `normalize`: "dataset" 0.2860/0.3530,
  "tutorial" 0.5/0.5; the dataset's when the file says nothing). Output `logits`: float32
  `[B, classes]`, eval mode (batch norm's running statistics, no dropout), float32 weights.
  The model's `metadata_props` record `model`, `input` ("uint8 [B,28,28]"), `normalize_mean`,
  `normalize_std`, `classes`. Needs the onnx extra (`pip install 'fashion_func[onnx]'`).

Metadata: safetensors outputs record `model`, `source`, the input's `epoch` and `config`, and,
where the weights file says how inputs were normalised, `normalize_mean` / `normalize_std` as
numbers. String values are stored as they are (`"model": "simplenet"`), others as JSON, with
`__json__` naming those keys (`checkpoint.encode_metadata`).

A stateful model's weights file (simplenet_bn) holds its buffers beside its parameters; every
format carries them (the running statistics decide the model's eval-mode output).

numpy has no bfloat16, so `--bf16-as` says what bf16 weights become in the flax and numpy
formats: `float32` (exact upcast, the default), `uint16` (the raw bit patterns, half the size;
the file's metadata lists the keys), or `bfloat16` (flax only; needs ml_dtypes to read).
Exit code 2 with one line on stderr for a missing, bad or mismatched weights file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fashion_func import atomic, checkpoint, interop
from fashion_func.cli import words
from fashion_func.cli.args import EXIT_USAGE, Parser, UsageError, add_version, interruptible
from fashion_func.interop.flax_modules import FLAX_MODELS
from fashion_func.safeio import FileError, check_output, display

__all__ = ["main"]

FORMATS = ("torch", "flax", "numpy", "onnx")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `scripts/export.py`."""
    p = Parser(
        prog="export.py", description="Export fashion_func weights for PyTorch, JAX/Flax, numpy or ONNX."
    )
    add_version(p)
    p.add_argument("--weights", required=True, help="weights file (best.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, help="torch, flax, numpy or onnx")
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


SUFFIXES = {"torch": (".safetensors",), "flax": (".safetensors",), "numpy": (".safetensors", ".npz"),
            "onnx": (".onnx",)}  # fmt: skip


def export(
    weights: str | Path,
    fmt: str,
    out: str | Path,
    *,
    model: str | None = None,
    bf16_as: str = "float32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `weights` to `out` in format `fmt`; returns a summary (model, format, tensors, path).

    `out` must end in the format's suffix, must not be the input, and an existing file there is
    replaced only with `overwrite` (never a device, FIFO, directory or link: `safeio.check_output`).
    Raises `checkpoint.CheckpointError` for a bad input file, ValueError for an impossible request
    (bfloat16 into a numpy file, an unsafe `out`), ImportError for onnx without the onnx extra.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not str(out):  # Path("") reads as ".", which would name the wrong thing
        raise ValueError("--out is empty; give a file name")
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
    # model_hparams: what the shapes do not say (dpcnn's group count) travels with the weights
    meta: dict[str, Any] = {"model": loaded.name, "model_hparams": loaded.hparams, "source": str(weights)}
    for key in ("epoch", "config", "privacy"):  # privacy: the guarantee travels with the weights
        if key in metadata:
            meta[key] = metadata[key]
    known = interop.known_normalization(metadata)
    if known is not None:
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
        print(display(" ".join(f"{prog}: error: {words.message(e)}".split())), file=sys.stderr)
        return EXIT_USAGE
    line = f"wrote {summary['out']}: {summary['model']} weights ({summary['tensors']} tensors), {args.format}"
    with contextlib.suppress(BrokenPipeError):
        print(display(line), flush=True)
    return 0
