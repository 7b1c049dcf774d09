"""The firmware's TCG event log, crypto-agile format (TCG PC Client PFP spec §10), pure.

What the kernel shows as /sys/kernel/security/tpm0/binary_bios_measurements: one
TCG_PCClientPCREvent in the SHA1 format whose event is the "Spec ID Event03" structure
(the algorithms of the log and their digest sizes), then TCG_PCR_EVENT2 records:

    pcrIndex u32 | eventType u32 | count u32 | count x (algId u16, digest) | eventSize u32 | event

all little-endian. ``parse`` reads it, ``replay`` computes the PCR values it describes,
``event_name`` names an event (a UEFI variable's name, an action's text), ``encode``
writes a log (for tests). The log comes from the kernel, but it is read defensively:
sizes are capped, work is linear in the input, and anything malformed is an
``EventLogError`` saying what and where, never another exception.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import tpm2_policy

MAX_LOG_BYTES = 8 * 1024 * 1024  # real logs are 10-100 KiB; the ACPI area is at most a few MiB
# Real logs hold a few hundred events; a log at this cap is parsed, replayed and summarized
# for every bank in well under a second (build.py fuzz's bound: 65536 took over 2 s).
MAX_EVENTS = 16384
MAX_ALGORITHMS = 16
MAX_DIGEST = 64  # sha512
MAX_NAME = 64  # characters of an event's name kept
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY = b"StartupLocality\0"
PCR_COUNT = tpm2_policy.PCR_COUNT

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_ACTION = 0x00000005
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

EVENT_TYPES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    EV_NO_ACTION: "EV_NO_ACTION",
    EV_SEPARATOR: "EV_SEPARATOR",
    EV_ACTION: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    EV_EFI_VARIABLE_DRIVER_CONFIG: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    EV_EFI_VARIABLE_BOOT: "EV_EFI_VARIABLE_BOOT",
    EV_EFI_BOOT_SERVICES_APPLICATION: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    EV_EFI_ACTION: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    EV_EFI_PLATFORM_FIRMWARE_BLOB2: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    EV_EFI_HANDOFF_TABLES2: "EV_EFI_HANDOFF_TABLES2",
    EV_EFI_VARIABLE_BOOT2: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    EV_EFI_VARIABLE_AUTHORITY: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
_TYPES_BY_NAME = {name: value for value, name in EVENT_TYPES.items()}
_VARIABLE_EVENTS = {
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_BOOT2,
    EV_EFI_VARIABLE_AUTHORITY,
}
_TEXT_EVENTS = {EV_ACTION, EV_EFI_ACTION}
_DESCRIBED_EVENTS = {EV_EFI_PLATFORM_FIRMWARE_BLOB2, EV_EFI_HANDOFF_TABLES2}


class EventLogError(PystateError):
    """The event log is not a well-formed crypto-agile TCG log."""


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2: the digests by TPM_ALG_ID, in log order."""

    pcr: int
    type: int
    digests: tuple[tuple[int, bytes], ...]
    data: bytes

    def digest(self, alg: int) -> bytes | None:
        return next((d for a, d in self.digests if a == alg), None)


@dataclass(frozen=True)
class EventLog:
    """The algorithms (TPM_ALG_ID, digest size) the Spec ID event announces, and the events
    after it."""

    algorithms: tuple[tuple[int, int], ...]
    events: tuple[Event, ...]


def event_type_name(kind: int) -> str:
    """`EV_SEPARATOR`; an unknown type as `0x8000abcd`."""
    return EVENT_TYPES.get(kind, f"{kind:#010x}")


def event_type_from_name(name: str) -> int | None:
    """The inverse of event_type_name; None for anything it would not produce."""
    if name in _TYPES_BY_NAME:
        return _TYPES_BY_NAME[name]
    if len(name) == 10 and name.startswith("0x") and all(c in "0123456789abcdef" for c in name[2:]):
        value = int(name, 16)
        return value if value not in EVENT_TYPES else None
    return None


