"""The predictor: its numbers equal an independent plain-module evaluation, images round-trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from reference import SimpleNet, briefly_trained_simplenet

from fashion_func import checkpoint, data, interop, models, optim
from fashion_func import state as state_lib
from fashion_func.cli import predict

ROOT = Path(__file__).resolve().parents[1]
N_EVAL = 1000


def _plain_logits(weights: Path, images_uint8: torch.Tensor) -> torch.Tensor:
    module = SimpleNet().eval()
    module.load_state_dict(safetensors.torch.load_file(weights))
    x = (images_uint8.float()[:, None] / 255.0 - 0.2860) / 0.3530  # Fashion-MNIST train statistics
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in x.split(500)])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """SimpleNet trained for one epoch on 2000 training images, saved as fit saves best.safetensors."""
    params = briefly_trained_simplenet(limit=2000, lr=1e-3)
    path = tmp_path_factory.mktemp("weights") / "best.safetensors"
    meta = {"epoch": 1, "model": "simplenet", "config": {"model": "simplenet", "normalize": "dataset"}}
    checkpoint.save_weights(path, params, metadata=meta)
    return path


@pytest.fixture(scope="module")
def test_split() -> data.Split:
    return data.load("test", limit=N_EVAL)


@pytest.fixture(scope="module")
def plain(weights, test_split) -> torch.Tensor:
    """Logits of the first N_EVAL test images from the independent plain module."""
    return _plain_logits(weights, test_split.images)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.cross_path
def test_reported_metrics_equal_an_independent_plain_module_evaluation(capsys, weights, test_split, plain):
    code, out, err = _run(capsys, "--weights", weights, "--limit", N_EVAL, "--json", "--device", "cpu")
    assert code == 0, err
    report = _last_json(out)

    logits = plain
    labels = test_split.labels.numpy()
    pred = logits.argmax(1).numpy()
    correct = int((pred == labels).sum())
    # ours vs the module (float32, other kernels) agree within 1e-5: with no top-2 (top-5) pair
    # closer than 1e-4 they pick the same classes, so the counts below are exact
    ranked = logits.sort(dim=1, descending=True).values
    assert float((ranked[:, :5] - ranked[:, 1:6]).min()) > 1e-4
    assert 0.6 < correct / N_EVAL < 0.95  # a briefly trained model: far from chance and from perfect
    assert report["num_examples"] == N_EVAL
    assert report["correct"] == correct
    assert report["accuracy"] == correct / N_EVAL
    top5 = (logits.topk(5, dim=1).indices == test_split.labels[:, None]).any(1).sum().item()
    assert report["topk"] == 5 and report["topk_accuracy"] == top5 / N_EVAL

    cm = np.zeros((10, 10), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    assert report["confusion_matrix"] == cm.tolist()
    assert [c["name"] for c in report["per_class"]] == list(data.CLASS_NAMES)
    for c, row in enumerate(report["per_class"]):
        assert row["support"] == int((labels == c).sum())
        assert row["precision"] == pytest.approx(cm[c, c] / max(cm[:, c].sum(), 1), abs=1e-6)
        assert row["recall"] == pytest.approx(cm[c, c] / cm[c].sum(), abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, test_split.labels).item()
    assert report["loss"] == pytest.approx(loss, rel=1e-4)
    # the human-readable part states the same accuracy
    assert f"accuracy {correct / N_EVAL:.4f} ({correct}/{N_EVAL})" in out


def test_out_writes_pictures_and_the_most_confident_mistakes(capsys, weights, test_split, plain, tmp_path):
    n = 500
    code, _, err = _run(capsys, "--weights", weights, "--limit", n, "--out", tmp_path, "--num-confused", 8)
    assert code == 0, err
    for name in ("confusion_matrix.png", "samples.png", "most_confused.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 100
    confused = json.loads((tmp_path / "most_confused.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["most_confused"] == confused

    # independent: softmax of the plain module; the 8 wrong predictions with the highest probability
    probs = torch.softmax(plain[:n], 1).numpy()
    labels = test_split.labels[:n].numpy()
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    expected = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:8]
    assert [c["index"] for c in confused] == expected.tolist()
    for c in confused:
        i = c["index"]
        assert c["label"] == labels[i] != c["pred"] == pred[i]
        assert (c["label_name"], c["pred_name"]) == (data.CLASS_NAMES[labels[i]], data.CLASS_NAMES[pred[i]])
        assert c["confidence"] == pytest.approx(probs[i, pred[i]], abs=1e-5)
        assert c["label_prob"] == pytest.approx(probs[i, labels[i]], abs=1e-5)


def test_exact_png_copies_of_test_images_classify_like_the_tensors(
    capsys, weights, test_split, plain, tmp_path
):
    images = test_split.images[:12]
    for i, img in enumerate(images):
        Image.fromarray(img.numpy()).save(tmp_path / f"{i:02d}.png")
        with Image.open(tmp_path / f"{i:02d}.png") as im:
            assert torch.equal(predict.prepare_image(im), img)  # the conversion is the identity here
    code, out, err = _run(capsys, "--weights", weights, "--images", tmp_path, "--json")
    assert code == 0, err
    results = _last_json(out)["images"]
    assert [Path(r["path"]).name for r in results] == [f"{i:02d}.png" for i in range(12)]

    probs = torch.softmax(plain[:12], 1)
    top = probs.topk(3, dim=1)
    for r, values, classes in zip(results, top.values, top.indices, strict=True):
        assert [t["class"] for t in r["top3"]] == classes.tolist()
        assert [t["name"] for t in r["top3"]] == [data.CLASS_NAMES[c] for c in classes]
        np.testing.assert_allclose([t["prob"] for t in r["top3"]], values.numpy(), atol=1e-5)
    assert f"{results[0]['path']}: {results[0]['top3'][0]['name']}" in out


def _plain_tta_probs(weights: Path, images_uint8: torch.Tensor) -> torch.Tensor:
    """A plain loop, independent of make_eval_step: the mean of softmax(module(x)) and
    softmax(module(flip(x))), the flip left-right (the last axis of [B, 1, H, W])."""
    module = SimpleNet().eval()
    module.load_state_dict(safetensors.torch.load_file(weights))
    x = (images_uint8.float()[:, None] / 255.0 - 0.2860) / 0.3530  # Fashion-MNIST train statistics
    probs = []
    with torch.no_grad():
        for chunk in x.split(100):
            plain_p = torch.softmax(module(chunk), dim=1)
            mirror_p = torch.softmax(module(torch.flip(chunk, dims=[3])), dim=1)
            probs.append((plain_p + mirror_p) / 2)
    return torch.cat(probs)


@pytest.fixture(scope="module")
def second_weights(tmp_path_factory) -> Path:
    """Another briefly trained SimpleNet (other data, other lr): a second ensemble member."""
    path = tmp_path_factory.mktemp("weights2") / "best.safetensors"
    meta = {"epoch": 1, "model": "simplenet", "config": {"model": "simplenet", "normalize": "dataset"}}
    checkpoint.save_weights(path, briefly_trained_simplenet(limit=768, lr=2e-3), metadata=meta)
    return path


@pytest.mark.cross_path
def test_tta_accuracy_equals_a_plain_flip_averaging_loop(capsys, weights, test_split, plain):
    n = 300
    code, out, err = _run(capsys, "--weights", weights, "--limit", n, "--tta", "--json", "--device", "cpu")
    assert code == 0, err
    report = _last_json(out)
    probs = _plain_tta_probs(weights, test_split.images[:n])
    labels = test_split.labels[:n]
    correct = int((probs.argmax(1) == labels).sum())
    top2 = probs.topk(2, dim=1).values  # no near tie (the CLI's probabilities are within 1e-6): exact counts
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-5
    assert report["tta"] is True and report["num_examples"] == n
    assert report["correct"] == correct and report["accuracy"] == correct / n
    # the loss is that of the averaged probabilities, not of the plain logits
    loss = torch.nn.functional.nll_loss(probs.log(), labels).item()
    assert report["loss"] == pytest.approx(loss, rel=1e-4)
    assert report["loss"] != pytest.approx(
        torch.nn.functional.cross_entropy(plain[:n], labels).item(), rel=1e-3
    )
    assert "test-time augmentation" in out


def test_tta_of_an_ensemble_flip_averages_each_member(capsys, weights, second_weights, test_split):
    n = 300
    code, out, err = _run(
        capsys, "--weights", weights, second_weights, "--limit", n, "--tta", "--json", "--device", "cpu"
    )
    assert code == 0, err
    report = _last_json(out)
    labels = test_split.labels[:n]
    member_probs = [_plain_tta_probs(w, test_split.images[:n]) for w in (weights, second_weights)]
    for r, probs in zip(report["members"], member_probs, strict=True):
        assert r["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).double().mean()), abs=1e-12)
    ensemble_probs = torch.stack(member_probs).mean(0)  # the ensemble: the mean of the members' probabilities
    assert report["correct"] == int((ensemble_probs.argmax(1) == labels).sum())


def test_tta_classifies_image_files_by_the_mean_with_their_mirror_images(
    capsys, weights, test_split, tmp_path
):
    images = test_split.images[:6]
    for i, img in enumerate(images):
        Image.fromarray(img.numpy()).save(tmp_path / f"{i:02d}.png")
    code, out, err = _run(capsys, "--weights", weights, "--images", tmp_path, "--tta", "--json")
    assert code == 0, err
    top = _plain_tta_probs(weights, images).topk(3, dim=1)
    for r, values, classes in zip(_last_json(out)["images"], top.values, top.indices, strict=True):
        assert [t["class"] for t in r["top3"]] == classes.tolist()
        np.testing.assert_allclose([t["prob"] for t in r["top3"]], values.numpy(), atol=1e-5)


def _dark_on_light_photo(img: np.ndarray, margins: tuple[int, int, int, int]) -> Image.Image:
    """A test image as a product photo: negated, 4x larger, off-centre on a white RGB canvas."""
    big = np.kron(255 - img, np.ones((4, 4), dtype=np.uint8))
    top, bottom, left, right = margins
    canvas = np.full((big.shape[0] + top + bottom, big.shape[1] + left + right), 255, dtype=np.uint8)
    canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
    return Image.fromarray(np.stack([canvas] * 3, axis=-1))


def test_a_dark_on_light_photo_is_brought_back_to_the_dataset_frame(
    capsys, weights, test_split, plain, tmp_path
):
    n = 24
    originals = test_split.images[:n]
    rng = np.random.default_rng(0)
    for i, img in enumerate(originals):
        photo = _dark_on_light_photo(img.numpy(), tuple(int(m) for m in rng.integers(0, 50, size=4)))
        photo.save(tmp_path / f"photo{i:02d}.png")
        converted = predict.prepare_image(photo, invert=True)
        assert converted.shape == (28, 28) and converted.dtype == torch.uint8
        # background black and highlights at full scale, like the dataset
        assert converted[0, 0] == 0 and converted.max() == 255
        # without --invert the white canvas is taken as the object: a different image
        assert not torch.equal(predict.prepare_image(photo), converted)
    converted = torch.stack(
        [predict.prepare_image(Image.open(tmp_path / f"photo{i:02d}.png"), invert=True) for i in range(n)]
    )
    # re-centring moves objects by up to half a pixel, so pixels differ a little; classes mostly agree
    assert (converted.float() - originals.float()).abs().mean() < 25
    code, out, err = _run(
        capsys, "--weights", weights, "--images", *sorted(tmp_path.iterdir()), "--invert", "--json"
    )
    assert code == 0, err
    got = [r["top3"][0]["class"] for r in _last_json(out)["images"]]
    expected = plain[:n].argmax(1).tolist()
    assert np.mean(np.array(got) == np.array(expected)) >= 0.8


def test_prepare_image_handles_transparency_and_16_bit(tmp_path):
    rgba = np.zeros((40, 20, 4), dtype=np.uint8)
    rgba[10:30, 5:15] = (200, 200, 200, 255)  # an opaque light box on a transparent background
    out = predict.prepare_image(Image.fromarray(rgba))
    # trimmed to the box, padded to a square (keeping 1:2) and stretched to full scale
    assert (out[:, 8:20] == 255).all()  # full height, the middle half of the width
    assert (out[:, :6] == 0).all() and (out[:, 22:] == 0).all()  # black (transparent) either side
    gray16 = Image.fromarray(np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83)
    expected = np.rint(np.arange(28 * 28).reshape(28, 28) * 83 / 65535 * 255)
    assert np.array_equal(predict.prepare_image(gray16).numpy(), expected.astype(np.uint8))


def _save_state_file(path: Path) -> None:
    model = models.get("mlp")
    st = state_lib.create(model.init(torch.Generator().manual_seed(0)), optim.adam(1e-3), seed=0)
    checkpoint.save_state(path, st, metadata={"model": "mlp"})


def test_user_errors_are_one_line_and_exit_2(capsys, weights, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    state = tmp_path / "last.safetensors"
    _save_state_file(state)
    nameless = tmp_path / "nameless.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(weights), nameless)
    not_png = tmp_path / "fake.png"
    not_png.write_text("hello")
    cases = [
        (["--weights", tmp_path / "missing.safetensors"], "no such file"),
        (["--weights", garbage], "garbage.safetensors"),
        (["--weights", state], "train state"),
        (["--weights", nameless, "--limit", "10"], "--model"),
        (["--weights", weights, "--model", "mlp", "--limit", "10"], "weights do not match model"),
        (["--weights", weights, "--model", "resnet99"], "unknown model"),
        (["--weights", weights, "--data-dir", tmp_path / "nowhere"], "--data-dir"),
        (["--weights", weights, "--images", tmp_path / "nope.png"], "no such file"),
        (["--weights", weights, "--images", not_png], "not an image"),
        (["--weights", weights, "--limit", "0"], "--limit"),
        (["--weights", weights, "--bogus"], "unrecognized"),
    ]
    for argv, needle in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert err.startswith("predict.py: error: ") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
        assert "Traceback" not in err


def test_a_file_without_metadata_works_with_model_given(capsys, weights, test_split, plain):
    no_meta = weights.parent / "no_metadata.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(weights), no_meta)  # e.g. a torch export
    code, out, err = _run(capsys, "--weights", no_meta, "--model", "simplenet", "--limit", 300, "--json")
    assert code == 0, err
    expected = (plain[:300].argmax(1) == test_split.labels[:300]).sum()
    assert _last_json(out)["correct"] == int(expected)


def test_tutorial_normalisation_is_read_from_the_config():
    assert interop.normalization({"config": {"normalize": "tutorial"}}) == (0.5, 0.5)
    assert interop.normalization({"config": {"normalize": "dataset"}}) == (data.MEAN, data.STD)
    assert interop.normalization({}) == (data.MEAN, data.STD)


def test_the_script_runs_as_a_program(weights, test_split, plain, tmp_path):
    Image.fromarray(test_split.images[0].numpy()).save(tmp_path / "x.png")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "predict.py"),
            "--weights",
            str(weights),
            "--images",
            str(tmp_path / "x.png"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    top = json.loads(proc.stdout.strip().splitlines()[-1])["images"][0]["top3"][0]["class"]
    assert top == int(plain[0].argmax())


# -- --out is checked before the test set is evaluated (reliability round three) -------------


def _unwritable(folder: Path):
    """os.access as a non-root user sees a read-only `folder` (the tests run as root)."""
    import os

    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    return access


@pytest.mark.parametrize(
    ("layout", "out", "message"),
    [
        ("file", "afile/report", "is not a directory"),
        ("file", "afile/deeper/report", "is not a directory"),
        ("readonly", "ro/report", "cannot be written: no permission to write in"),
        ("readonly", "ro/new/deeper", "cannot be written: no permission to write in"),
        ("readonly", "ro", "cannot be written: no permission to write in"),
    ],
    ids=[
        "parent-is-a-file",
        "grandparent-is-a-file",
        "read-only-parent",
        "read-only-ancestor",
        "read-only-out",
    ],
)
def test_an_out_that_cannot_be_written_is_refused_before_evaluating(
    tmp_path, monkeypatch, capsys, layout, out, message
):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr("os.access", _unwritable(tmp_path / "ro"))
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("the test set was loaded"))
    monkeypatch.setattr(predict, "load_member", lambda *a, **k: pytest.fail("the weights were loaded"))
    code = predict.main(["--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / out).exists() or out == "ro"


def test_a_writable_out_passes_the_check(tmp_path, monkeypatch):
    predict._check_creatable(tmp_path / "new" / "deeper")  # nothing raised, nothing created
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr("os.access", _unwritable(tmp_path / "other"))
    predict._check_creatable(tmp_path / "x")
