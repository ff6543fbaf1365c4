"""Differentially private training (DP-SGD): per-example clipping, Gaussian noise, accounting.

    batches = data.PoissonBatches(train, sample_rate=256 / len(train.labels))   # Poisson sampling
    dp = privacy.clip_and_noise(1.0, 1.1, expected_batch_size=batches.expected_batch_size)
    step = make_train_step(model, optim.sgd(0.5), per_example=dp)       # clip, sum, noise, update
    fit(state, step, batches, epochs=10, privacy=privacy.Accountant(batches.sample_rate, 1.1, delta=1e-5))

This module is the one way in: `clip_and_noise` (the step's stage), `Accountant` (what `fit`
reports epsilon with) and `noise_multiplier_for` (a sigma for a target epsilon), each given the
batches' own `sample_rate` / `expected_batch_size`.

The step runs that stage (`clip_and_noise` says what it computes) on each example's gradient
(`vmap(grad)`, in chunks) and the optimizer applies the one noised gradient. The noise is a
pure function of the state's `rng` and `step` (`nn.normal`), so a resumed run draws the same
noise bitwise and ensemble members (each with its own `rng`) draw independent noise.

Accounting is not ours: `epsilon` and `noise_multiplier_for` ask Opacus's accountants
(`ACCOUNTANTS`: RDP, or PRV), the optional extra `fashion-func[privacy]`. The guarantee they
compute assumes Poisson sampling (`data.PoissonBatches`): each example joins each step's batch
with probability `sample_rate`, independently.

epsilon is computed from what the run enforces, never from what a file or a caller claims:
every value is range-checked before an accountant sees it (`check_noise_multiplier`,
`check_sample_rate`, `check_delta`, `check_steps`; PRV only where it agrees with
dp-accounting's PLD, `check_prv`), `check_accountant` (what `fit(privacy=)` calls) holds an
`Accountant` to the step's per-example stage and the batches' sampling, and `check_record`
holds a checkpoint's privacy record to them and to the state's step. A disagreement is
refused (one-line ValueError), never reported with a smaller epsilon.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import time
import warnings
from collections.abc import Mapping, Sequence
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
    "check_accountant",
    "check_record",
    "clip_and_noise",
    "epsilon",
    "noise_multiplier_for",
]

Params = dict[str, Tensor]
ACCOUNTANTS = ("rdp", "prv")
CLIP_EPS = 1e-6  # Opacus's: the clip factor is max_norm / (norm + 1e-6), at most 1
NOISE_SALT = 0xD9  # the noise draws from its own stream of the step's key (dropout has others)

# What the accountants are trusted with. Below 0.1 the noise guarantees nothing worth the name
# (4 steps at q = 0.25 already spend epsilon 260) and Opacus breaks: PRV asks for 21 GiB at
# 1e-3, RDP divides by zero at 1e-300; above 1e6 epsilon no longer changes (1e3 and 1e6 agree
# to 1e-6) and RDP overflows at 1e308. 0 is allowed: no noise, epsilon infinite.
NOISE_MULTIPLIER_RANGE = (0.1, 1e6)
SAMPLE_RATE_MIN = 1e-9  # an epoch is round(1 / q) steps: at most MAX_STEPS
MAX_STEPS = 10**9  # RDP's closed form takes milliseconds up to here; the searches stay bounded
# PRV (Opacus's, eps_error 0.01) reports epsilon about 0.01 above dp-accounting's PLD where it
# is sound, but falls below it for small q over many steps (measured at sigma 1: q = 1/60000
# over 600,000 steps 0.059 against 0.088; q = 3e-5 over 1e5 steps 0.045 against 0.049), and
# its time grows with the steps (2 s at 1e5, 9 s at 2.4e6): PRV is used for at most
# PRV_RANGE["steps"] steps, and beyond PRV_RANGE["many_steps"] only with q >= PRV_RANGE["q"]
# (tests/test_privacy_guarantees.py compares it with the PLD at these corners).
PRV_RANGE = {"steps": 10**5, "many_steps": 10**4, "q": 1e-3}
# PRV discretises the privacy loss on a grid whose size it derives from the values: for a large
# epsilon (sigma 0.1 at q = 1) that is 1e12 points (8 TiB) and 21 GiB at sigma 1e-3; 7.5e6
# points took 19 s. Its size is computed first (Opacus's own formula) and refused above this.
PRV_MAX_POINTS = 10**7
SEARCH_SECONDS = 60.0  # noise_multiplier_for gives up (one line) after this long


class PrivacyUnavailable(ImportError):
    """The accountant's library (Opacus) is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "privacy accounting needs Opacus: pip install 'fashion-func[privacy]' (or: pip install opacus)"
        )


