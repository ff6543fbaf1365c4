"""`--preset private_features`: DP-SGD on fixed ScatterNet features (Tramèr & Boneh 2021).

The features against kymatio called directly; the heads (`scatternet`, and the preset's
`scatternet_ms`) against their plain modules and torch's own layers; privacy is whole (an
image's features and logits are a function of that image alone, and the record says no data
statistic is used); one short run of the preset
(2,500 training images, batch 256, 2 epochs, compile off): Poisson sampling and the per-example
stage, epsilon within the target, each image's features computed once; `predict` on its weights
reproduces its test accuracy; the ONNX export takes images and matches the torch model; without
kymatio, one line naming the pip command.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch.func import grad, vmap

from fashion_func import checkpoint, data, interop, models, privacy, scattering
from fashion_func.cli import app
from fashion_func.cli.config import load_preset
from fashion_func.cli.train import parse_train_args
from fashion_func.loop import RunError

kymatio = pytest.importorskip("kymatio", reason="ScatterNet features need kymatio (the privacy extra)")
pytest.importorskip("opacus", reason="private training's accounting needs Opacus")
try:
    data.locate(download=False)
except data.DataError:
    pytest.skip("Fashion-MNIST is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELD, N_TEST = 2500, 500, 500
ARGS = ["--preset", "private_features", "--limit-train", str(N_TRAIN + N_HELD), "--val-split", str(N_HELD),
        "--limit-val", str(N_TEST), "--batch-size", "256", "--epochs", "2", "--compile", "off",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def _images(n: int = 12) -> torch.Tensor:
    return data.load("test", limit=n, download=False).images


# -- the features -------------------------------------------------------------------------------------


# (model, its transform): Tramèr & Boneh's J=2 features, two scales, and the preset's three
HEADS = [
    ("scatternet", "scattering"),
    ("scatternet_ms", "scattering_ms"),
    ("scatternet_ms3", "scattering_ms3"),
]
MODULES = {"scatternet": interop.ScatterNet, "scatternet_ms": interop.ScatterNetMS}
MODULES["scatternet_ms3"] = interop.ScatterNetMS3


def _kymatio(images: torch.Tensor, kind: str) -> torch.Tensor:
    """The features of `kind` from kymatio called directly: J=2, then J=1 with each 2x2 block of
    its 14x14 grid moved into channels by torch's `pixel_unshuffle` (scattering_ms), then J=3's
    3x3 grid, each block flattened (scattering_ms3)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    x = images.float() / 255
    j2 = ScatteringTorch2D(J=2, shape=(28, 28), L=8)(x)
    if kind == "scattering":
        return j2
    j1 = F.pixel_unshuffle(ScatteringTorch2D(J=1, shape=(28, 28), L=8)(x), 2)
    if kind == "scattering_ms":
        return torch.cat([j2, j1], dim=1)
    j3 = ScatteringTorch2D(J=3, shape=(28, 28), L=8)(x)
    assert j3.shape[1:] == (217, 3, 3)
    return torch.cat([j2.flatten(1), j1.flatten(1), j3.flatten(1)], dim=1)


@pytest.mark.parametrize(
    "kind, shape", [("scattering", (81, 7, 7)), ("scattering_ms", (117, 7, 7)), ("scattering_ms3", (7686,))]
)
def test_the_features_are_kymatios_scattering_of_images_over_255(kind: str, shape: tuple[int, ...]):
    images = _images()
    expected = _kymatio(images, kind)
    got = scattering.features(images, kind, chunk=5)  # chunks of 5, 5, 2: the same features
    assert got.shape == (12, *shape) and got.dtype == torch.float32
    assert scattering.shape(kind) == shape and f"[B,{','.join(map(str, shape))}]" in scattering.describe(kind)
    assert sum(size for size, _ in scattering.blocks(kind)) == math.prod(shape)
    assert torch.equal(got, expected)
    assert torch.equal(scattering.Scattering(kind)(images[:, None]), expected)  # [B, 1, 28, 28] too
    # the ONNX graph's: the same equations, orientations batched; equal in exact arithmetic, so
    # float32 rounding apart (bitwise on the CPU measured: its FFTs and means run op for op)
    batched = scattering.Scattering(kind, batched=True)
    torch.testing.assert_close(batched(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):  # floats would be scaled twice
        scattering.Scattering(kind)(images.float())


def test_an_unknown_transform_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="choose from scattering, scattering_ms, scattering_ms3"):
        scattering.Scattering("scattering_j3")


