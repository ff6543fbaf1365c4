"""The command line's training job: a `Config` turned into library objects, then `fit`.

`train(cfg)` builds the data, the model and its state, the optimizer, the compiled steps and
the callbacks, opens the run directory, resumes when asked and hands everything to `fit`: one
client of the library; research code builds the same objects itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion_func import callbacks as cbs
from fashion_func import checkpoint, data, distributed, ensemble, losses, models, optim, privacy, schedules
from fashion_func import preprocess as preprocess_lib
from fashion_func import state as state_lib
from fashion_func.augment import Augment
from fashion_func.cli import budget, launch, private, words
from fashion_func.cli import device as device_lib
from fashion_func.cli.config import KEYS, REFUSED, SWEEPABLE, Config, ConfigError
from fashion_func.cli.summary import summary
from fashion_func.loop import FitResult, Interrupted, ResumePoint, RunError, StopReason, evaluate, fit
from fashion_func.loop import resume as resume_lib
from fashion_func.loop.resume import RunRecord
from fashion_func.safeio import display
from fashion_func.scattering import ScatteringUnavailable, describe, features, privacy_note
from fashion_func.step import NormalizeImages, make_eval_step, make_train_step

__all__ = ["train"]

EXIT_DIVERGED = 3  # a run stopped by a non-finite loss: a script or scheduler must see it failed


@dataclasses.dataclass(frozen=True)
class TrainResult(FitResult):
    """`fit`'s result, with the held-out test set's measurement at the end (`--val-split`):
    test.json's report, or None when none was made."""

    test: dict[str, Any] | None = None


