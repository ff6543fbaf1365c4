"""The command line's words for the library's structured errors and notes: its flags.

Each error or log note the core raises with a `kind` (in its API's words: `run_dir`,
`overwrite=True`) is worded here, in the one table `WORDS`, with the flags a user types;
anything else reads as the library wrote it.
"""

from __future__ import annotations

import logging
from typing import Any

from fashion_func.safeio import word

__all__: list[str] = []

_HOW_TO_GET = (
    "get the data with `apt-get install dataset-fashion-mnist` (as root, on Debian), "
    "or pass --data-dir DIR, or set FASHION_MNIST_DIR=DIR (a directory holding the four IDX files, "
    "plain or .gz), or run once on a machine with internet access so torchvision can download it "
    "into ./dataset/fashion"
)

# kind -> the command line's wording (fields as in the library's error)
WORDS: dict[str, str] = {
    # loop.RunError
    "in_use": "run directory {out} is in use by process {pid}; wait for it to finish or use another --out",
    "overwrite_refused": "--overwrite: {path} is {what}; remove it",
    "link": "{path} is a symbolic link; a run never follows links out of its directory: "
    "remove it or use another --out",
    "not_ours": "--out {out} holds files that are not a fashion_func run's (no {marker} marker); "
    "use a new or empty directory",
    "resumes_elsewhere": "run directory {out} already holds another run; --resume {resume} continues only "
    "in its own run directory or a new --out (or pass --overwrite)",
    "overwrite_resumed": "--overwrite would delete {resume}, the checkpoint being resumed",
    "holds_run": "run directory {out} already holds a run; pass --resume auto to continue it or --overwrite",
    "wrong_kind": "{path} is {what}, not {expected} as a run writes there; remove it or use another --out",
    "root": "--out {out} is the root directory; give a run directory of its own",
    "replaced": "{folder} is no longer the folder the run opened (replaced by a link or another folder "
    "while it ran); refusing to write outside the run directory (--out)",
    "not_a_directory": "--out {out} exists and is not a directory",
    "no_checkpoint": "--resume {resume}: no such checkpoint file",
    "checkpoint_not_regular": "--resume {resume}: not a regular file ({what})",
    "other_model": "--model {now} does not match checkpoint {path}, which holds a {saved} model; "
    "leave out --model to resume it",
    "other_splits": "checkpoint {path} was trained on other images ({saved}; now {now}); resume with the "
    "same --data-dir, --limit-train, --limit-val and --val-split",
    "privacy_record": "--resume {path}: {detail}",
    "other_setting": "{setting} {now} differs from the resumed run's {saved}, which it was trained with; "
    "resume it with the same {setting} (or leave it out)",
    "other_members": "{setting} {now} differs from the resumed run's {saved}, which it was trained with; "
    "resume it with the same members",
    "part_added": "{setting} {now} cannot replace the resumed run's {saved}: the optimizer state has no "
    "part for it; start a new run for that",
    "part_removed": "{setting} {now} cannot replace the resumed run's {saved}: the optimizer state holds "
    "a part for it; start a new run for that",
    "other_sampling": "--batch-size {now} differs from the resumed private run's {saved}: its sampling "
    "rate is part of the privacy accounting; resume it with the same --batch-size",
    "other_batches": "the checkpoint was cut mid-epoch with {diff}; resume with the same batches "
    "(--batch-size, --limit-train and --seed)",
    "inexact_resume": "the checkpoint was cut mid-epoch (epoch {epoch}, batch {batch}) and {data} cannot "
    "continue exactly there",
    # loop's notes (log lines)
    "interrupted": "interrupted: resume with --resume auto --out {out} (or --resume {path})",
    # data.DataError
    "data_dir_missing": "--data-dir {dir} does not exist or is not a directory; " + _HOW_TO_GET,
    "data_dir_lacks": "--data-dir {dir} lacks {missing}; " + _HOW_TO_GET,
    "env_dir_missing": "$FASHION_MNIST_DIR {dir} does not exist or is not a directory; " + _HOW_TO_GET,
    "env_dir_lacks": "$FASHION_MNIST_DIR {dir} lacks {missing}; " + _HOW_TO_GET,
    "env_dir_invalid": "{reason}; " + _HOW_TO_GET,
    "data_not_found": "Fashion-MNIST not found (searched {searched}) and download is disabled; "
    + _HOW_TO_GET,
    "data_download_failed": "Fashion-MNIST not found (searched {searched}) and the download into {root} "
    "failed ({reason}); " + _HOW_TO_GET,
    "data_download_incomplete": "download into {root} finished but {raw} lacks {missing}; " + _HOW_TO_GET,
    # checkpoint.CheckpointError
    "no_model_name": "{path}: no model name in the file's metadata; pass --model NAME",
    # safeio.FileError
    "output_exists": "{what} {path} exists; pass --overwrite to replace it",
}


def flag(name: str) -> str:
    """The command-line flag of config key `name`: `batch_size` -> `--batch-size`."""
    return f"--{name.replace('_', '-')}"


def message(item: Any) -> str:
    """`item` (an error or a log note) in the command line's words: by its kind from `WORDS`
    (a `setting` named as its flag, an unset value as `none`), else as the library worded it."""
    kind = getattr(item, "kind", None)
    fields = getattr(item, "fields", None)
    if isinstance(kind, str) and kind in WORDS and isinstance(fields, dict):
        # an unset value reads as the command line writes it (`--ema none`), not as Python's None
        fields = {k: "none" if v is None else v for k, v in fields.items()}
        if isinstance(fields.get("setting"), str):
            fields = {**fields, "setting": flag(fields["setting"])}
        return word(WORDS[kind], fields)
    return str(item)


class _Reword(logging.Filter):
    """Rewords a record whose message is a library note with a kind (`safeio.Note`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) and getattr(record.msg, "kind", None) in WORDS:
            record.msg = message(record.msg)
        return True


REWORD = _Reword()


def reword_log(log: logging.Logger) -> logging.Logger:
    """`log`, its records of library notes worded with the command line's flags (idempotent)."""
    log.addFilter(REWORD)
    return log
