"""The one way pystate runs an external command.

Argument lists only, never a shell; a minimal environment; stdin closed unless
data is passed (secrets go there, never into argv); a missing binary or a
failing command becomes a typed error naming the command and its status.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import PystateError

_BASE_ENV = {"LANG": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class CommandError(PystateError):
    """An external command was missing or failed."""

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    capture: bool = True,
) -> Completed:
    """Run argv; raise CommandError unless its status is in ok_codes (when check)."""
    full_env = dict(_BASE_ENV)
    if env:
        full_env.update(env)
    if os.environ.get("PYSTATE_DEBUG"):
        print(f"pystate: + {shlex.join(argv)}", flush=True)
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=full_env,
            check=False,
        )
    except FileNotFoundError:
        raise CommandError(f"{argv[0]} not found.") from None
    result = Completed(tuple(argv), proc.returncode, proc.stdout or b"", proc.stderr or b"")
    if check and proc.returncode not in ok_codes:
        err = result.stderr.decode(errors="replace").strip()
        last = err.splitlines()[-1] if err else "no error output"
        raise CommandError(
            f"{shlex.join(argv)} failed with status {proc.returncode}: {last}",
            proc.returncode,
            err,
        )
    return result
