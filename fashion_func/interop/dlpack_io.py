"""Tensors between torch and JAX through DLPack: zero-copy where both sides allow, else a host
copy. jax is an optional extra (`pip install fashion_func[jax]`), imported only when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fashion_func.interop.numpy_io import numpy_to_tensor, tensor_to_numpy

__all__ = ["from_jax", "to_jax"]


def to_jax(tensor: Tensor) -> Any:
    """A JAX array of `tensor`'s (detached) values, sharing its memory through DLPack where the
    device is one JAX runs on and DLPack carries the dtype, else copied through the host. Do not
    write to the tensor while the array is in use: JAX assumes its arrays never change."""
    import jax.numpy as jnp

    t = tensor.detach()
    try:
        return jnp.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError, ValueError):
        # e.g. a CUDA tensor with a CPU-only jax: through host memory (bf16 as ml_dtypes' bfloat16,
        # which is jax's own)
        return jnp.asarray(tensor_to_numpy(t, "bfloat16"))


def from_jax(array: Any) -> Tensor:
    """A torch tensor of a JAX array's values, sharing its memory through DLPack where possible
    (JAX arrays are immutable: clone it before writing to it in place)."""
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return numpy_to_tensor(np.asarray(array))
