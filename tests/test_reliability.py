"""Reliability: crashes, signals, a busy run directory, bad checkpoints, bad data and
arguments, non-finite losses and failed writes lose nothing and end in one clear line.

README.md's "Guarantees" section maps each promise to the test here that checks it.
Checkpoint-file validation itself (header, format version, keys, shapes, dtypes,
finiteness, the 500-case fuzz test, no pickle/torch.load in the package) is tested in
tests/test_checkpoint.py; IDX parsing in tests/test_data.py. This file checks what the
training script and `fit` make of those failures.

The crash tests run `scripts/train.py` as a real process (an mlp on 512 examples, CPU,
fixed seed) and compare the parameters a crashed-and-resumed run ends with against an
uninterrupted run, bitwise.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from test_data import make_dataset, write_idx  # tests/ is on sys.path under pytest

from fashion_func import atomic, checkpoint, data, loop, models, optim
from fashion_func import callbacks as cbs
from fashion_func import state as state_lib
from fashion_func.cli import app
from fashion_func.cli.config import Config
from fashion_func.cli.train import main_train
from fashion_func.step import make_train_step

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
try:
    DATA_DIR: Path | None = data.locate(download=False)[0]
except data.DataError:
    DATA_DIR = None
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="Fashion-MNIST is not installed")

EPOCHS = 4
STEPS_PER_EPOCH = 8  # 512 examples / batch 64
RUN_ARGS = [
    "--model", "mlp", "--epochs", str(EPOCHS), "--batch-size", "64", "--lr", "1e-3",
    "--limit-train", "512", "--limit-val", "100", "--seed", "0", "--device", "cpu",
    "--no-compile", "--no-tensorboard", "--no-progress",
]  # fmt: skip
# One thread: the same arithmetic in every process (and less contention on a shared CPU).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Runs scripts/train.py in this process and can make it stop itself (SIGSTOP) at an exact
# point, where the test then kills or signals it: a fast machine cannot outrun the kill.
# FF_TEST_STOP_AT_SAVE=N: inside the N-th write of last.safetensors, the temp file complete
# and not yet renamed over the old one. FF_TEST_STOP_AT_STEP=K: right after the K-th
# training step of this process, before the loop sees its result. Nothing in the package
# knows about these hooks.
WRAPPER = """\
import os, runpy, signal, sys

train, *args = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(train))))
# SIGINT as in a process started from a terminal (Python's KeyboardInterrupt handler): a test
# runner started by a shell's `&` passes it on ignored, and train.py rightly keeps that
signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_here():
    os.kill(os.getpid(), signal.SIGSTOP)


stop_save = int(os.environ.get("FF_TEST_STOP_AT_SAVE", "0"))
if stop_save:
    real_fsync, saves = os.fsync, [0]

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".last.safetensors."):
            saves[0] += 1
            if saves[0] == stop_save:
                stop_here()
        return real_fsync(fd)

    os.fsync = fsync
stop_step = int(os.environ.get("FF_TEST_STOP_AT_STEP", "0"))
if stop_step:
    from fashion_func import step  # patched before fashion_func.loop imports the name

    real_make, steps = step.make_train_step, [0]

    def make_train_step(*a, **k):
        fn = real_make(*a, **k)

        def counted(*a, **k):
            out = fn(*a, **k)
            steps[0] += 1
            if steps[0] == stop_step:
                stop_here()
            return out

        return counted

    step.make_train_step = make_train_step
