"""Reliability, round four (issue 35, the cases outside private training): links and locks checked
at every write, `save_resume`'s arguments checked against the state, Orbax data checked on load,
duplicate config keys, SIGINT / SIGTERM in predict and export, messages that name the command,
values compared as values.

Two tables, one row per case: `CLI` runs a command in this process (tiny data, an mlp, CPU) and
expects its exit code, exactly one line on stderr holding the words given (or none), and what
`after` checks of the files; `API` calls the library and expects its one-line error. A new case
joins by adding a row. README.md's "Guarantees" table points here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_data import make_dataset  # tests/ is on sys.path under pytest
from test_reliability import one_error_line

from fashion_func import checkpoint, interop, optim
from fashion_func import loop as loop_lib
from fashion_func.__main__ import main as fashion_func
from fashion_func.cli import export, predict
from fashion_func.cli.train import main_train
from fashion_func.loop.lock import Lock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="symlinks, POSIX signals")

STEPS_PER_EPOCH = 2  # 64 examples, batch 32


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data, a finished 2-epoch run (`run`) and a 2-member sweep spelled `lr=1e-3,1e-2`."""
    root = tmp_path_factory.mktemp("four")
    make_dataset(root / "data", n_train=64, n_test=16)
    assert main_train(_argv(root / "data", root / "run", "--epochs", "2")) == 0
    sweep = ("--epochs", "1", "--sweep", "lr=1e-3,1e-2")
    assert main_train(_argv(root / "data", root / "sweep", *sweep)) == 0
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "mlp", "--batch-size", "32", "--data-dir", str(data), "--out", str(out), "--seed", "0",
        "--device", "cpu", "--no-compile", "--no-tensorboard", "--no-progress", *extra,
    ]  # fmt: skip


@dataclass
class Env:
    """One case's world: a copy of the made runs under `tmp`, and the monkeypatch."""

    tmp: Path
    data: Path
    mp: pytest.MonkeyPatch

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def train(self, out: Path, *extra: str) -> int:
        return main_train(_argv(self.data, out, *extra))

    def files(self, folder: Path) -> dict[str, bytes]:
        """Every file under `folder` (links not followed) and its bytes."""
        return {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }


def _nothing(env: Env) -> None:
    pass


@dataclass(frozen=True)
class Row:
    name: str
    act: Callable[[Env], int]  # runs the case; its exit code
    code: int
    says: str | None  # in the one line on stderr; None: nothing on stderr
    after: Callable[[Env], None] = _nothing


# -- item 9: links checked at every write, not only at start -------------------------------------


