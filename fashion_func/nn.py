"""Pure layers: functions of (inputs, parameters[, key]) with no hidden state.

Initialisers take an explicit `torch.Generator` and reproduce `torch.nn`'s default
initialisation (same distributions, same draw order), so a model initialised here
with `Generator().manual_seed(s)` equals the `nn.Module` built after `torch.manual_seed(s)`.

Randomness (dropout) is counter-based: a mask is a pure function of an integer key
tensor, so a compiled step is deterministic given (seed, step), on any device, and
the global RNG is never touched.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BatchNormState",
    "batch_norm",
    "conv2d",
    "dropout",
    "fold_in",
    "group_norm",
    "init_batch_norm",
    "init_conv2d",
    "init_linear",
    "linear",
    "max_pool",
    "normal",
    "relu",
    "tanh",
    "uniform",
]

_M32 = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2**32). int64 products may
    wrap past 2**63; masking keeps the exact low 32 bits, which is all the finaliser needs, on CPU
    and CUDA alike."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def fold_in(key: Tensor | int, data: Tensor | int) -> Tensor:
    """A new key derived from `key` and an integer `data` (a step, a layer index)."""
    key = torch.as_tensor(key, dtype=torch.int64)
    data = torch.as_tensor(data, dtype=torch.int64, device=key.device)
    return _mix32((key & _M32) ^ _mix32((data * 0x9E3779B1 + 0x7F4A7C15) & _M32))


def uniform(
    key: Tensor, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniform [0, 1) draws, a pure function of `key` (0-d int64) and the element index."""
    n = math.prod(shape)
    # `+ (key & 0)`: an int64 tensor value, not a bare arange, which inductor would turn into
    # its int32 index variable on CUDA and then fail to multiply by a constant above 2**31
    idx = torch.arange(n, dtype=torch.int64, device=key.device) + (key & 0)
    h = _mix32(((idx * 0x9E3779B1) & _M32) ^ (key & _M32))
    h = _mix32(h ^ ((key >> 7) & _M32))
    # 24 random bits -> exactly representable in float32
    return ((h >> 8).to(dtype) * (1.0 / (1 << 24))).reshape(shape)


