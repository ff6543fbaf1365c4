"""fashion_func: a functional, JAX-style training library on PyTorch.

    import fashion_func as ff

    model = ff.models.get("simplenet")                    # pure init/apply over a dict of tensors
    tx = ff.optim.adam(1e-3)                              # (init, update) pure functions
    st = ff.state.create(model.init(torch.Generator().manual_seed(0)), tx)
    train_step = ff.make_train_step(model, tx)            # (state, batch) -> (state, metrics)
    result = ff.fit(st, train_step, batches, epochs=3)    # the one impure driver

Submodules and names load on first use (PEP 562), so `import fashion_func` stays cheap for the
command line until something needs torch. `__version__` is the installed distribution's version
(`0+unknown` in a checkout not installed).
"""

from __future__ import annotations

import importlib
import importlib.metadata as _metadata
from typing import TYPE_CHECKING, Any

__all__ = [
    "FitResult",
    "TrainState",
    "__version__",
    "augment",
    "callbacks",
    "checkpoint",
    "data",
    "distributed",
    "ensemble",
    "fit",
    "interop",
    "loss_fn",
    "losses",
    "make_eval_step",
    "make_train_step",
    "metrics",
    "models",
    "nn",
    "optim",
    "per_example_grad_norms",
    "per_example_grads",
    "preprocess",
    "privacy",
    "schedules",
    "state",
    "step",
    "streamed_grad_norms",
    "tree",
]

_NAMES = {
    "FitResult": "fashion_func.loop",
    "TrainState": "fashion_func.state",
    "fit": "fashion_func.loop",
    "loss_fn": "fashion_func.step",
    "make_eval_step": "fashion_func.step",
    "make_train_step": "fashion_func.step",
    "per_example_grad_norms": "fashion_func.step",
    "per_example_grads": "fashion_func.step",
    "streamed_grad_norms": "fashion_func.step",
}
_SUBMODULES = set(__all__) - set(_NAMES) - {"__version__"}  # the rest of the face is modules

try:  # the installed distribution's version (a checkout run without installing has none)
    __version__: str = _metadata.version("fashion_func")
except _metadata.PackageNotFoundError:
    __version__ = "0+unknown"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from fashion_func import (
        augment,
        callbacks,
        checkpoint,
        data,
        distributed,
        ensemble,
        interop,
        losses,
        metrics,
        models,
        nn,
        optim,
        preprocess,
        privacy,
        schedules,
        state,
        step,
        tree,
    )  # fmt: skip
    from fashion_func.loop import FitResult, fit
    from fashion_func.state import TrainState
    from fashion_func.step import (
        loss_fn,
        make_eval_step,
        make_train_step,
        per_example_grad_norms,
        per_example_grads,
        streamed_grad_norms,
    )


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"fashion_func.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'fashion_func' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
