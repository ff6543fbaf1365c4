"""`fit`: the only impure driver.

It owns the run directory, the clock, the device and the files: it runs the compiled
step over the epoch's batches, sends events to the callbacks and carries out the
actions they return (save a checkpoint, set the learning rate, write history and
plots, log, stop). Everything it needs to continue after a restart goes into
`checkpoints/last.safetensors`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, data, models, optim
from fashion_func import state as state_lib
from fashion_func.config import Config, ConfigError
from fashion_func.step import cross_entropy_per_example, make_eval_step, make_train_step
from fashion_func.summary import summary

__all__ = [
    "FitResult",
    "Interrupted",
    "RunError",
    "build_callbacks",
    "build_optimizer",
    "evaluate",
    "fit",
    "main",
]

LAST = "last.safetensors"
BEST = "best.safetensors"
RUN_ARTIFACTS = (
    "config.json",
    "train.log",
    "summary.txt",
    "history.json",
    "loss.png",
    "accuracy.png",
    "tensorboard",
    "checkpoints",
)


class RunError(Exception):
    """The run cannot start or go on (a user-facing problem: exit code 2)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; the state was saved. `code` is the exit status to use."""

    def __init__(self, signum: int, path: Path, *, saved: bool = True) -> None:
        self.signum = signum
        self.path = path
        self.code = 128 + signum
        what = "state saved to" if saved else "diverged state not saved; the last good one is in"
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {what} {path}")


@dataclass
class FitResult:
    """What a finished run leaves: the final state, its history and why it ended."""

    state: state_lib.TrainState
    history: list[dict[str, Any]]
    epochs_run: int
    stop_reason: str
    out_dir: Path
    best: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- building blocks from the config -------------------------------------------------


def build_optimizer(cfg: Config) -> optim.GradientTransformation:
    """The optimizer the config names, with optional gradient clipping in front."""
    if cfg.optimizer == "adam":
        tx = optim.adam(cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        tx = optim.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    else:
        tx = optim.sgd(cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.clip_norm is not None:
        tx = optim.chain(optim.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


def build_callbacks(cfg: Config) -> list[Any]:
    """The tutorial's callbacks, configured from `cfg`, in the order they run."""
    out: list[Any] = [cbs.TerminateOnNaN(), cbs.TrainingMonitor(), cbs.LogEpoch()]
    if cfg.tensorboard:
        out.append(cbs.TensorBoardLogger())
    if cfg.lr_schedule == "step":
        out.append(cbs.StepLR(base_lr=cfg.lr, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma))
    elif cfg.lr_schedule == "cosine":
        out.append(cbs.CosineLR(base_lr=cfg.lr, t_max=cfg.epochs))
    elif cfg.lr_schedule == "plateau":
        out.append(
            cbs.ReduceLROnPlateau(
                monitor=cfg.monitor,
                mode=cfg.mode,
                factor=cfg.lr_gamma,
                patience=max(1, (cfg.patience or 4) // 2),
                base_lr=cfg.lr,
            )
        )
    out.append(
        cbs.ModelCheckpoint(
            monitor=cfg.monitor,
            mode=cfg.mode,
            save_best_only=cfg.save_best_only,
            every_n_epochs=cfg.every_n_epochs,
            save_top_k=cfg.topk,
            save_last=True,
        )
    )
    if cfg.patience is not None:
        out.append(
            cbs.EarlyStopping(
                monitor=cfg.monitor, mode=cfg.mode, patience=cfg.patience, min_delta=cfg.min_delta
            )
        )
    return out


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; asking for CUDA without one is a RunError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def keep_freed_memory_in_heap(limit_bytes: int = 1 << 31) -> bool:
    """Ask glibc's malloc to keep freed blocks below `limit_bytes` in the heap (CPU runs).

    By default glibc hands large freed blocks back to the kernel (mmap, heap trimming),
    so every step page-faults freshly zeroed pages for its activations: about a quarter
    of a bf16 step on the 2-core CPU this was measured on. Process-wide and harmless:
    the heap then holds at most the step's peak, which the process needed anyway.
    Returns False where the C library is not glibc (nothing is changed there).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, limit_bytes // 4) and mallopt(m_trim_threshold, limit_bytes))


def resolve_compile(setting: str, device: torch.device) -> bool | str:
    """How to torch.compile the step: `auto` compiles all of it on CUDA, only the
    optimizer update on CPU.

    On CPU a fully compiled step measured several times slower than eager (inductor's
    CPU convolution backward), while compiling just the update fuses its elementwise
    passes (about 6x faster than eager) and takes a few seconds to build.
    """
    if setting == "auto":
        return True if device.type == "cuda" else "update"
    return setting == "on"


def _check_same_batches(in_epoch: dict[str, Any], *, n: int, batch_size: int, seed: int) -> None:
    """A mid-epoch checkpoint continues only with the batches it was cut from."""
    saved = in_epoch.get("batching")
    now = {"n": n, "batch_size": batch_size, "seed": seed}
    if saved is not None and saved != now:
        diff = ", ".join(f"{k} {saved[k]} (now {now[k]})" for k in now if saved.get(k) != now[k])
        raise RunError(
            f"the checkpoint was cut mid-epoch with {diff}; resume with the same --batch-size, "
            "--limit-train and --seed"
        )


def _stats(cfg: Config) -> tuple[float, float]:
    return (data.MEAN, data.STD) if cfg.normalize == "dataset" else (data.TUTORIAL_MEAN, data.TUTORIAL_STD)


# -- evaluation ------------------------------------------------------------------------


def evaluate(
    eval_step: Any, params: dict[str, Tensor], split: data.Split, batch_size: int
) -> dict[str, float]:
    """Mean loss, accuracy and top-5 accuracy over `split`, one host sync at the end."""
    n = split.labels.shape[0]
    sums = None
    for start in range(0, n, batch_size):
        out = eval_step(
            params, (split.images[start : start + batch_size], split.labels[start : start + batch_size])
        )
        part = torch.stack([out["loss"].sum(), out["correct"].sum(), out["topk_correct"].sum()])
        sums = part if sums is None else sums + part
    loss, correct, top5 = sums.double().tolist()  # the one sync
    return {"val_loss": loss / n, "val_acc": correct / n, "val_top5": top5 / n}


# -- files -------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    checkpoint.atomic_write(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def _plot(records: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    for name, ylabel in (("loss", "cross-entropy loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for split in ("train", "val"):
            key = f"{split}_{name}"
            if any(key in r for r in records):
                values = [cbs.decode_float(r.get(key)) for r in records]
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 ticks
        ax.set_ylabel(ylabel)
        ax.set_title(f"{'Loss' if name == 'loss' else 'Accuracy'} per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        checkpoint.atomic_write(out / ("loss.png" if name == "loss" else "accuracy.png"), buf.getvalue())


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[str | None]:
    """Hold `<out>/.lock` for the run; a second run into the same directory is refused.

    flock is released by the kernel when the holder dies, so a lock left by a killed
    run is never mistaken for a live one. Yields the pid a dead holder left in the file
    (a stale lock, now taken over), or None.
    """
    path = out / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunError(f"cannot write to run directory {out}: {exc.strerror}") from None
    try:
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip() or None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"run directory {out} is in use by process {previous or '(unknown)'}; "
                "wait for it to finish or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield previous
        finally:
            # a clean exit empties the file: a pid found in it later was left by a killed run
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _remove_stale_temps(out: Path) -> list[Path]:
    """Delete temp files a killed run left mid-write (`.<name>.<pid>.tmp`); we hold the lock."""
    stale = [p for d in (out, out / "checkpoints") for p in d.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def _signals_to_flag() -> Iterator[dict[str, int | None]]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (the step finishes first)."""
    flag: dict[str, int | None] = {"signum": None}

    def handler(signum: int, frame: Any) -> None:
        flag["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _make_logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"fashion_func.run.{out.resolve()}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(out / "train.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    ch = logging.StreamHandler(sys.stdout)
    ch.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(fh)
    log.addHandler(ch)
    return log


def _close_logger(log: logging.Logger) -> None:
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


# -- the driver ------------------------------------------------------------------------------


def prepare_out_dir(out: Path, *, resume: str | None, overwrite: bool) -> None:
    """Create the run directory; refuse to reuse one unless resuming or overwriting."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and not resume and not overwrite:
        raise RunError(
            f"run directory {out} already holds a run; pass --resume auto to continue it or --overwrite"
        )
    if overwrite and not resume:
        for name in existing:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to run directory {out}: {exc.strerror}") from None


def resume_path(out: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (`auto` without one)."""
    if not resume:
        return None
    if resume == "auto":
        p = out / "checkpoints" / LAST
        return p if p.exists() else None
    p = Path(resume)
    if not p.is_file():
        raise RunError(f"--resume {resume}: no such checkpoint file")
    return p


def saved_config(path: Path) -> dict[str, Any]:
    """The config values a checkpoint was written with (its metadata 'config').

    Reads only the file's header. CheckpointError for a bad file, RunError when it has
    no config (not written by `fit`).
    """
    values = checkpoint.read_metadata(path).get("config")
    if not isinstance(values, dict):
        raise RunError(f"checkpoint {path} holds no run config; it was not written by train.py")
    return values


def fit(
    cfg: Config,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    max_steps: int | None = None,
) -> FitResult:
    """Train as `cfg` says, writing the run directory; returns the final state and history.

    resume: None, "auto" (continue `<out>/checkpoints/last.safetensors` if present) or a path.
    max_steps: stop (after saving last.safetensors) once the state reaches this step;
        used by tests to cut a run mid-epoch as a crash would.
    """
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create run directory {out}: {exc.strerror}") from None
    # Lock before looking inside: a refused second run must not touch, let alone
    # --overwrite, the files of the run that holds the directory.
    with run_lock(out) as stale_lock:
        prepare_out_dir(out, resume=resume, overwrite=overwrite)
        log = _make_logger(out)
        if stale_lock and stale_lock != str(os.getpid()):
            log.info(f"process {stale_lock} died holding {out / '.lock'} (killed?); taking the lock over")
        for p in _remove_stale_temps(out):
            log.info(f"removed {p}, left by an interrupted write")
        try:
            return _fit_locked(cfg, out, log, resume=resume, callbacks=callbacks, max_steps=max_steps)
        finally:
            _close_logger(log)


def _fit_locked(cfg, out, log, *, resume, callbacks, max_steps) -> FitResult:
    device = resolve_device(cfg.device)
    ckpt_dir = out / "checkpoints"
    from_path = resume_path(out, resume)

    train = data.load("train", cfg.data_dir, device=device, limit=cfg.limit_train)
    val = data.load("test", cfg.data_dir, device=device, limit=cfg.limit_val)
    model = models.get(cfg.model)
    tx = build_optimizer(cfg)
    params = model.init(torch.Generator().manual_seed(cfg.seed), device=device)
    st = state_lib.create(params, tx, seed=cfg.seed)
    callbacks = build_callbacks(cfg) if callbacks is None else callbacks
    cb_states = {cb.name: cb.init() for cb in callbacks}
    start_epoch, in_epoch = 1, None
    # The lr as last set, exactly as the schedule gave it: it is what history and TensorBoard
    # show (the optimizer state holds it as a float32 tensor, which would log 0.0010000000474974513).
    lr_host = cfg.lr

    log.info(f"seed {cfg.seed}, device {device}, data {train.source}")
    log.info(f"train {len(train.labels)} examples, validation {len(val.labels)} (test set)")
    if from_path is not None:
        saved_model = checkpoint.read_metadata(from_path).get("model")
        if saved_model is not None and saved_model != cfg.model:
            raise RunError(
                f"checkpoint {from_path} holds a {saved_model} model, not {cfg.model}; "
                f"resume it with --model {saved_model}"
            )
        st, meta = checkpoint.load_state(from_path, st)
        saved = meta.get("callbacks", {})
        cb_states = {cb.name: saved.get(cb.name, cb.init()) for cb in callbacks}
        start_epoch = int(meta.get("epoch", 0)) + 1
        in_epoch = meta.get("in_epoch")
        where = f"epoch {start_epoch}" + (f", batch {in_epoch['batch']}" if in_epoch else "")
        log.info(f"resumed from {from_path} at step {int(st.step)} ({where})")
        lr_host = float(meta["lr"]) if "lr" in meta else float(optim.get_hyperparam(st.opt_state, "lr"))
        saved_lr = meta.get("config", {}).get("lr")
        if saved_lr is not None and cfg.lr != saved_lr:
            # an --lr given on resume replaces the checkpoint's (schedules restart from it too)
            st = st.replace(opt_state=optim.set_hyperparam(st.opt_state, "lr", cfg.lr))
            lr_host = cfg.lr
            for cb in callbacks:  # ReduceLROnPlateau carries its lr in its state: restart it there too
                if isinstance(cb, cbs.ReduceLROnPlateau):
                    cb_states[cb.name] = {**cb_states[cb.name], "lr": cbs.encode_float(cfg.lr)}
            log.info(f"lr set to {cfg.lr} (the checkpoint's run used {saved_lr})")
        if start_epoch > cfg.epochs:
            log.info(f"the checkpoint is past epoch {cfg.epochs} (--epochs); nothing to train")
    elif resume == "auto":
        log.info(f"no checkpoint in {ckpt_dir}; starting fresh")

    _write_json(out / "config.json", cfg.to_dict())
    text = summary(model, st.params)
    checkpoint.atomic_write(out / "summary.txt", text.encode())
    log.info(text.rstrip())

    mean, std = _stats(cfg)
    use_compile = resolve_compile(cfg.compile, device)
    if device.type == "cpu":
        keep_freed_memory_in_heap()
        # inductor's CPU backend imports cpp_extension, which warns that there is no CUDA
        # runtime on a CPU-only machine: true, expected, and noise in every run's output
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if device.type == "cuda":
        # TF32 exactly when asked for: cuDNN allows it by default, which would make
        # "fp32" convolutions TF32 (process-wide flags: the run owns the process)
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    # NHWC activations: oneDNN's CPU convolutions and pooling run faster in that layout;
    # on CUDA it measured no different (ANCHORS.md), so the plain layout stays there.
    fast = {"precision": cfg.precision, "mean": mean, "std": std, "channels_last": device.type == "cpu"}
    train_loss = None
    if cfg.label_smoothing > 0:  # training loss only: validation reports plain cross-entropy
        train_loss = functools.partial(cross_entropy_per_example, label_smoothing=cfg.label_smoothing)
    train_step = make_train_step(model, train_loss, tx, compile=use_compile, **fast)
    eval_step = make_eval_step(model, compile=use_compile is True, **fast)

    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at epochs >= start_epoch left by an earlier attempt (one that died
        # after logging an epoch but before its last.safetensors) are dropped, not shown twice
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch)

    n = len(train.labels)
    bs = cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    # a resumed run that trains nothing still reports the history it continues
    history: list[dict[str, Any]] = next(
        (list(cb_states[cb.name]["history"]) for cb in callbacks if isinstance(cb, cbs.TrainingMonitor)), []
    )
    best: dict[str, Any] | None = None
    stop_reason = "completed"
    epochs_run = 0

    def meta(epoch_done: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        m = {
            "epoch": epoch_done,
            "config": cfg.to_dict(),
            "callbacks": cb_states,
            "model": cfg.model,
            "lr": lr_host,
        }
        if extra:
            m["in_epoch"] = extra
        return m

    def save_last(epoch_done: int, extra: dict[str, Any] | None = None) -> Path:
        path = ckpt_dir / LAST
        checkpoint.save_state(path, st, metadata=meta(epoch_done, extra))
        log.info(f"saved {path} (step {int(st.step)})")
        return path

    def weights_meta(epoch: int, action: Any) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "monitor": action.monitor,
            "value": action.value,
            "model": cfg.model,
            "config": cfg.to_dict(),
        }

    def carry_out(actions: list[Any], epoch: int, finite: bool) -> str | None:
        """Apply actions in list order, except hyperparameters first and Stop last.

        Returns a stop reason or None. List order matters: ModelCheckpoint saves a newcomer
        before deleting the file it evicts and writes "last" after everything else, so a
        crash in between never loses a kept file nor records an unwritten one. Hyperparameters
        go first so that a checkpoint written for this event holds the lr its callback states
        already record.
        """
        nonlocal st, best, history, lr_host
        reason = None
        order = {cbs.SetHyperparam: 0, cbs.Stop: 2}
        for a in sorted(actions, key=lambda a: order.get(type(a), 1)):  # stable: list order kept
            if isinstance(a, cbs.SetHyperparam):
                st = st.replace(opt_state=optim.set_hyperparam(st.opt_state, a.name, a.value))
                if a.name == "lr":
                    lr_host = float(a.value)
            elif isinstance(a, cbs.LogMessage):
                log.info(a.text)
            elif isinstance(a, cbs.LogScalars) and writer is not None:
                for tag, value in a.scalars.items():
                    writer.add_scalar(tag, value, a.step)
                writer.flush()
            elif isinstance(a, cbs.WriteHistory):
                history = [dict(r) for r in a.records]
                _write_json(out / "history.json", history)
            elif isinstance(a, cbs.PlotHistory):
                _plot(a.records, out)
            elif isinstance(a, cbs.SaveCheckpoint):
                if not finite:
                    log.warning(
                        f"not saving {a.kind} checkpoint for epoch {epoch}: parameters are not finite"
                    )
                elif a.kind == "last":
                    save_last(epoch)
                else:
                    name = BEST if a.kind == "best" else f"epoch-{a.epoch:03d}.safetensors"
                    checkpoint.save_weights(ckpt_dir / name, st.params, metadata=weights_meta(a.epoch, a))
                    if a.kind == "best":
                        best = {
                            "epoch": a.epoch,
                            "monitor": a.monitor,
                            "value": a.value,
                            "path": str(ckpt_dir / name),
                        }
                    log.info(f"saved {ckpt_dir / name} ({a.monitor} {a.value})")
            elif isinstance(a, cbs.DeleteCheckpoint):
                (ckpt_dir / f"epoch-{a.epoch:03d}.safetensors").unlink(missing_ok=True)
            elif isinstance(a, cbs.Stop):
                reason = a.reason
        return reason

    def dispatch(event: Any) -> list[Any]:
        nonlocal cb_states
        cb_states, actions = cbs.dispatch(callbacks, cb_states, event)
        return actions

    with _signals_to_flag() as flag:
        # Handlers go in before TrainBegin logs "training epochs": from that line on, a
        # signal is always honoured after the current step.
        stop_reason_begin = carry_out(
            dispatch(cbs.TrainBegin(start_epoch=start_epoch, total_epochs=cfg.epochs)), 0, True
        )
        if stop_reason_begin:
            stop_reason = stop_reason_begin
        epoch = start_epoch
        while epoch <= cfg.epochs and stop_reason == "completed":
            order = data.batch_order(n, cfg.seed, epoch).to(device)
            first_batch = 0
            zero = torch.zeros((), device=device)
            acc = {"loss_sum": zero, "correct": zero.long(), "count": zero.long()}
            first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            elapsed_before = 0.0
            if in_epoch and int(in_epoch["epoch"]) == epoch:
                _check_same_batches(in_epoch, n=n, batch_size=bs, seed=cfg.seed)
                first_batch = int(in_epoch["batch"])
                acc = {k: torch.tensor(in_epoch[k], dtype=v.dtype, device=device) for k, v in acc.items()}
                first_bad = torch.tensor(int(in_epoch["first_bad"]), dtype=torch.int64, device=device)
                elapsed_before = float(in_epoch["elapsed"])
            in_epoch = None
            lr_now = lr_host
            t0 = time.perf_counter()
            bar = _progress(cfg, epoch, steps_per_epoch, first_batch)
            host_step = int(st.step)  # mirrors st.step on the host, so checking it costs no sync
            for b in range(first_batch, steps_per_epoch):
                idx = order[b * bs : (b + 1) * bs]
                st, m = train_step(st, (train.images[idx], train.labels[idx]))
                acc = {k: acc[k] + m[k] for k in acc}
                # first step whose loss was not finite, tracked on the device (no sync)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(m["loss_sum"]), st.step, first_bad)
                bar.update(1)
                host_step += 1
                cut = max_steps is not None and host_step >= max_steps
                if flag["signum"] is not None or cut:
                    bar.close()
                    bad_step = int(first_bad)
                    extra = {
                        "epoch": epoch,
                        "batch": b + 1,
                        "batching": {"n": n, "batch_size": bs, "seed": cfg.seed},
                        **{k: v.item() for k, v in acc.items()},
                        "first_bad": bad_step,
                        "elapsed": elapsed_before + time.perf_counter() - t0,
                    }
                    saved = True
                    if bad_step >= 0 or not all(bool(torch.isfinite(p).all()) for p in st.params.values()):
                        # never replace the last good resume point with a diverged state
                        path, saved = ckpt_dir / LAST, False
                        where = f"at step {bad_step} " if bad_step >= 0 else ""
                        log.error(
                            f"training became non-finite {where}(epoch {epoch}); "
                            f"not saving, {path} keeps the state from before it"
                        )
                    else:
                        path = save_last(epoch - 1, extra)
                    if cut:
                        stop_reason = f"max_steps {max_steps} reached"
                        break
                    log.info(f"interrupted: resume with --resume auto --out {out} (or --resume {path})")
                    if writer is not None:
                        writer.close()
                    raise Interrupted(flag["signum"], path, saved=saved)
            else:
                bar.close()
                loss_sum, correct, count, bad = (
                    acc["loss_sum"].double(),
                    acc["correct"].double(),
                    acc["count"].double(),
                    first_bad.double(),
                )
                loss_sum, correct, count, bad = torch.stack(
                    [loss_sum, correct, count, bad]
                ).tolist()  # one sync
                train_time = elapsed_before + time.perf_counter() - t0
                finite = bad < 0 and all(bool(torch.isfinite(p).all()) for p in st.params.values())
                metrics = {
                    "train_loss": loss_sum / count,
                    "train_acc": correct / count,
                    **evaluate(eval_step, st.params, val, cfg.eval_batch_size),
                    "lr": lr_now,
                    "epoch_time_s": train_time,
                }
                if bad >= 0:
                    metrics["first_nonfinite_step"] = int(bad)
                    log.error(f"loss became non-finite at step {int(bad)} (epoch {epoch}); stopping")
                reason = carry_out(dispatch(cbs.EpochEnd(epoch=epoch, metrics=metrics)), epoch, finite)
                epochs_run += 1
                if bad >= 0:  # this reason names the step; TerminateOnNaN's names only the epoch
                    reason = f"non-finite loss at step {int(bad)} (epoch {epoch})"
                elif not finite and reason is None:
                    reason = "non-finite parameters"
                if reason:
                    stop_reason = reason
                    log.info(f"stopping: {reason}")
                epoch += 1
                continue
            break  # max_steps cut

    carry_out(dispatch(cbs.TrainEnd(epoch=epoch - 1, reason=stop_reason)), epoch - 1, True)
    if writer is not None:
        writer.close()
    return FitResult(st, history, epochs_run, stop_reason, out, best)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(cfg: Config, epoch: int, total: int, initial: int) -> Any:
    if not cfg.progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch}/{cfg.epochs}",
        leave=False,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )


def main(cfg: Config, *, resume: str | None = None, overwrite: bool = False) -> int:
    """Run `fit` for the CLI: user-facing failures become one line and exit code 2."""
    try:
        result = fit(cfg, resume=resume, overwrite=overwrite)
    except Interrupted as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return exc.code
    except (RunError, data.DataError, checkpoint.CheckpointError, ConfigError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    tail = (
        f"; best {result.best['monitor']} {result.best['value']:.4f} at epoch {result.best['epoch']}"
        if result.best
        else ""
    )
    print(f"done: {result.epochs_run} epoch(s), {result.stop_reason}{tail}; run directory {result.out_dir}")
    return 0
