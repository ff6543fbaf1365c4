"""The impure driver: `fit` over the user's state, step, data and callbacks.

Split by what changes together: `fit` (event dispatch, action execution, epochs),
`rundir` (lock, temp cleanup, logger, files), `resume` (reading a resume point) and
`device` (device, compilation and process settings).
"""

from __future__ import annotations

from fashion_func.loop.device import configure, keep_freed_memory_in_heap, resolve_compile, resolve_device
from fashion_func.loop.fit import FitResult, Interrupted, epoch_batches, evaluate, fit
from fashion_func.loop.resume import ResumePoint, resume_path, saved_config
from fashion_func.loop.rundir import BEST, LAST, RUN_ARTIFACTS, RunDir, RunError, prepare_out_dir, run_lock

__all__ = [
    "BEST",
    "LAST",
    "RUN_ARTIFACTS",
    "FitResult",
    "Interrupted",
    "ResumePoint",
    "RunDir",
    "RunError",
    "configure",
    "epoch_batches",
    "evaluate",
    "fit",
    "keep_freed_memory_in_heap",
    "prepare_out_dir",
    "resolve_compile",
    "resolve_device",
    "resume_path",
    "run_lock",
    "saved_config",
]
