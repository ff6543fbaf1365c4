"""The command line's data-parallel glue: the process group, the run directory per rank.

Under `torchrun` every rank runs `app.train`; rank 0 alone opens (locks, prepares, writes)
the run directory, the others wait until it has, then only read it (the resume checkpoint)
and log warnings to stderr. A failure while setting up on any rank stops every rank with a
one-line message instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fashion_func import distributed, env
from fashion_func.cli import device as device_lib
from fashion_func.cli import words
from fashion_func.loop import RunDir, RunError

__all__: list[str] = []

TIMEOUT_ENV = "FASHION_FUNC_DIST_TIMEOUT"
# below a second gloo's own timeout fires inside its C++ code (a frame dump, not our message);
# a week is longer than any collective should wait, and datetime.timedelta takes it
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 7 * 24 * 3600.0


def _timeout_s() -> float:
    try:
        value = env.number(TIMEOUT_ENV, lo=MIN_TIMEOUT_S, hi=MAX_TIMEOUT_S)
    except ValueError as exc:
        raise RunError(f"{exc} (seconds)") from None
    return distributed.DEFAULT_TIMEOUT_S if value is None else value


@contextlib.contextmanager
def process_group(batch_size: int, device_name: str) -> Iterator[distributed.Group | None]:
    """The job's process group when launched by torchrun (None otherwise), left at the end. The
    global batch must split evenly over the processes (checked before any rendezvous, so every
    rank fails the same way at once)."""
    if not distributed.launched():
        yield None
        return
    distributed.check_divisible(batch_size, distributed.env_world()[2], what="--batch-size")
    device = device_lib.resolve_device(device_name)
    try:
        group = distributed.init(device=device, timeout_s=_timeout_s())
    except (RuntimeError, ValueError) as exc:  # rendezvous failures: DistNetworkError, DistStoreError
        raise RunError(f"cannot join the torchrun job: {str(exc).splitlines()[0]}") from None
    try:
        yield group
    finally:
        group.close()


def _follower_log(rank: int) -> logging.Logger:
    """Ranks other than 0 print only warnings and errors, prefixed with their rank."""
    log = logging.getLogger(f"fashion_func.rank{rank}")
    log.setLevel(logging.WARNING)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log


@dataclass
class RankRun:
    """The run directory as one rank sees it: `run_dir` (rank 0, or the only process) writes,
    the others read from `path` and write nothing."""

    path: Path
    log: logging.Logger
    run_dir: RunDir | None
    group: distributed.Group | None = None
    agreed: bool = False  # every rank reached `ready` (from then on no failure is announced)

    @property
    def checkpoints(self) -> Path:
        """`<run>/checkpoints`."""
        return self.path / "checkpoints"

    def write_json(self, name: str, obj: Any) -> None:
        """`<run>/<name>` as JSON, on the writing rank only."""
        if self.run_dir is not None:
            self.run_dir.write_json(name, obj)

    def write_bytes(self, name: str, data: bytes) -> None:
        """`<run>/<name>`, on the writing rank only."""
        if self.run_dir is not None:
            self.run_dir.write_bytes(name, data)

    def ready(self, step: int, config: Mapping[str, Any]) -> None:
        """Every rank set up: all start from rank 0's step with rank 0's settings, or all stop. A
        collective: the ranks here wait for the others; one that failed before told them (`open_run`).
        """
        g = self.group
        if g is None:
            return
        self.agreed = True  # set before the collective: a failure inside it is no longer "setup"
        _agree(g, True, "failed to set up")
        crc = zlib.crc32(json.dumps(dict(config), sort_keys=True).encode())
        mine = torch.tensor([step, crc], dtype=torch.int64)
        same = bool(torch.equal(g.broadcast_values(mine), mine))
        _agree(g, same, "starts from another step or with other settings than rank 0 (is the run "
                        "directory on a filesystem every node sees, at the same path?)")  # fmt: skip


def _agree(group: distributed.Group, ok: bool, what: str) -> None:
    failed = group.first_failed(ok)
    if failed is not None:
        raise RunError(f"rank {failed} {what}; stopping all {group.size} processes")


@contextlib.contextmanager
def open_run(
    path: Path, *, resume: Any, overwrite: bool, group: distributed.Group | None
) -> Iterator[RankRun]:
    """Open the run directory on rank 0 (all of `RunDir.open`'s checks), then release the rest.
    Until `RankRun.ready`, an error on one rank is announced to the others (they stop with a
    message naming it) before it propagates."""
    if group is None:
        with RunDir.open(path, resume=resume, overwrite=overwrite) as run:
            yield RankRun(run.path, words.reword_log(run.log), run)
        return
    with contextlib.ExitStack() as stack:
        run_dir = None
        if group.is_main:
            try:
                run_dir = stack.enter_context(RunDir.open(path, resume=resume, overwrite=overwrite))
            except RunError:
                group.first_failed(False)  # the others wait to hear that rank 0 opened it
                raise
        _agree(group, True, f"could not open the run directory {path}")
        log = words.reword_log(run_dir.log if run_dir is not None else _follower_log(group.rank))
        rank_run = RankRun(Path(path), log, run_dir, group)
        try:
            yield rank_run
        except (Exception, KeyboardInterrupt):
            if not rank_run.agreed:  # the others wait in `ready`: tell them this rank failed
                group.first_failed(False)
            raise
