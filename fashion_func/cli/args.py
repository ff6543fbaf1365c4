"""What every command shares: one-line usage errors, `--version`, typed number arguments.

Exit codes of the commands: 0 success (also a run stopped early by early stopping); 2 usage or input
error (bad flag, bad config, missing data, bad checkpoint, a run directory in use, a file that cannot
be written: disk full, no permission); 3 a run stopped by a non-finite loss (diverged); 130 / 143
interrupted by SIGINT / SIGTERM (after saving, when a training step was under way). User mistakes
print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from fashion_func.safeio import display, short_repr

__all__: list[str] = []

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in how the program was called (exit 2)."""


def fail(prog: str, message: str) -> int:
    """Print `<prog>: error: <message>` on stderr as one escaped line; returns EXIT_USAGE."""
    print(display(" ".join(f"{prog}: error: {message}".split())), file=sys.stderr)
    return EXIT_USAGE


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


class Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived in a command that saves nothing to resume (predict, export); a
    KeyboardInterrupt, so what cleans up after one (`atomic.write_bytes`'s temp file) does after both.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def interruptible(prog: str, body: Callable[[], int]) -> int:
    """`body()`'s exit code, or, when SIGINT / SIGTERM arrives while it runs, one line on stderr and
    128 + the signal's number (130 / 143), as `train` ends. No traceback and no partial file: every
    output is written whole or not at all, the interrupted write's temp file removed. A signal the
    process was started ignoring (`cmd &` in a script) stays ignored.
    """

    def handler(signum: int, frame: Any) -> None:
        raise Signalled(signum)

    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        return body()
    kept = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in kept}
    try:
        return body()
    except Signalled as exc:
        print(
            f"{prog}: interrupted by {signal.Signals(exc.signum).name}; nothing partial was written "
            "(each output file is whole or absent)",
            file=sys.stderr,
        )
        return 128 + exc.signum
    except KeyboardInterrupt:  # SIGINT through Python's own handler (before ours was set)
        print(f"{prog}: interrupted by SIGINT; nothing partial was written", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        for s, h in old.items():
            signal.signal(s, h)
