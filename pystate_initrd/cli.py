"""Argument parsing and error reporting for the pystate command.

Subcommands import their modules lazily so that ``--version`` and the boot
path start fast in the initrd.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PystateError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pystate", description="pystate state partition tool")
    parser.add_argument("--version", action="version", version=f"pystate {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
    except PystateError as exc:
        print(f"pystate: {exc}", file=sys.stderr)
        return 1
    return result
