"""Differentially private training (DP-SGD): per-example clipping, Gaussian noise, accounting.

    dp = privacy.clip_and_noise(max_norm=1.0, noise_multiplier=1.1, expected_batch_size=256)
    step = make_train_step(model, optim.sgd(0.5), per_example=dp)     # clip, sum, noise, update
    batches = data.PoissonBatches(train, sample_rate=256 / len(train.labels))
    fit(state, step, batches, epochs=10, privacy=privacy.Accountant(256 / 60000, 1.1, delta=1e-5))

The step computes each example's gradient (`vmap(grad)`, in chunks), clips it to `max_norm`
(its global L2 norm over all parameters, scaled by `min(1, max_norm / (norm + 1e-6))`, as
Opacus does), sums the clipped gradients of the examples the batch's mask keeps, adds
Gaussian noise of std `noise_multiplier * max_norm` and divides by the expected batch size;
the optimizer then applies that one gradient. The noise is a pure function of the state's
`rng` and `step` (`nn.normal`), so a resumed run draws the same noise bitwise and ensemble
members (each with its own `rng`) draw independent noise.

Accounting is not ours: `epsilon` and `noise_multiplier_for` ask Opacus's accountants (RDP,
or PRV), the optional extra `fashion-func[privacy]`. The guarantee they compute assumes
Poisson sampling (`data.PoissonBatches`): each example joins each step's batch with
probability `sample_rate`, independently.

`ACCOUNTANTS` names the accountants `epsilon` and `Accountant` accept.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from fashion_func import nn, tree

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "ClipAndNoise",
    "PrivacyUnavailable",
    "clip_and_noise",
    "epsilon",
    "noise_multiplier_for",
]

Params = dict[str, Tensor]
ACCOUNTANTS = ("rdp", "prv")
CLIP_EPS = 1e-6  # Opacus's: the clip factor is max_norm / (norm + 1e-6), at most 1
NOISE_SALT = 0xD9  # the noise draws from its own stream of the step's key (dropout has others)


class PrivacyUnavailable(ImportError):
    """The accountant's library (Opacus) is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "privacy accounting needs Opacus: pip install 'fashion-func[privacy]' (or: pip install opacus)"
        )


