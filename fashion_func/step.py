"""The pure, compiled training and evaluation steps, and per-example research helpers.

`train_step(state, batch) -> (state, metrics)`, `batch` `(inputs, targets)` on the device:
preprocessing, forward, loss, gradient and optimizer update run in one compiled function that
never synchronises with the host; a stateful model's `TrainState.model_state` is threaded through.

The model is a `models.Model` or a plain function `fn(params, x[, train=, key=]) -> logits`, or,
given a model state, `fn(params, x, *, train, key, state) -> (logits, new_state)`. It may return
several outputs (a dict `{name: tensor}` or a tuple): the loss and `metrics` receive them whole,
the accuracy metrics read the class head (`StepOptions.class_output`).

What a step returns (the sum/count convention `loop.fit` reduces to train_* and val_* metrics):

- the train step's metrics are 0-d device tensors, sums over the batch: `loss_sum` and
  `count` (the batch size); for class labels `correct` and, with `topk`, `top{k}_correct`;
  and `<name>_sum` for each extra per-example output of the loss or of `metrics`.
- the eval step's outputs are per example: `loss` `[B]` and `logits` `[B, C]`, float32
  (`logits`: the class head, absent where there is none); for class labels `correct` and
  `top{k}_correct` `[B]` bool (label among the `topk` highest logits) and `pred` `[B]` int64;
  and `<name>` `[B]` for each extra output.

Extra outputs come from a loss that returns `(values [B], {name: [B]})` instead of
`values [B]`, and from `metrics=`, a function `(outputs, targets) -> {name: [B]}`.

The builders' keywords are `StepOptions`' fields. Extension point: `stages(model, optimizer,
**options)` returns the pure, uncompiled `Stages`, which a caller may replace a piece of (as
`fashion_func.ensemble` vmaps `gradients`) before `train_step()` / `eval_step()` compile them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from fashion_func import losses, nn, optim, tree
from fashion_func import metrics as metrics_lib
from fashion_func.models import Model, ModelState, Params
from fashion_func.preprocess import (
    FASHION_MNIST,
    NormalizeImages,  # noqa: F401  (importable here by module path; not in __all__)
)
from fashion_func.privacy import NOISE_SALT, ClipAndNoise, add_noise, check_mask, clipped_sum
from fashion_func.state import TrainState

__all__ = [
    "Stages",
    "StepOptions",
    "loss_fn",
    "make_eval_step",
    "make_train_step",
    "per_example_grad_norms",
    "per_example_grads",
    "stages",
    "streamed_grad_norms",
]

PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = (True, False, "update")

# a loss: (outputs, targets) -> per-example [B], or (per-example [B], {name: [B]})
LossFn = Callable[[Tensor, Tensor], Any]
MetricsFn = Callable[[Tensor, Tensor], Mapping[str, Tensor]]
Preprocess = Callable[[Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]
EvalStep = Callable[..., dict[str, Tensor]]
# the names the steps give their own outputs; extra outputs may not take them
_RESERVED = frozenset({"loss", "count", "correct", "logits", "pred", "first_bad", "clipped"})


class CoreIn(NamedTuple):
    """What the compiled train core reads."""

    params: Params
    model_state: ModelState
    opt_state: Any
    step: Tensor
    rng: Tensor
    inputs: Tensor
    targets: Tensor
    # a Poisson batch's mask `[B]` (False: padding, contributes nothing); None: every example
    mask: Tensor | None = None
    # the per-example stage's `max_norm` / `noise_multiplier` (`privacy.ClipAndNoise.hyperparams`)
    private: dict[str, Tensor] | None = None


class CoreOut(NamedTuple):
    """What the compiled train core returns."""

    params: Params
    model_state: ModelState
    opt_state: Any
    step: Tensor
    metrics: dict[str, Tensor]


def _autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_compile(compile: Any) -> None:
    if not any(compile is m or (isinstance(m, str) and compile == m) for m in COMPILE_MODES):
        raise ValueError(f"compile must be True, False or 'update', not {compile!r}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


# What a loss and a metrics function may return (checked once per trace: shapes are static).
def _is_topk_name(name: str) -> bool:
    # `top{k}_correct`, without `re`, which torch.compile would not trace
    return name.startswith("top") and name.endswith("_correct") and name[3:-8].isdigit()


def _check_named(extra: Mapping[Any, Any], batch_size: int, source: str) -> dict[str, Tensor]:
    """`extra` as a dict of per-example tensors `[B]` with names free to use, or a clear error."""
    out: dict[str, Tensor] = {}
    for name, value in extra.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{source} output names must be identifiers, got {name!r}")
        if name in _RESERVED or name.startswith("member_") or _is_topk_name(name):
            raise ValueError(f"{source} output name {name!r} is taken by the step's own outputs; rename it")
        if not isinstance(value, Tensor) or tuple(value.shape) != (batch_size,):
            raise ValueError(
                f"{source} output {name!r} must be per-example values of shape [B] = [{batch_size}], "
                f"got {_describe(value)}"
            )
        out[name] = value
    return out


def _loss_parts(loss: LossFn, outputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """`loss(outputs, targets)` as (per-example values `[B]`, {name: `[B]`})."""
    got, size = loss(outputs, targets), targets.shape[0]
    if isinstance(got, Tensor):
        values, extra = got, {}
    elif isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], Mapping):
        values, extra = got
    else:
        raise TypeError(
            f"loss must return per-example values [B] or (values [B], {{name: [B]}}), got {_describe(got)}"
        )
    if not isinstance(values, Tensor) or tuple(values.shape) != (size,):
        raise ValueError(
            f"loss must return per-example values of shape [B] = [{size}], got {_describe(values)}; "
            "use a per-example loss such as losses.cross_entropy_per_example"
        )
    return values, _check_named(extra, size, "loss")


def _metric_parts(
    metrics: MetricsFn | None, logits: Tensor, targets: Tensor, taken: Any
) -> dict[str, Tensor]:
    """`metrics(logits, targets)` checked: per-example `[B]`, no name the loss already gave."""
    if metrics is None:
        return {}
    got = metrics(logits, targets)
    if not isinstance(got, Mapping):
        raise TypeError(f"metrics must return {{name: per-example values [B]}}, got {_describe(got)}")
    both = sorted(set(got) & set(taken))
    if both:
        raise ValueError(f"metrics and the loss both return {', '.join(map(repr, both))}; rename one")
    return _check_named(got, targets.shape[0], "metrics")


def _is_labels(labels: Any) -> bool:
    return isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point()


def _is_classification(logits: Tensor, labels: Tensor) -> bool:
    return logits.dim() == 2 and _is_labels(labels)


# what a model returns: logits `[B, C]`, or several outputs, {name: [B, ...]} or a tuple of them
Outputs = Tensor | Mapping[str, Tensor] | tuple[Tensor, ...]


@dataclass(frozen=True)
class _Classes:
    """What the built-in accuracy metrics read: the class head among a model's outputs (a key of
    a dict, an index of a tuple; None: "logits" / 0), how many classes there are, and top-k."""

    topk: int | None = None
    output: str | int | None = None
    num_classes: int | None = None

    def head(self, outputs: Outputs, labels: Tensor) -> Tensor | None:
        """The class logits among `outputs`, checked against the class count (shapes are static:
        checked once per trace, a one-line ValueError at the first call); None if there are none."""
        if isinstance(outputs, Tensor):
            logits: Tensor | None = outputs
        elif isinstance(outputs, Mapping):
            key = "logits" if self.output is None else self.output
            logits = outputs.get(key) if isinstance(key, str) else None
            if logits is None and _is_labels(labels):
                raise ValueError(f"the model returns outputs {sorted(outputs)} and none is the class head "
                                 f"{key!r}: name it with class_output=")  # fmt: skip
        else:
            index = 0 if self.output is None else self.output
            if not isinstance(index, int) or not -len(outputs) <= index < len(outputs):
                raise ValueError(f"the model returns a tuple of {len(outputs)} outputs: class_output must "
                                 f"be the index of the class head, not {index!r}")  # fmt: skip
            logits = outputs[index]
        if logits is not None and self.num_classes is not None and _is_classification(logits, labels):
            if logits.shape[-1] != self.num_classes:
                raise ValueError(
                    f"the class head has {logits.shape[-1]} columns but there are {self.num_classes} "
                    "classes: return the other outputs beside it ({'logits': ..., 'aux': ...}) or pass "
                    "num_classes="
                )
        return logits


def _class_outputs(outputs: Outputs, labels: Tensor, classes: _Classes) -> dict[str, Tensor]:
    """Per-example `correct`, `top{k}_correct` (bool) and `pred` for class labels, read from the
    class head; {} otherwise."""
    logits, topk = classes.head(outputs, labels), classes.topk
    if logits is None or not _is_classification(logits, labels):
        return {}
    pred = logits.argmax(-1)
    out = {"correct": pred == labels}
    if topk is not None:
        out[f"top{topk}_correct"] = metrics_lib.topk_correct(logits, labels, topk)
    out["pred"] = pred
    return out


@dataclass(frozen=True)
class StepOptions:
    """The step builders' keywords and defaults, checked when a builder is called (a one-line
    ValueError/TypeError).

    loss: `(outputs, targets) -> per-example losses [B]` or `(losses [B], {name: [B]})`, given
        the model's outputs whole; the step minimises the mean. None: cross-entropy of the
        class head. Another return is a one-line ValueError/TypeError at the first call.
    metrics: `(outputs, targets) -> {name: per-example values [B]}`, computed on the batch.
    preprocess: a pure function of the inputs, run inside the compiled step; the default turns
        Fashion-MNIST uint8 `[B, 28, 28]` into normalised float (NHWC on CPU) and refuses other
        dtypes; None: the inputs as given. One taking a `key` keyword (`augment.Augment`) gets a
        key derived from (rng, step), so augmentation is a function of seed and step.
    precision: "fp32"; "tf32" (the caller enables TF32 matmuls on CUDA); "bf16" autocast.
        Master weights, the loss and the optimizer stay float32.
    compile: True compiles the whole step; "update" only the optimizer update (its elementwise
        passes fuse into one), with a per-example stage's noise draw; False: eager. An eval step
        runs "update" eagerly.
    topk: also count `top{k}_correct` (default: none in a train step, 5 in an eval step).
    tta (eval steps only): predict the mean probabilities of each image and its mirror image.
    class_output: the output the accuracy metrics and the default loss read: a dict's key
        (default "logits"; missing: a one-line ValueError at the first call) or a tuple's index
        (default 0).
    num_classes: the labels' class count (default: a `Model`'s `num_classes` hyperparameter);
        class logits with another column count are a one-line ValueError at the first call.
    device_type (train steps only): the autocast device type; None: the inputs' device's.
    reduce_grads (train steps only): a pure `grads -> grads` stage before the update (the
        data-parallel all-reduce), compiled with the step.
    per_example (train steps only): DP-SGD's stage (`privacy.clip_and_noise`): each kept
        example's gradient is clipped and summed, `reduce_grads` (then a sum:
        `group.all_reduce_sum`) adds the ranks' sums, noise from (rng, step) is added and the sum
        divided by the expected batch size. A batch may be `(inputs, targets, mask)`
        (`data.PoissonBatches`): masked-out examples count for nothing. The metrics add
        `clipped_sum` (examples clipped). A model with a model state is refused.
    """

    loss: LossFn | None = None
    metrics: MetricsFn | None = None
    preprocess: Preprocess | None = FASHION_MNIST
    precision: str = "fp32"
    compile: bool | str = True
    topk: int | None = None
    tta: bool = False
    class_output: str | int | None = None
    num_classes: int | None = None
    device_type: str | None = None
    reduce_grads: Callable[[Params], Params] | None = None
    per_example: ClipAndNoise | None = None

    # which builders take which options: a builder refuses the others as unknown keywords
    TRAIN_ONLY: ClassVar[frozenset[str]] = frozenset({"device_type", "reduce_grads", "per_example"})
    EVAL_ONLY: ClassVar[frozenset[str]] = frozenset({"tta"})
    NOT_ENSEMBLE: ClassVar[frozenset[str]] = frozenset({"class_output", "num_classes"})
    ASSEMBLY: ClassVar[frozenset[str]] = frozenset({"compile", "reduce_grads"})  # not `stages`': its steps'
    EVAL_DEFAULTS: ClassVar[Mapping[str, Any]] = {"topk": 5}

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        _check_compile(self.compile)
        if isinstance(self.class_output, bool) or not isinstance(self.class_output, (str, int, type(None))):
            raise TypeError(f"class_output must be an output's name or index, not {self.class_output!r}")
        n = self.num_classes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"num_classes must be a positive integer, not {n!r}")
        if self.per_example is not None and not isinstance(self.per_example, ClipAndNoise):
            raise TypeError(f"per_example must be a privacy.clip_and_noise(...) stage (DP-SGD), "
                            f"got {type(self.per_example).__name__}")  # fmt: skip

    @classmethod
    def of(cls, builder: str, given: Mapping[str, Any], *, train: bool | None = None,
           ensemble: bool = False) -> StepOptions:  # fmt: skip
        """The options `builder` was given: a train (`train=True`) or eval (False) step's, or
        `stages`' (None: both steps' but compile and reduce_grads, which `Stages.train_step` /
        `eval_step` take); an option the builder does not take is refused as Python refuses an
        unknown keyword."""
        refused = cls.NOT_ENSEMBLE if ensemble else frozenset()
        refused |= cls.ASSEMBLY if train is None else cls.EVAL_ONLY if train else cls.TRAIN_ONLY
        for name in given:
            if name in refused or name not in _OPTION_NAMES:
                raise TypeError(f"{builder}() got an unexpected keyword argument {name!r}")
        defaults = cls.EVAL_DEFAULTS if train is False else {}
        return cls(**{**defaults, **given})

    def replace(self, **changes: Any) -> StepOptions:
        """A copy with `changes` applied (checked again)."""
        return dataclasses.replace(self, **changes)


_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(StepOptions))


# Models: a Model, or a plain function (stateless, or stateful given a model state).
Forward = Callable[..., tuple[Tensor, ModelState]]


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _keywords(fn: Any) -> list[str]:
    """Which of `train`, `key`, `state` the function `fn` takes (all of them with `**kwargs`)."""
    if not callable(fn):
        raise TypeError(f"expected a Model or a function (params, x) -> logits, got {type(fn).__name__}")
    accepted = _parameters(fn)
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return [k for k in ("train", "key", "state") if takes_all or k in accepted]


def _forward_fn(model: Model | Callable[..., Any]) -> Forward:
    """`forward(params, x, model_state, *, train, key) -> (logits, new model state)` for a Model or
    a plain function; a plain function is called with `state=` exactly when there is a model state."""
    if isinstance(model, Model):

        def of_model(p: Params, x: Tensor, state: ModelState, *, train: bool, key: Tensor | None):
            if model.stateful:
                return model.apply(p, x, train=train, key=key, state=state)
            return model.apply(p, x, train=train, key=key), state

        return of_model
    wanted, name = _keywords(model), _name(model)
    needs_state = "state" in wanted and not _state_optional(model)  # here: inspect is not traceable
    stateful_form = f"{name}(params, x, *, train, key, state) -> (logits, new_state)"

    def of_function(p: Params, x: Tensor, state: ModelState, *, train: bool, key: Tensor | None):
        given = {"train": train, "key": key}
        kwargs = {k: given[k] for k in wanted if k != "state"}
        if not state:  # the state's structure (its keys) is static: no branch on values
            if needs_state:
                raise TypeError(
                    f"model {name} takes state=: give its initial model state "
                    "(state.create(..., model_state=...), ensemble.init(..., init_state=...))"
                )
            return _check_logits(model(p, x, **kwargs), name), state
        if "state" not in wanted:
            raise TypeError(f"a model state was given but model {name} takes no state=; "
                            f"a stateful function is {stateful_form}")  # fmt: skip
        return _check_stateful(model(p, x, **kwargs, state=state), state, stateful_form)

    return of_function


def _parameters(fn: Any) -> Mapping[str, inspect.Parameter]:
    """`fn`'s parameters by name; none known for a callable without a signature (a builtin)."""
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def _state_optional(fn: Any) -> bool:
    param = _parameters(fn).get("state")
    return param is None or param.default is not inspect.Parameter.empty


