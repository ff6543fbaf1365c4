"""Tests for fashion_func.checkpoint: round trips, validation of bad files, atomic writes, fuzzing, and
bad checkpoints given to `train.py --resume` (the one place for them)."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import safetensors.torch
import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_data import make_dataset  # tests/ is on sys.path under pytest
from test_reliability import one_error_line
from torch import Tensor, nn

from fashion_func import atomic, models, optim, safetensors_io, tree
from fashion_func import checkpoint as ck
from fashion_func import state as state_lib
from fashion_func.checkpoint import CheckpointError, CheckpointWriteError
from fashion_func.cli import app
from fashion_func.cli.config import Config
from fashion_func.cli.train import main_train

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


class AdamLikeState(NamedTuple):
    count: Tensor  # 0-d int64
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


class LrState(NamedTuple):
    lr: Tensor


@dataclasses.dataclass(frozen=True)
class FakeTrainState:
    """Mirrors the lead's TrainState: a frozen dataclass registered as a pytree."""

    step: Tensor
    params: dict[str, Tensor]
    opt_state: tuple
    model_state: dict[str, Tensor]
    rng: Tensor


pytree.register_dataclass(FakeTrainState)


def make_state(seed: int = 0) -> FakeTrainState:
    g = torch.Generator().manual_seed(seed)
    params = {
        "conv1.weight": torch.randn(4, 1, 3, 3, generator=g),
        "conv1.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "emb": torch.randn(2, 3, generator=g).to(torch.bfloat16),
    }
    mu = tree.map(lambda t: t * 0.5, params)
    nu = tree.map(lambda t: t * t, params)
    opt_state = (
        AdamLikeState(torch.tensor(7, dtype=torch.int64), mu, nu),
        LrState(torch.tensor(1e-3)),
    )
    model_state = {"bn.running_mean": torch.randn(4, generator=g), "bn.num_batches_tracked": torch.tensor(9)}
    return FakeTrainState(
        step=torch.tensor(123, dtype=torch.int64),
        params=params,
        opt_state=opt_state,
        model_state=model_state,
        rng=torch.tensor([42, 7], dtype=torch.int64),
    )


