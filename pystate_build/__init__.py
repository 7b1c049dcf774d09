"""Build-time code (host only, never shipped in the initrd): one module per build.py subcommand.

Each module defines ``register(subparsers)`` adding subcommands with ``set_defaults(func=...)``.
Outputs default to ``out/``, downloads are cached in ``cache/`` (both git-ignored).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "out"
CACHE = REPO / "cache"
