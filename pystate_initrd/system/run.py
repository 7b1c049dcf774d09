"""The one way pystate runs an external command.

Argument lists only, never a shell; a minimal environment; stdin closed unless
data is passed (secrets go there, never into argv); a missing binary or a
failing command becomes a typed error naming the command and its status.

Secrets: ``input`` may be a bytearray (subprocess writes it from the buffer,
no immutable copy is made); ``secret_output=True`` reads standard output into
one preallocated bytearray (``Completed.secret``) that the caller wipes, so a
key printed by a tool (``tpm2_unseal``, ``systemd-ask-password``) never
exists as ``bytes``. ``pass_fds`` hands pipes (``/dev/fd/N``) to the child.

With debugging on (``pystate.debug``: log.py), every command is logged at debug
priority with its exit status and duration; argv never holds a secret, and
neither input nor output is logged.
"""

from __future__ import annotations

import os
import selectors
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pystate_initrd import report
from pystate_initrd.errors import PystateError
from pystate_initrd.log import installed as installed_log
from pystate_initrd.secret import wipe as _wipe

# DM_DISABLE_UDEV: libdevmapper (cryptsetup) makes /dev/mapper nodes itself instead of
# waiting for udev's confirmation, which never comes in an initrd without the dm rules.
_BASE_ENV = {"LANG": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DM_DISABLE_UDEV": "1"}


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
    # secret_output: standard output in a bytearray (the caller wipes it); stdout is b"".
    secret: bytearray = field(default_factory=bytearray, repr=False)


SECRET_OUTPUT_MAX = 8192  # a key, a typed passphrase: never more


def run(
    argv: Sequence[str],
    *,
    input: bytes | bytearray | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
    capture: bool = True,
    pass_fds: Sequence[int] = (),
    secret_output: bool = False,
    secret_max: int = SECRET_OUTPUT_MAX,
) -> Completed:
    """Run argv; raise CommandError unless its status is in ok_codes (when check)."""
    full_env = dict(_BASE_ENV)
    if env:
        full_env.update(env)
    begin = time.monotonic()
    report.process_started()  # the boot report's per-step count (SPEC §10)
    if secret_output:
        try:
            result = _run_secret(argv, input, full_env, check, ok_codes, pass_fds, secret_max)
        except CommandError as exc:
            _log_command(argv, exc.returncode, begin)
            raise
        _log_command(argv, result.returncode, begin)
        return result
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=full_env,
            pass_fds=tuple(pass_fds),
            check=False,
        )
    except FileNotFoundError:
        _log_command(argv, None, begin)
        raise CommandError(f"{argv[0]} not found.") from None
    _log_command(argv, proc.returncode, begin)
    result = Completed(tuple(argv), proc.returncode, proc.stdout or b"", proc.stderr or b"")
    if check and proc.returncode not in ok_codes:
        raise _failure(argv, proc.returncode, result.stderr)
    return result


def _log_command(argv: Sequence[str], status: int | None, begin: float) -> None:
    """One debug line per command: argv, exit status, duration (never input or output)."""
    log = installed_log()
    if log is None or not log.debug_enabled:
        return
    ms = (time.monotonic() - begin) * 1000
    outcome = "not found" if status is None else f"exit {status}"
    log.debug(f"run: {shlex.join(argv)} -> {outcome} in {ms:.1f} ms")


def _failure(argv: Sequence[str], status: int, stderr: bytes) -> CommandError:
    err = stderr.decode(errors="replace").strip()
    last = err.splitlines()[-1] if err else "no error output"
    return CommandError(f"{shlex.join(argv)} failed with status {status}: {last}", status, err)


def _run_secret(
    argv: Sequence[str],
    input: bytes | bytearray | None,
    env: Mapping[str, str],
    check: bool,
    ok_codes: Sequence[int],
    pass_fds: Sequence[int],
    limit: int,
) -> Completed:
    """run() whose standard output goes into one preallocated bytearray, never resized.

    Input is written from a pipe filled before the child starts when it fits
    (a key does), so nothing here waits on the child's reading.
    """
    stdin: int = subprocess.DEVNULL
    pipe_r = -1
    if input is not None:
        if len(input) > 65536:
            raise CommandError(f"{argv[0]}: secret input of {len(input)} bytes is too large")
        pipe_r, pipe_w = os.pipe()
        try:
            with memoryview(input) as view:
                done = 0
                while done < len(view):
                    done += os.write(pipe_w, view[done:])
        finally:
            os.close(pipe_w)
        stdin = pipe_r
    out, size, err = bytearray(limit), 0, bytearray()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            pass_fds=tuple(pass_fds),
            bufsize=0,
        )
    except FileNotFoundError:
        raise CommandError(f"{argv[0]} not found.") from None
    finally:
        if pipe_r >= 0:
            os.close(pipe_r)
    assert proc.stdout is not None and proc.stderr is not None
    too_much = False
    with proc, selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        while selector.get_map():
            for ready, _ in selector.select():
                if ready.fileobj is proc.stdout:
                    if size == len(out):
                        too_much = True
                        proc.kill()
                        selector.unregister(ready.fileobj)
                        continue
                    with memoryview(out) as view, view[size:] as rest:
                        got = os.readv(ready.fd, [rest])
                    size += got
                else:
                    chunk = os.read(ready.fd, 65536)
                    got = len(chunk)
                    err += chunk
                if not got:
                    selector.unregister(ready.fileobj)
        status = proc.wait()
    if too_much:
        _wipe(out)
        raise CommandError(f"{argv[0]} printed more than {limit} bytes, refusing", status)
    # An exact-size copy straight from the buffer (no intermediate object), then the
    # big one wiped: shrinking it in place could realloc and leave the old block unwiped.
    with memoryview(out) as view, view[:size] as used:
        secret = bytearray(used)
    _wipe(out)
    result = Completed(tuple(argv), status, b"", bytes(err), secret=secret)
    if check and status not in ok_codes:
        _wipe(secret)
        raise _failure(argv, status, bytes(err))
    return result