def normal(key: Tensor, shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws, a pure function of `key` (0-d int64) and the element index:
    Box-Muller over the two halves of one `uniform` stream of 2n 24-bit uniforms (computed in
    float64 for float64, else float32, then cast to `dtype`); the tails end near 5.8 sigma."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n = math.prod(shape)
    # one stream of 2n uniforms, split: two separate streams fused into one kernel made
    # inductor's C++ code generation take minutes
    u1, u2 = uniform(key, (2, n), dtype=work).unbind(0)
    radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # 1 - u1 is in (0, 1]: always finite
    return (radius * torch.cos((2 * math.pi) * u2)).to(dtype).reshape(shape)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias`; weight is [out, in] as in `nn.Linear`."""
    return F.linear(x, weight, bias)


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride: int = 1, padding: int = 0
) -> Tensor:
    """2-d convolution, weight OIHW as in `nn.Conv2d`; NHWC inputs give NHWC outputs."""
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    # A one-channel input is NCHW- and NHWC-contiguous at once and PyTorch then returns
    # NCHW, turning an NHWC network NCHW after its first layer (copies in every backward).
    # An input explicitly strided NHWC (stride 1 along C) asks for NHWC: keep it.
    if x.dim() == 4 and x.shape[1] == 1 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1:
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def max_pool(x: Tensor, kernel_size: int, stride: int | None = None) -> Tensor:
    """Max pooling over the last two axes; `stride` defaults to `kernel_size`."""
    stride = kernel_size if stride is None else stride
    # PyTorch's CPU kernel for overlapping windows on NCHW is 2-3x slower than on NHWC (dpcnn's
    # 2x2 stride-1 pools under the per-example vmap, which holds NCHW): pool a channels-last
    # copy there and return NCHW. Same maxima, same first-index choice on ties; the gradients
    # the same up to summation order (overlapping windows add theirs in the kernel's order).
    if (
        not torch.compiler.is_compiling()
        and stride < kernel_size
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[1] > 1
        and x.is_contiguous()
    ):
        nhwc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return F.max_pool2d(nhwc, kernel_size, stride).contiguous()
    return F.max_pool2d(x, kernel_size, stride)


def relu(x: Tensor) -> Tensor:
    """max(x, 0)."""
    return F.relu(x)


def tanh(x: Tensor) -> Tensor:
    """The hyperbolic tangent (the tempered sigmoid of differentially private CNNs)."""
    return torch.tanh(x)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Group normalisation of `[B, C, ...]` (`weight`, `bias`: `[C]`, or None for neither, as
    `nn.GroupNorm(affine=False)`), as `F.group_norm`: no batch statistics and no state, so an
    example's output does not depend on the rest of the batch (what per-example gradients need).
    NHWC inputs give NHWC outputs. Statistics are computed in at least float32 (bf16 under autocast)."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    w = None if weight is None else weight.to(xf.dtype)
    b = None if bias is None else bias.to(xf.dtype)
    y = F.group_norm(xf, num_groups, w, b, eps)
    return y.to(x.dtype)


class BatchNormState(NamedTuple):
    """A batch-norm layer's buffers, as `nn.BatchNorm2d` names them."""

    running_mean: Tensor  # [C]
    running_var: Tensor  # [C], unbiased
    num_batches_tracked: Tensor  # 0-d int64


def batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    state: BatchNormState,
    *,
    train: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, BatchNormState]:
    """Batch normalisation over all axes but the channel axis 1: `(y, new_state)`. Training:
    normalise with the batch's mean and biased variance, and return running statistics moved by
    `momentum` towards the batch's mean and *unbiased* variance, with `num_batches_tracked + 1` (as
    `nn.BatchNorm2d` does in place). Inference: normalise with the running statistics; the state
    comes back unchanged. Pure: nothing is written. Statistics are computed in at least float32
    (bf16 activations under autocast)."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    w, b = weight.to(xf.dtype), bias.to(xf.dtype)
    if not train:  # native: one fused pass over x; with training=False it writes nothing
        mean, var = state.running_mean.to(xf.dtype), state.running_var.to(xf.dtype)
        y = torch.native_batch_norm(xf, w, b, mean, var, False, momentum, eps)[0]
        return y.to(x.dtype), state
    # Native kernels (no running buffers given, so nothing is written) rather than mean/var
    # and broadcast arithmetic: about 20% of a ResNet's CPU step is batch norm, and the
    # fused forward/backward kernels halve it. They return the batch mean and 1/sqrt(var+eps).
    y, mean, invstd = torch.native_batch_norm(xf, w, b, None, None, True, momentum, eps)
    n = x.numel() // x.shape[1]
    # the running statistics are data, not part of the differentiated computation
    m, v = mean.detach(), (invstd.detach() ** -2 - eps) * (n / max(n - 1, 1))
    new_state = BatchNormState(
        ((1.0 - momentum) * state.running_mean + momentum * m).to(state.running_mean.dtype),
        ((1.0 - momentum) * state.running_var + momentum * v).to(state.running_var.dtype),
        state.num_batches_tracked + 1,
    )
    return y.to(x.dtype), new_state


def init_batch_norm(
    num_features: int, *, dtype=torch.float32, device=None
) -> tuple[Tensor, Tensor, BatchNormState]:
    """`nn.BatchNorm2d`'s initial (weight 1, bias 0, running mean 0, var 1, count 0); no draws."""
    ones = torch.ones(num_features, dtype=dtype, device=device)
    zeros = torch.zeros(num_features, dtype=dtype, device=device)
    state = BatchNormState(zeros.clone(), ones.clone(), torch.zeros((), dtype=torch.int64, device=device))
    return ones, zeros, state


def dropout(x: Tensor, rate: float, *, key: Tensor | None, train: bool) -> Tensor:
    """Inverted dropout: zero each element with probability `rate`, scale the rest. Identity
    when not training or `rate == 0`; training with `rate > 0` needs a key."""
    if not train or rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout in training mode needs a key")
    keep = uniform(key, x.shape) >= rate
    # the mask is drawn in logical (NCHW) order; laid out like x, the result keeps x's
    # memory layout (NHWC activations would otherwise turn NCHW here)
    keep = keep.contiguous(memory_format=_layout_of(x))
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


def _layout_of(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fan_in(generator: torch.Generator, shape: tuple[int, ...], dtype, device) -> tuple[Tensor, Tensor]:
    """(weight of `shape`, bias), drawn in that order from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on
    the generator's device (fan_in = prod(shape[1:])), then moved to `device`."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    w, b = (torch.empty(size, dtype=dtype, device=generator.device) for size in (shape, shape[:1]))
    w, b = w.uniform_(-bound, bound, generator=generator), b.uniform_(-bound, bound, generator=generator)
    return w.to(device or generator.device), b.to(device or generator.device)


def init_linear(
    generator: torch.Generator, in_features: int, out_features: int, *, dtype=torch.float32, device=None
) -> tuple[Tensor, Tensor]:
    """`nn.Linear`'s default init: kaiming_uniform(a=sqrt(5)) weight, i.e. U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), then the bias, drawn as `nn.Linear.reset_parameters` draws."""
    return _fan_in(generator, (out_features, in_features), dtype, device)


def init_conv2d(
    generator: torch.Generator,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    dtype=torch.float32,
    device=None,
) -> tuple[Tensor, Tensor]:
    """`nn.Conv2d`'s default init (same rule as Linear, fan_in = in_channels * k * k)."""
    return _fan_in(generator, (out_channels, in_channels, kernel_size, kernel_size), dtype, device)
