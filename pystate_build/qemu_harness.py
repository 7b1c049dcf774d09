"""Boot a disk image in QEMU with swtpm and watch its serial console (stdlib only).

``boot(disk, ...)`` starts swtpm (its state in ``tpm_state`` so consecutive boots of one
machine share one TPM; a fresh temporary directory when not given), then QEMU with the
harness kernel, the initrd and the disk as virtio-blk, the serial console on a pipe. The
console is streamed (to stdout when ``echo``) and scanned: a kernel panic, a reboot request or
an emergency shell ends the boot early; ``answers`` send a line to the console when a text
appears (prompts such as the recovery key). swtpm and QEMU are killed on every exit path.
``kill_after`` (a ``KillAfter``) cuts the power at a chosen instant: QEMU gets SIGKILL a delay
after the first console line matching a pattern (build.py torture). Every console line is
kept with its arrival time (``BootResult.lines``), so an uncut boot measures the windows a
later boot cuts into.

``cache`` is the state disks' QEMU cache mode: ``unsafe`` (the default: fast, guest flushes
ignored) or ``writeback``/``none`` (flushes reach the host's storage); docs/reliability.md
says what a SIGKILL of QEMU loses under each.

With ``uefi`` (a ``Uefi``) QEMU boots OVMF instead of the kernel: the firmware finds the
boot loader on the disks' EFI system partition (``build.py disk --esp``), and the kernel, the
initrd and the command line come from the UKI there. OVMF's code is read-only; its variable
store is the machine's own file (``efi_vars``, by default ``efivars.fd`` beside the swtpm state
directory), copied from the template on the first boot and kept, so EFI variables persist
across the machine's boots as its TPM does.

``qemu/boot`` is the command-line front end; from Python (tests, demo, benchmarks)
``from pystate_build import qemu_harness as harness``. ``docs/testing.md`` has examples.
No ``register``: build.py imports it and adds no subcommand.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# Wraps swtpm's control socket for QEMU (torture_tpm.py's proxy): given swtpm's socket,
# yields the one QEMU connects to.
TpmProxy = Callable[[Path], AbstractContextManager[Path]]

# Exit statuses of qemu/boot (and BootResult.returncode).
OK = 0
GUEST_FAILED = 1  # kernel panic, emergency shell, reboot instead of power-off
USAGE = 2
TIMEOUT = 3
QEMU_FAILED = 4  # QEMU or swtpm could not start, or QEMU exited with an error
MARKER_MISSING = 5  # powered off normally but an expected marker never appeared
KILLED = 6  # the harness cut the power as asked (kill_after): not a failure of the guest

TAIL_LINES = 40
DEFAULT_TIMEOUT = 300.0
DEFAULT_MEMORY = 1024  # MiB

# Console texts that end a boot early as a failure: (regex, reason). A panic without
# panic= hangs forever, an emergency shell waits for a password that never comes.
FAILURE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"Kernel panic - not syncing", "kernel panic"),
    (r"reboot: Restarting system", "the guest rebooted instead of powering off"),
    (r"You are in emergency mode", "systemd emergency mode"),
    (r"Entering emergency mode", "emergency shell"),
    (r"Cannot open access to console, the root account is locked", "systemd emergency mode"),
    (r"Give root password for maintenance", "emergency shell"),
    (r"dracut Warning: Could not boot", "dracut could not boot"),
    (r"Dropping to debug shell", "dracut emergency shell"),
)
POWER_OFF = "reboot: Power down"
CACHE_MODES = ("unsafe", "writeback", "none", "directsync", "writethrough")


@dataclass(frozen=True)
class Answer:
    """Send ``reply`` (and a newline) to the console once ``trigger`` appears."""

    trigger: str
    reply: str

    @classmethod
    def parse(cls, text: str) -> Answer:
        """'TRIGGER=REPLY' (the first '=' splits, so a reply may contain '=')."""
        trigger, sep, reply = text.partition("=")
        if not sep or not trigger:
            raise ValueError(f"answer {text!r} is not TRIGGER=REPLY")
        return cls(trigger, reply)


@dataclass(frozen=True)
class BootResult:
    returncode: int  # one of OK, GUEST_FAILED, TIMEOUT, QEMU_FAILED, MARKER_MISSING, KILLED
    console: str
    duration: float  # seconds from QEMU's start to its end
    reason: str = ""  # why it failed, empty on success
    qemu_status: int | None = None
    argv: tuple[str, ...] = field(default=(), repr=False)
    # (seconds since QEMU's start, line) for every complete console line, as it arrived
    lines: tuple[tuple[float, str], ...] = field(default=(), repr=False)
    killed_at: float | None = None  # with kill_after: when QEMU got SIGKILL (since start)
    anchor_at: float | None = None  # with kill_after: when the anchor line arrived

    @property
    def ok(self) -> bool:
        return self.returncode == OK

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.console.splitlines()[-lines:])

    def lines_with(self, marker: str) -> list[str]:
        return [line for line in self.console.splitlines() if marker in line]


OVMF = Path("/usr/share/OVMF")


@dataclass(frozen=True)
class Uefi:
    """OVMF firmware: ``code`` read-only, the variable store copied from ``vars_template``.
    The Secure Boot build of the code needs SMM (``smm``), emulated and slower under TCG."""

    code: Path = OVMF / "OVMF_CODE_4M.fd"
    vars_template: Path = OVMF / "OVMF_VARS_4M.fd"
    smm: bool = False

    @classmethod
    def secure_boot(cls, vars_template: Path) -> Uefi:
        """The Secure Boot code with a store that has keys enrolled (secureboot.py)."""
        return cls(OVMF / "OVMF_CODE_4M.secboot.fd", vars_template, smm=True)


@dataclass(frozen=True)
class KillAfter:
    """Cut the power: SIGKILL QEMU ``delay`` seconds after the first console line that
    matches ``pattern`` (a regex, searched in each complete line). QEMU then dies with
    whatever it had not written to the disk image yet; the boot's result is KILLED. When
    the line never appears the boot ends as it would have without the cut."""

    pattern: str
    delay: float


class HarnessError(Exception):
    """QEMU or swtpm could not be started."""


def default_kernel() -> Path:
    """The harness kernel of ``build.py kernel`` (downloaded on first use)."""
    from .kernel import ensure_kernel

    return ensure_kernel().vmlinuz


def _accel() -> str:
    """TCG unless PYSTATE_QEMU_ACCEL says otherwise: /dev/kvm may exist and still hang."""
    return os.environ.get("PYSTATE_QEMU_ACCEL", "tcg")


@contextlib.contextmanager
def _swtpm(state_dir: Path, sockdir: Path, trace: Path | None = None) -> Iterator[Path]:
    """A running swtpm with its state in state_dir; yields its control socket. With
    ``trace``, swtpm logs every command and response in hex there (level 20)."""
    if shutil.which("swtpm") is None:
        raise HarnessError("swtpm not found (apt-get install swtpm)")
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = sockdir / "swtpm.sock"
    log = trace or sockdir / "swtpm.log"
    argv = [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state_dir}",
        "--ctrl",
        f"type=unixio,path={sock}",
        "--flags",
        "startup-clear",
        "--log",
        f"file={log}" + (",level=20" if trace else ""),
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - only ctypes.prctl, no locks
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                detail = log.read_text(errors="replace").strip() if log.exists() else ""
                raise HarnessError(f"swtpm exited with status {proc.returncode}: {detail}")
            if time.monotonic() > deadline:
                raise HarnessError(f"swtpm did not create {sock} within 10 s")
            time.sleep(0.02)
        yield sock
    finally:
        _kill(proc)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the harness dies, however it dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qemu_argv(
    disks: Sequence[Path],
    kernel: Path | None,
    initrd: Path | None,
    append: str,
    memory: int,
    tpm_socket: Path | None,
    *,
    cpus: int = 1,
    sector_size: int = 512,
    accel: str | None = None,
    uefi: Uefi | None = None,
    efi_vars: Path | None = None,
    boot_disk: int = 0,
    cache: str = "unsafe",
    blkdebug: Mapping[int, Path] | None = None,
) -> list[str]:
    """The QEMU command line (pure; tests and --dry-run show it). With ``uefi`` the firmware
    boots disk number ``boot_disk`` first, and kernel, initrd and append are not used.
    ``cache``: the disks' cache mode (unsafe ignores the guest's flushes). ``blkdebug`` maps
    a disk's index to a blkdebug configuration (blkdebug.py) that injects I/O errors on it."""
    from .blkdebug import drive_spec

    if cache not in CACHE_MODES:
        raise HarnessError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
    argv = [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35,smm=on" if uefi is not None and uefi.smm else "q35",
        "-accel",
        accel or _accel(),
        "-m",
        str(memory),
        "-smp",
        str(cpus),
        "-display",
        "none",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-no-reboot",
    ]
    if uefi is not None:
        if efi_vars is None:
            raise HarnessError("a UEFI boot needs its variable store (efi_vars)")
        if uefi.smm:  # only SMM code may write the store: what makes Secure Boot secure
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={uefi.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={efi_vars}",
        ]  # fmt: skip
    else:
        if kernel is None:
            raise HarnessError("a boot without UEFI needs a kernel")
        argv += ["-kernel", str(kernel), "-append", f"console=ttyS0 {append}".strip()]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
    blocks = "" if sector_size == 512 else f",logical_block_size={sector_size}"
    if blocks:
        blocks += f",physical_block_size={sector_size}"
    for i, disk in enumerate(disks):
        argv += [
            "-drive",
            f"{drive_spec(disk, (blkdebug or {}).get(i))},if=none,id=disk{i},"
            f"cache={cache},discard=unmap",
            "-device",
            f"virtio-blk-pci,drive=disk{i},serial=disk{i}{blocks}"
            + (",bootindex=1" if uefi is not None and i == boot_disk else ""),
        ]
    if tpm_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=chrtpm,path={tpm_socket}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]
    return argv


