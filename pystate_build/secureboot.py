"""Test Secure Boot: a PK, KEK and db of our own, enrolled into an OVMF variable store.

``test_keys(dir)`` makes (once) three self-signed RSA-2048 X.509 certificates with openssl:
``PK``, ``KEK`` and ``db``; the db key signs systemd-boot and the UKI (uki.sign). They are
test keys, made on the build machine and kept in ``cache/secureboot``: never ship them.

``enrolled_vars(out, keys)`` writes a copy of Debian's empty OVMF variable store
(``OVMF_VARS_4M.fd``) with PK, KEK and db set and Secure Boot on (``virt-fw-vars`` of the
PyPI ``virt-firmware``). No Microsoft certificate is enrolled: only what we signed boots.

``add_db_cert(vars, cert)`` adds a certificate to a machine's db in place: a change the
firmware measures into PCR 7 (EV_EFI_VARIABLE_DRIVER_CONFIG "db"), as a firmware or key
update in the field would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pystate_initrd.errors import PystateError
from pystate_initrd.system.run import run

from . import CACHE
from .uki import SigningKey

OVMF = Path("/usr/share/OVMF")
OVMF_CODE_SECBOOT = OVMF / "OVMF_CODE_4M.secboot.fd"  # needs SMM
OVMF_VARS_EMPTY = OVMF / "OVMF_VARS_4M.fd"
# The owner GUID recorded with each certificate (any GUID; this one is pystate's test owner).
OWNER_GUID = "6c1c2bd6-8a0b-4b0e-9b53-7079737461e7"
KEY_NAMES = ("PK", "KEK", "db")


class SecureBootError(PystateError):
    """Test keys or an enrolled variable store could not be made."""


@dataclass(frozen=True)
class TestKeys:
    """The three key pairs of a test Secure Boot setup (PEM files in one directory)."""

    directory: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def db(self) -> SigningKey:
        """What signs the boot chain: the db key."""
        return SigningKey(self.key("db"), self.cert("db"))


def make_cert(directory: Path, name: str, common_name: str) -> tuple[Path, Path]:
    """A self-signed RSA-2048 certificate ``name.crt`` and key ``name.key`` in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    run([
        "openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
        "-days", "3650", "-subj", f"/CN={common_name}/", "-keyout", str(key), "-out", str(cert),
    ])  # fmt: skip
    key.chmod(0o600)
    return key, cert


def test_keys(directory: Path | None = None) -> TestKeys:
    """The test PK, KEK and db in ``directory`` (default cache/secureboot), made if missing."""
    keys = TestKeys(directory or CACHE / "secureboot")
    for name in KEY_NAMES:
        if not (keys.cert(name).is_file() and keys.key(name).is_file()):
            make_cert(keys.directory, name, f"pystate test {name}")
    return keys


def _virt_fw_vars() -> str:
    """virt-fw-vars beside the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "virt-fw-vars"
    found = str(beside) if beside.is_file() else shutil.which("virt-fw-vars")
    if found is None:
        raise SecureBootError(
            "virt-fw-vars not found", hint="pip install virt-firmware (bash .ci/setup does)"
        )
    return found


def enrolled_vars(out: Path, keys: TestKeys, template: Path = OVMF_VARS_EMPTY) -> Path:
    """An OVMF variable store with our PK, KEK, db and Secure Boot on; returns out."""
    if not template.is_file():
        raise SecureBootError(f"{template}: no such file", hint="apt-get install ovmf")
    out.parent.mkdir(parents=True, exist_ok=True)
    run([
        _virt_fw_vars(), "--input", str(template), "--output", str(out),
        "--set-pk", OWNER_GUID, str(keys.cert("PK")),
        "--add-kek", OWNER_GUID, str(keys.cert("KEK")),
        "--add-db", OWNER_GUID, str(keys.cert("db")),
        "--no-microsoft", "--secure-boot",
    ])  # fmt: skip
    return out


def add_db_cert(store: Path, cert: Path) -> None:
    """Append ``cert`` to the db of the variable store ``store`` (in place)."""
    run([_virt_fw_vars(), "--inplace", str(store), "--add-db", OWNER_GUID, str(cert)])


def print_store(store: Path) -> str:
    """virt-fw-vars' summary of a store (for logs and test failures)."""
    return run([_virt_fw_vars(), "--input", str(store), "--print"]).stdout.decode(errors="replace")


def store_variables(store: Path) -> dict[str, bytes]:
    """Every variable in a store, ``Name-guid`` (efivarfs's naming) -> its data."""
    with tempfile.TemporaryDirectory(prefix="pystate-vars.") as tmp:
        out = Path(tmp) / "vars.json"
        run([_virt_fw_vars(), "--input", str(store), "--output-json", str(out)])
        data = json.loads(out.read_text())
    return {f"{v['name']}-{v['guid']}": bytes.fromhex(v["data"]) for v in data["variables"]}


def _cmd_efivars(args: argparse.Namespace) -> int:
    keys = test_keys(Path(args.keys) if args.keys else None)
    out = enrolled_vars(Path(args.out), keys)
    print(f"{out}: PK, KEK and db from {keys.directory}, Secure Boot on")
    print(f"sign with: --sign-key {keys.key('db')} --sign-cert {keys.cert('db')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "efivars", help="an OVMF variable store with test Secure Boot keys enrolled"
    )
    p.add_argument("out", help="the variable store to write (qemu/boot --secure-boot OUT)")
    p.add_argument("--keys", help="the test keys' directory (default cache/secureboot)")
    p.set_defaults(func=_cmd_efivars)
