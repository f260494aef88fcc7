"""The `deepfleet` command line.

Exit codes shared by every sub-command: 0 success, 1 a negative answer (e.g. a model that does
not fit), 2 bad input (a clear message, never a traceback), 3 drift found.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from infra import commands
from infra.errors import UserError

EXIT_BAD_INPUT = 2


def command_names() -> list[str]:
    """Each sub-command is the module of the same name in infra.commands."""
    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every sub-command, or of ONLY: importing a command's module imports what
    it runs (pyinfra, pulumi, ...), which would cost every other command a second."""
    parser = argparse.ArgumentParser(
        prog="deepfleet",
        description="Private DeepSeek inference clusters as code: spec, sizing, lab, drift.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in command_names():
        if only is None or name == only:
            module = importlib.import_module(f"{commands.__name__}.{name}")
            module.register(subparsers)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in command_names() else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(argv))
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except UserError as error:
        print(error.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
