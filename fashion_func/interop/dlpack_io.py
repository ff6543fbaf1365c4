"""Tensors between torch and JAX through DLPack: zero-copy where both sides allow, else a host copy.

jax is an optional extra (`pip install fashion_func[jax]`), imported only when called.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fashion_func.interop.numpy_io import numpy_to_tensor

__all__ = ["from_jax", "to_jax"]


def to_jax(tensor: Tensor) -> Any:
    """A JAX array of `tensor`'s values, sharing its memory through DLPack where both sides allow.

    Sharing needs the tensor's device to be one JAX runs on (CPU, or a GPU that jax was built
    for); otherwise, and for dtypes DLPack cannot carry, the values are copied through the host.
    A tensor that requires grad is detached first (DLPack carries no autograd). Do not write to
    the tensor while the array is in use: JAX assumes its arrays never change.
    """
    import jax.numpy as jnp

    t = tensor.detach()
    try:
        return jnp.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError, ValueError):
        # e.g. a CUDA tensor with a CPU-only jax: go through host memory
        if t.dtype == torch.bfloat16:
            import jax

            bits = jnp.asarray(t.cpu().view(torch.int16).numpy().view(np.uint16))
            return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
        return jnp.asarray(t.cpu().numpy())


def from_jax(array: Any) -> Tensor:
    """A torch tensor of a JAX array's values, sharing its memory through DLPack where possible.

    JAX arrays are immutable: writing to the returned tensor in place is undefined behaviour
    (clone it first if you must).
    """
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return numpy_to_tensor(np.asarray(array))