sys.argv = [train, *args]
runpy.run_path(train, run_name="__main__")
"""


# --------------------------------------------------------------------------- helpers


class Procs:
    """Launches train.py processes and kills any still running when the test ends."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: list[subprocess.Popen[bytes]] = []
        self.number: dict[int, int] = {}  # pid -> launch number, which names its output files

    def launch(self, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """scripts/train.py (through WRAPPER) into `out`; stdout/stderr go to files (see `output`)."""
        wrapper = self.tmp / "wrapper.py"
        if not wrapper.exists():
            wrapper.write_text(WRAPPER)
        n = len(self.running) + 1
        args = [*RUN_ARGS, "--data-dir", str(DATA_DIR), "--out", str(out), *extra]
        with open(self.tmp / f"{n}.out", "wb") as so, open(self.tmp / f"{n}.err", "wb") as se:
            proc = subprocess.Popen(
                [sys.executable, str(wrapper), str(TRAIN), *args],
                stdout=so,
                stderr=se,
                env={**ENV, **(env or {})},
                cwd=self.tmp,
            )
        self.number[proc.pid] = n
        self.running.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        n = self.number[proc.pid]
        return (self.tmp / f"{n}.out").read_text(), (self.tmp / f"{n}.err").read_text()

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str, str]:
        rc = proc.wait(timeout=timeout)
        return rc, *self.output(proc)

    def kill_all(self) -> None:
        for p in self.running:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path / "procs")
    p.tmp.mkdir()
    yield p
    p.kill_all()


def poll(
    cond: Callable[[], bool], proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 90
) -> bool:
    """Wait until `cond()`; False if `proc` exits first. Fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            return cond()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
    return True


def is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"  # field 3, after "(comm)"


def temp_files(out: Path) -> list[Path]:
    return sorted(p for d in (out, out / "checkpoints") if d.exists() for p in d.glob(".*.tmp"))


def template() -> state_lib.TrainState:
    """A fresh TrainState shaped like the runs' (mlp, adam): what load_state validates against."""
    cfg = Config(model="mlp", optimizer="adam", lr=1e-3)
    params = models.get("mlp").init(torch.Generator().manual_seed(0))
    return state_lib.create(params, app.build_optimizer(cfg), seed=0)


def assert_same_tensors(a: Path, b: Path) -> None:
    """The two safetensors files hold the same names, dtypes, shapes and bytes."""
    ta, tb = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        x, y = ta[k], tb[k]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k


def history_without_times(out: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k != "epoch_time_s"}
        for r in json.loads((out / "history.json").read_text())
    ]


def assert_matches_baseline(out: Path, baseline: Path) -> None:
    """Final resume state, best weights and history equal the uninterrupted run's, bitwise."""
    for name in (loop.LAST, loop.BEST):
        assert_same_tensors(out / "checkpoints" / name, baseline / "checkpoints" / name)
    assert history_without_times(out) == history_without_times(baseline)
    assert temp_files(out) == []


def one_error_line(err: str) -> str:
    """stderr must be exactly one line, no traceback; returns it."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of RUN_ARGS: what every crashed-and-resumed run must end equal to."""
    if DATA_DIR is None:
        pytest.skip("Fashion-MNIST is not installed")
    tmp = tmp_path_factory.mktemp("baseline")
    p = Procs(tmp)
    try:
        rc, out, err = p.finish(p.launch(tmp / "run"))
    finally:
        p.kill_all()
    assert rc == 0, err
    assert f"done: {EPOCHS} epoch(s), completed" in out
    return tmp / "run"


# --------------------------------------------------------------------------- 1. crashes