def bits(t: Tensor) -> Tensor:
    """The raw bytes of `t`, so comparisons are bitwise (NaN payloads, -0.0, subnormals)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(a: Any, b: Any) -> None:
    fa, fb = tree.flatten_with_paths(a), tree.flatten_with_paths(b)
    assert list(fa) == list(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert fa[k].shape == fb[k].shape, k
        assert torch.equal(bits(fa[k]), bits(fb[k])), k


def craft(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file from a header object and a data region, optionally with a wrong length."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def split(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def expect_error(fn, *args, match: str, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return info.value


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "last.safetensors"
    ck.save_state(path, make_state(), metadata={"epoch": 3})
    return path


# --------------------------------------------------------------------------- round trips


def test_state_round_trip_is_bitwise(tmp_path: Path) -> None:
    state = make_state()
    # values a lossy path would change: -0.0, a subnormal, the float32 extremes
    special = torch.tensor([-0.0, 1e-45, 3.4028235e38, -3.4028235e38])
    state = dataclasses.replace(state, params={**state.params, "special": special})
    before = tree.map(torch.clone, state)
    meta = {"epoch": 5, "best": 0.913, "config": {"model": "simplenet", "lr": [1e-3, 0.5]}, "note": None}
    path = tmp_path / "s.safetensors"

    ck.save_state(path, state, metadata=meta)
    loaded, got_meta = ck.load_state(path, tree.zeros_like(state))

    assert_bitwise_equal(loaded, state)
    assert_bitwise_equal(state, before)  # saving did not touch the caller's tensors
    assert got_meta == meta
    assert type(loaded) is FakeTrainState
    assert type(loaded.opt_state[0]) is AdamLikeState and type(loaded.opt_state[1]) is LrState
    assert loaded.opt_state[0].count.shape == () and loaded.opt_state[0].count.dtype == torch.int64
    assert loaded.params["emb"].dtype == torch.bfloat16
    # the loaded leaves are fresh memory, not views of anything the caller holds
    assert loaded.params["fc.weight"].data_ptr() != state.params["fc.weight"].data_ptr()


def test_file_keys_are_tree_paths(ckpt: Path) -> None:
    info = ck.inspect(ckpt)
    assert info.format == ck.STATE_FORMAT and info.format_version == ck.FORMAT_VERSION
    assert set(info.tensors) == set(tree.flatten_with_paths(make_state()))
    assert "step" in info.tensors
    assert "params/conv1.weight" in info.tensors
    assert "opt_state/0/mu/conv1.weight" in info.tensors
    assert info.tensors["opt_state/0/count"] == (torch.int64, ())
    raw = safetensors.safe_open(str(ckpt), "pt").metadata()
    assert raw == {
        "epoch": "3",
        "__json__": '["epoch"]',
        "format": ck.STATE_FORMAT,
        "format_version": ck.FORMAT_VERSION,
    }


def test_save_copies_non_contiguous_and_shared_leaves(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    # a transposed view and the same tensor twice: safetensors itself refuses both as given
    state = {"t": base.t(), "a": base, "b": base}
    ck.save_state(tmp_path / "x.safetensors", state)
    loaded, _ = ck.load_state(tmp_path / "x.safetensors", tree.zeros_like(state))
    assert torch.equal(loaded["t"], base.t()) and loaded["t"].is_contiguous()
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["b"], base)


def test_load_state_device_argument(ckpt: Path) -> None:
    template = tree.zeros_like(make_state())
    loaded, _ = ck.load_state(ckpt, template, device="cpu")
    assert all(t.device.type == "cpu" for t in tree.leaves(loaded))
    meta_template = tree.map(lambda t: torch.empty_like(t, device="meta"), template)
    loaded, _ = ck.load_state(ckpt, meta_template)  # meta templates give real CPU tensors
    assert_bitwise_equal(loaded, make_state())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path: Path) -> None:
    state = tree.to(make_state(), "cuda")
    path = tmp_path / "cuda.safetensors"
    ck.save_state(path, state)
    loaded, _ = ck.load_state(path, tree.zeros_like(state))
    assert all(t.device.type == "cuda" for t in tree.leaves(loaded))
    assert_bitwise_equal(tree.to(loaded, "cpu"), tree.to(state, "cpu"))
    on_cpu, _ = ck.load_state(path, tree.zeros_like(state), device="cpu")
    assert all(t.device.type == "cpu" for t in tree.leaves(on_cpu))
    weights, _ = ck.load_weights(_weights_file(tmp_path, state.params), device="cuda")
    assert all(t.device.type == "cuda" for t in weights.values())


def _weights_file(tmp_path: Path, params: dict[str, Tensor]) -> Path:
    path = tmp_path / "w.safetensors"
    ck.save_weights(path, params)
    return path


def test_save_rejects_bad_states_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="'b'"):
        ck.save_state(path, {"a": torch.zeros(1), "b": 3})
    with pytest.raises(ValueError, match="distinct key paths"):
        ck.save_state(path, {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}})
    with pytest.raises(ValueError, match="reserved"):
        ck.save_state(path, {"a": torch.zeros(1)}, metadata={"format": "mine"})
    with pytest.raises(TypeError, match="'when'"):
        ck.save_state(path, {"a": torch.zeros(1)}, metadata={"when": object()})
    with pytest.raises(TypeError, match="dtype"):
        ck.save_weights(path, {"a": torch.zeros(1, dtype=torch.complex128)})
    assert not path.exists()


# --------------------------------------------------------------------------- weights files


def test_weights_file_loads_into_plain_module(tmp_path: Path) -> None:
    src = nn.Linear(5, 3)
    params = {k: v.detach().clone() for k, v in src.state_dict().items()}
    path = tmp_path / "best.safetensors"
    ck.save_weights(path, params, metadata={"epoch": 4, "val_acc": 0.9})

    dst = nn.Linear(5, 3)
    dst.load_state_dict(safetensors.torch.load_file(path))  # no fashion_func involved
    x = torch.randn(2, 5)
    assert torch.equal(dst(x), src(x))

    loaded, meta = ck.load_weights(path, template=dict(nn.Linear(5, 3).state_dict()))
    assert meta == {"epoch": 4, "val_acc": 0.9}
    assert list(loaded) == ["weight", "bias"]  # template order
    assert all(torch.equal(loaded[k], params[k]) for k in params)
    loaded, _ = ck.load_weights(path)  # no template: validated, sorted by name
    assert list(loaded) == ["bias", "weight"]
    assert ck.read_metadata(path) == {"epoch": 4, "val_acc": 0.9}


def test_weights_from_another_model(tmp_path: Path) -> None:
    path = _weights_file(tmp_path, dict(nn.Linear(5, 3).state_dict()))
    other = dict(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).state_dict())
    err = expect_error(ck.load_weights, path, template=other, match="weights do not match model")
    assert "missing 4 keys" in str(err) and "'0.weight'" in str(err)
    assert "unexpected 2 keys" in str(err) and "'bias'" in str(err)
    expect_error(
        ck.load_weights,
        path,
        template=dict(nn.Linear(5, 4).state_dict()),
        match=r"'weight' has shape \[3, 5\] in the file, \[4, 5\] expected",
    )
    expect_error(
        ck.load_weights,
        path,
        template=dict(nn.Linear(5, 3).double().state_dict()),
        match="'weight' has dtype torch.float32 in the file, torch.float64 expected",
    )


def test_foreign_safetensors_files_are_weights(tmp_path: Path) -> None:
    tensors = {"weight": torch.randn(3, 5), "bias": torch.randn(3)}
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, plain)
    loaded, meta = ck.load_weights(plain)
    assert meta == {} and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    hf = tmp_path / "hf.safetensors"
    safetensors.torch.save_file(tensors, hf, metadata={"format": "pt"})
    assert ck.load_weights(hf)[1] == {"format": "pt"}  # foreign metadata passed through raw
    assert ck.inspect(hf).format is None
    expect_error(ck.load_state, plain, tensors, match="not a fashion_func train state: no format")
    expect_error(ck.load_state, hf, tensors, match="format 'pt'")


def test_state_and_weights_files_are_not_interchangeable(tmp_path: Path, ckpt: Path) -> None:
    params = make_state().params
    weights = _weights_file(tmp_path, params)
    expect_error(ck.load_weights, ckpt, match="train state checkpoint, not a weights file; use load_state")
    expect_error(
        ck.load_state,
        weights,
        make_state(),
        match="weights file, not a train state checkpoint; use load_weights",
    )


@pytest.mark.parametrize("version", ["1", "3"])  # no release wrote a version 1 file
def test_unsupported_format_version(tmp_path: Path, version: str) -> None:
    path = tmp_path / "future.safetensors"
    meta = {"format": ck.STATE_FORMAT, "format_version": version, "__json__": "[]"}
    path.write_bytes(safetensors.torch.save({"a": torch.zeros(2)}, metadata=meta))
    match = f"format_version '{version}' is not supported"
    expect_error(ck.load_state, path, {"a": torch.zeros(2)}, match=match)
    expect_error(ck.read_metadata, path, match=match)
    expect_error(ck.inspect, path, match=match)
    with pytest.raises(CheckpointError, match=match):
        ck.decode_metadata(meta)


def test_metadata_value_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    v2 = {"format": ck.WEIGHTS_FORMAT, "format_version": "2", "epoch": "{not json", "__json__": '["epoch"]'}
    path.write_bytes(safetensors.torch.save({"a": torch.zeros(2)}, metadata=v2))
    expect_error(ck.load_weights, path, match="metadata value for 'epoch' is not valid JSON")


# --------------------------------------------------------------------------- metadata encoding

METADATA = {
    "model": "simplenet",
    "source": "",
    "looks_like_json": '{"a": 1}',  # a string that parses as JSON stays a string
    "number_text": "3",
    "epoch": 3,
    "value": 0.8125,
    "normalize_mean": 0.286,
    "flag": True,
    "nothing": None,
    "config": {"lr": 0.001, "normalize": "dataset", "layers": [1, 2]},
    "history": [{"loss": 1.5}],
}


def test_metadata_strings_are_plain_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    ck.save_weights(path, {"w": torch.zeros(2)}, metadata=METADATA)
    raw = safetensors.safe_open(str(path), "pt").metadata()
    # any safetensors reader sees the strings as they are, numbers as decimal text
    assert raw["model"] == "simplenet" and raw["looks_like_json"] == '{"a": 1}' and raw["number_text"] == "3"
    assert raw["epoch"] == "3" and raw["value"] == "0.8125" and raw["normalize_mean"] == "0.286"
    assert json.loads(raw["config"]) == METADATA["config"]
    assert set(json.loads(raw["__json__"])) == {"epoch", "value", "normalize_mean", "flag", "nothing",
                                                 "config", "history"}  # fmt: skip
    assert raw["format_version"] == ck.FORMAT_VERSION == "2"
    assert ck.read_metadata(path) == METADATA
    assert ck.load_weights(path)[1] == METADATA
    assert ck.decode_metadata(raw) == METADATA
    assert type(ck.read_metadata(path)["number_text"]) is str
    st_path = tmp_path / "last.safetensors"
    ck.save_state(st_path, {"a": torch.ones(1)}, metadata=METADATA)
    assert ck.load_state(st_path, {"a": torch.zeros(1)})[1] == METADATA
    # the encoder on its own (as interop's Flax/numpy writers use it) round-trips too
    assert ck.decode_metadata(ck.encode_metadata(METADATA)) == METADATA
    with pytest.raises(ValueError, match="reserved"):
        ck.save_weights(path, {"w": torch.zeros(2)}, metadata={"__json__": "[]"})


@pytest.mark.parametrize(
    ("json_keys", "match"),
    [
        (None, "lacks '__json__'"),
        ("{bad", "'__json__' is not valid JSON"),
        ('{"epoch": 1}', "not a JSON list of key names"),
        ("[1]", "not a JSON list of key names"),
        ('["missing"]', "names keys \\['missing'\\] that hold no user value"),
        ('["format"]', "names keys \\['format'\\]"),
    ],
)
def test_bad_json_keys_are_checkpoint_errors(tmp_path: Path, json_keys: str | None, match: str) -> None:
    raw = {"format": ck.WEIGHTS_FORMAT, "format_version": "2", "epoch": "3"}
    if json_keys is not None:
        raw["__json__"] = json_keys
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors.torch.save({"a": torch.zeros(2)}, metadata=raw))
    expect_error(ck.load_weights, path, match=match)
    expect_error(ck.read_metadata, path, match=match)


def test_foreign_metadata_passes_through_unless_it_follows_the_convention() -> None:
    assert ck.decode_metadata({"format": "pt", "epoch": "3"}) == {"format": "pt", "epoch": "3"}
    # a file that follows the convention without being ours (interop's Flax files) is decoded,
    # and its own "format" key is data
    raw = {"layout": "flax", "format": "x", "bf16_keys": "[]", "__json__": '["bf16_keys"]'}
    assert ck.decode_metadata(raw) == {"layout": "flax", "format": "x", "bf16_keys": []}


# --------------------------------------------------------------------------- template mismatch


def test_state_template_mismatch(ckpt: Path) -> None:
    good = make_state()
    cases = {
        "shape": (
            dataclasses.replace(good, params={**good.params, "conv1.bias": torch.zeros(5)}),
            r"'params/conv1.bias' has shape \[4\] in the file, \[5\] expected",
        ),
        "dtype": (
            dataclasses.replace(good, step=torch.tensor(0, dtype=torch.int32)),
            "'step' has dtype torch.int64 in the file, torch.int32 expected",
        ),
        "extra": (
            dataclasses.replace(good, params={**good.params, "fc2.bias": torch.zeros(2)}),
            r"missing 1 keys \['params/fc2.bias'\]",
        ),
        "missing": (
            dataclasses.replace(good, model_state={}),
            r"unexpected 2 keys \['model_state/bn.num_batches_tracked', 'model_state/bn.running_mean'\]",
        ),
    }
    for template, match in cases.values():
        err = expect_error(ck.load_state, ckpt, template, match=match)
        assert str(err).startswith(str(ckpt)) and "checkpoint does not match the train state" in str(err)


# --------------------------------------------------------------------------- bad files


def _valid_blob() -> bytes:
    return ck._serialize(
        {"a": torch.arange(4.0), "b": torch.ones(2, dtype=torch.int64)}, {"x": 1}, ck.STATE_FORMAT
    )


TEMPLATE = {"a": torch.zeros(4), "b": torch.zeros(2, dtype=torch.int64)}


def _pickle_bytes() -> bytes:
    # what torch.save writes (a zip archive of pickles); written, never read back with pickle
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(4)}, buf)
    return buf.getvalue()


def _bad_files() -> dict[str, tuple[bytes, str]]:
    blob = _valid_blob()
    header, data = split(blob)
    n = int.from_bytes(blob[:8], "little")

    def edit(fn) -> bytes:
        h = json.loads(json.dumps(header))
        fn(h)
        return craft(h, data)

    return {
        "torch.save zip": (_pickle_bytes(), "zip archive"),
        # protocol 2 pickle of {}: PROTO 2, EMPTY_DICT, STOP, padded
        "raw pickle": (b"\x80\x02}q\x00.\x00\x00\x00\x00\x00", "pickle file"),
        "text": (b"hello, this is just some text\n", "exceeds the file size"),
        "empty": (b"", "the file is empty"),
        "short": (b"\x02\x00\x00", "only 3 bytes"),
        "truncated data": (
            blob[:-3],
            r"data_offsets \[16, 32\] outside the data region of 29 bytes \(truncated",
        ),
        "truncated header": (blob[: 8 + n // 2], "exceeds the file size"),
        "broken json": (craft({}, b"")[:-1] + b"x", "header is not valid JSON"),
        "json not object": (struct.pack("<Q", 2) + b"[]", "does not start with"),
        "json array": (struct.pack("<Q", 4) + b"{}[]", "not valid JSON"),
        "json NaN constant": (craft({"__metadata__": {}}, b"").replace(b"{}", b'{"k": NaN}'), "valid JSON"),
        "length huge": (struct.pack("<Q", 2**63) + blob[8:], "header length 9223372036854775808 exceeds"),
        "length above limit": (struct.pack("<Q", 200_000_000) + b" " * 16, "exceeds"),
        "length too small": (struct.pack("<Q", 1) + blob[8:], "header length 1 is too small"),
        "offsets out of range": (
            edit(lambda h: h["a"].update(data_offsets=[0, 10**6])),
            "outside the data region",
        ),
        "offsets negative": (edit(lambda h: h["a"].update(data_offsets=[-8, 8])), "outside the data region"),
        "offsets inconsistent": (edit(lambda h: h["a"].update(shape=[3])), "needs 12"),
        "offsets overlap": (
            edit(lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"], dtype="F32", shape=[4])),
            "overlaps|gap",
        ),
        "offsets float": (edit(lambda h: h["a"].update(data_offsets=[0.0, 16.0])), "data_offsets"),
        "dtype unknown": (edit(lambda h: h["a"].update(dtype="F128")), "unknown dtype 'F128'"),
        "dtype not str": (edit(lambda h: h["a"].update(dtype=4)), "unknown dtype 4"),
        "shape negative": (edit(lambda h: h["a"].update(shape=[-4])), "non-negative integers"),
        "shape bool": (edit(lambda h: h["a"].update(shape=[True])), "non-negative integers"),
        "field missing": (edit(lambda h: h["a"].pop("shape")), "fields missing \\['shape'\\]"),
        "field extra": (edit(lambda h: h["a"].update(extra=1)), "unexpected \\['extra'\\]"),
        "entry not object": (edit(lambda h: h.update(c=[1, 2])), "entry is not an object"),
        "metadata not object": (edit(lambda h: h.update(__metadata__=[1])), "is not an object"),
        "metadata value not str": (edit(lambda h: h["__metadata__"].update(x=1)), "metadata value for 'x'"),
        "appended garbage": (blob + b"garbage!", "data region is"),
        "duplicate key": (
            craft(header, data).replace(b'"b":', b'"a":', 1),
            "duplicate key",
        ),
        "nan": (
            ck._serialize(
                {"a": torch.tensor([0.0, float("nan"), 1.0, 2.0]), "b": torch.ones(2).long()},
                {},
                ck.STATE_FORMAT,
            ),
            "'a' has 1 non-finite values",
        ),
        "inf bf16": (
            ck._serialize(
                {
                    "a": torch.zeros(4),
                    "b": torch.ones(2).long(),
                    "c": torch.tensor([float("-inf")]).bfloat16(),
                },
                {},
                ck.STATE_FORMAT,
            ),
            "'c' has 1 non-finite",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_files()))
def test_bad_files_raise_checkpoint_error(tmp_path: Path, case: str) -> None:
    blob, match = _bad_files()[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    template = {**TEMPLATE, "c": torch.zeros(1, dtype=torch.bfloat16)} if case == "inf bf16" else TEMPLATE
    err = expect_error(ck.load_state, path, template, match=match)
    assert str(err).startswith(str(path))
    expect_error(ck.load_weights, path, match=".")  # never anything but CheckpointError
    if case not in ("nan", "inf bf16"):  # header-only readers do not look at the data
        expect_error(ck.read_metadata, path, match=match)


def test_nan_in_weights_file_without_template(tmp_path: Path) -> None:
    path = _weights_file(tmp_path, {"w": torch.tensor([1.0, float("inf")], dtype=torch.float16)})
    expect_error(ck.load_weights, path, match="'w' has 1 non-finite values")
    assert ck.read_metadata(path) == {}  # header-only: cheap, data not checked


def test_missing_file_and_directory(tmp_path: Path) -> None:
    expect_error(ck.load_state, tmp_path / "nope.safetensors", TEMPLATE, match="no such file")
    expect_error(ck.load_weights, tmp_path, match="not a regular file")
    expect_error(ck.read_metadata, tmp_path / "nope.safetensors", match="no such file")


def test_safetensors_decoder_failure_becomes_checkpoint_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(data: bytes) -> dict:
        raise RuntimeError("decoder\nexploded")

    monkeypatch.setattr(safetensors_io, "_st_load", boom)
    with pytest.raises(
        CheckpointError, match="safetensors cannot decode the file: RuntimeError: decoder exploded"
    ):
        ck._load_state_bytes(_valid_blob(), TEMPLATE)


# --------------------------------------------------------------------------- atomic writes


def _temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    ck.atomic_write(path, b"one")
    ck.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert _temp_files(tmp_path) == []


def test_disk_full_on_fsync_keeps_old_file(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = ckpt.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(
        CheckpointWriteError, match=f"cannot write checkpoint {re.escape(str(ckpt))}: No space left"
    ):
        ck.save_state(ckpt, make_state(seed=1))
    monkeypatch.undo()
    assert ckpt.read_bytes() == old
    assert _temp_files(ckpt.parent) == []
    loaded, meta = ck.load_state(ckpt, make_state())
    assert_bitwise_equal(loaded, make_state()) and meta == {"epoch": 3}


def test_disk_full_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old contents")

    class HalfFile(io.FileIO):
        def write(self, b: Any) -> int:
            super().write(bytes(b)[: len(b) // 2])  # a partial temp file really exists on disk
            raise OSError(errno.ENOSPC)  # no strerror: the message must still say why

    monkeypatch.setattr(atomic, "open", lambda p, mode, **kw: HalfFile(p, "w"), raising=False)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        ck.atomic_write(path, b"new contents that do not fit")
    assert path.read_bytes() == b"old contents"
    assert _temp_files(tmp_path) == []


def test_not_writable_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    seen = []

    def denied(src: Any, dst: Any) -> None:
        seen.append(Path(src))
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(CheckpointWriteError, match="Permission denied") as err:
        ck.atomic_write(path, b"new")
    assert isinstance(err.value, CheckpointError) and "\n" not in str(err.value)
    monkeypatch.undo()
    # the temp file sat beside the target (same filesystem, so the rename is atomic)
    assert seen == [tmp_path / f".f.bin.{os.getpid()}.tmp"]
    assert path.read_bytes() == b"old"
    assert _temp_files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    (target / "f.bin").write_bytes(b"old")
    target.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError, match="Permission denied"):
            ck.atomic_write(target / "f.bin", b"new")
    finally:
        target.chmod(0o700)
    assert (target / "f.bin").read_bytes() == b"old"


def test_write_into_missing_directory_or_onto_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError, match="No such file or directory"):
        ck.save_weights(tmp_path / "no" / "w.safetensors", {"a": torch.zeros(1)})
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointWriteError, match="cannot write checkpoint"):
        ck.save_weights(tmp_path / "d.safetensors", {"a": torch.zeros(1)})
    assert _temp_files(tmp_path) == []


def test_interrupt_during_write_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write(path, b"data")
    monkeypatch.undo()
    assert not path.exists() and _temp_files(tmp_path) == []


# --------------------------------------------------------------------------- fuzzing


FUZZ_STATE = {
    "params": {
        "w": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
        "b": torch.ones(3).bfloat16(),
    },
    "opt": AdamLikeState(torch.tensor(3), {"w": torch.zeros(2, 3)}, {"w": torch.full((2, 3), 0.5)}),
    "flag": torch.tensor([True, False]),
}
FUZZ_TEMPLATE = tree.zeros_like(FUZZ_STATE)
FUZZ_STATE_BLOB = ck._serialize(
    tree.flatten_with_paths(FUZZ_STATE), {"epoch": 1, "cfg": {"a": [1]}}, ck.STATE_FORMAT
)
FUZZ_WEIGHTS_BLOB = ck._serialize(FUZZ_STATE["params"], {"epoch": 2}, ck.WEIGHTS_FORMAT)
FUZZ_WEIGHTS_TEMPLATE = tree.zeros_like(FUZZ_STATE["params"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
field_values = {
    "dtype": st.sampled_from([*safetensors_io.DTYPES, "F4", "F8_E8M0", "f32", "", "I128"]) | json_values,
    "shape": st.lists(st.integers(-2, 40) | st.integers(0, 2**65), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-8, 200) | st.integers(0, 2**66), max_size=3) | json_values,
}


@st.composite
def header_edit(draw: st.DrawFn, blob: bytes) -> bytes:
    """Edit the parsed JSON header (fields, names, metadata) and re-encode it with a correct length."""
    header, data = split(blob)
    names = sorted(k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    ops = ["metadata", "add_entry"] + (
        ["field", "delete_field", "add_field", "rename", "drop", "swap"] if names else []
    )
    op = draw(st.sampled_from(ops))
    name = draw(st.sampled_from(names)) if names else ""
    if op == "field":
        field = draw(st.sampled_from(sorted(field_values)))
        header[name][field] = draw(field_values[field])
    elif op == "delete_field" and header[name]:
        header[name].pop(draw(st.sampled_from(sorted(header[name]))))
    elif op == "add_field":
        header[name][draw(st.text(max_size=5))] = draw(json_values)
    elif op == "rename":
        header[draw(st.text(max_size=12))] = header.pop(name)
    elif op == "drop":
        header.pop(name)
    elif op == "swap":  # exchange two entries' offsets: each stays in range, contents move
        other = draw(st.sampled_from(names))
        a, b = header[name].get("data_offsets"), header[other].get("data_offsets")
        header[name]["data_offsets"], header[other]["data_offsets"] = b, a
    elif op == "add_entry":
        header[draw(st.text(max_size=8))] = {f: draw(v) for f, v in field_values.items()}
    elif op == "metadata":
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            meta = header["__metadata__"] = {}
        key = draw(st.sampled_from([*sorted(meta), "format", "format_version", "new"]))
        meta[key] = draw(
            st.sampled_from([ck.STATE_FORMAT, ck.WEIGHTS_FORMAT, "1", "2", "{bad json", "3", '"s"'])
            | st.text(max_size=6)
            | json_values
        )
        if draw(st.integers(0, 9)) == 0:
            header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()  # NaN/Infinity tokens too: the reader must refuse them
    raw += b" " * draw(st.integers(0, 8))  # the format allows trailing padding
    return struct.pack("<Q", len(raw)) + raw + data


def byte_mutation(blob: bytes) -> st.SearchStrategy[bytes]:
    n = len(blob)

    def flip(edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(blob)
        for i, x in edits:
            out[i % len(out)] ^= x
        return bytes(out)

    def splice(i: int, cut: int, insert: bytes) -> bytes:
        return blob[:i] + insert + blob[i + cut :]

    return st.one_of(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=6).map(flip),
        st.integers(0, n - 1).map(lambda k: blob[:k]),
        st.binary(min_size=1, max_size=64).map(lambda g: blob + g),
        st.integers(0, 2**64 - 1).map(lambda x: struct.pack("<Q", x) + blob[8:]),
        st.integers(-64, 64).map(
            lambda d: (
                struct.pack("<Q", min(max(0, int.from_bytes(blob[:8], "little") + d), 2**64 - 1)) + blob[8:]
            )
        ),
        st.builds(splice, st.integers(0, n), st.integers(0, 16), st.binary(max_size=16)),
    )


@st.composite
def mutated_file(draw: st.DrawFn) -> bytes:
    """A valid small checkpoint or weights file with 1 to 3 header edits or byte-level mutations."""
    blob = draw(st.sampled_from([FUZZ_STATE_BLOB, FUZZ_WEIGHTS_BLOB]))
    for _ in range(draw(st.integers(1, 3))):
        if _header_parses(blob) and draw(st.booleans()):
            blob = draw(header_edit(blob))
        elif blob:
            blob = draw(byte_mutation(blob))
    return blob


def _header_parses(blob: bytes) -> bool:
    try:
        h, _ = split(blob)
        return isinstance(h, dict)
    except Exception:
        return False


def _check_loaded(flat: dict[str, Tensor], template: dict[str, Tensor]) -> None:
    assert list(flat) == list(template)
    for k, t in flat.items():
        assert t.shape == template[k].shape and t.dtype == template[k].dtype, k
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), k


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=mutated_file())
def test_fuzz_mutated_files_raise_only_checkpoint_error(blob: bytes) -> None:
    name = "<fuzz>"
    readers = [
        ("state", lambda: ck._load_state_bytes(blob, FUZZ_TEMPLATE, name=name)),
        ("weights", lambda: ck._load_weights_bytes(blob, template=FUZZ_WEIGHTS_TEMPLATE, name=name)),
        ("weights-free", lambda: ck._load_weights_bytes(blob, name=name)),
        ("header", lambda: ck._info(safetensors_io.parse_header(blob, len(blob), name), name)),
    ]
    for kind, read in readers:
        try:
            result = read()
        except CheckpointError as e:
            msg = str(e)
            assert msg.startswith(name) and "\n" not in msg and len(msg) <= 300, msg
            continue
        # the mutation kept the file valid: what came back must still fit the template
        if kind == "state":
            state, meta = result
            assert isinstance(state["opt"], AdamLikeState) and isinstance(meta, dict)
            _check_loaded(tree.flatten_with_paths(state), tree.flatten_with_paths(FUZZ_TEMPLATE))
        elif kind == "weights":
            _check_loaded(result[0], FUZZ_WEIGHTS_TEMPLATE)
        elif kind == "weights-free":
            for t in result[0].values():
                assert not t.is_floating_point() or bool(torch.isfinite(t.float()).all())
        else:
            assert isinstance(result, ck.CheckpointInfo)


def test_fuzz_sources_are_valid() -> None:
    # the fuzz test is only meaningful if the unmutated files load
    state, meta = ck._load_state_bytes(FUZZ_STATE_BLOB, FUZZ_TEMPLATE)
    assert_bitwise_equal(state, FUZZ_STATE) and meta == {"epoch": 1, "cfg": {"a": [1]}}
    weights, meta = ck._load_weights_bytes(FUZZ_WEIGHTS_BLOB, template=FUZZ_WEIGHTS_TEMPLATE)
    assert_bitwise_equal(weights, FUZZ_STATE["params"]) and meta == {"epoch": 2}
    assert _header_parses(FUZZ_STATE_BLOB)


# --------------------------------------------------------------------------- no unpickling anywhere


FORBIDDEN = [
    r"(?<![\w.])torch\.load\s*\(",  # safetensors.torch.load is fine: it cannot run code
    r"\bimport\s+pickle\b",
    r"\bfrom\s+pickle\s+import\b",
    r"\bpickle\.loads?\b",
    r"\bimport\s+(?:cPickle|dill|cloudpickle)\b",
    r"\bfrom\s+torch\s+import\s+load\b",
]


def test_no_pickle_or_torch_load_in_package_sources() -> None:
    files = [p for d in ("fashion_func", "scripts") for p in sorted((REPO / d).rglob("*")) if p.is_file()]
    files = [
        p for p in files if p.suffix in (".py", ".sh", ".md", ".txt", "") and "__pycache__" not in p.parts
    ]
    assert any(p.name == "checkpoint.py" for p in files)
    hits = []
    for p in files:
        text = p.read_text(errors="replace")
        for pattern in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{p.relative_to(REPO)}:{line}: {m.group(0)}")
    assert hits == []
    # the patterns do find what they are meant to find
    assert re.search(FORBIDDEN[0], "x = torch.load(f)") and not re.search(
        FORBIDDEN[0], "safetensors.torch.load(b)"
    )
    assert re.search(FORBIDDEN[1], "import pickle") and re.search(FORBIDDEN[3], "pickle.loads(b)")


# --------------------------------------------------------------------------- bad checkpoints, command line

# A finished run's last.safetensors, spoiled in a copy of the run, then `train.py --resume auto` and
# `--resume PATH`: exit 2, one line naming the file, and nothing in the run directory changed but
# a line in train.log. Each entry: (spoil the copy's last file, a regex the line must match).


def pickle_bytes() -> bytes:
    """What torch.save writes (a zip of pickles): written here, never read back by pickle."""
    buf = io.BytesIO()
    torch.save({"linear1.weight": torch.zeros(3)}, buf)
    return buf.getvalue()


def _mlp_template() -> Any:
    params = models.get("mlp").init(torch.Generator().manual_seed(0))
    return state_lib.create(params, app.build_optimizer(Config(model="mlp")), seed=0)


def _rewrite(change: Any) -> Any:
    """A spoiler that loads the state and metadata, changes them and saves a valid file again."""

    def spoil(last: Path) -> None:
        st_, meta = change(*ck.load_state(last, _mlp_template()))
        ck.save_state(last, st_, metadata=meta)

    return spoil


def _raw(change: Any) -> Any:
    """A spoiler of the file's bytes."""
    return lambda last: last.write_bytes(change(last.read_bytes(), last))