def build_optimizer(cfg: Config, steps_per_epoch: int | None = None) -> optim.GradientTransformation:
    """The optimizer the config names: optional gradient clipping in front; behind it the
    onecycle multiplier (needs `steps_per_epoch`) and the moving average of the weights."""
    if cfg.optimizer == "adam":
        tx = optim.adam(cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        tx = optim.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    else:
        tx = optim.sgd(cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    parts = [tx]
    if cfg.clip_norm is not None:
        parts.insert(0, optim.clip_by_global_norm(cfg.clip_norm))
    schedule = lr_schedule(cfg, steps_per_epoch)
    if schedule is not None:
        parts.append(optim.scale_by_schedule(schedule))
    if cfg.ema is not None:
        parts.append(optim.ema(cfg.ema))
    # one transform stays unwrapped: the state's layout (and old checkpoints) unchanged
    return parts[0] if len(parts) == 1 else optim.chain(*parts)


def lr_schedule(cfg: Config, steps_per_epoch: int | None) -> Any:
    """The per-step lr multiplier the config asks for (onecycle's triangle), or None."""
    if cfg.lr_schedule != "onecycle":
        return None
    if steps_per_epoch is None:
        raise ValueError("--lr-schedule onecycle needs the number of steps per epoch")
    total = max(1, cfg.epochs * steps_per_epoch)
    # a warm-up of nearly every epoch can round up to every step: the peak comes at the last
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return schedules.triangle(total, warmup)


def build_model(cfg: Config) -> models.Model:
    """The model the config names, with its width and (dpcnn) group count when given."""
    hparams = {k: getattr(cfg, k) for k in ("width", "groups") if getattr(cfg, k) is not None}
    return models.get(cfg.model, **hparams)


def ema_view(state: state_lib.TrainState) -> state_lib.TrainState:
    """`state` with the moving average of the weights (`optim.ema`) as its params."""
    return state.replace(params=optim.ema_params(state.opt_state))


def _ema_weights(state: state_lib.TrainState) -> dict[str, torch.Tensor]:
    # best.safetensors holds what is evaluated: the averaged weights and the buffers
    return {**optim.ema_params(state.opt_state), **state.model_state}


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
                monitor=_watched(cfg),
                mode=cfg.mode,
                factor=cfg.lr_gamma,
                patience=max(1, (cfg.patience or 4) // 2),
                base_lr=cfg.lr,
            )
        )
    keep = {k: getattr(cfg, k) for k in ("mode", "save_best_only", "every_n_epochs", "save_top_k")}
    if not _stacked(cfg):
        out.append(cbs.ModelCheckpoint(monitor=cfg.monitor, save_last=True, **keep))
    else:  # each member's weights kept by its own metric, as plain single-model files
        out += [
            cbs.ModelCheckpoint(
                monitor=f"{cfg.monitor}_m{k}", save_last=False, member=k, name=f"ModelCheckpoint_m{k}", **keep
            )
            for k in range(cfg.members)
        ]
    if cfg.patience is not None:
        monitor = _watched(cfg)
        out.append(
            cbs.EarlyStopping(monitor=monitor, mode=cfg.mode, patience=cfg.patience, min_delta=cfg.min_delta)
        )
    return out


def _watched(cfg: Config) -> str:
    """The metric early stopping and the plateau schedule watch: an ensemble's own; a sweep's
    members are no ensemble, so their mean."""
    return f"{cfg.monitor}_mean" if cfg.sweep else cfg.monitor


def _stacked(cfg: Config) -> bool:
    """Whether the run trains a stack of members (an ensemble or a sweep) in one step."""
    return cfg.ensemble > 1 or cfg.sweep is not None


def _preprocess(cfg: Config) -> NormalizeImages:
    if cfg.normalize == "dataset":
        return NormalizeImages(preprocess_lib.MEAN, preprocess_lib.STD)
    return NormalizeImages(preprocess_lib.TUTORIAL_MEAN, preprocess_lib.TUTORIAL_STD)


def _train_preprocess(cfg: Config) -> NormalizeImages | Augment:
    """The train step's preprocess: the normalisation, behind the augmentation when asked."""
    pre = _preprocess(cfg)
    if cfg.crop_padding or cfg.flip or cfg.cutout:
        return Augment(pre, crop_padding=cfg.crop_padding, flip=cfg.flip, cutout=cfg.cutout)
    return pre


def initial_state(cfg: Config, model: models.Model, tx: Any, device: torch.device) -> state_lib.TrainState:
    """The state at step 0: `cfg.seed`'s init, or an ensemble's / sweep's stacked members."""
    if _stacked(cfg):  # a sweep's members share one init: only the hyperparameters differ
        grid = private.optimizer_grid(cfg)
        return ensemble.init(
            model,
            tx,
            members=cfg.members,
            seed=cfg.seed,
            hyperparams=grid,
            same_init=grid is not None,
            device=device,
        )
    params = model.init(torch.Generator().manual_seed(cfg.seed), device=device)
    return state_lib.create(params, tx, seed=cfg.seed, model_state=model.init_state(device=device))


def _given_again(cfg: Config, point: ResumePoint, callbacks: list[Any], log: Any) -> ResumePoint:
    """`point` with each optimizer hyperparameter the config changes written into its state
    (`Key.hyper`: lr, weight_decay, momentum, clip_norm, ema), so config.json records what runs.
    A hyperparameter the state has no part for (adam's momentum) does nothing, as in a new run."""
    saved = point.record.settings.get("config")
    saved = saved if isinstance(saved, dict) else {}
    held = optim.hyperparams(point.state.opt_state)
    for name, key in KEYS.items():
        old, new = saved.get(name), getattr(cfg, name)
        if key.hyper is None or old is None or new == old or key.hyper not in held:
            continue
        if name == "lr":
            # the plateau schedule this app built keeps its lr in its state: it restarts from the new one
            plateaus = {cb.name for cb in callbacks if isinstance(cb, cbs.ReduceLROnPlateau)}
            states = {
                n: {**s, "lr": cbs.encode_float(new)} if n in plateaus else s
                for n, s in point.cb_states.items()
            }
            point = point.replace_lr(new, states)
        else:
            opt_state = optim.set_hyperparam(point.state.opt_state, key.hyper, new)
            point = dataclasses.replace(point, state=point.state.replace(opt_state=opt_state))
        log.info(f"{name} set to {new} (the checkpoint's run used {old})")
    return point


def _compared(values: Mapping[str, Any], record: RunRecord) -> RunRecord:
    """`record` with the settings of `values` (a config's, as config.json holds them) that
    `resume.compatible` compares, each as `config.KEYS` says: held fixed, deciding the members,
    giving the optimizer state a part; and the batch size (a private run's sampling rate)."""
    keys = {n: KEYS[n] for n in values if n in KEYS}
    held = {n: k.as_run(values[n]) for n, k in keys.items() if k.resume == REFUSED}
    return dataclasses.replace(
        record,
        held={n: v for n, v in held.items() if not keys[n].members},
        members={n: v for n, v in held.items() if keys[n].members},
        parts={n: (values[n], k.part(values)) for n, k in keys.items() if k.part is not None},
        batch_size=values.get("batch_size"),
    )


def _resumable(cfg: Config, path: Path) -> RunRecord:
    """The run record in checkpoint `path`'s header, refused (`resume.compatible`'s first
    problem) where that run cannot continue as `cfg` sets it up: another model, a setting it
    holds fixed, other members, an optimizer part added or removed, a private run's batch size."""
    saved = resume_lib.read_record(path)
    config = saved.settings.get("config")
    was = _compared(config if isinstance(config, dict) else {}, saved)
    now = _compared(cfg.to_dict(), RunRecord({"model": cfg.model}))
    resume_lib.refuse(path, resume_lib.compatible(was, now))
    return saved


def split_identity(train: data.Split, val: data.Split, test: data.Split | None) -> dict[str, Any]:
    """Which images a run trains on, selects its model on and tests on: the counts, and a
    digest of the indices into the dataset's train and test files of each part (the first N
    train images, the held-out last `--val-split` of them, the first N test images)."""
    n_train, n_val = len(train.labels), len(val.labels)
    if test is None:  # validation on the test set
        parts = {"train": (0, n_train), "held_out": (n_train, n_train), "test": (0, n_val)}
    else:
        parts = {"train": (0, n_train), "held_out": (n_train, n_train + n_val), "test": (0, len(test.labels))}
    digest = hashlib.sha256()
    for name, (lo, hi) in parts.items():
        digest.update(name.encode() + b"\0" + np.arange(lo, hi, dtype="<i8").tobytes())
    counts = {name: hi - lo for name, (lo, hi) in parts.items()}
    return {**counts, "digest": digest.hexdigest()[:16]}


def build_steps(
    cfg: Config,
    model: models.Model,
    tx: Any,
    device: torch.device,
    group: distributed.Group | None = None,
    per_example: privacy.ClipAndNoise | None = None,
) -> tuple[Any, Any]:
    """(train_step, eval_step) as the config says: the augmentation in the train step, flip
    averaging in the eval step (which evaluates the params it is given: see `evaluated`);
    private training's per-example stage (the ranks' clipped sums are added, not averaged)."""
    use_compile = device_lib.resolve_compile(cfg.compile, device)
    fixed = model.takes_features  # its inputs: features computed once (`_features`)
    pre = None if fixed else _preprocess(cfg)
    train_loss = None
    if cfg.label_smoothing > 0:  # training loss only: validation reports plain cross-entropy
        train_loss = functools.partial(losses.cross_entropy_per_example, label_smoothing=cfg.label_smoothing)
    make_train, make_eval = (
        (ensemble.make_train_step, ensemble.make_eval_step)
        if _stacked(cfg)
        else (make_train_step, make_eval_step)
    )
    train_step = make_train(
        model,
        tx,
        loss=train_loss,
        preprocess=None if fixed else _train_preprocess(cfg),
        precision=cfg.precision,
        compile=use_compile,
        topk=cfg.topk,
        reduce_grads=_reduce_grads(group, per_example),
        per_example=per_example,
    )
    eval_step = make_eval(
        model,
        preprocess=pre,
        precision=cfg.precision,
        compile=use_compile,
        topk=cfg.topk,
        tta=cfg.tta,
    )
    return train_step, eval_step


def _private_line(dp: private.Plan, poisson: data.PoissonBatches) -> str:
    sigma = ", ".join(f"{s:.4g}" for s in dp.noise_multiplier)
    norm = ", ".join(f"{c:.4g}" for c in dp.max_norm)
    target = f", target epsilon {dp.target_epsilon}" if dp.target_epsilon is not None else ""
    return (f"private training (DP-SGD): Poisson sampling rate {dp.sample_rate:.4g} "
            f"({poisson.expected_batch_size:.0f} examples expected, batches padded to {poisson.size}), "
            f"{dp.steps_per_epoch} steps per epoch, max grad norm {norm}, noise multiplier {sigma}, "
            f"delta {dp.delta:g}, accountant {dp.kind}{target}")  # fmt: skip


def _reduce_grads(group: distributed.Group | None, per_example: Any) -> Any:
    if group is None:
        return None
    return group.all_reduce_sum if per_example is not None else group.all_reduce_mean


def evaluated(cfg: Config, eval_step: Any) -> Any:
    """The eval step fit runs: on the moving average of the weights when there is one."""
    if cfg.ema is None:
        return eval_step

    def on_ema(state: state_lib.TrainState, batch: Any) -> Any:
        return eval_step(ema_view(state), batch)

    return on_ema


def _batches(
    cfg: Config,
    train: data.Split,
    val: data.Split,
    group: distributed.Group | None,
    log: Any,
    dp: private.Plan | None = None,
) -> tuple[Any, Any]:
    """The train and validation batches this process runs: with a group, its slice of every
    global train batch (the same order for any number of processes) and its contiguous part
    of the validation set (the sums are added over the ranks). Private training samples its
    train batches by Poisson sampling (`dp.batches`)."""
    n = len(train.labels)
    drop_last = False
    if dp is not None:
        train_data: Any = dp.batches(train, cfg.seed, group)
        log.info(_private_line(dp, train_data))
    elif group is not None and n % cfg.batch_size % group.size:
        drop_last = True  # the short last batch cannot split evenly: leave it out, say so
        log.warning(f"the last batch of each epoch ({n % cfg.batch_size} examples) does not split "
                    f"over {group.size} processes; it is left out")  # fmt: skip
    if dp is None:
        train_data = data.EpochBatches(train, cfg.batch_size, seed=cfg.seed, drop_last=drop_last)
    if group is None:
        return train_data, data.EpochBatches(val, cfg.eval_batch_size, shuffle=False)
    if len(val.labels) < group.size:
        raise RunError(f"--limit-val {len(val.labels)} leaves some of the {group.size} processes nothing")
    lo, hi = distributed.shard_range(len(val.labels), group.rank, group.size)
    part = data.Split(val.images[lo:hi], val.labels[lo:hi], val.source)
    val_data = data.EpochBatches(part, cfg.eval_batch_size, shuffle=False)
    return distributed.ShardedBatches(train_data, group), val_data


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
    max_steps: int | None = None,
    group: distributed.Group | None = None,
) -> TrainResult:
    """Train as `cfg` says, writing its run directory; returns the final state and history.
    resume: None, "auto" (continue `<out>/checkpoints/last.safetensors` if present) or a path.
    callbacks: replace the config's. max_steps: stop (after saving last.safetensors) at this
    step, as a crash would. group: data parallel under torchrun (`launch.process_group`)."""
    device = group.device if group is not None else device_lib.resolve_device(cfg.device)
    if group is None:  # before anything is allocated or written: caps, then the estimate
        budget.check(cfg, device)
    with launch.open_run(cfg.out_dir, resume=resume, overwrite=overwrite, group=group) as run:
        if group is not None:  # here a refusal on one rank is announced to the others
            budget.check(cfg, device)
        from_path = resume_lib.resume_path(run.path, resume)
        saved = _resumable(cfg, from_path) if from_path is not None else None
        model = build_model(cfg)
        train_split, val_split, test_split = _features(cfg, model, run.log, *_splits(cfg, device))
        n_train = len(train_split.labels)
        dp = private.plan(cfg, n_train, from_path, saved)
        steps_per_epoch = dp.steps_per_epoch if dp else data.num_batches(n_train, cfg.batch_size)
        tx = build_optimizer(cfg, steps_per_epoch)
        _refuse_under_group(cfg, model, group)
        st = initial_state(cfg, model, tx, device)
        callbacks = build_callbacks(cfg) if callbacks is None else callbacks
        run.log.info(f"seed {cfg.seed}, device {device}, data {train_split.source}")
        if _stacked(cfg):
            run.log.info(_members_line(cfg))
        run.log.info(_sizes_line(train_split, val_split, test_split))
        point = None
        metadata = {**_metadata(cfg, model, dp), "splits": split_identity(train_split, val_split, test_split)}
        if from_path is not None:  # its images and privacy record too, before anything is written
            now = RunRecord(splits=metadata["splits"], privacy=metadata.get("privacy"))
            point = resume_lib.load(from_path, st, callbacks, now)
            point = _given_again(cfg, point, callbacks, run.log)
        elif resume == "auto":
            run.log.info(f"no checkpoint in {run.checkpoints}; starting fresh")
        run.write_json("config.json", cfg.to_dict())
        _write_summary(cfg, run, model, st)
        device_lib.configure(device, cfg.precision)
        if warning := device_lib.precision_warning(device, cfg.precision):
            run.log.warning(warning)
        train_data, val_data = _batches(cfg, train_split, val_split, group, run.log, dp)
        per_example = dp.per_example(n_train) if dp else None
        train_step, plain_eval = build_steps(cfg, model, tx, device, group, per_example)
        eval_step = evaluated(cfg, plain_eval)
        run.ready(int(point.state.step.reshape(-1)[0]) if point else 0, cfg.to_dict())
        result = fit(
            st,
            train_step,
            train_data,
            epochs=cfg.epochs,
            eval_step=eval_step,
            val_data=val_data,
            callbacks=callbacks,
            weights=_ema_weights if cfg.ema is not None else None,
            run_dir=run.run_dir,
            log=run.log,
            group=group,
            resume=point,
            metadata=metadata,
            max_steps=max_steps,
            progress=cfg.progress,
            lr_schedule=lr_schedule(cfg, steps_per_epoch),
            privacy=dp.accountant() if dp else None,
        )
        if _stacked(cfg):
            _write_members_table(cfg, result, run)
        # a run cut by max_steps is not finished: its test measurement waits for the resumed run
        if test_split is None or result.diverged or result.stop is StopReason.MAX_STEPS:
            return TrainResult(**vars(result))
        test = _final_test(cfg, result, eval_step, plain_eval, test_split, run)
        return TrainResult(**vars(result), test=test)


