"""``build.py fuzz``: every parser of untrusted input against mutated real inputs (issue 14).

Each target is one parser as the program uses it, fed bytes. Its inputs are
mutations (bit flips, interesting values, truncations, splices, length-field
edits, JSON value edits; for GPT and LUKS2 the checksums recomputed afterwards,
so most mutants get past them) of real seeds: GPT images written by sfdisk
(512- and 4096-byte sectors), LUKS2 headers made by cryptsetup with a
pystate-tpm2 token imported, tokens, event logs, configuration files, command
lines and names; and hypothesis-built structured inputs (valid tokens, event
logs, configuration files, command lines, names), used as they are and mutated.

An input is a bug when the parser raises anything but its module's own error,
needs more than the time bound (1 s of CPU, SIGPROF in-process, checked again
untraced when the traced run is slow), or its peak traced memory (tracemalloc)
exceeds the memory bound. A bug is printed and its input saved
under out/fuzz/. Everything is seeded: the same --seed and seed corpus give the
same inputs. The real seeds are made once into out/fuzz/seeds/ (sfdisk,
cryptsetup; root for the 4096-byte-sector loop device) and reused.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import OUT

TIME_BOUND = 1.0  # seconds per input
MEMORY_BOUND = 64 << 20  # peak traced bytes per input (inputs are at most a few MiB)
FUZZ_OUT = OUT / "fuzz"
HYPOTHESIS_POOL = 200  # structured inputs drawn per target (used as they are and mutated)


class Hang(BaseException):
    """Raised by SIGALRM/SIGPROF in a parser (a BaseException: `except Exception` won't eat it)."""


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    run: Callable[[bytes], object]  # the parser as the program uses it; raises on refusal
    errors: tuple[type[BaseException], ...]  # the module's own error types
    seeds: Callable[[Path], list[bytes]]  # real seeds (cached under the seed directory)
    strategy: Callable[[], Any] | None = None  # hypothesis strategy of structured bytes
    fixup: Callable[[bytearray], None] | None = None  # recompute checksums after mutating
    fields: Callable[[bytes], list[tuple[int, int, str]]] | None = None  # (offset, size, "<"|">")
    words: tuple[bytes, ...] = ()  # dictionary for text mutations
    json: bool = False  # JSON value edits (whole JSON text, or a LUKS2 header's JSON area)
    units: Callable[[bytes], list[tuple[int, int]]] | None = None  # records to repeat
    limits: Callable[[], list[bytes]] | None = None  # inputs at and past the size caps


def _gpt_run(data: bytes) -> object:
    from pystate_initrd.formats import gpt

    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    table = gpt.parse_gpt(read_at, len(data))
    table.state_partitions()
    return table.to_json()


def _luks_run(data: bytes) -> object:
    from pystate_initrd.formats import luks2, reseal_record, token

    header = luks2.parse_luks2_header(data)
    luks2.keyslot_infos(header.metadata)
    tokens = luks2.token_dicts(header.metadata)
    reseal_record.records(tokens)
    return token.pystate_tokens(tokens)


def _token_run(data: bytes) -> object:
    from pystate_initrd.formats import token

    return token.decode_token(data)


def _record_run(data: bytes) -> object:
    """A re-seal record as a LUKS2 header's token holds it: parsed as luks2.py parses the
    JSON area (text that is no JSON object never reaches the record's decoder), decoded,
    and what a boot would do with it."""
    from pystate_initrd.formats import reseal_record

    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, huge ints
        return None
    if not isinstance(obj, dict):
        return None
    reseal_record.records({0: obj})
    record = reseal_record.decode_record(obj)
    keyslots = {record.keyslot: "s", 0: record.retire_salt, 1: None}
    return reseal_record.next_action(record, keyslots, {0}, {1})


def _eventlog_run(data: bytes) -> object:
    """The log as tpm2.py reads it, then what the PCR diagnosis does with it: replay,
    summarize for sealing, and compare with the seed token's recorded events."""
    from pystate_initrd.formats import pcr_diagnosis as pd
    from pystate_initrd.formats import tcg_eventlog as tl
    from pystate_initrd.formats.tpm2_policy import BANKS

    log = tl.parse(data)
    names = [tl.event_name(e) for e in log.events]
    key = _seed_key()
    for bank in BANKS:
        try:
            values = tl.replay(log, bank)
        except tl.EventLogError:
            continue
        pd.summarize(log, bank, values)
        if bank == key.bank:
            current = {7: values.get(7, bytes(32)), 15: bytes(32)}
            check = pd.compare(key, current, log, pd.Moment.UNLOCK)
            pd.mismatch_line(key, check)
            pd.status_line(key, check)
    return names


@functools.cache
def _seed_key() -> Any:
    return _sealed_key(True)


def _request_run(data: bytes) -> object:
    from pystate_initrd.formats import shrink_request

    return shrink_request.parse_request(data)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # as os.fsdecode: every byte string


def _cmdline_run(data: bytes) -> object:
    from pystate_initrd.config import load_config
    from pystate_initrd.formats.cmdline import format_cmdline, parse_cmdline

    text = _text(data)
    pairs = parse_cmdline(text)
    again = parse_cmdline(format_cmdline(pairs))
    assert again == pairs, f"format_cmdline does not round-trip {pairs!r}: {again!r}"
    return load_config(None, text)


_CONFIG_DIR: list[Path] = []


def _config_run(data: bytes) -> object:
    from pystate_initrd.config import load_config

    if not _CONFIG_DIR:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _CONFIG_DIR.append(Path(tempfile.mkdtemp(prefix="pystate-fuzz-", dir=base)))
        atexit.register(shutil.rmtree, _CONFIG_DIR[0], True)
    path = _CONFIG_DIR[0] / "pystate.conf"
    path.write_bytes(data)
    return load_config(path, "")


def _escape_run(data: bytes) -> object:
    from pystate_initrd.formats.escape import EscapeError, escape_path, unescape_path

    text = _text(data)
    try:
        path = unescape_path(text)
    except EscapeError:
        path = None
    if path is not None:
        again = unescape_path(escape_path(path))
        assert again == path, f"escape_path does not round-trip {path!r}: {again!r}"
    return escape_path(text)


# --------------------------------------------------------------------------- real seeds


def _cached(seed_dir: Path, name: str, make: Callable[[Path], bytes | None]) -> bytes | None:
    path = seed_dir / name
    if not path.exists():
        seed_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pystate-fuzz-seed-") as tmp:
            data = make(Path(tmp))
        if data is None:
            return None
        path.write_bytes(data)
    return path.read_bytes()


def _sh(argv: Sequence[str], stdin: bytes = b"") -> bytes:
    return subprocess.run(argv, input=stdin, check=True, capture_output=True).stdout


_GPT_SCRIPT = """label: gpt
label-id: 1b4e28ba-2fa1-11d2-883f-0016d3cca427
table-length: {entries}
first-lba: {first}
start={a}, size={n}, type=c12a7328-f81f-11d2-ba4b-00a0c93ec93b, name="ESP", \
uuid=0a5e7d6b-0000-4000-8000-000000000001
start={b}, size={n}, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name="root-x86-64", \
uuid=0a5e7d6b-0000-4000-8000-000000000002
start={c}, size={n}, type=24436126-bb50-47e3-b47b-21dbd57591c7, name="state", \
attrs="GUID:59", uuid=0a5e7d6b-0000-4000-8000-000000000003
"""


def _gpt_image(sector_size: int, entries: int) -> Callable[[Path], bytes | None]:
    def make(tmp: Path) -> bytes | None:
        sectors = 512 if sector_size == 512 else 128
        first = 2 + -(-entries * 128 // sector_size)
        n = (sectors - 2 * first) // 4
        script = _GPT_SCRIPT.format(
            entries=entries, first=first, a=first + 1, b=first + 1 + n, c=first + 1 + 2 * n, n=n
        )
        image = tmp / "disk.img"
        image.write_bytes(bytes(sectors * sector_size))
        argv = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel"]
        if sector_size == 512:
            _sh([*argv, str(image)], script.encode())
            return image.read_bytes()
        if os.geteuid() != 0:
            return None  # as build.py disk: a loop device of that sector size needs root
        loop = _sh(["losetup", "--sector-size", str(sector_size), "--show", "-f", str(image)])
        device = loop.decode().strip()
        try:
            _sh([*argv, device], script.encode())
        finally:
            subprocess.run(["losetup", "-d", device], check=False)
        return image.read_bytes()

    return make


def _gpt_seeds(seed_dir: Path) -> list[bytes]:
    made = [
        _cached(seed_dir, f"gpt-{ss}-{n}.img", _gpt_image(ss, n))
        for ss in (512, 4096)
        for n in (128, 4)
    ]
    return [d for d in made if d is not None]


def _tpm2b(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def _sealed_key(pcr_values: bool) -> Any:
    """A SealedKey shaped like tpm2_create's, with PCR values and events when asked."""
    from pystate_initrd.formats import tcg_eventlog as tl
    from pystate_initrd.formats import tpm2_policy as tp

    events = (
        tp.LoggedEvent(
            tl.EV_EFI_VARIABLE_DRIVER_CONFIG, "SecureBoot", hashlib.sha256(b"1").digest()
        ),
        tp.LoggedEvent(tl.EV_EFI_VARIABLE_DRIVER_CONFIG, "db", hashlib.sha256(b"db").digest()),
        tp.LoggedEvent(tl.EV_SEPARATOR, "", hashlib.sha256(bytes(4)).digest()),
    )
    value = bytes(32)
    for e in events:
        value = hashlib.sha256(value + e.digest).digest()
    policy = tp.policy_pcr_digest("sha256", {7: value, 15: bytes(32)})
    public = _tpm2b(
        struct.pack(">HHI", 0x0008, 0x000B, 0x492)
        + _tpm2b(policy)
        + struct.pack(">H", 0x0010)
        + _tpm2b(bytes(range(32)))
    )
    return tp.SealedKey(
        public=public,
        private=_tpm2b(bytes(range(158))),
        bank="sha256",
        pcrs=(7, 15),
        policy_hash=policy,
        pcr15_zero=True,
        pcr_values=((7, value),) if pcr_values else None,
        pcr_logs=(tp.PcrLog(7, 3, events),) if pcr_values else (),
    )


def _token_json(pcr_values: bool, slot: int = 1) -> bytes:
    from pystate_initrd.formats.token import encode_token_json

    return encode_token_json(_sealed_key(pcr_values), slot).encode()


def _token_seeds(seed_dir: Path) -> list[bytes]:
    return [_token_json(True), _token_json(False)]


def _record_json(retire: int | None) -> bytes:
    from pystate_initrd.formats import reseal_record

    salt = None if retire is None else "c2FsdA=="
    record = reseal_record.ResealRecord(2, _sealed_key(True), retire, salt)
    return reseal_record.encode_record(record).encode()


def _record_seeds(seed_dir: Path) -> list[bytes]:
    return [_record_json(0), _record_json(None)]


def _luks_image(metadata_size: str) -> Callable[[Path], bytes | None]:
    def make(tmp: Path) -> bytes | None:
        image = tmp / "luks.img"
        image.write_bytes(b"")
        os.truncate(image, 20 << 20)
        cryptsetup = ["cryptsetup", "--batch-mode"]
        _sh(
            [
                *cryptsetup,
                "luksFormat",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--uuid",
                "5c8a1f0e-5e33-4c3c-9a0e-8b8f3b5d2a11",
                "--luks2-metadata-size",
                metadata_size,
                "--label",
                "pystate",
                "--key-file=-",
                str(image),
            ],
            bytes(range(32)),
        )
        _sh([*cryptsetup, "token", "import", "--key-slot", "0", str(image)], _token_json(True, 0))
        data = image.read_bytes()
        size = struct.unpack_from(">Q", data, 8)[0]
        return data[: 2 * size]

    return make


def _luks_seeds(seed_dir: Path) -> list[bytes]:
    made = [_cached(seed_dir, f"luks2-{m}.bin", _luks_image(m)) for m in ("16k", "64k")]
    return [d for d in made if d is not None]


def _eventlog_seeds(seed_dir: Path) -> list[bytes]:
    from pystate_initrd.formats import tcg_eventlog as tl

    algs = ((0x0004, 20), (0x000B, 32))

    def ev(pcr: int, kind: int, data: bytes) -> tl.Event:
        digests = tuple(
            (a, hashlib.new("sha1" if s == 20 else "sha256", data).digest()) for a, s in algs
        )
        return tl.Event(pcr, kind, digests, data)

    glob = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
    db = bytes.fromhex("cbb219d73a3d9645a3bcdad00e67656f")
    events = [
        tl.Event(
            0, tl.EV_NO_ACTION, tuple((a, bytes(s)) for a, s in algs), tl.STARTUP_LOCALITY + b"\3"
        ),
        ev(0, 0x80000008, b"\0" * 16),
        ev(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, tl.variable_data(glob, "SecureBoot", b"\1")),
        ev(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, tl.variable_data(db, "db", b"certs")),
        ev(4, tl.EV_EFI_ACTION, b"Calling EFI Application from Boot Option"),
        ev(7, tl.EV_SEPARATOR, bytes(4)),
        ev(4, tl.EV_EFI_BOOT_SERVICES_APPLICATION, bytes(40)),
    ]
    seeds = [tl.encode(algs, events), tl.encode(algs[1:], [])]
    host = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
    with contextlib.suppress(OSError):  # this machine's own firmware log, when it has one
        seeds.append(host.read_bytes())
    return seeds


def _request_seeds(seed_dir: Path) -> list[bytes]:
    from pystate_initrd.formats.shrink_request import ShrinkRequest

    mib = 1 << 20
    req = ShrinkRequest(
        "5c8a1f0e-5e33-4c3c-9a0e-8b8f3b5d2a11", 1024 * mib, 512 * mib, 496 * mib, 512 * mib
    )
    return [json.dumps(req.to_json()).encode(), json.dumps(req.to_json(), indent=1).encode()]


def _config_text() -> str:
    from pystate_initrd.config import FILE_SECTIONS, SETTINGS

    lines = ["# pystate.conf"]
    for section in FILE_SECTIONS:
        lines.append(f"[{section}]")
        for s in SETTINGS:
            if s.section == section and s.key and s.default is not None:
                try:
                    lines.append(f"{s.key} = {s.show(s.default)}  # default")
                except Exception:  # a default show() cannot print: leave it out
                    continue
    lines += ["[layout /etc]", "area = encrypted", "[layout /home]", "area = plain", "seed = no"]
    lines += ["[layout /var/lib/flatpak]", "mode = overlay", "seed = no"]
    return "\n".join(lines) + "\n"


def _config_seeds(seed_dir: Path) -> list[bytes]:
    return [_config_text().encode(), b"[state]\nplain-allowlist = /home /srv\n"]


def _cmdline_seeds(seed_dir: Path) -> list[bytes]:
    from pystate_initrd.config import SETTINGS

    words = [
        "BOOT_IMAGE=/vmlinuz-6.1.0-amd64",
        "root=PARTUUID=0a5e7d6b-0000-4000-8000-000000000002",
    ]
    words += ["ro", "quiet", "console=ttyS0", 'pystate.x="a b"']
    for s in SETTINGS:
        if s.cmdline and s.default is not None:
            try:
                words.append(f"{s.cmdline}={s.show(s.default)}")
            except Exception:
                continue
    return [" ".join(words).encode(), b"pystate=0", b"rd.shell=0 pystate.debug"]


def _escape_seeds(seed_dir: Path) -> list[bytes]:
    names = [
        "var-lib-flatpak",
        "home",
        "usr-local",
        "etc",
        "-",
        "\\x2evar",
        "a\\x2db-c\\xe2\\x82\\xac",
    ]
    return [n.encode() for n in names] + ["/var/lib/a b/ü".encode()]


# -------------------------------------------------------------------- structured (hypothesis)


def _token_strategy() -> Any:
    from hypothesis import strategies as st

    from pystate_initrd.formats import tpm2_policy as tp
    from pystate_initrd.formats.token import encode_token_json

    def build(
        policy: bytes, private: bytes, bank: str, pcrs: set[int], pcr15: bool, slot: int
    ) -> bytes:
        public = _tpm2b(
            struct.pack(">HHI", 0x0008, 0x000B, 0x492) + _tpm2b(policy) + b"\0\x10" + _tpm2b(b"u")
        )
        key = tp.SealedKey(
            public=public,
            private=_tpm2b(private),
            bank=bank,
            pcrs=tuple(sorted(pcrs | ({15} if pcr15 else set()))),
            policy_hash=policy,
            pcr15_zero=pcr15,
        )
        return encode_token_json(key, slot).encode()

    return st.builds(
        build,
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=1, max_size=300),
        st.sampled_from(tp.BANKS),
        st.sets(st.integers(0, 23), min_size=1, max_size=24),
        st.booleans(),
        st.integers(0, 31),
    )


def _eventlog_strategy() -> Any:
    from hypothesis import strategies as st

    from pystate_initrd.formats import tcg_eventlog as tl

    @st.composite
    def logs(draw: Any) -> bytes:
        algs = draw(
            st.sampled_from([((0x000B, 32),), ((0x0004, 20), (0x000B, 32)), ((0x000C, 48),)])
        )
        events = []
        for _ in range(draw(st.integers(0, 12))):
            data = draw(st.binary(max_size=40))
            kind = draw(st.sampled_from([*tl.EVENT_TYPES, 0x12345678]))
            if kind in (tl.EV_EFI_VARIABLE_DRIVER_CONFIG, tl.EV_EFI_VARIABLE_BOOT):
                data = tl.variable_data(data[:16].ljust(16, b"\0"), draw(st.text(max_size=8)), data)
            digests = tuple((a, draw(st.binary(min_size=s, max_size=s))) for a, s in algs)
            events.append(tl.Event(draw(st.integers(0, 23)), kind, digests, data))
        return tl.encode(algs, events)

    return logs()


def _config_strategy() -> Any:
    from hypothesis import strategies as st

    from pystate_initrd.config import FILE_SECTIONS, LAYOUT_KEYS, SETTINGS

    values = st.one_of(
        st.sampled_from(["yes", "no", "0", "1", "7", "7,15", "1G", "10%", "/home", "ext4", "3:1"]),
        st.text(max_size=12),
    )

    @st.composite
    def files(draw: Any) -> bytes:
        lines = []
        for section in draw(st.lists(st.sampled_from(FILE_SECTIONS), max_size=5, unique=True)):
            lines.append(f"[{section}]")
            keys = [s.key for s in SETTINGS if s.section == section and s.key]
            for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
                lines.append(f"{key} = {draw(values)}")
        for target in draw(
            st.lists(st.sampled_from(["/etc", "/var", "/home", "/x y"]), max_size=3)
        ):
            lines.append(f"[layout {target}]")
            for key in draw(st.lists(st.sampled_from([k.key for k in LAYOUT_KEYS]), max_size=3)):
                lines.append(f"{key} = {draw(values)}")
        return "\n".join(lines).encode("utf-8", "surrogateescape")

    return files()


def _cmdline_strategy() -> Any:
    from hypothesis import strategies as st

    from pystate_initrd.config import SETTINGS
    from pystate_initrd.formats.cmdline import format_cmdline

    keys = st.sampled_from([s.cmdline for s in SETTINGS if s.cmdline] + ["pystate.x", "root"])
    pairs = st.lists(
        st.tuples(
            keys,
            st.none()
            | st.text(
                st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=12,
            ),
        ),
        max_size=6,
    )

    def encode(p: list[tuple[str, str | None]]) -> bytes:
        return format_cmdline(p).encode("utf-8", "surrogateescape")

    # Named functions, not lambdas: hypothesis reads a lambda's source, which is fragile.
    return pairs.map(encode)


def _escape_strategy() -> Any:
    from hypothesis import strategies as st

    pieces = ["-", "\\x2d", "\\x2f", "\\x2e", "\\x00", "\\", "x", ".", "a", "ü", "\\xff", "--"]

    def join(p: list[str]) -> bytes:
        return "".join(p).encode()

    return st.lists(st.sampled_from(pieces), max_size=12).map(join)


def _request_strategy() -> Any:
    from hypothesis import strategies as st

    mib = 1 << 20

    def mibs(n: int) -> int:
        return n * mib

    def dump(o: dict[str, Any]) -> bytes:
        return json.dumps({**o, "version": o["version"] % 3}).encode()

    ints = st.integers(0, 4096).map(mibs) | st.integers(-1, 1 << 64)
    keys = ["version", "luks_uuid", "current", "size", "fs_size", "requested"]
    obj = st.fixed_dictionaries(
        {k: ints for k in keys if k != "luks_uuid"}
        | {"luks_uuid": st.sampled_from(["5c8a1f0e-5e33-4c3c-9a0e-8b8f3b5d2a11", "x" * 36])}
    )
    return obj.map(dump)


# ---------------------------------------------------------------------- fix-ups and fields


def _gpt_fixup(d: bytearray) -> None:
    """Recompute the entry-array and header CRCs of every header that looks like one."""
    for ss in (512, 4096):
        total = len(d) // ss
        for lba in {1, total - 1}:
            off = lba * ss
            if lba < 1 or d[off : off + 8] != b"EFI PART" or off + 92 > len(d):
                continue
            hsize = struct.unpack_from("<I", d, off + 12)[0]
            entries, count, esize = struct.unpack_from("<QII", d, off + 72)
            start = entries * ss
            if 0 < count * esize <= 1 << 20 and start + count * esize <= len(d):
                struct.pack_into("<I", d, off + 88, zlib.crc32(d[start : start + count * esize]))
            if 92 <= hsize <= ss and off + hsize <= len(d):
                struct.pack_into("<I", d, off + 16, 0)
                struct.pack_into("<I", d, off + 16, zlib.crc32(d[off : off + hsize]))


def _gpt_fields(data: bytes) -> list[tuple[int, int, str]]:
    fields = []
    for ss in (512, 4096):
        for lba in (1, len(data) // ss - 1):
            off = lba * ss
            if lba >= 1 and data[off : off + 8] == b"EFI PART":
                # revision, header size, my/alternate/first/last LBA, entries LBA, count, size
                fields += [(off + 8, 4, "<"), (off + 12, 4, "<")]
                fields += [(off + o, 8, "<") for o in (24, 32, 40, 48, 72)]
                fields += [(off + 80, 4, "<"), (off + 84, 4, "<")]
                # the first entries' LBAs and attributes
                entries = struct.unpack_from("<Q", data, off + 72)[0] * ss
                for i in range(4):
                    fields += [(entries + 128 * i + o, 8, "<") for o in (32, 40, 48)]
    return [f for f in fields if f[0] + f[1] <= len(data)]


def _luks_fixup(d: bytearray) -> None:
    """Recompute the checksum of both header copies (at every size a secondary may sit)."""
    for offset in (0, *(16384 << i for i in range(9))):
        if offset + 512 > len(d) or d[offset + 1 : offset + 6] not in (
            b"UKS\xba\xbe",
            b"KUL\xba\xbe",
        ):
            continue
        size = struct.unpack_from(">Q", d, offset + 8)[0]
        alg = bytes(d[offset + 136 : offset + 168]).split(b"\0")[0].decode("ascii", "replace")
        if alg not in ("sha1", "sha256", "sha512") or offset + size > len(d) or size < 4096:
            continue
        h = hashlib.new(alg)
        h.update(d[offset : offset + 448])
        h.update(bytes(64))
        h.update(d[offset + 512 : offset + size])
        d[offset + 448 : offset + 448 + h.digest_size] = h.digest()


def _luks_fields(data: bytes) -> list[tuple[int, int, str]]:
    # version, hdr_size, seqid, hdr_offset of both copies
    size = struct.unpack_from(">Q", data, 8)[0] if len(data) >= 16 else 0
    out = []
    for base in (0, size):
        out += [(base + 6, 2, ">"), (base + 8, 8, ">"), (base + 16, 8, ">"), (base + 256, 8, ">")]
    return [f for f in out if f[0] + f[1] <= len(data)]


def _eventlog_fields(data: bytes) -> list[tuple[int, int, str]]:
    # the Spec ID event's size, number of algorithms, their sizes, vendor info size; then
    # the counts and sizes found walking the log as it is
    out = [(28, 4, "<"), (56, 4, "<"), (62, 2, "<"), (66, 2, "<")]
    try:
        from pystate_initrd.formats import tcg_eventlog as tl

        log = tl.parse(data)
        pos = 32 + struct.unpack_from("<I", data, 28)[0]
        for e in log.events[:16]:
            out += [(pos, 4, "<"), (pos + 8, 4, "<")]
            pos += 12 + sum(2 + len(d) for _, d in e.digests)
            out.append((pos, 4, "<"))
            pos += 4 + len(e.data)
    except Exception:
        pass
    return [f for f in out if f[0] + f[1] <= len(data)]


def _eventlog_units(data: bytes) -> list[tuple[int, int]]:
    """The byte spans of the seed's events (whole records, for the repeat mutation)."""
    starts = [f[0] for f in _eventlog_fields(data)[4:]][::3]
    return [(a, b) for a, b in itertools.pairwise([*starts, len(data)]) if a < b]


def _eventlog_limits() -> list[bytes]:
    """Logs at and past MAX_EVENTS: every event on PCR 0 (whose start depends on a
    StartupLocality event anywhere in the log), or on PCR 7, in one and in three banks."""
    from pystate_initrd.formats import tcg_eventlog as tl

    out = []
    for algs in (((0x000B, 32),), ((0x0004, 20), (0x000B, 32), (0x000C, 48))):
        for pcr, count in ((0, tl.MAX_EVENTS), (7, tl.MAX_EVENTS), (0, tl.MAX_EVENTS + 1)):
            digests = tuple((a, bytes([pcr + 1]) * s) for a, s in algs)
            out.append(tl.encode(algs, [tl.Event(pcr, tl.EV_SEPARATOR, digests, b"")] * count))
    return out


def _gpt_limits() -> list[bytes]:
    """GPTs with the largest entry array (1 MiB: 8192 entries), every entry a partition."""
    from pystate_initrd.formats import gpt

    out = []
    for ss in gpt.SECTOR_SIZES:
        count = gpt.MAX_ARRAY_BYTES // 128
        array_lbas = gpt.MAX_ARRAY_BYTES // ss
        first = 2 + array_lbas
        total = first + count + array_lbas + 1
        last = first + count - 1
        d = bytearray(total * ss)
        d[446 + 4] = 0xEE
        d[510:512] = b"\x55\xaa"
        kind = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le
        entries = b"".join(
            struct.pack(
                "<16s16sQQQ72s",
                kind,
                i.to_bytes(16, "little"),
                first + i,
                first + i,
                0,
                "p".encode("utf-16-le"),
            )
            for i in range(count)
        )
        for my, alt, at in ((1, total - 1, 2), (total - 1, 1, total - 1 - array_lbas)):
            d[at * ss : at * ss + len(entries)] = entries
            struct.pack_into(
                "<8sIIIIQQQQ16sQII",
                d,
                my * ss,
                b"EFI PART",
                0x10000,
                92,
                0,
                0,
                my,
                alt,
                first,
                last,
                bytes(16),
                at,
                count,
                128,
            )
        _gpt_fixup(d)
        out.append(bytes(d))
    return out


def _json_limits(limit: int) -> Callable[[], list[bytes]]:
    def make() -> list[bytes]:
        return [
            b"[" * limit,
            b" " * (limit - 2) + b"{}",
            b'{"a":"' + b"x" * (limit - 8) + b'"}',
            b"1" * limit,
            b"[" * (limit + 1),
        ]

    return make


def _text_limits(limit: int, unit: bytes) -> Callable[[], list[bytes]]:
    def make() -> list[bytes]:
        return [unit * (limit // len(unit)), unit * (limit // len(unit) + 1), b"\x41" * limit]

    return make


def _config_limits() -> list[bytes]:
    """Files at MAX_CONF_SIZE: distinct layout sections, comments, one long value; and past."""
    from pystate_initrd.config import MAX_CONF_SIZE

    sections = b"".join(b"[layout /var/e%d]\nseed = no\n" % i for i in range(60000))
    return [
        sections[: sections.rindex(b"[", 0, MAX_CONF_SIZE)],
        b"# comment\n" * (MAX_CONF_SIZE // 10),
        b"[state]\nplain-allowlist = " + b"/home " * (MAX_CONF_SIZE // 6 - 10) + b"\n",
        b"\n" * (MAX_CONF_SIZE + 1),
    ]


_JSON_WORDS = (
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\u0000",
    b"\\ud800",
    b"NaN",
    b"-0",
    b"1e999",
    b"9" * 5000,
    b"[" * 2000,
    b"null",
    b"true",
    b'"pystate-tpm2"',
    b'"keyslots"',
    b"\xff",
)
TARGETS: dict[str, Target] = {}


def _register_targets() -> None:
    from pystate_initrd.config import ConfigError
    from pystate_initrd.formats.cmdline import CmdlineError
    from pystate_initrd.formats.escape import EscapeError
    from pystate_initrd.formats.gpt import GptError
    from pystate_initrd.formats.luks2 import LuksError
    from pystate_initrd.formats.shrink_request import RequestError
    from pystate_initrd.formats.tcg_eventlog import EventLogError
    from pystate_initrd.formats.token import TokenError

    for t in (
        Target(
            "gpt",
            _gpt_run,
            (GptError,),
            _gpt_seeds,
            None,
            _gpt_fixup,
            _gpt_fields,
            limits=_gpt_limits,
        ),
        Target(
            "luks2",
            _luks_run,
            (LuksError, TokenError),
            _luks_seeds,
            None,
            _luks_fixup,
            _luks_fields,
            _JSON_WORDS,
            json=True,
        ),
        Target(
            "token",
            _token_run,
            (TokenError,),
            _token_seeds,
            _token_strategy,
            words=_JSON_WORDS,
            json=True,
            limits=_json_limits(64 * 1024),
        ),
        Target(
            "reseal-record",
            _record_run,
            (TokenError,),
            _record_seeds,
            None,
            words=_JSON_WORDS,
            json=True,
            limits=_json_limits(64 * 1024),
        ),
        Target(
            "eventlog",
            _eventlog_run,
            (EventLogError,),
            _eventlog_seeds,
            _eventlog_strategy,
            fields=_eventlog_fields,
            units=_eventlog_units,
            limits=_eventlog_limits,
        ),
        Target(
            "shrink-request",
            _request_run,
            (RequestError,),
            _request_seeds,
            _request_strategy,
            words=_JSON_WORDS,
            json=True,
            limits=_json_limits(4096),
        ),
        Target(
            "config",
            _config_run,
            (ConfigError,),
            _config_seeds,
            _config_strategy,
            limits=_config_limits,
            words=(
                b"[",
                b"]",
                b"=",
                b"\n",
                b"#",
                b";",
                b" ",
                b"%",
                b"[layout ",
                b"[state]",
                b"\r",
                "\x85".encode(),
                "\u2028".encode(),
                b"\xff",
                b"\0",
            ),
        ),
        Target(
            "cmdline",
            _cmdline_run,
            (CmdlineError, ConfigError),
            _cmdline_seeds,
            _cmdline_strategy,
            limits=_text_limits(64 * 1024, b"pystate.tpm2-pcrs=7 "),
            words=(
                b'"',
                b"'",
                b"=",
                b" ",
                b"\t",
                b"\n",
                b"pystate.",
                b"pystate=",
                b"\0",
                b"\xff",
                b"_",
                b"-",
                b"1",
                b"no",
            ),
        ),
        Target(
            "escape",
            _escape_run,
            (EscapeError,),
            _escape_seeds,
            _escape_strategy,
            limits=_text_limits(4096, b"a-"),
            words=(b"-", b"\\x", b"\\x2f", b"\\x00", b"/", b".", b"..", b"\xff", b"\0", b"a" * 256),
        ),
    ):
        TARGETS[t.name] = t


# ------------------------------------------------------------------------------ mutation

_INTERESTING = (
    0,
    1,
    2,
    3,
    4,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    1 << 63,
    (1 << 64) - 1,
)
_JSON_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1 << 64,
    10**400,
    1.5,
    1e308,
    "",
    "0",
    "00",
    "31",
    "32",
    "-1",
    "x" * 4096,
    "\ud800",
    "é",
    [],
    [None],
    ["0", "1"],
    {},
    {"a": {}},
    [[[[[[[[]]]]]]]],
)


def _interesting(rng: random.Random, size: int, data_len: int) -> int:
    value = rng.choice(
        (*_INTERESTING, data_len, data_len // 512, data_len // 4096, rng.getrandbits(8 * size))
    )
    return value % (1 << (8 * size))


def _json_edit(rng: random.Random, obj: Any, depth: int = 0) -> Any:
    """A copy of a JSON value with one random edit somewhere inside."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        key = rng.choice(list(obj))
        new = dict(obj)
        roll = rng.random()
        if roll < 0.15:
            del new[key]
        elif roll < 0.25:
            new[rng.choice((key + "x", "0", "31", "32", "type", "keyslots", ""))] = rng.choice(
                _JSON_VALUES
            )
        else:
            new[key] = _json_edit(rng, obj[key], depth + 1)
        return new
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        i = rng.randrange(len(obj))
        new_list = list(obj)
        roll = rng.random()
        if roll < 0.15:
            del new_list[i]
        elif roll < 0.3:
            new_list.append(rng.choice(_JSON_VALUES) if rng.random() < 0.5 else obj[i])
        else:
            new_list[i] = _json_edit(rng, obj[i], depth + 1)
        return new_list
    if isinstance(obj, int) and not isinstance(obj, bool) and rng.random() < 0.5:
        return obj + rng.choice((-1, 1, 1 << 32, -obj - 1))
    if isinstance(obj, str) and obj and rng.random() < 0.5:
        i = rng.randrange(len(obj))
        return obj[:i] + rng.choice(("", "0", "\0", "é", "-", obj[i] * 2)) + obj[i + 1 :]
    return rng.choice(_JSON_VALUES)


def _json_mutate(rng: random.Random, data: bytearray) -> bytearray:
    """Edit a value of the JSON in data (a whole JSON text, or a LUKS2 header's JSON area)."""
    luks = data[:6] == b"LUKS\xba\xbe"
    start = 4096 if luks else 0
    size = struct.unpack_from(">Q", data, 8)[0] if luks else len(data)
    if not start < size <= len(data):
        return data
    area = bytes(data[start:size]).split(b"\0", 1)[0]
    try:
        obj = json.loads(area)
    except (ValueError, RecursionError):
        return data
    text = json.dumps(_json_edit(rng, obj), ensure_ascii=rng.random() < 0.5).encode(
        "utf-8", "surrogatepass"
    )
    if not luks:
        return bytearray(text)
    if len(text) > size - start:
        return data
    data[start:size] = text.ljust(size - start, b"\0")
    if size + 4096 <= len(data) and data[size : size + 6] == b"SKUL\xba\xbe" and rng.random() < 0.7:
        data[size + start : 2 * size] = data[start:size]  # the same JSON in the secondary
    return data


_Shape = tuple[list[tuple[int, int, str]], list[int], list[tuple[int, int]]]
_SHAPES: dict[int, tuple[bytes, _Shape]] = {}
GROW_LIMIT = 4 << 20  # the repeat mutation stops at this size


def _shape(target: Target, seed: bytes) -> _Shape:
    """The seed's editable fields, non-zero 512-byte blocks and repeatable records (cached
    per seed object)."""
    cached = _SHAPES.get(id(seed))
    if cached is None or cached[0] is not seed:
        fields = target.fields(seed) if target.fields else []
        hot = [o for o in range(0, len(seed), 512) if seed[o : o + 512].strip(b"\0")]
        if len(seed) <= 4096:
            hot = []  # small inputs: every offset is as good
        units = target.units(seed) if target.units else []
        cached = (seed, (fields, hot, units))
        _SHAPES[id(seed)] = cached
    return cached[1]


def mutate(rng: random.Random, target: Target, seed: bytes, pool: Sequence[bytes]) -> bytes:
    """One to four stacked mutations of seed, then (mostly) the target's checksum fix-up."""
    d = bytearray(seed)
    fields, hot, units = _shape(target, seed)

    def pick(n: int) -> int:
        """An offset: mostly inside the seed's non-zero 512-byte blocks (its structures)."""
        if hot and rng.random() < 0.9:
            i = rng.choice(hot) + rng.randrange(512)
            if i < n:
                return i
        return rng.randrange(n)

    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        n = len(d)
        op = rng.randrange(11) if rng.random() > 0.02 else 11
        if op == 0 and n:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = pick(n)
                d[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # an interesting byte or word at a random offset
            size = rng.choice((1, 2, 4, 8))
            i = pick(n)
            value = _interesting(rng, size, n)
            d[i : i + size] = value.to_bytes(size, rng.choice(("little", "big")))
        elif op == 2 and fields:  # a length, count, offset or LBA field edited
            off, size, endian = rng.choice(fields)
            old = int.from_bytes(d[off : off + size], "little" if endian == "<" else "big")
            value = (
                old + rng.choice((-1, 1, -2, 2, 8, 128))
                if rng.random() < 0.4
                else _interesting(rng, size, n)
            )
            value %= 1 << (8 * size)
            d[off : off + size] = value.to_bytes(size, "little" if endian == "<" else "big")
        elif op == 3:  # truncation
            d = (
                d[: rng.randrange(n + 1)]
                if rng.random() < 0.7
                else d[: max(0, n - rng.randint(1, 64))]
            )
        elif op == 4:  # extension
            d += (
                bytes(rng.randint(1, 4096))
                if rng.random() < 0.5
                else rng.randbytes(rng.randint(1, 64))
            )
        elif op == 5 and pool:  # splice with another seed
            other = rng.choice(pool)
            a, b = sorted(rng.randrange(len(other) + 1) for _ in range(2))
            i = pick(n + 1)
            d[i : i + (b - a) * rng.randint(0, 1)] = other[a:b]
        elif op == 6 and n:  # random bytes over a range
            i = pick(n)
            d[i : i + rng.randint(1, 16)] = rng.randbytes(rng.randint(1, 16))
        elif op == 7 and n:  # delete or duplicate a range
            a = pick(n)
            b = min(n, a + rng.randint(1, 64))
            d[a:b] = d[a:b] * 2 if rng.random() < 0.5 else b""
        elif op == 8 and target.words:  # a dictionary word inserted or written over
            i = pick(n + 1)
            word = rng.choice(target.words)
            d[i : i + len(word) * rng.randint(0, 1)] = word
        elif (
            op in (9, 10) and target.json
        ):  # JSON value edits (token, LUKS2 JSON area, shrink request)
            d = _json_mutate(rng, d)
        elif op == 11 and n:  # a record or a short range repeated: size and count limits
            if units and len(d) == len(seed):
                a, b = rng.choice(units)
            else:
                a = pick(n)
                b = min(n, a + rng.randint(1, 16))
            times = rng.choice((2, 16, 256, 2048, 20000))
            times = max(1, min(times, (GROW_LIMIT - n) // max(b - a, 1)))
            d[a:b] = d[a:b] * times
    if target.fixup and rng.random() < 0.85:
        target.fixup(d)
    return bytes(d)


def hypothesis_pool(target: Target, count: int, seed: int) -> list[bytes]:
    """count structured inputs drawn from the target's strategy, repeatably for a seed."""
    if target.strategy is None or count <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn: list[bytes] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(target.strategy())
    def collect(value: bytes) -> None:
        drawn.append(value)

    collect()
    return drawn[:count]


def inputs(
    target: Target, n: int, seed: int, real: Sequence[bytes], pool: Sequence[bytes]
) -> Iterator[bytes]:
    """n inputs: the real seeds, the target's inputs at its size limits and hypothesis'
    structured inputs (pool) as they are, then mutants of the seeds and the pool."""
    rng = random.Random(f"{seed}:{target.name}")
    everything = [*real, *pool]
    first = [*real, *(target.limits() if target.limits else ()), *pool]
    for i in range(n):
        if i < len(first):
            yield first[i]
        elif pool and rng.random() < 0.1:
            yield rng.choice(pool)
        else:
            base = (
                rng.choice(real) if real and (not pool or rng.random() < 0.7) else rng.choice(pool)
            )
            yield mutate(rng, target, base, everything)


# --------------------------------------------------------------------------------- running


@dataclass
class Bug:
    parser: str
    kind: str  # "exception", "hang" or "memory"
    detail: str
    where: str  # the innermost frame, for grouping
    input: str  # the file it was saved to


@dataclass
class Outcome:
    parser: str
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    bugs: int = 0
    seconds: float = 0.0  # generating (mutating) and running the inputs
    inputs_per_second: float = 0.0
    pool_seconds: float = 0.0  # drawing the hypothesis inputs, before
    found: list[Bug] = field(default_factory=list)


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang


@contextlib.contextmanager
def bounds() -> Iterator[None]:
    """The SIGALRM/SIGPROF handlers and tracemalloc that run_one needs, unless already set
    up (by an enclosing campaign); restored afterwards."""
    if signal.getsignal(signal.SIGALRM) is _on_alarm:
        yield
        return
    old_alarm = signal.signal(signal.SIGALRM, _on_alarm)
    old_prof = signal.signal(signal.SIGPROF, _on_alarm)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start(1)
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGPROF, old_prof)


TRACED_SLACK = 10  # tracemalloc slows allocation-heavy parsers: the traced run's wall limit


def _timed(
    run: Callable[[bytes], object], data: bytes, which: int, bound: float
) -> tuple[BaseException | None, float]:
    """run(data) under an interval timer; (what it raised, CPU seconds)."""
    began = time.process_time()
    try:
        signal.setitimer(which, bound)
        try:
            run(data)
        finally:
            signal.setitimer(which, 0)
    except Exception as exc:
        return exc, time.process_time() - began
    except Hang as exc:
        return exc, time.process_time() - began
    return None, time.process_time() - began


def run_one(
    run: Callable[[bytes], object],
    errors: tuple[type[BaseException], ...],
    data: bytes,
    *,
    time_bound: float = TIME_BOUND,
    memory_bound: int = MEMORY_BOUND,
) -> tuple[str, str, str]:
    """(kind, detail, where): kind "accepted" or "refused" (one of errors raised) within
    the bounds, else the bug: "exception", "hang" or "memory".

    The run is traced (tracemalloc: the memory bound) with a generous wall-clock limit;
    one that takes longer than time_bound is run again untraced, and is a hang when it
    needs more than time_bound seconds of CPU there too (SIGPROF), so neither tracing
    nor a loaded machine makes a hang of a slow but bounded parse.
    """
    with bounds():
        return _run_one(run, errors, data, time_bound, memory_bound)


def _run_one(
    run: Callable[[bytes], object],
    errors: tuple[type[BaseException], ...],
    data: bytes,
    time_bound: float,
    memory_bound: int,
) -> tuple[str, str, str]:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    began = time.monotonic()
    exc, _ = _timed(run, data, signal.ITIMER_REAL, time_bound * TRACED_SLACK)
    elapsed = time.monotonic() - began
    peak = tracemalloc.get_traced_memory()[1] - base
    if isinstance(exc, Hang) or elapsed > time_bound:
        tracemalloc.stop()
        try:
            exc, cpu = _timed(run, data, signal.ITIMER_PROF, time_bound)
        finally:
            tracemalloc.start(1)
        if isinstance(exc, Hang):
            return ("hang", f"no result after {time_bound} s of CPU", _where(exc))
        if cpu > time_bound:  # stuck in C code, where no signal lands
            return ("hang", f"{cpu:.2f} s of CPU (bound {time_bound} s)", "")
    if exc is not None and not isinstance(exc, errors):
        lines = traceback.format_exception_only(exc)
        return ("exception", lines[-1].strip()[:500], _where(exc))
    if peak > memory_bound:
        return ("memory", f"peak {peak >> 20} MiB traced (bound {memory_bound >> 20} MiB)", "")
    return ("refused" if exc is not None else "accepted", "", "")


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, Hang):
        frames = frames[:-1]  # the innermost is the signal handler: where the parser was
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def campaign(
    target: Target,
    n: int,
    seed: int,
    real: Sequence[bytes],
    *,
    out: Path = FUZZ_OUT,
    time_bound: float = TIME_BOUND,
    memory_bound: int = MEMORY_BOUND,
    report: Callable[[str], None] = print,
) -> Outcome:
    """Run n inputs of target; a bug's input is saved under out/ and reported once per place."""
    result = Outcome(target.name)
    seen: set[tuple[str, str]] = set()
    began = time.monotonic()
    pool = hypothesis_pool(target, min(HYPOTHESIS_POOL, max(n // 5, 1)), seed)
    result.pool_seconds = round(time.monotonic() - began, 3)
    began = time.monotonic()
    with bounds():
        for data in inputs(target, n, seed, real, pool):
            result.inputs += 1
            kind, detail, where = run_one(
                target.run, target.errors, data, time_bound=time_bound, memory_bound=memory_bound
            )
            if kind == "accepted":
                result.accepted += 1
                continue
            if kind == "refused":
                result.refused += 1
                continue
            result.bugs += 1
            name = f"{target.name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
            bug = Bug(target.name, kind, detail, where, str(out / name))
            if (kind, where or detail) not in seen:
                seen.add((kind, where or detail))
                result.found.append(bug)
                report(f"fuzz: BUG {target.name}: {kind}: {detail} [{where}] input {out / name}")
    result.seconds = round(time.monotonic() - began, 3)
    result.inputs_per_second = round(result.inputs / result.seconds, 1) if result.seconds else 0.0
    return result


# ------------------------------------------------------------------------------ command


def fuzz(
    names: Sequence[str],
    n: int,
    seed: int,
    *,
    out: Path = FUZZ_OUT,
    seed_dir: Path | None = None,
    report: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run each named parser's campaign; bugs' inputs go to out, real seeds are made once
    into seed_dir (out/seeds)."""
    if not TARGETS:
        _register_targets()
    outcomes = []
    for name in names:
        target = TARGETS[name]
        real = target.seeds(seed_dir or out / "seeds")
        outcome = campaign(target, n, seed, real, out=out, report=report)
        report(
            f"fuzz: {name}: {outcome.inputs} inputs, {outcome.accepted} accepted, "
            f"{outcome.refused} refused, {outcome.bugs} bugs, {outcome.inputs_per_second}/s"
        )
        outcomes.append(outcome)
    return outcomes


def table(outcomes: Sequence[Outcome]) -> str:
    head = ("parser", "inputs", "accepted", "refused", "bugs", "inputs/s", "seconds")
    rows = [head] + [
        (
            o.parser,
            str(o.inputs),
            str(o.accepted),
            str(o.refused),
            str(o.bugs),
            f"{o.inputs_per_second:.0f}",
            f"{o.seconds:.1f}",
        )
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def _cmd_fuzz(args: argparse.Namespace) -> int:
    _register_targets()
    names = args.only or list(TARGETS)
    for name in names:
        if name not in TARGETS:
            print(
                f"build.py fuzz: unknown parser {name!r}; parsers: {', '.join(TARGETS)}",
                file=sys.stderr,
            )
            return 2
    began = time.monotonic()
    outcomes = fuzz(names, args.inputs, args.seed, out=args.out)
    print(table(outcomes))
    seconds = round(time.monotonic() - began, 1)
    print(f"fuzz: seed {args.seed}, {args.inputs} inputs per parser, {seconds} s")
    if args.json:
        doc = {
            "seed": args.seed,
            "inputs": args.inputs,
            "seconds": seconds,
            "time_bound": TIME_BOUND,
            "memory_bound": MEMORY_BOUND,
            "parsers": [asdict(o) for o in outcomes],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any(o.bugs for o in outcomes) else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "fuzz",
        help="fuzz every parser of untrusted input (mutated sfdisk/cryptsetup seeds, hypothesis)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--inputs", type=int, default=100_000, help="inputs per parser (10^5)")
    p.add_argument("--seed", type=int, default=0, help="the campaign's seed (0)")
    p.add_argument(
        "--only",
        action="append",
        metavar="PARSER",
        help="only this parser (repeatable): gpt, luks2, token, reseal-record, eventlog, "
        "shrink-request, config, cmdline, escape",
    )
    p.add_argument("--json", metavar="FILE", help="write the outcome as JSON")
    p.add_argument("--out", type=Path, default=FUZZ_OUT, help="bugs' inputs and seeds (out/fuzz)")
    p.set_defaults(func=_cmd_fuzz)
