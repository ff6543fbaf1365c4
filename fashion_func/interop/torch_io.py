"""Our params <-> plain PyTorch modules (`to_module` / `from_module`, `identify`), a stateful
model's weights <-> `(params, model_state)` (`split_state` / `merge_state`), and any research
`nn.Module` as a `Model` (`functionalize`). A stateful model's *weights* are its params and
buffers in one flat dict under the module's `state_dict` names, as `best.safetensors` holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch import nn as tnn

from fashion_func import models
from fashion_func.interop.torch_modules import NAMES, build, hparams_from_module, hparams_from_params
from fashion_func.models import Model, ModelState, Params, Stage

__all__ = ["from_module", "functionalize", "to_module"]


def check_shapes(name: str, module: tnn.Module, params: Mapping[str, Tensor]) -> None:
    """ValueError unless `params` has exactly the module's `state_dict` names, shapes and kinds."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in params]
    unexpected = sorted(set(params) - set(expected))
    if missing or unexpected:
        buffers = {k for k, _ in module.named_buffers()}
        hint = (
            "; a stateful model's weights hold its buffers too: pass interop.merge_state(params, model_state)"
            if missing and set(missing) <= buffers
            else ""
        )
        raise ValueError(
            f"params do not match {name}: missing keys {missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    for k, v in expected.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise ValueError(
                f"params do not match {name}: {k!r} has shape {list(params[k].shape)}, not {list(v.shape)}"
            )
        # a float counter would load (assign=True takes the given tensor) and then count in floats
        if params[k].is_floating_point() != v.is_floating_point():
            raise ValueError(f"params do not match {name}: {k!r} has dtype {params[k].dtype}, not {v.dtype}")


def template(
    name: str,
    hparams: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    buffer_dtype: torch.dtype | None = None,
) -> Params:
    """Meta tensors with the names, order, shapes and dtypes of the model's weights (its module's
    `state_dict`): floating params in `dtype`, floating buffers in `buffer_dtype` (default
    `dtype`), integer buffers (`num_batches_tracked`) in their own."""
    module = build(name, hparams)
    buffers = {k for k, _ in module.named_buffers()}

    def dtype_of(k: str, v: Tensor) -> torch.dtype:
        if not v.is_floating_point():
            return v.dtype
        return (buffer_dtype or dtype) if k in buffers else dtype

    return {
        k: torch.empty(v.shape, dtype=dtype_of(k, v), device="meta") for k, v in module.state_dict().items()
    }


def split_state(model: Model, weights: Mapping[str, Tensor]) -> tuple[Params, ModelState]:
    """`(params, model_state)` of a weights dict holding both (a stateful model's weights file): the
    state is the entries named like `model.init_state()`'s keys, the params the rest, each in
    `weights`' order, nothing copied (a stateless model: `(dict(weights), {})`). ValueError when a
    stateful model's buffer is missing."""
    state_keys = model.init_state(device="meta").keys()  # names only: nothing allocated
    missing = [k for k in state_keys if k not in weights]
    if missing:
        raise ValueError(
            f"weights of {model.name} lack its buffers {missing[:5]}: a stateful model's weights hold "
            "params and buffers together ({**params, **model_state})"
        )
    params = {k: v for k, v in weights.items() if k not in state_keys}
    return params, {k: v for k, v in weights.items() if k in state_keys}


