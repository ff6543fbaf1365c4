"""The impure driver: `fit` over the user's state, step, data and callbacks.

One job per module: `fit` (the epoch driver), `actions` (the callbacks' actions carried
out), `reduce` (metric sums -> epoch means over members and ranks), `batches` (an epoch's
batches from the user's data), `signals`, `resume` (reading a resume point), `rundir` (the run
directory and its overwrite policy), `artifacts` (the files a run writes), `lock`, `logger`,
`plots`, `errors` and `collective`. Device and process settings belong to the command line
(`fashion_func.cli.device`).
"""

from __future__ import annotations

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
    "epoch_batches",
    "evaluate",
    "fit",
    "prepare_out_dir",
    "resume_path",
    "run_lock",
    "saved_config",
]
