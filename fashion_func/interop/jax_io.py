"""A pure-JAX SimpleNet forward on Flax-layout weights (`flax_io.to_flax`); jax is an optional
extra (`pip install fashion_func[jax]`), imported only when called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["simplenet_jax"]


def _simplenet_forward(params: Mapping[str, Any], x: Any) -> Any:
    """SimpleNet logits from Flax-layout params, NHWC input (traced by `jax.jit`)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    hi = lax.Precision.HIGHEST  # full fp32 on accelerators (no TF32/bf16 passes)

    def conv(x: Any, p: Mapping[str, Any]) -> Any:
        y = lax.conv_general_dilated(
            x, p["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi
        )
        return y + p["bias"]

    def dense(x: Any, p: Mapping[str, Any]) -> Any:
        return jnp.dot(x, p["kernel"], precision=hi) + p["bias"]

    x = jax.nn.relu(conv(x, params["conv1"]))  # [B, 26, 26, 32]
    x = jax.nn.relu(conv(x, params["conv2"]))  # [B, 24, 24, 64]
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # [B, 12, 12, 64]
    # the features flattened as they lie, (h w c): fc1's kernel rows are in that order (to_flax)
    x = x.reshape((x.shape[0], -1))  # [B, 9216]
    x = jax.nn.relu(dense(x, params["fc1"]))  # [B, 128]
    return dense(x, params["fc2"])  # [B, classes]


def simplenet_jax(params: Mapping[str, Any], x: Any) -> Any:
    """SimpleNet logits [B, classes] in pure JAX (jitted) from Flax-layout params whose fc1 rows are in
    (h w c) order (`to_flax`'s default; a file of (c h w) rows converts with `to_flax(load_flax(p))`),
    for float32 NHWC `x` `[B, 28, 28, 1]` normalised as for `Model.apply` (from our NCHW:
    `rearrange(x, "b c h w -> b h w c")`). Needs the optional `jax` extra."""
    return _simplenet_jit()(params, x)


@functools.cache
def _simplenet_jit() -> Callable[..., Any]:
    """`_simplenet_forward` jitted, built once: jax traces and compiles per input shape inside it."""
    import jax

    return jax.jit(_simplenet_forward)
