"""The run's user-facing error: `RunError` (exit code 2 on the command line), and its words.

Each kind's message is worded for a Python caller of `fit` (`run_dir`, `overwrite=True`,
`resume="auto"`); the command line words the same kinds with its flags (`fashion_func.cli.words`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import ClassVar

from fashion_func import atomic
from fashion_func.safeio import Worded

__all__ = ["RunError"]


class RunError(Worded):
    """The run cannot start or go on (a user-facing problem: exit code 2).

    `kind` (None for a plain message) and `fields` say which problem, for a client that words
    it itself; `str()` is the library's wording (`WORDS`).
    """

    WORDS: ClassVar[Mapping[str, str]] = {
        "in_use": "run directory {out} is in use by process {pid}; "
        "wait for it to finish or use another run_dir",
        "overwrite_refused": "overwrite=True: {path} is {what}; remove it",
        "link": "{path} is a symbolic link; a run never follows links out of its directory: "
        "remove it or use another run_dir",
        "not_ours": "run_dir {out} holds files that are not a fashion_func run's (no {marker} marker); "
        "use a new or empty directory",
        "resumes_elsewhere": "run directory {out} already holds another run; resume={resume} continues only "
        "in its own run directory or a new run_dir (or pass overwrite=True)",
        "overwrite_resumed": "overwrite=True would delete {resume}, the checkpoint being resumed",
        "holds_run": "run directory {out} already holds a run; "
        'pass resume="auto" to continue it or overwrite=True',
        "wrong_kind": "{path} is {what}, not {expected} as a run writes there; "
        "remove it or use another run_dir",
        "root": "run_dir {out} is the root directory; give a run directory of its own",
        "replaced": "{folder} is no longer the folder the run opened (replaced by a link or another folder "
        "while it ran); refusing to write outside the run directory",
        "not_a_directory": "run_dir {out} exists and is not a directory",
        "no_checkpoint": "resume={resume}: no such checkpoint file",
        "checkpoint_not_regular": "resume={resume}: not a regular file ({what})",
        "other_model": "checkpoint {path} holds a {saved} model, not {now}",
        "other_splits": "checkpoint {path} was trained on other images ({saved}; now {now}); resume with the "
        "same train, validation and test images",
        "other_setting": "checkpoint {path} was trained with {setting} {saved}, not {now}",
        "other_members": "checkpoint {path} trains other members ({setting} {saved}, not {now})",
        "part_added": "checkpoint {path}'s optimizer state has no part for {setting} {now} (it had {saved})",
        "part_removed": "checkpoint {path}'s optimizer state holds a part for {setting} {saved}, not {now}",
        "other_sampling": "checkpoint {path} is a private run with batches of {saved}, not {now}: its "
        "sampling rate is part of the privacy accounting",
        "other_batches": "the checkpoint was cut mid-epoch with {diff}; resume with the same batches "
        "(the same train data, batch size and seed)",
        "inexact_resume": "the checkpoint was cut mid-epoch (epoch {epoch}, batch {batch}) and {data} cannot "
        "continue exactly there; pass data.EpochBatches, a function epoch -> batches that takes start=, or "
        "an object with state_dict() / load_state_dict(), or allow_inexact_resume=True to draw the "
        "batches already seen again and drop them (exact only if the order repeats)",
    }


# what `fit` logs in its own words (a client may reword them by kind, as RunError's)
NOTES: Mapping[str, str] = {
    "interrupted": 'interrupted: resume with fit(..., run_dir={out}, resume="auto") (or resume={path})',
}


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """A run file that cannot be written stops the run: `atomic.WriteError` becomes `RunError`."""
    try:
        yield
    except atomic.WriteError as e:
        raise RunError(str(e)) from e
