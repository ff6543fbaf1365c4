"""Augmentation: pure functions of (key, images), checked against per-image loops; inside the
train step it is a function of (seed, step), so runs repeat and resume bitwise."""

from __future__ import annotations

import pytest
import torch

from fashion_func import augment, ensemble, loop, models, optim
from fashion_func import state as state_lib
from fashion_func.step import NormalizeImages, make_train_step
from tests.reference import assert_argmax_agrees, assert_tree_equal


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_random_crop_equals_padding_and_slicing_each_image_at_its_offset():
    x, key, pad = _images(), torch.tensor(7), 3
    out = augment.random_crop(key, x, pad)
    off = augment._offsets(key, x.shape[0], 2 * pad, augment._CROP)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(x.shape[0]):
        dy, dx = off[i].tolist()
        assert 0 <= dy <= 2 * pad and 0 <= dx <= 2 * pad
        assert torch.equal(out[i], padded[i, dy : dy + 28, dx : dx + 28])
    assert len({tuple(o) for o in off.tolist()}) > 4  # the offsets do vary across the batch
    assert torch.equal(augment.random_crop(key, x, 0), x)


def test_random_crop_keeps_channels_and_works_on_float_batches():
    x = torch.randn(4, 3, 10, 12)
    out = augment.random_crop(torch.tensor(1), x, 2)
    off = augment._offsets(torch.tensor(1), 4, 4, augment._CROP)
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(4):
        dy, dx = off[i].tolist()
        assert torch.equal(out[i], padded[i, :, dy : dy + 10, dx : dx + 12])


def test_hflip_mirrors_about_half_of_the_images_and_cutout_blanks_one_square():
    x, key = _images(200), torch.tensor(3)
    out = augment.hflip(key, x)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(out[i], x[i]) for i in range(200)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 60 < sum(flipped) < 140
    x = torch.full((50, 28, 28), 9, dtype=torch.uint8)
    out = augment.cutout(key, x, 8)
    zeros = (out == 0).sum(dim=(1, 2))
    assert bool((zeros >= 16).all()) and bool((zeros <= 64).all())  # clipped at the border at worst
    for i in range(50):  # the zeros form one axis-aligned rectangle
        ys, xs = torch.nonzero(out[i] == 0, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert h * w == int(zeros[i]) and h <= 8 and w <= 8


def test_augment_is_a_pure_function_of_the_key_and_plain_without_one():
    aug = augment.Augment(NormalizeImages(), crop_padding=2, flip=True, cutout=6)
    x = _images()
    a, b = aug(x, key=torch.tensor(5)), aug(x, key=torch.tensor(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, key=torch.tensor(6)))
    assert torch.equal(aug(x), NormalizeImages()(x))  # evaluation: no key, no augmentation
    # the base's layout survives (NHWC on CPU), so the convolutions stay channels-last
    assert a.stride() == NormalizeImages()(x).stride()


def _run(preprocess, steps: int = 4, compile="update"):
    model, tx = models.get("simplenet"), optim.adam(1e-3)
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=1)
    step = make_train_step(model, tx, preprocess=preprocess, compile=compile)
    x, y = _images(32, 1), torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        st, _ = step(st, (x, y))
    return st


def test_the_train_step_augments_per_step_and_repeats_exactly():
    aug = augment.Augment(NormalizeImages(), crop_padding=2, flip=True, cutout=8)
    a, b = _run(aug, compile=False), _run(aug, compile=False)
    assert_tree_equal(a.params, b.params)
    plain = _run(NormalizeImages(), compile=False)
    assert not torch.equal(a.params["conv1.weight"], plain.params["conv1.weight"])


def test_augmented_fit_resumes_bitwise(tmp_path):
    model, tx = models.get("mlp", D_in=784), optim.adam(1e-3)
    aug = augment.Augment(NormalizeImages(channels_last=False), crop_padding=2, flip=True, cutout=6)
    step = make_train_step(model, tx, preprocess=aug, compile=False)
    g = torch.Generator().manual_seed(0)
    batches = [(_images(16, i), torch.randint(0, 10, (16,), generator=g)) for i in range(6)]

    def fresh():
        return state_lib.create(model.init(torch.Generator().manual_seed(0)), tx, seed=3)

    straight = loop.fit(fresh(), step, batches, epochs=2, run_dir=tmp_path / "a")
    loop.fit(fresh(), step, batches, epochs=2, run_dir=tmp_path / "b", max_steps=8)
    # a list gives no position to continue from: its batches are drawn again and dropped (the
    # same list every epoch, so still exact)
    resumed = loop.fit(
        fresh(), step, batches, epochs=2, run_dir=tmp_path / "b", resume="auto", allow_inexact_resume=True
    )
    assert_tree_equal(straight.state.params, resumed.state.params)

    def timeless(history):
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in history]

    assert timeless(straight.history) == timeless(resumed.history)


@pytest.mark.cross_path
def test_ensemble_members_draw_their_own_augmentation():
    """Under vmap each member's key gives its own crops: members with one init diverge."""
    model, tx = models.get("mlp", D_in=784), optim.sgd(0.1, momentum=0.0)
    one = state_lib.create(model.init(torch.Generator().manual_seed(0)), tx)
    ens = ensemble.stack([one.replace(rng=torch.tensor(1)), one.replace(rng=torch.tensor(2))])
    aug = augment.Augment(NormalizeImages(), crop_padding=3, flip=True)
    step = ensemble.make_train_step(model, tx, preprocess=aug, compile=False)
    ens, _ = step(ens, (_images(8), torch.zeros(8, dtype=torch.int64)))
    m0, m1 = ensemble.member(ens, 0), ensemble.member(ens, 1)
    assert not torch.equal(m0.params["linear1.weight"], m1.params["linear1.weight"])
    solo = make_train_step(
        model, tx, preprocess=augment.Augment(NormalizeImages(channels_last=False), 3, True), compile=False
    )
    s1, _ = solo(one.replace(rng=torch.tensor(2)), (_images(8), torch.zeros(8, dtype=torch.int64)))
    torch.testing.assert_close(m1.params["linear1.weight"], s1.params["linear1.weight"], atol=1e-6, rtol=0)


@pytest.mark.cross_path
def test_tta_eval_averages_the_probabilities_of_each_image_and_its_mirror():
    from fashion_func.step import make_eval_step

    model = models.get("simplenet")
    params = model.init(torch.Generator().manual_seed(0))
    x, y = _images(12), torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(1))
    plain = make_eval_step(model, compile=False)
    tta = make_eval_step(model, compile=False, tta=True)(params, (x, y))
    p = plain(params, (x, y))["logits"].softmax(-1)
    q = plain(params, (x.flip(-1), y))["logits"].softmax(-1)
    mean = (p + q) / 2
    torch.testing.assert_close(tta["logits"].exp(), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tta["loss"], -mean[torch.arange(12), y].log(), atol=1e-5, rtol=1e-5)
    assert_argmax_agrees(tta["pred"], mean, 2e-6)  # flip-averaged in the step vs here: 1e-6 above