class _Console:
    """Accumulates the console, scans it for failures, markers and prompts."""

    def __init__(self, answers: Sequence[Answer], echo: IO[str] | None, log: IO[str] | None):
        self.text = ""
        self.answers = list(answers)
        self.answer_from = 0  # answers look for their trigger after the previous answer
        self.echo = echo
        self.log = log
        self.failure: str | None = None
        self.failure_at = 0.0
        self._pending = b""
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._partial = ""  # the last line, until its newline arrives

    def feed(self, data: bytes) -> list[str]:
        """Add console bytes; return the replies to send now."""
        data = self._pending + data
        # keep an incomplete UTF-8 sequence for the next read
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 == 0x80:
                continue
            if byte >= 0xC0 and back < (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4):
                cut = len(data) - back
            break
        self._pending = data[cut:]
        chunk = data[:cut].decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
        if not chunk:
            return []
        start = max(0, len(self.text) - 200)
        self.text += chunk
        now = time.monotonic() - self.started
        *complete, self._partial = (self._partial + chunk).split("\n")
        self.lines += [(now, line) for line in complete]
        for stream in (self.echo, self.log):
            if stream is not None:
                stream.write(chunk)
                stream.flush()
        if self.failure is None:
            for pattern, reason in FAILURE_PATTERNS:
                if re.search(pattern, self.text[start:]):
                    self.failure = reason
                    self.failure_at = time.monotonic()
                    break
        replies = []
        while self.answers:
            found = self.text.find(self.answers[0].trigger, self.answer_from)
            if found < 0:
                break
            answer = self.answers.pop(0)
            self.answer_from = found + len(answer.trigger)
            replies.append(answer.reply)
        return replies


