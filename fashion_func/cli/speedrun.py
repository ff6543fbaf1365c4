"""`fashion-func speedrun` / `scripts/speedrun.py`: train a recipe N times and report its test
accuracy as mean ± std, and its time.

    python scripts/speedrun.py --runs 10                     # --preset speedrun (a GPU recipe)
    python scripts/speedrun.py --runs 2 --preset quality     # any preset, and any train.py flag

Measured the way airbench reports CIFAR-10: the steps are built and compiled once, by a
warm-up run whose time is reported separately; then run k trains from seed `--seed + k` (its
own init, batch order and augmentation) on the training set and is measured once, at the end,
on the test set. Training time excludes that measurement. Nothing is written to disk. With
`--val-split N` the held-out images are left out of training (and not used: a speedrun has no
model selection). Exit 2 with one line on a usage error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from fashion_func import data
from fashion_func.cli import app, words
from fashion_func.cli import args as cli
from fashion_func.cli import device as device_lib
from fashion_func.cli.config import Config, ConfigError
from fashion_func.cli.train import parse_train_args
from fashion_func.loop import evaluate, fit
from fashion_func.safeio import display


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
        self.device = device_lib.resolve_device(cfg.device)
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
        cfg = Config.from_dict({**self.cfg.to_dict(), "seed": seed})
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
        return {"seed": seed, "train_s": train_s, "test_acc": metrics["val_acc"],
                "test_loss": metrics["val_loss"], "steps": steps, "stop": result.stop_reason}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fashion-func speedrun` and `scripts/speedrun.py`; returns the exit code."""
    try:
        args, rest = _parser().parse_known_args(None if argv is None else list(argv))
        cfg, _ = parse_train_args(["--preset", args.preset, *rest])
        if args.runs < 1:
            raise cli.UsageError(f"--runs must be at least 1, got {args.runs}")
        recipe = Recipe(cfg)
    except (cli.UsageError, ConfigError, data.DataError) as exc:
        print(f"speedrun.py: error: {display(words.message(exc))}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    recipe.run(cfg.seed, max_steps=3)  # compiles the train step (3 steps) and the eval step
    warmup_s = time.perf_counter() - t0
    print(f"{args.preset}: {cfg.model} on {recipe.device} ({_device_name(recipe.device)}), "
          f"{len(recipe.train.labels)} training images, {cfg.epochs} epochs; "
          f"warm-up/compile {warmup_s:.1f} s", flush=True)  # fmt: skip
    runs = []
    for k in range(args.runs):
        r = recipe.run(cfg.seed + k)
        runs.append(r)
        print(  # one line per run, as it finishes
            f"run {k}: seed {r['seed']} test_acc {r['test_acc']:.4f} train {r['train_s']:.2f} s", flush=True
        )
    accs, times = [r["test_acc"] for r in runs], [r["train_s"] for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"test_acc {statistics.mean(accs):.4f} ± {std:.4f} over {len(runs)} runs; "
          f"train {statistics.mean(times):.2f} s per run (max {max(times):.2f}); "
          f"warm-up {warmup_s:.1f} s")  # fmt: skip
    if args.json:
        summary = {"preset": args.preset, "device": _device_name(recipe.device), "warmup_s": warmup_s,
                   "config": cfg.to_dict(), "runs": runs, "test_acc_mean": statistics.mean(accs),
                   "test_acc_std": std, "train_s_mean": statistics.mean(times)}  # fmt: skip
        print(json.dumps(summary))
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"