def _refuse_under_group(cfg: Config, model: models.Model, group: distributed.Group | None) -> None:
    if group is not None and _stacked(cfg):
        raise RunError("--ensemble and --sweep do not run under torchrun yet; train them in one process")
    if group is not None and model.stateful:  # each rank would keep its own statistics
        raise RunError(f"--model {cfg.model} keeps batch-norm statistics, which data parallel "
                       "does not synchronise yet; use a model without batch norm")  # fmt: skip


def _write_summary(cfg: Config, run: launch.RankRun, model: models.Model, st: state_lib.TrainState) -> None:
    """summary.txt, and the same lines in the log (one model: an ensemble's first member)."""
    one = ensemble.member(st, 0) if _stacked(cfg) else st
    text = summary(model, one.params, one.model_state)
    run.write_bytes("summary.txt", text.encode())
    for line in text.rstrip().splitlines():  # the log escapes control characters, newlines too
        run.log.info(line)


def _metadata(cfg: Config, model: models.Model, dp: private.Plan | None = None) -> dict[str, Any]:
    """What every checkpoint and weights file of the run records beside its tensors (a private
    run: its plan too; `fit` adds the epsilon spent)."""
    pre = _preprocess(cfg)
    # the normalisation as numbers: a client in any language can preprocess from them
    # and the model's constructor arguments: a reader builds it without guessing from shapes
    out = {"config": cfg.to_dict(), "model": cfg.model, "model_hparams": model.hparams,
           "normalize_mean": pre.mean, "normalize_std": pre.std}  # fmt: skip
    if model.takes_features:  # no mean or std: fixed features of images / 255
        out = {k: v for k, v in out.items() if not k.startswith("normalize_")}
        out["features"] = describe(model.inputs)
    return {**out, "privacy": {**dp.record(), **_data_statistics(cfg, model)}} if dp is not None else out