def _values(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    """`value` as a tuple of floats (one, or one per ensemble member), each checked."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not items:
        raise ValueError(f"{name} needs at least one value")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class ClipAndNoise:
    """The per-example stage of DP-SGD (`clip_and_noise` builds it; `make_train_step(...,
    per_example=)` runs it). `max_norm` and `noise_multiplier` are one value, or one per
    member of an ensemble or sweep (`ensemble.make_train_step`)."""

    max_norm: tuple[float, ...]
    noise_multiplier: tuple[float, ...]
    expected_batch_size: float | None = None
    chunk_size: int | None = None

    def hyperparams(self, step: Tensor) -> dict[str, Tensor]:
        """`max_norm` and `noise_multiplier` as tensors shaped like `step` (0-d for one model,
        `[K]` for a stack of K members)."""
        out = {}
        for name in ("max_norm", "noise_multiplier"):
            values = getattr(self, name)
            if step.dim() == 0 and len(values) > 1:
                raise ValueError(f"{len(values)} values of {name} for one model; give one")
            if step.dim() == 1 and len(values) not in (1, step.shape[0]):
                raise ValueError(f"{len(values)} values of {name} for {step.shape[0]} members")
            t = torch.tensor(values, dtype=torch.float32, device=step.device)
            out[name] = t.reshape(()) if step.dim() == 0 else t.expand(step.shape).clone()
        return out

    def __call__(self, grads: Params, *, key: Tensor, mask: Tensor | None = None) -> Params:
        """The whole stage on per-example gradients `{name: [B, ...]}` of one model: clipped,
        summed over the examples `mask` keeps, noised, divided by the expected batch size."""
        values = self.hyperparams(key.new_zeros((), dtype=torch.int64))
        total, _ = clipped_sum(grads, values["max_norm"], mask)
        size = self.expected_batch_size or next(iter(grads.values())).shape[0]
        return add_noise(total, key, values["max_norm"], values["noise_multiplier"], size)


def clip_and_noise(
    max_norm: float | Sequence[float],
    noise_multiplier: float | Sequence[float],
    *,
    expected_batch_size: float | None = None,
    chunk_size: int | None = None,
) -> ClipAndNoise:
    """DP-SGD's per-example stage: clip each example's gradient to `max_norm` (global L2
    norm), sum, add N(0, (noise_multiplier * max_norm)^2) noise, divide by
    `expected_batch_size` (Poisson sampling's `sample_rate * N`; None: the batch's size,
    right for fixed-size batches). Under torchrun it is the global expected size: each rank
    clips and sums its own examples, the sums are added over the ranks (`reduce_grads=
    group.all_reduce_sum`) and the same noise is added once. chunk_size: examples whose
    gradients are held at once; None: equal chunks of at most 512 examples and 256 MiB."""
    norms, sigmas = _values(max_norm, "max_norm"), _values(noise_multiplier, "noise_multiplier")
    if any(c <= 0 for c in norms):
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if any(s < 0 for s in sigmas):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if expected_batch_size is not None and not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ClipAndNoise(norms, sigmas, expected_batch_size, chunk_size)


def clip_factors(norms: Tensor, max_norm: Tensor | float) -> Tensor:
    """Each example's scale `min(1, max_norm / (norm + 1e-6))` (Opacus's formula)."""
    return (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def clipped_sum(grads: Params, max_norm: Tensor | float, mask: Tensor | None = None) -> tuple[Params, Tensor]:
    """(the sum over the examples of `grads` `{name: [B, ...]}` each clipped to `max_norm`,
    the number of examples whose norm was above it); examples `mask` (`[B]` bool) drops
    contribute nothing."""
    norms = torch.func.vmap(tree.global_norm)(grads)
    scale = clip_factors(norms, max_norm)
    over = norms > max_norm
    if mask is not None:
        scale = scale * mask.to(scale.dtype)
        over = over & mask
    # one contraction per parameter: sum_b scale[b] * g[b, ...], no [B, ...] product kept
    total = {k: torch.tensordot(scale.to(g.dtype), g, dims=1) for k, g in grads.items()}
    return total, over.sum()


def add_noise(
    summed: Params, key: Tensor, max_norm: Tensor | float, noise_multiplier: Tensor | float, batch_size: float
) -> Params:
    """`(summed + noise_multiplier * max_norm * N(0, 1)) / batch_size`, the noise a pure function
    of `key`: one `nn.normal(key, [total size])` draw over all leaves, in their order."""
    flat, spec = pytree.tree_flatten(summed)
    if not flat:
        return summed
    # one draw for all leaves: inductor generates one kernel instead of one per leaf
    noise = nn.normal(key, (sum(g.numel() for g in flat),), dtype=flat[0].dtype)
    std = noise_multiplier * max_norm
    parts = noise.split([g.numel() for g in flat])
    noised = [(g + std * z.view(g.shape).to(g.dtype)) / batch_size for g, z in zip(flat, parts, strict=True)]
    return pytree.tree_unflatten(noised, spec)


# -- accounting (Opacus's accountants) ---------------------------------------------------------


def _accountant(name: str) -> Any:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose from {', '.join(ACCOUNTANTS)}")
    if importlib.util.find_spec("opacus") is None:
        raise PrivacyUnavailable()
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def _check_accounting(sample_rate: float, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@functools.lru_cache(maxsize=1024)  # fit asks for the same steps at the epoch's end and each save
def epsilon(
    steps: int, *, sample_rate: float, noise_multiplier: float, delta: float, accountant: str = "rdp"
) -> float:
    """The ε of `steps` DP-SGD steps with Poisson `sample_rate` and `noise_multiplier`, at
    `delta`, as Opacus's accountant (`"rdp"` or `"prv"`) computes it; 0 before the first step,
    inf without noise."""
    _check_accounting(sample_rate, delta)
    acc = _accountant(accountant)
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
    with warnings.catch_warnings():
        # RDP's "optimal order is the largest alpha": the epsilon is then a looser upper
        # bound, still a valid one; said once per epoch it would only be noise
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def noise_multiplier_for(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier whose `steps` steps stay within `target_epsilon` at `delta`
    (Opacus's `get_noise_multiplier`, to 0.01 in ε)."""
    _check_accounting(sample_rate, delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # the search tries noise far above the answer (10 first), whose optimal RDP order is
        # the largest: Opacus warns at every such candidate, which says nothing of the result
        warnings.filterwarnings("ignore", message="Optimal order is the")
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=steps, accountant=accountant)  # fmt: skip
    return float(sigma)


@dataclass(frozen=True)
class Accountant:
    """What `fit(..., privacy=)` needs to report ε after each epoch (`epsilon` in the history,
    the log and TensorBoard) and to stop before `target_epsilon` would be passed: the Poisson
    `sample_rate`, the `noise_multiplier` (one, or one per member of a sweep), `delta`."""

    sample_rate: float
    noise_multiplier: float | tuple[float, ...]
    delta: float
    target_epsilon: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _check_accounting(self.sample_rate, self.delta)
        _values(self.noise_multiplier, "noise_multiplier")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        _accountant(self.accountant)  # unknown name or no Opacus: said before training

    def epsilon(self, steps: int) -> float | list[float]:
        """ε after `steps` steps: a float, or a list of one per member of a sweep."""
        sigmas = _values(self.noise_multiplier, "noise_multiplier")
        eps = [epsilon(steps, sample_rate=self.sample_rate, noise_multiplier=s, delta=self.delta,
                       accountant=self.accountant) for s in sigmas]  # fmt: skip
        return eps if isinstance(self.noise_multiplier, (list, tuple)) else eps[0]

    def exceeds(self, steps: int) -> float | None:
        """The largest member's ε after `steps` steps if it passes `target_epsilon`, else None."""
        if self.target_epsilon is None:
            return None
        eps = self.epsilon(steps)
        worst = max(eps) if isinstance(eps, list) else eps
        return worst if worst > self.target_epsilon else None

    def record(self, steps: int) -> dict[str, Any]:
        """The run's guarantee so far, for a weights file's metadata."""
        return {"epsilon": self.epsilon(steps), "delta": self.delta, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "steps": int(steps),
                "accountant": self.accountant}  # fmt: skip
