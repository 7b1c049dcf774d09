"""Inputs build.py fuzz found to break a bound, kept as regression tests (docs/testing.md).

Each row is the failing input (rebuilt exactly: they are megabytes, and the generators that
made them are pystate_build/fuzz.py's) and what the parser must do with it now, within the
campaign's own bounds (run_one: 1 s of CPU, 64 MiB traced).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from pystate_build import fuzz
from pystate_initrd.config import MAX_CONF_SIZE
from pystate_initrd.formats import tcg_eventlog as tl
from pystate_initrd.formats.token import MAX_LOGGED_COUNT, TokenError, decode_token

fuzz._register_targets()


def check_one(name: str, data: bytes, kind: str, detail: str = "") -> None:
    """data through the target's parser as the campaign runs it: kind is accepted/refused."""
    target = fuzz.TARGETS[name]
    got = fuzz.run_one(target.run, target.errors, data)
    assert got[0] == kind, got
    if detail:
        with pytest.raises(target.errors, match=detail):
            target.run(data)


def _limits(make: Callable[[], list[bytes]]) -> list[bytes]:
    return make()


EVENT_LOGS = _limits(fuzz._eventlog_limits)
CONFIGS = _limits(fuzz._config_limits)


# tcg_eventlog.replay re-scanned the whole log for PCR 0's start at every PCR 0 event
# (quadratic: 8000 events took 4.5 s, 65536 minutes); and the largest log the parser took
# (65536 events in three banks) needed 2.3 s through parse, replay and summarize.
@pytest.mark.parametrize(
    ("data", "kind", "detail"),
    [
        (EVENT_LOGS[0], "accepted", ""),  # MAX_EVENTS on PCR 0, sha256
        (EVENT_LOGS[1], "accepted", ""),  # MAX_EVENTS on PCR 7
        (EVENT_LOGS[2], "refused", f"more than {tl.MAX_EVENTS} events"),
        (EVENT_LOGS[3], "accepted", ""),  # MAX_EVENTS on PCR 0, sha1 + sha256 + sha384
        (EVENT_LOGS[4], "accepted", ""),
        (EVENT_LOGS[5], "refused", f"more than {tl.MAX_EVENTS} events"),
    ],
    ids=["pcr0-sha256", "pcr7-sha256", "over-sha256", "pcr0-3banks", "pcr7-3banks", "over-3banks"],
)
def test_event_log_at_the_event_cap(data: bytes, kind: str, detail: str) -> None:
    check_one("eventlog", data, kind, detail)


def test_pcr0_start_is_the_startup_locality_wherever_it_is_logged() -> None:
    """The one-scan replay keeps the old meaning: a StartupLocality event anywhere in the
    log sets PCR 0's start, also for PCR 0 events logged before it."""
    algs = ((0x000B, 32),)
    digest = ((0x000B, bytes(range(32))),)
    locality = tl.Event(0, tl.EV_NO_ACTION, ((0x000B, bytes(32)),), tl.STARTUP_LOCALITY + b"\3")
    sep = tl.Event(0, tl.EV_SEPARATOR, digest, b"")
    log = tl.parse(tl.encode(algs, [sep, locality, sep]))
    start = bytes(31) + b"\3"
    want = tl.tpm2_policy.extend_value("sha256", start, bytes(range(32)))
    want = tl.tpm2_policy.extend_value("sha256", want, bytes(range(32)))
    assert tl.replay(log, "sha256") == {0: want}


# config: a 1 MiB file of 34000 layout sections took 2.4 s, one 1 MiB plain-allowlist line
# 1.3 s; MAX_CONF_SIZE is now 64 KiB.
@pytest.mark.parametrize(
    ("data", "kind", "detail"),
    [
        (CONFIGS[0], "accepted", ""),
        (CONFIGS[1], "accepted", ""),
        (CONFIGS[2], "accepted", ""),
        (CONFIGS[3], "refused", "larger than 64K, refusing"),
        (b"[layout /var/x]\n" * (1 << 16), "refused", "larger than 64K, refusing"),
    ],
    ids=["layout-sections", "comments", "long-allowlist", "over-cap", "1MiB-sections"],
)
def test_config_at_the_size_cap(data: bytes, kind: str, detail: str) -> None:
    assert len(data) <= MAX_CONF_SIZE or kind == "refused"
    check_one("config", data, kind, detail)


def test_tokens_keep_their_event_count_limit() -> None:
    """The event log cap went down; a token's recorded count keeps the old limit, so no
    token that an earlier pystate wrote becomes unusable."""
    token = json.loads(fuzz._token_json(True))
    token["pystate-pcr-events"]["7"]["count"] = MAX_LOGGED_COUNT  # not complete: not replayed
    decode_token(json.dumps(token))
    assert MAX_LOGGED_COUNT == 65536 > tl.MAX_EVENTS
    token["pystate-pcr-events"]["7"]["count"] = MAX_LOGGED_COUNT + 1
    with pytest.raises(TokenError, match="count 65537 is not 0-65536"):
        decode_token(json.dumps(token))
