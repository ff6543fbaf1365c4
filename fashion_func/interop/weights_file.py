"""A weights file read for use elsewhere: validated weights, the model its metadata names, and
the input normalisation that model was trained with."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from fashion_func import checkpoint, data, models
from fashion_func.interop import torch_io, torch_modules
from fashion_func.models import Model, Params

__all__ = ["load_weights_file"]


def load_weights_file(
    path: str | os.PathLike[str], model_name: str | None = None, *, device: torch.device | str = "cpu"
) -> tuple[Model, Params, dict[str, Any]]:
    """(model, weights, metadata) of a weights file, validated against the model's weights. The model
    is `model_name` if given, else the file's `model` metadata (as `fit` writes it); the weights are
    its params, a stateful model's buffers too (one dict: `split_state` separates them), in the
    floating dtype stored (bf16, fp16; buffers may have their own). `checkpoint.CheckpointError`
    (one line) for a missing or bad file, a train-state file, an unknown model or another's weights."""
    info = checkpoint.inspect(path)  # validates the header; CheckpointError if missing or bad
    if info.format == checkpoint.STATE_FORMAT:
        raise checkpoint.CheckpointError(
            f"{path}: is a whole train state (last.safetensors), not a weights file; "
            "pass a weights file such as checkpoints/best.safetensors"
        )
    name = model_name or info.metadata.get("model")
    if not isinstance(name, str) or not name:
        raise checkpoint.CheckpointError(kind="no_model_name", path=path)
    try:
        model = models.get(name, **_file_hparams(info, name))
    except (ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{path}: {e}") from None
    state_keys = model.init_state(device="meta").keys()

    def stored_dtype(buffers: bool) -> torch.dtype:
        # Only floating tensors say what the weights were saved in: num_batches_tracked is int64
        # whatever the precision. A file of mixed float dtypes is checked against float32 and
        # refused with a message naming the first mismatch.
        found = {
            dt for k, (dt, _) in info.tensors.items() if dt.is_floating_point and (k in state_keys) == buffers
        }
        return found.pop() if len(found) == 1 else torch.float32

    template = torch_io.template(model.name, model.hparams, stored_dtype(False), stored_dtype(True))
    params, metadata = checkpoint.load_weights(path, template=template, device=device)
    return model, params, metadata


def _file_hparams(info: checkpoint.CheckpointInfo, name: str) -> dict[str, int]:
    """The model's constructor arguments: the `model_hparams` a file of this model records
    (checked by `models.check_hparams`), else what its tensor shapes imply (`models.get` checks those)."""
    recorded = info.metadata.get("model_hparams")
    if info.metadata.get("model") == name and recorded is not None:
        if not isinstance(recorded, dict):
            raise ValueError(f"model_hparams must be a mapping, got {type(recorded).__name__}")
        try:
            models.check_hparams(name, recorded)
        except (ValueError, TypeError) as e:
            raise ValueError(f"model_hparams: {e}") from None
        return {str(k): v for k, v in recorded.items()}
    shapes = {k: torch.empty(shape, device="meta") for k, (_, shape) in info.tensors.items()}
    return torch_modules.hparams_from_params(name, shapes)


def finite_number(v: Any) -> bool:
    """Whether `v` is a finite int or float (not a bool), as metadata numbers must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def known_normalization(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    """(mean, std) a weights file's decoded metadata says its model was trained with: the numbers
    `normalize_mean` / `normalize_std` where recorded, else the run config's `normalize`
    ("tutorial": `data.TUTORIAL_MEAN/STD`, else `data.MEAN/STD`); None without numbers or config."""
    mean, std = metadata.get("normalize_mean"), metadata.get("normalize_std")
    if finite_number(mean) and finite_number(std) and std > 0:
        return float(mean), float(std)
    config = metadata.get("config")
    if isinstance(config, Mapping):
        if config.get("normalize") == "tutorial":
            return data.TUTORIAL_MEAN, data.TUTORIAL_STD
        return data.MEAN, data.STD  # "dataset", the config's default
    return None


def normalization(metadata: Mapping[str, Any]) -> tuple[float, float]:
    """(mean, std) to normalise inputs with for a weights file: `known_normalization`, else the dataset's."""
    return known_normalization(metadata) or (data.MEAN, data.STD)