def _data_statistics(cfg: Config, model: models.Model) -> dict[str, str]:
    """What a private run records of the training data's statistics its model uses: epsilon
    covers the steps only, so a statistic the model uses is named here (the dataset's mean and
    std are constants computed from the training images without noise)."""
    if model.takes_features:
        return privacy_note(model.inputs)
    pre = _preprocess(cfg)
    if cfg.normalize == "tutorial":  # 0.5 and 0.5: no statistic of the data
        return {"data_statistics": "none", "normalisation": f"(images / 255 - {pre.mean}) / {pre.std}"}
    return {"data_statistics": f"normalize_mean {pre.mean}, normalize_std {pre.std}: the training "
            "images' pixel mean and std, constants not noised and not counted in epsilon"}  # fmt: skip


def _features(cfg: Config, model: models.Model, log: Any, *splits: data.Split | None) -> tuple[Any, ...]:
    """The splits as `model` takes them: for a model of ScatterNet features (`inputs` a
    `scattering.TRANSFORMS` name) each image's features, computed here once for the run (the steps take
    them as they are); the images, for the other models."""
    if not model.takes_features:
        return splits
    if cfg.crop_padding or cfg.flip or cfg.cutout or cfg.tta:
        raise RunError(f"--model {cfg.model} trains on features of the images computed once: --crop-padding, "
                       "--flip, --cutout and --tta, which change the images, do not apply")  # fmt: skip
    start = time.perf_counter()
    try:
        out = tuple(None if s is None else data.Split(features(s.images, model.inputs), s.labels, s.source)
                    for s in splits)  # fmt: skip
    except ScatteringUnavailable as exc:
        raise RunError(str(exc)) from None
    n = sum(len(s.labels) for s in splits if s is not None)
    log.info(f"features of {n} images ({describe(model.inputs)}) in {time.perf_counter() - start:.1f} s")
    return out


