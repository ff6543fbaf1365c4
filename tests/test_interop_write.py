"""Exported files that cannot be written: the error names the file and what it is, not "checkpoint"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fashion_func import atomic, checkpoint, interop, models


def _weights() -> dict[str, torch.Tensor]:
    return models.get("mlp").init(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["w.npz", "w.safetensors"])
def test_save_numpy_failure_names_the_file(tmp_path: Path, name: str) -> None:
    target = tmp_path / "missing-dir" / name
    with pytest.raises(atomic.WriteError) as info:
        interop.save_numpy(target, _weights())
    assert not isinstance(info.value, checkpoint.CheckpointError)
    message = str(info.value)
    assert message.startswith(f"cannot write weights file {target}:")
    assert "checkpoint" not in message and "\n" not in message


def test_save_flax_failure_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "w.safetensors"
    with pytest.raises(atomic.WriteError, match=r"^cannot write weights file .*missing-dir"):
        interop.save_flax(target, _weights())


def test_save_onnx_failure_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "m.onnx"
    with pytest.raises(atomic.WriteError) as info:
        interop.save_onnx(target, "mlp", _weights())
    assert str(info.value).startswith(f"cannot write ONNX model {target}:")
    assert "checkpoint" not in str(info.value)


def test_export_command_reports_a_failed_write_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fashion_func.cli import export

    src = tmp_path / "best.safetensors"
    checkpoint.save_weights(src, _weights(), metadata={"model": "mlp"})

    def refuse(path: object, data: bytes, *, what: str = "file") -> None:  # a full disk
        raise atomic.WriteError(f"cannot write {what} {path}: No space left on device")

    monkeypatch.setattr(atomic, "write_bytes", refuse)
    out = tmp_path / "w.npz"
    assert export.main(["--weights", str(src), "--format", "numpy", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"export.py: error: cannot write weights file {out}: No space left on device"
    assert not out.exists()
