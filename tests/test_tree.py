"""tree helpers: pure, structure-preserving, and round-tripping key paths."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from fashion_func import tree


class Pair(NamedTuple):
    mu: dict
    count: torch.Tensor


def _tree():
    return {"a": torch.tensor([3.0, 4.0]), "b": Pair({"w": torch.ones(2, 2)}, torch.tensor(2))}


def test_map_add_sub_scale_are_pure_and_keep_structure():
    t = _tree()
    before = tree.map(torch.clone, t)
    doubled = tree.scale(t, 2.0)
    assert isinstance(doubled["b"], Pair)
    assert torch.equal(tree.add(t, t)["a"], doubled["a"])
    assert torch.equal(tree.sub(doubled, t)["b"].mu["w"], t["b"].mu["w"])
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(t), tree.leaves(before), strict=True))
    zeros = tree.zeros_like(t)
    assert all(not z.any() for z in tree.leaves(zeros))


@pytest.mark.cross_path
def test_global_norm_matches_torch_and_keeps_float64():
    t = {"x": torch.randn(5, dtype=torch.float64), "y": torch.randn(3, 4, dtype=torch.float64)}
    expected = torch.linalg.vector_norm(torch.cat([v.flatten() for v in t.values()]))
    got = tree.global_norm(t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=4e-15, atol=0)  # 17 squares summed in any order: 17 ulps
    assert tree.global_norm({"h": torch.ones(4, dtype=torch.bfloat16)}).item() == pytest.approx(2.0)


def test_cast_leaves_integer_counters_alone():
    cast = tree.cast(_tree(), torch.bfloat16)
    assert cast["a"].dtype == torch.bfloat16 and cast["b"].count.dtype == torch.int64


def test_flatten_unflatten_round_trip():
    nested = {"conv1.weight": torch.ones(1), "opt": {"mu": {"fc.bias": torch.zeros(2)}}}
    flat = tree.flatten(nested)
    assert list(flat) == ["conv1.weight", "opt/mu/fc.bias"]
    assert tree.unflatten(flat)["opt"]["mu"]["fc.bias"] is nested["opt"]["mu"]["fc.bias"]


def test_paths_round_trip_and_name_mismatches():
    t = _tree()
    flat = tree.flatten_with_paths(t)
    assert list(flat) == ["a", "b/mu/w", "b/count"]
    back = tree.unflatten_like(t, flat)
    assert isinstance(back["b"], Pair) and back["b"].count is t["b"].count
    with pytest.raises(KeyError, match=r"missing keys \['b/count'\].*unexpected keys \['b/extra'\]"):
        tree.unflatten_like(
            t, {**{k: v for k, v in flat.items() if k != "b/count"}, "b/extra": torch.ones(1)}
        )
