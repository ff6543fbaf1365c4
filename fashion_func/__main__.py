"""The installed command: `fashion-func train|predict|export|speedrun ...` (also `python -m fashion_func`).
Each subcommand is the parser and entry point of the repository's `scripts/*.py` (`fashion-func
COMMAND --help` lists its flags); exit codes are the command's.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]


def _train(argv: Sequence[str]) -> int:
    from fashion_func.cli.train import finish_rank, main_train

    return finish_rank(main_train(argv, prog="fashion-func train"))


def _interruptible(name: str) -> Callable[[Sequence[str]], int]:
    """The subcommand `fashion_func.cli.<name>`'s `main`, run by `interruptible`."""

    def command(argv: Sequence[str]) -> int:
        from fashion_func.cli.args import interruptible

        def run() -> int:  # the import too: SIGINT while torch loads is one line, not a traceback
            return importlib.import_module(f"fashion_func.cli.{name}").main(argv, prog=f"fashion-func {name}")

        return interruptible(f"fashion-func {name}", run)

    return command


def _speedrun(argv: Sequence[str]) -> int:
    from fashion_func.cli.speedrun import main as speedrun_main

    return speedrun_main(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (_train, "train a model on Fashion-MNIST (scripts/train.py)"),
    "predict": (_interruptible("predict"), "evaluate a weights file or classify images (scripts/predict.py)"),
    "export": (_interruptible("export"), "export weights for PyTorch, JAX/Flax or numpy (scripts/export.py)"),
    "speedrun": (_speedrun, "train a preset N times, report accuracy mean ± std (scripts/speedrun.py)"),
}

USAGE = "usage: fashion-func {train,predict,export,speedrun} [--help] ...\n       fashion-func --version"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand named by the first argument; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        lines = [USAGE, "", "commands:"] + [f"  {name:<10}{text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from fashion_func import __version__

        print(f"fashion-func {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(
            f"fashion-func: error: unknown command {args[0]!r}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[args[0]][0](args[1:])


if __name__ == "__main__":
    sys.exit(main())