def _is_outputs(out: Any) -> bool:
    """A tensor, or several: a dict of tensors named by strings, or a tuple of tensors."""
    if isinstance(out, Mapping):
        return bool(out) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in out.items())
    if isinstance(out, tuple):
        return bool(out) and all(isinstance(v, Tensor) for v in out)
    return isinstance(out, Tensor)


def _check_logits(out: Any, name: str) -> Outputs:
    if not _is_outputs(out):
        raise TypeError(f"model {name} must return logits (a tensor), or a dict or tuple of tensors, without "
                        f"a model state, got {_describe(out)}")  # fmt: skip
    return dict(out) if isinstance(out, Mapping) else out


def _check_stateful(out: Any, state: ModelState, form: str) -> tuple[Outputs, ModelState]:
    if not (isinstance(out, tuple) and len(out) == 2 and _is_outputs(out[0]) and isinstance(out[1], Mapping)):
        raise TypeError(f"expected {form}, got {_describe(out)}")
    logits, new_state = out
    if sorted(new_state) != sorted(state):
        missing = sorted(k for k in state if k not in new_state)
        extra = sorted(k for k in new_state if k not in state)
        raise TypeError(f"expected {form} with new_state keeping the state's keys; "
                        f"missing {missing}, unexpected {extra}")  # fmt: skip
    return logits, dict(new_state)


