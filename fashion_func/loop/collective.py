"""What `fit` needs from a data-parallel process group, and the host-side reductions it runs.

`fit(..., group=...)` takes any object with this shape (`fashion_func.distributed.Group` is
one); the loop never imports torch.distributed itself. Every function here is a collective:
all ranks call it at the same point of the run, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

__all__: list[str] = []


class Collective(Protocol):
    """A group of ranks training one model: rank 0 (`is_main`) writes, all reduce."""

    rank: int
    size: int
    stop_check_every: int

    @property
    def is_main(self) -> bool: ...

    def sum(self, values: Tensor) -> Tensor: ...

    def max(self, values: Tensor) -> Tensor: ...

    def min(self, values: Tensor) -> Tensor: ...


def first_bad(group: Collective | None, first_bad: Tensor) -> Tensor:
    """The earliest non-finite step any rank saw (-1: none), float64 `[1]`, the same on all ranks;
    without a group this process's (`[K]` for a stack)."""
    if group is None:
        return first_bad.double().reshape(-1)
    # -1 means "none": lift it above any step so the minimum picks a real one
    mine = first_bad.double().reshape(1)
    never = torch.full_like(mine, float(2**62))
    low = group.min(torch.where(mine < 0, never, mine))
    return torch.where(low >= 2**62, torch.full_like(low, -1.0), low)


def partial_sums(group: Collective | None, sums: Mapping[str, Tensor]) -> dict[str, Any]:
    """A cut epoch's sums for the checkpoint, as JSON values: global, and with a group every
    rank's own, in rank order, on every rank (exact: float64 rows)."""
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in sums.items()}
    if group is None:
        return {"sums": {k: v.tolist() for k, v in sums.items()}, "dtypes": dtypes}
    keys = list(sums)
    rows = torch.zeros(group.size, len(keys), dtype=torch.float64)
    rows[group.rank] = torch.stack([sums[k].double().cpu() for k in keys])
    table = group.sum(rows).tolist()  # each row holds one rank's values plus zeros
    per_rank = [
        {k: int(v) if not sums[k].is_floating_point() else v for k, v in zip(keys, row, strict=True)}
        for row in table
    ]
    total = {k: sum(r[k] for r in per_rank) for k in keys}
    return {"sums": total, "rank_sums": per_rank, "dtypes": dtypes}


def sums_for_rank(group: Collective | None, saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """The partial sums of a mid-epoch checkpoint that this rank carries on with.

    A checkpoint written by N ranks keeps each rank's own sums (`partial_sums`), so a resume
    on N ranks continues each exactly; on another number of ranks rank 0 takes the global
    sums and the others start from zero (the epoch's totals are the same either way).
    """
    if group is None:
        return saved
    per_rank = saved.get("rank_sums")
    if isinstance(per_rank, list) and len(per_rank) == group.size:
        return {**saved, "sums": per_rank[group.rank]}
    if group.is_main:
        return saved
    return {**saved, "sums": {k: 0 for k in saved["sums"]}}


def agreed_signal(group: Collective, local: int | None, host_step: int) -> int | None:
    """The signal any rank received, agreed at steps divisible by `group.stop_check_every`.

    Between checks it answers None: every rank must stop after the same step, or the ones
    still training would wait for the stopped ones in the next gradient all-reduce.
    """
    if host_step % group.stop_check_every:
        return None
    agreed = int(group.max(torch.tensor([local or 0], dtype=torch.int64)))
    return agreed or None
