"""A real swtpm for tests: start, restart (power cycle: PCRs back to zero), stop.

Use the fixtures from a test module with `swtpm = swtpm_helper.swtpm`, `tpm = swtpm_helper.tpm`
`swtpm` (module-scoped) keeps one emulator per module; `tpm` (per test) power-cycles
it first, so every test starts with all PCRs zero and no transient objects.

The emulator listens on a unix socket (`--server type=unixio`), which tpm2-tss
3.2's swtpm TCTI reaches with `swtpm:path=<socket>` (its control channel must be
`<socket>.ctrl`): no port to pick, nothing on the network. `Swtpm(tcp=True)`
listens on free 127.0.0.1 ports instead (TCTI `swtpm:host=127.0.0.1,port=P`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TOOLS = ("swtpm", "tpm2_createprimary", "tpm2_load", "tpm2_unseal", "tpm2_pcrextend")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
needs_swtpm = pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)}")


def _free_port_pair() -> int:
    """A port P with P and P+1 free on 127.0.0.1 (swtpm wants the control port apart)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


class Swtpm:
    """One swtpm process with its state directory; `tcti` is what tpm2-tools needs."""

    def __init__(self, *, tcp: bool = False, log_level: int = 1) -> None:
        # A short directory: AF_UNIX paths are limited to 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="swtpm."))
        (self.dir / "state").mkdir()
        self.tcp = tcp
        self.log_level = log_level  # 20 and up: every command and response in hex
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.tcti = ""

    def start(self) -> None:
        if self.tcp:
            self.port = _free_port_pair()
            server = f"type=tcp,port={self.port},bindaddr=127.0.0.1"
            ctrl = f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1"
            self.tcti = f"swtpm:host=127.0.0.1,port={self.port}"
        else:
            sock = self.dir / "sock"
            server = f"type=unixio,path={sock}"
            ctrl = f"type=unixio,path={sock}.ctrl"
            self.tcti = f"swtpm:path={sock}"
        self.proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2", "--server", server, "--ctrl", ctrl,
                "--tpmstate", f"dir={self.dir / 'state'}",
                "--flags", "startup-clear,not-need-init",
                "--log", f"file={self.dir / 'log'},level={self.log_level}",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._ready():
            if self.proc.poll() is not None:
                log = (
                    (self.dir / "log").read_text(errors="replace")
                    if (self.dir / "log").exists()
                    else ""
                )
                raise RuntimeError(f"swtpm exited with {self.proc.returncode}: {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("swtpm did not come up within 10 s")
            time.sleep(0.005)

    def _ready(self) -> bool:
        if not self.tcp:
            return (self.dir / "sock").exists() and (self.dir / "sock.ctrl").exists()
        try:
            with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        for name in ("sock", "sock.ctrl"):
            (self.dir / name).unlink(missing_ok=True)

    def restart(self) -> None:
        """Power cycle: the persistent state (seeds) stays, PCRs and loaded objects reset."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def swtpm() -> Iterator[Swtpm]:
    if MISSING:
        pytest.skip(f"missing {', '.join(MISSING)}")
    emulator = Swtpm()
    try:
        emulator.start()
        yield emulator
    finally:
        emulator.cleanup()


@pytest.fixture
def tpm(swtpm: Swtpm) -> Swtpm:
    """The module's swtpm, freshly power-cycled: PCRs zero, no transient objects."""
    swtpm.restart()
    return swtpm


@pytest.fixture(params=["library", "cli"])
def tpm_both(
    swtpm: Swtpm, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Swtpm:
    """`tpm`, once through ESAPI in process and once through tpm2-tools (PYSTATE_TPM2)."""
    monkeypatch.setenv("PYSTATE_TPM2", request.param)
    swtpm.restart()
    return swtpm


@pytest.fixture
def tpm_cli(swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> Swtpm:
    """`tpm` for tests of tpm2-tools' own behaviour (PYSTATE_TPM2=cli)."""
    monkeypatch.setenv("PYSTATE_TPM2", "cli")
    swtpm.restart()
    return swtpm