def _at_least_float32(outputs: Any) -> Any:
    # bf16/fp16 outputs (autocast) are raised to float32 for the loss; float64 stays float64
    return tree.map(lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t, outputs)


def _detached(outputs: Any) -> Any:
    return tree.map(torch.Tensor.detach, outputs)


def _default_loss(classes: _Classes) -> LossFn:
    """Cross-entropy of the class head (the whole output when the model returns one tensor)."""

    def cross_entropy(outputs: Outputs, targets: Tensor) -> Tensor:
        logits = outputs if isinstance(outputs, Tensor) else classes.head(outputs, targets)
        if logits is None:
            raise ValueError("the default loss is cross-entropy of class labels: pass a loss= for these")
        return losses.cross_entropy_per_example(logits, targets)

    return cross_entropy


def _preprocess(preprocess: Preprocess | None, x: Tensor, key: Tensor | None = None) -> Tensor:
    """`preprocess(x)`; given a `key` (the caller checked `_takes_key`), `preprocess(x, key=...)`
    with the augmentation's own stream of it."""
    if preprocess is None:
        return x
    if key is not None:
        return preprocess(x, key=nn.fold_in(key, _AUGMENT_SALT))
    return preprocess(x)


_AUGMENT_SALT = 0xA116  # augmentation draws from its own stream of the step's key


