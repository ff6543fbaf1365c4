"""Shared test settings: tests marked `cuda` run only where a CUDA device is present; under
pytest-xdist (`pytest -n N`, as `make test` runs) each worker computes on one thread, and
`FF_TEST_THREADS=N` sets the compute threads (of every worker, or of a plain pytest) to N."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("FF_TEST_THREADS"):
    # another thread count splits the reductions at other points: the cross_path tests are run
    # at 1 and at 2 threads (scripts/check_summation_order.sh). Subprocesses inherit OMP_NUM_THREADS.
    torch.set_num_threads(int(os.environ["FF_TEST_THREADS"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["FF_TEST_THREADS"]
elif os.environ.get("PYTEST_XDIST_WORKER"):
    # N workers on N cores: one intra-op thread each, or they oversubscribe the cores and each
    # runs slower than alone. Subprocesses the tests start inherit OMP_NUM_THREADS.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the lent GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def x64():
    """JAX in 64-bit mode for one test, restored after: other tests in the same worker run
    float32 JAX. jax is imported here, not at the top, so tests without JAX never load it."""
    import jax

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)
