"""The impure driver: `fit` over the user's state, step, data and callbacks.

One job per module: `fit` (the epoch driver), `result` (what it returns, why it stopped),
`actions` (the callbacks' actions carried out), `members` (one model or a stack, and its
diverged members), `reduce` (metric sums -> epoch means over members and ranks), `batches` (an
epoch's batches from the user's data), `signals`, `resume` (the run record a checkpoint holds,
`compatible`, the resume point), `rundir` (the run directory and its overwrite policy),
`artifacts` (the files a run writes), `lock`, `logger`, `plots`, `errors` and `collective`.
Device and process settings belong to the command line (`fashion_func.cli.device`).
"""

from __future__ import annotations

from fashion_func.loop.artifacts import BEST, LAST, RUN_ARTIFACTS  # noqa: F401
from fashion_func.loop.fit import FitResult, Interrupted, StopReason, evaluate, fit
from fashion_func.loop.lock import run_lock  # noqa: F401

# importable here by module path for the app and the tests; not in __all__
from fashion_func.loop.resume import ResumePoint, resume_path  # noqa: F401
from fashion_func.loop.rundir import (
    RunDir,  # noqa: F401
    RunError,
)

__all__ = ["FitResult", "Interrupted", "RunError", "StopReason", "evaluate", "fit"]