def _takes_key(fn: Callable[..., Any]) -> bool:
    return "key" in _parameters(fn)


@dataclass(frozen=True)
class Stages:
    """The pure, uncompiled pieces a step is assembled from (module docstring).

    gradients: `CoreIn -> (grads, new model state, metric sums)`, everything before the update.
    update: `(params, grads, opt_state, step) -> (params, opt_state, step)`; None without an optimizer.
    evaluate: `(params, model_state, inputs, targets) -> per-example outputs`; outputs: the same
    of given logits. name, needs_state: the model's name; whether it needs a model state.
    """

    gradients: Callable[[CoreIn], tuple[Params, ModelState, dict[str, Tensor]]]
    update: Callable[[Params, Params, Any, Tensor], tuple[Params, Any, Tensor]] | None
    evaluate: Callable[[Params, ModelState, Tensor, Tensor], dict[str, Tensor]]
    outputs: Callable[[Tensor, Tensor], dict[str, Tensor]]
    name: str
    needs_state: bool
    # per-example (DP-SGD) steps: `noise(summed grads, CoreIn) -> grads` runs after `reduce_grads`
    noise: Callable[[Params, CoreIn], Params] | None = None
    per_example: ClipAndNoise | None = None

    def replace(self, **changes: Any) -> Stages:
        """A copy with `changes` applied (e.g. a vmapped `gradients`)."""
        return dataclasses.replace(self, **changes)

    def train_step(
        self,
        *,
        compile: bool | str = True,
        reduce_grads: Callable[[Params], Params] | None = None,
        check: Callable[[TrainState], Any] | None = None,
    ) -> TrainStep:
        """`train_step(state, batch)`: gradients, `reduce_grads`, update, compiled as `compile` says;
        `check(state)` runs first (outside the compiled part), if given."""
        _check_compile(compile)
        if self.update is None:
            raise ValueError("these stages were built without an optimizer: pass one to stages()")
        gradients, update, noise, dp = self.gradients, self.update, self.noise, self.per_example
        # the clipped sums of the ranks must be added, not averaged: the noise is scaled to a sum
        if dp is not None and getattr(reduce_grads, "__name__", "") == "all_reduce_mean":
            raise ValueError(
                "with per_example, reduce_grads must sum over the ranks: pass group.all_reduce_sum"
            )

        def finish(inp: CoreIn, grads: Params) -> tuple[Params, Any, Tensor]:
            if noise is not None:  # after the sum over ranks: the noise is added once
                grads = noise(grads, inp)
            return update(inp.params, grads, inp.opt_state, inp.step)

        # "update": forward and backward eager; the noise's draw and the optimizer's elementwise
        # passes fused
        fast_finish = torch.compile(finish) if compile == "update" else finish

        def core(inp: CoreIn) -> CoreOut:
            grads, model_state, metrics = gradients(inp)
            if reduce_grads is not None:
                grads = reduce_grads(grads)
            params, opt_state, step = fast_finish(inp, grads)
            return CoreOut(params, model_state, opt_state, step, metrics)

        compiled = torch.compile(core) if compile is True else core
        made: dict[Any, dict[str, Tensor]] = {}

        def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
            if check is not None:
                check(state)
            inputs, targets, mask = _unpack(batch, dp is not None)
            private = None
            if dp is not None:  # host values made tensors once per shape and device, not each step
                where = (tuple(state.step.shape), state.step.device)
                private = made.get(where) or made.setdefault(where, dp.hyperparams(state.step))
            out = compiled(CoreIn(state.params, state.model_state, state.opt_state, state.step, state.rng,
                                  inputs, targets, mask, private))  # fmt: skip
            new = state.replace(
                params=out.params, opt_state=out.opt_state, step=out.step, model_state=out.model_state
            )
            return new, out.metrics

        # what the step enforces, as data: fit(privacy=) checks its accountant against it
        train_step.per_example = dp  # type: ignore[attr-defined]
        return train_step

    def eval_step(self, *, compile: bool | str = True) -> EvalStep:
        """`eval_step(params_or_state, batch, model_state=None)`; compiled when `compile is True`
        ("update" has no update to compile here: eager, like False)."""
        _check_compile(compile)
        fn = torch.compile(self.evaluate) if compile is True else self.evaluate
        name, needs_state = self.name, self.needs_state

        def eval_step(params: Params | TrainState, batch: Batch, model_state: ModelState | None = None):
            if isinstance(params, TrainState):
                params, model_state = params.params, params.model_state
            if needs_state and not model_state:
                raise ValueError(f"model {name} is stateful: pass its model_state (or a TrainState)")
            return fn(params, model_state or {}, *batch)

        return eval_step