@pytest.mark.parametrize("name, kind", HEADS)
def test_an_images_features_and_logits_ignore_every_other_image(name: str, kind: str):
    """Privacy is whole: no statistic of the data enters the features or the group norm, so
    changing every other image changes neither image 0's features nor its logits (bitwise)."""
    images = _images()
    others = images.clone()
    noise = torch.Generator().manual_seed(0)
    others[1:] = torch.randint(0, 256, others[1:].shape, dtype=torch.uint8, generator=noise)
    a, b = scattering.features(images, kind), scattering.features(others, kind)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    model = models.get(name)
    assert model.inputs == kind
    params = model.init(torch.Generator().manual_seed(0))
    assert torch.equal(model.apply(params, a)[0], model.apply(params, b)[0])
    norm = model.stages[0].fn  # the group norm: each example by itself, whatever the batch
    assert torch.equal(norm(params, a, False, None)[:1], norm(params, a[:1], False, None))


# -- the head -------------------------------------------------------------------------------------------


class _Reference(tnn.Module):
    """The head from torch's own layers, each scale normalised on its own grid: J=2's 81 channels
    of 7x7 in 27 groups; J=1's channels put back on their 14x14 grid (`pixel_shuffle`) in 3 groups
    of 3; J=3's 217 channels of 3x3 in 7 groups of 31, as the prototype did."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.gn2, self.gn1 = tnn.GroupNorm(27, 81, affine=False), tnn.GroupNorm(3, 9, affine=False)
        self.gn3 = tnn.GroupNorm(7, 217, affine=False)
        self.fc = tnn.Linear(math.prod(scattering.shape(kind)), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        parts = [self.gn2(x[:, :3969].reshape(-1, 81, 7, 7))]
        if self.kind != "scattering":
            j1 = x[:, 3969 : 3969 + 1764].reshape(-1, 36, 7, 7)
            parts.append(F.pixel_unshuffle(self.gn1(F.pixel_shuffle(j1, 2)), 2))
        if self.kind == "scattering_ms3":
            parts.append(self.gn3(x[:, 3969 + 1764 :].reshape(-1, 217, 3, 3)))
        return self.fc(torch.cat([p.flatten(1) for p in parts], dim=1))


@pytest.mark.cross_path
@pytest.mark.parametrize("name, kind", HEADS)
def test_the_head_equals_its_module_and_torchs_own_layers(name: str, kind: str):
    model = models.get(name)
    shape = scattering.shape(kind)
    d = math.prod(shape)
    params = model.init(torch.Generator().manual_seed(1), dtype=torch.float64)
    assert {k: tuple(v.shape) for k, v in params.items()} == {"fc.weight": (10, d), "fc.bias": (10,)}
    assert models.num_params(params) == 10 * d + 10 and not model.stateful
    assert model.input_shape == shape
    module = interop.to_module(name, params).double().eval()
    assert type(module) is MODULES[name] and interop.identify(params) == name
    reference = _Reference(kind).double()
    reference.fc.load_state_dict({"weight": params["fc.weight"], "bias": params["fc.bias"]})
    torch.manual_seed(123)  # nn.Linear draws from the global RNG; ours from a generator, the same way
    drawn = tnn.Linear(d, 10).state_dict()
    fresh = model.init(torch.Generator().manual_seed(123))
    assert all(torch.equal(fresh[f"fc.{k}"], drawn[k]) for k in ("weight", "bias"))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, *shape, dtype=torch.float64, generator=g) * 3
    y = torch.randint(0, 10, (6,), generator=g)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.apply(params, x), expected, rtol=1e-12, atol=1e-12)
    grads = vmap(grad(lambda p, xi, yi: F.cross_entropy(model.apply(p, xi[None]), yi[None])),
                 in_dims=(None, 0, 0))(params, x, y)  # fmt: skip
    for i in range(6):
        reference.zero_grad()
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(grads["fc.weight"][i], reference.fc.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads["fc.bias"][i], reference.fc.bias.grad, rtol=1e-10, atol=1e-12)


# -- the preset, end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The preset, shortened; `features` counted as the app calls it."""
    out = tmp_path_factory.mktemp("private_features") / "run"
    calls: list[int] = []

    def counted(images: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        calls.append(len(images))
        return scattering.features(images, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "features", counted)
        cfg, _ = parse_train_args([*ARGS, "--out", str(out)])
        result = app.train(cfg)
    return {"out": out, "result": result, "calls": calls}


def test_the_preset_is_private_training_on_features(run):
    # what makes the preset (its tuned numbers may change): the paper's budget, model selection
    # on held-out training images, and no normalisation statistic given
    preset = load_preset("private_features")
    assert preset["model"] == "scatternet_ms3" and preset["ema"] > 0  # three scales, a weight average
    assert preset["dp_target_epsilon"] <= 3 and preset["dp_delta"] == 1e-5
    assert preset["val_split"] > 0 and preset["monitor"] == "val_acc" and "normalize" not in preset
    out = run["out"]
    assert run["result"].stop_reason == "completed"
    log = (out / "train.log").read_text()
    assert "private training (DP-SGD): Poisson sampling rate" in log
    meta = checkpoint.read_metadata(out / "checkpoints" / "last.safetensors")
    record = meta["privacy"]
    assert record["sampling"] == "poisson" and record["sample_rate"] == 256 / N_TRAIN
    history = json.loads((out / "history.json").read_text())
    steps = round(N_TRAIN / 256)
    eps = [r["epsilon"] for r in history]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 3.0 and record["steps"] == 2 * steps
    assert record["accountant"] == preset["dp_accountant"]  # the preset's accountant counted the run
    sigma, kind = record["noise_multiplier"], preset["dp_accountant"]
    counted = privacy.epsilon(2 * steps, sample_rate=record["sample_rate"], noise_multiplier=sigma,
                              delta=1e-5, accountant=kind)  # fmt: skip
    assert eps[1] == record["epsilon"] == counted
    assert all(0 < r["train_clipped"] <= 1 for r in history)  # the per-example stage clipped
    assert history[-1]["val_acc"] > 0.5  # two noisy epochs on 2,500 images: well above chance


def test_the_record_says_no_data_statistic_is_used(run):
    """epsilon covers everything: the record names the features and the normalisation, and no
    statistic of the training data; the weights file keeps no normalisation mean or std."""
    for name in ("last", "best"):
        meta = checkpoint.read_metadata(run["out"] / "checkpoints" / f"{name}.safetensors")
        note = scattering.privacy_note("scattering_ms3")
        assert {k: meta["privacy"][k] for k in note} == note
        assert meta["privacy"]["data_statistics"] == "none" and "J=3 channels" in note["normalisation"]
        assert "normalize_mean" not in meta and "scattering J=2 L=8 + J=1 L=8 + J=3 L=8" in meta["features"]
        privacy.check_record(meta["privacy"])  # a record of this run is a valid record
    with pytest.raises(ValueError, match="data_statistics must be a text"):
        privacy.check_record({**meta["privacy"], "data_statistics": 3})
    old = {k: v for k, v in meta["privacy"].items() if k not in note}
    assert privacy.check_record(old) == old  # a record written before the field: accepted


def test_each_images_features_are_computed_once_per_run(run):
    """Once per split (train, held out, test), each image once, for both epochs."""
    assert run["calls"] == [N_TRAIN, N_HELD, N_TEST]


def test_predict_on_the_weights_file_reproduces_the_test_accuracy(run, capsys):
    from fashion_func.cli import predict

    out = run["out"]
    best = out / "checkpoints" / "best.safetensors"
    assert predict.main(["--weights", str(best), "--limit", str(N_TEST), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test = json.loads((out / "test.json").read_text())
    assert test["path"] == str(best) and report["num_examples"] == test["examples"] == N_TEST
    assert report["accuracy"] == test["test_acc"]
    assert report["loss"] == pytest.approx(test["test_loss"], rel=1e-6)
    assert predict.main(["--weights", str(best), "--limit", "10", "--tta"]) == 2  # it would mirror features
    assert "--tta mirrors" in capsys.readouterr().err


def test_the_onnx_export_takes_images_and_matches_the_torch_model(run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra")
    import onnx

    from fashion_func.cli import export

    best = run["out"] / "checkpoints" / "best.safetensors"
    path = tmp_path / "scatternet.onnx"
    assert export.main(["--weights", str(best), "--format", "onnx", "--out", str(path)]) == 0
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["input"] == "uint8 [B,28,28]" and props["normalize_mean"] == "none"
    assert json.loads(props["privacy"])["data_statistics"] == "none"
    images = _images(8)  # ONNX Runtime's DFTs: about 20 ms of CPU an image, 7x torch's (measured)
    logits = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})[0]
    model, weights, _ = interop.load_weights_file(best)
    expected = model.apply(weights, scattering.Scattering(model.inputs)(images))
    # float32 FFTs of two runtimes: a few ulp of the features, scaled by the group norm and fc
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_augmentation_and_tta_are_refused_in_one_line(tmp_path):
    cfg, _ = parse_train_args([*ARGS, "--flip", "--out", str(tmp_path / "flip")])
    with pytest.raises(RunError, match="features of the images computed once") as info:
        app.train(cfg)
    assert "\n" not in str(info.value)


def test_without_kymatio_train_predict_and_export_fail_in_one_line_naming_pip(run, tmp_path):
    best = run["out"] / "checkpoints" / "best.safetensors"
    code = f"""
import sys
sys.modules["kymatio"] = None  # as if not installed: `import kymatio...` raises ImportError
from fashion_func.cli import export, predict
from fashion_func.cli.train import main_train
codes = [main_train({[*ARGS, "--out", str(tmp_path / "no-kymatio")]!r}),
         predict.main(["--weights", {str(best)!r}, "--limit", "10"]),
         export.main(["--weights", {str(best)!r}, "--format", "onnx", "--out", {str(tmp_path / "m.onnx")!r}])]
print(codes)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == "[2, 2, 2]", proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for line, prog in zip(errors, ("train.py", "predict.py", "export.py"), strict=True):
        assert line.startswith(f"{prog}: error: ") and "pip install 'fashion-func[privacy]'" in line, line
