"""Data-parallel training on `torch.distributed`, launched by `torchrun`.

    group = distributed.init()                       # reads torchrun's RANK, WORLD_SIZE, ...
    train_step = make_train_step(model, tx, reduce_grads=group.all_reduce_mean)
    train_data = distributed.ShardedBatches(data.EpochBatches(split, 128, seed=0), group)
    fit(state, train_step, train_data, ..., group=group, run_dir=out if group.is_main else None)

The global batch is what every rank draws from (seed, epoch); rank r trains on its
contiguous slice `[r * B / N, (r + 1) * B / N)`. The gradient stage averages the ranks'
gradients (each already a mean over B / N examples), so a step sees the mean over the whole
global batch, as one process would. `gloo` on CPU, `nccl` on CUDA (device cuda:LOCAL_RANK).

Process-wide state lives in `torch.distributed` only; a `Group` is a plain handle on it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fashion_func import env

__all__ = ["Group", "ShardedBatches", "WorldError", "init", "launched"]

# How long a collective waits for a peer before the process group gives up. A killed
# peer's closed sockets fail a gloo collective at once; this bounds a peer that hangs
# or a machine that vanished from the network (and the first step's compile skew).
DEFAULT_TIMEOUT_S = 300
# The ranks agree on a stop (SIGINT/SIGTERM on any of them) every this many steps: one
# all-reduce of one integer, and on CUDA one host sync, per check.
STOP_CHECK_EVERY = 8
MAX_WORLD_SIZE = 1 << 20  # more processes than any job runs: a larger WORLD_SIZE is a typo
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class WorldError(ValueError):
    """The torchrun environment or the job's shape is unusable (a usage error)."""


def launched() -> bool:
    """True when this process was started by `torchrun` (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; WorldError if malformed."""
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise WorldError(f"torchrun environment incomplete: {', '.join(missing)} not set")
    try:  # each value parsed and range-checked like a flag (fashion_func.env)
        size = env.integer("WORLD_SIZE", lo=1, hi=MAX_WORLD_SIZE)
        r = env.integer("RANK", lo=0, hi=max(0, (size or 1) - 1))
        local = env.integer("LOCAL_RANK", lo=0, hi=max(0, (size or 1) - 1))
        env.text("MASTER_ADDR")
        env.integer("MASTER_PORT", lo=1, hi=65535)
    except ValueError as exc:
        raise WorldError(f"bad torchrun environment: {exc}") from None
    if size is None or r is None or local is None:  # set but empty
        raise WorldError("torchrun environment incomplete: RANK, LOCAL_RANK and WORLD_SIZE must not be empty")
    return r, local, size


def check_divisible(batch_size: int, size: int, what: str = "batch_size") -> None:
    """The global batch splits into `size` equal slices, or WorldError (one line)."""
    if batch_size % size:
        raise WorldError(
            f"{what} {batch_size} (the global batch) must be divisible by the {size} processes; "
            f"use a multiple of {size}"
        )


def init(*, device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the process group torchrun describes: `nccl` for a CUDA `device` (which becomes
    `cuda:LOCAL_RANK`, one GPU per process: `group.device`), else `gloo`. One the caller already
    initialised is used as it is."""
    r, local, size = env_world()
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Group(rank=r, local_rank=local, size=size, device=dev, timeout_s=timeout_s)


@dataclass(frozen=True)
class Group:
    """A handle on the initialised default process group and what `fit` needs from it:
    `all_reduce_mean` is the train step's `reduce_grads` stage; `sum` / `max` / `min` are the
    once-per-epoch reductions and stop agreement `fit` runs on the host side."""

    rank: int
    local_rank: int
    size: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    stop_check_every: int = STOP_CHECK_EVERY

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def all_reduce_sum(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The sum of `grads` over all ranks: a pure `grads -> grads` stage (a per-example
        DP-SGD step's, whose ranks each give the sum of their clipped gradients): one functional
        all-reduce (`torch.distributed._functional_collectives`) of all gradients flattened into
        one buffer, so `torch.compile` traces it into the step; run eagerly it works the same
        way (an async tensor, waited for on first use)."""
        import torch.distributed._functional_collectives as funcol

        names = list(grads)
        if len({grads[k].dtype for k in names}) != 1:  # one buffer needs one dtype
            return {k: funcol.all_reduce(grads[k], "sum", dist.group.WORLD) for k in names}
        flat = funcol.all_reduce(torch.cat([grads[k].reshape(-1) for k in names]), "sum", dist.group.WORLD)
        parts = flat.split([grads[k].numel() for k in names])
        return {k: p.view(grads[k].shape) for k, p in zip(names, parts, strict=True)}

    def all_reduce_mean(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The mean of `grads` over all ranks (`all_reduce_sum` over the ranks): the ordinary
        step's `reduce_grads` stage."""
        return {k: v / self.size for k, v in self.all_reduce_sum(grads).items()}

    def _collective(self, values: Tensor, fn: Callable[[Tensor], Any]) -> Tensor:
        out = values.to(self.device).clone()  # never in place on the caller's tensor
        fn(out)
        return out.to(values.device)

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed elementwise over all ranks (the same result on every rank)."""
        return self._collective(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def max(self, values: Tensor) -> Tensor:
        """Elementwise maximum over all ranks."""
        return self._collective(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))

    def min(self, values: Tensor) -> Tensor:
        """Elementwise minimum over all ranks."""
        return self._collective(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN))

    def first_failed(self, ok: bool) -> int | None:
        """The lowest rank that reports `ok=False`, agreed by all ranks; None if all are ok. Every
        rank must call it at the same point (a collective): a setup that failed on one rank then
        stops all of them with a message instead of leaving them waiting."""
        mine = torch.tensor([self.size if ok else self.rank], dtype=torch.int64)
        first = int(self.min(mine))
        return None if first == self.size else first

    def broadcast_values(self, values: Tensor) -> Tensor:
        """Rank 0's `values` on every rank (a tensor of the same shape and dtype everywhere)."""
        return self._collective(values, lambda t: dist.broadcast(t, src=0))

    def close(self) -> None:
        """Leave the process group (at the end of the job)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def shard_range(n: int, r: int, size: int) -> tuple[int, int]:
    """Rank `r`'s contiguous part `[lo, hi)` of `n` items split into `size` near-equal parts."""
    return r * n // size, (r + 1) * n // size


def shard(batch: Iterable[Tensor], r: int, size: int) -> tuple[Tensor, ...]:
    """Rank `r`'s contiguous slice of every tensor of a global batch (leading axis)."""
    parts = tuple(batch)
    n = parts[0].shape[0]
    if n % size:
        raise WorldError(f"a batch of {n} examples does not split evenly over {size} processes")
    lo, hi = shard_range(n, r, size)
    return tuple(t[lo:hi] for t in parts)


@dataclass(frozen=True)
class ShardedBatches:
    """This rank's slices of a global batch source, for `fit`. `source` is called as `(epoch,
    start=0)` (e.g. `data.EpochBatches`): every rank draws the same global batches and keeps
    its slice of each, so the batch order, `len()` and `batching` (which a mid-epoch checkpoint
    records) are those of the global batches."""

    source: Callable[..., Iterable[Any]]
    group: Group

    def __call__(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.source(epoch, start=start):
            yield shard(batch, self.group.rank, self.group.size)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    @property
    def batching(self) -> Any:
        """The global batching (n, batch size, seed): the same on every rank and for any N."""
        return getattr(self.source, "batching", None)
