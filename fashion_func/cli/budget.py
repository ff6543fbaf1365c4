"""Memory bounded by what the user can see: a run's size is capped and estimated before anything is
allocated, and refused (one line naming the estimate and the flag behind it, exit 2) when it exceeds
the memory the device has available.

The estimate, for all members of an ensemble or sweep together (`estimate`):

- state: parameters and batch-norm buffers, gradients, the optimizer's slots (two for adam and adamw,
  one for sgd with momentum, one more for `--ema`), and the next step's copy of parameters and slots
  (a functional update builds the new state before freeing the old);
- activations: every tensor the forward pass of one example creates, counted on the meta device
  (shapes only, nothing allocated), times the batch, doubled for the backward pass; evaluation's
  batch (twice with `--tta`) when that is larger;
- per-example gradients (private runs): one chunk of them, `[chunk, parameters]` as the step
  holds them (`step.CHUNK_EXAMPLES` examples, `step.CHUNK_BYTES` at most); a private run's batch
  is the Poisson batches' padded size (`data.poisson_capacity`);
- data: the uint8 images and labels of the splits, which live on the device, and for a model of
  ScatterNet features (`Model.takes_features`) their float32 features too.

Size-like values are capped first (`CAPS`), so the arithmetic never meets an absurd number. A
checkpoint's saved config reaches `check` through the same `Config` as the flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fashion_func import data, models, step
from fashion_func.cli.config import MAX_MEMBERS, Config, ConfigError, is_private

__all__ = ["CAPS"]

# The most a size-like value may be, by Config field: beyond it no run of ours makes sense (a
# batch larger than the largest split is that split), and the estimate never sees it.
CAPS: dict[str, int] = {
    "ensemble": MAX_MEMBERS,  # the sweep's combinations are capped alike, in config.parse_sweep
    "width": models.MAX_SIZE,
    "batch_size": data.MAX_EXAMPLES["train"],
    "eval_batch_size": data.MAX_EXAMPLES["train"],
}
BYTES = 4  # parameters, optimizer state and activations are counted as float32
SLOTS = {"adam": 2, "adamw": 2}  # optimizer state per parameter; sgd: its momentum, if any
BACKWARD = 2  # the forward's tensors are kept for the backward pass, which makes as many again


class BudgetError(ConfigError):
    """The run would not fit in memory, or a size-like value is beyond its cap (exit 2)."""


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs at its peak, by kind, for all members together."""

    state: int  # parameters, buffers, gradients, optimizer slots, the next step's copy
    activations: int  # the larger of a training batch's (with backward, and a private run's
    # chunk of per-example gradients) and an eval batch's
    data: int  # the splits' uint8 images and labels on the device (and features, float32)

    @property
    def total(self) -> int:
        return self.state + self.activations + self.data


def check_caps(cfg: Config) -> None:
    """BudgetError naming the first size-like value above its cap (`CAPS`)."""
    for name, cap in CAPS.items():
        value = getattr(cfg, name)
        if value is not None and value > cap:
            raise BudgetError(f"--{name.replace('_', '-')} must be at most {cap}, got {value}")


