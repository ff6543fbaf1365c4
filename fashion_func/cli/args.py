"""What every command shares: one-line usage errors, `--version`, typed number arguments.

Exit codes of the commands: 0 success (also a run stopped early by early stopping); 2 usage
or input error (bad flag, bad config, missing data, bad checkpoint, a run directory in use,
a file that cannot be written: disk full, no permission); 3 a run stopped by a non-finite
loss (diverged); 130 / 143 interrupted by SIGINT / SIGTERM (after saving, when a training
step was under way). User mistakes print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fashion_func.safeio import short_repr

__all__ = ["EXIT_USAGE", "Parser", "UsageError", "add_version", "float_arg", "int_arg"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in how the program was called (exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and raises instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: print the installed fashion_func version and exit 0."""
    from fashion_func import __version__

    parser.add_argument("--version", action="version", version=f"fashion_func {__version__}")


def int_arg(text: str) -> int:
    """An argparse `type=` for integers: a one-line error naming the text (and a bound on its digits)."""
    digits = sys.get_int_max_str_digits()
    if len(text) > digits:  # int() refuses these anyway, with a message about sys settings
        raise argparse.ArgumentTypeError(f"expected an integer of at most {digits} digits")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {short_repr(text)}") from None


def float_arg(text: str) -> float:
    """An argparse `type=` for numbers: a one-line error naming the text."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {short_repr(text)}") from None
