"""Processes and wall time per unseal (and per PCR 15 extend) on a real swtpm (issue 13).

Not a test: it prints figures and asserts nothing about time. Run from the repository:

    .venv/bin/python tests/tpm2_bench.py [-n 21]

The unseal rows: tpm2-tools unsalted (the /dev/tpmrm0 form before ESAPI), tpm2-tools salted
(possible only without a resource manager) and ESAPI in process (system/esys.py, salted).

Each row seals once, then repeats the measured operation `-n` times on a fresh swtpm
(over its unix socket, no resource manager: the flush after each unseal is counted) and
prints the processes pystate spawned for one operation and the median, min and max ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swtpm import Swtpm

from pystate_initrd.formats.tpm2_policy import SealedKey
from pystate_initrd.system import run as run_module
from pystate_initrd.system import tpm2

SECRET = bytes(range(1, 33))


@contextmanager
def counted() -> Iterator[list[str]]:
    calls: list[str] = []
    real = run_module.run

    def counting(argv: Sequence[str], **kw: object) -> run_module.Completed:
        calls.append(argv[0])
        return real(argv, **kw)  # type: ignore[arg-type]

    run_module.run = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        run_module.run = real  # type: ignore[assignment]


def measure(name: str, op: Callable[[], object], n: int) -> None:
    times: list[float] = []
    procs: list[str] = []
    for _ in range(n):
        with counted() as calls:
            start = time.perf_counter()
            op()
            times.append((time.perf_counter() - start) * 1000)
        procs = calls
    print(
        f"| {name} | {len(procs)} | {statistics.median(times):.1f} | "
        f"{min(times):.1f}-{max(times):.1f} | {' '.join(procs)} |"
    )


def make_srk(emu: Swtpm) -> None:
    """A persistent SRK at 0x81000001 as systemd makes it: ECC P-256, noda, evicted."""
    env = {**os.environ, "TPM2TOOLS_TCTI": emu.tcti}
    ctx = str(emu.dir / "srk.ctx")
    for argv in (
        ["tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
         "-a", tpm2.PRIMARY_ATTRIBUTES, "-c", ctx],
        ["tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx, "0x81000001"],
        ["tpm2_flushcontext", "-t"],
    ):  # fmt: skip
        subprocess.run(argv, env=env, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=21)
    args = parser.parse_args()
    emu = Swtpm()
    emu.start()
    print(f"swtpm over a unix socket, no resource manager; median of {args.n}")
    try:
        tcti = emu.tcti
        print("| operation | processes | median ms | min-max ms | commands |")
        print("|---|---|---|---|---|")
        for parent in ("transient primary", "persistent SRK"):
            if parent == "persistent SRK":
                make_srk(emu)
            key = tpm2.seal(SECRET, pcrs=[7], pcr15_zero=True, tcti=tcti)
            assert (key.parent is None) == (parent == "transient primary")
            for how in ("tools, unsalted", "tools, salted", "ESAPI in process, salted"):
                os.environ["PYSTATE_TPM2"] = "library" if how.startswith("ESAPI") else "cli"
                salted = how != "tools, unsalted"

                def op(key: SealedKey = key, salted: bool = salted) -> None:
                    assert tpm2.unseal(key, tcti=tcti, salted=salted) == SECRET

                measure(f"unseal, {parent}, {how}", op, args.n)
        os.environ["PYSTATE_TPM2"] = "cli"
        measure("pcr_extend 15", lambda: tpm2.pcr_extend(15, "sha256", bytes(32), tcti), args.n)
    finally:
        emu.cleanup()


if __name__ == "__main__":
    main()