def estimate(cfg: Config) -> Estimate:
    """The memory `cfg`'s run needs (see the module docstring); allocates nothing."""
    check_caps(cfg)
    model = models.get(cfg.model, **({"width": cfg.width} if cfg.width is not None else {}))
    n_params, n_buffers, per_example = _model_sizes(model)
    slots = SLOTS.get(cfg.optimizer, 1 if cfg.momentum > 0 else 0) + (cfg.ema is not None)
    per_member = BYTES * (2 * (n_params * (1 + slots) + n_buffers) + n_params)
    n_train = min(cfg.limit_train or data.MAX_EXAMPLES["train"], data.MAX_EXAMPLES["train"])
    n_test = min(cfg.limit_val or data.MAX_EXAMPLES["test"], data.MAX_EXAMPLES["test"])
    n_val = max(n_test, cfg.val_split)
    batch, grads = min(cfg.batch_size, n_train), 0
    if is_private(cfg):  # Poisson batches padded to their capacity; a chunk as step._auto_chunk sizes it
        batch = data.poisson_capacity(n_train, batch / n_train)
        chunk = max(1, min(batch, step.CHUNK_EXAMPLES, step.CHUNK_BYTES // (BYTES * n_params)))
        grads = chunk * n_params * BYTES
    train_act = per_example * batch * BACKWARD + grads
    eval_act = per_example * min(cfg.eval_batch_size, n_val) * (2 if cfg.tta else 1)
    k = cfg.members
    image = 8 + math.prod(model.input_shape)  # uint8 pixels and an int64 label
    if model.takes_features:  # the images (28x28 uint8) and their float32 features
        image = 8 + math.prod(data.IMAGE_SHAPE) + BYTES * math.prod(model.input_shape)
    return Estimate(state=k * per_member, activations=k * max(train_act, eval_act),
                    data=(n_train + n_test) * image)  # fmt: skip


def available(device: torch.device) -> int:
    """Bytes the run may use on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check(cfg: Config, device: torch.device, *, limit: int | None = None) -> Estimate:
    """`cfg`'s estimate, or BudgetError (one line: the estimate, the memory available and the
    flag that makes the run too large) when it exceeds `limit` (default: `available(device)`)."""
    est = estimate(cfg)
    limit = available(device) if limit is None else limit
    if est.total <= limit:
        return est
    flag, smaller = _culprit(cfg, est.total)
    hint = f"; lower {flag} (without it: about {_gb(smaller)})" if flag else "; choose a smaller model"
    raise BudgetError(
        f"{_flag_text(cfg, flag)} needs about {_gb(est.total)} (parameters and optimizer state "
        f"{_gb(est.state)}, activations {_gb(est.activations)}, data {_gb(est.data)}), more than the "
        f"{_gb(limit)} available on {device.type}{hint}"
    )


# The flags that make a run large, each with the config values that undo it.
_DEFAULTS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "--ensemble": lambda cfg: {"ensemble": 1} if cfg.ensemble > 1 else {},
    "--sweep": lambda cfg: {"sweep": None} if cfg.sweep else {},
    "--width": lambda cfg: {"width": None} if cfg.width is not None else {},
    "--batch-size": lambda cfg: {"batch_size": min(cfg.batch_size, Config.batch_size)},
    "--eval-batch-size": lambda cfg: {"eval_batch_size": min(cfg.eval_batch_size, Config.eval_batch_size)},
}


def _culprit(cfg: Config, total: int) -> tuple[str | None, int]:
    """The flag whose default value shrinks the estimate most, and the estimate without it."""
    best: tuple[str | None, int] = (None, total)
    for flag, undo in _DEFAULTS.items():  # a flag at its default already changes nothing
        smaller = estimate(dataclasses.replace(cfg, **undo(cfg))).total
        if smaller < best[1]:
            best = (flag, smaller)
    return best


def _flag_text(cfg: Config, flag: str | None) -> str:
    if flag == "--sweep":
        return f"--sweep ({cfg.members} members)"
    if flag is None:
        return f"--model {cfg.model}"
    return f"{flag} {getattr(cfg, flag[2:].replace('-', '_'))}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class _OnMeta(TorchFunctionMode):
    """Every tensor made on the meta device (shapes only, no memory): a `device=` argument is
    replaced, `.to(...)` keeps a meta tensor where it is. Sums the bytes of every tensor a
    torch function returns (views too: an overestimate)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _META
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * BYTES
        return out


_META = torch.device("meta")


def _model_sizes(model: models.Model) -> tuple[int, int, int]:
    """(parameters, buffers, activation bytes per example) of `model`, from shapes on the meta
    device: the forward at batch 1 and 2, whose difference is what one more example costs."""
    with torch.no_grad(), _OnMeta():  # the init draws on its generator's device: kept on meta too
        params = model.init(torch.Generator(), device=_META)
        buffers = model.init_state(device=_META)
    counted = []
    for batch in (1, 2):
        with torch.no_grad(), _OnMeta() as count:
            x = torch.empty(batch, *model.input_shape, device=_META)
            model.apply(params, x, **({"state": buffers} if model.stateful else {}))
        counted.append(count.bytes)
    n_params = sum(p.numel() for p in params.values())
    return n_params, sum(b.numel() for b in buffers.values()), counted[1] - counted[0]