def _real(v: Any) -> bool:
    """A real number that is not a bool (True would pass as 1)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _values(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    """`value` as a tuple of floats (one, or one per ensemble member), each checked."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not items:
        raise ValueError(f"{name} needs at least one value")
    bad = [v for v in items if not _real(v) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must be a finite number, got {bad[0]!r}")
    return tuple(float(v) for v in items)


def check_noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    """`value` as a float if it is 0 (no noise) or in `NOISE_MULTIPLIER_RANGE`, else a ValueError."""
    lo, hi = NOISE_MULTIPLIER_RANGE
    if not _real(value) or not (value == 0 or lo <= value <= hi):
        raise ValueError(f"{name} must be >= 0: 0 (no noise) or in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def check_sample_rate(value: Any, name: str = "sample_rate") -> float:
    """`value` as a float if it is a real number in [`SAMPLE_RATE_MIN`, 1], else a ValueError."""
    if not _real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    if value < SAMPLE_RATE_MIN:  # an epoch is round(1 / q) steps, the accountant's bound MAX_STEPS
        raise ValueError(f"{name} must be at least {SAMPLE_RATE_MIN:g} (an epoch is 1 / {name} steps), "
                         f"got {value!r}")  # fmt: skip
    return float(value)


def check_delta(value: Any, name: str = "delta") -> float:
    """`value` as a float if it is a real number in (0, 1), else a ValueError."""
    if not _real(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_steps(value: Any, name: str = "steps", least: int = 0) -> int:
    """`value` if it is an int in [`least`, `MAX_STEPS`], else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not least <= value <= MAX_STEPS:
        raise ValueError(f"{name} must be an integer in [{least}, {MAX_STEPS:.0e}], got {value!r}")
    return int(value)


def check_prv(sample_rate: float, steps: int) -> None:
    """Refuse PRV where it was measured to disagree with dp-accounting's PLD (`PRV_RANGE`)."""
    if steps > PRV_RANGE["steps"] or (steps > PRV_RANGE["many_steps"] and sample_rate < PRV_RANGE["q"]):
        raise ValueError(
            f"the prv accountant is not used for {steps} steps at sample_rate {sample_rate:.3g}: there it "
            f"falls below dp-accounting's PLD (it is trusted up to {PRV_RANGE['many_steps']} steps, or up to "
            f"{PRV_RANGE['steps']} with sample_rate >= {PRV_RANGE['q']:g}); use the rdp accountant"
        )


def check_mask(mask: Tensor | None) -> None:
    """A batch's mask must be a bool tensor: an integer mask of 5 would count an example five
    times (five times the sensitivity the accountant assumes), a float one is ambiguous."""
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"a batch's mask must be a bool tensor (True: the example counts), got {what}; "
                        "pass mask == 1 for a 0/1 mask")  # fmt: skip


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
    norms = _values(max_norm, "max_norm")
    sigmas = tuple(check_noise_multiplier(s) for s in _values(noise_multiplier, "noise_multiplier"))
    if any(c <= 0 for c in norms):
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if expected_batch_size is not None:
        if not _real(expected_batch_size) or not 0 < expected_batch_size < math.inf:
            raise ValueError(f"expected_batch_size must be a finite number > 0, got {expected_batch_size!r}")
        expected_batch_size = float(expected_batch_size)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return ClipAndNoise(norms, sigmas, expected_batch_size, chunk_size)


def clipped_sum(grads: Params, max_norm: Tensor | float, mask: Tensor | None = None) -> tuple[Params, Tensor]:
    """(the sum over the examples of `grads` `{name: [B, ...]}` each clipped to `max_norm`,
    the number of examples whose norm was above it); examples `mask` (`[B]` bool) drops
    contribute nothing, even when their gradient is NaN or infinite (such rows are selected out
    with `where`, never multiplied by 0: 0 * NaN is NaN; finite ones get a scale of 0)."""
    check_mask(mask)
    norms = torch.func.vmap(tree.global_norm)(grads)
    scale = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)  # Opacus's min(1, max_norm / (norm + 1e-6))
    over = norms > max_norm
    if mask is not None:
        scale = torch.where(mask, scale, 0.0)
        over = over & mask

    # A dropped row is multiplied by a scale of 0, exact unless it holds an inf or NaN (0 * NaN is
    # NaN): only then is it selected out with a copy of each leaf. An eager CPU step checks (a
    # dropped row's norm is finite iff all of it is); elsewhere every dropped row is selected out.
    select = mask is not None and (not _branchable(norms) or bool((~mask & ~torch.isfinite(norms)).any()))

    def kept(g: Tensor) -> Tensor:  # one leaf's masked-out rows zeroed (a copy of one leaf at a time)
        return torch.where(mask.view(-1, *([1] * (g.dim() - 1))), g, 0.0) if select else g

    # one contraction per parameter: sum_b scale[b] * g[b, ...], no [B, ...] product kept
    total = {k: torch.tensordot(scale.to(g.dtype), kept(g), dims=1) for k, g in grads.items()}
    return total, over.sum()


def _branchable(t: Tensor) -> bool:
    """Whether a Python branch on `t`'s values is right and cheap: an eager CPU tensor. Compiled
    or under a functorch transform (an ensemble's vmap, grad through the step) the branch would
    be impossible or traced once; on an accelerator it would make the host wait."""
    if torch.compiler.is_compiling() or t.device.type != "cpu":
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and not wrapped(t)


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


def _accountant(name: str) -> Any:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose from {', '.join(ACCOUNTANTS)}")
    if importlib.util.find_spec("opacus") is None:
        raise PrivacyUnavailable()
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


class _PRVGridTooLarge(ValueError):
    """PRV's grid for these values would not fit (`PRV_MAX_POINTS`)."""


def _check_prv_grid(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> None:
    """Refuse PRV where its grid (Opacus's `PRVAccountant._get_domain`) would exceed `PRV_MAX_POINTS`."""
    import numpy as np
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    eps_error, delta_error = 0.01, delta / 1000  # Opacus's defaults in get_epsilon
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        prv = PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)
        half = compute_safe_domain_size(prvs=[prv], max_self_compositions=[steps], eps_error=eps_error,
                                        delta_error=delta_error)  # fmt: skip
    mesh = eps_error / math.sqrt(steps * math.log(12 / delta_error) / 2)
    points = 2 * half / mesh
    if not points <= PRV_MAX_POINTS:
        raise _PRVGridTooLarge(
            f"the prv accountant would discretise noise_multiplier {noise_multiplier:g} at sample_rate "
            f"{sample_rate:.3g} over {steps} steps on {points:.3g} points (at most {PRV_MAX_POINTS:.0e}): "
            "epsilon is too large for it; use the rdp accountant"
        )


def _opacus_epsilon(
    steps: int, sample_rate: float, noise_multiplier: float, delta: float, accountant: str
) -> float:
    """Opacus's epsilon for values already checked, its warnings kept out of the user's output."""
    import numpy as np

    acc = _accountant(accountant)
    acc.history.append((noise_multiplier, sample_rate, steps))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # RDP's "optimal order is the largest (smallest) alpha": the epsilon is then a looser
        # upper bound, still a valid one; said once per epoch it would only be noise. PRV's numpy
        # overflow and log(0) (q = 1) warnings are its grid's edges, not the result's
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        eps = float(acc.get_epsilon(delta=delta))
    if math.isnan(eps):
        return math.inf  # never a NaN that compares below a target
    # Both accountants give an upper bound; one below 0 (a large delta, a tiny sample rate) means
    # the steps are (0, delta)-DP, and a negative epsilon would read as less than nothing spent.
    return max(eps, 0.0)


@functools.lru_cache(maxsize=1024)  # fit asks for the same steps at the epoch's end and each save
def epsilon(
    steps: int, *, sample_rate: float, noise_multiplier: float, delta: float, accountant: str = "rdp"
) -> float:
    """The ε of `steps` DP-SGD steps with Poisson `sample_rate` and `noise_multiplier`, at
    `delta`, as Opacus's accountant (`"rdp"` or `"prv"`) computes it; 0 before the first step,
    inf without noise. Every value is checked first (module docstring): one-line ValueErrors."""
    steps = check_steps(steps)
    q, d = check_sample_rate(sample_rate), check_delta(delta)
    sigma = check_noise_multiplier(noise_multiplier)
    _accountant(accountant)
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if accountant == "prv":
        check_prv(q, steps)
        _check_prv_grid(q, sigma, steps, d)
    return _opacus_epsilon(steps, q, sigma, d, accountant)


def noise_multiplier_for(
    target_epsilon: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to `tolerance` in ε, as Opacus's `get_noise_multiplier`)
    whose `steps` steps stay within `target_epsilon` at `delta`: a bisection in
    `NOISE_MULTIPLIER_RANGE`, refused up front (one line) when the target is below what its
    largest spends or above what its smallest does, and given up after `SEARCH_SECONDS`."""
    if not _real(target_epsilon) or not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    steps = check_steps(steps, least=1)
    q, d = check_sample_rate(sample_rate), check_delta(delta)
    _accountant(accountant)
    if accountant == "prv":
        check_prv(q, steps)
    lo, hi = NOISE_MULTIPLIER_RANGE

    def eps(sigma: float) -> float:
        try:
            return epsilon(steps, sample_rate=q, noise_multiplier=sigma, delta=d, accountant=accountant)
        except _PRVGridTooLarge:  # PRV's grid grows with epsilon: this sigma spends more than any target
            return math.inf

    where = f"{steps} steps at sample_rate {q:.4g}, delta {d:g}"
    if eps(hi) > target_epsilon:  # Opacus: "The privacy budget is too low."
        raise ValueError(f"target_epsilon {target_epsilon:g} is too low for {where}: even noise_multiplier "
                         f"{hi:g}, the largest allowed, spends {eps(hi):.4g}")  # fmt: skip
    # RDP's epsilon bounds PRV's from above: a target above RDP's at the least noise is refused
    # without asking PRV, whose grid there would be huge
    least = epsilon(steps, sample_rate=q, noise_multiplier=lo, delta=d, accountant="rdp")
    if least <= target_epsilon:
        raise ValueError(f"target_epsilon {target_epsilon:g} is more than {where} spend with the least noise "
                         f"allowed (noise_multiplier {lo:g}: epsilon {least:.4g} or less); "
                         "give a smaller target")  # fmt: skip
    deadline = time.monotonic() + SEARCH_SECONDS
    if eps(10.0) <= target_epsilon:  # where Opacus starts: most answers lie below it
        hi = 10.0
    while target_epsilon - eps(hi) > tolerance and hi / lo > 1 + 1e-9:  # eps(lo) > target >= eps(hi)
        if time.monotonic() > deadline:
            raise ValueError(f"the search for a noise multiplier for target_epsilon {target_epsilon:g} "
                             f"over {where} took over {SEARCH_SECONDS:g} s; give fewer steps or "
                             "the rdp accountant")  # fmt: skip
        mid = math.sqrt(lo * hi)  # epsilon falls with sigma: bisect log(sigma)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """One value per member, or one for all: equal member by member."""
    k = max(len(a), len(b))
    if len(a) not in (1, k) or len(b) not in (1, k):
        return False
    return all(x == y for x, y in zip(a * (k // len(a)), b * (k // len(b)), strict=True))


@dataclass(frozen=True)
class Accountant:
    """What `fit(..., privacy=)` needs to report ε after each epoch (`epsilon` in the history,
    the log and TensorBoard) and to stop before `target_epsilon` would be passed: the Poisson
    `sample_rate`, the `noise_multiplier` (one, or one per member of a sweep), `delta`.
    `fit` checks it against the step and the batches it describes (`check_accountant`)."""

    sample_rate: float
    noise_multiplier: float | tuple[float, ...]
    delta: float
    target_epsilon: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check_sample_rate(self.sample_rate)
        check_delta(self.delta)
        for s in _values(self.noise_multiplier, "noise_multiplier"):
            check_noise_multiplier(s)
        if self.target_epsilon is not None and (
            not _real(self.target_epsilon) or not 0 < self.target_epsilon < math.inf
        ):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}")
        _accountant(self.accountant)  # unknown name or no Opacus: said before training

    @property
    def noise_multipliers(self) -> tuple[float, ...]:
        """The noise multiplier of each member (one for a single model or all members)."""
        return _values(self.noise_multiplier, "noise_multiplier")

    def epsilon(self, steps: int) -> float | list[float]:
        """ε after `steps` steps: a float, or a list of one per member of a sweep."""
        eps = [epsilon(steps, sample_rate=self.sample_rate, noise_multiplier=s, delta=self.delta,
                       accountant=self.accountant) for s in self.noise_multipliers]  # fmt: skip
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
        sigma = (
            list(self.noise_multiplier) if isinstance(self.noise_multiplier, tuple) else self.noise_multiplier
        )
        return {"epsilon": self.epsilon(steps), "delta": self.delta, "sample_rate": self.sample_rate,
                "noise_multiplier": sigma, "steps": int(steps), "accountant": self.accountant,
                "sampling": "poisson"}  # fmt: skip


def check_accountant(
    acc: Accountant, per_example: ClipAndNoise | None, batching: Mapping[str, Any] | None
) -> None:
    """Refuse (one-line ValueError) an `Accountant` that does not describe the run: the train
    step's per-example stage `per_example` (None: the step clips and noises nothing) must add
    its noise multiplier(s), and the batches' `batching` (`data.PoissonBatches.batching`) must
    be Poisson sampling at its sample rate with the stage's expected batch size."""
    if per_example is None:
        raise ValueError("privacy= needs a per-example (DP-SGD) train step: make_train_step(..., per_example="
                         "privacy.clip_and_noise(...)); this step neither clips nor noises")  # fmt: skip
    if not _same(acc.noise_multipliers, per_example.noise_multiplier):
        raise ValueError(f"the accountant's noise_multiplier {acc.noise_multiplier} is not the step's "
                         f"{_one(per_example.noise_multiplier)}")  # fmt: skip
    rate = batching.get("sample_rate") if isinstance(batching, Mapping) else None
    if rate is None:
        raise ValueError("privacy= needs Poisson-sampled train_data (data.PoissonBatches): the accountant's "
                         "epsilon assumes each example joins each batch independently, which shuffled or "
                         "fixed batches do not")  # fmt: skip
    if rate != acc.sample_rate:
        raise ValueError(f"the accountant's sample_rate {acc.sample_rate} is not the batches' {rate}")
    n, expected = batching.get("n"), per_example.expected_batch_size
    if expected is not None and _real(n) and not math.isclose(expected, rate * n, rel_tol=1e-9):
        raise ValueError(f"the step's expected_batch_size {expected:g} is not the batches' sample_rate x n "
                         f"= {rate * n:g}")  # fmt: skip


def _one(values: tuple[float, ...]) -> float | list[float]:
    return values[0] if len(values) == 1 else list(values)


def check_record(
    record: Any,
    *,
    steps: int | None = None,
    sample_rate: float | None = None,
    noise_multiplier: float | Sequence[float] | None = None,
    max_norm: float | Sequence[float] | None = None,
    delta: float | None = None,
    accountant: str | None = None,
) -> dict[str, Any]:
    """A checkpoint's privacy record (`metadata["privacy"]`), its values range-checked and held
    to what the resumed run enforces: each keyword given (None: not known to the caller) must
    equal the record's (`steps`: the state's step count). Returns the record; a missing
    record, a value out of range or a disagreement is a one-line ValueError. `data_statistics`
    (which statistics of the training data the model uses, outside epsilon) is descriptive: a
    record without it (written before it was recorded) is accepted, since epsilon rests on
    sigma, q, steps and delta alone and the model a run resumes is its own (`loop.resume`)."""
    if not isinstance(record, Mapping):
        raise ValueError("the checkpoint has no privacy record (metadata \"privacy\"): a private run "
                         "cannot be resumed from it, since the privacy of its steps is unknown")  # fmt: skip
    try:
        got_steps = check_steps(record.get("steps"), "its steps")
        got_rate = check_sample_rate(record.get("sample_rate"), "its sample_rate")
        got_delta = check_delta(record.get("delta"), "its delta")
        sigmas = _values(record.get("noise_multiplier"), "its noise_multiplier")
        got_sigma = tuple(check_noise_multiplier(s, "its noise_multiplier") for s in sigmas)
        norm = record.get("max_grad_norm")
        got_norm = None if norm is None else _values(norm, "its max_grad_norm")
        if got_norm is not None and not all(c > 0 for c in got_norm):
            raise ValueError(f"its max_grad_norm must be > 0, got {norm!r}")
        if (kind := record.get("accountant")) not in ACCOUNTANTS:
            raise ValueError(f"its accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")
        if record.get("sampling", "poisson") != "poisson":
            raise ValueError(f"its sampling must be poisson, got {record.get('sampling')!r}")
        if not isinstance(record.get("data_statistics", ""), str):
            raise ValueError(f"its data_statistics must be a text, got {record['data_statistics']!r}")
    except ValueError as exc:
        raise ValueError(f"the checkpoint's privacy record is invalid: {exc}") from None
    now = {"sample_rate": sample_rate, "delta": delta, "accountant": accountant}
    got = {"sample_rate": got_rate, "delta": got_delta, "accountant": record["accountant"]}
    differs = [f"{k} {got[k]} recorded, {v} now" for k, v in now.items() if v is not None and v != got[k]]
    if steps is not None and steps != got_steps:
        differs.insert(0, f"steps {got_steps} recorded, the state has taken {steps}")
    if noise_multiplier is not None and not _same(got_sigma, _values(noise_multiplier, "noise_multiplier")):
        differs.append(f"noise_multiplier {_one(got_sigma)} recorded, {noise_multiplier} now")
    if max_norm is not None and not _same(got_norm or (), _values(max_norm, "max_norm")):
        differs.append(f"max_grad_norm {norm} recorded, {max_norm} now")
    if differs:
        raise ValueError(f"the checkpoint's privacy record disagrees with the run: {'; '.join(differs)}; "
                         "its epsilon would not be the one spent, so it is not resumed")  # fmt: skip
    return dict(record)
