"""Asking the person at the machine for the recovery key (SPEC §5).

In a systemd initrd the question goes through ``systemd-ask-password``: a
service has no terminal, and systemd's agents (console, plymouth) own the
screen and the keyboard; the answer comes back on a pipe into a bytearray.
Elsewhere (dracut's shell initrd, a hook with the console on its stdin) the
console is asked directly with echo off.

Either way the answer is the typed text in a bytearray the caller wipes, or
None when nobody can be asked (the agent was cancelled, no console).
"""

from __future__ import annotations

import os
import termios
from typing import Any

from pystate_initrd.system.run import CommandError, run

CONSOLE = "/dev/console"
MAX_ANSWER = 1024  # a recovery key is 71 characters; anything longer is not one
ASK_PASSWORD = "systemd-ask-password"


def use_systemd() -> bool:
    """systemd is PID 1 (its runtime directory exists) and the tool is there."""
    import shutil  # here, not at the top: only the recovery-key question needs it (2 ms)

    return os.path.isdir("/run/systemd/system") and shutil.which(ASK_PASSWORD) is not None


def ask_argv(prompt: str) -> list[str]:
    # --timeout=0: wait as long as it takes (SPEC: three tries, not a clock).
    # --accept-cached off: a cached passphrase from another volume is never a recovery key.
    return [
        ASK_PASSWORD, "--timeout=0", "--id=pystate:recovery-key", "--echo=masked",
        "--emoji=no", "--no-tty", prompt,
    ]  # fmt: skip


def _strip_newline(buf: bytearray) -> bytearray:
    """Cut at the first newline in place (zeroing what follows): a key is one line."""
    end = buf.find(b"\n")
    if end >= 0:
        buf[end:] = bytes(len(buf) - end)
        del buf[end:]  # a shrink by at most a few bytes: CPython keeps the block
    return buf


def ask_systemd(prompt: str) -> bytearray | None:
    try:
        result = run(ask_argv(prompt), check=False, secret_output=True, secret_max=MAX_ANSWER)
    except CommandError:
        return None
    if result.returncode != 0:
        result.secret[:] = bytes(len(result.secret))
        return None
    return _strip_newline(result.secret)


def ask_console(prompt: str, console: str = CONSOLE) -> bytearray | None:
    """Prompt on console with echo off and read one line, byte by byte, into a bytearray."""
    try:
        fd = os.open(console, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    answer = bytearray(MAX_ANSWER)
    size = 0
    try:
        try:
            saved: list[Any] | None = termios.tcgetattr(fd)
        except termios.error:
            saved = None
        if saved is not None:
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~termios.ECHO
            quiet[3] |= termios.ICANON
            termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        try:
            os.write(fd, f"\n{prompt} ".encode(errors="replace"))
            with memoryview(answer) as view:
                while size < MAX_ANSWER:
                    got = os.readv(fd, [view[size : size + 1]])
                    if got == 0 or answer[size] in b"\r\n":
                        break
                    size += got
            os.write(fd, b"\n")
        finally:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
    except OSError:
        answer[:] = bytes(MAX_ANSWER)
        return None
    finally:
        os.close(fd)
    with memoryview(answer) as view, view[:size] as typed:
        result = bytearray(typed)
    answer[:] = bytes(MAX_ANSWER)
    return result


def ask(prompt: str, attempt: int) -> bytearray | None:
    """The recovery key as typed, through systemd's agents where there are any."""
    del attempt  # the prompt already says which try this is
    if use_systemd():
        return ask_systemd(prompt)
    return ask_console(prompt)