def merge_state(params: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> Params:
    """One weights dict `{**params, **model_state}`, as a weights file holds it (the inverse of
    `split_state`); ValueError when a name is in both (a buffer would silently replace a param)."""
    both = sorted(set(params) & set(model_state))
    if both:
        raise ValueError(f"names both in params and model_state: {both[:5]}")
    return {**params, **model_state}


def identify(params: Mapping[str, Tensor]) -> str:
    """The name of the known architecture whose weight names and shapes `params` (a stateful
    model's with its buffers) has; ValueError when no model in `models.MODELS` matches."""
    for name in NAMES:
        try:
            check_shapes(name, build(name, hparams_from_params(name, params)), params)
        except (ValueError, TypeError):
            continue
        return name
    shown = ", ".join(list(params)[:6])
    raise ValueError(
        f"parameters [{shown}] match none of the known models ({', '.join(NAMES)}); "
        "use interop.functionalize(module) for other architectures"
    )


def to_module(model_name: str, params: Mapping[str, Tensor], **hparams: Any) -> tnn.Module:
    """A plain PyTorch module (eval mode) holding copies of `params` (a stateful model's with its
    buffers: `merge_state`), loaded strictly, whose forward equals `apply`. Hyperparameters
    (class count, widths) are read off the shapes unless given."""
    hp = {**hparams_from_params(model_name, params), **hparams}
    module = build(model_name, hp)
    check_shapes(model_name, module, params)
    # assign=True swaps the meta tensors for real ones; the clones keep the caller's params out
    # of reach of in-place optimizers working on the module.
    module.load_state_dict({k: v.detach().clone() for k, v in params.items()}, strict=True, assign=True)
    return module.eval()


def from_module(module: tnn.Module, *, check: bool = True) -> Params:
    """Weights (detached copies, a stateful model's with its buffers) of a module whose
    architecture `identify` knows. With `check` its eval-mode forward is also compared with
    `Model.apply` on a fixed input: the same names computing something else is a ValueError."""
    sd = module.state_dict()
    name = identify(sd)
    hparams = hparams_from_module(name, module)  # the shapes', and a group count off the layers
    model = models.get(name, **hparams)
    weights = {k: sd[k].detach().clone() for k in template(name, hparams)}
    if check:
        _check_forward(module, name, model, weights)
    return weights


def _check_forward(module: tnn.Module, name: str, model: Model, weights: Params) -> None:
    """ValueError unless the module's eval-mode forward equals `model.apply` on a fixed input. A
    stateful model is compared again with perturbed running statistics (through `functional_call`,
    the module untouched): fresh ones (mean 0, var 1) make eval-mode batch norm nearly the identity,
    which would hide a module that normalises in another place."""
    params, state = split_state(model, weights)
    p0 = next(iter(params.values()))
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, *model.input_shape), generator=g).to(p0.device, p0.dtype)
    trials = [state]
    if state:
        perturbed = dict(state)
        for k, v in state.items():
            if k.endswith(".running_mean"):
                perturbed[k] = v + torch.randn(v.shape, generator=g).to(v)
            elif k.endswith(".running_var"):  # stays positive: scaled by U(0.5, 2)
                perturbed[k] = v * (0.5 + 1.5 * torch.rand(v.shape, generator=g).to(v))
        trials.append(perturbed)
    tol = 1e-3 if p0.dtype in (torch.float16, torch.bfloat16) else 1e-5
    was_training = module.training
    module.eval()
    try:
        for buffers in trials:
            with torch.no_grad():
                if model.stateful:
                    got = torch.func.functional_call(module, buffers, (x,))
                    expected, _ = model.apply(params, x, state=buffers)
                else:
                    got, expected = module(x), model.apply(params, x)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol):
                raise ValueError(
                    f"{type(module).__name__} has the parameters of {name} but computes something else; "
                    "use interop.functionalize(module) to run it as it is"
                )
    finally:
        module.train(was_training)


def functionalize(module: tnn.Module, *, name: str | None = None) -> tuple[Model, Params]:
    """Any `nn.Module` as a `Model` plus copies of its parameters, via `torch.func.functional_call`:
    `apply(params, x, train=...)` runs the module's forward with `params` swapped in, in train/eval
    mode for the call, so `make_train_step(model, ...)` trains them functionally. Buffers are the
    module's, constants (batch norm's running statistics, written in training, land in the module:
    use eval mode or a `models` model); dropout inside draws from torch's global RNG, not `key`.
    `init` ignores its generator: copies of the current parameters."""
    params = {k: p.detach().clone() for k, p in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def forward(p: Params, x: Tensor, train: bool, key: Tensor | None) -> Tensor:
        was_training = module.training
        module.train(train)
        try:
            return torch.func.functional_call(module, (p, buffers), (x,), strict=True)
        finally:
            module.train(was_training)

    def init(generator: torch.Generator, *, dtype: torch.dtype = torch.float32, device: Any = None) -> Params:
        return {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).clone()
            for k, v in params.items()
        }

    model = Model(name or type(module).__name__, {}, init, (Stage("module", forward),))
    return model, {k: v.clone() for k, v in params.items()}