def stages(
    model: Model | Callable[..., Any], optimizer: optim.GradientTransformation | None = None, **options: Any
) -> Stages:
    """The pure, uncompiled `Stages` of a step; options: the keywords of `StepOptions`, as
    `make_train_step` / `make_eval_step` take them (`tta` for the eval stage only)."""
    return stages_of(model, optimizer, StepOptions.of("stages", options))


def stages_of(model: Model | Callable[..., Any], optimizer: Any, opts: StepOptions) -> Stages:
    """`stages` of options already made (the builders', `ensemble`'s)."""
    forward = _forward_fn(model)
    private = opts.per_example
    if private is not None and isinstance(model, Model) and model.stateful:
        raise ValueError(
            f"model {model.name} has batch norm, which mixes the examples of a batch: per-example "
            "clipping (DP-SGD) needs a model without it (group norm: models.dpcnn(groups=...))"
        )
    classes = _classes(model, opts)
    criterion = opts.loss or _default_loss(classes)
    metrics = opts.metrics

    def outputs(logits: Outputs, targets: Tensor) -> dict[str, Tensor]:
        values, extra = _loss_parts(criterion, logits, targets)
        extra.update(_metric_parts(metrics, logits, targets, extra))
        head = classes.head(logits, targets)
        shown = {"logits": head} if head is not None else {}
        return {"loss": values, **shown, **_class_outputs(logits, targets, classes), **extra}

    update = None
    if optimizer is not None:

        def update(params: Params, grads: Params, opt_state: Any, step: Tensor):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optim.apply_updates(params, updates), new_opt_state, step + 1

    if private is not None:
        gradients = _private_gradients_fn(forward, criterion, opts, classes, private)
    else:
        gradients = _gradients_fn(forward, criterion, opts, classes)
    return Stages(
        gradients=gradients,
        update=update,
        evaluate=_evaluate_fn(forward, outputs, opts.preprocess, opts.precision, opts.tta),
        outputs=outputs,
        name=model.name if isinstance(model, Model) else _name(model),
        needs_state=isinstance(model, Model) and model.stateful,
        noise=_noise_fn(private) if private is not None else None,
        per_example=private,
    )


