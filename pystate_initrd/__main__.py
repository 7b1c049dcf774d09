"""Command-line entry point: ``python3 -m pystate_initrd`` and the frozen ``/usr/bin/pystate``."""

from pystate_initrd.cli import main

raise SystemExit(main())
