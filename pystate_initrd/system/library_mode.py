"""The one rule for a library pystate can use in process or run as a command (issue 13):
libcryptsetup or the cryptsetup binary (PYSTATE_CRYPTSETUP), tpm2-tss's ESAPI or tpm2-tools
(PYSTATE_TPM2). The variable's value:

    unset, "auto", anything else   the library if it loaded, else the command
    "cli"                          always the command
    "library"                      always the library; an error saying why it did not load
"""

from __future__ import annotations

import os
from collections.abc import Callable

MODES = ("auto", "cli", "library")


def mode(env: str) -> str:
    value = os.environ.get(env, "auto").strip().lower() or "auto"
    return value if value in MODES else "auto"


def use_library(env: str, load: Callable[[], object], error: type[Exception]) -> bool:
    """True for the library, False for the command. `load` returns the loaded library or a
    string saying why it could not be loaded; it is not called for "cli"."""
    chosen = mode(env)
    if chosen == "cli":
        return False
    loaded = load()
    if not isinstance(loaded, str):
        return True
    if chosen == "library":
        raise error(f"{env}=library, but {loaded}")
    return False
