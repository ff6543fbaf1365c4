"""An ONNX model of a weights file for ONNX Runtime: uint8 images in, normalisation inside, logits
out. onnx and onnxscript are an optional extra (`pip install fashion_func[onnx]`), imported only
when called.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch import nn as tnn

from fashion_func import atomic, checkpoint, data, models, preprocess, scattering
from fashion_func.interop.torch_io import to_module
from fashion_func.interop.torch_modules import hparams_from_params
from fashion_func.interop.weights_file import finite_number

__all__ = ["save_onnx"]


class _ImagesToLogits(tnn.Module):
    """uint8 images `[B, 28, 28]` -> logits `[B, classes]`, normalising inside with `preprocess.normalize`,
    the function training and evaluation use."""

    def __init__(self, module: tnn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.module = module
        self.mean, self.std = float(mean), float(std)

    def forward(self, images: Tensor) -> Tensor:
        return self.module(preprocess.normalize(images, self.mean, self.std))  # [B, 1, 28, 28] float32


class _FeaturesToLogits(tnn.Module):
    """uint8 images `[B, 28, 28]` -> logits: `scattering.Scattering`'s features (batched over
    orientations: a graph that exports in seconds), then the model."""

    def __init__(self, module: tnn.Module, kind: str) -> None:
        super().__init__()
        self.features, self.module = scattering.Scattering(kind, batched=True), module

    def forward(self, images: Tensor) -> Tensor:
        return self.module(self.features(images))  # [B, *scattering.shape(kind)] float32


ONNX_INPUT = "images"  # uint8 [B, 28, 28], raw pixel values 0..255
ONNX_OUTPUT = "logits"  # float32 [B, classes]


def save_onnx(
    path: str | os.PathLike[str],
    model_name: str,
    weights: Mapping[str, Tensor],
    *,
    mean: float = preprocess.MEAN,
    std: float = preprocess.STD,
    metadata: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> None:
    """Write the model with `weights` as an ONNX file that ONNX Runtime runs, atomically.

    Input `images`: uint8 `[B, 28, 28]`, raw pixels (batch size free), normalised in the graph as
    `preprocess.normalize` does with `mean`, `std` (the weights' own: `normalization(metadata)`;
    a model of ScatterNet features, `inputs` a `scattering.TRANSFORMS` name, has
    `scattering.Scattering` there).
    Output `logits`: float32 `[B, classes]`. The model is `to_module(model_name, weights,
    **hparams)` (`hparams`: what the shapes do not say, dpcnn's `groups`) in eval mode, exported
    by `torch.onnx.export(dynamo=True)`, bf16/fp16 weights upcast to float32 (exact). The
    `metadata_props` say so (`model`, `input`, `output`, `normalize_mean`, `normalize_std`,
    `normalization`, `classes` for 10 classes) beside `metadata`'s entries (encoded as
    `checkpoint.encode_metadata` does). ImportError without the optional `onnx` extra; a failed
    write is `atomic.WriteError`.

        session = onnxruntime.InferenceSession(path)
        logits = session.run(None, {"images": uint8_images})[0]
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail here with the fix)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the onnx extra: pip install 'fashion_func[onnx]' ({e})"
        ) from None
    wrapped = _images_to_logits(model_name, weights, mean, std, hparams or {})
    # the scattering is in the graph: the name of its transform, else None
    features = wrapped.features.kind if isinstance(wrapped, _FeaturesToLogits) else None
    example = torch.zeros((2, 28, 28), dtype=torch.uint8)  # 2, not 1: export would fix a size-1 axis
    with torch.no_grad():
        num_classes = int(wrapped(example).shape[-1])
        program = torch.onnx.export(
            wrapped,
            (example,),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    props = _props(model_name, num_classes, mean, std, features)
    user = checkpoint.encode_metadata({k: v for k, v in (metadata or {}).items() if k not in props})
    existing = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**existing, **user, **props})
    proto.doc_string = (
        f"fashion_func {model_name}: uint8 Fashion-MNIST images [B,28,28] -> logits [B,{num_classes}]"
    )
    atomic.write_bytes(path, proto.SerializeToString(), what="ONNX model")


def _images_to_logits(
    model_name: str, weights: Mapping[str, Tensor], mean: float, std: float, hparams: Mapping[str, Any]
) -> tnn.Module:
    """The eval-mode module to export: float32 CPU weights, images normalised inside."""
    if not (finite_number(mean) and finite_number(std) and std > 0):
        raise ValueError(f"normalisation mean {mean!r} and std {std!r} must be finite numbers, std > 0")
    cpu32 = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in weights.items()
    }
    module = to_module(model_name, cpu32, **hparams)
    model = models.get(model_name, **{**hparams_from_params(model_name, cpu32), **hparams})
    if model.takes_features:  # its inputs are fixed features of the images
        return _FeaturesToLogits(module, model.inputs).eval()
    if model.input_shape not in ((1, 28, 28), (28 * 28,)):
        raise ValueError(f"{model_name} takes inputs {list(model.input_shape)}, not 28x28 images")
    return _ImagesToLogits(module, mean, std).eval()


def _props(
    model_name: str, num_classes: int, mean: float, std: float, features: str | None
) -> dict[str, str]:
    """The `metadata_props` that say what the ONNX model takes and gives."""
    props = {
        "model": model_name,
        "input": "uint8 [B,28,28]",
        "input_name": ONNX_INPUT,
        "output": f"float32 logits [B,{num_classes}]",
        "output_name": ONNX_OUTPUT,
        "normalize_mean": repr(float(mean)),
        "normalize_std": repr(float(std)),
        "normalization": "in the graph: x = (images / 255 - normalize_mean) / normalize_std, [B,1,28,28]",
    }
    if features is not None:  # no mean or std: the features of images / 255
        props.update(normalize_mean="none", normalize_std="none", normalization=scattering.describe(features))
    if num_classes == len(data.CLASS_NAMES):
        props["classes"] = json.dumps(list(data.CLASS_NAMES))
    return props
