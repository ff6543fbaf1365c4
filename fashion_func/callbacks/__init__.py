"""Callbacks as pure event handlers: `(cb_state, event) -> (cb_state, actions)`.

The tutorial's stateful callbacks (TensorBoard writer, ModelCheckpoint, EarlyStopping,
TrainingMonitor, StepLR), rebuilt to *describe* what should happen and never do it: the loop
(`fashion_func.loop`) carries out the actions they return (writes files, stops, sets the
learning rate). This package touches no files, clock, device or tensors and imports neither
`checkpoint` nor `loop`; every public name of its modules is re-exported here.

Protocol
--------
* Events: `TrainBegin`, `EpochEnd`, `TrainEnd`; actions: `Stop`, `SaveCheckpoint`,
  `DeleteCheckpoint`, `KeptBest`, `SetHyperparam`, `LogScalars`, `WriteHistory`, `PlotHistory`,
  `LogMessage` (frozen dataclasses; `Event` and `Action` are their unions). Epochs are 1-based;
  `TrainBegin.start_epoch` is the first epoch about to run (> 1 after a resume). There is no
  per-step event: the step runs compiled with no host sync, and the loop itself catches a
  non-finite loss at its step.
* A callback is a frozen dataclass of hyperparameters with `init() -> cb_state` and
  `on_event(cb_state, event) -> (cb_state, list[Action])`; the incoming state is never mutated.
  `cb_state` is a JSON-serialisable dict (finite floats only, so `json.dumps(state,
  allow_nan=False)` works; non-finite ones stored as "nan", "inf", "-inf": `encode_float`).
  `callback.name` keys its state in the checkpoint: the class name, unless `name=` is given
  (`EarlyStopping(monitor="val_acc", mode="max", name="es_acc")`) when one class is used twice.

Contract with the loop (what makes resume exact)
------------------------------------------------
* The loop calls `dispatch`, then executes the actions in list order; a `SaveCheckpoint`
  saves the *new* states `dispatch` returned for that same event.
* Actions of several callbacks come in callback order; of two setting one hyperparameter, the
  later wins. `DeleteCheckpoint` of a missing file is a no-op (a crash can replay an eviction).
* Learning-rate callbacks emit `SetHyperparam("lr", ...)` at `TrainBegin` too, so a resumed
  run gets the learning rate its schedule prescribes whatever the optimizer state holds.
"""

from __future__ import annotations

from fashion_func.callbacks.checkpointing import ModelCheckpoint
from fashion_func.callbacks.logs import (
    LogEpoch,
    TensorBoardLogger,
    TrainingMonitor,
    history_record,  # noqa: F401  (importable here by module path; not in __all__)
)
from fashion_func.callbacks.lr import CosineLR, LRSchedule, ReduceLROnPlateau, StepLR
from fashion_func.callbacks.protocol import (
    Action,
    Callback,
    CallbackLike,
    DeleteCheckpoint,
    EpochEnd,
    Event,
    KeptBest,
    LogMessage,
    LogScalars,
    PlotHistory,
    SaveCheckpoint,
    SetHyperparam,
    Stop,
    TrainBegin,
    TrainEnd,
    WriteHistory,
    decode_float,  # noqa: F401  (importable here by module path; not in __all__)
    dispatch,
    encode_float,  # noqa: F401  (importable here by module path; not in __all__)
    fold,
    improved,  # noqa: F401  (importable here by module path; not in __all__)
    init_states,
    scan,
)
from fashion_func.callbacks.stopping import EarlyStopping, TerminateOnNaN

__all__ = [
    "Action",
    "Callback",
    "CallbackLike",
    "CosineLR",
    "DeleteCheckpoint",
    "EarlyStopping",
    "EpochEnd",
    "Event",
    "KeptBest",
    "LRSchedule",
    "LogEpoch",
    "LogMessage",
    "LogScalars",
    "ModelCheckpoint",
    "PlotHistory",
    "ReduceLROnPlateau",
    "SaveCheckpoint",
    "SetHyperparam",
    "StepLR",
    "Stop",
    "TensorBoardLogger",
    "TerminateOnNaN",
    "TrainBegin",
    "TrainEnd",
    "TrainingMonitor",
    "WriteHistory",
    "dispatch",
    "fold",
    "init_states",
    "scan",
]
