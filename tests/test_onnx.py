"""`export.py --format onnx`: a model ONNX Runtime runs on uint8 images to our eval-mode logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (the onnx extra: pip install 'fashion_func[onnx]')"
)

from fashion_func import checkpoint, data, interop, models, optim, step  # noqa: E402
from fashion_func import state as state_lib  # noqa: E402
from fashion_func.cli import export  # noqa: E402


def trained_weights(name: str) -> dict[str, torch.Tensor]:
    """Weights (params, plus buffers for simplenet_bn) after a few Adam steps on real images."""
    model = models.get(name)
    tx = optim.adam(3e-3)
    st = state_lib.create(
        model.init(torch.Generator().manual_seed(0)), tx, seed=0, model_state=model.init_state()
    )
    train_step = step.make_train_step(model, tx, compile=False)
    for b in data.batches(data.load("train", limit=192), 64, seed=0, epoch=1):
        st, _ = train_step(st, b)
    return interop.merge_state(st.params, st.model_state)


def eval_logits(name: str, weights: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    model = models.get(name)
    params, state = interop.split_state(model, weights)
    with torch.no_grad():
        out = model.apply(params, x, state=state) if model.stateful else model.apply(params, x)
    return (out[0] if model.stateful else out).numpy()


# (model, the weights file's config, the (mean, std) the ONNX graph must normalise with)
CASES = [
    ("simplenet", {"normalize": "dataset", "lr": 0.001}, (data.MEAN, data.STD)),
    ("simplenet_bn", None, (data.MEAN, data.STD)),  # no config: the dataset's, as predict.py does
    ("mlp", {"normalize": "tutorial"}, (data.TUTORIAL_MEAN, data.TUTORIAL_STD)),
    ("dpcnn", {"normalize": "dataset"}, (data.MEAN, data.STD)),
]


@pytest.mark.parametrize(("name", "config", "norm"), CASES, ids=[c[0] for c in CASES])
def test_onnx_export_runs_in_onnxruntime_to_our_logits(capsys, tmp_path, name, config, norm):
    weights = trained_weights(name)
    src = tmp_path / "best.safetensors"
    meta = {"model": name, "epoch": 3, **({"config": config} if config else {})}
    checkpoint.save_weights(src, weights, metadata=meta)
    out = tmp_path / f"{name}.onnx"
    assert export.main(["--weights", str(src), "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out}: {name} weights" in capsys.readouterr().out

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [28, 28]
    assert isinstance(inp.shape[0], str)  # a symbolic, free batch axis
    assert [o.name for o in session.get_outputs()] == ["logits"]
    props = session.get_modelmeta().custom_metadata_map
    assert props["model"] == name and props["input"] == "uint8 [B,28,28]"
    assert (float(props["normalize_mean"]), float(props["normalize_std"])) == norm
    assert props["epoch"] == "3" and props["source"] == str(src)

    images = data.load("test", limit=64).images  # uint8 [64, 28, 28], as a client has them
    expected = eval_logits(name, weights, data.normalize(images, *norm))
    for n in (64, 3):  # any batch size
        (got,) = session.run(None, {"images": images[:n].numpy()})
        assert got.shape == (n, 10) and got.dtype == np.float32
        assert np.abs(got - expected[:n]).max() <= 1e-4
    assert np.abs(expected).max() > 0.5  # trained weights: the comparison is not of near-zero logits


@pytest.mark.cross_path
def test_the_onnx_graph_normalises_images_bitwise_as_training_does(tmp_path):
    """The exported wrapper's normalisation (the model replaced by the identity) run by ONNX
    Runtime gives exactly the float32 inputs the train and eval steps' preprocess gives."""
    from fashion_func import preprocess
    from fashion_func.interop import onnx_io

    images = data.load("test", limit=64).images
    all_values = (torch.arange(2 * 28 * 28) % 256).to(torch.uint8).reshape(2, 28, 28)  # every pixel value
    for mean, std in ((data.MEAN, data.STD), (data.TUTORIAL_MEAN, data.TUTORIAL_STD)):
        wrapper = onnx_io._ImagesToLogits(torch.nn.Identity(), mean, std).eval()
        path = tmp_path / f"normalise-{mean}.onnx"
        example = torch.zeros((2, 28, 28), dtype=torch.uint8)
        program = torch.onnx.export(wrapper, (example,), input_names=["images"], output_names=["x"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)  # fmt: skip
        path.write_bytes(program.model_proto.SerializeToString())
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        training = step.NormalizeImages(mean, std)  # what the train and eval steps run
        for x in (images, all_values):
            (got,) = session.run(None, {"images": x.numpy()})
            want = training(x).contiguous().numpy()
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # bitwise
            assert np.array_equal(want, preprocess.normalize(x, mean, std).numpy())


def test_onnx_export_of_a_dpcnn_with_group_norm_uses_the_recorded_group_count(capsys, tmp_path):
    """dpcnn's `groups` is not in its weights' shapes: export takes it from the file's model_hparams."""
    model = models.get("dpcnn", groups=4)
    g = torch.Generator().manual_seed(0)
    params = model.init(g)
    params = {
        k: v + 0.3 * torch.randn(v.shape, generator=g) if k.startswith("gn") else v for k, v in params.items()
    }
    src, out = tmp_path / "best.safetensors", tmp_path / "dpcnn.onnx"
    checkpoint.save_weights(src, params, metadata={"model": "dpcnn", "model_hparams": model.hparams})
    assert export.main(["--weights", str(src), "--format", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    images = data.load("test", limit=32).images
    x = data.normalize(images, data.MEAN, data.STD)
    with torch.no_grad():
        expected = model.apply(params, x).numpy()
        one_group = models.get("dpcnn", groups=1).apply(params, x).numpy()
    assert np.abs(one_group - expected).max() > 1e-2  # the group count changes the logits
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()}
    )
    assert np.abs(got - expected).max() <= 1e-4