def _classes(model: Any, opts: StepOptions | None = None, class_output: str | int | None = None) -> _Classes:
    """The class head and count the accuracy metrics read (`opts`', or `class_output` alone);
    the count from a `Model`'s `num_classes` hyperparameter unless given."""
    if opts is None:
        opts = StepOptions(class_output=class_output)
    num_classes = opts.num_classes
    if num_classes is None and isinstance(model, Model):
        num_classes = model.hparams.get("num_classes")
    return _Classes(opts.topk, opts.class_output, num_classes)


def _metric_sums(
    values: Tensor,
    extra: Mapping[str, Tensor],
    logits: Outputs,
    y: Tensor,
    classes: _Classes,
    metrics: MetricsFn | None,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The train step's metric sums (module docstring), `metrics`' outputs among them, over the
    examples `mask` keeps (all without one)."""
    extra = {**extra, **_metric_parts(metrics, logits, y, extra)}
    hits = {k: v for k, v in _class_outputs(logits, y, classes).items() if k != "pred"}

    def kept(v: Tensor) -> Tensor:
        # selected with where, never multiplied: a masked-out row's NaN loss (0 * NaN) would be
        # NaN; without a mask (every ordinary step) nothing is added to the compiled step
        return v if mask is None else torch.where(mask, v, 0)

    count = torch.full((), y.shape[0], dtype=torch.int64, device=y.device) if mask is None else mask.sum()
    return {
        "loss_sum": kept(values).sum(),
        "count": count,
        **{k: kept(v).sum() for k, v in hits.items()},
        **{f"{k}_sum": kept(v).sum() for k, v in extra.items()},
    }


def _gradients_fn(
    forward: Forward, criterion: LossFn, opts: StepOptions, classes: _Classes
) -> Callable[[CoreIn], tuple[Params, ModelState, dict[str, Tensor]]]:
    """`CoreIn -> (grads, new model state, metric sums)`: the train step before the update."""
    preprocess, precision, metrics = opts.preprocess, opts.precision, opts.metrics
    keyed = preprocess is not None and _takes_key(preprocess)  # here: inspect is not traceable

    def gradients(inp: CoreIn):
        key = nn.fold_in(inp.rng, inp.step)
        x = _preprocess(preprocess, inp.inputs, key if keyed else None)
        y, dev = inp.targets, opts.device_type or inp.inputs.device.type

        def loss_and_aux(p: Params):
            with _autocast(precision, dev):
                logits, new_state = forward(p, x, inp.model_state, train=True, key=key)
            values, extra = _loss_parts(criterion, _at_least_float32(logits), y)
            return values.mean(), (values, extra, logits, new_state)

        grads, (_, (values, extra, logits, new_state)) = torch.func.grad_and_value(
            loss_and_aux, has_aux=True
        )(inp.params)
        values, extra, logits = _detached((values, extra, _at_least_float32(logits)))
        sums = _metric_sums(values, extra, logits, y, classes, metrics)
        return grads, {k: v.detach() for k, v in new_state.items()}, sums

    return gradients


def _unpack(batch: Any, private: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(inputs, targets, mask or None) of a batch `(inputs, targets[, mask])`."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        if not private:
            raise ValueError("a batch with a mask (inputs, targets, mask) is for a per-example (DP-SGD) "
                             "step: pass per_example=privacy.clip_and_noise(...)")  # fmt: skip
        check_mask(batch[2])  # bool only: an integer mask of 5 would count an example five times
        return batch[0], batch[1], batch[2]
    inputs, targets = batch
    return inputs, targets, None


def _private_gradients_fn(
    forward: Forward, criterion: LossFn, opts: StepOptions, classes: _Classes, dp: ClipAndNoise
) -> Callable[[CoreIn], tuple[Params, ModelState, dict[str, Tensor]]]:
    """`CoreIn -> (sum of the clipped per-example gradients, {}, metric sums over the kept examples)`."""
    preprocess, precision, metrics = opts.preprocess, opts.precision, opts.metrics
    keyed = preprocess is not None and _takes_key(preprocess)  # here: inspect is not traceable

    def single(p: Params, xi: Tensor, yi: Tensor, ki: Tensor, dev: str):
        with _autocast(precision, dev):  # one example as a batch of one, its own dropout key
            logits, _ = forward(p, xi[None], {}, train=True, key=ki)
        values, extra = _loss_parts(criterion, _at_least_float32(logits), yi[None])
        return values[0], (values[0], {k: v[0] for k, v in extra.items()}, tree.map(lambda t: t[0], logits))

    def gradients(inp: CoreIn):
        if inp.model_state:
            raise ValueError("per-example clipping (DP-SGD) needs a model without a model state "
                             "(batch norm mixes the examples of a batch)")  # fmt: skip
        key = nn.fold_in(inp.rng, inp.step)
        x = _preprocess(preprocess, inp.inputs, key if keyed else None)
        # strided NCHW: vmap's batched convolutions cannot carry channels-last (PyTorch NYI)
        x = x.clone(memory_format=torch.contiguous_format)
        y, dev, size = inp.targets, opts.device_type or inp.inputs.device.type, inp.targets.shape[0]
        mask = inp.mask if inp.mask is not None else torch.ones_like(y, dtype=torch.bool)
        keys = nn.fold_in(key, torch.arange(size, device=y.device))
        grad = torch.func.vmap(torch.func.grad(single, has_aux=True), in_dims=(None, 0, 0, 0, None))
        chunk = dp.chunk_size or _auto_chunk(size, inp.params)
        total, clipped, outs = None, [], []
        for lo in range(0, size, chunk):  # chunks bound the [chunk, *param] gradients held at once
            part = slice(lo, lo + chunk)
            g, out = grad(inp.params, x[part], y[part], keys[part], dev)
            s, n = clipped_sum(g, inp.private["max_norm"], mask[part])
            total = s if total is None else tree.add(total, s)
            clipped.append(n)
            outs.append(_detached(out))  # (values, extra outputs, logits) of the chunk's examples
        values, extra, logits = tree.map(lambda *t: torch.cat(t), *outs)
        sums = _metric_sums(values, extra, logits, y, classes, metrics, mask)
        return total, {}, {**sums, "clipped_sum": sum(clipped)}

    return gradients


CHUNK_EXAMPLES = 512  # per-example gradients run in chunks of at most this many examples
CHUNK_BYTES = 256 << 20  # and of at most this many bytes of gradients


def _auto_chunk(size: int, params: Params) -> int:
    """The default chunk: bounded in bytes and in examples (a few hundred ran dpcnn twice as fast
    as one chunk of 2,320 on CPU: the gradients stay in cache)."""
    nbytes = sum(p.numel() * p.element_size() for p in params.values())  # one example's gradients
    fit = max(1, min(size, CHUNK_EXAMPLES, CHUNK_BYTES // max(1, nbytes)))
    return -(-size // -(-size // fit))  # equal chunks: one shape, no short last chunk


def _noise_fn(dp: ClipAndNoise) -> Callable[[Params, CoreIn], Params]:
    """`(summed clipped gradients, CoreIn) -> noised mean`: noise from (rng, step), its own stream."""

    def noise(grads: Params, inp: CoreIn) -> Params:
        key = nn.fold_in(nn.fold_in(inp.rng, inp.step), NOISE_SALT)
        size = dp.expected_batch_size or inp.targets.shape[0]
        assert inp.private is not None
        return add_noise(grads, key, inp.private["max_norm"], inp.private["noise_multiplier"], size)

    return noise


def _evaluate_fn(
    forward: Forward,
    outputs: Callable[[Tensor, Tensor], dict[str, Tensor]],
    preprocess: Preprocess | None,
    precision: str,
    tta: bool,
) -> Callable[[Params, ModelState, Tensor, Tensor], dict[str, Tensor]]:
    """`(params, model_state, inputs, targets) -> per-example outputs`, in inference mode; not
    under `no_grad`, so `torch.func.grad` differentiates through it."""

    def logits_of(params: Params, model_state: ModelState, x: Tensor) -> Outputs:
        with _autocast(precision, x.device.type):
            logits, _ = forward(params, x, model_state, train=False, key=None)
        return _at_least_float32(logits)

    def evaluate(
        params: Params, model_state: ModelState, inputs: Tensor, targets: Tensor
    ) -> dict[str, Tensor]:
        x = _preprocess(preprocess, inputs)
        logits = logits_of(params, model_state, x)
        if tta:  # the mean of the probabilities of the image and its mirror image
            if not isinstance(logits, Tensor):
                raise ValueError("tta=True needs a model that returns one logits tensor")
            mirrored = logits_of(params, model_state, x.flip(-1))
            both = torch.stack([logits.log_softmax(-1), mirrored.log_softmax(-1)])
            logits = torch.logsumexp(both, dim=0) - math.log(2.0)
        return outputs(logits, targets)

    return evaluate


def make_train_step(
    model: Model | Callable[..., Any], optimizer: optim.GradientTransformation, **options: Any
) -> TrainStep:
    """A pure `train_step(state, (inputs, targets)) -> (new_state, metrics)` (module docstring).

    model: a `Model` or a plain function (otherwise a TypeError at the first call).
    options: the keywords of `StepOptions`.
    """
    opts = StepOptions.of("make_train_step", options, train=True)
    return stages_of(model, optimizer, opts).train_step(compile=opts.compile, reduce_grads=opts.reduce_grads)


def make_eval_step(model: Model | Callable[..., Any], **options: Any) -> EvalStep:
    """A pure `eval_step(params_or_state, batch, model_state=None) -> per-example outputs`
    (module docstring); options: the keywords of `StepOptions` (topk default 5).

    Given a params dict, a stateful model needs `model_state`; it runs in inference mode. Not
    under `no_grad`: `torch.func.grad` differentiates through it.
    """
    opts = StepOptions.of("make_eval_step", options, train=False)
    return stages_of(model, None, opts).eval_step(compile=opts.compile)


def _is_stateful(model: Any) -> bool:
    """Whether `model` must be given a model state: a stateful `Model`, or a function whose
    `state` keyword has no default."""
    if isinstance(model, Model):
        return model.stateful
    return "state" in _keywords(model) and not _state_optional(model)


def loss_fn(
    model: Model | Callable[..., Any],
    *,
    loss: LossFn | None = None,
    preprocess: Preprocess | None = FASHION_MNIST,
    train: bool = False,
    class_output: str | int | None = None,
) -> Callable[..., Any]:
    """The mean loss as a pure function of the parameters, for `torch.func` to compose over.

    Returns `f(params, batch, *, key=None) -> loss` (0-d), the batch mean of
    `loss(model(preprocess(inputs)), targets)`; for a stateful model
    `f(params, batch, model_state, *, key=None) -> (loss, new_model_state)` (for `has_aux=True`).

    loss, preprocess, class_output: as `StepOptions`. train: False is the inference-mode function
    (no dropout, no augmentation); True the training-mode one, drawing from `key` as the train
    step does from `nn.fold_in(state.rng, state.step)`.
    """
    forward = _forward_fn(model)
    criterion = loss or _default_loss(_classes(model, class_output=class_output))
    keyed = preprocess is not None and _takes_key(preprocess)  # here: inspect is not traceable

    def mean_loss(params: Params, batch: Batch, model_state: ModelState | None, key: Tensor | None):
        inputs, targets = batch
        x = _preprocess(preprocess, inputs, key if keyed and train and key is not None else None)
        outputs, new_state = forward(params, x, dict(model_state or {}), train=train, key=key)
        values, _ = _loss_parts(criterion, _at_least_float32(outputs), targets)
        return values.mean(), new_state

    if _is_stateful(model):

        def stateful_loss(
            params: Params, batch: Batch, model_state: ModelState, *, key: Tensor | None = None
        ):
            if not model_state:
                raise ValueError(f"model {_name(model)} is stateful: pass its model_state")
            return mean_loss(params, batch, model_state, key)

        return stateful_loss

    def stateless_loss(params: Params, batch: Batch, *, key: Tensor | None = None) -> Tensor:
        return mean_loss(params, batch, None, key)[0]

    return stateless_loss


def _chunk_of(chunk_size: int | None, size: int, params: Params) -> int:
    """`chunk_size`, checked, or the DP stage's default (`_auto_chunk`: bounded in bytes)."""
    if chunk_size is None:
        return _auto_chunk(size, params)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, not {chunk_size!r}")
    return chunk_size


def per_example_grads(
    model: Model | Callable[..., Any],
    params: Params,
    batch: Batch,
    *,
    loss: LossFn | None = None,
    preprocess: Preprocess | None = FASHION_MNIST,
    model_state: ModelState | None = None,
    train: bool = False,
    key: Tensor | None = None,
    class_output: str | int | None = None,
    chunk_size: int | None = None,
) -> Params:
    """The gradient of each example's loss: `{name: [B, *param.shape]}`, by `vmap(grad(...))`.

    loss, preprocess, class_output, train: as `loss_fn` (each example runs as a batch of one, so
    batch norm with `train=True` would normalise it by itself). chunk_size: examples
    differentiated at once (default: at most 512 examples and 256 MiB of gradients).
    """
    if isinstance(model, Model) and model.stateful and not model_state:
        raise ValueError(f"model {model.name} is stateful: pass its model_state")
    forward = _forward_fn(model)
    criterion = loss or _default_loss(_classes(model, class_output=class_output))
    inputs, targets = batch
    # strided NCHW: vmap's batched convolutions cannot carry the default preprocess's NHWC on CPU
    # (PyTorch NYI); a one-channel NHWC tensor is "contiguous" too, so .contiguous() would keep it
    x = _preprocess(preprocess, inputs).clone(memory_format=torch.contiguous_format)
    state, size = dict(model_state or {}), targets.shape[0]

    def single(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
        logits, _ = forward(p, xi[None], state, train=train, key=key)  # a batch of one
        return _loss_parts(criterion, logits, yi[None])[0][0]

    grad = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))
    chunk = _chunk_of(chunk_size, size, params)
    if chunk >= size:
        return grad(params, x, targets)
    out: Params = {}
    for lo in range(0, size, chunk):  # written into the result chunk by chunk: no second copy
        part = grad(params, x[lo : lo + chunk], targets[lo : lo + chunk])
        if not out:
            out = {k: g.new_empty((size, *g.shape[1:])) for k, g in part.items()}
        for k, g in part.items():
            out[k][lo : lo + chunk] = g
    return out


