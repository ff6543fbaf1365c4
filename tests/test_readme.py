"""The README's Python API runs exactly as written, from a fresh directory."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashion_func import data

ROOT = Path(__file__).resolve().parents[1]


def _api_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _torchvision_raw(root: Path) -> None:
    """torchvision's FashionMNIST layout (`FashionMNIST/raw`, uncompressed IDX files), written
    from the data we find, so that `download=True` finds them and never reaches for the network."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, (images_name, labels_name) in data.FILES.items():
        s = data.load(split, download=False)
        images, labels = s.images.numpy(), s.labels.to(torch.uint8).numpy()
        (raw / images_name).write_bytes(struct.pack(">IIII", 2051, *images.shape) + images.tobytes())
        (raw / labels_name).write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.mark.slow
def test_readme_python_api_runs_as_written(tmp_path: Path) -> None:
    blocks = _api_blocks()
    assert len(blocks) == 8, (
        "the README shows two research uses, extra metrics, extending the step, differentiating through"
        " it, several outputs, the loss as a function and per-example gradients at scale"
    )
    _torchvision_raw(tmp_path / "dataset" / "fashion")
    script = tmp_path / "readme_api.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    loss = float(re.search(r"last batch loss ([0-9.]+)", out).group(1))
    assert 0 < loss < 1.0  # two epochs of 4096 images: well below chance (ln 10 = 2.3)
    assert "per-example gradient norms tensor([" in out
    assert re.search(r"hypergradient -?[0-9.e-]+ finite differences -?[0-9.e-]+", out)
    assert float(re.search(r"two heads: val_acc ([0-9.]+)", out).group(1)) > 0.5  # 1 epoch of 2,048 images
    assert float(re.search(r"top Hessian eigenvalue ([0-9.]+)", out).group(1)) > 0
    assert "largest gradient norms tensor([" in out
    history = json.loads((tmp_path / "runs" / "research" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == pytest.approx([1e-3, 1e-3, 1e-4])  # StepLR(step_size=2)
    assert history[-1]["val_acc"] > 0.7
    assert (tmp_path / "runs" / "research" / "checkpoints" / "last.safetensors").is_file()
    # the extra outputs of the loss and of metrics= reach the history as train_<name> / val_<name>
    found = re.search(r"train_margin ([0-9.e+-]+) val_confident ([0-9.e+-]+)", out)
    assert found is not None, out[-2000:]
    assert float(found.group(1)) > 0 and 0 <= float(found.group(2)) <= 1
    # extending the step: frozen with masked, MultiSteps, warmup_cosine per step, a stateful function
    assert "frozen layer unchanged: True" in out and "second layer trained: True" in out
    assert "running mean: True" in out
