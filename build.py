#!/usr/bin/env python3
"""Builds pystate's frozen program and everything the tests boot.

Each subcommand lives in a module of pystate_build/ that defines
``register(subparsers)``; this file only discovers and dispatches them.
Run ``python3 build.py --help`` for the list.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import pystate_build
    from pystate_initrd.errors import PystateError

    parser = argparse.ArgumentParser(prog="build.py", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(pystate_build.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"pystate_build.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    args = parser.parse_args(argv)
    try:
        result: int | None = args.func(args)
    except PystateError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
