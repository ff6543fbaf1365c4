"""Each model's hyperparameters are checked by name and kind wherever weights are rebuilt
(`models.HPARAMS`, `models.get`, `interop.load_weights_file`, predict, export)."""

from __future__ import annotations

import pytest
import torch

from fashion_func import checkpoint, interop, models
from fashion_func.cli import export, predict
from fashion_func.interop import torch_modules

# what each kind accepts and refuses
GOOD = {
    "size": [1, 28, models.MAX_SIZE],
    "classes": [2, 10, models.MAX_SIZE],
    "rate": [0, 0.0, 0.5, 0.999],
    "groups": [0, 1, 4, 16],  # of dpcnn's default width 16: a group count must divide it
}
BAD = {
    "groups": [-1, 0.5, 4.0, True, "4", None, models.MAX_SIZE + 1, 1 << 64, float("nan")],
    "size": [0, -1, 0.5, 1.0, True, "8", None, models.MAX_SIZE + 1, 1 << 64, float("nan")],
    "classes": [0, 1, -3, 2.0, False, "10", models.MAX_SIZE + 1, float("inf")],
    "rate": [1, 1.0, -0.1, 2, True, "0.5", None, float("nan"), float("inf")],
}
CASES = [(m, h, kind) for m, hp in models.HPARAMS.items() for h, kind in hp.items()]


def test_the_table_names_every_models_hparams():
    assert set(models.HPARAMS) == set(models.MODELS)
    for name in models.MODELS:
        assert set(models.get(name).hparams) == set(models.HPARAMS[name])


@pytest.mark.parametrize(("name", "hparam", "kind"), CASES)
def test_each_hparam_takes_its_kind_only(name, hparam, kind):
    for v in GOOD[kind]:
        models.check_hparams(name, {hparam: v})
    for v in BAD[kind]:
        with pytest.raises(ValueError, match=f"model {name}: {hparam} must be") as info:
            models.get(name, **{hparam: v})
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="no hyperparameter"):
        models.get(name, rate=0.1)


def _file(tmp_path, name: str, hparams: dict, recorded: dict | None = None):
    """A weights file of `name` built with `hparams`, its metadata recording `recorded`."""
    model = models.MODELS[name](**hparams)
    weights = {**model.init(torch.Generator().manual_seed(0)), **model.init_state()}
    path = tmp_path / f"{name}.safetensors"
    checkpoint.save_weights(
        path, weights, metadata={"model": name, "model_hparams": recorded or model.hparams}
    )
    return path


@pytest.mark.parametrize(("name", "hparam", "kind"), [c for c in CASES if c[2] != "size" or c[0] != "resnet"])
def test_a_file_recording_a_bad_hparam_is_refused_in_one_line_by_predict_and_export(
    tmp_path, capsys, name, hparam, kind
):
    path = _file(tmp_path, name, {}, {**models.get(name).hparams, hparam: BAD[kind][0]})
    assert predict.main(["--weights", str(path), "--limit", "10"]) == 2
    assert (
        export.main(["--weights", str(path), "--format", "torch", "--out", str(tmp_path / "o.safetensors")])
        == 2
    )
    err = capsys.readouterr().err
    assert f"{hparam} must be" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "hparams"),
    [("mlp", {"D_out": 2}), ("mlp", {"D_out": 3}), ("mlp", {"D_in": 100}),
     ("simplenet", {"num_classes": 2}), ("simplenet_bn", {"num_classes": 1000}),
     ("alexnet", {"num_classes": 3}), ("resnet", {"num_classes": 2, "width": 2}),
     ("dpcnn", {"num_classes": 2, "groups": 2})],
)  # fmt: skip
def test_predict_refuses_what_is_not_a_10_class_classifier_of_28x28_images(tmp_path, capsys, name, hparams):
    path = _file(tmp_path, name, hparams)
    assert predict.main(["--weights", str(path), "--limit", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "10-class classifier of 28x28 images" in err


def test_recorded_one_class_mlp_is_refused_on_load(tmp_path):
    path = _file(tmp_path, "mlp", {"D_out": 2}, {"D_in": 784, "H": 100, "D_out": 1})
    with pytest.raises(checkpoint.CheckpointError, match="D_out must be an integer from 2"):
        interop.load_weights_file(path)


# -- export's --out and formats (the small ones) ------------------------------------------


@pytest.mark.parametrize(
    ("out", "message"),
    [("", "--out is empty"), (".safetensors", "empty name before .safetensors"),
     ("dir/.SAFETENSORS", "empty name before .SAFETENSORS")],
)  # fmt: skip
def test_export_names_an_empty_out_as_empty(tmp_path, capsys, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    path = _file(tmp_path, "mlp", {})
    assert export.main(["--weights", str(path), "--format", "torch", "--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and "'.'" not in err and "must end in" not in err


def test_export_flax_refuses_a_model_no_flax_module_reads(tmp_path, capsys, monkeypatch):
    path = _file(tmp_path, "resnet", {"width": 2})
    out = tmp_path / "f.safetensors"
    # every shipped model has a Flax module now; one without is refused, not written
    monkeypatch.setattr(export, "FLAX_MODELS", ("mlp", "simplenet", "simplenet_bn", "alexnet"))
    assert export.main(["--weights", str(path), "--format", "flax", "--out", str(out)]) == 2
    assert "no Flax module reads a resnet" in capsys.readouterr().err and not out.exists()


def test_flax_models_constant_matches_the_modules():
    from fashion_func.interop import flax_modules

    assert set(flax_modules.FLAX_MODELS) == set(flax_modules._flax_classes())


# -- dpcnn's group count: a kind of its own, and a divisor of the width -----------------------------


@pytest.mark.parametrize(
    ("hparams", "width"),
    [
        ({"groups": 3}, 16),
        ({"groups": 32}, 16),
        ({"width": 6, "groups": 4}, 6),
        ({"width": 1, "groups": 2}, 1),
    ],
)
def test_dpcnn_groups_must_divide_the_width_in_one_line(hparams, width):
    for build in (lambda: models.get("dpcnn", **hparams), lambda: torch_modules.build("dpcnn", hparams)):
        with pytest.raises(ValueError, match=rf"model dpcnn: groups must divide width \({width}\)") as info:
            build()
        assert "\n" not in str(info.value)


def test_dpcnn_groups_that_divide_the_width_build_group_norms():
    models.check_hparams("dpcnn", {"width": models.MAX_SIZE, "groups": models.MAX_SIZE})
    model = models.get("dpcnn", width=6, groups=3)
    params = model.init(torch.Generator().manual_seed(0))
    assert params["gn1.weight"].shape == (6,) and params["gn2.weight"].shape == (12,)
    assert "gn1.weight" not in models.get("dpcnn", groups=0).init(torch.Generator().manual_seed(0))


def test_a_file_recording_groups_that_do_not_divide_its_width_is_refused(tmp_path, capsys):
    path = _file(tmp_path, "dpcnn", {"groups": 4}, {"num_classes": 10, "width": 16, "groups": 3})
    assert predict.main(["--weights", str(path), "--limit", "10"]) == 2
    err = capsys.readouterr().err
    assert "groups must divide width (16)" in err and "Traceback" not in err
