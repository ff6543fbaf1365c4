"""The command line's private training: the config's `dp_` keys turned into Poisson batches,
the step's per-example stage, the accountant `fit` reports epsilon with, and the record every
weights file keeps (`metadata["privacy"]`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion_func import data, distributed, privacy
from fashion_func.cli.config import DP_MAX_GRAD_NORM, Config, is_private
from fashion_func.loop import RunError
from fashion_func.loop.resume import RunRecord

__all__: list[str] = []


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
    chosen_for_steps: int | None = None  # with a target: the steps its noise multiplier was chosen for

    def batches(self, train: data.Split, seed: int, group: distributed.Group | None) -> data.PoissonBatches:
        """The Poisson batches, padded to a size every rank's slice divides."""
        size = data.poisson_capacity(len(train.labels), self.sample_rate)
        ranks = group.size if group is not None else 1
        return data.PoissonBatches(
            train, self.sample_rate, seed=seed, physical_batch_size=-(-size // ranks) * ranks
        )

    def per_example(self, n_train: int) -> privacy.ClipAndNoise:
        """The step's clip-and-noise stage (one value per member where they differ), divided by
        the Poisson batches' expected size (`data.PoissonBatches.expected_batch_size`)."""
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
            **({"chosen_for_steps": self.chosen_for_steps} if self.chosen_for_steps is not None else {}),
        }  # fmt: skip


def _one_or_each(values: tuple[float, ...]) -> float | list[float]:
    """One value for all members, or a list of one per member of a sweep."""
    return values[0] if len(values) == 1 else list(values)


def optimizer_grid(cfg: Config) -> list[dict[str, float]] | None:
    """A sweep's members' optimizer hyperparameters (its `dp_` values go to the step instead)."""
    if not cfg.sweep:
        return None
    return [{k: v for k, v in member.items() if not k.startswith("dp_")} for member in cfg.sweep.members()]


def _per_member(cfg: Config, name: str, value: float) -> tuple[float, ...]:
    if _swept(cfg, name):
        return tuple(m[name] for m in cfg.sweep.members())
    return (float(value),)


def plan(
    cfg: Config, n_train: int, resumed: Path | None = None, saved: RunRecord | None = None
) -> Plan | None:
    """The private run `cfg` asks for on `n_train` examples, or None when it is not private.

    The sampling rate is `batch_size / n_train`, one epoch `round(1 / rate)` steps. With a
    target epsilon the noise multiplier is chosen for `epochs` epochs, once: a resumed run
    keeps the one its checkpoint `resumed` records (`saved`: its run record). That privacy
    record must be what this run enforces (`privacy.check_record`): one that is missing, out
    of range or says other sigma, C, q, delta or accountant is refused, never trusted (and
    never replaced by a sigma chosen anew for a longer run). Every value is checked as the
    accountant will be asked: a RunError in one line naming the flag.
    """
    if not is_private(cfg):
        return None
    if importlib.util.find_spec("opacus") is None:
        raise RunError(f"private training needs Opacus's accountants: {privacy.PrivacyUnavailable()}")
    if not cfg.dp_delta < 1 / n_train:  # delta >= 1/N would allow publishing one example outright
        raise RunError(f"--dp-delta {cfg.dp_delta} must be below 1/N = {1 / n_train:.3g} "
                       f"(N = {n_train} training examples)")  # fmt: skip
    if cfg.batch_size > n_train:
        raise RunError(f"--batch-size {cfg.batch_size} is the expected Poisson batch: at most the "
                       f"{n_train} training examples")  # fmt: skip
    rate = cfg.batch_size / n_train
    steps = max(1, round(1 / rate))
    total = _checked(f"--epochs {cfg.epochs}", lambda: privacy.check_steps(cfg.epochs * steps, "its steps"))
    if cfg.dp_accountant == "prv":
        _checked("--dp-accountant prv", lambda: privacy.check_prv(rate, total))
    norm = cfg.dp_max_grad_norm if cfg.dp_max_grad_norm is not None else DP_MAX_GRAD_NORM
    norms = _per_member(cfg, "dp_max_grad_norm", norm)
    given = None  # the noise multiplier(s) the config gives, else a target picks one
    if cfg.dp_noise_multiplier is not None or _swept(cfg, "dp_noise_multiplier"):
        given = _per_member(cfg, "dp_noise_multiplier", cfg.dp_noise_multiplier or 0.0)
        for s in given:
            _checked(f"--dp-noise-multiplier {s:g}", lambda s=s: privacy.check_noise_multiplier(s))
    if resumed is not None:
        record = _checked(f"--resume {resumed}", lambda: privacy.check_record(
            saved.privacy if saved else None, sample_rate=rate, max_norm=_one_or_each(norms),
            delta=cfg.dp_delta, accountant=cfg.dp_accountant,
            noise_multiplier=_one_or_each(given) if given is not None else None,
        ))  # fmt: skip
        # a target's sigma: the one the resumed run chose for it, never chosen anew for this run
        sigmas = given or _chosen_before(cfg, record, rate, resumed)
    elif given is not None:
        sigmas = given
    else:
        target = cfg.dp_target_epsilon
        sigmas = (_checked(f"--dp-target-epsilon {target:g}", lambda: privacy.noise_multiplier_for(
            target, delta=cfg.dp_delta, sample_rate=rate, steps=total, accountant=cfg.dp_accountant,
        )),)  # fmt: skip
    chosen_for = None
    if given is None:  # a target: the steps its sigma was chosen for travel in the record
        chosen_for = record.get("chosen_for_steps") if resumed is not None else total
    target = cfg.dp_target_epsilon
    return Plan(rate, norms, sigmas, cfg.dp_delta, cfg.dp_accountant, target, steps, chosen_for)


def _chosen_before(cfg: Config, record: dict[str, Any], rate: float, resumed: Path) -> tuple[float, ...]:
    """The sigma the resumed target run chose, checked: the record must say for how many steps
    it was chosen (`chosen_for_steps`), and choosing again for those gives the same sigma (a
    forged record's larger sigma would report a smaller epsilon for the steps already taken)."""
    sigma, steps, target = record["noise_multiplier"], record.get("chosen_for_steps"), cfg.dp_target_epsilon
    flag = f"--resume {resumed}"
    if isinstance(steps, bool) or not isinstance(steps, int) or not isinstance(sigma, (int, float)):
        raise RunError(f"{flag}: the checkpoint's privacy record does not say which noise multiplier "
                       f"--dp-target-epsilon {target:g} chose, for how many steps")  # fmt: skip
    again = _checked(flag, lambda: privacy.noise_multiplier_for(
        target, delta=cfg.dp_delta, sample_rate=rate, steps=steps, accountant=cfg.dp_accountant,
    ))  # fmt: skip
    if again != sigma:
        raise RunError(f"{flag}: the checkpoint's privacy record says noise_multiplier {sigma:g} was chosen "
                       f"for --dp-target-epsilon {target:g} over {steps} steps, where it is {again:g}; "
                       "its epsilon would not be the one spent, so it is not resumed")  # fmt: skip
    return (float(sigma),)


def _checked(flag: str, call: Callable[[], Any]) -> Any:
    """`call()`, its ValueError worded with the flag that gave the value (a RunError, exit 2)."""
    try:
        return call()
    except ValueError as exc:
        raise RunError(f"{flag}: {exc}") from None


def _swept(cfg: Config, name: str) -> bool:
    return cfg.sweep is not None and name in cfg.sweep.names