def boot(
    disk: Path | str | Sequence[Path | str],
    *,
    kernel: Path | str | None = None,
    initrd: Path | str | None = None,
    append: str = "",
    tpm: bool = True,
    tpm_state: Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory: int = DEFAULT_MEMORY,
    cpus: int = 1,
    sector_size: int = 512,
    expect: Sequence[str] = (),
    answers: Sequence[Answer | str] = (),
    echo: bool | IO[str] = False,
    log: Path | str | None = None,
    interact: bool = False,
    accel: str | None = None,
    uefi: Uefi | None = None,
    efi_vars: Path | str | None = None,
    boot_disk: int = 0,
    tpm_trace: Path | None = None,
    cache: str = "unsafe",
    kill_after: KillAfter | None = None,
    blkdebug: Mapping[int, Path] | None = None,
    tpm_proxy: TpmProxy | None = None,
) -> BootResult:
    """Boot ``disk`` (one image or a list; the first is vda) and watch the console.

    ``tpm_trace``: a file for swtpm's log of every TPM command and response (level 20).

    With ``uefi``, OVMF boots disk ``boot_disk``'s ESP; ``efi_vars`` is the machine's
    variable store (default: ``efivars.fd`` beside ``tpm_state``; a new one is copied from
    ``uefi.vars_template``). ``blkdebug``: I/O errors injected on disks (qemu_argv);
    ``tpm_proxy``: QEMU reaches swtpm through it (torture_tpm.py).

    ``kill_after`` cuts the power at an instant (KILLED); ``cache`` is the disks' cache mode.

    Returns a BootResult whose returncode is OK only when the guest powered off by itself
    and every ``expect`` marker appeared. Never raises for a guest failure; raises
    HarnessError only for bad arguments (a missing file).
    """
    disks = [Path(disk)] if isinstance(disk, str | Path) else [Path(d) for d in disk]
    if uefi is None:
        kernel = Path(kernel) if kernel is not None else default_kernel()
        initrd = Path(initrd) if initrd is not None else None
        needed = [*disks, kernel, *([initrd] if initrd else [])]
    else:
        kernel = initrd = None
        needed = [*disks, uefi.code, uefi.vars_template]
    for path in needed:
        if not path.is_file():
            raise HarnessError(f"{path}: no such file")
    parsed = [a if isinstance(a, Answer) else Answer.parse(a) for a in answers]
    echo_stream: IO[str] | None = sys.stdout if echo is True else (echo or None)  # type: ignore[assignment]

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pystate-qemu-")))
        log_stream = stack.enter_context(open(log, "w")) if log else None
        console = _Console(parsed, echo_stream, log_stream)
        sock = None
        start = time.monotonic()
        argv: list[str] = []
        try:
            state = Path(tpm_state) if tpm_state is not None else tmp / "tpm"
            if tpm:
                sock = stack.enter_context(_swtpm(state, tmp, tpm_trace))
                if tpm_proxy is not None:
                    sock = stack.enter_context(tpm_proxy(sock))
            store = None
            if uefi is not None:
                store = Path(efi_vars) if efi_vars is not None else efi_vars_beside(state)
                machine_vars(store, uefi)
            argv = qemu_argv(
                disks,
                kernel,
                initrd,
                append,
                memory,
                sock,
                cpus=cpus,
                sector_size=sector_size,
                accel=accel,
                uefi=uefi,
                efi_vars=store,
                boot_disk=boot_disk,
                cache=cache,
                blkdebug=blkdebug,
            )
            console.started = start
            return _run_qemu(argv, console, timeout, expect, interact, start, kill_after)
        except HarnessError as exc:
            return BootResult(
                QEMU_FAILED, console.text, time.monotonic() - start, str(exc), None, tuple(argv)
            )
    raise AssertionError("unreachable")  # pragma: no cover


