"""What `fit` returns: the final state, the history and why the run ended, as typed values."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashion_func.state import TrainState

__all__ = ["FitResult", "StopReason"]


class StopReason(enum.Enum):
    """Why `fit` ended; `FitResult.stop_reason` words it (with the step, epoch or metric)."""

    COMPLETED = "completed"  # every epoch ran
    MAX_STEPS = "max_steps"  # the state reached `max_steps` (saved; a resume continues it)
    CALLBACK = "callback"  # a callback's `Stop` (early stopping, TerminateOnNaN, ...)
    NON_FINITE = "non_finite"  # a non-finite loss or non-finite parameters
    MEMBERS_DIVERGED = "members_diverged"  # every member of a stack diverged
    PRIVACY_BUDGET = "privacy_budget"  # the next epoch would pass the target epsilon


@dataclass(frozen=True)
class FitResult:
    """What a finished run leaves: the final state, its history and why it ended.

    stop: why it ended; stop_reason: the same in words. best: the best weights' record
    (epoch, monitor, value, path) of a single model; member_best: each member's of a stack.
    diverged: stopped by a non-finite loss or parameters (every member's, for a stack);
    diverged_members: a stack's diverged members, member -> {member, epoch, step}.
    """

    state: TrainState
    history: list[dict[str, Any]]
    epochs_run: int
    stop_reason: str
    out_dir: Path | None
    best: dict[str, Any] | None = None
    stop: StopReason = StopReason.COMPLETED
    diverged: bool = False
    member_best: dict[int, dict[str, Any]] = field(default_factory=dict)
    diverged_members: dict[int, dict[str, int]] = field(default_factory=dict)