@needs_data
def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(
    baseline: Path, procs: Procs, tmp_path: Path
) -> None:
    """Seven SIGKILLs (during startup, after a random step, inside a last.safetensors write),
    each followed by `--resume auto`; the result equals the uninterrupted run bitwise."""
    rng = random.Random(1729)  # fixed: the same kinds, delays and save numbers every run
    out = tmp_path / "victim"
    last = out / "checkpoints" / loop.LAST
    tmpl = template()
    kinds = ["startup", "startup", "train", "train", "train", "save", "save"]
    rng.shuffle(kinds)
    kills: list[tuple[str, int]] = []  # (kind, epochs in last.safetensors after the kill)
    epochs_done = 0
    for kind in kinds:
        remaining = EPOCHS - epochs_done  # never 0: no kill below lets the last epoch be saved
        env, expect = {}, None
        if kind == "train":
            # mid-epoch at a random step of what remains (at most the last step of the run,
            # before that epoch's save)
            k = rng.randint(1, remaining * STEPS_PER_EPOCH)
            env["FF_TEST_STOP_AT_STEP"] = str(k)
            expect = epochs_done + (k - 1) // STEPS_PER_EPOCH
        elif kind == "save":
            # the N-th save of this launch: at least the second while two epochs remain, so
            # killing at writes also makes progress; the first (and only) one when one remains
            n = rng.randint(min(2, remaining), remaining)
            env["FF_TEST_STOP_AT_SAVE"] = str(n)
            expect = epochs_done + n - 1
        proc = procs.launch(out, "--resume", "auto", env=env)
        if kind == "startup":
            # imports, data loading, config/summary writes: well before the first step
            # (importing torch alone takes longer than this)
            time.sleep(rng.uniform(0.05, 1.0))
        else:
            alive = poll(lambda p=proc: is_stopped(p.pid), proc, f"the {kind} stop")
            assert alive, procs.output(proc)
        if kind == "save":
            # stopped mid-write: the new file is complete under its temp name, not yet in place
            assert (out / "checkpoints" / f".{loop.LAST}.{proc.pid}.tmp").is_file()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, procs.output(proc)
        # whatever the moment, what is on disk is a complete, valid resume point ...
        if last.exists():
            st, meta = checkpoint.load_state(last, tmpl)
            assert int(st.step) == meta["epoch"] * STEPS_PER_EPOCH
            # ... holding every epoch finished before the kill: progress is never lost
            if expect is None:
                assert meta["epoch"] >= epochs_done
            else:
                assert meta["epoch"] == expect, (kind, env)
            epochs_done = meta["epoch"]
        kills.append((kind, epochs_done))

    assert len(kills) == 7 and sum(k == "save" for k, _ in kills) == 2, kills
    assert epochs_done >= 1, kills  # some relaunch resumed from a checkpoint, not from scratch

    rc, stdout, err = procs.finish(procs.launch(out, "--resume", "auto"))
    assert rc == 0, err
    assert "resumed from" in stdout and f"done: {EPOCHS - epochs_done} epoch(s), completed" in stdout
    log = (out / "train.log").read_text()
    assert "left by an interrupted write" in log  # the killed writes' temp files were cleaned up
    assert "died holding" in log  # SIGKILLed runs left their pid in .lock; the next run took over
    assert_matches_baseline(out, baseline)