def _splits(cfg: Config, device: torch.device) -> tuple[data.Split, data.Split, data.Split | None]:
    """(train, validation, test): the validation set is the test set, as in the tutorial,
    unless `--val-split N` holds out the last N training images; the test set is then kept
    for one measurement at the end."""
    train = data.load("train", cfg.data_dir, device=device, limit=cfg.limit_train)
    test = data.load("test", cfg.data_dir, device=device, limit=cfg.limit_val)
    if not cfg.val_split:
        return train, test, None
    n = len(train.labels)
    if cfg.val_split >= n:
        raise RunError(f"--val-split {cfg.val_split} leaves no training images (the train split has {n})")
    return (*data.hold_out(train, cfg.val_split), test)


def _sizes_line(train: data.Split, val: data.Split, test: data.Split | None) -> str:
    if test is None:
        return f"train {len(train.labels)} examples, validation {len(val.labels)} (test set)"
    return (
        f"train {len(train.labels)} examples, validation {len(val.labels)} (held out of the train "
        f"split), test {len(test.labels)} (measured once, at the end)"
    )


def _final_test(
    cfg: Config, result: FitResult, eval_step: Any, plain_eval: Any, test: data.Split, run: launch.RankRun
) -> dict[str, Any]:
    """The test set measured once, with the weights model selection chose (best.safetensors,
    which holds the averaged weights under --ema), or the final ones where no best file was
    written (an ensemble or sweep: the final ensemble); written to test.json and the log."""
    batches = data.batches(test, cfg.eval_batch_size, seed=0, epoch=1, shuffle=False)
    best = result.best if result.best and result.best.get("path") and not _stacked(cfg) else None
    if best is not None:
        template = {**result.state.params, **result.state.model_state}
        weights, _ = checkpoint.load_weights(best["path"], template=template, device=result.state.step.device)
        chosen = result.state.replace(
            params={k: weights[k] for k in result.state.params},
            model_state={k: weights[k] for k in result.state.model_state},
        )
        metrics, source = evaluate(plain_eval, chosen, batches), f"best weights (epoch {best['epoch']})"
    else:
        dead = result.diverged_members
        live = [k for k in range(cfg.members) if k not in dead] if dead else None
        metrics = evaluate(eval_step, result.state, batches, live=live)
        source = "final weights" + (f" of the {len(live)} members that did not diverge" if live else "")
    out = {k.replace("val_", "test_", 1): v for k, v in metrics.items() if not k.startswith("val_member")}
    report = {"weights": source, "path": best["path"] if best else None, "examples": len(test.labels), **out}
    run.write_json("test.json", report)
    run.log.info(f"test set ({len(test.labels)} images, {source}): "
                 + " ".join(f"{k} {v:.4f}" for k, v in out.items()))  # fmt: skip
    return report