def per_example_grad_norms(grads: Params) -> Tensor:
    """The global L2 norm of each example's gradient `[B]`, over all parameters: `tree.global_norm`
    of each example's slice."""
    return torch.func.vmap(tree.global_norm)(grads)


def streamed_grad_norms(
    model: Model | Callable[..., Any],
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    chunk_size: int | None = None,
    **options: Any,
) -> Tensor:
    """Each example's gradient norm `[N]`, over one batch `(inputs, targets)` or an iterable of
    batches, in order; `chunk_size` examples' gradients at a time (`per_example_grads`, whose
    keywords `options` are), so memory stays bounded however many examples there are.
    """
    one = (
        isinstance(batches, (tuple, list))
        and len(batches) == 2
        and all(isinstance(t, Tensor) for t in batches)
    )
    norms = []
    for inputs, targets in [batches] if one else batches:  # type: ignore[misc]
        chunk = _chunk_of(chunk_size, targets.shape[0], params)
        for lo in range(0, targets.shape[0], chunk):
            part = (inputs[lo : lo + chunk], targets[lo : lo + chunk])
            grads = per_example_grads(model, params, part, chunk_size=chunk, **options)
            norms.append(per_example_grad_norms(grads).detach())
    if not norms:
        raise ValueError("streamed_grad_norms was given no examples")
    return torch.cat(norms)
