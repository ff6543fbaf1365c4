"""Callbacks as pure event handlers: `(cb_state, event) -> (cb_state, actions)`.

The tutorial's stateful callbacks (TensorBoard writer, ModelCheckpoint, EarlyStopping,
TrainingMonitor, StepLR) are rebuilt here so that they *describe* what should happen and
never do it: a callback reads an event, returns a new state and a list of actions (plain
data), and the loop (`fashion_func.loop`) carries the actions out (writes files, stops,
changes the learning rate in the optimizer state). This package therefore touches no files,
no clock, no device and no tensors, and it imports neither `checkpoint` nor `loop`.

Every public name of the modules (`protocol`, `stopping`, `checkpointing`, `lr`, `logs`) is
re-exported here.

Protocol
--------
* Events: `TrainBegin`, `EpochEnd`, `TrainEnd` (frozen dataclasses). Epochs are 1-based;
  `TrainBegin.start_epoch` is the first epoch about to run (> 1 after a resume). There is no
  per-step event: the step runs compiled on the device with no host sync, and a non-finite
  loss is caught there, at its step, by the loop itself.
* Actions: `Stop`, `SaveCheckpoint`, `DeleteCheckpoint`, `KeptBest`, `SetHyperparam`,
  `LogScalars`, `WriteHistory`, `PlotHistory`, `LogMessage` (frozen dataclasses).
* A callback is a frozen dataclass whose fields are its hyperparameters, with
  `init() -> cb_state` and `on_event(cb_state, event) -> (cb_state, list[Action])`.
  `cb_state` is a JSON-serialisable dict (finite floats only, so
  `json.dumps(state, allow_nan=False)` works; non-finite floats are stored as the strings
  "nan", "inf", "-inf", see `encode_float`). The incoming state is never mutated.
  `callback.name` keys its state in the checkpoint; it defaults to the class name and can be
  overridden (`EarlyStopping(monitor="val_acc", mode="max", name="es_acc")`) when one class
  is used twice.

Contract with the loop (what makes resume exact)
------------------------------------------------
* The loop calls `dispatch` and only then executes the actions, in list order. The
  callback states that go into a checkpoint requested by `SaveCheckpoint` are the *new*
  states `dispatch` returned for that same event.
* Actions from several callbacks are concatenated in callback order; when two set the same
  hyperparameter the later one wins.
* `DeleteCheckpoint` of a file that does not exist is a no-op (after a crash an eviction
  can be replayed, see `ModelCheckpoint`).
* Learning-rate callbacks emit `SetHyperparam("lr", ...)` at `TrainBegin` too, so a resumed
  run gets the learning rate its schedule prescribes whatever the checkpointed optimizer
  state holds.

`Event` and `Action` are the unions of the event and the action classes.
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
