"""Every environment value the package reads is parsed and range-checked like a flag
(`fashion_func.env`): one table of variables, each tried with good and bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fashion_func import data, distributed, env
from fashion_func.cli import launch
from fashion_func.loop import RunError

PKG = Path(__file__).resolve().parents[1] / "fashion_func"

TORCHRUN = {
    "RANK": "1",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def _world() -> tuple[int, int, int]:
    return distributed.env_world()


def _data_dir() -> Path:
    return data.locate(download=False)[0]


# variable -> (the call that reads it, the error it raises, good values, bad values)
TABLE = {
    "FASHION_FUNC_DIST_TIMEOUT": (
        launch._timeout_s,
        RunError,
        ["1", "30", " 60 ", "604800", "1e3"],
        ["inf", "-inf", "nan", "0", "-1", "1e-9", "0.5", "1e400", "604801", "abc", "1 0", "\x00", "٣٠"],
    ),
    "RANK": (_world, distributed.WorldError, ["0", "3"], ["-1", "4", "1e3", "1_0", "٣", " 1", "x", "9" * 30]),
    "LOCAL_RANK": (_world, distributed.WorldError, ["0", "3"], ["-1", "4", "0x1", "1.0"]),
    "WORLD_SIZE": (_world, distributed.WorldError, ["4", "1024"], ["0", "-4", str(1 << 21), "4.0", "inf"]),
    "MASTER_ADDR": (_world, distributed.WorldError, ["localhost", "10.0.0.1"], ["a b", "x" * 300, "\x1b[2J"]),
    "MASTER_PORT": (_world, distributed.WorldError, ["1", "65535"], ["0", "65536", "-1", "http", "29500 "]),
    "FASHION_MNIST_DIR": (
        _data_dir,
        data.DataError,
        ["<good>"],
        ["<missing>", "<empty>", "<file>", "a\x00b"],
    ),
}


def test_the_table_covers_every_variable_the_package_reads():
    assert set(TABLE) == set(env.VARIABLES)
    # reads go through fashion_func.env only (presence checks such as `"RANK" in os.environ` aside)
    read = re.compile(r"os\.environ\.get|os\.environ\[|getenv\(")
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if p.name != "env.py" and read.search(p.read_text())
    ]
    assert offenders == []


def _value(text: str, tmp_path: Path) -> str:
    """Placeholders for FASHION_MNIST_DIR's values, built in tmp_path."""
    from test_data import make_dataset  # tests/ is on sys.path under pytest

    if text == "<good>":
        make_dataset(tmp_path / "good")
        return str(tmp_path / "good")
    if text == "<empty>":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty")
    if text == "<file>":
        (tmp_path / "file").write_bytes(b"x")
        return str(tmp_path / "file")
    return str(tmp_path / "missing") if text == "<missing>" else text


CASES = [
    (n, v, ok)
    for n, (_, _, good, bad) in TABLE.items()
    for ok, vals in ((True, good), (False, bad))
    for v in vals
]


@pytest.mark.parametrize(("name", "text", "ok"), CASES)
def test_each_value_is_accepted_or_refused_in_one_line_naming_the_variable(
    name, text, ok, tmp_path, monkeypatch
):
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.delenv("FASHION_FUNC_DIST_TIMEOUT", raising=False)
    call, error, _, _ = TABLE[name]
    value = _value(text, tmp_path)
    if "\x00" in value:  # the OS itself refuses such a value: set it through a stand-in
        monkeypatch.setattr(env.os, "environ", {**env.os.environ, name: value})
    else:
        monkeypatch.setenv(name, value)
    if ok:
        call()
        return
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert name in msg and "\n" not in msg


@pytest.mark.parametrize("name", sorted(env.VARIABLES))
def test_an_empty_value_counts_as_unset(name, monkeypatch):
    monkeypatch.setenv(name, "")
    assert env._raw(name) is None