# ------------------------------------------------------------------------------ parsing


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise EventLogError(
                f"event log truncated at byte {self.pos}: {what} needs {n} bytes, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def _spec_id(event: bytes) -> tuple[tuple[int, int], ...]:
    r = _Reader(event)
    if r.take(16, "the Spec ID signature") != SPEC_ID_SIGNATURE:
        raise EventLogError("event log is not crypto-agile: no 'Spec ID Event03' first event")
    r.u32("platformClass")
    r.take(4, "spec version, errata, uintnSize")
    count = r.u32("numberOfAlgorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise EventLogError(f"Spec ID event lists {count} algorithms (1-{MAX_ALGORITHMS})")
    algorithms: list[tuple[int, int]] = []
    for _ in range(count):
        alg, size = r.u16("an algorithm id"), r.u16("a digest size")
        if any(a == alg for a, _ in algorithms):
            raise EventLogError(f"Spec ID event lists algorithm {alg:#06x} twice")
        bank = tpm2_policy.bank_of_alg(alg)
        if bank is not None and size != tpm2_policy.bank_digest_size(bank):
            raise EventLogError(f"Spec ID event gives {bank} digests {size} bytes")
        if not 1 <= size <= MAX_DIGEST:
            raise EventLogError(f"Spec ID event gives algorithm {alg:#06x} {size}-byte digests")
        algorithms.append((alg, size))
    r.take(r.u8("vendorInfoSize"), "vendorInfo")
    return tuple(algorithms)


_EVENT_HEAD = struct.Struct("<III")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _fast_event(
    data: bytes, pos: int, sizes: dict[int, int], algorithms: int
) -> tuple[Event, int] | None:
    """The well-formed event at pos and the position after it, or None for the checked
    path (a maximal log is parsed in a fraction of a second, not seconds)."""
    end = len(data)
    if pos + 12 > end:
        return None
    pcr, kind, count = _EVENT_HEAD.unpack_from(data, pos)
    if pcr >= PCR_COUNT or count > algorithms:
        return None
    pos += 12
    digests: list[tuple[int, bytes]] = []
    for _ in range(count):
        if pos + 2 > end:
            return None
        (alg,) = _U16.unpack_from(data, pos)
        size = sizes.get(alg)
        if size is None or pos + 2 + size > end or any(a == alg for a, _ in digests):
            return None
        digests.append((alg, data[pos + 2 : pos + 2 + size]))
        pos += 2 + size
    if pos + 4 > end:
        return None
    (length,) = _U32.unpack_from(data, pos)
    pos += 4
    if pos + length > end:
        return None
    return Event(pcr, kind, tuple(digests), data[pos : pos + length]), pos + length


def parse(data: bytes | bytearray | memoryview) -> EventLog:
    """The events of a crypto-agile log; EventLogError for anything else."""
    if len(data) > MAX_LOG_BYTES:
        raise EventLogError(f"event log of {len(data)} bytes exceeds {MAX_LOG_BYTES} bytes")
    r = _Reader(bytes(data))
    if not r.data:
        raise EventLogError("event log is empty")
    r.u32("the first event's PCR index")
    if r.u32("the first event's type") != EV_NO_ACTION:
        raise EventLogError("event log does not start with the Spec ID event (EV_NO_ACTION)")
    r.take(20, "the first event's SHA1 digest")
    algorithms = _spec_id(r.take(r.u32("the Spec ID event's size"), "the Spec ID event"))
    sizes = dict(algorithms)
    events: list[Event] = []
    data_ = r.data
    end = len(data_)
    while r.pos < end:
        if len(events) >= MAX_EVENTS:
            raise EventLogError(f"event log has more than {MAX_EVENTS} events")
        start = r.pos
        fast = _fast_event(data_, start, sizes, len(algorithms))
        if fast is not None:
            event, r.pos = fast
            events.append(event)
            continue
        # Anything short or odd: the checked reader below, which says what is wrong.
        pcr = r.u32("a PCR index")
        if pcr >= PCR_COUNT:
            raise EventLogError(f"event at byte {start} is for PCR {pcr} (0-{PCR_COUNT - 1})")
        kind = r.u32("an event type")
        count = r.u32("a digest count")
        if count > len(algorithms):
            raise EventLogError(
                f"event at byte {start} has {count} digests, the log has {len(algorithms)} "
                "algorithms"
            )
        digests: list[tuple[int, bytes]] = []
        for _ in range(count):
            alg = r.u16("an algorithm id")
            if alg not in sizes:
                raise EventLogError(
                    f"event at byte {start} has a digest of algorithm {alg:#06x}, "
                    "which the Spec ID event does not list"
                )
            if any(a == alg for a, _ in digests):
                raise EventLogError(f"event at byte {start} has two {alg:#06x} digests")
            digests.append((alg, r.take(sizes[alg], "a digest")))
        event_data = r.take(r.u32("an event size"), "the event data")
        events.append(Event(pcr, kind, tuple(digests), event_data))
    return EventLog(algorithms, tuple(events))


# ----------------------------------------------------------------------- reading events


def _clean(text: str) -> str:
    text = text.rstrip("\0")
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    return text if len(text) <= MAX_NAME else text[: MAX_NAME - 3] + "..."


def variable_name(data: bytes) -> str | None:
    """The UnicodeName of a UEFI_VARIABLE_DATA (GUID, name length u64, data length u64,
    UTF-16LE name, data); None if data is not one."""
    if len(data) < 32:
        return None
    name_len = int.from_bytes(data[16:24], "little")
    data_len = int.from_bytes(data[24:32], "little")
    if name_len > 1024 or 32 + 2 * name_len + data_len != len(data):
        return None
    try:
        return _clean(data[32 : 32 + 2 * name_len].decode("utf-16-le"))
    except UnicodeDecodeError:
        return None


def event_name(event: Event) -> str:
    """What a person knows the event by: `db`, `SecureBoot`, an action's text; or ""."""
    if event.type in _VARIABLE_EVENTS:
        return variable_name(event.data) or ""
    if event.type in _TEXT_EVENTS:
        return _clean(event.data.decode("ascii", errors="replace"))
    if event.type in _DESCRIBED_EVENTS and event.data:
        size = event.data[0]
        if 1 + size <= len(event.data):
            return _clean(event.data[1 : 1 + size].decode("ascii", errors="replace"))
    return ""


def describe(kind: int, name: str) -> str:
    """`EV_EFI_VARIABLE_DRIVER_CONFIG "db"`, or the type alone when the event has no name."""
    return f'{event_type_name(kind)} "{name}"' if name else event_type_name(kind)


def _startup_locality(event: Event) -> int | None:
    if (
        event.type == EV_NO_ACTION
        and event.pcr == 0
        and event.data.startswith(STARTUP_LOCALITY)
        and len(event.data) == len(STARTUP_LOCALITY) + 1
    ):
        return event.data[-1]
    return None


def extended(log: EventLog, pcr: int) -> list[Event]:
    """The events that were extended into `pcr` (every event but EV_NO_ACTION), in order."""
    return [e for e in log.events if e.pcr == pcr and e.type != EV_NO_ACTION]


def initial_value(log: EventLog, bank: str, pcr: int) -> bytes:
    """A PCR's value before its first event: zero, but PCR 0 starts at the startup
    locality (3 or 4) when the log has a StartupLocality event."""
    size = tpm2_policy.bank_digest_size(bank)
    if pcr == 0:
        for e in log.events:
            locality = _startup_locality(e)
            if locality is not None:
                return bytes(size - 1) + bytes([locality])
    return bytes(size)


def replay(log: EventLog, bank: str) -> dict[int, bytes]:
    """The value of every PCR the log has events for, in `bank`, as the TPM should hold it."""
    alg = tpm2_policy.bank_alg_id(bank)
    if all(a != alg for a, _ in log.algorithms):
        raise EventLogError(f"event log has no {bank} digests")
    # Once, not per event: PCR 0's start scans the whole log (found by build.py fuzz: a
    # log of 8000 PCR 0 events took seconds, 65536 minutes).
    zero = bytes(tpm2_policy.bank_digest_size(bank))
    start0 = initial_value(log, bank, 0)
    values: dict[int, bytes] = {}
    for i, e in enumerate(log.events):
        if e.pcr == 0 and _startup_locality(e) is not None:
            values.setdefault(0, start0)
        if e.type == EV_NO_ACTION:
            continue
        digest = e.digest(alg)
        if digest is None:
            raise EventLogError(
                f"event {i + 1} ({event_type_name(e.type)}, PCR {e.pcr}) has no {bank} digest"
            )
        old = values.get(e.pcr) or (start0 if e.pcr == 0 else zero)
        values[e.pcr] = tpm2_policy.extend_value(bank, old, digest)
    return values


# ----------------------------------------------------------------------------- encoding


def variable_data(guid: bytes, name: str, data: bytes) -> bytes:
    """A UEFI_VARIABLE_DATA, as firmware measures a variable."""
    if len(guid) != 16:
        raise EventLogError("a variable GUID has 16 bytes")
    raw = name.encode("utf-16-le")
    return guid + struct.pack("<QQ", len(raw) // 2, len(data)) + raw + data


def encode(algorithms: Sequence[tuple[int, int]], events: Sequence[Event]) -> bytes:
    """A crypto-agile log: the Spec ID event for `algorithms`, then `events` (tests)."""
    spec = (
        SPEC_ID_SIGNATURE
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
        + b"".join(struct.pack("<HH", a, s) for a, s in algorithms)
        + b"\0"
    )
    out = bytearray(struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)))
    out += spec
    for e in events:
        out += struct.pack("<III", e.pcr, e.type, len(e.digests))
        for alg, digest in e.digests:
            out += struct.pack("<H", alg) + digest
        out += struct.pack("<I", len(e.data)) + e.data
    return bytes(out)
