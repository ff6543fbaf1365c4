"""The command line's private training: the config's `dp_` keys turned into Poisson batches,
the step's per-example stage, the accountant `fit` reports epsilon with, and the record every
weights file keeps (`metadata["privacy"]`)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_func import checkpoint, data, distributed, privacy
from fashion_func.cli.config import DP_MAX_GRAD_NORM, Config, is_private, parse_sweep
from fashion_func.loop import RunError

__all__: list[str] = []

DEFAULT_MAX_GRAD_NORM = DP_MAX_GRAD_NORM


@dataclass(frozen=True)
class Plan:
    """One private run's numbers: per member of a sweep where they differ (`max_norm`,
    `noise_multiplier` have one entry per member, or one for all)."""

    sample_rate: float
    max_norm: tuple[float, ...]
    noise_multiplier: tuple[float, ...]
    delta: float
    kind: str  # the accountant: rdp or prv
    target_epsilon: float | None
    steps_per_epoch: int

    def batches(self, train: data.Split, seed: int, group: distributed.Group | None) -> data.PoissonBatches:
        """The Poisson batches, padded to a size every rank's slice divides."""
        size = data.poisson_capacity(len(train.labels), self.sample_rate)
        ranks = group.size if group is not None else 1
        return data.PoissonBatches(
            train, self.sample_rate, seed=seed, physical_batch_size=-(-size // ranks) * ranks
        )

    def per_example(self, n_train: int) -> privacy.ClipAndNoise:
        """The step's clip-and-noise stage (one value per member where they differ)."""
        return privacy.clip_and_noise(
            _one_or_each(self.max_norm), _one_or_each(self.noise_multiplier),
            expected_batch_size=self.sample_rate * n_train,
        )  # fmt: skip

    def accountant(self) -> privacy.Accountant:
        """What `fit` computes epsilon with after each epoch (and stops before the target)."""
        sigmas = self.noise_multiplier  # a tuple per member: the accountant reports each
        sigma = sigmas[0] if len(sigmas) == 1 else sigmas
        return privacy.Accountant(self.sample_rate, sigma, self.delta, target_epsilon=self.target_epsilon,
                                  accountant=self.kind)  # fmt: skip

    def record(self) -> dict[str, Any]:
        """What the run's files record (`fit` adds epsilon and the steps taken)."""
        return {
            "max_grad_norm": _one_or_each(self.max_norm),
            "noise_multiplier": _one_or_each(self.noise_multiplier),
            "sample_rate": self.sample_rate, "delta": self.delta, "accountant": self.kind,
            "target_epsilon": self.target_epsilon, "sampling": "poisson",
        }  # fmt: skip


def _one_or_each(values: tuple[float, ...]) -> float | list[float]:
    """One value for all members, or a list of one per member of a sweep."""
    return values[0] if len(values) == 1 else list(values)


def optimizer_grid(cfg: Config) -> list[dict[str, float]] | None:
    """A sweep's members' optimizer hyperparameters (its `dp_` values go to the step instead)."""
    if not cfg.sweep:
        return None
    return [{k: v for k, v in member.items() if not k.startswith("dp_")} for member in parse_sweep(cfg.sweep)]


def _per_member(cfg: Config, name: str, value: float) -> tuple[float, ...]:
    grid = parse_sweep(cfg.sweep) if cfg.sweep else []
    if grid and name in grid[0]:
        return tuple(float(m[name]) for m in grid)
    return (float(value),)


def plan(cfg: Config, n_train: int, resumed: Path | None = None) -> Plan | None:
    """The private run `cfg` asks for on `n_train` examples, or None when it is not private.

    The sampling rate is `batch_size / n_train`, one epoch `round(1 / rate)` steps. With a
    target epsilon the noise multiplier is chosen for `epochs` epochs, once: a resumed run
    keeps the one its checkpoint `resumed` records (`metadata["privacy"]`).
    """
    if not is_private(cfg.to_dict()):
        return None
    if importlib.util.find_spec("opacus") is None:
        raise RunError(f"private training needs Opacus's accountants: {privacy.PrivacyUnavailable()}")
    if not cfg.dp_delta < 1 / n_train:  # delta >= 1/N would allow publishing one example outright
        raise RunError(f"--dp-delta {cfg.dp_delta} must be below 1/N = {1 / n_train:.3g} "
                       f"(N = {n_train} training examples)")  # fmt: skip
    if cfg.batch_size > n_train:
        raise RunError(f"--batch-size {cfg.batch_size} is the expected Poisson batch: at most the "
                       f"{n_train} training examples")  # fmt: skip
    saved = checkpoint.read_metadata(resumed).get("privacy") if resumed is not None else None
    rate = cfg.batch_size / n_train
    steps = max(1, round(1 / rate))
    sigma = cfg.dp_noise_multiplier
    if isinstance(saved, dict) and isinstance(saved.get("noise_multiplier"), (int, float)):
        sigma = float(saved["noise_multiplier"])  # the resumed run's, chosen for its target
    elif sigma is None and cfg.dp_target_epsilon is not None:
        sigma = privacy.noise_multiplier_for(
            cfg.dp_target_epsilon, delta=cfg.dp_delta, sample_rate=rate, steps=cfg.epochs * steps,
            accountant=cfg.dp_accountant,
        )  # fmt: skip
    norm = cfg.dp_max_grad_norm if cfg.dp_max_grad_norm is not None else DEFAULT_MAX_GRAD_NORM
    sigmas = _per_member(cfg, "dp_noise_multiplier", sigma if sigma is not None else math.nan)
    return Plan(rate, _per_member(cfg, "dp_max_grad_norm", norm), sigmas, cfg.dp_delta, cfg.dp_accountant,
                cfg.dp_target_epsilon, steps)  # fmt: skip
