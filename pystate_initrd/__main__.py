"""Command-line entry point: ``python3 -m pystate_initrd`` and the frozen ``/usr/bin/pystate``."""

from .cli import main

raise SystemExit(main())