def _swap_after_first_save(env: Env, folder: Path, target: Path) -> None:
    """After the first last.safetensors of the run, `folder` is moved away and becomes a link to
    `target`, another folder holding a copy of what it held: the next writes would land there."""
    real = checkpoint.save_state
    seen = {"n": 0}

    def save_then_swap(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        seen["n"] += 1
        if seen["n"] == 1:
            shutil.move(folder, env.tmp / "moved")
            shutil.copytree(env.tmp / "moved", target)
            folder.symlink_to(target, target_is_directory=True)
            env.before = env.files(target)  # type: ignore[attr-defined]

    env.mp.setattr(checkpoint, "save_state", save_then_swap)


def _swap_checkpoints(env: Env) -> int:
    _swap_after_first_save(env, env.tmp / "new" / "checkpoints", env.tmp / "elsewhere")
    return env.train(env.tmp / "new", "--epochs", "2")


def _swap_run_dir(env: Env) -> int:
    _swap_after_first_save(env, env.tmp / "new", env.tmp / "elsewhere")
    return env.train(env.tmp / "new", "--epochs", "2")


def _outside_unchanged(env: Env) -> None:
    assert env.files(env.tmp / "elsewhere") == env.before  # type: ignore[attr-defined]
    assert not list((env.tmp / "elsewhere").rglob(".*.tmp"))


def _link_last_into_other_run(env: Env) -> None:
    """`copy` is a copy of the run whose last.safetensors is a link to the original's."""
    shutil.copytree(env.run, env.tmp / "copy")
    last = env.tmp / "copy" / "checkpoints" / loop_lib.LAST
    last.unlink()
    last.symlink_to(env.run / "checkpoints" / loop_lib.LAST)
    env.before = {**env.files(env.run), **{f"copy/{k}": v for k, v in env.files(env.tmp / "copy").items()}}  # type: ignore[attr-defined]


def _resume_linked_last(env: Env, how: str) -> int:
    _link_last_into_other_run(env)
    last = env.tmp / "copy" / "checkpoints" / loop_lib.LAST
    argv = ["--resume", "auto", "--out", str(env.tmp / "copy")] if how == "auto" else ["--resume", str(last)]
    return main_train([*argv, "--epochs", "3", "--no-progress"])


def _both_runs_unchanged(env: Env) -> None:
    now = {**env.files(env.run), **{f"copy/{k}": v for k, v in env.files(env.tmp / "copy").items()}}
    assert now == env.before  # type: ignore[attr-defined]  # neither trained on nor rewritten


# -- item 10: save_resume onto a running run ------------------------------------------------------


def _save_resume_onto_a_locked_run(env: Env) -> int:
    last = env.run / "checkpoints" / loop_lib.LAST
    state, _ = interop.load_for_optax(last, optim.adam(1e-3))
    state = state.replace(step=state.step + STEPS_PER_EPOCH)
    env.before = last.read_bytes()  # type: ignore[attr-defined]
    lock = Lock(env.run)  # a run training there holds it
    try:
        interop.save_resume(last, state, last, epochs=1)
    except loop_lib.RunError as e:
        print(f"save_resume: {e}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    return 0


def _last_unchanged(env: Env) -> None:
    assert (env.run / "checkpoints" / loop_lib.LAST).read_bytes() == env.before  # type: ignore[attr-defined]


# -- item 12, item 16: config files, messages, values --------------------------------------------


def _config(env: Env, name: str, text: str, *extra: str) -> int:
    (env.tmp / name).write_text(text)
    return env.train(env.tmp / "new", "--config", str(env.tmp / name), *extra)


def _nothing_made(env: Env) -> None:
    assert not (env.tmp / "new").exists()


def _resume_sweep_respelled(env: Env) -> int:
    sweep = env.tmp / "sweep"
    return env.train(sweep, "--resume", "auto", "--epochs", "2", "--sweep", "lr=0.001,0.01")


def _sweep_trained_epoch_2(env: Env) -> None:
    history = json.loads((env.tmp / "sweep" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]


def _complete_run_logs_no_backward_range(env: Env) -> None:
    log = (env.run / "train.log").read_text()
    assert "epochs 3..1" not in log and "already complete" in log
    assert json.loads((env.run / "history.json").read_text())[-1]["epoch"] == 2


# -- item 13: SIGINT / SIGTERM in predict and export ---------------------------------------------


def _signal_during(env: Env, where: tuple[Any, str], signum: int, command: Callable[[], int]) -> int:
    """`command` with SIGINT / SIGTERM sent to this process when `where` (module, function) runs."""
    module, name = where
    real = getattr(module, name)

    def signalled(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signum)  # delivered at the next bytecode: inside the command's work
        return real(*args, **kwargs)

    env.mp.setattr(module, name, signalled)
    # pytest-xdist's workers start with SIGINT ignored, and a command started so keeps ignoring it
    # (as under nohup); this process stands for one started from a terminal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return command()
    finally:
        signal.signal(signal.SIGINT, previous)


def _export_interrupted(env: Env, signum: int) -> int:
    best = env.run / "checkpoints" / loop_lib.BEST
    argv = ["--weights", str(best), "--format", "numpy", "--out", str(env.tmp / "w.npz")]
    return _signal_during(env, (os, "fsync"), signum, lambda: export.main(argv))


def _predict_interrupted(env: Env, signum: int) -> int:
    best = env.run / "checkpoints" / loop_lib.BEST
    argv = [
        "--weights",
        str(best),
        "--data-dir",
        str(env.data),
        "--device",
        "cpu",
        "--out",
        str(env.tmp / "report"),
    ]
    return _signal_during(env, (predict, "per_example_outputs"), signum, lambda: predict.main(argv))


def _no_output(env: Env) -> None:
    assert not (env.tmp / "w.npz").exists() and not list(env.tmp.glob(".*.tmp"))
    assert not (env.tmp / "report").exists() or not any((env.tmp / "report").iterdir())


CLI = [
    Row("9: checkpoints/ swapped for a link during training", _swap_checkpoints, 2,
        "is no longer the folder the run opened", _outside_unchanged),
    Row("9: the run directory swapped for a link during training", _swap_run_dir, 2,
        "is no longer the folder the run opened", _outside_unchanged),
    Row("9: --resume auto, last.safetensors a link into another run",
        lambda e: _resume_linked_last(e, "auto"), 2, "last.safetensors is a symbolic link",
        _both_runs_unchanged),
    Row("9: --resume PATH, a link into another run", lambda e: _resume_linked_last(e, "path"), 2,
        "is a symbolic link; pass --out", _both_runs_unchanged),
    Row("10: save_resume onto a run holding its lock", _save_resume_onto_a_locked_run, 2,
        "is in use by process", _last_unchanged),
    Row("12: TOML gives a key under both spellings",
        lambda e: _config(e, "c.toml", '"dp-noise-multiplier" = 1.0\ndp_noise_multiplier = 2.0\n'), 2,
        "gives dp_noise_multiplier twice (as 'dp-noise-multiplier' and 'dp_noise_multiplier')",
        _nothing_made),
    Row("12: TOML lr and lr's other spelling", lambda e: _config(e, "c.toml", 'lr = 0.1\n"lr" = 0.2\n'), 2,
        "is not valid TOML", _nothing_made),  # tomllib itself refuses a key written twice
    Row("12: JSON gives a key twice", lambda e: _config(e, "c.json", '{"lr": 0.1, "lr": 0.2}'), 2,
        "gives 'lr' twice", _nothing_made),
    Row("12: JSON gives a key under both spellings",
        lambda e: _config(e, "c.json", '{"batch-size": 16, "batch_size": 32}'), 2,
        "gives batch_size twice", _nothing_made),
    Row("13: SIGINT during export", lambda e: _export_interrupted(e, signal.SIGINT), 130,
        "export.py: interrupted by SIGINT", _no_output),
    Row("13: SIGTERM during export", lambda e: _export_interrupted(e, signal.SIGTERM), 143,
        "export.py: interrupted by SIGTERM", _no_output),
    Row("13: SIGINT during predict", lambda e: _predict_interrupted(e, signal.SIGINT), 130,
        "predict.py: interrupted by SIGINT", _no_output),
    Row("13: SIGTERM during predict", lambda e: _predict_interrupted(e, signal.SIGTERM), 143,
        "predict.py: interrupted by SIGTERM", _no_output),
    Row("16: a sweep resumed with its values spelled otherwise", _resume_sweep_respelled, 0, None,
        _sweep_trained_epoch_2),
    Row("16: fashion-func train errors name the command", lambda e: fashion_func(["train", "--lr", "0"]), 2,
        "fashion-func train: error: --lr must be"),
    Row("16: fashion-func predict errors name the command",
        lambda e: fashion_func(["predict", "--weights", str(e.tmp / "none.safetensors")]), 2,
        "fashion-func predict: error: "),
    Row("16: fashion-func export errors name the command",
        lambda e: fashion_func(["export", "--weights", "w", "--format", "numpy", "--out", ""]), 2,
        "fashion-func export: error: --out is empty"),
    Row("16: --config ''", lambda e: e.train(e.tmp / "new", "--config", ""), 2,
        "train.py: error: --config is an empty path", _nothing_made),
    Row("16: --epochs 1 on a finished 2-epoch run",
        lambda e: e.train(e.run, "--resume", "auto", "--epochs", "1"), 0, None,
        _complete_run_logs_no_backward_range),
]  # fmt: skip


@pytest.mark.parametrize("row", CLI, ids=[r.name for r in CLI])
def test_cli_case_ends_as_promised(
    row: Row, made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("run", "sweep"):
        shutil.copytree(made / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path, made / "data", monkeypatch)
    code = row.act(env)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == row.code, err
    if row.says is None:
        assert err.strip() == "", err
    else:
        line = one_error_line(err)
        assert row.says in line, line
    row.after(env)


# -- the library: save_resume's arguments and Orbax data ------------------------------------------


@dataclass(frozen=True)
class ApiRow:
    name: str
    call: Callable[[Path], Any]  # given the copied run directory
    says: str  # in the one-line ValueError


def _save_resume(run: Path, *, epochs: Any, trained: int, like: str = loop_lib.LAST) -> None:
    last = run / "checkpoints" / loop_lib.LAST
    state, _ = interop.load_for_optax(last, optim.adam(1e-3))
    state = state.replace(step=state.step + trained * STEPS_PER_EPOCH)
    interop.save_resume(
        run / "checkpoints" / "out.safetensors", state, run / "checkpoints" / like, epochs=epochs
    )


def _orbax_byte_flipped(run: Path) -> None:
    pytest.importorskip("orbax.checkpoint")
    tx = optim.adam(1e-3)
    last = run / "checkpoints" / loop_lib.LAST
    interop.save_orbax(run / "orbax", last, tx)
    data = max((p for p in (run / "orbax").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    data.write_bytes(bytes(flipped))
    interop.load_orbax(run / "orbax", last, tx)


EPOCHS_WORDS = "epochs must be the whole epochs"
API = [
    ApiRow("10: epochs=5 for one epoch trained", lambda r: _save_resume(r, epochs=5, trained=1),
           "the state is at step 6, but"),
    ApiRow("10: epochs=0", lambda r: _save_resume(r, epochs=0, trained=0), EPOCHS_WORDS),
    ApiRow("10: epochs=-1", lambda r: _save_resume(r, epochs=-1, trained=1), EPOCHS_WORDS),
    ApiRow("10: epochs=True", lambda r: _save_resume(r, epochs=True, trained=1), EPOCHS_WORDS),
    ApiRow("10: like= a weights file", lambda r: _save_resume(r, epochs=1, trained=1, like=loop_lib.BEST),
           "is not a resume point"),
    ApiRow("11: one flipped byte in an Orbax data file", _orbax_byte_flipped,
           "differs from what save_orbax wrote"),
]  # fmt: skip


@pytest.mark.parametrize("row", API, ids=[r.name for r in API])
def test_api_case_is_one_line_and_writes_nothing(row: ApiRow, made: Path, tmp_path: Path) -> None:
    shutil.copytree(made / "run", tmp_path / "run")
    with pytest.raises(ValueError) as info:
        row.call(tmp_path / "run")
    message = str(info.value)
    assert row.says in message and "\n" not in message, message
    assert not (tmp_path / "run" / "checkpoints" / "out.safetensors").exists()


def test_save_resume_with_the_epochs_the_state_trained_resumes_to_them(made: Path, tmp_path: Path) -> None:
    """The good case beside the refused ones: one epoch trained elsewhere, epochs=1, resumed."""
    shutil.copytree(made / "run", tmp_path / "run")
    _save_resume(tmp_path / "run", epochs=1, trained=1)
    out = tmp_path / "run" / "checkpoints" / "out.safetensors"
    state, meta = interop.load_for_optax(out, optim.adam(1e-3))
    assert meta["epoch"] == 3 and int(state.step) == 3 * STEPS_PER_EPOCH
