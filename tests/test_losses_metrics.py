"""fashion_func.losses and fashion_func.metrics against torch.nn.functional, autograd and plain loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fashion_func import losses, metrics


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits_labels(b: int = 16, c: int = 10, seed: int = 0, dtype=torch.float64):
    g = _gen(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, labels


# ---------------------------------------------------------------------------------------------
# losses


@pytest.mark.cross_path
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35])
def test_cross_entropy_matches_functional(smoothing):
    logits, labels = _logits_labels(b=33, c=7)
    per = losses.cross_entropy_per_example(logits, labels, label_smoothing=smoothing)
    ref = F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing)
    assert per.shape == (33,) and per.dtype == torch.float64
    torch.testing.assert_close(per, ref, rtol=0, atol=1e-12)
    mean = losses.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert mean.shape == ()
    torch.testing.assert_close(
        mean, F.cross_entropy(logits, labels, label_smoothing=smoothing), rtol=0, atol=1e-12
    )
    one = losses.cross_entropy_single(logits[3], labels[3], label_smoothing=smoothing)
    torch.testing.assert_close(one, ref[3], rtol=0, atol=1e-12)


@pytest.mark.cross_path
def test_cross_entropy_extreme_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 1])
    per = losses.cross_entropy_per_example(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(per, F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1))
    assert torch.isfinite(per).all()


@pytest.mark.cross_path
def test_mse_matches_functional():
    g = _gen(3)
    pred = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    target = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
    per = losses.mse_per_example(pred, target)
    ref = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2))
    torch.testing.assert_close(per, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(losses.mse(pred, target), F.mse_loss(pred, target), rtol=0, atol=1e-12)
    # scalars per example
    torch.testing.assert_close(
        losses.mse(pred[:, 0, 0], target[:, 0, 0]), F.mse_loss(pred[:, 0, 0], target[:, 0, 0])
    )


def _linear_params(d: int = 5, c: int = 4, seed: int = 1):
    g = _gen(seed)
    return {
        "weight": torch.randn(c, d, generator=g, dtype=torch.float64),
        "bias": torch.randn(c, generator=g, dtype=torch.float64),
    }


@pytest.mark.cross_path
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_per_example_gradients_vmap_grad_equals_loops(smoothing):
    params = _linear_params()
    g = _gen(2)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=g)

    def loss_one(p, xi, yi):
        logits = xi @ p["weight"].T + p["bias"]  # [C]
        return losses.cross_entropy_single(logits, yi, label_smoothing=smoothing)

    def loss_one_via_batch(p, xi, yi):  # the batched API on a batch of one, also under vmap(grad)
        logits = xi[None] @ p["weight"].T + p["bias"]
        return losses.cross_entropy(logits, yi[None], label_smoothing=smoothing)

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    per_b = vmap(grad(loss_one_via_batch), in_dims=(None, 0, 0))(params, x, y)
    assert per["weight"].shape == (9, 4, 5) and per["bias"].shape == (9, 4)

    for i in range(9):
        single = grad(loss_one)(params, x[i], y[i])
        w = params["weight"].clone().requires_grad_(True)
        b = params["bias"].clone().requires_grad_(True)
        ref = F.cross_entropy((x[i : i + 1] @ w.T + b), y[i : i + 1], label_smoothing=smoothing)
        gw, gb = torch.autograd.grad(ref, (w, b))
        for name, auto in (("weight", gw), ("bias", gb)):
            torch.testing.assert_close(per[name][i], single[name], rtol=0, atol=1e-12)
            torch.testing.assert_close(per_b[name][i], single[name], rtol=0, atol=1e-12)
            torch.testing.assert_close(per[name][i], auto, rtol=0, atol=1e-12)

    # the mean of per-example gradients is the gradient of the mean loss
    full = grad(lambda p: losses.cross_entropy(x @ p["weight"].T + p["bias"], y, label_smoothing=smoothing))(
        params
    )
    for name in params:
        torch.testing.assert_close(per[name].mean(0), full[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# metrics


def _loop_topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> list[bool]:
    # reference: rank classes by (-logit, index) like a stable sort; NaN rows are wrong
    out = []
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        if any(v != v for v in row):
            out.append(False)
            continue
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        out.append(label in order[:k])
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10, 11])
def test_topk_correct_matches_loop_with_ties(k):
    g = _gen(k)
    logits = torch.randint(-2, 3, (64, 10), generator=g).to(torch.float32)  # many ties
    labels = torch.randint(0, 10, (64,), generator=g)
    got = metrics.topk_correct(logits, labels, k)
    assert got.dtype == torch.bool and got.shape == (64,)
    assert got.tolist() == _loop_topk(logits, labels, k)
    expected = sum(_loop_topk(logits, labels, k)) / 64
    assert metrics.topk_accuracy(logits, labels, k).item() == pytest.approx(expected)


def test_topk_matches_torch_topk_without_ties():
    logits, labels = _logits_labels(b=50, c=10, seed=5, dtype=torch.float32)
    for k in (1, 3, 5):
        ref = (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1)
        assert torch.equal(metrics.topk_correct(logits, labels, k), ref)


def test_accuracy_is_argmax_with_its_tie_rule():
    logits = torch.zeros(4, 10)  # all tied: argmax picks class 0
    labels = torch.tensor([0, 1, 0, 9])
    assert metrics.accuracy(logits, labels).item() == pytest.approx(0.5)
    logits, labels = _logits_labels(b=40, seed=7, dtype=torch.float32)
    ref = (logits.argmax(-1) == labels).float().mean()
    assert metrics.accuracy(logits, labels).dtype == torch.float32
    assert torch.equal(metrics.accuracy(logits, labels), ref)
    assert torch.equal(metrics.rank_of_label(logits, labels) == 0, logits.argmax(-1) == labels)


def test_nan_rows_are_wrong():
    logits = torch.tensor([[0.0, 5.0, float("nan")], [float("nan")] * 3, [0.0, 5.0, 1.0]])
    labels = torch.tensor([1, 0, 1])
    assert metrics.topk_correct(logits, labels, 3).tolist() == [False, False, True]


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError):
        metrics.topk_correct(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 0)


def test_confusion_matrix_matches_loop():
    g = _gen(11)
    preds = torch.randint(0, 10, (200,), generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    cm = metrics.confusion_matrix(preds, labels)
    ref = torch.zeros(10, 10, dtype=torch.int64)
    for p, t in zip(preds.tolist(), labels.tolist(), strict=True):
        ref[t, p] += 1  # rows true, columns predicted
    assert cm.dtype == torch.int64
    assert torch.equal(cm, ref)
    logits = F.one_hot(preds, 10).float()
    assert torch.equal(metrics.confusion_matrix(logits, labels), ref)  # logits are argmaxed
    small = metrics.confusion_matrix(torch.tensor([0, 2, 2]), torch.tensor([1, 2, 1]), num_classes=3)
    assert small.tolist() == [[0, 0, 0], [1, 0, 1], [0, 0, 1]]


def test_precision_recall_matches_loop_and_handles_zero_division():
    # class 3 is never predicted (precision 0), class 4 never occurs (recall 0)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 2, 4])
    cm = metrics.confusion_matrix(preds, labels, num_classes=5)
    precision, recall = metrics.precision_recall(cm)
    assert precision.shape == (5,) and recall.shape == (5,)
    assert not torch.isnan(precision).any() and not torch.isnan(recall).any()
    ref_p, ref_r = [], []
    for c in range(5):
        tp = sum(1 for p, t in zip(preds.tolist(), labels.tolist(), strict=True) if p == c and t == c)
        npred = sum(1 for p in preds.tolist() if p == c)
        nact = sum(1 for t in labels.tolist() if t == c)
        ref_p.append(tp / npred if npred else 0.0)
        ref_r.append(tp / nact if nact else 0.0)
    assert precision.tolist() == pytest.approx(ref_p)
    assert recall.tolist() == pytest.approx(ref_r)
    assert precision[3].item() == 0.0 and recall[4].item() == 0.0
    zero_p, zero_r = metrics.precision_recall(torch.zeros(3, 3, dtype=torch.int64))
    assert zero_p.tolist() == [0.0, 0.0, 0.0] and zero_r.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# torch.compile: everything traces as one graph (no .item(), no host branching)


@pytest.mark.cross_path
def test_compile_fullgraph():
    torch._dynamo.reset()

    def everything(logits, labels):
        cm = metrics.confusion_matrix(logits, labels)
        p, r = metrics.precision_recall(cm)
        return (
            losses.cross_entropy(logits, labels, label_smoothing=0.1),
            losses.mse(logits, torch.zeros_like(logits)),
            metrics.accuracy(logits, labels),
            metrics.topk_accuracy(logits, labels, 3),
            cm,
            p,
            r,
        )

    compiled = torch.compile(everything, backend="aot_eager", fullgraph=True)
    logits, labels = _logits_labels(b=12, dtype=torch.float32)
    for got, want in zip(compiled(logits, labels), everything(logits, labels), strict=True):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
