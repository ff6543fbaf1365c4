"""Weights as numpy arrays (torch names and layout), and numpy-readable files of them; numpy has
no bfloat16, so bf16 tensors become float32 (exact), their uint16 bits or ml_dtypes' bfloat16.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fashion_func import atomic, checkpoint

__all__ = ["save_numpy", "to_numpy"]

Bf16As = Literal["float32", "uint16", "bfloat16"]
BF16_AS: tuple[str, ...] = ("float32", "uint16", "bfloat16")
NPZ_METADATA = "__metadata__"  # a .npz file's metadata entry: the safetensors header's strings, as JSON


def check_bf16_as(bf16_as: str) -> None:
    """ValueError unless `bf16_as` is one of `BF16_AS`."""
    if bf16_as not in BF16_AS:
        raise ValueError(f"bf16_as must be one of {', '.join(BF16_AS)}, not {bf16_as!r}")


def tensor_to_numpy(t: Tensor, bf16_as: str) -> np.ndarray:
    """A C-contiguous host copy; bfloat16 becomes float32 (exact), its uint16 bits, or ml_dtypes bf16."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype != torch.bfloat16:
        return t.numpy().copy()
    if bf16_as == "float32":
        return t.float().numpy()
    bits = t.view(torch.int16).numpy().view(np.uint16).copy()  # the raw bf16 bit patterns
    if bf16_as == "uint16":
        return bits
    try:
        import ml_dtypes  # comes with jax; numpy itself has no bfloat16
    except ImportError:
        raise ValueError("bf16_as='bfloat16' needs the ml_dtypes package (installed with jax)") from None
    return bits.view(ml_dtypes.bfloat16)


def numpy_to_tensor(a: Any, *, bf16_bits: bool = False) -> Tensor:
    """A torch copy of a numpy/JAX array; uint16 bit patterns back to bfloat16 when `bf16_bits`."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes: torch.from_numpy does not know it
        a, bf16_bits = a.view(np.uint16), True
    if bf16_bits:
        if a.dtype != np.uint16:
            raise ValueError(f"bf16 bit patterns must be uint16, got {a.dtype}")
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def to_numpy(params: Mapping[str, Tensor], *, bf16_as: Bf16As = "float32") -> dict[str, np.ndarray]:
    """Params as numpy arrays, same names and (torch) layout; see `to_flax` for `bf16_as`."""
    check_bf16_as(bf16_as)
    return {k: tensor_to_numpy(v, bf16_as) for k, v in params.items()}


def bf16_keys(arrays: Mapping[str, Tensor], rename: Callable[[str, Tensor], str | None]) -> list[str]:
    """The names (`rename`d; None drops one) of the bfloat16 tensors in `arrays`, for a file's metadata."""
    names = (rename(k, t) for k, t in arrays.items() if t.dtype == torch.bfloat16)
    return [n for n in names if n is not None]


def save_arrays(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    """Arrays as safetensors, atomically; metadata in `checkpoint`'s convention (strings plain)."""
    from safetensors.numpy import save as st_save

    atomic.write_bytes(
        path, st_save(dict(arrays), metadata=checkpoint.encode_metadata(meta)), what="weights file"
    )


def save_numpy(
    path: str | os.PathLike[str],
    params: Mapping[str, Tensor],
    *,
    bf16_as: Literal["float32", "uint16"] = "float32",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write weights with torch names and layout in dtypes plain numpy reads, atomically: a `.npz`
    path gives `numpy.savez` output (`numpy.load(p)`, no pickle needed), anything else a safetensors
    file for `safetensors.numpy.load_file(p)`. bf16 tensors become float32 or their uint16 bit
    patterns (`bf16_as`); buffers keep their dtype (`bn1.num_batches_tracked` stays int64). The
    metadata (`layout` "torch", `bf16_as`, `bf16_keys` and `metadata`'s entries, encoded as
    `checkpoint.encode_metadata` does) is the safetensors header's, or in a `.npz` file the JSON of
    those strings in its `__metadata__` entry (`checkpoint.decode_metadata` gives the values back).
    A failed write is `atomic.WriteError`."""
    if bf16_as not in ("float32", "uint16"):
        raise ValueError(f"numpy has no bfloat16: bf16_as must be float32 or uint16, not {bf16_as!r}")
    arrays = to_numpy(params, bf16_as=bf16_as)
    meta: dict[str, Any] = dict(metadata or {})
    meta.update(layout="torch", bf16_as=bf16_as, bf16_keys=bf16_keys(params, lambda k, t: k))
    if str(path).endswith(".npz"):
        if NPZ_METADATA in arrays:
            raise ValueError(f"a weight named {NPZ_METADATA} would hide the .npz file's metadata")
        # the metadata (the privacy record, the normalisation) travels as in the other formats: a
        # 0-d unicode array of its JSON, which np.load reads without pickle
        text = json.dumps(checkpoint.encode_metadata(meta), sort_keys=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays, **{NPZ_METADATA: np.array(text)})
        atomic.write_bytes(path, buf.getvalue(), what="weights file")
        return
    save_arrays(path, arrays, meta)