def _bad_header_json(good: bytes, last: Path) -> bytes:
    n = int.from_bytes(good[:8], "little")
    return good[:8] + good[8 : 8 + n].replace(b'"dtype"', b"'dtype'", 1) + good[8 + n :]


def _other_model(good: bytes, last: Path) -> bytes:
    # a simplenet train state carrying the mlp run's metadata: only the tensors are wrong
    params = models.get("simplenet").init(torch.Generator().manual_seed(0))
    other = last.with_name("simplenet.safetensors")
    ck.save_state(other, state_lib.create(params, optim.adam(1e-3), seed=0), metadata=ck.read_metadata(last))
    blob = other.read_bytes()
    other.unlink()
    return blob


def _fifo(last: Path) -> None:
    last.unlink()
    os.mkfifo(last)


def _set_lr(st_: Any, lr: float) -> Any:
    return st_.replace(opt_state=optim.set_hyperparam(st_.opt_state, "lr", lr))


BAD_CHECKPOINTS: dict[str, tuple[Any, str]] = {
    "truncated": (_raw(lambda good, last: good[: len(good) // 2]), "outside the data region"),
    "header not JSON": (_raw(_bad_header_json), "header is not valid JSON"),
    "other model": (_raw(_other_model), "checkpoint does not match the train state"),
    "not safetensors": (_raw(lambda good, last: b"epoch=3\nlr=0.001\n" * 10), "not a safetensors file"),
    "pickle renamed": (_raw(lambda good, last: pickle_bytes()), "only safetensors files are read"),
    "a fifo": (_fifo, r"not a regular file \(a named pipe \(FIFO\)\)"),
    "epoch a string": (_rewrite(lambda st_, m: (st_, {**m, "epoch": "x"})), ""),
    "epoch negative": (_rewrite(lambda st_, m: (st_, {**m, "epoch": -3})), ""),
    "lr a string": (_rewrite(lambda st_, m: (st_, {**m, "lr": "fast"})), ""),
    "lr negative": (_rewrite(lambda st_, m: (st_, {**m, "lr": -0.001})), ""),
    "in_epoch a string": (_rewrite(lambda st_, m: (st_, {**m, "in_epoch": "x"})), ""),
    "in_epoch missing keys": (_rewrite(lambda st_, m: (st_, {**m, "in_epoch": {"epoch": 2}})), ""),
    "callbacks a list": (_rewrite(lambda st_, m: (st_, {**m, "callbacks": [1, 2]})), ""),
    "callback state wrong": (
        _rewrite(
            lambda st_, m: (st_, {**m, "callbacks": {**m["callbacks"], "EarlyStopping": {"best": "x"}}})
        ),
        "",
    ),
    "history malformed": (_rewrite(lambda st_, m: (st_, {**m, "history": [{"epoch": "one"}]})), ""),
    "step negative": (_rewrite(lambda st_, m: (st_.replace(step=torch.tensor(-5)), m)), ""),
    "optimizer lr negative": (_rewrite(lambda st_, m: (_set_lr(st_, -1.0), m)), ""),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch mlp run (adam, plateau schedule, early stopping) on 64 synthetic images."""
    root = tmp_path_factory.mktemp("finished")
    make_dataset(root / "data", n_train=64, n_test=16)
    cfg = Config(
        model="mlp", epochs=1, batch_size=32, data_dir=str(root / "data"), out=str(root / "run"),
        device="cpu", compile=False, tensorboard=False, progress=False, patience=3, lr_schedule="plateau",
    )  # fmt: skip
    app.train(cfg)
    return root


def _tree_bytes(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else "other" for p in sorted(root.rglob("*"))
    }


@pytest.mark.skipif(os.name != "posix", reason="FIFOs")
@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_resume_from_a_bad_checkpoint_is_one_line_exit_2_and_changes_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    spoil, match = BAD_CHECKPOINTS[case]
    out = tmp_path / "run"
    shutil.copytree(finished_run / "run", out, symlinks=True)
    last = out / "checkpoints" / "last.safetensors"
    spoil(last)
    before = _tree_bytes(out)
    argv = [
        "--model", "mlp", "--epochs", "3", "--batch-size", "32", "--data-dir", str(finished_run / "data"),
        "--out", str(out), "--device", "cpu", "--no-compile", "--no-tensorboard", "--no-progress",
    ]  # fmt: skip
    for resume in ("auto", str(last)):
        assert main_train([*argv, "--resume", resume]) == 2
        line = one_error_line(capsys.readouterr().err)
        # the file named first ("--resume PATH: " where the flag named a FIFO)
        assert re.match(rf"train\.py: error: (--resume )?{re.escape(str(last))}: ", line), line
        assert re.search(match, line), line
        after, expected = _tree_bytes(out), dict(before)
        assert after.pop("train.log").startswith(expected.pop("train.log"))  # the attempt is logged, no more
        assert after == expected  # the evidence is left as it was