def _members_line(cfg: Config) -> str:
    if cfg.sweep:
        grid = cfg.sweep.members()
        return f"sweep of {len(grid)} members (one init, seed {cfg.seed}): " + "; ".join(
            f"m{k} " + " ".join(f"{n}={v:g}" for n, v in h.items()) for k, h in enumerate(grid)
        )
    seeds = ", ".join(f"m{k} {ensemble.member_seed(cfg.seed, k)}" for k in range(cfg.members))
    return f"ensemble of {cfg.members} members, seeds {seeds}; batch order from seed {cfg.seed}"


def members_table(cfg: Config, result: FitResult) -> list[dict[str, Any]]:
    """One row per member of an ensemble or sweep: its hyperparameters (a sweep) or seed, its
    best `cfg.monitor` with the epoch and the file holding those weights, and whether it
    diverged (`diverged`: null, or the epoch and first non-finite step, -1 for parameters)."""
    grid = cfg.sweep.members() if cfg.sweep else [{} for _ in range(cfg.members)]
    best, dead = result.member_best, result.diverged_members
    rows = []
    for k, hyper in enumerate(grid):
        row: dict[str, Any] = {"member": k, **hyper}
        if not cfg.sweep:
            row["seed"] = ensemble.member_seed(cfg.seed, k)
        b = best.get(k)
        row.update(monitor=cfg.monitor, best=b["value"] if b else None, epoch=b["epoch"] if b else None)
        row["weights"] = b["path"] if b else None
        row["diverged"] = {"epoch": dead[k]["epoch"], "step": dead[k]["step"]} if k in dead else None
        rows.append(row)
    return rows


