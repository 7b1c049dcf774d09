"""A TPM that says "not now": a proxy between QEMU's tpm-emulator and swtpm that forges answers.

swtpm cannot be told to answer TPM_RC_RETRY, TPM_RC_YIELDED or TPM_RC_LOCKOUT, nor to die in
the middle of one command. This proxy sits between QEMU and swtpm and does it: **the
responses it forges never came from a TPM**. For the commands a ``Fault`` selects (a command
code, from its ``nth`` occurrence, ``times`` times or for good) it either answers itself with a
bare error response (tag ``TPM_ST_NO_SESSIONS``, size 10, the chosen response code: what a
TPM sends when it did not execute the command, which swtpm then never sees), or kills swtpm
and closes the channel, as a TPM that died mid-command.

How QEMU talks to swtpm: QEMU's ``-chardev socket`` reaches swtpm's *control* socket, and
sends it, with ``CMD_SET_DATAFD``, one end of a socketpair as an ``SCM_RIGHTS`` file
descriptor; the TPM commands then go over that pair as the plain TPM2 bytes, a command
``tag(2) size(4) code(4) …`` answered by a response ``tag(2) size(4) rc(4) …`` (big-endian,
size counting the whole frame). The proxy relays the control channel byte for byte, but
swaps a descriptor QEMU passes for one end of a socketpair of its own, and relays the TPM
frames between the two pairs, one command and its response at a time.

``decide`` and the frame helpers are pure (tests/test_torture_faults.py runs them on a
socketpair); ``proxy(swtpm_socket, fault, kill)`` is the context manager
``qemu_harness.boot(tpm_proxy=…)`` takes.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HEADER = 10  # tag(2) size(4) code or rc(4)
TPM_ST_NO_SESSIONS = 0x8001
MAX_FRAME = 1 << 16  # swtpm's buffer is 4 KiB; anything larger is not a TPM frame

# Response codes the proxy forges, and command codes it selects by (TPM 2.0 part 2).
RC_RETRY = 0x922
RC_YIELDED = 0x908
RC_LOCKOUT = 0x921
CC_UNSEAL = 0x15E
CC_LOAD = 0x157
CC_CREATE_PRIMARY = 0x131
KILL = -1  # Fault.rc: kill swtpm instead of answering


class FrameError(Exception):
    """Bytes on the data channel that are not a TPM frame."""


@dataclass(frozen=True)
class Fault:
    """From the ``nth`` (1-based) command with ``code`` on, ``times`` of them (0: all), the
    proxy answers ``rc`` itself (``KILL``: swtpm is killed instead)."""

    code: int
    rc: int
    nth: int = 1
    times: int = 1

    def hits(self, seen: int) -> bool:
        """Whether the ``seen``-th command with this code (1-based) is forged."""
        if seen < self.nth:
            return False
        return self.times == 0 or seen < self.nth + self.times


@dataclass
class Counter:
    """What went through: commands by code, and the forged ones."""

    commands: dict[int, int] = field(default_factory=dict)
    forged: int = 0
    killed: bool = False
    log: list[str] = field(default_factory=list)


def parse_header(header: bytes) -> tuple[int, int, int]:
    """(tag, size, code or rc) of a frame's first 10 bytes."""
    if len(header) != HEADER:
        raise FrameError(f"a TPM frame header is {HEADER} bytes, got {len(header)}")
    tag, size, code = struct.unpack(">HII", header)
    if not HEADER <= size <= MAX_FRAME:
        raise FrameError(f"TPM frame size {size} out of range")
    return tag, size, code


def error_response(rc: int) -> bytes:
    """A TPM's answer to a command it did not execute: no sessions, no parameters."""
    return struct.pack(">HII", TPM_ST_NO_SESSIONS, HEADER, rc)


def decide(command: bytes, fault: Fault, counter: Counter) -> bytes | int | None:
    """For one command frame: None to pass it to swtpm, the forged response, or KILL."""
    _, _, code = parse_header(command[:HEADER])
    seen = counter.commands[code] = counter.commands.get(code, 0) + 1
    if code != fault.code or not fault.hits(seen):
        return None
    counter.forged += 1
    counter.log.append(f"command 0x{code:x} #{seen}: " + (
        "swtpm killed" if fault.rc == KILL else f"forged rc 0x{fault.rc:x}"
    ))  # fmt: skip
    return KILL if fault.rc == KILL else error_response(fault.rc)


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("channel closed")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> bytes:
    header = read_exact(sock, HEADER)
    _, size, _ = parse_header(header)
    return header + read_exact(sock, size - HEADER)


def relay_frames(
    qemu: socket.socket, tpm: socket.socket, fault: Fault, counter: Counter,
    kill: Callable[[], None],
) -> None:  # fmt: skip
    """Commands from QEMU to swtpm and responses back, until a side closes (or a kill)."""
    with contextlib.suppress(EOFError, OSError, FrameError):
        while True:
            command = read_frame(qemu)
            action = decide(command, fault, counter)
            if action == KILL:
                counter.killed = True
                kill()
                return
            if isinstance(action, bytes):
                qemu.sendall(action)
                continue
            tpm.sendall(command)
            qemu.sendall(read_frame(tpm))


def _relay_control(
    src: socket.socket, dst: socket.socket, on_fd: Callable[[int], int] | None
) -> None:
    """Control bytes from src to dst; a descriptor src passes is swapped through on_fd."""
    fds_size = socket.CMSG_SPACE(4 * 4)
    with contextlib.suppress(OSError):
        while True:
            data, ancdata, _, _ = src.recvmsg(4096, fds_size)
            if not data:
                return
            passed: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    passed += list(fds)
            if passed and on_fd is not None:
                mine = [on_fd(fd) for fd in passed]
                dst.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", mine))]
                )
                for fd in mine:
                    os.close(fd)
            else:
                dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def swtpm_pid(socket_path: Path) -> int | None:
    """The swtpm serving ``socket_path`` (the harness's own, in its private directory)."""
    needle = f"path={socket_path}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"swtpm") and needle in argv:
                return int(entry.name)
    return None


@contextlib.contextmanager
def proxy(swtpm_socket: Path, fault: Fault, counter: Counter | None = None) -> Iterator[Path]:
    """Listen on a socket of our own for QEMU; relay to ``swtpm_socket`` with ``fault``."""
    counter = counter if counter is not None else Counter()
    tmp = Path(tempfile.mkdtemp(prefix="pystate-tpm-proxy-"))
    path = tmp / "proxy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    opened: list[socket.socket] = [listener]

    def kill() -> None:
        pid = swtpm_pid(swtpm_socket)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        for s in opened[1:]:
            with contextlib.suppress(OSError):
                s.close()

    def swap(qemu_fd: int) -> int:
        qemu_data = socket.socket(fileno=qemu_fd)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.extend([qemu_data, ours])
        threading.Thread(
            target=relay_frames, args=(qemu_data, ours, fault, counter, kill), daemon=True
        ).start()
        return theirs.detach()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                qemu, _ = listener.accept()
                tpm = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                tpm.connect(str(swtpm_socket))
                opened.extend([qemu, tpm])
                for args in ((qemu, tpm, swap), (tpm, qemu, None)):
                    threading.Thread(target=_relay_control, args=args, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        for s in opened:
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(OSError):
            path.unlink()
            tmp.rmdir()
