"""The `sanaflow` command line: one program with subcommands.

Each feature area registers its own subcommands (``register(subparsers)`` in the modules listed in
`COMMAND_MODULES`), imported only when the CLI starts, so ``import sanaflow`` stays light. Every
user error is a `SanaflowError`; it is printed as one line and the program exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import SanaflowError

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "sanaflow.commands.generate",
    "sanaflow.commands.shapes",
    "sanaflow.commands.train",
    "sanaflow.commands.video",
    "sanaflow.commands.quantize",
)

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, like every other sanaflow error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = _Parser(prog="sanaflow", description="SANA text-to-image and TokenFlow video editing.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sanaflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that feature area is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sanaflow` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        result = args.func(args)
    except SanaflowError as e:
        print(f"sanaflow: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sanaflow: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