def _write_members_table(cfg: Config, result: FitResult, run: launch.RankRun) -> None:
    rows = members_table(cfg, result)
    run.write_json("members.json", rows)
    for r in rows:
        what = " ".join(f"{n}={r[n]:g}" for n in SWEEPABLE if n in r) or f"seed {r['seed']}"
        value = "n/a" if r["best"] is None else f"{r['best']:.4f} at epoch {r['epoch']}"
        gone = f"; diverged at epoch {r['diverged']['epoch']}" if r["diverged"] else ""
        run.log.info(f"member {r['member']} ({what}): best {cfg.monitor} {value}{gone}")


def _interrupted(exc: Interrupted, group: distributed.Group | None) -> str:
    if group is None or group.is_main:
        return str(exc)
    name = signal.Signals(exc.signum).name
    return f"rank {group.rank} stopped with the job ({name} on some rank); rank 0 saved the state"


# what gloo and NCCL say when a peer closed its connections (died) or did not answer in time;
# a gloo collective raises a plain RuntimeError, not torch.distributed.DistError
_PEER_FAILURES = ("gloo/transport", "Connection reset", "Connection closed", "Timed out", "timed out", "NCCL")


def _peer_failure(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.distributed.DistError) or any(m in str(exc) for m in _PEER_FAILURES)


def main(cfg: Config, *, resume: str | None = None, overwrite: bool = False, prog: str = "train.py") -> int:
    """Run `train` for the CLI: user-facing failures become one line, starting with `prog` (the
    command's name), and exit code 2."""
    group: distributed.Group | None = None
    try:
        with launch.process_group(cfg.batch_size, cfg.device) as group:
            result = train(cfg, resume=resume, overwrite=overwrite, group=group)
    except Interrupted as exc:
        print(f"{prog}: {_interrupted(exc, group)}", file=sys.stderr)
        return exc.code
    except (RunError, data.DataError, checkpoint.CheckpointError, ConfigError, distributed.WorldError) as exc:
        print(f"{prog}: error: {display(words.message(exc))}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if group is None or not _peer_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"{prog}: error: rank {group.rank} lost the other processes of the job (one died, or did not "
            f"answer within {group.timeout_s:g} s): {first}; the run directory keeps its last checkpoint "
            "(--resume auto)",
            file=sys.stderr,
        )
        return 1
    if group is not None and not group.is_main:
        return 0  # rank 0 reports the run
    best = result.best
    tail = f"; best {best['monitor']} {best['value']:.4f} at epoch {best['epoch']}" if best else ""
    if result.member_best:
        tail += (
            f"; each member's best weights in {result.out_dir}/checkpoints/member-*/, table in members.json"
        )
    dead = result.diverged_members
    if dead and not result.diverged:
        tail += f"; {len(dead)} member(s) diverged and left out ({', '.join(f'm{k}' for k in dead)})"
    if result.test is not None:
        tail += f"; test_acc {result.test['test_acc']:.4f} ({result.test['weights']})"
    done = f"done: {result.epochs_run} epoch(s), {result.stop_reason}{tail}; run directory {result.out_dir}"
    with contextlib.suppress(BrokenPipeError):  # a reader that went away (`| head`) is no error
        print(display(done), flush=True)
    if result.diverged:
        print(
            f"{prog}: error: training diverged ({result.stop_reason}); exit {EXIT_DIVERGED}", file=sys.stderr
        )
        return EXIT_DIVERGED
    return 0
