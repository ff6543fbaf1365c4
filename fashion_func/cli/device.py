"""Device settings for a run: which device, how to compile, allocator and TF32 flags."""

from __future__ import annotations

import logging
import sys

import torch

from fashion_func.loop.rundir import RunError

__all__: list[str] = []


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; asking for CUDA without one is a RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def keep_freed_memory_in_heap(limit_bytes: int = 1 << 31) -> bool:
    """Ask glibc's malloc to keep freed blocks below `limit_bytes` in the heap (CPU runs); False
    where the C library is not glibc (nothing is changed there).

    By default glibc hands large freed blocks back to the kernel (mmap, heap trimming), so every
    step page-faults freshly zeroed pages for its activations: about a quarter of a bf16 step on
    the 2-core CPU this was measured on. Process-wide and harmless: the heap then holds at most
    the step's peak, which the process needed anyway.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, limit_bytes // 4) and mallopt(m_trim_threshold, limit_bytes))


def resolve_compile(setting: str, device: torch.device) -> bool | str:
    """The config's compile setting (auto|on|off|update) as every step maker takes it (True /
    "update" / False): `auto` compiles all of the step on CUDA, only the optimizer update on CPU.

    On CPU a fully compiled step measured several times slower than eager (inductor's CPU
    convolution backward), while compiling just the update fuses its elementwise passes (about
    6x faster than eager) and takes a few seconds to build.
    """
    if setting == "auto":
        return True if device.type == "cuda" else "update"
    return "update" if setting == "update" else setting == "on"


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX).

    Without it PyTorch sends them to its slow reference kernels (`_slow_conv2d_forward`/`_backward`
    in a profile on an AVX2-only EPYC): a bf16 step several times slower than fp32's there.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_warning(device: torch.device, precision: str) -> str | None:
    """A one-line warning when `precision` will run slower than fp32 on `device`, else None."""
    if device.type == "cpu" and precision == "bf16" and not cpu_bf16_supported():
        return (
            "--precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so convolutions fall "
            "back to slow reference kernels; fp32 is faster here"
        )
    return None


def configure(device: torch.device, precision: str) -> None:
    """Process-wide settings for a run on `device` (the run owns the process)."""
    if device.type == "cpu":
        keep_freed_memory_in_heap()
        # inductor's CPU backend imports cpp_extension, which warns that a CPU-only machine has no
        # CUDA runtime: true, expected, and noise in every run's output
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if device.type == "cuda":
        # TF32 exactly when asked for: cuDNN allows it by default ("fp32" convolutions in TF32)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
