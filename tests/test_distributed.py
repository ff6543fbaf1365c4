"""Data parallel under torchrun, on this CPU: gloo processes training one model.

Every run is `scripts/train.py` as real processes: an mlp, Adam, global batch 128, 2048
training and 512 validation images, compile off, one thread per process. Runs either go
through `torchrun` or are started directly with the environment torchrun would give them
(RANK, WORLD_SIZE, ...), which lets a test stop one rank at an exact step (SIGSTOP, as
tests/test_reliability.py does) before signalling or killing it.

Why an mlp: with SimpleNet and Adam, 2 processes end an epoch up to 9.5e-4 away from one
process in 493 of 1.2M parameters, exactly as far as one process that averages the
gradients of the two half batches itself; float rounding of the half-batch sums, which
Adam's division by sqrt(v) amplifies where gradients are near zero, not the all-reduce.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_reliability import WRAPPER, is_stopped, poll  # tests/ is on sys.path under pytest

from fashion_func import checkpoint, data
from fashion_func.cli.train import main_train

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals"),
]
try:
    data.locate(download=False)
except data.DataError:
    pytestmark.append(pytest.mark.skip(reason="Fashion-MNIST is not installed"))

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
EPOCHS = 3  # 16 steps each
ARGS = [
    "--model", "mlp", "--batch-size", "128", "--lr", "1e-3", "--limit-train", "2048",
    "--limit-val", "512", "--seed", "0", "--device", "cpu", "--no-compile", "--no-tensorboard",
    "--no-progress", "--save-best-only", "false",
]  # fmt: skip
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launcher: list[str], argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(TRAIN), *argv]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)  # a hang guard, not a timing assertion
    return proc.returncode, out, err


def rank_processes(
    argv: list[str], cwd: Path, size: int = 2, stop_at: dict[int, int] | None = None, **env: str
) -> list[subprocess.Popen[str]]:
    """`size` ranks started as torchrun would; rank r stops itself after step stop_at[r]."""
    wrapper = cwd / "wrapper.py"
    wrapper.write_text(WRAPPER)
    port = str(free_port())
    procs = []
    for r in range(size):
        rank_env = {**ENV, **env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(size),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        if stop_at and r in stop_at:
            rank_env["FF_TEST_STOP_AT_STEP"] = str(stop_at[r])
        cmd = [sys.executable, str(wrapper), str(TRAIN), *argv]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    return procs


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def params(out: Path) -> dict[str, torch.Tensor]:
    """The parameters of a run's last.safetensors."""
    state = weights(out / "checkpoints" / "last.safetensors")
    return {k: v for k, v in state.items() if k.startswith("params/")}


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An uninterrupted 2-process run of EPOCHS epochs through torchrun, in a fresh cwd."""
    cwd = tmp_path_factory.mktemp("two_ranks")
    proc = torchrun(["--nproc-per-node", "2", "--master-port", str(free_port())],
                    [*ARGS, "--epochs", str(EPOCHS), "--out", "run"], cwd)  # fmt: skip
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    yield cwd / "run"


def test_two_processes_train_like_one(two_ranks, tmp_path, capsys):
    one = tmp_path / "one"
    assert main_train([*ARGS, "--epochs", "1", "--out", str(one)]) == 0
    a = weights(one / "checkpoints" / "epoch-001.safetensors")
    b = weights(two_ranks / "checkpoints" / "epoch-001.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-4, worst
    # the epoch's metrics, summed over both ranks once, describe the same epoch
    h1, h2 = history(one)[0], history(two_ranks)[0]
    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5"):
        assert h2[k] == pytest.approx(h1[k], abs=1e-4), k


def test_only_rank_0_writes(two_ranks):
    cwd = two_ranks.parent
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # rank 1 made nothing beside it
    log = (two_ranks / "train.log").read_text()
    assert log.count("training epochs 1..") == 1  # one writer of the log
    assert len(history(two_ranks)) == EPOCHS


def test_two_launchers_with_nnodes_2_train_as_one_job(two_ranks, tmp_path):
    port = free_port()
    launchers = [
        torchrun(
            [
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "ff",
            ],
            [*ARGS, "--epochs", "1", "--out", "run"],
            tmp_path,
        )
        for node in (0, 1)
    ]
    for proc in launchers:
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
    a = weights(tmp_path / "run" / "checkpoints" / "epoch-001.safetensors")
    b = weights(two_ranks / "checkpoints" / "epoch-001.safetensors")
    for k in a:  # the same arithmetic as one launcher with two processes: bitwise
        assert torch.equal(a[k], b[k]), k


def test_sigterm_on_one_rank_stops_both_and_the_resume_is_exact(two_ranks, tmp_path):
    # rank 1 stops itself after its 21st step (epoch 2), is sent SIGTERM and continued; the
    # ranks agree on the stop at the next check (step 24) and rank 0 saves mid-epoch
    procs = rank_processes([*ARGS, "--epochs", str(EPOCHS), "--out", "run"], tmp_path, stop_at={1: 21})
    poll(lambda: is_stopped(procs[1].pid), procs[1], "rank 1 to stop itself")
    os.kill(procs[1].pid, signal.SIGTERM)
    os.kill(procs[1].pid, signal.SIGCONT)
    (code0, _, err0), (code1, _, err1) = finish(procs[0]), finish(procs[1])
    assert (code0, code1) == (143, 143), err0[-2000:] + err1[-2000:]
    assert "rank 1 stopped with the job (SIGTERM on some rank)" in err1
    assert "interrupted by SIGTERM; state saved to" in err0
    saved = checkpoint.read_metadata(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert saved["in_epoch"]["epoch"] == 2 and saved["in_epoch"]["batch"] == 24 - 16
    assert len(saved["in_epoch"]["rank_sums"]) == 2

    resumed = rank_processes(["--resume", "auto", "--out", "run"], tmp_path)
    for proc in resumed:
        code, _, err = finish(proc)
        assert code == 0, err[-3000:]
    a, b = params(tmp_path / "run"), params(two_ranks)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [{k: r[k] for k in keys} for r in history(tmp_path / "run")] == [
        {k: r[k] for k in keys} for r in history(two_ranks)
    ]


def test_a_killed_rank_ends_the_others_with_a_message(tmp_path):
    procs = rank_processes([*ARGS, "--epochs", str(EPOCHS), "--out", "run"], tmp_path, stop_at={1: 5})
    poll(lambda: is_stopped(procs[1].pid), procs[1], "rank 1 to stop itself")
    procs[1].kill()
    procs[1].communicate()
    code, _, err = finish(procs[0])
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: rank 0 lost the other processes of the job"), last
    assert "Traceback" not in err


def test_a_hung_rank_ends_the_others_after_the_timeout(tmp_path):
    procs = rank_processes([*ARGS, "--epochs", str(EPOCHS), "--out", "run"], tmp_path, stop_at={1: 5},
                           FASHION_FUNC_DIST_TIMEOUT="3")  # fmt: skip
    try:
        poll(lambda: is_stopped(procs[1].pid), procs[1], "rank 1 to stop itself")
        code, _, err = finish(procs[0])  # rank 1 stays stopped: rank 0 waits 3 s, then gives up
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert code == 1, err[-3000:]
    assert "did not answer within 3 s" in err.strip().splitlines()[-1]


def test_a_global_batch_that_does_not_split_is_a_usage_error(tmp_path):
    procs = rank_processes([*ARGS, "--batch-size", "127", "--out", "run"], tmp_path)
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 2
        assert err.strip().splitlines() == [
            "train.py: error: --batch-size 127 (the global batch) must be divisible by the 2 "
            "processes; use a multiple of 2"
        ]
    assert not (tmp_path / "run").exists()


def test_a_run_directory_in_use_stops_every_rank(tmp_path):
    from fashion_func.loop import run_lock

    (tmp_path / "run").mkdir()
    with run_lock(tmp_path / "run"):
        procs = rank_processes([*ARGS, "--epochs", "1", "--out", "run"], tmp_path)
        results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [2, 2]
    assert "is in use by process" in results[0][2]
    assert results[1][2].strip().splitlines()[-1] == (
        "train.py: error: rank 0 could not open the run directory run; stopping all 2 processes"
    )


def test_sharded_batches_are_slices_of_the_global_batch():
    from fashion_func import distributed

    images = torch.arange(10 * 28 * 28, dtype=torch.int32).reshape(10, 28, 28).to(torch.uint8)
    split = data.Split(images, torch.arange(10), "test")
    source = data.EpochBatches(split, 4, seed=3, drop_last=True)
    groups = [distributed.Group(rank=r, local_rank=r, size=2, device=torch.device("cpu")) for r in (0, 1)]
    shards = [distributed.ShardedBatches(source, g) for g in groups]
    assert len(shards[0]) == len(source) == 2 and shards[1].batching == source.batching
    for whole, *parts in zip(source(2, start=1), *(s(2, start=1) for s in shards), strict=True):
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
        assert [len(p[1]) for p in parts] == [2, 2]
