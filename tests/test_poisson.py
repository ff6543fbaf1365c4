"""Poisson sampling for private training: `data.poisson_batches`, `data.PoissonBatches` and
`data.poisson_capacity`.

The accountant's guarantee assumes each example joins each step's batch independently with
probability q. The statistical tests below run a fixed seed, so they are deterministic; their
bounds are six standard deviations of the quantity tested (a two-sided normal tail of 2e-9,
under 1e-6 after a union over every bound here), so a sampler that is right passes them for
any seed and one that is off by a few percent does not.

Examples are told apart by their label (here the example's index) and by the index written
into their first two pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fashion_func import data, privacy

SIGMAS = 6.0  # the bounds' width in standard deviations (see above)


def split(n: int) -> data.Split:
    """n examples whose label is their index, and whose first two pixels spell it."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    index = torch.arange(n)
    images[:, 0, 0], images[:, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
    return data.Split(images, index.clone(), "synthetic")


def batch_at(
    s: data.Split, q: float, step: int, *, physical: int, seed: int = 0, epoch: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step `step`'s batch alone (a pure function of seed, epoch, step)."""
    (batch,) = data.poisson_batches(
        s, q, physical_batch_size=physical, seed=seed, epoch=epoch, steps=step + 1, start=step
    )
    return batch


def chosen(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The example indices a batch's mask keeps."""
    return batch[1][batch[2]]


def assert_batch_equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


# -- the shape of a batch ---------------------------------------------------------------------


def test_every_batch_has_the_physical_size_and_a_mask_over_the_examples_drawn() -> None:
    s, physical = split(300), 60
    sizes = []
    for images, labels, mask in data.PoissonBatches(s, 0.1, seed=3, physical_batch_size=physical)(epoch=1):
        assert images.shape == (physical, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (physical,) and mask.shape == (physical,) and mask.dtype == torch.bool
        k = int(mask.sum())
        sizes.append(k)
        assert mask[:k].all() and not mask[k:].any()  # the examples first, then the padding
        kept = labels[mask]
        assert (kept[1:] > kept[:-1]).all()  # each example at most once, in index order
        # every row is the example its label names (padding too: a copy of some example)
        spelled = images[:, 0, 0].long() + 256 * images[:, 0, 1].long()
        assert torch.equal(spelled, labels)
    assert len(sizes) == 10 and len(set(sizes)) > 1  # the sizes vary: Poisson, not fixed batches


def test_padding_is_masked_out_and_adds_nothing_drawn() -> None:
    """A batch padded far beyond its examples: the mask keeps exactly those drawn with a
    larger physical size, the padding rows are all False."""
    s = split(100)
    for step in range(5):
        wide = batch_at(s, 0.05, step, physical=100)
        narrow = batch_at(s, 0.05, step, physical=40)
        assert torch.equal(chosen(wide), chosen(narrow))
        assert int(narrow[2].sum()) == chosen(wide).numel() < 40
        assert not narrow[2][chosen(wide).numel() :].any()


# -- the sampling distribution ----------------------------------------------------------------

N, Q, T = 200, 0.1, 1000  # examples, sample rate, steps: each example ~ Binomial(T, Q) inclusions


@pytest.fixture(scope="module")
def draws() -> torch.Tensor:
    """[T, N] bool: whether example i was in step t's batch (no truncation: P = N)."""
    s = split(N)
    rows = []
    for _, labels, mask in data.poisson_batches(s, Q, physical_batch_size=N, seed=11, epoch=0, steps=T):
        row = torch.zeros(N, dtype=torch.bool)
        row[labels[mask]] = True
        rows.append(row)
    return torch.stack(rows)


def test_each_example_joins_with_probability_q(draws: torch.Tensor) -> None:
    """Inclusions of example i over T steps ~ Binomial(T, q): mean Tq = 100, sd sqrt(Tq(1-q))
    = 9.5. Each of the N counts within 6 sd; their sum ~ Binomial(NT, q) within 6 of its sd;
    and the N squared z-scores sum ~ chi^2(N) (mean N, sd sqrt(2N)), within 6 sd: the counts
    are neither too spread nor too alike (a sampler cycling through the examples would be)."""
    counts = draws.sum(0).double()
    mean, sd = T * Q, math.sqrt(T * Q * (1 - Q))
    assert ((counts - mean).abs() <= SIGMAS * sd).all(), (counts.min(), counts.max())
    total_sd = math.sqrt(N * T * Q * (1 - Q))
    assert abs(counts.sum().item() - N * T * Q) <= SIGMAS * total_sd
    chi2 = (((counts - mean) / sd) ** 2).sum().item()
    assert abs(chi2 - N) <= SIGMAS * math.sqrt(2 * N), chi2


def test_inclusions_are_independent_across_steps_and_examples(draws: torch.Tensor) -> None:
    """Two different examples are in the same batch with probability q^2, and an example in
    two consecutive batches with probability q^2: counted over all pairs, Binomial(pairs, q^2)
    if independent; within 6 sd (pairs within one step are not independent of each other,
    so the bound is loose for them: a dependence of the size that matters is far outside)."""
    x = draws.double()
    both_steps = (x[1:] * x[:-1]).sum().item()  # example i at step t and t+1
    pairs = (T - 1) * N
    assert abs(both_steps - pairs * Q * Q) <= SIGMAS * math.sqrt(pairs * Q * Q * (1 - Q * Q))
    k = x.sum(1)
    together = (k * (k - 1) / 2).sum().item()  # pairs of examples sharing a batch
    pairs = T * N * (N - 1) / 2
    # the count of pairs in one batch is k(k-1)/2 with k ~ Binomial(N, q): its variance per step
    per_step = stats.binom(N, Q)
    ks = np.arange(N + 1)
    values = ks * (ks - 1) / 2
    var = float((per_step.pmf(ks) * (values - pairs / T * Q * Q) ** 2).sum())
    assert abs(together - pairs * Q * Q) <= SIGMAS * math.sqrt(T * var)


def test_batch_sizes_follow_binomial_n_q(draws: torch.Tensor) -> None:
    """Batch size ~ Binomial(N, q): mean Nq = 20, variance Nq(1-q) = 18. Over T steps the
    sample mean's sd is sqrt(18 / T) = 0.13; the sample variance's is sqrt((mu4 - sigma^4)
    / T) with the binomial's fourth central moment mu4 = sigma^2 (1 + 3 (N - 2) q (1 - q))."""
    sizes = draws.sum(1).double()
    var = N * Q * (1 - Q)
    assert abs(sizes.mean().item() - N * Q) <= SIGMAS * math.sqrt(var / T)
    mu4 = var * (1 + 3 * (N - 2) * Q * (1 - Q))
    assert abs(sizes.var().item() - var) <= SIGMAS * math.sqrt((mu4 - var**2) / T)
    # and the whole distribution: chi^2 goodness of fit over the sizes' bins
    observed = torch.bincount(sizes.long(), minlength=N + 1).numpy()
    expected = stats.binom.pmf(np.arange(N + 1), N, Q) * T
    low, high = 12, 30  # bins with >= 8 expected steps each; the tails pooled
    obs = np.concatenate([[observed[:low].sum()], observed[low:high], [observed[high:].sum()]])
    exp = np.concatenate([[expected[:low].sum()], expected[low:high], [expected[high:].sum()]])
    assert exp.min() >= 5
    assert stats.chisquare(obs, exp).pvalue > 1e-6


# -- determinism and resuming -----------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_epoch_step() -> None:
    s = split(120)
    one = data.PoissonBatches(s, 0.2, seed=5, physical_batch_size=60)
    again = data.PoissonBatches(s, 0.2, seed=5, physical_batch_size=60)
    first = list(one(epoch=2))
    for a, b in zip(first, again(epoch=2), strict=True):
        assert_batch_equal(a, b)
    for a, b in zip(first, one(epoch=2), strict=True):  # the same object called again
        assert_batch_equal(a, b)
    # step t does not depend on how many steps are asked for, nor on the steps before it
    for t in range(len(one)):
        assert_batch_equal(first[t], batch_at(s, 0.2, t, physical=60, seed=5, epoch=2))
    # other epochs, other seeds, other steps: other batches
    other_epoch = [chosen(b) for b in one(epoch=3)]
    other_seed = [chosen(b) for b in data.PoissonBatches(s, 0.2, seed=6, physical_batch_size=60)(epoch=2)]
    mine = [chosen(b) for b in first]
    for other in (other_epoch, other_seed):
        assert all(not torch.equal(a, b) for a, b in zip(mine, other, strict=True))
    assert all(not torch.equal(mine[t], mine[t + 1]) for t in range(len(mine) - 1))


@pytest.mark.parametrize("start", [0, 1, 4, 9, 10])
def test_start_resumes_the_epoch_exactly(start: int) -> None:
    batches = data.PoissonBatches(split(150), 0.1, seed=9, physical_batch_size=40)
    whole = list(batches(epoch=4))
    tail = list(batches(epoch=4, start=start))
    assert len(tail) == len(whole) - start
    for a, b in zip(whole[start:], tail, strict=True):
        assert_batch_equal(a, b)


@pytest.mark.parametrize(
    ("q", "steps"),
    [(0.1, 10), (0.3, 3), (256 / 2000, 8), (1 / 3, 3), (0.7, 1), (1.0, 1), (0.001, 1000), (0.004, 250)],
)
def test_an_epoch_is_round_one_over_q_steps(q: float, steps: int) -> None:
    batches = data.PoissonBatches(split(10), q, physical_batch_size=10)
    assert len(batches) == steps == round(1 / q)
    if steps <= 10:
        assert len(list(batches(epoch=1))) == steps


# -- truncation -------------------------------------------------------------------------------


def threshold_set(s: data.Split, q: float, step: int, size: int) -> torch.Tensor:
    """The examples whose draw is among the `size` smallest of step `step`'s, found through the
    public API alone: the examples a rate r draws are {i : u_i < r}, nested in r, so bisecting
    r until exactly `size` are drawn gives the `size` smallest draws (below q)."""
    n = len(s.labels)
    lo, hi = 0.0, q
    for _ in range(80):
        mid = (lo + hi) / 2
        got = chosen(batch_at(s, mid, step, physical=n))
        if got.numel() == size:
            return got
        lo, hi = (mid, hi) if got.numel() < size else (lo, mid)
    raise AssertionError(f"no rate draws exactly {size} examples")


def test_a_batch_over_the_physical_size_keeps_the_smallest_draws() -> None:
    """q = 0.5 of 50 examples with P = 5: every batch draws ~25 and is cut to the 5 examples
    whose draws were smallest (an unbiased choice among those drawn)."""
    s, q, physical = split(50), 0.5, 5
    for step in range(6):
        full = chosen(batch_at(s, q, step, physical=50))
        _, labels, mask = batch_at(s, q, step, physical=physical)
        assert full.numel() > physical and mask.all() and labels.shape == (physical,)
        assert torch.equal(labels, threshold_set(s, q, step, physical))  # in index order
        assert set(labels.tolist()) <= set(full.tolist())


def test_truncation_keeps_each_drawn_example_equally_often() -> None:
    """Cut to P of the k drawn, each of the N examples is kept with the same probability: over
    T steps of q = 0.5, N = 20, P = 4, each is kept ~ Binomial(T, 4/20) times (P < k almost
    always: P(k <= 4) = 6e-3, when all k are kept; the rate is then below 0.2 by at most that)."""
    s, q, physical, steps = split(20), 0.5, 4, 1000
    counts = torch.zeros(20)
    for _, labels, mask in data.poisson_batches(s, q, physical_batch_size=physical, seed=1, epoch=0,
                                                steps=steps):  # fmt: skip
        counts[labels[mask]] += 1
    rate = physical / 20
    sd = math.sqrt(steps * rate * (1 - rate))
    assert ((counts - steps * rate).abs() <= SIGMAS * sd + steps * 6e-3).all(), counts


# -- the physical size ------------------------------------------------------------------------


def smallest_capacity(n: int, q: float, overflow: float) -> int:
    """scipy's answer: the smallest P >= 1 with P(Binomial(n, q) > P) <= overflow."""
    sf = stats.binom.sf(np.arange(n + 1), n, q)
    return max(1, int(np.argmax(sf <= overflow)))


CAPACITY_CASES = [
    (60000, 256 / 60000, 1e-9),
    (60000, 0.001, 1e-9),
    (60000, 0.5, 1e-9),
    (2000, 256 / 2000, 1e-9),
    (2000, 256 / 2000, 1e-3),
    (1000, 0.01, 1e-6),
    (100, 0.5, 1e-9),
    (50, 0.02, 1e-9),
    (10, 0.9, 1e-9),
    (10, 0.9, 0.5),
    (1, 0.5, 1e-9),
    (7, 1.0, 1e-9),
    (10, 1e-12, 1e-9),  # an empty batch is likely enough: still one row
]


@pytest.mark.parametrize(("n", "q", "overflow"), CAPACITY_CASES)
def test_poisson_capacity_is_the_binomial_quantile(n: int, q: float, overflow: float) -> None:
    p = data.poisson_capacity(n, q, overflow)
    assert p == smallest_capacity(n, q, overflow)
    if 1 < p < n:  # the smallest such: one fewer overflows too often
        assert stats.binom.sf(p - 1, n, q) > overflow >= stats.binom.sf(p, n, q)


def test_the_default_physical_size_is_the_capacity() -> None:
    batches = data.PoissonBatches(split(2000), 256 / 2000)
    expected = smallest_capacity(2000, 256 / 2000, 1e-9)
    assert batches.size == data.poisson_capacity(2000, 256 / 2000) == expected
    assert batches.expected_batch_size == pytest.approx(256)
    assert batches.batching == {"n": 2000, "sample_rate": 256 / 2000, "physical_batch_size": batches.size,
                                "seed": 0}  # fmt: skip


def test_private_training_has_one_way_in() -> None:
    """The batches sample; `privacy` builds the stage and the accountant from their values (issue 33:
    the batches' own shortcuts and the stage's uncalled `__call__` were a second and third way)."""
    batches = data.PoissonBatches(split(2000), 256 / 2000)
    shortcuts = ("clip_and_noise", "accountant", "noise_multiplier_for")
    assert not any(hasattr(batches, name) for name in shortcuts)
    dp = privacy.clip_and_noise(1.0, 1.0, expected_batch_size=batches.expected_batch_size)
    assert not callable(dp) and dp.expected_batch_size == pytest.approx(256)


# -- bad arguments ----------------------------------------------------------------------------

BAD = [
    (lambda: data.poisson_capacity(0, 0.1), "poisson_capacity needs n >= 1 and sample_rate in (0, 1]"),
    (lambda: data.poisson_capacity(10, 0.0), "poisson_capacity needs n >= 1 and sample_rate in (0, 1]"),
    (lambda: data.poisson_capacity(10, 1.5), "poisson_capacity needs n >= 1 and sample_rate in (0, 1]"),
    (lambda: data.poisson_capacity(10, math.nan), "poisson_capacity needs n >= 1 and sample_rate in (0, 1]"),
    (lambda: data.PoissonBatches(split(4), 0.0), "sample_rate must be in (0, 1], got 0.0"),
    (lambda: data.PoissonBatches(split(4), -0.5), "sample_rate must be in (0, 1], got -0.5"),
    (lambda: data.PoissonBatches(split(4), 1.01), "sample_rate must be in (0, 1], got 1.01"),
    (lambda: data.PoissonBatches(split(4), math.nan), "sample_rate must be in (0, 1], got nan"),
    (lambda: data.PoissonBatches(split(4), 0.5, physical_batch_size=0), "physical_batch_size must be >= 1"),
    (lambda: data.PoissonBatches(split(4), 0.5, physical_batch_size=-3), "physical_batch_size must be >= 1"),
    (lambda: list(data.poisson_batches(split(4), 2.0, physical_batch_size=4, seed=0, epoch=0, steps=1)),
     "sample_rate must be in (0, 1], got 2.0"),
    (lambda: list(data.poisson_batches(split(4), 0.5, physical_batch_size=0, seed=0, epoch=0, steps=1)),
     "physical_batch_size must be >= 1, got 0"),
    (lambda: list(data.poisson_batches(split(4), 0.5, physical_batch_size=4, seed=0, epoch=0, steps=2,
                                       start=-1)),
     "start must be in [0, steps], got -1 of 2"),
    (lambda: list(data.poisson_batches(split(4), 0.5, physical_batch_size=4, seed=0, epoch=0, steps=2,
                                       start=3)),
     "start must be in [0, steps], got 3 of 2"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_arguments_are_one_line_value_errors(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert message in text and "\n" not in text, text
