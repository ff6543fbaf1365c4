"""`fashion-func speedrun` / `scripts/speedrun.py`: train a recipe N times and report its test
accuracy as mean ± std, and its time.

    python scripts/speedrun.py --runs 10                     # --preset speedrun (a GPU recipe)
    python scripts/speedrun.py --runs 2 --preset quality     # any preset, and any train.py flag

Measured the way airbench reports CIFAR-10: a warm-up run builds and compiles the steps (its time
reported apart); then run k trains from seed `--seed + k` (its own init, batch order and augmentation)
and is measured once, at the end, on the test set, outside its training time. Nothing is written to
disk; `--val-split N` images are left out of training and not used. Exit 2 with one line on a usage
error: a bad flag, a run too large for the device's memory (`cli.budget`), seeds beyond 2**63 - 1, or
`--device cuda` (the speedrun and best presets') without CUDA: never moved to the CPU behind the
user's back (pass `--device cpu` or `auto`). A run whose loss or test measurement is not finite is
diverged: left out of the mean and std, exit status 3; `--json` is strict JSON (null, never NaN).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from fashion_func import data
from fashion_func.cli import app, budget, words
from fashion_func.cli import args as cli
from fashion_func.cli import device as device_lib
from fashion_func.cli.config import MAX_SEED, Config, ConfigError
from fashion_func.cli.train import parse_train_args
from fashion_func.loop import RunError, evaluate, fit
from fashion_func.safeio import strict_json


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="speedrun.py",
        description="Train a preset N times; print test accuracy mean ± std and the training time.",
        epilog="Every other flag is train.py's (e.g. --epochs, --width, --lr, --device).",
    )
    p.add_argument("--runs", type=cli.int_arg, default=10, help="timed runs, seeds --seed .. --seed + N - 1")
    p.add_argument("--preset", default="speedrun", help="the recipe (default speedrun)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recipe:
    """The objects of one config, built once: data, model, optimizer and compiled steps."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        try:
            self.device = device_lib.resolve_device(cfg.device)
        except RunError as exc:
            raise cli.UsageError(f"{exc}; pass --device cpu (or auto) to run this recipe here") from None
        budget.check(cfg, self.device)  # before the data and the model take any memory
        device_lib.configure(self.device, cfg.precision)
        train = data.load("train", cfg.data_dir, device=self.device, limit=cfg.limit_train)
        cut = len(train.labels) - cfg.val_split
        if cut <= 0:
            raise cli.UsageError(
                f"--val-split {cfg.val_split} leaves no training images "
                f"(the train split has {len(train.labels)})"
            )
        if cut < cfg.batch_size:  # drop_last below: not one whole batch would be left to train on
            raise cli.UsageError(
                f"{cut} training images (after --val-split {cfg.val_split}) make no whole batch of "
                f"--batch-size {cfg.batch_size}"
            )
        self.train, _ = data.hold_out(train, cfg.val_split)
        self.test = data.load("test", cfg.data_dir, device=self.device, limit=cfg.limit_val)
        # drop_last: every step has one shape, so the compiled step (and its CUDA graphs) is reused
        steps = data.num_batches(len(self.train.labels), cfg.batch_size, drop_last=True)
        self.model, self.tx = app.build_model(cfg), app.build_optimizer(cfg, steps)
        train_step, eval_step = app.build_steps(cfg, self.model, self.tx, self.device)
        self.train_step, self.eval_step = train_step, app.evaluated(cfg, eval_step)

    def run(self, seed: int, *, max_steps: int | None = None) -> dict[str, Any]:
        """Train from `seed` (fresh init) and measure the test set once."""
        cfg = dataclasses.replace(self.cfg, seed=seed)
        st = app.initial_state(cfg, self.model, self.tx, self.device)
        batches = data.EpochBatches(self.train, cfg.batch_size, seed=seed, drop_last=True)
        _sync(self.device)
        t0 = time.perf_counter()
        result = fit(st, self.train_step, batches, epochs=cfg.epochs, max_steps=max_steps, progress=False)
        _sync(self.device)
        train_s = time.perf_counter() - t0
        test = data.batches(self.test, cfg.eval_batch_size, seed=0, epoch=1, shuffle=False)
        metrics = evaluate(self.eval_step, result.state, test)
        steps = int(result.state.step.reshape(-1)[0])
        # a loss that went non-finite in training (fit stops), or weights that measure as NaN
        finite = all(math.isfinite(metrics[k]) for k in ("val_acc", "val_loss"))
        stop = (
            result.stop_reason if finite or result.diverged else "non-finite test loss of the final weights"
        )
        return {"seed": seed, "train_s": train_s, "test_acc": metrics["val_acc"],
                "test_loss": metrics["val_loss"], "steps": steps, "stop": stop,
                "diverged": result.diverged or not finite}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fashion-func speedrun` and `scripts/speedrun.py`; returns the exit code."""
    try:
        args, rest = _parser().parse_known_args(None if argv is None else list(argv))
        cfg, _ = parse_train_args(["--preset", args.preset, *rest])
        if args.runs < 1:
            raise cli.UsageError(f"--runs must be at least 1, got {args.runs}")
        if cfg.seed + args.runs - 1 > MAX_SEED:  # run k trains from seed + k
            raise cli.UsageError(
                f"--seed {cfg.seed} with --runs {args.runs} runs seeds up to {cfg.seed + args.runs - 1}, "
                f"beyond 2**63 - 1; lower --seed to at most {MAX_SEED - args.runs + 1}"
            )
        recipe = Recipe(cfg)
    except (cli.UsageError, ConfigError, data.DataError) as exc:
        return cli.fail("speedrun.py", words.message(exc))
    t0 = time.perf_counter()
    recipe.run(cfg.seed, max_steps=3)  # compiles the train step (3 steps) and the eval step
    warmup_s = time.perf_counter() - t0
    device_name = torch.cuda.get_device_name(recipe.device) if recipe.device.type == "cuda" else "CPU"
    print(f"{args.preset}: {cfg.model} on {recipe.device} ({device_name}), "
          f"{len(recipe.train.labels)} training images, {cfg.epochs} epochs; "
          f"warm-up/compile {warmup_s:.1f} s", flush=True)  # fmt: skip
    runs = []
    for k in range(args.runs):
        r = recipe.run(cfg.seed + k)
        runs.append(r)
        what = f"diverged ({r['stop']})" if r["diverged"] else f"test_acc {r['test_acc']:.4f}"
        print(f"run {k}: seed {r['seed']} {what} train {r['train_s']:.2f} s", flush=True)  # as it ends
    summary = _summary(runs)
    print(_summary_line(summary, len(runs), warmup_s))
    if args.json:
        print(strict_json({"preset": args.preset, "device": device_name, "warmup_s": warmup_s,
                           "config": cfg.to_dict(), "runs": runs, **summary}))  # fmt: skip
    if summary["diverged"]:
        print(f"speedrun.py: error: {summary['diverged']} of {len(runs)} runs diverged (seeds "
              f"{', '.join(str(r['seed']) for r in runs if r['diverged'])}); exit {app.EXIT_DIVERGED}",
              file=sys.stderr)  # fmt: skip
        return app.EXIT_DIVERGED
    return 0


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean and std of the runs that did not diverge (None when none is left)."""
    live = [r for r in runs if not r["diverged"]]
    accs, times = [r["test_acc"] for r in live], [r["train_s"] for r in live]
    return {
        "test_acc_mean": statistics.mean(accs) if accs else None,
        "test_acc_std": (statistics.stdev(accs) if len(accs) > 1 else 0.0) if accs else None,
        "train_s_mean": statistics.mean(times) if times else None,
        "train_s_max": max(times) if times else None,
        "diverged": len(runs) - len(live),
    }


def _summary_line(s: dict[str, Any], n: int, warmup_s: float) -> str:
    gone = f" ({s['diverged']} diverged, left out)" if s["diverged"] else ""
    if s["test_acc_mean"] is None:
        return f"test_acc n/a: all {n} runs diverged; warm-up {warmup_s:.1f} s"
    live = n - s["diverged"]
    return (f"test_acc {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} over {live} runs{gone}; "
            f"train {s['train_s_mean']:.2f} s per run (max {s['train_s_max']:.2f}); "
            f"warm-up {warmup_s:.1f} s")  # fmt: skip
