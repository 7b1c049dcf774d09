"""Shared test fixtures and skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pyproject's pythonpath puts REPO on sys.path (import pystate_initrd, pystate_build).
REPO = Path(__file__).resolve().parent.parent

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root for mounts and loop devices")


def has_cap(bit: int) -> bool:
    """Whether this process's effective capability set has capability number ``bit``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_RESOURCE = 24  # ext4 online resize needs it

# The initrd builders the systemd-initrd QEMU tests run with (dracut's shell initrd has no
# mkosi twin). The mkosi initrds are built once per session, on first use: the production one
# and, for the tests that cut the power or extend a PCR, a test build (--test-hooks).
BUILDERS = ("dracut", "mkosi")


@pytest.fixture(scope="session")
def mkosi_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pystate_build.mkosi import build_mkosi_initrd

    work = tmp_path_factory.mktemp("mkosi-initrd")
    return build_mkosi_initrd(work / "initrd.img", work=work / "work")


@pytest.fixture(scope="session")
def mkosi_initrd_test_hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pystate_build.mkosi import build_mkosi_initrd

    work = tmp_path_factory.mktemp("mkosi-initrd-test-hooks")
    return build_mkosi_initrd(work / "initrd.img", work=work / "work", test_hooks=True)


class PlainUndoDir:
    """The offline shrink's UndoArea (volume/scratch.py) as a plain directory: for hosts
    without device-mapper, where the encrypted area cannot be opened. Same undo file, same
    e2undo, same decisions; only the encryption of the area is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.made: list[bytes] = []  # the nonces it was made with

    def exists(self) -> bool:
        return self.path.exists()

    def make(self, nonce: bytes, size: int) -> Path:
        del size
        self.made.append(nonce)
        self.path.mkdir(mode=0o700, exist_ok=True)
        return self.path

    def open(self, nonce: bytes) -> Path:
        from pystate_initrd.volume.scratch import ScratchError

        if not self.path.is_dir():
            raise ScratchError(f"{self.path} is no undo area")
        return self.path

    def close(self) -> None:
        pass

    def remove(self) -> int:
        from pystate_initrd.volume import undo_file

        if not self.path.exists():
            return 0
        size = undo_file.scrub_and_remove(self.path)
        self.path.rmdir()
        return size

    def describe(self) -> str:
        return str(self.path)
