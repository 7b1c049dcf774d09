"""Row C of ``build.py bench-unlock``: clevis (Debian's clevis-dracut, tpm2 pin, PCR 7).

C's disk is a copy of B's after B0 provisioned it (the same inner ext4, /etc and /var
seeded from the OS image), re-enrolled on the host: the systemd-tpm2 token and its keyslot
are removed and ``clevis luks bind`` seals a new keyslot's passphrase with the tpm2 pin
against C's own swtpm (its state directory is the one the guest boots with) to the PCR 7
value the guest's firmware produces (``pcr_digest``: the test root prints PCR 7). clevis
makes that keyslot PBKDF2 at 1000 iterations, like pystate's and systemd-cryptenroll's.

In C's initrd systemd-cryptsetup asks for a passphrase (crypttab without tpm2-device=) and
clevis-luks-askpass answers it from the LUKS2 token (clevis_luks_unlock: jose, the tpm2
pin's tpm2-tools), the usual clevis set-up of a distribution.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pystate_initrd.system import luks
from pystate_initrd.system.run import run

from .bench_systemd import B_PASSPHRASE
from .disk import DiskLayout

MODULES = ("crypt", "tpm2-tss", "clevis", "clevis-pin-tpm2")
DRACUT_MODULE = Path("/usr/lib/dracut/modules.d/60clevis")


def missing() -> str | None:
    """Why row C cannot run here, or None."""
    if not DRACUT_MODULE.is_dir():
        return "clevis-dracut is not installed (apt-get install clevis-dracut clevis-tpm2)"
    for tool in ("clevis", "clevis-encrypt-tpm2", "jose"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install clevis-tpm2 clevis-luks)"
    return None


@contextlib.contextmanager
def _swtpm(state: Path) -> Iterator[str]:
    """swtpm on state (the directory the guest's swtpm uses); yields the TCTI."""
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-swtpm.") as tmp:
        sock = Path(tmp) / "sock"
        proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2", "--server", f"type=unixio,path={sock}",
                "--ctrl", f"type=unixio,path={sock}.ctrl", "--tpmstate", f"dir={state}",
                "--flags", "startup-clear,not-need-init",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not (sock.exists() and Path(f"{sock}.ctrl").exists()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("swtpm for row C did not start")
                time.sleep(0.01)
            yield f"swtpm:path={sock}"
        finally:
            proc.terminate()
            proc.wait(10)


@contextlib.contextmanager
def _mounted_state(disk: Path, layout: DiskLayout) -> Iterator[Path]:
    part = layout.partitions[-1]
    loop = run(
        [
            "losetup", "--find", "--show", "--offset", str(part.start),
            "--sizelimit", str(part.size), str(disk),
        ]
    ).stdout.decode().strip()  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="bench-state.") as mnt:
            run(["mount", loop, mnt])
            try:
                yield Path(mnt)
            finally:
                run(["umount", mnt])
    finally:
        run(["losetup", "--detach", loop])


def make_c_disk(b_disk: Path, layout: DiskLayout, dest: Path, tpm_state: Path, pcr7: str) -> Path:
    """C's disk from B's provisioned one (see the module's docstring)."""
    run(["cp", "--sparse=always", str(b_disk), str(dest)])
    with _mounted_state(dest, layout) as state:
        image = state / "encrypted.img"
        for token_id, token in luks.tokens(image).items():
            if token.get("type") == "systemd-tpm2":
                run(["cryptsetup", "token", "remove", "--token-id", str(token_id), str(image)])
                for slot in token.get("keyslots", []):
                    luks.kill_keyslot(image, int(slot))
        digest = base64.urlsafe_b64encode(bytes.fromhex(pcr7)).decode().rstrip("=")
        config = f'{{"pcr_bank":"sha256","pcr_ids":"7","pcr_digest":"{digest}"}}'
        with tempfile.NamedTemporaryFile(dir="/dev/shm") as keyfile, _swtpm(tpm_state) as tcti:
            keyfile.write(B_PASSPHRASE.encode())
            keyfile.flush()
            env = {"TPM2TOOLS_TCTI": tcti, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            run(
                ["clevis", "luks", "bind", "-y", "-k", keyfile.name, "-d", str(image), "tpm2",
                 config],
                env=env,
            )  # fmt: skip
    return dest


def pcr7_of(console: str) -> str | None:
    """The sha256 PCR 7 the test root printed (PYSTATE-PCR7 <hex>)."""
    for line in console.splitlines():
        if line.startswith("PYSTATE-PCR7 "):
            value = line.split()[1].lower()
            return value.removeprefix("0x")
    return None
