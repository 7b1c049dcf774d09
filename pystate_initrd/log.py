"""Logging to the kernel log with syslog priorities, as early-boot programs do.

In the initrd /dev/kmsg is the one log that survives into the booted system's
journal; lines look like ``<3>pystate: …``. Where /dev/kmsg cannot be opened
(tests, unprivileged runs) lines go to stderr instead. Errors also go to the
console (stderr), because the person at the machine must see why boot stopped.

There is one debug switch, ``Log.debug_enabled`` (``pystate.debug`` in the initrd,
``--debug`` for the booted service). The program's log is installed once
(``Log.install``) so that the command runner (system/run.py) logs each external
command at debug priority through it, without a log being passed to every wrapper.
"""

from __future__ import annotations

import os
import sys

ERR = 3
WARNING = 4
NOTICE = 5
INFO = 6
DEBUG = 7

_KMSG_LINE_MAX = 900  # the kernel truncates records near 1 KiB; keep room for the prefix


_INSTALLED: dict[str, Log] = {}  # "log" -> the program's log, once installed


def installed() -> Log | None:
    """The program's log (Log.install), or None: the command runner then logs nothing."""
    return _INSTALLED.get("log")


class Log:
    def __init__(self, *, kmsg_path: str = "/dev/kmsg", debug: bool = False) -> None:
        self.debug_enabled = debug
        self._fd: int | None
        try:
            self._fd = os.open(kmsg_path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            self._fd = None

    def _emit(self, priority: int, message: str) -> None:
        for line in message.splitlines() or [""]:
            line = line[:_KMSG_LINE_MAX]
            if self._fd is not None:
                try:
                    os.write(self._fd, f"<{priority}>pystate: {line}\n".encode(errors="replace"))
                except OSError:
                    self._fd = None
            if self._fd is None or priority <= ERR:
                print(f"pystate: {line}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        self._emit(ERR, message)

    def warning(self, message: str) -> None:
        self._emit(WARNING, message)

    def notice(self, message: str) -> None:
        self._emit(NOTICE, message)

    def info(self, message: str) -> None:
        self._emit(INFO, message)

    def debug(self, message: str) -> None:
        if self.debug_enabled:
            self._emit(DEBUG, message)

    def install(self) -> Log:
        """Make this the program's log, the one external commands are reported to."""
        _INSTALLED["log"] = self
        return self

    def close(self) -> None:
        if _INSTALLED.get("log") is self:
            del _INSTALLED["log"]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
