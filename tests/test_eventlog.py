"""formats/tcg_eventlog.py: the crypto-agile TCG event log.

Tables of refusals and names, hypothesis round trips and hostile input, and the real
reference: a generated log replays to what swtpm holds after tpm2_pcrextend of the same
digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess

import pytest
import swtpm as swtpm_helper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystate_initrd.errors import PystateError
from pystate_initrd.formats import tcg_eventlog as tl
from pystate_initrd.formats.tcg_eventlog import Event, EventLog, EventLogError

swtpm = swtpm_helper.swtpm

SHA1, SHA256, SHA384 = 0x0004, 0x000B, 0x000C
ALGS = ((SHA1, 20), (SHA256, 32))
GLOBAL = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")  # EFI_GLOBAL_VARIABLE, as stored
SECURITY_DB = bytes.fromhex("cbb219d73a3d9645a3bcdad00e67656f")


def digests(data: bytes, algs: tuple[tuple[int, int], ...] = ALGS) -> tuple[tuple[int, bytes], ...]:
    ctor = {SHA1: hashlib.sha1, SHA256: hashlib.sha256, SHA384: hashlib.sha384}
    return tuple((a, ctor[a](data).digest()) for a, _ in algs)


def variable(pcr: int, kind: int, guid: bytes, name: str, value: bytes) -> Event:
    data = tl.variable_data(guid, name, value)
    return Event(pcr, kind, digests(data), data)


def secure_boot_events(db: bytes = b"db-certs") -> list[Event]:
    """What OVMF measures into PCR 7 with Secure Boot on, in outline."""
    return [
        variable(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, GLOBAL, "SecureBoot", b"\x01"),
        variable(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, GLOBAL, "PK", b"pk-cert"),
        variable(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, GLOBAL, "KEK", b"kek-cert"),
        variable(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, SECURITY_DB, "db", db),
        variable(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, SECURITY_DB, "dbx", b"dbx-hashes"),
        Event(7, tl.EV_SEPARATOR, digests(bytes(4)), bytes(4)),
        variable(7, tl.EV_EFI_VARIABLE_AUTHORITY, SECURITY_DB, "db", b"the cert"),
    ]


GOOD = tl.encode(ALGS, secure_boot_events())


def test_parse_names_and_replay() -> None:
    log = tl.parse(GOOD)
    assert log.algorithms == ALGS
    assert [(e.pcr, tl.event_type_name(e.type), tl.event_name(e)) for e in log.events] == [
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot"),
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "PK"),
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "KEK"),
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "db"),
        (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "dbx"),
        (7, "EV_SEPARATOR", ""),
        (7, "EV_EFI_VARIABLE_AUTHORITY", "db"),
    ]
    value = bytes(32)
    for e in log.events:
        value = hashlib.sha256(value + (e.digest(SHA256) or b"")).digest()
    assert tl.replay(log, "sha256") == {7: value}


@pytest.mark.parametrize(
    ("event", "name"),
    [
        (Event(4, tl.EV_EFI_ACTION, (), b"Calling EFI Application from Boot Option"),
         "Calling EFI Application from Boot Option"),
        (Event(5, tl.EV_EFI_ACTION, (), b"Exit Boot Services Invocation\0"),
         "Exit Boot Services Invocation"),
        (Event(0, tl.EV_EFI_PLATFORM_FIRMWARE_BLOB2, (), b"\x08DXE FVxx"), "DXE FVxx"),
        (Event(0, tl.EV_EFI_PLATFORM_FIRMWARE_BLOB2, (), b"\x09DXE"), ""),
        (Event(1, tl.EV_EFI_VARIABLE_BOOT, (), tl.variable_data(GLOBAL, "BootOrder", b"\0\0")),
         "BootOrder"),
        (Event(1, tl.EV_EFI_VARIABLE_BOOT, (), tl.variable_data(GLOBAL, "BootOrder", b"")[:-2]),
         ""),
        (Event(7, tl.EV_EFI_VARIABLE_DRIVER_CONFIG, (), b"short"), ""),
        (Event(7, tl.EV_EFI_ACTION, (), b"tab\there"), "tab?here"),
        (Event(7, tl.EV_EFI_ACTION, (), b"x" * 100), "x" * 61 + "..."),
        (Event(4, tl.EV_EFI_BOOT_SERVICES_APPLICATION, (), b"\x01" * 40), ""),
        (Event(4, tl.EV_SEPARATOR, (), bytes(4)), ""),
    ],
)  # fmt: skip
def test_event_names(event: Event, name: str) -> None:
    assert tl.event_name(event) == name


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (0x80000001, "EV_EFI_VARIABLE_DRIVER_CONFIG"),
        (0x800000E0, "EV_EFI_VARIABLE_AUTHORITY"),
        (4, "EV_SEPARATOR"),
        (0x80000007, "EV_EFI_ACTION"),
        (0x80000003, "EV_EFI_BOOT_SERVICES_APPLICATION"),
        (0x8000ABCD, "0x8000abcd"),
    ],
)
def test_event_type_names(kind: int, name: str) -> None:
    assert tl.event_type_name(kind) == name
    assert tl.event_type_from_name(name) == kind


def spec_event(body: bytes) -> bytes:
    return struct.pack("<II", 0, tl.EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def spec_body(algs: list[tuple[int, int]], count: int | None = None) -> bytes:
    n = len(algs) if count is None else count
    return (
        tl.SPEC_ID_SIGNATURE
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, n)
        + b"".join(struct.pack("<HH", a, s) for a, s in algs)
        + b"\0"
    )


HEADER = spec_event(spec_body(list(ALGS)))


def event_bytes(pcr: int, kind: int, digs: list[tuple[int, bytes]], data: bytes) -> bytes:
    out = struct.pack("<III", pcr, kind, len(digs))
    for a, d in digs:
        out += struct.pack("<H", a) + d
    return out + struct.pack("<I", len(data)) + data


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "event log is empty"),
        (b"\0\0\0", "truncated at byte 0: the first event's PCR index needs 4 bytes, 3 left"),
        (struct.pack("<II", 0, 4) + bytes(30), "does not start with the Spec ID event"),
        (spec_event(b"Spec ID Event02\0" + bytes(20)), "not crypto-agile"),
        (spec_event(spec_body([])), "lists 0 algorithms"),
        (spec_event(spec_body([(SHA256, 32)] * 2)), "lists algorithm 0x000b twice"),
        (spec_event(spec_body([(SHA256, 20)])), "gives sha256 digests 20 bytes"),
        (spec_event(spec_body([(0x0012, 0)])), "gives algorithm 0x0012 0-byte digests"),
        (spec_event(spec_body([(SHA256, 32)], count=3)), "truncated"),
        (spec_event(spec_body([(SHA256, 32)], count=17)), "lists 17 algorithms (1-16)"),
        (HEADER[:-1], "truncated"),
        (HEADER + event_bytes(24, 4, [], b""), "is for PCR 24"),
        (HEADER + event_bytes(0xFFFFFFFF, 4, [], b""), "is for PCR 4294967295"),
        (HEADER + event_bytes(7, 4, [(SHA1, bytes(20))] * 3, b""), "has 3 digests"),
        (HEADER + event_bytes(7, 4, [(SHA1, bytes(20))] * 2, b""), "has two 0x0004 digests"),
        (HEADER + event_bytes(7, 4, [(SHA384, bytes(48))], b""), "algorithm 0x000c, which"),
        (HEADER + event_bytes(7, 4, [(SHA256, bytes(31))], b""), "truncated"),
        (HEADER + event_bytes(7, 4, [], b"abc")[:-1], "the event data needs 3 bytes, 2 left"),
        (HEADER + struct.pack("<III", 7, 4, 0) + b"\xff\xff\xff\xff", "needs 4294967295"),
        (HEADER + b"\0", "truncated"),
        (b"\0" * (tl.MAX_LOG_BYTES + 1), "exceeds"),
    ],
)
def test_refusals(data: bytes, error: str) -> None:
    with pytest.raises(EventLogError) as info:
        tl.parse(data)
    assert error in str(info.value)
    assert "\n" not in str(info.value)


def test_replay_refusals() -> None:
    log = tl.parse(HEADER + event_bytes(7, 4, [(SHA1, bytes(20))], b""))
    with pytest.raises(EventLogError, match=r"event 1 \(EV_SEPARATOR, PCR 7\) has no sha256"):
        tl.replay(log, "sha256")
    with pytest.raises(EventLogError, match="no sha384 digests"):
        tl.replay(log, "sha384")
    assert issubclass(EventLogError, PystateError)


def test_startup_locality_sets_pcr0s_start() -> None:
    """H-CRTM / locality-3 starts: PCR 0 begins at 0…03, not zero (EV_NO_ACTION event)."""
    loc = Event(0, tl.EV_NO_ACTION, digests(bytes(0)), tl.STARTUP_LOCALITY + b"\x03")
    blob = Event(0, 0x80000008, digests(b"fw"), b"x" * 16)
    log = tl.parse(tl.encode(ALGS, [loc, blob]))
    start = bytes(31) + b"\x03"
    assert tl.initial_value(log, "sha256", 0) == start
    want = hashlib.sha256(start + hashlib.sha256(b"fw").digest()).digest()
    assert tl.replay(log, "sha256") == {0: want}
    assert tl.extended(log, 0) == [blob]


# ------------------------------------------------------------------- properties

algorithm_sets = st.sampled_from([((SHA256, 32),), ALGS, ((SHA1, 20), (SHA256, 32), (SHA384, 48))])
# PCRs swtpm lets locality 0 extend and resets to zero: not 17-22.
EXTENDABLE = [*range(17), 23]


@st.composite
def logs(draw: st.DrawFn, max_events: int = 12) -> tuple[tuple[tuple[int, int], ...], list[Event]]:
    algs = draw(algorithm_sets)
    events = []
    for _ in range(draw(st.integers(0, max_events))):
        data = draw(st.binary(max_size=40))
        kind = draw(st.sampled_from([tl.EV_SEPARATOR, tl.EV_EFI_ACTION, 0x80000001, 0x12345678]))
        events.append(Event(draw(st.sampled_from(EXTENDABLE)), kind, digests(data, algs), data))
    return algs, events


@given(logs())
def test_round_trip(log: tuple[tuple[tuple[int, int], ...], list[Event]]) -> None:
    algs, events = log
    assert tl.parse(tl.encode(algs, events)) == EventLog(algs, tuple(events))


def only_event_log_error(data: bytes) -> None:
    with contextlib.suppress(EventLogError):
        log = tl.parse(data)
        for e in log.events:
            tl.event_name(e)
        for bank in ("sha1", "sha256", "sha384", "sha512"):
            with contextlib.suppress(EventLogError):
                tl.replay(log, bank)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_event_log_error(data: bytes) -> None:
    only_event_log_error(data)
    only_event_log_error(HEADER + data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_log_only_event_log_error(data: st.DataObject) -> None:
    raw = bytearray(GOOD)
    only_event_log_error(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    only_event_log_error(bytes(raw))


# --------------------------------------------------- the reference: swtpm's PCRs


def _pcrs(tcti: str, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    out = subprocess.run(
        ["tpm2_pcrread", f"{bank}:{','.join(map(str, pcrs))}"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    values = {}
    for line in out.splitlines():
        index, _, value = line.partition(":")
        if value.strip().startswith("0x"):
            values[int(index)] = bytes.fromhex(value.strip()[2:])
    return values


@swtpm_helper.needs_swtpm
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(logs(max_events=8))
def test_replay_equals_swtpm_after_pcrextend(
    swtpm: swtpm_helper.Swtpm, log: tuple[tuple[tuple[int, int], ...], list[Event]]
) -> None:
    algs, events = log
    swtpm.restart()  # every PCR back to zero
    env = {**os.environ, "TPM2TOOLS_TCTI": swtpm.tcti}
    names = {SHA1: "sha1", SHA256: "sha256", SHA384: "sha384"}
    for e in events:
        spec = ",".join(f"{names[a]}={d.hex()}" for a, d in e.digests)
        subprocess.run(["tpm2_pcrextend", f"{e.pcr}:{spec}"], env=env, check=True)
    parsed = tl.parse(tl.encode(algs, events))
    touched = sorted({e.pcr for e in events}) or [0]
    for alg, _ in algs:
        replayed = tl.replay(parsed, names[alg])
        tpm = _pcrs(swtpm.tcti, names[alg], touched)
        assert {i: replayed.get(i, bytes(len(tpm[i]))) for i in touched} == tpm