def interrupt_and_resume(
    sig: signal.Signals,
    procs: Procs,
    out: Path,
    baseline: Path,
    while_running: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> None:
    """Send `sig` to a run mid-epoch: it saves, exits 128 + sig, and `--resume auto` then
    ends equal to the uninterrupted run. `while_running(proc)` runs before the signal."""
    # Training is under way: the run stops itself after step 11 (epoch 2, batch 3); the
    # signal is sent while it is stopped and handled as soon as it continues.
    proc = procs.launch(out, env={"FF_TEST_STOP_AT_STEP": "11"})
    assert poll(lambda: is_stopped(proc.pid), proc, "step 11"), procs.output(proc)
    if while_running is not None:
        while_running(proc)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    rc, stdout, err = procs.finish(proc)
    last = out / "checkpoints" / loop.LAST
    assert rc == 128 + sig, (stdout, err)
    assert one_error_line(err) == f"train.py: interrupted by {sig.name}; state saved to {last}"
    assert f"interrupted: resume with --resume auto --out {out}" in stdout
    # the current step finished and its state went to last.safetensors, mid-epoch
    st, meta = checkpoint.load_state(last, template())
    in_epoch = meta["in_epoch"]
    assert (meta["epoch"], in_epoch["epoch"], in_epoch["batch"], int(st.step)) == (1, 2, 3, 11)

    rc, stdout, err = procs.finish(procs.launch(out, "--resume", "auto"))
    assert rc == 0, err
    assert f"batch {in_epoch['batch']})" in stdout  # resumed inside the epoch, not at its start
    assert_matches_baseline(out, baseline)


@needs_data
def test_sigint_saves_mid_epoch_exits_130_and_resumes_bitwise(
    baseline: Path, procs: Procs, tmp_path: Path
) -> None:
    interrupt_and_resume(signal.SIGINT, procs, tmp_path / "run", baseline)


@needs_data
def test_busy_run_dir_is_refused_then_sigterm_exits_143_and_resumes_bitwise(
    baseline: Path, procs: Procs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    def second_run(proc: subprocess.Popen[bytes]) -> None:
        config = (out / "config.json").read_bytes()
        for flag in ("--resume", "--overwrite"):
            argv = [*RUN_ARGS, "--data-dir", str(DATA_DIR), "--out", str(out)]
            argv += ["--resume", "auto"] if flag == "--resume" else ["--overwrite"]
            assert main_train(argv) == 2
            line = one_error_line(capsys.readouterr().err)
            assert line == (
                f"train.py: error: run directory {out} is in use by process {proc.pid}; "
                "wait for it to finish or use another --out"
            )
        # refused before touching anything: --overwrite did not delete the live run's files
        assert (out / "config.json").read_bytes() == config and (out / "train.log").exists()
        assert proc.poll() is None  # still there (stopped), still ours to interrupt

    interrupt_and_resume(signal.SIGTERM, procs, out, baseline, while_running=second_run)


def test_stale_lock_of_a_dead_process_does_not_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process (pids are not reused this soon)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(dead.pid))
    synthetic = tmp_path / "data"
    make_dataset(synthetic, n_train=64, n_test=16)
    cfg = Config(
        model="mlp", epochs=1, batch_size=32, data_dir=str(synthetic), out=str(out), device="cpu",
        compile=False, tensorboard=False, progress=False,
    )  # fmt: skip
    assert app.main(cfg) == 0
    assert f"process {dead.pid} died holding {out / '.lock'}" in capsys.readouterr().out
    assert (out / ".lock").read_text() == ""  # released cleanly: no pid left to look stale


@needs_data
def test_sigint_during_startup_exits_130_without_traceback(procs: Procs, tmp_path: Path) -> None:
    proc = procs.launch(tmp_path / "run")

    def importing_torch() -> bool:
        try:
            return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False

    assert poll(importing_torch, proc, "torch to be imported"), procs.output(proc)
    proc.send_signal(signal.SIGINT)
    rc, _, err = procs.finish(proc)
    assert rc == 130
    assert one_error_line(err).startswith("train.py: interrupted by SIGINT")


# --------------------------------------------------------------------------- 2. checkpoints at the CLI


@needs_data
def test_resume_from_a_pickle_in_a_real_process_exits_2(procs: Procs, tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = out / "checkpoints" / loop.LAST
    path.parent.mkdir(parents=True)
    from test_checkpoint import pickle_bytes  # here: test_checkpoint imports this module

    path.write_bytes(pickle_bytes())
    rc, _, err = procs.finish(procs.launch(out, "--resume", "auto"))
    assert rc == 2
    assert "only safetensors files are read" in one_error_line(err)


# --------------------------------------------------------------------------- 3. data and arguments


@needs_data
def test_limit_larger_than_the_data_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "mlp", "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "run")]
    assert main_train([*argv, "--limit-train", "60001", "--no-compile", "--no-tensorboard"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "limit 60001 exceeds the 60000 examples of the train split" in line


def _spoil_data(directory: Path, case: str) -> Path:
    """Make `case` true of the synthetic data in `directory`; returns the file to blame."""
    labels = directory / "train-labels-idx1-ubyte"
    images = directory / "train-images-idx3-ubyte"
    if case == "wrong magic":
        write_idx(images, np.zeros((64, 28, 28), np.uint8), magic=0x0000_0803 + 0x100)
        return images
    if case == "truncated":
        write_idx(images, np.zeros((64, 28, 28), np.uint8), cut=100)
        return images
    if case == "count mismatch":
        write_idx(labels, np.zeros(63, np.uint8))
        return labels
    write_idx(labels, np.full(64, 10, np.uint8))  # labels outside 0..9
    return labels


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("wrong magic", "is not a Fashion-MNIST IDX file: magic number 2307"),
        ("truncated", "is truncated: expected 50192 bytes, got 50092"),
        ("count mismatch", "holds 64 images but file .* holds 63 labels"),
        ("labels out of range", "holds label 10 at index 0; labels must be in 0..9"),
    ],
)
def test_bad_data_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, match: str
) -> None:
    make_dataset(tmp_path / "data", n_train=64, n_test=16)
    blamed = _spoil_data(tmp_path / "data", case)
    argv = ["--model", "mlp", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert main_train([*argv, "--no-compile", "--no-tensorboard", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(blamed) in line and re.search(match, line), line


@needs_data
def test_explicit_data_dir_without_data_never_falls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.ENV_VAR, str(DATA_DIR))  # real data elsewhere, in plain sight
    for given in (tmp_path / "missing", tmp_path / "empty"):
        if given.name == "empty":
            given.mkdir()
        argv = ["--model", "mlp", "--data-dir", str(given), "--out", str(tmp_path / f"run-{given.name}")]
        assert main_train([*argv, "--no-compile", "--no-tensorboard", "--no-progress"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"train.py: error: --data-dir {given} ")
        assert ("does not exist" if given.name == "missing" else "lacks train-images-idx3-ubyte") in line


# --------------------------------------------------------------------------- NaN and failed writes


@dataclasses.dataclass(frozen=True)
class BlowUp(cbs.Callback):
    """Sets a learning rate that makes the next steps diverge (a test-only callback)."""

    lr: float = 1e30

    def on_event(self, cb_state: cbs.CbState, event: cbs.Event) -> tuple[cbs.CbState, list[cbs.Action]]:
        if isinstance(event, cbs.TrainBegin):
            return cb_state, [cbs.SetHyperparam("lr", self.lr)]
        return cb_state, []


def _tiny_cfg(tmp: Path, **changes: Any) -> Config:
    if not (tmp / "data").exists():
        make_dataset(tmp / "data", n_train=128, n_test=32)
    values = dict(
        model="mlp", epochs=3, batch_size=32, optimizer="sgd", lr=0.01, data_dir=str(tmp / "data"),
        out=str(tmp / "run"), device="cpu", compile=False, tensorboard=False, progress=False,
    )  # fmt: skip
    return Config(**{**values, **changes})


def _first_nonfinite_step(cfg: Config, state_path: Path, epoch: int, lr: float) -> int:
    """Reference: replay `epoch` eagerly from the saved state with `lr`; the first non-finite loss's step."""
    model, tx = models.get(cfg.model), app.build_optimizer(cfg)
    params = model.init(torch.Generator().manual_seed(cfg.seed))
    st, _ = checkpoint.load_state(state_path, state_lib.create(params, tx, seed=cfg.seed))
    st = st.replace(opt_state=optim.set_hyperparam(st.opt_state, "lr", lr))
    step = make_train_step(model, tx, compile=False)
    train = data.load("train", cfg.data_dir)
    for batch in data.batches(train, cfg.batch_size, seed=cfg.seed, epoch=epoch):
        st, m = step(st, batch)
        if not torch.isfinite(m["loss_sum"]):
            return int(st.step)
    raise AssertionError("the loss stayed finite")


def test_nan_loss_stops_that_epoch_naming_the_step_and_keeps_good_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _tiny_cfg(tmp_path, epochs=1)
    app.train(cfg)  # one good epoch
    ckpts = tmp_path / "run" / "checkpoints"
    good = {name: (ckpts / name).read_bytes() for name in (loop.LAST, loop.BEST)}
    capsys.readouterr()
    expected = _first_nonfinite_step(cfg, ckpts / loop.LAST, epoch=2, lr=1e30)
    assert 4 < expected <= 8  # inside epoch 2 (4 steps per epoch)

    cfg = _tiny_cfg(tmp_path, epochs=3)
    result = app.train(cfg, resume="auto", callbacks=[*app.build_callbacks(cfg), BlowUp()])
    stdout = capsys.readouterr().out
    assert f"loss became non-finite at step {expected} (epoch 2); stopping" in stdout
    assert result.stop_reason == f"non-finite loss at step {expected} (epoch 2)"
    assert result.epochs_run == 1 and [r["epoch"] for r in result.history] == [1, 2]  # epoch 3 never ran
    assert result.history[-1]["first_nonfinite_step"] == expected
    for name, content in good.items():
        assert (ckpts / name).read_bytes() == content, name

    # an interruption after the divergence (here: the max_steps cut) does not save it either
    app.train(cfg, resume="auto", callbacks=[*app.build_callbacks(cfg), BlowUp()], max_steps=expected)
    assert f"not saving, {ckpts / loop.LAST} keeps the state from before it" in capsys.readouterr().out
    for name, content in good.items():
        assert (ckpts / name).read_bytes() == content, name


@pytest.mark.parametrize(("where", "code"), [("fsync", errno.ENOSPC), ("open", errno.EACCES)])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str, code: int
) -> None:
    cfg = _tiny_cfg(tmp_path, epochs=2, optimizer="adam", lr=1e-3)
    last = tmp_path / "run" / "checkpoints" / loop.LAST
    seen: dict[str, Any] = {"n": 0}

    def failing(name: str) -> bool:
        # the second write of last.safetensors (end of epoch 2) hits a full disk / a denied open
        if not Path(name).name.startswith(f".{loop.LAST}."):
            return False
        seen["n"] += 1
        if seen["n"] < 2:
            return False
        seen["before"] = last.read_bytes()
        return True

    if where == "fsync":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if failing(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(code, os.strerror(code))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:

        def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if failing(str(file)):
                raise OSError(code, os.strerror(code), str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr(atomic, "open", fake_open, raising=False)

    assert app.main(cfg) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"train.py: error: cannot write checkpoint {last}: {os.strerror(code)}"
    assert last.read_bytes() == seen["before"]  # epoch 1's resume point, intact
    st, meta = checkpoint.load_state(last, template())
    assert meta["epoch"] == 1 and int(st.step) == 4
    assert temp_files(tmp_path / "run") == []


def test_failed_plot_write_is_one_line_that_names_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _tiny_cfg(tmp_path, epochs=1)
    plot = tmp_path / "run" / "loss.png"

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file).name.startswith(".loss.png."):  # the plot's temp file: a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)
    assert app.main(cfg) == 2
    line = one_error_line(capsys.readouterr().err)
    # a plot, not a checkpoint: the message names the file and why
    assert line == f"train.py: error: cannot write plot {plot}: {os.strerror(errno.ENOSPC)}"
    assert temp_files(tmp_path / "run") == []


@pytest.mark.parametrize("case", ["out is a file", "out under a file", "lock not writable"])
def test_unwritable_output_directory_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    # Tests run as root, for whom permissions do not stop writes: a file in the way is
    # real; a denied open is simulated.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = {"out is a file": blocker, "out under a file": blocker / "run"}.get(case, tmp_path / "run")
    expected = {
        "out is a file": f"--out {out} exists and is not a directory",
        "out under a file": f"cannot create run directory {out}: Not a directory",
        "lock not writable": f"cannot write to run directory {out}: Permission denied",
    }[case]
    if case == "lock not writable":
        real_open = os.open

        def denied(path: Any, *args: Any, **kwargs: Any) -> int:
            if Path(path) == out / ".lock":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
    cfg = _tiny_cfg(tmp_path, out=str(out))
    assert app.main(cfg) == 2
    assert one_error_line(capsys.readouterr().err) == f"train.py: error: {expected}"
    assert blocker.read_text() == "not a directory"