def efi_vars_beside(tpm_state: Path) -> Path:
    """A machine's default variable store: ``efivars.fd`` beside its swtpm state directory."""
    return tpm_state.with_name("efivars.fd")


def machine_vars(store: Path, uefi: Uefi) -> Path:
    """The machine's variable store: kept when it exists, else a copy of the template."""
    if not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(uefi.vars_template, store)
    return store


def _run_qemu(
    argv: list[str],
    console: _Console,
    timeout: float,
    expect: Sequence[str],
    interact: bool,
    start: float,
    kill_after: KillAfter | None = None,
) -> BootResult:
    if shutil.which(argv[0]) is None:
        raise HarnessError(f"{argv[0]} not found (apt-get install qemu-system-x86)")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C at the terminal reaches us, not QEMU directly
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - only ctypes.prctl, no locks
    )
    assert proc.stdin and proc.stdout and proc.stderr
    stderr_chunks: list[bytes] = []
    reason = ""
    code = OK
    anchor_at: float | None = None  # kill_after's line seen at (monotonic)
    killed_at: float | None = None
    kill = re.compile(kill_after.pattern) if kill_after is not None else None
    sel = selectors.DefaultSelector()
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        os.set_blocking(proc.stderr.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        if interact:
            threading.Thread(target=_forward_stdin, args=(proc,), daemon=True).start()
        deadline = start + timeout
        open_streams = 2
        while open_streams:
            now = time.monotonic()
            if now > deadline:
                code, reason = TIMEOUT, f"timed out after {timeout:g} s"
                break
            # after a failure, read the rest of the message (a panic's trace) for a moment
            if console.failure is not None and now - console.failure_at > 1.5:
                break
            wait = min(0.2, max(0.0, deadline - now))
            if anchor_at is not None and kill_after is not None:
                cut = anchor_at + kill_after.delay
                if now >= cut:  # the power cut: no SIGTERM, QEMU gets no chance to flush
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    killed_at = time.monotonic()
                    code = KILLED
                    reason = (
                        f"power cut: SIGKILL {kill_after.delay * 1000:.0f} ms after "
                        f"the line matching {kill_after.pattern!r}"
                    )
                    break
                wait = min(wait, cut - now)
            for key, _ in sel.select(timeout=wait):
                data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "err":
                    stderr_chunks.append(data)
                else:
                    seen = len(console.lines)
                    for reply in console.feed(data):
                        with contextlib.suppress(BrokenPipeError):
                            proc.stdin.write(reply.encode() + b"\n")
                            proc.stdin.flush()
                    if kill is not None and anchor_at is None:
                        for at, line in console.lines[seen:]:
                            if kill.search(line):
                                anchor_at = start + at
                                break
        if killed_at is not None:  # what QEMU wrote to the console before it died counts
            _drain(sel, console, stderr_chunks)
    finally:
        sel.close()
        _kill_qemu(proc)
    duration = time.monotonic() - start
    status = proc.returncode
    stderr = b"".join(stderr_chunks).decode(errors="replace").strip()
    if code == OK:
        if console.failure is not None:
            code, reason = GUEST_FAILED, console.failure
        elif status != 0:
            code = QEMU_FAILED
            reason = f"QEMU exited with status {status}" + (f": {stderr}" if stderr else "")
        elif POWER_OFF not in console.text:
            code, reason = GUEST_FAILED, "QEMU exited without the guest powering off"
        else:
            missing = [m for m in expect if m not in console.text]
            if missing:
                code = MARKER_MISSING
                reason = "expected marker(s) never appeared: " + ", ".join(map(repr, missing))
    return BootResult(
        code,
        console.text,
        duration,
        reason,
        status,
        tuple(argv),
        tuple(console.lines),
        None if killed_at is None else killed_at - start,
        None if anchor_at is None else anchor_at - start,
    )


def _drain(sel: selectors.BaseSelector, console: _Console, stderr: list[bytes]) -> None:
    """After the SIGKILL: read the pipes to their end (the console lines QEMU had already
    written are evidence of what the guest did before the cut)."""
    deadline = time.monotonic() + 2
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if not data:
                sel.unregister(key.fileobj)
            elif key.data == "err":
                stderr.append(data)
            else:
                console.feed(data)


def _kill_qemu(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _forward_stdin(proc: subprocess.Popen[bytes]) -> None:
    """--interact: what is typed on our stdin goes to the guest's console."""
    assert proc.stdin
    for line in sys.stdin.buffer:
        try:
            proc.stdin.write(line)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return


def describe(result: BootResult) -> str:
    """A message for a failed boot: the reason and the console's last lines."""
    if result.ok:
        return f"boot: guest powered off after {result.duration:.1f} s"
    return (
        f"boot: FAILED ({result.reason}) after {result.duration:.1f} s\n"
        f"boot: QEMU: {shlex.join(result.argv)}\n"
        f"boot: last {TAIL_LINES} console lines:\n{result.tail()}"
    )
